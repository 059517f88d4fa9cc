//! A claimed key: the open transaction in which the business write happens.

use std::fmt;
use std::time::Instant;

use tracing::Instrument;

use crate::db::{KeyRow, Window};
use crate::engine::{Engine, KeyHold};
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::metrics;
use crate::outcome::Completion;
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;

/// A claimed idempotency key and the open transaction that holds it.
///
/// The claim **owns** the transaction: do the business writes through it (it is an
/// [`Executor`](sqlx::Executor): `query.execute(&mut claim)`), then call [`Claim::complete`], which stores
/// the response and commits both together. Nothing else commits.
///
/// - [`Claim::abort`], or dropping the claim, rolls everything back and frees the key.
/// - A response the [`StorePolicy`](crate::StorePolicy) does not keep (by default 5xx,
///   408 and 429) also rolls back the business write and frees the key.
///
/// While the claim is open, other requests with the same scope and key wait (up to
/// [`Config::in_flight_wait`](crate::Config::in_flight_wait), without holding a connection; those of this process are
/// woken when the claim ends) and then replay the stored response or get
/// [`Error::InFlight`].
///
/// The claim deliberately does not hand out its `PgConnection`: a `begin()`/`commit()` on
/// it would commit the business write without its key. Functions that take
/// `impl PgExecutor<'_>` accept `&mut claim`; for savepoints, issue `SAVEPOINT` /
/// `ROLLBACK TO SAVEPOINT` statements through it.
#[must_use = "dropping a claim rolls back its transaction; call `complete`"]
pub struct Claim {
    /// The transaction that holds the key.
    held: KeyHold,
    engine: Engine,
    fingerprint: Fingerprint,
    provenance: Provenance,
}

impl Claim {
    /// A claim on the key `held` holds, for the request with `fingerprint`.
    pub(crate) fn new(engine: Engine, held: KeyHold, fingerprint: Fingerprint) -> Self {
        Self {
            held,
            engine,
            fingerprint,
            provenance: Provenance::default(),
        }
    }

    /// The scope of the claimed key.
    pub fn scope(&self) -> &Scope {
        &self.held.holding.key().0
    }

    /// The claimed key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.held.holding.key().1
    }

    /// The fingerprint of the request that holds the claim.
    pub fn fingerprint(&self) -> &Fingerprint {
        &self.fingerprint
    }

    /// Records which request holds the claim (its request id and `traceparent`), to be
    /// stored with the response: replays and conflicts then name it, and
    /// `pg-idempotency inspect` shows it. Nothing is stored without it.
    pub fn set_provenance(&mut self, provenance: Provenance) {
        self.provenance = provenance;
    }

    /// The request that holds the claim, as [set](Self::set_provenance).
    pub fn provenance(&self) -> &Provenance {
        &self.provenance
    }

    /// Stores `response` with the key (its values as bound parameters, so that a failed
    /// statement never puts them into the server's log) and commits the business write
    /// with it, in two round trips; or, if the store policy does not keep `response.status`, rolls both
    /// back and frees the key.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidStatus`] (the transaction is rolled back); [`Error::InFlight`] if
    /// another request stored a response for this key first without waiting for this
    /// claim (possible only when the advisory lock is not shared, see
    /// `docs/OPERATIONS.md`; rolled back, a retry replays);
    /// [`Error::CommitInterrupted`] when the connection broke around `COMMIT`: the
    /// store then found out on another connection, waiting at most
    /// [`Config::commit_resolution_wait`](crate::Config::commit_resolution_wait), whether the write is stored (with the stored
    /// response), not stored, or, only when that wait passed, unknown; or
    /// [`Error::Database`] when the server refused the statement (nothing was stored).
    /// Retrying the request with the same key is always safe: it answers with the stored
    /// response or runs afresh.
    pub async fn complete(self, response: &StoredResponse) -> Result<Completion, Error> {
        let span = tracing::info_span!(
            "idempotency.complete",
            scope = %self.scope(),
            key = %self.key(),
            status = response.status,
            body_bytes = response.body.len(),
            stored = tracing::field::Empty,
        );
        let started = Instant::now();
        async move {
            let Claim {
                held,
                engine,
                fingerprint,
                provenance,
            } = self;
            let KeyHold {
                mut tx,
                expired,
                holding,
                ..
            } = held;
            let kept = engine.keeps(response.status);
            if !matches!(kept, Ok(true)) {
                tx.rollback().await?;
                kept?;
                tracing::Span::current().record("stored", false);
                metrics::count(metrics::POLICY_ROLLBACKS, 1);
                metrics::time(metrics::COMPLETE_SECONDS, started.elapsed());
                return Ok(Completion::RolledBack);
            }
            let (scope, key) = holding.key();
            let row = KeyRow {
                scope,
                key,
                fingerprint: &fingerprint,
                response,
                provenance: &provenance,
                window: Window::From(engine.config().ttl()),
                expired,
            };
            let stored = engine.store_and_commit(tx, &row, &holding, || {}).await;
            metrics::time(metrics::COMPLETE_SECONDS, started.elapsed());
            stored?;
            tracing::Span::current().record("stored", true);
            metrics::size(metrics::RESPONSE_BYTES, response.body.len());
            Ok(Completion::Stored)
        }
        .instrument(span)
        .await
    }

    /// Rolls back the business write and frees the key.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] if the rollback failed; the connection is then closed, which
    /// rolls back on the server all the same.
    pub async fn abort(mut self) -> Result<(), Error> {
        self.held.tx.rollback().await?;
        Ok(())
    }
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("scope", self.scope())
            .field("key", self.key())
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

crate::db::executor_over_tx!(Claim, held.tx);
