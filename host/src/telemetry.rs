//! What the host tells its operators about itself: logs (tracing, to stderr) and
//! Prometheus metrics (for `GET /metrics`).
//!
//! Not plugin output: a step's logs go into its run record. The recording
//! functions ([`run_finished`], [`step_attempt`], ...) are cheap no-ops until
//! [`Metrics::install`] has run, so library code and tests may call them freely.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the current span and of
    /// every span around it (`run_id`, `step_id`, `plugin`, ...).
    Json,
}

/// Logs to stderr in `format`, filtered by `TRELLIS_LOG` (e.g. `info`,
/// `trellis=debug`), else by `default` (`warn` for the CLI, `info` for a
/// server's lifecycle). A second call does nothing.
pub fn init(format: LogFormat, default: &str) {
    let (filter, bad_filter) = match std::env::var("TRELLIS_LOG") {
        Ok(directives) if !directives.is_empty() => match EnvFilter::try_new(&directives) {
            Ok(filter) => (filter, None),
            Err(error) => (EnvFilter::new(default), Some((directives, error))),
        },
        _ => (EnvFilter::new(default), None),
    };
    let installed = subscriber(format, filter, std::io::stderr).try_init();
    if installed.is_ok()
        && let Some((directives, error)) = bad_filter
    {
        tracing::warn!(
            "ignoring TRELLIS_LOG=\"{directives}\" ({error}); logging at the default level"
        );
    }
}

/// The log subscriber: `filter`ed events in `format` to `writer`.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .finish(),
        ),
    }
}

/// The step-duration histogram's buckets, in seconds: a trivial plugin runs
/// in tens of microseconds, a step may run up to its timeout (60 s by default).
const STEP_DURATION_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How often recorded histogram samples are folded in when nobody scrapes:
/// without it they would pile up in memory between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

const RUNS: &str = "trellis_runs_total";
const RUNS_ACCEPTED: &str = "trellis_runs_accepted_total";
const STEP_DURATION: &str = "trellis_step_duration_seconds";
const STEP_ATTEMPTS: &str = "trellis_step_attempts_total";
const FUEL: &str = "trellis_fuel_consumed_total";
const QUEUE_DEPTH: &str = "trellis_queue_depth";
const STEPS_IN_FLIGHT: &str = "trellis_steps_in_flight";

/// The process's metrics recorder, rendered as Prometheus text. Cloning is
/// cheap; every clone renders the same metrics.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

impl Metrics {
    /// Installs the Prometheus recorder as the process's metrics recorder
    /// (no HTTP listener: the API serves [`Metrics::render`]) and starts its
    /// upkeep thread. Idempotent: every call returns the same recorder.
    pub fn install() -> Metrics {
        METRICS
            .get_or_init(|| {
                let recorder = recorder();
                let handle = recorder.handle();
                if metrics::set_global_recorder(recorder).is_err() {
                    // Only if something else installed a recorder first; the
                    // metrics go there and `render` shows none of them.
                    tracing::warn!("another metrics recorder is installed; /metrics will be empty");
                }
                describe();
                let upkeep = handle.clone();
                let spawned = std::thread::Builder::new()
                    .name("trellis-metrics-upkeep".to_owned())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(UPKEEP_INTERVAL);
                            upkeep.run_upkeep();
                        }
                    });
                if let Err(error) = spawned {
                    tracing::warn!("cannot start the metrics upkeep thread: {error}");
                }
                Metrics { handle }
            })
            .clone()
    }

    /// Every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// A recorder with Trellis's histogram buckets, not yet installed.
fn recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(STEP_DURATION.to_owned()),
            STEP_DURATION_BUCKETS,
        )
        .expect("the bucket list is not empty")
        .build_recorder()
}

/// Help texts and units, for the recorder in use.
fn describe() {
    describe_counter!(
        RUNS,
        Unit::Count,
        "Runs finished, by workflow and final status."
    );
    describe_counter!(RUNS_ACCEPTED, Unit::Count, "Runs accepted, by workflow.");
    describe_histogram!(
        STEP_DURATION,
        Unit::Seconds,
        "Wall-clock time of each step attempt, by plugin."
    );
    describe_counter!(
        STEP_ATTEMPTS,
        Unit::Count,
        "Step attempts finished, by plugin and status."
    );
    describe_counter!(
        FUEL,
        Unit::Count,
        "Wasm fuel consumed by step attempts, by plugin."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Runs accepted and not yet running."
    );
    describe_gauge!(STEPS_IN_FLIGHT, Unit::Count, "Step attempts running now.");
}

/// A run reached a final status (`succeeded`, `failed`, `cancelled`).
pub fn run_finished(workflow: &str, status: &str) {
    counter!(RUNS, "workflow" => workflow.to_owned(), "status" => status.to_owned()).increment(1);
}

/// A run was accepted (by the API or the command line).
pub fn run_accepted(workflow: &str) {
    counter!(RUNS_ACCEPTED, "workflow" => workflow.to_owned()).increment(1);
}

/// A step attempt ended with `status` after `duration`, having used `fuel`.
pub fn step_attempt(plugin: &str, status: &str, duration: Duration, fuel: u64) {
    histogram!(STEP_DURATION, "plugin" => plugin.to_owned()).record(duration.as_secs_f64());
    counter!(FUEL, "plugin" => plugin.to_owned()).increment(fuel);
    counter!(STEP_ATTEMPTS, "plugin" => plugin.to_owned(), "status" => status.to_owned())
        .increment(1);
}

/// How many accepted runs wait to start.
pub fn queue_depth(n: usize) {
    gauge!(QUEUE_DEPTH).set(n as f64);
}

/// `delta` more (or, negative, fewer) step attempts are running.
pub fn steps_in_flight(delta: i64) {
    gauge!(STEPS_IN_FLIGHT).increment(delta as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value on the line that starts with `series` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|value| value.parse().unwrap())
    }

    #[test]
    fn recorded_metrics_render_as_prometheus_text() {
        // A recorder of its own: the installed one is process-wide, and other
        // tests may move its unlabelled gauges at any time.
        let recorder = recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            run_accepted("nightly");
            run_accepted("nightly");
            run_finished("nightly", "succeeded");
            step_attempt("resize", "succeeded", Duration::from_micros(300), 1200);
            step_attempt("resize", "failed", Duration::from_secs(2), 800);
            queue_depth(3);
            steps_in_flight(2);
            steps_in_flight(-1);
        });

        let text = handle.render();
        let value = |series: &str| sample(&text, series);
        assert_eq!(
            value(r#"trellis_runs_accepted_total{workflow="nightly"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(r#"trellis_runs_total{workflow="nightly",status="succeeded"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(r#"trellis_step_attempts_total{plugin="resize",status="failed"}"#),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(r#"trellis_fuel_consumed_total{plugin="resize"}"#),
            Some(2000.0),
            "{text}"
        );
        // 300 µs falls in the 0.0005 bucket; 2 s only from 2.5 up.
        let bucket = |le: &str| {
            value(&format!(
                r#"trellis_step_duration_seconds_bucket{{plugin="resize",le="{le}"}}"#
            ))
        };
        assert_eq!(bucket("0.00001"), Some(0.0), "{text}");
        assert_eq!(bucket("0.00025"), Some(0.0), "{text}");
        assert_eq!(bucket("0.0005"), Some(1.0), "{text}");
        assert_eq!(bucket("1"), Some(1.0), "{text}");
        assert_eq!(bucket("2.5"), Some(2.0), "{text}");
        assert_eq!(bucket("60"), Some(2.0), "{text}");
        assert_eq!(bucket("+Inf"), Some(2.0), "{text}");
        assert_eq!(
            value(r#"trellis_step_duration_seconds_count{plugin="resize"}"#),
            Some(2.0),
            "{text}"
        );
        assert_eq!(value("trellis_queue_depth"), Some(3.0), "{text}");
        assert_eq!(value("trellis_steps_in_flight"), Some(1.0), "{text}");
        assert!(
            text.contains("# HELP trellis_runs_total Runs finished, by workflow and final status."),
            "{text}"
        );
        assert!(
            text.contains("# TYPE trellis_step_duration_seconds histogram"),
            "{text}"
        );
    }

    /// A log destination the test can read back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_fields_of_every_enclosing_span() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(LogFormat::Json, EnvFilter::new("info"), move || {
            writer.clone()
        });
        tracing::subscriber::with_default(subscriber, || {
            let run = tracing::info_span!("run", run_id = "r-1", workflow = "nightly");
            let _run = run.enter();
            let step = tracing::info_span!("step", step_id = "resize", plugin = "imagemagick");
            step.in_scope(|| tracing::warn!(attempt = 2, "retrying"));
            tracing::debug!("filtered out");
        });

        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line = &lines[0];
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["fields"]["message"], "retrying");
        assert_eq!(line["fields"]["attempt"], 2);
        assert_eq!(line["span"]["name"], "step");
        assert_eq!(line["span"]["step_id"], "resize");
        assert_eq!(line["span"]["plugin"], "imagemagick");
        assert_eq!(line["spans"][0]["name"], "run");
        assert_eq!(line["spans"][0]["run_id"], "r-1");
        assert_eq!(line["spans"][1]["step_id"], "resize");
    }

    #[test]
    fn install_is_idempotent_and_records_globally() {
        let first = Metrics::install();
        let second = Metrics::install();
        // A label no other test uses.
        run_accepted("telemetry-install-test");
        let series = r#"trellis_runs_accepted_total{workflow="telemetry-install-test"}"#;
        assert_eq!(sample(&first.render(), series), Some(1.0));
        assert_eq!(sample(&second.render(), series), Some(1.0));
        assert!(
            first
                .render()
                .contains("# HELP trellis_runs_accepted_total Runs accepted, by workflow.")
        );
    }
}
