//! The lease that fences a phased request's holder: granted when the holder takes the
//! request, renewed by every record it makes, ended by its final step or its release.
//! Every statement that writes for the holder names the lease's token and changes
//! nothing once another holder has taken the request over.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::db::{ExpiredRow, KeyRow, TxConn, Window, connection_broke};
use crate::engine::{Engine, Holding};
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::outcome::Completion;
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;

/// The tracing target of the events that mark a phased request's boundaries (`step`
/// and `boundary` fields: `start` with `before_record`, the operation's start; a step's
/// name with `before_commit`, `after_commit`, `before_call` or `after_call`), for
/// observability and for fault injection in tests.
const BOUNDARY_TARGET: &str = "pg_idempotency::phased::boundary";

/// Marks a boundary of a step (see [`BOUNDARY_TARGET`]).
pub(super) fn boundary(step: &str, boundary: &'static str) {
    tracing::debug!(target: BOUNDARY_TARGET, step, boundary, "phased request boundary");
}

/// A fencing token for a new grant: 63 random bits.
///
/// Every grant draws one (a new request's first holder, every takeover), so a holder's
/// token is never found on a row it was not granted on, also when its row was deleted
/// (forget, the completer, the sweep) and created again: that would take a later grant
/// on the same key drawing the same one of 2^63 values. Random rather than from a
/// sequence: no round trip, and no sequence that Citus nodes would each keep a copy of.
fn new_token() -> i64 {
    // A UUID v4's low half has 62 random bits (the variant takes two), and the lowest bit
    // of its high half is random too (the version sits in bits 12 to 15).
    let (high, low) = Uuid::new_v4().as_u64_pair();
    let bits = (low & (u64::MAX >> 2)) | ((high & 1) << 62);
    i64::try_from(bits).expect("63 bits fit an i64")
}

/// `duration` in whole milliseconds, saturating.
pub(super) fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Who asks for a lease: the request and the transaction that is about to grant it.
pub(super) struct Holder<'a> {
    pub engine: &'a Engine,
    pub scope: &'a Scope,
    pub key: &'a IdempotencyKey,
    /// When the granting transaction began: the lease lasts from its `now()`, so the
    /// holder counts from no later than that.
    pub began: Instant,
}

/// The request's row as its holder took it.
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
    /// The request's nonce, from which its downstream keys are derived (`None`: a row
    /// created before nonces existed).
    pub nonce: Option<Uuid>,
}

/// A holder's hold on a request: the key and the fencing token it was granted.
pub(super) struct Lease {
    engine: Engine,
    token: i64,
    /// The request's fingerprint, to recognise its stored response.
    fingerprint: Fingerprint,
    /// The request this holder serves: recorded when it starts the operation, stored
    /// with the response if no earlier request started it.
    provenance: Provenance,
    /// When this holder last sent a statement that extended its lease (the lease lasts at
    /// least `lease` from then, by the database's clock).
    renewed_at: Instant,
    /// A connection broke around one of this holder's `COMMIT`s: its old backend may
    /// still hold the request's row, so a release could wait on it without bound.
    broken: bool,
    /// The key held: this process's duplicates of it wait for this holder without a
    /// connection until the lease is dropped; they get the stored row when there is one.
    holding: Holding,
}

/// What a grant gave a new holder: its fencing token, and the fingerprint of the request
/// it holds.
pub(super) struct Grant {
    token: i64,
    fingerprint: Fingerprint,
}

impl Lease {
    /// Starts a new request in `tx` (or restarts one abandoned past its replay window,
    /// which counts as unused) and grants its first lease; `None` if the key got a
    /// response meanwhile (the next look replays it).
    pub(super) async fn start(
        tx: &mut TxConn,
        holder: &Holder<'_>,
        fingerprint: Fingerprint,
    ) -> Result<Option<(Grant, Taken)>, Error> {
        let config = holder.engine.config();
        let nonce = Uuid::new_v4();
        let token = sqlx::query_scalar!(
            // Only `excluded` and constants in DO UPDATE SET: Citus refuses functions
            // there on a distributed table.
            // Not if a response was stored meanwhile: the key's lock serialises this with
            // final steps on one server, but not across Citus coordinators (node-local
            // locks); this statement's own snapshot sees a response committed after the
            // look that took the key.
            r#"INSERT INTO idempotency_requests AS r
                 (scope, key, fingerprint_version, fingerprint, lease_token, leased_until,
                  created_at, expires_at, request_nonce)
               SELECT $1, $2, $3, $4, $7, now() + $5::bigint * interval '1 millisecond',
                      now(), now() + $6::bigint * interval '1 millisecond', $8
               WHERE NOT EXISTS (SELECT FROM idempotency_keys
                                 WHERE scope = $1 AND key = $2 AND expires_at > now())
               ON CONFLICT (scope, key) DO UPDATE SET
                 fingerprint_version = excluded.fingerprint_version,
                 fingerprint = excluded.fingerprint, operation = NULL, input = NULL,
                 recovery_point = NULL, progress = '{}',
                 lease_token = excluded.lease_token, leased_until = excluded.leased_until,
                 attempts = 1, request_id = NULL, traceparent = NULL,
                 created_at = excluded.created_at, expires_at = excluded.expires_at,
                 request_nonce = excluded.request_nonce
               RETURNING lease_token"#,
            holder.scope.as_str(),
            holder.key.as_str(),
            fingerprint.version(),
            fingerprint.hash().as_slice(),
            millis(config.lease()),
            millis(config.ttl()),
            new_token(),
            nonce,
        )
        .fetch_optional(tx.conn())
        .await?;
        let taken = Taken {
            operation: None,
            input: None,
            progress: Map::new(),
            recovery_point: None,
            attempts: 1,
            nonce: Some(nonce),
        };
        Ok(token.map(|token| (Grant { token, fingerprint }, taken)))
    }

    /// Takes over the request row locked in `tx`, whose holder's lease ran out: a new
    /// fencing token and lease; the recorded progress stays.
    pub(super) async fn take_over(
        tx: &mut TxConn,
        holder: &Holder<'_>,
        fingerprint: Fingerprint,
    ) -> Result<(Grant, Taken), Error> {
        let row = sqlx::query!(
            r#"UPDATE idempotency_requests
               SET lease_token = $4,
                   leased_until = now() + $3::bigint * interval '1 millisecond',
                   attempts = attempts + 1
               WHERE scope = $1 AND key = $2
               RETURNING lease_token, operation, input, progress, recovery_point, attempts,
                         request_nonce"#,
            holder.scope.as_str(),
            holder.key.as_str(),
            millis(holder.engine.config().lease()),
            new_token(),
        )
        .fetch_one(tx.conn())
        .await?;
        let Value::Object(progress) = row.progress else {
            return Err(Error::MalformedRow(
                "a phased request's progress is not a JSON object".into(),
            ));
        };
        tracing::info!(
            scope = %holder.scope,
            key = %holder.key,
            recovery_point = row.recovery_point.as_deref(),
            attempt = row.attempts,
            "taking over a phased request whose holder's lease ran out"
        );
        let taken = Taken {
            operation: row.operation,
            input: row.input,
            progress,
            recovery_point: row.recovery_point,
            attempts: row.attempts,
            nonce: row.request_nonce,
        };
        let grant = Grant {
            token: row.lease_token,
            fingerprint,
        };
        Ok((grant, taken))
    }

    /// The lease `grant` gave `holder`, once the grant is committed; `holding` registers
    /// the key as held in this process for the lease's life.
    pub(super) fn new(holder: &Holder<'_>, grant: Grant, holding: Holding) -> Self {
        Self {
            engine: holder.engine.clone(),
            token: grant.token,
            fingerprint: grant.fingerprint,
            provenance: Provenance::default(),
            renewed_at: holder.began,
            broken: false,
            holding: holding.leased(),
        }
    }

    pub(super) fn scope(&self) -> &Scope {
        &self.holding.key().0
    }

    pub(super) fn key(&self) -> &IdempotencyKey {
        &self.holding.key().1
    }

    pub(super) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(super) fn set_provenance(&mut self, provenance: Provenance) {
        self.provenance = provenance;
    }

    /// The fencing token this holder was granted.
    pub(super) fn token(&self) -> i64 {
        self.token
    }

    /// [`Error::LeaseLost`] for this holder's request.
    pub(super) fn lost(&self) -> Error {
        Error::LeaseLost {
            scope: self.scope().clone(),
            key: self.key().clone(),
        }
    }

    fn fenced(&self, rows: u64) -> Result<(), Error> {
        if rows == 1 { Ok(()) } else { Err(self.lost()) }
    }

    /// Whether the lease surely has at least half of its length left (measured from the
    /// last statement that extended it, so it errs towards renewing).
    pub(super) fn fresh(&self) -> bool {
        self.renewed_at.elapsed() < self.engine.config().lease() / 2
    }

    /// Records the operation that starts the request, its input and this holder's
    /// provenance, before any step: whatever a step does, the completer can then finish
    /// the request without its client. Renews the lease.
    pub(super) async fn record_start(
        &mut self,
        operation: &'static str,
        input: &Value,
    ) -> Result<(), Error> {
        let sent = Instant::now();
        let record = Record {
            step: None,
            start: Some((operation, input)),
        };
        self.engine
            .in_transaction(self.scope(), true, async |conn| {
                self.extend(conn, record).await
            })
            .await?;
        self.renewed_at = sent;
        Ok(())
    }

    /// Renews the lease; with `step`, also records that step's output and makes it the
    /// recovery point (a foreign step, whose call has returned).
    pub(super) async fn renew(&mut self, step: Option<(&str, &Value)>) -> Result<(), Error> {
        let sent = Instant::now();
        let record = Record { step, start: None };
        self.engine
            .in_transaction(self.scope(), true, async |conn| {
                self.extend(conn, record).await
            })
            .await?;
        self.renewed_at = sent;
        Ok(())
    }

    /// A local step's end: in its transaction `tx`, which began at `began`, records the
    /// step's output (renewing the lease), then commits the step's writes with it.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] (rolled back), [`Error::Database`]; after a connection broke
    /// around `COMMIT` the step may or may not be recorded.
    pub(super) async fn commit_step(
        &mut self,
        mut tx: TxConn,
        began: Instant,
        step: (&str, &Value),
    ) -> Result<(), Error> {
        let record = Record {
            step: Some(step),
            start: None,
        };
        if let Err(error) = self.extend(tx.conn(), record).await {
            rollback(tx).await;
            return Err(error);
        }
        boundary(step.0, "before_commit");
        if let Err(error) = tx.commit().await {
            self.broken |= connection_broke(&error);
            return Err(error.into());
        }
        self.renewed_at = began;
        boundary(step.0, "after_commit");
        Ok(())
    }

    /// The final step's end: in its transaction `tx`, ends the request and stores
    /// `response` as its key's row, and commits; or, if the store policy does not keep
    /// `response`, rolls `tx` back and releases the request.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidStatus`], [`Error::LeaseLost`] (rolled back), the errors of
    /// storing a response (an interrupted `COMMIT` included, with what was found out).
    pub(super) async fn store_final(
        &mut self,
        mut tx: TxConn,
        response: &StoredResponse,
    ) -> Result<Completion, Error> {
        let kept = self.engine.keeps(response.status);
        if !matches!(kept, Ok(true)) {
            rollback(tx).await;
            kept?;
            self.release().await?;
            return Ok(Completion::RolledBack);
        }
        let Some(ended) = tx.end_request(self.scope(), self.key(), self.token).await? else {
            rollback(tx).await;
            return Err(self.lost());
        };
        let provenance = if ended.provenance.request_id.is_some() {
            ended.provenance
        } else {
            self.provenance.clone()
        };
        let row = KeyRow {
            scope: self.scope(),
            key: self.key(),
            fingerprint: &self.fingerprint,
            response,
            provenance: &provenance,
            window: Window::Kept {
                created_at: ended.created_at,
                expires_at: ended.expires_at,
            },
            expired: ExpiredRow::Deleted,
        };
        let stored = self
            .engine
            .store_and_commit(tx, &row, &self.holding, || {
                boundary("finish", "before_commit");
            })
            .await;
        match stored {
            Ok(_created_at) => {
                boundary("finish", "after_commit");
                Ok(Completion::Stored)
            }
            Err(error) => {
                self.broken |= matches!(error, Error::CommitInterrupted { .. });
                Err(error)
            }
        }
    }

    /// Extends the lease, fenced by the token, and writes `record`, through `executor`:
    /// the step's own transaction (a local step) or the pool.
    async fn extend<'e>(
        &self,
        executor: impl PgExecutor<'e>,
        record: Record<'_>,
    ) -> Result<(), Error> {
        let (operation, input) = record.start.unzip();
        // `{step: output}`, merged into `progress`: built here, since Citus refuses a
        // function that is not immutable inside CASE (jsonb_build_object is stable).
        let recorded = record.step.map_or_else(
            || Value::Object(Map::new()),
            |(name, output)| Value::Object(Map::from_iter([(name.to_owned(), output.clone())])),
        );
        let provenance = |value: &'_ Option<String>| value.clone().filter(|_| operation.is_some());
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
            self.scope().as_str(),
            self.key().as_str(),
            self.token,
            record.step.map(|(name, _)| name),
            recorded,
            millis(self.engine.config().lease()),
            operation,
            input,
            provenance(&self.provenance.request_id),
            provenance(&self.provenance.traceparent),
        )
        .execute(executor)
        .await?;
        self.fenced(updated.rows_affected())
    }

    /// Ends the lease now, so that a retry or the completer can take the request at once;
    /// forgets the request if no operation started it.
    ///
    /// Without a place of its own: the final step may still hold its scope's last one.
    pub(super) async fn release(&self) -> Result<(), Error> {
        self.engine
            .in_transaction(self.scope(), false, async |conn| {
                sqlx::query!(
                    r#"WITH unstarted AS (
                   DELETE FROM idempotency_requests
                   WHERE scope = $1 AND key = $2 AND lease_token = $3 AND operation IS NULL
                   RETURNING 1)
               UPDATE idempotency_requests SET leased_until = now()
               WHERE scope = $1 AND key = $2 AND lease_token = $3
                 AND operation IS NOT NULL"#,
                    self.scope().as_str(),
                    self.key().as_str(),
                    self.token,
                )
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
            .await
    }

    /// After the operation failed: [`release`](Self::release)s the request, best effort
    /// (otherwise the lease runs out by itself). Not after a connection broke around a
    /// `COMMIT`: the old backend may still hold the request's row (an unreachable
    /// server), and the release would wait for it without bound.
    pub(super) async fn release_after_error(&self) {
        if self.broken {
            tracing::debug!("a connection broke around COMMIT: the lease runs out by itself");
            return;
        }
        if let Err(error) = self.release().await {
            tracing::warn!(%error, "releasing a failed phased request failed; its lease will run out");
        }
    }
}

/// What a lease extension writes beside the new lease: a step's output, and the
/// operation that starts the request with its input.
struct Record<'a> {
    step: Option<(&'a str, &'a Value)>,
    start: Option<(&'a str, &'a Value)>,
}

/// Rolls `tx` back; a failure closes the connection, which rolls back all the same.
pub(super) async fn rollback(mut tx: TxConn) {
    if let Err(error) = tx.rollback().await {
        tracing::warn!(%error, "rolling back a step failed; its connection was closed");
    }
}
