//! What the run is measured on: the server, the benchmark's own database on it, the
//! machine.

use std::time::Duration;

use anyhow::{Context, Result};
use pg_idempotency::testing::TestDatabase;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// What the run was measured on.
#[derive(Debug)]
pub struct Server {
    pub description: String,
    pub version: String,
    pub settings: Vec<(String, String)>,
}

impl Server {
    pub fn setting(&self, name: &str) -> &str {
        self.settings
            .iter()
            .find(|(n, _)| n == name)
            .map_or("?", |(_, v)| v.as_str())
    }

    /// The server's version number, as `version()` spells it (`15.20`).
    pub fn postgres_version(&self) -> &str {
        self.version.split_whitespace().nth(1).unwrap_or("?")
    }

    /// The settings as `name=value` pairs on one line.
    pub fn settings_line(&self) -> String {
        self.settings
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The first column of the one row `sql` answers, sent as a simple query: one exchange,
/// so that a transaction-mode pooler cannot split it over two server connections, as it
/// may a statement outside a transaction (sqlx sends those as two exchanges).
pub async fn one<T>(pool: &PgPool, sql: impl sqlx::SqlSafeStr) -> Result<T>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    let row = sqlx::raw_sql(sql).fetch_one(pool).await?;
    Ok(sqlx::Row::try_get(&row, 0)?)
}

pub async fn describe_server(pool: &PgPool, description: String) -> Result<Server> {
    let version: String = one(pool, "SELECT version()").await?;
    let mut settings = Vec::new();
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_level",
        "shared_buffers",
        "max_wal_size",
        "checkpoint_timeout",
        "wal_compression",
        "autovacuum",
        "max_connections",
    ] {
        let value: String = one(pool, sqlx::AssertSqlSafe(format!("SHOW {name}"))).await?;
        settings.push((name.to_owned(), value));
    }
    Ok(Server {
        description,
        version,
        settings,
    })
}

/// The URL with its password hidden.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_owned(),
    }
}

/// A database of our own on the server at `server_url` (a fresh one with the crate's
/// migrations, from `pg_idempotency::testing`), the benchmark's tables, and a pool of
/// `max_connections` opened up front.
pub struct Database {
    db: TestDatabase,
    pub pool: PgPool,
    max_connections: u32,
    ping: bool,
}

impl Database {
    pub async fn create(server_url: &str, max_connections: u32, ping: bool) -> Result<Self> {
        let db = TestDatabase::create_on(server_url)
            .await
            .with_context(|| format!("creating a database on {}", redact(server_url)))?;
        db.pool().close().await;
        let pool = connect(db.url(), max_connections, ping).await?;
        sqlx::raw_sql(
            "CREATE TABLE payments (
                 id      bigserial PRIMARY KEY,
                 account text   NOT NULL,
                 amount  bigint NOT NULL,
                 -- The phased path records the card processor's answer here.
                 processor_charge_id text
             );
             -- The zero2prod shape's own table: the columns of idempotency_keys, the
             -- response nullable until the UPDATE fills it in.
             CREATE TABLE idem_z2p (
                 scope               text        NOT NULL,
                 key                 text        NOT NULL,
                 fingerprint_version smallint    NOT NULL,
                 fingerprint         bytea       NOT NULL,
                 status              smallint,
                 headers             jsonb,
                 body                bytea,
                 created_at          timestamptz NOT NULL DEFAULT now(),
                 expires_at          timestamptz NOT NULL,
                 PRIMARY KEY (scope, key)
             );
             CREATE INDEX idem_z2p_expires_at_idx ON idem_z2p (expires_at);
             -- The realistic business transaction's other tables: one account row per
             -- client (`acct_<n>`), a ledger and an outbox.
             CREATE TABLE accounts (
                 account text   PRIMARY KEY,
                 balance bigint NOT NULL
             );
             INSERT INTO accounts SELECT 'acct_' || n, 0 FROM generate_series(0, 1023) AS n;
             CREATE TABLE ledger (
                 id         bigserial   PRIMARY KEY,
                 account    text        NOT NULL,
                 payment_id bigint      NOT NULL,
                 amount     bigint      NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now()
             );
             CREATE TABLE outbox (
                 id         bigserial   PRIMARY KEY,
                 topic      text        NOT NULL,
                 payload    jsonb       NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .execute(&pool)
        .await?;
        Ok(Self {
            db,
            pool,
            max_connections,
            ping,
        })
    }

    /// A new pool, after the server restarted (the old one's connections are gone).
    pub async fn reconnect(&mut self) -> Result<()> {
        self.pool.close().await;
        self.pool = connect(self.db.url(), self.max_connections, self.ping).await?;
        Ok(())
    }

    pub async fn drop_now(self) -> Result<()> {
        self.pool.close().await;
        self.db.close().await?;
        Ok(())
    }
}

async fn connect(url: &str, max_connections: u32, ping: bool) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .min_connections(max_connections)
        .acquire_timeout(Duration::from_secs(60))
        .test_before_acquire(ping)
        .connect(url)
        .await?)
}

/// Every connection opened and used once before anything is measured.
pub async fn open_all(pool: &PgPool, n: u32) -> Result<()> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(pool.acquire().await?);
    }
    for conn in &mut conns {
        sqlx::raw_sql("SELECT 1").execute(&mut **conn).await?;
    }
    Ok(())
}

/// Cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}
