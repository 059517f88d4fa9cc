//! # pg-idempotency
//!
//! Exactly-once writes over PostgreSQL with sqlx. Clients retry, replies get lost after a
//! commit, and two copies of one request arrive at once; a service that charges a card
//! must do it once, answer every retry with the same response, and refuse a retry whose
//! body changed.
//!
//! An `idempotency_keys` row — the dedupe key `(scope, key)`, the request's SHA-256
//! fingerprint and the response (status, headers, body) — is written **in the same
//! transaction as the business write**: both commit or neither does.
//!
//! - [`IdempotencyStore::begin`] opens the transaction and claims the key in one round
//!   trip, and yields a [`Claim`] (run the business logic through it) or a [`Replay`] of
//!   the stored response; a request with another body gets [`Error::Conflict`], a
//!   duplicate that arrives while the first is still running waits a bounded time
//!   (without holding a pooled connection) and then replays or gets [`Error::InFlight`].
//! - [`Claim::complete`] stores the response (as bound parameters, so that it never
//!   reaches the server's log) and commits, in two round trips. Dropping or
//!   aborting the claim rolls back and frees the key; so does a response the
//!   [`StorePolicy`] does not keep (5xx, 408, 429 by default).
//! - Keys expire after 24 hours ([`Config::with_ttl`]); an expired key counts as unused.
//!   [`Sweeper`] deletes expired rows in the background.
//! - Every client-facing error has an RFC 9457 [`Problem`] body
//!   ([`Problems::for_error`]).
//!
//! ## Quick start
//!
//! ```no_run
//! use pg_idempotency::{Begin, IdempotencyStore, IdempotentRequest, Scope, StoredResponse};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let pool = sqlx::PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
//! pg_idempotency::migrate(&pool).await?;
//! let store = IdempotencyStore::new(pool);
//!
//! // From the HTTP request: who is asking, their Idempotency-Key, and what they sent.
//! let scope = Scope::new("acct_42")?;
//! let key = store.parse_key("6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60")?;
//! let body = br#"{"amount":1000,"currency":"EUR"}"#;
//! let request = IdempotentRequest::new("POST", "/v1/payments", body);
//!
//! let response = match store.begin(&scope, &key, &request).await? {
//!     Begin::Replay(replay) => replay.response, // same request seen before: same answer
//!     Begin::Claimed(mut claim) => {
//!         sqlx::query("INSERT INTO payments (account, amount) VALUES ($1, $2)")
//!             .bind(scope.as_str())
//!             .bind(1000_i64)
//!             .execute(&mut claim) // the business write, inside the claim's transaction
//!             .await?;
//!         let response = StoredResponse::new(201, r#"{"status":"paid"}"#)
//!             .with_header("content-type", "application/json");
//!         claim.complete(&response).await?; // store the response + COMMIT, together
//!         response
//!     }
//! };
//! # let _ = response;
//! # Ok(())
//! # }
//! ```
//!
//! A different body with the same key fails with [`Error::Conflict`], whose
//! [problem](Problems::for_error) is the 409 `idempotency_conflict` answer.
//!
//! ## Migrations
//!
//! The schema lives in this crate's `migrations/`. Apply it with [`migrate`] (or
//! [`MIGRATOR`]), which records its history in its own table,
//! `_pg_idempotency_migrations`, so it never mixes with the application's
//! `_sqlx_migrations`; or copy the files into the application's own `migrations/` and let
//! `sqlx migrate run` apply them.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// The README's code blocks, compiled as doctests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod admin;
#[cfg(feature = "axum")]
pub mod axum;
mod claim;
mod config;
mod db;
mod engine;
mod error;
mod fingerprint;
mod key;
pub mod metrics;
mod outcome;
pub mod phased;
mod problem;
mod provenance;
mod response;
mod schema;
mod scope;
mod store;
mod sweeper;
#[cfg(feature = "testing")]
pub mod testing;

pub use claim::Claim;
pub use config::Config;
pub use db::prepare_connection;
pub use error::Error;
pub use fingerprint::{Fingerprint, IdempotentRequest};
pub use key::{IdempotencyKey, KeyError, KeyPolicy};
pub use outcome::{Begin, CommitOutcome, Completion, Outcome, Replay};
pub use problem::{
    IDEMPOTENCY_KEY_HEADER, Problem, ProblemCatalogue, ProblemKind, Problems, Situation,
};
pub use provenance::Provenance;
pub use response::{StorePolicy, StoredResponse};
pub use schema::{MIGRATOR, migrate};
pub use scope::{Scope, ScopeError};
pub use store::IdempotencyStore;
pub use sweeper::{SweepOptions, Sweeper, delete_expired, sweep};
