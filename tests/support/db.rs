//! Store and fault helpers: cancellation at a chosen await point, no transaction left
//! idle, keys moved past their expiry, a seeded random generator, a metrics recorder for
//! one test.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sqlx::PgPool;

/// Polls `future` at most `polls` times, then drops it: a cancellation at the
/// `polls`-th await point. `Some` if it finished first.
pub async fn cancel_after<F: Future>(future: F, polls: usize) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut seen = 0;
    std::future::poll_fn(|cx| match future.as_mut().poll(cx) {
        Poll::Ready(output) => Poll::Ready(Some(output)),
        Poll::Pending => {
            seen += 1;
            if seen >= polls {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        }
    })
    .await
}

/// No connection of this database sits idle inside a transaction (waiting a little for
/// background rollbacks of dropped claims).
pub async fn assert_no_idle_transactions(pool: &PgPool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stuck: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(pool)
        .await?;
        if stuck == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{stuck} connection(s) left idle in a transaction");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Moves `limit` stored keys (the first by key order) past their expiry, by the
/// database clock.
pub async fn expire(pool: &PgPool, limit: i64) -> Result<()> {
    sqlx::query(
        "UPDATE idempotency_keys
         SET created_at = now() - interval '2 days', expires_at = now() - interval '1 day'
         WHERE key IN (SELECT key FROM idempotency_keys ORDER BY key LIMIT $1)",
    )
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(())
}

/// Moves every stored key past its expiry.
pub async fn expire_all(pool: &PgPool) -> Result<()> {
    expire(pool, i64::MAX).await
}

/// A small deterministic pseudo-random generator (xorshift64*), so that a failing run
/// can be repeated from the seed it prints.
pub struct Rng(u64);

impl Rng {
    /// From `TEST_SEED` when set, else from the clock; prints the seed.
    pub fn from_env(name: &str) -> Self {
        let seed = std::env::var("TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{name}: TEST_SEED={seed}");
        Self::seeded(seed)
    }

    /// From a given seed.
    pub fn seeded(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// The sweeper's contract on the `idempotency_keys` that `pool` sees, with `shards`
/// shards (1 for a plain table): a batch deletes at most its size per shard, skips a row
/// another transaction holds instead of waiting for it, leaves live rows alone, and the
/// background sweeper deletes the rest and stops cleanly.
pub async fn check_sweep_contract(pool: &PgPool, shards: i64) -> Result<()> {
    use pg_idempotency::{SweepOptions, Sweeper, delete_expired, sweep};
    // 64 scopes (spread over the shards) of 3 expired keys each, and one live key.
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status,
                                       headers, body, created_at, expires_at)
         SELECT 'scope-' || (i % 64), 'key-' || i, 1, '\\x00', 201, '[]', '',
                now() - interval '2 days',
                CASE WHEN i = 0 THEN now() + interval '1 day' ELSE now() - interval '1 day' END
         FROM generate_series(0, 192) i",
    )
    .execute(pool)
    .await?;
    let count = |filter: &'static str| async move {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM idempotency_keys WHERE {filter}"
        )))
        .fetch_one(pool)
        .await
    };

    let first = delete_expired(pool, 1).await?;
    ensure!(
        (1..=u64::try_from(shards)?).contains(&first),
        "a batch of 1 deleted {first} rows over {shards} shard(s)"
    );

    let mut holder = pool.begin().await?;
    let held: String = sqlx::query_scalar(
        "SELECT key FROM idempotency_keys
         WHERE scope = 'scope-1' AND expires_at <= now() LIMIT 1 FOR UPDATE",
    )
    .fetch_one(&mut *holder)
    .await?;
    let options = SweepOptions::default()
        .with_batch_size(7)
        .with_pause(Duration::ZERO);
    let swept = tokio::time::timeout(Duration::from_secs(30), sweep(pool, &options))
        .await
        .context("the sweep waited for a row another transaction holds")??;
    ensure!(swept == 192 - first - 1, "swept {swept} after {first}");
    ensure!(
        count("expires_at <= now()").await? == 1,
        "only the held row is left"
    );
    ensure!(
        count("expires_at > now()").await? == 1,
        "the live row stays"
    );
    holder.commit().await?;

    let sweeper = Sweeper::spawn(
        pool.clone(),
        options.with_interval(Duration::from_secs(3600)),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while count("expires_at <= now()").await? > 0 {
        ensure!(
            Instant::now() < deadline,
            "the sweeper left {held} in place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        sweeper.stop().await == 1,
        "the sweeper deleted the held row, once"
    );
    ensure!(count("true").await? == 1, "the live row stays");
    Ok(())
}

/// Runs `body` on a current-thread runtime with `recorder` installed for this thread.
pub fn with_recorder<T>(
    recorder: &metrics_util::debugging::DebuggingRecorder,
    body: impl Future<Output = T>,
) -> T {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(body)
    })
}
