//! A fake card processor: `POST /charge` dedupes by its `Idempotency-Key` header,
//! `GET /charges/{key}` answers the charge made with a key, `GET /stats` counts calls and
//! distinct keys. State lives in memory, for the life of the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

#[derive(Default)]
struct Ledger {
    calls: u64,
    /// Downstream key → charge id.
    charges: HashMap<String, String>,
}

#[derive(Clone)]
struct Processor {
    ledger: Arc<Mutex<Ledger>>,
    delay: Duration,
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

async fn charge(State(processor): State<Processor>, headers: HeaderMap) -> Response {
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
    else {
        return (StatusCode::BAD_REQUEST, "Idempotency-Key is required").into_response();
    };
    processor
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .calls += 1;
    tokio::time::sleep(processor.delay).await;
    let mut ledger = processor
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let next = ledger.charges.len() + 1;
    let id = ledger
        .charges
        .entry(key)
        .or_insert_with(|| format!("ch_{next:08}"))
        .clone();
    axum::Json(json!({ "charge_id": id })).into_response()
}

async fn charge_of(State(processor): State<Processor>, Path(key): Path<String>) -> Response {
    let ledger = processor
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match ledger.charges.get(&key) {
        Some(id) => axum::Json(json!({ "charge_id": id })).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn stats(State(processor): State<Processor>) -> Response {
    let ledger = processor
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    axum::Json(json!({ "calls": ledger.calls, "distinct_keys": ledger.charges.len() }))
        .into_response()
}
