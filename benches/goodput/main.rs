//! Overload and goodput (issue 24): the payments demo (`examples/payments`) as a
//! separate process, driven past its capacity.
//!
//! ```text
//! cargo bench --bench goodput                    # 10 s per phase
//! cargo bench --bench goodput -- --quick         # 4 s per phase, about 3 minutes
//! cargo bench --bench goodput -- --json out.json --sections goodput,memory
//! ```
//!
//! The benchmark builds the demo (`cargo build --release --example payments`, in this
//! crate's target directory; `--payments PATH` names a binary instead) and starts it with
//! `--database-url` of a database of its own on the server (`DATABASE_URL`, else a
//! throwaway local cluster with fsync on, from the installed PostgreSQL binaries), so
//! the resident memory it reads from `/proc/<pid>/status` (`VmRSS`, sampled every 10 ms,
//! and `VmHWM`) is the demo's alone. Sections:
//!
//! - `goodput`: the capacity `C` (64 closed-loop clients, fresh keys, small bodies,
//!   `delay_ms` 0, 20 tenants), then open-loop phases at 0.1×, 1×, 2× and 4× `C`:
//!   requests leave on a fixed schedule whatever the answers (at most
//!   `--max-outstanding` at once; the others are counted as not sent), in a fixed mix:
//!   72% fresh requests and 8% duplicates (a key sent four times in a row) from 20 quiet
//!   tenants, 2% large bodies (256 KiB to 1 MiB) from them, and from one flooding
//!   tenant 10% slow keys (`delay_ms` 500 to 2,000) and 8% fast requests. Reported per
//!   phase over its measured window (after a 1 s warm-up): goodput (answers other than
//!   503 per second), answers by status, p50/p99 of the answers given, the quiet tenants'
//!   fresh requests' p99, each tenant's share of the goodput, the demo's RSS, and the
//!   states of the demo's connections (`pg_stat_activity`, sampled every 100 ms).
//! - `memory`: 1,500 concurrent requests with bodies at the demo's 1 MiB limit, on a
//!   fresh demo: peak and after-load RSS.
//! - `duplicates`: two demo processes on one database; a request with `delay_ms` 600
//!   (then 1,500) held in instance A and 2,000 duplicates of it spread over A and B:
//!   transactions per duplicate (`xact_commit + xact_rollback` of the database, read
//!   after both instances stopped so that their backends have reported, less a quiet
//!   control run and the holder's own) and how late each duplicate answers after the
//!   holder's answer.
//! - `review`: the first review's scenarios: 2,000 distinct slow keys (`delay_ms`
//!   10,000) from one tenant with other tenants' requests meanwhile, and 30 keys × 500
//!   duplicates (`delay_ms` 1,000), three times, with another tenant's requests (every
//!   20 ms, from a thread and runtime of their own, on a connection opened before) 100
//!   before the storms and for as long as each runs: their p99 over the storms and over
//!   the first 2 s of each, in which its requests arrive. Then the same storms on the
//!   [yardstick], a service without the crate that this binary serves in a process of
//!   its own: what the storm costs another tenant where no idempotency layer runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use pg_idempotency::testing::{LocalCluster, LocalClusterOptions, TestDatabase};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

#[path = "../../examples/common/serve.rs"]
mod serve;
mod yardstick;

/// The demo's body limit (`examples/payments/app.rs`, `BODY_LIMIT`).
const BODY_LIMIT: usize = 1024 * 1024;
/// Quiet tenants; the flooding one is `flood`.
const QUIET_TENANTS: usize = 20;
/// Times a duplicated key is sent.
const DUPLICATES: u32 = 4;
/// The demo's connections' `application_name`.
const DEMO_APPLICATION: &str = "payments-demo";

/// Overload, goodput and memory of the payments demo under a mixed flood.
#[derive(Debug, Parser)]
#[command(name = "goodput")]
struct Args {
    /// 4 s per phase instead of 10.
    #[arg(long)]
    quick: bool,
    /// Seconds each open-loop phase is measured (after a 1 s warm-up).
    #[arg(long)]
    seconds: Option<f64>,
    /// Sections to run, comma-separated, from `goodput`, `memory`, `duplicates`,
    /// `review`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "goodput,memory,duplicates,review"
    )]
    sections: Vec<Section>,
    /// At most this many requests outstanding in an open-loop phase; the schedule's
    /// others are counted as not sent.
    #[arg(long, default_value_t = 8_000)]
    max_outstanding: usize,
    /// Concurrent 1 MiB requests of the `memory` section.
    #[arg(long, default_value_t = 1_500)]
    memory_requests: usize,
    /// The demo binary [default: built with `cargo build --release --example payments`].
    #[arg(long)]
    payments: Option<PathBuf>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// PostgreSQL server to create the benchmark database on [default: a throwaway
    /// local cluster with fsync on].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    /// Serve the duplicate storm's yardstick on `--database-url` instead (the review
    /// starts this binary so, as a process of its own beside the demo's).
    #[arg(long, hide = true)]
    yardstick: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Goodput,
    Memory,
    Duplicates,
    Review,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.yardstick {
        let url = args
            .database_url
            .as_deref()
            .context("--yardstick needs --database-url")?;
        return yardstick::serve(url).await;
    }
    let binary = match &args.payments {
        Some(path) => path.clone(),
        None => build_demo()?,
    };
    let (_cluster, server_url) = match args.database_url.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => (None, url.to_owned()),
        None => {
            let cluster = tokio::task::spawn_blocking(|| {
                LocalCluster::start(
                    LocalClusterOptions::default()
                        .fsync(true)
                        .max_connections(300),
                )
            })
            .await??;
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    let db = TestDatabase::create_on(&server_url).await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(db.pool())
        .await?;
    println!(
        "PostgreSQL {version}, {} cores, load average {}; demo {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
        binary.display()
    );
    let result = run(&args, &binary, &db).await;
    db.close().await?;
    let report = result?;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn run(args: &Args, binary: &std::path::Path, db: &TestDatabase) -> Result<Value> {
    let window =
        Duration::from_secs_f64(args.seconds.unwrap_or(if args.quick { 4.0 } else { 10.0 }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let mut report = serde_json::Map::new();
    report.insert("load_average_before".into(), json!(load_average()));
    if args.sections.contains(&Section::Goodput) {
        let demo = Demo::start(binary, db.url()).await?;
        let value = goodput(args, &client, &demo, db, window).await;
        demo.stop().await?;
        report.insert("goodput".into(), value?);
    }
    if args.sections.contains(&Section::Memory) {
        let demo = Demo::start(binary, db.url()).await?;
        let value = memory(&client, &demo, args.memory_requests).await;
        demo.stop().await?;
        report.insert("memory".into(), value?);
    }
    if args.sections.contains(&Section::Duplicates) {
        report.insert("duplicates".into(), duplicates(&client, binary, db).await?);
    }
    if args.sections.contains(&Section::Review) {
        let demo = Demo::start(binary, db.url()).await?;
        let value = review(&client, &demo).await;
        demo.stop().await?;
        let mut value = value?;
        // The same storms on a service without the crate, once the demo has stopped.
        let yardstick = Demo::yardstick(db.url()).await?;
        let storms = storms(&client, &yardstick, "the yardstick (no crate)").await;
        yardstick.stop().await?;
        value["yardstick"] = Value::Object(storms?);
        report.insert("review".into(), value);
    }
    report.insert("load_average_after".into(), json!(load_average()));
    Ok(Value::Object(report))
}

// ---------------------------------------------------------------------------------------
// The demo process.

/// `cargo build --release --example payments`, in this crate's target directory; the
/// binary's path.
fn build_demo() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("building the demo: cargo build --release --example payments");
    let output = std::process::Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "build",
            "--release",
            "--example",
            "payments",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    ensure!(output.status.success(), "cargo build failed");
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if message["reason"] == "compiler-artifact"
            && message["target"]["name"] == "payments"
            && let Some(executable) = message["executable"].as_str()
        {
            return Ok(PathBuf::from(executable));
        }
    }
    bail!("cargo build named no payments executable")
}

/// A server process the benchmark drives: the payments demo, or the storm's yardstick.
struct Demo {
    child: Child,
    pid: u32,
    url: String,
}

impl Demo {
    async fn start(binary: &std::path::Path, database_url: &str) -> Result<Self> {
        // Named, so that `pg_stat_activity` tells the demo's connections from the bench's.
        let separator = if database_url.contains('?') { '&' } else { '?' };
        let database_url = format!("{database_url}{separator}application_name={DEMO_APPLICATION}");
        let mut command = Command::new(binary);
        command.args(["--port", "0", "--database-url", &database_url]);
        Self::spawn(command).await
    }

    /// The duplicate storm's [yardstick](yardstick), served by this binary in a process
    /// of its own, as the demo is.
    async fn yardstick(database_url: &str) -> Result<Self> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["--yardstick", "--database-url", database_url]);
        Self::spawn(command).await
    }

    /// Starts `command`, a server that prints `listening on URL` first.
    async fn spawn(mut command: Command) -> Result<Self> {
        let mut child = command
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {:?}", command.as_std().get_program()))?;
        let pid = child.id().context("the server's pid")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("the server did not start within 60 s")??
            .context("the server exited before listening")?;
        let url = line
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line from the server: {line}"))?
            .to_owned();
        // Keep reading its stdout so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, pid, url })
    }

    fn memory(&self) -> Memory {
        memory_of(self.pid)
    }

    /// Resets `VmHWM` to the current RSS (`/proc/<pid>/clear_refs`, `5`).
    fn reset_peak(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5");
    }

    /// Samples `VmRSS` every 10 ms until the returned flag is set; the task gives the
    /// largest sample in KiB.
    fn sample_rss(&self) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = self.pid;
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(memory_of(pid).rss_kib);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            peak.max(memory_of(pid).rss_kib)
        });
        (stop, task)
    }

    /// SIGTERM (in-flight requests finish, the pool closes), then waits for the exit.
    async fn stop(mut self) -> Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

fn memory_of(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// CPU seconds (user + system) of process `pid` (`self` for this one).
fn cpu_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The parent pid of process `pid`.
fn parent_of(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1).map(str::to_owned)
}

/// CPU seconds of the PostgreSQL server's processes: the postmaster's children (the
/// backends that live at the time of the call).
fn postgres_cpu(postmaster: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
        .filter(|pid| parent_of(pid).as_deref() == Some(postmaster))
        .map(|pid| cpu_of(&pid))
        .sum()
}

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / 100.0
}

/// CPU seconds spent by the demo, this benchmark (the clients), the PostgreSQL server
/// and the whole machine.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    demo: f64,
    bench: f64,
    postgres: f64,
    machine: f64,
}

impl Cpu {
    fn now(demo: u32, postmaster: &str) -> Self {
        Self {
            demo: cpu_of(&demo.to_string()),
            bench: cpu_of("self"),
            postgres: postgres_cpu(postmaster),
            machine: machine_busy(),
        }
    }

    /// Per second of `seconds`, since `earlier`: cores busy.
    fn cores_since(&self, earlier: &Self, seconds: f64) -> Value {
        let per = |a: f64, b: f64| ((a - b) / seconds * 100.0).round() / 100.0;
        json!({
            "demo": per(self.demo, earlier.demo),
            "bench_clients": per(self.bench, earlier.bench),
            "postgres": per(self.postgres, earlier.postgres),
            "machine": per(self.machine, earlier.machine),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Requests.

/// What a request is, in the mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A first request from a quiet tenant, small body, no delay.
    Fresh,
    /// One of the [`DUPLICATES`] sends of a quiet tenant's key.
    Duplicate,
    /// A quiet tenant's first request with a 256 KiB to 1 MiB body.
    Large,
    /// The flooding tenant's slow key (`delay_ms` 500 to 2,000).
    Slow,
    /// The flooding tenant's fast request.
    FloodFast,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Fresh => "fresh",
            Self::Duplicate => "duplicate",
            Self::Large => "large",
            Self::Slow => "slow",
            Self::FloodFast => "flood_fast",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    /// `QUIET_TENANTS` for the flooding tenant.
    tenant: usize,
    kind: Kind,
    sent: Instant,
    answered: Instant,
    /// 0: no answer (connection error or the client's 60 s timeout).
    status: u16,
    replayed: bool,
}

impl Outcome {
    fn latency_ms(&self) -> f64 {
        self.answered.duration_since(self.sent).as_secs_f64() * 1000.0
    }

    fn good(&self) -> bool {
        self.status != 0 && self.status != 503
    }
}

fn tenant_name(tenant: usize) -> String {
    if tenant == QUIET_TENANTS {
        "flood".to_owned()
    } else {
        format!("quiet-{tenant:02}")
    }
}

/// A payment body of exactly `size` bytes (at least the unpadded body): JSON padded with
/// spaces, which the demo's parser and the fingerprint accept.
fn body(delay_ms: u64, size: usize) -> Bytes {
    let head = format!(r#"{{"amount":1000,"currency":"EUR","delay_ms":{delay_ms}"#);
    let pad = size.saturating_sub(head.len() + 1);
    let mut body = String::with_capacity(head.len() + pad + 1);
    body.push_str(&head);
    body.extend(std::iter::repeat_n(' ', pad));
    body.push('}');
    Bytes::from(body)
}

/// One `POST /v1/payments`: (status, replayed); status 0 when there was no answer.
async fn post(
    client: &reqwest::Client,
    base: &str,
    tenant: &str,
    key: Uuid,
    body: Bytes,
) -> (u16, bool) {
    let sent = client
        .post(format!("{base}/v1/payments"))
        .header("idempotency-key", key.to_string())
        .header("x-account-id", tenant)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let replayed = response.headers().contains_key("idempotent-replayed");
            match response.bytes().await {
                Ok(_) => (status, replayed),
                Err(_) => (0, false),
            }
        }
        Err(_) => (0, false),
    }
}

/// A small deterministic generator (splitmix64): the mix is the same every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The next request of the mix.
struct Mix {
    rng: Rng,
    large: Vec<Bytes>,
    small: Bytes,
    /// The duplicated key being sent, its tenant, and how many sends are left.
    duplicate: Option<(Uuid, usize, u32)>,
}

impl Mix {
    fn new() -> Self {
        Self {
            rng: Rng(24),
            large: [256, 512, 768, 1024]
                .iter()
                .map(|kib| body(0, kib * 1024))
                .collect(),
            small: body(0, 0),
            duplicate: None,
        }
    }

    fn next(&mut self) -> (Kind, usize, Uuid, Bytes) {
        let roll = self.rng.below(100);
        let quiet = self.rng.below(QUIET_TENANTS as u64) as usize;
        match roll {
            0..72 => (Kind::Fresh, quiet, Uuid::new_v4(), self.small.clone()),
            72..80 => {
                let (key, tenant, left) = match self.duplicate {
                    Some(current) if current.2 > 0 => current,
                    _ => (Uuid::new_v4(), quiet, DUPLICATES),
                };
                self.duplicate = Some((key, tenant, left - 1));
                (Kind::Duplicate, tenant, key, self.small.clone())
            }
            80..82 => {
                let large = self.large[self.rng.below(self.large.len() as u64) as usize].clone();
                (Kind::Large, quiet, Uuid::new_v4(), large)
            }
            82..92 => {
                let delay = 500 + self.rng.below(1501);
                (Kind::Slow, QUIET_TENANTS, Uuid::new_v4(), body(delay, 0))
            }
            _ => (
                Kind::FloodFast,
                QUIET_TENANTS,
                Uuid::new_v4(),
                self.small.clone(),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Goodput.

async fn goodput(
    args: &Args,
    client: &reqwest::Client,
    demo: &Demo,
    db: &TestDatabase,
    window: Duration,
) -> Result<Value> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(db.pool())
        .await?;
    let postmaster = parent_of(&backend.to_string()).unwrap_or_default();
    let sessions = || async {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(db.pool())
            .await?;
        sqlx::query_scalar::<_, i64>(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(db.pool())
        .await
    };
    let capacity = capacity(
        client,
        demo,
        Duration::from_secs_f64(window.as_secs_f64().min(5.0)),
    )
    .await?;
    println!(
        "\n== goodput: capacity C = {capacity:.0} requests/s (64 closed-loop clients, fresh keys, small bodies, delay 0, {QUIET_TENANTS} tenants)"
    );
    let mut phases = Vec::new();
    let mut quiet_unloaded_p99 = None;
    let mut mix = Mix::new();
    for multiple in [0.1, 1.0, 2.0, 4.0] {
        let sessions_before = sessions().await?;
        let (stop_sampling, connections) = sample_connections(db.pool().clone());
        let phase = open_loop(
            client,
            demo,
            &mut mix,
            capacity * multiple,
            window,
            args.max_outstanding,
            &postmaster,
        )
        .await;
        let mut summary = phase.summary(multiple, quiet_unloaded_p99);
        stop_sampling.store(true, Ordering::Relaxed);
        summary["demo_connections"] = connections.await??;
        // Connections the demo opened (PostgreSQL sessions begun) during the phase.
        summary["sessions_opened"] = json!(sessions().await? - sessions_before);
        if multiple == 0.1 {
            quiet_unloaded_p99 = summary["quiet_fresh_p99_ms"].as_f64();
        }
        phases.push(summary);
        // Let the slow keys and the last answers drain before the next phase.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    print_phases(&phases);
    let one = phases[1]["goodput_per_s"].as_f64().unwrap_or(0.0);
    let two = phases[2]["goodput_per_s"].as_f64().unwrap_or(0.0);
    let ratio = if one > 0.0 { two / one } else { 0.0 };
    println!(
        "goodput at 2× is {:.1}% of goodput at 1× (criterion: within 10%): {}",
        ratio * 100.0,
        if ratio >= 0.9 { "met" } else { "NOT met" }
    );
    Ok(json!({
        "capacity_per_s": capacity,
        "window_s": window.as_secs_f64(),
        "phases": phases,
        "goodput_2x_over_1x": ratio,
    }))
}

/// Samples the states of the demo's connections every 100 ms until `stop` is set: their
/// means (running; in a transaction waiting for the demo; in none).
fn sample_connections(pool: PgPool) -> (Arc<AtomicBool>, tokio::task::JoinHandle<Result<Value>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let sampler = tokio::spawn(async move {
        let (mut sums, mut samples) = ([0i64; 3], 0u32);
        while !stopped.load(Ordering::Relaxed) {
            let (active, waiting, idle): (i64, i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE state = 'active'),
                        count(*) FILTER (WHERE state = 'idle in transaction'),
                        count(*) FILTER (WHERE state = 'idle')
                 FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(DEMO_APPLICATION)
            .fetch_one(&pool)
            .await?;
            for (sum, n) in sums.iter_mut().zip([active, waiting, idle]) {
                *sum += n;
            }
            samples += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mean = |sum: i64| round1(Some(sum as f64 / f64::from(samples.max(1))));
        Ok(json!({
            "samples": samples,
            "running": mean(sums[0]),
            "waiting_for_the_demo": mean(sums[1]),
            "in_no_transaction": mean(sums[2]),
        }))
    });
    (stop, sampler)
}

/// Closed loop: 64 clients, fresh keys, small bodies, over the quiet tenants; answers
/// other than 503 per second over `window` after a 1 s warm-up.
async fn capacity(client: &reqwest::Client, demo: &Demo, window: Duration) -> Result<f64> {
    let start = Instant::now();
    let counted_from = start + Duration::from_secs(1);
    let end = counted_from + window;
    let good = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client_no in 0..64 {
        let (client, base, good) = (client.clone(), demo.url.clone(), good.clone());
        tasks.push(tokio::spawn(async move {
            let tenant = tenant_name(client_no % QUIET_TENANTS);
            let small = body(0, 0);
            while Instant::now() < end {
                let (status, _) =
                    post(&client, &base, &tenant, Uuid::new_v4(), small.clone()).await;
                let now = Instant::now();
                if status != 0 && status != 503 && now >= counted_from && now < end {
                    good.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let rate = good.load(Ordering::Relaxed) as f64 / window.as_secs_f64();
    ensure!(
        rate > 0.0,
        "the demo answered nothing but 503 in the capacity phase"
    );
    Ok(rate)
}

struct Phase {
    rate: f64,
    window: Duration,
    outcomes: Vec<Outcome>,
    counted_from: Instant,
    end: Instant,
    scheduled: u64,
    not_sent: u64,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    rss_after_kib: u64,
    /// Cores busy over the measured window.
    cpu: Value,
}

/// Open loop at `rate` requests/s for a 1 s warm-up and `window`; then waits for every
/// answer.
async fn open_loop(
    client: &reqwest::Client,
    demo: &Demo,
    mix: &mut Mix,
    rate: f64,
    window: Duration,
    max_outstanding: usize,
    postmaster: &str,
) -> Phase {
    let rss_before_kib = demo.memory().rss_kib;
    demo.reset_peak();
    let (stop_sampling, sampler) = demo.sample_rss();
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let outstanding = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let counted_from = start + Duration::from_secs(1);
    let end = counted_from + window;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (mut scheduled, mut not_sent) = (0u64, 0u64);
    let mut cpu_from = None;
    loop {
        let at = start + interval.mul_f64(scheduled as f64);
        if at >= end {
            break;
        }
        if cpu_from.is_none() && at >= counted_from {
            cpu_from = Some(Cpu::now(demo.pid, postmaster));
        }
        scheduled += 1;
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        let (kind, tenant, key, body) = mix.next();
        if outstanding.load(Ordering::Relaxed) >= max_outstanding {
            not_sent += 1;
            continue;
        }
        outstanding.fetch_add(1, Ordering::Relaxed);
        let (client, base) = (client.clone(), demo.url.clone());
        let (outcomes, outstanding) = (outcomes.clone(), outstanding.clone());
        tokio::spawn(async move {
            let sent = Instant::now();
            let (status, replayed) = post(&client, &base, &tenant_name(tenant), key, body).await;
            let outcome = Outcome {
                tenant,
                kind,
                sent,
                answered: Instant::now(),
                status,
                replayed,
            };
            outcomes.lock().unwrap().push(outcome);
            outstanding.fetch_sub(1, Ordering::Relaxed);
        });
    }
    let cpu = Cpu::now(demo.pid, postmaster)
        .cores_since(&cpu_from.unwrap_or_default(), window.as_secs_f64());
    let drain_until = Instant::now() + Duration::from_secs(90);
    while outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_sampling.store(true, Ordering::Relaxed);
    let rss_peak_kib = sampler.await.unwrap_or(0).max(demo.memory().hwm_kib);
    let rss_after_kib = demo.memory().rss_kib;
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    Phase {
        rate,
        window,
        outcomes,
        counted_from,
        end,
        scheduled,
        not_sent,
        rss_before_kib,
        rss_peak_kib,
        rss_after_kib,
        cpu,
    }
}

/// The `q` quantile (0..=1) of `values`, sorted here.
fn quantile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    Some(values[index])
}

fn round1(value: Option<f64>) -> Value {
    value.map_or(Value::Null, |v| json!((v * 10.0).round() / 10.0))
}

impl Phase {
    fn summary(&self, multiple: f64, quiet_unloaded_p99: Option<f64>) -> Value {
        let window = self.window.as_secs_f64();
        let counted: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| o.answered >= self.counted_from && o.answered < self.end)
            .collect();
        let good: Vec<&Outcome> = counted.iter().copied().filter(|o| o.good()).collect();
        let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
        let mut by_kind: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
        for o in &counted {
            let status = match (o.status, o.replayed) {
                (0, _) => "no_answer".to_owned(),
                (201, true) => "201_replayed".to_owned(),
                (status, _) => status.to_string(),
            };
            *by_status.entry(status.clone()).or_default() += 1;
            *by_kind
                .entry(o.kind.name())
                .or_default()
                .entry(status)
                .or_default() += 1;
        }
        let mut latencies: Vec<f64> = good.iter().map(|o| o.latency_ms()).collect();
        let mut quiet_fresh: Vec<f64> = good
            .iter()
            .filter(|o| o.kind == Kind::Fresh)
            .map(|o| o.latency_ms())
            .collect();
        let mut rejected: Vec<f64> = counted
            .iter()
            .filter(|o| o.status == 503)
            .map(|o| o.latency_ms())
            .collect();
        let mut share = [0u64; QUIET_TENANTS + 1];
        let mut offered = [0u64; QUIET_TENANTS + 1];
        for o in &counted {
            offered[o.tenant] += 1;
        }
        for o in &good {
            share[o.tenant] += 1;
        }
        let total_good = good.len().max(1) as f64;
        let total_offered = counted.len().max(1) as f64;
        let quiet_shares: Vec<f64> = share[..QUIET_TENANTS]
            .iter()
            .map(|&n| n as f64 / total_good)
            .collect();
        let tenants: BTreeMap<String, Value> = (0..=QUIET_TENANTS)
            .map(|t| {
                (
                    tenant_name(t),
                    json!({
                        "answers": offered[t],
                        "goodput_share": share[t] as f64 / total_good,
                        "answer_share": offered[t] as f64 / total_offered,
                    }),
                )
            })
            .collect();
        let quiet_p99 = quantile(&mut quiet_fresh, 0.99);
        json!({
            "multiple": multiple,
            "offered_per_s": self.rate,
            "scheduled": self.scheduled,
            "not_sent": self.not_sent,
            "answered_in_window": counted.len(),
            "goodput_per_s": good.len() as f64 / window,
            "by_status": by_status,
            "by_kind": by_kind,
            "p50_ms": round1(quantile(&mut latencies, 0.50)),
            "p99_ms": round1(quantile(&mut latencies, 0.99)),
            "p50_503_ms": round1(quantile(&mut rejected, 0.50)),
            "quiet_fresh_p99_ms": round1(quiet_p99),
            "quiet_fresh_p99_over_unloaded": match (quiet_p99, quiet_unloaded_p99) {
                (Some(p), Some(u)) if u > 0.0 => json!(p / u),
                _ => Value::Null,
            },
            "flood_goodput_share": share[QUIET_TENANTS] as f64 / total_good,
            "quiet_goodput_share_min": quiet_shares.iter().copied().fold(f64::INFINITY, f64::min),
            "quiet_goodput_share_max": quiet_shares.iter().copied().fold(0.0, f64::max),
            "tenants": tenants,
            "rss_before_mib": mib(self.rss_before_kib),
            "rss_peak_mib": mib(self.rss_peak_kib),
            "rss_after_mib": mib(self.rss_after_kib),
            "cores_busy": self.cpu,
        })
    }
}

fn print_phases(phases: &[Value]) {
    println!(
        "{:>5} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>7} {:>11} {:>13}",
        "load",
        "offered",
        "not sent",
        "goodput",
        "201",
        "409",
        "503",
        "other",
        "p50 ms",
        "p99 ms",
        "quiet p99",
        "flood%",
        "quiet% min-max",
        "RSS peak/after"
    );
    for p in phases {
        let status = |s: &str| p["by_status"][s].as_u64().unwrap_or(0);
        let ok = status("201") + status("201_replayed");
        let other: u64 = p["by_status"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| !["201", "201_replayed", "409", "503"].contains(&k.as_str()))
                    .map(|(_, v)| v.as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0);
        let f = |k: &str| p[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:>4}× {:>8.0} {:>8} {:>8.0} {:>8} {:>7} {:>7} {:>7} {:>8.1} {:>8.1} {:>9.1} {:>6.1}% {:>5.1}-{:<5.1}% {:>6.0}/{:<6.0}",
            f("multiple"),
            f("offered_per_s"),
            p["not_sent"],
            f("goodput_per_s"),
            ok,
            status("409"),
            status("503"),
            other,
            f("p50_ms"),
            f("p99_ms"),
            f("quiet_fresh_p99_ms"),
            f("flood_goodput_share") * 100.0,
            f("quiet_goodput_share_min") * 100.0,
            f("quiet_goodput_share_max") * 100.0,
            f("rss_peak_mib"),
            f("rss_after_mib"),
        );
    }
    println!("cores busy over the window (demo / clients / postgres / whole machine, of 2):");
    for p in phases {
        let c = &p["cores_busy"];
        println!(
            "  {:>4}×: {} / {} / {} / {}; PostgreSQL sessions opened: {}",
            p["multiple"],
            c["demo"],
            c["bench_clients"],
            c["postgres"],
            c["machine"],
            p["sessions_opened"]
        );
    }
    println!(
        "the demo's connections, means of samples every 100 ms over the phase (running / in a transaction waiting for the demo / in none):"
    );
    for p in phases {
        let c = &p["demo_connections"];
        println!(
            "  {:>4}×: {} / {} / {}",
            p["multiple"], c["running"], c["waiting_for_the_demo"], c["in_no_transaction"]
        );
    }
    println!("503s by kind of request:");
    for p in phases {
        let kinds = p["by_kind"].as_object().cloned().unwrap_or_default();
        let parts: Vec<String> = kinds
            .iter()
            .map(|(kind, statuses)| {
                let total: u64 = statuses
                    .as_object()
                    .map(|m| m.values().filter_map(Value::as_u64).sum())
                    .unwrap_or(0);
                let rejected = statuses["503"].as_u64().unwrap_or(0);
                format!("{kind} {rejected}/{total}")
            })
            .collect();
        println!(
            "  {:>4}×: {}  (503 p50 {} ms)",
            p["multiple"],
            parts.join(", "),
            p["p50_503_ms"]
        );
    }
}

// ---------------------------------------------------------------------------------------
// Memory.

async fn memory(client: &reqwest::Client, demo: &Demo, requests: usize) -> Result<Value> {
    let big = body(0, BODY_LIMIT);
    // Settle after start-up, then a few requests so that the pool is warm.
    for tenant in 0..4 {
        post(
            client,
            &demo.url,
            &tenant_name(tenant),
            Uuid::new_v4(),
            body(0, 0),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = demo.memory();
    demo.reset_peak();
    let (stop, sampler) = demo.sample_rss();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..requests {
        let (client, base, body) = (client.clone(), demo.url.clone(), big.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let (status, _) = post(
                &client,
                &base,
                &tenant_name(i % QUIET_TENANTS),
                Uuid::new_v4(),
                body,
            )
            .await;
            (status, sent.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut ok_ms = Vec::new();
    let mut rejected_ms = Vec::new();
    for task in tasks {
        let (status, ms) = task.await?;
        *statuses.entry(status).or_default() += 1;
        if status == 503 {
            rejected_ms.push(ms);
        } else {
            ok_ms.push(ms);
        }
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await?.max(demo.memory().hwm_kib);
    let just_after = demo.memory().rss_kib;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = demo.memory().rss_kib;
    println!(
        "\n== memory: {requests} concurrent requests with {BODY_LIMIT}-byte bodies (the demo's limit) in {:.1} s",
        elapsed.as_secs_f64()
    );
    println!(
        "answers {statuses:?}; answered p50 {} ms, max {} ms; 503 p50 {} ms, max {} ms",
        round1(quantile(&mut ok_ms, 0.5)),
        round1(quantile(&mut ok_ms, 1.0)),
        round1(quantile(&mut rejected_ms, 0.5)),
        round1(quantile(&mut rejected_ms, 1.0)),
    );
    println!(
        "demo RSS: before {:.0} MiB, peak {:.0} MiB, at the last answer {:.0} MiB, 2 s later {:.0} MiB (body budget 64 MiB)",
        mib(before.rss_kib),
        mib(peak),
        mib(just_after),
        mib(after)
    );
    Ok(json!({
        "requests": requests,
        "body_bytes": BODY_LIMIT,
        "seconds": elapsed.as_secs_f64(),
        "statuses": statuses,
        "answered_p50_ms": round1(quantile(&mut ok_ms, 0.5)),
        "answered_max_ms": round1(quantile(&mut ok_ms, 1.0)),
        "rejected_p50_ms": round1(quantile(&mut rejected_ms, 0.5)),
        "rss_before_mib": mib(before.rss_kib),
        "rss_peak_mib": mib(peak),
        "rss_at_last_answer_mib": mib(just_after),
        "rss_after_2s_mib": mib(after),
    }))
}

// ---------------------------------------------------------------------------------------
// Duplicates across two processes.

/// `xact_commit + xact_rollback` of the benchmark's database, fresh from the statistics.
async fn transactions(pool: &PgPool) -> Result<i64> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database
         WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(n)
}

/// Opens `n` connections to the demo at once (a path without a database), so that the
/// duplicates do not wait for TCP handshakes.
async fn warm_connections(client: &reqwest::Client, base: &str, n: usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, url) = (client.clone(), format!("{base}/warm-up"));
        tasks.push(tokio::spawn(async move {
            if let Ok(response) = client.get(url).send().await {
                let _ = response.bytes().await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// Starts A and B, waits for their backends' statistics to be reported (PostgreSQL
/// reports an idle backend's after up to 10 s), runs `scenario`, stops both (their
/// backends report at exit) and gives the transactions counted meanwhile.
async fn counted<F, Fut, T>(
    binary: &std::path::Path,
    db: &TestDatabase,
    client: &reqwest::Client,
    scenario: F,
) -> Result<(T, i64, Duration)>
where
    F: FnOnce(String, String) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let a = Demo::start(binary, db.url()).await?;
    let b = Demo::start(binary, db.url()).await?;
    warm_connections(client, &a.url, 1_000).await;
    warm_connections(client, &b.url, 1_000).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let before = transactions(db.pool()).await?;
    let start = Instant::now();
    let result = scenario(a.url.clone(), b.url.clone()).await;
    let elapsed = start.elapsed();
    a.stop().await?;
    b.stop().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = transactions(db.pool()).await?;
    Ok((result?, after - before, elapsed))
}

async fn duplicates(
    client: &reqwest::Client,
    binary: &std::path::Path,
    db: &TestDatabase,
) -> Result<Value> {
    const DUPLICATES: usize = 2_000;
    println!(
        "\n== duplicates across two processes: {DUPLICATES} duplicates over A and B of a request held in A"
    );
    // The control: the same procedure without requests (the completer and the sweeper of
    // both instances, our own statistics reads).
    let ((), control, control_elapsed) = counted(binary, db, client, |_, _| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    })
    .await?;
    let background_per_s = control as f64 / control_elapsed.as_secs_f64().max(1.0);
    println!(
        "control: {control} transactions in {:.1} s without requests ({background_per_s:.1}/s, subtracted below)",
        control_elapsed.as_secs_f64()
    );
    let mut rows = Vec::new();
    for delay_ms in [600u64, 1_500] {
        let client_for = client.clone();
        let (lateness, xacts, elapsed) = counted(binary, db, client, move |a, b| async move {
            let client = client_for;
            let key = Uuid::new_v4();
            let held = body(delay_ms, 0);
            let holder = {
                let (client, a, held) = (client.clone(), a.clone(), held.clone());
                tokio::spawn(async move {
                    let status = post(&client, &a, "dup", key, held).await.0;
                    (status, Instant::now())
                })
            };
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut tasks = Vec::new();
            for i in 0..DUPLICATES {
                let base = if i % 2 == 0 { a.clone() } else { b.clone() };
                let (client, held) = (client.clone(), held.clone());
                tasks.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let (status, replayed) = post(&client, &base, "dup", key, held).await;
                    (i % 2, sent, Instant::now(), status, replayed)
                }));
            }
            let (holder_status, committed) = holder.await?;
            ensure!(holder_status == 201, "the holder got {holder_status}");
            let mut answers = Vec::new();
            for task in tasks {
                answers.push(task.await?);
            }
            Ok((committed, answers))
        })
        .await?;
        let (committed, answers) = lateness;
        let net = xacts as f64 - background_per_s * elapsed.as_secs_f64() - 1.0;
        let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
        let mut late = [Vec::new(), Vec::new()];
        let mut before_commit = 0;
        for (instance, sent, answered, status, replayed) in &answers {
            let label = if *status == 201 && *replayed {
                "201_replayed".to_owned()
            } else {
                status.to_string()
            };
            *statuses.entry(label).or_default() += 1;
            if *sent < committed {
                before_commit += 1;
                late[*instance]
                    .push(answered.saturating_duration_since(committed).as_secs_f64() * 1000.0);
            }
        }
        let [mut late_a, mut late_b] = late;
        let per_duplicate = net / DUPLICATES as f64;
        println!(
            "holder delay {delay_ms} ms: {xacts} transactions in {:.1} s, net of background and the holder {net:.0} = {per_duplicate:.2} per duplicate; answers {statuses:?}; {before_commit} sent before the holder's answer",
            elapsed.as_secs_f64()
        );
        println!(
            "  after the holder's answer: A (same process) p50 {} ms, max {} ms; B (other process) p50 {} ms, p99 {} ms, max {} ms",
            round1(quantile(&mut late_a, 0.5)),
            round1(quantile(&mut late_a, 1.0)),
            round1(quantile(&mut late_b, 0.5)),
            round1(quantile(&mut late_b, 0.99)),
            round1(quantile(&mut late_b, 1.0)),
        );
        rows.push(json!({
            "holder_delay_ms": delay_ms,
            "duplicates": DUPLICATES,
            "transactions": xacts,
            "transactions_net": net,
            "transactions_per_duplicate": per_duplicate,
            "statuses": statuses,
            "sent_before_holder_answer": before_commit,
            "late_a_p50_ms": round1(quantile(&mut late_a, 0.5)),
            "late_a_max_ms": round1(quantile(&mut late_a, 1.0)),
            "late_b_p50_ms": round1(quantile(&mut late_b, 0.5)),
            "late_b_p99_ms": round1(quantile(&mut late_b, 0.99)),
            "late_b_max_ms": round1(quantile(&mut late_b, 1.0)),
        }));
    }
    Ok(json!({
        "control_transactions": control,
        "control_seconds": control_elapsed.as_secs_f64(),
        "runs": rows,
    }))
}

// ---------------------------------------------------------------------------------------
// The first review's scenarios.

async fn review(client: &reqwest::Client, demo: &Demo) -> Result<Value> {
    println!("\n== the first review's scenarios");
    // 2,000 distinct slow keys from one tenant; another tenant's requests meanwhile.
    let mut tasks = Vec::new();
    for _ in 0..2_000 {
        let (client, base) = (client.clone(), demo.url.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let (status, _) = post(&client, &base, "flood", Uuid::new_v4(), body(10_000, 0)).await;
            (status, sent.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let others = bystanders(client, &demo.url, |i| tenant_name(i % QUIET_TENANTS)).await;
    let mut flood: BTreeMap<u16, Vec<f64>> = BTreeMap::new();
    for task in tasks {
        let (status, ms) = task.await?;
        flood.entry(status).or_default().push(ms);
    }
    let flood_summary = describe(&mut flood);
    let others_summary = describe(&mut by_status(others));
    println!("2,000 slow keys (delay_ms 10,000) from one tenant: {flood_summary}");
    println!(
        "  other tenants' requests meanwhile (100, 20 ms apart, 20 tenants): {others_summary}"
    );
    let mut report = json!({
        "slow_keys": flood_summary,
        "other_tenants_during_slow_keys": others_summary,
    });
    for (name, value) in storms(client, demo, "the demo").await? {
        report[name] = value;
    }
    Ok(report)
}

/// Count, p50, p99 and max of each status's latencies.
fn describe(by: &mut BTreeMap<u16, Vec<f64>>) -> Value {
    by.iter_mut()
        .map(|(status, ms)| {
            (
                status.to_string(),
                json!({
                    "count": ms.len(),
                    "p50_ms": round1(quantile(ms, 0.5)),
                    "p99_ms": round1(quantile(ms, 0.99)),
                    "max_ms": round1(quantile(ms, 1.0)),
                }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// 30 keys × 500 duplicates sent at once to `server` (`service` names it), [`STORMS`]
/// times one after the other; another tenant's requests before them and for as long as
/// each runs; the CPU the server spent on the storms, and its peak resident memory.
async fn storms(
    client: &reqwest::Client,
    server: &Demo,
    service: &str,
) -> Result<serde_json::Map<String, Value>> {
    let base = &server.url;
    let unloaded = Bystander::start(base, Some(100)).await?.answers().await?;
    let cpu_before = cpu_of(&server.pid.to_string());
    server.reset_peak();
    let mut answers: BTreeMap<u16, Vec<f64>> = BTreeMap::new();
    let (mut replayed, mut seconds, mut during) = (0, Vec::new(), Vec::new());
    for _ in 0..STORMS {
        let storm = storm(client, base).await?;
        for (status, mut ms) in storm.answers {
            answers.entry(status).or_default().append(&mut ms);
        }
        replayed += storm.replayed;
        seconds.push(format!("{:.1}", storm.seconds));
        during.extend(storm.bystander);
    }
    let cpu_seconds = cpu_of(&server.pid.to_string()) - cpu_before;
    let peak_mib = mib(server.memory().hwm_kib);
    let storm_summary = describe(&mut answers);
    let unloaded = describe(&mut latencies(&unloaded));
    let arriving = describe(&mut latencies(
        during
            .iter()
            .filter(|answer| answer.sent_after < STORM_ARRIVAL),
    ));
    let during = describe(&mut latencies(&during));
    println!(
        "{service}: {STORMS} storms of 30 keys × 500 duplicates (delay_ms 1,000) in {} s: \
         {storm_summary}, {replayed} replayed; {cpu_seconds:.2} CPU seconds, peak RSS \
         {peak_mib:.0} MiB",
        seconds.join(" / ")
    );
    println!(
        "  another tenant's requests (every 20 ms) before: {unloaded}; while the storms ran: \
         {during}; in their first 2 s: {arriving}"
    );
    let Value::Object(report) = json!({
        "duplicate_storms": STORMS,
        "duplicate_storm": storm_summary,
        "duplicate_storm_replayed": replayed,
        "duplicate_storm_server_cpu_seconds": (cpu_seconds * 100.0).round() / 100.0,
        "duplicate_storm_server_peak_rss_mib": peak_mib.round(),
        "bystander_before_duplicate_storm": unloaded,
        "bystander_during_duplicate_storm": during,
        "bystander_during_duplicate_storm_first_2s": arriving,
    }) else {
        unreachable!("an object")
    };
    Ok(report)
}

/// Duplicate storms in the review, one after the other, so that the other tenant's p99
/// rests on more requests (150 to 250 of them on a 2-core machine).
const STORMS: usize = 3;

/// The first part of a storm, in which its 15,000 requests arrive.
const STORM_ARRIVAL: Duration = Duration::from_secs(2);

/// A storm's answers, and the other tenant's meanwhile.
struct Storm {
    seconds: f64,
    answers: BTreeMap<u16, Vec<f64>>,
    replayed: u64,
    bystander: Vec<BystanderAnswer>,
}

/// 30 keys × 500 duplicates (`delay_ms` 1,000), posted at once, while another tenant
/// posts every 20 ms until the storm's last answer.
async fn storm(client: &reqwest::Client, base: &str) -> Result<Storm> {
    let bystander = Bystander::start(base, None).await?;
    let keys: Vec<Uuid> = (0..30).map(|_| Uuid::new_v4()).collect();
    let held = body(1_000, 0);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..500 {
        for (k, key) in keys.iter().enumerate() {
            let (client, base, held, key) = (client.clone(), base.to_owned(), held.clone(), *key);
            let tenant = tenant_name(k % QUIET_TENANTS);
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let (status, replayed) = post(&client, &base, &tenant, key, held).await;
                (status, replayed, sent.elapsed().as_secs_f64() * 1000.0)
            }));
        }
    }
    let mut answers: BTreeMap<u16, Vec<f64>> = BTreeMap::new();
    let mut replayed = 0;
    for task in tasks {
        let (status, was_replayed, ms) = task.await?;
        replayed += u64::from(was_replayed);
        answers.entry(status).or_default().push(ms);
    }
    Ok(Storm {
        seconds: start.elapsed().as_secs_f64(),
        answers,
        replayed,
        bystander: bystander.stop().await?,
    })
}

/// Another tenant posting every 20 ms from a thread and runtime of its own, so that the
/// load generator's tasks do not delay its requests, on a connection opened before it
/// starts counting (as behind a load balancer: a new connection would queue behind a
/// storm's 15,000 connects).
struct Bystander {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<BystanderAnswer>>>,
}

/// One of the other tenant's answers.
struct BystanderAnswer {
    status: u16,
    ms: f64,
    /// When it was sent, after the bystander started counting.
    sent_after: Duration,
}

/// The latencies of `answers`, by status.
fn latencies<'a>(
    answers: impl IntoIterator<Item = &'a BystanderAnswer>,
) -> BTreeMap<u16, Vec<f64>> {
    by_status(
        answers
            .into_iter()
            .map(|answer| (answer.status, answer.ms))
            .collect(),
    )
}

impl Bystander {
    /// Opens the connection, then posts `count` requests, or until stopped; returns once
    /// the first of them leaves.
    async fn start(base: &str, count: Option<usize>) -> Result<Self> {
        let (base, stop) = (base.to_owned(), Arc::new(AtomicBool::new(false)));
        let (ready, started) = tokio::sync::oneshot::channel();
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let own = reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()?;
                post(&own, &base, "bystander", Uuid::new_v4(), body(0, 0)).await;
                let start = Instant::now();
                let _ = ready.send(());
                let mut answers = Vec::new();
                while !stopped.load(Ordering::Relaxed) && Some(answers.len()) != count {
                    let sent = Instant::now();
                    let (status, _) =
                        post(&own, &base, "bystander", Uuid::new_v4(), body(0, 0)).await;
                    answers.push(BystanderAnswer {
                        status,
                        ms: sent.elapsed().as_secs_f64() * 1000.0,
                        sent_after: sent - start,
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(answers)
            })
        });
        started
            .await
            .context("the bystander's thread ended before its first request")?;
        Ok(Self { stop, thread })
    }

    /// Stops it once its request under way is answered: its answers.
    async fn stop(self) -> Result<Vec<BystanderAnswer>> {
        self.stop.store(true, Ordering::Relaxed);
        self.answers().await
    }

    /// Its answers, once it has posted all it was to.
    async fn answers(self) -> Result<Vec<BystanderAnswer>> {
        tokio::task::spawn_blocking(move || self.thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the bystander's thread panicked"))?
    }
}

/// A hundred requests, 20 ms apart, the `i`th from tenant `tenant(i)`: status and
/// latency of each.
async fn bystanders(
    client: &reqwest::Client,
    base: &str,
    tenant: impl Fn(usize) -> String,
) -> Vec<(u16, f64)> {
    let mut answers = Vec::new();
    for i in 0..100 {
        let sent = Instant::now();
        let (status, _) = post(client, base, &tenant(i), Uuid::new_v4(), body(0, 0)).await;
        answers.push((status, sent.elapsed().as_secs_f64() * 1000.0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    answers
}

fn by_status(answers: Vec<(u16, f64)>) -> BTreeMap<u16, Vec<f64>> {
    let mut by: BTreeMap<u16, Vec<f64>> = BTreeMap::new();
    for (status, ms) in answers {
        by.entry(status).or_default().push(ms);
    }
    by
}
