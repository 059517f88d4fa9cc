//! Through PgBouncer in transaction mode, with fewer server connections than the client's
//! pool: the store, phased requests and the completer, the sweeper, `migrate` and the
//! command-line tool; then the HTTP layer's answers while the pooler is killed and restarted
//! under load, and while it refuses logins.
//!
//! Each test runs once per flavour the machine offers (`support::pooler_flavours`): the
//! machine's `pgbouncer` (Debian's 1.18: no protocol-level prepared statements, so the URL
//! carries `statement-cache-capacity=0`), skipped when it is not installed unless
//! `PG_IDEMPOTENCY_REQUIRE_POOLER` is set (`.ci/run` sets it); then, when
//! `PG_IDEMPOTENCY_PGBOUNCER` names a PgBouncer 1.21 or later (built by
//! `.ci/pgbouncer-from-source.sh`), through it with `max_prepared_statements` set and sqlx's
//! statement cache on. The pooler runs in front of the tests' server
//! (`pg_idempotency::testing`); see `tests/support/pooler.rs`.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::http::{HeaderName, StatusCode, header::RETRY_AFTER};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use pg_idempotency::axum::{IdempotencyLayer, IdempotentTx, scope_from_header};
use pg_idempotency::phased::{Completer, Finished, Operation, Steps};
use pg_idempotency::testing::{TestDatabase, TestServer};
use pg_idempotency::{
    Begin, Config, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Outcome, Scope,
    StoredResponse,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgPool};
use support::{
    Answer, Flavour, Pooler, PoolerConfig, Server, assert_no_idle_transactions,
    check_sweep_contract, pooler_flavours,
};

/// Connections the client's pool may open: more than the pooler's server connections.
const CLIENT_POOL: u32 = 12;

/// A test database, a pooler in front of it, and a pool through the pooler.
struct Through {
    db: TestDatabase,
    pooler: Pooler,
    pool: PgPool,
}

/// A pool through `pooler`, preparing the hot path's statements on each new client
/// connection as the README suggests (through a pooler, that lands on whichever server
/// connection the pooler picks: a claim on another one prepares them itself).
fn pool_through(pooler: &Pooler) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(CLIENT_POOL)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(|conn, _meta| Box::pin(pg_idempotency::prepare_connection(conn)))
        .connect_lazy(&pooler.url())?)
}

/// Runs `body` through each flavour of pooler the machine offers, one after the other
/// (none: the test is skipped, and says why).
async fn for_each_flavour(test: &str, body: impl AsyncFn(&Flavour) -> Result<()>) -> Result<()> {
    for flavour in pooler_flavours(test) {
        eprintln!("{test}: through {flavour}");
        body(&flavour)
            .await
            .with_context(|| format!("{test}, through {flavour}"))?;
    }
    Ok(())
}

/// A fresh migrated database with `schema` applied (directly), and a pooler of `flavour` in
/// front of it.
async fn through_pooler(flavour: &Flavour, config: PoolerConfig, schema: &str) -> Result<Through> {
    let db = TestDatabase::create().await?;
    sqlx::raw_sql(AssertSqlSafe(schema))
        .execute(db.pool())
        .await?;
    let pooler = Pooler::start(flavour, db.url(), config)?;
    let pool = pool_through(&pooler)?;
    Ok(Through { db, pooler, pool })
}

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(uuid::Uuid::new_v4()).expect("v4")
}

fn scope() -> Scope {
    Scope::new("acct_1").expect("valid scope")
}

async fn count(pool: &PgPool, table: &str) -> Result<i64> {
    let sql = format!("SELECT count(*) FROM {table}");
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(pool)
        .await?)
}

/// What the statements of sqlx became on a server connection, seen from a transaction
/// through the pooler: with `max_prepared_statements` set, PgBouncer prepared them under
/// names of its own (`PGBOUNCER_<n>`, this query's too) and sqlx's names (`sqlx_s_<n>`) never
/// reached the server; without it, sqlx's statement cache is off and names nothing.
async fn check_prepared_statements(t: &Through) -> Result<()> {
    let mut tx = t.pool.begin().await?;
    let (pgbouncer, sqlx): (i64, i64) = sqlx::query_as(
        r"SELECT count(*) FILTER (WHERE name LIKE 'PGBOUNCER\_%'),
                 count(*) FILTER (WHERE name LIKE 'sqlx\_s\_%')
          FROM pg_prepared_statements WHERE NOT from_sql",
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    let prepared = t.pooler.flavour().max_prepared_statements.is_some();
    ensure!(
        (pgbouncer > 0) == prepared && sqlx == 0,
        "{pgbouncer} statement(s) prepared by the pooler, {sqlx} named by sqlx"
    );
    Ok(())
}

const PAYMENTS: &str = "CREATE TABLE payments (id bigserial PRIMARY KEY, amount bigint NOT NULL)";

async fn pay(
    store: &IdempotencyStore,
    key: &IdempotencyKey,
    delay: Duration,
) -> Result<Outcome, Error> {
    let request = IdempotentRequest::new("POST", "/v1/payments", br#"{"amount":100}"#);
    store
        .run(&scope(), key, &request, async |claim| {
            sqlx::query("INSERT INTO payments (amount) VALUES (100)")
                .execute(&mut *claim)
                .await?;
            tokio::time::sleep(delay).await;
            Ok::<_, Error>(StoredResponse::new(201, "paid"))
        })
        .await
}

#[tokio::test]
async fn the_store_through_the_pooler() -> Result<()> {
    for_each_flavour("the_store_through_the_pooler", async |flavour| {
        let t = through_pooler(flavour, PoolerConfig::default(), PAYMENTS).await?;
        let store = IdempotencyStore::with_config(
            t.pool.clone(),
            Config::default().with_in_flight_wait(Duration::from_secs(20)),
        );

        // Duplicates racing on one key: one runs, the others replay.
        let key = new_key();
        let racers: Vec<_> = (0..32)
            .map(|_| {
                let (store, key) = (store.clone(), key.clone());
                tokio::spawn(async move { pay(&store, &key, Duration::from_millis(100)).await })
            })
            .collect();
        let (mut executed, mut replayed) = (0, 0);
        for racer in racers {
            match racer.await?? {
                Outcome::Executed { stored: true, .. } => executed += 1,
                Outcome::Replayed(_) => replayed += 1,
                other => bail!("unexpected {other:?}"),
            }
        }
        ensure!(
            executed == 1 && replayed == 31,
            "{executed} executed, {replayed} replayed"
        );

        // Many keys at once, each twice: far more claims than server connections.
        let keys: Vec<_> = (0..64).map(|_| new_key()).collect();
        for round in 0..2 {
            let tasks: Vec<_> = keys
                .iter()
                .map(|key| {
                    let (store, key) = (store.clone(), key.clone());
                    tokio::spawn(async move { pay(&store, &key, Duration::ZERO).await })
                })
                .collect();
            for task in tasks {
                let outcome = task.await??;
                ensure!(
                    outcome.is_replay() == (round == 1),
                    "round {round}: {outcome:?}"
                );
            }
        }
        ensure!(count(t.db.pool(), "payments").await? == 65);
        check_prepared_statements(&t).await?;
        assert_no_idle_transactions(t.db.pool()).await
    })
    .await
}

/// A charge in three steps: a local write, a foreign call (counted), a final write.
#[derive(Default)]
struct Charge {
    calls: AtomicUsize,
    call_delay: Duration,
}

impl Operation for Charge {
    const NAME: &'static str = "charge";
    type Input = i64;
    type Error = Error;

    async fn run(&self, amount: &i64, steps: &mut Steps) -> Result<Finished, Error> {
        let id: i64 = steps
            .local("record", async |tx| {
                Ok::<_, Error>(
                    sqlx::query_scalar("INSERT INTO charges (amount) VALUES ($1) RETURNING id")
                        .bind(amount)
                        .fetch_one(&mut *tx)
                        .await?,
                )
            })
            .await?;
        let call: usize = steps
            .foreign("call", async |_key| {
                tokio::time::sleep(self.call_delay).await;
                Ok::<_, Error>(self.calls.fetch_add(1, Ordering::SeqCst))
            })
            .await?;
        steps
            .finish(async |tx| {
                sqlx::query("UPDATE charges SET call = $1 WHERE id = $2")
                    .bind(i64::try_from(call).unwrap_or(i64::MAX))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                Ok::<_, Error>(StoredResponse::new(201, format!("charge {id}")))
            })
            .await
    }
}

#[tokio::test]
async fn phased_requests_and_the_completer_through_the_pooler() -> Result<()> {
    for_each_flavour("phased_requests_and_the_completer_through_the_pooler", async |flavour| {
    let schema =
        "CREATE TABLE charges (id bigserial PRIMARY KEY, amount bigint NOT NULL, call bigint)";
    let t = through_pooler(flavour, PoolerConfig::default(), schema).await?;
    let config = Config::default()
        .with_in_flight_wait(Duration::from_secs(5))
        .with_lease(Duration::from_millis(200));
    let store = IdempotencyStore::with_config(t.pool.clone(), config);
    let request = IdempotentRequest::new("POST", "/v1/charges", b"{}");

    // Duplicates on one key: one runs, each step once.
    let charge = Arc::new(Charge {
        call_delay: Duration::from_millis(50),
        ..Charge::default()
    });
    let key = new_key();
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let (store, key, charge) = (store.clone(), key.clone(), Arc::clone(&charge));
            tokio::spawn(async move {
                let request = IdempotentRequest::new("POST", "/v1/charges", b"{}");
                store
                    .run_phased(&scope(), &key, &request, &*charge, 1)
                    .await
            })
        })
        .collect();
    let mut outcomes = HashMap::new();
    for task in tasks {
        let outcome = match task.await? {
            Ok(outcome) if outcome.is_replay() => "replayed",
            Ok(_) => "executed",
            Err(Error::InFlight { .. }) => "in flight",
            Err(error) => bail!("{error}"),
        };
        *outcomes.entry(outcome).or_insert(0) += 1;
    }
    ensure!(outcomes.get("executed") == Some(&1), "{outcomes:?}");
    ensure!(charge.calls.load(Ordering::SeqCst) == 1);

    // Abandoned during the foreign call; the completer finishes it.
    let abandoned = new_key();
    let Begin::Claimed(claim) = store.begin_phased(&scope(), &abandoned, &request).await? else {
        bail!("fresh key")
    };
    let slow = Charge {
        call_delay: Duration::from_secs(60),
        ..Charge::default()
    };
    let cut = tokio::time::timeout(Duration::from_millis(300), claim.run(&slow, 1)).await;
    ensure!(cut.is_err(), "the holder should have been cut off");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let completer = Completer::new(store.clone()).register(Arc::clone(&charge));
    let pass = completer.complete_abandoned().await?;
    ensure!(pass.completed == 1 && pass.failed == 0, "{pass:?}");
    let replay = store
        .run_phased(&scope(), &abandoned, &request, &*charge, 1)
        .await?;
    ensure!(replay.is_replay() && replay.response().status == 201);
    ensure!(count(t.db.pool(), "charges").await? == 2);
    assert_no_idle_transactions(t.db.pool()).await
    })
    .await
}

#[tokio::test]
async fn the_sweeper_through_the_pooler() -> Result<()> {
    for_each_flavour("the_sweeper_through_the_pooler", async |flavour| {
        let t = through_pooler(flavour, PoolerConfig::default(), "").await?;
        check_sweep_contract(&t.pool, 1).await?;
        assert_no_idle_transactions(t.db.pool()).await
    })
    .await
}

async fn cli(url: &str, args: &[&str]) -> Result<String> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pg-idempotency"))
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "pg-idempotency {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `migrate` takes its lock for one transaction, so it runs through the pooler too: from
/// several clients at once, from the command-line tool, and again when there is nothing
/// left to do; no advisory lock stays behind on a server connection.
#[tokio::test]
async fn migrate_and_the_command_line_tool_through_the_pooler() -> Result<()> {
    for_each_flavour(
        "migrate_and_the_command_line_tool_through_the_pooler",
        async |flavour| {
            // An empty database: TestDatabase migrates its own.
            let server = TestServer::shared().await?;
            let name = format!("pg_idempotency_pooler_{}", uuid::Uuid::new_v4().simple());
            let direct = PgPool::connect(server.url()).await?;
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&direct)
                .await?;
            let url = server.database_url(&name);
            let config = PoolerConfig {
                pool_size: 2,
                ..PoolerConfig::default()
            };
            let pooler = Pooler::start(flavour, &url, config)?;
            let pool = pool_through(&pooler)?;

            futures_util::future::try_join_all((0..4).map(|_| pg_idempotency::migrate(&pool)))
                .await?;
            for _ in 0..2 {
                ensure!(
                    cli(&pooler.url(), &["migrate"])
                        .await?
                        .contains("migrations applied")
                );
            }
            let target = PgPool::connect(&url).await?;
            let applied = count(&target, "_pg_idempotency_migrations").await?;
            ensure!(usize::try_from(applied)? == pg_idempotency::MIGRATOR.iter().count());
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
         WHERE l.locktype = 'advisory' AND d.datname = current_database()",
            )
            .fetch_one(&target)
            .await?;
            ensure!(held == 0, "{held} advisory lock(s) left behind");

            // The store works on what `migrate` made, and `stats` answers, run after run.
            let store = IdempotencyStore::new(pool.clone());
            let request = IdempotentRequest::new("POST", "/v1/x", b"{}");
            store
                .run(&scope(), &new_key(), &request, async |_claim| {
                    Ok::<_, Error>(StoredResponse::new(201, "ok"))
                })
                .await?;
            for _ in 0..3 {
                let stats = cli(&pooler.url(), &["stats", "--json"]).await?;
                ensure!(stats.contains('{'), "{stats}");
            }
            pool.close().await;
            target.close().await;
            drop(pooler);
            sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
                .execute(&direct)
                .await?;
            Ok(())
        },
    )
    .await
}

const ITEMS: &str = "CREATE TABLE items (id bigserial PRIMARY KEY, key text NOT NULL)";

/// Writes the request's key into `items` in the claim's transaction. A failed write (the
/// pooler went away) is the handler's to answer: 503, which the layer does not store.
async fn item(mut tx: IdempotentTx, headers: axum::http::HeaderMap) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    match sqlx::query("INSERT INTO items (key) VALUES ($1)")
        .bind(key)
        .execute(&mut *tx)
        .await
    {
        Ok(_) => {
            tokio::time::sleep(Duration::from_millis(5)).await;
            (StatusCode::CREATED, "created").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, [(RETRY_AFTER, "1")]).into_response(),
    }
}

fn app(pool: PgPool) -> Router {
    let config = Config::default()
        .with_in_flight_wait(Duration::from_millis(500))
        .with_commit_resolution_wait(Duration::from_millis(500));
    let store = IdempotencyStore::with_config(pool, config);
    let scope = scope_from_header(
        HeaderName::from_static("x-account-id"),
        Some(Scope::new("default").unwrap()),
    );
    Router::new()
        .route("/items", post(item))
        .layer(IdempotencyLayer::new(store, scope))
}

/// The answers a client may get while the pooler is away: its 201 (a first run or a
/// replay), a 503 with Retry-After from the layer or from the handler (its write failed),
/// or the 503 `request_not_committed` that says the connection broke around `COMMIT` and
/// nothing was committed (`Retry-After: 0`: at once).
const ACCEPTED: [&str; 4] = [
    "201",
    "503 with Retry-After",
    "503 with Retry-After, from the handler",
    "503 not committed",
];

/// What one request got: its status, and whether a 503 said when to retry.
fn classify(answer: &Answer) -> &'static str {
    let code = || {
        answer
            .json()
            .ok()
            .and_then(|problem| Some(problem.get("code")?.as_str()?.to_owned()))
    };
    match answer.status {
        201 => "201",
        503 if answer.header("retry-after").is_some() && answer.body.is_empty() => {
            "503 with Retry-After, from the handler"
        }
        503 if code().as_deref() == Some("request_not_committed")
            && answer.header("retry-after") == Some("0") =>
        {
            "503 not committed"
        }
        503 if answer.header("retry-after").is_some() => "503 with Retry-After",
        503 => "503 without Retry-After",
        409 => "409",
        500 => "500",
        _ => "other",
    }
}

/// Sends `key` until it gets a 201 (a first run or a replay), at most until `deadline`;
/// counts every answer by [`classify`], and a request that takes over 10 s as a hang.
async fn until_created(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    deadline: Instant,
    seen: &std::sync::Mutex<HashMap<String, usize>>,
) -> Result<bool> {
    loop {
        let sent = client
            .post(url)
            .header("idempotency-key", key)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let class = match sent {
            Ok(response) => {
                let answer = Answer::of(response).await?;
                let class = classify(&answer);
                if !ACCEPTED.contains(&class) {
                    eprintln!(
                        "{}: {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    );
                }
                class.to_owned()
            }
            Err(error) if error.is_timeout() => "hang (10 s)".to_owned(),
            Err(error) => format!("transport error: {error}"),
        };
        *seen.lock().unwrap().entry(class.clone()).or_insert(0) += 1;
        if class == "201" {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pooler is killed twice while requests run, and comes back each time; then its
/// server connections are dropped under it: every answer is one of [`ACCEPTED`], nothing
/// hangs, no key's write happens twice, and every key gets its 201 once the pooler is back.
#[tokio::test]
async fn a_pooler_restart_under_load_gives_503s_and_no_duplicates() -> Result<()> {
    for_each_flavour(
        "a_pooler_restart_under_load_gives_503s_and_no_duplicates",
        async |flavour| {
            let mut t = through_pooler(flavour, PoolerConfig::default(), ITEMS).await?;
            let server = Server::start(app(t.pool.clone())).await?;
            let url = server.url("/items");
            let seen = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
            let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
            let stop = Instant::now() + Duration::from_secs(5);
            let deadline = stop + Duration::from_secs(20);
            let client = support::client();
            let workers: Vec<_> = (0..24)
                .map(|_| {
                    let (client, url, seen, keys) = (
                        client.clone(),
                        url.clone(),
                        Arc::clone(&seen),
                        Arc::clone(&keys),
                    );
                    tokio::spawn(async move {
                        let mut created = true;
                        while Instant::now() < stop {
                            let key = uuid::Uuid::new_v4().to_string();
                            keys.lock().unwrap().push(key.clone());
                            created &= until_created(&client, &url, &key, deadline, &seen).await?;
                        }
                        anyhow::Ok(created)
                    })
                })
                .collect();
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                t.pooler.kill();
                tokio::time::sleep(Duration::from_millis(700)).await;
                t.pooler.resume()?;
            }
            // Then the pooler stays up and its server connections are dropped under it (the
            // server ends their sessions: SQLSTATE 57P01, which the pooler passes on).
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut direct = sqlx::PgConnection::connect(t.db.url()).await?;
            let dropped: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()) t",
            )
            .fetch_one(&mut direct)
            .await?;
            ensure!(dropped > 0, "no server connection to drop");
            direct.close().await?;
            let mut all_created = true;
            for worker in workers {
                all_created &= worker.await??;
            }
            let seen = seen.lock().unwrap().clone();
            eprintln!("answers while the pooler restarted: {seen:?}");
            ensure!(all_created, "some keys never got a 201: {seen:?}");
            ensure!(
                seen.keys().all(|class| ACCEPTED.contains(&class.as_str())),
                "{seen:?}"
            );
            ensure!(seen.len() > 1, "no request met the restarts: {seen:?}");
            let keys = keys.lock().unwrap().len();
            let (rows, distinct): (i64, i64) =
                sqlx::query_as("SELECT count(*), count(DISTINCT key) FROM items")
                    .fetch_one(t.db.pool())
                    .await?;
            ensure!(
                rows == distinct && usize::try_from(rows)? == keys,
                "{rows} rows for {distinct} keys of {keys} sent"
            );
            server.stop().await?;
            assert_no_idle_transactions(t.db.pool()).await
        },
    )
    .await
}

/// A pooler that refuses the pool's new connections (`max_client_conn`) gives 503 with
/// Retry-After, quickly; once it has room again, requests succeed (within 5 s).
#[tokio::test]
async fn a_refused_login_gives_503() -> Result<()> {
    for_each_flavour("a_refused_login_gives_503", async |flavour| {
        let config = PoolerConfig {
            max_client_conn: 2,
            ..PoolerConfig::default()
        };
        let t = through_pooler(flavour, config, ITEMS).await?;
        // Two other clients take every client slot.
        let mut others = Vec::new();
        for _ in 0..2 {
            others.push(sqlx::PgConnection::connect(&t.pooler.url()).await?);
        }
        let server = Server::start(app(t.pool.clone())).await?;
        let client = support::client();
        let send = || {
            client
                .post(server.url("/items"))
                .header("idempotency-key", uuid::Uuid::new_v4().to_string())
                .timeout(Duration::from_secs(10))
                .send()
        };
        let started = Instant::now();
        let refused = Answer::of(send().await?).await?;
        ensure!(
            classify(&refused) == "503 with Retry-After",
            "{}: {}",
            refused.status,
            String::from_utf8_lossy(&refused.body)
        );
        ensure!(
            started.elapsed() < Duration::from_secs(6),
            "{:?}",
            started.elapsed()
        );
        for other in others {
            other.close().await?;
        }
        // On a busy machine the request right after may still get the same 503 (seen in
        // one full run of ten): the pool's next login can reach the pooler before it has
        // handled the others' goodbyes and freed their slots.
        let freed = Instant::now();
        loop {
            let served = Answer::of(send().await?).await?;
            if served.status == 201 {
                break;
            }
            ensure!(
                classify(&served) == "503 with Retry-After"
                    && freed.elapsed() < Duration::from_secs(5),
                "{} after {:?}",
                served.status,
                freed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server.stop().await?;
        Ok(())
    })
    .await
}
