//! Taking a phased request (or taking it over), and what its holder can do with it.

use std::fmt;
use std::time::Instant;

use serde_json::Value;
use tracing::Instrument;

use super::lease::{Grant, Holder, Lease, Taken, boundary};
use super::operation::Operation;
use super::steps::Steps;
use crate::db::TxConn;
use crate::engine::{Engine, Holding, conflict, same_request};
use crate::error::Error;
use crate::fingerprint::{Fingerprint, IdempotentRequest};
use crate::key::IdempotencyKey;
use crate::outcome::{Begin, Completion, Outcome};
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;
use crate::store::IdempotencyStore;

/// A phased request held under a lease: run its [`Operation`] with [`run`](Self::run), or
/// answer it without one ([`finish`](Self::finish), [`release`](Self::release)).
///
/// Dropped unused, the request stays held until the lease runs out.
#[must_use = "a phased claim must be run, finished or released"]
pub struct PhasedClaim {
    lease: Lease,
    taken: Taken,
}

/// Who takes a request: a client's request (which may also be answered from a stored
/// response), or the completer (which takes only an abandoned, started request).
pub(super) enum Taker<'a> {
    Client(&'a IdempotentRequest<'a>),
    Completer,
}

impl IdempotencyStore {
    /// Begins a [phased request](crate::phased): takes `(scope, key)` for it, takes over
    /// a request whose holder's lease ran out, or finds the response of an earlier run.
    ///
    /// While another holder has the request, this looks again (without holding a
    /// connection) until [`Config::in_flight_wait`](crate::Config::in_flight_wait) has
    /// passed.
    ///
    /// # Errors
    ///
    /// - [`Error::Conflict`]: the key was used within the replay window with a different
    ///   request.
    /// - [`Error::InFlight`]: another holder still has the request after the wait.
    /// - [`Error::Database`] and the other server-side errors; nothing was taken.
    pub async fn begin_phased(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &IdempotentRequest<'_>,
    ) -> Result<Begin<PhasedClaim>, Error> {
        let span = tracing::info_span!(
            "idempotency.begin_phased",
            scope = %scope,
            key = %key,
            outcome = tracing::field::Empty,
            attempt = tracing::field::Empty,
        );
        async move {
            let engine = self.engine();
            let begun = engine
                .take(scope, key, request, "held", |held| async move {
                    // The key's advisory lock, held until this transaction ends: no final
                    // step can store a response between the look at `idempotency_keys`
                    // and the commit (it takes the same lock).
                    let taking = Taking {
                        engine,
                        scope,
                        key,
                        taker: Taker::Client(request),
                    };
                    taking.take(held.tx, held.began, held.holding).await
                })
                .await;
            if let Ok(Begin::Claimed(claim)) = &begun {
                tracing::Span::current().record("attempt", claim.taken.attempts);
            }
            begun
        }
        .instrument(span)
        .await
    }

    /// Runs `operation` as a phased request: [`begin_phased`](Self::begin_phased), then
    /// [`PhasedClaim::run`] on a hold, or the stored response on a replay.
    ///
    /// # Errors
    ///
    /// Those of [`begin_phased`](Self::begin_phased) and of [`PhasedClaim::run`].
    pub async fn run_phased<O: Operation>(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        request: &IdempotentRequest<'_>,
        operation: &O,
        input: O::Input,
    ) -> Result<Outcome, O::Error> {
        match self.begin_phased(scope, key, request).await? {
            Begin::Replay(replay) => Ok(Outcome::Replayed(replay)),
            Begin::Claimed(claim) => claim.run(operation, input).await,
        }
    }
}

/// One attempt to take a request, in a transaction that the attempt ends.
pub(super) struct Taking<'a> {
    pub engine: &'a Engine,
    pub scope: &'a Scope,
    pub key: &'a IdempotencyKey,
    pub taker: Taker<'a>,
}

impl Taking<'_> {
    /// Locks the request's row without waiting and takes it if it is new, free or
    /// abandoned, in `tx`, which began at `began`; commits if it took it. `None` if
    /// another holder has it (or is recording a step right now). A holder keeps
    /// `holding`, so that this process's duplicates of the key wait for it without a
    /// connection.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] for a client whose request is not the one the row
    /// fingerprints; the server-side errors.
    pub(super) async fn take(
        &self,
        mut tx: TxConn,
        began: Instant,
        holding: Holding,
    ) -> Result<Option<PhasedClaim>, Error> {
        let holder = Holder {
            engine: self.engine,
            scope: self.scope,
            key: self.key,
            began,
        };
        match self.take_row(&mut tx, &holder).await {
            Ok(Some((grant, taken))) => {
                tx.commit().await?;
                let lease = Lease::new(&holder, grant, holding);
                Ok(Some(PhasedClaim { lease, taken }))
            }
            Ok(None) => {
                tx.rollback().await?;
                Ok(None)
            }
            Err(error @ Error::Conflict { .. }) => {
                tx.rollback().await?;
                Err(error)
            }
            // The transaction rolls back when it is dropped.
            Err(error) => Err(error),
        }
    }

    /// The decision: who may take the row as it is, and how.
    async fn take_row(
        &self,
        tx: &mut TxConn,
        holder: &Holder<'_>,
    ) -> Result<Option<(Grant, Taken)>, Error> {
        let row = sqlx::query!(
            r#"SELECT fingerprint_version, fingerprint, operation, created_at, request_id,
                      traceparent, leased_until > now() AS "held!",
                      expires_at > now() AS "live!"
               FROM idempotency_requests WHERE scope = $1 AND key = $2
               FOR UPDATE NOWAIT"#,
            self.scope.as_str(),
            self.key.as_str(),
        )
        .fetch_optional(tx.conn())
        .await;
        let row = match row {
            // A holder is recording a step, or another taker got here first.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => {
                return Ok(None);
            }
            // A row past its replay window counts as unused.
            row => row?.filter(|row| row.live),
        };
        let Some(row) = row else {
            // New, or abandoned past its replay window; the completer leaves those alone.
            return match self.taker {
                Taker::Client(request) => Lease::start(tx, holder, request.fingerprint()).await,
                Taker::Completer => Ok(None),
            };
        };
        let stored = <[u8; 32]>::try_from(row.fingerprint.as_slice())
            .map(|hash| Fingerprint::from_parts(row.fingerprint_version, hash))
            .map_err(|_| {
                Error::MalformedRow("a phased request's fingerprint is not 32 bytes".into())
            })?;
        if let Taker::Client(request) = self.taker
            && !same_request(&stored, request)?
        {
            // Another body conflicts at once, held or not: the fingerprint is committed.
            let first_request = Provenance {
                request_id: row.request_id,
                traceparent: row.traceparent,
            };
            return Err(conflict(
                self.scope,
                self.key,
                row.created_at,
                first_request,
            ));
        }
        // A held request is its holder's; the completer takes only started requests.
        let abandoned = !row.held;
        let takes = match self.taker {
            Taker::Client(_) => abandoned,
            Taker::Completer => abandoned && row.operation.is_some(),
        };
        if !takes {
            return Ok(None);
        }
        Lease::take_over(tx, holder, stored).await.map(Some)
    }
}

impl PhasedClaim {
    /// The scope of the held key.
    pub fn scope(&self) -> &Scope {
        self.lease.scope()
    }

    /// The held key.
    pub fn key(&self) -> &IdempotencyKey {
        self.lease.key()
    }

    /// Which holder this is: 1 for the first, more after takeovers.
    pub fn attempt(&self) -> u32 {
        u32::try_from(self.taken.attempts).unwrap_or(0)
    }

    /// Says which request this holder serves (its request id, and W3C `traceparent`):
    /// recorded when it starts the operation, and stored with the response, which
    /// replays then name. The HTTP layer sets it.
    pub fn set_provenance(&mut self, provenance: Provenance) {
        self.lease.set_provenance(provenance);
    }

    /// The last step whose result is recorded, if any: where this holder resumes.
    pub fn recovery_point(&self) -> Option<&str> {
        self.taken.recovery_point.as_deref()
    }

    /// The recorded input (taken by the completer only).
    pub(super) fn take_input(&mut self) -> Option<Value> {
        self.taken.input.take()
    }

    pub(super) fn into_parts(self) -> (Lease, Taken) {
        (self.lease, self.taken)
    }

    /// Runs `operation` with `input`: records the input (on the first run), then runs the
    /// operation, whose recorded steps return their recorded outputs without running.
    ///
    /// On success the response is stored (or, if the store policy does not keep it, the
    /// request stays in progress and is released for a retry). On an error of the
    /// operation the request is released at once, so that a retry or the completer can
    /// resume it.
    ///
    /// # Errors
    ///
    /// The operation's errors; [`Error::LeaseLost`] (converted) if another holder took
    /// the request over; [`Error::PhaseMisuse`] if another operation started the request.
    pub async fn run<O: Operation>(
        self,
        operation: &O,
        input: O::Input,
    ) -> Result<Outcome, O::Error> {
        let span = tracing::info_span!(
            "idempotency.phased",
            operation = O::NAME,
            scope = %self.lease.scope(),
            key = %self.lease.key(),
            attempt = self.taken.attempts,
            resumed_after = self.taken.recovery_point.as_deref(),
            stored = tracing::field::Empty,
        );
        async move {
            let (mut lease, taken) = self.into_parts();
            match taken.operation.as_deref() {
                None => {
                    let recorded =
                        serde_json::to_value(&input).map_err(|source| Error::PhaseData {
                            what: "input".to_owned(),
                            source,
                        })?;
                    boundary("start", "before_record");
                    lease.record_start(O::NAME, &recorded).await?;
                }
                Some(name) if name == O::NAME => {}
                Some(other) => {
                    return Err(Error::PhaseMisuse(format!(
                        "the request was started by operation '{other}', not '{}'",
                        O::NAME
                    ))
                    .into());
                }
            }
            let mut steps = Steps::new(lease, taken);
            match operation.run(&input, &mut steps).await {
                Ok(finished) => {
                    tracing::Span::current().record("stored", finished.is_stored());
                    Ok(Outcome::Executed {
                        stored: finished.is_stored(),
                        response: finished.into_response(),
                    })
                }
                Err(error) => {
                    steps.release_after_error().await;
                    Err(error)
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Answers the request with `response` without running an operation (a validation
    /// error, say), as the final step would: stored if the store policy keeps it, else
    /// the request is released (and, if no operation started it, forgotten: the key is
    /// free).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidStatus`], [`Error::LeaseLost`], [`Error::Database`], and
    /// [`Error::CommitInterrupted`] as [`Claim::complete`](crate::Claim::complete)
    /// returns it when the connection broke around `COMMIT`.
    pub async fn finish(mut self, response: &StoredResponse) -> Result<Completion, Error> {
        let tx = self.lease.engine().begin_placed(self.lease.scope()).await?;
        self.lease.store_final(tx, response).await
    }

    /// Gives the request back without answering it: its lease ends now, so that a retry
    /// (or the completer) can take it at once. A request no operation has started is
    /// forgotten: the key is free.
    ///
    /// # Errors
    ///
    /// [`Error::Database`]; the lease then runs out by itself.
    pub async fn release(self) -> Result<(), Error> {
        self.lease.release().await
    }
}

impl fmt::Debug for PhasedClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhasedClaim")
            .field("scope", self.lease.scope())
            .field("key", self.lease.key())
            .field("attempt", &self.taken.attempts)
            .field("recovery_point", &self.taken.recovery_point)
            .finish_non_exhaustive()
    }
}
