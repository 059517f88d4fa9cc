//! Operations: the command-line tool, the SQL sweep function, metrics.

use std::process::Output;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

use anyhow::{Result, bail};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use pg_idempotency::{
    Begin, Error, IdempotencyKey, IdempotencyStore, IdempotentRequest, Provenance, Scope,
    StoredResponse,
};

mod support;
use support::{check_sweep_contract, expire, expire_all, with_recorder};

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn store_one(
    store: &IdempotencyStore,
    scope: &Scope,
    key: &IdempotencyKey,
    body: &[u8],
) -> Result<()> {
    let Begin::Claimed(mut claim) = store
        .begin(scope, key, &IdempotentRequest::new("POST", "/x", body))
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
            .begin(&scope, &key, &IdempotentRequest::new("POST", "/x", b"{}"))
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
        .begin(&scope, &key, &IdempotentRequest::new("POST", "/x", b"{}"))
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

/// An empty database named `pgidem_<what>_<uuid>` on the test server, created with
/// `create_with` after `CREATE DATABASE <name>`; its connect options.
async fn empty_database(what: &str, create_with: &str) -> Result<(String, PgConnectOptions)> {
    let server = pg_idempotency::testing::TestServer::shared().await?;
    let name = format!("pgidem_{what}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(server.url()).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE DATABASE {name} {create_with}"
    )))
    .execute(&mut admin)
    .await?;
    admin.close().await?;
    let options = server.url().parse::<PgConnectOptions>()?.database(&name);
    Ok((name, options))
}

/// Drops a database of [`empty_database`], and `roles`.
async fn drop_database(name: &str, roles: &[&str]) -> Result<()> {
    let server = pg_idempotency::testing::TestServer::shared().await?;
    let mut admin = PgConnection::connect(server.url()).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    for role in roles {
        sqlx::raw_sql(AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
            .execute(&mut admin)
            .await?;
    }
    admin.close().await?;
    Ok(())
}

/// Issue 12: a `SQL_ASCII` database is refused once, clearly, before anything is created.
#[tokio::test]
async fn a_database_that_is_not_utf8_is_refused_at_migrate() -> Result<()> {
    let (name, options) = empty_database(
        "ascii",
        "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    .await?;
    let mut conn = PgConnection::connect_with(&options).await?;
    let refused = pg_idempotency::migrate(&mut conn).await;
    let created: bool = sqlx::query_scalar("SELECT to_regclass('idempotency_keys') IS NOT NULL")
        .fetch_one(&mut conn)
        .await?;
    // Past the check (as an older version migrated it), each non-ASCII scope fails in the
    // claim's statement, and the refused statement costs no pooled connection.
    pg_idempotency::MIGRATOR.run(&mut conn).await?;
    conn.close().await?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    let pid = || sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&pool);
    let before = pid().await?;
    let store = IdempotencyStore::new(pool.clone());
    let request = IdempotentRequest::new("POST", "/x", b"{}");
    for _ in 0..3 {
        let failed = store.begin(&Scope::new("é")?, &new_key(), &request).await;
        assert!(matches!(failed, Err(Error::Database(_))), "{failed:?}");
    }
    let after = pid().await?;
    pool.close().await;
    drop_database(&name, &[]).await?;
    match refused {
        Err(Error::UnsupportedEncoding { encoding }) => assert_eq!(encoding, "SQL_ASCII"),
        other => bail!("expected UnsupportedEncoding, got {other:?}"),
    }
    assert!(!created, "nothing was created");
    assert_eq!(
        before, after,
        "the refused statements closed the pooled connection"
    );
    Ok(())
}

/// Issue 12: with the schema up to date, `migrate` needs no DDL rights; the functions pin
/// their search_path; EXECUTE is granted to the roles that use the table, not to PUBLIC.
#[tokio::test]
async fn least_privilege_migrate_and_functions() -> Result<()> {
    let (name, options) = empty_database("privilege", "").await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let (app, reader) = (
        format!("pgidem_app_{suffix}"),
        format!("pgidem_ro_{suffix}"),
    );
    let owner = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await?;
    // Every migration before the least-privilege one, then the application role gets its
    // table grants (as a deployment with a separate role has them), then the rest.
    let mut before = Migrator::with_migrations(
        pg_idempotency::MIGRATOR
            .iter()
            .filter(|migration| migration.version < 20261204000004)
            .cloned()
            .collect(),
    );
    before.dangerous_set_table_name("_pg_idempotency_migrations");
    before.run(&owner).await?;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC; \
         CREATE ROLE {app} LOGIN; CREATE ROLE {reader} LOGIN; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys, idempotency_requests TO {app}; \
         GRANT SELECT ON idempotency_keys, idempotency_requests, _pg_idempotency_migrations \
           TO {reader}; \
         GRANT SELECT ON _pg_idempotency_migrations TO {app}"
    )))
    .execute(&owner)
    .await?;
    pg_idempotency::migrate(&owner).await?;

    let outcome = async {
        // The application role migrates at start-up: nothing to do, nothing refused.
        let as_app = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone().username(&app))
            .await?;
        pg_idempotency::migrate(&as_app).await?;
        // And waits for a key held by another request (idempotency_wait_lock).
        let store = IdempotencyStore::with_config(
            as_app.clone(),
            pg_idempotency::Config::default()
                .with_in_flight_wait(std::time::Duration::from_millis(100)),
        );
        let (scope, key) = (Scope::new("acct")?, new_key());
        let request = IdempotentRequest::new("POST", "/x", b"{}");
        let Begin::Claimed(claim) = store.begin(&scope, &key, &request).await? else {
            bail!("expected a claim")
        };
        let waited = store.begin(&scope, &key, &request).await;
        assert!(matches!(waited, Err(Error::InFlight { .. })), "{waited:?}");
        claim.abort().await?;
        // And sweeps (idempotency_sweep and the helpers it calls with the caller's rights).
        pg_idempotency::sweep(&as_app, &pg_idempotency::SweepOptions::default()).await?;
        as_app.close().await;
        // A read-only role reads the statistics (idempotency_storage and its helpers).
        let as_reader = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().username(&reader))
            .await?;
        pg_idempotency::admin::stats(&as_reader).await?;
        as_reader.close().await;

        let rows: Vec<(String, Vec<String>, bool, bool, bool)> = sqlx::query_as(
            "SELECT proname::text, coalesce(proconfig, '{}'), \
                    has_function_privilege($1, p.oid, 'EXECUTE'), \
                    has_function_privilege($2, p.oid, 'EXECUTE'), \
                    coalesce(aclcontains(proacl, makeaclitem(0, proowner, 'EXECUTE', false)), true) \
             FROM pg_proc p WHERE proname LIKE 'idempotency\\_%' ORDER BY proname",
        )
        .bind(&app)
        .bind(&reader)
        .fetch_all(&owner)
        .await?;
        // Who may run what: the application role what storing and sweeping need, a
        // read-only role what the statistics need, nobody but the owner distributing.
        let expected = [
            ("idempotency_colocate", false, false),
            ("idempotency_distribute", false, false),
            ("idempotency_on_shards", true, true),
            ("idempotency_shard_count", true, true),
            ("idempotency_storage", true, true),
            ("idempotency_sweep", true, false),
            ("idempotency_sweep_table", true, false),
            ("idempotency_wait_lock", true, false),
        ];
        assert_eq!(rows.len(), expected.len(), "{rows:?}");
        for ((function, config, app_may, reader_may, public_may), (name, app, reader)) in
            rows.into_iter().zip(expected)
        {
            assert_eq!(function, name);
            assert_eq!(
                config,
                ["search_path=pg_catalog, public, pg_temp"],
                "{function}"
            );
            assert_eq!(app_may, app, "{function}: EXECUTE of the application role");
            assert_eq!(reader_may, reader, "{function}: EXECUTE of a read-only role");
            assert!(!public_may, "{function}: PUBLIC has no EXECUTE");
        }
        Ok(())
    }
    .await;
    owner.close().await;
    drop_database(&name, &[&app, &reader]).await?;
    outcome
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

#[tokio::test]
async fn the_sweeper_skips_held_rows_and_sweeps_the_rest() -> Result<()> {
    let pool = pg_idempotency::testing::fresh_pool().await?;
    check_sweep_contract(&pool, 1).await
}

#[tokio::test]
async fn distribute_refuses_a_database_without_citus() -> Result<()> {
    let database = pg_idempotency::testing::TestDatabase::create().await?;
    let refused = cli(&database, &["distribute", "--colocate", "payments:account"]).await?;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("the citus extension is not installed"),
        "{stderr}"
    );
    let Err(Error::Database(sqlx::Error::Database(error))) =
        pg_idempotency::admin::distribute(database.pool()).await
    else {
        bail!("distributing without Citus must fail");
    };
    assert_eq!(error.code().as_deref(), Some("42704"));
    let usage = cli(&database, &["distribute", "--colocate", "payments"]).await?;
    assert_eq!(usage.status.code(), Some(2), "TABLE:COLUMN is required");
    database.close().await?;
    Ok(())
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
            .begin(&scope, &key, &IdempotentRequest::new("POST", "/x", b"{}"))
            .await?
        else {
            bail!("replay")
        };
        let Err(Error::Conflict { .. }) = store
            .begin(&scope, &key, &IdempotentRequest::new("POST", "/x", b"[]"))
            .await
        else {
            bail!("conflict")
        };
        let other = new_key();
        let Begin::Claimed(claim) = store
            .begin(&scope, &other, &IdempotentRequest::new("POST", "/x", b""))
            .await?
        else {
            bail!("claim")
        };
        let quick = IdempotencyStore::with_config(
            pool.clone(),
            pg_idempotency::Config::default().with_in_flight_wait(std::time::Duration::ZERO),
        );
        let Err(Error::InFlight { .. }) = quick
            .begin(&scope, &other, &IdempotentRequest::new("POST", "/x", b""))
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
    assert_eq!(
        counter(PLACE_WAIT_SECONDS),
        5,
        "one wait per look at the database (the second store has its own registry of held keys)"
    );
    Ok(())
}

/// A phased request in progress shows in `stats` and `inspect` (its recorded steps and
/// lease), and `forget` frees its key.
#[tokio::test]
async fn the_command_line_tool_shows_and_forgets_phased_requests() -> Result<()> {
    use pg_idempotency::Begin;

    let database = pg_idempotency::testing::TestDatabase::create().await?;
    let store = IdempotencyStore::new(database.pool().clone());
    let (scope, key) = (Scope::new("acct_p")?, new_key());
    let request = IdempotentRequest::new("POST", "/charges", b"{}");
    let Begin::Claimed(mut claim) = store.begin_phased(&scope, &key, &request).await? else {
        bail!("fresh key")
    };
    claim.set_provenance(Provenance::new("req_PHASED"));
    drop(claim);
    sqlx::query(
        "UPDATE idempotency_requests SET operation = 'charge', recovery_point = 'record',
                progress = '{\"record\": 1}', request_id = 'req_PHASED',
                leased_until = now() - interval '1 s'",
    )
    .execute(database.pool())
    .await?;

    let stats = cli(&database, &["stats"]).await?;
    if !stdout(&stats).contains("phased:        1 in progress, 1 abandoned") {
        bail!("stats: {}", stdout(&stats));
    }
    let (scope_arg, key_arg) = (scope.as_str(), key.as_str());
    let inspect = cli(
        &database,
        &["inspect", "--scope", scope_arg, "--key", key_arg],
    )
    .await?;
    let text = stdout(&inspect);
    for line in [
        "phased request in progress",
        "operation:       charge",
        "recorded steps:  record",
        "(ran out: a retry or the completer takes it over)",
        "request id:      req_PHASED",
    ] {
        if !text.contains(line) {
            bail!("inspect lacks {line:?}:\n{text}");
        }
    }
    let forget = cli(
        &database,
        &["forget", "--scope", scope_arg, "--key", key_arg, "--yes"],
    )
    .await?;
    if !forget.status.success() {
        bail!("forget: {forget:?}");
    }
    let again = cli(
        &database,
        &["inspect", "--scope", scope_arg, "--key", key_arg],
    )
    .await?;
    if again.status.success() {
        bail!("still there: {}", stdout(&again));
    }
    // The key is free: a new request runs.
    let Begin::Claimed(fresh) = store.begin_phased(&scope, &key, &request).await? else {
        bail!("the forgotten key replayed")
    };
    if fresh.attempt() != 1 || fresh.recovery_point().is_some() {
        bail!("not fresh: {fresh:?}");
    }
    database.close().await?;
    Ok(())
}
