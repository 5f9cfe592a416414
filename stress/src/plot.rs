//! The compare plot: latency percentiles per broker (log scale) and broker CPU per delivered
//! message, side by side in one SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::compare::Summary;

const PERCENTILES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];
const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn percentiles(s: &Summary) -> [f64; 5] {
    [s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us]
}

pub fn write_compare_svg(path: &Path, title: &str, summary: &[Summary]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(680);

    // Latency percentiles.
    let values: Vec<f64> = summary
        .iter()
        .flat_map(percentiles)
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1.0)
        / 2.0;
    let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 4.0) * 2.0;
    let mut chart = ChartBuilder::on(&left)
        .caption(format!("latency (µs, log) — {title}"), ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.3f64..4.3f64, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && (0.0..5.0).contains(&i) {
                PERCENTILES[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_desc("µs")
        .draw()?;
    for (k, s) in summary.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<(f64, f64)> = percentiles(s)
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite() && **v > 0.0)
            .map(|(i, v)| (i as f64, *v))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(s.broker.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    // CPU per delivered message: fixed rate and max rate, one pair of bars per broker.
    let n = summary.len().max(1);
    let cpu_max = summary
        .iter()
        .flat_map(|s| [s.cpu_us_per_msg_fixed, s.cpu_us_per_msg_max])
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.2;
    let mut bars = ChartBuilder::on(&right)
        .caption("broker CPU µs per delivered message", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..cpu_max)?;
    let names: Vec<String> = summary.iter().map(|s| s.broker.clone()).collect();
    bars.configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("µs / msg")
        .draw()?;
    for (k, s) in summary.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let x = k as f64;
        for (j, (v, style)) in [
            (s.cpu_us_per_msg_fixed, color.filled()),
            (s.cpu_us_per_msg_max, color.mix(0.45).filled()),
        ]
        .into_iter()
        .enumerate()
        {
            if !v.is_finite() {
                continue;
            }
            let x0 = x + 0.15 + j as f64 * 0.35;
            bars.draw_series(std::iter::once(Rectangle::new(
                [(x0, 0.0), (x0 + 0.3, v)],
                style,
            )))?;
            bars.draw_series(std::iter::once(Text::new(
                format!("{v:.2}"),
                (x0 + 0.02, v + cpu_max * 0.02),
                ("sans-serif", 13),
            )))?;
        }
    }
    bars.draw_series(std::iter::once(Text::new(
        "solid: fixed rate, light: max rate",
        (0.05, cpu_max * 0.95),
        ("sans-serif", 13),
    )))?;
    root.present()?;
    Ok(())
}
