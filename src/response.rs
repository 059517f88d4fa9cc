//! The response that is stored with a key and replayed to retries, and the policy that
//! decides which responses are kept.

use std::ops::RangeInclusive;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// An HTTP response as stored with an idempotency key and replayed, byte for byte, to
/// every retry of the same request.
///
/// Headers keep their order and duplicates. Header values are stored as strings; an HTTP
/// integration decides what to do with values that are not UTF-8. The body is shared, not
/// copied, between the replays and waiting duplicates that answer with it.
///
/// A body over the store's [cap](crate::Config::with_stored_body_cap) is not stored:
/// the response is stored with an empty body and [`body_omitted`](Self::body_omitted)
/// set, and replays say so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The status code, `100..=599`.
    pub status: u16,
    /// Header names and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body bytes (empty when the body was omitted).
    pub body: Bytes,
    /// The body was over the stored-body cap and is not stored.
    pub body_omitted: bool,
}

impl StoredResponse {
    /// A response with a status and a body, and no headers.
    pub fn new(status: u16, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: body.into(),
            body_omitted: false,
        }
    }

    /// This response as it is stored under a body cap of `cap` bytes: itself when its
    /// body fits, else its status and headers with the body omitted.
    pub fn capped(&self, cap: usize) -> std::borrow::Cow<'_, Self> {
        if self.body.len() <= cap {
            return std::borrow::Cow::Borrowed(self);
        }
        std::borrow::Cow::Owned(self.without_body())
    }

    /// Its status and headers, with the body omitted.
    pub fn without_body(&self) -> Self {
        Self {
            status: self.status,
            headers: self.headers.clone(),
            body: Bytes::new(),
            body_omitted: true,
        }
    }

    /// Adds a header (builder style).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The first value of a header, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Which response statuses are stored (and so replayed) and which are not.
///
/// A response that is not stored rolls back the business transaction and frees the key,
/// so the client's retry runs again. The default stores every status except server
/// errors (`500..=599`), `408 Request Timeout` and `429 Too Many Requests`: those say
/// "try again", and caching them would block the retry they ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePolicy {
    excluded: Vec<RangeInclusive<u16>>,
}

impl Default for StorePolicy {
    fn default() -> Self {
        Self {
            excluded: vec![408..=408, 429..=429, 500..=599],
        }
    }
}

impl StorePolicy {
    /// A policy that stores every response.
    pub fn store_all() -> Self {
        Self {
            excluded: Vec::new(),
        }
    }

    /// Also excludes `status` (builder style).
    #[must_use]
    pub fn excluding(self, status: u16) -> Self {
        self.excluding_range(status..=status)
    }

    /// Also excludes every status in `range` (builder style).
    #[must_use]
    pub fn excluding_range(mut self, range: RangeInclusive<u16>) -> Self {
        self.excluded.push(range);
        self
    }

    /// Stores `status` again even if an earlier rule excluded it (builder style).
    #[must_use]
    pub fn including(mut self, status: u16) -> Self {
        let mut kept = Vec::with_capacity(self.excluded.len() + 1);
        for range in self.excluded {
            if range.contains(&status) {
                let (start, end) = range.into_inner();
                if start < status {
                    kept.push(start..=status - 1);
                }
                if status < end {
                    kept.push(status + 1..=end);
                }
            } else {
                kept.push(range);
            }
        }
        self.excluded = kept;
        self
    }

    /// Whether a response with this status is stored.
    pub fn stores(&self, status: u16) -> bool {
        !self.excluded.iter().any(|range| range.contains(&status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_keeps_retryable_statuses_out() {
        let policy = StorePolicy::default();
        for status in [200, 201, 204, 400, 404, 409, 422] {
            assert!(policy.stores(status), "{status} should be stored");
        }
        for status in [408, 429, 500, 502, 503, 599] {
            assert!(!policy.stores(status), "{status} should not be stored");
        }
    }

    #[test]
    fn policy_builders_compose() {
        let policy = StorePolicy::default().excluding(401).including(503);
        assert!(!policy.stores(401));
        assert!(policy.stores(503));
        assert!(!policy.stores(502));
        assert!(!policy.stores(504));
        assert!(StorePolicy::store_all().stores(500));
    }

    #[test]
    fn header_lookup_is_case_insensitive() {
        let response =
            StoredResponse::new(201, "{}").with_header("Content-Type", "application/json");
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.header("location"), None);
    }
}
