//! A private PgBouncer in transaction mode in front of a test database: [`Pooler`], run
//! once per [`Flavour`] the machine offers ([`pooler_flavours`]).
//!
//! Two flavours: the machine's `pgbouncer` (Debian's package, 1.18: no protocol-level
//! prepared statements, so the client's URL turns sqlx's statement cache off with
//! `statement-cache-capacity=0`), and, when [`PGBOUNCER`] names one, a PgBouncer 1.21 or
//! later with `max_prepared_statements` set, whose clients keep sqlx's statement cache (its
//! named statements go through the pooler's protocol-level support). Each pooler runs with
//! its own configuration in a temporary directory, on a free port of 127.0.0.1. It logs in
//! to the server as the database URL's user (`auth_type = any`: the client's user name is
//! not checked), and keeps at most `pool_size` server connections per database. As root it
//! runs as `PG_TEST_USER`, else `nobody` (PgBouncer refuses to run as root).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// Set (to `1`) by `.ci/run`: a missing `pgbouncer` then fails the pooler tests instead of
/// skipping them.
pub const REQUIRE_POOLER: &str = "PG_IDEMPOTENCY_REQUIRE_POOLER";

/// Names a PgBouncer binary, 1.21 or later (e.g. built by `.ci/pgbouncer-from-source.sh`):
/// the pooler tests then also run through it, with `max_prepared_statements` set and sqlx's
/// statement cache on. Unset or empty: the machine's `pgbouncer` only.
pub const PGBOUNCER: &str = "PG_IDEMPOTENCY_PGBOUNCER";

/// The first PgBouncer release with protocol-level prepared statements
/// (`max_prepared_statements`).
pub const PREPARED_STATEMENTS_SINCE: (u32, u32, u32) = (1, 21, 0);

/// `max_prepared_statements` for the flavour that has them (PgBouncer's own default since
/// 1.24; the crate and the tests prepare far fewer).
pub const MAX_PREPARED_STATEMENTS: u32 = 200;

/// A PgBouncer binary, and whether the tests use its protocol-level prepared statements.
#[derive(Debug, Clone)]
pub struct Flavour {
    /// The `pgbouncer` binary.
    pub binary: PathBuf,
    /// Its version, from `pgbouncer --version`.
    pub version: (u32, u32, u32),
    /// `max_prepared_statements`: `Some` for a PgBouncer with protocol-level prepared
    /// statements, whose clients keep sqlx's statement cache; `None` for one without, whose
    /// clients' URL carries `statement-cache-capacity=0` (and which, if 1.21 or later, is
    /// given `max_prepared_statements = 0`).
    pub max_prepared_statements: Option<u32>,
}

impl Flavour {
    /// The machine's `pgbouncer`, used without prepared statements.
    pub fn without_prepared_statements(binary: PathBuf) -> Result<Self> {
        let version = pgbouncer_version(&binary)?;
        Ok(Self {
            binary,
            version,
            max_prepared_statements: None,
        })
    }

    /// A PgBouncer 1.21 or later, with `max_prepared_statements` set.
    pub fn with_prepared_statements(binary: PathBuf) -> Result<Self> {
        let version = pgbouncer_version(&binary)?;
        ensure!(
            version >= PREPARED_STATEMENTS_SINCE,
            "{} is PgBouncer {}.{}.{}: protocol-level prepared statements need 1.21 or later",
            binary.display(),
            version.0,
            version.1,
            version.2
        );
        Ok(Self {
            binary,
            version,
            max_prepared_statements: Some(MAX_PREPARED_STATEMENTS),
        })
    }

    /// Whether this PgBouncer knows `max_prepared_statements`.
    fn knows_prepared_statements(&self) -> bool {
        self.version >= PREPARED_STATEMENTS_SINCE
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (major, minor, patch) = self.version;
        write!(f, "PgBouncer {major}.{minor}.{patch} ")?;
        match self.max_prepared_statements {
            Some(n) => write!(f, "with max_prepared_statements = {n}")?,
            None => write!(f, "with statement-cache-capacity=0")?,
        }
        write!(f, " ({})", self.binary.display())
    }
}

/// The version `binary --version` prints on its first line (`PgBouncer 1.25.2`; before
/// 1.12, `PgBouncer version 1.x.y`).
pub fn pgbouncer_version(binary: &Path) -> Result<(u32, u32, u32)> {
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    ensure!(
        output.status.success() && first.starts_with("PgBouncer"),
        "{} --version: not a PgBouncer ({}): {first:?}",
        binary.display(),
        output.status
    );
    let version = first
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .with_context(|| format!("{} --version: no version in {first:?}", binary.display()))?;
    let mut numbers = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    Ok((
        numbers.next().unwrap_or(0),
        numbers.next().unwrap_or(0),
        numbers.next().unwrap_or(0),
    ))
}

/// How a [`Pooler`] is configured.
#[derive(Debug, Clone, Copy)]
pub struct PoolerConfig {
    /// `default_pool_size`: server connections per database and user.
    pub pool_size: u32,
    /// `max_client_conn`: client connections beyond it are refused at login.
    pub max_client_conn: u32,
}

impl Default for PoolerConfig {
    fn default() -> Self {
        Self {
            pool_size: 3,
            max_client_conn: 100,
        }
    }
}

/// A running PgBouncer, stopped when dropped.
pub struct Pooler {
    flavour: Flavour,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// The database URL's user, password and database.
    user: String,
    database: String,
}

/// The machine's `pgbouncer` binary, if installed (Debian puts it in /usr/sbin, which a
/// user's PATH may lack).
pub fn pgbouncer_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
}

/// The machine's `pgbouncer` binary, or `None` after saying why the test is skipped;
/// panics instead when [`REQUIRE_POOLER`] is set.
pub fn pgbouncer_or_skip(test: &str) -> Option<PathBuf> {
    let found = pgbouncer_binary();
    if found.is_none() {
        assert!(
            std::env::var(REQUIRE_POOLER).is_err(),
            "{test}: {REQUIRE_POOLER} is set but pgbouncer is not installed \
             (apt-get install pgbouncer)"
        );
        eprintln!("{test}: skipped, pgbouncer is not installed (apt-get install pgbouncer)");
    }
    found
}

/// The flavours to run `test` through, in order: the machine's `pgbouncer` without
/// prepared statements (skipped with a message when not installed, a panic when
/// [`REQUIRE_POOLER`] is set), then the PgBouncer that [`PGBOUNCER`] names, with them.
/// Panics when [`PGBOUNCER`] names something missing, not a PgBouncer, or older than 1.21.
pub fn pooler_flavours(test: &str) -> Vec<Flavour> {
    let mut flavours = Vec::new();
    if let Some(binary) = pgbouncer_or_skip(test) {
        flavours.push(
            Flavour::without_prepared_statements(binary)
                .unwrap_or_else(|error| panic!("{test}: {error:#}")),
        );
    }
    match std::env::var_os(PGBOUNCER) {
        Some(binary) if !binary.is_empty() => {
            let binary = PathBuf::from(binary);
            assert!(
                binary.is_file(),
                "{test}: {PGBOUNCER}={} is not a file (build one with \
                 .ci/pgbouncer-from-source.sh, see docs/OPERATIONS.md, \"Poolers\")",
                binary.display()
            );
            let flavour = Flavour::with_prepared_statements(binary)
                .unwrap_or_else(|error| panic!("{test}: {PGBOUNCER}: {error:#}"));
            flavours.push(flavour);
        }
        _ => {}
    }
    flavours
}

/// The parts of a `postgres://user[:password]@host[:port]/database[?..]` URL that the
/// pooler's `[databases]` entry needs (no percent-decoding: the test servers' URLs have
/// none).
struct ServerUrl {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    database: String,
}

fn parse_url(url: &str) -> Result<ServerUrl> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .context("not a postgres:// URL")?;
    let rest = rest.split('?').next().unwrap_or_default();
    let (authority, database) = rest.split_once('/').context("the URL names no database")?;
    let (userinfo, hostport) = authority
        .rsplit_once('@')
        .context("the URL names no user")?;
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password.to_owned())),
        None => (userinfo, None),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().context("the URL's port")?),
        None => (hostport, 5432),
    };
    Ok(ServerUrl {
        host: if host.is_empty() { "127.0.0.1" } else { host }.to_owned(),
        port,
        user: user.to_owned(),
        password,
        database: database.to_owned(),
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

impl Pooler {
    /// Starts a pooler of `flavour` in front of the server and database that
    /// `database_url` names.
    pub fn start(flavour: &Flavour, database_url: &str, config: PoolerConfig) -> Result<Self> {
        let server = parse_url(database_url)?;
        let dir = tempfile::Builder::new()
            .prefix("pg-idempotency-pgbouncer-")
            .tempdir()?;
        let port = free_port()?;
        let password = server
            .password
            .as_deref()
            .map(|p| format!(" password={p}"))
            .unwrap_or_default();
        // `max_prepared_statements`: only PgBouncer 1.21 and later know it; 0 turns the
        // protocol-level prepared statements off (1.24 and later default to 200).
        let prepared = if flavour.knows_prepared_statements() {
            let max = flavour.max_prepared_statements.unwrap_or(0);
            format!("max_prepared_statements = {max}\n")
        } else {
            String::new()
        };
        // `ignore_startup_parameters`: sqlx sends extra_float_digits at login, which
        // PgBouncer refuses unless told to ignore it.
        let ini = format!(
            "[databases]\n\
             * = host={host} port={server_port} user={user}{password}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = any\n\
             pool_mode = transaction\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = {max_client_conn}\n\
             ignore_startup_parameters = extra_float_digits\n\
             server_login_retry = 1\n\
             {prepared}",
            host = server.host,
            server_port = server.port,
            user = server.user,
            pool_size = config.pool_size,
            max_client_conn = config.max_client_conn,
        );
        std::fs::write(dir.path().join("pgbouncer.ini"), ini)?;
        // The server user (nobody, as root) reads the configuration.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        let mut pooler = Self {
            flavour: flavour.clone(),
            dir,
            port,
            child: None,
            user: server.user,
            database: server.database,
        };
        pooler.resume()?;
        Ok(pooler)
    }

    /// The URL of the database through the pooler, as sqlx users write it behind this
    /// flavour: with `statement-cache-capacity=0` when the pooler has no protocol-level
    /// prepared statements, as it is (sqlx names and caches its statements) when it has.
    pub fn url(&self) -> String {
        let options = match self.flavour.max_prepared_statements {
            Some(_) => "",
            None => "?statement-cache-capacity=0",
        };
        format!(
            "postgres://{}@127.0.0.1:{}/{}{options}",
            self.user, self.port, self.database
        )
    }

    /// The flavour this pooler runs.
    pub fn flavour(&self) -> &Flavour {
        &self.flavour
    }

    /// The pooler's log (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }

    /// Kills the pooler at once (SIGKILL): its clients' and server connections break
    /// wherever they are, transactions included.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the pooler again on the same port, and waits until it accepts connections.
    pub fn resume(&mut self) -> Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("pgbouncer.log"))?;
        let mut command = Command::new(&self.flavour.binary);
        command.arg(self.dir.path().join("pgbouncer.ini"));
        #[cfg(unix)]
        if is_root() {
            let user = std::env::var("PG_TEST_USER").unwrap_or_else(|_| "nobody".to_owned());
            command.args(["-u", &user]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.flavour.binary.display()))?;
        self.child = Some(child);
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("{} exited ({status}):\n{}", self.flavour, self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen within 10 s:\n{}",
                    self.flavour,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

#[cfg(unix)]
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

impl Drop for Pooler {
    fn drop(&mut self) {
        self.kill();
    }
}
