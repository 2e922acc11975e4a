//! Durability: a server killed with SIGKILL while 200 runs are in flight is
//! restarted on the same data dir; every accepted run reaches a terminal state
//! with the right output, and no step that had finished runs again.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// `first` and `last` count their own executions in durable plugin state
/// (one key per run and step), so a hidden re-execution shows as a count
/// higher than the attempts the record shows. `nap` logs `sleeping N ms`
/// once its attempt is under way (stored as started), then sleeps.
pub(super) const DURABLE: &str = r#"
name = "durable"

[[step]]
id = "first"
plugin = "probe"
input = { counter = "{{ run.id }}-first" }

[[step]]
id = "nap"
plugin = "probe"
needs = ["first"]
input = { sleep_ms = "{{ input.ms }}" }

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
    // Kill as soon as some runs have finished (the first sleep 150 ms, the
    // last submitted up to 650 ms), not after a fixed time: on a loaded
    // machine the submissions alone can outlast a fixed wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let finished = loop {
        let finished = server.get("/v1/runs?status=succeeded&limit=1000").json()["runs"]
            .as_array()
            .unwrap()
            .len();
        if finished >= RUNS / 20 || std::time::Instant::now() > deadline {
            break finished;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
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
    // Once `nap` sleeps, `first` has finished and `nap`'s start is stored.
    server.await_log(&id, "nap", "sleeping", 1);
    let dir = server.crash();

    let server = Serve::in_dir(dir).start();
    // While `nap` sleeps again, the run shows its cut attempt as interrupted.
    let live = server.get(&format!("/v1/runs/{id}")).json();
    assert_eq!(live["status"], "running", "{live:#}");
    let nap = step(&live, "nap");
    assert_eq!(nap["attempts"].as_array().unwrap().len(), 1, "{nap:#}");
    assert_eq!(nap["attempts"][0]["status"], "failed", "{nap:#}");
    assert_eq!(
        nap["attempts"][0]["error"]["kind"], "interrupted",
        "{nap:#}"
    );
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

/// Each item counts its executions in durable state, logs `sleeping 400 ms`
/// and sleeps, and the server runs one attempt at a time, so the kill lands
/// with some items finished, one cut short and the rest not started.
const FAN_OUT: &str = r#"
name = "fan"

[[step]]
id = "each"
plugin = "probe"
for_each = "{{ input.items }}"
input = { counter = "{{ run.id }}-{{ item }}", sleep_ms = 400 }
"#;

/// A `for_each` item that finished before a kill is not run again: its
/// outcome is stored when it finishes, not only when the whole step does.
/// The item cut short goes on from its interrupted attempt.
#[test]
fn a_for_each_item_finished_before_a_kill_is_not_run_again() {
    const ITEMS: usize = 6;
    let server = Serve::new()
        .config("max_concurrent_steps = 1\n")
        .workflow("fan.toml", FAN_OUT)
        .start();
    let items: Vec<usize> = (0..ITEMS).collect();
    let reply = server.post(
        "/v1/workflows/fan/runs",
        &serde_json::json!({ "items": items }).to_string(),
    );
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["id"].as_str().unwrap().to_string();
    // One attempt at a time: once a third item sleeps, two have ended, and
    // the third has stored its start and its counter.
    server.await_log(&id, "each", "sleeping", 3);
    let dir = server.crash();

    let server = Serve::in_dir(dir).start();
    // At once, the resumed step shows the items that had finished and the
    // attempt the kill cut short, none of them still running.
    let live = server.get(&format!("/v1/runs/{id}")).json();
    let shown = step(&live, "each")["attempts"].as_array().unwrap().clone();
    assert!(shown.len() >= 2, "{live:#}");
    for attempt in &shown {
        assert_ne!(attempt["status"], "running", "{live:#}");
        if attempt["status"] == "failed" {
            assert_eq!(attempt["error"]["kind"], "interrupted", "{live:#}");
        }
    }
    let run = server.wait_for_run(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let each = step(&run, "each");
    let attempts = each["attempts"].as_array().unwrap();
    let mut interrupted = 0;
    let mut once = 0;
    for position in 0..ITEMS {
        let mine: Vec<&Value> = attempts.iter().filter(|a| a["item"] == position).collect();
        let output = &each["output"][position];
        // Every execution shows as an attempt: an item run again unseen
        // would count more executions than attempts.
        assert_eq!(
            output["counter"],
            mine.len(),
            "item {position}: {} attempts, counter {}: {each:#}",
            mine.len(),
            output["counter"]
        );
        assert_eq!(output["input"]["counter"], format!("{id}-{position}"));
        let numbers: Vec<u64> = mine
            .iter()
            .map(|a| a["attempt"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (1..=mine.len() as u64).collect();
        assert_eq!(numbers, expected, "item {position}: {each:#}");
        assert_eq!(output["ctx"]["attempt"], mine.len(), "item {position}");
        match mine.as_slice() {
            [only] => {
                assert_eq!(only["status"], "succeeded", "item {position}");
                once += 1;
            }
            [cut, last] => {
                assert_eq!(cut["error"]["kind"], "interrupted", "item {position}");
                assert_eq!(last["status"], "succeeded", "item {position}");
                interrupted += 1;
            }
            other => panic!("item {position}: {} attempts: {each:#}", other.len()),
        }
    }
    // Attempts are grouped by item, in item order.
    let order: Vec<u64> = attempts
        .iter()
        .map(|a| a["item"].as_u64().unwrap())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "{each:#}");
    assert!(
        interrupted <= 1,
        "{interrupted} items cut short, one runs at a time"
    );
    assert_eq!(once + interrupted, ITEMS);
}
