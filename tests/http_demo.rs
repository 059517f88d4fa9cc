//! The payments demo (`examples/payments`) against its contract, over real HTTP.
//!
//! Most tests run the example's own router (`examples/payments/app.rs`, included below)
//! in-process on 127.0.0.1:0 with a fresh database each; the `binary_*` tests spawn the
//! compiled example itself (flags, the printed port, signals).

#[allow(dead_code)]
#[path = "../examples/payments/app.rs"]
mod app;
#[path = "../examples/processor/fake.rs"]
mod fake_processor;
mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use pg_idempotency::testing::TestDatabase;
use pg_idempotency::{Config, IdempotencyStore};
use serde_json::{Value, json};
use sqlx::PgPool;
use support::{
    Answer, CitusSchema, Server, client, example_binary, is_generated_request_id, new_key,
    parse_raw, raw, raw_post, spawn_example, stop_with,
};

const PAY: &str = "/v1/payments";

/// A fresh database with the demo's schema, and the demo served on it (with the fake
/// card processor, in-process).
struct Demo {
    db: TestDatabase,
    pool: PgPool,
    server: Server,
    processor: Server,
}

/// The demo's router on `store`, charging through `processor`.
fn demo_router(store: IdempotencyStore, processor: &Server) -> axum::Router {
    app::router(store, Arc::new(app::Charges::new(&processor.url(""))))
}

impl Demo {
    async fn start() -> Result<Self> {
        Self::start_with(Config::default()).await
    }

    async fn start_with(config: Config) -> Result<Self> {
        let db = TestDatabase::create().await?;
        let pool = app::connect(db.url()).await?;
        app::prepare(&pool).await?;
        let processor = Server::start(fake_processor::router(Duration::ZERO)).await?;
        let store = IdempotencyStore::with_config(pool.clone(), config);
        let server = Server::start(demo_router(store, &processor)).await?;
        Ok(Self {
            db,
            pool,
            server,
            processor,
        })
    }

    async fn post(&self, key: Option<&str>, account: Option<&str>, body: &str) -> Result<Answer> {
        let mut request = client()
            .post(self.server.url(PAY))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(account) = account {
            // As bytes: http's string conversions take ASCII only, and accounts may be
            // any UTF-8.
            let account = reqwest::header::HeaderValue::from_bytes(account.as_bytes())?;
            request = request.header("X-Account-Id", account);
        }
        Answer::of(request.send().await?).await
    }

    /// A valid 1000 EUR payment for the default account with `key`: 201 and its body.
    async fn pay_default(&self, key: &str) -> Result<Value> {
        check_created(
            &self.post(Some(key), None, EUR_1000).await?,
            "default",
            1000,
            "EUR",
        )
    }

    async fn get(&self, path: &str) -> Result<Answer> {
        Answer::of(client().get(self.server.url(path)).send().await?).await
    }

    async fn rows(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn count(&self, query: &str) -> Result<i64> {
        let answer = self.get(&format!("{PAY}/count{query}")).await?;
        ensure!(answer.status == 200, "count: {answer:?}");
        ensure!(answer.header("content-type") == Some("application/json"));
        let json = answer.json()?;
        ensure!(json.as_object().map(|o| o.len()) == Some(1), "{json}");
        json["count"].as_i64().context("count is not an integer")
    }

    async fn stop(self) -> Result<()> {
        self.server.stop().await?;
        self.processor.stop().await?;
        self.pool.close().await;
        self.db.close().await?;
        Ok(())
    }
}

const EUR_1000: &str = r#"{"amount":1000,"currency":"EUR"}"#;

fn check_created(answer: &Answer, account: &str, amount: i64, currency: &str) -> Result<Value> {
    ensure!(answer.status == 201, "expected 201: {answer:?}");
    ensure!(answer.header("content-type") == Some("application/json"));
    ensure!(answer.header("idempotent-replayed").is_none());
    ensure!(is_generated_request_id(answer.request_id()?));
    let json = answer.json()?;
    let object = json.as_object().context("not an object")?;
    let mut fields: Vec<_> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    ensure!(
        fields == ["account", "amount", "created_at", "currency", "id"],
        "{fields:?}"
    );
    ensure!(
        json["account"] == account && json["amount"] == amount && json["currency"] == currency,
        "{json}"
    );
    uuid::Uuid::parse_str(json["id"].as_str().context("id")?)?;
    chrono::DateTime::parse_from_rfc3339(json["created_at"].as_str().context("created_at")?)?;
    Ok(json)
}

#[tokio::test]
async fn create_replay_conflict_and_count() -> Result<()> {
    let demo = Demo::start().await?;
    let key = new_key();

    let created = demo.post(Some(&key), None, EUR_1000).await?;
    let json = check_created(&created, "default", 1000, "EUR")?;
    // created_at comes from the database clock, inside the transaction.
    let (account, created_at): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT account, created_at FROM payments WHERE id::text = $1")
            .bind(json["id"].as_str())
            .fetch_one(&demo.pool)
            .await?;
    ensure!(account == "default");
    let returned = chrono::DateTime::parse_from_rfc3339(json["created_at"].as_str().unwrap())?;
    ensure!(returned == created_at, "{returned} vs {created_at}");
    ensure!(demo.rows().await? == 1);

    // The same body with other whitespace and key order is the same request.
    let replay = demo
        .post(
            Some(&key),
            None,
            "{ \"currency\": \"EUR\", \"amount\": 1000 }",
        )
        .await?;
    ensure!(
        replay.status == 201 && replay.body == created.body,
        "{replay:?}"
    );
    ensure!(replay.header("idempotent-replayed") == Some("true"));
    ensure!(replay.request_id()? != created.request_id()?);
    ensure!(is_generated_request_id(replay.request_id()?));
    ensure!(demo.rows().await? == 1);

    let conflict = demo
        .post(Some(&key), None, r#"{"amount":2000,"currency":"EUR"}"#)
        .await?;
    let problem = conflict.problem(409, "idempotency_conflict")?;
    ensure!(problem["param"].is_null());
    ensure!(problem["advice_code"] == "use_new_idempotency_key");
    ensure!(
        problem["detail"].as_str().unwrap().contains(&key),
        "{problem}"
    );
    ensure!(demo.rows().await? == 1);

    ensure!(demo.count("").await? == 1);
    ensure!(demo.count("?account=default").await? == 1);
    ensure!(demo.count("?account=someone").await? == 0);
    demo.stop().await
}

/// Header and body bytes of a replay equal the original's, apart from
/// `Idempotent-Replayed` and the request id header.
#[tokio::test]
async fn replay_bytes_equal_the_original() -> Result<()> {
    let demo = Demo::start().await?;
    let key = format!("Idempotency-Key: {}", new_key());
    let body = br#"{"amount":42,"currency":"JPY","delay_ms":null}"#;
    let request = |id: &str| {
        raw_post(
            PAY,
            &[
                key.as_bytes(),
                format!("X-Request-Id: {id}").as_bytes(),
                b"X-Account-Id: acct_7",
            ],
            body,
        )
    };
    let first = parse_raw(&raw(demo.server.addr, &request("client-first")).await?)?;
    // The date is stored with the response: let the clock move on.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = parse_raw(&raw(demo.server.addr, &request("client-second")).await?)?;
    ensure!(first.status == 201 && second.status == 201);
    ensure!(first.body == second.body);

    let header = |answer: &support::RawAnswer, name: &str| -> Vec<Vec<u8>> {
        answer
            .lines
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
            .collect()
    };
    ensure!(header(&first, "x-request-id") == [b"x-request-id: client-first".to_vec()]);
    ensure!(header(&second, "x-request-id") == [b"x-request-id: client-second".to_vec()]);
    ensure!(header(&first, "idempotent-replayed").is_empty());
    ensure!(header(&second, "idempotent-replayed") == [b"idempotent-replayed: true".to_vec()]);
    // The replay names the request it replays; its own id stays its own.
    ensure!(header(&first, "idempotent-replay-of").is_empty());
    ensure!(
        header(&second, "idempotent-replay-of") == [b"idempotent-replay-of: client-first".to_vec()]
    );
    let rest = |answer: &support::RawAnswer| -> Vec<Vec<u8>> {
        answer
            .lines
            .iter()
            .filter(|(n, _)| {
                ![
                    "x-request-id",
                    "idempotent-replayed",
                    "idempotent-replay-of",
                ]
                .contains(&n.as_str())
            })
            .map(|(_, l)| l.clone())
            .collect()
    };
    ensure!(
        rest(&first) == rest(&second),
        "{:?}\nvs\n{:?}",
        rest(&first)
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_string())
            .collect::<Vec<_>>(),
        rest(&second)
            .iter()
            .map(|l| String::from_utf8_lossy(l).to_string())
            .collect::<Vec<_>>()
    );
    ensure!(
        !header(&first, "date").is_empty(),
        "the original has a date"
    );
    ensure!(demo.rows().await? == 1);
    demo.stop().await
}

#[tokio::test]
async fn missing_and_malformed_keys_are_400() -> Result<()> {
    let demo = Demo::start().await?;
    let missing = demo.post(None, None, EUR_1000).await?;
    let problem = missing.problem(400, "idempotency_key_missing")?;
    ensure!(problem["param"] == "Idempotency-Key");
    ensure!(is_generated_request_id(missing.request_id()?));

    let long = "a".repeat(10_000);
    for key in [
        "nope",
        "",
        "6f1c1f0e-8d2a-1f55-9a3e-1b2c3d4e5f60", // v1
        "00000000-0000-0000-0000-000000000000",
        "6f1c1f0e-8d2a-4f55-7a3e-1b2c3d4e5f60", // wrong variant
        "{6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60}",
        "6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60 x",
        long.as_str(),
    ] {
        let answer = demo.post(Some(key), None, EUR_1000).await?;
        let problem = answer
            .problem(400, "idempotency_key_invalid")
            .with_context(|| format!("key {key:.40?}"))?;
        ensure!(problem["param"] == "Idempotency-Key");
        ensure!(!problem["detail"].as_str().unwrap().contains(&long));
    }
    // Bytes that are not UTF-8, and the header twice: over a raw connection.
    let key = new_key();
    let twice = format!("Idempotency-Key: {key}");
    for headers in [
        vec![&b"Idempotency-Key: \xff\xfe\x80"[..]],
        vec![twice.as_bytes(), twice.as_bytes()],
    ] {
        let answer = parse_raw(
            &raw(
                demo.server.addr,
                &raw_post(PAY, &headers, EUR_1000.as_bytes()),
            )
            .await?,
        )?;
        ensure!(answer.status == 400, "{answer:?}");
        let json: Value = serde_json::from_slice(&answer.body)?;
        ensure!(json["code"] == "idempotency_key_invalid", "{json}");
    }
    ensure!(demo.rows().await? == 0);
    // None of that used the key.
    demo.pay_default(&key).await?;
    demo.stop().await
}

#[tokio::test]
async fn invalid_bodies_are_400_and_leave_the_key_free() -> Result<()> {
    let demo = Demo::start().await?;
    let key = new_key();
    let cases: &[(&str, Option<&str>)] = &[
        ("", None),
        ("not json", None),
        ("[1000, \"EUR\"]", None),
        ("{\"amount\":1000,\"currency\":\"EUR\"", None),
        (r#"{"currency":"EUR"}"#, Some("amount")),
        (r#"{"amount":0,"currency":"EUR"}"#, Some("amount")),
        (r#"{"amount":-5,"currency":"EUR"}"#, Some("amount")),
        (
            r#"{"amount":1000000000001,"currency":"EUR"}"#,
            Some("amount"),
        ),
        (r#"{"amount":10.5,"currency":"EUR"}"#, Some("amount")),
        (r#"{"amount":1e3,"currency":"EUR"}"#, Some("amount")),
        (r#"{"amount":"1000","currency":"EUR"}"#, Some("amount")),
        (r#"{"amount":null,"currency":"EUR"}"#, Some("amount")),
        (r#"{"amount":1000}"#, Some("currency")),
        (r#"{"amount":1000,"currency":"eur"}"#, Some("currency")),
        (r#"{"amount":1000,"currency":"EURO"}"#, Some("currency")),
        (r#"{"amount":1000,"currency":"E1R"}"#, Some("currency")),
        (r#"{"amount":1000,"currency":"ÉUR"}"#, Some("currency")),
        (r#"{"amount":1000,"currency":978}"#, Some("currency")),
        (
            r#"{"amount":1000,"currency":"EUR","delay_ms":-1}"#,
            Some("delay_ms"),
        ),
        (
            r#"{"amount":1000,"currency":"EUR","delay_ms":10001}"#,
            Some("delay_ms"),
        ),
        (
            r#"{"amount":1000,"currency":"EUR","delay_ms":"5"}"#,
            Some("delay_ms"),
        ),
        (
            r#"{"amount":1000,"currency":"EUR","delay_ms":1.5}"#,
            Some("delay_ms"),
        ),
        (
            r#"{"amount":1000,"currency":"EUR","ammount":1}"#,
            Some("ammount"),
        ),
    ];
    for (body, param) in cases {
        let answer = demo.post(Some(&key), None, body).await?;
        let problem = answer
            .problem(400, "invalid_request")
            .with_context(|| format!("body {body}"))?;
        ensure!(
            problem["param"] == json!(param),
            "body {body}: param {} instead of {param:?}",
            problem["param"]
        );
        ensure!(answer.header("idempotent-replayed").is_none());
    }
    ensure!(demo.rows().await? == 0);
    // Bounds are inclusive, and the key is still free.
    let body = r#"{"amount":1000000000000,"currency":"USD","delay_ms":0}"#;
    check_created(
        &demo.post(Some(&key), None, body).await?,
        "default",
        1_000_000_000_000,
        "USD",
    )?;
    check_created(
        &demo
            .post(Some(&new_key()), None, r#"{"amount":1,"currency":"EUR"}"#)
            .await?,
        "default",
        1,
        "EUR",
    )?;
    ensure!(demo.rows().await? == 2);
    demo.stop().await
}

#[tokio::test]
async fn bodies_over_one_mib_are_413_and_leave_the_key_free() -> Result<()> {
    let demo = Demo::start().await?;
    let key = new_key();
    // Exactly 1 MiB passes the limit (and is then an invalid payment).
    let mib = " ".repeat(app::BODY_LIMIT - EUR_1000.len() - 1) + "x" + EUR_1000;
    ensure!(mib.len() == app::BODY_LIMIT);
    demo.post(Some(&key), None, &mib)
        .await?
        .problem(400, "invalid_request")?;

    let over = " ".repeat(app::BODY_LIMIT - EUR_1000.len() + 1) + EUR_1000;
    let answer = demo.post(Some(&key), None, &over).await?;
    let problem = answer.problem(413, "payload_too_large")?;
    ensure!(
        problem["detail"].as_str().unwrap().contains("1048576"),
        "{problem}"
    );
    // Also without a key (the declared length is checked first) ...
    demo.post(None, None, &over)
        .await?
        .problem(413, "payload_too_large")?;
    // ... and when the length is not declared (chunked).
    let mut chunked = format!(
        "POST {PAY} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nIdempotency-Key: {key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..17 {
        chunked.extend_from_slice(format!("{:x}\r\n", 65_536).as_bytes());
        chunked.extend(std::iter::repeat_n(b' ', 65_536));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = parse_raw(&raw(demo.server.addr, &chunked).await?)?;
    ensure!(answer.status == 413, "chunked: {answer:?}");

    ensure!(demo.rows().await? == 0);
    demo.pay_default(&key).await?;
    demo.stop().await
}

#[tokio::test]
async fn accounts_scope_keys_and_counts() -> Result<()> {
    let demo = Demo::start().await?;
    let key = new_key();
    let a = demo.post(Some(&key), Some("acct_a"), EUR_1000).await?;
    let b = demo.post(Some(&key), Some("acct_b"), EUR_1000).await?;
    let a = check_created(&a, "acct_a", 1000, "EUR")?;
    let b = check_created(&b, "acct_b", 1000, "EUR")?;
    ensure!(a["id"] != b["id"], "one key, two accounts: two payments");
    // Without the header, the account is `default`: a third scope.
    demo.pay_default(&key).await?;
    // Unicode accounts are fine.
    check_created(
        &demo.post(Some(&key), Some("ユーザー"), EUR_1000).await?,
        "ユーザー",
        1000,
        "EUR",
    )?;

    ensure!(demo.count("").await? == 4);
    ensure!(demo.count("?account=acct_a").await? == 1);
    ensure!(
        demo.count("?account=%E3%83%A6%E3%83%BC%E3%82%B6%E3%83%BC")
            .await?
            == 1
    );
    ensure!(demo.count("?account=nobody&other=ignored").await? == 0);
    for bad in [
        "?account=",
        "?account=%00",
        "?account=%20x",
        &format!("?account={}", "a".repeat(256)),
    ] {
        let answer = demo.get(&format!("{PAY}/count{bad}")).await?;
        let problem = answer
            .problem(400, "invalid_request")
            .with_context(|| bad.to_owned())?;
        ensure!(problem["param"] == "account");
    }

    // Invalid account ids: 400, param X-Account-Id, nothing stored.
    let long = "a".repeat(256);
    let c1 = "a\u{85}b";
    for header in [
        format!("X-Account-Id: {long}").into_bytes(),
        b"X-Account-Id: a\tb".to_vec(),
        format!("X-Account-Id: {c1}").into_bytes(),
        b"X-Account-Id: \xff\xfe".to_vec(),
        b"X-Account-Id:".to_vec(),
    ] {
        let key = format!("Idempotency-Key: {}", new_key());
        let raw_answer = raw(
            demo.server.addr,
            &raw_post(PAY, &[key.as_bytes(), &header], EUR_1000.as_bytes()),
        )
        .await?;
        let answer = parse_raw(&raw_answer)?;
        ensure!(
            answer.status == 400,
            "{}: {answer:?}",
            String::from_utf8_lossy(&header)
        );
        let json: Value = serde_json::from_slice(&answer.body)?;
        ensure!(
            json["code"] == "idempotency_scope_invalid" && json["param"] == "X-Account-Id",
            "{json}"
        );
        ensure!(json.as_object().unwrap().len() == 8);
    }
    ensure!(demo.rows().await? == 4);
    demo.stop().await
}

#[tokio::test]
async fn health_and_unknown_routes() -> Result<()> {
    let demo = Demo::start().await?;
    let health = demo.get("/healthz").await?;
    ensure!(health.status == 200, "{health:?}");
    ensure!(is_generated_request_id(health.request_id()?));
    let missing = demo.get("/v1/nothing").await?;
    missing.problem(404, "not_found")?;
    let wrong_method = demo.get(PAY).await?;
    wrong_method.problem(405, "method_not_allowed")?;
    ensure!(wrong_method.header("allow") == Some("POST"));
    let delete = Answer::of(
        client()
            .delete(demo.server.url(PAY))
            .header("Idempotency-Key", new_key())
            .send()
            .await?,
    )
    .await?;
    delete.problem(405, "method_not_allowed")?;
    demo.stop().await
}

#[tokio::test]
async fn the_document_publishes_the_idempotency_policy() -> Result<()> {
    let demo = Demo::start().await?;
    let answer = demo.get("/openapi.json").await?;
    ensure!(answer.status == 200, "{answer:?}");
    ensure!(answer.header("content-type") == Some("application/json"));
    ensure!(is_generated_request_id(answer.request_id()?));
    let document = answer.json()?;
    ensure!(document["openapi"] == "3.1.0", "{}", document["openapi"]);
    for path in [PAY, "/v1/charges"] {
        let operation = &document["paths"][path]["post"];
        let key = operation["parameters"]
            .as_array()
            .and_then(|parameters| {
                parameters
                    .iter()
                    .find(|p| p["name"] == "Idempotency-Key" && p["in"] == "header")
            })
            .with_context(|| format!("{path}: no Idempotency-Key parameter"))?;
        ensure!(key["required"] == true, "{key}");
        ensure!(
            operation["x-idempotency"]["expires_after_seconds"] == 86_400,
            "{path}: {}",
            operation["x-idempotency"]
        );
        let created = &operation["responses"]["201"];
        ensure!(
            created["headers"]["Idempotent-Replayed"].is_object(),
            "{created}"
        );
        for status in ["400", "409", "413", "503"] {
            let problem = &operation["responses"][status]["content"]["application/problem+json"];
            ensure!(
                problem["schema"]["$ref"] == "#/components/schemas/Problem",
                "{path} {status}"
            );
        }
        ensure!(operation["responses"]["503"]["headers"]["Retry-After"].is_object());
        ensure!(operation["responses"].get("422").is_none());
    }
    // GET passes the layer: the counts are documented without the policy.
    let count = &document["paths"]["/v1/payments/count"]["get"];
    ensure!(count.get("x-idempotency").is_none(), "{count}");
    ensure!(
        document["components"]["schemas"]["Problem"]["required"]
            .as_array()
            .map(Vec::len)
            == Some(8)
    );
    demo.stop().await
}

#[tokio::test]
async fn a_key_in_flight_is_409_with_retry_after() -> Result<()> {
    let demo = Demo::start().await?;
    let key = new_key();
    let slow = r#"{"amount":7,"currency":"EUR","delay_ms":3500}"#;
    let first = tokio::spawn({
        let url = demo.server.url(PAY);
        let key = key.clone();
        async move {
            Answer::of(
                client()
                    .post(url)
                    .header("Idempotency-Key", key)
                    .body(slow)
                    .send()
                    .await?,
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Waits the configured 2 s for the first, then gives up.
    let second = demo.post(Some(&key), None, slow).await?;
    let problem = second.problem(409, "idempotency_key_in_use")?;
    ensure!(problem["advice_code"] == "retry_later");
    let retry_after: u64 = second
        .header("retry-after")
        .context("no Retry-After")?
        .parse()?;
    ensure!(retry_after >= 1, "{retry_after}");
    let first = first.await??;
    check_created(&first, "default", 7, "EUR")?;
    let third = demo.post(Some(&key), None, slow).await?;
    ensure!(third.status == 201 && third.body == first.body);
    ensure!(demo.rows().await? == 1);
    demo.stop().await
}

#[tokio::test]
async fn fifty_concurrent_retries_make_one_payment() -> Result<()> {
    let demo = Demo::start().await?;
    let key = new_key();
    let body = r#"{"amount":5000,"currency":"GBP","delay_ms":1000}"#;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = demo.server.url(PAY);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            Answer::of(
                client()
                    .post(url)
                    .header("Idempotency-Key", key)
                    .header("X-Account-Id", "acct_race")
                    .body(body)
                    .send()
                    .await?,
            )
            .await
        }));
    }
    let mut created = Vec::new();
    let mut in_flight = 0;
    let mut request_ids = HashSet::new();
    for task in tasks {
        let answer = task.await??;
        ensure!(
            request_ids.insert(answer.request_id()?.to_owned()),
            "request ids are unique"
        );
        match answer.status {
            201 => created.push(answer),
            409 => {
                answer.problem(409, "idempotency_key_in_use")?;
                ensure!(answer.header("retry-after").is_some());
                in_flight += 1;
            }
            _ => anyhow::bail!("unexpected answer: {answer:?}"),
        }
    }
    ensure!(!created.is_empty(), "all 50 were in flight");
    let originals: Vec<_> = created
        .iter()
        .filter(|a| a.header("idempotent-replayed").is_none())
        .collect();
    ensure!(
        originals.len() == 1,
        "{} answers were not replays",
        originals.len()
    );
    check_created(originals[0], "acct_race", 5000, "GBP")?;
    for answer in &created {
        ensure!(
            answer.body == created[0].body,
            "every 201 is the same payment"
        );
        ensure!(answer.header("date") == created[0].header("date"));
    }
    ensure!(created.len() + in_flight == 50);
    ensure!(demo.rows().await? == 1, "exactly one row");
    ensure!(demo.count("?account=acct_race").await? == 1);
    demo.stop().await
}

#[tokio::test]
async fn a_replay_survives_a_restart() -> Result<()> {
    let demo = Demo::start().await?;
    let key = new_key();
    let first = demo.post(Some(&key), Some("acct_r"), EUR_1000).await?;
    check_created(&first, "acct_r", 1000, "EUR")?;
    let Demo {
        db,
        pool,
        server,
        processor,
    } = demo;
    let old = server.addr;
    server.stop().await?;
    pool.close().await;
    ensure!(
        tokio::net::TcpStream::connect(old).await.is_err(),
        "the old server is gone"
    );

    // A new process: a new pool, store and router on the same database.
    let pool = app::connect(db.url()).await?;
    app::prepare(&pool).await?;
    let server =
        Server::start(demo_router(IdempotencyStore::new(pool.clone()), &processor)).await?;
    let demo = Demo {
        db,
        pool,
        server,
        processor,
    };
    let replay = demo.post(Some(&key), Some("acct_r"), EUR_1000).await?;
    ensure!(
        replay.status == 201 && replay.body == first.body,
        "{replay:?}"
    );
    ensure!(replay.header("idempotent-replayed") == Some("true"));
    ensure!(replay.header("date") == first.header("date"));
    ensure!(replay.header("content-type") == first.header("content-type"));
    demo.post(
        Some(&key),
        Some("acct_r"),
        r#"{"amount":1,"currency":"EUR"}"#,
    )
    .await?
    .problem(409, "idempotency_conflict")?;
    ensure!(demo.rows().await? == 1);
    demo.stop().await
}

#[tokio::test]
async fn expired_keys_count_as_unused() -> Result<()> {
    let demo = Demo::start_with(Config::default().with_ttl(Duration::from_secs(1))).await?;
    let key = new_key();
    demo.pay_default(&key).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = r#"{"amount":2,"currency":"EUR"}"#;
    check_created(
        &demo.post(Some(&key), None, other).await?,
        "default",
        2,
        "EUR",
    )?;
    ensure!(demo.rows().await? == 2);
    demo.stop().await
}

#[tokio::test]
async fn hostile_requests_never_break_the_server() -> Result<()> {
    let demo = Demo::start().await?;
    let addr = demo.server.addr;
    let huge = format!("X-Junk: {}", "j".repeat(200_000));
    let many: Vec<String> = (0..150).map(|i| format!("X-H{i}: v")).collect();
    let many: Vec<&[u8]> = many.iter().map(|h| h.as_bytes()).collect();
    let requests: Vec<Vec<u8>> = vec![
        raw_post(PAY, &[huge.as_bytes()], EUR_1000.as_bytes()),
        raw_post(PAY, &many, EUR_1000.as_bytes()),
        raw_post(PAY, &[b"Idempotency-Key: \x01\x02"], b"{}"),
        raw_post(PAY, &[b"X-Request-Id: \xff<script>"], b"{}"),
        b"POST /v1/payments HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\nConnection: close\r\n\r\n".to_vec(),
        b"POST /v1/payments HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999\r\nConnection: close\r\n\r\n".to_vec(),
        b"GARBAGE\r\n\r\n".to_vec(),
        b"POST /v1/payments HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"amo".to_vec(),
    ];
    for request in &requests {
        // Any answer (or a closed connection) will do, but never a 5xx.
        if let Ok(answer) = raw(addr, request).await
            && let Ok(answer) = parse_raw(&answer)
        {
            ensure!(answer.status < 500, "{answer:?}");
        }
    }
    // Deeply nested JSON, up to the limit: parsed and fingerprinted without recursion
    // trouble, and refused as an invalid payment.
    for body in [
        "[".repeat(app::BODY_LIMIT),
        "{\"a\":".repeat(app::BODY_LIMIT / 5),
    ] {
        let answer = demo.post(Some(&new_key()), None, &body).await?;
        answer.problem(400, "invalid_request")?;
    }
    // A client that sends half a body and goes away.
    {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "POST {PAY} HTTP/1.1\r\nHost: t\r\nIdempotency-Key: {}\r\nContent-Length: 1000\r\n\r\n{{\"amount\"",
            new_key()
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes()).await?;
    }
    // A sane client X-Request-Id is echoed; an insane one is replaced.
    let echoed = Answer::of(
        client()
            .get(demo.server.url("/healthz"))
            .header("X-Request-Id", "trace-1234")
            .send()
            .await?,
    )
    .await?;
    ensure!(echoed.request_id()? == "trace-1234");
    let replaced = Answer::of(
        client()
            .get(demo.server.url("/healthz"))
            .header("X-Request-Id", "a b")
            .send()
            .await?,
    )
    .await?;
    ensure!(is_generated_request_id(replaced.request_id()?));
    ensure!(demo.get("/healthz").await?.status == 200);
    ensure!(demo.rows().await? == 0);
    demo.stop().await
}

// ---- the compiled example -------------------------------------------------------------

#[tokio::test]
async fn binary_serves_prints_its_port_and_stops_on_sigterm() -> Result<()> {
    let db = TestDatabase::create().await?;
    let (mut child, port, mut stdout) = spawn_example(
        "payments",
        &[],
        &["--port", "0", "--database-url", db.url(), "--ttl-secs", "1"],
    )
    .await?;
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");

    let health = Answer::of(client().get(url("/healthz")).send().await?).await?;
    ensure!(health.status == 200);
    let key = new_key();
    let post = |body: &'static str| {
        client()
            .post(url(PAY))
            .header("Idempotency-Key", &key)
            .body(body)
            .send()
    };
    let created = Answer::of(post(EUR_1000).await?).await?;
    check_created(&created, "default", 1000, "EUR")?;
    let replay = Answer::of(post(EUR_1000).await?).await?;
    ensure!(replay.body == created.body && replay.header("idempotent-replayed") == Some("true"));
    // The document publishes the expiry the flag set.
    let document = Answer::of(client().get(url("/openapi.json")).send().await?)
        .await?
        .json()?;
    let published = &document["paths"][PAY]["post"]["x-idempotency"]["expires_after_seconds"];
    ensure!(published == 1, "expires_after_seconds {published}");
    // --ttl-secs 1: a second later the key is free again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = Answer::of(post(r#"{"amount":3,"currency":"EUR"}"#).await?).await?;
    check_created(&again, "default", 3, "EUR")?;

    // A slow request in flight when SIGTERM arrives still completes.
    let slow = tokio::spawn(
        client()
            .post(url(PAY))
            .header("Idempotency-Key", new_key())
            .body(r#"{"amount":9,"currency":"EUR","delay_ms":1000}"#)
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = stop_with(&mut child, "-TERM").await?;
    ensure!(status.success(), "exit status {status}");
    ensure!(slow.await??.status() == 201);
    ensure!(
        stdout.next_line().await?.is_none(),
        "exactly one line on stdout"
    );

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(db.pool())
        .await?;
    ensure!(rows == 3, "{rows} rows");
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn binary_stops_on_sigint_and_restarts_on_the_same_database() -> Result<()> {
    let db = TestDatabase::create().await?;
    let (mut child, port, _) = spawn_example(
        "payments",
        &[],
        &["--port", "0", "--database-url", db.url()],
    )
    .await?;
    let key = new_key();
    let post = |port: u16| {
        client()
            .post(format!("http://127.0.0.1:{port}{PAY}"))
            .header("Idempotency-Key", &key)
            .header("X-Account-Id", "acct_restart")
            .body(EUR_1000)
            .send()
    };
    let created = Answer::of(post(port).await?).await?;
    check_created(&created, "acct_restart", 1000, "EUR")?;
    ensure!(stop_with(&mut child, "-INT").await?.success());

    let (mut child, port, _) = spawn_example(
        "payments",
        &[],
        &["--port", "0", "--database-url", db.url()],
    )
    .await?;
    let replay = Answer::of(post(port).await?).await?;
    ensure!(replay.body == created.body && replay.header("idempotent-replayed") == Some("true"));
    ensure!(stop_with(&mut child, "-TERM").await?.success());
    db.close().await?;
    Ok(())
}

/// On Citus (`PG_IDEMPOTENCY_CITUS_URL`, else skipped): the demo starts on a fresh
/// database, an operator distributes its tables, and it restarts on the distributed
/// tables and keeps its contract there.
#[tokio::test]
async fn binary_restarts_on_distributed_tables_and_keeps_its_contract() -> Result<()> {
    let Some(citus) = CitusSchema::create("demo on citus").await? else {
        return Ok(());
    };
    let args = ["--port", "0", "--database-url", citus.url()];
    let (mut child, _, _) = spawn_example("payments", &[], &args).await?;
    ensure!(stop_with(&mut child, "-TERM").await?.success());
    for table in ["payments", "charges"] {
        ensure!(pg_idempotency::admin::colocate(citus.pool(), table, "account").await?);
        ensure!(citus.colocated(table, "account").await?);
    }
    ensure!(citus.colocated("idempotency_requests", "scope").await?);

    let (mut child, port, _) = spawn_example("payments", &[], &args).await?;
    let url = format!("http://127.0.0.1:{port}{PAY}");
    let post = |key: &str, account: &str, body: &'static str| {
        client()
            .post(&url)
            .header("Idempotency-Key", key)
            .header("X-Account-Id", account)
            .body(body)
            .send()
    };
    let key = new_key();
    let created = Answer::of(post(&key, "acct_a", EUR_1000).await?).await?;
    check_created(&created, "acct_a", 1000, "EUR")?;
    let replay = Answer::of(post(&key, "acct_a", EUR_1000).await?).await?;
    ensure!(replay.body == created.body && replay.header("idempotent-replayed") == Some("true"));
    let other = r#"{"amount":5,"currency":"EUR"}"#;
    Answer::of(post(&key, "acct_a", other).await?)
        .await?
        .problem(409, "idempotency_conflict")?;
    // The same key in another account is another payment.
    check_created(
        &Answer::of(post(&key, "acct_b", other).await?).await?,
        "acct_b",
        5,
        "EUR",
    )?;

    // 20 duplicates at once: one payment, one body for all.
    let key = new_key();
    let slow = r#"{"amount":7,"currency":"EUR","delay_ms":300}"#;
    let answers = futures_util::future::join_all((0..20).map(|_| post(&key, "acct_c", slow))).await;
    let mut bodies = HashSet::new();
    for answer in answers {
        let answer = Answer::of(answer?).await?;
        ensure!(answer.status == 201, "{answer:?}");
        bodies.insert(answer.body);
    }
    ensure!(bodies.len() == 1, "{} different bodies", bodies.len());

    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT account, count(*) FROM payments GROUP BY account ORDER BY account")
            .fetch_all(citus.pool())
            .await?;
    ensure!(
        counts
            == [
                ("acct_a".into(), 1),
                ("acct_b".into(), 1),
                ("acct_c".into(), 1)
            ],
        "{counts:?}"
    );
    let total = Answer::of(client().get(format!("{url}/count")).send().await?).await?;
    ensure!(total.json()?["count"] == 3, "{total:?}");

    // A phased charge on the distributed tables: its request row, key row and charge row
    // live on one worker.
    let charges = format!("http://127.0.0.1:{port}/v1/charges");
    let charge = |key: String| {
        client()
            .post(&charges)
            .header("Idempotency-Key", key)
            .header("X-Account-Id", "acct_d")
            .body(r#"{"amount":9,"currency":"EUR"}"#)
            .send()
    };
    let key = new_key();
    let charged = Answer::of(charge(key.clone()).await?).await?;
    ensure!(charged.status == 201, "{charged:?}");
    ensure!(charged.json()?["status"] == "succeeded", "{charged:?}");
    let again = Answer::of(charge(key).await?).await?;
    ensure!(again.body == charged.body && again.header("idempotent-replayed") == Some("true"));
    ensure!(stop_with(&mut child, "-TERM").await?.success());
    citus.close().await
}

#[tokio::test]
async fn binary_refuses_bad_flags() -> Result<()> {
    for args in [&["--ttl-secs", "0"][..], &["--port", "70000"], &["--nope"]] {
        let output = tokio::process::Command::new(example_binary("payments")?)
            .args(args)
            .env_remove("DATABASE_URL")
            .output()
            .await?;
        ensure!(
            output.status.code() == Some(2),
            "{args:?}: {:?}",
            output.status
        );
        ensure!(output.stdout.is_empty());
    }
    Ok(())
}

// ---- hostile input, as a table -------------------------------------------------------

/// One hostile request: which header or body is off, and the answer it must get.
struct Hostile {
    case: &'static str,
    /// `None`: a fresh valid key.
    key: Option<Vec<u8>>,
    account: Option<Vec<u8>>,
    body: Vec<u8>,
    status: u16,
    /// The problem `code`; `None` where the HTTP parser itself refuses the request
    /// (a plain 400 before any application code runs).
    code: Option<&'static str>,
}

fn hostile_cases() -> Vec<Hostile> {
    let ok = EUR_1000.as_bytes().to_vec();
    let key = |case, key: &[u8], status, code| Hostile {
        case,
        key: Some(key.to_vec()),
        account: None,
        body: ok.clone(),
        status,
        code,
    };
    let account = |case, account: Vec<u8>, status, code| Hostile {
        case,
        key: None,
        account: Some(account),
        body: ok.clone(),
        status,
        code,
    };
    let body = |case, body: Vec<u8>, status, code| Hostile {
        case,
        key: None,
        account: None,
        body,
        status,
        code,
    };
    let invalid_key = Some("idempotency_key_invalid");
    let invalid = Some("invalid_request");
    vec![
        key("key empty", b"", 400, invalid_key),
        key("key blank", b"   ", 400, invalid_key),
        key("key 10 KB", &[b'a'; 10_240], 400, invalid_key),
        key(
            "key non-ASCII",
            "ключ-9f1c1f0e-8d2a-4f55".as_bytes(),
            400,
            invalid_key,
        ),
        key(
            "key with NUL",
            b"6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f6\0",
            400,
            None,
        ),
        key(
            "key with a control byte",
            b"6f1c1f0e-8d2a-4f55-9a3e-\x01b2c3d4e5f6",
            400,
            None,
        ),
        key(
            "key UUID v1",
            b"c232ab00-9414-11ec-b3c8-9f6bdeced846",
            400,
            invalid_key,
        ),
        key(
            "key UUID v3",
            b"5df41881-3aed-3515-88a7-2f4a814cf09e",
            400,
            invalid_key,
        ),
        key(
            "key UUID v5",
            b"2ed6657d-e927-568b-95e1-2665a8aea6a2",
            400,
            invalid_key,
        ),
        key(
            "key UUID v7",
            b"017f22e2-79b0-7cc3-98c4-dc0c0c07398f",
            400,
            invalid_key,
        ),
        key(
            "key nil UUID",
            b"00000000-0000-0000-0000-000000000000",
            400,
            invalid_key,
        ),
        key(
            "key braced",
            b"{6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60}",
            400,
            invalid_key,
        ),
        key(
            "key URN",
            b"urn:uuid:6f1c1f0e-8d2a-4f55-9a3e-1b2c3d4e5f60",
            400,
            invalid_key,
        ),
        account("account with NUL", b"acct\0x".to_vec(), 400, None),
        account(
            "account 10 KB",
            vec![b'a'; 10_240],
            400,
            Some("idempotency_scope_invalid"),
        ),
        body("body empty", Vec::new(), 400, invalid),
        body(
            "body 1 MiB + 1",
            vec![b' '; 1024 * 1024 + 1],
            413,
            Some("payload_too_large"),
        ),
        body(
            "body invalid UTF-8",
            b"{\"amount\":1000,\"currency\":\"\xff\xfe\"}".to_vec(),
            400,
            invalid,
        ),
        body(
            "body nested 100,000 deep",
            [&b"["[..]; 100_000].concat(),
            400,
            invalid,
        ),
        body(
            "amount beyond i64",
            br#"{"amount":99999999999999999999,"currency":"EUR"}"#.to_vec(),
            400,
            invalid,
        ),
        body(
            "amount beyond f64",
            br#"{"amount":1e400,"currency":"EUR"}"#.to_vec(),
            400,
            invalid,
        ),
        body(
            "duplicate keys",
            br#"{"amount":1000,"amount":2000,"currency":"EUR"}"#.to_vec(),
            400,
            invalid,
        ),
    ]
}

#[tokio::test]
async fn hostile_inputs_get_their_status_and_change_nothing() -> Result<()> {
    let demo = Demo::start().await?;
    let mut failures = Vec::new();
    for case in hostile_cases() {
        let fresh = new_key();
        let key = case
            .key
            .clone()
            .unwrap_or_else(|| fresh.clone().into_bytes());
        let mut headers: Vec<Vec<u8>> = vec![[&b"Idempotency-Key: "[..], &key].concat()];
        headers.push(b"Content-Type: application/json".to_vec());
        if let Some(account) = &case.account {
            headers.push([&b"X-Account-Id: "[..], account].concat());
        }
        let headers: Vec<&[u8]> = headers.iter().map(Vec::as_slice).collect();
        let answer =
            parse_raw(&raw(demo.server.addr, &raw_post(PAY, &headers, &case.body)).await?)?;
        let code = serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .and_then(|json| json["code"].as_str().map(str::to_owned));
        if answer.status != case.status || code.as_deref() != case.code {
            failures.push(format!(
                "{}: expected {} {:?}, got {} {:?}",
                case.case, case.status, case.code, answer.status, code
            ));
        }
        ensure!(
            demo.rows().await? == 0,
            "{}: a business row was created",
            case.case
        );
        if case.key.is_none() {
            // The key was valid: it must still be free for a valid request.
            let retry = demo.post(Some(&fresh), None, EUR_1000).await?;
            ensure!(
                retry.status == 201,
                "{}: the key was consumed: {retry:?}",
                case.case
            );
            sqlx::query("DELETE FROM payments")
                .execute(&demo.pool)
                .await?;
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    // Upper case is the same UUID v4, accepted and normalised.
    let key = new_key();
    ensure!(
        demo.post(Some(&key.to_uppercase()), None, EUR_1000)
            .await?
            .status
            == 201
    );
    let replay = demo.post(Some(&key), None, EUR_1000).await?;
    ensure!(
        replay.header("idempotent-replayed") == Some("true"),
        "{replay:?}"
    );
    ensure!(demo.rows().await? == 1);
    demo.stop().await
}

#[tokio::test]
async fn binary_killed_mid_request_then_restarted_makes_one_payment() -> Result<()> {
    let db = TestDatabase::create().await?;
    let (mut child, port, _stdout) = spawn_example(
        "payments",
        &[],
        &["--port", "0", "--database-url", db.url()],
    )
    .await?;
    let key = new_key();
    let slow = r#"{"amount":1000,"currency":"EUR","delay_ms":3000}"#;
    let url = format!("http://127.0.0.1:{port}{PAY}");
    let in_flight = tokio::spawn({
        let (url, key) = (url.clone(), key.clone());
        async move {
            client()
                .post(url)
                .header("Idempotency-Key", key)
                .body(slow)
                .send()
                .await
        }
    });
    // Wait until the payment is inside its transaction, then SIGKILL the service.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let busy: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(db.pool())
        .await?;
        if busy > 0 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the slow payment never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = stop_with(&mut child, "-KILL").await?;
    ensure!(!status.success());
    ensure!(
        in_flight.await?.is_err(),
        "the killed request got an answer"
    );

    // Started again on the same database, the retry runs fresh (the killed transaction
    // rolled back with its connection) and pays exactly once; the next retry replays.
    let (mut child, port, _stdout) = spawn_example(
        "payments",
        &[],
        &["--port", "0", "--database-url", db.url()],
    )
    .await?;
    let url = format!("http://127.0.0.1:{port}{PAY}");
    let mut first = None;
    for _ in 0..100 {
        let answer = Answer::of(
            client()
                .post(&url)
                .header("Idempotency-Key", &key)
                .body(slow)
                .send()
                .await?,
        )
        .await?;
        match answer.status {
            201 => {
                first = Some(answer);
                break;
            }
            // The dead connection's transaction may still hold the key for a moment.
            409 => tokio::time::sleep(Duration::from_millis(200)).await,
            other => anyhow::bail!("unexpected {other}: {answer:?}"),
        }
    }
    let first = first.context("the retry never succeeded")?;
    let again = Answer::of(
        client()
            .post(&url)
            .header("Idempotency-Key", &key)
            .body(slow)
            .send()
            .await?,
    )
    .await?;
    ensure!(again.header("idempotent-replayed") == Some("true") && again.body == first.body);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
        .fetch_one(db.pool())
        .await?;
    ensure!(rows == 1, "{rows} payments");
    stop_with(&mut child, "-TERM").await?;
    db.close().await?;
    Ok(())
}

/// Issue 12: the demo takes the scope from `X-Account-Id`, which the client chooses; where
/// the README and the demo show it, they say that a real service takes it from
/// authentication.
#[test]
fn the_demo_says_it_trusts_the_account_header() {
    for (file, text) in [
        ("README.md", include_str!("../README.md")),
        (
            "examples/payments/main.rs",
            include_str!("../examples/payments/main.rs"),
        ),
        (
            "examples/payments/app.rs",
            include_str!("../examples/payments/app.rs"),
        ),
    ] {
        // One line of prose, doc-comment markers left out.
        let words: Vec<_> = text
            .split_whitespace()
            .filter(|word| !matches!(*word, "//!" | "///" | "//"))
            .collect();
        let text = words.join(" ");
        assert!(
            text.contains("trusts `X-Account-Id`") && text.contains("from authentication"),
            "{file} must say that the demo trusts X-Account-Id and a real service takes the \
             scope from authentication"
        );
    }
}
