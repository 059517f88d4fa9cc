//! The report: the table and the lines printed at the end, the targets, and the same
//! figures as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::meters::{Meter, Tally};
use crate::paths::{Cell, InFlight, Path, SWEEP_WRITERS, SweepResult};
use crate::server::{Server, cores};

/// What the sections measured (each empty if it did not run).
pub struct Results {
    pub rows: Vec<Row>,
    pub flights: Vec<InFlight>,
    pub sweep: Option<SweepResult>,
}

/// The report of a run: the text printed at the end, and the parts of the JSON document
/// computed from the same figures.
pub struct Report {
    pub results: Results,
    pub text: String,
    flight_json: Vec<Value>,
    sweep_json: Value,
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
        if !results.rows.is_empty() {
            write_table(&mut out, &results.rows, meter)?;
        }
        let flight_json = write_in_flight(&mut out, &mut results.flights)?;
        let mut sweep_json = Value::Null;
        if let Some(s) = &mut results.sweep {
            sweep_json = write_sweeper(&mut out, s, meter)?;
        }
        let targets = targets(&results.rows, &results.flights, results.sweep.as_mut());
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
            "targets": self.targets.iter().map(Target::json).collect::<Vec<_>>(),
        })
    }
}

/// The grid: a line per cell and client count.
fn write_table(out: &mut String, rows: &[Row], meter: &Meter) -> Result<()> {
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
    for r in rows {
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
    writeln!(
        out,
        "sweeper alone: {} expired rows (inserted in {:.1} s) deleted in {:.2} s = {rate:.0} rows/s (batches of 10,000, no pause)",
        s.alone_deleted, s.fill_secs, s.alone_secs
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
        "rows": s.rows,
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

/// The targets of issues 4 and 14, met or not.
fn write_targets(out: &mut String, targets: &[Target]) -> Result<()> {
    writeln!(out, "\ntargets (issues 4 and 14):")?;
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

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub cell: Cell,
    pub clients: usize,
    pub tps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ratio_to_bare: f64,
    /// TPS over the floor's, if the floor ran.
    pub ratio_to_floor: Option<f64>,
    pub ops: u64,
    pub client_us_per_op: f64,
    pub server_us_per_op: Option<f64>,
    pub wal_bytes_per_op: Option<f64>,
}

impl Row {
    fn json(&self) -> Value {
        json!({
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

fn targets(rows: &[Row], in_flight: &[InFlight], sweep: Option<&mut SweepResult>) -> Vec<Target> {
    let mut out = Vec::new();
    let at16 = |cell: Cell| rows.iter().find(|r| r.clients == 16 && r.cell == cell);
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
