//! The plot of per-step latency by workload (`per-step.svg`): one row per
//! workload, a bar per mode (`memory`, `durable`, ...) side by side, on a log
//! scale, with the raw wasmtime limit as a vertical reference line.
//!
//! Rows come from the measurements that have `per_step_us`: the workload is
//! the name before ` (mode)`, the mode the text in the brackets. Text is drawn
//! by the SVG backend as `<text>` (plotters' own size estimate lays it out),
//! so no font file is needed.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Measurement;

const WIDTH: u32 = 1100;
const ROW_HEIGHT: u32 = 56;
const FONT: &str = "sans-serif";
/// Units of the y axis per workload row (integer coordinates format their
/// labels; the bars of one row split its band).
const ROW: i32 = 1000;
/// The title and the legend.
const HEAD_HEIGHT: u32 = 84;
/// Value labels at the end of the bars, px.
const LABEL_SIZE: u32 = 13;

/// What the legend says of a mode.
const MODE_LEGENDS: [(&str, &str); 3] = [
    ("sandbox only", "sandbox only"),
    ("memory", "memory (executor)"),
    ("durable", "durable (service + SQLite)"),
];

/// Bar colours by mode; other modes take the rest in order.
const MODE_COLOURS: [(&str, RGBColor); 3] = [
    ("sandbox only", RGBColor(150, 150, 150)),
    ("memory", RGBColor(31, 119, 180)),
    ("durable", RGBColor(230, 120, 20)),
];
const OTHER_COLOURS: [RGBColor; 3] = [
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];
const LIMIT_COLOUR: RGBColor = RGBColor(200, 30, 30);

/// What the plot shows, taken from the measurements.
#[derive(Debug, PartialEq)]
struct Figure {
    /// Workloads, top to bottom.
    workloads: Vec<String>,
    /// Modes, in legend order.
    modes: Vec<String>,
    /// (workload index, mode index, µs per step).
    bars: Vec<(usize, usize, f64)>,
    /// The raw wasmtime limit, µs.
    limit_us: Option<f64>,
}

impl Figure {
    fn from(results: &[Measurement]) -> Figure {
        let mut figure = Figure {
            workloads: Vec::new(),
            modes: Vec::new(),
            bars: Vec::new(),
            limit_us: None,
        };
        for m in results {
            if m.group == "limit" {
                // The first is the one-call limit the ratios mean; the
                // parallel one is a row of the table only.
                if figure.limit_us.is_none() {
                    figure.limit_us = Some(m.value);
                }
                continue;
            }
            let Some(us) = m.per_step_us.filter(|us| us.is_finite() && *us > 0.0) else {
                continue;
            };
            let (workload, mode) = split_mode(&m.name);
            let w = index_of(&mut figure.workloads, workload);
            let k = index_of(&mut figure.modes, mode);
            figure.bars.push((w, k, us));
        }
        // Known modes first, in their own order.
        let rank = |mode: &str| {
            MODE_COLOURS
                .iter()
                .position(|(known, _)| *known == mode)
                .unwrap_or(MODE_COLOURS.len())
        };
        let mut order: Vec<usize> = (0..figure.modes.len()).collect();
        order.sort_by_key(|&k| (rank(&figure.modes[k]), k));
        let mut new_index = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new;
        }
        figure.modes = order.iter().map(|&k| figure.modes[k].clone()).collect();
        for bar in &mut figure.bars {
            bar.1 = new_index[bar.1];
        }
        figure
    }

    fn colour(&self, mode: usize) -> RGBColor {
        let name = &self.modes[mode];
        MODE_COLOURS
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, colour)| *colour)
            .unwrap_or_else(|| {
                let others = self.modes[..mode]
                    .iter()
                    .filter(|m| !MODE_COLOURS.iter().any(|(known, _)| known == m))
                    .count();
                OTHER_COLOURS[others % OTHER_COLOURS.len()]
            })
    }

    /// The x range, whole decades around every value.
    fn x_range(&self) -> (f64, f64) {
        let values = self.bars.iter().map(|b| b.2).chain(self.limit_us);
        let low = values.clone().fold(f64::INFINITY, f64::min);
        let high = values.fold(0.0, f64::max);
        let low = 10f64.powf((low * 0.9).log10().floor());
        // Room on the right for the value labels.
        let high = ticks(low, f64::MAX)
            .into_iter()
            .find(|&tick| tick >= high * 2.0)
            .unwrap_or(high * 2.0);
        (low, high)
    }
}

/// `chain40 (memory)` -> (`chain40`, `memory`); no brackets -> (name, ``).
fn split_mode(name: &str) -> (&str, &str) {
    match name
        .strip_suffix(')')
        .and_then(|rest| rest.rsplit_once(" ("))
    {
        Some((workload, mode)) => (workload, mode),
        None => (name, ""),
    }
}

fn index_of(list: &mut Vec<String>, item: &str) -> usize {
    match list.iter().position(|known| known == item) {
        Some(at) => at,
        None => {
            list.push(item.to_string());
            list.len() - 1
        }
    }
}

/// 1, 2, 5, 10, 20, 50... within `low..=high`.
fn ticks(low: f64, high: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = low;
    while decade <= high && ticks.len() < 64 {
        for step in [1.0, 2.0, 5.0] {
            let tick = decade * step;
            if tick >= low && tick <= high {
                ticks.push(tick);
            }
        }
        decade *= 10.0;
    }
    ticks
}

fn format_us(us: f64) -> String {
    if us >= 100.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.1} µs")
    }
}

/// Writes the plot of `results` to `path` (SVG).
pub fn per_step(results: &[Measurement], path: &Path) -> anyhow::Result<()> {
    let figure = Figure::from(results);
    let rows = figure.workloads.len().max(1) as u32;
    let height = HEAD_HEIGHT + 70 + rows * ROW_HEIGHT;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    if figure.bars.is_empty() {
        root.draw(&Text::new(
            "no per-step figures in this run (run the inproc part)",
            (20, 40),
            (FONT, 18).into_font(),
        ))?;
        root.present()?;
        return Ok(());
    }
    draw(&root, &figure)?;
    root.present()?;
    Ok(())
}

/// Width in pixels of `text` at `size` px, as plotters' own estimate for SVG
/// has it (the viewer's font decides the real one).
fn text_width(text: &str, size: f64) -> i32 {
    (text.chars().count() as f64 * size * 0.6).ceil() as i32
}

/// `51.6 µs (1.9x)`: the value and its ratio to the limit.
fn bar_label(us: f64, limit: Option<f64>) -> String {
    match limit {
        Some(limit) => format!("{} ({:.1}x)", format_us(us), us / limit),
        None => format_us(us),
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    figure: &Figure,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let (head, body) = root.split_vertically(HEAD_HEIGHT);
    draw_head(&head, figure)?;

    let n = figure.workloads.len();
    let (low, high) = figure.x_range();
    let label_width = figure
        .workloads
        .iter()
        .map(|w| text_width(w, 15.0) as u32 + 16)
        .max()
        .unwrap_or(100)
        .max(100);
    // Workload i is the band [(n - i - 1) * ROW, (n - i) * ROW] (first on
    // top); its label sits at the middle.
    let rows = n as i32;
    let y_labels: Vec<i32> = (0..rows).map(|i| (rows - i) * ROW - ROW / 2).collect();
    let x_axis = (low..high).log_scale().with_key_points(ticks(low, high));
    let y_axis = (0..rows * ROW).with_key_points(y_labels);
    let mut chart = ChartBuilder::on(&body)
        .margin_left(16)
        .margin_right(40)
        .margin_bottom(8)
        .x_label_area_size(50)
        .y_label_area_size(label_width)
        .build_cartesian_2d(x_axis, y_axis)?;

    let workloads = figure.workloads.clone();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .x_desc("µs per step (log scale)")
        .x_label_formatter(&|us| format!("{us}"))
        .y_label_formatter(&|y| {
            usize::try_from(rows - 1 - y / ROW)
                .ok()
                .and_then(|i| workloads.get(i))
                .cloned()
                .unwrap_or_default()
        })
        .label_style((FONT, 15).into_font())
        .axis_desc_style((FONT, 15).into_font())
        .draw()?;

    // The limit under the bars and their labels.
    if let Some(limit) = figure.limit_us {
        chart.draw_series(LineSeries::new(
            [(limit, 0), (limit, rows * ROW)],
            ShapeStyle::from(&LIMIT_COLOUR).stroke_width(2),
        ))?;
    }

    let modes = figure.modes.len() as i32;
    // 80% of a row for its bars, split between the modes.
    let band = ROW * 8 / 10 / modes;
    let gap = ROW / 100;
    // Modes top to bottom within a workload's band, in legend order.
    let span = |w: usize, k: usize| {
        let top = (rows - w as i32) * ROW - ROW / 10 - band * k as i32;
        (top - band + gap, top - gap)
    };
    for k in 0..figure.modes.len() {
        let colour = figure.colour(k);
        chart.draw_series(figure.bars.iter().filter(|b| b.1 == k).map(|&(w, _, us)| {
            let (bottom, top) = span(w, k);
            Rectangle::new([(low, bottom), (us, top)], colour.filled())
        }))?;
    }

    // Value labels on a white ground, so the limit line does not cross them.
    let size = (LABEL_SIZE as i32).min(ROW_HEIGHT as i32 * 8 / 10 / modes);
    let style = TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for &(w, k, us) in &figure.bars {
        let (bottom, top) = span(w, k);
        let (x, y) = chart.backend_coord(&(us, (bottom + top) / 2));
        let text = bar_label(us, figure.limit_us);
        let x = x + 5;
        let half = size / 2 + 1;
        root.draw(&Rectangle::new(
            [
                (x - 2, y - half),
                (x + text_width(&text, size as f64) + 2, y + half),
            ],
            WHITE.filled(),
        ))?;
        root.draw(&Text::new(text, (x, y), style.clone()))?;
    }
    Ok(())
}

/// The title and, under it, the legend in one line.
fn draw_head<DB: DrawingBackend>(
    head: &DrawingArea<DB, plotters::coord::Shift>,
    figure: &Figure,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let centred = |size: i32| {
        TextStyle::from((FONT, size).into_font()).pos(Pos::new(HPos::Center, VPos::Center))
    };
    head.draw(&Text::new(
        "Per-step latency by workload: median µs per step, and its ratio to the raw wasmtime limit",
        (WIDTH as i32 / 2, 24),
        centred(20),
    ))?;
    let mut items: Vec<(String, Option<RGBColor>)> = figure
        .modes
        .iter()
        .enumerate()
        .map(|(k, mode)| {
            let legend = MODE_LEGENDS
                .iter()
                .find(|(known, _)| known == mode)
                .map(|(_, legend)| *legend);
            let name = match legend {
                Some(legend) => legend,
                None if mode.is_empty() => "(no mode)",
                None => mode,
            };
            (name.to_string(), Some(figure.colour(k)))
        })
        .collect();
    if let Some(limit) = figure.limit_us {
        items.push((format!("raw wasmtime limit: {}", format_us(limit)), None));
    }
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let item_width = |text: &str| 22 + (text.chars().count() as f64 * 15.0 * 0.55) as i32 + 30;
    let total: i32 = items.iter().map(|(text, _)| item_width(text)).sum();
    let mut x = (WIDTH as i32 - total) / 2;
    let y = 60;
    for (text, colour) in items {
        match colour {
            Some(colour) => head.draw(&Rectangle::new(
                [(x, y - 7), (x + 16, y + 7)],
                colour.filled(),
            ))?,
            None => head.draw(&PathElement::new(
                [(x, y), (x + 16, y)],
                ShapeStyle::from(&LIMIT_COLOUR).stroke_width(2),
            ))?,
        }
        let width = item_width(&text);
        head.draw(&Text::new(text, (x + 22, y), style.clone()))?;
        x += width;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Vec<Measurement> {
        vec![
            Measurement::new("limit", "raw wasmtime call (noop)", 15.0, "µs").per_step_us(15.0),
            Measurement::new("step", "1 step (memory)", 26.0, "µs").per_step_us(26.0),
            Measurement::new("step", "1 step (durable)", 160.0, "µs").per_step_us(160.0),
            Measurement::new("workload", "chain40 (durable)", 2.8, "ms").per_step_us(70.0),
            Measurement::new("workload", "chain40 (memory)", 0.9, "ms").per_step_us(23.0),
            Measurement::new("http", "runs/s", 4000.0, "runs/s"),
        ]
    }

    #[test]
    fn rows_are_workloads_and_bars_are_modes() {
        let figure = Figure::from(&results());
        assert_eq!(figure.workloads, ["1 step", "chain40"]);
        assert_eq!(figure.modes, ["memory", "durable"]);
        assert_eq!(
            figure.bars,
            [(0, 0, 26.0), (0, 1, 160.0), (1, 1, 70.0), (1, 0, 23.0)]
        );
        assert_eq!(figure.limit_us, Some(15.0));
        assert_eq!(figure.x_range(), (10.0, 500.0));
    }

    #[test]
    fn a_name_without_a_mode_is_its_own_workload() {
        assert_eq!(split_mode("chain40 (memory)"), ("chain40", "memory"));
        assert_eq!(split_mode("cold start"), ("cold start", ""));
        assert_eq!(
            ticks(10.0, 1000.0),
            [10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0]
        );
    }

    #[test]
    fn the_svg_has_every_workload_and_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("per-step.svg");
        per_step(&results(), &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        for text in [
            "1 step",
            "chain40",
            "memory",
            "durable",
            "raw wasmtime limit: 15.0 µs",
            "160 µs (10.7x)",
        ] {
            assert!(svg.contains(text), "{text} missing from the plot");
        }
    }
}
