//! The transactional store against a real PostgreSQL (see `pg_idempotency::testing`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pg_idempotency::{
    Begin, Completion, Config, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Outcome,
    Problems, Scope, StorePolicy, StoredResponse, SweepOptions, Sweeper,
};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, PgPool};

mod support;
use support::{assert_no_idle_transactions, cancel_after, expire, expire_all, with_recorder};

async fn setup() -> Result<PgPool> {
    let pool = pg_idempotency::testing::fresh_pool().await?;
    sqlx::raw_sql(
        "CREATE TABLE payments (
            id bigserial PRIMARY KEY,
            account text NOT NULL,
            amount bigint NOT NULL
        )",
    )
    .execute(&pool)
    .await?;
    Ok(pool)
}

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(uuid::Uuid::new_v4()).expect("v4")
}

fn scope(name: &str) -> Scope {
    Scope::new(name).expect("valid scope")
}

async fn payments(pool: &PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM payments")
            .fetch_one(pool)
            .await?,
    )
}

/// A response with every byte value and repeated headers, to prove replays are exact.
fn rich_response(n: i64) -> StoredResponse {
    let mut body = format!(r#"{{"payment":{n}}}"#).into_bytes();
    body.extend(0..=255u8);
    StoredResponse::new(201, body)
        .with_header("Content-Type", "application/json")
        .with_header("Set-Cookie", "a=1")
        .with_header("Set-Cookie", "b=2; Path=/")
        .with_header("X-Quote", "it's \"quoted\" \\ é")
}

/// One payment, done through the store: what a handler does.
async fn pay(
    store: &IdempotencyStore,
    scope: &Scope,
    key: &IdempotencyKey,
    body: &[u8],
) -> Result<Outcome, Error> {
    let request = IdempotentRequest::new("POST", "/v1/payments", body);
    store
        .run(scope, key, &request, async |claim| {
            let account = claim.scope().to_string();
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO payments (account, amount) VALUES ($1, 100) RETURNING id",
            )
            .bind(account)
            .fetch_one(&mut *claim)
            .await?;
            Ok::<_, Error>(rich_response(id))
        })
        .await
}

#[tokio::test]
async fn replay_returns_identical_bytes_without_running_again() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let (scope, key) = (scope("acct_1"), new_key());

    let first = pay(&store, &scope, &key, br#"{"amount":100}"#).await?;
    let Outcome::Executed {
        response,
        stored: true,
    } = &first
    else {
        bail!("first request should execute and be stored: {first:?}");
    };
    for _ in 0..3 {
        let again = pay(&store, &scope, &key, br#"{"amount":100}"#).await?;
        let Outcome::Replayed(replay) = again else {
            bail!("retry should replay")
        };
        assert_eq!(&replay.response, response);
        assert_eq!(replay.response.body, response.body);
        assert_eq!(replay.response.headers, response.headers);
    }
    // Equal JSON with other whitespace and key order is the same request.
    let Outcome::Replayed(_) = pay(&store, &scope, &key, b"{ \"amount\" : 100 }").await? else {
        bail!("equal JSON should replay")
    };
    assert_eq!(payments(&pool).await?, 1);
    Ok(())
}

#[tokio::test]
async fn a_body_over_the_cap_completes_and_replays_without_its_body() -> Result<()> {
    let pool = setup().await?;
    let response = rich_response(1);
    let cap = response.body.len() - 1;
    let store =
        IdempotencyStore::with_config(pool.clone(), Config::default().with_stored_body_cap(cap));
    let (scope, key) = (scope("acct_1"), new_key());
    let first = pay(&store, &scope, &key, b"{}").await?;
    // The caller keeps the whole response for its first answer.
    let Outcome::Executed {
        response: executed,
        stored: true,
    } = &first
    else {
        bail!("the request should complete: {first:?}");
    };
    assert!(!executed.body_omitted && executed.body.len() == cap + 1);
    let Outcome::Replayed(replay) = pay(&store, &scope, &key, b"{}").await? else {
        bail!("a retry should replay")
    };
    assert!(replay.response.body_omitted && replay.response.body.is_empty());
    assert_eq!(
        (replay.response.status, &replay.response.headers),
        (executed.status, &executed.headers)
    );
    // A store with a larger cap reads the same row the same way.
    let wide = IdempotencyStore::new(pool.clone());
    let Outcome::Replayed(again) = pay(&wide, &scope, &key, b"{}").await? else {
        bail!("a retry should replay")
    };
    assert_eq!(again.response, replay.response);
    assert_eq!(payments(&pool).await?, 1);
    Ok(())
}

#[tokio::test]
async fn different_body_is_a_conflict_that_names_key_and_first_use() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let (scope, key) = (scope("acct_1"), new_key());
    pay(&store, &scope, &key, br#"{"amount":100}"#).await?;
    let created_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT created_at FROM idempotency_keys")
            .fetch_one(&pool)
            .await?;

    let err = pay(&store, &scope, &key, br#"{"amount":101}"#)
        .await
        .unwrap_err();
    let Error::Conflict {
        key: got,
        first_used_at,
        ..
    } = &err
    else {
        bail!("expected conflict, got {err:?}")
    };
    assert_eq!(got, &key);
    assert_eq!(*first_used_at, created_at);
    let problem = Problems::new("https://api.example.com/errors/")
        .for_error(&err)
        .context("client error")?;
    assert_eq!(problem.status, 409);
    assert_eq!(problem.code, "idempotency_conflict");
    assert_eq!(problem.advice_code, "use_new_idempotency_key");
    assert_eq!(
        problem.type_uri,
        "https://api.example.com/errors/idempotency-conflict"
    );
    assert!(problem.detail.contains(key.as_str()), "{}", problem.detail);

    // Another method or route with the same body is another request too.
    let request = IdempotentRequest::new("PUT", "/v1/payments", br#"{"amount":100}"#);
    assert!(matches!(
        store.begin(&scope, &key, &request).await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(payments(&pool).await?, 1);
    Ok(())
}

#[tokio::test]
async fn scopes_are_independent() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let key = new_key();
    // Scopes that differ only in bytes a hand-built statement could trip over.
    let scopes = ["acct_1", "acct_2", "o'brien \\ $$ é 💳", "acct_1 "];
    let mut responses = Vec::new();
    for name in scopes
        .iter()
        .map(|s| s.trim_end())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let outcome = pay(&store, &scope(name), &key, br#"{"amount":100}"#).await?;
        assert!(
            !outcome.is_replay(),
            "scope {name:?} must not see another scope's key"
        );
        responses.push((name, outcome.into_response()));
    }
    for (name, response) in &responses {
        let Outcome::Replayed(replay) =
            pay(&store, &scope(name), &key, br#"{"amount":100}"#).await?
        else {
            bail!("scope {name:?} should replay its own response")
        };
        assert_eq!(
            &replay.response, response,
            "scope {name:?} got another scope's response"
        );
    }
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT scope FROM idempotency_keys ORDER BY scope")
            .fetch_all(&pool)
            .await?;
    assert_eq!(stored, vec!["acct_1", "acct_2", "o'brien \\ $$ é 💳"]);
    assert_eq!(payments(&pool).await?, 3);
    Ok(())
}

#[tokio::test]
async fn an_expired_key_runs_fresh_and_replaces_the_row() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_ttl(Duration::from_millis(300)),
    );
    let (scope, key) = (scope("acct_1"), new_key());
    let first = pay(&store, &scope, &key, br#"{"amount":100}"#)
        .await?
        .into_response();
    assert!(
        pay(&store, &scope, &key, br#"{"amount":100}"#)
            .await?
            .is_replay()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;

    // Expired: even a different body runs fresh, and replaces the old row atomically.
    let second = pay(&store, &scope, &key, br#"{"amount":999}"#).await?;
    assert!(!second.is_replay());
    assert_ne!(second.response(), &first);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&pool)
        .await?;
    assert_eq!(rows, 1);
    let Outcome::Replayed(replay) = pay(&store, &scope, &key, br#"{"amount":999}"#).await? else {
        bail!("the new row should replay")
    };
    assert_eq!(&replay.response, second.response());
    assert_eq!(payments(&pool).await?, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_requests_on_one_key_write_once() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_in_flight_wait(Duration::from_secs(20)),
    );
    let short_wait = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_in_flight_wait(Duration::from_millis(10)),
    );
    let (scope, key) = (scope("acct_1"), new_key());
    let start = Arc::new(tokio::sync::Barrier::new(64));

    let mut tasks = Vec::new();
    for i in 0..64 {
        // Half wait long enough to replay, half give up quickly with "in flight".
        let store = if i % 2 == 0 {
            store.clone()
        } else {
            short_wait.clone()
        };
        let (scope, key, start) = (scope.clone(), key.clone(), Arc::clone(&start));
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let request = IdempotentRequest::new("POST", "/v1/payments", br#"{"amount":100}"#);
            store
                .run(&scope, &key, &request, async |claim| {
                    sqlx::query("INSERT INTO payments (account, amount) VALUES ('acct_1', 100)")
                        .execute(&mut *claim)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, Error>(rich_response(1))
                })
                .await
        }));
    }
    let (mut executed, mut replayed, mut in_flight) = (0, 0, 0);
    for task in tasks {
        match task.await? {
            Ok(Outcome::Executed {
                response,
                stored: true,
            }) => {
                executed += 1;
                assert_eq!(response, rich_response(1));
            }
            Ok(Outcome::Replayed(replay)) => {
                replayed += 1;
                assert_eq!(replay.response, rich_response(1));
            }
            Err(Error::InFlight { .. }) => in_flight += 1,
            other => bail!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(executed, 1, "exactly one request runs the business logic");
    assert_eq!(executed + replayed + in_flight, 64);
    assert!(
        replayed >= 31,
        "every patient duplicate replays: {replayed}"
    );
    assert_eq!(payments(&pool).await?, 1);
    Ok(())
}

#[tokio::test]
async fn in_flight_answer_comes_after_the_configured_wait() -> Result<()> {
    let pool = setup().await?;
    let wait = Duration::from_millis(200);
    let store =
        IdempotencyStore::with_config(pool.clone(), Config::default().with_in_flight_wait(wait));
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(holder) = store.begin(&scope, &key, &request).await? else {
        bail!("claim")
    };

    let started = std::time::Instant::now();
    let err = store.begin(&scope, &key, &request).await.unwrap_err();
    let waited = started.elapsed();
    let Error::InFlight { retry_after, .. } = &err else {
        bail!("expected in flight, got {err:?}")
    };
    assert!(waited >= wait, "answered before the wait: {waited:?}");
    assert_eq!(*retry_after, Config::default().retry_after());
    let problem = Problems::new("/p/")
        .for_error(&err)
        .context("client error")?;
    assert_eq!(
        (problem.status, problem.code.as_str()),
        (409, "idempotency_key_in_use")
    );
    assert!(problem.retry_after.is_some());
    holder.abort().await?;
    Ok(())
}

#[tokio::test]
async fn a_duplicate_of_a_local_holder_needs_no_connection() -> Result<()> {
    let pool = setup().await?;
    // One connection, which the holder takes: a duplicate that asked the pool for one
    // would wait the pool's timeout and fail with it.
    let single = small_pool(&pool, 1).await?;
    let store = IdempotencyStore::with_config(
        single,
        Config::default().with_in_flight_wait(Duration::from_millis(100)),
    );
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(holder) = store.begin(&scope, &key, &request).await? else {
        bail!("claim")
    };
    let duplicate =
        tokio::time::timeout(Duration::from_secs(10), store.begin(&scope, &key, &request))
            .await
            .context("the duplicate waited for a connection")?;
    assert!(
        matches!(duplicate, Err(Error::InFlight { .. })),
        "{duplicate:?}"
    );
    holder.abort().await?;
    Ok(())
}

#[tokio::test]
async fn a_request_without_a_free_connection_is_told_so_within_its_wait() -> Result<()> {
    let pool = setup().await?;
    // One connection, which a claim holds; the pool itself would wait 2 s, and fail
    // with its own timeout.
    let single = small_pool(&pool, 1).await?;
    let store = IdempotencyStore::with_config(
        single,
        Config::default().with_connection_wait(Duration::from_millis(100)),
    );
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(holder) = store.begin(&scope("acct_1"), &new_key(), &request).await? else {
        bail!("claim")
    };
    let other = tokio::time::timeout(
        Duration::from_secs(10),
        store.begin(&scope("acct_2"), &new_key(), &request),
    )
    .await
    .context("the request waited for the pool's own timeout")?;
    let Err(error @ Error::NoConnection { .. }) = &other else {
        bail!("expected NoConnection, got {other:?}");
    };
    assert!(!error.is_client_error());
    assert!(
        Problems::default().for_error(error).is_none(),
        "a server-side error"
    );
    holder.abort().await?;
    // The connection is back: the next request is served.
    let Begin::Claimed(next) = store.begin(&scope("acct_2"), &new_key(), &request).await? else {
        bail!("claim")
    };
    next.abort().await?;
    Ok(())
}

/// Issue 24: a request's waits share one deadline, counted from its start. A request
/// that already waited as long as the store's waits last (for a share of a body budget,
/// say) is told at once that no connection is free, or that its key is in flight, instead
/// of waiting for either afresh.
#[tokio::test]
async fn a_request_s_waits_count_from_its_start() -> Result<()> {
    let pool = setup().await?;
    // One connection, which a claim holds.
    let single = small_pool(&pool, 1).await?;
    // Waits three times as long as this test waits for an answer: an answer in time
    // means that the request's start set its deadline.
    let minute = Duration::from_secs(60);
    let store = IdempotencyStore::with_config(
        single,
        Config::default()
            .with_connection_wait(minute)
            .with_in_flight_wait(minute),
    );
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let a_minute_ago = std::time::Instant::now()
        .checked_sub(minute)
        .context("this machine has been up for less than a minute")?;
    let late = request.with_waits_from(a_minute_ago);
    assert_eq!(
        late.fingerprint(),
        request.fingerprint(),
        "not fingerprinted"
    );
    let Begin::Claimed(holder) = store.begin(&scope, &key, &request).await? else {
        bail!("claim")
    };
    let soon = Duration::from_secs(20);
    let other = tokio::time::timeout(soon, store.begin(&scope, &new_key(), &late))
        .await
        .context("the request waited a connection wait afresh")?;
    // It says how long the request waited, from its start.
    let Err(Error::NoConnection { waited, .. }) = other else {
        bail!("expected NoConnection, got {other:?}");
    };
    assert!(waited >= minute, "{waited:?}");
    let duplicate = tokio::time::timeout(soon, store.begin(&scope, &key, &late))
        .await
        .context("the duplicate waited an in-flight wait afresh")?;
    assert!(
        matches!(duplicate, Err(Error::InFlight { .. })),
        "{duplicate:?}"
    );
    holder.abort().await?;
    Ok(())
}

#[tokio::test]
async fn one_scope_cannot_take_every_connection() -> Result<()> {
    let pool = setup().await?;
    let four = small_pool(&pool, 4).await?;
    // Half of the pool per scope (the default share).
    let store = IdempotencyStore::with_config(
        four,
        Config::default().with_connection_wait(Duration::from_millis(200)),
    );
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let flood = scope("acct_flood");
    // The flooding scope's claims hold their connections (slow handlers).
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        match store.begin(&flood, &new_key(), &request).await {
            Ok(Begin::Claimed(claim)) => held.push(claim),
            Err(Error::NoConnection { .. }) => refused += 1,
            other => bail!("expected a claim or NoConnection, got {other:?}"),
        }
    }
    assert_eq!((held.len(), refused), (2, 2));
    // Another tenant is served at once, while the flood holds its share.
    let Begin::Claimed(other) = store
        .begin(&scope("acct_other"), &new_key(), &request)
        .await?
    else {
        bail!("claim")
    };
    other.abort().await?;
    for claim in held {
        claim.abort().await?;
    }
    // With shares off, one scope may take every connection.
    let whole = IdempotencyStore::with_config(
        store.pool().clone(),
        Config::default()
            .with_connection_wait(Duration::from_millis(200))
            .with_scope_share(1.0),
    );
    let mut held = Vec::new();
    for _ in 0..4 {
        let Begin::Claimed(claim) = whole.begin(&flood, &new_key(), &request).await? else {
            bail!("claim")
        };
        held.push(claim);
    }
    let starved = whole
        .begin(&scope("acct_other"), &new_key(), &request)
        .await;
    assert!(
        matches!(starved, Err(Error::NoConnection { .. })),
        "{starved:?}"
    );
    for claim in held {
        claim.abort().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_connection_checked_too_late_goes_back_to_the_pool_intact() -> Result<()> {
    let pool = setup().await?;
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&opened);
    // The pool checks each connection before it hands it out, slowly: longer than the
    // request's connection wait.
    let slow_checks = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(move |_, _| {
            let counted = Arc::clone(&counted);
            Box::pin(async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
        })
        .before_acquire(|_, _| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(true)
            })
        })
        .connect_with(pool.connect_options().as_ref().clone())
        .await?;
    let store = IdempotencyStore::with_config(
        slow_checks.clone(),
        Config::default()
            .with_pool_checks(true)
            .with_connection_wait(Duration::from_millis(50)),
    );
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    for _ in 0..3 {
        let refused = store.begin(&scope("acct_1"), &new_key(), &request).await;
        assert!(
            matches!(refused, Err(Error::NoConnection { .. })),
            "{refused:?}"
        );
        // The check the request gave up on finishes, and the connection is kept.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(
        opened.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "connections were closed and opened again"
    );
    Ok(())
}

#[tokio::test]
async fn drop_and_abort_roll_back_and_free_the_key() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let insert = "INSERT INTO payments (account, amount) VALUES ('acct_1', 1)";

    let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
        bail!("claim")
    };
    sqlx::query(insert).execute(&mut claim).await?;
    claim.abort().await?;
    assert_eq!(payments(&pool).await?, 0);

    let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
        bail!("claim after abort")
    };
    sqlx::query(insert).execute(&mut claim).await?;
    drop(claim);

    // The rollback of a dropped claim runs in the background; the next begin waits for it.
    let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
        bail!("claim after drop")
    };
    assert_eq!(payments(&pool).await?, 0);
    sqlx::query(insert).execute(&mut claim).await?;
    assert_eq!(
        claim.complete(&StoredResponse::new(201, "ok")).await?,
        Completion::Stored
    );
    assert_eq!(payments(&pool).await?, 1);
    assert_no_idle_transactions(&pool).await
}

#[tokio::test]
async fn a_response_the_policy_does_not_keep_rolls_back_and_frees_the_key() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_store_policy(StorePolicy::default().excluding(409)),
    );
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    for status in [500, 503, 408, 429, 409] {
        let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
            bail!("claim")
        };
        sqlx::query("INSERT INTO payments (account, amount) VALUES ('acct_1', 1)")
            .execute(&mut claim)
            .await?;
        assert_eq!(
            claim
                .complete(&StoredResponse::new(status, "retry me"))
                .await?,
            Completion::RolledBack
        );
        assert_eq!(
            payments(&pool).await?,
            0,
            "status {status} must roll back the business write"
        );
    }
    let Begin::Claimed(claim) = store.begin(&scope, &key, &request).await? else {
        bail!("key should be free")
    };
    let Err(Error::InvalidStatus(600)) = claim.complete(&StoredResponse::new(600, "")).await else {
        bail!("600 is not a status")
    };
    let Begin::Claimed(claim) = store.begin(&scope, &key, &request).await? else {
        bail!("key should be free")
    };
    assert_eq!(
        claim.complete(&StoredResponse::new(404, "stored")).await?,
        Completion::Stored
    );
    assert!(matches!(
        store.begin(&scope, &key, &request).await?,
        Begin::Replay(_)
    ));
    Ok(())
}

#[tokio::test]
async fn a_failing_business_step_rolls_back_and_frees_the_key() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let result = store
        .run(&scope, &key, &request, async |claim| {
            sqlx::query("INSERT INTO payments (account, amount) VALUES ('acct_1', 1)")
                .execute(&mut *claim)
                .await?;
            // A statement error aborts the transaction; the closure returns it.
            sqlx::query("SELECT 1/0").execute(&mut *claim).await?;
            Ok::<_, anyhow::Error>(StoredResponse::new(201, ""))
        })
        .await;
    assert!(result.is_err());
    assert_eq!(payments(&pool).await?, 0);
    assert!(!pay(&store, &scope, &key, b"{}").await?.is_replay());
    assert_eq!(payments(&pool).await?, 1);
    assert_no_idle_transactions(&pool).await
}

#[tokio::test]
async fn cancelling_at_every_await_point_leaves_nothing_behind() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::with_config(
        pool.clone(),
        Config::default().with_in_flight_wait(Duration::from_secs(10)),
    );
    let scope = scope("acct_1");
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let insert = "INSERT INTO payments (account, amount) VALUES ('acct_1', 1)";

    // Cancel begin at its 1st, 2nd, ... await point until it completes on its own.
    let begin_cancelled = until_cancelled_once(async || {
        let mut cancelled = 0;
        for polls in 1.. {
            let key = new_key();
            match cancel_after(store.begin(&scope, &key, &request), polls).await {
                None => cancelled += 1,
                Some(begun) => {
                    let Begin::Claimed(claim) = begun? else {
                        bail!("fresh key")
                    };
                    claim.abort().await?;
                    break;
                }
            }
            assert_no_idle_transactions(&pool).await?;
            let Begin::Claimed(claim) = store.begin(&scope, &key, &request).await? else {
                bail!("key stuck after cancelled begin")
            };
            claim
                .complete(&StoredResponse::new(201, "after cancel"))
                .await?;
        }
        Ok(cancelled)
    })
    .await?;

    // Cancel complete at every await point: the write either committed with its key or not at all.
    let complete_cancelled = until_cancelled_once(async || {
        let mut cancelled = 0;
        for polls in 1.. {
            let key = new_key();
            let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
                bail!("claim")
            };
            sqlx::query(insert).execute(&mut claim).await?;
            let before = payments(&pool).await?;
            let response = StoredResponse::new(201, "done");
            let finished = cancel_after(claim.complete(&response), polls)
                .await
                .is_some();
            assert_no_idle_transactions(&pool).await?;
            // Count after `begin`: the closed connection's backend may still be committing,
            // and `begin` waits for it (it holds the key's lock until it is done).
            match store.begin(&scope, &key, &request).await? {
                Begin::Replay(replay) => {
                    assert_eq!(replay.response, response);
                    let rows_now = payments(&pool).await?;
                    assert_eq!(rows_now, before + 1, "a stored key has its write");
                }
                Begin::Claimed(claim) => {
                    assert!(!finished, "a completed claim must replay");
                    let rows_now = payments(&pool).await?;
                    assert_eq!(rows_now, before, "no key, no write");
                    claim.abort().await?;
                }
            }
            if finished {
                break;
            }
            cancelled += 1;
        }
        Ok(cancelled)
    })
    .await?;

    // Cancel the sweeper's one-shot sweep at every await point.
    let sweep_cancelled = until_cancelled_once(async || {
        expire_all(&pool).await?;
        let mut cancelled = 0;
        for polls in 1.. {
            let options = SweepOptions::default()
                .with_batch_size(2)
                .with_pause(Duration::ZERO);
            if cancel_after(pg_idempotency::sweep(&pool, &options), polls)
                .await
                .is_some()
            {
                break;
            }
            cancelled += 1;
            assert_no_idle_transactions(&pool).await?;
        }
        Ok(cancelled)
    })
    .await?;
    assert!(
        begin_cancelled > 0 && complete_cancelled > 0 && sweep_cancelled > 0,
        "await points exercised: begin {begin_cancelled}, complete {complete_cancelled}, sweep {sweep_cancelled}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&pool)
        .await?;
    assert_eq!(rows, 0);
    // The pool still serves requests.
    assert!(!pay(&store, &scope, &new_key(), b"{}").await?.is_replay());
    assert_no_idle_transactions(&pool).await
}

/// Runs `phase` (which cancels an operation at its 1st, 2nd, ... await point and returns
/// how many times it did) again, up to 20 times, until it was cancelled once at least: on
/// a busy machine a reply can be in the socket before the first read, and a run then
/// passes fewer await points, or none. The cancellations of the last run.
async fn until_cancelled_once(mut phase: impl AsyncFnMut() -> Result<usize>) -> Result<usize> {
    let mut cancelled = 0;
    for _ in 0..20 {
        cancelled = phase().await?;
        if cancelled > 0 {
            break;
        }
    }
    Ok(cancelled)
}

#[tokio::test]
async fn the_sweeper_deletes_only_expired_rows_in_batches_and_stops() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    for _ in 0..25 {
        pay(&store, &scope("acct_1"), &new_key(), b"{}").await?;
    }
    // Age 20 of the 25 rows past their expiry (database clock).
    expire(&pool, 20).await?;

    assert_eq!(
        pg_idempotency::delete_expired(&pool, 7).await?,
        7,
        "one batch is bounded"
    );
    let deleted = pg_idempotency::sweep(&pool, &SweepOptions::default().with_batch_size(4)).await?;
    assert_eq!(deleted, 13);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE expires_at > now()")
            .fetch_one(&pool)
            .await?;
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&pool)
        .await?;
    assert_eq!((left, all), (5, 5));

    // The background sweeper picks up new expired rows, and stops when asked.
    expire(&pool, 2).await?;
    let sweeper = Sweeper::spawn(
        pool.clone(),
        SweepOptions::default().with_interval(Duration::from_millis(50)),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&pool)
        .await?
        != 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweeper did not sweep"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), sweeper.stop())
        .await
        .context("sweeper did not stop")?;
    assert_eq!(stopped, 2);
    Ok(())
}

fn app_migrator() -> Migrator {
    let mut migrator = Migrator::with_migrations(vec![Migration::new(
        20_240_101_000_000,
        "app orders".into(),
        MigrationType::Simple,
        sqlx::SqlSafeStr::into_sql_str("CREATE TABLE orders (id bigserial PRIMARY KEY)"),
        false,
    )]);
    migrator.set_locking(true);
    migrator
}

#[tokio::test]
async fn our_migrations_and_the_applications_coexist_in_either_order() -> Result<()> {
    let pool = setup().await?;
    // Ours first (fresh_pool applied them), then the application's, then both again.
    app_migrator().run(&pool).await?;
    pg_idempotency::migrate(&pool).await?;
    app_migrator().run(&pool).await?;

    // The application's first, in a schema of its own, then ours, then both again.
    sqlx::raw_sql("CREATE SCHEMA app_first")
        .execute(&pool)
        .await?;
    let options = (*pool.connect_options())
        .clone()
        .options([("search_path", "app_first")]);
    let other = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?;
    app_migrator().run(&other).await?;
    pg_idempotency::migrate(&other).await?;
    app_migrator().run(&other).await?;
    pg_idempotency::migrate(&other).await?;

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'app_first' ORDER BY 1",
    )
    .fetch_all(&other)
    .await?;
    assert_eq!(
        tables,
        [
            "_pg_idempotency_migrations",
            "_sqlx_migrations",
            "idempotency_keys",
            "idempotency_requests",
            "orders"
        ]
    );
    let store = IdempotencyStore::new(other.clone());
    let request = IdempotentRequest::new("POST", "/x", b"");
    let Begin::Claimed(claim) = store.begin(&scope("s"), &new_key(), &request).await? else {
        bail!("claim")
    };
    claim.complete(&StoredResponse::new(200, "")).await?;
    Ok(())
}

/// Issue 12: a completion the server refuses (here a trigger) rolls back and returns the
/// connection to the pool instead of closing it.
#[tokio::test]
async fn a_refused_statement_costs_no_pooled_connection() -> Result<()> {
    let pool = setup().await?;
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_299() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.status = 299 THEN RAISE EXCEPTION 'refused' USING ERRCODE = '22021'; \
         END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_299 BEFORE INSERT ON idempotency_keys \
         FOR EACH ROW EXECUTE FUNCTION refuse_299()",
    )
    .execute(&pool)
    .await?;
    let single = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let pid = || sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&single);
    let before = pid().await?;
    let store = IdempotencyStore::new(single.clone());
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    for _ in 0..3 {
        let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
            bail!("the refused completion left the key free")
        };
        sqlx::query("INSERT INTO payments (account, amount) VALUES ('acct_1', 1)")
            .execute(&mut claim)
            .await?;
        let err = claim
            .complete(&StoredResponse::new(299, "refused"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Database(_)), "{err:?}");
    }
    assert_eq!(pid().await?, before, "the connection was closed");
    assert_eq!(payments(&pool).await?, 0);
    single.close().await;
    assert_no_idle_transactions(&pool).await
}

/// The claim's lookup goes through the primary key, whatever collation the arguments
/// arrive with (`convert_from(..)`, for one, is `COLLATE "C"`): a lookup that cannot use
/// the index reads every live row.
#[tokio::test]
async fn the_claim_looks_its_key_up_by_primary_key() -> Result<()> {
    let pool = setup().await?;
    sqlx::query(
        "INSERT INTO idempotency_keys
             (scope, key, fingerprint_version, fingerprint, status, headers, body, expires_at)
         SELECT 'acct_1', 'other-' || g, 1, sha256(g::text::bytea), 201, '[]', '',
                now() + interval '1 day'
         FROM generate_series(1, 5000) AS g",
    )
    .execute(&pool)
    .await?;
    sqlx::raw_sql("ANALYZE idempotency_keys")
        .execute(&pool)
        .await?;

    // A connection of its own, so that its pending table statistics are the claim's.
    let single = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let store = IdempotencyStore::new(single);
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(mut claim) = store.begin(&scope("acct_1"), &new_key(), &request).await?
    else {
        bail!("a fresh key should be claimed")
    };
    // Statistics of the session are flushed only outside a transaction, so inside the
    // claim's transaction they count the lookup.
    let (seq_read, idx_fetched): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(seq_tup_read, 0), coalesce(idx_tup_fetch, 0)
         FROM pg_stat_xact_user_tables WHERE relname = 'idempotency_keys'",
    )
    .fetch_one(&mut claim)
    .await?;
    claim.abort().await?;
    assert!(
        seq_read + idx_fetched <= 1,
        "the claim read {seq_read} rows sequentially and {idx_fetched} through an index"
    );
    Ok(())
}

#[tokio::test]
async fn a_key_stored_behind_the_claims_back_rolls_the_claim_back() -> Result<()> {
    // Two requests that did not share the advisory lock (e.g. on Citus with locks on
    // different nodes): the unique row still lets only one of them commit.
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(mut claim) = store.begin(&scope, &key, &request).await? else {
        bail!("claim")
    };
    sqlx::query("INSERT INTO payments (account, amount) VALUES ('acct_1', 1)")
        .execute(&mut claim)
        .await?;
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status, headers, body, expires_at)
         VALUES ($1, $2, 1, decode(repeat('00', 32), 'hex'), 201, '[]', 'winner', now() + interval '1 hour')",
    )
    .bind(scope.as_str())
    .bind(key.as_str())
    .execute(&pool)
    .await?;
    let err = claim
        .complete(&StoredResponse::new(201, "loser"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InFlight { .. }), "{err:?}");
    assert_eq!(
        payments(&pool).await?,
        0,
        "the loser's business write is rolled back"
    );
    let body: Vec<u8> = sqlx::query_scalar("SELECT body FROM idempotency_keys")
        .fetch_one(&pool)
        .await?;
    assert_eq!(body, b"winner");
    assert_no_idle_transactions(&pool).await
}

#[tokio::test]
async fn hand_built_statements_hold_under_unusual_string_settings() -> Result<()> {
    let pool = setup().await?;
    let options = (*pool.connect_options()).clone().options([
        ("standard_conforming_strings", "off"),
        ("backslash_quote", "off"),
        ("escape_string_warning", "off"),
    ]);
    let odd = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?;
    let store = IdempotencyStore::new(odd);
    let scope = scope("o'brien \\ '' \\' $$ é 💳");
    let key = IdempotencyKey::parse("k'\\x00", pg_idempotency::KeyPolicy::Opaque)?;
    let first = pay(&store, &scope, &key, br#"{"amount":100}"#).await?;
    assert!(!first.is_replay());
    let Outcome::Replayed(replay) = pay(&store, &scope, &key, br#"{"amount":100}"#).await? else {
        bail!("should replay")
    };
    assert_eq!(&replay.response, first.response());
    let stored: (String, String) = sqlx::query_as("SELECT scope, key FROM idempotency_keys")
        .fetch_one(&pool)
        .await?;
    assert_eq!(stored, (scope.to_string(), key.to_string()));
    Ok(())
}

/// The hot path's prepared statements are made on a connection's first claim, and made
/// again, only those missing, after something deallocated them.
#[tokio::test]
async fn a_connection_that_lost_its_prepared_statements_prepares_them_again() -> Result<()> {
    let pool = setup().await?;
    // One connection, so that every statement below runs on the one the store uses.
    let single = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let store = IdempotencyStore::new(single.clone());
    let prepared = async || -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name::text FROM pg_prepared_statements
             WHERE starts_with(name, 'pgidem_') ORDER BY name",
        )
        .fetch_all(&single)
        .await?)
    };
    let both = vec!["pgidem_lookup_v3".to_owned()];
    assert!(prepared().await?.is_empty());

    let mut keys = Vec::new();
    for lost in [
        "",
        "DEALLOCATE pgidem_lookup_v3",
        "DEALLOCATE pgidem_lookup_v3",
    ] {
        if !lost.is_empty() {
            sqlx::raw_sql(AssertSqlSafe(lost)).execute(&single).await?;
        }
        let key = new_key();
        let Outcome::Executed { stored: true, .. } =
            pay(&store, &scope("acct_1"), &key, b"{}").await?
        else {
            bail!("a fresh key should execute and be stored after {lost:?}")
        };
        assert_eq!(prepared().await?, both, "after {lost:?}");
        keys.push(key);
    }
    for key in &keys {
        let Outcome::Replayed(_) = pay(&store, &scope("acct_1"), key, b"{}").await? else {
            bail!("a stored key should replay")
        };
    }
    assert_eq!(payments(&pool).await?, 3);
    Ok(())
}

/// `prepare_connection` in `after_connect` prepares the statements before the first claim,
/// and lets a connection open before the migrations have run.
#[tokio::test]
async fn after_connect_prepares_the_statements_unless_the_table_is_missing() -> Result<()> {
    let pool = setup().await?;
    let options = (*pool.connect_options()).clone();
    let prepared = async |pool: &PgPool| -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT name::text FROM pg_prepared_statements
             WHERE starts_with(name, 'pgidem_') ORDER BY name",
        )
        .fetch_all(pool)
        .await?)
    };
    let with_hook = |options: sqlx::postgres::PgConnectOptions| {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _meta| Box::pin(pg_idempotency::prepare_connection(conn)))
            .connect_with(options)
    };

    let single = with_hook(options.clone()).await?;
    assert_eq!(prepared(&single).await?, ["pgidem_lookup_v3"]);
    let store = IdempotencyStore::new(single.clone());
    let Outcome::Executed { stored: true, .. } =
        pay(&store, &scope("acct_1"), &new_key(), b"{}").await?
    else {
        bail!("a fresh key should execute and be stored")
    };

    // A search path without the table: as before the migrations ran.
    let unmigrated = with_hook(options.options([("search_path", "pgidem_nothing_here")])).await?;
    assert!(prepared(&unmigrated).await?.is_empty());
    Ok(())
}

/// Issue 11: the request that produced a response comes back with its replays and
/// conflicts; and a row a 0.1.0 node stores during a rolling deploy (its
/// `pgidem_insert_v1`, on the migrated table, without provenance) replays on a new node.
#[tokio::test]
async fn provenance_comes_back_and_rows_of_0_1_0_nodes_still_replay() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let (acct, key) = (scope("acct_p"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(mut claim) = store.begin(&acct, &key, &request).await? else {
        bail!("a new key replayed");
    };
    let first = pg_idempotency::Provenance::new("req_FIRST").with_traceparent("00-ab-cd-01");
    claim.set_provenance(first.clone());
    claim.complete(&StoredResponse::new(201, "ok")).await?;
    let Begin::Replay(replay) = store.begin(&acct, &key, &request).await? else {
        bail!("a stored key was claimed again");
    };
    assert_eq!(replay.first_request, first);
    let Err(Error::Conflict { first_request, .. }) = store
        .begin(
            &acct,
            &key,
            &IdempotentRequest::new("POST", "/v1/payments", b"{\"a\":1}"),
        )
        .await
    else {
        bail!("another body did not conflict");
    };
    assert_eq!(first_request, first);

    // What a 0.1.0 node runs, word for word.
    let old_key = new_key();
    let mut conn = pool.acquire().await?;
    sqlx::raw_sql(
        "PREPARE pgidem_insert_v1(text, text, smallint, bytea, smallint, jsonb, bytea, bigint) AS \
         INSERT INTO idempotency_keys \
         (scope, key, fingerprint_version, fingerprint, status, headers, body, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now() + $8 * interval '1 millisecond')",
    )
    .execute(&mut *conn)
    .await?;
    let fingerprint = request.fingerprint();
    let hash: String = fingerprint
        .hash()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "EXECUTE pgidem_insert_v1('{}', '{}', {}, '\\x{hash}', 201, '[]', 'old', 86400000)",
        acct.as_str(),
        old_key.as_str(),
        fingerprint.version(),
    )))
    .execute(&mut *conn)
    .await?;
    let Begin::Replay(old) = store.begin(&acct, &old_key, &request).await? else {
        bail!("the 0.1.0 row was not replayed");
    };
    assert_eq!(old.response.body, &b"old"[..]);
    assert_eq!(old.first_request, pg_idempotency::Provenance::default());
    Ok(())
}

/// A pool of `size` connections to `pool`'s database whose `acquire` gives up after 2 s.
async fn small_pool(pool: &PgPool, size: u32) -> Result<PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with((*pool.connect_options()).clone())
        .await?)
}

/// A store on `pool` whose duplicates wait up to 30 s, configured by `config` otherwise.
fn patient(pool: PgPool, config: Config) -> IdempotencyStore {
    IdempotencyStore::with_config(pool, config.with_in_flight_wait(Duration::from_secs(30)))
}

/// Holds `key` in a claim of `holder`, starts `n` duplicates on `duplicates` (waiting up
/// to 30 s), checks that `bystander` can still get a connection ten times over while they
/// wait, then completes the claim: every duplicate replays its response, and the business
/// write ran once. Closes `bystander`; no connection stays idle in a transaction.
async fn duplicates_leave_the_pool_alone(
    pool: &PgPool,
    holder: &IdempotencyStore,
    duplicates: &IdempotencyStore,
    bystander: PgPool,
    n: usize,
) -> Result<()> {
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(mut claim) = holder.begin(&scope, &key, &request).await? else {
        bail!("claim")
    };
    sqlx::query("INSERT INTO payments (account, amount) VALUES ('acct_1', 1)")
        .execute(&mut claim)
        .await?;
    let waiting: Vec<_> = (0..n)
        .map(|_| {
            let (store, scope, key) = (duplicates.clone(), scope.clone(), key.clone());
            tokio::spawn(async move {
                let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
                store.begin(&scope, &key, &request).await
            })
        })
        .collect();
    for _ in 0..10 {
        tokio::task::yield_now().await;
        sqlx::query("SELECT 1")
            .execute(&bystander)
            .await
            .context("the waiting duplicates starved the bystander")?;
    }
    claim
        .complete(&StoredResponse::new(201, "paid once"))
        .await?;
    for duplicate in waiting {
        match duplicate.await? {
            Ok(Begin::Replay(replay)) => assert_eq!(replay.response.body, &b"paid once"[..]),
            other => bail!("expected a replay, got {other:?}"),
        }
    }
    assert_eq!(payments(pool).await?, 1);
    bystander.close().await;
    assert_no_idle_transactions(pool).await
}

/// Issue 12: duplicates of one key in one process wait for the claim without holding a
/// pooled connection, and are woken when it ends.
#[tokio::test]
async fn duplicates_in_one_process_hold_no_connection_while_they_wait() -> Result<()> {
    let pool = setup().await?;
    let small = small_pool(&pool, 2).await?;
    let store = patient(small.clone(), Config::default());
    duplicates_leave_the_pool_alone(&pool, &store, &store, small, 50).await
}

/// Issue 12: duplicates in another process (another pool) poll without holding a
/// connection between looks.
#[tokio::test]
async fn duplicates_in_another_process_hold_no_connection_while_they_wait() -> Result<()> {
    let pool = setup().await?;
    let holder = IdempotencyStore::new(pool.clone());
    let other = small_pool(&pool, 1).await?;
    let duplicates = patient(other.clone(), Config::default());
    duplicates_leave_the_pool_alone(&pool, &holder, &duplicates, other, 20).await
}

/// Issue 24: duplicates in another process look at the key once per poll step between
/// them, not once each: one of them looks for the others and hands them the row.
#[test]
fn duplicates_in_another_process_look_once_per_poll_step() -> Result<()> {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    const DUPLICATES: usize = 40;
    let held_for = with_recorder(&recorder, async {
        let pool = setup().await?;
        let holder = IdempotencyStore::new(pool.clone());
        let duplicates = patient(small_pool(&pool, 4).await?, Config::default());
        let (scope, key) = (scope("acct_1"), new_key());
        let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
        let Begin::Claimed(claim) = holder.begin(&scope, &key, &request).await? else {
            bail!("claim")
        };
        let started = std::time::Instant::now();
        let mut waiting = tokio::task::JoinSet::new();
        for _ in 0..DUPLICATES {
            let (store, scope, key) = (duplicates.clone(), scope.clone(), key.clone());
            waiting.spawn(async move {
                let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
                store.begin(&scope, &key, &request).await
            });
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        claim.complete(&StoredResponse::new(201, "paid")).await?;
        while let Some(waited) = waiting.join_next().await {
            match waited? {
                Ok(Begin::Replay(replay)) => assert_eq!(replay.response.body, &b"paid"[..]),
                other => bail!("expected a replay, got {other:?}"),
            }
        }
        Ok(started.elapsed())
    })?;
    let polls = counted(&snapshotter, pg_idempotency::metrics::POLLS);
    // The looks one duplicate makes in that time, its pause doubling from 10 ms to 200 ms.
    let (mut steps, mut slept, mut pause) = (0, Duration::ZERO, Duration::from_millis(10));
    while slept <= held_for {
        steps += 1;
        slept += pause;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    assert!(polls >= 1, "the duplicates never looked again");
    assert!(
        polls <= steps,
        "{polls} looks by {DUPLICATES} duplicates in {held_for:?}: more than one per poll step ({steps})"
    );
    Ok(())
}

/// The counter `name` as `snapshotter` sees it (0 if it was never counted).
fn counted(snapshotter: &metrics_util::debugging::Snapshotter, name: &str) -> u64 {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, ..)| key.key().name() == name)
        .map_or(0, |(.., value)| match value {
            metrics_util::debugging::DebugValue::Counter(n) => n,
            _ => 0,
        })
}

/// Issue 24: a request that ended its transaction (committed, or rolled back after its
/// claim was dropped) passes its connection with its place to the next request waiting
/// for one, which claims on it; with the pool's checks asked for, the connection goes
/// back to the pool instead. Either way every request is served and no transaction is
/// left open.
#[test]
fn a_connection_passes_from_a_finished_claim_to_the_request_waiting_for_a_place() -> Result<()> {
    for (checks, passes) in [(false, 2), (true, 0)] {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        with_recorder(&recorder, async {
            let pool = setup().await?;
            let store = IdempotencyStore::with_config(
                small_pool(&pool, 1).await?,
                Config::default().with_pool_checks(checks),
            );
            let scope = scope("acct_1");
            let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
            let Begin::Claimed(first) = store.begin(&scope, &new_key(), &request).await? else {
                bail!("claim")
            };
            // Two requests wait for the pool's only place: the second drops its claim
            // (rolled back), the third completes.
            let (dropped, completed) = (new_key(), new_key());
            let mut waiting = tokio::task::JoinSet::new();
            for (key, complete) in [(dropped.clone(), false), (completed.clone(), true)] {
                let (store, scope) = (store.clone(), scope.clone());
                waiting.spawn(async move {
                    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
                    let Begin::Claimed(claim) = store.begin(&scope, &key, &request).await? else {
                        bail!("claim")
                    };
                    if complete {
                        claim.complete(&StoredResponse::new(201, "paid")).await?;
                    }
                    Ok(())
                });
                // On this thread's runtime the request runs until it waits for the place.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            first.complete(&StoredResponse::new(201, "paid")).await?;
            while let Some(done) = waiting.join_next().await {
                done??;
            }
            let Begin::Claimed(again) = store.begin(&scope, &dropped, &request).await? else {
                bail!("the dropped claim's key is free again")
            };
            again.abort().await?;
            let Begin::Replay(replay) = store.begin(&scope, &completed, &request).await? else {
                bail!("the completed request replays")
            };
            assert_eq!(replay.response.body, &b"paid"[..]);
            assert_no_idle_transactions(&pool).await
        })?;
        assert_eq!(
            counted(&snapshotter, pg_idempotency::metrics::CONNECTIONS_PASSED),
            passes,
            "connections passed with the pool's checks {checks}"
        );
    }
    Ok(())
}

/// Issue 24: a connection passes from place to place for a second at most, then goes
/// back to the pool (where sqlx checks it, and closes it past the pool's `max_lifetime`),
/// even while requests keep waiting for places. Two requests take turns on a pool of one
/// connection for 3.5 s, each waiting for the place while the other holds it: the
/// connection goes back to the pool about once a second, not only when they stop.
#[tokio::test]
async fn a_connection_passes_for_a_second_at_most_then_goes_back_to_the_pool() -> Result<()> {
    let pool = setup().await?;
    let returned = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&returned);
    let single = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_release(move |_, _| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(true) })
        })
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let store = IdempotencyStore::with_config(single, Config::default());
    let until = std::time::Instant::now() + Duration::from_millis(3500);
    let mut turns = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let store = store.clone();
        turns.spawn(async move {
            let mut claims = 0;
            while std::time::Instant::now() < until {
                let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
                let Begin::Claimed(claim) =
                    store.begin(&scope("acct_1"), &new_key(), &request).await?
                else {
                    bail!("claim")
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
                claim.complete(&StoredResponse::new(201, "paid")).await?;
                claims += 1;
            }
            Ok::<_, anyhow::Error>(claims)
        });
    }
    let mut claims = 0;
    while let Some(done) = turns.join_next().await {
        claims += done??;
    }
    let returned = returned.load(std::sync::atomic::Ordering::SeqCst);
    // Once a second while they took turns, and once when the last one stopped; passed
    // on every other time.
    assert!(returned >= 3, "returned to the pool {returned} times");
    assert!(
        returned < claims / 2,
        "{returned} of {claims} claims gave it back"
    );
    Ok(())
}

/// Issue 12: beyond `in_flight_waiters` duplicates of one key, the in-flight answer comes
/// at once.
#[tokio::test]
async fn waiting_duplicates_are_bounded_per_key() -> Result<()> {
    let pool = setup().await?;
    let store = patient(pool.clone(), Config::default().with_in_flight_waiters(2));
    let (scope, key) = (scope("acct_1"), new_key());
    let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
    let Begin::Claimed(claim) = store.begin(&scope, &key, &request).await? else {
        bail!("claim")
    };
    let mut duplicates = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let (store, scope, key) = (store.clone(), scope.clone(), key.clone());
        duplicates.spawn(async move {
            let request = IdempotentRequest::new("POST", "/v1/payments", b"{}");
            store.begin(&scope, &key, &request).await
        });
    }
    // Three answer while the claim is still open: they can only be refused.
    for _ in 0..3 {
        let refused = duplicates.join_next().await.context("a duplicate")??;
        assert!(
            matches!(refused, Err(Error::InFlight { .. })),
            "{refused:?}"
        );
    }
    claim.complete(&StoredResponse::new(201, "paid")).await?;
    while let Some(waited) = duplicates.join_next().await {
        assert!(matches!(waited?, Ok(Begin::Replay(_))));
    }
    assert_no_idle_transactions(&pool).await
}

/// A claim takes an idle connection without the pool's ping; when the server closed it
/// while it sat in the pool, the claim runs on another and the request does not notice.
#[tokio::test]
async fn connections_closed_while_idle_cost_the_requests_nothing() -> Result<()> {
    let pool = setup().await?;
    for pool_checks in [false, true] {
        let small = small_pool(&pool, 3).await?;
        let store = IdempotencyStore::with_config(
            small.clone(),
            Config::default().with_pool_checks(pool_checks),
        );
        // Three connections, idle in the pool, then closed by the server.
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(small.acquire().await?);
        }
        let mut pids = Vec::new();
        for conn in &mut conns {
            pids.push(
                sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                    .fetch_one(&mut **conn)
                    .await?,
            );
        }
        drop(conns);
        sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid")
            .bind(&pids)
            .execute(&pool)
            .await?;
        for _ in 0..100 {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])",
            )
            .bind(&pids)
            .fetch_one(&pool)
            .await?;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let before = payments(&pool).await?;
        for _ in 0..4 {
            let outcome = pay(&store, &scope("acct"), &new_key(), b"{}").await?;
            assert!(!outcome.is_replay(), "pool checks {pool_checks}");
        }
        assert_eq!(
            payments(&pool).await? - before,
            4,
            "pool checks {pool_checks}"
        );
        small.close().await;
    }
    assert_no_idle_transactions(&pool).await
}

/// A large response is compressed with lz4 where the server has it (migration
/// `20261204000005_lz4_bodies.sql`), and replays byte for byte.
#[tokio::test]
async fn large_bodies_are_stored_with_lz4_and_replay_byte_for_byte() -> Result<()> {
    let pool = setup().await?;
    let store = IdempotencyStore::new(pool.clone());
    let (scope, key) = (scope("acct_1"), new_key());
    // Compressible like a real API response, with every byte value in it.
    let mut body = Vec::new();
    for line in 0..3000 {
        body.extend(format!(r#"{{"line":{line},"sku":"a{}","qty":1}},"#, line % 97).bytes());
    }
    body.extend(0..=255u8);
    let request = IdempotentRequest::new("POST", "/v1/orders", b"{}");
    let stored =
        StoredResponse::new(201, body.clone()).with_header("content-type", "application/json");
    let first = store
        .run(&scope, &key, &request, async |_claim| {
            Ok::<_, Error>(stored.clone())
        })
        .await?;
    assert!(!first.is_replay());
    let Outcome::Replayed(replay) = store
        .run(&scope, &key, &request, async |_claim| {
            Err::<StoredResponse, _>(Error::MalformedRow("ran again".into()))
        })
        .await?
    else {
        bail!("expected a replay");
    };
    assert_eq!(replay.response.body, body);
    let (method, lz4_available): (Option<String>, bool) = sqlx::query_as(
        "SELECT (SELECT pg_column_compression(body) FROM idempotency_keys WHERE key = $1), \
                EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression' \
                        AND 'lz4' = ANY (enumvals))",
    )
    .bind(key.as_str())
    .fetch_one(&pool)
    .await?;
    let expected = if lz4_available { "lz4" } else { "pglz" };
    assert_eq!(method.as_deref(), Some(expected));
    Ok(())
}

/// The server is PostgreSQL 14 or later, the oldest major the crate supports
/// (docs/OPERATIONS.md, "Supported PostgreSQL versions"). Says on stderr which server the
/// tests ran on, and whether it has lz4: `.ci/postgres-majors.sh` checks that line to be sure
/// each run used the major it was meant for.
#[tokio::test]
async fn the_server_is_a_supported_major() -> Result<()> {
    let pool = pg_idempotency::testing::fresh_pool().await?;
    let (version, number, lz4): (String, i32, bool) = sqlx::query_as(
        "SELECT version(), current_setting('server_version_num')::int, \
                EXISTS (SELECT FROM pg_settings WHERE name = 'default_toast_compression' \
                        AND 'lz4' = ANY (enumvals))",
    )
    .fetch_one(&pool)
    .await?;
    // Written to stderr itself: `eprintln!` in a test is shown only if the test fails.
    let lz4 = match lz4 {
        true => "built in",
        false => "not built in (bodies use pglz)",
    };
    let line = format!("pg-idempotency: the server is {version}; lz4 {lz4}\n");
    std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes())?;
    anyhow::ensure!(
        number >= 140_000,
        "server_version_num {number}: the oldest supported major is 14"
    );
    Ok(())
}
