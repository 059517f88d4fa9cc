//! The table-size dimension (`--rows`) and the server settings (`--settings`): filling
//! `idempotency_keys` with a day of keys, reading its size, and restarting the throwaway
//! cluster under Debian's default settings or production-like ones.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use sqlx::PgPool;

/// Scopes the filled rows and the grid's key rows spread over, `acct_0` to `acct_999`:
/// many tenants, so that new keys land all over the `(scope, key)` index as in production.
pub const SCOPES: usize = 1000;

/// The server settings a table size is measured under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Settings {
    /// The server's settings as they are (the only choice with `DATABASE_URL`).
    AsIs,
    /// `initdb`'s (and Debian's) defaults: shared_buffers 128 MB, max_wal_size 1 GB,
    /// checkpoint_timeout 5 min, no WAL compression.
    Default,
    /// Production-like: shared_buffers a quarter of RAM, max_wal_size 8 GB,
    /// checkpoint_timeout 15 min, `wal_compression = lz4` (`on`, that is pglz, before 15).
    Production,
}

impl Settings {
    pub fn name(self) -> &'static str {
        match self {
            Settings::AsIs => "as-is",
            Settings::Default => "default",
            Settings::Production => "production",
        }
    }

    /// The `ALTER SYSTEM` statements that set these settings (none for `as-is`).
    async fn statements(self, pool: &PgPool) -> Result<Vec<String>> {
        let mut out = vec!["ALTER SYSTEM RESET ALL".to_owned()];
        match self {
            Settings::AsIs => return Ok(Vec::new()),
            Settings::Default => {}
            Settings::Production => {
                let quarter_mb = memory_bytes()? / 4 / (1024 * 1024);
                // wal_compression takes a method from 15 on, a boolean before.
                let methods: Option<Vec<String>> = sqlx::query_scalar(
                    "SELECT enumvals FROM pg_settings WHERE name = 'wal_compression'",
                )
                .fetch_one(pool)
                .await?;
                let compression = match methods {
                    Some(methods) if methods.iter().any(|m| m == "lz4") => "lz4",
                    _ => "on",
                };
                out.extend([
                    format!("ALTER SYSTEM SET shared_buffers = '{quarter_mb}MB'"),
                    "ALTER SYSTEM SET max_wal_size = '8GB'".to_owned(),
                    "ALTER SYSTEM SET checkpoint_timeout = '15min'".to_owned(),
                    format!("ALTER SYSTEM SET wal_compression = '{compression}'"),
                ]);
            }
        }
        Ok(out)
    }

    /// Writes these settings with `ALTER SYSTEM` through `pool`; the caller restarts the
    /// server. Returns whether there was anything to write.
    pub async fn write(self, pool: &PgPool) -> Result<bool> {
        let statements = self.statements(pool).await?;
        for statement in &statements {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement.clone()))
                .execute(pool)
                .await
                .with_context(|| format!("{statement} (needs a superuser)"))?;
        }
        Ok(!statements.is_empty())
    }
}

/// This machine's memory, from `/proc/meminfo`.
fn memory_bytes() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let kb = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        });
    match kb {
        Some(kb) => Ok(kb * 1024),
        None => bail!("no MemTotal in /proc/meminfo"),
    }
}

/// Bytes in MiB, as the reports print sizes.
pub fn mb(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The size of `idempotency_keys` in bytes: heap (with TOAST), the primary key, and the
/// `expires_at` index.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sizes {
    pub heap: i64,
    pub primary_key: i64,
    pub expires_at: i64,
}

impl Sizes {
    pub async fn read(pool: &PgPool) -> Result<Self> {
        let (heap, primary_key, expires_at): (i64, i64, i64) = sqlx::query_as(
            "SELECT pg_table_size('idempotency_keys'), \
                    pg_relation_size('idempotency_keys_pkey'), \
                    pg_relation_size('idempotency_keys_expires_at_idx')",
        )
        .fetch_one(pool)
        .await?;
        Ok(Self {
            heap,
            primary_key,
            expires_at,
        })
    }
}

/// The table a block of measurements ran on: how many live keys it held when the block
/// began, under which settings, and its size then.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Table {
    pub rows: i64,
    pub settings: Settings,
    pub sizes: Sizes,
}

/// Adds `to - from` live keys to `idempotency_keys`, shaped like a day of a payment
/// service's first requests: random UUID v4 keys over [`SCOPES`] scopes, created over the
/// last 23 hours and kept for 24, a 201 with a body of about 140 bytes, a request id.
///
/// Fast: the two indexes are dropped, the rows inserted in one statement, and the indexes
/// built again (sorted, in parallel), all in one transaction. The primary key is built
/// 70 % full, as random inserts leave a B-tree (ln 2), not 90 % as `CREATE INDEX` would
/// pack it, so that the first inserts measured do not split nearly every leaf they touch;
/// its `fillfactor` is then reset, so the index is the migration's again. Then `VACUUM
/// ANALYZE` (what autovacuum would have done) and a `CHECKPOINT`. Returns the seconds
/// it took.
pub async fn fill(pool: &PgPool, from: i64, to: i64) -> Result<f64> {
    let t0 = Instant::now();
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(
        "SET LOCAL maintenance_work_mem = '1GB';
         ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_pkey;
         DROP INDEX idempotency_keys_expires_at_idx;",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        r#"INSERT INTO idempotency_keys
               (scope, key, fingerprint_version, fingerprint, status, headers, body,
                created_at, expires_at, request_id)
           SELECT 'acct_' || (n % $3), gen_random_uuid()::text, 1, sha256(int8send(n)), 201,
                  '[["content-type","application/json"]]'::jsonb,
                  convert_to('{"id":"pay_' || lpad(n::text, 12, '0')
                             || '","status":"succeeded","amount":1000,"currency":"eur",'
                             || '"created":"2026-12-06T12:00:00Z"}', 'UTF8'),
                  created, created + interval '24 hours',
                  'req_' || upper(substr(md5(n::text), 1, 26))
           FROM (SELECT n, now() - random() * interval '23 hours' AS created
                 FROM generate_series($1::bigint + 1, $2::bigint) AS n) AS day"#,
    )
    .bind(from)
    .bind(to)
    .bind(i64::try_from(SCOPES)?)
    .execute(&mut *tx)
    .await
    .context("filling idempotency_keys")?;
    sqlx::raw_sql(
        "ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_pkey
             PRIMARY KEY (scope, key) WITH (fillfactor = 70);
         ALTER INDEX idempotency_keys_pkey RESET (fillfactor);
         CREATE INDEX idempotency_keys_expires_at_idx ON idempotency_keys (expires_at);",
    )
    .execute(&mut *tx)
    .await
    .context("building the indexes again")?;
    tx.commit().await?;
    sqlx::raw_sql("VACUUM ANALYZE idempotency_keys")
        .execute(pool)
        .await?;
    sqlx::raw_sql("CHECKPOINT").execute(pool).await.ok();
    Ok(t0.elapsed().as_secs_f64())
}

/// Reads the table's indexes into shared buffers (`pg_prewarm`, if the server has it),
/// as a server that has been serving them for a while holds them. Under buffers smaller
/// than the indexes, only what fits stays (and the OS cache holds the rest).
pub async fn prewarm(pool: &PgPool) -> Result<()> {
    let has: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_prewarm')",
    )
    .fetch_one(pool)
    .await?;
    if !has {
        eprintln!("  (no pg_prewarm on this server: the indexes start cold)");
        return Ok(());
    }
    sqlx::raw_sql(
        "CREATE EXTENSION IF NOT EXISTS pg_prewarm;
         SELECT pg_prewarm('idempotency_keys_pkey'), pg_prewarm('idempotency_keys_expires_at_idx');",
    )
    .execute(pool)
    .await?;
    Ok(())
}
