//! A real PostgreSQL server for tests, examples and benchmarks (cargo feature `testing`).
//!
//! [`TestServer::shared`] finds or starts one server per process, in this order, and the first
//! time it does, prints one line to stderr saying which server it chose (URL without password)
//! and why it skipped the steps before:
//!
//! 1. **`DATABASE_URL`**, when set: that server is used as it is, and fresh databases are
//!    created on it (the user in the URL needs `CREATEDB`).
//! 2. **Docker**, when a daemon answers testcontainers' own client within 2 s: a
//!    `postgres:17-alpine` container, kept for the life of the process. The daemon removes it,
//!    with its volume, when the process ends however it ends (even by `kill -9`); no `docker`
//!    command-line tool is needed.
//! 3. **Local binaries**: a throwaway cluster made with `initdb` in a fresh temporary directory,
//!    listening on 127.0.0.1 only, on a free port, with its unix socket in that directory and
//!    trust authentication for the user `postgres`. As root, the server runs as an
//!    unprivileged user, because PostgreSQL refuses to run as root. A watchdog process stops
//!    the server and removes the directory when the test process ends, however it ends.
//! 4. Otherwise [`TestServerError::NoPostgres`], which says how to get PostgreSQL and where it
//!    looked.
//!
//! On that server, [`TestDatabase::create`] (or [`fresh_pool`]) makes a fresh, uniquely named
//! database with this crate's migrations applied, so tests never see each other's rows.
//! Tests that stop and restart the server own a [`LocalCluster`] of their own.
//!
//! Nothing in the process-wide state is bound to a tokio runtime, so every `#[tokio::test]`,
//! each with its own runtime, may use it at once.
//!
//! # Environment variables
//!
//! An empty value counts as unset.
//!
//! | Variable | Effect |
//! |---|---|
//! | `DATABASE_URL` | Use this `postgres://` server (step 1). |
//! | `PG_TEST_DOCKER` | `0`, `false`, `no` or `off` skips Docker (step 2). |
//! | `PG_TEST_IMAGE` | The whole image reference to run, such as `mirror.example:5000/library/postgres:17-alpine` (default `postgres:17-alpine`; without a tag, `latest`). It must behave like the official `postgres` image, version 14 or later (the majors the crate supports). |
//! | `PG_TEST_IMAGE_TAG` | Older, and ignored when `PG_TEST_IMAGE` is set: runs `postgres:<tag>`. |
//! | `PG_TEST_PULL_TIMEOUT` | Seconds a pull of a missing image may take before Docker is given up (default 60). A present image is never pulled. |
//! | `DOCKER_HOST`, `DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`, `DOCKER_CONFIG`, `DOCKER_AUTH_CONFIG`, `DOCKER_DEFAULT_PLATFORM` | Read by testcontainers, as it documents: where the daemon is (else `/var/run/docker.sock`, then the rootless and Docker Desktop sockets under `$XDG_RUNTIME_DIR` and `~/.docker`), and the credentials and platform for pulls. |
//! | `PG_BIN` | The directory of `initdb`, `pg_ctl` and `postgres` (step 3); when set, nothing else is searched. |
//! | `PG_SEARCH_DIRS` | A `:`-separated list of directories to search for them, each with at most one `*`, the highest version winning; replaces `/usr/lib/postgresql/*/bin:/usr/pgsql-*/bin:/opt/homebrew/opt/postgresql@*/bin:/usr/local/opt/postgresql@*/bin:/usr/local/pgsql/bin`. Searched after `pg_config --bindir` and before `initdb` on `PATH`. |
//! | `PG_TEST_USER` | The user the server runs as when the tests run as root (default `nobody`). |
//!
//! # Example
//!
//! In a crate that has `pg-idempotency = { version = "...", features = ["testing"] }` among
//! its dev-dependencies:
//!
//! ```no_run
//! use pg_idempotency::testing::{TestDatabase, fresh_pool};
//!
//! #[tokio::test]
//! async fn stores_a_key() -> Result<(), Box<dyn std::error::Error>> {
//!     let pool = fresh_pool().await?;
//!     let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await?;
//!     assert_eq!(one, 1);
//!     Ok(())
//! }
//!
//! #[tokio::test]
//! async fn cleans_up_after_itself() -> Result<(), Box<dyn std::error::Error>> {
//!     let db = TestDatabase::create().await?;
//!     sqlx::query("SELECT count(*) FROM idempotency_keys").execute(db.pool()).await?;
//!     db.close().await?; // drops the database, also on a DATABASE_URL server
//!     Ok(())
//! }
//! # fn main() {}
//! ```

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool};

mod docker;
mod env;
mod error;
mod local;

use env::{Env, process_env};
pub use error::TestServerError;
pub use local::{LocalCluster, LocalClusterOptions};

/// How long connecting to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections in the pool of a [`TestDatabase`], at most. They are opened on demand, so this
/// only bounds tests that hammer one database concurrently; a throwaway server allows 200.
const POOL_MAX_CONNECTIONS: u32 = 80;

/// Where the server came from.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerSource {
    /// The server named by the `DATABASE_URL` environment variable.
    DatabaseUrl,
    /// A postgres container started through testcontainers.
    Testcontainers,
    /// A throwaway cluster made from the PostgreSQL binaries installed on this machine.
    LocalCluster,
}

/// A PostgreSQL server reachable by URL.
pub struct TestServer {
    url: String,
    source: ServerSource,
    /// A started local cluster, held for its drop and its watchdog. (A container is held by
    /// the thread that started it.)
    _cluster: Option<LocalCluster>,
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("url", &redact(&self.url))
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// The outcome of the one attempt per process to find or start the shared server (an error
/// kept as [`TestServerError::replay`] makes it).
static SHARED: OnceLock<Result<TestServer, TestServerError>> = OnceLock::new();

impl TestServer {
    /// The process-wide shared server: found or started by the first call, in the order
    /// described in the [module documentation](self), and reused by every later call. A
    /// started server lives until the process ends and is removed after it.
    ///
    /// Safe to call from many `#[tokio::test]`s at once, each on its own runtime: the first
    /// call does the (blocking) work on tokio's blocking pool and the others wait for it.
    ///
    /// # Errors
    ///
    /// [`TestServerError::NoPostgres`] when there is no way to get a server,
    /// [`TestServerError::InvalidDatabaseUrl`] for a `DATABASE_URL` that is not a postgres URL,
    /// and the errors of [`LocalCluster::start`] when a local cluster does not start. A failure
    /// is remembered: later calls return it again at once (as
    /// [`TestServerError::EarlierFailure`], or `NoPostgres` again).
    pub async fn shared() -> Result<&'static TestServer, TestServerError> {
        if let Some(outcome) = SHARED.get() {
            return outcome.as_ref().map_err(TestServerError::replay);
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            match tokio::task::spawn_blocking(init_shared).await {
                Ok(result) => result,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(TestServerError::io(
                    "finding or starting the shared test server was cancelled",
                    io::Error::other(e.to_string()),
                )),
            }
        } else {
            init_shared()
        }
    }

    /// The URL of the server's maintenance database, such as
    /// `postgres://postgres@127.0.0.1:PORT/postgres` (for `DATABASE_URL`, that URL as given).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the server came from.
    pub fn source(&self) -> ServerSource {
        self.source
    }

    /// A URL for the database named `name` on this server: [`url`](Self::url) with its
    /// database replaced (user, password, host, port and query parameters kept).
    pub fn database_url(&self, name: &str) -> String {
        with_database(&self.url, name)
    }
}

fn init_shared() -> Result<&'static TestServer, TestServerError> {
    let mut first_error = None;
    let outcome = SHARED.get_or_init(|| {
        discover(&process_env).map_err(|e| {
            let kept = e.replay();
            first_error = Some(e);
            kept
        })
    });
    match first_error {
        Some(e) => Err(e),
        None => outcome.as_ref().map_err(TestServerError::replay),
    }
}

/// Steps 1 to 4 of the module documentation; says on stderr which server it chose, and why.
fn discover(env: Env<'_>) -> Result<TestServer, TestServerError> {
    fn found(
        url: String,
        source: ServerSource,
        cluster: Option<LocalCluster>,
        how: String,
    ) -> Result<TestServer, TestServerError> {
        // Written to stderr itself: `eprintln!` in a test would be captured, and shown only
        // if that test fails.
        let line = format!("pg-idempotency: {how}, {}\n", redact(&url));
        let _ = io::Write::write_all(&mut io::stderr(), line.as_bytes());
        Ok(TestServer {
            url,
            source,
            _cluster: cluster,
        })
    }
    if let Some(url) = env("DATABASE_URL") {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(TestServerError::InvalidDatabaseUrl);
        }
        return found(
            url,
            ServerSource::DatabaseUrl,
            None,
            "tests use DATABASE_URL".into(),
        );
    }
    let why_not_docker = match docker::start(env) {
        Ok(url) => {
            let (name, tag) = docker::image(env);
            let how = format!("tests use a {name}:{tag} container");
            return found(url, ServerSource::Testcontainers, None, how);
        }
        Err(why) => why,
    };
    match local::find_binaries(env) {
        Ok(bin) => {
            let cluster = LocalCluster::start_with(env, bin, &LocalClusterOptions::default())?;
            let how = format!(
                "{why_not_docker}: tests use local binaries from {}",
                cluster.bin.display()
            );
            found(
                cluster.url(),
                ServerSource::LocalCluster,
                Some(cluster),
                how,
            )
        }
        Err(places) => {
            let mut looked_at = vec!["DATABASE_URL (not set)".to_owned(), why_not_docker];
            looked_at.extend(places);
            Err(TestServerError::NoPostgres {
                looked_at: error::format_looked_at(&looked_at),
            })
        }
    }
}

/// `url` split into its scheme with `://`, its authority (user, password, host, port) and the
/// rest (path, query, fragment); `None` without `://`.
fn split_url(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    Some((&url[..start], &url[start..end], &url[end..]))
}

/// `url` with its database (path) replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let Some((scheme, authority, rest)) = split_url(url) else {
        return url.to_owned();
    };
    let query = &rest[rest.find(['?', '#']).unwrap_or(rest.len())..];
    let name: String = name
        .bytes()
        .map(
            |b| match b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                true => char::from(b).to_string(),
                false => format!("%{b:02X}"),
            },
        )
        .collect();
    format!("{scheme}{authority}/{name}{query}")
}

/// `url` with any password replaced by `***`, for logs and `Debug`.
fn redact(url: &str) -> String {
    let Some((scheme, authority, rest)) = split_url(url) else {
        return url.to_owned();
    };
    let user_and_host = authority
        .rsplit_once('@')
        .and_then(|(userinfo, host)| Some((userinfo.split_once(':')?.0, host)));
    match user_and_host {
        Some((user, host)) => format!("{scheme}{user}:***@{host}{rest}"),
        None => url.to_owned(),
    }
}

async fn connect(url: &str) -> Result<PgConnection, TestServerError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(TestServerError::Timeout {
            what: format!("connecting to {}", redact(url)),
            seconds: CONNECT_TIMEOUT.as_secs(),
        }),
    }
}

/// A fresh, uniquely named database on a server, with this crate's migrations applied.
#[derive(Debug)]
pub struct TestDatabase {
    pool: PgPool,
    name: String,
    url: String,
    server_url: String,
}

impl TestDatabase {
    /// Creates a fresh database, named `pg_idempotency_test_<uuid>`, on
    /// [`TestServer::shared`], applies this crate's migrations, and returns it with a pool of up
    /// to 80 connections (opened on demand).
    ///
    /// # Errors
    ///
    /// The errors of [`TestServer::shared`] and of [`create_on`](Self::create_on).
    pub async fn create() -> Result<TestDatabase, TestServerError> {
        let server = TestServer::shared().await?;
        Self::create_on(server.url()).await
    }

    /// Creates a fresh database on the server whose maintenance database `server_url` names
    /// (for example [`LocalCluster::url`]), applies this crate's migrations, and returns it.
    ///
    /// # Errors
    ///
    /// [`TestServerError::Database`] when the server cannot be reached or refuses
    /// `CREATE DATABASE`, [`TestServerError::Timeout`] when connecting takes over 30 s,
    /// [`TestServerError::Migrate`] when the migrations fail.
    pub async fn create_on(server_url: &str) -> Result<TestDatabase, TestServerError> {
        let name = format!("pg_idempotency_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = connect(server_url).await?;
        // The name is ours, of letters, digits and `_`: it needs no quoting.
        let create = format!("CREATE DATABASE {name}");
        let mut attempt = 0;
        loop {
            attempt += 1;
            match sqlx::raw_sql(AssertSqlSafe(create.as_str()))
                .execute(&mut conn)
                .await
            {
                Ok(_) => break,
                // 55006: someone is connected to template1 right now; it passes.
                Err(e)
                    if attempt < 20
                        && e.as_database_error().and_then(|d| d.code()).as_deref()
                            == Some("55006") =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let _ = conn.close().await;

        let url = with_database(server_url, &name);
        let db = TestDatabase {
            pool: PgPoolOptions::new()
                .max_connections(POOL_MAX_CONNECTIONS)
                .acquire_timeout(CONNECT_TIMEOUT)
                .connect_lazy(&url)?,
            name,
            url,
            server_url: server_url.to_owned(),
        };
        if let Err(e) = crate::MIGRATOR.run(&db.pool).await {
            let _ = db.drop_database().await;
            return Err(e.into());
        }
        Ok(db)
    }

    /// The pool of connections to this database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The URL of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The name of this database.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes the pool and drops the database (`WITH (FORCE)`, so connections still open
    /// elsewhere do not stop it). Databases not closed this way stay on a `DATABASE_URL`
    /// server; on a container or local cluster they vanish with the server.
    ///
    /// # Errors
    ///
    /// [`TestServerError::Database`] or [`TestServerError::Timeout`] when the server cannot be
    /// reached or refuses the `DROP DATABASE`.
    pub async fn close(self) -> Result<(), TestServerError> {
        self.drop_database().await
    }

    async fn drop_database(&self) -> Result<(), TestServerError> {
        self.pool.close().await;
        let mut conn = connect(&self.server_url).await?;
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        sqlx::raw_sql(AssertSqlSafe(drop))
            .execute(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok(())
    }
}

/// A pool on a fresh database on [`TestServer::shared`], with this crate's migrations applied:
/// `TestDatabase::create()` without the need to keep the [`TestDatabase`]. The database is
/// left for the server's lifetime.
///
/// # Errors
///
/// The errors of [`TestDatabase::create`].
pub async fn fresh_pool() -> Result<PgPool, TestServerError> {
    Ok(TestDatabase::create().await?.pool.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::env::test_env as env_of;
    use std::time::Instant;

    #[test]
    fn database_url_replaces_only_the_database() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "db_1"),
            "postgres://postgres@127.0.0.1:5432/db_1"
        );
        assert_eq!(
            with_database("postgresql://u:p%2Fw@h:1/app?sslmode=disable", "x"),
            "postgresql://u:p%2Fw@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(
            with_database("postgres:///app?host=/var/run/postgresql", "x"),
            "postgres:///x?host=/var/run/postgresql"
        );
        assert_eq!(
            with_database("postgres://h/a", "we ird"),
            "postgres://h/we%20ird"
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:1/d"),
            "postgres://u:***@h:1/d"
        );
        assert_eq!(redact("postgres://u@h:1/d"), "postgres://u@h:1/d");
        assert_eq!(
            redact("postgresql://u:p@ss@h/d?sslmode=require"),
            "postgresql://u:***@h/d?sslmode=require"
        );
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn database_url_wins() {
        let env = env_of(&[("DATABASE_URL", "postgres://a@b:1/c")]);
        let server = discover(&env).unwrap();
        assert_eq!(server.source(), ServerSource::DatabaseUrl);
        assert_eq!(server.url(), "postgres://a@b:1/c");
        assert_eq!(server.database_url("d"), "postgres://a@b:1/d");
        let env = env_of(&[("DATABASE_URL", "mysql://a@b/c")]);
        assert!(matches!(
            discover(&env),
            Err(TestServerError::InvalidDatabaseUrl)
        ));
    }

    #[test]
    fn nothing_found_is_one_clear_error_quickly() {
        let home = tempfile::tempdir().unwrap();
        let home = home.path().to_str().unwrap().to_owned();
        let env = env_of(&[
            ("PATH", "/nonexistent"),
            (
                "PG_SEARCH_DIRS",
                "/nonexistent/*/bin:/nonexistent/pgsql/bin",
            ),
            ("HOME", &home),
            ("PG_TEST_DOCKER", "0"),
        ]);
        let t = Instant::now();
        let err = discover(&env).unwrap_err();
        let took = t.elapsed();
        let message = err.to_string();
        eprintln!("error after {took:?}:\n{message}");
        assert!(matches!(err, TestServerError::NoPostgres { .. }));
        assert!(took < Duration::from_secs(2), "{took:?}");
        for needle in [
            "DATABASE_URL",
            "Docker",
            "apt-get install postgresql",
            "PG_BIN",
            "/nonexistent/*/bin",
        ] {
            assert!(message.contains(needle), "{needle} missing in {message}");
        }
    }

    #[tokio::test]
    async fn fresh_pool_works() {
        let server = TestServer::shared().await.unwrap();
        eprintln!("shared server: {server:?}");
        let pool = fresh_pool().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn fresh_pool_works_concurrently() {
        let pool = fresh_pool().await.unwrap();
        let db: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(db.starts_with("pg_idempotency_test_"), "{db}");
    }

    #[tokio::test]
    async fn close_drops_the_database() {
        let db = TestDatabase::create().await.unwrap();
        let name = db.name().to_owned();
        let server = TestServer::shared().await.unwrap();
        assert_eq!(db.url(), server.database_url(&name));
        // A second connection, still open, does not stop the drop.
        let mut other = PgConnection::connect(db.url()).await.unwrap();
        db.close().await.unwrap();
        let mut conn = PgConnection::connect(server.url()).await.unwrap();
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert!(!exists);
        assert!(sqlx::query("SELECT 1").execute(&mut other).await.is_err());
    }

    /// Needs local server binaries; skipped (with a note) where there are none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_cluster_stops_restarts_and_cleans_up() {
        if local::find_binaries(&process_env).is_err() {
            eprintln!("skipped: no PostgreSQL server binaries on this machine");
            return;
        }
        let t = Instant::now();
        let cluster = tokio::task::spawn_blocking(|| {
            LocalCluster::start(
                LocalClusterOptions::default()
                    .fsync(true)
                    .max_connections(50),
            )
        })
        .await
        .unwrap()
        .unwrap();
        eprintln!("LocalCluster::start took {:?}", t.elapsed());
        let port = cluster.port();
        let dir = cluster.dir.clone();
        assert!(dir.exists());
        assert!(
            dir.join(format!(".s.PGSQL.{port}")).exists(),
            "unix socket in the cluster's dir"
        );

        let mut conn = PgConnection::connect(&cluster.url()).await.unwrap();
        for (setting, expected) in [
            ("fsync", "on"),
            ("max_connections", "50"),
            ("listen_addresses", "127.0.0.1"),
        ] {
            let value: String = sqlx::query_scalar("SELECT current_setting($1)")
                .bind(setting)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(value, expected, "{setting}");
        }
        drop(conn);

        let db = TestDatabase::create_on(&cluster.url()).await.unwrap();
        let mut conn = PgConnection::connect(db.url()).await.unwrap();
        sqlx::query("SELECT 1").execute(&mut conn).await.unwrap();

        let cluster = tokio::task::spawn_blocking(move || {
            cluster.stop_immediate().unwrap();
            cluster
        })
        .await
        .unwrap();
        assert!(sqlx::query("SELECT 1").execute(&mut conn).await.is_err());
        assert!(PgConnection::connect(db.url()).await.is_err());

        let t = Instant::now();
        let cluster = tokio::task::spawn_blocking(move || {
            cluster.restart().unwrap();
            cluster
        })
        .await
        .unwrap();
        eprintln!("LocalCluster::restart after a crash took {:?}", t.elapsed());
        assert_eq!(cluster.port(), port);
        let mut conn = PgConnection::connect(db.url()).await.unwrap();
        let migrated: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(migrated, 0);
        // A restart while running is a fast shutdown and a start.
        let cluster = tokio::task::spawn_blocking(move || {
            cluster.restart().unwrap();
            cluster
        })
        .await
        .unwrap();
        PgConnection::connect(db.url()).await.unwrap();
        drop(conn);
        db.pool().close().await;

        let t = Instant::now();
        tokio::task::spawn_blocking(move || drop(cluster))
            .await
            .unwrap();
        eprintln!("LocalCluster drop took {:?}", t.elapsed());
        assert!(!dir.exists(), "{} still exists", dir.display());
        assert!(
            PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
                .await
                .is_err()
        );
    }

    /// Run only by [`docker_that_cannot_work_falls_back_fast`], in a child process whose
    /// `DOCKER_*` variables (read by testcontainers from the real environment) cannot work.
    #[tokio::test]
    #[ignore = "run in a child process by docker_that_cannot_work_falls_back_fast"]
    async fn child_without_docker() {
        let t = Instant::now();
        let why = docker::start(&process_env).unwrap_err();
        eprintln!("CHILD docker step, after {:?}: {why}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let has_binaries = local::find_binaries(&process_env).is_ok();
        match TestServer::shared().await {
            Ok(server) => assert_eq!(server.source(), ServerSource::LocalCluster),
            Err(TestServerError::NoPostgres { looked_at }) if !has_binaries => {
                assert!(looked_at.contains(&why), "{looked_at}");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn docker_that_cannot_work_falls_back_fast() {
        let dir = tempfile::tempdir().unwrap();
        // Listeners that never accept: the kernel completes the connection, nobody answers.
        let silent_socket = dir.path().join("docker.sock");
        let _unix = std::os::unix::net::UnixListener::bind(&silent_socket).unwrap();
        let silent_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let silent_tcp = format!("tcp://{}", silent_tcp.local_addr().unwrap());
        let closed_tcp = format!("tcp://127.0.0.1:{closed_port}");
        let silent_unix = format!("unix://{}", silent_socket.display());
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("DOCKER_HOST", &silent_tcp)], "within 2 s"),
            (&[("DOCKER_HOST", &silent_unix)], "within 2 s"),
            (
                &[("DOCKER_HOST", &closed_tcp)],
                "no Docker daemon at tcp://",
            ),
            (
                &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
                "no Docker daemon",
            ),
            // testcontainers panics on TLS without DOCKER_CERT_PATH; that must not hang.
            (
                &[("DOCKER_HOST", &closed_tcp), ("DOCKER_TLS_VERIFY", "1")],
                "Docker not used",
            ),
        ];
        for (vars, expected) in cases {
            let t = Instant::now();
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "testing::tests::child_without_docker"])
                .args(["--ignored", "--nocapture", "--test-threads=1"])
                .env_remove("DATABASE_URL")
                .env_remove("PG_TEST_DOCKER")
                .envs(vars.iter().copied())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            eprintln!("{vars:?} took {:?}:\n{stderr}", t.elapsed());
            assert!(out.status.success(), "{vars:?}: {stderr}");
            let step = stderr.lines().find(|l| l.starts_with("CHILD docker step"));
            assert!(
                step.is_some_and(|l| l.contains(expected)),
                "{vars:?}: {stderr}"
            );
            if local::find_binaries(&process_env).is_ok() {
                assert!(
                    stderr.contains(": tests use local binaries from "),
                    "{stderr}"
                );
            }
        }
    }
}
