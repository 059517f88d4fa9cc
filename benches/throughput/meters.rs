//! What a slice costs: operations, wall time and latencies ([`Tally`]), CPU of this
//! process and of the server's processes, and WAL written ([`Meter`], [`Cost`]).

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;

use crate::server::one;

/// What one slice (or several, added up) measured.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub ops: u64,
    pub wall: Duration,
    pub latencies_us: Vec<u32>,
    /// CPU time of this process, and of the server's processes, while the slices ran.
    pub cost: Cost,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.ops += other.ops;
        self.wall += other.wall;
        self.latencies_us.extend(other.latencies_us);
        self.cost.add(&other.cost);
    }

    pub fn tps(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile in milliseconds (nearest rank).
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let rank = ((q * self.latencies_us.len() as f64).ceil() as usize).max(1);
        f64::from(self.latencies_us[rank.min(self.latencies_us.len()) - 1]) / 1000.0
    }

    /// The longest latency in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.latencies_us
            .iter()
            .copied()
            .max()
            .map_or(f64::NAN, |us| f64::from(us) / 1000.0)
    }

    /// CPU time of this process per operation, in microseconds.
    pub fn client_us_per_op(&self, meter: &Meter) -> f64 {
        meter.micros_per_op(self.cost.client_ticks, self.ops)
    }

    /// CPU time of the server per operation, in microseconds, if it is known.
    pub fn server_us_per_op(&self, meter: &Meter) -> Option<f64> {
        self.cost
            .server_ticks
            .map(|ticks| meter.micros_per_op(ticks, self.ops))
    }

    /// WAL written per operation, in bytes, if it is known.
    pub fn wal_bytes_per_op(&self) -> Option<f64> {
        self.cost
            .wal_bytes
            .map(|bytes| bytes as f64 / self.ops.max(1) as f64)
    }
}

/// Where the time of a slice went: CPU of this process (the clients), CPU of the
/// server's processes and WAL written. Server CPU is known only for a server on this
/// machine; both server figures cover the whole server, other databases included.
#[derive(Debug, Default, Clone)]
pub struct Cost {
    /// How many measurements were added up (0: none yet).
    slices: u32,
    pub client_ticks: u64,
    pub server_ticks: Option<u64>,
    pub wal_bytes: Option<u64>,
}

impl Cost {
    fn add(&mut self, other: &Cost) {
        if self.slices == 0 {
            *self = other.clone();
            return;
        }
        self.slices += other.slices;
        self.client_ticks += other.client_ticks;
        self.server_ticks = self
            .server_ticks
            .zip(other.server_ticks)
            .map(|(a, b)| a + b);
        self.wal_bytes = self.wal_bytes.zip(other.wal_bytes).map(|(a, b)| a + b);
    }
}

/// Reads the counters behind [`Cost`].
pub struct Meter {
    ticks_per_second: u64,
    pub postmaster: Option<u32>,
}

/// A snapshot of the counters.
struct Reading {
    client_ticks: u64,
    server_ticks: Option<u64>,
    wal_lsn: Option<u64>,
}

impl Meter {
    /// Finds the server's postmaster if the server runs on this machine.
    pub async fn new(pool: &PgPool) -> Result<Self> {
        let backend: i32 = one(pool, "SELECT pg_backend_pid()").await?;
        let postmaster = proc_stat(u32::try_from(backend)?)
            .filter(|stat| stat.comm == "postgres")
            .map(|stat| stat.ppid)
            .filter(|&ppid| proc_stat(ppid).is_some_and(|stat| stat.comm == "postgres"));
        let ticks_per_second = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|out| out.trim().parse().ok())
            .unwrap_or(100);
        Ok(Self {
            ticks_per_second,
            postmaster,
        })
    }

    /// Runs `work` (a slice) and charges it what the counters moved meanwhile.
    pub async fn metered(
        &self,
        pool: &PgPool,
        work: impl Future<Output = Result<Tally>>,
    ) -> Result<Tally> {
        let before = self.read(pool).await;
        let mut tally = work.await?;
        tally.cost = self.cost(&before, &self.read(pool).await);
        Ok(tally)
    }

    async fn read(&self, pool: &PgPool) -> Reading {
        let wal_lsn = wal_lsn(pool)
            .await
            .ok()
            .and_then(|lsn| u64::try_from(lsn).ok());
        Reading {
            client_ticks: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|text| parse_stat(&text))
                .map_or(0, |stat| stat.ticks),
            server_ticks: self.postmaster.and_then(server_ticks),
            wal_lsn,
        }
    }

    fn cost(&self, before: &Reading, after: &Reading) -> Cost {
        Cost {
            slices: 1,
            client_ticks: after.client_ticks.saturating_sub(before.client_ticks),
            server_ticks: before
                .server_ticks
                .zip(after.server_ticks)
                .map(|(b, a)| a.saturating_sub(b)),
            wal_bytes: before
                .wal_lsn
                .zip(after.wal_lsn)
                .map(|(b, a)| a.saturating_sub(b)),
        }
    }

    fn micros_per_op(&self, ticks: u64, ops: u64) -> f64 {
        ticks as f64 * 1e6 / self.ticks_per_second as f64 / ops.max(1) as f64
    }
}

/// The server's WAL position in bytes (a simple query: [`one`]).
pub async fn wal_lsn(pool: &PgPool) -> Result<i64> {
    one(
        pool,
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
    )
    .await
}

/// The fields of `/proc/PID/stat` that [`Meter`] needs.
struct ProcStat {
    comm: String,
    ppid: u32,
    /// utime + stime
    ticks: u64,
    /// cutime + cstime: children that exited and were waited for
    child_ticks: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // After the comm: state(0) ppid(1) .. utime(11) stime(12) cutime(13) cstime(14).
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<i64>().ok());
    Some(ProcStat {
        comm,
        ppid: u32::try_from(num(1)?).ok()?,
        ticks: u64::try_from(num(11)? + num(12)?).ok()?,
        child_ticks: u64::try_from(num(13)? + num(14)?).ok()?,
    })
}

/// CPU ticks of the postmaster, its live children and its children that exited.
fn server_ticks(postmaster: u32) -> Option<u64> {
    let main = proc_stat(postmaster)?;
    let mut total = main.ticks + main.child_ticks;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(child) = proc_stat(pid).filter(|stat| stat.ppid == postmaster) {
            total += child.ticks;
        }
    }
    Some(total)
}
