//! A claimed key: the open transaction in which the business write happens.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use tracing::Instrument;

use crate::config::Config;
use crate::db::{Committed, KeyRow, TxConn};
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::metrics;
use crate::response::StoredResponse;
use crate::scope::Scope;

/// A claimed idempotency key and the open transaction that holds it.
///
/// The claim **owns** the transaction: do the business writes through it (it is an
/// [`Executor`]: `query.execute(&mut claim)`), then call [`Claim::complete`], which stores
/// the response and commits both together. Nothing else commits.
///
/// - [`Claim::abort`], or dropping the claim, rolls everything back and frees the key.
/// - A response the [`StorePolicy`](crate::StorePolicy) does not keep (by default 5xx,
///   408 and 429) also rolls back the business write and frees the key.
///
/// While the claim is open, other requests with the same scope and key wait (up to
/// [`Config::in_flight_wait`]) and then replay the stored response or get
/// [`Error::InFlight`].
///
/// The claim deliberately does not hand out its `PgConnection`: a `begin()`/`commit()` on
/// it would commit the business write without its key. Functions that take
/// `impl PgExecutor<'_>` accept `&mut claim`; for savepoints, issue `SAVEPOINT` /
/// `ROLLBACK TO SAVEPOINT` statements through it.
#[must_use = "dropping a claim rolls back its transaction; call `complete`"]
pub struct Claim {
    tx: TxConn,
    scope: Scope,
    key: IdempotencyKey,
    fingerprint: Fingerprint,
    /// The claim saw an expired row for the key, which `complete` replaces.
    replace_expired: bool,
    config: Arc<Config>,
}

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
    pub(crate) fn new(
        tx: TxConn,
        scope: Scope,
        key: IdempotencyKey,
        fingerprint: Fingerprint,
        replace_expired: bool,
        config: Arc<Config>,
    ) -> Self {
        Self {
            tx,
            scope,
            key,
            fingerprint,
            replace_expired,
            config,
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

    /// Stores `response` with the key and commits the business write with it, in one
    /// round trip; or, if the store policy does not keep `response.status`, rolls both
    /// back and frees the key.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidStatus`] (the transaction is rolled back); [`Error::InFlight`] if
    /// another request stored a response for this key first without waiting for this
    /// claim (possible only when the advisory lock is not shared, see
    /// `docs/OPERATIONS.md`; rolled back, a retry replays); or [`Error::Database`].
    /// After a database error the outcome may be unknown (the connection broke around
    /// `COMMIT`): retrying the request with the same key is always safe and answers with
    /// either the stored response or a fresh run.
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
            };
            match self.tx.store_and_commit(&row).await? {
                Committed::Stored => {}
                // Another request with this key committed first without sharing our lock
                // (see docs/OPERATIONS.md); everything was rolled back, and a retry
                // replays the winner's response.
                Committed::KeyTaken => {
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
