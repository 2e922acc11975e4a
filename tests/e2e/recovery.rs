//! Durability: a server killed with SIGKILL while 200 runs are in flight is
//! restarted on the same data dir; every accepted run reaches a terminal state
//! with the right output, and no step that had finished runs again.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// `first` and `last` count their own executions in durable plugin state
/// (one key per run and step), so a hidden re-execution shows as a count
/// higher than the attempts the record shows.
const DURABLE: &str = r#"
name = "durable"

[[step]]
id = "first"
plugin = "probe"
input = { counter = "{{ run.id }}-first" }

[[step]]
id = "nap"
plugin = "sleep"
needs = ["first"]
input = { ms = "{{ input.ms }}" }

[[step]]
id = "last"
plugin = "probe"
needs = ["nap"]
input = { counter = "{{ run.id }}-last", n = "{{ input.n }}" }

[output]
n = "{{ steps.last.output.input.n }}"
"#;

const RUNS: usize = 200;

#[test]
fn runs_in_flight_survive_sigkill() {
    let server = Serve::new().workflow("durable.toml", DURABLE).start();
    let mut ids = Vec::with_capacity(RUNS);
    for n in 0..RUNS {
        let ms = 150 + (n * 37) % 500;
        let reply = server.post(
            "/v1/workflows/durable/runs",
            &format!(r#"{{"n": {n}, "ms": {ms}}}"#),
        );
        assert_eq!(reply.status, 202, "{}", reply.body);
        ids.push(reply.json()["id"].as_str().unwrap().to_string());
    }
    std::thread::sleep(Duration::from_millis(600));
    let finished = server.get("/v1/runs?status=succeeded&limit=1000").json()["runs"]
        .as_array()
        .unwrap()
        .len();
    let dir = server.crash();
    assert!(
        finished < RUNS,
        "every run had finished before the kill: nothing was in flight"
    );

    let server = Serve::in_dir(dir).start();
    let mut resumed = 0;
    for (n, id) in ids.iter().enumerate() {
        let run = server.wait_for_run(id);
        assert_eq!(run["status"], "succeeded", "run {n}: {run:#}");
        assert_eq!(run["output"]["n"], n, "run {n}: {run:#}");
        for step_id in ["first", "last"] {
            let step = step(&run, step_id);
            let attempts = step["attempts"].as_array().unwrap();
            let (last, earlier) = attempts.split_last().expect("at least one attempt");
            assert_eq!(
                last["status"], "succeeded",
                "run {n} step {step_id}: {step:#}"
            );
            // Only an attempt the crash cut short comes before the one that
            // succeeded: a finished step never ran again.
            for attempt in earlier {
                assert_eq!(
                    attempt["error"]["kind"], "interrupted",
                    "run {n} step {step_id}: {step:#}"
                );
            }
            let numbers: Vec<u64> = attempts
                .iter()
                .map(|a| a["attempt"].as_u64().unwrap())
                .collect();
            assert_eq!(numbers, (1..=attempts.len() as u64).collect::<Vec<_>>());
            // The plugin ran exactly as many times as the record says (the
            // interrupted attempt may or may not have reached the counter).
            let executions = step["output"]["counter"].as_u64().unwrap() as usize;
            assert!(
                executions == attempts.len() || executions + 1 == attempts.len(),
                "run {n} step {step_id}: ran {executions} times, {} attempts: {step:#}",
                attempts.len()
            );
            if attempts.len() > 1 {
                if resumed == 0 && std::env::var_os("TRELLIS_DEBUG_RECOVERY").is_some() {
                    eprintln!("{step_id} {:#}", step["attempts"]);
                }
                resumed += 1;
            }
        }
        let nap = step(&run, "nap");
        assert_eq!(nap["status"], "succeeded");
        let last_nap: &Value = nap["attempts"].as_array().unwrap().last().unwrap();
        assert_eq!(last_nap["status"], "succeeded");
    }
    let all = server.get("/v1/runs?workflow=durable&limit=1000").json();
    assert_eq!(
        all["runs"].as_array().unwrap().len(),
        RUNS,
        "runs were lost or duplicated"
    );
    eprintln!(
        "{finished} runs had finished before the kill; {resumed} probe steps were re-attempted"
    );
}

#[test]
fn an_uploaded_workflow_survives_a_restart() {
    let server = Serve::new().start();
    let reply = server.call(
        "PUT",
        "/v1/workflows/uploaded",
        &[("content-type", "application/toml")],
        Some(b"[[step]]\nid = \"echo\"\nplugin = \"noop\"\ninput = \"{{ input.word }}\"\n"),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let dir = server.crash();
    let server = Serve::in_dir(dir).start();
    let reply = server.post(
        "/v1/workflows/uploaded/runs?wait=30s",
        r#"{"word": "kept"}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["output"],
        serde_json::json!({ "echo": "kept" })
    );
}

/// A step that finished before the kill keeps its one attempt and its output:
/// it is stored when it finishes, not only when the run does.
#[test]
fn a_step_finished_before_a_kill_is_not_run_again() {
    let server = Serve::new().workflow("durable.toml", DURABLE).start();
    let reply = server.post("/v1/workflows/durable/runs", r#"{"n": 7, "ms": 3000}"#);
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["id"].as_str().unwrap().to_string();
    // Wait until `first` has finished and `nap` is sleeping.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let run = server.get(&format!("/v1/runs/{id}")).json();
        if step(&run, "first")["status"] == "succeeded" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`first` never finished: {run:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let dir = server.crash();

    let server = Serve::in_dir(dir).start();
    let run = server.wait_for_run(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let first = step(&run, "first");
    assert_eq!(
        first["attempts"].as_array().unwrap().len(),
        1,
        "`first` ran again after the restart: {first:#}"
    );
    assert_eq!(first["output"]["counter"], 1, "{first:#}");
    // `nap` was cut short: its interrupted attempt, then the one that finished.
    let nap = step(&run, "nap");
    assert_eq!(nap["attempts"].as_array().unwrap().len(), 2, "{nap:#}");
    assert_eq!(
        nap["attempts"][0]["error"]["kind"], "interrupted",
        "{nap:#}"
    );
}
