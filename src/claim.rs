//! A claimed key: the open transaction in which the business write happens.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tracing::Instrument;

use crate::config::Config;
use crate::db::{Committed, KeyRow, StoredRow, TxConn};
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::metrics;
use crate::provenance::Provenance;
use crate::response::StoredResponse;
use crate::scope::Scope;
use crate::store::{IdempotencyStore, Replay};
use crate::waiters::Holding;

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
/// [`Config::in_flight_wait`], without holding a connection; those of this process are
/// woken when the claim ends) and then replay the stored response or get
/// [`Error::InFlight`].
///
/// The claim deliberately does not hand out its `PgConnection`: a `begin()`/`commit()` on
/// it would commit the business write without its key. Functions that take
/// `impl PgExecutor<'_>` accept `&mut claim`; for savepoints, issue `SAVEPOINT` /
/// `ROLLBACK TO SAVEPOINT` statements through it.
#[must_use = "dropping a claim rolls back its transaction; call `complete`"]
pub struct Claim {
    tx: TxConn,
    /// Wakes this process's duplicates of the key when the claim ends (declared after
    /// `tx`, so that it drops after the transaction ended or its rollback was started),
    /// handing them the stored row when there is one.
    _holding: Holding,
    /// For [`resolve`]: another connection after this one broke around `COMMIT`.
    pool: PgPool,
    scope: Scope,
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    /// The claim saw an expired row for the key, which `complete` replaces.
    replace_expired: bool,
    config: Arc<Config>,
    provenance: Provenance,
}

/// What happened to a claim whose connection broke around `COMMIT`
/// ([`Error::CommitInterrupted`]), as found out on another connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitOutcome {
    /// The business write and the response are committed: answer with this response.
    ///
    /// It is the one this claim stored; or, if this claim's transaction rolled back and
    /// another request with the same key and the same request completed before the store
    /// looked, that request's, which is what a retry would replay.
    Stored(Box<Replay>),
    /// Nothing of this claim was committed: the business write rolled back and the key
    /// is free (unless another request has taken it since). The request can be retried
    /// with the same key.
    NotStored,
    /// The old transaction still held the key's lock when
    /// [`Config::commit_resolution_wait`] passed: its backend cannot be reached or is still
    /// committing. A retry with the same key later answers with the stored response or
    /// runs afresh.
    Unknown,
}

impl fmt::Display for CommitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommitOutcome::Stored(_) => "it was committed and its response is stored",
            CommitOutcome::NotStored => "nothing was committed and the key is free",
            CommitOutcome::Unknown => {
                "whether it was committed is unknown: the old transaction still held the key \
                 when the resolution wait passed"
            }
        })
    }
}

/// At most this much is added to [`Config::commit_resolution_wait`] for the resolving
/// round trip itself.
const RESOLUTION_SLACK: Duration = Duration::from_secs(1);

/// What [`Claim::complete`] did with the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The response is stored and the business write committed with it.
    Stored,
    /// The store policy does not keep this status: the business write was rolled back
    /// and the key is free for a retry.
    RolledBack,
}

impl Claim {
    /// A claim of `store` on `(scope, key)`, held by `tx` and registered by `holding`.
    pub(crate) fn new(
        store: &IdempotencyStore,
        tx: TxConn,
        holding: Holding,
        scope: Scope,
        key: IdempotencyKey,
        fingerprint: Fingerprint,
        replace_expired: bool,
    ) -> Self {
        Self {
            tx,
            _holding: holding,
            pool: store.pool().clone(),
            scope,
            key,
            fingerprint,
            replace_expired,
            config: store.shared_config(),
            provenance: Provenance::default(),
        }
    }

    /// The scope of the claimed key.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The claimed key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
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
    /// [`Config::commit_resolution_wait`], whether the write is stored (with the stored
    /// response), not stored, or, only when that wait passed, unknown; or
    /// [`Error::Database`] when the server refused the statement (nothing was stored).
    /// Retrying the request with the same key is always safe: it answers with the stored
    /// response or runs afresh.
    pub async fn complete(mut self, response: &StoredResponse) -> Result<Completion, Error> {
        let span = tracing::info_span!(
            "idempotency.complete",
            scope = %self.scope,
            key = %self.key,
            status = response.status,
            body_bytes = response.body.len(),
            stored = tracing::field::Empty,
        );
        let started = Instant::now();
        async move {
            if !(100..=599).contains(&response.status) {
                self.tx.rollback().await?;
                return Err(Error::InvalidStatus(response.status));
            }
            if !self.config.store_policy().stores(response.status) {
                self.tx.rollback().await?;
                tracing::Span::current().record("stored", false);
                metrics::count(metrics::POLICY_ROLLBACKS, 1);
                metrics::time(metrics::COMPLETE_SECONDS, started.elapsed());
                return Ok(Completion::RolledBack);
            }
            let row = KeyRow {
                scope: &self.scope,
                key: &self.key,
                fingerprint: &self.fingerprint,
                response,
                ttl: self.config.ttl(),
                replace_expired: self.replace_expired,
                provenance: &self.provenance,
            };
            match self.tx.store_and_commit(&row).await {
                Ok(Committed::Stored(created_at)) => {
                    // This process's duplicates of the key get the row without a look.
                    self._holding.answer(|| StoredRow {
                        fingerprint: self.fingerprint,
                        response: response.clone(),
                        created_at,
                        provenance: self.provenance.clone(),
                    });
                }
                Err(error) if connection_broke(&error) => {
                    // The COMMIT may or may not have happened. Close this connection (its
                    // backend rolls back if it did not commit yet), then look.
                    let Claim {
                        tx,
                        pool,
                        scope,
                        key,
                        fingerprint,
                        replace_expired,
                        config,
                        ..
                    } = self;
                    drop(tx);
                    tracing::warn!(%error, "the connection broke around COMMIT; resolving the outcome");
                    let lookup = Lookup {
                        scope: &scope,
                        key: &key,
                        fingerprint: &fingerprint,
                        replace_expired,
                    };
                    let outcome = resolve(&pool, &lookup, config.commit_resolution_wait()).await;
                    metrics::time(metrics::COMPLETE_SECONDS, started.elapsed());
                    return Err(Error::CommitInterrupted {
                        scope,
                        key,
                        outcome,
                        source: error,
                    });
                }
                Err(error) => return Err(error.into()),
                // Another request with this key committed first without sharing our lock
                // (see docs/OPERATIONS.md); everything was rolled back, and a retry
                // replays the winner's response.
                Ok(Committed::KeyTaken) => {
                    return Err(Error::InFlight {
                        scope: self.scope.clone(),
                        key: self.key.clone(),
                        retry_after: self.config.retry_after(),
                    });
                }
            }
            tracing::Span::current().record("stored", true);
            metrics::time(metrics::COMPLETE_SECONDS, started.elapsed());
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
        self.tx.rollback().await?;
        Ok(())
    }
}

/// Whether `error` says that the connection failed (I/O, protocol, TLS) or that the
/// server ended the session (SQLSTATE class 57, operator intervention, or 08, connection
/// exception). Sent with a `COMMIT`, that leaves its outcome unknown (the server may have
/// committed right before); on a claim's first round trip, before anything ran, it only
/// means the connection is of no use (the server closed it while it sat in the pool).
/// Any other database error means the server refused a statement, which rolls the
/// transaction back.
pub(crate) fn connection_broke(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("57") || code.starts_with("08")),
        _ => true,
    }
}

/// What [`resolve`] looks for.
pub(crate) struct Lookup<'a> {
    pub scope: &'a Scope,
    pub key: &'a IdempotencyKey,
    pub fingerprint: &'a Fingerprint,
    /// The claim replaced an expired row, which is still there if it rolled back.
    pub replace_expired: bool,
}

/// Finds out, on another connection, whether a claim whose connection broke around
/// `COMMIT` is stored, waiting at most `wait` (plus [`RESOLUTION_SLACK`] for the round
/// trip) for the old transaction to end.
pub(crate) async fn resolve(pool: &PgPool, lookup: &Lookup<'_>, wait: Duration) -> CommitOutcome {
    let span = tracing::info_span!(
        "idempotency.resolve_commit",
        outcome = tracing::field::Empty
    );
    async move {
        let started = Instant::now();
        let attempt = async {
            let mut tx = TxConn::new(pool.acquire().await?);
            let remaining = wait.saturating_sub(started.elapsed());
            let wait_ms = i32::try_from(remaining.as_millis()).unwrap_or(i32::MAX);
            let found = tx
                .begin_resolution(wait_ms, lookup.scope, lookup.key)
                .await?;
            tx.rollback().await?;
            let row = found
                .row
                .map(|row| (row.live, row.decode()))
                .and_then(|(live, decoded)| match decoded {
                    // An expired row is ours only if the claim found none (a TTL shorter
                    // than this wait); otherwise it may be the one the claim replaced.
                    Ok(stored) if live || !lookup.replace_expired => Some(Ok(stored)),
                    Ok(_) => None,
                    Err(error) => Some(Err(error)),
                });
            Ok::<_, Error>(match (row.transpose()?, found.locked) {
                // A committed row with this request's fingerprint: this claim's, or an
                // identical request's that ran after it rolled back.
                (Some(stored), _) if stored.fingerprint == *lookup.fingerprint => {
                    CommitOutcome::Stored(Box::new(Replay {
                        response: stored.response,
                        first_used_at: stored.created_at,
                        first_request: stored.provenance,
                    }))
                }
                // Another request's row: this claim's insert can never commit.
                (Some(_), _) => CommitOutcome::NotStored,
                // The old transaction has ended and left no row.
                (None, true) => CommitOutcome::NotStored,
                (None, false) => CommitOutcome::Unknown,
            })
        };
        let outcome = match tokio::time::timeout(wait + RESOLUTION_SLACK, attempt).await {
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
        let name = match &outcome {
            CommitOutcome::Stored(_) => "stored",
            CommitOutcome::NotStored => "not_stored",
            CommitOutcome::Unknown => "unknown",
        };
        tracing::Span::current().record("outcome", name);
        metrics::count_labeled(metrics::COMMIT_RESOLUTIONS, "outcome", name);
        outcome
    }
    .instrument(span)
    .await
}

impl fmt::Debug for Claim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claim")
            .field("scope", &self.scope)
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

crate::db::executor_over_tx!(Claim);
