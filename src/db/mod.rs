//! The database room: every byte the hot path puts on the wire, and how it reads the
//! answers.
//!
//! - [`statement`]: [`Statement`](statement::Statement), the only form in which hand-built SQL exists. It is
//!   made from constant text and encoded literals by a builder that only this module can
//!   use, so no runtime string ever becomes SQL text;
//! - [`hot_path`]: the claim and completion statements (and the final step of a phased
//!   request), the server-side prepared statements behind them, the decoding of their
//!   rows, and [`prepare_connection`];
//! - [`tx`]: [`TxConn`], the pooled connection inside a transaction this crate opened,
//!   which runs only `Statement`s and never goes back to the pool inside a transaction;
//! - [`shares`]: the pool's places, each scope's share of them, and how a connection
//!   passes with its place from a request done with it to the next one waiting.
//!
//! Statements off the hot path (operator queries, the sweeper, connection preparation)
//! are `sqlx::query!` macros beside the code that runs them, checked against the
//! committed `.sqlx/` at build time.

mod hot_path;
mod shares;
mod statement;
mod tx;

pub use hot_path::prepare_connection;
pub(crate) use hot_path::{ExpiredRow, Found, KeyRow, StoredRow, Window, key_taken};
pub(crate) use shares::{Place, Shares};
pub(crate) use tx::{TxConn, executor_over_tx};

use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;
use sqlx::{Acquire as _, PgConnection, PgPool};

use crate::error::Error;

/// Runs `f` on a pooled connection inside a transaction of its own, committed if `f`
/// succeeds (two more round trips: `BEGIN`, `COMMIT`).
///
/// For every statement with bound parameters (and every `query!`) sent outside a
/// transaction this crate opened: sqlx sends such a statement as two exchanges (`Parse`
/// and `Describe`, then `Bind` and `Execute`, each ending with `Sync`), and between them a
/// pooler in transaction mode may hand the connection's next exchange to another server
/// connection. Inside a transaction, it keeps one server connection for all of them.
pub(crate) async fn in_transaction<T>(
    pool: &PgPool,
    f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    in_transaction_on(pool.acquire().await?, f).await
}

/// [`in_transaction`] on a connection already taken from the pool.
pub(crate) async fn in_transaction_on<T>(
    mut conn: PoolConnection<Postgres>,
    f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut tx = conn.begin().await?;
    let value = f(&mut tx).await?;
    tx.commit().await?;
    Ok(value)
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
