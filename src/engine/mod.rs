//! The life of a key, which both modes stand on.
//!
//! - [`take`]: taking a key — its lock and its row in one round trip, a bounded wait for
//!   the request that holds it, and the answer its stored response gives: a replay, or a
//!   conflict;
//! - [`commit`]: storing a response — the one status and store-policy check, the one
//!   insert of the key row, the `COMMIT`, and finding out on another connection what
//!   happened when the connection broke around it;
//! - [`waiters`]: where the duplicates of a held key wait without a connection.
//!
//! The [transactional claim](crate::Claim) and the [phased request](crate::phased) are
//! two modes over it: the first holds the key's transaction for the business write, the
//! second takes the key to record a request row and lets it go.

mod commit;
mod take;
mod waiters;

use std::sync::Arc;
use std::time::Instant;

use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
use sqlx::{PgConnection, PgPool};

use crate::config::Config;
use crate::db::{Place, Shares, TxConn, in_transaction_on};
use crate::error::Error;
use crate::key::IdempotencyKey;
use crate::metrics;
use crate::scope::Scope;

pub(crate) use take::{KeyHold, conflict, same_request};
pub(crate) use waiters::Holding;
use waiters::Waiters;

/// What both modes run on: the pool, the configuration, and the keys this process's
/// claims hold. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Engine {
    pool: PgPool,
    config: Arc<Config>,
    /// Shared by [`reconfigured`](Self::reconfigured) copies.
    waiters: Arc<Waiters>,
    /// Each scope's share of the pool; shared by reconfigured copies.
    shares: Arc<Shares>,
}

impl Engine {
    pub(crate) fn new(pool: PgPool, config: Config) -> Self {
        let shares = Shares::new(pool.options().get_max_connections(), config.scope_share());
        Self {
            pool,
            config: Arc::new(config),
            waiters: Arc::default(),
            shares: Arc::new(shares),
        }
    }

    /// The same engine with its configuration changed by `change`: same pool, same
    /// waiters.
    pub(crate) fn reconfigured(&self, change: impl FnOnce(Config) -> Config) -> Self {
        Self {
            pool: self.pool.clone(),
            config: Arc::new(change((*self.config).clone())),
            waiters: Arc::clone(&self.waiters),
            shares: Arc::clone(&self.shares),
        }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Registers `(scope, key)` as held by this process until the returned [`Holding`]
    /// is dropped: this process's duplicates of the key wait for it without a connection.
    pub(crate) fn hold(&self, scope: &Scope, key: &IdempotencyKey) -> Holding {
        self.waiters.hold(scope, key)
    }

    /// A place among the connections `scope` may hold, waited for until `deadline`; the
    /// wait is recorded, whether a place came or not.
    ///
    /// # Errors
    ///
    /// [`Error::NoConnection`] when the scope's places stayed taken.
    pub(crate) async fn place(&self, scope: &Scope, deadline: Instant) -> Result<Place, Error> {
        let started = Instant::now();
        let place = (self.shares)
            .enter(scope, deadline, !self.config.pool_checks())
            .await;
        metrics::time(metrics::PLACE_WAIT_SECONDS, started.elapsed());
        place.ok_or_else(|| self.no_connection(scope, started))
    }

    /// A place for a request of `scope` and a pooled connection, for a statement outside
    /// its claim (a phased request's steps and lease), both waited for within the
    /// [connection wait](Config::connection_wait) from now. Keep the place as long as the
    /// connection.
    ///
    /// # Errors
    ///
    /// [`Error::NoConnection`] when either did not come in time; [`Error::Database`] when
    /// connecting failed.
    pub(crate) async fn placed_connection(
        &self,
        scope: &Scope,
    ) -> Result<(Place, PoolConnection<Postgres>), Error> {
        let deadline = Instant::now() + self.config.connection_wait();
        let mut place = self.place(scope, deadline).await?;
        let conn = match place.take_connection() {
            Some(conn) => conn,
            None => self.connection(scope, deadline).await?,
        };
        Ok((place, conn))
    }

    /// A transaction on a [placed connection](Self::placed_connection), which keeps the
    /// place until it ends (a phased request's step or final step).
    ///
    /// # Errors
    ///
    /// Those of [`placed_connection`](Self::placed_connection); [`Error::Database`] from
    /// `BEGIN`.
    pub(crate) async fn begin_placed(&self, scope: &Scope) -> Result<TxConn, Error> {
        let (place, conn) = self.placed_connection(scope).await?;
        Ok(TxConn::begin_on(conn, Some(place)).await?)
    }

    /// Runs `f` in a transaction of its own on a connection for a request of `scope`,
    /// waited for within the [connection wait](Config::connection_wait): with a
    /// [place](Self::placed_connection), or, when `placed` is false, without one, for a
    /// short statement that may run while the caller holds its scope's last place (a
    /// phased request's release after its final step).
    ///
    /// # Errors
    ///
    /// [`Error::NoConnection`] when the connection (or the place) did not come in time;
    /// the errors of `f`; [`Error::Database`] from `BEGIN` or `COMMIT`.
    pub(crate) async fn in_transaction<T>(
        &self,
        scope: &Scope,
        placed: bool,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        if placed {
            let (_place, conn) = self.placed_connection(scope).await?;
            return in_transaction_on(conn, f).await;
        }
        let deadline = Instant::now() + self.config.connection_wait();
        in_transaction_on(self.connection(scope, deadline).await?, f).await
    }

    /// A pooled connection for a request of `scope` that holds its [`Place`], waited for
    /// until `deadline` at the latest (the pool's own timeout, if it is shorter, counts
    /// the same).
    ///
    /// The pool may be checking a connection when the wait runs out (its ping, its
    /// `before_acquire` hook): cancelled then, the connection would be closed. So the
    /// acquire runs on as a task of its own, and a connection that comes too late goes
    /// back to the pool intact.
    ///
    /// # Errors
    ///
    /// [`Error::NoConnection`] when none was free in time; [`Error::Database`] when
    /// connecting failed.
    pub(crate) async fn connection(
        &self,
        scope: &Scope,
        deadline: Instant,
    ) -> Result<PoolConnection<Postgres>, Error> {
        let started = Instant::now();
        let pool = self.pool.clone();
        let mut acquire = tokio::spawn(async move { pool.acquire().await });
        match tokio::time::timeout_at(deadline.into(), &mut acquire).await {
            Ok(Ok(Ok(conn))) => Ok(conn),
            Ok(Ok(Err(error))) if !matches!(error, sqlx::Error::PoolTimedOut) => Err(error.into()),
            // Too late, timed out in the pool, or the task failed (the runtime is
            // shutting down): no connection.
            _ => Err(self.no_connection(scope, started)),
        }
    }

    /// [`Error::NoConnection`] for a request of `scope` that waited since `started`.
    fn no_connection(&self, scope: &Scope, started: Instant) -> Error {
        Error::NoConnection {
            scope: scope.clone(),
            waited: started.elapsed(),
            retry_after: self.config.retry_after(),
        }
    }

    /// [`Error::InFlight`] for this key, with the configured retry hint.
    pub(crate) fn in_flight(&self, scope: &Scope, key: &IdempotencyKey) -> Error {
        Error::InFlight {
            scope: scope.clone(),
            key: key.clone(),
            retry_after: self.config.retry_after(),
        }
    }
}
