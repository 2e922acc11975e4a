//! Retry and rerun of finished runs (`POST /v1/runs/{id}/retry`, `/rerun`):
//! what is reused, what runs again, and lineage. Plugin executions are
//! counted in plugin state by the `probe` and `fail` fixtures.

use serde_json::{Value, json};

use crate::support::{Serve, Server, step};

/// Five steps in a chain; `d` fails the first time it runs (counted in
/// state), so the first run fails at `d` and a retry succeeds.
const CHAIN: &str = r#"
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
input = { counter = "c" }

[[step]]
id = "d"
plugin = "fail"
needs = ["c"]
input = { counter = "d", fail_first = 1 }

[[step]]
id = "e"
plugin = "probe"
needs = ["d"]
input = { counter = "e" }
"#;

/// Twenty items; items 3, 7 and 11 fail the first time they run.
const FAN_OUT: &str = r#"
[[step]]
id = "each"
plugin = "fail"
for_each = "{{ range(20) | list }}"
input = { counter = "item-{{ item }}", fail_first = "{{ 1 if item in [3, 7, 11] else 0 }}" }
"#;

/// a -> (b, c) -> d; every step counts its executions.
const DIAMOND: &str = r#"
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
needs = ["a"]
input = { counter = "c" }

[[step]]
id = "d"
plugin = "probe"
needs = ["b", "c"]
input = { counter = "d" }
"#;

fn run(server: &Server, workflow: &str, input: &str) -> Value {
    let reply = server.post(&format!("/v1/workflows/{workflow}/runs?wait=60s"), input);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// `POST /v1/runs/{id}/{how}?wait=60s` with `body`: the new run, finished.
fn again(server: &Server, id: &str, how: &str, body: &str) -> Value {
    let reply = server.post(&format!("/v1/runs/{id}/{how}?wait=60s"), body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn id(run: &Value) -> &str {
    run["id"].as_str().unwrap()
}

/// How many times the step's plugin had run when this run ran it: the
/// counter in its output (the `probe`'s `counter`, the `fail`'s `counter`).
fn count(run: &Value, step_id: &str) -> i64 {
    step(run, step_id)["output"]["counter"].as_i64().unwrap()
}

fn attempts(run: &Value, step_id: &str) -> usize {
    step(run, step_id)["attempts"].as_array().unwrap().len()
}

#[test]
fn a_retry_runs_only_the_failed_step_and_what_follows_it() {
    let server = Serve::new().workflow("chain.toml", CHAIN).start();
    let first = run(&server, "chain", "{}");
    assert_eq!(first["status"], "failed", "{first}");
    assert_eq!(first["error"]["step"], "d");
    assert_eq!(step(&first, "e")["status"], "cancelled");

    let retry = again(&server, id(&first), "retry", "");
    assert_eq!(retry["status"], "succeeded", "{retry}");
    assert_eq!(retry["retry_of"], first["id"]);
    assert_eq!(retry["input"], first["input"]);
    for reused in ["a", "b", "c"] {
        let record = step(&retry, reused);
        assert_eq!(record["status"], "succeeded");
        assert_eq!(record["reused_from"], first["id"]);
        assert_eq!(record["attempts"], json!([]));
        assert_eq!(record["output"], step(&first, reused)["output"]);
        assert_eq!(
            record["plugin_digest"],
            step(&first, reused)["plugin_digest"]
        );
    }
    // `d` ran a second time in all (its first attempt of this run), `e` once.
    assert_eq!(count(&retry, "d"), 2);
    assert_eq!(step(&retry, "d")["attempts"][0]["attempt"], 1);
    assert_eq!(count(&retry, "e"), 1);
    assert!(step(&retry, "d").get("reused_from").is_none());

    // The original lists its retry; a rerun runs every step again and shows
    // that a, b and c had run once before it (the retry did not call them).
    let original = server.get(&format!("/v1/runs/{}", id(&first))).json();
    assert_eq!(original["retries"], json!([retry["id"]]));
    let rerun = again(&server, id(&first), "rerun", "");
    assert_eq!(rerun["rerun_of"], first["id"]);
    assert_eq!(rerun["status"], "succeeded", "{rerun}");
    for (step_id, runs_before) in [("a", 1), ("b", 1), ("c", 1), ("d", 2), ("e", 1)] {
        assert_eq!(count(&rerun, step_id), runs_before + 1, "{step_id}");
        assert_eq!(attempts(&rerun, step_id), 1);
    }
    let listed = server.get("/v1/runs?workflow=chain").json();
    let lineage: Vec<(Value, Value)> = listed["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| (run["retry_of"].clone(), run["rerun_of"].clone()))
        .collect();
    assert_eq!(
        lineage,
        [
            (Value::Null, first["id"].clone()),
            (first["id"].clone(), Value::Null),
            (Value::Null, Value::Null),
        ]
    );
}

#[test]
fn a_retried_fan_out_runs_only_its_failed_items() {
    let server = Serve::new().workflow("fan.toml", FAN_OUT).start();
    let first = run(&server, "fan", "{}");
    assert_eq!(first["status"], "failed", "{first}");
    let failed_step = step(&first, "each");
    let outputs = failed_step["output"].as_array().unwrap();
    assert_eq!(
        outputs.len(),
        20,
        "a failed fan-out keeps its items' outputs"
    );
    for (position, output) in outputs.iter().enumerate() {
        if [3, 7, 11].contains(&position) {
            assert_eq!(*output, Value::Null);
        } else {
            assert_eq!(output["counter"], 1, "{position}");
        }
    }

    let retry = again(&server, id(&first), "retry", "{}");
    assert_eq!(retry["status"], "succeeded", "{retry}");
    let each = step(&retry, "each");
    let ran: Vec<(u64, u64)> = each["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["item"].as_u64().unwrap(), a["attempt"].as_u64().unwrap()))
        .collect();
    assert_eq!(ran, [(3, 1), (7, 1), (11, 1)]);
    let counters: Vec<i64> = each["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|output| output["counter"].as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = (0..20)
        .map(|item| if [3, 7, 11].contains(&item) { 2 } else { 1 })
        .collect();
    assert_eq!(counters, expected);

    // Each item had run exactly as often as the counters say.
    let rerun = again(&server, id(&retry), "rerun", "");
    let counters: Vec<i64> = step(&rerun, "each")["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|output| output["counter"].as_i64().unwrap())
        .collect();
    assert_eq!(counters, expected.iter().map(|n| n + 1).collect::<Vec<_>>());
}

#[test]
fn a_retry_from_a_step_runs_it_and_what_is_downstream_in_full() {
    let server = Serve::new().workflow("diamond.toml", DIAMOND).start();
    let first = run(&server, "diamond", "{}");
    assert_eq!(first["status"], "succeeded", "{first}");
    let retry = again(&server, id(&first), "retry", r#"{ "from": "b" }"#);
    assert_eq!(retry["status"], "succeeded", "{retry}");
    for reused in ["a", "c"] {
        assert_eq!(step(&retry, reused)["reused_from"], first["id"]);
        assert_eq!(attempts(&retry, reused), 0);
    }
    for ran in ["b", "d"] {
        assert!(step(&retry, ran).get("reused_from").is_none());
        assert_eq!(count(&retry, ran), 2, "{ran}");
    }
    // Without `from` (no body, `{}` or `null`), a run that succeeded is
    // reused whole.
    for body in ["", "{}", "null"] {
        let whole = again(&server, id(&first), "retry", body);
        for reused in ["a", "b", "c", "d"] {
            assert_eq!(step(&whole, reused)["reused_from"], first["id"], "{body}");
        }
        assert_eq!(whole["output"], first["output"]);
    }
    let rerun = again(&server, id(&first), "rerun", "null");
    assert_eq!(rerun["input"], first["input"]);
}

#[test]
fn retry_and_rerun_refuse_what_they_cannot_do() {
    let server = Serve::new()
        .workflow("diamond.toml", DIAMOND)
        .workflow(
            "typed.toml",
            "[input]\nschema = { type = \"object\", required = [\"n\"] }\n[[step]]\nid = \"s\"\nplugin = \"sleep\"\ninput = { ms = \"{{ input.n }}\" }\n",
        )
        .start();
    let first = run(&server, "diamond", "{}");
    let reply = server.post(
        &format!("/v1/runs/{}/retry", id(&first)),
        r#"{ "from": "z" }"#,
    );
    let error = reply.assert_error(422, "unknown_step");
    assert_eq!(
        error["error"]["details"]["steps"],
        json!(["a", "b", "c", "d"])
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no step `z`; its steps are: a, b, c, d"),
        "{error}"
    );
    let reply = server.post(
        &format!("/v1/runs/{}/retry", id(&first)),
        r#"{ "frm": "b" }"#,
    );
    reply.assert_error(400, "invalid_json");
    let missing = "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b";
    server
        .post(&format!("/v1/runs/{missing}/retry"), "")
        .assert_error(404, "not_found");
    server
        .post(&format!("/v1/runs/{missing}/rerun"), "")
        .assert_error(404, "not_found");

    // A run still going: 409 until it finishes.
    let going = server.post("/v1/workflows/typed/runs", r#"{ "n": 60000 }"#);
    assert_eq!(going.status, 202, "{}", going.body);
    let going = going.json();
    let error = server
        .post(&format!("/v1/runs/{}/retry", id(&going)), "")
        .assert_error(409, "run_not_finished");
    assert!(matches!(
        error["error"]["details"]["status"].as_str(),
        Some("queued" | "running")
    ));
    server
        .post(&format!("/v1/runs/{}/rerun", id(&going)), "")
        .assert_error(409, "run_not_finished");
    let cancelled = server.post(&format!("/v1/runs/{}/cancel", id(&going)), "");
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);

    // A rerun's new input is checked against the schema.
    let error = server
        .post(
            &format!("/v1/runs/{}/rerun", id(&going)),
            r#"{ "input": { "m": 1 } }"#,
        )
        .assert_error(422, "invalid_input");
    assert!(
        error["error"]["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("n"),
        "{error}"
    );
    let rerun = again(&server, id(&going), "rerun", r#"{ "input": { "n": 1 } }"#);
    assert_eq!(rerun["status"], "succeeded", "{rerun}");
    assert_eq!(rerun["input"], json!({ "n": 1 }));
    assert_eq!(rerun["rerun_of"], going["id"]);
}

/// One step of plugin `versioned` (1.0.0 or 2.0.0, from the swap fixtures).
const VERSIONED: &str = "[[step]]\nid = \"v\"\nplugin = \"versioned\"\ninput = \"{{ input }}\"\n";

fn swap(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("TRELLIS_SWAP_PLUGIN_DIR")).join(format!("{name}.wasm"))
}

/// A retry keeps the original's plugin build after a newer one was
/// uploaded; once that build is gone from the server it is refused with its
/// digest, and `upgrade` runs on the build loaded now.
#[test]
fn a_retry_keeps_the_original_build_until_told_to_upgrade() {
    let server = Serve::new()
        .own_plugin_dir(&[&swap("versioned-v1")])
        .workflow("versioned.toml", VERSIONED)
        .start();
    let first = run(&server, "versioned", "7");
    assert_eq!(step(&first, "v")["output"]["version"], "1.0.0", "{first}");
    let digest = step(&first, "v")["plugin_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let v2 = std::fs::read(swap("versioned-v2")).unwrap();
    let reply = server.call("PUT", "/v1/plugins/versioned", &[], Some(&v2));
    assert!(reply.status == 200 || reply.status == 201, "{}", reply.body);
    let reply = server.call("DELETE", "/v1/plugins/versioned?version=1.0.0", &[], None);
    assert_eq!(reply.status, 200, "{}", reply.body);

    let retry = again(&server, id(&first), "retry", r#"{ "from": "v" }"#);
    assert_eq!(step(&retry, "v")["output"]["version"], "1.0.0", "{retry}");
    assert_eq!(step(&retry, "v")["plugin_digest"], digest.as_str());

    // Restarted without the kept copy of 1.0.0: that build is gone.
    let dir = server.crash();
    let blob = dir
        .path()
        .join("data/plugins")
        .join(format!("{}.wasm", digest.strip_prefix("sha256:").unwrap()));
    std::fs::remove_file(&blob).unwrap();
    let server = Serve::in_dir(dir).start();
    let reply = server.post(
        &format!("/v1/runs/{}/retry", id(&first)),
        r#"{ "from": "v" }"#,
    );
    let error = reply.assert_error(409, "build_gone");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(digest.strip_prefix("sha256:").unwrap()),
        "{message}"
    );
    assert!(message.contains("\"upgrade\": true"), "{message}");
    let upgraded = again(
        &server,
        id(&first),
        "retry",
        r#"{ "from": "v", "upgrade": true }"#,
    );
    assert_eq!(
        step(&upgraded, "v")["output"]["version"],
        "2.0.0",
        "{upgraded}"
    );
    assert_eq!(upgraded["retry_of"], first["id"]);
}
