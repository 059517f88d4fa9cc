//! HTTP helpers: a server on a local port, a real client, raw HTTP/1.1, and checks for
//! problem bodies and request ids.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A router served on 127.0.0.1 on a free port, until [`Server::stop`].
pub struct Server {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start(router: Router) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self { addr, stop, task })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Graceful shutdown: in-flight requests finish first.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("the server did not stop")???;
        Ok(())
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a client")
}

pub fn new_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The fields of every problem body, sorted.
pub const PROBLEM_FIELDS: [&str; 8] = [
    "advice_code",
    "code",
    "detail",
    "param",
    "request_id",
    "status",
    "title",
    "type",
];

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub async fn of(response: reqwest::Response) -> Result<Self> {
        Ok(Self {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await?.to_vec(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "{} body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Checks that this is a problem with `status` and `code`, with exactly the 8 fields,
    /// `application/problem+json`, and a `request_id` equal to the `X-Request-Id` header.
    /// Returns the body.
    pub fn problem(&self, status: u16, code: &str) -> Result<Value> {
        ensure!(
            self.status == status,
            "expected {status} {code}, got {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        ensure!(
            self.header("content-type") == Some("application/problem+json"),
            "content-type {:?}",
            self.header("content-type")
        );
        let json = self.json()?;
        let object = json.as_object().context("problem is not an object")?;
        let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
        fields.sort_unstable();
        ensure!(fields == PROBLEM_FIELDS, "problem fields: {fields:?}");
        ensure!(json["status"] == status, "status field {}", json["status"]);
        ensure!(
            json["code"] == code,
            "code {} instead of {code}",
            json["code"]
        );
        for field in ["type", "title", "detail", "advice_code"] {
            ensure!(
                json[field].as_str().is_some_and(|s| !s.is_empty()),
                "{field} is {}",
                json[field]
            );
        }
        ensure!(json["param"].is_null() || json["param"].is_string());
        let request_id = self.request_id()?;
        ensure!(
            json["request_id"] == request_id,
            "request_id {} but header {request_id}",
            json["request_id"]
        );
        Ok(json)
    }

    /// The `X-Request-Id` header (there must be exactly one).
    pub fn request_id(&self) -> Result<&str> {
        let values: Vec<_> = self.headers.get_all("x-request-id").iter().collect();
        ensure!(values.len() == 1, "x-request-id headers: {values:?}");
        Ok(values[0].to_str()?)
    }
}

/// Whether `id` is `req_` + 26 Crockford base32 characters.
pub fn is_generated_request_id(id: &str) -> bool {
    id.len() == 30
        && id.starts_with("req_")
        && id[4..]
            .bytes()
            .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b))
}

/// Sends `request` (a whole HTTP/1.1 request, with `Connection: close`) over a fresh
/// connection and returns every byte of the answer.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .context("no answer in 30 s")??;
    Ok(answer)
}

/// A raw response: status, header lines as (lower-case name, raw line), body.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    pub lines: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

pub fn parse_raw(answer: &[u8]) -> Result<RawAnswer> {
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("no end of head in {:?}", String::from_utf8_lossy(answer));
    };
    let head = &answer[..end];
    let body = answer[end + 4..].to_vec();
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = String::from_utf8_lossy(lines.next().context("no status line")?).to_string();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .context("no status")?
        .parse()?;
    let lines = lines
        .map(|line| {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            (
                String::from_utf8_lossy(name).to_ascii_lowercase(),
                line.to_vec(),
            )
        })
        .collect();
    Ok(RawAnswer {
        status,
        lines,
        body,
    })
}

/// A `POST` with `Connection: close` and the given extra header lines.
pub fn raw_post(path: &str, headers: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n").into_bytes();
    for header in headers {
        request.extend_from_slice(header);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    request
}
