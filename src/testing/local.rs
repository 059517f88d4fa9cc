//! Throwaway clusters made from the PostgreSQL server binaries installed on this machine.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Instant;

use super::{Env, TestServerError};

/// Where the binaries are looked for after `PG_BIN` and `pg_config --bindir`, unless
/// `PG_SEARCH_DIRS` (a `:`-separated list of the same kind) replaces the list. A `*` stands for
/// one path component; among its matches the highest version wins.
const DEFAULT_SEARCH_DIRS: &[&str] = &[
    "/usr/lib/postgresql/*/bin",          // Debian, Ubuntu
    "/usr/pgsql-*/bin",                   // RHEL, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin", // Homebrew, Apple silicon
    "/usr/local/opt/postgresql@*/bin",    // Homebrew, Intel
    "/usr/local/pgsql/bin",               // built from source
];

const TOOLS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// How many free ports to try when another process takes the one picked before the server binds it.
const PORT_ATTEMPTS: usize = 5;

/// How many lines of the server log go into an error.
const LOG_TAIL_LINES: usize = 40;

/// Settings for a [`LocalCluster`].
///
/// ```
/// use pg_idempotency::testing::LocalClusterOptions;
///
/// let options = LocalClusterOptions::default().fsync(true).max_connections(50);
/// assert!(options.fsync);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LocalClusterOptions {
    /// Whether the server flushes to disk (`fsync`). Off by default, which is much faster and
    /// loses nothing unless the machine itself crashes; benchmarks that want real commit costs
    /// turn it on.
    pub fsync: bool,
    /// The server's `max_connections` (default 200).
    pub max_connections: u32,
    /// The TCP port on 127.0.0.1; `None` (the default) picks a free one.
    pub port: Option<u16>,
}

impl Default for LocalClusterOptions {
    fn default() -> Self {
        Self {
            fsync: false,
            max_connections: 200,
            port: None,
        }
    }
}

impl LocalClusterOptions {
    /// Sets [`fsync`](Self::fsync).
    #[must_use]
    pub fn fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// Sets [`max_connections`](Self::max_connections).
    #[must_use]
    pub fn max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections;
        self
    }

    /// Sets [`port`](Self::port).
    #[must_use]
    pub fn port(mut self, port: Option<u16>) -> Self {
        self.port = port;
        self
    }
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
#[derive(Debug, Clone)]
pub(super) struct PgBin {
    dir: PathBuf,
}

impl PgBin {
    fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn has_server_binaries(dir: &Path) -> bool {
    TOOLS.iter().all(|tool| is_executable(&dir.join(tool)))
}

/// Finds the server binaries: `PG_BIN` if set (then only there), else `pg_config --bindir`,
/// else the search directories, else `initdb` on `PATH`. On failure, returns what was looked at.
pub(super) fn find_binaries(env: Env<'_>) -> Result<PgBin, Vec<String>> {
    let mut looked_at = Vec::new();
    if let Some(dir) = env("PG_BIN") {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(PgBin { dir });
        }
        looked_at.push(format!(
            "PG_BIN={} (no initdb, pg_ctl and postgres there; when PG_BIN is set nothing else is searched)",
            dir.display()
        ));
        return Err(looked_at);
    }
    let path = env("PATH").unwrap_or_default();

    match find_on_path(&path, "pg_config") {
        Some(pg_config) => {
            let out = Command::new(&pg_config)
                .arg("--bindir")
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output();
            match out {
                Ok(out) if out.status.success() => {
                    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                    if has_server_binaries(&dir) {
                        return Ok(PgBin { dir });
                    }
                    looked_at.push(format!(
                        "`{} --bindir` = {} (no server binaries there)",
                        pg_config.display(),
                        dir.display()
                    ));
                }
                _ => looked_at.push(format!("`{} --bindir` (failed)", pg_config.display())),
            }
        }
        None => looked_at.push("pg_config on PATH (not found)".to_owned()),
    }

    let search = env("PG_SEARCH_DIRS");
    let patterns: Vec<&str> = match &search {
        Some(list) => list.split(':').filter(|s| !s.is_empty()).collect(),
        None => DEFAULT_SEARCH_DIRS.to_vec(),
    };
    for pattern in &patterns {
        if let Some(dir) = expand(pattern).into_iter().find(|d| has_server_binaries(d)) {
            return Ok(PgBin { dir });
        }
    }
    if !patterns.is_empty() {
        looked_at.push(format!("{} (nothing)", patterns.join(", ")));
    }

    if let Some(initdb) = find_on_path(&path, "initdb") {
        let beside = initdb.parent().map(Path::to_path_buf);
        let resolved = fs::canonicalize(&initdb)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        for dir in [beside, resolved].into_iter().flatten() {
            if has_server_binaries(&dir) {
                return Ok(PgBin { dir });
            }
        }
        looked_at.push(format!(
            "{} (on PATH, but pg_ctl or postgres is not beside it)",
            initdb.display()
        ));
    } else {
        looked_at.push("initdb on PATH (not found)".to_owned());
    }
    Err(looked_at)
}

fn find_on_path(path: &str, name: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

/// Expands one `*` (within one path component) in `pattern`, highest version first.
fn expand(pattern: &str) -> Vec<PathBuf> {
    let Some(star) = pattern.find('*') else {
        return vec![PathBuf::from(pattern)];
    };
    let (before, after) = (&pattern[..star], &pattern[star + 1..]);
    let Some(slash) = before.rfind('/') else {
        return Vec::new();
    };
    let (parent, prefix) = (&before[..=slash], &before[slash + 1..]);
    let (suffix, rest) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, ""),
    };
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            name.len() >= prefix.len() + suffix.len()
                && name.starts_with(prefix)
                && name.ends_with(suffix)
        })
        .map(|name| {
            let middle = &name[prefix.len()..name.len() - suffix.len()];
            (
                version_key(middle),
                PathBuf::from(format!("{parent}{name}{rest}")),
            )
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, p)| p).collect()
}

fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The unprivileged user the server runs as when this process is root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

/// The effective uid, without libc: `/proc/self/status`, else `id -u`.
fn effective_uid() -> Option<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        return status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|euid| euid.parse().ok());
    }
    let out = Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `initdb` and `postgres` refuse to run as root: as root, pick `PG_TEST_USER` or `nobody`.
fn run_as(env: Env<'_>) -> Result<Option<RunAs>, TestServerError> {
    if effective_uid() != Some(0) {
        return Ok(None);
    }
    let name = env("PG_TEST_USER").unwrap_or_else(|| "nobody".to_owned());
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let found = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let (user, _pw, uid, gid) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        (user == name).then(|| Some((uid.parse::<u32>().ok()?, gid.parse::<u32>().ok()?)))?
    });
    match found {
        Some((uid, gid)) if uid != 0 => Ok(Some(RunAs { name, uid, gid })),
        _ => Err(TestServerError::NoUnprivilegedUser { user: name }),
    }
}

/// Single-quotes `value` for `postgresql.conf`.
fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn free_port() -> Result<u16, TestServerError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| TestServerError::io("cannot find a free port on 127.0.0.1", e))
}

fn output_text(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err.trim();
    if !err.is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(err);
    }
    text
}

/// A throwaway PostgreSQL cluster in a temporary directory, owned by this value.
///
/// It listens on 127.0.0.1 only (port [`port`](Self::port)), keeps its unix socket in its own
/// directory, trusts every local connection and has the superuser `postgres`. Run as root, the
/// server runs as `PG_TEST_USER` or `nobody`, since PostgreSQL refuses to run as root.
///
/// Dropping it stops the server (`-m immediate`) and removes the directory. A watchdog process
/// does the same if this process ends without dropping it, even when it is killed.
///
/// ```no_run
/// use pg_idempotency::testing::{LocalCluster, LocalClusterOptions, TestDatabase};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let cluster = LocalCluster::start(LocalClusterOptions::default())?;
/// let db = TestDatabase::create_on(&cluster.url()).await?;
/// // ... work ...
/// cluster.stop_immediate()?; // the server "crashes"
/// cluster.restart()?; // and comes back on the same port, after crash recovery
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LocalCluster {
    pub(super) dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    bin: PgBin,
    run_as: Option<RunAs>,
    watchdog: Option<Child>,
}

impl LocalCluster {
    /// Creates and starts a cluster (blocking; about a second). The binaries are found as
    /// described in the [module documentation](super).
    ///
    /// # Errors
    ///
    /// [`TestServerError::NoPostgres`] when no server binaries are found,
    /// [`TestServerError::NoUnprivilegedUser`] when running as root without a user to run the
    /// server as, [`TestServerError::Cluster`] when `initdb` or the start fails (with the
    /// server log's tail), [`TestServerError::Io`] when the directory cannot be prepared.
    pub fn start(options: LocalClusterOptions) -> Result<LocalCluster, TestServerError> {
        Self::start_with_env(&super::process_env, &options)
    }

    pub(super) fn start_with_env(
        env: Env<'_>,
        options: &LocalClusterOptions,
    ) -> Result<LocalCluster, TestServerError> {
        let bin = find_binaries(env).map_err(|looked_at| TestServerError::NoPostgres {
            looked_at: super::format_looked_at(&looked_at),
        })?;
        Self::start_with_bin(env, bin, options)
    }

    pub(super) fn start_with_bin(
        env: Env<'_>,
        bin: PgBin,
        options: &LocalClusterOptions,
    ) -> Result<LocalCluster, TestServerError> {
        let started = Instant::now();
        let run_as = run_as(env)?;
        let dir = make_dir(run_as.as_ref())?;
        let mut cluster = LocalCluster {
            data: dir.join("data"),
            log: dir.join("server.log"),
            dir,
            port: 0,
            bin,
            run_as,
            watchdog: None,
        };
        // From here on, dropping `cluster` (on any early return) cleans up.
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        cluster.initdb()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            cluster.port = match options.port {
                Some(port) => port,
                None => free_port()?,
            };
            cluster.write_config(options)?;
            let log_start = fs::metadata(&cluster.log).map_or(0, |m| m.len());
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(e) => {
                    let port_taken = read_from(&cluster.log, log_start).is_some_and(|l| {
                        l.contains("could not bind") || l.contains("already in use")
                    });
                    if !(port_taken && options.port.is_none() && attempt < PORT_ATTEMPTS) {
                        return Err(e);
                    }
                }
            }
        }
        tracing::debug!(
            dir = %cluster.dir.display(),
            port = cluster.port,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "started a throwaway PostgreSQL cluster"
        );
        Ok(cluster)
    }

    /// The URL of the maintenance database: `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The TCP port on 127.0.0.1 the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server with `pg_ctl stop -m immediate`, as a crash would: open connections
    /// break, and the next start runs crash recovery. Does nothing if it is not running.
    ///
    /// # Errors
    ///
    /// [`TestServerError::Cluster`] when `pg_ctl` fails, [`TestServerError::Io`] when it cannot
    /// be run.
    pub fn stop_immediate(&self) -> Result<(), TestServerError> {
        if !self.is_running()? {
            return Ok(());
        }
        self.pg_ctl_stop("immediate")
    }

    /// Starts the server again on the same data directory and port: after
    /// [`stop_immediate`](Self::stop_immediate), or, if it is running, after a fast shutdown.
    /// Returns once it accepts connections.
    ///
    /// # Errors
    ///
    /// [`TestServerError::Cluster`] (with the server log's tail) when it does not come back,
    /// for example because another process took the port meanwhile; [`TestServerError::Io`]
    /// when `pg_ctl` cannot be run.
    pub fn restart(&self) -> Result<(), TestServerError> {
        if self.is_running()? {
            self.pg_ctl_stop("fast")?;
        }
        self.pg_ctl_start()
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.tool(tool));
        cmd.current_dir(&self.dir)
            .stdin(Stdio::null())
            .env("LC_ALL", "C");
        // PGDATA, PGPORT, PGOPTIONS and friends must not steer these tools.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("PG")) {
                cmd.env_remove(key);
            }
        }
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid)
                .gid(user.gid)
                .env("HOME", &self.dir)
                .env("USER", &user.name);
        }
        cmd
    }

    fn run(&self, mut cmd: Command, what: &str) -> Result<Output, TestServerError> {
        cmd.output().map_err(|e| {
            TestServerError::io(format!("cannot run {what} ({})", self.bin.dir.display()), e)
        })
    }

    fn initdb(&self) -> Result<(), TestServerError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(&self.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        let out = self.run(cmd, "initdb")?;
        if !out.status.success() {
            return Err(TestServerError::Cluster {
                action: format!("initdb -D {}", self.data.display()),
                detail: output_text(&out),
            });
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf)
            .map_err(|e| TestServerError::io(format!("cannot read {}", conf.display()), e))?;
        text.push_str(
            "\n# Added by pg-idempotency's test support.\ninclude 'pg_idempotency.conf'\n",
        );
        fs::write(&conf, text)
            .map_err(|e| TestServerError::io(format!("cannot write {}", conf.display()), e))
    }

    fn write_config(&self, options: &LocalClusterOptions) -> Result<(), TestServerError> {
        let dir = self.dir.to_string_lossy();
        let mut conf = String::new();
        let _ = writeln!(conf, "listen_addresses = '127.0.0.1'");
        let _ = writeln!(conf, "port = {}", self.port);
        let _ = writeln!(conf, "unix_socket_directories = {}", conf_quote(&dir));
        let _ = writeln!(conf, "fsync = {}", if options.fsync { "on" } else { "off" });
        let _ = writeln!(conf, "max_connections = {}", options.max_connections);
        let path = self.data.join("pg_idempotency.conf");
        fs::write(&path, conf)
            .and_then(|()| match &self.run_as {
                Some(user) => chown(&path, Some(user.uid), Some(user.gid)),
                None => Ok(()),
            })
            .map_err(|e| TestServerError::io(format!("cannot write {}", path.display()), e))
    }

    fn pg_ctl_start(&self) -> Result<(), TestServerError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", "60", "-s", "start"])
            // Out of our process group, so a Ctrl-C on the terminal reaches the watchdog's
            // cleanup rather than killing the server under it.
            .process_group(0);
        let out = self.run(cmd, "pg_ctl start")?;
        if out.status.success() {
            return Ok(());
        }
        let mut detail = output_text(&out);
        let _ = write!(
            detail,
            "\n--- last lines of {} ---\n{}",
            self.log.display(),
            self.log_tail()
        );
        Err(TestServerError::Cluster {
            action: format!("pg_ctl start (port {})", self.port),
            detail,
        })
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), TestServerError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", "60", "-s", "stop"]);
        let out = self.run(cmd, "pg_ctl stop")?;
        if out.status.success() {
            Ok(())
        } else {
            Err(TestServerError::Cluster {
                action: format!("pg_ctl stop -m {mode}"),
                detail: output_text(&out),
            })
        }
    }

    fn is_running(&self) -> Result<bool, TestServerError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data).arg("status");
        Ok(self.run(cmd, "pg_ctl status")?.status.success())
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(cannot read: {e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// A `sh` that blocks reading a pipe only this process holds. When the pipe closes (this
    /// value is dropped, or the process ends in any way, SIGKILL included), it stops the server
    /// and removes the directory. It runs as the server's user, since `pg_ctl` refuses root, in
    /// its own process group so that a Ctrl-C meant for the tests does not stop it first.
    fn spawn_watchdog(&self) -> Result<Child, TestServerError> {
        let script = "trap '' INT HUP\n\
                      read -r _ignored\n\
                      \"$1\" -D \"$2\" -m immediate -w -t 30 -s stop >/dev/null 2>&1\n\
                      rm -rf \"$3\"\n";
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(script)
            .arg("pg-idempotency-cluster-watchdog")
            .arg(self.bin.tool("pg_ctl"))
            .arg(&self.data)
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .process_group(0);
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("PG")) {
                cmd.env_remove(key);
            }
        }
        if let Some(user) = &self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.spawn()
            .map_err(|e| TestServerError::io("cannot start the cluster's watchdog (/bin/sh)", e))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Closing the pipe tells the watchdog to stop the server and remove the directory;
        // wait for it, so both are gone when drop returns.
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take());
            let _ = watchdog.wait();
        }
        // In case the watchdog was killed: do it here too.
        if self.data.join("postmaster.pid").exists() {
            let _ = self.pg_ctl_stop("immediate");
        }
        if self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh directory for the cluster, `0700` and owned by the server's user. As root it is made
/// in `/tmp`, which every user can traverse (`TMPDIR` may point somewhere `nobody` cannot reach).
fn make_dir(run_as: Option<&RunAs>) -> Result<PathBuf, TestServerError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix("pg-idempotency-");
    let dir = match run_as {
        Some(_) => builder.tempdir_in("/tmp"),
        None => builder.tempdir(),
    }
    .map_err(|e| TestServerError::io("cannot create a temporary directory for the cluster", e))?
    .keep();
    let prepare = || -> io::Result<()> {
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        if let Some(user) = run_as {
            chown(&dir, Some(user.uid), Some(user.gid))?;
        }
        Ok(())
    };
    if let Err(e) = prepare() {
        let _ = fs::remove_dir_all(&dir);
        return Err(TestServerError::io(
            format!("cannot prepare {} for the server's user", dir.display()),
            e,
        ));
    }
    Ok(dir)
}

/// The text of `path` from byte `offset` on.
fn read_from(path: &Path, offset: u64) -> Option<String> {
    let mut file = fs::File::open(path).ok()?;
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::test_env as env_of;
    use std::time::Duration;

    #[test]
    fn versions_sort_numerically() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["9.6", "10", "15", "17"] {
            let bin = dir.path().join(v).join("bin");
            fs::create_dir_all(&bin).unwrap();
            for tool in TOOLS {
                fs::write(bin.join(tool), "").unwrap();
                fs::set_permissions(bin.join(tool), fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        let pattern = format!("{}/*/bin", dir.path().display());
        let found = expand(&pattern);
        assert_eq!(found[0], dir.path().join("17/bin"));
        assert_eq!(found[3], dir.path().join("9.6/bin"));
        let env = env_of(&[("PATH", "/nonexistent"), ("PG_SEARCH_DIRS", &pattern)]);
        assert_eq!(find_binaries(&env).unwrap().dir, dir.path().join("17/bin"));
    }

    #[test]
    fn pg_bin_when_set_is_the_only_place() {
        let env = env_of(&[
            ("PG_BIN", "/nonexistent"),
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ]);
        let looked_at = find_binaries(&env).unwrap_err();
        assert_eq!(looked_at.len(), 1);
        assert!(
            looked_at[0].contains("PG_BIN=/nonexistent"),
            "{looked_at:?}"
        );
    }

    #[test]
    fn nothing_anywhere_says_where_it_looked() {
        let env = env_of(&[
            ("PATH", "/nonexistent"),
            ("PG_SEARCH_DIRS", "/nonexistent/*/bin"),
        ]);
        let t = Instant::now();
        let looked_at = find_binaries(&env).unwrap_err().join("\n");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(looked_at.contains("pg_config on PATH"), "{looked_at}");
        assert!(looked_at.contains("/nonexistent/*/bin"), "{looked_at}");
        assert!(looked_at.contains("initdb on PATH"), "{looked_at}");
    }

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_quote("/tmp/it's"), "'/tmp/it''s'");
    }

    #[test]
    fn euid_is_read() {
        assert!(effective_uid().is_some());
    }
}
