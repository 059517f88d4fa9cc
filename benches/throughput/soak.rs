//! The soak: first requests at a fixed rate for many minutes with a short TTL (a day
//! compressed), the default [`Sweeper`] running, and the table sampled as it goes: is the
//! steady state steady?
//!
//! Arrivals are open-loop: request `i` is due at `i / rate` seconds, and its latency
//! counts from then, so a stall shows as latency rather than as fewer requests
//! (no coordinated omission). At most [`IN_FLIGHT`] requests run at once; a request due
//! while that many run waits its turn, and its wait counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Result;
use pg_idempotency::{Config, SweepOptions, Sweeper};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};

use crate::meters::{Tally, wal_lsn};
use crate::paths::{Ctx, Writes, first_request, response};
use crate::server::one;
use crate::table::{Sizes, mb};

/// Requests running at once, at most.
pub const IN_FLIGHT: usize = 64;

/// What the soak is asked for.
#[derive(Debug, Clone, Copy)]
pub struct SoakPlan {
    /// First requests per second.
    pub rate: f64,
    pub ttl: Duration,
    pub duration: Duration,
    /// How often the table is sampled.
    pub sample_every: Duration,
}

/// One sample: the requests answered since the previous one, and the table now.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the soak began.
    pub at_secs: f64,
    pub answered: u64,
    pub failed: u64,
    pub tps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub wal_bytes_per_request: f64,
    pub sizes: Sizes,
    /// Rows in the table not yet deleted, expired ones included (as `n_live_tup` counts).
    pub live_rows: i64,
    pub dead_rows: i64,
    /// Rows past their expiry that are still in the table: the sweeper's backlog.
    pub expired_rows: i64,
    pub autovacuums: i64,
}

impl Sample {
    pub fn json(&self) -> Value {
        json!({
            "at_secs": self.at_secs.round(),
            "answered": self.answered,
            "failed": self.failed,
            "tps": (self.tps * 10.0).round() / 10.0,
            "p50_ms": (self.p50_ms * 1000.0).round() / 1000.0,
            "p99_ms": (self.p99_ms * 1000.0).round() / 1000.0,
            "wal_bytes_per_request": self.wal_bytes_per_request.round(),
            "heap_bytes": self.sizes.heap,
            "primary_key_bytes": self.sizes.primary_key,
            "expires_at_index_bytes": self.sizes.expires_at,
            "live_rows": self.live_rows,
            "dead_rows": self.dead_rows,
            "expired_rows": self.expired_rows,
            "autovacuums": self.autovacuums,
        })
    }
}

/// Runs the soak on `pool` and returns a sample per [`SoakPlan::sample_every`].
pub async fn soak(pool: &PgPool, processor_url: &str, plan: SoakPlan) -> Result<Vec<Sample>> {
    let ctx = Arc::new(Ctx::with_config(
        pool.clone(),
        processor_url.to_owned(),
        Config::default().with_ttl(plan.ttl),
    ));
    let sweeper = Sweeper::spawn(pool.clone(), SweepOptions::default());
    let latencies = Arc::new(Mutex::new(Vec::<u32>::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let places = Arc::new(Semaphore::new(IN_FLIGHT));
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / plan.rate);

    let arrivals = {
        let (ctx, latencies, failed) = (ctx.clone(), latencies.clone(), failed.clone());
        tokio::spawn(async move {
            let mut i = 0_u64;
            loop {
                let due = start + period.mul_f64(i as f64);
                if due.duration_since(start) >= plan.duration {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let place = places.clone().acquire_owned().await?;
                let (ctx, latencies, failed) = (ctx.clone(), latencies.clone(), failed.clone());
                tokio::spawn(async move {
                    let scope = ctx.scope(i as usize);
                    let account = format!("acct_{}", i % 64);
                    let answer = first_request(
                        &ctx,
                        scope,
                        &account,
                        Writes::Payment,
                        &response(0, i, None),
                    )
                    .await;
                    let elapsed = due.elapsed();
                    drop(place);
                    match answer {
                        Ok(_) => latencies
                            .lock()
                            .await
                            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX)),
                        Err(error) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("  soak: a request failed: {error:#}");
                            }
                        }
                    }
                });
                i += 1;
            }
            anyhow::Ok(())
        })
    };

    let mut samples = Vec::new();
    let mut wal_before = wal_lsn(pool).await?;
    let mut failed_before = 0;
    let mut next = start + plan.sample_every;
    while next.duration_since(start) <= plan.duration {
        tokio::time::sleep_until(next).await;
        next += plan.sample_every;
        let mut window = Tally {
            latencies_us: std::mem::take(&mut *latencies.lock().await),
            ..Tally::default()
        };
        window.ops = window.latencies_us.len() as u64;
        let wal_now = wal_lsn(pool).await?;
        let failed_now = failed.load(Ordering::Relaxed);
        let sample = read_sample(
            pool,
            start.elapsed().as_secs_f64(),
            &mut window,
            plan.sample_every,
            wal_now - wal_before,
            failed_now - failed_before,
        )
        .await?;
        eprintln!(
            "  {:>5.0} s: {:>6.0} tps  p99 {:>7.2} ms  heap {:>5.1} MB  primary key {:>5.1} MB  live {:>7}  dead {:>7}  expired {:>7}  autovacuums {}",
            sample.at_secs,
            sample.tps,
            sample.p99_ms,
            mb(sample.sizes.heap),
            mb(sample.sizes.primary_key),
            sample.live_rows,
            sample.dead_rows,
            sample.expired_rows,
            sample.autovacuums
        );
        samples.push(sample);
        wal_before = wal_now;
        failed_before = failed_now;
    }
    arrivals.await??;
    // Let the last requests finish before the sweeper stops.
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while Arc::strong_count(&ctx) > 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    sweeper.stop().await;
    Ok(samples)
}

async fn read_sample(
    pool: &PgPool,
    at_secs: f64,
    window: &mut Tally,
    every: Duration,
    wal_bytes: i64,
    failed: u64,
) -> Result<Sample> {
    // Rows, expired rows and dead tuples as `pg-idempotency stats` reads them.
    let stats = pg_idempotency::admin::stats(pool).await?;
    let autovacuums: i64 = one(
        pool,
        "SELECT autovacuum_count FROM pg_stat_user_tables \
         WHERE relid = 'idempotency_keys'::regclass",
    )
    .await?;
    Ok(Sample {
        at_secs,
        answered: window.ops,
        failed,
        tps: window.ops as f64 / every.as_secs_f64(),
        p50_ms: window.quantile_ms(0.5),
        p99_ms: window.quantile_ms(0.99),
        wal_bytes_per_request: wal_bytes as f64 / window.ops.max(1) as f64,
        sizes: Sizes::read(pool).await?,
        live_rows: stats.rows,
        dead_rows: stats.dead_tuples,
        expired_rows: stats.expired_rows,
        autovacuums,
    })
}
