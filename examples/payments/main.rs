//! The payments demo: an HTTP service whose `POST /v1/payments` is exactly-once.
//!
//! ```text
//! cargo run --example payments [-- --port 3000 --database-url URL --ttl-secs 86400]
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
//! - `GET /v1/payments/count[?account=X]` → `{"count": N}`.
//! - `GET /healthz` → 200 once the database answers.
//!
//! On a Citus coordinator: start it once (it creates its tables), run `pg-idempotency
//! distribute --colocate payments:account`, and start it again; it then runs on the
//! distributed tables (docs/OPERATIONS.md, "Citus").

mod app;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use pg_idempotency::testing::TestDatabase;
use pg_idempotency::{Config, IdempotencyStore, SweepOptions, Sweeper};
use tracing_subscriber::EnvFilter;

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
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
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

    let config = Config::default().with_ttl(Duration::from_secs(args.ttl_secs));
    let store = IdempotencyStore::with_config(pool.clone(), config);
    let sweeper = Sweeper::spawn(pool.clone(), SweepOptions::default());

    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)))
            .await
            .with_context(|| format!("binding 127.0.0.1:{}", args.port))?;
    let address = listener.local_addr()?;
    // The one line on stdout: the port is known and connections are accepted from now on.
    println!("listening on http://{address}");
    std::io::stdout().flush()?;

    let served = axum::serve(listener, app::router(store))
        .with_graceful_shutdown(shutdown_signal())
        .await;

    let swept = sweeper.stop().await;
    pool.close().await;
    if let Some(database) = throwaway {
        database.close().await?;
    }
    served.context("serving HTTP")?;
    tracing::info!(swept, "stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        result = interrupt => {
            if let Err(error) = result {
                tracing::warn!(%error, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        }
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
