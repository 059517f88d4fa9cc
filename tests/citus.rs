//! The crate on a Citus cluster, with `idempotency_keys` distributed by scope: the
//! store's flow, the sweeper, and the command-line tool. Runs when
//! `PG_IDEMPOTENCY_CITUS_URL` names a coordinator database (docs/OPERATIONS.md,
//! "Citus"); prints why and passes otherwise. The payments demo on distributed tables
//! is in `tests/http_demo.rs`.

use std::process::Output;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use pg_idempotency::{
    Begin, Completion, Config, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Scope,
    StoredResponse,
};

mod support;
use support::{CitusSchema, check_sweep_contract, expire_all};

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(uuid::Uuid::new_v4()).expect("v4")
}

async fn cli(url: &str, args: &[&str]) -> Result<Output> {
    Ok(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pg-idempotency"))
            .args(args)
            .env("DATABASE_URL", url)
            .output()
            .await?,
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_store_claims_replays_and_serialises_duplicates_on_distributed_keys() -> Result<()> {
    let Some(citus) = CitusSchema::create("citus store").await? else {
        return Ok(());
    };
    let pool = citus.pool();
    let store = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_in_flight_wait(Duration::from_secs(20)),
    );
    sqlx::query("CREATE TABLE ledger (scope text NOT NULL, note text NOT NULL)")
        .execute(pool)
        .await?;
    pg_idempotency::admin::colocate(pool, "ledger", "scope").await?;

    // Keys in many scopes, so on many shards: each claim, business write and key row
    // commit together on the scope's worker.
    for n in 0..40 {
        let scope = Scope::new(format!("tenant-{n}"))?;
        let key = new_key();
        let body = format!("{{\"n\":{n}}}");
        let request = IdempotentRequest::new("POST", "/ledger", body.as_bytes());
        let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
            bail!("a fresh key must be claimed");
        };
        sqlx::query("INSERT INTO ledger VALUES ($1, 'entry')")
            .bind(scope.as_str())
            .execute(&mut claim)
            .await?;
        ensure!(claim.complete(&StoredResponse::new(201, "done")).await? == Completion::Stored);
        let Begin::Replay(replay) = store.begin(&scope, &key, &request).await? else {
            bail!("a retry must replay");
        };
        ensure!(replay.response.status == 201);
        let other = IdempotentRequest::new("POST", "/ledger", b"{}");
        ensure!(matches!(
            store.begin(&scope, &key, &other).await,
            Err(Error::Conflict { .. })
        ));
    }
    ensure!(citus.shard_count().await? > 1);
    let spread: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT get_shard_id_for_distribution_column('idempotency_keys', scope))
         FROM idempotency_keys",
    )
    .fetch_one(pool)
    .await?;
    ensure!(spread > 1, "the keys landed on {spread} shard(s)");

    // 30 duplicates at once: one runs, the others wait for it and replay.
    let (scope, key) = (Scope::new("race")?, new_key());
    let mut racers = tokio::task::JoinSet::new();
    for _ in 0..30 {
        let (store, scope, key) = (store.clone(), scope.clone(), key.clone());
        racers.spawn(async move {
            let request = IdempotentRequest::new("POST", "/ledger", b"{}");
            match store.begin(&scope, &key, &request).await? {
                Begin::Claimed(mut claim) => {
                    sqlx::query("INSERT INTO ledger VALUES ('race', 'once')")
                        .execute(&mut claim)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    claim.complete(&StoredResponse::new(201, "once")).await?;
                    Ok::<_, anyhow::Error>(true)
                }
                Begin::Replay(_) => Ok(false),
            }
        });
    }
    let mut claimed = 0;
    while let Some(outcome) = racers.join_next().await {
        claimed += usize::from(outcome??);
    }
    ensure!(claimed == 1, "{claimed} of 30 duplicates ran");
    let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger WHERE scope = 'race'")
        .fetch_one(pool)
        .await?;
    ensure!(effects == 1, "{effects} business writes for one key");

    // Expired keys count as unused: the next request runs fresh.
    expire_all(pool).await?;
    let request = IdempotentRequest::new("POST", "/ledger", b"{}");
    ensure!(matches!(
        store.begin(&scope, &key, &request).await?,
        Begin::Claimed(_)
    ));
    citus.close().await
}

/// Clients of two nodes (the coordinator and a worker) take their advisory locks on
/// different servers: a duplicate is not held back while the first request runs, but the
/// unique key row still lets one of them commit; the other rolls back with its business
/// write, and its retry replays.
#[tokio::test]
async fn duplicates_through_two_nodes_never_both_commit() -> Result<()> {
    let Some(citus) = CitusSchema::create("citus two nodes").await? else {
        return Ok(());
    };
    let first_node = IdempotencyStore::new(citus.pool().clone());
    let worker = citus.worker_pool().await?;
    let second_node = IdempotencyStore::with_config(
        worker.clone(),
        Config::default().with_in_flight_wait(Duration::from_secs(2)),
    );
    sqlx::query("CREATE TABLE ledger (scope text NOT NULL, note text NOT NULL)")
        .execute(citus.pool())
        .await?;
    pg_idempotency::admin::colocate(citus.pool(), "ledger", "scope").await?;
    let (scope, key) = (Scope::new("two-nodes")?, new_key());
    let request = IdempotentRequest::new("POST", "/ledger", b"{}");
    let write = async |claim: &mut pg_idempotency::Claim, note: &str| {
        sqlx::query("INSERT INTO ledger VALUES ('two-nodes', $1)")
            .bind(note)
            .execute(claim)
            .await
    };

    let Begin::Claimed(mut first) = first_node.begin(&scope, &key, &request).await? else {
        bail!("the first request claims");
    };
    write(&mut first, "first").await?;
    let started = std::time::Instant::now();
    let second = second_node.begin(&scope, &key, &request).await?;
    let waited = started.elapsed();
    let Begin::Claimed(mut second) = second else {
        bail!("a replay before anything committed");
    };
    eprintln!(
        "the duplicate on the other node was claimed after {waited:?}: its lock is node-local"
    );
    write(&mut second, "second").await?;
    ensure!(first.complete(&StoredResponse::new(201, "first")).await? == Completion::Stored);
    // Its key row meets the first's: the transaction rolls back with its business write,
    // and the loser is told to retry (Citus relays the worker's unique violation without
    // the constraint's name; the store knows its completion string, docs/OPERATIONS.md).
    let lost = second.complete(&StoredResponse::new(201, "second")).await;
    ensure!(
        matches!(lost, Err(Error::InFlight { .. })),
        "the duplicate committed or failed otherwise: {lost:?}"
    );
    let Begin::Replay(replay) = second_node.begin(&scope, &key, &request).await? else {
        bail!("the retry replays");
    };
    ensure!(replay.response.body == b"first"[..]);
    let notes: Vec<String> = sqlx::query_scalar("SELECT note FROM ledger")
        .fetch_all(citus.pool())
        .await?;
    ensure!(notes == ["first"], "{notes:?}");
    worker.close().await;
    citus.close().await
}

/// A database on 0.1.0 whose table an operator distributed by hand takes the later
/// migrations (sqlx sends each file as one string; Citus refuses DDL on a distributed
/// table in one, so the added migrations alter a table only inside a `DO` block) and then
/// sweeps.
#[tokio::test]
async fn a_distributed_0_1_0_table_takes_the_later_migrations() -> Result<()> {
    let Some(citus) = CitusSchema::empty("citus upgrade").await? else {
        return Ok(());
    };
    let pool = citus.pool();
    let released = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(vec![pg_idempotency::MIGRATOR.migrations[0].clone()]),
        table_name: pg_idempotency::MIGRATOR.table_name.clone(),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    ensure!(released.migrations[0].version == 20261128000001);
    released.run(pool).await?;
    sqlx::query("SELECT create_distributed_table('idempotency_keys', 'scope')")
        .execute(pool)
        .await?;
    pg_idempotency::migrate(pool).await?;
    // The keys are distributed already; the phased requests' table, new, is distributed
    // beside them; then there is nothing left to do.
    ensure!(
        pg_idempotency::admin::distribute(pool).await?,
        "requests not distributed"
    );
    ensure!(citus.colocated("idempotency_requests", "scope").await?);
    ensure!(
        !pg_idempotency::admin::distribute(pool).await?,
        "already distributed"
    );
    check_sweep_contract(pool, citus.shard_count().await?).await?;
    citus.close().await
}

#[tokio::test]
async fn the_sweeper_sweeps_every_shard_in_bounded_batches() -> Result<()> {
    let Some(citus) = CitusSchema::create("citus sweeper").await? else {
        return Ok(());
    };
    check_sweep_contract(citus.pool(), citus.shard_count().await?).await?;
    citus.close().await
}

#[tokio::test]
async fn the_command_line_tool_works_on_a_coordinator() -> Result<()> {
    let Some(citus) = CitusSchema::create("citus cli").await? else {
        return Ok(());
    };
    let url = citus.url();
    let store = IdempotencyStore::new(citus.pool().clone());
    let (scope, key) = (Scope::new("acct 7")?, new_key());
    let Begin::Claimed(claim) = store
        .begin(&scope, &key, &IdempotentRequest::new("POST", "/x", b"{}"))
        .await?
    else {
        bail!("claim");
    };
    claim
        .complete(&StoredResponse::new(201, "secret-response-body"))
        .await?;

    let again = cli(url, &["distribute"]).await?;
    ensure!(again.status.code() == Some(0), "{again:?}");
    ensure!(stdout(&again).contains("idempotency_keys: already distributed by scope"));
    sqlx::query("CREATE TABLE orders (account text NOT NULL, id bigint NOT NULL, PRIMARY KEY (account, id))")
        .execute(citus.pool())
        .await?;
    let colocated = cli(url, &["distribute", "--colocate", "orders:account"]).await?;
    ensure!(colocated.status.code() == Some(0), "{colocated:?}");
    ensure!(stdout(&colocated).contains("orders: distributed by account"));
    ensure!(citus.colocated("orders", "account").await?);
    let twice = cli(url, &["distribute", "--colocate", "orders:account"]).await?;
    ensure!(stdout(&twice).contains("orders: already distributed by account"));
    let wrong = cli(url, &["distribute", "--colocate", "orders:id"]).await?;
    ensure!(wrong.status.code() == Some(1), "{wrong:?}");

    let stats = cli(url, &["stats", "--json"]).await?;
    ensure!(stats.status.code() == Some(0), "{stats:?}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&stats))?;
    ensure!(json["rows"] == 1 && json["expired_rows"] == 0, "{json}");
    ensure!(json["table_bytes"].as_i64() > Some(0) && json["index_bytes"].as_i64() > Some(0));

    let (scope_arg, key_arg) = (scope.as_str(), key.as_str());
    let inspect = cli(
        url,
        &[
            "inspect",
            "--scope",
            scope_arg,
            "--key",
            key_arg,
            "--show-body",
        ],
    )
    .await?;
    ensure!(inspect.status.code() == Some(0), "{inspect:?}");
    ensure!(stdout(&inspect).contains("secret-response-body"));
    let forgot = cli(
        url,
        &["forget", "--scope", scope_arg, "--key", key_arg, "--yes"],
    )
    .await?;
    ensure!(forgot.status.code() == Some(0), "{forgot:?}");
    let gone = cli(url, &["inspect", "--scope", scope_arg, "--key", key_arg]).await?;
    ensure!(gone.status.code() == Some(3), "{gone:?}");

    for n in 0..20 {
        let scope = Scope::new(format!("s{n}"))?;
        let Begin::Claimed(claim) = store
            .begin(
                &scope,
                &new_key(),
                &IdempotentRequest::new("POST", "/x", b"{}"),
            )
            .await?
        else {
            bail!("claim");
        };
        claim.complete(&StoredResponse::new(201, "")).await?;
    }
    expire_all(citus.pool()).await?;
    let swept = cli(url, &["sweep", "--batch", "2", "--pause", "1ms"]).await?;
    ensure!(swept.status.code() == Some(0), "{swept:?}");
    ensure!(
        stdout(&swept).trim() == "deleted 20 expired keys",
        "{}",
        stdout(&swept)
    );
    let stats = cli(url, &["stats", "--json"]).await?;
    let json: serde_json::Value = serde_json::from_str(&stdout(&stats))?;
    ensure!(json["rows"] == 0, "{json}");
    citus.close().await
}

/// A phased request for the cluster: a local step writes a ledger row, the final step
/// stores the response.
struct Note;

impl pg_idempotency::phased::Operation for Note {
    const NAME: &'static str = "citus.note";
    type Input = String;
    type Error = Error;

    async fn run(
        &self,
        note: &String,
        steps: &mut pg_idempotency::phased::Steps,
    ) -> Result<pg_idempotency::phased::Finished, Error> {
        let scope = steps.scope().to_string();
        steps
            .local("write", async |tx| {
                sqlx::query("INSERT INTO ledger VALUES ($1, $2)")
                    .bind(&scope)
                    .bind(note)
                    .execute(&mut *tx)
                    .await?;
                Ok::<_, Error>(())
            })
            .await?;
        steps
            .finish(async |_tx| Ok::<_, Error>(StoredResponse::new(201, note.clone())))
            .await
    }
}

/// Phased requests on distributed tables (`idempotency_requests` co-located with the
/// keys): run, replay, conflict, the completer, expiry and the sweep over the shards.
#[tokio::test]
async fn phased_requests_run_resume_and_sweep_on_distributed_tables() -> Result<()> {
    use pg_idempotency::Begin;
    use pg_idempotency::phased::Completer;

    let Some(citus) = CitusSchema::create("citus phased").await? else {
        return Ok(());
    };
    let pool = citus.pool();
    ensure!(citus.colocated("idempotency_requests", "scope").await?);
    sqlx::query("CREATE TABLE ledger (scope text NOT NULL, note text NOT NULL)")
        .execute(pool)
        .await?;
    pg_idempotency::admin::colocate(pool, "ledger", "scope").await?;
    let store = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_lease(Duration::from_millis(100)),
    );
    let operation = std::sync::Arc::new(Note);
    for n in 0..10 {
        let scope = Scope::new(format!("tenant-{n}"))?;
        let (key, note) = (new_key(), format!("note {n}"));
        let request = IdempotentRequest::new("POST", "/notes", note.as_bytes());
        let first = store
            .run_phased(&scope, &key, &request, &*operation, note.clone())
            .await?;
        ensure!(!first.is_replay() && first.response().body == note.as_bytes());
        let again = store
            .run_phased(&scope, &key, &request, &*operation, note.clone())
            .await?;
        ensure!(again.is_replay() && again.response() == first.response());
        let other = IdempotentRequest::new("POST", "/notes", b"another");
        let conflict = store.begin_phased(&scope, &key, &other).await;
        ensure!(
            matches!(conflict, Err(Error::Conflict { .. })),
            "{conflict:?}"
        );
    }
    // Abandoned before its operation ran, and abandoned after it started (its holder
    // vanished before the final step): the completer frees the first and finishes the
    // second.
    let scope = Scope::new("tenant-abandoned")?;
    let (unstarted, started) = (new_key(), new_key());
    let request = IdempotentRequest::new("POST", "/notes", b"x");
    let Begin::Claimed(idle) = store.begin_phased(&scope, &unstarted, &request).await? else {
        bail!("fresh key");
    };
    drop(idle);
    sqlx::query(
        "INSERT INTO idempotency_requests (scope, key, fingerprint_version, fingerprint,
           operation, input, lease_token, leased_until, expires_at)
         SELECT $1, $2, fingerprint_version, fingerprint, 'citus.note', '\"x\"', 1, now(),
                now() + interval '1 day'
         FROM idempotency_requests WHERE scope = $1 AND key = $3",
    )
    .bind(scope.as_str())
    .bind(started.as_str())
    .bind(unstarted.as_str())
    .execute(pool)
    .await?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pass = Completer::new(store.clone())
        .register(operation.clone())
        .complete_abandoned()
        .await?;
    ensure!(pass.completed == 1 && pass.forgotten == 1, "{pass:?}");
    let replay = store
        .run_phased(&scope, &started, &request, &*operation, "x".to_owned())
        .await?;
    ensure!(replay.is_replay() && replay.response().body == b"x"[..]);
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(pool)
        .await?;
    ensure!(notes == 11, "{notes} ledger rows");

    // Abandoned past the replay window: swept on every shard.
    let Begin::Claimed(stale) = store.begin_phased(&scope, &new_key(), &request).await? else {
        bail!("fresh key");
    };
    drop(stale);
    sqlx::query("UPDATE idempotency_requests SET expires_at = now() - interval '1 s'")
        .execute(pool)
        .await?;
    expire_all(pool).await?;
    let swept = pg_idempotency::sweep(pool, &pg_idempotency::SweepOptions::default()).await?;
    ensure!(
        swept == 12,
        "swept {swept}: 11 keys and 1 abandoned request"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_requests")
        .fetch_one(pool)
        .await?;
    ensure!(left == 0, "{left} requests left");
    citus.close().await
}
