//! STUB (replaced by the real module): DATABASE_URL only.
#![allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestServerError {
    #[error("no DATABASE_URL")]
    NoPostgres,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}
pub async fn fresh_pool() -> Result<sqlx::PgPool, TestServerError> {
    let url = std::env::var("DATABASE_URL").map_err(|_| TestServerError::NoPostgres)?;
    let admin = sqlx::PgPool::connect(&url).await?;
    let name = format!("pg_idempotency_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(80)
        .connect(&format!("{base}/{name}"))
        .await?;
    crate::MIGRATOR.run(&pool).await?;
    Ok(pool)
}
