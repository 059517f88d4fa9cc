//! A claimed key: the open transaction in which the business write happens.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{AssertSqlSafe, Either, Execute, Executor, PgConnection, Postgres, SqlStr};
use tracing::Instrument;

use crate::config::Config;
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::metrics;
use crate::response::StoredResponse;
use crate::scope::Scope;
use crate::sql;

/// The primary key of `idempotency_keys`: storing a response meets it when a row is in
/// the way. A prefix, because Citus names a shard's constraint `<name>_<shard id>`.
const KEY_CONSTRAINT: &str = "idempotency_keys_pkey";

/// How long a rollback started from `Drop` may take before the connection is closed.
const DROP_ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

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
            let headers_json = serde_json::to_string(&response.headers)
                .map_err(|e| Error::MalformedRow(e.to_string()))?;
            let ttl_ms = i64::try_from(self.config.ttl().as_millis()).unwrap_or(i64::MAX);
            let statement = sql::store_and_commit(&sql::Row {
                scope: self.scope.as_str(),
                key: self.key.as_str(),
                fingerprint: &self.fingerprint,
                status: response.status,
                headers_json: &headers_json,
                body: &response.body,
                ttl_ms,
                replace_expired: self.replace_expired,
            });
            match self.tx.finish(statement).await {
                Ok(()) => {}
                // The insert met a live row: another request with this key committed
                // first without sharing our lock (see docs/OPERATIONS.md). The rest of
                // the string (the COMMIT) was skipped: roll back, and a retry replays the
                // winner's response.
                Err(sqlx::Error::Database(error))
                    if error.is_unique_violation()
                        && error
                            .constraint()
                            .is_some_and(|name| name.starts_with(KEY_CONSTRAINT)) =>
                {
                    self.tx.rollback().await?;
                    return Err(Error::InFlight {
                        scope: self.scope.clone(),
                        key: self.key.clone(),
                        retry_after: self.config.retry_after(),
                    });
                }
                Err(error) => return Err(error.into()),
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

impl<'c> Executor<'c> for &'c mut Claim {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        self.tx.conn().fetch_many(query)
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        self.tx.conn().fetch_optional(query)
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        self.tx.conn().prepare_with(sql, parameters)
    }

    fn describe<'e>(
        self,
        sql: SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        self.tx.conn().describe(sql)
    }
}

/// A pooled connection inside a transaction this crate opened with a raw `BEGIN`.
///
/// sqlx does not know about that transaction, so this type makes sure the connection
/// never goes back to the pool while still inside it:
/// - every operation that ends the transaction hands the connection back only after the
///   server confirmed it;
/// - dropped while idle (the claim was dropped), it rolls back in a spawned task;
/// - dropped in the middle of an operation (a cancelled future), or after an error, the
///   connection's state is unknown and it is closed instead, which makes the server
///   roll back. The pool opens a new one when needed.
pub(crate) struct TxConn {
    conn: Option<PoolConnection<Postgres>>,
    busy: bool,
}

impl TxConn {
    /// Wraps a connection that is about to send `BEGIN`; until an operation completes it
    /// counts as busy.
    pub(crate) fn new(conn: PoolConnection<Postgres>) -> Self {
        Self {
            conn: Some(conn),
            busy: true,
        }
    }

    fn conn(&mut self) -> &mut PgConnection {
        // `conn` is only `None` after an operation consumed it, and those take the whole
        // claim by value, so no later call can observe it.
        self.conn
            .as_deref_mut()
            .expect("BUG: TxConn used after it finished")
    }

    /// Runs `statement` (which starts the transaction) and returns its rows.
    pub(crate) async fn run(&mut self, statement: String) -> Result<Vec<PgRow>, sqlx::Error> {
        self.busy = true;
        let rows = sqlx::raw_sql(AssertSqlSafe(statement))
            .fetch_all(self.conn())
            .await?;
        self.busy = false;
        Ok(rows)
    }

    /// Runs `statement`, which ends the transaction, and returns the connection to the
    /// pool.
    pub(crate) async fn finish(&mut self, statement: String) -> Result<(), sqlx::Error> {
        self.busy = true;
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(self.conn())
            .await?;
        self.busy = false;
        // Back to the pool, outside any transaction.
        self.conn = None;
        Ok(())
    }

    /// Rolls back and returns the connection to the pool.
    pub(crate) async fn rollback(&mut self) -> Result<(), sqlx::Error> {
        self.finish("ROLLBACK".to_owned()).await
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if !self.busy => {
                runtime.spawn(
                    async move {
                        let rollback = sqlx::raw_sql("ROLLBACK").execute(&mut *conn);
                        match tokio::time::timeout(DROP_ROLLBACK_TIMEOUT, rollback).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(error)) => {
                                tracing::warn!(%error, "rollback of a dropped claim failed; closing its connection");
                                conn.close_on_drop();
                            }
                            Err(_) => {
                                tracing::warn!("rollback of a dropped claim timed out; closing its connection");
                                conn.close_on_drop();
                            }
                        }
                    }
                    .in_current_span(),
                );
            }
            _ => conn.close_on_drop(),
        }
    }
}
