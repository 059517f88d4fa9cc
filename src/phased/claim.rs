//! Taking a phased request (or taking it over), and the lease that fences its holder.

use std::fmt;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sqlx::PgExecutor;
use tracing::Instrument;

use super::operation::Operation;
use super::steps::Steps;
use crate::claim::Completion;
use crate::db::TxConn;
use crate::error::Error;
use crate::fingerprint::{Fingerprint, Request};
use crate::key::IdempotencyKey;
use crate::metrics;
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;
use crate::store::{IdempotencyStore, Locked, Outcome, Replay, record_begin, same_request};
use crate::waiters::{FIRST_POLL, MAX_POLL};

/// What [`IdempotencyStore::begin_phased`] found.
#[derive(Debug)]
#[must_use = "a phased claim must be run or finished, and a replay answered"]
pub enum PhasedBegin {
    /// The request is yours: new, or taken over after its last holder's lease ran out
    /// (then it resumes after its last recovery point).
    Held(Box<PhasedClaim>),
    /// The key already has a response for this same request: answer with it.
    Replay(Replay),
}

/// A phased request held under a lease: run its [`Operation`] with [`run`](Self::run), or
/// answer it without one ([`finish`](Self::finish), [`release`](Self::release)).
///
/// Dropped unused, the request stays held until the lease runs out.
#[must_use = "a phased claim must be run, finished or released"]
pub struct PhasedClaim {
    lease: Lease,
    taken: Taken,
}

/// The request's row as the holder took it.
#[derive(Debug)]
pub(super) struct Taken {
    /// The operation that started it, if one did.
    pub operation: Option<String>,
    /// Its recorded input (read only by the completer).
    pub input: Option<Value>,
    /// The recorded step outputs.
    pub progress: Map<String, Value>,
    /// Its last recovery point.
    pub recovery_point: Option<String>,
    /// Holders so far, this one included.
    pub attempts: i32,
}

/// The holder's hold on a request: the key and the fencing token it took.
pub(super) struct Lease {
    pub store: IdempotencyStore,
    pub scope: Scope,
    pub key: IdempotencyKey,
    pub token: i64,
    /// The request's fingerprint, to recognise its stored response.
    pub fingerprint: Fingerprint,
    /// The request this holder serves: recorded when it starts the operation, stored
    /// with the response if no earlier request started it.
    pub provenance: Provenance,
    /// The operation and input this holder starts the request with, until they are
    /// recorded (before the first step).
    pub start: Option<(&'static str, Value)>,
    /// When this holder last sent a statement that extended its lease (the lease lasts at
    /// least `lease` from then, by the database's clock).
    pub renewed_at: Instant,
}

/// Who takes a request: a client's request (which may also be answered from a stored
/// response), or the completer (which takes only an abandoned, started request).
pub(super) enum Taker<'a> {
    Client(&'a Request<'a>),
    Completer,
}

/// What one attempt to take a request found.
pub(super) enum Take {
    Held(Box<PhasedClaim>),
    Replay(Replay),
    /// Another holder has it (or is recording a step right now).
    Busy,
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
        request: &Request<'_>,
    ) -> Result<PhasedBegin, Error> {
        let span = tracing::info_span!(
            "idempotency.begin_phased",
            scope = %scope,
            key = %key,
            outcome = tracing::field::Empty,
            attempt = tracing::field::Empty,
        );
        async move {
            let deadline = Instant::now() + self.config().in_flight_wait();
            let mut pause = FIRST_POLL;
            let begun = loop {
                match self.take(scope, key, Taker::Client(request)).await {
                    Ok(Take::Held(claim)) => break Ok(PhasedBegin::Held(claim)),
                    Ok(Take::Replay(replay)) => break Ok(PhasedBegin::Replay(replay)),
                    Ok(Take::Busy) => {}
                    Err(error) => break Err(error),
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Err(self.in_flight(scope, key));
                }
                tokio::time::sleep(pause.min(left)).await;
                pause = (pause * 2).min(MAX_POLL);
            };
            record_begin(&begun, |begun| match begun {
                PhasedBegin::Held(claim) => {
                    tracing::Span::current().record("attempt", claim.taken.attempts);
                    ("held", metrics::CLAIMS)
                }
                PhasedBegin::Replay(_) => ("replayed", metrics::REPLAYS),
            });
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
        request: &Request<'_>,
        operation: &O,
        input: O::Input,
    ) -> Result<Outcome, O::Error> {
        match self.begin_phased(scope, key, request).await? {
            PhasedBegin::Replay(replay) => Ok(Outcome::Replayed(replay)),
            PhasedBegin::Held(claim) => claim.run(operation, input).await,
        }
    }

    /// One attempt to take the request: in one transaction, answer from a stored response
    /// (clients only), then lock the request's row without waiting and take it if it is
    /// new, free or abandoned.
    pub(super) async fn take(
        &self,
        scope: &Scope,
        key: &IdempotencyKey,
        taker: Taker<'_>,
    ) -> Result<Take, Error> {
        let taken_at = Instant::now();
        let (mut tx, _holding) = match taker {
            // The key's advisory lock: no final step can store a response between this
            // look at `idempotency_keys` and the commit below (it takes the same lock).
            Taker::Client(request) => match self.lock_key(scope, key, request).await? {
                Locked::Answered(replay) => return Ok(Take::Replay(replay)),
                // The holding lasts as long as this transaction: see below.
                Locked::Held { tx, holding, .. } => (tx, Some(holding)),
            },
            Taker::Completer => (TxConn::begin(self.pool()).await?, None),
        };
        let row = sqlx::query!(
            r#"SELECT fingerprint_version, fingerprint, operation, created_at, request_id,
                      traceparent, leased_until > now() AS "held!",
                      expires_at > now() AS "live!"
               FROM idempotency_requests WHERE scope = $1 AND key = $2
               FOR UPDATE NOWAIT"#,
            scope.as_str(),
            key.as_str(),
        )
        .fetch_optional(tx.conn())
        .await;
        let row = match row {
            // A holder is recording a step, or another taker got here first.
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => {
                tx.rollback().await?;
                return Ok(Take::Busy);
            }
            row => row?,
        };
        let config = self.config();
        let lease_ms = millis(config.lease());
        let stored = row
            .as_ref()
            .map(|row| {
                <[u8; 32]>::try_from(row.fingerprint.as_slice())
                    .map(|hash| Fingerprint::from_parts(row.fingerprint_version, hash))
                    .map_err(|_| {
                        Error::MalformedRow("a phased request's fingerprint is not 32 bytes".into())
                    })
            })
            .transpose()?;
        // Another body conflicts at once, held or not: the fingerprint is committed.
        if let (Some(row), Some(stored), Taker::Client(request)) = (&row, &stored, &taker)
            && row.live
            && !same_request(stored, request)?
        {
            tx.rollback().await?;
            return Err(Error::Conflict {
                scope: scope.clone(),
                key: key.clone(),
                first_used_at: row.created_at,
                first_request: Provenance {
                    request_id: row.request_id.clone(),
                    traceparent: row.traceparent.clone(),
                },
            });
        }
        let taken = match (row, stored, &taker) {
            (Some(row), _, _) if row.live && row.held => None,
            (Some(row), Some(stored), Taker::Client(_)) if row.live => {
                Some((stored, take_over(&mut tx, scope, key, lease_ms).await?))
            }
            (Some(row), Some(stored), Taker::Completer) if row.live && row.operation.is_some() => {
                Some((stored, take_over(&mut tx, scope, key, lease_ms).await?))
            }
            // New, or abandoned past its replay window (it counts as unused).
            (_, _, Taker::Client(request)) => {
                let fingerprint = request.fingerprint();
                let token = sqlx::query_scalar!(
                    // Only `excluded` and constants in DO UPDATE SET: Citus refuses
                    // functions there on a distributed table.
                    // Not if a response was stored meanwhile: the key's lock serialises
                    // this with final steps on one server, but not across Citus
                    // coordinators (node-local locks); this statement's own snapshot sees
                    // a response committed after the look above.
                    r#"INSERT INTO idempotency_requests AS r
                         (scope, key, fingerprint_version, fingerprint, lease_token,
                          leased_until, created_at, expires_at)
                       SELECT $1, $2, $3, $4, 1, now() + $5::bigint * interval '1 millisecond',
                              now(), now() + $6::bigint * interval '1 millisecond'
                       WHERE NOT EXISTS (SELECT FROM idempotency_keys
                                         WHERE scope = $1 AND key = $2 AND expires_at > now())
                       ON CONFLICT (scope, key) DO UPDATE SET
                         fingerprint_version = excluded.fingerprint_version,
                         fingerprint = excluded.fingerprint, operation = NULL, input = NULL,
                         recovery_point = NULL, progress = '{}',
                         lease_token = r.lease_token + 1, leased_until = excluded.leased_until,
                         attempts = 1, request_id = NULL, traceparent = NULL,
                         created_at = excluded.created_at, expires_at = excluded.expires_at
                       RETURNING lease_token"#,
                    scope.as_str(),
                    key.as_str(),
                    fingerprint.version(),
                    fingerprint.hash().as_slice(),
                    lease_ms,
                    millis(config.ttl()),
                )
                .fetch_optional(tx.conn())
                .await?;
                // A response was stored meanwhile: the next look replays it.
                let Some(token) = token else {
                    tx.rollback().await?;
                    return Ok(Take::Busy);
                };
                let taken = Taken {
                    operation: None,
                    input: None,
                    progress: Map::new(),
                    recovery_point: None,
                    attempts: 1,
                };
                Some((fingerprint, (token, taken)))
            }
            // The completer leaves gone, expired and never-started requests alone.
            (_, _, Taker::Completer) => None,
        };
        let Some((fingerprint, (token, taken))) = taken else {
            tx.rollback().await?;
            return Ok(Take::Busy);
        };
        tx.commit().await?;
        Ok(Take::Held(Box::new(PhasedClaim {
            lease: Lease {
                store: self.clone(),
                scope: scope.clone(),
                key: key.clone(),
                token,
                fingerprint,
                provenance: Provenance::default(),
                start: None,
                renewed_at: taken_at,
            },
            taken,
        })))
    }
}

/// Takes over the row locked in `tx`: a new fencing token and lease; the recorded
/// progress stays.
async fn take_over(
    tx: &mut TxConn,
    scope: &Scope,
    key: &IdempotencyKey,
    lease_ms: i64,
) -> Result<(i64, Taken), Error> {
    let row = sqlx::query!(
        r#"UPDATE idempotency_requests
           SET lease_token = lease_token + 1,
               leased_until = now() + $3::bigint * interval '1 millisecond',
               attempts = attempts + 1
           WHERE scope = $1 AND key = $2
           RETURNING lease_token, operation, input, progress, recovery_point, attempts"#,
        scope.as_str(),
        key.as_str(),
        lease_ms,
    )
    .fetch_one(tx.conn())
    .await?;
    let Value::Object(progress) = row.progress else {
        return Err(Error::MalformedRow(
            "a phased request's progress is not a JSON object".into(),
        ));
    };
    tracing::info!(
        scope = %scope,
        key = %key,
        recovery_point = row.recovery_point.as_deref(),
        attempt = row.attempts,
        "taking over a phased request whose holder's lease ran out"
    );
    Ok((
        row.lease_token,
        Taken {
            operation: row.operation,
            input: row.input,
            progress,
            recovery_point: row.recovery_point,
            attempts: row.attempts,
        },
    ))
}

/// `duration` in whole milliseconds, saturating.
pub(super) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl PhasedClaim {
    /// The scope of the held key.
    pub fn scope(&self) -> &Scope {
        &self.lease.scope
    }

    /// The held key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.lease.key
    }

    /// Which holder this is: 1 for the first, more after takeovers.
    pub fn attempt(&self) -> u32 {
        u32::try_from(self.taken.attempts).unwrap_or(0)
    }

    /// Says which request this holder serves (its request id, and W3C `traceparent`):
    /// recorded when it starts the operation, and stored with the response, which
    /// replays then name. The HTTP layer sets it.
    pub fn set_provenance(&mut self, provenance: Provenance) {
        self.lease.provenance = provenance;
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
            scope = %self.lease.scope,
            key = %self.lease.key,
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
                    // Recorded before any step: whatever a step does, the completer can
                    // finish the request without its client.
                    lease.start = Some((O::NAME, recorded));
                    let sent = Instant::now();
                    lease.touch(lease.store.pool(), None).await?;
                    lease.touched(sent);
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
            let mut steps = Steps::new(lease, taken.progress);
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
    /// [`Error::InvalidStatus`], [`Error::LeaseLost`], [`Error::Database`].
    pub async fn finish(self, response: &StoredResponse) -> Result<Completion, Error> {
        let (lease, taken) = self.into_parts();
        let finished = Steps::new(lease, taken.progress)
            .finish(async |_tx| Ok::<_, Error>(response.clone()))
            .await?;
        Ok(if finished.is_stored() {
            Completion::Stored
        } else {
            Completion::RolledBack
        })
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
            .field("scope", &self.lease.scope)
            .field("key", &self.lease.key)
            .field("attempt", &self.taken.attempts)
            .field("recovery_point", &self.taken.recovery_point)
            .finish_non_exhaustive()
    }
}

impl Lease {
    fn lost(&self) -> Error {
        Error::LeaseLost {
            scope: self.scope.clone(),
            key: self.key.clone(),
        }
    }

    fn lease_ms(&self) -> i64 {
        millis(self.store.config().lease())
    }

    fn fenced(&self, rows: u64) -> Result<(), Error> {
        if rows == 1 { Ok(()) } else { Err(self.lost()) }
    }

    /// Extends the lease, fenced by the token; records `step`'s output and makes it the
    /// recovery point if given; and records the operation, its input and this holder's
    /// provenance if they are still to be recorded. Through `executor`: the step's own
    /// transaction (a local step) or the pool (before and after an external call).
    /// The caller marks the start recorded ([`Lease::touched`]) once this is committed.
    pub(super) async fn touch<'a, 'e>(
        &'a self,
        executor: impl PgExecutor<'e>,
        step: Option<(&str, &Value)>,
    ) -> Result<(), Error> {
        let (operation, input) = self
            .start
            .as_ref()
            .map(|(name, input)| (*name, input))
            .unzip();
        // `{step: output}`, merged into `progress`: built here, since Citus refuses a
        // function that is not immutable inside CASE (jsonb_build_object is stable).
        let recorded = step.map_or_else(
            || Value::Object(Map::new()),
            |(name, output)| Value::Object(Map::from_iter([(name.to_owned(), output.clone())])),
        );
        let starting = self.start.is_some();
        let provenance = |value: &'a Option<String>| value.as_deref().filter(|_| starting);
        let updated = sqlx::query!(
            r#"UPDATE idempotency_requests
               SET progress = progress || $5::jsonb,
                   recovery_point = coalesce($4, recovery_point),
                   leased_until = now() + $6::bigint * interval '1 millisecond',
                   operation = coalesce($7, operation),
                   input = coalesce($8, input),
                   request_id = coalesce($9, request_id),
                   traceparent = coalesce($10, traceparent)
               WHERE scope = $1 AND key = $2 AND lease_token = $3"#,
            self.scope.as_str(),
            self.key.as_str(),
            self.token,
            step.map(|(name, _)| name),
            recorded,
            self.lease_ms(),
            operation,
            input,
            provenance(&self.provenance.request_id),
            provenance(&self.provenance.traceparent),
        )
        .execute(executor)
        .await?;
        self.fenced(updated.rows_affected())
    }

    /// After a [`touch`](Self::touch) sent at `sent` was committed: the start is recorded
    /// and the lease runs from then.
    pub(super) fn touched(&mut self, sent: Instant) {
        self.start = None;
        self.renewed_at = sent;
    }

    /// Whether the lease surely has at least half of its length left (measured from the
    /// last statement that extended it, so it errs towards renewing).
    pub(super) fn fresh(&self) -> bool {
        self.renewed_at.elapsed() < self.store.config().lease() / 2
    }

    /// In the final step's transaction: ends the request and stores its response in
    /// `idempotency_keys`, with the request's fingerprint and times.
    pub(super) async fn store<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        response: &StoredResponse,
    ) -> Result<(), Error> {
        // Serializing strings into a String cannot fail.
        let headers = serde_json::to_value(&response.headers).unwrap_or_default();
        let stored = sqlx::query!(
            r#"WITH finished AS (
                   DELETE FROM idempotency_requests
                   WHERE scope = $1 AND key = $2 AND lease_token = $3
                   RETURNING scope, key, fingerprint_version, fingerprint, created_at,
                             expires_at, request_id, traceparent)
               INSERT INTO idempotency_keys
                 (scope, key, fingerprint_version, fingerprint, status, headers, body,
                  created_at, expires_at, request_id, traceparent)
               SELECT scope, key, fingerprint_version, fingerprint, $4, $5, $6, created_at,
                      expires_at, coalesce(request_id, $7), coalesce(traceparent, $8)
               FROM finished"#,
            self.scope.as_str(),
            self.key.as_str(),
            self.token,
            i16::try_from(response.status).map_err(|_| Error::InvalidStatus(response.status))?,
            headers,
            response.body.as_slice(),
            self.provenance.request_id.as_deref(),
            self.provenance.traceparent.as_deref(),
        )
        .execute(executor)
        .await?;
        self.fenced(stored.rows_affected())
    }

    /// Ends the lease now; forgets the request if no operation started it.
    pub(super) async fn release(&self) -> Result<(), Error> {
        sqlx::query!(
            r#"WITH unstarted AS (
                   DELETE FROM idempotency_requests
                   WHERE scope = $1 AND key = $2 AND lease_token = $3 AND operation IS NULL
                   RETURNING 1)
               UPDATE idempotency_requests SET leased_until = now()
               WHERE scope = $1 AND key = $2 AND lease_token = $3
                 AND operation IS NOT NULL"#,
            self.scope.as_str(),
            self.key.as_str(),
            self.token,
        )
        .execute(self.store.pool())
        .await?;
        Ok(())
    }
}
