//! The TPS chart (SVG, with plotters): bare, the floor, the zero2prod shape and the
//! first request against the client count.

use std::path::Path as FsPath;

use anyhow::Result;

use crate::paths::{Cell, Path};
use crate::report::Row;
use crate::server::{Server, cores};

pub fn draw(file: &FsPath, rows: &[Row], clients: &[usize], server: &Server) -> Result<()> {
    use plotters::prelude::*;

    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
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

    let root = SVGBackend::new(file, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let caption = format!(
        "Transactions per second (PostgreSQL {}, fsync {}, {} cores)",
        server.version.split_whitespace().nth(1).unwrap_or("?"),
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
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()?;
    Ok(())
}
