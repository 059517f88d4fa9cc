//! The fixture of the anyonce conformance suite (a copy in `tests/conformance/anyonce/`,
//! FIXTURE.md), served on this crate's layer as a user would write it: one
//! [`IdempotencyLayer`] on the whole router.
//!
//! ```text
//! cargo run --example conformance -- --port P [--database-url URL] [--dialect seed|ietf]
//! ```
//!
//! Prints `listening on http://127.0.0.1:P` once it accepts connections (`--port 0`
//! picks a free port). Without `--database-url` (or `DATABASE_URL`) it uses a throwaway
//! database, dropped on SIGINT/SIGTERM. `.ci/conformance.sh` runs the suite against it
//! in both dialects.
//!
//! - `POST /echo` → 201, the body echoed with the request's `Content-Type`;
//! - `POST /status/{code}` → `{code}`, `status:{code}`;
//! - `POST /slow?ms=N` → after N ms, 200 `slept:N`;
//! - `POST /large?bytes=N` → 200, N bytes of `x`;
//! - `GET /counter` → `{"count": n}`, how many times a handler ran (it passes the layer
//!   untouched: GET is not guarded);
//! - `POST /reset` (outside the layer) → 204: the counter to 0, every stored response
//!   removed (the suite reuses its keys on every run).
//!
//! The layer accepts the suite's keys (`KeyPolicy::Opaque`: 1 to 255 visible ASCII
//! characters, bare or as a quoted Structured Field String), replays for `--ttl-ms`
//! (default 2000: the suite's `short-ttl` capability), answers a duplicate of a request
//! still in flight at once (no in-flight wait), and stores response bodies up to 1 MiB.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use clap::{Parser, ValueEnum};
use pg_idempotency::axum::{Dialect, IdempotencyLayer};
use pg_idempotency::testing::TestDatabase;
use pg_idempotency::{Config, IdempotencyStore, KeyPolicy, Scope};
use serde::Deserialize;
use sqlx::PgPool;

#[path = "common/serve.rs"]
mod serve;

/// The anyonce conformance fixture on pg-idempotency's axum layer.
#[derive(Debug, Parser)]
#[command(name = "conformance")]
struct Args {
    /// Port to listen on, on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// PostgreSQL URL; without it (and without DATABASE_URL) a throwaway database is used.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The layer's dialect: the error specification this crate follows by default, or
    /// the IETF draft's (422 for a changed payload, `Idempotency-Replayed`, its codes).
    #[arg(long, value_enum, default_value_t = DialectArg::Seed)]
    dialect: DialectArg,
    /// How long a stored response is replayed, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    ttl_ms: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DialectArg {
    Seed,
    Ietf,
}

#[derive(Clone)]
struct Fixture {
    /// How many times a handler ran since the last reset.
    runs: Arc<AtomicU64>,
    pool: PgPool,
}

impl Fixture {
    fn ran(&self) {
        self.runs.fetch_add(1, Ordering::SeqCst);
    }
}

async fn echo(State(fixture): State<Fixture>, headers: HeaderMap, body: Bytes) -> Response {
    fixture.ran();
    let mut response = (StatusCode::CREATED, body).into_response();
    if let Some(content_type) = headers.get(CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, content_type.clone());
    }
    response
}

async fn status(State(fixture): State<Fixture>, Path(code): Path<u16>) -> Response {
    fixture.ran();
    match StatusCode::from_u16(code) {
        Ok(status) => (status, format!("status:{code}")).into_response(),
        Err(_) => (StatusCode::BAD_REQUEST, "not a status").into_response(),
    }
}

#[derive(Deserialize)]
struct Slow {
    ms: u64,
}

async fn slow(State(fixture): State<Fixture>, Query(Slow { ms }): Query<Slow>) -> String {
    fixture.ran();
    tokio::time::sleep(Duration::from_millis(ms)).await;
    format!("slept:{ms}")
}

#[derive(Deserialize)]
struct Large {
    bytes: usize,
}

async fn large(State(fixture): State<Fixture>, Query(Large { bytes }): Query<Large>) -> Vec<u8> {
    fixture.ran();
    vec![b'x'; bytes]
}

async fn counter(State(fixture): State<Fixture>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "count": fixture.runs.load(Ordering::SeqCst) }))
}

async fn reset(State(fixture): State<Fixture>) -> Result<StatusCode, StatusCode> {
    sqlx::query("DELETE FROM idempotency_keys")
        .execute(&fixture.pool)
        .await
        .map_err(|error| {
            tracing::error!(%error, "reset failed");
            StatusCode::SERVICE_UNAVAILABLE
        })?;
    fixture.runs.store(0, Ordering::SeqCst);
    Ok(StatusCode::NO_CONTENT)
}

fn router(store: IdempotencyStore, dialect: Dialect, fixture: Fixture) -> Router {
    let idempotency = IdempotencyLayer::new(store, |_: &axum::http::request::Parts| {
        Scope::new("conformance")
    })
    .with_dialect(dialect);
    // The fixture's routes behind one layer on the whole router, as a user adds a tower
    // layer; `/reset` is the suite's back door, outside it.
    let fixture_routes = Router::new()
        .route("/echo", post(echo))
        .route("/status/{code}", post(status))
        .route("/slow", post(slow))
        .route("/large", post(large))
        .route("/counter", get(counter))
        .layer(idempotency);
    Router::new()
        .route("/reset", post(reset))
        .merge(fixture_routes)
        .with_state(fixture)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let (pool, throwaway) = match args.database_url.as_deref().filter(|url| !url.is_empty()) {
        Some(url) => (PgPool::connect(url).await?, None),
        None => {
            let database = TestDatabase::create()
                .await
                .context("starting a throwaway PostgreSQL (or set DATABASE_URL)")?;
            (PgPool::connect(database.url()).await?, Some(database))
        }
    };
    pg_idempotency::migrate(&pool).await?;
    let config = Config::default()
        .with_key_policy(KeyPolicy::Opaque)
        .with_ttl(Duration::from_millis(args.ttl_ms))
        .with_in_flight_wait(Duration::ZERO);
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let dialect = match args.dialect {
        DialectArg::Seed => Dialect::seed(),
        DialectArg::Ietf => Dialect::ietf(),
    };
    let fixture = Fixture {
        runs: Arc::new(AtomicU64::new(0)),
        pool: pool.clone(),
    };

    let listener = serve::listen(args.port).await?;
    let served = axum::serve(listener, router(store, dialect, fixture))
        .with_graceful_shutdown(serve::shutdown_signal())
        .await;
    pool.close().await;
    if let Some(database) = throwaway {
        database.close().await?;
    }
    served.context("serving HTTP")
}
