//! Throughput benchmark: every path of the store against a bare transaction and the
//! zero2prod shape, on one pool and one database.
//!
//! ```text
//! cargo bench --bench throughput                 # full run, writes docs/throughput.svg
//! cargo bench --bench throughput -- --quick      # 16 clients, 200,000-row sweep, < 60 s
//! cargo bench --bench throughput -- --json out.json --svg chart.svg
//! ```
//!
//! Paths 1-5 run at each client count, interleaved (round after round, every path and
//! client count gets a short slice), so drift of the machine hits all of them alike:
//!
//! 1. `bare`: `BEGIN; INSERT INTO payments ..; COMMIT`, the yardstick;
//! 2. `zero2prod`: `BEGIN`, claim `INSERT .. ON CONFLICT DO NOTHING`, the business
//!    insert, `UPDATE` with the response, `COMMIT`, written here by hand;
//! 3. `first_request`: [`IdempotencyStore::begin`], the same business insert,
//!    [`Claim::complete`](pg_idempotency::Claim::complete);
//! 4. `replay`: keys that path 3 stored, same request again;
//! 5. `conflict`: the same keys with another body.
//!
//! Then 6. `in flight`: how long a duplicate waits before [`Error::InFlight`], and
//! 7. `sweeper`: rows per second on its own, and path 3 writers with and without the
//! default [`Sweeper`].
//!
//! The server: `DATABASE_URL` (or `--database-url`) if set, else a throwaway local
//! cluster with fsync on (`pg_idempotency::testing::LocalCluster`, from the installed
//! PostgreSQL binaries). Every run creates a database of its own there and drops it at
//! the end. The report names the server and its `fsync`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path as FsPath, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use pg_idempotency::testing::{LocalCluster, LocalClusterOptions, TestDatabase};
use pg_idempotency::{
    Begin, Config, Error, IdempotencyKey, IdempotencyStore, Request, Scope, StoredResponse,
    SweepOptions, Sweeper,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;

/// Measures every path of pg-idempotency against a bare transaction and the zero2prod
/// shape, on real PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "throughput")]
struct Args {
    /// Only the 16-client column, a 200,000-row sweep and short slices (under 60 s).
    #[arg(long)]
    quick: bool,
    /// Seconds each path runs per client count and round (default 2, quick 1.2).
    #[arg(long)]
    seconds: Option<f64>,
    /// Interleaved rounds (default 5, quick 3).
    #[arg(long)]
    rounds: Option<u32>,
    /// Client counts, comma-separated (default 1,4,16,64; quick 16).
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
    /// Expired rows for the sweeper (default 1,000,000; quick 200,000).
    #[arg(long)]
    sweep_rows: Option<i64>,
    /// Seconds of writers each way, with and without the sweeper (default 20, quick 5).
    #[arg(long)]
    sweeper_seconds: Option<f64>,
    /// Paths of the grid, comma-separated (default: all five; `bare` always runs, it is
    /// the yardstick; `replay` and `conflict` need `first-request`).
    #[arg(long, value_delimiter = ',')]
    paths: Option<Vec<Path>>,
    /// Sections to run, comma-separated, from `grid`, `in-flight`, `sweeper`.
    #[arg(long, value_delimiter = ',', default_value = "grid,in-flight,sweeper")]
    sections: Vec<Section>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the TPS chart (SVG) to this file [default for a full run:
    /// docs/throughput.svg; a quick run writes none unless asked].
    #[arg(long)]
    svg: Option<PathBuf>,
    /// PostgreSQL server to create the benchmark database on [default: a throwaway
    /// local cluster with fsync on, from the installed PostgreSQL binaries].
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Whether the pool pings a connection before handing it out (sqlx's
    /// `test_before_acquire`, on by default: one more round trip per transaction, for
    /// every path alike).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ping_before_acquire: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Grid,
    InFlight,
    Sweeper,
}

/// Paths 1-5, in the order of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Path {
    Bare,
    Zero2Prod,
    FirstRequest,
    Replay,
    Conflict,
}

impl Path {
    const ALL: [Path; 5] = [
        Path::Bare,
        Path::Zero2Prod,
        Path::FirstRequest,
        Path::Replay,
        Path::Conflict,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::Bare => "bare",
            Path::Zero2Prod => "zero2prod",
            Path::FirstRequest => "first_request",
            Path::Replay => "replay",
            Path::Conflict => "conflict",
        }
    }
}

const BODY: &[u8] = br#"{"amount":1000,"currency":"EUR"}"#;
const OTHER_BODY: &[u8] = br#"{"amount":2000,"currency":"EUR"}"#;
const ROUTE: &str = "/v1/payments";

/// Everything the clients share: one pool, one database.
struct Ctx {
    pool: PgPool,
    store: IdempotencyStore,
    /// Keys that path 3 stored, for paths 4 and 5.
    keys: Mutex<Arc<Vec<(Scope, IdempotencyKey)>>>,
    cursor: AtomicUsize,
}

impl Ctx {
    fn keys(&self) -> Arc<Vec<(Scope, IdempotencyKey)>> {
        Arc::clone(&self.keys.lock().expect("keys lock"))
    }

    fn add_keys(&self, mut new: Vec<(Scope, IdempotencyKey)>) {
        let mut keys = self.keys.lock().expect("keys lock");
        let mut all = Vec::with_capacity(keys.len() + new.len());
        all.extend(keys.iter().cloned());
        all.append(&mut new);
        *keys = Arc::new(all);
    }
}

fn response(client: usize, n: u64) -> StoredResponse {
    StoredResponse::new(
        201,
        format!(r#"{{"id":"pay_{client}_{n}","status":"paid","amount":1000,"currency":"EUR"}}"#),
    )
    .with_header("content-type", "application/json")
}

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(uuid::Uuid::new_v4()).expect("a v4 UUID is a valid key")
}

/// Path 1: `BEGIN; INSERT; COMMIT`.
async fn bare(ctx: &Ctx, account: &str) -> Result<()> {
    let mut tx = ctx.pool.begin().await?;
    sqlx::query("INSERT INTO payments (account, amount) VALUES ($1, $2)")
        .bind(account)
        .bind(1000_i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Path 2: what most users write by hand (zero2prod `src/idempotency`), with the same
/// columns as `idempotency_keys`: five round trips, two row versions of the key.
async fn zero2prod(ctx: &Ctx, scope: &Scope, client: usize, n: u64) -> Result<()> {
    let key = new_key();
    let fingerprint = Request::new("POST", ROUTE, BODY).fingerprint();
    let mut tx = ctx.pool.begin().await?;
    let claimed = sqlx::query(
        "INSERT INTO idem_z2p (scope, key, fingerprint_version, fingerprint, created_at, expires_at)
         VALUES ($1, $2, $3, $4, now(), now() + interval '24 hours')
         ON CONFLICT DO NOTHING",
    )
    .bind(scope.as_str())
    .bind(key.as_str())
    .bind(fingerprint.version())
    .bind(&fingerprint.hash()[..])
    .execute(&mut *tx)
    .await?
    .rows_affected();
    ensure!(claimed == 1, "zero2prod: fresh key not claimed");
    sqlx::query("INSERT INTO payments (account, amount) VALUES ($1, $2)")
        .bind(scope.as_str())
        .bind(1000_i64)
        .execute(&mut *tx)
        .await?;
    let response = response(client, n);
    sqlx::query(
        "UPDATE idem_z2p SET status = $3, headers = $4, body = $5 WHERE scope = $1 AND key = $2",
    )
    .bind(scope.as_str())
    .bind(key.as_str())
    .bind(i16::try_from(response.status)?)
    .bind(Json(&response.headers))
    .bind(&response.body)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Path 3: claim, the business insert, complete. Returns the key it stored.
async fn first_request(ctx: &Ctx, scope: &Scope, client: usize, n: u64) -> Result<IdempotencyKey> {
    let key = new_key();
    let request = Request::new("POST", ROUTE, BODY);
    let Begin::Claimed(mut claim) = ctx.store.begin(scope, &key, &request).await? else {
        bail!("first request: a fresh key replayed");
    };
    sqlx::query("INSERT INTO payments (account, amount) VALUES ($1, $2)")
        .bind(scope.as_str())
        .bind(1000_i64)
        .execute(&mut claim)
        .await?;
    claim.complete(&response(client, n)).await?;
    Ok(key)
}

/// Path 4: the same request again.
async fn replay(ctx: &Ctx, scope: &Scope, key: &IdempotencyKey) -> Result<()> {
    let request = Request::new("POST", ROUTE, BODY);
    match ctx.store.begin(scope, key, &request).await? {
        Begin::Replay(replay) => {
            ensure!(replay.response.status == 201, "replay: wrong status");
            Ok(())
        }
        Begin::Claimed(_) => bail!("replay: a stored key was claimed again"),
    }
}

/// Path 5: the same key with another body.
async fn conflict(ctx: &Ctx, scope: &Scope, key: &IdempotencyKey) -> Result<()> {
    let request = Request::new("POST", ROUTE, OTHER_BODY);
    match ctx.store.begin(scope, key, &request).await {
        Err(Error::Conflict { .. }) => Ok(()),
        Err(other) => Err(other.into()),
        Ok(_) => bail!("conflict: another body was not refused"),
    }
}

/// What one slice (or several, added up) measured.
#[derive(Debug, Default, Clone)]
struct Tally {
    ops: u64,
    wall: Duration,
    latencies_us: Vec<u32>,
    /// CPU time of this process, and of the server's processes, while the slices ran.
    cost: Cost,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.ops += other.ops;
        self.wall += other.wall;
        self.latencies_us.extend(other.latencies_us);
        self.cost.add(&other.cost);
    }

    fn tps(&self) -> f64 {
        self.ops as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile in milliseconds (nearest rank).
    fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        self.latencies_us.sort_unstable();
        let rank = ((q * self.latencies_us.len() as f64).ceil() as usize).max(1);
        f64::from(self.latencies_us[rank.min(self.latencies_us.len()) - 1]) / 1000.0
    }
}

/// Runs `path` with `clients` concurrent clients for `duration`; TPS = ops / wall time.
async fn slice(ctx: &Arc<Ctx>, path: Path, clients: usize, duration: Duration) -> Result<Tally> {
    let keys = ctx.keys();
    if matches!(path, Path::Replay | Path::Conflict) {
        ensure!(!keys.is_empty(), "{}: no stored keys yet", path.name());
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(clients);
    for client in 0..clients {
        let ctx = Arc::clone(ctx);
        let keys = Arc::clone(&keys);
        tasks.push(tokio::spawn(async move {
            let scope = Scope::new(format!("acct_{client}"))?;
            let mut latencies = Vec::with_capacity(4096);
            let mut stored = Vec::new();
            let mut n = 0_u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match path {
                    Path::Bare => bare(&ctx, scope.as_str()).await?,
                    Path::Zero2Prod => zero2prod(&ctx, &scope, client, n).await?,
                    Path::FirstRequest => {
                        let key = first_request(&ctx, &scope, client, n).await?;
                        stored.push((scope.clone(), key));
                    }
                    Path::Replay | Path::Conflict => {
                        let at = ctx.cursor.fetch_add(1, Ordering::Relaxed) % keys.len();
                        let (scope, key) = &keys[at];
                        if path == Path::Replay {
                            replay(&ctx, scope, key).await?;
                        } else {
                            conflict(&ctx, scope, key).await?;
                        }
                    }
                }
                latencies.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                n += 1;
            }
            anyhow::Ok((latencies, stored))
        }));
    }
    let mut tally = Tally::default();
    let mut stored = Vec::new();
    for task in tasks {
        let (latencies, keys) = task.await??;
        tally.ops += latencies.len() as u64;
        tally.latencies_us.extend(latencies);
        stored.extend(keys);
    }
    tally.wall = start.elapsed();
    if !stored.is_empty() {
        ctx.add_keys(stored);
    }
    Ok(tally)
}

/// Where the time of a slice went: CPU of this process (the clients), CPU of the
/// server's processes and WAL written. Server CPU is known only for a server on this
/// machine; both server figures cover the whole server, other databases included.
#[derive(Debug, Default, Clone)]
struct Cost {
    /// How many measurements were added up (0: none yet).
    slices: u32,
    client_ticks: u64,
    server_ticks: Option<u64>,
    wal_bytes: Option<u64>,
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
struct Meter {
    ticks_per_second: u64,
    postmaster: Option<u32>,
}

/// A snapshot of the counters.
struct Reading {
    client_ticks: u64,
    server_ticks: Option<u64>,
    wal_lsn: Option<u64>,
}

impl Meter {
    /// Finds the server's postmaster if the server runs on this machine.
    async fn new(pool: &PgPool) -> Result<Self> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await?;
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

    async fn read(&self, pool: &PgPool) -> Reading {
        let wal_lsn = sqlx::query_scalar::<_, i64>(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
        )
        .fetch_one(pool)
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

/// One row of the table.
#[derive(Debug, Clone)]
struct Row {
    path: Path,
    clients: usize,
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    ratio_to_bare: f64,
    ops: u64,
    client_us_per_op: f64,
    server_us_per_op: Option<f64>,
    wal_bytes_per_op: Option<f64>,
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "path": self.path.name(),
            "clients": self.clients,
            "tps": round(self.tps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "ratio_to_bare": round(self.ratio_to_bare, 3),
            "ops": self.ops,
            "client_cpu_us_per_op": round(self.client_us_per_op, 1),
            "server_cpu_us_per_op": self.server_us_per_op.map(|v| round(v, 1)),
            "wal_bytes_per_op": self.wal_bytes_per_op.map(|v| round(v, 0)),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10_f64.powi(digits);
    (x * scale).round() / scale
}

/// Paths 1-5 at every client count, interleaved.
async fn grid(
    ctx: &Arc<Ctx>,
    meter: &Meter,
    paths: &[Path],
    clients: &[usize],
    rounds: u32,
    seconds: f64,
) -> Result<Vec<Row>> {
    let slice_len = Duration::from_secs_f64(seconds);
    // Warm up: statement caches of every connection, keys for paths 4 and 5.
    let warm_clients = clients.iter().copied().max().unwrap_or(16);
    for &path in paths {
        slice(ctx, path, warm_clients, Duration::from_millis(400)).await?;
    }
    let mut tallies: BTreeMap<(Path, usize), Tally> = BTreeMap::new();
    for round in 0..rounds {
        let started = Instant::now();
        for &n in clients {
            // Rotate the order of the paths from round to round, so that no path always
            // follows the same one.
            for i in 0..paths.len() {
                let path = paths[(i + round as usize) % paths.len()];
                let before = meter.read(&ctx.pool).await;
                let mut tally = slice(ctx, path, n, slice_len).await?;
                tally.cost = meter.cost(&before, &meter.read(&ctx.pool).await);
                tallies.entry((path, n)).or_default().add(tally);
            }
        }
        eprintln!(
            "  round {}/{rounds} done in {:.1} s",
            round + 1,
            started.elapsed().as_secs_f64()
        );
    }
    let mut rows = Vec::new();
    for &n in clients {
        let bare_tps = tallies[&(Path::Bare, n)].tps();
        for &path in paths {
            let tally = tallies.get_mut(&(path, n)).expect("every cell ran");
            rows.push(Row {
                path,
                clients: n,
                tps: tally.tps(),
                p50_ms: tally.quantile_ms(0.50),
                p99_ms: tally.quantile_ms(0.99),
                ratio_to_bare: tally.tps() / bare_tps,
                ops: tally.ops,
                client_us_per_op: meter.micros_per_op(tally.cost.client_ticks, tally.ops),
                server_us_per_op: tally
                    .cost
                    .server_ticks
                    .map(|ticks| meter.micros_per_op(ticks, tally.ops)),
                wal_bytes_per_op: tally
                    .cost
                    .wal_bytes
                    .map(|bytes| bytes as f64 / tally.ops.max(1) as f64),
            });
        }
    }
    Ok(rows)
}

/// Path 6 at one configured wait.
#[derive(Debug)]
struct InFlight {
    wait: Duration,
    /// Time until `Error::InFlight` while the holder keeps the key.
    refused: Tally,
    /// Holder completes half-way through the wait: time from its commit until the
    /// duplicate has its replay.
    replay_after_commit: Tally,
}

async fn in_flight(ctx: &Arc<Ctx>, waits: &[Duration], reps: usize) -> Result<Vec<InFlight>> {
    let scope = Scope::new("acct_in_flight")?;
    let request = Request::new("POST", ROUTE, BODY);
    let mut out = Vec::new();
    for &wait in waits {
        let waiter = IdempotencyStore::with_config(
            ctx.pool.clone(),
            Config::default().with_in_flight_wait(wait),
        );
        let mut refused = Tally::default();
        let mut after_commit = Tally::default();
        for _ in 0..reps {
            // The holder keeps the key for longer than the wait.
            let key = new_key();
            let Begin::Claimed(holder) = ctx.store.begin(&scope, &key, &request).await? else {
                bail!("in flight: fresh key replayed");
            };
            let t0 = Instant::now();
            let answer = waiter.begin(&scope, &key, &request).await;
            let elapsed = t0.elapsed();
            ensure!(
                matches!(answer, Err(Error::InFlight { .. })),
                "in flight: expected Error::InFlight, got {answer:?}"
            );
            holder.abort().await?;
            refused.latencies_us.push(elapsed.as_micros() as u32);
            refused.ops += 1;

            // The holder completes half-way through the wait.
            let key = new_key();
            let Begin::Claimed(holder) = ctx.store.begin(&scope, &key, &request).await? else {
                bail!("in flight: fresh key replayed");
            };
            let release = tokio::spawn(async move {
                tokio::time::sleep(wait / 2).await;
                holder.complete(&response(0, 0)).await?;
                anyhow::Ok(Instant::now())
            });
            let answer = waiter.begin(&scope, &key, &request).await;
            let answered = Instant::now();
            let committed = release.await??;
            ensure!(
                matches!(answer, Ok(Begin::Replay(_))),
                "in flight: expected a replay after the holder completed, got {answer:?}"
            );
            let gap = answered.saturating_duration_since(committed);
            after_commit.latencies_us.push(gap.as_micros() as u32);
            after_commit.ops += 1;
        }
        out.push(InFlight {
            wait,
            refused,
            replay_after_commit: after_commit,
        });
    }
    Ok(out)
}

/// Path 7.
#[derive(Debug)]
struct SweepResult {
    rows: i64,
    fill_secs: f64,
    alone_deleted: u64,
    alone_secs: f64,
    without: Tally,
    with: Tally,
    with_deleted: u64,
    backlog_left: i64,
}

/// Inserts `rows` expired keys in one statement.
async fn fill_expired(pool: &PgPool, tag: &str, rows: i64) -> Result<f64> {
    let t0 = Instant::now();
    sqlx::query(
        r#"INSERT INTO idempotency_keys
               (scope, key, fingerprint_version, fingerprint, status, headers, body,
                created_at, expires_at)
           SELECT 'sweep_' || $1, 'expired-' || g, 1, sha256(g::text::bytea), 201,
                  '[["content-type","application/json"]]'::jsonb,
                  convert_to('{"id":"pay_' || g || '","status":"paid","amount":1000,"currency":"EUR"}', 'UTF8'),
                  now() - interval '48 hours' + g * interval '1 ms',
                  now() - interval '24 hours' + g * interval '1 ms'
           FROM generate_series(1, $2::bigint) AS g"#,
    )
    .bind(tag)
    .bind(rows)
    .execute(pool)
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    // Start the measurements from a settled state: no checkpoint left over from the
    // bulk insert, fresh statistics (as autovacuum would leave them).
    checkpoint(pool).await;
    sqlx::raw_sql("ANALYZE idempotency_keys")
        .execute(pool)
        .await?;
    Ok(secs)
}

async fn checkpoint(pool: &PgPool) {
    if let Err(error) = sqlx::raw_sql("CHECKPOINT").execute(pool).await {
        eprintln!("  (CHECKPOINT not allowed: {error})");
    }
}

async fn sweeper(
    ctx: &Arc<Ctx>,
    meter: &Meter,
    rows: i64,
    seconds_each_way: f64,
) -> Result<SweepResult> {
    let pool = &ctx.pool;
    eprintln!("  inserting {rows} expired rows");
    let fill_secs = fill_expired(pool, "alone", rows).await?;

    eprintln!("  sweeping them alone (batches of 10,000, no pause)");
    let options = SweepOptions::default()
        .with_batch_size(10_000)
        .with_pause(Duration::ZERO);
    let t0 = Instant::now();
    let alone_deleted = pg_idempotency::sweep(pool, &options).await?;
    let alone_secs = t0.elapsed().as_secs_f64();
    // What autovacuum would do next; the writers below start from a clean table.
    sqlx::raw_sql("VACUUM idempotency_keys")
        .execute(pool)
        .await?;

    eprintln!("  inserting a fresh backlog of {rows} expired rows");
    fill_expired(pool, "backlog", rows).await?;

    // Writers with and without the default sweeper, alternating in short slices.
    let pairs = 4;
    let slice_len = Duration::from_secs_f64(seconds_each_way / f64::from(pairs));
    let mut without = Tally::default();
    let mut with = Tally::default();
    let mut with_deleted = 0;
    for pair in 0..pairs {
        for sweeping in [pair % 2 == 1, pair % 2 == 0] {
            let before = meter.read(pool).await;
            if sweeping {
                let sweeper = Sweeper::spawn(
                    pool.clone(),
                    SweepOptions::default().with_interval(Duration::from_secs(1)),
                );
                let mut tally = slice(ctx, Path::FirstRequest, 16, slice_len).await?;
                with_deleted += sweeper.stop().await;
                tally.cost = meter.cost(&before, &meter.read(pool).await);
                with.add(tally);
            } else {
                let mut tally = slice(ctx, Path::FirstRequest, 16, slice_len).await?;
                tally.cost = meter.cost(&before, &meter.read(pool).await);
                without.add(tally);
            }
        }
    }
    let backlog_left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE expires_at <= now()")
            .fetch_one(pool)
            .await?;
    Ok(SweepResult {
        rows,
        fill_secs,
        alone_deleted,
        alone_secs,
        without,
        with,
        with_deleted,
        backlog_left,
    })
}

/// What the run was measured on.
#[derive(Debug)]
struct Server {
    description: String,
    version: String,
    settings: Vec<(String, String)>,
}

impl Server {
    fn setting(&self, name: &str) -> &str {
        self.settings
            .iter()
            .find(|(n, _)| n == name)
            .map_or("?", |(_, v)| v.as_str())
    }
}

async fn describe_server(pool: &PgPool, description: String) -> Result<Server> {
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(pool)
        .await?;
    let mut settings = Vec::new();
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_level",
        "shared_buffers",
        "max_wal_size",
        "autovacuum",
        "max_connections",
    ] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(pool)
            .await?;
        settings.push((name.to_owned(), value));
    }
    Ok(Server {
        description,
        version,
        settings,
    })
}

/// The URL with its password hidden.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or("");
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_owned(),
    }
}

/// A database of our own on the server at `server_url` (a fresh one with the crate's
/// migrations, from `pg_idempotency::testing`), the benchmark's tables, and a pool of
/// `max_connections` opened up front.
struct Database {
    db: TestDatabase,
    pool: PgPool,
}

impl Database {
    async fn create(server_url: &str, max_connections: u32, ping: bool) -> Result<Self> {
        let db = TestDatabase::create_on(server_url)
            .await
            .with_context(|| format!("creating a database on {}", redact(server_url)))?;
        db.pool().close().await;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(max_connections)
            .acquire_timeout(Duration::from_secs(60))
            .test_before_acquire(ping)
            .connect(db.url())
            .await?;
        sqlx::raw_sql(
            "CREATE TABLE payments (
                 id      bigserial PRIMARY KEY,
                 account text   NOT NULL,
                 amount  bigint NOT NULL
             );
             -- The zero2prod shape's own table: the columns of idempotency_keys, the
             -- response nullable until the UPDATE fills it in.
             CREATE TABLE idem_z2p (
                 scope               text        NOT NULL,
                 key                 text        NOT NULL,
                 fingerprint_version smallint    NOT NULL,
                 fingerprint         bytea       NOT NULL,
                 status              smallint,
                 headers             jsonb,
                 body                bytea,
                 created_at          timestamptz NOT NULL DEFAULT now(),
                 expires_at          timestamptz NOT NULL,
                 PRIMARY KEY (scope, key)
             );
             CREATE INDEX idem_z2p_expires_at_idx ON idem_z2p (expires_at);",
        )
        .execute(&pool)
        .await?;
        Ok(Self { db, pool })
    }

    async fn drop_now(self) -> Result<()> {
        self.pool.close().await;
        self.db.close().await?;
        Ok(())
    }
}

/// Every connection opened and used once before anything is measured.
async fn open_all(pool: &PgPool, n: u32) -> Result<()> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(pool.acquire().await?);
    }
    for conn in &mut conns {
        sqlx::raw_sql("SELECT 1").execute(&mut **conn).await?;
    }
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}

/// One target of issue 4, evaluated.
struct Target {
    name: String,
    measured: String,
    met: bool,
}

impl Target {
    fn json(&self) -> Value {
        json!({ "target": self.name, "measured": self.measured, "met": self.met })
    }
}

fn targets(rows: &[Row], in_flight: &[InFlight], sweep: Option<&mut SweepResult>) -> Vec<Target> {
    let mut out = Vec::new();
    let at16 = |path: Path| rows.iter().find(|r| r.clients == 16 && r.path == path);
    if let Some(first) = at16(Path::FirstRequest) {
        out.push(Target {
            name: "first request >= 0.75 x bare (16 clients)".into(),
            measured: format!("{:.2} x", first.ratio_to_bare),
            met: first.ratio_to_bare >= 0.75,
        });
        if let Some(z2p) = at16(Path::Zero2Prod) {
            let vs_z2p = first.tps / z2p.tps;
            out.push(Target {
                name: "first request >= 1.4 x zero2prod shape (16 clients)".into(),
                measured: format!("{vs_z2p:.2} x"),
                met: vs_z2p >= 1.4,
            });
        }
    }
    if let Some(replay) = at16(Path::Replay) {
        out.push(Target {
            name: "replay >= 1.5 x bare (16 clients)".into(),
            measured: format!("{:.2} x", replay.ratio_to_bare),
            met: replay.ratio_to_bare >= 1.5,
        });
    }
    for f in in_flight {
        let wait_ms = f.wait.as_secs_f64() * 1000.0;
        let max_ms = f
            .refused
            .latencies_us
            .iter()
            .copied()
            .max()
            .map_or(f64::NAN, |us| f64::from(us) / 1000.0);
        out.push(Target {
            name: format!("in-flight answer within wait + 20 ms (wait {wait_ms:.0} ms)"),
            measured: format!("max {max_ms:.1} ms (+{:.1} ms)", max_ms - wait_ms),
            met: max_ms <= wait_ms + 20.0,
        });
    }
    if let Some(sweep) = sweep {
        let rate = sweep.alone_deleted as f64 / sweep.alone_secs;
        out.push(Target {
            name: "sweeper alone >= 100,000 rows/s".into(),
            measured: format!("{rate:.0} rows/s"),
            met: rate >= 100_000.0,
        });
        let kept = sweep.with.tps() / sweep.without.tps();
        out.push(Target {
            name: "writers keep >= 90% TPS with the default sweeper".into(),
            measured: format!("{:.0}%", kept * 100.0),
            met: kept >= 0.90,
        });
        let p99 = sweep.with.quantile_ms(0.99) / sweep.without.quantile_ms(0.99);
        out.push(Target {
            name: "writers' p99 <= 1.5 x with the default sweeper".into(),
            measured: format!("{p99:.2} x"),
            met: p99 <= 1.5,
        });
    }
    out
}

fn draw_chart(file: &FsPath, rows: &[Row], clients: &[usize], server: &Server) -> Result<()> {
    use plotters::prelude::*;

    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let series = [
        (
            Path::Bare,
            "bare: BEGIN; INSERT; COMMIT",
            RGBColor(110, 110, 110),
        ),
        (
            Path::Zero2Prod,
            "zero2prod shape (hand-written)",
            RGBColor(214, 96, 77),
        ),
        (
            Path::FirstRequest,
            "pg-idempotency, first request",
            RGBColor(33, 102, 172),
        ),
    ];
    let tps = |path: Path, n: usize| {
        rows.iter()
            .find(|r| r.path == path && r.clients == n)
            .map_or(0.0, |r| r.tps)
    };
    let top = series
        .iter()
        .flat_map(|(p, _, _)| clients.iter().map(move |&n| tps(*p, n)))
        .fold(0.0_f64, f64::max)
        * 1.15;

    let root = SVGBackend::new(file, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "Transactions per second (PostgreSQL {}, fsync {}, {} cores)",
        server.version.split_whitespace().nth(1).unwrap_or("?"),
        server.setting("fsync"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (0..clients.len().saturating_sub(1)).into_segmented(),
            0.0..top.max(1.0),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("concurrent clients")
        .y_desc("TPS")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => clients.get(*i).map_or(String::new(), usize::to_string),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (path, label, color) in series {
        if !rows.iter().any(|r| r.path == path) {
            continue;
        }
        let points: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, &n)| (SegmentValue::CenterOf(i), tps(path, n)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let total = Instant::now();
    let clients = args.clients.clone().unwrap_or_else(|| {
        if args.quick {
            vec![16]
        } else {
            vec![1, 4, 16, 64]
        }
    });
    let seconds = args.seconds.unwrap_or(if args.quick { 1.2 } else { 2.0 });
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 5 });
    let sweep_rows = args
        .sweep_rows
        .unwrap_or(if args.quick { 200_000 } else { 1_000_000 });
    let sweeper_seconds = args
        .sweeper_seconds
        .unwrap_or(if args.quick { 5.0 } else { 20.0 });
    let in_flight_reps = if args.quick { 5 } else { 20 };
    let svg = args.svg.clone().or_else(|| {
        (!args.quick && args.sections.contains(&Section::Grid))
            .then(|| PathBuf::from("docs/throughput.svg"))
    });

    // 64 clients, plus the in-flight pair and the sweeper, plus headroom.
    let max_clients = clients.iter().copied().max().unwrap_or(16).max(16);
    let pool_size = u32::try_from(max_clients + 8)?;
    // A throwaway cluster with fsync on, unless a server is named.
    let mut cluster = None;
    let (url, description) = match &args.database_url {
        Some(url) => (url.clone(), format!("{} (DATABASE_URL)", redact(url))),
        None => {
            eprintln!("starting a throwaway PostgreSQL cluster (fsync on)");
            let started = tokio::task::spawn_blocking(|| {
                LocalCluster::start(LocalClusterOptions::default().fsync(true))
            })
            .await??;
            let url = started.url();
            cluster = Some(started);
            (
                url.clone(),
                format!("{url} (throwaway local cluster, pg_idempotency::testing::LocalCluster)"),
            )
        }
    };
    let db = Database::create(&url, pool_size, args.ping_before_acquire).await?;
    let pool = db.pool.clone();
    let server = describe_server(&pool, description).await?;
    let load_before = load_average();
    println!("server:   {}", server.description);
    println!("          {}", server.version);
    println!(
        "settings: {}",
        server
            .settings
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "machine:  {} cores, load average {load_before}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "run:      {}clients {clients:?}, {rounds} rounds of {seconds} s slices, pool of {pool_size}{}",
        if args.quick { "quick, " } else { "" },
        if args.ping_before_acquire {
            ""
        } else {
            " without ping before acquire"
        }
    );
    println!();

    let ctx = Arc::new(Ctx {
        store: IdempotencyStore::new(pool.clone()),
        pool: pool.clone(),
        keys: Mutex::new(Arc::new(Vec::new())),
        cursor: AtomicUsize::new(0),
    });
    open_all(&pool, pool_size).await?;
    let meter = Meter::new(&pool).await?;

    let mut rows = Vec::new();
    if args.sections.contains(&Section::Grid) {
        eprintln!("paths 1-5:");
        let paths: Vec<Path> = Path::ALL
            .into_iter()
            .filter(|p| *p == Path::Bare || args.paths.as_ref().is_none_or(|only| only.contains(p)))
            .collect();
        if paths.contains(&Path::Replay) || paths.contains(&Path::Conflict) {
            ensure!(
                paths.contains(&Path::FirstRequest),
                "replay and conflict need first-request"
            );
        }
        rows = grid(&ctx, &meter, &paths, &clients, rounds, seconds).await?;
    }
    let mut flights = Vec::new();
    if args.sections.contains(&Section::InFlight) {
        eprintln!("path 6: in flight");
        flights = in_flight(
            &ctx,
            &[Duration::from_millis(50), Duration::from_millis(200)],
            in_flight_reps,
        )
        .await?;
    }
    let mut sweep = None;
    if args.sections.contains(&Section::Sweeper) {
        eprintln!("path 7: sweeper");
        sweep = Some(sweeper(&ctx, &meter, sweep_rows, sweeper_seconds).await?);
    }
    let load_after = load_average();

    // The report.
    let mut out = String::new();
    if !rows.is_empty() {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        writeln!(
            out,
            "{:<14} {:>7} {:>9} {:>8} {:>8} {:>14}   {:>13} {:>13} {:>9}",
            "path",
            "clients",
            "tps",
            "p50_ms",
            "p99_ms",
            "ratio_to_bare",
            "client_cpu_us",
            "server_cpu_us",
            "wal_bytes"
        )?;
        for r in &rows {
            writeln!(
                out,
                "{:<14} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>14.2}   {:>13.0} {:>13} {:>9}",
                r.path.name(),
                r.clients,
                r.tps,
                r.p50_ms,
                r.p99_ms,
                r.ratio_to_bare,
                r.client_us_per_op,
                opt(r.server_us_per_op),
                opt(r.wal_bytes_per_op),
            )?;
        }
        writeln!(
            out,
            "(cpu and wal per operation; server figures cover the whole server{})\n",
            if meter.postmaster.is_some() {
                ""
            } else {
                ", whose CPU is not visible from here"
            }
        )?;
    }
    let mut flight_json = Vec::new();
    for f in &mut flights {
        let wait = ms(f.wait);
        let (p50, p99) = (f.refused.quantile_ms(0.5), f.refused.quantile_ms(1.0));
        let (r50, r99) = (
            f.replay_after_commit.quantile_ms(0.5),
            f.replay_after_commit.quantile_ms(1.0),
        );
        writeln!(
            out,
            "in flight, wait {wait:.0} ms: InFlight after p50 {p50:.1} ms, max {p99:.1} ms \
             (overshoot max {:.1} ms); holder done at {:.0} ms: replay {r50:.1} ms (max {r99:.1}) after its commit; {} runs",
            p99 - wait,
            wait / 2.0,
            f.refused.ops
        )?;
        flight_json.push(json!({
            "wait_ms": wait,
            "runs": f.refused.ops,
            "in_flight_p50_ms": round(p50, 3),
            "in_flight_max_ms": round(p99, 3),
            "overshoot_max_ms": round(p99 - wait, 3),
            "replay_after_commit_p50_ms": round(r50, 3),
            "replay_after_commit_max_ms": round(r99, 3),
        }));
    }
    let mut sweep_json = Value::Null;
    if let Some(s) = &mut sweep {
        let rate = s.alone_deleted as f64 / s.alone_secs;
        let with_secs = s.with.wall.as_secs_f64();
        let (wo_p99, w_p99) = (s.without.quantile_ms(0.99), s.with.quantile_ms(0.99));
        let (wo_p50, w_p50) = (s.without.quantile_ms(0.5), s.with.quantile_ms(0.5));
        writeln!(
            out,
            "sweeper alone: {} expired rows (inserted in {:.1} s) deleted in {:.2} s = {rate:.0} rows/s (batches of 10,000, no pause)",
            s.alone_deleted, s.fill_secs, s.alone_secs
        )?;
        writeln!(
            out,
            "writers (first_request, 16 clients), backlog of {} expired rows:",
            s.rows
        )?;
        let per_op = |t: &Tally| {
            let server = t.cost.server_ticks.map_or("-".to_owned(), |ticks| {
                format!("{:.0}", meter.micros_per_op(ticks, t.ops))
            });
            let wal = t.cost.wal_bytes.map_or("-".to_owned(), |bytes| {
                format!("{:.0}", bytes as f64 / t.ops.max(1) as f64)
            });
            format!("server cpu {server} us/op, wal {wal} B/op")
        };
        writeln!(
            out,
            "  without sweeper: {:>6.0} tps  p50 {wo_p50:.2} ms  p99 {wo_p99:.2} ms  ({})",
            s.without.tps(),
            per_op(&s.without),
        )?;
        writeln!(
            out,
            "  default sweeper: {:>6.0} tps  p50 {w_p50:.2} ms  p99 {w_p99:.2} ms  ({}; {:.0}% of TPS, p99 x {:.2}); it deleted {} rows = {:.0} rows/s, {} expired rows left",
            s.with.tps(),
            per_op(&s.with),
            s.with.tps() / s.without.tps() * 100.0,
            w_p99 / wo_p99,
            s.with_deleted,
            s.with_deleted as f64 / with_secs,
            s.backlog_left
        )?;
        sweep_json = json!({
            "rows": s.rows,
            "alone_deleted": s.alone_deleted,
            "alone_secs": round(s.alone_secs, 3),
            "alone_rows_per_s": round(rate, 0),
            "writers_clients": 16,
            "without_sweeper": { "tps": round(s.without.tps(), 1), "p50_ms": round(wo_p50, 3), "p99_ms": round(wo_p99, 3) },
            "with_sweeper": { "tps": round(s.with.tps(), 1), "p50_ms": round(w_p50, 3), "p99_ms": round(w_p99, 3),
                              "deleted": s.with_deleted, "rows_per_s": round(s.with_deleted as f64 / with_secs, 0) },
            "tps_kept": round(s.with.tps() / s.without.tps(), 3),
            "p99_ratio": round(w_p99 / wo_p99, 3),
        });
    }
    let targets = targets(&rows, &flights, sweep.as_mut());
    if !targets.is_empty() {
        writeln!(out, "\ntargets (issue 4):")?;
        for t in &targets {
            writeln!(
                out,
                "  {:<62} {:<26} {}",
                t.name,
                t.measured,
                if t.met { "met" } else { "NOT met" }
            )?;
        }
    }
    writeln!(
        out,
        "\nload average before {load_before}, after {load_after}; total {:.0} s",
        total.elapsed().as_secs_f64()
    )?;
    print!("{out}");

    if let Some(file) = &args.json {
        let doc = json!({
            "server": {
                "description": server.description,
                "version": server.version,
                "settings": server.settings.iter().cloned().collect::<BTreeMap<_, _>>(),
                "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            },
            "run": { "quick": args.quick, "clients": clients, "rounds": rounds, "slice_seconds": seconds },
            "results": rows.iter().map(Row::json).collect::<Vec<_>>(),
            "in_flight": flight_json,
            "sweeper": sweep_json,
            "targets": targets.iter().map(Target::json).collect::<Vec<_>>(),
        });
        std::fs::write(file, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", file.display()))?;
        println!("wrote {}", file.display());
    }
    if let Some(file) = &svg {
        if rows.is_empty() {
            eprintln!("no chart: the grid did not run");
        } else {
            draw_chart(file, &rows, &clients, &server)?;
            println!("wrote {}", file.display());
        }
    }
    db.drop_now().await?;
    drop(cluster);
    Ok(())
}
