//! The charts (SVG, with plotters): TPS of bare, the floor, the zero2prod shape and the
//! first request against the client count, and the first request against the table's
//! size.

use std::path::Path as FsPath;

use anyhow::Result;

use crate::paths::{Cell, Path, Row};
use crate::report::Growth;
use crate::server::{Server, cores};
use crate::soak::Sample;
use crate::table::{Settings, mb};

use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;

/// A white SVG canvas of `size` pixels at `file`, its folder made first.
fn canvas(file: &FsPath, size: (u32, u32)) -> Result<DrawingArea<SVGBackend<'_>, Shift>> {
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let root = SVGBackend::new(file, size).into_drawing_area();
    root.fill(&WHITE)?;
    Ok(root)
}

/// The series' labels in a box at `position`, in a font of `size` points.
fn legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
    size: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", size))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

pub fn draw(file: &FsPath, rows: &[Row], clients: &[usize], server: &Server) -> Result<()> {
    let series = [
        (
            Path::Bare,
            "bare: BEGIN; INSERT; COMMIT",
            RGBColor(110, 110, 110),
        ),
        (
            Path::Floor,
            "floor: bare + the key row in the same commit",
            RGBColor(90, 174, 97),
        ),
        (
            Path::Zero2Prod,
            "zero2prod shape (hand-written)",
            RGBColor(214, 96, 77),
        ),
        (
            Path::FirstRequest,
            "pg-idempotency, first request",
            RGBColor(33, 102, 172),
        ),
    ];
    let tps = |path: Path, n: usize| {
        rows.iter()
            .find(|r| r.cell == Cell::usual(path) && r.clients == n)
            .map_or(0.0, |r| r.tps)
    };
    let top = series
        .iter()
        .flat_map(|(p, _, _)| clients.iter().map(move |&n| tps(*p, n)))
        .fold(0.0_f64, f64::max)
        * 1.15;

    let root = canvas(file, (820, 500))?;
    let caption = format!(
        "Transactions per second (PostgreSQL {}, fsync {}, {} cores)",
        server.postgres_version(),
        server.setting("fsync"),
        cores(),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(
            (0..clients.len().saturating_sub(1)).into_segmented(),
            0.0..top.max(1.0),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("concurrent clients")
        .y_desc("TPS")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => clients.get(*i).map_or(String::new(), usize::to_string),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (path, label, color) in series {
        if !rows.iter().any(|r| r.cell == Cell::usual(path)) {
            continue;
        }
        let points: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, &n)| (SegmentValue::CenterOf(i), tps(path, n)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft, 14)?;
    root.present()?;
    Ok(())
}

/// The growth chart (SVG): what the first request keeps on each table size of its
/// throughput on the smallest ([`Growth::kept`]), and its TPS as a fraction of bare's,
/// a line each per settings.
pub fn draw_growth(file: &FsPath, growth: &[Growth], server: &Server) -> Result<()> {
    let millions = |rows: i64| rows as f64 / 1e6;
    let widest = growth
        .iter()
        .map(|g| millions(g.table.rows))
        .fold(1.0_f64, f64::max);
    let root = canvas(file, (820, 500))?;
    let caption = format!(
        "First request against the table's size (PostgreSQL {}, {} cores)",
        server.postgres_version(),
        cores(),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..widest * 1.05, 0.0..1.2)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .x_desc("live keys in idempotency_keys (millions)")
        .y_desc("ratio")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    let mut settings: Vec<Settings> = Vec::new();
    for g in growth {
        if !settings.contains(&g.table.settings) {
            settings.push(g.table.settings);
        }
    }
    let colors = [
        RGBColor(33, 102, 172),
        RGBColor(214, 96, 77),
        RGBColor(90, 174, 97),
    ];
    for (i, &which) in settings.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points = |ratio: fn(&Growth) -> f64| -> Vec<(f64, f64)> {
            growth
                .iter()
                .filter(|g| g.table.settings == which)
                .map(|g| (millions(g.table.rows), ratio(g)))
                .collect()
        };
        for (ratio, style, label) in [
            (
                (|g: &Growth| g.kept) as fn(&Growth) -> f64,
                color.stroke_width(3),
                "kept (x bare / x bare on the smallest table)",
            ),
            (
                |g: &Growth| g.ratio_to_bare,
                color.mix(0.5).stroke_width(2),
                "TPS / bare's TPS",
            ),
        ] {
            let line = points(ratio);
            chart
                .draw_series(LineSeries::new(line.clone(), style))?
                .label(format!("{} settings: {label}", which.name()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerLeft, 14)?;
    root.present()?;
    Ok(())
}

/// The soak chart (SVG): over the soak's minutes, a panel each for the requests per
/// second answered, their p99, the table's sizes, and its dead and expired rows.
pub fn draw_soak(file: &FsPath, samples: &[Sample], rate: f64, server: &Server) -> Result<()> {
    let minutes = |s: &Sample| s.at_secs / 60.0;
    let end = samples.last().map_or(1.0, minutes);
    let root = canvas(file, (820, 960))?;
    let root = root.titled(
        &format!(
            "Soak: {rate:.0} first requests/s, the default sweeper (PostgreSQL {}, {} cores)",
            server.postgres_version(),
            cores()
        ),
        ("sans-serif", 20),
    )?;
    let panels = root.split_evenly((4, 1));
    type Series<'a> = (&'a str, RGBColor, Box<dyn Fn(&Sample) -> f64>);
    let blue = RGBColor(33, 102, 172);
    let red = RGBColor(214, 96, 77);
    let green = RGBColor(90, 174, 97);
    let specs: [(&str, Vec<Series>); 4] = [
        (
            "answered per second",
            vec![(
                "first requests answered per second",
                blue,
                Box::new(|s| s.tps),
            )],
        ),
        ("ms", vec![("p99 latency", red, Box::new(|s| s.p99_ms))]),
        (
            "MB",
            vec![
                ("heap", blue, Box::new(move |s| mb(s.sizes.heap))),
                (
                    "primary key",
                    red,
                    Box::new(move |s| mb(s.sizes.primary_key)),
                ),
                (
                    "expires_at index",
                    green,
                    Box::new(move |s| mb(s.sizes.expires_at)),
                ),
            ],
        ),
        (
            "thousand rows",
            vec![
                ("live rows", blue, Box::new(|s| s.live_rows as f64 / 1000.0)),
                ("dead rows", red, Box::new(|s| s.dead_rows as f64 / 1000.0)),
                (
                    "expired, not yet swept",
                    green,
                    Box::new(|s| s.expired_rows as f64 / 1000.0),
                ),
            ],
        ),
    ];
    for (panel, (unit, series)) in panels.iter().zip(specs) {
        let top = series
            .iter()
            .flat_map(|(_, _, value)| samples.iter().map(value))
            .fold(0.0_f64, f64::max)
            * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..end, 0.0..top.max(1.0))?;
        chart
            .configure_mesh()
            .light_line_style(TRANSPARENT)
            .x_desc("minutes")
            .y_desc(unit)
            .label_style(("sans-serif", 12))
            .draw()?;
        for (label, color, value) in series {
            chart
                .draw_series(LineSeries::new(
                    samples.iter().map(|s| (minutes(s), value(s))),
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight, 12)?;
    }
    root.present()?;
    Ok(())
}
