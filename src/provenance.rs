//! Provenance: which request produced a stored response.

/// Who produced a stored response: the request id of the request that ran, and its W3C
/// `traceparent` when it had one. Stored with the response
/// ([`Claim::set_provenance`](crate::Claim::set_provenance)), and handed back with a
/// [`Replay`](crate::Replay) and an [`Error::Conflict`](crate::Error::Conflict), so that
/// a replay can say which request it replays and a conflict can name the first request.
///
/// Both are free text to the store; the [axum layer](crate::axum) fills them with its
/// [`RequestId`](crate::axum::RequestId) and a well-formed `traceparent` header. Rows
/// stored before provenance existed have neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Provenance {
    /// The request id of the request that produced the response.
    pub request_id: Option<String>,
    /// Its W3C trace context `traceparent`, e.g.
    /// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
    pub traceparent: Option<String>,
}

impl Provenance {
    /// The provenance of the request with id `request_id`.
    pub fn new(request_id: impl Into<String>) -> Self {
        Self {
            request_id: Some(request_id.into()),
            traceparent: None,
        }
    }

    /// Adds the request's `traceparent` (builder style).
    #[must_use]
    pub fn with_traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }
}
