//! The library's error type.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};

use crate::key::{IdempotencyKey, KeyError};
use crate::outcome::CommitOutcome;
use crate::provenance::Provenance;
use crate::scope::{Scope, ScopeError};

/// Everything that can go wrong in this crate.
///
/// The first variants are client errors: [`Problems::for_error`](crate::Problems::for_error)
/// turns them into the `application/problem+json` body a client should get. The rest are
/// server-side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key was used within the replay window with a different request.
    #[error(
        "key '{key}' in scope '{scope}' was used at {} with a different request; \
         use a new key for a new operation, or resend the original request to get its response",
        .first_used_at.to_rfc3339_opts(SecondsFormat::Secs, true)
    )]
    Conflict {
        /// The scope the key lives in.
        scope: Scope,
        /// The key.
        key: IdempotencyKey,
        /// When the key was first used (database clock).
        first_used_at: DateTime<Utc>,
        /// The request that first used it (empty for rows stored without one).
        first_request: Provenance,
    },

    /// Another request holding the key did not finish within the configured wait.
    #[error(
        "a request with key '{key}' in scope '{scope}' is still in flight; retry after {} s",
        .retry_after.as_secs().max(1)
    )]
    InFlight {
        /// The scope the key lives in.
        scope: Scope,
        /// The key.
        key: IdempotencyKey,
        /// How long the client should wait before retrying.
        retry_after: Duration,
    },

    /// The connection broke around `COMMIT` in [`Claim::complete`](crate::Claim::complete)
    /// (the reply was lost, or the server ended the session): the store then found out on
    /// another connection, within
    /// [`Config::commit_resolution_wait`](crate::Config::commit_resolution_wait), what had
    /// happened. `outcome` says whether the business write and its response are stored,
    /// were rolled back, or (only when the wait passed) is unknown.
    #[error("the connection broke while committing key '{key}' in scope '{scope}'; {outcome}")]
    CommitInterrupted {
        /// The scope the key lives in.
        scope: Scope,
        /// The key.
        key: IdempotencyKey,
        /// What the store found out.
        outcome: CommitOutcome,
        /// How the connection broke.
        #[source]
        source: sqlx::Error,
    },

    /// The key is not acceptable under the key policy.
    #[error(transparent)]
    InvalidKey(#[from] KeyError),

    /// The scope is not acceptable.
    #[error(transparent)]
    InvalidScope(#[from] ScopeError),

    /// The application tried to store a response whose status is not `100..=599`.
    #[error("response status {0} is not a valid status (100..=599); fix the handler")]
    InvalidStatus(u16),

    /// The stored row was fingerprinted by an algorithm this build does not know (a newer
    /// release wrote it). Upgrade every node to the same release.
    #[error(
        "the stored fingerprint uses version {version}, which this build of pg-idempotency \
         does not know; upgrade every node to the same release"
    )]
    UnknownFingerprintVersion {
        /// The stored version.
        version: i16,
    },

    /// A stored row could not be read back (it was not written by this crate).
    #[error("the stored row for an idempotency key is malformed: {0}")]
    MalformedRow(String),

    /// The holder of a [phased request](crate::phased) lost it: its lease ran out and a
    /// retry or the completer took the request over. The step in progress was rolled
    /// back (or its result not recorded); the new holder carries on.
    #[error(
        "the phased request with key '{key}' in scope '{scope}' was taken over by another \
         holder after this one's lease ran out; this holder must stop (make the lease longer \
         than the slowest step)"
    )]
    LeaseLost {
        /// The scope the key lives in.
        scope: Scope,
        /// The key.
        key: IdempotencyKey,
    },
    /// A phased request's step was named twice in one run, or the request was started
    /// by another operation than the one that resumes it: a bug in the application.
    #[error("phased request misuse: {0}")]
    PhaseMisuse(String),
    /// A phased request's input or a step's output could not be converted to or from
    /// JSON, in which form it is recorded.
    #[error("the {what} of a phased request cannot be recorded as JSON: {source}")]
    PhaseData {
        /// What: `input`, or `output of step '<name>'`.
        what: String,
        /// The serde error.
        source: serde_json::Error,
    },
    /// No pooled connection was free for the request within
    /// [`Config::connection_wait`](crate::Config::connection_wait) of its start (see
    /// [`IdempotentRequest::with_waits_from`](crate::IdempotentRequest::with_waits_from)):
    /// the pool is exhausted. Nothing was done; the client may retry after `retry_after`.
    #[error(
        "no database connection was free for a request in scope '{scope}' within {waited:?}: \
         the pool is exhausted (answer 503 with Retry-After; give the pool more connections \
         or make the handlers that hold them faster)"
    )]
    NoConnection {
        /// The scope of the request.
        scope: Scope,
        /// How long it waited, from its start when it was taking its key.
        waited: std::time::Duration,
        /// How long the client should wait before retrying.
        retry_after: std::time::Duration,
    },
    /// Fewer standbys than [`Config::with_standby_confirmation`](crate::Config::with_standby_confirmation)
    /// asks for had flushed a phased request's row within the wait: no external call was
    /// made, and the request was released. The client may retry after `retry_after`.
    #[error(
        "{confirmed} of the {wanted} standbys asked for had the phased request with key \
         '{key}' in scope '{scope}' after {waited:?}; the external call was not made (answer \
         503 with Retry-After; check pg_stat_replication for a standby that is down or \
         lagging)"
    )]
    StandbysBehind {
        /// The scope the key lives in.
        scope: Scope,
        /// The key.
        key: IdempotencyKey,
        /// How many standbys had the request's row.
        confirmed: u32,
        /// How many were asked for.
        wanted: u32,
        /// How long it waited.
        waited: std::time::Duration,
        /// How long the client should wait before retrying.
        retry_after: std::time::Duration,
    },
    /// [`Config::with_standby_confirmation`](crate::Config::with_standby_confirmation) is
    /// set, but the database role cannot see the standbys' positions in
    /// `pg_stat_replication`: a configuration error.
    #[error(
        "{hidden} standby position(s) in pg_stat_replication are hidden from this database \
         role, so a phased request cannot wait for its standbys; grant the role pg_monitor \
         (or pg_read_all_stats), or turn standby confirmation off"
    )]
    StandbysHidden {
        /// How many `pg_stat_replication` rows showed no position.
        hidden: u32,
    },
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),

    /// The database's encoding cannot hold the crate's text: [`migrate`](crate::migrate)
    /// refuses it before anything fails at run time.
    #[error(
        "the database's encoding is {encoding}, which cannot hold every scope, key and header \
         the idempotency store keeps; create the database with ENCODING 'UTF8'"
    )]
    UnsupportedEncoding {
        /// The database's `server_encoding`, e.g. `SQL_ASCII`.
        encoding: String,
    },

    /// Applying this crate's migrations failed.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl Error {
    /// Whether the client caused this error (it gets a 4xx answer and changed nothing).
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::Conflict { .. }
                | Self::InFlight { .. }
                | Self::InvalidKey(_)
                | Self::InvalidScope(_)
        )
    }
}
