//! The payments service: schema, router and handlers. `main.rs` runs it; the HTTP tests
//! (`tests/http_demo.rs`, `tests/phased_demo.rs`) include this file to run the same router
//! in-process.
//!
//! Payments are transactional (one transaction per request); charges are phased requests
//! (`pg_idempotency::phased`): the charge is recorded, the card processor is called with a
//! downstream key outside any transaction, and its answer is recorded with the response.
//!
//! The routes are documented with utoipa (`#[utoipa::path]` on each handler, collected by
//! utoipa-axum's `OpenApiRouter`, so that the document lists exactly the routes served),
//! and the idempotency layer's policy is written into the document by
//! `IdempotencyPolicy`: `GET /openapi.json`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, SecondsFormat, Utc};
use pg_idempotency::axum::{
    IdempotencyLayer, IdempotencyPolicy, IdempotentTx, PhasedRequest, RequestId, RequestIdLayer,
    Rollback, scope_from_header,
};
use pg_idempotency::phased::{Finished, Operation, Steps};
use pg_idempotency::{IdempotencyStore, Problem, ProblemKind, Problems, Scope, StoredResponse};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sqlx::PgPool;
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

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

/// Applies the idempotency migrations and creates the `payments` and `charges` tables.
/// One statement per string: Citus refuses DDL on a distributed table inside a
/// multi-statement string, and the demo must restart on a database whose tables an
/// operator distributed (`pg-idempotency distribute --colocate payments:account
/// --colocate charges:account`). The primary keys start with `account`, the tenant
/// column, so that the tables can be distributed by it (Citus wants the distribution
/// column in every unique constraint), and they serve the per-account counts.
pub async fn prepare(pool: &PgPool) -> anyhow::Result<()> {
    pg_idempotency::migrate(pool).await?;
    // Simple queries (`raw_sql`): one exchange each, also through a pooler.
    sqlx::raw_sql(
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
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS charges (
            id                  uuid NOT NULL DEFAULT gen_random_uuid(),
            account             text NOT NULL,
            amount              bigint NOT NULL CHECK (amount > 0),
            currency            text NOT NULL,
            status              text NOT NULL DEFAULT 'pending',
            processor_key       uuid NOT NULL,
            processor_charge_id text,
            created_at          timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (account, id)
        )",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The card processor the charges call: `POST {url}/charge` with the downstream key as
/// its `Idempotency-Key` (the fake one: `cargo run --example processor`).
#[derive(Clone)]
pub struct Charges {
    processor_url: String,
    http: reqwest::Client,
}

impl Charges {
    /// Charges through the processor at `processor_url` (`http://127.0.0.1:3001`).
    pub fn new(processor_url: &str) -> Self {
        Self {
            processor_url: processor_url.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("an HTTP client"),
        }
    }

    /// Asks the processor for a charge; the same `downstream_key` always gets the same
    /// charge id.
    async fn call_processor(
        &self,
        downstream_key: uuid::Uuid,
        charge: &ChargeInput,
    ) -> anyhow::Result<String> {
        let body = serde_json::json!({ "amount": charge.amount, "currency": charge.currency });
        let response = self
            .http
            .post(format!("{}/charge", self.processor_url))
            .header("idempotency-key", downstream_key.to_string())
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await?;
        anyhow::ensure!(
            response.status().is_success(),
            "the processor answered {}",
            response.status()
        );
        let answer: Value = serde_json::from_slice(&response.bytes().await?)?;
        answer["charge_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("the processor's answer has no charge_id"))
    }
}

/// What a charge records before its first step: everything its steps need, so that the
/// completer can finish it without the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChargeInput {
    account: String,
    amount: i64,
    currency: String,
}

/// The charge row as the first step recorded it.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    id: String,
    created_at: String,
}

impl Operation for Charges {
    const NAME: &'static str = "demo.charge";
    type Input = ChargeInput;
    type Error = anyhow::Error;

    async fn run(&self, input: &ChargeInput, steps: &mut Steps) -> anyhow::Result<Finished> {
        // The key the processor dedupes this charge by, kept with the charge so that it can
        // be reconciled with the processor's records.
        let processor_key = steps.downstream_key("call_processor");
        let charge: Recorded = steps
            .local("record_charge", async |tx| {
                let (id, created_at): (String, DateTime<Utc>) = sqlx::query_as(
                    "INSERT INTO charges (account, amount, currency, processor_key)
                     VALUES ($1, $2, $3, $4) RETURNING id::text, created_at",
                )
                .bind(&input.account)
                .bind(input.amount)
                .bind(&input.currency)
                .bind(processor_key)
                .fetch_one(&mut *tx)
                .await?;
                let created_at = created_at.to_rfc3339_opts(SecondsFormat::Micros, true);
                Ok::<_, anyhow::Error>(Recorded { id, created_at })
            })
            .await?;
        let processor_charge_id: String = steps
            .foreign("call_processor", async |downstream_key| {
                self.call_processor(downstream_key, input).await
            })
            .await?;
        steps
            .finish(async |tx| {
                sqlx::query(
                    "UPDATE charges SET status = 'succeeded', processor_charge_id = $1
                     WHERE account = $2 AND id = $3::uuid",
                )
                .bind(&processor_charge_id)
                .bind(&input.account)
                .bind(&charge.id)
                .execute(&mut *tx)
                .await?;
                let body = serde_json::json!({
                    "id": charge.id,
                    "account": input.account,
                    "amount": input.amount,
                    "currency": input.currency,
                    "status": "succeeded",
                    "processor_charge_id": processor_charge_id,
                    "created_at": charge.created_at,
                });
                Ok::<_, anyhow::Error>(
                    StoredResponse::new(201, body.to_string())
                        .with_header("content-type", "application/json"),
                )
            })
            .await
    }
}

#[derive(Clone)]
struct AppState {
    store: IdempotencyStore,
    charges: Arc<Charges>,
    /// Spelled like the idempotency layer's problems.
    problems: Problems,
}

impl AppState {
    fn problem(&self, request_id: &RequestId, build: impl FnOnce(&Problems) -> Problem) -> Problem {
        build(&self.problems).with_request_id(request_id.as_str())
    }

    /// 400 for an invalid body. Nothing was written: the key stays free for a corrected
    /// retry (`Rollback`).
    fn invalid_body(&self, request_id: &RequestId, (param, detail): Invalid) -> Response {
        let problem = self.problem(request_id, |problems| {
            problems.invalid_request(param.as_deref(), detail)
        });
        (Rollback, problem).into_response()
    }
}

/// The service: `POST /v1/payments` (idempotent), `POST /v1/charges` (idempotent,
/// phased), `GET /v1/payments/count`, `GET /v1/charges/count`, `GET /healthz`, and their
/// OpenAPI document with the idempotency policy, `GET /openapi.json`; every response has
/// an `X-Request-Id`, every error is a problem.
///
/// **The demo trusts `X-Account-Id`: the scope comes from a header the client chooses, a demo's
/// shortcut, unsafe in a real service.** Anyone who knows a key and can guess the body
/// reads another account's stored payment. A real service takes the scope from
/// authentication (the authenticated account or principal).
pub fn router(store: IdempotencyStore, charges: Arc<Charges>) -> Router {
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
    let (routes, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_payment).map(|route| route.route_layer(idempotency.clone())))
        .routes(routes!(create_charge).map(|route| route.route_layer(idempotency.clone().phased())))
        .routes(routes!(count_payments))
        .routes(routes!(count_charges))
        .routes(routes!(healthz))
        .split_for_parts();
    // What the layer on the two POST routes does (phased or not, the HTTP contract is
    // the same), read from its settings. GET passes the layer untouched: the counts are
    // left alone.
    IdempotencyPolicy::new(&idempotency)
        .on_paths(["/v1/payments", "/v1/charges"])
        .apply(&mut document);
    let document = Bytes::from(document.to_pretty_json().expect("a serializable document"));
    routes
        .route("/openapi.json", get(move || openapi_json(document.clone())))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState {
            store,
            charges,
            problems,
        })
        .layer(RequestIdLayer::new())
}

/// The document's head; utoipa-axum adds the routes.
#[derive(OpenApi)]
#[openapi(info(
    title = "pg-idempotency payments demo",
    description = "Exactly-once payments and charges over PostgreSQL. **The demo trusts \
        `X-Account-Id`**: a real service takes the account from authentication."
))]
struct ApiDoc;

/// `GET /openapi.json`: the document, serialized once when the router was built.
async fn openapi_json(document: Bytes) -> Response {
    ([(CONTENT_TYPE, "application/json")], document).into_response()
}

/// The body of `POST /v1/payments`, for the document (`parse_payment` reads the body field
/// by field and refuses any other field).
#[derive(ToSchema)]
#[allow(dead_code)] // never built: it describes what `parse_payment` accepts
struct PaymentBody {
    /// In minor units (cents), 1 to 10^12.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    amount: i64,
    /// Three upper-case letters, such as `EUR`.
    #[schema(pattern = "^[A-Z]{3}$")]
    currency: String,
    /// How long the business step takes, in milliseconds, inside the transaction (0 to
    /// 10000; default 0).
    #[schema(maximum = 10_000)]
    delay_ms: Option<u64>,
}

/// The body of `POST /v1/charges`, for the document.
#[derive(ToSchema)]
#[allow(dead_code)] // never built: it describes what `parse_payment` accepts
struct ChargeBody {
    /// In minor units (cents), 1 to 10^12.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    amount: i64,
    /// Three upper-case letters, such as `EUR`.
    #[schema(pattern = "^[A-Z]{3}$")]
    currency: String,
}

/// A charge as `POST /v1/charges` answers it, for the document (the final step writes
/// it as JSON).
#[derive(ToSchema)]
#[allow(dead_code)] // never built: the final step writes the JSON itself
struct Charge {
    id: String,
    account: String,
    amount: i64,
    currency: String,
    /// `succeeded`.
    status: String,
    /// The card processor's id of the charge.
    processor_charge_id: String,
    created_at: String,
}

/// `{"count": N}`, for the document.
#[derive(ToSchema)]
#[allow(dead_code)] // never built: `count` writes the JSON itself
struct Count {
    count: i64,
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

/// The fields of a payment body.
const PAYMENT_FIELDS: &[&str] = &["amount", "currency", "delay_ms"];
/// The fields of a charge body.
const CHARGE_FIELDS: &[&str] = &["amount", "currency"];

/// Validates the body, whose fields may be those in `accepted`. Unknown fields are
/// refused (a typo such as `"ammount"` must not pass unnoticed in a payments API);
/// `delay_ms: null` counts as absent.
fn parse_payment(body: &[u8], accepted: &[&str]) -> Result<NewPayment, Invalid> {
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
    if let Some(unknown) = unknown_field(&fields, accepted) {
        return Err((
            Some(unknown),
            format!("Unknown field: only {} are accepted.", accepted.join(", ")),
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

/// The first field that is not in `accepted` (its name cut to 64 characters).
fn unknown_field(fields: &Map<String, Value>, accepted: &[&str]) -> Option<String> {
    fields
        .keys()
        .find(|k| !accepted.contains(&k.as_str()))
        .map(|k| k.chars().take(64).collect())
}

/// The 201 body.
#[derive(Serialize, ToSchema)]
struct Payment {
    id: String,
    account: String,
    amount: i64,
    currency: String,
    created_at: String,
}

/// Creates a payment, exactly once per key.
#[utoipa::path(
    post,
    path = "/v1/payments",
    tag = "payments",
    params(("X-Account-Id" = Option<String>, Header,
        description = "The account the key belongs to (default `default`). The demo trusts \
            this header; a real service takes the account from authentication.")),
    request_body(content = PaymentBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The payment was created.", body = Payment),
        (status = 400, description = "The body is not a valid payment; nothing was written \
            and the key is still free.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The payment could not be written; retry with the same key.",
            body = Problem, content_type = "application/problem+json"),
    )
)]
async fn create_payment(
    State(state): State<AppState>,
    request_id: RequestId,
    mut tx: IdempotentTx,
    body: Bytes,
) -> Response {
    let payment = match parse_payment(&body, PAYMENT_FIELDS) {
        Ok(payment) => payment,
        Err(invalid) => return state.invalid_body(&request_id, invalid),
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

/// `POST /v1/charges`: a phased request. Nothing is written for an invalid body (the key
/// stays free); a failed step answers 503 and the charge resumes on a retry (or in the
/// completer) after its last recorded step.
#[utoipa::path(
    post,
    path = "/v1/charges",
    tag = "charges",
    params(("X-Account-Id" = Option<String>, Header,
        description = "The account the key belongs to (default `default`). The demo trusts \
            this header; a real service takes the account from authentication.")),
    request_body(content = ChargeBody, content_type = "application/json"),
    responses(
        (status = 201, description = "The card was charged.", body = Charge),
        (status = 400, description = "The body is not a valid charge; nothing was written \
            and the key is still free.", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A step failed; a retry with the same key resumes the \
            charge after its last recorded step.", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn create_charge(
    State(state): State<AppState>,
    request_id: RequestId,
    phased: PhasedRequest,
    body: Bytes,
) -> Response {
    let charge = match parse_payment(&body, CHARGE_FIELDS) {
        Ok(charge) => charge,
        Err(invalid) => return state.invalid_body(&request_id, invalid),
    };
    let input = ChargeInput {
        account: phased.scope().to_string(),
        amount: charge.amount,
        currency: charge.currency,
    };
    match phased.run(&*state.charges, input).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "a charge stopped; a retry resumes it");
            let retry = state.store.config().retry_after();
            state
                .problem(&request_id, |problems| problems.service_unavailable(retry))
                .into_response()
        }
    }
}

#[derive(Deserialize)]
struct CountQuery {
    account: Option<String>,
}

/// A table `GET /v1/{table}/count` counts rows of.
#[derive(Clone, Copy)]
enum Counted {
    Payments,
    Charges,
}

impl Counted {
    fn sql(self, by_account: bool) -> &'static str {
        match (self, by_account) {
            (Self::Payments, false) => "SELECT count(*) FROM payments",
            (Self::Payments, true) => "SELECT count(*) FROM payments WHERE account = $1",
            (Self::Charges, false) => "SELECT count(*) FROM charges",
            (Self::Charges, true) => "SELECT count(*) FROM charges WHERE account = $1",
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/payments/count",
    tag = "payments",
    params(("account" = Option<String>, Query, description = "Count only this account's payments.")),
    responses(
        (status = 200, description = "The number of payments.", body = Count),
        (status = 400, description = "`account` is not a valid account id.", body = Problem,
            content_type = "application/problem+json"),
        (status = 503, description = "The database could not be reached.", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn count_payments(
    state: State<AppState>,
    request_id: RequestId,
    query: Result<Query<CountQuery>, QueryRejection>,
) -> Response {
    count(state, request_id, query, Counted::Payments).await
}

#[utoipa::path(
    get,
    path = "/v1/charges/count",
    tag = "charges",
    params(("account" = Option<String>, Query, description = "Count only this account's charges.")),
    responses(
        (status = 200, description = "The number of charges.", body = Count),
        (status = 400, description = "`account` is not a valid account id.", body = Problem,
            content_type = "application/problem+json"),
        (status = 503, description = "The database could not be reached.", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn count_charges(
    state: State<AppState>,
    request_id: RequestId,
    query: Result<Query<CountQuery>, QueryRejection>,
) -> Response {
    count(state, request_id, query, Counted::Charges).await
}

async fn count(
    State(state): State<AppState>,
    request_id: RequestId,
    query: Result<Query<CountQuery>, QueryRejection>,
    table: Counted,
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
    // In a transaction: behind a pooler in transaction mode, a statement with bound
    // parameters outside one may reach two server connections (docs/OPERATIONS.md,
    // "Poolers").
    let count: Result<i64, sqlx::Error> = async {
        let mut tx = state.store.pool().begin().await?;
        let count = match &account {
            None => {
                sqlx::query_scalar(table.sql(false))
                    .fetch_one(&mut *tx)
                    .await?
            }
            Some(account) => {
                sqlx::query_scalar(table.sql(true))
                    .bind(account.as_str())
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        tx.commit().await?;
        Ok(count)
    }
    .await;
    match count {
        Ok(count) => axum::Json(serde_json::json!({ "count": count })).into_response(),
        Err(error) => {
            tracing::error!(%error, "counting rows failed");
            let retry = state.store.config().retry_after();
            state
                .problem(&request_id, |problems| problems.service_unavailable(retry))
                .into_response()
        }
    }
}

/// 200 once the database answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "The database answers: `{\"status\": \"ok\"}`."),
        (status = 503, description = "The database does not answer.", body = Problem,
            content_type = "application/problem+json"),
    )
)]
async fn healthz(State(state): State<AppState>, request_id: RequestId) -> Response {
    // A simple query: one exchange, whatever pooler is in between.
    let ping = sqlx::raw_sql("SELECT 1").execute(state.store.pool());
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => axum::Json(serde_json::json!({ "status": "ok" })).into_response(),
        _ => state
            .problem(&request_id, |problems| {
                problems.service_unavailable(Duration::from_secs(1))
            })
            .into_response(),
    }
}

const NOT_FOUND: ProblemKind = ProblemKind {
    slug: "not-found",
    status: 404,
    title: "Not found",
    code: "not_found",
    advice_code: "check_url",
};

const METHOD_NOT_ALLOWED: ProblemKind = ProblemKind {
    slug: "method-not-allowed",
    status: 405,
    title: "Method not allowed",
    code: "method_not_allowed",
    advice_code: "check_method",
};

async fn not_found(State(state): State<AppState>, request_id: RequestId) -> Response {
    state
        .problem(&request_id, |problems| {
            problems.custom(&NOT_FOUND, "There is no resource at this path.")
        })
        .into_response()
}

async fn method_not_allowed(State(state): State<AppState>, request_id: RequestId) -> Response {
    state
        .problem(&request_id, |problems| {
            problems.custom(
                &METHOD_NOT_ALLOWED,
                "This resource does not support the request's method.",
            )
        })
        .into_response()
}
