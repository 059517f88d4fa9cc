//! What a request's key answers: a claim or a replay when it begins, what happened to its
//! response when it ends.

use std::fmt;

use chrono::{DateTime, Utc};

use crate::provenance::Provenance;
use crate::response::StoredResponse;

/// What beginning a request found: the key is yours, or it already has this request's
/// response.
///
/// [`IdempotencyStore::begin`](crate::IdempotencyStore::begin) yields a
/// `Begin<`[`Claim`](crate::Claim)`>`, and
/// [`IdempotencyStore::begin_phased`](crate::IdempotencyStore::begin_phased) a
/// `Begin<`[`PhasedClaim`](crate::phased::PhasedClaim)`>`.
#[derive(Debug)]
#[must_use = "a claim must be completed, and a replay answered"]
pub enum Begin<C> {
    /// The key is yours: do the business writes through the claim, then complete it.
    Claimed(C),
    /// The key already has a response for this same request: answer with it, and do not
    /// run the business logic again.
    Replay(Replay),
}

/// A stored response, replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The response, exactly as stored.
    pub response: StoredResponse,
    /// When the key was first used (database clock).
    pub first_used_at: DateTime<Utc>,
    /// The request that produced the response (empty for rows stored without one).
    pub first_request: Provenance,
}

/// What [`IdempotencyStore::run`](crate::IdempotencyStore::run) and
/// [`IdempotencyStore::run_phased`](crate::IdempotencyStore::run_phased) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The business logic ran; `stored` says whether its response was kept (otherwise
    /// it was rolled back and the key freed, see [`Completion::RolledBack`]).
    Executed {
        /// The response the business logic produced.
        response: StoredResponse,
        /// Whether the response was stored and the business write committed.
        stored: bool,
    },
    /// The response of an earlier run of the same request.
    Replayed(Replay),
}

impl Outcome {
    /// The response to send.
    pub fn response(&self) -> &StoredResponse {
        match self {
            Outcome::Executed { response, .. } => response,
            Outcome::Replayed(replay) => &replay.response,
        }
    }

    /// The response to send, by value.
    pub fn into_response(self) -> StoredResponse {
        match self {
            Outcome::Executed { response, .. } => response,
            Outcome::Replayed(replay) => replay.response,
        }
    }

    /// Whether this is a replay.
    pub fn is_replay(&self) -> bool {
        matches!(self, Outcome::Replayed(_))
    }
}

/// What completing a claim did with the response
/// ([`Claim::complete`](crate::Claim::complete),
/// [`PhasedClaim::finish`](crate::phased::PhasedClaim::finish)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The response is stored and the business write committed with it.
    Stored,
    /// The store policy does not keep this status: the business write was rolled back
    /// and the key is free for a retry.
    RolledBack,
}

/// What happened to a response whose connection broke around `COMMIT`
/// ([`Error::CommitInterrupted`](crate::Error::CommitInterrupted)), as found out on
/// another connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommitOutcome {
    /// The business write and the response are committed: answer with this response.
    ///
    /// It is the one this claim stored; or, if this claim's transaction rolled back and
    /// another request with the same key and the same request completed before the store
    /// looked, that request's, which is what a retry would replay.
    Stored(Box<Replay>),
    /// Nothing of this claim was committed: the business write rolled back and the key
    /// is free (unless another request has taken it since). The request can be retried
    /// with the same key.
    NotStored,
    /// The old transaction still held the key's lock when
    /// [`Config::commit_resolution_wait`](crate::Config::commit_resolution_wait) passed:
    /// its backend cannot be reached or is still committing. A retry with the same key
    /// later answers with the stored response or runs afresh.
    Unknown,
}

impl CommitOutcome {
    /// The outcome's name in spans and metrics: `stored`, `not_stored` or `unknown`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            CommitOutcome::Stored(_) => "stored",
            CommitOutcome::NotStored => "not_stored",
            CommitOutcome::Unknown => "unknown",
        }
    }
}

impl fmt::Display for CommitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommitOutcome::Stored(_) => "it was committed and its response is stored",
            CommitOutcome::NotStored => "nothing was committed and the key is free",
            CommitOutcome::Unknown => {
                "whether it was committed is unknown: the old transaction still held the key \
                 when the resolution wait passed"
            }
        })
    }
}
