//! The database room: every byte the hot path puts on the wire, and how it reads the
//! answers.
//!
//! - [`statement`]: [`Statement`](statement::Statement), the only form in which hand-built SQL exists. It is
//!   made from constant text and encoded literals by a builder that only this module can
//!   use, so no runtime string ever becomes SQL text;
//! - [`hot_path`]: the claim and completion statements, the server-side prepared
//!   statements behind them, the decoding of their rows, and [`prepare_connection`];
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
pub(crate) use hot_path::{Committed, Found, KeyRow, StoredRow};
pub(crate) use tx::{TxConn, executor_over_tx};
