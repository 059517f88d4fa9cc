//! The payments demo's phased charges (`POST /v1/charges`) against their contract: over
//! HTTP in-process, and as real processes (the demo and the fake card processor, each its
//! own process) killed with SIGKILL at every boundary of a charge, or paused with SIGSTOP
//! past their lease.

#[allow(dead_code)]
#[path = "../examples/payments/app.rs"]
mod app;
#[path = "../examples/processor/fake.rs"]
mod fake_processor;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pg_idempotency::testing::TestDatabase;
use pg_idempotency::{Config, IdempotencyStore};
use serde_json::Value;
use sqlx::PgPool;
use support::{Answer, Server, client, new_key, signal, spawn_example, stop_with};

const CHARGES: &str = "/v1/charges";
const BODY: &str = r#"{"amount":1500,"currency":"EUR"}"#;

async fn post_charge(base: &str, key: &str, account: &str, body: &str) -> Result<Answer> {
    Answer::of(
        client()
            .post(format!("{base}{CHARGES}"))
            .header("Idempotency-Key", key)
            .header("X-Account-Id", account)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await?,
    )
    .await
}

async fn get_json(url: &str) -> Result<Value> {
    let answer = Answer::of(client().get(url).send().await?).await?;
    ensure!(answer.status == 200, "GET {url}: {answer:?}");
    answer.json()
}

/// The charge the processor made with `processor_key`: its id, amount and currency.
async fn processor_charge(processor: &str, processor_key: &str) -> Result<Option<Value>> {
    let answer = Answer::of(
        client()
            .get(format!("{processor}/charges/{processor_key}"))
            .send()
            .await?,
    )
    .await?;
    match answer.status {
        404 => Ok(None),
        200 => Ok(Some(answer.json()?)),
        other => bail!("the processor answered {other}"),
    }
}

/// A charge row of the demo.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct ChargeRow {
    status: String,
    processor_key: String,
    processor_charge_id: Option<String>,
}

/// The account's charges, oldest first.
async fn charges_of(pool: &PgPool, account: &str) -> Result<Vec<ChargeRow>> {
    Ok(sqlx::query_as(
        "SELECT status, processor_key::text, processor_charge_id FROM charges
         WHERE account = $1 ORDER BY created_at",
    )
    .bind(account)
    .fetch_all(pool)
    .await?)
}

/// After the request is finished: one charge for the account, succeeded, with the
/// processor's answer for the request's downstream key; the answer replays.
async fn check_exactly_once(
    pool: &PgPool,
    demo: &str,
    processor: &str,
    account: &str,
    key: &str,
    first: &Answer,
) -> Result<()> {
    ensure!(first.status == 201, "{first:?}");
    let charges = charges_of(pool, account).await?;
    ensure!(charges.len() == 1, "{} charges: {charges:?}", charges.len());
    let made = processor_charge(processor, &charges[0].processor_key)
        .await?
        .context("the processor never saw the charge's downstream key")?;
    let made = made["charge_id"]
        .as_str()
        .context("no charge id")?
        .to_owned();
    ensure!(
        charges[0].status == "succeeded"
            && charges[0].processor_charge_id.as_deref() == Some(made.as_str()),
        "recorded {charges:?}, the processor made {made}"
    );
    let body = first.json()?;
    ensure!(body["processor_charge_id"] == made.as_str(), "{body}");
    let replay = post_charge(demo, key, account, BODY).await?;
    ensure!(
        replay.status == 201
            && replay.header("idempotent-replayed") == Some("true")
            && replay.body == first.body,
        "{replay:?}"
    );
    Ok(())
}

#[tokio::test]
async fn charges_run_once_replay_conflict_and_count() -> Result<()> {
    let db = TestDatabase::create().await?;
    let pool = app::connect(db.url()).await?;
    app::prepare(&pool).await?;
    let processor = Server::start(fake_processor::router(Duration::ZERO)).await?;
    let charges = Arc::new(app::Charges::new(&processor.url("")));
    let store = IdempotencyStore::with_config(pool.clone(), Config::default());
    let server = Server::start(app::router(store, charges)).await?;
    let (base, processor_url) = (server.url(""), processor.url(""));

    let key = new_key();
    let first = post_charge(&base, &key, "acct_1", BODY).await?;
    check_exactly_once(&pool, &base, &processor_url, "acct_1", &key, &first).await?;
    let json = first.json()?;
    ensure!(json["account"] == "acct_1" && json["amount"] == 1500 && json["currency"] == "EUR");

    let conflict = post_charge(&base, &key, "acct_1", r#"{"amount":1,"currency":"EUR"}"#).await?;
    ensure!(conflict.status == 409, "{conflict:?}");
    ensure!(conflict.json()?["code"] == "idempotency_conflict");

    // An invalid body writes nothing and leaves the key free for the corrected request.
    let fixed = new_key();
    let invalid = post_charge(&base, &fixed, "acct_2", r#"{"amount":1,"delay_ms":5}"#).await?;
    ensure!(invalid.status == 400, "{invalid:?}");
    let after = post_charge(&base, &fixed, "acct_2", BODY).await?;
    ensure!(after.status == 201 && after.header("idempotent-replayed").is_none());

    let all = get_json(&server.url("/v1/charges/count")).await?;
    let one = get_json(&server.url("/v1/charges/count?account=acct_2")).await?;
    ensure!(all["count"] == 2 && one["count"] == 1, "{all} {one}");
    let stats = get_json(&processor.url("/stats")).await?;
    ensure!(
        stats["calls"] == 2 && stats["distinct_keys"] == 2,
        "{stats}"
    );

    server.stop().await?;
    processor.stop().await?;
    pool.close().await;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn sixty_four_concurrent_duplicates_charge_once() -> Result<()> {
    let db = TestDatabase::create().await?;
    let pool = app::connect(db.url()).await?;
    app::prepare(&pool).await?;
    // A slow processor: the duplicates arrive while the first charge is in its call.
    let processor = Server::start(fake_processor::router(Duration::from_millis(500))).await?;
    let charges = Arc::new(app::Charges::new(&processor.url("")));
    let config = Config::default().with_in_flight_wait(Duration::from_secs(5));
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let server = Server::start(app::router(store, charges)).await?;
    let base = server.url("");
    let key = new_key();

    let requests: Vec<_> = (0..64)
        .map(|_| {
            let (base, key) = (base.clone(), key.clone());
            tokio::spawn(async move { post_charge(&base, &key, "acct_dup", BODY).await })
        })
        .collect();
    let (mut fresh, mut replayed, mut in_flight) = (Vec::new(), 0, 0);
    for request in requests {
        let answer = request.await??;
        match (answer.status, answer.header("idempotent-replayed")) {
            (201, None) => fresh.push(answer),
            (201, Some("true")) => replayed += 1,
            (409, _) if answer.json()?["code"] == "idempotency_key_in_use" => in_flight += 1,
            _ => bail!("unexpected {answer:?}"),
        }
    }
    ensure!(
        fresh.len() == 1,
        "{} ran, {replayed} replayed, {in_flight} in flight",
        fresh.len()
    );
    check_exactly_once(
        &pool,
        &base,
        &processor.url(""),
        "acct_dup",
        &key,
        &fresh[0],
    )
    .await?;
    let stats = get_json(&processor.url("/stats")).await?;
    ensure!(stats["calls"] == 1, "{stats}");

    server.stop().await?;
    processor.stop().await?;
    pool.close().await;
    db.close().await?;
    Ok(())
}

/// The boundaries at which a holder has not recorded the processor's answer yet: one that
/// takes the request over calls the processor itself.
const BEFORE_THE_CALL_IS_RECORDED: [&str; 5] = [
    START,
    "record_charge:before_commit",
    "record_charge:after_commit",
    "call_processor:before_call",
    "call_processor:after_call",
];

/// The boundary before a charge's operation starts, which the SIGKILL test leaves out
/// (a request killed there was never started, and the completer frees its key).
const START: &str = "start:before_record";

/// Every boundary of a charge: the local step's commit (before, after), the external
/// call (before, after, before its result is recorded), the final step's commit.
const BOUNDARIES: [&str; 6] = [
    "record_charge:before_commit",
    "record_charge:after_commit",
    "call_processor:before_call",
    "call_processor:after_call",
    "finish:before_commit",
    "finish:after_commit",
];

/// Who finishes the charge after the kill.
#[derive(Debug, Clone, Copy)]
enum Finisher {
    /// The client retries.
    Retry,
    /// The client never comes back; the restarted service's completer finishes it.
    Completer,
}

/// The demo as a process on `db`, charging through `processor`, with a 1 s lease.
async fn spawn_demo(
    db: &TestDatabase,
    processor: &str,
    env: &[(&str, &str)],
) -> Result<(tokio::process::Child, String, support::Stdout)> {
    spawn_demo_on(db.url(), processor, env).await
}

/// A database URL parameter that ends a session idle in a transaction after 1 s.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "options=-c%20idle_in_transaction_session_timeout%3D1000";

/// [`spawn_demo`] on the database at `url`.
async fn spawn_demo_on(
    url: &str,
    processor: &str,
    env: &[(&str, &str)],
) -> Result<(tokio::process::Child, String, support::Stdout)> {
    let (child, port, stdout) = spawn_example(
        "payments",
        env,
        &[
            "--port",
            "0",
            "--database-url",
            url,
            "--processor-url",
            processor,
            "--lease-secs",
            "1",
        ],
    )
    .await?;
    Ok((child, format!("http://127.0.0.1:{port}"), stdout))
}

/// Reads `stdout` until the demo says it paused at `boundary`.
async fn paused_at(stdout: &mut support::Stdout, boundary: &str) -> Result<()> {
    let expected = format!("paused at {boundary}");
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stdout.next_line().await? {
            if line == expected {
                return Ok(());
            }
        }
        bail!("the demo exited before {expected}")
    })
    .await
    .with_context(|| format!("never {expected}"))?
}

/// Retries until the charge is answered 201 (409 while the dead holder's lease runs).
async fn retry_until_created(demo: &str, key: &str, account: &str) -> Result<Answer> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = post_charge(demo, key, account, BODY).await?;
        match answer.status {
            201 => return Ok(answer),
            409 | 503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => bail!("unexpected answer {answer:?}"),
        }
    }
}

/// A fresh database and the fake processor as a process of its own: the child, its URL
/// and its stdout (kept open while the test runs).
async fn database_and_processor()
-> Result<(TestDatabase, tokio::process::Child, String, support::Stdout)> {
    let db = TestDatabase::create().await?;
    let (child, port, stdout) = spawn_example("processor", &[], &["--port", "0"]).await?;
    Ok((db, child, format!("http://127.0.0.1:{port}"), stdout))
}

#[tokio::test]
async fn sigkill_at_every_boundary_then_retry_or_completer_charges_once() -> Result<()> {
    let (db, mut processor_child, processor, _processor_out) = database_and_processor().await?;
    let mut charges = 0;
    for boundary in BOUNDARIES {
        for finisher in [Finisher::Retry, Finisher::Completer] {
            let (key, account) = (new_key(), format!("acct_{charges}"));
            let context = format!("killed at {boundary}, finished by {finisher:?}");
            let (mut doomed, url, mut stdout) =
                spawn_demo(&db, &processor, &[("PAYMENTS_PAUSE_AT", boundary)]).await?;
            let request = tokio::spawn({
                let (url, key, account) = (url.clone(), key.clone(), account.clone());
                async move { post_charge(&url, &key, &account, BODY).await }
            });
            paused_at(&mut stdout, boundary)
                .await
                .context(context.clone())?;
            ensure!(!stop_with(&mut doomed, "-KILL").await?.success());
            ensure!(
                request.await?.is_err(),
                "{context}: the killed request got an answer"
            );

            let (mut demo, url, _stdout) = spawn_demo(&db, &processor, &[]).await?;
            let first = match finisher {
                Finisher::Retry => retry_until_created(&url, &key, &account).await,
                Finisher::Completer => {
                    answered_or_freed(db.pool(), &key).await?;
                    let replay = post_charge(&url, &key, &account, BODY).await?;
                    ensure!(
                        replay.header("idempotent-replayed") == Some("true"),
                        "{replay:?}"
                    );
                    Ok(replay)
                }
            }
            .context(context.clone())?;
            check_exactly_once(db.pool(), &url, &processor, &account, &key, &first)
                .await
                .context(context.clone())?;
            charges += 1;
            let stats = get_json(&format!("{processor}/stats")).await?;
            ensure!(
                stats["distinct_keys"] == charges,
                "{context}: one downstream key per charge: {stats}"
            );
            stop_with(&mut demo, "-TERM").await?;
        }
    }
    stop_with(&mut processor_child, "-KILL").await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_holder_paused_past_its_lease_cannot_commit_after_the_takeover() -> Result<()> {
    let (db, mut processor_child, processor, _processor_out) = database_and_processor().await?;
    let (key, account) = (new_key(), "acct_paused".to_owned());

    // The holder stops after the processor answered, before it records the answer.
    let boundary = "call_processor:after_call";
    let (mut paused, paused_url, mut stdout) = spawn_demo(
        &db,
        &processor,
        &[
            ("PAYMENTS_PAUSE_AT", boundary),
            ("PAYMENTS_PAUSE_SECS", "2"),
        ],
    )
    .await?;
    let request = tokio::spawn({
        let (url, key, account) = (paused_url.clone(), key.clone(), account.clone());
        async move { post_charge(&url, &key, &account, BODY).await }
    });
    paused_at(&mut stdout, boundary).await?;
    signal(&paused, "-STOP").await?;

    // Past the 1 s lease, a second instance takes over and finishes the charge.
    let (mut taker, url, _stdout) = spawn_demo(&db, &processor, &[]).await?;
    let first = retry_until_created(&url, &key, &account).await?;
    check_exactly_once(db.pool(), &url, &processor, &account, &key, &first).await?;

    // Resumed, the old holder cannot record anything: its client gets a 5xx, not a
    // second charge.
    signal(&paused, "-CONT").await?;
    let late = tokio::time::timeout(Duration::from_secs(30), request).await???;
    ensure!(late.status == 503, "the old holder answered {late:?}");
    check_exactly_once(db.pool(), &paused_url, &processor, &account, &key, &first).await?;
    let stats = get_json(&format!("{processor}/stats")).await?;
    ensure!(stats["distinct_keys"] == 1, "{stats}");

    stop_with(&mut paused, "-TERM").await?;
    stop_with(&mut taker, "-TERM").await?;
    stop_with(&mut processor_child, "-KILL").await?;
    db.close().await?;
    Ok(())
}

/// Who acts while a holder is paused past its lease.
#[derive(Debug, Clone, Copy)]
enum Actor {
    /// The client retries on another instance: it takes the request over, or starts it
    /// again if the completer freed it meanwhile.
    Retry,
    /// The other instance's completer finishes the request (or frees its key if it never
    /// started); then the client asks again.
    Completer,
    /// An operator forgets the key; then the client sends the request again, which is a
    /// new request.
    Forget,
}

/// What the account's charges and the processor's records say after the scenario: every
/// request has one charge row, every charge row its own downstream key, and every key
/// the processor charged with belongs to one row, for that row's amount and currency.
async fn one_charge_per_request(
    pool: &PgPool,
    processor: &str,
    account: &str,
    requests: usize,
    answered: &Answer,
) -> Result<usize> {
    let rows = charges_of(pool, account).await?;
    ensure!(
        rows.len() <= requests,
        "{} requests made {rows:?}",
        requests
    );
    let keys: std::collections::BTreeSet<&str> =
        rows.iter().map(|row| row.processor_key.as_str()).collect();
    ensure!(
        keys.len() == rows.len(),
        "two charge rows share a request: {rows:?}"
    );
    let mut charged = 0;
    for row in &rows {
        match processor_charge(processor, &row.processor_key).await? {
            Some(made) => {
                charged += 1;
                ensure!(
                    made["amount"] == 1500 && made["currency"] == "EUR",
                    "the processor charged {made} for {row:?}"
                );
                if row.status == "succeeded" {
                    ensure!(row.processor_charge_id.as_deref() == made["charge_id"].as_str());
                }
            }
            None => ensure!(row.status == "pending", "{row:?} without a charge"),
        }
    }
    let body = answered.json()?;
    ensure!(
        rows.iter().any(|row| row.status == "succeeded"
            && body["processor_charge_id"].as_str() == row.processor_charge_id.as_deref()),
        "the answer {body} is no succeeded charge of {rows:?}"
    );
    Ok(charged)
}

/// Waits until the request is answered (stored) or gone (its key freed by the
/// completer, which frees a request that never started).
async fn answered_or_freed(pool: &PgPool, key: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (stored, in_progress): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM idempotency_keys WHERE key = $1),
                    EXISTS (SELECT 1 FROM idempotency_requests WHERE key = $1)",
        )
        .bind(key)
        .fetch_one(pool)
        .await?;
        if stored || !in_progress {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the completer never finished {key}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_holder_paused_at_any_boundary_commits_nothing_once_others_acted() -> Result<()> {
    let (db, mut processor_child, processor, _processor_out) = database_and_processor().await?;
    let mut charged = 0;
    let mut scenario = 0;
    for boundary in std::iter::once(START).chain(BOUNDARIES) {
        for actor in [Actor::Retry, Actor::Completer, Actor::Forget] {
            scenario += 1;
            let (key, account) = (new_key(), format!("acct_paused_{scenario}"));
            let context = format!("paused at {boundary}, then {actor:?}");
            // A holder stopped inside a transaction holds the request's row until the
            // server ends its session, as `idle_in_transaction_session_timeout` does in
            // production; here after 1 s.
            let separator = if db.url().contains('?') { '&' } else { '?' };
            let (mut paused, paused_url, mut stdout) = spawn_demo_on(
                &format!("{}{separator}{IDLE_IN_TRANSACTION_TIMEOUT}", db.url()),
                &processor,
                &[
                    ("PAYMENTS_PAUSE_AT", boundary),
                    ("PAYMENTS_PAUSE_SECS", "1"),
                ],
            )
            .await?;
            let request = tokio::spawn({
                let (url, key, account) = (paused_url.clone(), key.clone(), account.clone());
                async move { post_charge(&url, &key, &account, BODY).await }
            });
            paused_at(&mut stdout, boundary)
                .await
                .context(context.clone())?;
            signal(&paused, "-STOP").await?;
            // Past the 1 s lease.
            tokio::time::sleep(Duration::from_millis(1500)).await;

            // The other instance stops for 2 s after its processor call, when it makes
            // one: the paused holder resumes while the other one holds the request.
            let resumes_midway =
                matches!(actor, Actor::Forget) || BEFORE_THE_CALL_IS_RECORDED.contains(&boundary);
            let pause: &[(&str, &str)] = if resumes_midway {
                &[
                    ("PAYMENTS_PAUSE_AT", "call_processor:after_call"),
                    ("PAYMENTS_PAUSE_SECS", "2"),
                ]
            } else {
                &[]
            };
            let (mut other, url, mut other_stdout) = spawn_demo(&db, &processor, pause).await?;
            let acting = tokio::spawn({
                let (pool, key, account) = (db.pool().clone(), key.clone(), account.clone());
                async move {
                    match actor {
                        Actor::Retry => {}
                        Actor::Completer => answered_or_freed(&pool, &key).await?,
                        Actor::Forget => {
                            let scope = pg_idempotency::Scope::new(&account)?;
                            let key =
                                pg_idempotency::IdempotencyKey::parse(&key, Default::default())?;
                            pg_idempotency::admin::forget(&pool, &scope, &key).await?;
                        }
                    }
                    retry_until_created(&url, &key, &account).await
                }
            });
            // Resumed while the other instance holds the request (or after it answered),
            // the paused holder records nothing: its client gets a 5xx, or the answer it
            // had committed before it stopped.
            let answered = if resumes_midway {
                paused_at(&mut other_stdout, "call_processor:after_call")
                    .await
                    .context(context.clone())?;
                signal(&paused, "-CONT").await?;
                acting.await?
            } else {
                let answered = acting.await?;
                signal(&paused, "-CONT").await?;
                answered
            }
            .context(context.clone())?;
            let late = tokio::time::timeout(Duration::from_secs(30), request)
                .await
                .context(context.clone())???;
            ensure!(
                late.status == 503 || late.status == 201,
                "{context}: the paused holder answered {late:?}"
            );
            // After `forget`, the client's request is a new one.
            let requests = if matches!(actor, Actor::Forget) { 2 } else { 1 };
            charged += one_charge_per_request(db.pool(), &processor, &account, requests, &answered)
                .await
                .context(context.clone())?;
            let stats = get_json(&format!("{processor}/stats")).await?;
            ensure!(
                stats["distinct_keys"] == charged && stats["refused"] == 0,
                "{context}: the processor charged with keys of no charge row: {stats}"
            );
            stop_with(&mut paused, "-TERM").await?;
            stop_with(&mut other, "-TERM").await?;
        }
    }
    stop_with(&mut processor_child, "-KILL").await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn a_key_reused_after_its_window_is_a_new_request_downstream_too() -> Result<()> {
    let (db, mut processor_child, processor, _processor_out) = database_and_processor().await?;
    let (mut demo, url, _stdout) = spawn_example(
        "payments",
        &[],
        &[
            "--port",
            "0",
            "--database-url",
            db.url(),
            "--processor-url",
            &processor,
            "--ttl-secs",
            "1",
        ],
    )
    .await?;
    let url = format!("http://127.0.0.1:{url}");
    let (key, account) = (new_key(), "acct_reuse".to_owned());
    let bodies = [
        r#"{"amount":100,"currency":"EUR"}"#,
        r#"{"amount":99999,"currency":"USD"}"#,
    ];
    let mut made = Vec::new();
    for body in bodies {
        let answer = post_charge(&url, &key, &account, body).await?;
        ensure!(
            answer.status == 201 && answer.header("idempotent-replayed").is_none(),
            "{answer:?}"
        );
        made.push(answer.json()?);
        // Past the 1 s replay window.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    ensure!(
        made[0]["processor_charge_id"] != made[1]["processor_charge_id"],
        "{made:?}"
    );
    let rows = charges_of(db.pool(), &account).await?;
    ensure!(
        rows.len() == 2 && rows[0].processor_key != rows[1].processor_key,
        "{rows:?}"
    );
    for (row, body) in rows.iter().zip(bodies) {
        let sent: Value = serde_json::from_str(body)?;
        let charge = processor_charge(&processor, &row.processor_key)
            .await?
            .context("no charge for a row")?;
        ensure!(
            charge["amount"] == sent["amount"] && charge["currency"] == sent["currency"],
            "{charge} for {body}"
        );
        ensure!(row.status == "succeeded", "{row:?}");
    }
    let stats = get_json(&format!("{processor}/stats")).await?;
    ensure!(
        stats["distinct_keys"] == 2 && stats["refused"] == 0,
        "{stats}"
    );
    stop_with(&mut demo, "-TERM").await?;
    stop_with(&mut processor_child, "-KILL").await?;
    db.close().await?;
    Ok(())
}
