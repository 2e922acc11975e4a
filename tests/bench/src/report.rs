//! One measurement, and the report: a markdown table, a JSON file and the plot.

use serde::Serialize;

/// One figure from the harness.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// `limit`, `step`, `workload`, `runs`, `http`, `cold`, `memory`.
    pub group: &'static str,
    /// E.g. `chain40 (memory)`.
    pub name: String,
    /// The median (or the one figure) in `unit`.
    pub value: f64,
    /// `µs`, `ms`, `runs/s`, `MiB`...
    pub unit: &'static str,
    /// Per-step latency in µs, where the figure is a workflow of steps: the
    /// plot shows these.
    pub per_step_us: Option<f64>,
    /// The ratio to the raw wasmtime limit, where that means something.
    pub ratio: Option<f64>,
    /// The target from issue 6, as text (`<= 3 ms`), and whether it was met.
    pub target: Option<(String, bool)>,
    /// Samples, percentiles, anything else worth a column.
    pub note: String,
}

impl Measurement {
    pub fn new(
        group: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Measurement {
            group,
            name: name.into(),
            value,
            unit,
            per_step_us: None,
            ratio: None,
            target: None,
            note: String::new(),
        }
    }

    pub fn per_step_us(mut self, us: f64) -> Self {
        self.per_step_us = Some(us);
        self
    }

    pub fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        self
    }

    /// `met` is whether `value` meets `text`.
    pub fn target(mut self, text: impl Into<String>, met: bool) -> Self {
        self.target = Some((text.into(), met));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// The median of `samples` (sorted in place).
pub fn median(samples: &mut [f64]) -> f64 {
    percentile(samples, 50.0)
}

/// The `p`th percentile (nearest rank) of `samples` (sorted in place).
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// p50, p90, p99 and the maximum of `samples`; NaN for each when empty.
pub fn quantiles(samples: &[f64]) -> (f64, f64, f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    let mut sorted = samples.to_vec();
    (
        median(&mut sorted),
        percentile(&mut sorted, 90.0),
        percentile(&mut sorted, 99.0),
        percentile(&mut sorted, 100.0),
    )
}

/// The table BENCHMARKS.md quotes.
pub fn markdown(measurements: &[Measurement]) -> String {
    let mut out = String::from(
        "| group | measurement | median | per step | ratio to limit | target | notes |\n|---|---|---|---|---|---|---|\n",
    );
    for m in measurements {
        let value = format_value(m.value, m.unit);
        let per_step = m
            .per_step_us
            .map(|us| format!("{us:.1} µs"))
            .unwrap_or_default();
        let ratio = m.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
        let target = match &m.target {
            Some((text, true)) => format!("{text} ✅"),
            Some((text, false)) => format!("{text} ❌"),
            None => String::new(),
        };
        out.push_str(&format!(
            "| {} | {} | {value} | {per_step} | {ratio} | {target} | {} |\n",
            m.group, m.name, m.note
        ));
    }
    out
}

/// The measurements that have a target, one row each: the figures are the
/// results table's own (BENCHMARKS.md's targets table is this, spliced in
/// by the same `--update`, so the two cannot disagree).
pub fn targets(measurements: &[Measurement]) -> String {
    let mut out = String::from("| target | measurement | measured | met |\n|---|---|---|---|\n");
    for m in measurements {
        let Some((target, met)) = &m.target else {
            continue;
        };
        let measured = match m.ratio {
            Some(ratio) => format!("{} ({ratio:.2}x the limit)", format_value(m.value, m.unit)),
            None => format_value(m.value, m.unit),
        };
        let met = if *met { "✅" } else { "❌" };
        out.push_str(&format!(
            "| {target} | {} {} | {measured} | {met} |\n",
            m.group, m.name
        ));
    }
    out
}

fn format_value(value: f64, unit: &str) -> String {
    if value >= 100.0 {
        format!("{value:.0} {unit}")
    } else if value >= 10.0 {
        format!("{value:.1} {unit}")
    } else {
        format!("{value:.2} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_targets_table_takes_its_figures_from_the_measurements() {
        let row = |name: &str, value, ratio, target: Option<(&str, bool)>| Measurement {
            group: "step",
            name: name.to_owned(),
            value,
            unit: "µs",
            per_step_us: None,
            ratio,
            target: target.map(|(t, met)| (t.to_owned(), met)),
            note: String::new(),
        };
        let table = targets(&[
            row(
                "1 step (memory)",
                14.04,
                Some(1.83),
                Some(("<= 1.5x", false)),
            ),
            row("no target", 3.0, None, None),
            row("chain40", 740.0, None, Some(("<= 3 ms", true))),
        ]);
        assert_eq!(
            table,
            "| target | measurement | measured | met |\n|---|---|---|---|\n\
             | <= 1.5x | step 1 step (memory) | 14.0 µs (1.83x the limit) | ❌ |\n\
             | <= 3 ms | step chain40 | 740 µs | ✅ |\n"
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&mut samples), 3.0);
        assert_eq!(percentile(&mut samples, 99.0), 5.0);
        assert_eq!(percentile(&mut samples, 0.0), 1.0);
        let mut hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut hundred, 99.0), 99.0);
    }

    #[test]
    fn the_table_has_a_row_per_measurement() {
        let rows = [
            Measurement::new("workload", "chain40 (memory)", 2.5, "ms")
                .per_step_us(62.5)
                .target("<= 3 ms", true),
            Measurement::new("http", "runs/s", 4200.0, "runs/s").target(">= 5000", false),
        ];
        let table = markdown(&rows);
        assert!(
            table
                .contains("| workload | chain40 (memory) | 2.50 ms | 62.5 µs |  | <= 3 ms ✅ |  |")
        );
        assert!(table.contains("| http | runs/s | 4200 runs/s |  |  | >= 5000 ❌ |  |"));
    }
}
