//! Request ids: one per request, in the problem bodies and in a response header.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::{HeaderName, HeaderValue};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestId, RequestId as TowerRequestId, SetRequestId,
};
use tower_layer::Layer;
use tower_service::Service;

/// The default request id header, `X-Request-Id`.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// How the ids this server mints begin.
const SERVER_PREFIX: &str = "req_";

/// Crockford's base32 alphabet (no I, L, O, U).
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// The id of one request, as put in `request_id` of problem bodies and in the
/// `X-Request-Id` response header.
///
/// A client that sends a sane `X-Request-Id` (1 to [`RequestId::MAX_LEN`] bytes of ASCII
/// letters, digits and `-_.:/+=@~`, not starting with `req_`, which only the server's own
/// ids do) gets its own id back; otherwise the server mints one:
/// `req_` followed by 26 Crockford base32 characters (a 48-bit millisecond timestamp and
/// 80 random bits, like a ULID), e.g. `req_01HZK2N5GQR9T8X4B6FJW3Y1AS`.
///
/// [`IdempotencyLayer`](super::IdempotencyLayer) and [`RequestIdLayer`] put it into the
/// request extensions; handlers take it as an extractor:
///
/// ```no_run
/// use pg_idempotency::axum::RequestId;
///
/// async fn handler(request_id: RequestId) -> String {
///     format!("your request is {request_id}")
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(Arc<str>);

impl RequestId {
    /// The longest client-supplied id that is accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Mints a new id: `req_` + 26 Crockford base32 characters.
    pub fn generate() -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let random = uuid::Uuid::new_v4().into_bytes();
        // 80 random bits: a v4 UUID's bytes 0..6 and 9..13 have no version or variant bits.
        let mut bits: u128 = (millis & ((1 << 48) - 1)) << 80;
        for (i, byte) in random[..6].iter().chain(&random[9..13]).enumerate() {
            bits |= u128::from(*byte) << (72 - 8 * i);
        }
        let mut id = String::with_capacity(30);
        id.push_str(SERVER_PREFIX);
        for i in 0..26 {
            let index = (bits >> (125 - 5 * i)) & 31;
            id.push(char::from(CROCKFORD[index as usize]));
        }
        Self(id.into())
    }

    /// A client-supplied id, if it is sane (see the type's docs).
    pub fn parse(raw: &[u8]) -> Option<Self> {
        let sane = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@~".contains(b));
        // Only ASCII passed the check, so this is valid UTF-8.
        sane.then(|| std::str::from_utf8(raw).ok().map(|s| Self(s.into())))
            .flatten()
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a header value.
    pub fn header_value(&self) -> HeaderValue {
        // Generated and parsed ids are visible ASCII only.
        HeaderValue::from_str(&self.0).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// The client's id from `header`, if it sent exactly one, it is sane, and it is not
    /// in the server's own format: an id that starts with `req_` (in any case) is always
    /// one this server minted, so that a replay's `Idempotent-Replay-Of` or a conflict's
    /// detail never presents a client's id as the server's.
    fn from_client(headers: &http::HeaderMap, header: &HeaderName) -> Option<Self> {
        let mut values = headers.get_all(header).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => Self::parse(value.as_bytes()).filter(|id| {
                !id.0
                    .get(..SERVER_PREFIX.len())
                    .is_some_and(|prefix| prefix.eq_ignore_ascii_case(SERVER_PREFIX))
            }),
            _ => None,
        }
    }

    /// The id an outer layer put into `extensions` (as tower-http's
    /// [`RequestId`](TowerRequestId)), if it is sane.
    pub(crate) fn assigned(extensions: &http::Extensions) -> Option<Self> {
        extensions
            .get::<TowerRequestId>()
            .and_then(|id| Self::parse(id.header_value().as_bytes()))
    }

    /// The client's sane id from `header`, else a new one, stored in `extensions` for
    /// later layers and handlers.
    fn assign(
        extensions: &mut http::Extensions,
        headers: &http::HeaderMap,
        header: &HeaderName,
    ) -> Self {
        let id = Self::from_client(headers, header).unwrap_or_else(Self::generate);
        extensions.insert(TowerRequestId::new(id.header_value()));
        id
    }

    /// The request's id: [assigned](Self::assigned) by an outer layer, else
    /// [assigned now](Self::assign).
    pub(crate) fn of_request<B>(request: &mut http::Request<B>, header: &HeaderName) -> Self {
        if let Some(id) = Self::assigned(request.extensions()) {
            return id;
        }
        let id = Self::from_client(request.headers(), header).unwrap_or_else(Self::generate);
        request
            .extensions_mut()
            .insert(TowerRequestId::new(id.header_value()));
        id
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RequestId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    /// The id that a layer assigned; on a route without [`RequestIdLayer`] or
    /// [`IdempotencyLayer`](super::IdempotencyLayer), the client's sane `X-Request-Id` or
    /// a new one.
    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::assigned(&parts.extensions).unwrap_or_else(|| {
            Self::assign(&mut parts.extensions, &parts.headers, &REQUEST_ID_HEADER)
        }))
    }
}

/// Mints [`RequestId`]s for tower-http's
/// [`SetRequestIdLayer`](tower_http::request_id::SetRequestIdLayer), for services that
/// compose tower-http's request-id layers themselves.
///
/// tower-http keeps whatever id a client sent, sane or not; [`RequestIdLayer`] (which
/// uses this) replaces an insane one first.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeRequestIds;

impl MakeRequestId for MakeRequestIds {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<TowerRequestId> {
        Some(TowerRequestId::new(RequestId::generate().header_value()))
    }
}

/// A layer that gives every request a [`RequestId`] and sets it as a response header
/// (default `X-Request-Id`) on every response: tower-http's
/// [`SetRequestId`](tower_http::request_id::SetRequestId) with [`MakeRequestIds`] and
/// [`PropagateRequestId`](tower_http::request_id::PropagateRequestId), behind a step
/// that drops a client's id unless it is sane (see [`RequestId`]).
///
/// Put it outermost (`Router::layer`), so that every response of the service carries an
/// id, including those of routes without idempotency; the
/// [`IdempotencyLayer`](super::IdempotencyLayer) reuses the id it finds.
#[derive(Debug, Clone)]
pub struct RequestIdLayer {
    header: HeaderName,
}

impl Default for RequestIdLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIdLayer {
    /// A layer using the `X-Request-Id` header.
    pub fn new() -> Self {
        Self {
            header: REQUEST_ID_HEADER,
        }
    }

    /// Reads and writes the id in `header` instead.
    #[must_use]
    pub fn with_header(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let header = self.header.clone();
        let propagate = PropagateRequestId::new(inner, header.clone());
        RequestIdService {
            inner: SetRequestId::new(propagate, header.clone(), MakeRequestIds),
            header,
        }
    }
}

/// The service of [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: SetRequestId<PropagateRequestId<S>, MakeRequestIds>,
    header: HeaderName,
}

impl<S, B, R> Service<http::Request<B>> for RequestIdService<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = <PropagateRequestId<S> as Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // tower-http keeps any id the client sent: keep only a sane one, so that a new
        // one is minted otherwise.
        if RequestId::from_client(request.headers(), &self.header).is_none() {
            request.headers_mut().remove(&self.header);
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_look_like_the_seed() {
        let id = RequestId::generate();
        let s = id.as_str();
        assert_eq!(s.len(), 30, "{s}");
        assert!(s.starts_with("req_"));
        assert!(s[4..].bytes().all(|b| CROCKFORD.contains(&b)), "{s}");
        assert!(
            s.as_bytes()[4] <= b'7',
            "the first character holds 3 bits: {s}"
        );
        assert_ne!(RequestId::generate(), id);
        assert!(RequestId::parse(s.as_bytes()).is_some());
    }

    #[test]
    fn client_ids_must_be_sane() {
        for ok in [
            "a",
            "req_01HZK2N5GQR9T8X4B6FJW3Y1AS",
            "550e8400-e29b-41d4-a716-446655440000",
            "a.b:c/d+e=f@g~h",
        ] {
            assert_eq!(RequestId::parse(ok.as_bytes()).unwrap().as_str(), ok);
        }
        let long = "x".repeat(RequestId::MAX_LEN + 1);
        for bad in [
            &b""[..],
            b"a b",
            b"a\nb",
            b"\xff",
            b"<script>",
            b"\"",
            long.as_bytes(),
        ] {
            assert!(RequestId::parse(bad).is_none(), "{bad:?}");
        }
        assert!(RequestId::parse("x".repeat(RequestId::MAX_LEN).as_bytes()).is_some());
    }

    #[test]
    fn a_client_id_in_the_server_format_is_never_taken() {
        let headers = |value: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(REQUEST_ID_HEADER, HeaderValue::from_static(value));
            headers
        };
        for forged in [
            "req_01HZK2N5GQR9T8X4B6FJW3Y1AS",
            "REQ_01HZK2N5GQR9T8X4B6FJW3Y1AS",
            "Req_x",
        ] {
            let id = RequestId::from_client(&headers(forged), &REQUEST_ID_HEADER);
            assert_eq!(id, None, "{forged}");
        }
        for kept in ["trace-42", "request_1", "req-1", "re"] {
            let id = RequestId::from_client(&headers(kept), &REQUEST_ID_HEADER);
            assert_eq!(id.as_ref().map(RequestId::as_str), Some(kept));
        }
    }

    #[test]
    fn of_request_prefers_extension_then_header() {
        let mut request = http::Request::new(());
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static("client-1"));
        let id = RequestId::of_request(&mut request, &REQUEST_ID_HEADER);
        assert_eq!(id.as_str(), "client-1");
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, HeaderValue::from_static("client-2"));
        let again = RequestId::of_request(&mut request, &REQUEST_ID_HEADER);
        assert_eq!(again.as_str(), "client-1");
        // Two values: neither is trusted.
        let mut request = http::Request::new(());
        request
            .headers_mut()
            .append(REQUEST_ID_HEADER, HeaderValue::from_static("a"));
        request
            .headers_mut()
            .append(REQUEST_ID_HEADER, HeaderValue::from_static("b"));
        let id = RequestId::of_request(&mut request, &REQUEST_ID_HEADER);
        assert!(id.as_str().starts_with("req_"));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_and_accepts_only_sane_ids(raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Some(id) = RequestId::parse(&raw) {
                proptest::prop_assert_eq!(id.as_str().as_bytes(), &raw[..]);
                proptest::prop_assert!(raw.len() <= RequestId::MAX_LEN);
                proptest::prop_assert!(HeaderValue::from_str(id.as_str()).is_ok());
            }
        }
    }
}
