//! RFC 9457 problem details for every client-facing outcome.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::key::IdempotencyKey;

/// The header that carries idempotency keys, named in `param` and in messages.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// A problem details object (RFC 9457), served as `application/problem+json`.
///
/// It has exactly these fields: `type`, `title`, `status`, `detail`, `code`,
/// `advice_code`, `param` and `request_id` (`null` when there is none). Build one from a
/// client error with [`Error::problem`], or with the constructors here.
///
/// ```
/// use pg_idempotency::{IdempotencyKey, Problem};
///
/// let key: IdempotencyKey = "550e8400-e29b-41d4-a716-446655440000".parse().unwrap();
/// let at = "2026-05-14T14:32:01Z".parse().unwrap();
/// let problem = Problem::conflict("https://zyins.isaapi.com/errors/", &key, at)
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
    /// A URI reference naming the problem type: the configured base + a slug.
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

    /// A problem of any kind: `slug` is appended to `type_base` to form `type`.
    pub fn new(
        type_base: &str,
        slug: &str,
        status: u16,
        title: impl Into<String>,
        detail: impl Into<String>,
        code: impl Into<String>,
        advice_code: impl Into<String>,
    ) -> Self {
        Self {
            type_uri: format!("{type_base}{slug}"),
            title: title.into(),
            status,
            detail: detail.into(),
            code: code.into(),
            advice_code: advice_code.into(),
            param: None,
            request_id: None,
            retry_after: None,
        }
    }

    /// 409 `idempotency_conflict`: the key was used with a different request body.
    pub fn conflict(type_base: &str, key: &IdempotencyKey, first_used_at: DateTime<Utc>) -> Self {
        Self::new(
            type_base,
            "idempotency-conflict",
            409,
            "Idempotency key reused with different body",
            format!(
                "{IDEMPOTENCY_KEY_HEADER} '{key}' was used at {} with a different request body.",
                first_used_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
            "idempotency_conflict",
            "use_new_idempotency_key",
        )
    }

    /// 409 `idempotency_key_in_use`: a request with the key is still being processed.
    pub fn in_flight(type_base: &str, key: &IdempotencyKey, retry_after: Duration) -> Self {
        let seconds = retry_after_seconds(retry_after);
        let mut problem = Self::new(
            type_base,
            "idempotency-key-in-use",
            409,
            "Idempotency key in use",
            format!(
                "A request with {IDEMPOTENCY_KEY_HEADER} '{key}' is still being processed. \
                 Retry after {seconds} second{} to receive its response.",
                if seconds == 1 { "" } else { "s" }
            ),
            "idempotency_key_in_use",
            "retry_later",
        );
        problem.retry_after = Some(Duration::from_secs(seconds));
        problem
    }

    /// 400 `idempotency_key_missing`: the request carries no key but needs one.
    pub fn key_missing(type_base: &str, header: &str) -> Self {
        Self::new(
            type_base,
            "idempotency-key-missing",
            400,
            "Idempotency key missing",
            format!(
                "This request requires an {header} header. Mint a fresh UUID v4 for each \
                 logical operation and send it in {header}."
            ),
            "idempotency_key_missing",
            "add_idempotency_key",
        )
        .with_param(header)
    }

    /// 400 `idempotency_key_invalid`: the key is malformed; `reason` says why.
    pub fn key_invalid(type_base: &str, header: &str, reason: &dyn std::fmt::Display) -> Self {
        Self::new(
            type_base,
            "idempotency-key-invalid",
            400,
            "Idempotency key invalid",
            format!("The {header} header is not a valid key: {reason}"),
            "idempotency_key_invalid",
            "use_new_idempotency_key",
        )
        .with_param(header)
    }

    /// 400 `idempotency_scope_invalid`: the scope the request maps to is malformed.
    pub fn scope_invalid(type_base: &str, reason: &dyn std::fmt::Display) -> Self {
        Self::new(
            type_base,
            "idempotency-scope-invalid",
            400,
            "Idempotency scope invalid",
            format!("The request's idempotency scope is not valid: {reason}"),
            "idempotency_scope_invalid",
            "fix_request",
        )
    }

    /// 400 `invalid_request`: the request breaks the endpoint's rules; `param` names the
    /// field or header at fault, when there is one.
    pub fn invalid_request(
        type_base: &str,
        param: Option<&str>,
        detail: impl Into<String>,
    ) -> Self {
        let problem = Self::new(
            type_base,
            "invalid-request",
            400,
            "Invalid request",
            detail,
            "invalid_request",
            "fix_request",
        );
        match param {
            Some(param) => problem.with_param(param),
            None => problem,
        }
    }

    /// 413 `payload_too_large`: the request body is longer than `limit` bytes.
    pub fn payload_too_large(type_base: &str, limit: usize) -> Self {
        Self::new(
            type_base,
            "payload-too-large",
            413,
            "Request body too large",
            format!("The request body is larger than the limit of {limit} bytes."),
            "payload_too_large",
            "reduce_request_size",
        )
    }

    /// 500 `internal_error`: the server failed; nothing was stored, and a retry with the
    /// same key is safe.
    pub fn internal_error(type_base: &str) -> Self {
        Self::new(
            type_base,
            "internal-error",
            500,
            "Internal server error",
            "The server failed to process the request and stored nothing for it. \
             Retrying with the same idempotency key is safe.",
            "internal_error",
            "retry_later",
        )
    }

    /// 503 `service_unavailable`: the store (the database) cannot be reached or failed;
    /// the client should retry with the same key after `retry_after`.
    pub fn service_unavailable(type_base: &str, retry_after: Duration) -> Self {
        let mut problem = Self::new(
            type_base,
            "service-unavailable",
            503,
            "Service unavailable",
            "The server could not reach its database. Retry with the same \
             idempotency key: it answers with the stored response if the request \
             completed, and runs it otherwise.",
            "service_unavailable",
            "retry_later",
        );
        problem.retry_after = Some(Duration::from_secs(retry_after_seconds(retry_after)));
        problem
    }

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

impl Error {
    /// The problem a client should get for this error, or `None` for server-side errors
    /// (answer those with a plain 500 and log them). `type_base` is usually
    /// [`Config::problem_type_base`](crate::Config::problem_type_base).
    pub fn problem(&self, type_base: &str) -> Option<Problem> {
        match self {
            Error::Conflict {
                key, first_used_at, ..
            } => Some(Problem::conflict(type_base, key, *first_used_at)),
            Error::InFlight {
                key, retry_after, ..
            } => Some(Problem::in_flight(type_base, key, *retry_after)),
            Error::InvalidKey(reason) => Some(Problem::key_invalid(
                type_base,
                IDEMPOTENCY_KEY_HEADER,
                reason,
            )),
            Error::InvalidScope(reason) => Some(Problem::scope_invalid(type_base, reason)),
            _ => None,
        }
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
    fn conflict_matches_the_seed_example() {
        let at = "2026-05-14T14:32:01Z".parse().unwrap();
        let problem = Problem::conflict("https://zyins.isaapi.com/errors/", &key(), at)
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
        let problem = Problem::in_flight("/p/", &key(), Duration::from_millis(2500));
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
        let missing = Problem::key_missing("/p/", IDEMPOTENCY_KEY_HEADER);
        assert_eq!(
            (missing.status, missing.code.as_str()),
            (400, "idempotency_key_missing")
        );
        assert_eq!(missing.param.as_deref(), Some("Idempotency-Key"));
        let err = "nope".parse::<IdempotencyKey>().unwrap_err();
        let invalid = Error::from(err).problem("/p/").unwrap();
        assert_eq!(
            (invalid.status, invalid.code.as_str()),
            (400, "idempotency_key_invalid")
        );
        assert_eq!(invalid.param.as_deref(), Some("Idempotency-Key"));
        assert_eq!(invalid.type_uri, "/p/idempotency-key-invalid");
    }

    #[test]
    fn request_and_server_problems() {
        let invalid = Problem::invalid_request("/p/", Some("amount"), "too small");
        assert_eq!(
            (
                invalid.status,
                invalid.code.as_str(),
                invalid.param.as_deref()
            ),
            (400, "invalid_request", Some("amount"))
        );
        assert_eq!(invalid.type_uri, "/p/invalid-request");
        assert_eq!(Problem::invalid_request("/p/", None, "x").param, None);
        let large = Problem::payload_too_large("/p/", 1024);
        assert_eq!(
            (large.status, large.code.as_str()),
            (413, "payload_too_large")
        );
        assert!(large.detail.contains("1024 bytes"), "{}", large.detail);
        assert_eq!(Problem::internal_error("/p/").status, 500);
        let unavailable = Problem::service_unavailable("/p/", Duration::from_millis(10));
        assert_eq!(unavailable.status, 503);
        assert_eq!(unavailable.retry_after, Some(Duration::from_secs(1)));
        let json: serde_json::Value = serde_json::from_slice(&unavailable.to_json()).unwrap();
        assert_eq!(json.as_object().unwrap().len(), 8);
    }

    #[test]
    fn server_errors_have_no_problem() {
        assert!(Error::InvalidStatus(99).problem("/p/").is_none());
    }
}
