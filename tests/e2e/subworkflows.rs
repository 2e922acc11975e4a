//! Sub-workflows: a step that names a `workflow` starts child runs, real
//! runs of their own (stored, listed, cancellable), and ends with them.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{Serve, Server, step};

/// Two steps: waits `input.ms`, then counts its executions under
/// `child-<input.n>` and echoes its input.
const CHILD: &str = r#"
[input]
schema = { type = "object", required = ["n"], properties = { n = { type = "integer" } } }

[[step]]
id = "nap"
plugin = "sleep"
input = { ms = "{{ input.ms | default(0) }}" }

[[step]]
id = "count"
plugin = "probe"
needs = ["nap"]
input = { counter = "child-{{ input.n }}", n = "{{ input.n }}" }

[output]
n = "{{ input.n }}"
runs = "{{ steps.count.output.counter }}"
"#;

/// One child run per item of `input.items`.
const PARENT: &str = r#"
[[step]]
id = "fan"
workflow = "child"
for_each = "{{ input.items }}"
input = { n = "{{ item }}", ms = "{{ input.ms | default(0) }}" }

[[step]]
id = "after"
plugin = "probe"
needs = ["fan"]
input = { got = "{{ steps.fan.output }}" }
"#;

fn run(server: &Server, workflow: &str, input: &str) -> Value {
    let reply = server.post(&format!("/v1/workflows/{workflow}/runs?wait=60s"), input);
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn children(server: &Server, parent: &str) -> Vec<Value> {
    let page = server
        .get(&format!("/v1/runs?parent={parent}&limit=1000"))
        .json();
    let mut runs = page["runs"].as_array().unwrap().clone();
    runs.reverse();
    runs
}

#[test]
fn a_fan_out_of_child_runs_gives_their_outputs_in_order() {
    let server = Serve::new()
        .workflow("child.toml", CHILD)
        .workflow("parent.toml", PARENT)
        .start();
    let parent = run(&server, "parent", r#"{ "items": [5, 6, 7] }"#);
    assert_eq!(parent["status"], "succeeded", "{parent}");
    let fan = step(&parent, "fan");
    assert_eq!(fan["workflow"], "child");
    assert!(fan.get("plugin").is_none(), "{fan}");
    assert_eq!(
        fan["output"],
        json!([{ "n": 5, "runs": 1 }, { "n": 6, "runs": 1 }, { "n": 7, "runs": 1 }])
    );
    assert_eq!(
        step(&parent, "after")["output"]["input"]["got"],
        fan["output"]
    );

    let listed = children(&server, parent["id"].as_str().unwrap());
    assert_eq!(listed.len(), 3);
    let attempts = fan["attempts"].as_array().unwrap();
    for (item, child) in listed.iter().enumerate() {
        let by_item = attempts
            .iter()
            .find(|a| a["item"] == item)
            .unwrap_or_else(|| panic!("no attempt of item {item}: {fan}"));
        let mut ids: Vec<&Value> = listed.iter().map(|c| &c["id"]).collect();
        ids.sort_by_key(|id| id.as_str().unwrap().to_owned());
        assert!(ids.contains(&&by_item["child_run"]), "{by_item}");
        let record = server
            .get(&format!(
                "/v1/runs/{}",
                by_item["child_run"].as_str().unwrap()
            ))
            .json();
        assert_eq!(record["workflow"], "child");
        assert_eq!(record["status"], "succeeded");
        assert_eq!(
            record["parent"],
            json!({ "run": parent["id"], "step": "fan", "item": item })
        );
        assert_eq!(record["input"], json!({ "n": 5 + item, "ms": 0 }));
        assert_eq!(child["parent"]["run"], parent["id"]);
    }
}

#[test]
fn bad_sub_workflow_references_are_refused_where_they_are_written() {
    let server = Serve::new().workflow("child.toml", CHILD).start();
    let unknown = "[[step]]\nid = \"s\"\nworkflow = \"nope\"\n";
    let reply = server.call(
        "PUT",
        "/v1/workflows/caller",
        &[("content-type", "application/toml")],
        Some(unknown.as_bytes()),
    );
    let error = reply.assert_error(422, "invalid_workflow");
    let first = &error["error"]["details"][0];
    assert_eq!(
        (first["line"].as_u64(), first["column"].as_u64()),
        (Some(3), Some(12)),
        "{error}"
    );
    assert_eq!(
        first["message"],
        "step `s` calls workflow `nope`, but no workflow of that name is loaded"
    );

    // a calls b; b calling a back is a cycle, and so is a step calling its own workflow.
    let a = "[[step]]\nid = \"to_b\"\nworkflow = \"b\"\n";
    let b = "[[step]]\nid = \"x\"\nplugin = \"noop\"\n";
    for (name, text) in [("b", b), ("a", a)] {
        let reply = server.call(
            "PUT",
            &format!("/v1/workflows/{name}"),
            &[],
            Some(text.as_bytes()),
        );
        assert_eq!(reply.status / 100, 2, "{}", reply.body);
    }
    let b_calls_a = "[[step]]\nid = \"to_a\"\nworkflow = \"a\"\n";
    let reply = server.call("PUT", "/v1/workflows/b", &[], Some(b_calls_a.as_bytes()));
    let error = reply.assert_error(422, "invalid_workflow");
    assert_eq!(
        error["error"]["details"][0]["message"],
        "step `to_a` calls workflow `a`, and `a` calls `b`: workflows may not call each other in a cycle"
    );
    let itself = "[[step]]\nid = \"again\"\nworkflow = \"c\"\n";
    let reply = server.call("PUT", "/v1/workflows/c", &[], Some(itself.as_bytes()));
    let error = reply.assert_error(422, "invalid_workflow");
    assert!(
        error["error"]["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("calls workflow `c`, this workflow itself"),
        "{error}"
    );
    let both =
        "[[step]]\nid = \"s\"\nplugin = \"noop\"\nworkflow = \"child\"\nconfig = { a = \"1\" }\n";
    let reply = server.call("PUT", "/v1/workflows/both", &[], Some(both.as_bytes()));
    let error = reply.assert_error(422, "invalid_workflow");
    let messages: Vec<&str> = error["error"]["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["message"].as_str().unwrap())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("has both `plugin` and `workflow`")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("`config` is for plugin steps")),
        "{messages:?}"
    );
}

#[test]
fn a_child_input_that_fails_its_schema_fails_the_step_without_retries() {
    let server = Serve::new()
        .workflow("child.toml", CHILD)
        .workflow(
            "wrong.toml",
            "[retry]\nmax_attempts = 3\ninitial = \"1ms\"\n[[step]]\nid = \"call\"\nworkflow = \"child\"\ninput = { n = \"three\" }\n",
        )
        .start();
    let parent = run(&server, "wrong", "{}");
    assert_eq!(parent["status"], "failed", "{parent}");
    let call = step(&parent, "call");
    assert_eq!(call["error"]["kind"], "invalid_input", "{call}");
    assert!(
        call["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workflow `child`"),
        "{call}"
    );
    assert_eq!(call["attempts"].as_array().unwrap().len(), 1);
    assert!(children(&server, parent["id"].as_str().unwrap()).is_empty());
}

#[test]
fn cancelling_a_parent_cancels_its_children() {
    let server = Serve::new()
        .workflow("child.toml", CHILD)
        .workflow("parent.toml", PARENT)
        .start();
    let accepted = server.post(
        "/v1/workflows/parent/runs",
        r#"{ "items": [1, 2], "ms": 60000 }"#,
    );
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let id = accepted.json()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while children(&server, &id).len() < 2 {
        assert!(Instant::now() < deadline, "the children did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cancelled = server.post(&format!("/v1/runs/{id}/cancel"), "");
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.json()["status"], "cancelled");
    for child in children(&server, &id) {
        let child = server.wait_for_run(child["id"].as_str().unwrap());
        assert_eq!(child["status"], "cancelled", "{child}");
    }
}

#[test]
fn a_retried_parent_reuses_the_children_that_succeeded() {
    let flaky = r#"
[[step]]
id = "maybe"
plugin = "fail"
input = { counter = "flaky-{{ input.n }}", fail_first = "{{ 1 if input.n == 1 else 0 }}" }
"#;
    let parent = r#"
[[step]]
id = "fan"
workflow = "flaky"
for_each = "{{ [0, 1, 2] }}"
input = { n = "{{ item }}" }
"#;
    let server = Serve::new()
        .workflow("flaky.toml", flaky)
        .workflow("parent.toml", parent)
        .start();
    let first = run(&server, "parent", "{}");
    assert_eq!(first["status"], "failed", "{first}");
    assert_eq!(children(&server, first["id"].as_str().unwrap()).len(), 3);
    let retry = server.post(
        &format!("/v1/runs/{}/retry?wait=60s", first["id"].as_str().unwrap()),
        "",
    );
    assert_eq!(retry.status, 200, "{}", retry.body);
    let retry = retry.json();
    assert_eq!(retry["status"], "succeeded", "{retry}");
    let again = children(&server, retry["id"].as_str().unwrap());
    assert_eq!(again.len(), 1, "only item 1 ran again: {again:?}");
    assert_eq!(again[0]["parent"]["item"], 1);
    let counters: Vec<i64> = step(&retry, "fan")["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|output| output["maybe"]["counter"].as_i64().unwrap())
        .collect();
    assert_eq!(counters, [1, 2, 1]);
}

#[test]
fn a_parent_and_its_children_survive_a_crash() {
    let server = Serve::new()
        .workflow("child.toml", CHILD)
        .workflow("parent.toml", PARENT)
        .start();
    let items: Vec<u64> = (0..10).collect();
    // Child n sleeps 150 ms * n: they end one after another.
    let input = json!({ "items": items, "ms": 0 }).to_string();
    let staggered = PARENT.replace(
        "ms = \"{{ input.ms | default(0) }}\"",
        "ms = \"{{ item * 150 }}\"",
    );
    std::fs::write(server.workflow_dir().join("parent.toml"), staggered).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .get("/v1/workflows/parent")
        .body
        .contains("item * 150")
    {
        assert!(
            Instant::now() < deadline,
            "the new parent.toml was not loaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let accepted = server.post("/v1/workflows/parent/runs", &input);
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let id = accepted.json()["id"].as_str().unwrap().to_owned();
    // Killed once some children finished and others still run.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done = server
            .get(&format!("/v1/runs?parent={id}&status=succeeded"))
            .json()["runs"]
            .as_array()
            .unwrap()
            .len();
        if done >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no child finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    let dir = server.crash();
    let server = Serve::in_dir(dir).start();
    let parent = server.wait_for_run(&id);
    assert_eq!(parent["status"], "succeeded", "{parent}");
    let outputs = step(&parent, "fan")["output"].as_array().unwrap().clone();
    let ns: Vec<i64> = outputs.iter().map(|o| o["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, (0..10).collect::<Vec<_>>());

    let listed = children(&server, &id);
    assert_eq!(listed.len(), 10, "one child per item: {listed:?}");
    for child in listed {
        let child = server.wait_for_run(child["id"].as_str().unwrap());
        assert_eq!(child["status"], "succeeded", "{child}");
        // The counting step ran once per attempt it recorded: once, or again
        // after the crash cut an attempt short.
        let count = step(&child, "count");
        assert_eq!(
            count["output"]["counter"].as_u64().unwrap() as usize,
            count["attempts"].as_array().unwrap().len(),
            "{child}"
        );
    }
}

#[test]
fn nesting_deeper_than_sixteen_fails_the_step_that_would_go_deeper() {
    let server = Serve::new().start();
    // level-17 is a plain step; level-n calls level-(n+1).
    let leaf = "[[step]]\nid = \"leaf\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n";
    let reply = server.call("PUT", "/v1/workflows/level-17", &[], Some(leaf.as_bytes()));
    assert_eq!(reply.status / 100, 2, "{}", reply.body);
    for level in (0..17).rev() {
        let text = format!(
            "[[step]]\nid = \"down\"\nworkflow = \"level-{}\"\ninput = \"{{{{ input }}}}\"\n",
            level + 1
        );
        let reply = server.call(
            "PUT",
            &format!("/v1/workflows/level-{level}"),
            &[],
            Some(text.as_bytes()),
        );
        assert_eq!(reply.status / 100, 2, "{}", reply.body);
    }
    let top = run(&server, "level-0", "[1]");
    assert_eq!(top["status"], "failed", "{top}");
    // Walk down the children to the run 16 levels below the top.
    let mut run_id = top["id"].as_str().unwrap().to_owned();
    for level in 1..=16 {
        let below = children(&server, &run_id);
        assert_eq!(below.len(), 1, "level {level}");
        assert_eq!(below[0]["workflow"], format!("level-{level}"));
        run_id = below[0]["id"].as_str().unwrap().to_owned();
    }
    assert!(children(&server, &run_id).is_empty());
    let deepest = server.wait_for_run(&run_id);
    let down = step(&deepest, "down");
    assert_eq!(down["error"]["kind"], "workflow", "{deepest}");
    assert!(
        down["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nest deeper than 16 levels"),
        "{deepest}"
    );
}

/// `trellis run` (no server) runs child workflows in memory: the ones next
/// to the workflow file.
#[test]
fn trellis_run_finds_child_workflows_next_to_the_file() {
    let sandbox = crate::support::Sandbox::new();
    sandbox.write("child.toml", CHILD);
    let parent = sandbox.write("parent.toml", PARENT);
    let outcome = crate::support::run_file(&parent, Some(r#"{ "items": [3, 4] }"#), &["--json"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let record = outcome.json();
    assert_eq!(
        step(&record, "fan")["output"],
        json!([{ "n": 3, "runs": 1 }, { "n": 4, "runs": 1 }])
    );
    let child_runs: Vec<&Value> = step(&record, "fan")["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|attempt| &attempt["child_run"])
        .collect();
    assert!(child_runs.iter().all(|id| id.is_string()), "{record}");

    let broken = sandbox.write("broken.toml", "[[step]]\nid = \"x\"\nworkflow = \"nope\"\n");
    let outcome = crate::support::exec(&["validate", broken.to_str().unwrap()]);
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .contains("broken.toml:3:12: step `x` calls workflow `nope`, but no workflow of that name is loaded"),
        "{}",
        outcome.stderr
    );
}

/// A run keeps the versions of the workflows it calls from when it was
/// accepted: a child workflow replaced while the parent runs does not change
/// what the parent's later children run (a new parent gets the new one).
#[test]
fn child_workflow_versions_are_pinned_when_the_parent_is_accepted() {
    let gate = crate::support::Gate::start();
    let parent = format!(
        r#"
[[step]]
id = "hold"
plugin = "http-request"
allow_hosts = ["{host}"]
input = {{ url = "{url}" }}

[[step]]
id = "call"
workflow = "versioned-child"
needs = ["hold"]
input = {{}}
"#,
        host = gate.host(),
        url = gate.url("/held")
    );
    let child = |version: u32| {
        format!(
            "[[step]]\nid = \"v\"\nplugin = \"noop\"\ninput = {{ version = {version} }}\n[output]\nversion = \"{{{{ steps.v.output.version }}}}\"\n"
        )
    };
    let server = Serve::new()
        .workflow("versioned-child.toml", &child(1))
        .workflow("held.toml", &parent)
        .start();
    let accepted = server.post("/v1/workflows/held/runs", "{}");
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let id = accepted.json()["id"].as_str().unwrap().to_owned();
    gate.await_waiting(1);
    let reply = server.call(
        "PUT",
        "/v1/workflows/versioned-child",
        &[],
        Some(child(2).as_bytes()),
    );
    assert_eq!(reply.status / 100, 2, "{}", reply.body);
    gate.open();
    let held = server.wait_for_run(&id);
    assert_eq!(
        step(&held, "call")["output"],
        json!({ "version": 1 }),
        "{held}"
    );

    let later = run(&server, "held", "{}");
    assert_eq!(
        step(&later, "call")["output"],
        json!({ "version": 2 }),
        "{later}"
    );
    // A retry keeps the original's pins; with `upgrade` it takes the new ones.
    let retry = server.post(
        &format!("/v1/runs/{id}/retry?wait=60s"),
        r#"{ "from": "call" }"#,
    );
    assert_eq!(
        step(&retry.json(), "call")["output"],
        json!({ "version": 1 }),
        "{}",
        retry.body
    );
    let upgraded = server.post(
        &format!("/v1/runs/{id}/retry?wait=60s"),
        r#"{ "from": "call", "upgrade": true }"#,
    );
    assert_eq!(
        step(&upgraded.json(), "call")["output"],
        json!({ "version": 2 }),
        "{}",
        upgraded.body
    );
}
