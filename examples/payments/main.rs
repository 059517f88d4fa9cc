//! The payments demo: an HTTP service whose `POST /v1/payments` and `POST /v1/charges`
//! are exactly-once.
//!
//! ```text
//! cargo run --example payments [-- --port 3000 --database-url URL --ttl-secs 86400
//!                                  --processor-url URL --lease-secs 30]
//! ```
//!
//! Uses `--database-url`, else `DATABASE_URL`, else a throwaway PostgreSQL (testcontainers
//! when Docker answers, else a temporary cluster from the installed PostgreSQL binaries)
//! that is removed at exit. Prints `listening on http://127.0.0.1:PORT` once it accepts
//! connections (`--port 0` picks a free port); logs go to stderr (`RUST_LOG`). Stops
//! cleanly on SIGINT (Ctrl-C) and SIGTERM: in-flight requests finish, the sweeper stops,
//! a throwaway database is dropped.
//!
//! - `POST /v1/payments` with `Idempotency-Key: <uuid v4>` (required), `X-Account-Id`
//!   (optional, default `default`) and `{"amount": 1000, "currency": "EUR",
//!   "delay_ms": 0}` → `201 {"id","account","amount","currency","created_at"}`;
//!   a retry replays it with `Idempotent-Replayed: true`.
//! - `POST /v1/charges`, same headers, `{"amount": 1000, "currency": "EUR"}` → `201
//!   {"id","account","amount","currency","status","processor_charge_id","created_at"}`:
//!   a phased request that records the charge, calls the card processor with a
//!   downstream key, and records its answer. The processor is `--processor-url` (the fake
//!   one: `cargo run --example processor`); without the flag the demo starts the fake one
//!   itself, in-process. A background completer finishes charges whose client went away.
//! - `GET /v1/payments/count[?account=X]`, `GET /v1/charges/count[?account=X]` →
//!   `{"count": N}`.
//! - `GET /healthz` → 200 once the database answers.
//! - `GET /openapi.json` → the OpenAPI 3.1 document of these routes, with the idempotency
//!   policy the layer applies (`IdempotencyPolicy`): the `Idempotency-Key` header, the
//!   replay headers, the problem responses and the expiry (`x-idempotency`).
//!
//! **The demo trusts `X-Account-Id`.** Anyone who knows a key and can guess the body
//! reads another account's stored payment. A real service takes the scope from
//! authentication (the authenticated account), never from a header the client chooses.
//!
//! Fault injection, for the tests: with `PAYMENTS_PAUSE_AT=<step>:<boundary>` (e.g.
//! `call_processor:after_call`) the service prints `paused at <step>:<boundary>` on stdout
//! when a charge reaches that boundary and stops there, for `PAYMENTS_PAUSE_SECS` seconds
//! (default: until it is killed).
//!
//! On a Citus coordinator: start it once (it creates its tables), run `pg-idempotency
//! distribute --colocate payments:account`, and start it again; it then runs on the
//! distributed tables (docs/OPERATIONS.md, "Citus").

mod app;
#[path = "../processor/fake.rs"]
mod fake_processor;
mod pause;
#[path = "../common/serve.rs"]
mod serve;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use pg_idempotency::phased::{Completer, CompleterOptions};
use pg_idempotency::testing::TestDatabase;
use pg_idempotency::{Config, IdempotencyStore, SweepOptions, Sweeper};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

/// An exactly-once payments API over PostgreSQL (pg-idempotency + axum).
#[derive(Debug, Parser)]
#[command(name = "payments")]
struct Args {
    /// Port to listen on, on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// PostgreSQL URL; without it (and without DATABASE_URL) a throwaway database is used.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// How long a stored response is replayed, in seconds.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    ttl_secs: u64,
    /// The card processor's base URL; without it a fake processor is started in-process.
    #[arg(long)]
    processor_url: Option<String>,
    /// How long a charge's holder keeps it without progress before a retry or the
    /// completer may take it over, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    lease_secs: u64,
    /// Before a charge calls the card processor, wait (at most 5 s) until this many
    /// streaming standbys have its row; 0: no wait. Set it when the database fails over
    /// to an asynchronous standby (docs/OPERATIONS.md, "Standbys and failover").
    #[arg(long, default_value_t = 0)]
    confirm_standbys: u32,
}

#[tokio::main]
async fn main() -> Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(pause::from_env()?)
        .init();
    let args = Args::parse();

    let (pool, throwaway) = match args.database_url.as_deref().filter(|url| !url.is_empty()) {
        Some(url) => (app::connect(url).await?, None),
        None => {
            let database = TestDatabase::create()
                .await
                .context("starting a throwaway PostgreSQL (or set DATABASE_URL)")?;
            tracing::info!(database = database.name(), "using a throwaway database");
            (app::connect(database.url()).await?, Some(database))
        }
    };
    app::prepare(&pool).await?;

    let processor_url = match args.processor_url {
        Some(url) => url,
        None => {
            let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
            let url = format!("http://{}", listener.local_addr()?);
            tracing::info!(%url, "no --processor-url: serving a fake card processor in-process");
            let router = fake_processor::router(Duration::ZERO);
            tokio::spawn(async move { axum::serve(listener, router).await });
            url
        }
    };
    let charges = std::sync::Arc::new(app::Charges::new(&processor_url));

    let config = Config::default()
        .with_ttl(Duration::from_secs(args.ttl_secs))
        .with_lease(Duration::from_secs(args.lease_secs))
        .with_standby_confirmation(args.confirm_standbys, Duration::from_secs(5));
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let sweeper = Sweeper::spawn(pool.clone(), SweepOptions::default());
    let completer = Completer::new(store.clone())
        .register(charges.clone())
        .with_options(CompleterOptions::default().with_interval(Duration::from_secs(1)))
        .spawn();

    let listener = serve::listen(args.port).await?;

    let served = axum::serve(listener, app::router(store, charges))
        .with_graceful_shutdown(serve::shutdown_signal())
        .await;

    let swept = sweeper.stop().await;
    let completed = completer.stop().await;
    pool.close().await;
    if let Some(database) = throwaway {
        database.close().await?;
    }
    served.context("serving HTTP")?;
    tracing::info!(swept, completed = completed.completed, "stopped");
    Ok(())
}
