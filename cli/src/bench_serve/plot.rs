//! PNG plots: latency CDFs of each run, and goodput against offered load.
//! The bitmap backend with an embedded font (DejaVu Sans), so no system
//! font library is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::client::Record;

fn font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .is_err()
        {
            tracing::warn!("the embedded plot font did not load; labels will be missing");
        }
    });
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// One run's records, under a legend label.
pub struct Series<'a> {
    pub label: String,
    pub records: Vec<&'a Record>,
}

type Metric = (&'static str, fn(&Record) -> Vec<f64>);

/// TTFT, TPOT, ITL and end-to-end latency CDFs, one curve per run.
pub fn latency_cdfs(path: &Path, runs: &[Series]) -> Result<()> {
    font();
    let metrics: [Metric; 4] = [
        ("time to first token (ms)", |r| vec![r.ttft_s * 1e3]),
        ("time per output token (ms)", |r| {
            r.tpot().map(|t| t * 1e3).into_iter().collect()
        }),
        ("inter-token latency (ms)", |r| {
            r.itl_s.iter().map(|t| t * 1e3).collect()
        }),
        ("end-to-end latency (ms)", |r| vec![r.e2e_s * 1e3]),
    ];
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((2, 2));
    for (panel, (title, f)) in panels.iter().zip(metrics) {
        let data: Vec<(String, Vec<f64>)> = runs
            .iter()
            .map(|s| {
                let mut v: Vec<f64> = s
                    .records
                    .iter()
                    .filter(|r| r.ok)
                    .flat_map(|r| f(r))
                    .filter(|x| x.is_finite())
                    .collect();
                v.sort_by(|a, b| a.total_cmp(b));
                (s.label.clone(), v)
            })
            .collect();
        // Up to the largest 99.5th percentile: one stall would squash the rest.
        let xmax = data
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(_, v)| super::report::percentile_sorted(v, 0.995))
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..xmax, 0f64..1.0f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("ms (axis ends past the largest p99.5)")
            .y_desc("fraction")
            .draw()
            .map_err(err)?;
        for (k, (label, v)) in data.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let color = Palette99::pick(k).to_rgba();
            let n = v.len() as f64;
            chart
                .draw_series(LineSeries::new(
                    // An empirical CDF: a step up of 1/n at every value.
                    v.iter()
                        .enumerate()
                        .flat_map(|(j, x)| [(*x, j as f64 / n), (*x, (j + 1) as f64 / n)])
                        .map(|(x, y)| (x.min(xmax), y)),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// One setup's points: (offered load, goodput, request throughput).
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64, f64)>,
}

/// Goodput (solid) and request throughput (thin, crosses) against offered load.
pub fn goodput(path: &Path, x_desc: &str, curves: &[Curve]) -> Result<()> {
    font();
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let all = curves.iter().flat_map(|c| c.points.iter());
    let (xmax, ymax) = all.fold((0.0f64, 0.0f64), |(x, y), p| {
        (x.max(p.0), y.max(p.1).max(p.2))
    });
    let mut chart = ChartBuilder::on(&root)
        .caption("goodput against offered load", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(xmax * 1.1).max(1e-3), 0f64..(ymax * 1.15).max(1e-3))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("requests/s")
        .draw()
        .map_err(err)?;
    for (k, c) in curves.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(
                c.points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(3),
            ))
            .map_err(err)?
            .label(format!("{}: goodput", c.label))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(
                c.points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 5, color.filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                c.points.iter().map(|p| (p.0, p.2)),
                color.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("{}: completed", c.label))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
            });
        chart
            .draw_series(c.points.iter().map(|p| Cross::new((p.0, p.2), 5, color)))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
