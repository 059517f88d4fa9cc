//! Docker: a fast probe for a daemon that answers, and a postgres container through
//! testcontainers that lives as long as the process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use testcontainers_modules::postgres::Postgres;
use testcontainers_modules::testcontainers::ImageExt;
use testcontainers_modules::testcontainers::runners::AsyncRunner;

use super::Env;

/// How long the whole probe (resolve, connect, `GET /_ping`) may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long starting the container (pulling the image included) may take before the
/// module gives up on Docker and looks for local binaries instead.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// The image tag used unless `PG_TEST_IMAGE_TAG` says otherwise. `DROP DATABASE ... WITH (FORCE)`
/// needs PostgreSQL 13 or later, so testcontainers' own default (11) will not do.
const DEFAULT_TAG: &str = "17-alpine";

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Probe {
    /// A daemon answered at this `DOCKER_HOST`-style address.
    Answers {
        /// `unix:///path` or `tcp://host:port`.
        host: String,
    },
    /// No daemon to use; the text says what was looked at, for the "no PostgreSQL" error.
    No {
        /// Where and why not.
        looked_at: String,
    },
}

/// Finds out, within [`PROBE_TIMEOUT`], whether a Docker daemon answers where testcontainers
/// would look for one: `DOCKER_HOST`, else the first existing default socket.
pub(super) fn probe(env: Env<'_>) -> Probe {
    if let Some(v) = env("PG_TEST_DOCKER")
        && matches!(
            v.to_ascii_lowercase().as_str(),
            "0" | "false" | "no" | "off"
        )
    {
        return Probe::No {
            looked_at: format!("Docker (skipped: PG_TEST_DOCKER={v})"),
        };
    }
    let host = match env("DOCKER_HOST") {
        Some(host) => host,
        None => {
            let candidates = default_sockets(env);
            match candidates.iter().find(|p| p.exists()) {
                Some(path) => format!("unix://{}", path.display()),
                None => {
                    let list: Vec<String> =
                        candidates.iter().map(|p| p.display().to_string()).collect();
                    return Probe::No {
                        looked_at: format!(
                            "Docker (DOCKER_HOST not set, no socket at {})",
                            list.join(", ")
                        ),
                    };
                }
            }
        }
    };
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let result = if let Some(path) = host.strip_prefix("unix://") {
        ping_unix(Path::new(path), deadline)
    } else if let Some(rest) = host.strip_prefix("tcp://") {
        ping_tcp(rest, tls_expected(env, rest), deadline)
    } else {
        Err("only unix:// and tcp:// DOCKER_HOST addresses are probed".to_owned())
    };
    match result {
        Ok(()) => Probe::Answers { host },
        Err(why) => Probe::No {
            looked_at: format!("Docker at {host} ({why})"),
        },
    }
}

/// The sockets testcontainers tries when `DOCKER_HOST` is not set, in its order.
fn default_sockets(env: Env<'_>) -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/var/run/docker.sock")];
    if let Some(dir) = env("XDG_RUNTIME_DIR") {
        paths.push(Path::new(&dir).join(".docker/run/docker.sock"));
    }
    if let Some(home) = env("HOME") {
        paths.push(Path::new(&home).join(".docker/run/docker.sock"));
        paths.push(Path::new(&home).join(".docker/desktop/docker.sock"));
    }
    paths
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left < Duration::from_millis(1) {
        Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis()))
    } else {
        Ok(left)
    }
}

fn ping_unix(path: &Path, deadline: Instant) -> Result<(), String> {
    let stream = UnixStream::connect(path).map_err(|e| format!("cannot connect: {e}"))?;
    let left = remaining(deadline)?;
    stream
        .set_read_timeout(Some(left))
        .and_then(|()| stream.set_write_timeout(Some(left)))
        .map_err(|e| e.to_string())?;
    ping(stream, deadline)
}

/// `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH` or port 2376 mean the daemon speaks TLS, which this
/// probe does not: then a completed TCP connection is taken as the answer.
fn tls_expected(env: Env<'_>, addr: &str) -> bool {
    env("DOCKER_TLS_VERIFY").is_some_and(|v| v != "0")
        || env("DOCKER_CERT_PATH").is_some()
        || addr.trim_end_matches('/').ends_with(":2376")
}

fn ping_tcp(addr: &str, tls: bool, deadline: Instant) -> Result<(), String> {
    let authority = addr.split('/').next().unwrap_or(addr);
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if tls { 2376 } else { 2375 })
    };
    // Name resolution can block for seconds; do it on a thread we are free to abandon.
    let (tx, rx) = mpsc::channel();
    let to_resolve = authority.clone();
    std::thread::Builder::new()
        .name("pg-idempotency-docker-resolve".to_owned())
        .spawn(move || {
            let _ = tx.send(
                to_resolve
                    .to_socket_addrs()
                    .map(Iterator::collect::<Vec<SocketAddr>>),
            );
        })
        .map_err(|e| e.to_string())?;
    let addrs = match rx.recv_timeout(remaining(deadline)?) {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(e)) => return Err(format!("cannot resolve {authority}: {e}")),
        Err(_) => return Err(format!("cannot resolve {authority} in time")),
    };
    let mut last = format!("{authority} resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, remaining(deadline)?) {
            Ok(stream) => {
                if tls {
                    return Ok(());
                }
                let left = remaining(deadline)?;
                stream
                    .set_read_timeout(Some(left))
                    .and_then(|()| stream.set_write_timeout(Some(left)))
                    .map_err(|e| e.to_string())?;
                return ping(stream, deadline);
            }
            Err(e) => last = format!("cannot connect to {addr}: {e}"),
        }
    }
    Err(last)
}

/// Sends `GET /_ping` and wants `200` back before the deadline.
fn ping(mut stream: impl Read + Write, deadline: Instant) -> Result<(), String> {
    stream
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("cannot send /_ping: {e}"))?;
    let mut got = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !got.windows(2).any(|w| w == b"\r\n") && got.len() < 1024 {
        remaining(deadline)?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("no answer to /_ping: {e}")),
        }
    }
    let status_line = String::from_utf8_lossy(&got);
    let status_line = status_line.lines().next().unwrap_or("").trim().to_owned();
    let mut parts = status_line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some("200")) if v.starts_with("HTTP/") => Ok(()),
        _ if status_line.is_empty() => Err("empty answer to /_ping".to_owned()),
        _ => Err(format!("/_ping answered `{status_line}`")),
    }
}

/// A running postgres container. The container object and the runtime that started it stay
/// on their own parked thread for the life of the process; the watchdog removes the container
/// when the process ends, however it ends.
#[derive(Debug)]
pub(super) struct Container {
    pub(super) url: String,
    pub(super) id: String,
    _watchdog: Option<Child>,
}

/// Starts `postgres:<tag>` (trust auth, fsync off, 200 connections) and waits until it accepts
/// connections.
pub(super) fn start(env: Env<'_>) -> Result<Container, String> {
    let tag = env("PG_TEST_IMAGE_TAG").unwrap_or_else(|| DEFAULT_TAG.to_owned());
    let (tx, rx) = mpsc::channel::<Result<(String, String), String>>();
    std::thread::Builder::new()
        .name("pg-idempotency-testcontainers".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("cannot build a tokio runtime: {e}")));
                    return;
                }
            };
            let started = runtime.block_on(async {
                let request = Postgres::default()
                    .with_host_auth()
                    .with_tag(tag)
                    .with_cmd(["-c", "fsync=off", "-c", "max_connections=200"])
                    .with_startup_timeout(Duration::from_secs(120));
                let container = tokio::time::timeout(START_TIMEOUT, request.start())
                    .await
                    .map_err(|_| format!("not started within {} s", START_TIMEOUT.as_secs()))?
                    .map_err(|e| e.to_string())?;
                let host = container.get_host().await.map_err(|e| e.to_string())?;
                let port = container
                    .get_host_port_ipv4(5432)
                    .await
                    .map_err(|e| e.to_string())?;
                let url = format!("postgres://postgres:postgres@{host}:{port}/postgres");
                Ok::<_, String>((container, url))
            });
            match started {
                Ok((container, url)) => {
                    let _ = tx.send(Ok((url, container.id().to_owned())));
                    // Keep the container (whose drop would remove it) and its runtime alive
                    // for as long as the process lives.
                    let _keep = (container, runtime);
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })
        .map_err(|e| format!("cannot spawn a thread: {e}"))?;
    let (url, id) = rx
        .recv()
        .map_err(|_| "the testcontainers thread died".to_owned())??;
    let watchdog = spawn_watchdog(&id);
    Ok(Container {
        url,
        id,
        _watchdog: watchdog,
    })
}

/// A `sh` that blocks reading a pipe only this process holds; when the process ends (even by
/// SIGKILL) the pipe closes and it runs `docker rm -f -v <id>`. Needs the `docker` CLI, which
/// reads the same `DOCKER_HOST`/`DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`.
fn spawn_watchdog(id: &str) -> Option<Child> {
    let script = "trap '' INT HUP\nread -r _ignored\ndocker rm -f -v \"$1\" >/dev/null 2>&1\n";
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .arg("pg-idempotency-container-watchdog")
        .arg(id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .process_group(0)
        .spawn();
    match child {
        Ok(child) => Some(child),
        Err(e) => {
            tracing::warn!(
                container = id,
                error = %e,
                "cannot start the container watchdog; the container may outlive this process"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_env as env_of;
    use std::os::unix::net::UnixListener;

    #[test]
    fn no_socket_is_no_docker_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap().to_owned();
        let env = env_of(&[("HOME", &home)]);
        let t = Instant::now();
        let probe = probe(&env);
        let took = t.elapsed();
        if !Path::new("/var/run/docker.sock").exists() {
            assert!(matches!(probe, Probe::No { .. }), "{probe:?}");
        }
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn machine_probe_is_fast() {
        let t = Instant::now();
        let probe = probe(&super::super::process_env);
        let took = t.elapsed();
        eprintln!("docker probe on this machine: {probe:?} in {took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn socket_that_answers_200_is_docker() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).unwrap();
            assert!(buf.starts_with(b"GET /_ping "));
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")
                .unwrap();
        });
        let host = format!("unix://{}", sock.display());
        let env = env_of(&[("DOCKER_HOST", &host)]);
        assert_eq!(probe(&env), Probe::Answers { host });
        server.join().unwrap();
    }

    #[test]
    fn silent_socket_times_out_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        // Accepts (the backlog does) but never answers.
        let _listener = UnixListener::bind(&sock).unwrap();
        let host = format!("unix://{}", sock.display());
        let env = env_of(&[("DOCKER_HOST", &host)]);
        let t = Instant::now();
        let probe = probe(&env);
        let took = t.elapsed();
        assert!(matches!(probe, Probe::No { .. }), "{probe:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn tcp_nothing_listening_is_no_docker() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("tcp://127.0.0.1:{port}");
        let env = env_of(&[("DOCKER_HOST", &host)]);
        let t = Instant::now();
        assert!(matches!(probe(&env), Probe::No { .. }));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn opt_out_skips_docker() {
        let env = env_of(&[
            ("PG_TEST_DOCKER", "0"),
            ("DOCKER_HOST", "tcp://127.0.0.1:1"),
        ]);
        let Probe::No { looked_at } = probe(&env) else {
            panic!("expected no docker")
        };
        assert!(looked_at.contains("PG_TEST_DOCKER"), "{looked_at}");
    }
}
