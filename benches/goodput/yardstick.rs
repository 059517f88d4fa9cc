//! The duplicate storm's yardstick: a service without the crate, answering the storm's
//! requests as the demo does, so that what the storm costs another tenant there tells
//! the HTTP server's and the machine's part from the crate's.
//!
//! `POST /v1/payments` as the demo takes it (`Idempotency-Key`, `X-Account-Id`, a JSON
//! body with `delay_ms`): the first request of a key waits `delay_ms`, then writes its
//! payment in a bare `BEGIN; INSERT; COMMIT` and answers 201; the requests of that key
//! that arrive meanwhile wait for it in memory and get the same answer (a tokio
//! `OnceCell` per key), those after it at once. No key row, no fingerprint, nothing
//! durable: what an idempotency layer cannot cost less than.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::OnceCell;

use crate::serve;

/// The demo's pool size (`examples/payments/app.rs`, `POOL_SIZE`).
const POOL_SIZE: u32 = 32;

type Answers = Mutex<HashMap<(String, String), Arc<OnceCell<Bytes>>>>;

#[derive(Clone)]
struct Yardstick {
    pool: PgPool,
    answers: Arc<Answers>,
}

/// Serves the yardstick on a free port of 127.0.0.1, announced as the demo announces
/// its own, until SIGTERM.
pub async fn serve(database_url: &str) -> Result<()> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .connect(database_url)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS yardstick_payments (
            id bigserial PRIMARY KEY,
            account text NOT NULL,
            amount bigint NOT NULL
        )",
    )
    .execute(&pool)
    .await?;
    let app = Router::new()
        .route("/v1/payments", post(pay))
        .with_state(Yardstick {
            pool: pool.clone(),
            answers: Arc::default(),
        });
    let listener = serve::listen(0).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(serve::shutdown_signal())
        .await?;
    pool.close().await;
    Ok(())
}

async fn pay(State(yardstick): State<Yardstick>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (account, key) = (header("x-account-id"), header("idempotency-key"));
    let Ok(input) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let cell = Arc::clone(
        yardstick
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((account.clone(), key))
            .or_default(),
    );
    let mut first = false;
    let answer = cell
        .get_or_try_init(|| async {
            first = true;
            let delay = input["delay_ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let amount = input["amount"].as_i64().unwrap_or(0);
            let mut tx = yardstick.pool.begin().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO yardstick_payments (account, amount) VALUES ($1, $2) RETURNING id",
            )
            .bind(&account)
            .bind(amount)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            let answer = json!({ "id": id, "account": account, "amount": amount });
            Ok::<_, sqlx::Error>(Bytes::from(answer.to_string()))
        })
        .await;
    match answer {
        Ok(body) if first => (StatusCode::CREATED, body.clone()).into_response(),
        Ok(body) => (
            StatusCode::CREATED,
            [("idempotent-replayed", "true")],
            body.clone(),
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}
