//! Metrics, through the [`metrics`] facade: install any recorder (Prometheus, StatsD, …)
//! in the application and these appear. No recorder, no cost beyond a few atomic loads.
//!
//! | name | kind | what |
//! |---|---|---|
//! | `pg_idempotency_claims_total` | counter | keys claimed: the business logic ran |
//! | `pg_idempotency_replays_total` | counter | stored responses replayed |
//! | `pg_idempotency_conflicts_total` | counter | keys reused with another request (409) |
//! | `pg_idempotency_in_flight_total` | counter | duplicates that gave up waiting (409 + Retry-After) |
//! | `pg_idempotency_polls_total` | counter | duplicates' looks again at a key that another request held at their first look, a transaction each; one duplicate per key and process looks for the others |
//! | `pg_idempotency_connections_passed_total` | counter | connections passed with a place straight from a request that ended its transaction to one waiting for a place, without going back to the pool (under load) |
//! | `pg_idempotency_policy_rollbacks_total` | counter | responses the store policy did not keep (rolled back, key freed) |
//! | `pg_idempotency_commit_resolutions_total` | counter | commits whose connection broke, by what the store found out (`outcome`: `stored`, `not_stored`, `unknown`) |
//! | `pg_idempotency_swept_rows_total` | counter | expired rows deleted by sweeps |
//! | `pg_idempotency_standby_confirmations_total` | counter | phased holders' waits for their standbys before an external call, by how they ended (`outcome`: `confirmed`, `behind`, `hidden`, `lease_lost`) |
//! | `pg_idempotency_claim_seconds` | histogram | latency of `begin` (claim, replay or refusal) |
//! | `pg_idempotency_complete_seconds` | histogram | latency of `complete` (store + commit) |
//! | `pg_idempotency_place_wait_seconds` | histogram | how long a request waited for its place among the pool's connections (its scope's share, then the pool), whether it got one or gave up: long waits say the pool or the scope share is too small for the load; short ones while answers are slow say the time goes elsewhere (the server, the CPU) |
//! | `pg_idempotency_response_bytes` | histogram | body size of stored responses |

use std::time::Duration;

/// Keys claimed.
pub const CLAIMS: &str = "pg_idempotency_claims_total";
/// Stored responses replayed.
pub const REPLAYS: &str = "pg_idempotency_replays_total";
/// Keys reused with another request.
pub const CONFLICTS: &str = "pg_idempotency_conflicts_total";
/// Duplicates that gave up waiting for the request holding their key.
pub const IN_FLIGHT: &str = "pg_idempotency_in_flight_total";
/// Duplicates' looks again at a held key.
pub const POLLS: &str = "pg_idempotency_polls_total";
/// Connections passed from one request to the next without going back to the pool.
pub const CONNECTIONS_PASSED: &str = "pg_idempotency_connections_passed_total";
/// Responses the store policy did not keep.
pub const POLICY_ROLLBACKS: &str = "pg_idempotency_policy_rollbacks_total";
/// Commits whose connection broke, resolved on another connection; label `outcome`.
pub const COMMIT_RESOLUTIONS: &str = "pg_idempotency_commit_resolutions_total";
/// Expired rows deleted by sweeps.
pub const SWEPT_ROWS: &str = "pg_idempotency_swept_rows_total";
/// Phased holders' waits for their standbys; label `outcome`.
pub const STANDBY_CONFIRMATIONS: &str = "pg_idempotency_standby_confirmations_total";
/// Latency of `begin`, in seconds.
pub const CLAIM_SECONDS: &str = "pg_idempotency_claim_seconds";
/// Latency of `complete`, in seconds.
pub const COMPLETE_SECONDS: &str = "pg_idempotency_complete_seconds";
/// How long a request waited for its place among the pool's connections, in seconds.
pub const PLACE_WAIT_SECONDS: &str = "pg_idempotency_place_wait_seconds";
/// Body size of stored responses, in bytes.
pub const RESPONSE_BYTES: &str = "pg_idempotency_response_bytes";

pub(crate) fn count(name: &'static str, n: u64) {
    metrics::counter!(name).increment(n);
}

pub(crate) fn count_labeled(name: &'static str, label: &'static str, value: &'static str) {
    metrics::counter!(name, label => value).increment(1);
}

pub(crate) fn time(name: &'static str, elapsed: Duration) {
    metrics::histogram!(name).record(elapsed.as_secs_f64());
}

pub(crate) fn size(name: &'static str, bytes: usize) {
    metrics::histogram!(name).record(bytes as f64);
}
