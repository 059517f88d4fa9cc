//! RFC 9457 problem details for every client-facing outcome.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::key::IdempotencyKey;

/// The default name of the header that carries idempotency keys (see [`Problems`]).
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// A problem details object (RFC 9457), served as `application/problem+json`.
///
/// It has exactly these fields: `type`, `title`, `status`, `detail`, `code`,
/// `advice_code`, `param` and `request_id` (`null` when there is none). Make one with
/// [`Problems`]: from a client error with [`Problems::for_error`], or with its
/// constructors.
///
/// ```
/// use pg_idempotency::{IdempotencyKey, Problems};
///
/// let key: IdempotencyKey = "550e8400-e29b-41d4-a716-446655440000".parse().unwrap();
/// let at = "2026-05-14T14:32:01Z".parse().unwrap();
/// let problem = Problems::new("https://zyins.isaapi.com/errors/")
///     .conflict(&key, at, None)
///     .with_request_id("req_01HZK2N5GQR9T8X4B6FJW3Y1AS");
/// assert_eq!(problem.status, 409);
/// assert_eq!(
///     problem.detail,
///     "Idempotency-Key '550e8400-e29b-41d4-a716-446655440000' was used at \
///      2026-05-14T14:32:01Z with a different request body."
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// A URI reference naming the problem type: the [`Problems`] type base + a slug.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// A short, human-readable summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// A human-readable explanation of this occurrence.
    pub detail: String,
    /// A stable, machine-readable error code, e.g. `idempotency_conflict`.
    pub code: String,
    /// A stable, machine-readable hint of what the client should do.
    pub advice_code: String,
    /// The request parameter (header or field) at fault, if any.
    pub param: Option<String>,
    /// The identifier of the request, for support.
    pub request_id: Option<String>,
    /// How long the client should wait before retrying (HTTP `Retry-After`); not part of
    /// the JSON body.
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

impl Problem {
    /// The media type of the serialized body.
    pub const CONTENT_TYPE: &'static str = "application/problem+json";

    /// Sets `param` (builder style).
    #[must_use]
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets `request_id` (builder style).
    #[must_use]
    pub fn with_request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings and integers into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// How one API spells its problems: the base of their `type` URIs, the name of the header
/// that carries idempotency keys, and the [`ProblemCatalogue`] that gives each situation
/// its status, code and title. Every [`Problem`] is made through one.
///
/// The store knows nothing of either: its errors speak of keys and requests, and whoever
/// answers the client (the [`axum` layer](crate::axum), or the application) turns them
/// into problems with [`Problems::for_error`].
///
/// ```
/// use pg_idempotency::Problems;
///
/// let problems = Problems::new("https://api.example.com/errors/").with_key_header("X-Idem-Key");
/// let missing = problems.key_missing();
/// assert_eq!(missing.type_uri, "https://api.example.com/errors/idempotency-key-missing");
/// assert_eq!(missing.param.as_deref(), Some("X-Idem-Key"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems {
    type_base: String,
    key_header: String,
    catalogue: ProblemCatalogue,
}

impl Default for Problems {
    /// Types under `/problems/`, keys in `Idempotency-Key`.
    fn default() -> Self {
        Self::new("/problems/")
    }
}

impl Problems {
    /// Problems whose `type` is `type_base` + a slug, e.g. `https://api.example.com/errors/`
    /// gives `https://api.example.com/errors/idempotency-conflict`; keys are named
    /// `Idempotency-Key`.
    pub fn new(type_base: impl Into<String>) -> Self {
        Self {
            type_base: type_base.into(),
            key_header: IDEMPOTENCY_KEY_HEADER.to_owned(),
            catalogue: ProblemCatalogue::seed(),
        }
    }

    /// Answers each [`Situation`] with the kind `catalogue` names (builder style); the
    /// default is [`ProblemCatalogue::seed`].
    #[must_use]
    pub fn with_catalogue(mut self, catalogue: ProblemCatalogue) -> Self {
        self.catalogue = catalogue;
        self
    }

    /// The kinds of problem each situation is answered with.
    pub fn catalogue(&self) -> &ProblemCatalogue {
        &self.catalogue
    }

    /// Names the key header `header` in details and `param` (builder style).
    #[must_use]
    pub fn with_key_header(mut self, header: impl Into<String>) -> Self {
        self.key_header = header.into();
        self
    }

    /// The base of `type` URIs.
    pub fn type_base(&self) -> &str {
        &self.type_base
    }

    /// The key header's name, as problems spell it.
    pub fn key_header(&self) -> &str {
        &self.key_header
    }

    /// A problem of `kind` that says `detail`; the kind's slug is appended to the type
    /// base to form `type`. For the application's own problems:
    ///
    /// ```
    /// use pg_idempotency::{ProblemKind, Problems};
    ///
    /// const NOT_FOUND: ProblemKind = ProblemKind {
    ///     slug: "not-found",
    ///     status: 404,
    ///     title: "Not found",
    ///     code: "not_found",
    ///     advice_code: "check_url",
    /// };
    /// let problem = Problems::default().custom(&NOT_FOUND, "There is no resource at this path.");
    /// assert_eq!(problem.type_uri, "/problems/not-found");
    /// ```
    pub fn custom(&self, kind: &ProblemKind, detail: impl Into<String>) -> Problem {
        Problem {
            type_uri: format!("{}{}", self.type_base, kind.slug),
            title: kind.title.to_owned(),
            status: kind.status,
            detail: detail.into(),
            code: kind.code.to_owned(),
            advice_code: kind.advice_code.to_owned(),
            param: None,
            request_id: None,
            retry_after: None,
        }
    }

    /// The problem a client should get for `error`, or `None` for server-side errors
    /// (answer those with [`internal_error`](Self::internal_error) or
    /// [`service_unavailable`](Self::service_unavailable), and log them).
    pub fn for_error(&self, error: &Error) -> Option<Problem> {
        match error {
            Error::Conflict {
                key,
                first_used_at,
                first_request,
                ..
            } => Some(self.conflict(key, *first_used_at, first_request.request_id.as_deref())),
            Error::InFlight {
                key, retry_after, ..
            } => Some(self.in_flight(key, *retry_after)),
            Error::InvalidKey(reason) => Some(self.key_invalid(reason)),
            Error::InvalidScope(reason) => Some(self.scope_invalid(reason)),
            _ => None,
        }
    }

    /// 409 `idempotency_conflict`: the key was used with a different request body, at
    /// `first_used_at`, by the request with id `first_request_id` when it is known.
    pub fn conflict(
        &self,
        key: &IdempotencyKey,
        first_used_at: DateTime<Utc>,
        first_request_id: Option<&str>,
    ) -> Problem {
        let by = first_request_id
            .map(|id| format!(" by request {id}"))
            .unwrap_or_default();
        self.custom(
            self.catalogue.kind(Situation::Conflict),
            format!(
                "{} '{key}' was used at {}{by} with a different request body.",
                self.key_header,
                first_used_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        )
    }

    /// 409 `idempotency_key_in_use`: a request with the key is still being processed.
    pub fn in_flight(&self, key: &IdempotencyKey, retry_after: Duration) -> Problem {
        let seconds = retry_after_seconds(retry_after);
        let mut problem = self.custom(
            self.catalogue.kind(Situation::InFlight),
            format!(
                "A request with {} '{key}' is still being processed. \
                 Retry after {seconds} second{} to receive its response.",
                self.key_header,
                if seconds == 1 { "" } else { "s" }
            ),
        );
        problem.retry_after = Some(Duration::from_secs(seconds));
        problem
    }

    /// 400 `idempotency_key_missing`: the request carries no key but needs one.
    pub fn key_missing(&self) -> Problem {
        let header = &self.key_header;
        self.custom(
            self.catalogue.kind(Situation::KeyMissing),
            format!(
                "This request requires an {header} header. Mint a fresh UUID v4 for each \
                 logical operation and send it in {header}."
            ),
        )
        .with_param(header)
    }

    /// 400 `idempotency_key_invalid`: the key is malformed; `reason` says why.
    pub fn key_invalid(&self, reason: &dyn std::fmt::Display) -> Problem {
        self.custom(
            self.catalogue.kind(Situation::KeyInvalid),
            format!(
                "The {} header is not a valid key: {reason}",
                self.key_header
            ),
        )
        .with_param(&self.key_header)
    }

    /// 400 `idempotency_scope_invalid`: the scope the request maps to is malformed.
    pub fn scope_invalid(&self, reason: &dyn std::fmt::Display) -> Problem {
        self.custom(
            self.catalogue.kind(Situation::ScopeInvalid),
            format!("The request's idempotency scope is not valid: {reason}"),
        )
    }

    /// 400 `invalid_request`: the request breaks the endpoint's rules; `param` names the
    /// field or header at fault, when there is one.
    pub fn invalid_request(&self, param: Option<&str>, detail: impl Into<String>) -> Problem {
        let problem = self.custom(self.catalogue.kind(Situation::InvalidRequest), detail);
        match param {
            Some(param) => problem.with_param(param),
            None => problem,
        }
    }

    /// 413 `payload_too_large`: the request body is longer than `limit` bytes.
    pub fn payload_too_large(&self, limit: usize) -> Problem {
        self.custom(
            self.catalogue.kind(Situation::PayloadTooLarge),
            format!("The request body is larger than the limit of {limit} bytes."),
        )
    }

    /// 500 `internal_error`: the server failed; nothing was stored, and a retry with the
    /// same key is safe.
    pub fn internal_error(&self) -> Problem {
        self.custom(
            self.catalogue.kind(Situation::InternalError),
            "The server failed to process the request and stored nothing for it. \
             Retrying with the same idempotency key is safe.",
        )
    }

    /// 503 `service_unavailable`: the store (the database) cannot be reached or failed, or
    /// the server is too busy to take the request (no connection or body budget in time);
    /// the client should retry with the same key after `retry_after`.
    pub fn service_unavailable(&self, retry_after: Duration) -> Problem {
        let mut problem = self.custom(
            self.catalogue.kind(Situation::ServiceUnavailable),
            "The server could not take the request in time: it is busy, or its database \
             cannot be reached. Retry with the same idempotency key: it answers with the \
             stored response if the request completed, and runs it otherwise.",
        );
        problem.retry_after = Some(Duration::from_secs(retry_after_seconds(retry_after)));
        problem
    }
}

impl Problems {
    /// 503 `request_not_committed`: the connection to the database broke while the
    /// request was being committed, and the server then verified that nothing was
    /// committed ([`CommitOutcome::NotStored`](crate::CommitOutcome::NotStored)). The
    /// client may retry with the same key at once: `Retry-After: 0`.
    pub fn not_committed(&self) -> Problem {
        let mut problem = self.custom(
            self.catalogue.kind(Situation::NotCommitted),
            format!(
                "The server lost its database connection while completing this request and \
                 verified that nothing was done. Retry the request; the same {} is safe.",
                self.key_header
            ),
        );
        problem.retry_after = Some(Duration::ZERO);
        problem
    }
}

/// A kind of problem: what every problem of the kind says besides its `detail`. Make one
/// a constant, and a problem of it with [`Problems::custom`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProblemKind {
    /// Appended to the type base to form `type`, e.g. `idempotency-conflict`.
    pub slug: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// A short, human-readable summary, the same for every problem of the kind.
    pub title: &'static str,
    /// The machine-readable code, e.g. `idempotency_conflict`.
    pub code: &'static str,
    /// What the client should do, e.g. `use_new_idempotency_key`.
    pub advice_code: &'static str,
}

/// A situation in which the crate answers a client with a problem of its own. A
/// [`ProblemCatalogue`] gives each one its [`ProblemKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Situation {
    /// The key was used with another request ([`Problems::conflict`]).
    Conflict,
    /// A request with the key is still being processed ([`Problems::in_flight`]).
    InFlight,
    /// The request needs a key and has none ([`Problems::key_missing`]).
    KeyMissing,
    /// The key is malformed ([`Problems::key_invalid`]).
    KeyInvalid,
    /// The request's scope is malformed ([`Problems::scope_invalid`]).
    ScopeInvalid,
    /// The request breaks the endpoint's rules ([`Problems::invalid_request`]).
    InvalidRequest,
    /// The request body is over the limit ([`Problems::payload_too_large`]).
    PayloadTooLarge,
    /// The server failed ([`Problems::internal_error`]).
    InternalError,
    /// The database cannot be reached ([`Problems::service_unavailable`]).
    ServiceUnavailable,
    /// The reply to `COMMIT` was lost and nothing was committed ([`Problems::not_committed`]).
    NotCommitted,
}

impl Situation {
    /// Every situation, in declaration order (the catalogue's index).
    pub const ALL: [Situation; 10] = [
        Situation::Conflict,
        Situation::InFlight,
        Situation::KeyMissing,
        Situation::KeyInvalid,
        Situation::ScopeInvalid,
        Situation::InvalidRequest,
        Situation::PayloadTooLarge,
        Situation::InternalError,
        Situation::ServiceUnavailable,
        Situation::NotCommitted,
    ];
}

/// Which [`ProblemKind`] answers each [`Situation`]: the status, `code`, `title`,
/// `advice_code` and `type` slug of the crate's own problems.
///
/// Two come with the crate: [`seed`](Self::seed), the error specification this crate
/// follows by default (409 `idempotency_conflict` for a reused key), and
/// [`ietf`](Self::ietf), the IETF draft and the peers that follow it (422
/// `fingerprint-mismatch`). Override single entries with [`with`](Self::with):
///
/// ```
/// use pg_idempotency::{ProblemCatalogue, ProblemKind, Situation};
///
/// let catalogue = ProblemCatalogue::seed().with(
///     Situation::KeyMissing,
///     ProblemKind { code: "missing_idempotency_key", ..*ProblemCatalogue::seed().kind(Situation::KeyMissing) },
/// );
/// assert_eq!(catalogue.kind(Situation::KeyMissing).code, "missing_idempotency_key");
/// assert_eq!(catalogue.kind(Situation::KeyMissing).status, 400);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProblemCatalogue {
    /// Indexed by `Situation as usize`, in the order of [`Situation::ALL`].
    kinds: [ProblemKind; 10],
}

impl Default for ProblemCatalogue {
    /// [`ProblemCatalogue::seed`].
    fn default() -> Self {
        Self::seed()
    }
}

impl ProblemCatalogue {
    /// The error specification this crate follows by default: snake_case codes, 409
    /// `idempotency_conflict` for a key reused with another request.
    pub fn seed() -> Self {
        let kind = |slug, status, title, code, advice_code| ProblemKind {
            slug,
            status,
            title,
            code,
            advice_code,
        };
        Self {
            kinds: [
                kind(
                    "idempotency-conflict",
                    409,
                    "Idempotency key reused with different body",
                    "idempotency_conflict",
                    "use_new_idempotency_key",
                ),
                kind(
                    "idempotency-key-in-use",
                    409,
                    "Idempotency key in use",
                    "idempotency_key_in_use",
                    "retry_later",
                ),
                kind(
                    "idempotency-key-missing",
                    400,
                    "Idempotency key missing",
                    "idempotency_key_missing",
                    "add_idempotency_key",
                ),
                kind(
                    "idempotency-key-invalid",
                    400,
                    "Idempotency key invalid",
                    "idempotency_key_invalid",
                    "use_new_idempotency_key",
                ),
                kind(
                    "idempotency-scope-invalid",
                    400,
                    "Idempotency scope invalid",
                    "idempotency_scope_invalid",
                    "fix_request",
                ),
                kind(
                    "invalid-request",
                    400,
                    "Invalid request",
                    "invalid_request",
                    "fix_request",
                ),
                kind(
                    "payload-too-large",
                    413,
                    "Request body too large",
                    "payload_too_large",
                    "reduce_request_size",
                ),
                kind(
                    "internal-error",
                    500,
                    "Internal server error",
                    "internal_error",
                    "retry_later",
                ),
                kind(
                    "service-unavailable",
                    503,
                    "Service unavailable",
                    "service_unavailable",
                    "retry_later",
                ),
                kind(
                    "request-not-committed",
                    503,
                    "Request not completed",
                    "request_not_committed",
                    "retry_request",
                ),
            ],
        }
    }

    /// The IETF draft (draft-ietf-httpapi-idempotency-key-header) and the peers that
    /// follow it: 422 for a key reused with another request payload, and kebab-case codes
    /// (`missing-key`, `invalid-key`, `fingerprint-mismatch`, ...) that equal the slug.
    pub fn ietf() -> Self {
        let kind = |code, status, title, advice_code| ProblemKind {
            slug: code,
            status,
            title,
            code,
            advice_code,
        };
        Self {
            kinds: [
                kind(
                    "fingerprint-mismatch",
                    422,
                    "Idempotency key reused with a different request",
                    "use-new-idempotency-key",
                ),
                kind(
                    "request-in-flight",
                    409,
                    "A request with this idempotency key is in progress",
                    "retry-later",
                ),
                kind(
                    "missing-key",
                    400,
                    "Idempotency key missing",
                    "add-idempotency-key",
                ),
                kind(
                    "invalid-key",
                    400,
                    "Idempotency key invalid",
                    "use-new-idempotency-key",
                ),
                kind(
                    "invalid-scope",
                    400,
                    "Idempotency scope invalid",
                    "fix-request",
                ),
                kind("invalid-request", 400, "Invalid request", "fix-request"),
                kind(
                    "payload-too-large",
                    413,
                    "Request body too large",
                    "reduce-request-size",
                ),
                kind(
                    "internal-error",
                    500,
                    "Internal server error",
                    "retry-later",
                ),
                kind(
                    "service-unavailable",
                    503,
                    "Service unavailable",
                    "retry-later",
                ),
                kind(
                    "request-not-committed",
                    503,
                    "Request not completed",
                    "retry-request",
                ),
            ],
        }
    }

    /// Answers `situation` with `kind` instead (builder style).
    #[must_use]
    pub fn with(mut self, situation: Situation, kind: ProblemKind) -> Self {
        self.kinds[situation as usize] = kind;
        self
    }

    /// The kind that answers `situation`.
    pub fn kind(&self, situation: Situation) -> &ProblemKind {
        &self.kinds[situation as usize]
    }
}

/// Whole seconds for `Retry-After`, at least one.
fn retry_after_seconds(retry_after: Duration) -> u64 {
    (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> IdempotencyKey {
        "550e8400-e29b-41d4-a716-446655440000".parse().unwrap()
    }

    #[test]
    fn conflict_names_the_first_request_beside_its_time() {
        let at = "2026-05-14T14:32:01Z".parse().unwrap();
        let problem = Problems::default().conflict(&key(), at, Some("req_FIRST"));
        assert_eq!(
            problem.detail,
            "Idempotency-Key '550e8400-e29b-41d4-a716-446655440000' was used at \
             2026-05-14T14:32:01Z by request req_FIRST with a different request body."
        );
    }

    #[test]
    fn conflict_matches_the_seed_example() {
        let at = "2026-05-14T14:32:01Z".parse().unwrap();
        let problem = Problems::new("https://zyins.isaapi.com/errors/")
            .conflict(&key(), at, None)
            .with_request_id("req_01HZK2N5GQR9T8X4B6FJW3Y1AS");
        let json: serde_json::Value = serde_json::from_slice(&problem.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "https://zyins.isaapi.com/errors/idempotency-conflict",
                "title": "Idempotency key reused with different body",
                "status": 409,
                "detail": "Idempotency-Key '550e8400-e29b-41d4-a716-446655440000' was used at 2026-05-14T14:32:01Z with a different request body.",
                "code": "idempotency_conflict",
                "advice_code": "use_new_idempotency_key",
                "param": null,
                "request_id": "req_01HZK2N5GQR9T8X4B6FJW3Y1AS"
            })
        );
    }

    #[test]
    fn in_flight_rounds_the_hint_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1500)), 2);
        let problem = Problems::new("/p/").in_flight(&key(), Duration::from_millis(2500));
        assert_eq!(problem.status, 409);
        assert_eq!(problem.code, "idempotency_key_in_use");
        assert_eq!(problem.retry_after, Some(Duration::from_secs(3)));
        assert!(
            problem.detail.contains("Retry after 3 seconds"),
            "{}",
            problem.detail
        );
    }

    #[test]
    fn missing_and_invalid_name_the_header() {
        let missing = Problems::new("/p/").key_missing();
        assert_eq!(
            (missing.status, missing.code.as_str()),
            (400, "idempotency_key_missing")
        );
        assert_eq!(missing.param.as_deref(), Some("Idempotency-Key"));
        let err = "nope".parse::<IdempotencyKey>().unwrap_err();
        let invalid = Problems::new("/p/").for_error(&Error::from(err)).unwrap();
        assert_eq!(
            (invalid.status, invalid.code.as_str()),
            (400, "idempotency_key_invalid")
        );
        assert_eq!(invalid.param.as_deref(), Some("Idempotency-Key"));
        assert_eq!(invalid.type_uri, "/p/idempotency-key-invalid");
    }

    #[test]
    fn request_and_server_problems() {
        let problems = Problems::new("/p/");
        let invalid = problems.invalid_request(Some("amount"), "too small");
        assert_eq!(
            (
                invalid.status,
                invalid.code.as_str(),
                invalid.param.as_deref()
            ),
            (400, "invalid_request", Some("amount"))
        );
        assert_eq!(invalid.type_uri, "/p/invalid-request");
        assert_eq!(problems.invalid_request(None, "x").param, None);
        let large = problems.payload_too_large(1024);
        assert_eq!(
            (large.status, large.code.as_str()),
            (413, "payload_too_large")
        );
        assert!(large.detail.contains("1024 bytes"), "{}", large.detail);
        assert_eq!(problems.internal_error().status, 500);
        let unavailable = problems.service_unavailable(Duration::from_millis(10));
        assert_eq!(unavailable.status, 503);
        assert_eq!(unavailable.retry_after, Some(Duration::from_secs(1)));
        let json: serde_json::Value = serde_json::from_slice(&unavailable.to_json()).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 8);
    }

    #[test]
    fn the_catalogues_answer_every_situation_by_its_own_index() {
        for (index, situation) in Situation::ALL.into_iter().enumerate() {
            assert_eq!(situation as usize, index);
        }
        let key_missing = |catalogue: ProblemCatalogue| {
            Problems::new("/p/").with_catalogue(catalogue).key_missing()
        };
        assert_eq!(
            key_missing(ProblemCatalogue::seed()).code,
            "idempotency_key_missing"
        );
        let ietf = key_missing(ProblemCatalogue::ietf());
        assert_eq!((ietf.status, ietf.code.as_str()), (400, "missing-key"));
        assert_eq!(ietf.type_uri, "/p/missing-key");
        let at = "2026-05-14T14:32:01Z".parse().unwrap();
        let conflict = Problems::default()
            .with_catalogue(ProblemCatalogue::ietf())
            .conflict(&key(), at, None);
        assert_eq!(
            (conflict.status, conflict.code.as_str()),
            (422, "fingerprint-mismatch")
        );
        let custom = ProblemKind {
            code: "reused",
            ..*ProblemCatalogue::ietf().kind(Situation::Conflict)
        };
        let catalogue = ProblemCatalogue::ietf().with(Situation::Conflict, custom);
        assert_eq!(catalogue.kind(Situation::Conflict).code, "reused");
        assert_eq!(
            catalogue.kind(Situation::InFlight),
            ProblemCatalogue::ietf().kind(Situation::InFlight)
        );
    }

    #[test]
    fn server_errors_have_no_problem() {
        assert!(
            Problems::default()
                .for_error(&Error::InvalidStatus(99))
                .is_none()
        );
    }
}
