//! Throughput benchmark: every path of the store against a bare transaction and the
//! zero2prod shape, on one pool and one database.
//!
//! ```text
//! cargo bench --bench throughput                 # full run, writes docs/throughput.svg
//! cargo bench --bench throughput -- --quick      # 16 clients, 200,000-row sweep, about 2 minutes
//! cargo bench --bench throughput -- --json out.json --svg chart.svg
//! ```
//!
//! The grid's paths run at each client count, interleaved (round after round, every
//! path and client count gets a short slice), so drift of the machine hits all of them
//! alike:
//!
//! - `bare`: `BEGIN; INSERT INTO payments ..; COMMIT`, the yardstick;
//! - `floor`: bare plus the key row in the same transaction, sent with `COMMIT` in one
//!   string (no lock, no lookup): the least that storing a response can cost;
//! - `zero2prod`: `BEGIN`, claim `INSERT .. ON CONFLICT DO NOTHING`, the business
//!   insert, `UPDATE` with the response, `COMMIT`, written here by hand;
//! - `first_request`: [`IdempotencyStore::begin`], the same business insert,
//!   [`Claim::complete`](pg_idempotency::Claim::complete);
//! - `replay`: keys that `first_request` stored, same request again;
//! - `conflict`: the same keys with another body;
//! - `phased`: a [phased request](pg_idempotency::phased): a local step (the same
//!   business insert), one call to the fake card processor (`examples/processor`, served
//!   in this process, over loopback HTTP) with the downstream key, and the final step
//!   (records the processor's answer, stores the response);
//! - `realistic_bare`, `realistic_zero2prod`, `realistic_first_request`: a four-statement
//!   business transaction (a payment, the account's balance, a ledger row, an outbox row)
//!   bare, in the zero2prod shape and through the crate;
//! - the response-size sweep: `zero2prod` and `first_request` again with bodies of
//!   `--response-sizes` bytes.
//!
//! Then `in flight`: how long a duplicate waits before [`Error::InFlight`], and
//! `sweeper`: rows per second on its own, the `VACUUM` after it, and `first_request`
//! writers with and without the default [`Sweeper`].
//!
//! The table's size: `--rows 0,10000000,50000000` runs the grid and the sweeper once per
//! size, on `idempotency_keys` filled with that many live keys (a day of first requests:
//! random UUID v4 keys over 1,000 scopes, `table.rs`), and `--settings default,production`
//! once per size under each of the server settings (restarting the throwaway cluster in
//! between; `DATABASE_URL`'s server is measured as it is). Each result carries the
//! table's `rows`, `settings` and sizes; `--growth-svg` draws how much of its throughput
//! on the smallest table the first request keeps on each size.
//!
//! ```text
//! cargo bench --bench throughput -- --quick --sections grid,sweeper \
//!     --paths floor,first-request,replay --response-sizes 0 \
//!     --rows 0,10000000,50000000 --settings default,production --growth-svg docs/growth.svg
//! ```
//!
//! The server: `DATABASE_URL` (or `--database-url`) if set, else a throwaway local
//! cluster with fsync on (`pg_idempotency::testing::LocalCluster`, from the installed
//! PostgreSQL binaries). Every run creates a database of its own there and drops it at
//! the end. The report names the server and its `fsync`.

mod chart;
#[path = "../../examples/processor/fake.rs"]
mod fake_processor;
mod meters;
mod paths;
mod report;
mod server;
mod soak;
mod table;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use pg_idempotency::testing::{LocalCluster, LocalClusterOptions};
use serde_json::json;

use crate::meters::Meter;
use crate::paths::{Cell, Ctx, MAX_RESPONSE_SIZE, Path, grid, in_flight, sweeper};
use crate::report::{Report, Results};
use crate::server::{Database, cores, describe_server, load_average, open_all, redact};
use crate::soak::{SoakPlan, soak};
use crate::table::{Settings, Sizes, Table};

/// Measures every path of pg-idempotency against a bare transaction and the zero2prod
/// shape, on real PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "throughput")]
struct Args {
    /// Only the 16-client column, a 200,000-row sweep and short slices (about 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Seconds each path runs per client count and round (default 2, quick 1.2).
    #[arg(long)]
    seconds: Option<f64>,
    /// Interleaved rounds (default 5, quick 3).
    #[arg(long)]
    rounds: Option<u32>,
    /// Client counts, comma-separated (default 1,4,16,64; quick 16).
    #[arg(long, value_delimiter = ',')]
    clients: Option<Vec<usize>>,
    /// Expired rows for the sweeper (default 1,000,000; quick 200,000).
    #[arg(long)]
    sweep_rows: Option<i64>,
    /// Seconds of writers each way, with and without the sweeper (default 20, quick 5).
    #[arg(long)]
    sweeper_seconds: Option<f64>,
    /// Paths of the grid, comma-separated (default: all; `bare` always runs, it is the
    /// yardstick; `replay` and `conflict` need `first-request`).
    #[arg(long, value_delimiter = ',')]
    paths: Option<Vec<Path>>,
    /// Response body sizes in bytes at which `zero2prod` and `first-request` run again
    /// (the response-size sweep), comma-separated; `0` for none.
    #[arg(long, value_delimiter = ',', default_value = "100,1024,10240,102400")]
    response_sizes: Vec<usize>,
    /// First requests per second of the soak.
    #[arg(long, default_value_t = 1000.0)]
    soak_rate: f64,
    /// The soak's TTL in seconds (a day compressed).
    #[arg(long, default_value_t = 60)]
    soak_ttl: u64,
    /// Minutes the soak runs.
    #[arg(long, default_value_t = 15.0)]
    soak_minutes: f64,
    /// Seconds between the soak's samples of the table.
    #[arg(long, default_value_t = 10)]
    soak_sample: u64,
    /// Draw the soak's samples (SVG) to this file.
    #[arg(long)]
    soak_svg: Option<PathBuf>,
    /// Sections to run, comma-separated, from `grid`, `in-flight`, `sweeper`, `soak`
    /// (first requests at `--soak-rate` for `--soak-minutes` with a TTL of `--soak-ttl`
    /// and the default sweeper, on the first table; not in the default).
    #[arg(long, value_delimiter = ',', default_value = "grid,in-flight,sweeper")]
    sections: Vec<Section>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the TPS chart (SVG) to this file [default for a full run:
    /// docs/throughput.svg; a quick run writes none unless asked].
    #[arg(long)]
    svg: Option<PathBuf>,
    /// PostgreSQL server to create the benchmark database on [default: a throwaway
    /// local cluster with fsync on, from the installed PostgreSQL binaries].
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Whether the pool pings a connection before handing it out (sqlx's
    /// `test_before_acquire`, on by default: one more round trip per transaction, for
    /// every path alike).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ping_before_acquire: bool,
    /// Table sizes in live keys, comma-separated: the grid and the sweeper run once per
    /// size, on `idempotency_keys` filled up to it (ascending; each fill adds to the last).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    rows: Vec<i64>,
    /// Server settings to measure each table size under, comma-separated, from `as-is`,
    /// `default` and `production`; anything but `as-is` restarts the throwaway cluster
    /// with those settings, so it needs that cluster (no `DATABASE_URL`).
    #[arg(long, value_delimiter = ',', default_value = "as-is")]
    settings: Vec<Settings>,
    /// Draw what the first request keeps of its throughput against the table's size (SVG)
    /// to this file.
    #[arg(long)]
    growth_svg: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Grid,
    InFlight,
    Sweeper,
    Soak,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let total = Instant::now();
    let clients = args.clients.clone().unwrap_or_else(|| {
        if args.quick {
            vec![16]
        } else {
            vec![1, 4, 16, 64]
        }
    });
    let seconds = args.seconds.unwrap_or(if args.quick { 1.2 } else { 2.0 });
    let rounds = args.rounds.unwrap_or(if args.quick { 3 } else { 5 });
    let sweep_rows = args
        .sweep_rows
        .unwrap_or(if args.quick { 200_000 } else { 1_000_000 });
    let sweeper_seconds = args
        .sweeper_seconds
        .unwrap_or(if args.quick { 5.0 } else { 20.0 });
    let in_flight_reps = if args.quick { 5 } else { 20 };
    let svg = args.svg.clone().or_else(|| {
        (!args.quick && args.sections.contains(&Section::Grid))
            .then(|| PathBuf::from("docs/throughput.svg"))
    });

    let mut table_rows = args.rows.clone();
    table_rows.sort_unstable();
    table_rows.dedup();
    ensure!(
        table_rows.first().is_some_and(|&rows| rows >= 0),
        "--rows takes sizes of 0 and more"
    );
    ensure!(
        args.database_url.is_none() || args.settings.iter().all(|s| *s == Settings::AsIs),
        "--settings default or production restarts the server: they need the throwaway \
         cluster, so leave DATABASE_URL unset (its server is measured as-is)"
    );

    // 64 clients, plus the in-flight pair and the sweeper, plus headroom.
    let max_clients = clients.iter().copied().max().unwrap_or(16).max(16);
    let pool_size = u32::try_from(max_clients + 8)?;
    // A throwaway cluster with fsync on, unless a server is named.
    let mut cluster = None;
    let (url, description) = match &args.database_url {
        Some(url) => (url.clone(), format!("{} (DATABASE_URL)", redact(url))),
        None => {
            eprintln!("starting a throwaway PostgreSQL cluster (fsync on)");
            let started = tokio::task::spawn_blocking(|| {
                LocalCluster::start(LocalClusterOptions::default().fsync(true))
            })
            .await??;
            let url = started.url();
            cluster = Some(started);
            (
                url.clone(),
                format!("{url} (throwaway local cluster, pg_idempotency::testing::LocalCluster)"),
            )
        }
    };
    let mut db = Database::create(&url, pool_size, args.ping_before_acquire).await?;
    let server = describe_server(&db.pool, description).await?;
    let load_before = load_average();
    println!("server:   {}", server.description);
    println!("          {}", server.version);
    println!("settings: {}", server.settings_line());
    println!("machine:  {} cores, load average {load_before}", cores());
    println!(
        "run:      {}clients {clients:?}, {rounds} rounds of {seconds} s slices, pool of {pool_size}{}",
        if args.quick { "quick, " } else { "" },
        if args.ping_before_acquire {
            ""
        } else {
            " without ping before acquire"
        }
    );
    println!();

    // The fake card processor of the phased path, on loopback.
    let processor = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let processor_url = format!("http://{}", processor.local_addr()?);
    tokio::spawn(
        async move { axum::serve(processor, fake_processor::router(Duration::ZERO)).await },
    );

    let mut results = Results {
        rows: Vec::new(),
        flights: Vec::new(),
        sweeps: Vec::new(),
        fills: Vec::new(),
        soak: Vec::new(),
    };
    let mut filled = 0;
    let mut meter = None;
    for &rows in &table_rows {
        if rows > filled {
            eprintln!("filling idempotency_keys to {rows} live keys");
            let secs = table::fill(&db.pool, filled, rows).await?;
            eprintln!("  done in {secs:.0} s");
            results.fills.push((rows, secs));
            filled = rows;
        }
        for &settings in &args.settings {
            if settings.write(&db.pool).await? {
                let cluster = cluster
                    .as_ref()
                    .context("--settings needs the throwaway cluster")?;
                eprintln!(
                    "restarting the server with the {} settings",
                    settings.name()
                );
                db.pool.close().await;
                tokio::task::block_in_place(|| cluster.restart())?;
                db.reconnect().await?;
                table::prewarm(&db.pool).await?;
                let now = describe_server(&db.pool, String::new()).await?;
                eprintln!("  {}", now.settings_line());
            }
            let table = Table {
                rows,
                settings,
                sizes: Sizes::read(&db.pool).await?,
            };
            let pool = db.pool.clone();
            let ctx = Arc::new(Ctx::new(pool.clone(), processor_url.clone()));
            open_all(&pool, pool_size).await?;
            let block_meter = Meter::new(&pool).await?;
            if table_rows.len() > 1 || args.settings.len() > 1 {
                eprintln!("table: {rows} live keys, {} settings", settings.name());
            }
            if args.sections.contains(&Section::Grid) {
                eprintln!("the grid:");
                let cells = cells(&args)?;
                results.rows.extend(
                    grid(&ctx, &block_meter, table, &cells, &clients, rounds, seconds).await?,
                );
            }
            if args.sections.contains(&Section::InFlight) && results.flights.is_empty() {
                eprintln!("path 7: in flight");
                results.flights = in_flight(
                    &ctx,
                    &[Duration::from_millis(50), Duration::from_millis(200)],
                    in_flight_reps,
                )
                .await?;
            }
            if args.sections.contains(&Section::Sweeper) {
                eprintln!("path 8: sweeper");
                results
                    .sweeps
                    .push(sweeper(&ctx, &block_meter, table, sweep_rows, sweeper_seconds).await?);
            }
            if args.sections.contains(&Section::Soak) && meter.is_none() {
                let plan = SoakPlan {
                    rate: args.soak_rate,
                    ttl: Duration::from_secs(args.soak_ttl),
                    duration: Duration::from_secs_f64(args.soak_minutes * 60.0),
                    sample_every: Duration::from_secs(args.soak_sample),
                };
                eprintln!(
                    "soak: {} first requests/s for {} min, TTL {} s, the default sweeper",
                    plan.rate, args.soak_minutes, args.soak_ttl
                );
                results.soak = soak(&pool, &processor_url, plan).await?;
            }
            meter = Some(block_meter);
        }
    }
    let load_after = load_average();
    let meter = meter.context("nothing ran")?;

    let report = Report::new(results, &meter, &load_before, &load_after, total)?;
    print!("{}", report.text);

    if let Some(file) = &args.json {
        let run = json!({ "quick": args.quick, "clients": clients, "rounds": rounds, "slice_seconds": seconds, "response_sizes": args.response_sizes, "ping_before_acquire": args.ping_before_acquire, "rows": table_rows, "settings": args.settings.iter().map(|s| s.name()).collect::<Vec<_>>() });
        let doc = report.json(&server, run);
        std::fs::write(file, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", file.display()))?;
        println!("wrote {}", file.display());
    }
    if let Some(file) = &svg {
        // The chart of the client counts: the first table and settings.
        let first: Vec<_> = report
            .results
            .rows
            .iter()
            .filter(|r| Some(r.table) == report.results.rows.first().map(|f| f.table))
            .cloned()
            .collect();
        if first.is_empty() {
            eprintln!("no chart: the grid did not run");
        } else {
            chart::draw(file, &first, &clients, &server)?;
            println!("wrote {}", file.display());
        }
    }
    if let Some(file) = &args.soak_svg {
        chart::draw_soak(file, &report.results.soak, args.soak_rate, &server)?;
        println!("wrote {}", file.display());
    }
    if let Some(file) = &args.growth_svg {
        chart::draw_growth(file, &report.growth, &server)?;
        println!("wrote {}", file.display());
    }
    db.drop_now().await?;
    drop(cluster);
    Ok(())
}

/// The grid's cells: the paths asked for (`bare` always), then the sized ones at each
/// response size.
fn cells(args: &Args) -> Result<Vec<Cell>> {
    let paths: Vec<Path> = Path::ALL
        .into_iter()
        .filter(|p| *p == Path::Bare || args.paths.as_ref().is_none_or(|only| only.contains(p)))
        .collect();
    if paths.contains(&Path::Replay) || paths.contains(&Path::Conflict) {
        ensure!(
            paths.contains(&Path::FirstRequest),
            "replay and conflict need first-request"
        );
    }
    let sizes: Vec<usize> = args
        .response_sizes
        .iter()
        .copied()
        .filter(|&s| s > 0)
        .collect();
    ensure!(
        sizes.iter().all(|&size| size <= MAX_RESPONSE_SIZE),
        "response sizes go up to {MAX_RESPONSE_SIZE} bytes"
    );
    let mut cells: Vec<Cell> = paths.iter().copied().map(Cell::usual).collect();
    for &size in &sizes {
        cells.extend(paths.iter().filter(|path| path.sized()).map(|&path| Cell {
            path,
            size: Some(size),
        }));
    }
    Ok(cells)
}
