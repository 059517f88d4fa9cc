//! The report: the table and the lines printed at the end, the targets, and the same
//! figures as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::meters::{Meter, Tally};
use crate::paths::{Cell, InFlight, Path, Row, SWEEP_WRITERS, SweepResult};
use crate::server::{Server, cores};
use crate::soak::Sample;
use crate::table::{Settings, Table, mb};

/// What the sections measured (each empty if it did not run), table after table.
pub struct Results {
    pub rows: Vec<Row>,
    pub flights: Vec<InFlight>,
    pub sweeps: Vec<SweepResult>,
    /// Each fill of the table: the live keys it reached and the seconds it took.
    pub fills: Vec<(i64, f64)>,
    /// The soak's samples.
    pub soak: Vec<Sample>,
}

/// The first request on one table, beside the same table's bare and replay and the
/// first request on the smallest table under the same settings: a point of the growth.
#[derive(Debug, Clone)]
pub struct Growth {
    pub table: Table,
    pub tps: f64,
    pub ratio_to_bare: f64,
    /// TPS over the first request's TPS on the smallest table, same settings.
    pub ratio_to_smallest: f64,
    /// [`ratio_to_bare`](Self::ratio_to_bare) over the same on the smallest table: the
    /// first request's TPS against the smallest table's with the machine's drift
    /// between the two (which bare, interleaved with it, suffers alike) taken out.
    pub kept: f64,
    pub p99_ms: f64,
    pub wal_bytes_per_op: Option<f64>,
    pub replay_ratio_to_bare: Option<f64>,
}

/// The report of a run: the text printed at the end, and the parts of the JSON document
/// computed from the same figures.
pub struct Report {
    pub results: Results,
    pub text: String,
    flight_json: Vec<Value>,
    sweep_json: Vec<Value>,
    /// The first request at each table size and settings.
    pub growth: Vec<Growth>,
    targets: Vec<Target>,
}

impl Report {
    pub fn new(
        mut results: Results,
        meter: &Meter,
        load_before: &str,
        load_after: &str,
        total: Instant,
    ) -> Result<Self> {
        let mut out = String::new();
        for &(rows, secs) in &results.fills {
            writeln!(
                out,
                "filled idempotency_keys to {rows} live keys in {secs:.0} s"
            )?;
        }
        if !results.rows.is_empty() {
            write_table(&mut out, &results.rows, meter)?;
        }
        let flight_json = write_in_flight(&mut out, &mut results.flights)?;
        let mut sweep_json = Vec::new();
        for s in &mut results.sweeps {
            sweep_json.push(write_sweeper(&mut out, s, meter)?);
        }
        if !results.soak.is_empty() {
            write_soak(&mut out, &results.soak)?;
        }
        let growth = growth(&results.rows);
        if growth.len() > 1 {
            write_growth(&mut out, &growth)?;
        }
        let targets = targets(
            &results.rows,
            &results.flights,
            results.sweeps.first_mut(),
            &growth,
        );
        if !targets.is_empty() {
            write_targets(&mut out, &targets)?;
        }
        writeln!(
            out,
            "\nload average before {load_before}, after {load_after}; total {:.0} s",
            total.elapsed().as_secs_f64()
        )?;
        Ok(Self {
            results,
            text: out,
            flight_json,
            sweep_json,
            growth,
            targets,
        })
    }

    /// The whole JSON document; `run` holds the run's parameters.
    pub fn json(&self, server: &Server, run: Value) -> Value {
        json!({
            "server": {
                "description": server.description,
                "version": server.version,
                "settings": server.settings.iter().cloned().collect::<BTreeMap<_, _>>(),
                "cores": cores(),
            },
            "run": run,
            "results": self.results.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "in_flight": self.flight_json,
            "sweeper": self.sweep_json,
            "soak": self.results.soak.iter().map(Sample::json).collect::<Vec<_>>(),
            "growth": self.growth.iter().map(Growth::json).collect::<Vec<_>>(),
            "targets": self.targets.iter().map(Target::json).collect::<Vec<_>>(),
        })
    }
}

/// The grid: a line per cell and client count, under a heading per table when the run
/// measured several.
fn write_table(out: &mut String, rows: &[Row], meter: &Meter) -> Result<()> {
    let several = rows.iter().any(|r| r.table != rows[0].table);
    let mut table = None;
    for r in rows {
        if table != Some(r.table) {
            table = Some(r.table);
            if several {
                writeln!(out, "\n{}", describe(&r.table))?;
            }
            write_header(out)?;
        }
        writeln!(
            out,
            "{:<24} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>14.2} {:>15}   {:>13.0} {:>13} {:>9}",
            r.cell.label(),
            r.clients,
            r.tps,
            r.p50_ms,
            r.p99_ms,
            r.ratio_to_bare,
            r.ratio_to_floor
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}")),
            r.client_us_per_op,
            whole_or_dash(r.server_us_per_op),
            whole_or_dash(r.wal_bytes_per_op),
        )?;
    }
    writeln!(
        out,
        "(cpu and wal per operation; server figures cover the whole server{})\n",
        if meter.postmaster.is_some() {
            ""
        } else {
            ", whose CPU is not visible from here"
        }
    )?;
    Ok(())
}

/// A table's heading: its live keys, settings and sizes.
fn describe(table: &Table) -> String {
    format!(
        "table: {} live keys, {} settings (heap {:.0} MB, primary key {:.0} MB, expires_at index {:.0} MB)",
        table.rows,
        table.settings.name(),
        mb(table.sizes.heap),
        mb(table.sizes.primary_key),
        mb(table.sizes.expires_at)
    )
}

fn write_header(out: &mut String) -> Result<()> {
    writeln!(
        out,
        "{:<24} {:>7} {:>9} {:>8} {:>8} {:>14} {:>15}   {:>13} {:>13} {:>9}",
        "path",
        "clients",
        "tps",
        "p50_ms",
        "p99_ms",
        "ratio_to_bare",
        "ratio_to_floor",
        "client_cpu_us",
        "server_cpu_us",
        "wal_bytes"
    )?;
    Ok(())
}

/// Path 7: a line per wait. Returns their JSON.
fn write_in_flight(out: &mut String, flights: &mut [InFlight]) -> Result<Vec<Value>> {
    let mut flight_json = Vec::new();
    for f in flights {
        let wait = ms(f.wait);
        let (p50, max) = (f.refused.quantile_ms(0.5), f.refused.max_ms());
        let (r50, r_max) = (
            f.replay_after_commit.quantile_ms(0.5),
            f.replay_after_commit.max_ms(),
        );
        writeln!(
            out,
            "in flight, wait {wait:.0} ms: InFlight after p50 {p50:.1} ms, max {max:.1} ms \
             (overshoot max {:.1} ms); holder done at {:.0} ms: replay {r50:.1} ms (max {r_max:.1}) after its commit; {} runs",
            max - wait,
            wait / 2.0,
            f.refused.ops
        )?;
        flight_json.push(json!({
            "wait_ms": wait,
            "runs": f.refused.ops,
            "in_flight_p50_ms": round(p50, 3),
            "in_flight_max_ms": round(max, 3),
            "overshoot_max_ms": round(max - wait, 3),
            "replay_after_commit_p50_ms": round(r50, 3),
            "replay_after_commit_max_ms": round(r_max, 3),
        }));
    }
    Ok(flight_json)
}

/// Path 8. Returns its JSON.
fn write_sweeper(out: &mut String, s: &mut SweepResult, meter: &Meter) -> Result<Value> {
    let rate = s.alone_rows_per_s();
    let (wo_p99, w_p99) = (s.without.quantile_ms(0.99), s.with.quantile_ms(0.99));
    let (wo_p50, w_p50) = (s.without.quantile_ms(0.5), s.with.quantile_ms(0.5));
    if s.table.rows > 0 || s.table.settings != Settings::AsIs {
        writeln!(out, "\nsweeper, {}", describe(&s.table))?;
    }
    writeln!(
        out,
        "sweeper alone: {} expired rows (inserted in {:.1} s) deleted in {:.2} s = {rate:.0} rows/s (batches of 10,000, no pause); VACUUM after it {:.1} s",
        s.alone_deleted, s.fill_secs, s.alone_secs, s.vacuum_secs
    )?;
    writeln!(
        out,
        "writers (first_request, {SWEEP_WRITERS} clients), backlog of {} expired rows:",
        s.rows
    )?;
    let per_op = |t: &Tally| {
        format!(
            "server cpu {} us/op, wal {} B/op",
            whole_or_dash(t.server_us_per_op(meter)),
            whole_or_dash(t.wal_bytes_per_op())
        )
    };
    writeln!(
        out,
        "  without sweeper: {:>6.0} tps  p50 {wo_p50:.2} ms  p99 {wo_p99:.2} ms  ({})",
        s.without.tps(),
        per_op(&s.without),
    )?;
    writeln!(
        out,
        "  default sweeper: {:>6.0} tps  p50 {w_p50:.2} ms  p99 {w_p99:.2} ms  ({}; {:.0}% of TPS, p99 x {:.2}); it deleted {} rows = {:.0} rows/s, {} expired rows left",
        s.with.tps(),
        per_op(&s.with),
        s.tps_kept() * 100.0,
        s.p99_ratio(),
        s.with_deleted,
        s.with_rows_per_s(),
        s.backlog_left
    )?;
    Ok(json!({
        "table": table_json(&s.table),
        "rows": s.rows,
        "vacuum_secs": round(s.vacuum_secs, 3),
        "alone_deleted": s.alone_deleted,
        "alone_secs": round(s.alone_secs, 3),
        "alone_rows_per_s": round(rate, 0),
        "writers_clients": SWEEP_WRITERS,
        "without_sweeper": { "tps": round(s.without.tps(), 1), "p50_ms": round(wo_p50, 3), "p99_ms": round(wo_p99, 3) },
        "with_sweeper": { "tps": round(s.with.tps(), 1), "p50_ms": round(w_p50, 3), "p99_ms": round(w_p99, 3),
                          "deleted": s.with_deleted, "rows_per_s": round(s.with_rows_per_s(), 0) },
        "tps_kept": round(s.tps_kept(), 3),
        "p99_ratio": round(s.p99_ratio(), 3),
    }))
}

/// The first request at each table size, under each settings (in the order they ran),
/// for the widest client count.
fn growth(rows: &[Row]) -> Vec<Growth> {
    let Some(clients) = rows.iter().map(|r| r.clients).max() else {
        return Vec::new();
    };
    let find = |rows: &[Row], table: Table, path: Path| {
        rows.iter()
            .position(|r| r.table == table && r.clients == clients && r.cell == Cell::usual(path))
    };
    let mut tables: Vec<Table> = Vec::new();
    for r in rows.iter() {
        if !tables.contains(&r.table) {
            tables.push(r.table);
        }
    }
    let mut out: Vec<Growth> = Vec::new();
    for table in tables {
        let Some(at) = find(rows, table, Path::FirstRequest) else {
            continue;
        };
        let replay = find(rows, table, Path::Replay).map(|i| rows[i].ratio_to_bare);
        let first = &rows[at];
        let (smallest, smallest_to_bare) = out
            .iter()
            .find(|g| g.table.settings == table.settings)
            .map_or((first.tps, first.ratio_to_bare), |g| {
                (g.tps, g.ratio_to_bare)
            });
        out.push(Growth {
            table,
            tps: first.tps,
            ratio_to_bare: first.ratio_to_bare,
            ratio_to_smallest: first.tps / smallest,
            kept: first.ratio_to_bare / smallest_to_bare,
            p99_ms: first.p99_ms,
            wal_bytes_per_op: first.wal_bytes_per_op,
            replay_ratio_to_bare: replay,
        });
    }
    out
}

impl Growth {
    fn json(&self) -> Value {
        json!({
            "table": table_json(&self.table),
            "tps": round(self.tps, 1),
            "ratio_to_bare": round(self.ratio_to_bare, 3),
            "ratio_to_smallest": round(self.ratio_to_smallest, 3),
            "kept": round(self.kept, 3),
            "p99_ms": round(self.p99_ms, 3),
            "wal_bytes_per_op": self.wal_bytes_per_op.map(|v| round(v, 0)),
            "replay_ratio_to_bare": self.replay_ratio_to_bare.map(|v| round(v, 3)),
        })
    }
}

/// The growth: a line per table size and settings.
fn write_growth(out: &mut String, growth: &[Growth]) -> Result<()> {
    writeln!(
        out,
        "\nfirst request against the table's size (kept: ratio_to_bare over the smallest table's):\n{:<11} {:>11} {:>8} {:>14} {:>17} {:>6} {:>8} {:>10} {:>13} {:>15}",
        "settings",
        "live_keys",
        "tps",
        "ratio_to_bare",
        "ratio_to_smallest",
        "kept",
        "p99_ms",
        "wal_bytes",
        "primary_key_mb",
        "replay_to_bare"
    )?;
    for g in growth {
        writeln!(
            out,
            "{:<11} {:>11} {:>8.0} {:>14.2} {:>17.2} {:>6.2} {:>8.2} {:>10} {:>13.0} {:>15}",
            g.table.settings.name(),
            g.table.rows,
            g.tps,
            g.ratio_to_bare,
            g.ratio_to_smallest,
            g.kept,
            g.p99_ms,
            whole_or_dash(g.wal_bytes_per_op),
            mb(g.table.sizes.primary_key),
            g.replay_ratio_to_bare
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.2}")),
        )?;
    }
    Ok(())
}

/// The soak: its first minute beside its last, and the largest the table got.
fn write_soak(out: &mut String, samples: &[Sample]) -> Result<()> {
    let minute = |from: f64, to: f64| {
        let window: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at_secs > from && s.at_secs <= to + 0.5)
            .collect();
        let n = window.len().max(1) as f64;
        (
            window.iter().map(|s| s.tps).sum::<f64>() / n,
            window.iter().map(|s| s.p99_ms).fold(0.0, f64::max),
        )
    };
    let end = samples.last().map_or(0.0, |s| s.at_secs);
    let (first_tps, first_p99) = minute(0.0, 60.0);
    let (last_tps, last_p99) = minute(end - 60.0, end);
    let max = |f: fn(&Sample) -> i64| samples.iter().map(f).max().unwrap_or(0);
    writeln!(
        out,
        "\nsoak, {:.0} s: first minute {first_tps:.0} tps (worst p99 {first_p99:.2} ms), last minute {last_tps:.0} tps (worst p99 {last_p99:.2} ms); \
         at most: heap {:.1} MB, primary key {:.1} MB, {} live rows, {} dead rows, {} expired rows not yet swept; {} requests failed",
        end,
        mb(max(|s| s.sizes.heap)),
        mb(max(|s| s.sizes.primary_key)),
        max(|s| s.live_rows),
        max(|s| s.dead_rows),
        max(|s| s.expired_rows),
        samples.iter().map(|s| s.failed).sum::<u64>(),
    )?;
    Ok(())
}

fn table_json(table: &Table) -> Value {
    json!({
        "rows": table.rows,
        "settings": table.settings.name(),
        "heap_bytes": table.sizes.heap,
        "primary_key_bytes": table.sizes.primary_key,
        "expires_at_index_bytes": table.sizes.expires_at,
    })
}

/// The targets of issues 4, 14 and 25, met or not.
fn write_targets(out: &mut String, targets: &[Target]) -> Result<()> {
    writeln!(out, "\ntargets (issues 4, 14 and 25):")?;
    for t in targets {
        writeln!(
            out,
            "  {:<62} {:<26} {}",
            t.name,
            t.measured,
            if t.met { "met" } else { "NOT met" }
        )?;
    }
    Ok(())
}

impl Row {
    fn json(&self) -> Value {
        json!({
            "rows": self.table.rows,
            "table": table_json(&self.table),
            "path": self.cell.path.name(),
            // null: the usual response of about 70 bytes.
            "response_bytes": self.cell.size,
            "clients": self.clients,
            "tps": round(self.tps, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "ratio_to_bare": round(self.ratio_to_bare, 3),
            "ratio_to_floor": self.ratio_to_floor.map(|ratio| round(ratio, 3)),
            "ops": self.ops,
            "client_cpu_us_per_op": round(self.client_us_per_op, 1),
            "server_cpu_us_per_op": self.server_us_per_op.map(|v| round(v, 1)),
            "wal_bytes_per_op": self.wal_bytes_per_op.map(|v| round(v, 0)),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10_f64.powi(digits);
    (x * scale).round() / scale
}

/// One target of issue 4 or 14, evaluated.
struct Target {
    name: String,
    measured: String,
    met: bool,
}

impl Target {
    fn json(&self) -> Value {
        json!({ "target": self.name, "measured": self.measured, "met": self.met })
    }
}

fn targets(
    rows: &[Row],
    in_flight: &[InFlight],
    sweep: Option<&mut SweepResult>,
    growth: &[Growth],
) -> Vec<Target> {
    let mut out = Vec::new();
    // Issue 25: with production-like settings the first request keeps 0.9 of its TPS
    // on the smallest table at every size (measured against bare in each table's own
    // rounds: the tables run minutes apart).
    let smallest = |settings: Settings| {
        growth
            .iter()
            .find(|g| g.table.settings == settings)
            .map(|g| g.table.rows)
    };
    for g in growth.iter().filter(|g| {
        g.table.settings == Settings::Production && Some(g.table.rows) != smallest(g.table.settings)
    }) {
        out.push(Target {
            name: format!(
                "first request at {} keys keeps >= 0.90 (production)",
                g.table.rows
            ),
            measured: format!("{:.2} x", g.kept),
            met: g.kept >= 0.9,
        });
    }
    // The grid's targets on the first table that ran.
    let first = rows.first().map(|r| r.table);
    let at16 = |cell: Cell| {
        rows.iter()
            .find(|r| Some(r.table) == first && r.clients == 16 && r.cell == cell)
    };
    let mut at_least = |name: String, ours: Cell, theirs: Cell, times: f64| {
        if let (Some(ours), Some(theirs)) = (at16(ours), at16(theirs)) {
            let ratio = ours.tps / theirs.tps;
            out.push(Target {
                name: format!(
                    "{name} >= {times:.2} x {} (16 clients)",
                    theirs.cell.label()
                ),
                measured: format!("{ratio:.2} x"),
                met: ratio >= times,
            });
        }
    };
    let usual = Cell::usual;
    at_least(
        "first request".into(),
        usual(Path::FirstRequest),
        usual(Path::Floor),
        0.90,
    );
    for size in rows
        .iter()
        .filter(|r| r.clients == 16 && r.cell.path == Path::FirstRequest)
    {
        let zero2prod = Cell {
            path: Path::Zero2Prod,
            ..size.cell
        };
        at_least(size.cell.label(), size.cell, zero2prod, 1.10);
    }
    at_least(
        "realistic first request".into(),
        usual(Path::RealisticFirstRequest),
        usual(Path::RealisticZero2Prod),
        1.05,
    );
    at_least(
        "realistic first request".into(),
        usual(Path::RealisticFirstRequest),
        usual(Path::RealisticBare),
        0.80,
    );
    at_least("replay".into(), usual(Path::Replay), usual(Path::Bare), 1.5);
    at_least(
        "conflict".into(),
        usual(Path::Conflict),
        usual(Path::Bare),
        1.5,
    );
    for f in in_flight {
        let wait_ms = ms(f.wait);
        let max_ms = f.refused.max_ms();
        out.push(Target {
            name: format!("in-flight answer within wait + 20 ms (wait {wait_ms:.0} ms)"),
            measured: format!("max {max_ms:.1} ms (+{:.1} ms)", max_ms - wait_ms),
            met: max_ms <= wait_ms + 20.0,
        });
    }
    if let Some(sweep) = sweep {
        let rate = sweep.alone_rows_per_s();
        out.push(Target {
            name: "sweeper alone >= 100,000 rows/s".into(),
            measured: format!("{rate:.0} rows/s"),
            met: rate >= 100_000.0,
        });
        let kept = sweep.tps_kept();
        out.push(Target {
            name: "writers keep >= 95% TPS with the default sweeper".into(),
            measured: format!("{:.0}%", kept * 100.0),
            met: kept >= 0.95,
        });
        let p99 = sweep.p99_ratio();
        out.push(Target {
            name: "writers' p99 <= 1.2 x with the default sweeper".into(),
            measured: format!("{p99:.2} x"),
            met: p99 <= 1.2,
        });
    }
    out
}

/// A figure rounded to a whole number, or `-` if it is not known.
fn whole_or_dash(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
