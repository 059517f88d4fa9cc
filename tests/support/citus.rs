//! A Citus coordinator for the tests that need one: `PG_IDEMPOTENCY_CITUS_URL` names a
//! database on it in which the `citus` extension exists and workers are registered.
//! Each test works in a schema of its own there, dropped (with its shards) at the end;
//! without the variable the tests print why they skip and pass.

use anyhow::{Context, Result, ensure};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The variable that names the coordinator database.
pub const CITUS_URL: &str = "PG_IDEMPOTENCY_CITUS_URL";

/// A schema of its own on the coordinator, with this crate's migrations applied and
/// `idempotency_keys` distributed by scope.
pub struct CitusSchema {
    admin: PgPool,
    name: String,
    url: String,
    pool: PgPool,
}

impl CitusSchema {
    /// `None`, with the reason printed, when `PG_IDEMPOTENCY_CITUS_URL` is unset or
    /// empty; an error when it names something other than a coordinator with workers.
    pub async fn create(test: &str) -> Result<Option<Self>> {
        let Some(schema) = Self::empty(test).await? else {
            return Ok(None);
        };
        pg_idempotency::migrate(&schema.pool).await?;
        ensure!(
            pg_idempotency::admin::distribute(&schema.pool).await?,
            "a fresh schema's table was already distributed"
        );
        Ok(Some(schema))
    }

    /// [`create`](Self::create) without the migrations and the distribution.
    pub async fn empty(test: &str) -> Result<Option<Self>> {
        let base = match std::env::var(CITUS_URL) {
            Ok(url) if !url.is_empty() => url,
            _ => {
                eprintln!(
                    "{test}: skipped: {CITUS_URL} is not set (a database on a Citus \
                     coordinator with the citus extension and workers registered)"
                );
                return Ok(None);
            }
        };
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect(&base)
            .await
            .with_context(|| format!("connecting to {CITUS_URL}"))?;
        let workers: i64 =
            sqlx::query_scalar("SELECT count(*) FROM citus_get_active_worker_nodes()")
                .fetch_one(&admin)
                .await
                .with_context(|| format!("{CITUS_URL} is not a Citus coordinator database"))?;
        ensure!(workers > 0, "{CITUS_URL}: no active worker is registered");
        let name = format!("pgidem_{}", uuid::Uuid::new_v4().simple());
        // The name is ours (letters, digits, `_`): nothing to quote.
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
            .execute(&admin)
            .await?;
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}options=-c%20search_path%3D{name}");
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .connect(&url)
            .await?;
        Ok(Some(Self {
            admin,
            name,
            url,
            pool,
        }))
    }

    /// A pool whose connections work in the schema.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A URL whose connections work in the schema.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A pool whose connections work in the schema through a worker instead of the
    /// coordinator (Citus syncs its metadata to the workers, so they take queries too).
    pub async fn worker_pool(&self) -> Result<PgPool> {
        let (host, port): (String, i64) = sqlx::query_as(
            "SELECT node_name, node_port FROM citus_get_active_worker_nodes()
             ORDER BY node_name, node_port LIMIT 1",
        )
        .fetch_one(&self.pool)
        .await?;
        let options = self
            .url
            .parse::<sqlx::postgres::PgConnectOptions>()?
            .host(&host)
            .port(u16::try_from(port)?);
        Ok(PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?)
    }

    /// How many shards `idempotency_keys` has.
    pub async fn shard_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM pg_dist_shard WHERE logicalrelid = 'idempotency_keys'::regclass",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Whether `table` is distributed by `column` and co-located with `idempotency_keys`.
    pub async fn colocated(&self, table: &str, column: &str) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (
                 SELECT 1 FROM pg_dist_partition theirs, pg_dist_partition ours
                 WHERE theirs.logicalrelid = $1::text::regclass
                   AND ours.logicalrelid = 'idempotency_keys'::regclass
                   AND theirs.colocationid = ours.colocationid
                   AND column_to_column_name(theirs.logicalrelid, theirs.partkey) = $2)",
        )
        .bind(table)
        .bind(column)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Drops the schema, its tables and their shards.
    pub async fn close(self) -> Result<()> {
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.name
        )))
        .execute(&self.admin)
        .await?;
        self.admin.close().await;
        Ok(())
    }
}
