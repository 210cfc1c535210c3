//! The SVG plots of the matrix: one line per workload across the modes.

use crate::{Point, WORKLOADS};

fn find<'a>(points: &'a [Point], w: &str, mode: &str) -> Option<&'a Point> {
    points.iter().find(|p| p.workload == w && p.mode == mode)
}

/// Plots `metric` (`exits`: exits per operation, else guest µs per operation) into `path`.
pub fn plot(
    points: &[Point],
    metric: &str,
    path: &std::path::Path,
    title: &str,
) -> Result<(), String> {
    use plotters::prelude::*;
    let modes: Vec<String> = {
        let mut m: Vec<String> = points.iter().map(|p| p.mode.clone()).collect();
        m.dedup();
        m
    };
    let val = |p: &Point| {
        if metric == "exits" {
            p.exits_per_op.median
        } else {
            p.guest_us_per_op.median
        }
    };
    let ymax = points.iter().map(val).fold(0.0, f64::max).max(1e-3) * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..(modes.len().max(1) as f64 - 0.5).max(0.5), 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(modes.len().max(1))
        .x_label_formatter(&|x| modes.get(x.round() as usize).cloned().unwrap_or_default())
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, w) in WORKLOADS.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let series: Vec<(f64, f64)> = modes
            .iter()
            .enumerate()
            .filter_map(|(x, m)| find(points, w, m).map(|p| (x as f64, val(p))))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(*w)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
