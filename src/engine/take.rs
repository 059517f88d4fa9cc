//! Taking a key: its lock and its row in one round trip, a bounded wait while another
//! request holds it, and the answer a stored response gives.

use std::future::Future;
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::Engine;
use super::waiters::{FIRST_POLL, Holding, MAX_POLL, Waited};
use crate::db::{ExpiredRow, Found, StoredRow, TxConn, connection_broke};
use crate::error::Error;
use crate::fingerprint::{Fingerprint, IdempotentRequest};
use crate::key::IdempotencyKey;
use crate::metrics;
use crate::outcome::{Begin, Replay};
use crate::provenance::Provenance;
use crate::scope::Scope;

/// A transaction that holds a key's advisory lock, the key having no live row.
///
/// Fields drop in order: the transaction ends (or its rollback starts) before the
/// holding wakes this process's duplicates of the key.
pub(crate) struct KeyHold {
    /// With the scope's place among the connections it may hold, given back after the
    /// transaction.
    pub tx: TxConn,
    /// When the transaction began (before its first round trip was sent).
    pub began: Instant,
    /// Whether the key has an expired row, which the new row replaces.
    pub expired: ExpiredRow,
    /// Wakes this process's duplicates of the key when dropped, handing them the row
    /// stored under this hold, if [`Holding::answer`] was given one.
    pub holding: Holding,
}

impl Engine {
    /// Takes `(scope, key)` for `request`, or answers from the key's live row (a replay,
    /// or [`Error::Conflict`]).
    ///
    /// Each look opens a transaction, tries the key's advisory lock and reads the key's
    /// row, in one round trip. When the lock is taken and the key has no live row, `hold`
    /// gets the transaction: it makes the key the caller's (`Some`), or ends the
    /// transaction and says that another holder has the request (`None`). While the key
    /// is held, this waits without a connection (see [`super::waiters`]) and looks
    /// again, until [`Config::in_flight_wait`](crate::Config::in_flight_wait) has passed
    /// since the request's [start](IdempotentRequest::waits_from). The first look waits
    /// for its connection until the [connection wait](crate::Config::connection_wait) has
    /// passed since then; a look after waiting for a holder, no later than the in-flight
    /// wait ends, so that a duplicate answers within it whatever the load.
    ///
    /// Records the outcome in the current span's `outcome` field (`claimed` names a
    /// claim) and in the matching counter.
    ///
    /// # Errors
    ///
    /// [`Error::InFlight`] if the key stayed held, or too many duplicates of the key
    /// already wait in this process; [`Error::Conflict`]; [`Error::NoConnection`] when no
    /// connection was free in time;
    /// the errors of `hold`; the store's server-side errors.
    pub(crate) async fn take<T, F>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &IdempotentRequest<'_>,
        claimed: &'static str,
        hold: impl FnMut(KeyHold) -> F,
    ) -> Result<Begin<T>, Error>
    where
        F: Future<Output = Result<Option<T>, Error>>,
    {
        let taken = self.look_until_taken(scope, key, request, hold).await;
        let (outcome, counter) = match &taken {
            Ok(Begin::Claimed(_)) => (claimed, Some(metrics::CLAIMS)),
            Ok(Begin::Replay(_)) => ("replayed", Some(metrics::REPLAYS)),
            Err(Error::Conflict { .. }) => ("conflict", Some(metrics::CONFLICTS)),
            Err(Error::InFlight { .. }) => ("in_flight", Some(metrics::IN_FLIGHT)),
            Err(_) => ("error", None),
        };
        if let Some(counter) = counter {
            metrics::count(counter, 1);
        }
        tracing::Span::current().record("outcome", outcome);
        taken
    }

    async fn look_until_taken<T, F>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &IdempotentRequest<'_>,
        mut hold: impl FnMut(KeyHold) -> F,
    ) -> Result<Begin<T>, Error>
    where
        F: Future<Output = Result<Option<T>, Error>>,
    {
        // Both waits count from the request's start, and what a duplicate waits for a
        // connection counts against its in-flight wait.
        let waits_from = request.waits_from().unwrap_or_else(Instant::now);
        let deadline = waits_from + self.config.in_flight_wait();
        let first_look_by = waits_from + self.config.connection_wait();
        let limit = self.config.in_flight_waiters();
        // No pause before the first look; then it doubles.
        let mut pause = None;
        // Set while this request looks at the key for this process's other duplicates.
        let mut looking = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let waited = (self.waiters)
                .wait(scope, key, pause, left, limit, &mut looking)
                .await;
            let waited_for_holder = match waited {
                Waited::Refused | Waited::StillHeld => return Err(self.in_flight(scope, key)),
                Waited::Answered(row) => {
                    return answer(row, scope, key, request).map(Begin::Replay);
                }
                Waited::LookAgain { waited } => waited,
            };
            let began = Instant::now();
            // A duplicate's look waits for its connection no longer than its in-flight
            // wait leaves; a first look, the connection wait from the request's start.
            let duplicate = pause.is_some() || waited_for_holder;
            let connection_deadline = if duplicate {
                (began + self.config.connection_wait()).min(deadline)
            } else {
                first_look_by
            };
            if pause.is_some() {
                metrics::count(metrics::POLLS, 1);
            }
            let (mut tx, found) = match self.look(scope, key, connection_deadline).await {
                // A duplicate whose wait ran out before a connection came: the key was
                // held for all of it (by another process, or by a request of this one
                // that stopped without a row, a look included), so "in flight".
                Err(Error::NoConnection { .. }) if duplicate && Instant::now() >= deadline => {
                    return Err(self.in_flight(scope, key));
                }
                // The request waited since its start, not only for this look.
                Err(Error::NoConnection { .. }) => {
                    return Err(self.no_connection(scope, waits_from));
                }
                looked => looked?,
            };
            match found.row {
                // A live row answers, whoever holds the lock: it cannot change until it
                // expires.
                Some(row) if row.live => {
                    tx.rollback().await?;
                    let row = row.decode()?;
                    if let Some(looking) = &looking {
                        looking.answer(|| row.clone());
                    }
                    return answer(row, scope, key, request).map(Begin::Replay);
                }
                row if found.locked => {
                    let held = KeyHold {
                        tx,
                        began,
                        expired: if row.is_some() {
                            ExpiredRow::Present
                        } else {
                            ExpiredRow::Absent
                        },
                        holding: self.waiters.hold(scope, key),
                    };
                    if let Some(taken) = hold(held).await? {
                        return Ok(Begin::Claimed(taken));
                    }
                }
                _ => tx.rollback().await?,
            }
            // Another request holds the key and has not stored a response (yet).
            if Instant::now() >= deadline {
                return Err(self.in_flight(scope, key));
            }
            pause = Some(pause.map_or(FIRST_POLL, |pause| (pause * 2).min(MAX_POLL)));
        }
    }

    /// Takes a place in the pool (and among the connections the scope may hold) and a
    /// pooled connection, waiting for them until `deadline` at the latest, and, in one
    /// round trip, opens a transaction on it, tries the key's lock and reads the key's
    /// row.
    ///
    /// That round trip checks the connection too, so unless the configuration asks for
    /// the pool's checks ([`Config::with_pool_checks`](crate::Config::with_pool_checks)),
    /// an idle connection is taken as it is ([`PgPool::try_acquire`](sqlx::PgPool::try_acquire):
    /// no ping, no `before_acquire` hook), or the one the place's previous holder left in
    /// it. If the server closed it meanwhile (a restart, a proxy's idle timeout), nothing
    /// has run: it is closed, and the look runs on a connection taken with the pool's
    /// checks. The transaction keeps the place.
    async fn look(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        deadline: Instant,
    ) -> Result<(TxConn, Found), Error> {
        let mut place = self.place(scope, deadline).await?;
        let idle = match place.take_connection() {
            Some(left) => Some(left),
            None if self.config.pool_checks() => None,
            None => self.pool.try_acquire(),
        };
        let mut place = Some(place);
        if let Some(conn) = idle {
            let mut tx = TxConn::new(conn, place.take());
            match tx.begin_claim(scope, key).await {
                Err(Error::Database(error)) if connection_broke(&error) => {
                    tracing::debug!(%error, "an idle connection was closed; claiming on another");
                    place = tx.discard();
                }
                found => return found.map(|found| (tx, found)),
            }
        }
        let mut tx = TxConn::new(self.connection(scope, deadline).await?, place);
        let found = tx.begin_claim(scope, key).await?;
        Ok((tx, found))
    }
}

/// The answer a live stored row gives `request`: its replay if the request is the same,
/// else [`Error::Conflict`].
fn answer(
    stored: StoredRow,
    scope: &Scope,
    key: &IdempotencyKey,
    request: &IdempotentRequest<'_>,
) -> Result<Replay, Error> {
    if same_request(&stored.fingerprint, request)? {
        Ok(stored.replay)
    } else {
        let Replay {
            first_used_at,
            first_request,
            ..
        } = stored.replay;
        Err(conflict(scope, key, first_used_at, first_request))
    }
}

/// [`Error::Conflict`]: `(scope, key)` was first used at `first_used_at` by
/// `first_request`, with another request.
pub(crate) fn conflict(
    scope: &Scope,
    key: &IdempotencyKey,
    first_used_at: DateTime<Utc>,
    first_request: Provenance,
) -> Error {
    Error::Conflict {
        scope: scope.clone(),
        key: key.clone(),
        first_used_at,
        first_request,
    }
}

/// Whether `request` is the one `stored` fingerprints (hashed again at the stored
/// version if another release wrote it).
///
/// # Errors
///
/// [`Error::UnknownFingerprintVersion`] for a version this build does not know.
pub(crate) fn same_request(
    stored: &Fingerprint,
    request: &IdempotentRequest<'_>,
) -> Result<bool, Error> {
    let version = stored.version();
    request
        .fingerprint_at(version)
        .map(|ours| ours == *stored)
        .ok_or(Error::UnknownFingerprintVersion { version })
}
