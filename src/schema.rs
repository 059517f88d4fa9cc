//! The crate's schema: its migrations, and what [`migrate`] checks before it touches the
//! database (that the database can hold the crate's text, and whether every migration is
//! applied already).

use sqlx::PgConnection;

use crate::error::Error;

/// This crate's migrations, recorded in their own history table
/// (`_pg_idempotency_migrations`).
///
/// Usable with `#[sqlx::test(migrator = "pg_idempotency::MIGRATOR")]`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Applies this crate's migrations (idempotent; safe to call at every start-up, also
/// from several nodes at once: sqlx serialises them with an advisory lock).
///
/// First refuses a database whose encoding is not UTF-8. When every migration is
/// applied already, it only reads the history table, so an application role without DDL
/// rights can call it at start-up; applying a migration needs the role that owns the
/// schema (docs/OPERATIONS.md, "Least privilege").
///
/// # Errors
///
/// [`Error::UnsupportedEncoding`], [`Error::Migrate`], [`Error::Database`].
pub async fn migrate<'a, A>(conn: A) -> Result<(), Error>
where
    A: sqlx::Acquire<'a, Database = sqlx::Postgres>,
{
    let mut conn = conn.acquire().await?;
    check_encoding(&mut conn).await?;
    if !is_up_to_date(&mut conn).await? {
        MIGRATOR.run(&mut *conn).await?;
    }
    Ok(())
}

/// The only server encoding that holds every scope, key and header the crate stores.
const REQUIRED_ENCODING: &str = "UTF8";

/// Refuses a database whose encoding is not UTF-8 ([`Error::UnsupportedEncoding`]).
///
/// The hot path spells text as Unicode escapes, which a `SQL_ASCII` database refuses
/// beyond ASCII, and a single-byte encoding such as `LATIN1` cannot store most of
/// Unicode: every such scope or header would fail at run time, request after request.
async fn check_encoding(conn: &mut PgConnection) -> Result<(), Error> {
    let encoding =
        sqlx::query_scalar!(r#"SELECT current_setting('server_encoding') AS "encoding!""#)
            .fetch_one(conn)
            .await?;
    if encoding == REQUIRED_ENCODING {
        Ok(())
    } else {
        Err(Error::UnsupportedEncoding { encoding })
    }
}

/// Whether the history table records exactly this build's migrations, each applied
/// successfully with the same checksum: then there is nothing to do, and nothing that
/// needs DDL rights (the migrator would `CREATE TABLE IF NOT EXISTS` its history table
/// first, which needs `CREATE` on the schema even when the table exists).
///
/// Read-only; anything else (no history table, a migration missing, failed, changed, or
/// unknown to this build) is left to the migrator, which applies or reports it.
async fn is_up_to_date(conn: &mut PgConnection) -> Result<bool, Error> {
    let exists = sqlx::query_scalar!(
        r#"SELECT to_regclass('_pg_idempotency_migrations') IS NOT NULL AS "exists!""#
    )
    .fetch_one(&mut *conn)
    .await?;
    if !exists {
        return Ok(false);
    }
    let applied = sqlx::query!(
        "SELECT version, checksum, success FROM _pg_idempotency_migrations ORDER BY version"
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut known: Vec<_> = MIGRATOR
        .iter()
        .filter(|migration| migration.migration_type.is_up_migration())
        .collect();
    known.sort_by_key(|migration| migration.version);
    Ok(applied.len() == known.len()
        && applied.iter().zip(known).all(|(row, migration)| {
            row.success
                && row.version == migration.version
                && row.checksum == migration.checksum.as_ref()
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The history table read above is the one the migrator writes.
    #[test]
    fn the_history_table_is_the_migrators() {
        assert_eq!(MIGRATOR.table_name, "_pg_idempotency_migrations");
    }
}
