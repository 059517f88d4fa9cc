//! The payments service: schema, router and handlers. `main.rs` runs it; the HTTP tests
//! (`tests/http_demo.rs`) include this file to run the same router in-process.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, SecondsFormat, Utc};
use pg_idempotency::axum::{
    IdempotencyLayer, IdempotentTx, RequestId, RequestIdLayer, Rollback, scope_from_header,
};
use pg_idempotency::{IdempotencyStore, Problem, Problems, Scope};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgPool;

/// Request bodies above this many bytes get a 413 problem.
pub const BODY_LIMIT: usize = 1024 * 1024;
/// The scope (account) of requests without `X-Account-Id`.
pub const DEFAULT_ACCOUNT: &str = "default";
/// The largest accepted `amount`.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;
/// The largest accepted `delay_ms`.
pub const MAX_DELAY_MS: u64 = 10_000;

/// Connections for requests: in-flight duplicates hold one each while they wait.
pub const POOL_SIZE: u32 = 32;

/// The service's pool. New connections get the store's prepared statements up front
/// (`prepare_connection`), so that their first claim does not have to prepare them.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _meta| Box::pin(pg_idempotency::prepare_connection(conn)))
        .connect(url)
        .await;
    anyhow::Context::context(pool, "connecting to PostgreSQL")
}

/// Applies the idempotency migrations and creates the `payments` table. One statement
/// per string: Citus refuses DDL on a distributed table inside a multi-statement string,
/// and the demo must restart on a database whose tables an operator distributed
/// (`pg-idempotency distribute --colocate payments:account`). The primary key starts
/// with `account`, the tenant column, so that the table can be distributed by it (Citus
/// wants the distribution column in every unique constraint), and it serves the
/// per-account count.
pub async fn prepare(pool: &PgPool) -> anyhow::Result<()> {
    pg_idempotency::migrate(pool).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS payments (
            id         uuid NOT NULL DEFAULT gen_random_uuid(),
            account    text NOT NULL,
            amount     bigint NOT NULL CHECK (amount > 0),
            currency   text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (account, id)
        )",
    )
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Clone)]
struct AppState {
    store: IdempotencyStore,
    /// Spelled like the idempotency layer's problems.
    problems: Problems,
}

impl AppState {
    fn problem(&self, request_id: &RequestId, build: impl FnOnce(&Problems) -> Problem) -> Problem {
        build(&self.problems).with_request_id(request_id.as_str())
    }
}

/// The service: `POST /v1/payments` (idempotent), `GET /v1/payments/count`,
/// `GET /healthz`; every response has an `X-Request-Id`, every error is a problem.
pub fn router(store: IdempotencyStore) -> Router {
    let default_account = Scope::new(DEFAULT_ACCOUNT).expect("a valid scope");
    let idempotency = IdempotencyLayer::new(
        store.clone(),
        scope_from_header(
            axum::http::HeaderName::from_static("x-account-id"),
            Some(default_account),
        ),
    )
    .with_body_limit(BODY_LIMIT);
    let problems = idempotency.problems().clone();
    Router::new()
        .route(
            "/v1/payments",
            post(create_payment).route_layer(idempotency),
        )
        .route("/v1/payments/count", get(count_payments))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { store, problems })
        .layer(RequestIdLayer::new())
}

/// A payment request, validated.
#[derive(Debug)]
struct NewPayment {
    amount: i64,
    currency: String,
    delay: Duration,
}

/// What is wrong with a body: the field at fault (if any) and a message.
type Invalid = (Option<String>, String);

/// Validates the body. Unknown fields are refused (a typo such as `"ammount"` must not
/// pass unnoticed in a payments API); `delay_ms: null` counts as absent.
fn parse_payment(body: &[u8]) -> Result<NewPayment, Invalid> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| (None, format!("The body is not valid JSON: {e}.")))?;
    let Value::Object(fields) = value else {
        return Err((None, "The body must be a JSON object.".to_owned()));
    };
    if let Some(twice) = duplicate_field(body) {
        return Err((
            Some(twice),
            "This field appears more than once: send each field once.".to_owned(),
        ));
    }
    let amount = match fields.get("amount") {
        None => return Err((Some("amount".to_owned()), "amount is required.".to_owned())),
        Some(v) => v
            .as_i64()
            .filter(|a| (1..=MAX_AMOUNT).contains(a))
            .ok_or_else(|| {
                (
                    Some("amount".to_owned()),
                    format!("amount must be an integer from 1 to {MAX_AMOUNT} (minor units)."),
                )
            })?,
    };
    let currency = match fields.get("currency") {
        None => {
            return Err((
                Some("currency".to_owned()),
                "currency is required.".to_owned(),
            ));
        }
        Some(Value::String(c)) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) => {
            c.clone()
        }
        Some(_) => {
            return Err((
                Some("currency".to_owned()),
                "currency must be three upper-case letters, such as \"EUR\".".to_owned(),
            ));
        }
    };
    let delay_ms = match fields.get("delay_ms") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().filter(|d| *d <= MAX_DELAY_MS).ok_or_else(|| {
            (
                Some("delay_ms".to_owned()),
                format!("delay_ms must be an integer from 0 to {MAX_DELAY_MS}."),
            )
        })?,
    };
    if let Some(unknown) = unknown_field(&fields) {
        return Err((
            Some(unknown),
            "Unknown field: only amount, currency and delay_ms are accepted.".to_owned(),
        ));
    }
    Ok(NewPayment {
        amount,
        currency,
        delay: Duration::from_millis(delay_ms),
    })
}

/// The first top-level field that appears twice. `serde_json::Value` keeps only the last
/// one, and another parser might keep the first: a payment must not be ambiguous.
fn duplicate_field(body: &[u8]) -> Option<String> {
    /// The object's members in order, duplicates included.
    struct Members(Vec<String>);
    impl<'de> Deserialize<'de> for Members {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Names;
            impl<'de> Visitor<'de> for Names {
                type Value = Members;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                    let mut names = Vec::new();
                    while let Some((name, IgnoredAny)) = map.next_entry::<String, IgnoredAny>()? {
                        names.push(name);
                    }
                    Ok(Members(names))
                }
            }
            deserializer.deserialize_map(Names)
        }
    }
    let Members(names) = serde_json::from_slice(body).ok()?;
    let mut seen = std::collections::HashSet::new();
    names
        .into_iter()
        .find(|name| !seen.insert(name.clone()))
        .map(|name| name.chars().take(64).collect())
}

/// The first field that is not one of ours (its name cut to 64 characters).
fn unknown_field(fields: &Map<String, Value>) -> Option<String> {
    fields
        .keys()
        .find(|k| !matches!(k.as_str(), "amount" | "currency" | "delay_ms"))
        .map(|k| k.chars().take(64).collect())
}

/// The 201 body.
#[derive(Serialize)]
struct Payment {
    id: String,
    account: String,
    amount: i64,
    currency: String,
    created_at: String,
}

async fn create_payment(
    State(state): State<AppState>,
    request_id: RequestId,
    mut tx: IdempotentTx,
    body: Bytes,
) -> Response {
    let payment = match parse_payment(&body) {
        Ok(payment) => payment,
        // Nothing written: roll back, keep the key free for a corrected retry.
        Err((param, detail)) => {
            let problem = state.problem(&request_id, |problems| {
                problems.invalid_request(param.as_deref(), detail)
            });
            return (Rollback, problem).into_response();
        }
    };
    let account = tx.scope().to_string();
    let inserted: Result<(String, DateTime<Utc>), sqlx::Error> = sqlx::query_as(
        "INSERT INTO payments (account, amount, currency) VALUES ($1, $2, $3)
         RETURNING id::text, created_at",
    )
    .bind(&account)
    .bind(payment.amount)
    .bind(&payment.currency)
    .fetch_one(&mut *tx)
    .await;
    let (id, created_at) = match inserted {
        Ok(row) => row,
        Err(error) => {
            tracing::error!(%error, "inserting the payment failed");
            // 5xx: not stored, the layer rolls back.
            let retry = state.store.config().retry_after();
            return state
                .problem(&request_id, |problems| problems.service_unavailable(retry))
                .into_response();
        }
    };
    // The "business step" takes a while, inside the transaction: retries sent meanwhile
    // wait for it, then replay its answer (or get 409 idempotency_key_in_use).
    tokio::time::sleep(payment.delay).await;
    tracing::info!(%id, %account, amount = payment.amount, "payment created");
    let body = Payment {
        id,
        account,
        amount: payment.amount,
        currency: payment.currency,
        created_at: created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
    };
    (StatusCode::CREATED, axum::Json(body)).into_response()
}

#[derive(Deserialize)]
struct CountQuery {
    account: Option<String>,
}

async fn count_payments(
    State(state): State<AppState>,
    request_id: RequestId,
    query: Result<Query<CountQuery>, QueryRejection>,
) -> Response {
    let invalid = |detail: String| {
        state
            .problem(&request_id, |problems| {
                problems.invalid_request(Some("account"), detail)
            })
            .into_response()
    };
    let account = match query {
        Ok(Query(CountQuery { account: None })) => None,
        Ok(Query(CountQuery {
            account: Some(account),
        })) => match Scope::new(account) {
            Ok(scope) => Some(scope),
            Err(error) => return invalid(format!("account is not a valid account id: {error}.")),
        },
        Err(rejection) => return invalid(format!("The query string is not valid: {rejection}.")),
    };
    let pool = state.store.pool();
    let count: Result<i64, sqlx::Error> = match &account {
        None => {
            sqlx::query_scalar("SELECT count(*) FROM payments")
                .fetch_one(pool)
                .await
        }
        Some(account) => {
            sqlx::query_scalar("SELECT count(*) FROM payments WHERE account = $1")
                .bind(account.as_str())
                .fetch_one(pool)
                .await
        }
    };
    match count {
        Ok(count) => axum::Json(serde_json::json!({ "count": count })).into_response(),
        Err(error) => {
            tracing::error!(%error, "counting payments failed");
            let retry = state.store.config().retry_after();
            state
                .problem(&request_id, |problems| problems.service_unavailable(retry))
                .into_response()
        }
    }
}

async fn healthz(State(state): State<AppState>, request_id: RequestId) -> Response {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(state.store.pool());
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => axum::Json(serde_json::json!({ "status": "ok" })).into_response(),
        _ => state
            .problem(&request_id, |problems| {
                problems.service_unavailable(Duration::from_secs(1))
            })
            .into_response(),
    }
}

async fn not_found(State(state): State<AppState>, request_id: RequestId) -> Response {
    state
        .problem(&request_id, |problems| {
            problems.custom(
                "not-found",
                404,
                "Not found",
                "There is no resource at this path.",
                "not_found",
                "check_url",
            )
        })
        .into_response()
}

async fn method_not_allowed(State(state): State<AppState>, request_id: RequestId) -> Response {
    state
        .problem(&request_id, |problems| {
            problems.custom(
                "method-not-allowed",
                405,
                "Method not allowed",
                "This resource does not support the request's method.",
                "method_not_allowed",
                "check_method",
            )
        })
        .into_response()
}
