//! Deleting expired keys: a one-shot sweep, and a background sweeper that stops cleanly.
//!
//! Expired rows already count as unused (a new request replaces them atomically), so
//! sweeping only reclaims space. Each batch is its own short statement: it deletes at
//! most `batch_size` expired rows per shard and skips rows that other transactions hold,
//! so it never blocks a request and never holds locks for long. A plain table is one
//! shard; when `idempotency_keys` is distributed with Citus, each shard's part of the
//! batch runs and commits on its own worker (docs/OPERATIONS.md, "Citus").

use std::time::Duration;

use sqlx::{PgExecutor, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::metrics;
use tracing::Instrument;

/// Deletes one batch of at most `batch_size` expired rows (by the database clock) per
/// shard and returns how many it deleted. Runs `SELECT idempotency_sweep($1)`, the same
/// function a scheduler such as pg_cron can call. On plain PostgreSQL the table is one
/// shard; on Citus every shard deletes its part in a transaction of its own on its
/// worker, so a batch may delete up to `batch_size` times the shard count.
///
/// # Errors
///
/// [`Error::Database`].
pub async fn delete_expired<'e>(
    executor: impl PgExecutor<'e>,
    batch_size: u32,
) -> Result<u64, Error> {
    let batch = i32::try_from(batch_size).unwrap_or(i32::MAX);
    // One simple-query message with the batch size as a literal (an integer: nothing to
    // escape), not a statement with a bound parameter, which sqlx sends as two exchanges:
    // a pooler in transaction mode could give the second to another server connection,
    // and a caller may pass the pool itself.
    let sweep = format!("SELECT idempotency_sweep({batch})");
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sweep))
        .fetch_one(executor)
        .await?;
    let deleted: Option<i64> = sqlx::Row::try_get(&row, 0)?;
    let deleted = u64::try_from(deleted.unwrap_or(0)).unwrap_or(0);
    metrics::count(metrics::SWEPT_ROWS, deleted);
    Ok(deleted)
}

/// How a sweep runs.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    batch_size: u32,
    pause: Duration,
    interval: Duration,
}

impl Default for SweepOptions {
    /// Batches of 1,000 rows with a 50 ms pause between them, every 60 s.
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            pause: Duration::from_millis(50),
            interval: Duration::from_secs(60),
        }
    }
}

impl SweepOptions {
    /// Rows deleted per statement and shard (default 1,000; at least 1).
    #[must_use]
    pub fn with_batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Pause between two batches of one sweep, to leave room for the writers
    /// (default 50 ms; zero for none).
    #[must_use]
    pub fn with_pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// Time between the end of one background sweep and the start of the next
    /// (default 60 s).
    #[must_use]
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Rows deleted per statement and shard.
    pub fn batch_size(&self) -> u32 {
        self.batch_size
    }

    /// Pause between two batches.
    pub fn pause(&self) -> Duration {
        self.pause
    }

    /// Time between two background sweeps.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// Deletes every expired row, batch by batch (pausing between batches), until a batch
/// comes back short (fewer than `batch_size` rows: then every shard's part was short),
/// and returns how many rows it deleted.
///
/// # Errors
///
/// [`Error::Database`]; rows deleted by earlier batches stay deleted.
pub async fn sweep(pool: &PgPool, options: &SweepOptions) -> Result<u64, Error> {
    sweep_until(pool, options, &CancellationToken::new()).await
}

/// [`sweep`] that also stops between batches once `stop` is cancelled.
async fn sweep_until(
    pool: &PgPool,
    options: &SweepOptions,
    stop: &CancellationToken,
) -> Result<u64, Error> {
    let span = tracing::info_span!(
        "idempotency.sweep",
        batch_size = options.batch_size,
        deleted = tracing::field::Empty
    );
    async move {
        let mut total = 0;
        loop {
            let deleted = delete_expired(pool, options.batch_size).await?;
            total += deleted;
            if deleted < u64::from(options.batch_size) || stop.is_cancelled() {
                break;
            }
            if !options.pause.is_zero() {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(options.pause) => {}
                }
            }
        }
        tracing::Span::current().record("deleted", total);
        Ok(total)
    }
    .instrument(span)
    .await
}

/// A background task that sweeps on an interval until it is stopped.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) {
/// use pg_idempotency::{SweepOptions, Sweeper};
///
/// let sweeper = Sweeper::spawn(pool, SweepOptions::default());
/// // ... serve requests ...
/// let deleted = sweeper.stop().await; // finishes the batch in progress, then returns
/// println!("swept {deleted} expired keys");
/// # }
/// ```
#[derive(Debug)]
pub struct Sweeper {
    stop: CancellationToken,
    task: JoinHandle<u64>,
}

impl Sweeper {
    /// Starts sweeping now and then every [`SweepOptions::interval`], with a token of its
    /// own. Must be called inside a tokio runtime.
    pub fn spawn(pool: PgPool, options: SweepOptions) -> Self {
        Self::spawn_with_token(pool, options, CancellationToken::new())
    }

    /// Like [`spawn`](Self::spawn), stopping when `stop` (or a parent of it) is cancelled.
    pub fn spawn_with_token(pool: PgPool, options: SweepOptions, stop: CancellationToken) -> Self {
        let task = tokio::spawn(run(pool, options, stop.clone()));
        Self { stop, task }
    }

    /// The token that stops this sweeper.
    pub fn token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Asks the sweeper to stop and waits for it: the statement in progress completes,
    /// no new one starts. Returns how many rows it deleted over its life.
    pub async fn stop(self) -> u64 {
        self.stop.cancel();
        self.join().await
    }

    /// Waits for the sweeper to stop (after its token is cancelled) and returns how many
    /// rows it deleted over its life.
    pub async fn join(self) -> u64 {
        match self.task.await {
            Ok(deleted) => deleted,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => 0,
        }
    }
}

async fn run(pool: PgPool, options: SweepOptions, stop: CancellationToken) -> u64 {
    let mut total = 0;
    while !stop.is_cancelled() {
        match sweep_until(&pool, &options, &stop).await {
            Ok(deleted) => total += deleted,
            Err(error) => {
                tracing::warn!(%error, "idempotency key sweep failed; retrying at the next interval")
            }
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(options.interval) => {}
        }
    }
    total
}
