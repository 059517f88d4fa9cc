//! Responses: problems as `application/problem+json`, and handler responses to and from
//! their stored form.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, DATE, RETRY_AFTER};
use http::response::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

use super::dialect::Dialect;
use crate::problem::Problem;
use crate::provenance::Provenance;
use crate::response::StoredResponse;

/// Headers that describe one connection or the framing of one message (RFC 9110 §7.6.1,
/// RFC 9112 §6), besides those starting with `proxy-`: never stored with a response, and
/// never replayed from a stored one (a row an older version wrote may hold them). A
/// replay's length comes from its stored body.
const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    http::header::CONTENT_LENGTH,
    http::header::TRANSFER_ENCODING,
    http::header::TE,
    http::header::TRAILER,
    http::header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

/// Whether `name` is a hop-by-hop or framing header (see [`HOP_BY_HOP`]), or a `proxy-*`
/// one (`Proxy-Authorization`, `Proxy-Authenticate`, `Proxy-Connection`, ...).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str().starts_with("proxy-")
}

impl IntoResponse for Problem {
    /// The problem as `application/problem+json` with its status, plus `Retry-After` (in
    /// whole seconds, rounded up) when it has a retry hint. A status outside `100..=999` becomes 500.
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = Response::new(Body::from(self.to_json()));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(Problem::CONTENT_TYPE),
        );
        if let Some(retry_after) = self.retry_after {
            // Whole seconds, rounded up; 0 means "at once".
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// A handler's response body, read up to a cap.
pub(crate) enum ReadBody {
    /// The whole body, no longer than the cap.
    Whole(Bytes),
    /// More than the cap: the body to send, the part already read first.
    Over(Body),
}

/// Reads `body` until it ends or holds more than `cap` bytes: at most the cap plus one
/// frame is held. A body that declares more than the cap is not read at all.
pub(crate) async fn read_up_to(mut body: Body, cap: usize) -> Result<ReadBody, axum::Error> {
    if body.size_hint().lower() > cap as u64 {
        return Ok(ReadBody::Over(body));
    }
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue; // trailers are not stored
        };
        len += data.len();
        chunks.push_back(data);
        if len > cap {
            return Ok(ReadBody::Over(Body::new(Prefixed {
                prefix: chunks,
                rest: body,
            })));
        }
    }
    Ok(ReadBody::Whole(match chunks.len() {
        0 | 1 => chunks.pop_front().unwrap_or_default(),
        _ => chunks.iter().flatten().copied().collect(),
    }))
}

/// A body whose first chunks were read already: those, then the rest.
struct Prefixed {
    /// Still to be sent, in order.
    prefix: VecDeque<Bytes>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.prefix.iter().map(|chunk| chunk.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(read + rest.lower());
        if let Some(upper) = rest.upper() {
            hint.set_upper(read + upper);
        }
        hint
    }
}

/// The stored form of a handler's response, or why it cannot be stored.
///
/// Keeps every header in order except the hop-by-hop ones, `skip` (the request id
/// header) and the `dialect`'s replay headers, and adds a `Date` (now) when there is
/// none, so that replays carry the date of the original, as an HTTP cache would. `body`
/// `None`: the body was over the cap and is omitted.
pub(crate) fn to_stored(
    parts: &Parts,
    body: Option<Bytes>,
    skip: &HeaderName,
    dialect: &Dialect,
) -> Result<StoredResponse, String> {
    let mut headers = Vec::with_capacity(parts.headers.len() + 1);
    for (name, value) in &parts.headers {
        if name == skip || dialect.is_replay_header(name) || is_hop_by_hop(name) {
            continue;
        }
        let value = std::str::from_utf8(value.as_bytes())
            .map_err(|_| format!("the value of response header {name} is not UTF-8"))?;
        headers.push((name.as_str().to_owned(), value.to_owned()));
    }
    if !parts.headers.contains_key(DATE) {
        headers.push((DATE.as_str().to_owned(), http_date(chrono::Utc::now())));
    }
    Ok(StoredResponse {
        status: parts.status.as_u16(),
        headers,
        body_omitted: body.is_none(),
        body: body.unwrap_or_default(),
    })
}

/// A replay: whose response it carries, and how the replay headers are named.
#[derive(Clone, Copy)]
pub(crate) struct ReplayOf<'a> {
    pub first: &'a Provenance,
    pub dialect: &'a Dialect,
}

/// The HTTP response for a stored one: the same status, headers (in order, less the
/// hop-by-hop and framing ones, which an older version stored) and body (shared, not
/// copied). A replay adds the dialect's marker (`Idempotent-Replayed: true`), the first
/// request's id (`Idempotent-Replay-Of`), and, when the body was omitted,
/// `Idempotent-Replay: omitted`.
///
/// # Errors
///
/// The status is not a valid HTTP status (the row was not written by this layer).
/// Headers that are not valid HTTP are left out with a warning.
pub(crate) fn from_stored(
    stored: &StoredResponse,
    replay: Option<ReplayOf<'_>>,
) -> Result<Response, String> {
    let status = StatusCode::from_u16(stored.status)
        .map_err(|_| format!("stored status {} is not an HTTP status", stored.status))?;
    let mut headers = HeaderMap::with_capacity(stored.headers.len() + 3);
    for (name, value) in &stored.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            (Ok(name), Ok(_)) if is_hop_by_hop(&name) => {}
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => tracing::warn!(
                header = %name.escape_debug(),
                "a stored response header is not valid HTTP; it is left out"
            ),
        }
    }
    if let Some(ReplayOf { first, dialect }) = replay {
        headers.insert(
            dialect.replayed_header().clone(),
            HeaderValue::from_static("true"),
        );
        if let Some(id) = first
            .request_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            headers.insert(dialect.replay_of_header().clone(), id);
        }
        if stored.body_omitted {
            headers.insert(
                dialect.replay_header().clone(),
                HeaderValue::from_static("omitted"),
            );
        }
    }
    let mut response = Response::new(Body::from(stored.body.clone()));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// An IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::axum::dialect::{IDEMPOTENT_REPLAY_HEADER, IDEMPOTENT_REPLAYED_HEADER};
    use crate::axum::request_id::REQUEST_ID_HEADER;

    /// A replay in the default dialect, of a request without an id.
    fn replay(first: &Provenance) -> Option<ReplayOf<'_>> {
        static SEED: std::sync::LazyLock<Dialect> = std::sync::LazyLock::new(Dialect::seed);
        Some(ReplayOf {
            first,
            dialect: &SEED,
        })
    }
    use crate::problem::ProblemKind;

    fn parts(build: impl FnOnce(&mut HeaderMap)) -> Parts {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::CREATED;
        build(response.headers_mut());
        response.into_parts().0
    }

    #[test]
    fn problem_response_has_type_and_retry_after() {
        let problems = crate::Problems::new("/p/");
        let problem = problems.service_unavailable(std::time::Duration::from_millis(1500));
        let response = problem.clone().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        let odd = ProblemKind {
            slug: "x",
            status: 1000,
            title: "t",
            code: "c",
            advice_code: "a",
        };
        let odd = problems.custom(&odd, "d").into_response();
        assert_eq!(odd.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn stored_round_trip_keeps_order_and_duplicates() {
        let parts = parts(|h| {
            h.append("content-type", HeaderValue::from_static("application/json"));
            h.append("set-cookie", HeaderValue::from_static("a=1"));
            h.append("set-cookie", HeaderValue::from_static("b=2"));
            h.append("x-utf8", HeaderValue::from_bytes("é".as_bytes()).unwrap());
            h.append(REQUEST_ID_HEADER, HeaderValue::from_static("req_1"));
            for (name, value) in FRAMING {
                h.append(name, HeaderValue::from_static(value));
            }
            h.append(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
        });
        let stored = to_stored(
            &parts,
            Some(Bytes::from_static(b"\x00\xff")),
            &REQUEST_ID_HEADER,
            &Dialect::seed(),
        )
        .unwrap();
        let names: Vec<_> = stored.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "set-cookie", "set-cookie", "x-utf8", "date"]
        );
        assert_eq!(stored.status, 201);
        let response = from_stored(&stored, replay(&Provenance::default())).unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let cookies: Vec<_> = response.headers().get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(response.headers()["x-utf8"].as_bytes(), "é".as_bytes());
        assert_eq!(response.headers()[IDEMPOTENT_REPLAYED_HEADER], "true");
        // Replaying the replay's stored form gives the same headers.
        let again = from_stored(&stored, None).unwrap();
        assert!(again.headers().get(IDEMPOTENT_REPLAYED_HEADER).is_none());
    }

    /// Every hop-by-hop and framing header, with values that would desynchronise a
    /// keep-alive connection if sent with another body.
    const FRAMING: [(&str, &str); 10] = [
        ("content-length", "999"),
        ("transfer-encoding", "chunked"),
        ("connection", "close"),
        ("keep-alive", "timeout=5"),
        ("upgrade", "websocket"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("proxy-authenticate", "Basic"),
        ("proxy-authorization", "Basic YTpi"),
        ("proxy-connection", "keep-alive"),
    ];

    #[test]
    fn framing_headers_of_an_older_row_are_not_replayed() {
        let mut stored = StoredResponse::new(201, "short").with_header("x-kept", "1");
        for (name, value) in FRAMING {
            stored = stored.with_header(name, value);
        }
        let response = from_stored(&stored, replay(&Provenance::default())).unwrap();
        let names: Vec<_> = response.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept", IDEMPOTENT_REPLAYED_HEADER.as_str()]);
        // The length comes from the stored body.
        assert_eq!(http_body::Body::size_hint(response.body()).exact(), Some(5));
    }

    #[test]
    fn non_utf8_header_values_cannot_be_stored() {
        let parts = parts(|h| {
            h.append("x-bin", HeaderValue::from_bytes(b"\xff").unwrap());
        });
        let err = to_stored(
            &parts,
            Some(Bytes::new()),
            &REQUEST_ID_HEADER,
            &Dialect::seed(),
        )
        .unwrap_err();
        assert!(err.contains("x-bin"), "{err}");
    }

    #[test]
    fn bad_stored_rows_never_panic() {
        let stored = StoredResponse::new(42, "x");
        assert!(from_stored(&stored, replay(&Provenance::default())).is_err());
        let stored = StoredResponse::new(200, "x")
            .with_header("bad name", "v")
            .with_header("x-ok", "line\nbreak")
            .with_header("x-fine", "v");
        let response = from_stored(&stored, None).unwrap();
        assert_eq!(response.headers().len(), 1);
    }

    #[test]
    fn an_omitted_body_is_replayed_empty_and_said_so_in_the_dialect() {
        let stored = to_stored(
            &parts(|h| {
                h.append("content-type", HeaderValue::from_static("text/plain"));
            }),
            None,
            &REQUEST_ID_HEADER,
            &Dialect::seed(),
        )
        .unwrap();
        assert!(stored.body_omitted && stored.body.is_empty());
        let first = from_stored(&stored, None).unwrap();
        assert!(first.headers().get(IDEMPOTENT_REPLAY_HEADER).is_none());
        let replayed = from_stored(&stored, replay(&Provenance::default())).unwrap();
        assert_eq!(replayed.status(), StatusCode::CREATED);
        assert_eq!(replayed.headers()["content-type"], "text/plain");
        assert_eq!(replayed.headers()[IDEMPOTENT_REPLAY_HEADER], "omitted");
        assert_eq!(http_body::Body::size_hint(replayed.body()).exact(), Some(0));
        let ietf = Dialect::ietf();
        let replayed = from_stored(
            &stored,
            Some(ReplayOf {
                first: &Provenance::new("req_1"),
                dialect: &ietf,
            }),
        )
        .unwrap();
        let names: Vec<_> = replayed.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(
            names,
            [
                "content-type",
                "date",
                "idempotency-replayed",
                "idempotency-replay-of",
                "idempotency-replay"
            ]
        );
    }

    #[test]
    fn replay_headers_of_either_dialect_are_never_stored_by_it() {
        for dialect in [Dialect::seed(), Dialect::ietf()] {
            let parts = parts(|h| {
                for name in [
                    dialect.replayed_header(),
                    dialect.replay_of_header(),
                    dialect.replay_header(),
                ] {
                    h.append(name.clone(), HeaderValue::from_static("x"));
                }
            });
            let stored =
                to_stored(&parts, Some(Bytes::new()), &REQUEST_ID_HEADER, &dialect).unwrap();
            let names: Vec<_> = stored.headers.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, ["date"]);
        }
    }

    /// A body of `chunks` frames, with no size hint (as a stream has).
    fn streamed(chunks: &[&'static [u8]]) -> Body {
        let frames: Vec<_> = chunks
            .iter()
            .map(|chunk| Ok::<_, std::convert::Infallible>(Bytes::from_static(chunk)))
            .collect();
        Body::from_stream(futures_util::stream::iter(frames))
    }

    async fn collect(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn a_body_is_read_up_to_its_cap_and_the_rest_streams_through() {
        // At the cap: read whole, from several frames.
        match read_up_to(streamed(&[b"ab", b"cd"]), 4).await.unwrap() {
            ReadBody::Whole(body) => assert_eq!(&body[..], b"abcd"),
            ReadBody::Over(_) => panic!("4 bytes are not over a cap of 4"),
        }
        // One byte over: what was read, then the rest, in order.
        let ReadBody::Over(body) = read_up_to(streamed(&[b"ab", b"cde", b"fg"]), 4)
            .await
            .unwrap()
        else {
            panic!("5 bytes are over a cap of 4");
        };
        assert_eq!(collect(body).await, b"abcdefg");
        // A body that declares its length over the cap is not read at all, and keeps its
        // length for the answer's Content-Length.
        let ReadBody::Over(body) = read_up_to(Body::from(vec![7u8; 10]), 4).await.unwrap() else {
            panic!("10 bytes are over a cap of 4");
        };
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(10));
        assert_eq!(collect(body).await, vec![7u8; 10]);
        // An empty body.
        assert!(matches!(
            read_up_to(Body::empty(), 0).await.unwrap(),
            ReadBody::Whole(body) if body.is_empty()
        ));
    }

    #[tokio::test]
    async fn a_body_read_past_its_cap_keeps_its_length() {
        let mut frames = vec![Bytes::from_static(b"abc"), Bytes::from_static(b"de")];
        let rest = Body::from(Bytes::from_static(b"fgh"));
        let prefixed = Prefixed {
            prefix: frames.drain(..).collect(),
            rest,
        };
        assert_eq!(http_body::Body::size_hint(&prefixed).exact(), Some(8));
        assert_eq!(collect(Body::new(prefixed)).await, b"abcdefgh");
    }

    #[test]
    fn dates_are_imf_fixdate() {
        let at = chrono::DateTime::parse_from_rfc3339("1994-11-06T08:49:37Z").unwrap();
        assert_eq!(http_date(at.into()), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_stored_rows_never_panic(
            status in proptest::prelude::any::<u16>(),
            headers in proptest::collection::vec((".{0,20}", ".{0,40}"), 0..8),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let stored = StoredResponse { status, headers, body: body.into(), body_omitted: false };
            if let Ok(response) = from_stored(&stored, replay(&Provenance::default())) {
                proptest::prop_assert_eq!(response.status().as_u16(), status);
                let parts = response.into_parts().0;
                // What was sent can be stored again.
                let again = to_stored(
                    &parts,
                    Some(stored.body.clone()),
                    &crate::axum::request_id::REQUEST_ID_HEADER,
                    &Dialect::ietf(),
                );
                proptest::prop_assert!(again.is_ok());
            }
        }
    }
}
