//! Exactly-once under faults: killed connections, a server crash and restart, replies to
//! COMMIT lost on the wire (and, through the HTTP layer, COMMITs lost and a silent
//! partition, resolved before answering), futures cancelled at random await points, and
//! concurrent requests in two scopes. Every check counts rows.
//!
//! Bounded for CI by default; `FAULT_REQUESTS` (per phase, default 2000) and
//! `CANCELLATIONS` (default 10000) make it a soak, `TEST_SEED` repeats a run:
//!
//! ```text
//! FAULT_REQUESTS=50000 CANCELLATIONS=200000 cargo test --release --test faults -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pg_idempotency::testing::{LocalCluster, LocalClusterOptions, TestDatabase};
use pg_idempotency::{
    Begin, Config, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Outcome, Scope,
    StoredResponse, SweepOptions,
};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod support;
use support::{Rng, assert_no_idle_transactions, cancel_after, expire};

const CONCURRENCY: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(uuid::Uuid::new_v4()).expect("v4")
}

/// A database on a cluster this test owns, so it may crash and restart it.
async fn own_cluster() -> Result<(Arc<LocalCluster>, TestDatabase)> {
    let cluster =
        tokio::task::spawn_blocking(|| LocalCluster::start(LocalClusterOptions::default()))
            .await??;
    let database = TestDatabase::create_on(&cluster.url()).await?;
    sqlx::raw_sql("CREATE TABLE payments (id bigserial PRIMARY KEY, request_no bigint NOT NULL)")
        .execute(database.pool())
        .await?;
    Ok((Arc::new(cluster), database))
}

async fn pool_to(url: &str, port: Option<u16>) -> Result<PgPool> {
    let mut options = PgConnectOptions::from_str(url)?;
    if let Some(port) = port {
        options = options.port(port);
    }
    Ok(PgPoolOptions::new()
        .max_connections(CONCURRENCY as u32 + 4)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options))
}

/// One logical request, retried with its key until it gets a definitive answer.
async fn request_until_answered(
    store: &IdempotencyStore,
    key: &IdempotencyKey,
    n: i64,
) -> Result<StoredResponse> {
    let scope = Scope::new("load")?;
    let body = format!(r#"{{"request":{n}}}"#);
    let request = IdempotentRequest::new("POST", "/v1/payments", body.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = store
            .run(&scope, key, &request, async |claim| {
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO payments (request_no) VALUES ($1) RETURNING id",
                )
                .bind(n)
                .fetch_one(&mut *claim)
                .await?;
                Ok::<_, Error>(StoredResponse::new(
                    201,
                    format!("payment {id} for request {n}"),
                ))
            })
            .await;
        match attempt {
            Ok(outcome) => return Ok(outcome.into_response()),
            Err(error @ Error::Conflict { .. }) => {
                bail!("request {n} conflicted with itself: {error}")
            }
            // Connection killed, server down, reply lost, key still held: retry, as a client would.
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(error) => return Err(error).context(format!("request {n} never got an answer")),
        }
    }
}

/// Runs `count` logical requests at `CONCURRENCY`, calling `progress` with the number
/// finished so far; returns each request's number, key and acknowledged response.
async fn load(
    store: &IdempotencyStore,
    first: i64,
    count: usize,
    progress: Arc<AtomicUsize>,
) -> Result<Vec<(i64, IdempotencyKey, StoredResponse)>> {
    let keys: Arc<Vec<IdempotencyKey>> = Arc::new((0..count).map(|_| new_key()).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (store, keys, next, progress) = (
            store.clone(),
            Arc::clone(&keys),
            Arc::clone(&next),
            Arc::clone(&progress),
        );
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys.len() {
                    return Ok::<_, anyhow::Error>(acked);
                }
                let n = first + i as i64;
                let response = request_until_answered(&store, &keys[i], n).await?;
                acked.push((n, keys[i].clone(), response));
                progress.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut acked = Vec::new();
    for worker in workers {
        acked.extend(worker.await??);
    }
    Ok(acked)
}

/// After a phase: one business row per logical request, every acknowledged response is
/// the stored one and replays, nothing is stuck, and the pool serves new requests.
async fn verify(
    direct: &PgPool,
    store: &IdempotencyStore,
    acked: &[(i64, IdempotencyKey, StoredResponse)],
) -> Result<()> {
    let (first, last) = (
        acked.iter().map(|a| a.0).min().unwrap_or(0),
        acked.iter().map(|a| a.0).max().unwrap_or(0),
    );
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT request_no, count(*) FROM payments WHERE request_no BETWEEN $1 AND $2 GROUP BY request_no",
    )
    .bind(first)
    .bind(last)
    .fetch_all(direct)
    .await?;
    let per_request: BTreeMap<i64, i64> = rows.into_iter().collect();
    ensure!(
        per_request.len() == acked.len(),
        "{} requests have rows, {} were acknowledged",
        per_request.len(),
        acked.len()
    );
    let duplicated: Vec<_> = per_request.iter().filter(|(_, c)| **c != 1).collect();
    ensure!(
        duplicated.is_empty(),
        "requests with other than one business row: {duplicated:?}"
    );

    let scope = Scope::new("load")?;
    for (n, key, response) in acked {
        let (stored,): (Vec<u8>,) =
            sqlx::query_as("SELECT body FROM idempotency_keys WHERE scope = 'load' AND key = $1")
                .bind(key.as_str())
                .fetch_one(direct)
                .await
                .with_context(|| {
                    format!("request {n} was acknowledged but its key is not stored")
                })?;
        ensure!(
            stored == response.body,
            "request {n}: acknowledged {:?}, stored {:?}",
            response.body,
            stored
        );
        let body = format!(r#"{{"request":{n}}}"#);
        match store
            .begin(
                &scope,
                key,
                &IdempotentRequest::new("POST", "/v1/payments", body.as_bytes()),
            )
            .await?
        {
            Begin::Replay(replay) => ensure!(
                &replay.response == response,
                "request {n} replays another response"
            ),
            Begin::Claimed(_) => bail!("request {n}: acknowledged, but its key is free again"),
        }
    }
    let fresh = request_until_answered(store, &new_key(), last + 1_000_000).await?;
    ensure!(fresh.status == 201);
    sqlx::query("DELETE FROM payments WHERE request_no = $1")
        .bind(last + 1_000_000)
        .execute(direct)
        .await?;
    assert_no_idle_transactions(direct).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_while_connections_are_killed() -> Result<()> {
    let (_cluster, database) = own_cluster().await?;
    let direct = database.pool().clone();
    let store = IdempotencyStore::new(pool_to(database.url(), None).await?);
    let requests = env_usize("FAULT_REQUESTS", 2000);
    let done = Arc::new(AtomicBool::new(false));
    let killer = {
        let (direct, done) = (direct.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut killed = 0_i64;
            while !done.load(Ordering::Relaxed) {
                // Any of the store's connections, in any state: idle, mid-claim, mid-commit.
                killed += sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND backend_type = 'client backend' AND random() < 0.2",
                )
                .fetch_one(&direct)
                .await
                .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            killed
        })
    };
    let acked = load(&store, 0, requests, Arc::new(AtomicUsize::new(0))).await;
    done.store(true, Ordering::Relaxed);
    let killed = killer.await?;
    let acked = acked?;
    eprintln!("killed {killed} connections during {requests} requests");
    ensure!(killed > 0, "the fault never fired");
    verify(&direct, &store, &acked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_a_server_crash_and_restart() -> Result<()> {
    let (cluster, database) = own_cluster().await?;
    let store = IdempotencyStore::new(pool_to(database.url(), None).await?);
    let requests = env_usize("FAULT_REQUESTS", 2000);
    let progress = Arc::new(AtomicUsize::new(0));
    let crasher = {
        let (cluster, progress) = (Arc::clone(&cluster), Arc::clone(&progress));
        tokio::spawn(async move {
            while progress.load(Ordering::Relaxed) < requests / 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Immediate mode: no checkpoint, in-flight transactions lost, like a crash.
            tokio::task::spawn_blocking(move || {
                cluster.stop_immediate()?;
                std::thread::sleep(Duration::from_millis(300));
                cluster.restart()
            })
            .await?
            .map_err(anyhow::Error::from)
        })
    };
    let acked = load(&store, 0, requests, Arc::clone(&progress)).await?;
    crasher.await??;
    // The crash-time pool of the test database is dead; verify through a new one.
    let direct = pool_to(database.url(), None).await?;
    verify(&direct, &store, &acked).await
}

/// What [`lossy_proxy`] does to a client message containing `COMMIT`, when it strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Forward it, then drop the server's reply and close both connections: the commit
    /// happened, the client cannot know.
    LoseReply,
    /// Drop it and close both connections: the server never sees the COMMIT, and rolls
    /// back when it sees the connection close.
    LoseCommit,
    /// Drop it, close the client's side, and keep the server's side open and silent
    /// (until [`Proxy::heal`]): the old backend stays idle in its transaction, holding the
    /// key, and cannot be reached.
    Partition,
}

/// A TCP proxy in front of PostgreSQL that strikes messages containing `COMMIT`.
struct Proxy {
    port: u16,
    /// How often each fault struck, in the order of `faults`.
    struck: Arc<Vec<AtomicU64>>,
    /// The server sides of partitioned connections, held open.
    held: Arc<std::sync::Mutex<Vec<tokio::net::tcp::OwnedWriteHalf>>>,
}

impl Proxy {
    fn struck(&self, fault: usize) -> u64 {
        self.struck[fault].load(Ordering::Relaxed)
    }

    /// Closes the partitioned server connections: their backends roll back.
    fn heal(&self) {
        self.held.lock().expect("not poisoned").clear();
    }
}

/// A [`Proxy`] that strikes each message containing `COMMIT` with probability
/// `chance`, with one of `faults` picked at random.
async fn lossy_proxy(upstream: SocketAddr, chance: f64, faults: &'static [Fault]) -> Result<Proxy> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let struck: Arc<Vec<AtomicU64>> = Arc::new(faults.iter().map(|_| AtomicU64::new(0)).collect());
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut rng = Rng::from_env("lossy_proxy");
    let seeds: Vec<u64> = (0..100_000).map(|_| rng.next()).collect();
    let (counters, holder) = (Arc::clone(&struck), Arc::clone(&held));
    tokio::spawn(async move {
        for seed in seeds {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let strike = Strike {
                rng: Rng::seeded(seed),
                chance,
                faults,
                struck: Arc::clone(&counters),
                held: Arc::clone(&holder),
            };
            tokio::spawn(relay(client, server, strike));
        }
    });
    Ok(Proxy { port, struck, held })
}

/// How one relayed connection strikes.
struct Strike {
    rng: Rng,
    chance: f64,
    faults: &'static [Fault],
    struck: Arc<Vec<AtomicU64>>,
    held: Arc<std::sync::Mutex<Vec<tokio::net::tcp::OwnedWriteHalf>>>,
}

async fn relay(client: TcpStream, server: TcpStream, mut strike: Strike) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let armed = Arc::new(AtomicBool::new(false));
    let arm = Arc::clone(&armed);
    let upstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if buf[..n].windows(6).any(|w| w == b"COMMIT") && strike.rng.chance(strike.chance) {
                let pick = strike.rng.below(strike.faults.len() as u64) as usize;
                strike.struck[pick].fetch_add(1, Ordering::Relaxed);
                match strike.faults[pick] {
                    Fault::LoseReply => arm.store(true, Ordering::SeqCst),
                    Fault::LoseCommit => return,
                    Fault::Partition => {
                        strike.held.lock().expect("not poisoned").push(server_write);
                        return;
                    }
                }
            }
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if armed.load(Ordering::SeqCst) {
                return; // the reply to COMMIT is lost; both connections close
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = upstream => {}
        () = downstream => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_when_replies_to_commit_are_lost() -> Result<()> {
    let (cluster, database) = own_cluster().await?;
    let upstream: SocketAddr = format!("127.0.0.1:{}", cluster.port()).parse()?;
    let proxy = lossy_proxy(upstream, 0.1, &[Fault::LoseReply]).await?;
    let store = IdempotencyStore::new(pool_to(database.url(), Some(proxy.port)).await?);
    let requests = env_usize("FAULT_REQUESTS", 2000);
    let acked = load(&store, 0, requests, Arc::new(AtomicUsize::new(0))).await?;
    let dropped = proxy.struck(0);
    eprintln!("dropped {dropped} replies to COMMIT during {requests} requests");
    ensure!(dropped > 0, "the fault never fired");
    verify(database.pool(), &store, &acked).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_begin_complete_and_sweep_at_random_points_leaves_nothing_stuck() -> Result<()> {
    let database = TestDatabase::create().await?;
    let pool = database.pool().clone();
    let max = 8;
    let store = IdempotencyStore::with_config(
        PgPoolOptions::new()
            .max_connections(max)
            .connect_lazy_with((*pool.connect_options()).clone()),
        Config::default().with_in_flight_wait(Duration::from_secs(10)),
    );
    let scope = Scope::new("cancel")?;
    let request = IdempotentRequest::new("POST", "/x", b"{}");
    let mut rng = Rng::from_env("cancellation");
    let mut keys: Vec<IdempotencyKey> = Vec::new();
    let total = env_usize("CANCELLATIONS", 10_000);
    let (mut cancelled, mut sweeps) = (0, 0);

    for round in 0..total {
        let polls = 1 + rng.below(4) as usize;
        match rng.below(3) {
            0 => {
                // begin on a new or an old key
                let key = if keys.is_empty() || rng.chance(0.5) {
                    new_key()
                } else {
                    keys[rng.below(keys.len() as u64) as usize].clone()
                };
                match cancel_after(store.begin(&scope, &key, &request), polls).await {
                    None => cancelled += 1,
                    Some(Ok(Begin::Claimed(claim))) => match rng.below(3) {
                        0 => drop(claim),
                        1 => claim.abort().await?,
                        _ => drop(claim.complete(&StoredResponse::new(201, "ok")).await?),
                    },
                    Some(Ok(Begin::Replay(_))) => {}
                    Some(Err(error)) => bail!("round {round}: begin failed: {error}"),
                }
                keys.push(key);
            }
            1 => {
                let key = new_key();
                let Begin::Claimed(claim) = store.begin(&scope, &key, &request).await? else {
                    bail!("fresh key")
                };
                if cancel_after(claim.complete(&StoredResponse::new(201, "ok")), polls)
                    .await
                    .is_none()
                {
                    cancelled += 1;
                }
                keys.push(key);
            }
            _ => {
                if rng.chance(0.1) {
                    expire(&pool, 20).await?;
                }
                let options = SweepOptions::default()
                    .with_batch_size(5)
                    .with_pause(Duration::ZERO);
                if cancel_after(pg_idempotency::sweep(store.pool(), &options), polls)
                    .await
                    .is_none()
                {
                    cancelled += 1;
                }
                sweeps += 1;
            }
        }
        if round % 1000 == 999 {
            assert_no_idle_transactions(&pool).await?;
        }
    }
    assert_no_idle_transactions(&pool).await?;
    eprintln!("{total} rounds, {cancelled} cancelled futures, {sweeps} sweeps");
    ensure!(
        cancelled > total / 4,
        "too few cancellations landed: {cancelled}"
    );

    // No key is left unusable: each either replays or can be claimed.
    for key in keys.iter().step_by((keys.len() / 500).max(1)) {
        match store.begin(&scope, key, &request).await? {
            Begin::Claimed(claim) => claim.abort().await?,
            Begin::Replay(_) => {}
        }
    }
    // The pool does not shrink for good: all its connections can be had at once.
    let mut held = Vec::new();
    for _ in 0..max {
        held.push(tokio::time::timeout(Duration::from_secs(10), store.pool().acquire()).await??);
    }
    ensure!(held.len() == max as usize);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_key_in_two_scopes_under_concurrency_never_crosses() -> Result<()> {
    let pool = pg_idempotency::testing::fresh_pool().await?;
    let store = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_in_flight_wait(Duration::from_secs(20)),
    );
    let key = new_key();
    let start = Arc::new(tokio::sync::Barrier::new(32));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let (store, key, start) = (store.clone(), key.clone(), Arc::clone(&start));
        let tenant = if i % 2 == 0 { "tenant_a" } else { "tenant_b" };
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let scope = Scope::new(tenant)?;
            let body = format!(r#"{{"tenant":"{tenant}"}}"#);
            let outcome = store
                .run(
                    &scope,
                    &key,
                    &IdempotentRequest::new("POST", "/x", body.as_bytes()),
                    async |_claim| {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok::<_, Error>(StoredResponse::new(201, format!("for {tenant}")))
                    },
                )
                .await?;
            Ok::<_, anyhow::Error>((tenant, outcome))
        }));
    }
    let mut executed: BTreeMap<&str, usize> = BTreeMap::new();
    for task in tasks {
        let (tenant, outcome) = task.await??;
        ensure!(
            outcome.response().body == format!("for {tenant}").into_bytes(),
            "{tenant} got {:?}",
            outcome.response()
        );
        if let Outcome::Executed { .. } = outcome {
            *executed.entry(tenant).or_default() += 1;
        }
    }
    ensure!(
        executed == BTreeMap::from([("tenant_a", 1), ("tenant_b", 1)]),
        "{executed:?}"
    );
    Ok(())
}

/// The database server behind a test database, for a proxy in front of it.
fn server_of(database: &TestDatabase) -> Result<SocketAddr> {
    let options = PgConnectOptions::from_str(database.url())?;
    let host = if options.get_host() == "localhost" {
        "127.0.0.1"
    } else {
        options.get_host()
    };
    Ok(format!("{host}:{}", options.get_port()).parse()?)
}

/// A payments service behind the idempotency layer: one business row per request,
/// answered 201 with the row's id.
fn payments_app(store: IdempotencyStore) -> axum::Router {
    use axum::response::IntoResponse;
    use pg_idempotency::axum::{IdempotencyLayer, IdempotentTx};

    async fn pay(mut tx: IdempotentTx, body: axum::body::Bytes) -> axum::response::Response {
        let n: i64 = std::str::from_utf8(&body)
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("the body is a request number");
        let id: i64 =
            sqlx::query_scalar("INSERT INTO payments (request_no) VALUES ($1) RETURNING id")
                .bind(n)
                .fetch_one(&mut *tx)
                .await
                .expect("insert");
        (axum::http::StatusCode::CREATED, format!("payment {id}")).into_response()
    }
    let layer = IdempotencyLayer::new(store, |_: &http::request::Parts| Scope::new("http"));
    axum::Router::new().route("/pay", axum::routing::post(pay).route_layer(layer))
}

/// Sends one request with its key, once.
async fn pay_once(server: &support::Server, key: &str, n: i64) -> Result<support::Answer> {
    let response = support::client()
        .post(server.url("/pay"))
        .header("idempotency-key", key)
        .body(n.to_string())
        .send()
        .await?;
    support::Answer::of(response).await
}

/// Issue 11: with COMMITs struck on the wire (the reply lost after the commit, or the
/// COMMIT itself lost), each request sent once: every committed write is answered with
/// its stored 2xx, every 2xx is committed and stored, nothing is duplicated, and a lost
/// COMMIT is answered 503 `request_not_committed`, never with an unknown outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_commits_are_resolved_before_the_http_answer() -> Result<()> {
    let database = TestDatabase::create().await?;
    sqlx::raw_sql("CREATE TABLE payments (id bigserial PRIMARY KEY, request_no bigint NOT NULL)")
        .execute(database.pool())
        .await?;
    let proxy = lossy_proxy(
        server_of(&database)?,
        0.2,
        &[Fault::LoseReply, Fault::LoseCommit],
    )
    .await?;
    let store = IdempotencyStore::new(pool_to(database.url(), Some(proxy.port)).await?);
    let server = Arc::new(support::Server::start(payments_app(store)).await?);
    // Each request is answered once and checked one by one: a fifth of a phase.
    let requests = (env_usize("FAULT_REQUESTS", 2000) / 5).max(100) as i64;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (server, next) = (Arc::clone(&server), Arc::clone(&next));
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed) as i64;
                if n >= requests {
                    return Ok::<_, anyhow::Error>(answers);
                }
                let key = new_key().into_string();
                answers.push((n, key.clone(), pay_once(&server, &key, n).await?));
            }
        }));
    }
    let mut answers = Vec::new();
    for worker in workers {
        answers.extend(worker.await??);
    }
    let (lost_replies, lost_commits) = (proxy.struck(0), proxy.struck(1));
    eprintln!(
        "{requests} requests: {lost_replies} replies to COMMIT lost, {lost_commits} COMMITs lost"
    );
    ensure!(lost_replies > 0 && lost_commits > 0, "a fault never struck");

    let direct = database.pool();
    let (mut created, mut not_committed) = (0, 0);
    for (n, key, answer) in &answers {
        let payments: i64 =
            sqlx::query_scalar("SELECT count(*) FROM payments WHERE request_no = $1")
                .bind(n)
                .fetch_one(direct)
                .await?;
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM idempotency_keys WHERE scope = 'http' AND key = $1",
        )
        .bind(key)
        .fetch_optional(direct)
        .await?;
        ensure!(payments <= 1, "request {n} paid {payments} times");
        match answer.status {
            201 => {
                created += 1;
                ensure!(payments == 1, "request {n} answered 201 but not committed");
                ensure!(
                    stored.as_deref() == Some(&answer.body[..]),
                    "request {n} answered {:?}, stored {stored:?}",
                    String::from_utf8_lossy(&answer.body)
                );
            }
            _ => {
                not_committed += 1;
                ensure!(
                    payments == 0 && stored.is_none(),
                    "request {n} committed but answered {}",
                    answer.status
                );
                let problem = answer.problem(503, "request_not_committed")?;
                ensure!(answer.header("retry-after") == Some("0"), "retry at once");
                ensure!(
                    problem["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("nothing was done"))
                );
            }
        }
    }
    ensure!(
        not_committed == lost_commits && created == requests as u64 - lost_commits,
        "{created} created, {not_committed} not committed, {lost_commits} COMMITs lost"
    );
    assert_no_idle_transactions(direct).await
}

/// Issue 11: when the old backend cannot be reached (the client's side of the connection
/// closes, the server's stays open and silent, the COMMIT never arrives), the resolution
/// gives up after its bound: `CommitOutcome::Unknown` from the store, the 503 with
/// `Retry-After` from the HTTP layer. Once the partition heals, the key is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_old_backend_leaves_the_outcome_unknown_within_the_bound() -> Result<()> {
    let database = TestDatabase::create().await?;
    sqlx::raw_sql("CREATE TABLE payments (id bigserial PRIMARY KEY, request_no bigint NOT NULL)")
        .execute(database.pool())
        .await?;
    let proxy = lossy_proxy(server_of(&database)?, 1.0, &[Fault::Partition]).await?;
    let bound = Duration::from_millis(1500);
    let store = IdempotencyStore::with_config(
        pool_to(database.url(), Some(proxy.port)).await?,
        Config::default().with_commit_resolution_wait(bound),
    );
    let held_in_transaction = async || -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state = 'idle in transaction'",
        )
        .fetch_one(database.pool())
        .await?)
    };

    // The store.
    let (scope, key) = (Scope::new("http")?, new_key());
    let Begin::Claimed(mut claim) = store
        .begin(&scope, &key, &IdempotentRequest::new("POST", "/pay", b"1"))
        .await?
    else {
        bail!("a new key replayed");
    };
    sqlx::query("INSERT INTO payments (request_no) VALUES (1)")
        .execute(&mut claim)
        .await?;
    let started = Instant::now();
    let completed = claim.complete(&StoredResponse::new(201, "paid")).await;
    let took = started.elapsed();
    match completed {
        Err(Error::CommitInterrupted {
            outcome: pg_idempotency::CommitOutcome::Unknown,
            ..
        }) => {}
        other => bail!("expected an unknown outcome, got {other:?}"),
    }
    eprintln!("store: unknown after {took:?} (bound {bound:?})");
    // The wait, plus at most a second for the resolving round trip itself.
    let limit = bound + Duration::from_millis(1500);
    ensure!(took >= bound && took < limit, "resolution took {took:?}");
    ensure!(
        held_in_transaction().await? == 1,
        "the old backend is not holding the key"
    );

    // The HTTP layer.
    let server = support::Server::start(payments_app(store.clone())).await?;
    let http_key = new_key().into_string();
    let started = Instant::now();
    let answer = pay_once(&server, &http_key, 2).await?;
    let took = started.elapsed();
    eprintln!("http: {} after {took:?}", answer.status);
    answer.problem(503, "service_unavailable")?;
    ensure!(answer.header("retry-after") == Some("1"));
    ensure!(took >= bound && took < limit, "took {took:?}");
    ensure!(held_in_transaction().await? == 2);

    // The partition heals: the old backends roll back, and the keys are free.
    proxy.heal();
    assert_no_idle_transactions(database.pool()).await?;
    let direct = IdempotencyStore::new(database.pool().clone());
    let outcome = direct
        .run(
            &scope,
            &key,
            &IdempotentRequest::new("POST", "/pay", b"1"),
            async |claim| {
                sqlx::query("INSERT INTO payments (request_no) VALUES (1)")
                    .execute(&mut *claim)
                    .await?;
                Ok::<_, Error>(StoredResponse::new(201, "paid"))
            },
        )
        .await?;
    ensure!(!outcome.is_replay());
    let payments: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(database.pool())
        .await?;
    ensure!(payments == 1, "{payments} payments");
    server.stop().await
}

/// A phased request for the fault suite: a local step (one business row) and the final
/// step (stores the row's id).
struct Recorded;

impl pg_idempotency::phased::Operation for Recorded {
    const NAME: &'static str = "faults.recorded";
    type Input = i64;
    type Error = Error;

    async fn run(
        &self,
        n: &i64,
        steps: &mut pg_idempotency::phased::Steps,
    ) -> Result<pg_idempotency::phased::Finished, Error> {
        let id: i64 = steps
            .local("insert", async |tx| {
                Ok::<_, Error>(
                    sqlx::query_scalar(
                        "INSERT INTO payments (request_no) VALUES ($1) RETURNING id",
                    )
                    .bind(n)
                    .fetch_one(&mut *tx)
                    .await?,
                )
            })
            .await?;
        steps
            .finish(async |_tx| Ok::<_, Error>(StoredResponse::new(201, format!("payment {id}"))))
            .await
    }
}

/// Phased requests with COMMITs struck on the wire (local steps' and final steps'): every
/// request answered as stored has its response stored; one that is not answered so has no
/// stored response (it is still in progress) and its retry finishes it; no request writes
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn phased_requests_answer_lost_commits_truthfully() -> Result<()> {
    let database = TestDatabase::create().await?;
    sqlx::raw_sql("CREATE TABLE payments (id bigserial PRIMARY KEY, request_no bigint NOT NULL)")
        .execute(database.pool())
        .await?;
    let proxy = lossy_proxy(
        server_of(&database)?,
        0.2,
        &[Fault::LoseReply, Fault::LoseCommit],
    )
    .await?;
    let config = Config::default().with_lease(Duration::from_millis(200));
    let lossy = IdempotencyStore::with_config(
        pool_to(database.url(), Some(proxy.port)).await?,
        config.clone(),
    );
    let scope = Scope::new("phased")?;
    let requests = (env_usize("FAULT_REQUESTS", 2000) / 5).max(100) as i64;
    let mut answers = Vec::new();
    for n in 0..requests {
        let key = new_key();
        let request = IdempotentRequest::new("POST", "/charge", b"");
        let answer = lossy.run_phased(&scope, &key, &request, &Recorded, n).await;
        answers.push((n, key, answer));
    }
    let (lost_replies, lost_commits) = (proxy.struck(0), proxy.struck(1));
    eprintln!(
        "{requests} phased requests: {lost_replies} replies to COMMIT lost, {lost_commits} COMMITs lost"
    );
    ensure!(lost_replies > 0 && lost_commits > 0, "a fault never struck");

    let direct = IdempotencyStore::with_config(database.pool().clone(), config);
    let (mut stored_answers, mut unfinished) = (0, 0);
    for (n, key, answer) in answers {
        let stored: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT body FROM idempotency_keys WHERE scope = 'phased' AND key = $1",
        )
        .bind(key.as_str())
        .fetch_optional(database.pool())
        .await?;
        match answer {
            Ok(Outcome::Executed {
                response,
                stored: true,
            }) => {
                stored_answers += 1;
                ensure!(
                    stored.as_deref() == Some(&response.body[..]),
                    "request {n} answered as stored, stored {stored:?}"
                );
            }
            other => {
                unfinished += 1;
                ensure!(
                    stored.is_none(),
                    "request {n} is stored but answered {other:?}"
                );
                // The retry, after the lease, finishes it.
                tokio::time::sleep(Duration::from_millis(210)).await;
                let request = IdempotentRequest::new("POST", "/charge", b"");
                let retried = direct
                    .run_phased(&scope, &key, &request, &Recorded, n)
                    .await?;
                ensure!(retried.response().status == 201, "{retried:?}");
            }
        }
        let payments: i64 =
            sqlx::query_scalar("SELECT count(*) FROM payments WHERE request_no = $1")
                .bind(n)
                .fetch_one(database.pool())
                .await?;
        ensure!(payments == 1, "request {n} paid {payments} times");
    }
    eprintln!("{stored_answers} answered as stored, {unfinished} finished by their retry");
    ensure!(stored_answers > 0 && unfinished > 0);
    assert_no_idle_transactions(database.pool()).await
}

/// Issue 12: when storing a response fails, the server's log (at its default settings)
/// names the statement but holds neither the stored body nor its headers.
#[tokio::test]
async fn a_failed_completion_keeps_the_response_out_of_the_server_log() -> Result<()> {
    let (cluster, database) = own_cluster().await?;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_299() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.status = 299 THEN RAISE EXCEPTION 'refused by the test'; END IF; \
         RETURN NEW; END $$; \
         CREATE TRIGGER refuse_299 BEFORE INSERT ON idempotency_keys \
         FOR EACH ROW EXECUTE FUNCTION refuse_299()",
    )
    .execute(database.pool())
    .await?;
    let store = IdempotencyStore::new(database.pool().clone());
    let (body, cookie) = ("SECRET-BODY-4711", "session=SECRET-COOKIE-4711");
    let key = new_key();
    let Begin::Claimed(claim) = store
        .begin(
            &Scope::new("acct")?,
            &key,
            &IdempotentRequest::new("POST", "/x", b"{}"),
        )
        .await?
    else {
        bail!("expected a claim")
    };
    let response = StoredResponse::new(299, body).with_header("Set-Cookie", cookie);
    let refused = claim.complete(&response).await;
    ensure!(matches!(refused, Err(Error::Database(_))), "{refused:?}");

    let log = std::fs::read_to_string(cluster.log_path())?;
    ensure!(
        log.contains("refused by the test"),
        "the error was not logged:\n{log}"
    );
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for secret in [body, cookie, "SECRET"] {
        ensure!(!log.contains(secret), "the log holds {secret:?}:\n{log}");
        ensure!(
            !log.contains(&hex(secret)),
            "the log holds {secret:?} in hex:\n{log}"
        );
    }
    database.close().await?;
    Ok(())
}
