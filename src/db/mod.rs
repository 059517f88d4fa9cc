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
//!   which runs only `Statement`s and never goes back to the pool inside a transaction.
//!
//! Statements off the hot path (operator queries, the sweeper, connection preparation)
//! are `sqlx::query!` macros beside the code that runs them, checked against the
//! committed `.sqlx/` at build time.

mod hot_path;
mod statement;
mod tx;

pub use hot_path::prepare_connection;
pub(crate) use hot_path::{ExpiredRow, Found, KeyRow, StoredRow, Window, key_taken};
pub(crate) use tx::{TxConn, executor_over_tx};

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
