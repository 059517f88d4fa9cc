//! The crate's schema: its migrations, and what [`migrate`] checks before it touches the
//! database (that the database can hold the crate's text, and whether every migration is
//! applied already).

use std::sync::LazyLock;

use sqlx::PgConnection;

use crate::error::Error;

/// This crate's migrations, recorded in their own history table
/// (`_pg_idempotency_migrations`).
///
/// Usable with `#[sqlx::test(migrator = "pg_idempotency::MIGRATOR")]`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// [`MIGRATOR`] without its session-level advisory lock: [`migrate`] takes a
/// transaction-level one instead, and runs it inside that transaction.
static IN_ONE_TRANSACTION: LazyLock<sqlx::migrate::Migrator> = LazyLock::new(|| {
    let mut migrator = sqlx::migrate!();
    migrator.set_locking(false);
    migrator
});

/// Applies this crate's migrations (idempotent; safe to call at every start-up, also
/// from several nodes at once: they are serialised by an advisory lock).
///
/// The pending migrations are applied in one transaction, which first takes sqlx's
/// migration lock of the database as a *transaction-level* advisory lock
/// (`pg_advisory_xact_lock`, the same key as the session-level lock that
/// `sqlx migrate run` and [`MIGRATOR`] take, so each excludes the other). Nothing outlives
/// the transaction, so `migrate` also works through a pooler in transaction mode
/// (PgBouncer), where a session-level lock could be taken on one server connection and
/// left behind on it.
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
    // Everything in one transaction, the checks included: through a pooler in transaction
    // mode, a statement with bound parameters outside one could reach two server
    // connections (crate::db::in_transaction).
    let mut tx = conn.begin().await?;
    check_encoding(&mut tx).await?;
    if !is_up_to_date(&mut tx).await? {
        // (Runtime-checked queries: the committed `.sqlx/` is left as it is.)
        let database: String = sqlx::query_scalar("SELECT current_database()::text")
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(migration_lock_id(&database))
            .execute(&mut *tx)
            .await?;
        IN_ONE_TRANSACTION.run(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The advisory lock key that sqlx's Postgres migrator uses for `database`:
/// `0x3d32ad9e * crc32(name)` (CRC-32/ISO-HDLC, the IEEE polynomial).
fn migration_lock_id(database: &str) -> i64 {
    let mut crc = !0u32;
    for &byte in database.as_bytes() {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    0x3d32_ad9e * i64::from(!crc)
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
        assert_eq!(IN_ONE_TRANSACTION.table_name, MIGRATOR.table_name);
        assert_eq!(IN_ONE_TRANSACTION.iter().count(), MIGRATOR.iter().count());
    }

    /// The lock key is sqlx's: CRC-32/ISO-HDLC's check value, times sqlx's constant.
    #[test]
    fn the_migration_lock_is_sqlxs() {
        assert_eq!(migration_lock_id("123456789"), 0x3d32_ad9e * 0xcbf4_3926);
        assert_eq!(migration_lock_id(""), 0);
    }
}
