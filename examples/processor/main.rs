//! A fake card processor, as its own process, for the payments demo's charges.
//!
//! ```text
//! cargo run --example processor [-- --port 3001 --delay-ms 0]
//! ```
//!
//! - `POST /charge` with an `Idempotency-Key` header → `{"charge_id": "ch_…"}`; the same
//!   key always gets the same charge id (the processor dedupes by it).
//! - `GET /charges/{key}` → the charge made with that key, or 404.
//! - `GET /stats` → `{"calls": N, "distinct_keys": M}`.
//!
//! Prints `listening on http://127.0.0.1:PORT` once it accepts connections; state lives
//! in memory until the process ends, so restarting the payments demo does not reset it.

mod fake;
#[path = "../common/serve.rs"]
mod serve;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

/// A fake card processor that dedupes charges by their Idempotency-Key.
#[derive(Debug, Parser)]
#[command(name = "processor")]
struct Args {
    /// Port to listen on, on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 3001)]
    port: u16,
    /// How long each charge takes, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = serve::listen(args.port).await?;
    axum::serve(listener, fake::router(Duration::from_millis(args.delay_ms)))
        .with_graceful_shutdown(serve::shutdown_signal())
        .await
        .context("serving HTTP")
}
