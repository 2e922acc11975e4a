//! Limits: defaults, workflow-wide and per-step overrides.

use crate::support::*;

#[test]
fn per_step_limits_override_the_workflow_limits() {
    let sandbox = Sandbox::new();
    // The same work passes with the step's larger fuel and fails with the
    // workflow's small one.
    let (outcome, record) = sandbox.run_json(
        r#"
[limits]
fuel = 2_000_000

[[step]]
id = "small"
plugin = "spin"
on_failure = "continue"
input = { iterations = 1_000_000 }

[[step]]
id = "large"
plugin = "spin"
limits = { fuel = 500_000_000 }
input = { iterations = 1_000_000 }
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let small = step(&record, "small");
    assert_eq!(small["status"], "failed");
    assert_eq!(small["error"]["kind"], "fuel_exhausted");
    assert!(
        small["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2000000"),
        "{small:#}"
    );
    let large = step(&record, "large");
    assert_eq!(large["status"], "succeeded");
    assert_eq!(large["output"]["iterations"], 1_000_000);
    let fuel = large["attempts"][0]["fuel_consumed"].as_u64().unwrap();
    assert!(
        fuel > 2_000_000 && fuel <= 500_000_000,
        "fuel consumed {fuel}"
    );
}

#[test]
fn per_step_memory_and_timeout_overrides() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[limits]
timeout = "30s"
memory = "256MiB"

[[step]]
id = "tight_memory"
plugin = "hostile"
on_failure = "continue"
limits = { memory = "8MiB" }
input = { mode = "alloc" }

[[step]]
id = "short_timeout"
plugin = "sleep"
on_failure = "continue"
limits = { timeout = "200ms" }
input = { ms = 5000 }

[[step]]
id = "default_ok"
plugin = "sleep"
input = { ms = 10 }
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let memory = step(&record, "tight_memory");
    assert_eq!(memory["error"]["kind"], "memory_limit");
    assert!(
        memory["error"]["message"]
            .as_str()
            .unwrap()
            .contains("8.0 MiB"),
        "{memory:#}"
    );
    assert!(memory["attempts"][0]["peak_memory"].as_u64().unwrap() <= 8 * 1024 * 1024);
    let timeout = step(&record, "short_timeout");
    assert_eq!(timeout["error"]["kind"], "timeout");
    assert!(timeout["attempts"][0]["duration_ms"].as_f64().unwrap() < 2000.0);
    assert_eq!(step(&record, "default_ok")["status"], "succeeded");
}

/// Three steps each add a state key; the server keeps at most two per
/// workflow, so the third fails and says which limit. Another workflow has
/// its own quota, and an update of a key it holds needs no room.
#[test]
fn plugin_state_stops_at_the_workflow_quota() {
    let server = Serve::new()
        .config("state_max_keys = 2\n")
        .workflow(
            "keys.toml",
            r#"
[[step]]
id = "a"
plugin = "probe"
input = { counter = "a" }

[[step]]
id = "b"
plugin = "probe"
needs = ["a"]
input = { counter = "b" }

[[step]]
id = "c"
plugin = "probe"
needs = ["b"]
input = { counter = "{{ input.third }}" }
"#,
        )
        .workflow(
            "other.toml",
            r#"
[[step]]
id = "a"
plugin = "probe"
input = { counter = "a" }
"#,
        )
        .start();
    let run = |workflow: &str, body: &str| {
        let reply = server.post(&format!("/v1/workflows/{workflow}/runs"), body);
        assert_eq!(reply.status, 202, "{}", reply.body);
        server.wait_for_run(reply.json()["id"].as_str().unwrap())
    };

    let full = run("keys", r#"{"third": "c"}"#);
    assert_eq!(full["status"], "failed", "{full:#}");
    assert_eq!(step(&full, "b")["output"]["counter"], 1);
    let error = &step(&full, "c")["error"];
    assert_eq!(error["kind"], "trap", "{error:#}");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains(
            "the state of workflow `keys` holds 2 keys, the most it may (state_max_keys)"
        ),
        "{message}"
    );

    // An existing key: no room needed. Another workflow: its own quota.
    let again = run("keys", r#"{"third": "a"}"#);
    assert_eq!(again["status"], "succeeded", "{again:#}");
    assert_eq!(step(&again, "c")["output"]["counter"], 3);
    let other = run("other", "{}");
    assert_eq!(other["status"], "succeeded", "{other:#}");
    assert_eq!(step(&other, "a")["output"]["counter"], 1);
}
