//! The measured paths: one operation each ([`bare`] .. [`realistic_first_request`]),
//! run by [`slice`] under concurrent clients and interleaved by [`grid`], some of them
//! also at every response size of the sweep ([`Cell`]); then [`in_flight`] and
//! [`sweeper`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use pg_idempotency::phased::{Finished, Operation, Steps};
use pg_idempotency::{
    Begin, Config, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Outcome, Scope,
    StoredResponse, SweepOptions, Sweeper,
};
use sqlx::PgPool;
use sqlx::types::Json;

use crate::meters::{Meter, Tally};
use crate::table::{SCOPES, Table};

/// The paths of the grid, in the order of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Path {
    Bare,
    Floor,
    Zero2Prod,
    FirstRequest,
    Replay,
    Conflict,
    Phased,
    RealisticBare,
    RealisticZero2Prod,
    RealisticFirstRequest,
}

impl Path {
    pub const ALL: [Path; 10] = [
        Path::Bare,
        Path::Floor,
        Path::Zero2Prod,
        Path::FirstRequest,
        Path::Replay,
        Path::Conflict,
        Path::Phased,
        Path::RealisticBare,
        Path::RealisticZero2Prod,
        Path::RealisticFirstRequest,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Path::Bare => "bare",
            Path::Floor => "floor",
            Path::Zero2Prod => "zero2prod",
            Path::FirstRequest => "first_request",
            Path::Replay => "replay",
            Path::Conflict => "conflict",
            Path::Phased => "phased",
            Path::RealisticBare => "realistic_bare",
            Path::RealisticZero2Prod => "realistic_zero2prod",
            Path::RealisticFirstRequest => "realistic_first_request",
        }
    }

    /// The business writes of the path.
    fn writes(self) -> Writes {
        match self {
            Path::RealisticBare | Path::RealisticZero2Prod | Path::RealisticFirstRequest => {
                Writes::Realistic
            }
            _ => Writes::Payment,
        }
    }

    /// Whether the response-size sweep runs this path too.
    pub fn sized(self) -> bool {
        matches!(self, Path::Zero2Prod | Path::FirstRequest)
    }
}

/// One cell of the grid: a path, with the benchmark's usual response (about 70 bytes)
/// or with a response body of `size` bytes (the response-size sweep).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cell {
    pub path: Path,
    pub size: Option<usize>,
}

impl Cell {
    pub fn usual(path: Path) -> Self {
        Self { path, size: None }
    }

    /// The path's name, and the body size if it is one of the sweep.
    pub fn label(self) -> String {
        match self.size {
            None => self.path.name().to_owned(),
            Some(size) if size >= 1024 && size % 1024 == 0 => {
                format!("{} {}KB", self.path.name(), size / 1024)
            }
            Some(size) => format!("{} {size}B", self.path.name()),
        }
    }
}

const BODY: &[u8] = br#"{"amount":1000,"currency":"EUR"}"#;
const OTHER_BODY: &[u8] = br#"{"amount":2000,"currency":"EUR"}"#;
const ROUTE: &str = "/v1/payments";

/// Everything the clients share: one pool, one database.
pub struct Ctx {
    pool: PgPool,
    store: IdempotencyStore,
    /// The phased path's operation, calling the fake card processor.
    charge: Charge,
    /// The key rows' scopes, `acct_0` to `acct_999` ([`SCOPES`]).
    scopes: Vec<Scope>,
    /// Keys that path 3 stored, for paths 4 and 5.
    keys: Mutex<Arc<Vec<(Scope, IdempotencyKey)>>>,
    cursor: AtomicUsize,
}

impl Ctx {
    /// The paths on `pool`; the phased one calls the fake card processor at
    /// `processor_url`.
    pub fn new(pool: PgPool, processor_url: String) -> Self {
        Self::with_config(pool, processor_url, Config::default())
    }

    /// [`Ctx::new`] with a store of this configuration.
    pub fn with_config(pool: PgPool, processor_url: String, config: Config) -> Self {
        Self {
            store: IdempotencyStore::with_config(pool.clone(), config),
            charge: Charge {
                http: reqwest::Client::new(),
                url: format!("{processor_url}/charge"),
            },
            pool,
            scopes: (0..SCOPES)
                .map(|n| Scope::new(format!("acct_{n}")).expect("a valid scope"))
                .collect(),
            keys: Mutex::new(Arc::new(Vec::new())),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The `n`th key row's scope, round the [`SCOPES`] scopes.
    pub fn scope(&self, n: usize) -> &Scope {
        &self.scopes[n % SCOPES]
    }

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

/// The response of operation `n` of `client`: about 70 bytes, or exactly `size` bytes
/// (the start of an order with line items, see [`line_items`]).
pub fn response(client: usize, n: u64, size: Option<usize>) -> StoredResponse {
    let head =
        format!(r#"{{"id":"pay_{client}_{n}","status":"paid","amount":1000,"currency":"EUR""#);
    let body = match size {
        None => head + "}",
        Some(size) => {
            let items = line_items();
            let mut body = head + r#","items":["#;
            body.push_str(&items[..size.saturating_sub(body.len()).min(items.len())]);
            body
        }
    };
    StoredResponse::new(201, body).with_header("content-type", "application/json")
}

/// The largest body of the sweep.
pub const MAX_RESPONSE_SIZE: usize = 100 * 1024;

/// JSON line items to fill a response of the sweep with: varied (a new SKU and quantity
/// on every line) but compressible like a real API response, made once.
fn line_items() -> &'static str {
    static ITEMS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ITEMS.get_or_init(|| {
        let mut items = String::with_capacity(MAX_RESPONSE_SIZE + 128);
        let mut line = 0_u32;
        while items.len() < MAX_RESPONSE_SIZE {
            let sku = uuid::Uuid::new_v4().simple().to_string();
            items.push_str(&format!(
                r#"{{"line":{line},"sku":"{}","qty":{},"unit_price":{},"currency":"EUR"}},"#,
                &sku[..12],
                1 + line % 7,
                199 + (line * 37) % 5000
            ));
            line += 1;
        }
        items
    })
}

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(uuid::Uuid::new_v4()).expect("a v4 UUID is a valid key")
}

/// The business writes of a path: one payment, or the realistic transaction's four
/// statements.
#[derive(Debug, Clone, Copy)]
pub enum Writes {
    /// `INSERT INTO payments`.
    Payment,
    /// Insert a payment, update the account's balance row, insert a ledger row and an
    /// outbox row.
    Realistic,
}

impl Writes {
    /// Runs the writes for `account` in `tx`.
    async fn run<C>(self, tx: &mut C, account: &str) -> Result<()>
    where
        for<'c> &'c mut C: sqlx::Executor<'c, Database = sqlx::Postgres>,
    {
        let amount = 1000_i64;
        if let Writes::Payment = self {
            sqlx::query("INSERT INTO payments (account, amount) VALUES ($1, $2)")
                .bind(account)
                .bind(amount)
                .execute(&mut *tx)
                .await?;
            return Ok(());
        }
        let payment: i64 = sqlx::query_scalar(
            "INSERT INTO payments (account, amount) VALUES ($1, $2) RETURNING id",
        )
        .bind(account)
        .bind(amount)
        .fetch_one(&mut *tx)
        .await?;
        let updated = sqlx::query("UPDATE accounts SET balance = balance - $2 WHERE account = $1")
            .bind(account)
            .bind(amount)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        ensure!(updated == 1, "realistic: no account row for {account}");
        sqlx::query("INSERT INTO ledger (account, payment_id, amount) VALUES ($1, $2, $3)")
            .bind(account)
            .bind(payment)
            .bind(-amount)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO outbox (topic, payload) VALUES ('payment.created', $1)")
            .bind(Json(
                serde_json::json!({ "payment": payment, "account": account, "amount": amount }),
            ))
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// `bare` and `realistic_bare`: `BEGIN`, the writes, `COMMIT`.
async fn bare(ctx: &Ctx, account: &str, writes: Writes) -> Result<()> {
    let mut tx = ctx.pool.begin().await?;
    writes.run(&mut *tx, account).await?;
    tx.commit().await?;
    Ok(())
}

/// The floor: bare plus the key row (the columns `idempotency_keys` holds for a first
/// request) inserted in the same transaction, in one string with `COMMIT`; no lock, no
/// lookup. The least that storing a response with the business write can cost.
async fn floor(ctx: &Ctx, scope: &Scope, account: &str, response: &StoredResponse) -> Result<()> {
    let key = new_key();
    let fingerprint = IdempotentRequest::new("POST", ROUTE, BODY).fingerprint();
    let mut conn = ctx.pool.acquire().await?;
    sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
    Writes::Payment.run(&mut *conn, account).await?;
    // The values are this benchmark's own (an ASCII scope, a UUID, hex), so they are
    // spelled into the string as they are.
    let insert = format!(
        "INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status, \
         headers, body, created_at, expires_at) VALUES ('{}', '{}', {}, '\\x{}', {}, \
         '[[\"content-type\",\"application/json\"]]', '\\x{}', now(), \
         now() + interval '24 hours'); COMMIT",
        scope.as_str(),
        key.as_str(),
        fingerprint.version(),
        hex(fingerprint.hash()),
        response.status,
        hex(&response.body),
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(insert))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `zero2prod` and `realistic_zero2prod`: what most users write by hand (zero2prod
/// `src/idempotency`), with the same columns as `idempotency_keys`: the claim's
/// `INSERT`, the writes, the response's `UPDATE` (two row versions of the key).
async fn zero2prod(
    ctx: &Ctx,
    scope: &Scope,
    account: &str,
    writes: Writes,
    response: &StoredResponse,
) -> Result<()> {
    let key = new_key();
    let fingerprint = IdempotentRequest::new("POST", ROUTE, BODY).fingerprint();
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
    writes.run(&mut *tx, account).await?;
    sqlx::query(
        "UPDATE idem_z2p SET status = $3, headers = $4, body = $5 WHERE scope = $1 AND key = $2",
    )
    .bind(scope.as_str())
    .bind(key.as_str())
    .bind(i16::try_from(response.status)?)
    .bind(Json(&response.headers))
    .bind(&response.body[..])
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// `first_request` and `realistic_first_request`: claim, the writes, complete. Returns
/// the key it stored.
pub async fn first_request(
    ctx: &Ctx,
    scope: &Scope,
    account: &str,
    writes: Writes,
    response: &StoredResponse,
) -> Result<IdempotencyKey> {
    let key = new_key();
    let request = IdempotentRequest::new("POST", ROUTE, BODY);
    let Begin::Claimed(mut claim) = ctx.store.begin(scope, &key, &request).await? else {
        bail!("first request: a fresh key replayed");
    };
    writes.run(&mut claim, account).await?;
    claim.complete(response).await?;
    Ok(key)
}

/// Path 4: the same request again.
async fn replay(ctx: &Ctx, scope: &Scope, key: &IdempotencyKey) -> Result<()> {
    let request = IdempotentRequest::new("POST", ROUTE, BODY);
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
    let request = IdempotentRequest::new("POST", ROUTE, OTHER_BODY);
    match ctx.store.begin(scope, key, &request).await {
        Err(Error::Conflict { .. }) => Ok(()),
        Err(other) => Err(other.into()),
        Ok(_) => bail!("conflict: another body was not refused"),
    }
}

/// The phased path's operation: a local step (the payment), one call to the card
/// processor with the downstream key, and the final step (records the processor's
/// answer, stores the response).
struct Charge {
    http: reqwest::Client,
    url: String,
}

impl Operation for Charge {
    const NAME: &'static str = "bench.charge";
    type Input = i64;
    type Error = anyhow::Error;

    async fn run(&self, amount: &i64, steps: &mut Steps) -> Result<Finished> {
        let account = steps.scope().to_string();
        let id: i64 = steps
            .local("record_payment", async |tx| {
                let id = sqlx::query_scalar(
                    "INSERT INTO payments (account, amount) VALUES ($1, $2) RETURNING id",
                )
                .bind(&account)
                .bind(amount)
                .fetch_one(&mut *tx)
                .await?;
                anyhow::Ok(id)
            })
            .await?;
        let charge_id: String = steps
            .foreign("call_processor", async |downstream_key| {
                let answer = self
                    .http
                    .post(&self.url)
                    .header("idempotency-key", downstream_key.to_string())
                    // What the charge is for: the processor refuses a charge without it.
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"amount":{amount},"currency":"EUR"}}"#))
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                let answer: serde_json::Value = serde_json::from_slice(&answer)?;
                answer["charge_id"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow::anyhow!("no charge_id"))
            })
            .await?;
        steps
            .finish(async |tx| {
                sqlx::query("UPDATE payments SET processor_charge_id = $1 WHERE id = $2")
                    .bind(&charge_id)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                anyhow::Ok(response(0, u64::try_from(id)?, None))
            })
            .await
    }
}

/// Path 6: a phased request (see [`Charge`]).
async fn phased(ctx: &Ctx, scope: &Scope) -> Result<()> {
    let request = IdempotentRequest::new("POST", "/v1/charges", BODY);
    let outcome = ctx
        .store
        .run_phased(scope, &new_key(), &request, &ctx.charge, 1000)
        .await?;
    ensure!(
        matches!(outcome, Outcome::Executed { stored: true, .. }),
        "phased: {outcome:?}"
    );
    Ok(())
}

/// Runs `cell` with `clients` concurrent clients for `duration`; TPS = ops / wall time.
async fn slice(ctx: &Arc<Ctx>, cell: Cell, clients: usize, duration: Duration) -> Result<Tally> {
    let Cell { path, size } = cell;
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
            // The business account is the client's own; the key rows' scope moves over
            // all the scopes, so that new keys land all over the index.
            let account = format!("acct_{client}");
            let mut latencies = Vec::with_capacity(4096);
            let mut stored = Vec::new();
            let mut n = 0_u64;
            while Instant::now() < deadline {
                let scope = ctx.scope(client + n as usize * clients);
                let t0 = Instant::now();
                match path {
                    Path::Bare => bare(&ctx, &account, Writes::Payment).await?,
                    Path::RealisticBare => bare(&ctx, &account, Writes::Realistic).await?,
                    Path::Floor => floor(&ctx, scope, &account, &response(client, n, None)).await?,
                    Path::Phased => phased(&ctx, scope).await?,
                    Path::Zero2Prod | Path::RealisticZero2Prod => {
                        let response = response(client, n, size);
                        zero2prod(&ctx, scope, &account, path.writes(), &response).await?;
                    }
                    Path::FirstRequest | Path::RealisticFirstRequest => {
                        let response = response(client, n, size);
                        let key =
                            first_request(&ctx, scope, &account, path.writes(), &response).await?;
                        // Replays and conflicts read back the usual responses.
                        if path == Path::FirstRequest && size.is_none() {
                            stored.push((scope.clone(), key));
                        }
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

/// One row of the table: a cell measured at one number of clients.
#[derive(Debug, Clone)]
pub struct Row {
    /// The table it ran on.
    pub table: Table,
    pub cell: Cell,
    pub clients: usize,
    pub tps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ratio_to_bare: f64,
    /// TPS over the floor's, if the floor ran.
    pub ratio_to_floor: Option<f64>,
    pub ops: u64,
    pub client_us_per_op: f64,
    pub server_us_per_op: Option<f64>,
    pub wal_bytes_per_op: Option<f64>,
}

/// Every cell at every client count, interleaved.
pub async fn grid(
    ctx: &Arc<Ctx>,
    meter: &Meter,
    table: Table,
    cells: &[Cell],
    clients: &[usize],
    rounds: u32,
    seconds: f64,
) -> Result<Vec<Row>> {
    let slice_len = Duration::from_secs_f64(seconds);
    // Warm up: statement caches of every connection, keys for replay and conflict.
    let warm_clients = clients.iter().copied().max().unwrap_or(16);
    for &cell in cells {
        slice(ctx, cell, warm_clients, Duration::from_millis(400)).await?;
    }
    let mut tallies: BTreeMap<(Cell, usize), Tally> = BTreeMap::new();
    for round in 0..rounds {
        let started = Instant::now();
        for &n in clients {
            // Rotate the order of the cells from round to round, so that no cell always
            // follows the same one.
            for i in 0..cells.len() {
                let cell = cells[(i + round as usize) % cells.len()];
                let tally = meter
                    .metered(&ctx.pool, slice(ctx, cell, n, slice_len))
                    .await?;
                tallies.entry((cell, n)).or_default().add(tally);
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
        let bare_tps = tallies[&(Cell::usual(Path::Bare), n)].tps();
        let floor_tps = tallies.get(&(Cell::usual(Path::Floor), n)).map(Tally::tps);
        for &cell in cells {
            let tally = tallies.get_mut(&(cell, n)).expect("every cell ran");
            rows.push(Row {
                table,
                cell,
                clients: n,
                tps: tally.tps(),
                p50_ms: tally.quantile_ms(0.50),
                p99_ms: tally.quantile_ms(0.99),
                ratio_to_bare: tally.tps() / bare_tps,
                ratio_to_floor: floor_tps.map(|floor| tally.tps() / floor),
                ops: tally.ops,
                client_us_per_op: tally.client_us_per_op(meter),
                server_us_per_op: tally.server_us_per_op(meter),
                wal_bytes_per_op: tally.wal_bytes_per_op(),
            });
        }
    }
    Ok(rows)
}

/// Path 7 at one configured wait.
#[derive(Debug)]
pub struct InFlight {
    pub wait: Duration,
    /// Time until `Error::InFlight` while the holder keeps the key.
    pub refused: Tally,
    /// Holder completes half-way through the wait: time from its commit until the
    /// duplicate has its replay.
    pub replay_after_commit: Tally,
}

pub async fn in_flight(ctx: &Arc<Ctx>, waits: &[Duration], reps: usize) -> Result<Vec<InFlight>> {
    let scope = Scope::new("acct_in_flight")?;
    let request = IdempotentRequest::new("POST", ROUTE, BODY);
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
                holder.complete(&response(0, 0, None)).await?;
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

/// Concurrent writers (path 3) while the sweeper runs or not.
pub const SWEEP_WRITERS: usize = 16;

/// Path 8.
#[derive(Debug)]
pub struct SweepResult {
    pub table: Table,
    pub rows: i64,
    pub fill_secs: f64,
    pub alone_deleted: u64,
    pub alone_secs: f64,
    /// The `VACUUM` after the sweep alone: it reads every index of the table whole.
    pub vacuum_secs: f64,
    pub without: Tally,
    pub with: Tally,
    pub with_deleted: u64,
    pub backlog_left: i64,
}

impl SweepResult {
    /// Rows per second of the sweep alone.
    pub fn alone_rows_per_s(&self) -> f64 {
        self.alone_deleted as f64 / self.alone_secs
    }

    /// Rows per second that the default sweeper deleted beside the writers.
    pub fn with_rows_per_s(&self) -> f64 {
        self.with_deleted as f64 / self.with.wall.as_secs_f64()
    }

    /// The writers' TPS with the default sweeper, as a fraction of it without.
    pub fn tps_kept(&self) -> f64 {
        self.with.tps() / self.without.tps()
    }

    /// The writers' p99 with the default sweeper over their p99 without.
    pub fn p99_ratio(&mut self) -> f64 {
        self.with.quantile_ms(0.99) / self.without.quantile_ms(0.99)
    }
}

/// Inserts `rows` expired keys in one statement: random keys over [`SCOPES`] scopes,
/// like the live ones, so that their index entries lie all over the primary key.
async fn fill_expired(pool: &PgPool, tag: &str, rows: i64) -> Result<f64> {
    let t0 = Instant::now();
    sqlx::query(
        r#"INSERT INTO idempotency_keys
               (scope, key, fingerprint_version, fingerprint, status, headers, body,
                created_at, expires_at)
           SELECT 'acct_' || (g % $3), gen_random_uuid()::text, 1, sha256(($1 || g)::bytea), 201,
                  '[["content-type","application/json"]]'::jsonb,
                  convert_to('{"id":"pay_' || g || '","status":"paid","amount":1000,"currency":"EUR"}', 'UTF8'),
                  now() - interval '48 hours' + g * interval '1 ms',
                  now() - interval '24 hours' + g * interval '1 ms'
           FROM generate_series(1, $2::bigint) AS g"#,
    )
    .bind(tag)
    .bind(rows)
    .bind(i64::try_from(SCOPES)?)
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

pub async fn sweeper(
    ctx: &Arc<Ctx>,
    meter: &Meter,
    table: Table,
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
    let t0 = Instant::now();
    sqlx::raw_sql("VACUUM idempotency_keys")
        .execute(pool)
        .await?;
    let vacuum_secs = t0.elapsed().as_secs_f64();

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
            if sweeping {
                let tally = meter
                    .metered(pool, async {
                        let sweeper = Sweeper::spawn(
                            pool.clone(),
                            SweepOptions::default().with_interval(Duration::from_secs(1)),
                        );
                        let tally = slice(
                            ctx,
                            Cell::usual(Path::FirstRequest),
                            SWEEP_WRITERS,
                            slice_len,
                        )
                        .await?;
                        with_deleted += sweeper.stop().await;
                        Ok(tally)
                    })
                    .await?;
                with.add(tally);
            } else {
                let tally = meter
                    .metered(
                        pool,
                        slice(
                            ctx,
                            Cell::usual(Path::FirstRequest),
                            SWEEP_WRITERS,
                            slice_len,
                        ),
                    )
                    .await?;
                without.add(tally);
            }
        }
    }
    let backlog_left = pg_idempotency::admin::stats(pool).await?.expired_rows;
    Ok(SweepResult {
        table,
        rows,
        fill_secs,
        alone_deleted,
        alone_secs,
        vacuum_secs,
        without,
        with,
        with_deleted,
        backlog_left,
    })
}
