//! A fake card processor that dedupes as real ones do: `POST /charge` with an
//! `Idempotency-Key` header and a JSON body `{"amount", "currency"}` charges once per key
//! and answers a repeated call with the same charge, but refuses (422) a key it has seen
//! with other parameters; `GET /charges/{key}` shows the charge made with a key (its id,
//! amount and currency); `GET /stats` counts calls, distinct keys and refusals. State
//! lives in memory, for the life of the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// What a charge is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Parameters {
    amount: i64,
    currency: String,
}

/// A charge made with one key.
#[derive(Debug, Clone, Serialize)]
struct Charge {
    charge_id: String,
    #[serde(flatten)]
    parameters: Parameters,
}

#[derive(Default)]
struct Ledger {
    calls: u64,
    /// Calls refused because their key was used with other parameters.
    refused: u64,
    /// Downstream key → charge.
    charges: HashMap<String, Charge>,
}

#[derive(Clone)]
struct Processor {
    ledger: Arc<Mutex<Ledger>>,
    delay: Duration,
}

impl Processor {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The processor's routes; each charge takes `delay`.
pub fn router(delay: Duration) -> Router {
    Router::new()
        .route("/charge", post(charge))
        .route("/charges/{key}", get(charge_of))
        .route("/stats", get(stats))
        .with_state(Processor {
            ledger: Arc::default(),
            delay,
        })
}

async fn charge(State(processor): State<Processor>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
    else {
        return (StatusCode::BAD_REQUEST, "Idempotency-Key is required").into_response();
    };
    let Ok(parameters) = serde_json::from_slice::<Parameters>(&body) else {
        return (StatusCode::BAD_REQUEST, "send {\"amount\", \"currency\"}").into_response();
    };
    processor.ledger().calls += 1;
    tokio::time::sleep(processor.delay).await;
    let mut ledger = processor.ledger();
    let next = ledger.charges.len() + 1;
    let charge = ledger
        .charges
        .entry(key)
        .or_insert_with(|| Charge {
            charge_id: format!("ch_{next:08}"),
            parameters: parameters.clone(),
        })
        .clone();
    if charge.parameters != parameters {
        ledger.refused += 1;
        let refusal = json!({
            "error": "idempotency_key_reused",
            "detail": "this key was used for a charge with other parameters",
        });
        return (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(refusal)).into_response();
    }
    axum::Json(charge).into_response()
}

async fn charge_of(State(processor): State<Processor>, Path(key): Path<String>) -> Response {
    match processor.ledger().charges.get(&key) {
        Some(charge) => axum::Json(charge.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn stats(State(processor): State<Processor>) -> Response {
    let ledger = processor.ledger();
    axum::Json(json!({
        "calls": ledger.calls,
        "distinct_keys": ledger.charges.len(),
        "refused": ledger.refused,
    }))
    .into_response()
}
