//! Storing a response with its key and committing it, and finding out what happened when
//! the connection broke around `COMMIT`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::Instrument;

use super::Engine;
use super::waiters::Holding;
use crate::db::{ExpiredRow, KeyRow, StoredRow, TxConn, connection_broke, key_taken};
use crate::error::Error;
use crate::metrics;
use crate::outcome::{CommitOutcome, Replay};

/// At most this much is added to
/// [`Config::commit_resolution_wait`](crate::Config::commit_resolution_wait) for the
/// resolving round trip itself.
const RESOLUTION_SLACK: Duration = Duration::from_secs(1);

impl Engine {
    /// Whether a response with `status` is stored, as the store policy says.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidStatus`] for a status outside `100..=599`.
    pub(crate) fn keeps(&self, status: u16) -> Result<bool, Error> {
        if (100..=599).contains(&status) {
            Ok(self.config.store_policy().stores(status))
        } else {
            Err(Error::InvalidStatus(status))
        }
    }

    /// Stores `row` in `tx` (its response's body omitted when it is over the
    /// [cap](crate::Config::with_stored_body_cap)), runs `before_commit`, and commits;
    /// then hands the stored row to this process's duplicates waiting on `holding`.
    /// Returns the row's `created_at`.
    ///
    /// # Errors
    ///
    /// - [`Error::InFlight`]: another request stored a row for the key first without
    ///   sharing the key's lock (see docs/OPERATIONS.md); everything was rolled back, and
    ///   a retry replays the winner's response.
    /// - [`Error::CommitInterrupted`]: the connection broke; the outcome was found out on
    ///   another connection ([`resolve`](Self::resolve)).
    /// - [`Error::Database`]: the server refused a statement; rolled back.
    pub(crate) async fn store_and_commit(
        &self,
        mut tx: TxConn,
        row: &KeyRow<'_>,
        holding: &Holding,
        before_commit: impl FnOnce(),
    ) -> Result<DateTime<Utc>, Error> {
        let capped = row.response.capped(self.config.stored_body_cap());
        let row = &KeyRow {
            response: &capped,
            ..*row
        };
        let stored = match tx.insert_key_row(row).await {
            Ok(created_at) => {
                before_commit();
                tx.commit().await.map(|()| created_at)
            }
            Err(error) if key_taken(&error) => {
                tx.rollback().await?;
                return Err(self.in_flight(row.scope, row.key));
            }
            Err(error) => Err(error),
        };
        match stored {
            Ok(created_at) => {
                // This process's duplicates of the key get the row without a look.
                holding.answer(|| StoredRow {
                    fingerprint: *row.fingerprint,
                    replay: Replay {
                        response: row.response.clone(),
                        first_used_at: created_at,
                        first_request: row.provenance.clone(),
                    },
                });
                Ok(created_at)
            }
            Err(source) if connection_broke(&source) => {
                // The COMMIT may or may not have happened. Close this connection (its
                // backend rolls back if it did not commit yet), then look.
                drop(tx);
                tracing::warn!(error = %source, "the connection broke around COMMIT; resolving the outcome");
                let outcome = self.resolve(row).await;
                Err(Error::CommitInterrupted {
                    scope: row.scope.clone(),
                    key: row.key.clone(),
                    outcome,
                    source,
                })
            }
            Err(error) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "rollback after a refused statement failed; the connection was closed");
                }
                Err(error.into())
            }
        }
    }

    /// Finds out, on another connection, whether `row` was committed by a transaction
    /// whose connection broke around `COMMIT`, waiting at most
    /// [`Config::commit_resolution_wait`](crate::Config::commit_resolution_wait) (plus
    /// [`RESOLUTION_SLACK`] for the round trip) for the old transaction to end.
    ///
    /// The old transaction holds the key's advisory lock until it ends, and a transaction
    /// that commits is visible to new snapshots before it releases its locks: once the
    /// lock is taken, the key's row tells.
    async fn resolve(&self, row: &KeyRow<'_>) -> CommitOutcome {
        let span = tracing::info_span!(
            "idempotency.resolve_commit",
            outcome = tracing::field::Empty
        );
        async move {
            let wait = self.config.commit_resolution_wait();
            let outcome =
                match tokio::time::timeout(wait + RESOLUTION_SLACK, self.look_after(row, wait))
                    .await
                {
                    Ok(Ok(outcome)) => outcome,
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "the commit outcome could not be resolved");
                        CommitOutcome::Unknown
                    }
                    Err(_) => {
                        tracing::warn!("the commit outcome could not be resolved in time");
                        CommitOutcome::Unknown
                    }
                };
            tracing::Span::current().record("outcome", outcome.name());
            metrics::count_labeled(metrics::COMMIT_RESOLUTIONS, "outcome", outcome.name());
            outcome
        }
        .instrument(span)
        .await
    }

    /// [`resolve`](Self::resolve)'s look: waits at most `wait` for the key's lock, then
    /// reads the key's row.
    async fn look_after(&self, row: &KeyRow<'_>, wait: Duration) -> Result<CommitOutcome, Error> {
        let started = Instant::now();
        let mut tx = TxConn::new(self.pool.acquire().await?, None);
        let remaining = wait.saturating_sub(started.elapsed());
        let wait_ms = i32::try_from(remaining.as_millis()).unwrap_or(i32::MAX);
        let found = tx.begin_resolution(wait_ms, row.scope, row.key).await?;
        tx.rollback().await?;
        let stored = match found.row {
            // An expired row is this one's only if the key had none before (a TTL shorter
            // than this wait); otherwise it may be the one this row replaced.
            Some(stored) if stored.live || row.expired == ExpiredRow::Absent => {
                Some(stored.decode()?)
            }
            _ => None,
        };
        Ok(match (stored, found.locked) {
            // A committed row with this request's fingerprint: this one, or an identical
            // request's that ran after it rolled back.
            (Some(stored), _) if stored.fingerprint == *row.fingerprint => {
                CommitOutcome::Stored(Box::new(stored.replay))
            }
            // Another request's row: this insert can never commit.
            (Some(_), _) => CommitOutcome::NotStored,
            // The old transaction has ended and left no row.
            (None, true) => CommitOutcome::NotStored,
            (None, false) => CommitOutcome::Unknown,
        })
    }
}
