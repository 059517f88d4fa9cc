//! Runs a command against a fresh database with this crate's migrations applied.
//!
//! ```text
//! cargo run --example with_database -- cargo sqlx prepare --check -- --all-targets
//! cargo run --example with_database -- psql
//! ```
//!
//! The database lives on `DATABASE_URL`'s server when that is set, else on a throwaway
//! server (testcontainers when Docker answers, else a temporary cluster from the installed
//! PostgreSQL binaries). The command gets its URL in `DATABASE_URL` and in
//! `PG_IDEMPOTENCY_DATABASE_URL`, the variable this crate's `query!` macros and
//! `cargo sqlx prepare` read (sqlx.toml); the database is dropped afterwards and the
//! command's exit code is passed on.

use anyhow::{Context, Result, bail};

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        bail!("usage: cargo run --example with_database -- COMMAND [ARGS...]");
    };
    let database = pg_idempotency::testing::TestDatabase::create().await?;
    let status = tokio::process::Command::new(&program)
        .args(args)
        .env("DATABASE_URL", database.url())
        .env("PG_IDEMPOTENCY_DATABASE_URL", database.url())
        .status()
        .await
        .with_context(|| format!("could not run {}", program.to_string_lossy()))?;
    database.close().await?;
    std::process::exit(status.code().unwrap_or(1));
}
