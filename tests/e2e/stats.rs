//! `GET /v1/workflows/{name}/stats`: the four process metrics, computed by
//! the store, match the figures computed here from `GET /v1/runs` and each
//! run's record.

use serde_json::Value;

use crate::support::*;

const MIXED: &str = r#"
[[step]]
id = "first"
plugin = "noop"
input = "{{ input }}"

[[step]]
id = "gate"
plugin = "fail"
needs = ["first"]
input = { succeed_on_attempt = "{{ input.pass }}" }
"#;

/// Nearest rank: the value at rank ceil(p/100 * n) of the sorted values.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100);
    sorted[rank.max(1) - 1]
}

fn millis(rfc3339: &Value) -> f64 {
    let at = humantime::parse_rfc3339(rfc3339.as_str().unwrap()).unwrap();
    at.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

fn assert_spread(got: &Value, values: &mut [f64], tolerance: f64, what: &str) {
    values.sort_by(f64::total_cmp);
    for (key, want) in [
        ("p50", percentile(values, 50)),
        ("p95", percentile(values, 95)),
        ("max", *values.last().unwrap()),
    ] {
        let value = got[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}.{key}: {got}"));
        assert!(
            (value - want).abs() <= tolerance,
            "{what}.{key}: {value}, computed {want} from {values:?}"
        );
    }
}

#[test]
fn the_metrics_match_the_runs() {
    let server = Serve::new().workflow("mixed.toml", MIXED).start();
    for pass in [1, 99, 1, 1, 99, 1, 99] {
        let reply = server.post(
            "/v1/workflows/mixed/runs?wait=30s",
            &format!(r#"{{"pass": {pass}}}"#),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let stats = server.get("/v1/workflows/mixed/stats?window=1h");
    assert_eq!(stats.status, 200, "{}", stats.body);
    let stats = stats.json();

    // The same figures, from the runs.
    let list = server.get("/v1/runs?workflow=mixed&limit=1000").json();
    let runs: Vec<Value> = list["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| {
            server
                .get(&format!("/v1/runs/{}", run["id"].as_str().unwrap()))
                .json()
        })
        .collect();
    let count = |status: &str| runs.iter().filter(|run| run["status"] == status).count();
    assert_eq!(stats["window"], "1h");
    assert_eq!(stats["runs"], runs.len());
    assert_eq!(stats["succeeded"], count("succeeded"));
    assert_eq!(stats["failed"], count("failed"));
    assert_eq!(stats["cancelled"], 0);
    assert_eq!((count("succeeded"), count("failed")), (4, 3));
    let rate = |key: &str, n: usize| {
        let got = stats[key].as_f64().unwrap();
        assert!(
            (got - n as f64 / runs.len() as f64).abs() < 1e-9,
            "{key}: {got}"
        );
    };
    rate("completion_rate", 4);
    rate("error_rate", 3);
    let mut cycles: Vec<f64> = runs
        .iter()
        .map(|run| millis(&run["finished_at"]) - millis(&run["created_at"]))
        .collect();
    assert_spread(&stats["cycle_time_ms"], &mut cycles, 0.5, "cycle_time_ms");

    for step_id in ["first", "gate"] {
        let ran: Vec<&Value> = runs
            .iter()
            .map(|run| step(run, step_id))
            .filter(|step| step["status"] == "succeeded" || step["status"] == "failed")
            .collect();
        let got = &stats["steps"][step_id];
        assert_eq!(got["runs"], ran.len(), "{step_id}: {got}");
        let failed = ran.iter().filter(|step| step["status"] == "failed").count();
        assert_eq!(got["failed"], failed, "{step_id}: {got}");
        let mut durations: Vec<f64> = ran
            .iter()
            .map(|step| step["duration_ms"].as_f64().unwrap())
            .collect();
        assert_spread(&got["duration_ms"], &mut durations, 1e-9, step_id);
        let attempts = |step: &&Value| step["attempts"].as_array().unwrap().clone();
        let mut fuel: Vec<f64> = ran
            .iter()
            .map(|step| {
                attempts(step)
                    .iter()
                    .map(|a| a["fuel_consumed"].as_f64().unwrap())
                    .sum()
            })
            .collect();
        assert_spread(&got["fuel"], &mut fuel, 1e-9, step_id);
        let mut memory: Vec<f64> = ran
            .iter()
            .map(|step| {
                attempts(step)
                    .iter()
                    .map(|a| a["peak_memory"].as_f64().unwrap())
                    .fold(0.0, f64::max)
            })
            .collect();
        assert_spread(&got["memory_peak"], &mut memory, 1e-9, step_id);
    }
    assert_eq!(stats["steps"]["gate"]["failed"], 3);

    // Bad input says what and where; an unknown workflow is 404.
    let bad = server.get("/v1/workflows/mixed/stats?window=soon");
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.body.contains("`window` is \\\"soon\\\""),
        "{}",
        bad.body
    );
    assert_eq!(
        server.get("/v1/workflows/mixed/stats?window=0s").status,
        400
    );
    assert_eq!(
        server.get("/v1/workflows/mixed/stats?window=1.5h").status,
        400
    );
    // A window longer than the store's history counts every run.
    let all = server
        .get("/v1/workflows/mixed/stats?window=999999d")
        .json();
    assert_eq!(all["runs"], runs.len());
    assert_eq!(server.get("/v1/workflows/nope/stats").status, 404);
    // The default window is a day.
    let day = server.get("/v1/workflows/mixed/stats").json();
    assert_eq!(day["window"], "24h");
    assert_eq!(day["runs"], runs.len());
}
