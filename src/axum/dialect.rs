//! How a layer speaks to its clients: which problems it answers and what its replay
//! headers are called.

use http::HeaderName;

use crate::problem::{ProblemCatalogue, ProblemKind, Situation};

/// `Idempotent-Replayed: true` marks a replayed response (the default dialect).
pub const IDEMPOTENT_REPLAYED_HEADER: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `Idempotent-Replay-Of: <request id>` names the request whose stored response a replay
/// carries (absent when the response was stored without a request id). The replay's own
/// request id stays in the request id header (the default dialect).
pub const IDEMPOTENT_REPLAY_OF_HEADER: HeaderName = HeaderName::from_static("idempotent-replay-of");

/// `Idempotent-Replay: omitted` marks a replay whose body was over the stored-response
/// cap and was not stored (the default dialect).
pub const IDEMPOTENT_REPLAY_HEADER: HeaderName = HeaderName::from_static("idempotent-replay");

/// How an [`IdempotencyLayer`](super::IdempotencyLayer) speaks to clients: the
/// [`ProblemCatalogue`] of its own answers, and the names of the headers that mark a
/// replay.
///
/// | | [`seed`](Self::seed) (default) | [`ietf`](Self::ietf) |
/// |---|---|---|
/// | key reused with another request | 409 `idempotency_conflict` | 422 `fingerprint-mismatch` |
/// | key still in flight | 409 `idempotency_key_in_use` | 409 `request-in-flight` |
/// | key missing / malformed | 400 `idempotency_key_missing` / `idempotency_key_invalid` | 400 `missing-key` / `invalid-key` |
/// | replay marker | `Idempotent-Replayed: true` | `Idempotency-Replayed: true` |
/// | first request of a replay | `Idempotent-Replay-Of` | `Idempotency-Replay-Of` |
/// | body over the cap, omitted | `Idempotent-Replay: omitted` | `Idempotency-Replay: omitted` |
///
/// Behaviour is the same in both: what is stored, replayed, refused and when.
///
/// ```
/// use pg_idempotency::axum::Dialect;
/// use pg_idempotency::{ProblemCatalogue, ProblemKind, Situation};
///
/// // The IETF draft's statuses and headers, with one code of the API's own.
/// let conflict = *ProblemCatalogue::ietf().kind(Situation::Conflict);
/// let dialect = Dialect::ietf()
///     .with_problem(Situation::Conflict, ProblemKind { code: "key_reused", ..conflict });
/// assert_eq!(dialect.catalogue().kind(Situation::Conflict).status, 422);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialect {
    catalogue: ProblemCatalogue,
    replayed: HeaderName,
    replay_of: HeaderName,
    replay: HeaderName,
}

impl Default for Dialect {
    /// [`Dialect::seed`].
    fn default() -> Self {
        Self::seed()
    }
}

impl Dialect {
    /// The error specification this crate follows by default
    /// ([`ProblemCatalogue::seed`], `Idempotent-*` headers).
    pub fn seed() -> Self {
        Self {
            catalogue: ProblemCatalogue::seed(),
            replayed: IDEMPOTENT_REPLAYED_HEADER,
            replay_of: IDEMPOTENT_REPLAY_OF_HEADER,
            replay: IDEMPOTENT_REPLAY_HEADER,
        }
    }

    /// The IETF draft (draft-ietf-httpapi-idempotency-key-header) and its peers
    /// ([`ProblemCatalogue::ietf`], `Idempotency-*` headers).
    pub fn ietf() -> Self {
        Self {
            catalogue: ProblemCatalogue::ietf(),
            replayed: HeaderName::from_static("idempotency-replayed"),
            replay_of: HeaderName::from_static("idempotency-replay-of"),
            replay: HeaderName::from_static("idempotency-replay"),
        }
    }

    /// Answers `situation` with `kind` (builder style).
    #[must_use]
    pub fn with_problem(mut self, situation: Situation, kind: ProblemKind) -> Self {
        self.catalogue = self.catalogue.with(situation, kind);
        self
    }

    /// Uses `catalogue` for every situation (builder style).
    #[must_use]
    pub fn with_catalogue(mut self, catalogue: ProblemCatalogue) -> Self {
        self.catalogue = catalogue;
        self
    }

    /// Names the replay headers: the marker (`true`), the first request's id, and the
    /// omitted-body marker (`omitted`), in that order (builder style).
    #[must_use]
    pub fn with_replay_headers(
        mut self,
        replayed: HeaderName,
        replay_of: HeaderName,
        replay: HeaderName,
    ) -> Self {
        self.replayed = replayed;
        self.replay_of = replay_of;
        self.replay = replay;
        self
    }

    /// The kinds of the layer's own problems.
    pub fn catalogue(&self) -> &ProblemCatalogue {
        &self.catalogue
    }

    /// The header that marks a replay, with the value `true`.
    pub fn replayed_header(&self) -> &HeaderName {
        &self.replayed
    }

    /// The header that names the request whose response a replay carries.
    pub fn replay_of_header(&self) -> &HeaderName {
        &self.replay_of
    }

    /// The header that says, with the value `omitted`, that a replay's body was not
    /// stored.
    pub fn replay_header(&self) -> &HeaderName {
        &self.replay
    }

    /// Whether `name` is one of this dialect's replay headers (never stored with a
    /// response: a replay adds its own).
    pub(crate) fn is_replay_header(&self, name: &HeaderName) -> bool {
        *name == self.replayed || *name == self.replay_of || *name == self.replay
    }
}
