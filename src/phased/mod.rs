//! Phased requests: exactly-once across external calls.
//!
//! A [transactional claim](crate::Claim) makes exactly-once whatever a handler writes in
//! one transaction. A request that also calls another system (a card processor, a mail
//! service) cannot hold that transaction open across the call: a crash after the call and
//! before `COMMIT` would free the key, and the retry would call again. A phased request
//! instead commits its progress step by step:
//!
//! - a **local step** ([`Steps::local`]) runs in a transaction of its own and commits its
//!   writes together with its output (the *recovery point* it reaches);
//! - a **foreign step** ([`Steps::foreign`]) runs outside any transaction and gets a
//!   [downstream key](Steps::downstream_key) that names this request and this step, the
//!   same on every attempt of the request and different for any other request, so that
//!   the other system can dedupe a repeated call; its output is recorded as soon as it
//!   returns;
//! - the **final step** ([`Steps::finish`]) writes what it writes and stores the response
//!   in `idempotency_keys`, in one transaction; retries replay it as they replay any
//!   stored response.
//!
//! A retry (or the [`Completer`], for clients that never come back) that takes over an
//! abandoned request runs the [`Operation`] again from the top: every step whose output
//! is recorded returns that output without running, so the request resumes after its
//! last recovery point. The code between steps must therefore be deterministic given the
//! input and the step outputs.
//!
//! **One holder at a time.** The holder has a lease ([`Config::with_lease`](crate::Config::with_lease)),
//! renewed by each step. A duplicate that arrives meanwhile waits (bounded by
//! [`Config::in_flight_wait`](crate::Config::in_flight_wait), polling without holding a
//! connection) and then replays or gets [`Error::InFlight`](crate::Error::InFlight). After the lease runs out a
//! retry or the completer takes the request over, and the old holder can record nothing
//! more: every record is fenced by the lease token ([`Error::LeaseLost`](crate::Error::LeaseLost)).
//!
//! ```no_run
//! use pg_idempotency::phased::{Finished, Operation, Steps};
//! use pg_idempotency::{Error, StoredResponse};
//! use serde::{Deserialize, Serialize};
//!
//! struct Charge;
//!
//! #[derive(Serialize, Deserialize)]
//! struct ChargeInput { account: String, amount: i64 }
//!
//! impl Operation for Charge {
//!     const NAME: &'static str = "charge";
//!     type Input = ChargeInput;
//!     type Error = anyhow::Error;
//!
//!     async fn run(&self, input: &ChargeInput, steps: &mut Steps) -> anyhow::Result<Finished> {
//!         let id: i64 = steps
//!             .local("record_charge", async |tx| {
//!                 let row: (i64,) = sqlx::query_as(
//!                     "INSERT INTO charges (account, amount) VALUES ($1, $2) RETURNING id",
//!                 )
//!                 .bind(&input.account)
//!                 .bind(input.amount)
//!                 .fetch_one(&mut *tx)
//!                 .await?;
//!                 Ok::<_, anyhow::Error>(row.0)
//!             })
//!             .await?;
//!         let processor_id: String = steps
//!             .foreign("call_processor", async |downstream_key| {
//!                 // e.g. POST /charge with `Idempotency-Key: {downstream_key}`
//!                 Ok::<_, anyhow::Error>(format!("ch_{downstream_key}"))
//!             })
//!             .await?;
//!         steps
//!             .finish(async |tx| {
//!                 sqlx::query("UPDATE charges SET processor_id = $1 WHERE id = $2")
//!                     .bind(&processor_id)
//!                     .bind(id)
//!                     .execute(&mut *tx)
//!                     .await?;
//!                 Ok::<_, anyhow::Error>(StoredResponse::new(201, format!(r#"{{"id":{id}}}"#)))
//!             })
//!             .await
//!     }
//! }
//! ```
//!
//! Run it with [`IdempotencyStore::run_phased`](crate::IdempotencyStore::run_phased), or
//! [`IdempotencyStore::begin_phased`](crate::IdempotencyStore::begin_phased) and
//! [`PhasedClaim::run`]; over HTTP with
//! [`IdempotencyLayer::phased`](crate::axum::IdempotencyLayer::phased).
//!
//! A response that the [`StorePolicy`](crate::StorePolicy) does not keep (5xx by default)
//! rolls back the final step only: the steps before it stay committed, the request stays
//! in progress, and a retry or the completer resumes it after its last recovery point.

mod claim;
mod completer;
mod lease;
mod operation;
mod standbys;
mod steps;

pub use claim::PhasedClaim;
pub use completer::{Completer, CompleterOptions, CompleterPass, CompleterTask};
pub use operation::Operation;
pub use steps::{Finished, StepTx, Steps};
