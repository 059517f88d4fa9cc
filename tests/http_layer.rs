//! The axum integration's behaviours that the payments demo does not show, on a router
//! built for them: statuses that are not stored, the `Rollback` marker, panics, optional
//! keys, custom settings, the concrete path and query in the fingerprint, database failures.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Json, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use pg_idempotency::axum::{
    BodyBudget, Dialect, IdempotencyLayer, IdempotentTx, RequestIdLayer, Rollback,
    RollbackOnReject, ScopeRejection, scope_from_header,
};
use pg_idempotency::testing::TestDatabase;
use pg_idempotency::{
    IdempotencyStore, KeyPolicy, ProblemCatalogue, ProblemKind, Problems, Scope, Situation,
};
use sqlx::PgPool;
use support::{Answer, Server, client, is_generated_request_id, new_key};

#[derive(Clone)]
struct AppState {
    runs: Arc<AtomicUsize>,
    pool: PgPool,
}

/// Writes a row in the claim's transaction, then answers as the request's headers say:
/// `x-sleep-ms`, `x-status`, `x-rollback`, `x-panic`, `x-binary-header`, `x-rich`.
async fn widget(
    State(state): State<AppState>,
    mut tx: IdempotentTx,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = state.runs.fetch_add(1, Ordering::SeqCst) + 1;
    sqlx::query("INSERT INTO widgets (note) VALUES ($1)")
        .bind(String::from_utf8_lossy(&body).into_owned())
        .execute(&mut *tx)
        .await
        .expect("insert");
    if let Some(ms) = headers
        .get("x-sleep-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if headers.contains_key("x-panic") {
        panic!("the handler panics after writing");
    }
    let status = headers
        .get("x-status")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::CREATED);
    let mut response = (status, format!("run {run}")).into_response();
    if headers.contains_key("x-rollback") {
        response.extensions_mut().insert(Rollback);
    }
    if headers.contains_key("x-binary-header") {
        response
            .headers_mut()
            .insert("x-bin", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
    }
    if headers.contains_key("x-rich") {
        let h = response.headers_mut();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("x-multi", HeaderValue::from_static("one"));
        h.append("set-cookie", HeaderValue::from_static("b=2; Path=/"));
        h.append("x-multi", HeaderValue::from_static("two"));
        h.insert(
            "x-utf8",
            HeaderValue::from_bytes("naïve ✓".as_bytes()).unwrap(),
        );
        let mut bytes: Vec<u8> = (0..=255u8).collect();
        bytes.extend_from_slice(format!("run {run}").as_bytes());
        *response.body_mut() = bytes.into();
    }
    response
}

/// On an optional-key route: in the claim when there is a key, else straight to the pool.
async fn optional(State(state): State<AppState>, tx: Option<IdempotentTx>) -> Response {
    let run = state.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let insert = sqlx::query("INSERT INTO widgets (note) VALUES ('optional')");
    let how = match tx {
        Some(mut tx) => {
            insert.execute(&mut *tx).await.expect("insert");
            "claimed"
        }
        None => {
            insert.execute(&state.pool).await.expect("insert");
            "plain"
        }
    };
    (StatusCode::CREATED, format!("{how} run {run}")).into_response()
}

async fn json(
    State(state): State<AppState>,
    mut tx: IdempotentTx,
    RollbackOnReject(Json(value)): RollbackOnReject<Json<serde_json::Value>>,
) -> Response {
    state.runs.fetch_add(1, Ordering::SeqCst);
    sqlx::query("INSERT INTO widgets (note) VALUES ($1)")
        .bind(value.to_string())
        .execute(&mut *tx)
        .await
        .expect("insert");
    StatusCode::CREATED.into_response()
}

async fn misused(_tx: IdempotentTx) -> StatusCode {
    StatusCode::CREATED
}

struct App {
    db: TestDatabase,
    runs: Arc<AtomicUsize>,
    server: Server,
}

const UNAUTHORIZED: ProblemKind = ProblemKind {
    slug: "unauthorized",
    status: 401,
    title: "Unauthorized",
    code: "unauthorized",
    advice_code: "log_in",
};

fn router(store: IdempotencyStore, runs: Arc<AtomicUsize>) -> Router {
    let scope = scope_from_header(
        HeaderName::from_static("x-account-id"),
        Some(Scope::new("default").unwrap()),
    );
    let layer = IdempotencyLayer::new(store.clone(), scope.clone());
    let custom =
        IdempotencyLayer::new(
            store.clone(),
            |parts: &axum::http::request::Parts| match parts.headers.get("authorization") {
                Some(value) => Ok(Scope::from_bytes(value.as_bytes())?),
                None => Err(ScopeRejection::from(
                    Problems::new("/errors/").custom(&UNAUTHORIZED, "Log in first."),
                )),
            },
        )
        .with_key_header(HeaderName::from_static("x-idem-key"))
        .with_body_limit(16);
    Router::new()
        .route(
            "/widgets/{id}",
            post(widget)
                .put(widget)
                .route_layer(layer.clone().with_guarded_methods([
                    Method::POST,
                    Method::PUT,
                    Method::PATCH,
                ])),
        )
        .route(
            "/optional",
            post(optional).route_layer(layer.clone().optional()),
        )
        .route("/custom", post(widget).route_layer(custom))
        // Per-route settings over the same store and pool.
        .route(
            "/opaque",
            post(widget).route_layer(
                layer
                    .clone()
                    .with_key_policy(KeyPolicy::Opaque)
                    .with_ttl(Duration::from_secs(3600))
                    .with_in_flight_wait(Duration::ZERO),
            ),
        )
        .route("/json", post(json).route_layer(layer.clone()))
        .route("/misused", post(misused))
        .with_state(AppState {
            runs,
            pool: store.pool().clone(),
        })
        .layer(RequestIdLayer::new())
}

impl App {
    async fn start() -> Result<Self> {
        Self::start_on(|db| Ok(db.pool().clone())).await
    }

    /// The app on a pool of its own to the test database.
    async fn start_on(pool: impl FnOnce(&TestDatabase) -> Result<PgPool>) -> Result<Self> {
        let db = TestDatabase::create().await?;
        sqlx::raw_sql("CREATE TABLE widgets (id bigserial PRIMARY KEY, note text NOT NULL)")
            .execute(db.pool())
            .await?;
        let runs = Arc::new(AtomicUsize::new(0));
        let store = IdempotencyStore::with_config(
            pool(&db)?,
            pg_idempotency::Config::default().with_in_flight_wait(Duration::from_secs(5)),
        );
        let server = Server::start(router(store, Arc::clone(&runs))).await?;
        Ok(Self { db, runs, server })
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer> {
        let mut request = client()
            .request(method, self.server.url(path))
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Answer::of(request.send().await?).await
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer> {
        self.send(reqwest::Method::POST, path, key, headers, body)
            .await
    }

    async fn rows(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM widgets")
            .fetch_one(self.db.pool())
            .await?)
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    async fn stop(self) -> Result<()> {
        self.server.stop().await?;
        self.db.close().await?;
        Ok(())
    }
}

#[tokio::test]
async fn retryable_statuses_roll_back_and_free_the_key() -> Result<()> {
    let app = App::start().await?;
    for status in ["500", "503", "408", "429"] {
        let key = new_key();
        let answer = app
            .post("/widgets/1", Some(&key), &[("x-status", status)], "w")
            .await?;
        ensure!(answer.status.to_string() == status, "{answer:?}");
        ensure!(answer.header("idempotent-replayed").is_none());
        ensure!(is_generated_request_id(answer.request_id()?));
        ensure!(
            app.rows().await? == 0,
            "{status}: the write was rolled back"
        );
        // The key is free: the retry runs the handler again, and this time it is kept.
        let runs = app.runs();
        let retry = app.post("/widgets/1", Some(&key), &[], "w").await?;
        ensure!(retry.status == 201 && app.runs() == runs + 1, "{retry:?}");
        ensure!(app.rows().await? == 1);
        sqlx::query("DELETE FROM widgets")
            .execute(app.db.pool())
            .await?;
    }
    app.stop().await
}

#[tokio::test]
async fn client_error_answers_are_stored_and_replayed() -> Result<()> {
    let app = App::start().await?;
    for status in [404u16, 422, 402] {
        let key = new_key();
        let status_text = status.to_string();
        let first = app
            .post("/widgets/1", Some(&key), &[("x-status", &status_text)], "w")
            .await?;
        ensure!(first.status == status);
        let runs = app.runs();
        let replay = app.post("/widgets/1", Some(&key), &[], "w").await?;
        ensure!(
            replay.status == status && replay.body == first.body,
            "{replay:?}"
        );
        ensure!(replay.header("idempotent-replayed") == Some("true"));
        ensure!(app.runs() == runs, "a replay does not run the handler");
    }
    ensure!(
        app.rows().await? == 3,
        "the writes were committed with their answers"
    );
    app.stop().await
}

#[tokio::test]
async fn the_rollback_marker_frees_the_key() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let answer = app
        .post(
            "/widgets/1",
            Some(&key),
            &[("x-rollback", "1"), ("x-status", "422")],
            "w",
        )
        .await?;
    ensure!(
        answer.status == 422 && answer.body == b"run 1",
        "{answer:?}"
    );
    ensure!(answer.header("idempotent-replayed").is_none());
    ensure!(is_generated_request_id(answer.request_id()?));
    ensure!(app.rows().await? == 0);
    let retry = app.post("/widgets/1", Some(&key), &[], "w").await?;
    ensure!(retry.status == 201 && retry.body == b"run 2", "{retry:?}");
    ensure!(app.rows().await? == 1);
    app.stop().await
}

#[tokio::test]
async fn rollback_on_reject_keeps_the_key_free() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let json = [("content-type", "application/json")];
    let rejected = app.post("/json", Some(&key), &json, "{not json").await?;
    ensure!(rejected.status == 400, "{rejected:?}");
    let missing_type = app.post("/json", Some(&key), &[], "{}").await?;
    ensure!(missing_type.status == 415, "{missing_type:?}");
    ensure!(app.rows().await? == 0 && app.runs() == 0);
    // Another body with the same key is no conflict: nothing was stored.
    let ok = app.post("/json", Some(&key), &json, r#"{"a":1}"#).await?;
    ensure!(ok.status == 201, "{ok:?}");
    let replay = app
        .post("/json", Some(&key), &json, r#"{ "a" : 1 }"#)
        .await?;
    ensure!(replay.status == 201 && replay.header("idempotent-replayed") == Some("true"));
    ensure!(app.rows().await? == 1);
    app.stop().await
}

#[tokio::test]
async fn a_panicking_handler_is_a_500_problem_and_rolls_back() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let answer = app
        .post("/widgets/1", Some(&key), &[("x-panic", "1")], "w")
        .await?;
    let problem = answer.problem(500, "internal_error")?;
    ensure!(is_generated_request_id(
        problem["request_id"].as_str().unwrap()
    ));
    ensure!(app.rows().await? == 0);
    let retry = app.post("/widgets/1", Some(&key), &[], "w").await?;
    ensure!(retry.status == 201, "the key is not stuck: {retry:?}");
    ensure!(app.rows().await? == 1);
    app.stop().await
}

#[tokio::test]
async fn an_unstorable_response_is_a_500_problem_and_rolls_back() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let answer = app
        .post("/widgets/1", Some(&key), &[("x-binary-header", "1")], "w")
        .await?;
    answer.problem(500, "internal_error")?;
    ensure!(app.rows().await? == 0);
    ensure!(app.post("/widgets/1", Some(&key), &[], "w").await?.status == 201);
    app.stop().await
}

#[tokio::test]
async fn replays_keep_header_order_duplicates_and_bytes() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let first = app
        .post("/widgets/1", Some(&key), &[("x-rich", "1")], "w")
        .await?;
    let replay = app
        .post("/widgets/1", Some(&key), &[("x-rich", "1")], "w")
        .await?;
    ensure!(first.status == 201 && replay.status == 201);
    ensure!(first.body == replay.body && first.body.len() == 256 + 5);
    let listing = |answer: &Answer| -> Vec<(String, Vec<u8>)> {
        answer
            .headers
            .iter()
            .filter(|(n, _)| {
                ![
                    "x-request-id",
                    "idempotent-replayed",
                    "idempotent-replay-of",
                ]
                .contains(&n.as_str())
            })
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    };
    ensure!(
        listing(&first) == listing(&replay),
        "{:?}\n{:?}",
        listing(&first),
        listing(&replay)
    );
    let cookies: Vec<_> = replay.headers.get_all("set-cookie").iter().collect();
    ensure!(cookies == ["a=1", "b=2; Path=/"]);
    let multi: Vec<_> = replay.headers.get_all("x-multi").iter().collect();
    ensure!(multi == ["one", "two"]);
    ensure!(replay.headers["x-utf8"].as_bytes() == "naïve ✓".as_bytes());
    // The replay has its own request id, and names the request it replays.
    ensure!(first.header("idempotent-replay-of").is_none());
    ensure!(replay.request_id()? != first.request_id()?);
    ensure!(replay.header("idempotent-replay-of") == Some(first.request_id()?));
    app.stop().await
}

/// A GET handler on the whole-router app: counts its runs, writes nothing.
async fn listing(State(state): State<AppState>) -> String {
    let run = state.runs.fetch_add(1, Ordering::SeqCst) + 1;
    format!("listing {run}")
}

/// The layer on a whole router, as most users add a tower layer (`Router::layer`): POST
/// and a GET on `/items`, and the router's fallback.
async fn whole_router_app() -> Result<(TestDatabase, Arc<AtomicUsize>, Server)> {
    let scope = scope_from_header(
        HeaderName::from_static("x-account-id"),
        Some(Scope::new("default").unwrap()),
    );
    layered_app(
        pg_idempotency::Config::default(),
        Router::new().route("/items", post(widget).get(listing)),
        |store| IdempotencyLayer::new(store, scope),
    )
    .await
}

/// `routes` on a fresh database with a `widgets` table, behind one layer on the whole
/// router, made by `layer` from a store with `config`; the runs of the handlers counted.
async fn layered_app(
    config: pg_idempotency::Config,
    routes: Router<AppState>,
    layer: impl FnOnce(IdempotencyStore) -> IdempotencyLayer,
) -> Result<(TestDatabase, Arc<AtomicUsize>, Server)> {
    let db = TestDatabase::create().await?;
    sqlx::raw_sql("CREATE TABLE widgets (id bigserial PRIMARY KEY, note text NOT NULL)")
        .execute(db.pool())
        .await?;
    let runs = Arc::new(AtomicUsize::new(0));
    let store = IdempotencyStore::with_config(db.pool().clone(), config);
    let app = routes
        .with_state(AppState {
            runs: Arc::clone(&runs),
            pool: db.pool().clone(),
        })
        .layer(layer(store));
    let server = Server::start(app).await?;
    Ok((db, runs, server))
}

/// Every request in the scope `default`.
fn default_scope(_: &axum::http::request::Parts) -> Result<Scope, pg_idempotency::ScopeError> {
    Scope::new("default")
}

#[tokio::test]
async fn on_a_whole_router_only_post_and_patch_are_guarded() -> Result<()> {
    let (db, runs, server) = whole_router_app().await?;
    let send = async |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut request = client().request(method, server.url(path)).body("note");
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Answer::of(request.send().await?).await
    };
    // GET, HEAD, OPTIONS and TRACE need no key; a GET with a key is neither stored nor
    // replayed.
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let answer = send(method.clone(), "/items", None).await?;
        ensure!(answer.status == 200, "{method}: {answer:?}");
    }
    for method in [reqwest::Method::OPTIONS, reqwest::Method::TRACE] {
        let answer = send(method.clone(), "/items", None).await?;
        ensure!(answer.status == 405, "{method}: {answer:?}");
    }
    let key = new_key();
    let first = send(reqwest::Method::GET, "/items", Some(&key)).await?;
    let second = send(reqwest::Method::GET, "/items", Some(&key)).await?;
    ensure!(
        first.body != second.body && second.header("idempotent-replayed").is_none(),
        "{first:?} {second:?}"
    );
    // A POST still needs its key, and is guarded.
    send(reqwest::Method::POST, "/items", None)
        .await?
        .problem(400, "idempotency_key_missing")?;
    let created = send(reqwest::Method::POST, "/items", Some(&key)).await?;
    let replayed = send(reqwest::Method::POST, "/items", Some(&key)).await?;
    ensure!(created.status == 201 && replayed.header("idempotent-replayed") == Some("true"));
    // A DELETE with the used key passes to the router (405), no conflict.
    let delete = send(reqwest::Method::DELETE, "/items", Some(&key)).await?;
    ensure!(delete.status == 405, "{delete:?}");
    // Answers no handler produced are not stored: the fallback's 404 and a 405 leave the
    // key free for the request the client meant.
    let fresh = new_key();
    let missing = send(reqwest::Method::POST, "/nowhere", Some(&fresh)).await?;
    // The layer saw it (it sets the request id), and stored nothing.
    ensure!(
        missing.status == 404 && missing.header("x-request-id").is_some(),
        "{missing:?}"
    );
    let again = send(reqwest::Method::POST, "/nowhere", Some(&fresh)).await?;
    ensure!(again.status == 404 && again.header("idempotent-replayed").is_none());
    let meant = send(reqwest::Method::POST, "/items", Some(&fresh)).await?;
    ensure!(
        meant.status == 201 && meant.header("idempotent-replayed").is_none(),
        "{meant:?}"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM widgets")
        .fetch_one(db.pool())
        .await?;
    ensure!(rows == 2 && runs.load(Ordering::SeqCst) == 6, "{rows} rows");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(db.pool())
        .await?;
    ensure!(stored == 2, "{stored} stored responses");
    server.stop().await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn optional_keys_pass_through_without_one() -> Result<()> {
    let app = App::start().await?;
    let a = app.post("/optional", None, &[], "").await?;
    let b = app.post("/optional", None, &[], "").await?;
    ensure!(
        a.body == b"plain run 1" && b.body == b"plain run 2",
        "{a:?} {b:?}"
    );
    ensure!(is_generated_request_id(a.request_id()?));
    ensure!(app.rows().await? == 2);
    let key = new_key();
    let c = app.post("/optional", Some(&key), &[], "").await?;
    let d = app.post("/optional", Some(&key), &[], "").await?;
    ensure!(
        c.body == b"claimed run 3" && d.body == c.body,
        "{c:?} {d:?}"
    );
    ensure!(d.header("idempotent-replayed") == Some("true"));
    // A malformed key is still refused on an optional route.
    app.post("/optional", Some("nope"), &[], "")
        .await?
        .problem(400, "idempotency_key_invalid")?;
    ensure!(app.rows().await? == 3);
    app.stop().await
}

#[tokio::test]
async fn custom_key_header_body_limit_and_scope_problem() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let auth = ("authorization", "acct_9");
    // The key is read from X-Idem-Key only.
    let missing = app.post("/custom", Some(&key), &[auth], "small").await?;
    let problem = missing.problem(400, "idempotency_key_missing")?;
    ensure!(problem["param"] == "X-Idem-Key", "{problem}");
    ensure!(problem["detail"].as_str().unwrap().contains("X-Idem-Key"));
    let invalid = app
        .post("/custom", None, &[("x-idem-key", "bad"), auth], "small")
        .await?;
    ensure!(invalid.problem(400, "idempotency_key_invalid")?["param"] == "X-Idem-Key");
    // The application's own problem from the scope function, with our request id.
    let unauthorized = app
        .post("/custom", None, &[("x-idem-key", &key)], "small")
        .await?;
    let problem = unauthorized.problem(401, "unauthorized")?;
    ensure!(problem["type"] == "/errors/unauthorized");
    let too_large = app
        .post(
            "/custom",
            None,
            &[("x-idem-key", &key), auth],
            "seventeen bytes!!",
        )
        .await?;
    let problem = too_large.problem(413, "payload_too_large")?;
    ensure!(
        problem["detail"].as_str().unwrap().contains("16 bytes"),
        "{problem}"
    );
    ensure!(app.runs() == 0 && app.rows().await? == 0);
    let ok = app
        .post(
            "/custom",
            None,
            &[("x-idem-key", &key), auth],
            "sixteen bytes!!!",
        )
        .await?;
    ensure!(ok.status == 201, "{ok:?}");
    let conflict = app
        .post(
            "/custom",
            None,
            &[("x-idem-key", &key), auth],
            "another body",
        )
        .await?;
    let problem = conflict.problem(409, "idempotency_conflict")?;
    let detail = problem["detail"].as_str().unwrap();
    ensure!(
        detail.starts_with(&format!("X-Idem-Key '{key}'")),
        "{detail}"
    );
    app.stop().await
}

#[tokio::test]
async fn the_concrete_path_query_and_method_are_fingerprinted() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let first = app.post("/widgets/1", Some(&key), &[], "same").await?;
    ensure!(first.status == 201);
    // Issue 12: the concrete path and the query string are fingerprinted, not the route
    // template /widgets/{id}: another account's path or another query is another request.
    for other in ["/widgets/2", "/widgets/1?dry_run=true", "/widgets/1?"] {
        app.post(other, Some(&key), &[], "same")
            .await?
            .problem(409, "idempotency_conflict")?;
    }
    let other_method = app
        .send(reqwest::Method::PUT, "/widgets/1", Some(&key), &[], "same")
        .await?;
    other_method.problem(409, "idempotency_conflict")?;
    let other_body = app.post("/widgets/1", Some(&key), &[], "different").await?;
    other_body.problem(409, "idempotency_conflict")?;
    // No header takes part.
    let retry = app
        .post(
            "/widgets/1",
            Some(&key),
            &[("content-type", "text/plain")],
            "same",
        )
        .await?;
    ensure!(retry.body == first.body && retry.header("idempotent-replayed") == Some("true"));
    ensure!(app.rows().await? == 1);
    app.stop().await
}

/// A row stored under fingerprint version 1 (0.1.0, which covered the route template)
/// keeps answering honest retries, as it did then.
#[tokio::test]
async fn rows_stored_under_fingerprint_v1_keep_replaying() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let v1 = pg_idempotency::IdempotentRequest::new("POST", "/widgets/1", b"same")
        .with_route_template("/widgets/{id}")
        .fingerprint_at(1)
        .expect("v1 is known");
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status, \
         headers, body, expires_at) VALUES ('default', $1, $2, $3, 201, '[]', 'from v1', \
         now() + interval '1 hour')",
    )
    .bind(&key)
    .bind(v1.version())
    .bind(v1.hash().as_slice())
    .execute(app.db.pool())
    .await?;
    let retry = app.post("/widgets/1", Some(&key), &[], "same").await?;
    ensure!(retry.status == 201 && retry.body == b"from v1", "{retry:?}");
    ensure!(retry.header("idempotent-replayed") == Some("true"));
    app.post("/widgets/1", Some(&key), &[], "different")
        .await?
        .problem(409, "idempotency_conflict")?;
    ensure!(app.runs() == 0);
    app.stop().await
}

#[tokio::test]
async fn request_ids_are_taken_from_sane_clients() -> Result<()> {
    let app = App::start().await?;
    let answer = app
        .post("/widgets/1", None, &[("x-request-id", "trace-42")], "w")
        .await?;
    let problem = answer.problem(400, "idempotency_key_missing")?;
    ensure!(problem["request_id"] == "trace-42");
    let answer = app
        .post("/widgets/1", None, &[("x-request-id", "<bad id>")], "w")
        .await?;
    let problem = answer.problem(400, "idempotency_key_missing")?;
    ensure!(is_generated_request_id(
        problem["request_id"].as_str().unwrap()
    ));
    // An id in the server's own format is never the client's to give: the server mints
    // another.
    let forged = "req_01HZK2N5GQR9T8X4B6FJW3Y1AS";
    let answer = app
        .post("/widgets/1", None, &[("x-request-id", forged)], "w")
        .await?;
    let problem = answer.problem(400, "idempotency_key_missing")?;
    let id = problem["request_id"].as_str().unwrap();
    ensure!(id != forged && is_generated_request_id(id), "{id}");
    ensure!(answer.request_id()? == id);
    app.stop().await
}

#[tokio::test]
async fn the_extractor_without_a_claim_is_a_500_problem() -> Result<()> {
    let app = App::start().await?;
    app.post("/misused", None, &[], "")
        .await?
        .problem(500, "internal_error")?;
    app.stop().await
}

#[tokio::test]
async fn a_database_outage_is_a_503_problem() -> Result<()> {
    let db = TestDatabase::create().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect(db.url())
        .await?;
    let runs = Arc::new(AtomicUsize::new(0));
    let server = Server::start(router(
        IdempotencyStore::new(pool.clone()),
        Arc::clone(&runs),
    ))
    .await?;
    pool.close().await;
    let answer = Answer::of(
        client()
            .post(server.url("/widgets/1"))
            .header("Idempotency-Key", new_key())
            .body("w")
            .send()
            .await?,
    )
    .await?;
    answer.problem(503, "service_unavailable")?;
    ensure!(answer.header("retry-after") == Some("1"));
    ensure!(runs.load(Ordering::SeqCst) == 0);
    server.stop().await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn an_exhausted_pool_is_a_503_problem_at_the_connection_wait() -> Result<()> {
    let db = TestDatabase::create().await?;
    sqlx::raw_sql("CREATE TABLE widgets (id bigserial PRIMARY KEY, note text NOT NULL)")
        .execute(db.pool())
        .await?;
    // One connection, held by a slow handler; the pool itself would wait 30 s.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect(db.url())
        .await?;
    let store = IdempotencyStore::with_config(
        pool,
        pg_idempotency::Config::default().with_connection_wait(Duration::from_millis(200)),
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let server = Server::start(router(store, Arc::clone(&runs))).await?;
    let url = server.url("/widgets/1");
    let slow = tokio::spawn(post_to(
        url.clone(),
        new_key(),
        &[("x-sleep-ms", "6000")],
        "w",
    ));
    // Once the slow request holds the connection, another one is told at once.
    let mut refused = None;
    for _ in 0..50 {
        let answer = post_to(url.clone(), new_key(), &[], "w").await?;
        if answer.status == 503 {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.context("no request was refused while the slow one ran")?;
    let problem = refused.problem(503, "service_unavailable")?;
    ensure!(refused.header("retry-after") == Some("1"));
    ensure!(
        !problem["detail"].as_str().unwrap_or("").contains("pool"),
        "{problem}"
    );
    ensure!(slow.await??.status == 201);
    server.stop().await?;
    db.close().await?;
    Ok(())
}

/// The widget app at `/items`, its layer buffering bodies of at most 64 bytes under
/// `budget`.
async fn budgeted_app(
    budget: &BodyBudget,
    config: pg_idempotency::Config,
) -> Result<(TestDatabase, Arc<AtomicUsize>, Server)> {
    layered_app(
        config,
        Router::new().route("/items", post(widget)),
        |store| {
            IdempotencyLayer::new(store, default_scope)
                .with_body_limit(64)
                .with_body_budget(budget.clone())
        },
    )
    .await
}

#[tokio::test]
async fn the_body_budget_bounds_what_is_buffered_at_once() -> Result<()> {
    let budget = BodyBudget::new(100);
    let (db, runs, server) = budgeted_app(
        &budget,
        pg_idempotency::Config::default().with_connection_wait(Duration::from_millis(200)),
    )
    .await?;
    let url = server.url("/items");
    let body = |byte: char, len: usize| byte.to_string().repeat(len);

    let slow = {
        let (url, big) = (url.clone(), body('a', 60));
        tokio::spawn(async move { post_to(url, new_key(), &[("x-sleep-ms", "5000")], &big).await })
    };
    until_available(&budget, 40).await?;
    // Over what is left: refused before its body is read, the handler never runs.
    let refused = post_to(url.clone(), new_key(), &[], &body('b', 60)).await?;
    refused.problem(503, "service_unavailable")?;
    ensure!(refused.header("retry-after") == Some("1"));
    // What fits is served.
    let small = post_to(url.clone(), new_key(), &[], &body('c', 30)).await?;
    ensure!(small.status == 201, "{small:?}");
    ensure!(slow.await??.status == 201);
    ensure!(runs.load(Ordering::SeqCst) == 2);
    // Nothing is held once the requests have been answered.
    ensure!(
        budget.available() == 100,
        "{} bytes still held",
        100 - budget.available()
    );
    server.stop().await?;
    db.close().await?;
    Ok(())
}

/// Waits until `bytes` of `budget` are available, as requests take and give back their
/// shares.
async fn until_available(budget: &BodyBudget, bytes: usize) -> Result<()> {
    for _ in 0..500 {
        if budget.available() == bytes {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("{} bytes available, not {bytes}", budget.available())
}

/// Issue 24: a request's wait for the body budget counts against its deadline. A
/// duplicate that waited for the budget longer than its in-flight wait is answered "in
/// flight" as soon as it has its share, not after another in-flight wait (which would
/// have seen its holder finish and replayed).
#[tokio::test]
async fn the_wait_for_the_body_budget_counts_against_the_in_flight_wait() -> Result<()> {
    let budget = BodyBudget::new(100);
    let (db, runs, server) = budgeted_app(
        &budget,
        pg_idempotency::Config::default()
            .with_in_flight_wait(Duration::from_secs(1))
            .with_connection_wait(Duration::from_secs(10)),
    )
    .await?;
    let url = server.url("/items");
    let send = |key: String, sleep_ms: &'static str, body: String| {
        let url = url.clone();
        tokio::spawn(async move { post_to(url, key, &[("x-sleep-ms", sleep_ms)], &body).await })
    };
    // The holder of the key (30 bytes, for 3 s), and a request that holds 60 bytes for
    // 2.5 s: 10 are left.
    let key = new_key();
    let holder = send(key.clone(), "3000", "h".repeat(30));
    until_available(&budget, 70).await?;
    let hog = send(new_key(), "2500", "a".repeat(60));
    until_available(&budget, 10).await?;
    // The duplicate waits for its 30 bytes until the hog is answered, 1.5 s after its
    // in-flight wait ran out, and 0.5 s before the holder finishes.
    let duplicate = post_to(url.clone(), key, &[], &"h".repeat(30)).await?;
    duplicate.problem(409, "idempotency_key_in_use")?;
    ensure!(duplicate.header("retry-after").is_some());
    ensure!(hog.await??.status == 201);
    ensure!(holder.await??.status == 201);
    ensure!(runs.load(Ordering::SeqCst) == 2);
    server.stop().await?;
    db.close().await?;
    Ok(())
}

/// Issue 11: the draft's key syntax, a Structured Field String, and the bare key are one
/// key, under both key policies; a malformed quoted key is refused with the reason.
#[tokio::test]
async fn the_quoted_key_and_the_bare_key_are_one_key() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let quoted = format!("\"{key}\"");
    let first = app.post("/widgets/1", Some(&quoted), &[], "a").await?;
    ensure!(first.status == 201, "{first:?}");
    let bare = app.post("/widgets/1", Some(&key), &[], "a").await?;
    ensure!(bare.header("idempotent-replayed") == Some("true") && bare.body == first.body);
    let upper = format!("\"{}\"", key.to_uppercase());
    let again = app.post("/widgets/1", Some(&upper), &[], "a").await?;
    ensure!(again.header("idempotent-replayed") == Some("true"));

    let opaque = app.post("/opaque", Some("tok-1"), &[], "b").await?;
    ensure!(opaque.status == 201, "{opaque:?}");
    let quoted = app.post("/opaque", Some("\"tok-1\""), &[], "b").await?;
    ensure!(quoted.header("idempotent-replayed") == Some("true") && quoted.body == opaque.body);
    ensure!(app.runs() == 2 && app.rows().await? == 2);

    for (path, raw, says) in [
        ("/widgets/1", format!("\"{key}"), "no closing '\"'"),
        ("/widgets/1", format!("\"{key}\";a=1"), "parameters"),
        ("/opaque", "\"a\\qb\"".to_owned(), "backslash before 'q'"),
        ("/opaque", "\"a\", \"b\"".to_owned(), "exactly one key"),
        ("/widgets/1", format!("\"{key}\" x"), "followed by 'x'"),
    ] {
        let answer = app.post(path, Some(&raw), &[], "a").await?;
        let problem = answer.problem(400, "idempotency_key_invalid")?;
        let detail = problem["detail"].as_str().unwrap_or_default();
        ensure!(detail.contains(says), "{raw}: {detail}");
    }
    // Two header lines stay refused, even when they spell the same key.
    let request = client()
        .post(app.server.url("/widgets/1"))
        .header("Idempotency-Key", format!("\"{key}\""))
        .header("Idempotency-Key", key.clone())
        .body("a");
    let twice = Answer::of(request.send().await?).await?;
    let problem = twice.problem(400, "idempotency_key_invalid")?;
    ensure!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("more than once")
    );
    ensure!(app.runs() == 2 && app.rows().await? == 2);
    app.stop().await
}

/// Issue 11: a layer overrides the TTL, key policy and in-flight wait of the store it
/// wraps; the other routes keep the store's.
#[tokio::test]
async fn routes_override_ttl_key_policy_and_in_flight_wait() -> Result<()> {
    let app = App::start().await?;
    // Key policy: an opaque key only where the route allows it.
    app.post("/widgets/1", Some("tok-2"), &[], "a")
        .await?
        .problem(400, "idempotency_key_invalid")?;
    ensure!(app.post("/opaque", Some("tok-2"), &[], "a").await?.status == 201);

    // TTL: one hour on /opaque, the store's 24 hours elsewhere (database clock).
    ensure!(
        app.post("/widgets/1", Some(&new_key()), &[], "a")
            .await?
            .status
            == 201
    );
    let ttls: Vec<(String, f64)> = sqlx::query_as(
        "SELECT key, extract(epoch FROM expires_at - created_at)::float8
         FROM idempotency_keys ORDER BY key = 'tok-2' DESC",
    )
    .fetch_all(app.db.pool())
    .await?;
    ensure!(
        ttls.len() == 2 && ttls[0].1 == 3600.0 && ttls[1].1 == 86_400.0,
        "{ttls:?}"
    );

    // In-flight wait: zero on /opaque, so a duplicate is refused at once instead of
    // waiting the store's 2 s for the replay.
    let slow = {
        let url = app.server.url("/opaque");
        tokio::spawn(async move {
            let request = client()
                .post(url)
                .header("Idempotency-Key", "tok-3")
                .header("x-sleep-ms", "1500")
                .body("c");
            Answer::of(request.send().await?).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let duplicate = app.post("/opaque", Some("tok-3"), &[], "c").await?;
    let took = started.elapsed();
    duplicate.problem(409, "idempotency_key_in_use")?;
    ensure!(
        took < Duration::from_millis(700),
        "the duplicate waited {took:?}"
    );
    ensure!(slow.await??.status == 201);
    ensure!(app.runs() == 3 && app.rows().await? == 3);
    app.stop().await
}

/// Issue 11: the layer stores who produced a response (request id, traceparent); a
/// conflict names the first request beside its time, and the store hands both back.
#[tokio::test]
async fn provenance_is_stored_and_named_in_conflicts() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let first = app
        .post(
            "/widgets/1",
            Some(&key),
            &[("traceparent", traceparent)],
            "a",
        )
        .await?;
    ensure!(first.status == 201);
    let stored: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT request_id, traceparent FROM idempotency_keys WHERE key = $1")
            .bind(&key)
            .fetch_one(app.db.pool())
            .await?;
    ensure!(
        stored
            == (
                Some(first.request_id()?.to_owned()),
                Some(traceparent.to_owned())
            ),
        "{stored:?}"
    );

    let other = app.post("/widgets/1", Some(&key), &[], "b").await?;
    let problem = other.problem(409, "idempotency_conflict")?;
    let detail = problem["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains(&format!(
            " by request {} with a different request body",
            first.request_id()?
        )),
        "{detail}"
    );

    // A malformed traceparent is not stored; the request id still is.
    let key = new_key();
    let second = app
        .post(
            "/widgets/1",
            Some(&key),
            &[("traceparent", "00-not-a-trace-01")],
            "c",
        )
        .await?;
    let stored: (Option<String>, Option<String>) =
        sqlx::query_as("SELECT request_id, traceparent FROM idempotency_keys WHERE key = $1")
            .bind(&key)
            .fetch_one(app.db.pool())
            .await?;
    ensure!(
        stored == (Some(second.request_id()?.to_owned()), None),
        "{stored:?}"
    );
    app.stop().await
}

/// A POST of `body` with `key` and `headers` to `url`, as a task of its own would send it.
async fn post_to(url: String, key: String, headers: &[(&str, &str)], body: &str) -> Result<Answer> {
    let mut request = client()
        .post(url)
        .header("Idempotency-Key", key)
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    Answer::of(request.send().await?).await
}

/// Issue 12: 300 concurrent duplicates of a request that takes 2 s, on a service whose
/// pool has 16 connections and gives up acquiring one after 1 s, while a bystander sends
/// new requests one after another: the bystander is never refused (no 503), the slow
/// request ran once, every duplicate got its replay or the in-flight answer. How long the
/// bystander waits meanwhile is measured by the goodput benchmark (`--sections review`),
/// not here.
#[tokio::test]
async fn a_duplicate_storm_never_refuses_a_bystander() -> Result<()> {
    let app = App::start_on(|db| {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(1))
            .connect_lazy(db.url())?)
    })
    .await?;
    let bystander = async |i: usize| -> Result<()> {
        let answer = app
            .post(
                &format!("/widgets/b{i}"),
                Some(&new_key()),
                &[],
                "bystander",
            )
            .await?;
        ensure!(answer.status == 201, "the bystander got {answer:?}");
        Ok(())
    };
    // Connections opened, statements prepared.
    for i in 0..50 {
        bystander(i).await?;
    }
    let ran_before = app.runs();

    let key = new_key();
    let url = app.server.url("/widgets/slow");
    let slow = tokio::spawn(post_to(
        url.clone(),
        key.clone(),
        &[("x-sleep-ms", "2000")],
        "slow",
    ));
    while app.runs() == ran_before {
        tokio::task::yield_now().await;
    }
    let storm: Vec<_> = (0..300)
        .map(|_| tokio::spawn(post_to(url.clone(), key.clone(), &[], "slow")))
        .collect();
    let mut loaded = 0;
    while !slow.is_finished() {
        bystander(1000 + loaded).await?;
        loaded += 1;
    }
    ensure!(loaded > 0, "the bystander sent nothing during the storm");
    let first = slow.await??;
    ensure!(first.status == 201, "{first:?}");
    let mut replayed = 0;
    for duplicate in storm {
        let answer = duplicate.await??;
        if answer.status == 201 {
            ensure!(
                answer.body == first.body && answer.header("idempotent-replayed") == Some("true")
            );
            replayed += 1;
        } else {
            answer.problem(409, "idempotency_key_in_use")?;
        }
    }
    ensure!(replayed > 0, "no duplicate was coalesced");
    ensure!(
        app.runs() == ran_before + 1 + loaded,
        "the slow request ran {} times",
        app.runs() - ran_before - loaded
    );
    app.stop().await
}

/// Issue 12: a row an older version stored with framing headers (a `content-length` that
/// disagrees with the body, `transfer-encoding`, `connection`, `upgrade`) replays with
/// its own length, and the keep-alive connection carries the next request.
#[tokio::test]
async fn stored_framing_headers_never_desynchronise_a_replay() -> Result<()> {
    let app = App::start().await?;
    let key = new_key();
    let fingerprint =
        pg_idempotency::IdempotentRequest::new("POST", "/widgets/1", b"same").fingerprint();
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, fingerprint_version, fingerprint, status, \
         headers, body, expires_at) VALUES ('default', $1, $2, $3, 201, \
         '[[\"content-length\",\"999\"],[\"transfer-encoding\",\"chunked\"], \
           [\"connection\",\"close\"],[\"upgrade\",\"h2c\"],[\"x-kept\",\"yes\"]]', \
         'short', now() + interval '1 hour')",
    )
    .bind(&key)
    .bind(fingerprint.version())
    .bind(fingerprint.hash().as_slice())
    .execute(app.db.pool())
    .await?;
    // One client, one keep-alive connection, two replays in a row.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(1)
        .build()?;
    for _ in 0..2 {
        let response = client
            .post(app.server.url("/widgets/1"))
            .header("Idempotency-Key", &key)
            .body("same")
            .send()
            .await?;
        let answer = Answer::of(response).await?;
        ensure!(
            answer.status == 201 && answer.body == b"short",
            "{answer:?}"
        );
        ensure!(answer.header("content-length") == Some("5"), "{answer:?}");
        ensure!(answer.header("x-kept") == Some("yes"), "{answer:?}");
        for framing in ["transfer-encoding", "connection", "upgrade"] {
            ensure!(answer.header(framing).is_none(), "{framing}: {answer:?}");
        }
    }
    ensure!(app.runs() == 0);
    app.stop().await
}

/// Writes a row, then answers 201 with as many bytes of `x` as the request body says,
/// streamed in 1 kB chunks with no declared length.
async fn large(State(state): State<AppState>, mut tx: IdempotentTx, body: Bytes) -> Response {
    sqlx::query("INSERT INTO widgets (note) VALUES ('large')")
        .execute(&mut *tx)
        .await
        .expect("insert");
    state.runs.fetch_add(1, Ordering::SeqCst);
    let len: usize = std::str::from_utf8(&body).unwrap().parse().unwrap();
    let chunks: Vec<Result<Bytes, std::convert::Infallible>> = (0..len)
        .step_by(1024)
        .map(|at| Ok(Bytes::from(vec![b'x'; (len - at).min(1024)])))
        .collect();
    let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
    (StatusCode::CREATED, [("x-large", "yes")], body).into_response()
}

#[tokio::test]
async fn a_response_over_the_cap_is_sent_whole_and_replayed_without_its_body() -> Result<()> {
    let (db, runs, server) = layered_app(
        pg_idempotency::Config::default(),
        Router::new().route("/large", post(large)),
        |store| IdempotencyLayer::new(store, default_scope).with_stored_body_cap(4096),
    )
    .await?;
    let post = async |key: &str, len: usize| {
        post_to(server.url("/large"), key.to_owned(), &[], &len.to_string()).await
    };

    // At the cap: stored and replayed whole.
    let at_cap = new_key();
    let first = post(&at_cap, 4096).await?;
    let replay = post(&at_cap, 4096).await?;
    ensure!(
        first.body.len() == 4096 && replay.body == first.body,
        "{replay:?}"
    );
    ensure!(replay.header("idempotent-replay").is_none());

    // One byte over: the first client gets all of it, the row keeps no body, a replay
    // answers status and headers with an empty body and says so.
    let over = new_key();
    let first = post(&over, 4097).await?;
    ensure!(
        first.status == 201 && first.body == vec![b'x'; 4097],
        "{} bytes",
        first.body.len()
    );
    ensure!(first.header("idempotent-replay").is_none() && first.header("x-large") == Some("yes"));
    let (omitted, stored_bytes): (bool, i32) = sqlx::query_as(
        "SELECT body_omitted, octet_length(body) FROM idempotency_keys WHERE key = $1",
    )
    .bind(&over)
    .fetch_one(db.pool())
    .await?;
    ensure!(
        omitted && stored_bytes == 0,
        "omitted {omitted}, {stored_bytes} bytes stored"
    );
    for _ in 0..2 {
        let replay = post(&over, 4097).await?;
        ensure!(replay.status == 201 && replay.body.is_empty(), "{replay:?}");
        ensure!(
            replay.header("idempotent-replayed") == Some("true")
                && replay.header("idempotent-replay") == Some("omitted")
                && replay.header("x-large") == Some("yes"),
            "{replay:?}"
        );
    }
    // Done once each: the operation counted as done although its body was not stored.
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM widgets")
        .fetch_one(db.pool())
        .await?;
    ensure!(rows == 2 && runs.load(Ordering::SeqCst) == 2, "{rows} rows");
    server.stop().await?;
    db.close().await?;
    Ok(())
}

#[tokio::test]
async fn the_ietf_dialect_answers_422_and_names_its_replay_headers() -> Result<()> {
    let in_flight = *ProblemCatalogue::ietf().kind(Situation::InFlight);
    let dialect = Dialect::ietf().with_problem(
        Situation::InFlight,
        ProblemKind {
            code: "still-running",
            ..in_flight
        },
    );
    let (db, runs, server) = layered_app(
        pg_idempotency::Config::default(),
        Router::new().route("/items", post(widget)),
        |store| {
            IdempotencyLayer::new(store, default_scope)
                .with_key_policy(KeyPolicy::Opaque)
                .with_in_flight_wait(Duration::ZERO)
                .with_dialect(dialect)
        },
    )
    .await?;
    let url = server.url("/items");

    let first = post_to(url.clone(), "k-1".into(), &[], "a").await?;
    let replay = post_to(url.clone(), "k-1".into(), &[], "a").await?;
    ensure!(first.status == 201 && first.header("idempotency-replayed").is_none());
    ensure!(
        replay.header("idempotency-replayed") == Some("true")
            && replay.header("idempotency-replay-of").is_some()
            && replay.header("idempotent-replayed").is_none(),
        "{replay:?}"
    );
    post_to(url.clone(), "k-1".into(), &[], "b")
        .await?
        .problem(422, "fingerprint-mismatch")?;
    let missing = Answer::of(client().post(url.clone()).body("a").send().await?).await?;
    missing.problem(400, "missing-key")?;
    post_to(url.clone(), "\"\"".into(), &[], "a")
        .await?
        .problem(400, "invalid-key")?;
    // The overridden code, on a duplicate while the first still runs.
    let slow = tokio::spawn(post_to(
        url.clone(),
        "k-2".into(),
        &[("x-sleep-ms", "1500")],
        "a",
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let duplicate = post_to(url.clone(), "k-2".into(), &[("x-sleep-ms", "1500")], "a").await?;
    duplicate.problem(409, "still-running")?;
    ensure!(duplicate.header("retry-after").is_some());
    ensure!(slow.await??.status == 201);
    ensure!(runs.load(Ordering::SeqCst) == 2);
    server.stop().await?;
    db.close().await?;
    Ok(())
}
