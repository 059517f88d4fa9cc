//! Store and fault helpers: cancellation at a chosen await point, no transaction left
//! idle, keys moved past their expiry, a seeded random generator.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
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
