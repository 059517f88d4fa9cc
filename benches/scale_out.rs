//! Scale-out measurement: first requests and the sweeper on one server or on a Citus
//! cluster, with many tenants.
//!
//! ```text
//! cargo bench --bench scale_out -- --database-url postgres://.../db              # one server
//! cargo bench --bench scale_out -- --database-url postgres://coordinator/db --distribute
//! ```
//!
//! Works in a schema of its own in the named database (dropped at the end), so it runs
//! in a Citus coordinator database whose workers are registered. `--distribute`
//! distributes `idempotency_keys` by scope and co-locates the `payments` table with it
//! (`admin::distribute`, `admin::colocate`). Then, for `--seconds` each, interleaved in
//! four slices:
//!
//! - `bare`: `BEGIN; INSERT INTO payments ..; COMMIT`, the yardstick;
//! - `first_request`: [`IdempotencyStore::begin`], the same insert through the claim,
//!   [`Claim::complete`](pg_idempotency::Claim::complete);
//!
//! by `--clients` clients, each request in a random one of `--tenants` scopes (its
//! payment in the same account, so co-located). Then `--sweep-rows` expired rows over
//! the tenants are swept by [`pg_idempotency::sweep`] alone, in batches of `--batch`
//! with no pause, and the rate is printed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use pg_idempotency::{
    Begin, IdempotencyKey, IdempotencyStore, IdempotentRequest, Scope, StoredResponse,
    SweepOptions, admin,
};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// First-request and sweep throughput on one server or a Citus cluster.
#[derive(Debug, Parser)]
struct Args {
    /// The database to work in (a schema of its own is created and dropped).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Distribute the tables with Citus (the database must be a coordinator's).
    #[arg(long)]
    distribute: bool,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: u32,
    /// Seconds each path runs in total (four slices each).
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// Scopes (tenants) the requests and the expired rows spread over.
    #[arg(long, default_value_t = 1000)]
    tenants: u32,
    /// Expired rows to sweep.
    #[arg(long, default_value_t = 1_000_000)]
    sweep_rows: i64,
    /// Rows per sweep statement (per shard on Citus).
    #[arg(long, default_value_t = 10_000)]
    batch: u32,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy)]
enum Path {
    Bare,
    FirstRequest,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let schema = format!("scale_out_{}", uuid::Uuid::new_v4().simple());
    let admin_pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&args.database_url)
        .await
        .context("connecting to --database-url")?;
    // The name is ours (letters, digits, `_`): nothing to quote.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin_pool)
        .await?;
    let result = run(&args, &schema).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin_pool)
        .await?;
    result
}

async fn run(args: &Args, schema: &str) -> Result<()> {
    let separator = if args.database_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!(
        "{}{separator}options=-c%20search_path%3D{schema}",
        args.database_url
    );
    let pool = PgPoolOptions::new()
        .max_connections(args.clients + 1)
        .min_connections(args.clients + 1)
        .after_connect(|conn, _| Box::pin(pg_idempotency::prepare_connection(conn)))
        .connect(&url)
        .await?;
    pg_idempotency::migrate(&pool).await?;
    sqlx::query(
        "CREATE TABLE payments (
             id      uuid   NOT NULL DEFAULT gen_random_uuid(),
             account text   NOT NULL,
             amount  bigint NOT NULL,
             PRIMARY KEY (account, id)
         )",
    )
    .execute(&pool)
    .await?;
    if args.distribute {
        admin::distribute(&pool).await?;
        admin::colocate(&pool, "payments", "account").await?;
    }
    let shards: i32 = sqlx::query_scalar("SELECT coalesce(idempotency_shard_count(), 1)")
        .fetch_one(&pool)
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    println!(
        "PostgreSQL {version}, idempotency_keys in {shards} shard(s), {} clients, {} tenants",
        args.clients, args.tenants
    );

    // Warm up, then alternate the paths in four slices each.
    slice(&pool, args, Path::FirstRequest, Duration::from_secs(1)).await?;
    let each = Duration::from_secs_f64(args.seconds / 4.0);
    let (mut bare, mut first) = (0, 0);
    for _ in 0..4 {
        bare += slice(&pool, args, Path::Bare, each).await?;
        first += slice(&pool, args, Path::FirstRequest, each).await?;
    }
    let rate = |n: u64| n as f64 / args.seconds;
    println!(
        "bare: {:.0} tx/s; first_request: {:.0} tx/s ({:.2} x bare)",
        rate(bare),
        rate(first),
        first as f64 / bare.max(1) as f64
    );

    let fill = Instant::now();
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status,
                                       headers, body, created_at, expires_at)
         SELECT 'tenant-' || (i % $2), 'expired-' || i, 1, '\\x00', 201, '[]', '',
                now() - interval '2 days', now() - interval '1 day'
         FROM generate_series(1, $1) i",
    )
    .bind(args.sweep_rows)
    .bind(i64::from(args.tenants))
    .execute(&pool)
    .await?;
    println!(
        "inserted {} expired rows in {:.1} s",
        args.sweep_rows,
        fill.elapsed().as_secs_f64()
    );
    let options = SweepOptions::default()
        .with_batch_size(args.batch)
        .with_pause(Duration::ZERO);
    let t0 = Instant::now();
    let deleted = pg_idempotency::sweep(&pool, &options).await?;
    let secs = t0.elapsed().as_secs_f64();
    ensure!(
        deleted >= u64::try_from(args.sweep_rows)?,
        "swept {deleted} rows"
    );
    println!(
        "sweep alone: {deleted} rows in {secs:.2} s = {:.0} rows/s (batches of {} per shard, no pause)",
        deleted as f64 / secs,
        args.batch
    );
    pool.close().await;
    Ok(())
}

/// Runs `path` with every client for `length`; returns the transactions completed.
async fn slice(pool: &PgPool, args: &Args, path: Path, length: Duration) -> Result<u64> {
    let store = IdempotencyStore::new(pool.clone());
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..args.clients {
        let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
        let tenants = args.tenants;
        clients.spawn(async move {
            let mut n = u64::from(client);
            while !stop.load(Ordering::Relaxed) {
                n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let tenant = format!("tenant-{}", (n >> 33) % u64::from(tenants));
                request(&store, path, &tenant).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(client) = clients.join_next().await {
        client??;
    }
    Ok(done.load(Ordering::Relaxed))
}

async fn request(store: &IdempotencyStore, path: Path, tenant: &str) -> Result<()> {
    const INSERT: &str = "INSERT INTO payments (account, amount) VALUES ($1, 1000)";
    match path {
        Path::Bare => {
            let mut tx = store.pool().begin().await?;
            sqlx::query(INSERT).bind(tenant).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        Path::FirstRequest => {
            let scope = Scope::new(tenant)?;
            let key = IdempotencyKey::from_uuid(uuid::Uuid::new_v4())?;
            let request = IdempotentRequest::new("POST", "/v1/payments", br#"{"amount":1000}"#);
            let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
                anyhow::bail!("a fresh key was not claimed");
            };
            sqlx::query(INSERT).bind(tenant).execute(&mut claim).await?;
            claim.complete(&StoredResponse::new(201, "{}")).await?;
        }
    }
    Ok(())
}
