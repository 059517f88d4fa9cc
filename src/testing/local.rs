//! Step 3 of the module documentation: throwaway clusters made from the PostgreSQL server
//! binaries installed on this machine.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use super::env::{Env, process_env};
use super::error::{TestServerError, format_looked_at};

/// Where the binaries are looked for after `PG_BIN` and `pg_config --bindir`, unless
/// `PG_SEARCH_DIRS` (a `:`-separated list of the same kind) replaces the list. A `*` stands for
/// (part of) one path component; among its matches the highest version wins.
const DEFAULT_SEARCH_DIRS: &[&str] = &[
    "/usr/lib/postgresql/*/bin",          // Debian, Ubuntu
    "/usr/pgsql-*/bin",                   // RHEL, Fedora (PGDG)
    "/opt/homebrew/opt/postgresql@*/bin", // Homebrew, Apple silicon
    "/usr/local/opt/postgresql@*/bin",    // Homebrew, Intel
    "/usr/local/pgsql/bin",               // built from source
];

/// How many free ports to try when another process takes the one picked before the server
/// binds it.
const PORT_ATTEMPTS: usize = 5;

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

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|tool| is_executable(&dir.join(tool)))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(path: &str, name: &str) -> Option<PathBuf> {
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| is_executable(p))
}

/// Finds the directory of `initdb`, `pg_ctl` and `postgres`: `PG_BIN` if set (then only there),
/// else `pg_config --bindir`, else the search directories, else beside `initdb` on `PATH`.
/// On failure, returns what was looked at, one entry per place.
pub(super) fn find_binaries(env: Env<'_>) -> Result<PathBuf, Vec<String>> {
    if let Some(dir) = env("PG_BIN") {
        return match has_server_binaries(Path::new(&dir)) {
            true => Ok(PathBuf::from(dir)),
            false => Err(vec![format!(
                "PG_BIN={dir} (no initdb, pg_ctl and postgres there; when PG_BIN is set \
                 nothing else is searched)"
            )]),
        };
    }
    let mut looked_at = Vec::new();
    let path = env("PATH").unwrap_or_default();

    if let Some(pg_config) = find_on_path(&path, "pg_config") {
        let out = Command::new(&pg_config)
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        let dir = out.map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        match dir {
            Ok(dir) if has_server_binaries(&dir) => return Ok(dir),
            Ok(dir) => looked_at.push(format!(
                "`{} --bindir` = {} (no server binaries there)",
                pg_config.display(),
                dir.display()
            )),
            Err(e) => looked_at.push(format!("`{} --bindir` ({e})", pg_config.display())),
        }
    } else {
        looked_at.push("pg_config on PATH (not found)".to_owned());
    }

    let search = env("PG_SEARCH_DIRS");
    let patterns: Vec<&str> = match &search {
        Some(list) => list.split(':').filter(|s| !s.is_empty()).collect(),
        None => DEFAULT_SEARCH_DIRS.to_vec(),
    };
    if let Some(dir) = patterns
        .iter()
        .flat_map(|pattern| expand(pattern))
        .find(|dir| has_server_binaries(dir))
    {
        return Ok(dir);
    }
    looked_at.push(format!("{} (nothing)", patterns.join(", ")));

    match find_on_path(&path, "initdb") {
        Some(initdb) => {
            // Beside it, or beside what it links to (as in /usr/bin -> /usr/lib/.../bin).
            let resolved = fs::canonicalize(&initdb).unwrap_or_else(|_| initdb.clone());
            for candidate in [&initdb, &resolved] {
                if let Some(dir) = candidate.parent().filter(|d| has_server_binaries(d)) {
                    return Ok(dir.to_path_buf());
                }
            }
            looked_at.push(format!(
                "{} (on PATH, but pg_ctl or postgres is not beside it)",
                initdb.display()
            ));
        }
        None => looked_at.push("initdb on PATH (not found)".to_owned()),
    }
    Err(looked_at)
}

/// The paths `pattern` matches, with its one `*` standing for part of one path component,
/// highest version first.
fn expand(pattern: &str) -> Vec<PathBuf> {
    let Some((before, after)) = pattern.split_once('*') else {
        return vec![PathBuf::from(pattern)];
    };
    let Some((parent, prefix)) = before.rsplit_once('/') else {
        return Vec::new();
    };
    let (suffix, rest) = after.find('/').map_or((after, ""), |i| after.split_at(i));
    let Ok(entries) = fs::read_dir(format!("{parent}/")) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let middle = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
            let version = middle
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|part| part.parse().ok())
                .collect();
            Some((version, PathBuf::from(format!("{parent}/{name}{rest}"))))
        })
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    found.into_iter().map(|(_, path)| path).collect()
}

/// The unprivileged user the server runs as when this process is root.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

/// A number printed by `id` with these arguments (`-u`: our effective uid; `-u NAME`, `-g NAME`).
fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// `initdb` and `postgres` refuse to run as root: as root, pick `PG_TEST_USER` or `nobody`.
fn run_as(env: Env<'_>) -> Result<Option<RunAs>, TestServerError> {
    if id(&["-u"]) != Some(0) {
        return Ok(None);
    }
    let name = env("PG_TEST_USER").unwrap_or_else(|| "nobody".to_owned());
    match (id(&["-u", &name]), id(&["-g", &name])) {
        (Some(uid), Some(gid)) if uid != 0 => Ok(Some(RunAs { name, uid, gid })),
        _ => Err(TestServerError::NoUnprivilegedUser { user: name }),
    }
}

fn output_text(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    format!("{}\n{}", stdout.trim(), stderr.trim())
        .trim()
        .to_owned()
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
    pub(super) bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    run_as: Option<RunAs>,
    watchdog: Option<Child>,
    /// The options it started with (a standby starts with the same: hot standby needs
    /// at least its primary's `max_connections`).
    options: LocalClusterOptions,
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
        let env = &process_env;
        let bin = find_binaries(env).map_err(|looked_at| TestServerError::NoPostgres {
            looked_at: format_looked_at(&looked_at),
        })?;
        Self::start_with(env, bin, &options)
    }

    pub(super) fn start_with(
        env: Env<'_>,
        bin: PathBuf,
        options: &LocalClusterOptions,
    ) -> Result<LocalCluster, TestServerError> {
        let cluster = Self::prepare(env, bin, options)?;
        let mut initdb = cluster.command(cluster.bin.join("initdb"));
        initdb.arg("-D").arg(&cluster.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        cluster.run(initdb, format!("initdb -D {}", cluster.data.display()))?;
        cluster.first_start()
    }

    /// A cluster value for a new directory, with its watchdog, before its data exists.
    fn prepare(
        env: Env<'_>,
        bin: PathBuf,
        options: &LocalClusterOptions,
    ) -> Result<LocalCluster, TestServerError> {
        let run_as = run_as(env)?;
        let dir = make_dir(run_as.as_ref())?;
        let mut cluster = LocalCluster {
            data: dir.join("data"),
            log: dir.join("server.log"),
            dir,
            bin,
            port: 0,
            run_as,
            watchdog: None,
            options: options.clone(),
        };
        // From here on, dropping `cluster` (on any early return) cleans up.
        cluster.watchdog = Some(cluster.spawn_watchdog()?);
        Ok(cluster)
    }

    /// Starts the server on its new data directory: on the port asked for, or on a free
    /// one (another if a process takes it first).
    fn first_start(mut self) -> Result<LocalCluster, TestServerError> {
        let mut attempt = 1;
        loop {
            self.port = match self.options.port {
                Some(port) => port,
                None => free_port()?,
            };
            self.append_config()?;
            match self.pg_ctl_start() {
                Err(TestServerError::Cluster { detail, .. })
                    if self.options.port.is_none()
                        && attempt < PORT_ATTEMPTS
                        && (detail.contains("could not bind") || detail.contains("in use")) =>
                {
                    attempt += 1;
                }
                result => return result.map(|()| self),
            }
        }
    }

    /// Creates and starts a streaming standby of this cluster (blocking; a few seconds):
    /// `pg_basebackup` of this server, reached at `upstream_port` on 127.0.0.1 (this
    /// cluster's [`port`](Self::port), or a proxy in front of it), written with the
    /// settings that make it stream from there (`-R`). It runs on a free port, with this
    /// cluster's options, as `application_name` `standby`, and accepts read-only
    /// connections until [`promote`](Self::promote)d.
    ///
    /// For synchronous replication, set `synchronous_standby_names` on this cluster
    /// (`ALTER SYSTEM SET synchronous_standby_names = 'standby'` and
    /// `SELECT pg_reload_conf()`).
    ///
    /// # Errors
    ///
    /// As [`start`](Self::start); [`TestServerError::Cluster`] when `pg_basebackup`
    /// fails, with its output.
    pub fn start_standby(&self, upstream_port: u16) -> Result<LocalCluster, TestServerError> {
        let options = LocalClusterOptions {
            port: None,
            ..self.options.clone()
        };
        let standby = Self::prepare(&process_env, self.bin.clone(), &options)?;
        let mut backup = standby.command(standby.bin.join("pg_basebackup"));
        backup.arg("-D").arg(&standby.data).args([
            "-d",
            &format!("host=127.0.0.1 port={upstream_port} user=postgres application_name=standby"),
            "--wal-method=stream",
            "--write-recovery-conf",
            "--checkpoint=fast",
            "--no-sync",
        ]);
        standby.run(backup, format!("pg_basebackup from port {upstream_port}"))?;
        standby.first_start()
    }

    /// Promotes a standby (see [`start_standby`](Self::start_standby)) to a primary and
    /// returns once it accepts writes (`pg_ctl promote -w`).
    ///
    /// # Errors
    ///
    /// [`TestServerError::Cluster`] when `pg_ctl promote` fails, for example because
    /// this cluster is no standby; [`TestServerError::Io`] when it cannot be run.
    pub fn promote(&self) -> Result<(), TestServerError> {
        let cmd = self.pg_ctl(&["-w", "-t", "60", "-s", "promote"]);
        self.run(cmd, "pg_ctl promote".to_owned())
    }

    /// Kills the server and every process of it with SIGKILL at once, as the sudden death
    /// of its machine would: nothing is flushed, sent to a standby or answered after this.
    /// Returns once the server is gone. [`restart`](Self::restart) starts it again
    /// (crash recovery); dropping the value cleans up as usual.
    ///
    /// # Errors
    ///
    /// [`TestServerError::Cluster`] when the server is not running or does not die;
    /// [`TestServerError::Io`] when its pid file cannot be read or `kill` cannot be run.
    pub fn kill(&self) -> Result<(), TestServerError> {
        let pid_file = self.data.join("postmaster.pid");
        let pid = fs::read_to_string(&pid_file)
            .map_err(|e| TestServerError::io(format!("cannot read {}", pid_file.display()), e))?
            .lines()
            .next()
            .and_then(|line| line.trim().parse::<u32>().ok())
            .ok_or_else(|| TestServerError::Cluster {
                action: "kill".to_owned(),
                detail: format!("{} names no process", pid_file.display()),
            })?;
        // `pg_ctl start` makes the postmaster lead a process group of its own (setsid),
        // which every server process joins: signal the group.
        let mut kill = Command::new("kill");
        kill.args(["-KILL", "--", &format!("-{pid}")])
            .stdin(Stdio::null());
        self.run(kill, format!("kill -KILL -{pid}"))?;
        for _ in 0..500 {
            if !self.is_running()? {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(TestServerError::Cluster {
            action: format!("kill -KILL -{pid}"),
            detail: "the server still runs 5 s after SIGKILL".to_owned(),
        })
    }

    /// The URL of the maintenance database: `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's log file (`server.log` in the cluster's directory), for tests that
    /// check what the server logged.
    pub fn log_path(&self) -> &std::path::Path {
        &self.log
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
        if self.is_running()? {
            self.pg_ctl_stop("immediate")?;
        }
        Ok(())
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

    /// A command run in the cluster's directory, as the server's user, with no `PG*` variable
    /// (`PGDATA`, `PGPORT`, ...) of ours to steer it.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.dir)
            .stdin(Stdio::null())
            .env("LC_ALL", "C");
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

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(&self.data).args(args);
        cmd
    }

    /// Runs `cmd`; a failure is [`TestServerError::Cluster`] with its output.
    fn run(&self, mut cmd: Command, action: String) -> Result<(), TestServerError> {
        let out = cmd.output().map_err(|e| {
            TestServerError::io(format!("cannot run {action} ({})", self.bin.display()), e)
        })?;
        if out.status.success() {
            return Ok(());
        }
        Err(TestServerError::Cluster {
            action,
            detail: output_text(&out),
        })
    }

    /// Appends this start's settings to `postgresql.conf`; the last setting of a name wins.
    fn append_config(&self) -> Result<(), TestServerError> {
        let options = &self.options;
        let dir = self
            .dir
            .to_string_lossy()
            .replace('\\', "\\\\")
            .replace('\'', "''");
        let settings = format!(
            "\n# pg-idempotency's test support\nlisten_addresses = '127.0.0.1'\nport = {}\n\
             unix_socket_directories = '{dir}'\nfsync = {}\nmax_connections = {}\n",
            self.port,
            if options.fsync { "on" } else { "off" },
            options.max_connections
        );
        let path = self.data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .map_err(|e| TestServerError::io(format!("cannot write {}", path.display()), e))
    }

    fn pg_ctl_start(&self) -> Result<(), TestServerError> {
        let mut cmd = self.pg_ctl(&["-l"]);
        cmd.arg(&self.log).args(["-w", "-t", "60", "-s", "start"]);
        // Out of our process group, so a Ctrl-C on the terminal reaches the watchdog's
        // cleanup rather than killing the server under it.
        cmd.process_group(0);
        self.run(cmd, format!("pg_ctl start (port {})", self.port))
            .map_err(|e| match e {
                TestServerError::Cluster { action, detail } => {
                    let log = fs::read_to_string(&self.log).unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                    let detail = format!("{detail}\n--- end of {} ---\n{tail}", self.log.display());
                    TestServerError::Cluster { action, detail }
                }
                other => other,
            })
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), TestServerError> {
        let cmd = self.pg_ctl(&["-m", mode, "-w", "-t", "60", "-s", "stop"]);
        self.run(cmd, format!("pg_ctl stop -m {mode}"))
    }

    fn is_running(&self) -> Result<bool, TestServerError> {
        let out = self.pg_ctl(&["status"]).output();
        let out = out.map_err(|e| TestServerError::io("cannot run pg_ctl status", e))?;
        Ok(out.status.success())
    }

    /// A `sh` that blocks reading a pipe only this process holds. When the pipe closes (this
    /// value is dropped, or the process ends in any way, SIGKILL included), it stops the server
    /// and removes the directory. It runs as the server's user, since `pg_ctl` refuses root, in
    /// its own process group so that a Ctrl-C meant for the tests does not stop it first.
    fn spawn_watchdog(&self) -> Result<Child, TestServerError> {
        let script = "trap '' INT HUP\nread -r _ignored\n\
                      \"$1\" -D \"$2\" -m immediate -w -t 30 -s stop >/dev/null 2>&1\n\
                      rm -rf \"$3\"\n";
        self.command("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg("pg-idempotency-cluster-watchdog")
            .arg(self.bin.join("pg_ctl"))
            .arg(&self.data)
            .arg(&self.dir)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
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
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<u16, TestServerError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| TestServerError::io("cannot find a free port on 127.0.0.1", e))
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
        match run_as {
            Some(user) => chown(&dir, Some(user.uid), Some(user.gid)),
            None => Ok(()),
        }
    };
    prepare().map_err(|e| {
        let _ = fs::remove_dir_all(&dir);
        TestServerError::io(
            format!("cannot prepare {} for the server's user", dir.display()),
            e,
        )
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::env::test_env as env_of;

    #[test]
    fn versions_sort_numerically() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["9.6", "10", "15", "17"] {
            let bin = dir.path().join(v).join("bin");
            fs::create_dir_all(&bin).unwrap();
            for tool in ["initdb", "pg_ctl", "postgres"] {
                fs::write(bin.join(tool), "").unwrap();
                fs::set_permissions(bin.join(tool), fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        let pattern = format!("{}/*/bin", dir.path().display());
        let found = expand(&pattern);
        assert_eq!(found[0], dir.path().join("17/bin"));
        assert_eq!(found[3], dir.path().join("9.6/bin"));
        let env = env_of(&[("PATH", "/nonexistent"), ("PG_SEARCH_DIRS", &pattern)]);
        assert_eq!(find_binaries(&env).unwrap(), dir.path().join("17/bin"));
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
        let looked_at = find_binaries(&env).unwrap_err().join("\n");
        assert!(looked_at.contains("pg_config on PATH"), "{looked_at}");
        assert!(looked_at.contains("/nonexistent/*/bin"), "{looked_at}");
        assert!(looked_at.contains("initdb on PATH"), "{looked_at}");
    }

    #[test]
    fn root_is_recognised() {
        assert!(id(&["-u"]).is_some());
    }
}
