//! A private PgBouncer in transaction mode in front of a test database: [`Pooler`].
//!
//! The pooler runs from the machine's `pgbouncer` (Debian's package, 1.18), with its own
//! configuration in a temporary directory, on a free port of 127.0.0.1. It logs in to the
//! server as the database URL's user (`auth_type = any`: the client's user name is not
//! checked), and keeps at most `pool_size` server connections per database. As root it
//! runs as `PG_TEST_USER`, else `nobody` (PgBouncer refuses to run as root).

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Set (to `1`) by `.ci/run`: a missing `pgbouncer` then fails the pooler tests instead of
/// skipping them.
pub const REQUIRE_POOLER: &str = "PG_IDEMPOTENCY_REQUIRE_POOLER";

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
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    /// The database URL's user, password and database.
    user: String,
    database: String,
}

/// The `pgbouncer` binary, if installed (Debian puts it in /usr/sbin, which a user's PATH
/// may lack).
pub fn pgbouncer_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
}

/// The `pgbouncer` binary, or `None` after saying why the test is skipped; panics instead
/// when [`REQUIRE_POOLER`] is set.
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
    /// Starts a pooler in front of the server and database that `database_url` names.
    pub fn start(binary: &Path, database_url: &str, config: PoolerConfig) -> Result<Self> {
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
             server_login_retry = 1\n",
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
            binary: binary.to_owned(),
            dir,
            port,
            child: None,
            user: server.user,
            database: server.database,
        };
        pooler.resume()?;
        Ok(pooler)
    }

    /// The URL of the database through the pooler, as sqlx users behind a pooler without
    /// protocol-level prepared statements write it.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}?statement-cache-capacity=0",
            self.user, self.port, self.database
        )
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
        let mut command = Command::new(&self.binary);
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
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("pgbouncer exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("pgbouncer did not listen within 10 s:\n{}", self.log());
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
