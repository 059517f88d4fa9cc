//! `pg-idempotency`: operate the idempotency key store from the command line.
//!
//! Exit codes: 0 success, 1 failure (database unreachable, query failed), 2 usage error
//! (bad flags, a `forget` without `--yes`), 3 the key was not found.

use std::borrow::Cow;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pg_idempotency::{IdempotencyKey, KeyPolicy, Scope, SweepOptions, admin};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};

/// Operate the pg-idempotency key store: apply its migrations, sweep expired keys,
/// look at the table, inspect or release one key, distribute the table with Citus.
#[derive(Debug, Parser)]
#[command(name = "pg-idempotency", version)]
struct Cli {
    /// PostgreSQL connection URL, e.g. postgres://user:password@host:5432/db
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the idempotency_keys table and its functions (idempotent).
    Migrate,
    /// Delete expired keys in small batches, once or on an interval.
    Sweep {
        /// Rows deleted per statement.
        #[arg(long, default_value_t = 1000)]
        batch: u32,
        /// Pause between batches, e.g. 50ms.
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        pause: Duration,
        /// Sweep again after this long, until SIGINT or SIGTERM, e.g. 1m.
        #[arg(long, value_parser = humantime::parse_duration)]
        every: Option<Duration>,
    },
    /// Rows, expired rows, oldest row, table and index size, dead tuples.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Show what is stored for one key (never the body unless --show-body).
    Inspect {
        /// The key's scope (tenant, account or principal).
        #[arg(long)]
        scope: String,
        /// The Idempotency-Key value.
        #[arg(long)]
        key: String,
        /// Also print the stored response body (lossy UTF-8).
        #[arg(long)]
        show_body: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// On a Citus coordinator: distribute idempotency_keys by scope and co-locate business
    /// tables with it (idempotent; run `migrate` first, and before the tables grow).
    Distribute {
        /// A business table to distribute by its tenant column (which holds the scope),
        /// co-located with the keys; repeatable, e.g. --colocate payments:account.
        #[arg(long, value_name = "TABLE:COLUMN", value_parser = parse_colocated)]
        colocate: Vec<Colocated>,
    },
    /// Release one key: the next request with it runs fresh. Needs --yes.
    Forget {
        /// The key's scope (tenant, account or principal).
        #[arg(long)]
        scope: String,
        /// The Idempotency-Key value.
        #[arg(long)]
        key: String,
        /// Confirm: a released key no longer protects against a duplicate request.
        #[arg(long)]
        yes: bool,
    },
}

/// A business table and its tenant column, from `--colocate TABLE:COLUMN`.
#[derive(Debug, Clone)]
struct Colocated {
    table: String,
    column: String,
}

fn parse_colocated(value: &str) -> Result<Colocated, String> {
    match value.rsplit_once(':') {
        Some((table, column)) if !table.is_empty() && !column.is_empty() => Ok(Colocated {
            table: table.to_owned(),
            column: column.to_owned(),
        }),
        _ => Err(format!(
            "expected TABLE:COLUMN, e.g. payments:account, not {value:?}"
        )),
    }
}

/// An outcome with its own exit code.
enum Exit {
    Ok,
    Usage(String),
    NotFound(String),
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(Exit::Ok) => ExitCode::SUCCESS,
        Ok(Exit::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Ok(Exit::NotFound(message)) => {
            eprintln!("{message}");
            ExitCode::from(3)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<Exit> {
    let Some(url) = cli.database_url else {
        return Ok(Exit::Usage(
            "no database: pass --database-url or set DATABASE_URL".into(),
        ));
    };
    // Parse what the user typed before touching the database.
    let target = match &cli.command {
        Command::Inspect { scope, key, .. } | Command::Forget { scope, key, .. } => {
            Some(match parse_target(scope, key) {
                Ok(target) => target,
                Err(message) => return Ok(Exit::Usage(message)),
            })
        }
        _ => None,
    };
    if let Command::Forget { yes: false, .. } = cli.command {
        return Ok(Exit::Usage(
            "forget releases the key for good: a duplicate of its request would run again; repeat with --yes".into(),
        ));
    }
    // One direct connection first: its error says why (refused, auth, no such database).
    sqlx::PgConnection::connect(&url)
        .await
        .context("could not connect to the database (check --database-url / DATABASE_URL)")?
        .close()
        .await?;
    let pool = PgPoolOptions::new().max_connections(2).connect_lazy(&url)?;

    match (cli.command, target) {
        (Command::Migrate, _) => {
            pg_idempotency::migrate(&pool).await?;
            println!("migrations applied");
        }
        (
            Command::Sweep {
                batch,
                pause,
                every,
            },
            _,
        ) => sweep(&pool, batch, pause, every).await?,
        (Command::Distribute { colocate }, _) => distribute(&pool, &colocate).await?,
        (Command::Stats { json }, _) => print_stats(&admin::stats(&pool).await?, json),
        (
            Command::Inspect {
                show_body, json, ..
            },
            Some((scope, keys)),
        ) => {
            // Each command's statements in one transaction: through a pooler in
            // transaction mode (PgBouncer), a statement with bound parameters outside one
            // could reach two server connections.
            let mut tx = pool.begin().await?;
            for key in &keys {
                if let Some(info) = admin::inspect(&mut *tx, &scope, key, show_body).await? {
                    print_key(&scope, key, &info, json);
                    return Ok(Exit::Ok);
                }
                if let Some(request) = admin::inspect_request(&mut *tx, &scope, key).await? {
                    print_request(&scope, key, &request, json);
                    return Ok(Exit::Ok);
                }
            }
            return Ok(not_found(&scope, &keys));
        }
        (Command::Forget { .. }, Some((scope, keys))) => {
            let mut tx = pool.begin().await?;
            for key in &keys {
                if admin::forget(&mut *tx, &scope, key).await? {
                    tx.commit().await?;
                    let (key, scope) = (escaped(key.as_str()), escaped(scope.as_str()));
                    println!("forgot key {key} in scope {scope}");
                    return Ok(Exit::Ok);
                }
            }
            return Ok(not_found(&scope, &keys));
        }
        (Command::Inspect { .. } | Command::Forget { .. }, None) => unreachable!("parsed above"),
    }
    Ok(Exit::Ok)
}

/// A scope and a key as operators type them, with the keys to look for, in order: the key
/// exactly as typed (as the opaque key policy stores it), then, for a UUID typed in
/// another case, its lower-case form (as the UUID policy stores it).
fn parse_target(scope: &str, key: &str) -> Result<(Scope, Vec<IdempotencyKey>), String> {
    let scope = Scope::new(scope).map_err(|e| format!("--scope: {e}"))?;
    let exact = IdempotencyKey::parse(key, KeyPolicy::Opaque);
    let uuid = IdempotencyKey::parse(key, KeyPolicy::UuidV4);
    let keys = match (exact, uuid) {
        (Ok(exact), Ok(uuid)) if exact == uuid => vec![exact],
        (Ok(exact), Ok(uuid)) => vec![exact, uuid],
        (Ok(key), Err(_)) | (Err(_), Ok(key)) => vec![key],
        (Err(e), Err(_)) => return Err(format!("--key: {e}")),
    };
    Ok((scope, keys))
}

/// The answer when none of `keys` has a row in `scope`.
fn not_found(scope: &Scope, keys: &[IdempotencyKey]) -> Exit {
    let keys: Vec<_> = keys.iter().map(|key| escaped(key.as_str())).collect();
    Exit::NotFound(format!(
        "no stored response and no phased request in progress for key {} in scope {}",
        keys.join(" or "),
        escaped(scope.as_str())
    ))
}

/// `text` with every control character (line breaks included) and every bidirectional
/// formatting character written as a `\u{..}` escape, so that what the table holds
/// cannot move the cursor, rewrite the terminal or reorder what an operator reads.
fn escaped(text: &str) -> Cow<'_, str> {
    escaped_but(text, &[])
}

/// [`escaped`], keeping the characters of `keep` (a body's line breaks and tabs).
fn escaped_but<'a>(text: &'a str, keep: &[char]) -> Cow<'a, str> {
    let unsafe_char = |c: char| !keep.contains(&c) && (c.is_control() || is_bidi_format(c));
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The characters that change the direction of the text around them (Unicode's
/// `Bidi_Control`, plus the line and paragraph separators).
fn is_bidi_format(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            | '\u{2028}' | '\u{2029}'
    )
}

async fn sweep(pool: &PgPool, batch: u32, pause: Duration, every: Option<Duration>) -> Result<()> {
    let options = SweepOptions::default()
        .with_batch_size(batch)
        .with_pause(pause);
    let Some(every) = every else {
        let deleted = pg_idempotency::sweep(pool, &options).await?;
        println!("deleted {deleted} expired keys");
        return Ok(());
    };
    let sweeper = pg_idempotency::Sweeper::spawn(pool.clone(), options.with_interval(every));
    shutdown_signal().await?;
    let deleted = sweeper.stop().await;
    println!("deleted {deleted} expired keys");
    Ok(())
}

async fn distribute(pool: &PgPool, colocate: &[Colocated]) -> Result<()> {
    if admin::distribute(pool).await? {
        println!("idempotency_keys: distributed by scope");
    } else {
        println!("idempotency_keys: already distributed by scope");
    }
    for Colocated { table, column } in colocate {
        let done = admin::colocate(pool, table, column)
            .await
            .with_context(|| format!("co-locating {table} by {column}"))?;
        let already = if done { "" } else { "already " };
        println!("{table}: {already}distributed by {column}, co-located with idempotency_keys");
    }
    Ok(())
}

async fn shutdown_signal() -> Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

fn print_stats(stats: &admin::Stats, json: bool) {
    let oldest = stats.oldest_created_at.map(|t| t.to_rfc3339());
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rows": stats.rows,
                "expired_rows": stats.expired_rows,
                "oldest_created_at": oldest,
                "table_bytes": stats.table_bytes,
                "index_bytes": stats.index_bytes,
                "dead_tuples": stats.dead_tuples,
                "phased_in_progress": stats.phased_in_progress,
                "phased_abandoned": stats.phased_abandoned,
                "phased_abandoned_by_operation": stats
                    .phased_abandoned_by_operation
                    .iter()
                    .map(|(operation, count)| serde_json::json!({
                        "operation": operation,
                        "abandoned": count,
                    }))
                    .collect::<Vec<_>>(),
            })
        );
        return;
    }
    println!("rows:          {}", stats.rows);
    println!("expired rows:  {}", stats.expired_rows);
    println!("oldest row:    {}", oldest.as_deref().unwrap_or("-"));
    println!("table size:    {} bytes", stats.table_bytes);
    println!("index size:    {} bytes", stats.index_bytes);
    println!("dead tuples:   {}", stats.dead_tuples);
    println!(
        "phased:        {} in progress, {} abandoned (lease ran out)",
        stats.phased_in_progress, stats.phased_abandoned
    );
    for (operation, count) in &stats.phased_abandoned_by_operation {
        let operation = operation
            .as_deref()
            .map_or(Cow::Borrowed("(not started)"), escaped);
        println!("  abandoned {operation}: {count}");
    }
}

fn print_request(scope: &Scope, key: &IdempotencyKey, info: &admin::RequestInfo, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "scope": scope.as_str(),
                "key": key.as_str(),
                "phased": true,
                "fingerprint": info.fingerprint.to_string(),
                "operation": info.operation,
                "recovery_point": info.recovery_point,
                "recorded_steps": info.recorded_steps,
                "attempts": info.attempts,
                "leased_until": info.leased_until.to_rfc3339(),
                "abandoned": info.abandoned,
                "created_at": info.created_at.to_rfc3339(),
                "expires_at": info.expires_at.to_rfc3339(),
                "expired": info.expired,
                "request_id": info.first_request.request_id,
                "traceparent": info.first_request.traceparent,
            })
        );
        return;
    }
    println!("scope:           {}", escaped(scope.as_str()));
    println!("key:             {}", escaped(key.as_str()));
    println!("phased request in progress (no stored response yet)");
    println!("fingerprint:     {}", info.fingerprint);
    println!(
        "operation:       {}",
        escaped(info.operation.as_deref().unwrap_or("- (not started)"))
    );
    println!(
        "recovery point:  {}",
        escaped(info.recovery_point.as_deref().unwrap_or("-"))
    );
    println!(
        "recorded steps:  {}",
        escaped(&info.recorded_steps.join(", "))
    );
    println!("attempts:        {}", info.attempts);
    println!(
        "leased until:    {}{}",
        info.leased_until.to_rfc3339(),
        if info.abandoned {
            " (ran out: a retry or the completer takes it over)"
        } else {
            ""
        }
    );
    println!("created at:      {}", info.created_at.to_rfc3339());
    println!(
        "expires at:      {}{}",
        info.expires_at.to_rfc3339(),
        if info.expired { " (expired)" } else { "" }
    );
    let request_id = info.first_request.request_id.as_deref();
    println!("request id:      {}", escaped(request_id.unwrap_or("-")));
}

fn print_key(scope: &Scope, key: &IdempotencyKey, info: &admin::KeyInfo, json: bool) {
    let body = info.body.as_deref().map(String::from_utf8_lossy);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "scope": scope.as_str(),
                "key": key.as_str(),
                "fingerprint": info.fingerprint.to_string(),
                "status": info.status,
                "header_count": info.header_count,
                "body_bytes": info.body_bytes,
                "body": body,
                "created_at": info.created_at.to_rfc3339(),
                "expires_at": info.expires_at.to_rfc3339(),
                "expired": info.expired,
                "request_id": info.first_request.request_id,
                "traceparent": info.first_request.traceparent,
            })
        );
        return;
    }
    println!("scope:        {}", escaped(scope.as_str()));
    println!("key:          {}", escaped(key.as_str()));
    println!("fingerprint:  {}", info.fingerprint);
    println!("status:       {}", info.status);
    println!("headers:      {}", info.header_count);
    println!("body size:    {} bytes", info.body_bytes);
    println!("created at:   {}", info.created_at.to_rfc3339());
    println!(
        "expires at:   {}{}",
        info.expires_at.to_rfc3339(),
        if info.expired { " (expired)" } else { "" }
    );
    let request_id = info.first_request.request_id.as_deref();
    let traceparent = info.first_request.traceparent.as_deref();
    println!("request id:   {}", escaped(request_id.unwrap_or("-")));
    println!("traceparent:  {}", escaped(traceparent.unwrap_or("-")));
    if let Some(body) = body {
        println!("body:\n{}", escaped_but(&body, &['\n', '\t']));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped() {
        assert!(matches!(escaped("acct 7 é"), Cow::Borrowed("acct 7 é")));
        assert_eq!(
            escaped("a\u{1b}[2Jb\u{202e}cba\u{2066}\r\n\u{7f}"),
            "a\\u{1b}[2Jb\\u{202e}cba\\u{2066}\\u{d}\\u{a}\\u{7f}"
        );
        assert_eq!(
            escaped_but("line\n\tx\u{1b}\u{200f}", &['\n', '\t']),
            "line\n\tx\\u{1b}\\u{200f}"
        );
    }

    #[test]
    fn keys_are_looked_up_as_typed_then_normalised() {
        let upper = "6F1C1F0E-8D2A-4F55-9A3E-1B2C3D4E5F60";
        let (_, keys) = parse_target("s", upper).unwrap();
        let keys: Vec<_> = keys.iter().map(IdempotencyKey::as_str).collect();
        assert_eq!(keys, [upper, upper.to_ascii_lowercase().as_str()]);
        let (_, keys) = parse_target("s", &upper.to_ascii_lowercase()).unwrap();
        assert_eq!(keys.len(), 1);
        let (_, keys) = parse_target("s", "order-42").unwrap();
        assert_eq!(keys[0].as_str(), "order-42");
        assert!(parse_target("s", "").is_err());
    }
}
