//! Operations: the command-line tool, the SQL sweep function, metrics.

use std::process::Output;

use anyhow::{Result, bail};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use pg_idempotency::{
    Begin, Error, IdempotencyKey, IdempotencyStore, Provenance, Request, Scope, StoredResponse,
};

mod support;
use support::{expire, expire_all};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn store_one(
    store: &IdempotencyStore,
    scope: &Scope,
    key: &IdempotencyKey,
    body: &[u8],
) -> Result<()> {
    let Begin::Claimed(mut claim) = store
        .begin(scope, key, &Request::new("POST", "/x", body))
        .await?
    else {
        bail!("expected a claim")
    };
    claim.set_provenance(Provenance::new("req_OPS").with_traceparent(TRACEPARENT));
    claim
        .complete(&StoredResponse::new(201, "secret-response-body"))
        .await?;
    Ok(())
}

/// Stores `n` responses under fresh keys.
async fn store_many(store: &IdempotencyStore, scope: &Scope, n: usize) -> Result<()> {
    for _ in 0..n {
        store_one(store, scope, &new_key(), b"{}").await?;
    }
    Ok(())
}

fn new_key() -> IdempotencyKey {
    IdempotencyKey::from_uuid(uuid::Uuid::new_v4()).expect("v4")
}

async fn cli(database: &pg_idempotency::testing::TestDatabase, args: &[&str]) -> Result<Output> {
    Ok(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pg-idempotency"))
            .args(args)
            .env("DATABASE_URL", database.url())
            .output()
            .await?,
    )
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_command_line_tool_migrates_inspects_forgets_and_sweeps() -> Result<()> {
    let database = pg_idempotency::testing::TestDatabase::create().await?;
    let store = IdempotencyStore::new(database.pool().clone());
    let scope = Scope::new("acct 7")?;
    let key = new_key();
    let (scope_arg, key_arg) = (scope.as_str(), key.as_str());

    assert_eq!(cli(&database, &["migrate"]).await?.status.code(), Some(0));
    store_one(&store, &scope, &key, b"{}").await?;

    let stats = cli(&database, &["stats", "--json"]).await?;
    assert_eq!(stats.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_str(&stdout(&stats))?;
    assert_eq!(
        (json["rows"].as_i64(), json["expired_rows"].as_i64()),
        (Some(1), Some(0))
    );

    let upper = key.as_str().to_uppercase();
    let inspect = cli(
        &database,
        &["inspect", "--scope", scope_arg, "--key", &upper],
    )
    .await?;
    assert_eq!(inspect.status.code(), Some(0), "{inspect:?}");
    let text = stdout(&inspect);
    assert!(
        text.contains("status:       201") && text.contains("body size:    20 bytes"),
        "{text}"
    );
    assert!(
        text.contains("request id:   req_OPS")
            && text.contains(&format!("traceparent:  {TRACEPARENT}")),
        "{text}"
    );
    assert!(
        !text.contains("secret-response-body"),
        "bodies are only shown when asked: {text}"
    );
    let shown = cli(
        &database,
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
    assert!(stdout(&shown).contains("secret-response-body"));

    let refused = cli(
        &database,
        &["forget", "--scope", scope_arg, "--key", key_arg],
    )
    .await?;
    assert_eq!(refused.status.code(), Some(2), "forget needs --yes");
    let forgot = cli(
        &database,
        &["forget", "--scope", scope_arg, "--key", key_arg, "--yes"],
    )
    .await?;
    assert_eq!(forgot.status.code(), Some(0));
    let gone = cli(
        &database,
        &["inspect", "--scope", scope_arg, "--key", key_arg],
    )
    .await?;
    assert_eq!(gone.status.code(), Some(3), "not found");
    assert!(matches!(
        store
            .begin(&scope, &key, &Request::new("POST", "/x", b"{}"))
            .await?,
        Begin::Claimed(_)
    ));

    let bad = cli(
        &database,
        &["inspect", "--scope", "a\u{1}b", "--key", key_arg],
    )
    .await?;
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a scope with control characters is a usage error"
    );

    store_many(&store, &scope, 5).await?;
    expire_all(database.pool()).await?;
    let swept = cli(&database, &["sweep", "--batch", "2", "--pause", "1ms"]).await?;
    assert_eq!(swept.status.code(), Some(0));
    assert_eq!(stdout(&swept).trim(), "deleted 5 expired keys");

    let unreachable = tokio::process::Command::new(env!("CARGO_BIN_EXE_pg-idempotency"))
        .args([
            "--database-url",
            "postgres://postgres@127.0.0.1:1/none",
            "stats",
        ])
        .output()
        .await?;
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("could not connect"));
    database.close().await?;
    Ok(())
}

/// Issue 12: what the table holds cannot rewrite an operator's terminal, and a key stored
/// under the opaque policy is found exactly as it was sent, upper-case UUID or not.
#[tokio::test]
async fn the_command_line_tool_escapes_text_and_keeps_opaque_keys_as_typed() -> Result<()> {
    let database = pg_idempotency::testing::TestDatabase::create().await?;
    let store = IdempotencyStore::with_config(
        database.pool().clone(),
        pg_idempotency::Config::default().with_key_policy(pg_idempotency::KeyPolicy::Opaque),
    );
    let scope = Scope::new("acct \u{202e}7cba")?;
    let upper = uuid::Uuid::new_v4().to_string().to_uppercase();
    let key = store.parse_key(&upper)?;
    assert_eq!(key.as_str(), upper, "the opaque policy keeps the case");
    let Begin::Claimed(claim) = store
        .begin(&scope, &key, &Request::new("POST", "/x", b"{}"))
        .await?
    else {
        bail!("expected a claim")
    };
    claim
        .complete(&StoredResponse::new(201, "paid\u{1b}[2J\n\u{2066}ok"))
        .await?;

    let inspect = cli(
        &database,
        &[
            "inspect",
            "--scope",
            scope.as_str(),
            "--key",
            &upper,
            "--show-body",
        ],
    )
    .await?;
    assert_eq!(inspect.status.code(), Some(0), "{inspect:?}");
    let text = stdout(&inspect);
    assert!(text.contains("scope:        acct \\u{202e}7cba"), "{text}");
    assert!(text.contains(&format!("key:          {upper}")), "{text}");
    assert!(text.contains("paid\\u{1b}[2J\n\\u{2066}ok"), "{text}");
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{202e}') && !text.contains('\u{2066}'),
        "{text:?}"
    );

    let forgot = cli(
        &database,
        &[
            "forget",
            "--scope",
            scope.as_str(),
            "--key",
            &upper,
            "--yes",
        ],
    )
    .await?;
    assert_eq!(forgot.status.code(), Some(0), "{forgot:?}");
    assert!(
        pg_idempotency::admin::inspect(database.pool(), &scope, &key, false)
            .await?
            .is_none()
    );
    database.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_sql_sweep_function_deletes_one_bounded_batch() -> Result<()> {
    let pool = pg_idempotency::testing::fresh_pool().await?;
    let store = IdempotencyStore::new(pool.clone());
    let scope = Scope::new("s")?;
    store_many(&store, &scope, 6).await?;
    expire(&pool, 5).await?;
    // What pg_cron would run: SELECT cron.schedule('* * * * *', 'SELECT idempotency_sweep(1000)')
    let first: i64 = sqlx::query_scalar("SELECT idempotency_sweep(3)")
        .fetch_one(&pool)
        .await?;
    let second: i64 = sqlx::query_scalar("SELECT idempotency_sweep(3)")
        .fetch_one(&pool)
        .await?;
    let third: i64 = sqlx::query_scalar("SELECT idempotency_sweep(3)")
        .fetch_one(&pool)
        .await?;
    assert_eq!((first, second, third), (3, 2, 0));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&pool)
        .await?;
    assert_eq!(left, 1, "the live row stays");
    Ok(())
}

/// Runs `body` on a current-thread runtime with `recorder` installed for this thread.
fn with_recorder<T>(recorder: &DebuggingRecorder, body: impl std::future::Future<Output = T>) -> T {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(body)
    })
}

#[test]
fn counters_and_histograms_move() -> Result<()> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    with_recorder(&recorder, async {
        let pool = pg_idempotency::testing::fresh_pool().await?;
        let store = IdempotencyStore::new(pool.clone());
        let (scope, key) = (Scope::new("m")?, new_key());
        store_one(&store, &scope, &key, b"{}").await?; // claim
        let Begin::Replay(_) = store
            .begin(&scope, &key, &Request::new("POST", "/x", b"{}"))
            .await?
        else {
            bail!("replay")
        };
        let Err(Error::Conflict { .. }) = store
            .begin(&scope, &key, &Request::new("POST", "/x", b"[]"))
            .await
        else {
            bail!("conflict")
        };
        let other = new_key();
        let Begin::Claimed(claim) = store
            .begin(&scope, &other, &Request::new("POST", "/x", b""))
            .await?
        else {
            bail!("claim")
        };
        let quick = IdempotencyStore::with_config(
            pool.clone(),
            pg_idempotency::Config::default().with_in_flight_wait(std::time::Duration::ZERO),
        );
        let Err(Error::InFlight { .. }) = quick
            .begin(&scope, &other, &Request::new("POST", "/x", b""))
            .await
        else {
            bail!("in flight")
        };
        claim.complete(&StoredResponse::new(503, "")).await?; // policy rollback
        expire_all(&pool).await?;
        pg_idempotency::sweep(&pool, &pg_idempotency::SweepOptions::default()).await?;
        Ok(())
    })?;

    let snapshot = snapshotter.snapshot().into_hashmap();
    let counter = |name: &str| {
        snapshot
            .iter()
            .find(|(key, _)| key.key().name() == name)
            .map(|(_, (_, _, value))| match value {
                DebugValue::Counter(n) => *n,
                DebugValue::Histogram(values) => values.len() as u64,
                DebugValue::Gauge(_) => 0,
            })
            .unwrap_or(0)
    };
    use pg_idempotency::metrics::*;
    assert_eq!(counter(CLAIMS), 2);
    assert_eq!(counter(REPLAYS), 1);
    assert_eq!(counter(CONFLICTS), 1);
    assert_eq!(counter(IN_FLIGHT), 1);
    assert_eq!(counter(POLICY_ROLLBACKS), 1);
    assert_eq!(counter(SWEPT_ROWS), 1);
    assert_eq!(counter(CLAIM_SECONDS), 5, "one latency per begin");
    assert_eq!(counter(COMPLETE_SECONDS), 2, "one latency per complete");
    assert_eq!(counter(RESPONSE_BYTES), 1, "one size per stored response");
    Ok(())
}
