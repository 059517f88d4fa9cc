//! [`TxConn`]: a pooled connection inside a transaction this crate opened itself.

use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Postgres};
use tracing::Instrument;

use super::shares::Place;
use super::statement::Statement;

/// How long a rollback started from `Drop` may take before the connection is closed.
const DROP_ROLLBACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A pooled connection inside a transaction this crate opened with a raw `BEGIN`.
///
/// sqlx does not know about that transaction, so this type makes sure the connection
/// never goes back to the pool while still inside it:
/// - every operation that ends the transaction hands the connection back only after the
///   server confirmed it;
/// - dropped while idle (the claim was dropped), it rolls back in a spawned task;
/// - dropped after a statement the server refused (a database error), it is idle inside
///   a failed transaction and rolls back the same way: a refused statement costs no
///   connection;
/// - dropped in the middle of an operation (a cancelled future), or after any other
///   error, the connection's state is unknown and it is closed instead, which makes the
///   server roll back. The pool opens a new one when needed.
///
/// A connection taken with a [`Place`] keeps it until the transaction has ended, and then
/// leaves the connection in it ([`Place::leave`]): the next request waiting for a place
/// may get both.
///
/// It runs only [`Statement`]s, which the `db` module alone can make.
pub(crate) struct TxConn {
    conn: Option<PoolConnection<Postgres>>,
    busy: bool,
    place: Option<Place>,
}

impl TxConn {
    /// Wraps a connection that is about to send `BEGIN`, and the place it was taken with,
    /// if any; until an operation completes it counts as busy.
    pub(crate) fn new(conn: PoolConnection<Postgres>, place: Option<Place>) -> Self {
        Self {
            conn: Some(conn),
            busy: true,
            place,
        }
    }

    /// The connection, for the business statements of a claim.
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        // `conn` is only `None` after an operation consumed it, and those take the whole
        // claim by value, so no later call can observe it.
        self.conn
            .as_deref_mut()
            .expect("BUG: TxConn used after it finished")
    }

    /// Runs `statement` inside the transaction (or one that opens it) and returns its
    /// rows.
    pub(super) async fn run(&mut self, statement: Statement) -> Result<Vec<PgRow>, sqlx::Error> {
        self.busy = true;
        let rows = sqlx::raw_sql(statement.into_sql())
            .fetch_all(self.conn())
            .await;
        self.settle(rows)
    }

    /// Runs `statement`, which binds its values as parameters, inside the transaction.
    pub(super) async fn run_bound<T>(
        &mut self,
        statement: impl AsyncFnOnce(&mut PgConnection) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        self.busy = true;
        let result = statement(self.conn()).await;
        self.settle(result)
    }

    /// Records what `result` says about the connection: after a success or a statement
    /// the server refused (a database error: the server skipped the rest of the string
    /// and is ready for the next one, inside a failed transaction), it is idle, so a
    /// rollback returns it to the pool; after any other error (I/O, protocol) its state is
    /// unknown and it stays busy, to be closed.
    fn settle<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        self.busy = matches!(&result, Err(error) if !matches!(error, sqlx::Error::Database(_)));
        result
    }

    /// Runs `statement`, which ends the transaction, and gives the connection back,
    /// outside any transaction: to its place, else to the pool.
    pub(super) async fn finish(&mut self, statement: Statement) -> Result<(), sqlx::Error> {
        self.busy = true;
        let done = sqlx::raw_sql(statement.into_sql())
            .execute(self.conn())
            .await;
        self.settle(done)?;
        if let Some(conn) = self.conn.take() {
            give_back(conn, self.place.take());
        }
        Ok(())
    }

    /// Closes the connection instead of returning it to the pool (it is known to be
    /// broken) and hands back the place it was taken with.
    pub(crate) fn discard(mut self) -> Option<Place> {
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
        self.place.take()
    }

    /// Takes a connection from `pool` and opens a transaction on it.
    pub(crate) async fn begin(pool: &PgPool) -> Result<Self, sqlx::Error> {
        Self::begin_on(pool.acquire().await?, None).await
    }

    /// Opens a transaction on `conn`, taken with `place`, if any.
    pub(crate) async fn begin_on(
        conn: PoolConnection<Postgres>,
        place: Option<Place>,
    ) -> Result<Self, sqlx::Error> {
        let mut tx = Self::new(conn, place);
        tx.run(Statement::new("BEGIN", 0)).await?;
        Ok(tx)
    }

    /// Commits and returns the connection to the pool.
    pub(crate) async fn commit(&mut self) -> Result<(), sqlx::Error> {
        self.finish(Statement::new("COMMIT", 0)).await
    }

    /// Rolls back and returns the connection to the pool.
    pub(crate) async fn rollback(&mut self) -> Result<(), sqlx::Error> {
        self.finish(Statement::new("ROLLBACK", 0)).await
    }
}

impl Drop for TxConn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let place = self.place.take();
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            // The place is kept until the rollback has ended.
            Ok(runtime) if !self.busy => {
                runtime.spawn(
                    async move {
                        let rollback = sqlx::raw_sql("ROLLBACK").execute(&mut *conn);
                        match tokio::time::timeout(DROP_ROLLBACK_TIMEOUT, rollback).await {
                            Ok(Ok(_)) => give_back(conn, place),
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

/// Gives back `conn`, idle outside any transaction: left in `place`, else to the pool.
fn give_back(conn: PoolConnection<Postgres>, place: Option<Place>) {
    match place {
        Some(place) => place.leave(conn),
        None => drop(conn),
    }
}

/// Implements [`sqlx::Executor`] for `&mut $ty`, a type whose field `$tx` (a path of
/// fields) is the [`TxConn`] its statements run in: `query.execute(&mut value)`.
macro_rules! executor_over_tx {
    ($ty:ty, $($tx:ident).+) => {
        impl<'c> ::sqlx::Executor<'c> for &'c mut $ty {
            type Database = ::sqlx::Postgres;

            fn fetch_many<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> ::futures_core::stream::BoxStream<
                'e,
                Result<
                    ::sqlx::Either<::sqlx::postgres::PgQueryResult, ::sqlx::postgres::PgRow>,
                    ::sqlx::Error,
                >,
            >
            where
                'c: 'e,
                E: 'q + ::sqlx::Execute<'q, ::sqlx::Postgres>,
            {
                ::sqlx::Executor::fetch_many(self.$($tx).+.conn(), query)
            }

            fn fetch_optional<'e, 'q: 'e, E>(
                self,
                query: E,
            ) -> ::futures_core::future::BoxFuture<
                'e,
                Result<Option<::sqlx::postgres::PgRow>, ::sqlx::Error>,
            >
            where
                'c: 'e,
                E: 'q + ::sqlx::Execute<'q, ::sqlx::Postgres>,
            {
                ::sqlx::Executor::fetch_optional(self.$($tx).+.conn(), query)
            }

            fn prepare_with<'e>(
                self,
                sql: ::sqlx::SqlStr,
                parameters: &'e [::sqlx::postgres::PgTypeInfo],
            ) -> ::futures_core::future::BoxFuture<
                'e,
                Result<::sqlx::postgres::PgStatement, ::sqlx::Error>,
            >
            where
                'c: 'e,
            {
                ::sqlx::Executor::prepare_with(self.$($tx).+.conn(), sql, parameters)
            }

            fn describe<'e>(
                self,
                sql: ::sqlx::SqlStr,
            ) -> ::futures_core::future::BoxFuture<
                'e,
                Result<::sqlx::Describe<::sqlx::Postgres>, ::sqlx::Error>,
            >
            where
                'c: 'e,
            {
                ::sqlx::Executor::describe(self.$($tx).+.conn(), sql)
            }
        }
    };
}
pub(crate) use executor_over_tx;
