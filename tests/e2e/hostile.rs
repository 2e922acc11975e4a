//! Misbehaving plugins: each is stopped or contained with its own reason, and
//! the host goes on serving: the next step, and the next run in the same
//! process, succeed.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::*;

/// Runs `hostile` with `input` under `limits` as the only step of a workflow.
fn hostile(limits: &str, input: &str) -> Value {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        &format!(
            r#"
[limits]
{limits}

[[step]]
id = "bad"
plugin = "hostile"
input = {input}
"#
        ),
        None,
    );
    assert!(outcome.code == 0 || outcome.code == 1, "{}", outcome.stderr);
    step(&record, "bad").clone()
}

fn kind(step: &Value) -> &str {
    step["error"]["kind"].as_str().unwrap_or("none")
}

fn message(step: &Value) -> &str {
    step["error"]["message"].as_str().unwrap_or("")
}

#[test]
fn an_infinite_loop_is_stopped_by_fuel() {
    let bad = hostile(
        "fuel = 50_000_000\ntimeout = \"30s\"",
        r#"{ mode = "loop" }"#,
    );
    assert_eq!(kind(&bad), "fuel_exhausted", "{bad:#}");
    assert_eq!(bad["attempts"][0]["fuel_consumed"], 50_000_000);
}

#[test]
fn an_infinite_loop_is_stopped_by_the_timeout() {
    let bad = hostile(
        "fuel = 1_000_000_000_000\ntimeout = \"300ms\"",
        r#"{ mode = "loop" }"#,
    );
    assert_eq!(kind(&bad), "timeout", "{bad:#}");
    let took = bad["attempts"][0]["duration_ms"].as_f64().unwrap();
    assert!((300.0..3000.0).contains(&took), "stopped after {took} ms");
}

#[test]
fn a_guest_parked_in_a_host_call_is_stopped_by_the_timeout() {
    let bad = hostile("timeout = \"300ms\"", r#"{ mode = "sleep_forever" }"#);
    assert_eq!(kind(&bad), "timeout", "{bad:#}");
    assert!(bad["attempts"][0]["duration_ms"].as_f64().unwrap() < 3000.0);
}

#[test]
fn unbounded_allocation_hits_the_memory_limit() {
    let bad = hostile("memory = \"32MiB\"", r#"{ mode = "alloc" }"#);
    assert_eq!(kind(&bad), "memory_limit", "{bad:#}");
    assert!(message(&bad).contains("32.0 MiB"), "{bad:#}");
    assert!(bad["attempts"][0]["peak_memory"].as_u64().unwrap() <= 32 * 1024 * 1024);
}

#[test]
fn infinite_recursion_is_stopped() {
    let bad = hostile("", r#"{ mode = "recurse" }"#);
    // Rust's shadow stack in linear memory usually runs out first (an
    // out-of-bounds trap); a native stack overflow is the other outcome.
    assert!(matches!(kind(&bad), "stack_overflow" | "trap"), "{bad:#}");
    assert!(
        message(&bad).contains("stack") || message(&bad).contains("out of bounds"),
        "{bad:#}"
    );
}

#[test]
fn a_panic_reports_the_panic_message() {
    let bad = hostile("", r#"{ mode = "panic" }"#);
    assert_eq!(kind(&bad), "panic", "{bad:#}");
    assert!(
        message(&bad).contains("hostile plugin panicked on purpose"),
        "{bad:#}"
    );
    assert!(message(&bad).contains("panicked at"), "{bad:#}");
}

#[test]
fn oversized_output_is_refused() {
    let bad = hostile(
        "max_output = \"1MiB\"",
        r#"{ mode = "big_output", bytes = 2_097_152 }"#,
    );
    assert_eq!(kind(&bad), "output_too_large", "{bad:#}");
    assert!(message(&bad).contains("1.0 MiB"), "{bad:#}");
}

#[test]
fn output_that_is_not_json_is_refused() {
    let bad = hostile("", r#"{ mode = "bad_json" }"#);
    assert_eq!(kind(&bad), "invalid_output", "{bad:#}");
    assert!(message(&bad).contains("this is not json"), "{bad:#}");
}

#[test]
fn a_stdout_flood_is_cut_at_the_log_limit() {
    let bad = hostile(
        "max_log = \"64KiB\"",
        r#"{ mode = "stdout_flood", bytes = 4_000_000 }"#,
    );
    // Contained: the step finishes, the log keeps 64 KiB and counts the rest.
    assert_eq!(bad["status"], "succeeded", "{bad:#}");
    let attempt = &bad["attempts"][0];
    let kept: usize = attempt["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap().len())
        .sum();
    assert!(kept <= 64 * 1024 + 200, "kept {kept} bytes of log");
    assert!(attempt["log_bytes_dropped"].as_u64().unwrap() > 3_000_000);
    let last = attempt["logs"].as_array().unwrap().last().unwrap();
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("log truncated"),
        "{last:#}"
    );
}

#[test]
fn an_endless_stdout_flood_is_stopped() {
    // Writing costs the guest little fuel but the host real work, so output far
    // past the log limit stops the attempt.
    let bad = hostile("max_log = \"16KiB\"", r#"{ mode = "stdout_flood" }"#);
    assert_eq!(kind(&bad), "log_flood", "{bad:#}");
    assert!(message(&bad).contains("stdout"), "{bad:#}");
    assert!(bad["attempts"][0]["duration_ms"].as_f64().unwrap() < 30_000.0);
}

#[test]
fn reading_a_host_file_is_denied() {
    let bad = hostile("", r#"{ mode = "read_file", path = "/etc/passwd" }"#);
    assert_eq!(kind(&bad), "task_error", "{bad:#}");
    assert!(message(&bad).starts_with("read /etc/passwd:"), "{bad:#}");
    assert!(
        !bad.to_string().contains("root:"),
        "the file leaked: {bad:#}"
    );
}

#[test]
fn the_environment_is_empty() {
    // SAFETY of the assertion: the test process has variables (PATH at least).
    assert!(std::env::var_os("PATH").is_some());
    let bad = hostile("", r#"{ mode = "read_env" }"#);
    assert_eq!(bad["status"], "succeeded", "{bad:#}");
    assert_eq!(bad["output"]["vars"], json!([]));
    assert_eq!(bad["output"]["home"], json!(null));
}

/// In one process: every hostile mode, then a healthy run, on one executor.
#[test]
fn the_next_run_in_the_same_process_succeeds() {
    use trellis::engine::{Engine, Limits};
    use trellis::executor::{Executor, RunOptions};
    use trellis::plugin::{MemoryStateStore, PluginRegistry};
    use trellis::record::RunStatus;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let registry = PluginRegistry::new(Engine::new().unwrap()).unwrap();
        let report = registry.load_dirs(&[FIXTURE_PLUGINS.into()]).await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let registry = Arc::new(registry);
        let executor = Executor::new(
            registry.clone(),
            Limits::default(),
            8,
            Arc::new(MemoryStateStore::default()),
        );
        let plan = |text: &str| {
            Arc::new(
                trellis::workflow::parse_str(text, "inline.toml", "inline", registry.as_ref())
                    .unwrap(),
            )
        };

        let hostile = plan(
            r#"
[limits]
fuel = 100_000_000
memory = "16MiB"
timeout = "500ms"
max_output = "64KiB"

[[step]]
id = "bad"
plugin = "hostile"
input = { mode = "{{ input.mode }}", bytes = 1_000_000 }
"#,
        );
        let healthy = plan(
            r#"
[[step]]
id = "ok"
plugin = "noop"
input = { fine = true }
"#,
        );
        for mode in [
            "loop",
            "alloc",
            "recurse",
            "panic",
            "big_output",
            "bad_json",
            "sleep_forever",
        ] {
            let record = executor
                .run(
                    hostile.clone(),
                    json!({ "mode": mode }),
                    RunOptions::default(),
                )
                .await;
            assert_eq!(record.status, RunStatus::Failed, "mode {mode}: {record:#?}");
            let record = executor
                .run(healthy.clone(), json!({}), RunOptions::default())
                .await;
            assert_eq!(
                record.status,
                RunStatus::Succeeded,
                "after {mode}: {record:#?}"
            );
            assert_eq!(record.output, json!({ "ok": { "fine": true } }));
        }
    });
}
