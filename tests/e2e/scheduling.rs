//! DAG order, parallel steps, `if`, `for_each`, `on_failure`.

use serde_json::json;

use crate::support::*;

#[test]
fn dependent_steps_wait_and_independent_steps_overlap() {
    let sandbox = Sandbox::new();
    // a and b are independent (each sleeps 300 ms); c needs both.
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "a"
plugin = "sleep"
input = { ms = 300 }

[[step]]
id = "b"
plugin = "sleep"
input = { ms = 300 }

[[step]]
id = "c"
plugin = "noop"
input = { a = "{{ steps.a.output.slept_ms }}", b = "{{ steps.b.output.slept_ms }}" }
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(record["status"], "succeeded");
    let (a_start, a_end) = span(&record, "a");
    let (b_start, b_end) = span(&record, "b");
    let (c_start, _) = span(&record, "c");
    // Parallel: each started before the other finished.
    assert!(
        b_start < a_end && a_start < b_end,
        "a {a_start}..{a_end}, b {b_start}..{b_end}"
    );
    // Ordered: c started after both finished.
    assert!(
        c_start >= a_end.max(b_end) - 1.0,
        "c started at {c_start}, a/b ended at {a_end}/{b_end}"
    );
    assert_eq!(step(&record, "c")["output"], json!({ "a": 300, "b": 300 }));
    // The default output is the sink step's output, keyed by its id.
    assert_eq!(record["output"], json!({ "c": { "a": 300, "b": 300 } }));
}

#[test]
fn explicit_needs_orders_steps_without_references() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "second"
plugin = "noop"
needs = ["first"]
input = 2

[[step]]
id = "first"
plugin = "sleep"
input = { ms = 100 }
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let (_, first_end) = span(&record, "first");
    let (second_start, _) = span(&record, "second");
    assert!(second_start >= first_end - 1.0);
    assert_eq!(record["output"], json!({ "second": 2 }));
}

#[test]
fn false_condition_skips_the_step_and_dependents_still_run() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "price"
plugin = "noop"
input = { total = "{{ input.total }}" }

[[step]]
id = "approve"
plugin = "noop"
if = "{{ steps.price.output.total > 100 }}"
input = "approved"

[[step]]
id = "report"
plugin = "noop"
input = { approval = "{{ steps.approve.status }}", output = "{{ steps.approve.output }}" }
"#,
        Some(r#"{"total": 40}"#),
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let approve = step(&record, "approve");
    assert_eq!(approve["status"], "skipped");
    assert_eq!(approve["output"], json!(null));
    assert_eq!(approve["attempts"], json!([]));
    assert_eq!(
        step(&record, "report")["output"],
        json!({ "approval": "skipped", "output": null })
    );

    // The same workflow with a large total runs the step.
    let (_, record) = sandbox.run_json(
        &std::fs::read_to_string(sandbox.dir.path().join("workflow.toml")).unwrap(),
        Some(r#"{"total": 400}"#),
    );
    assert_eq!(step(&record, "approve")["status"], "succeeded");
    assert_eq!(
        step(&record, "report")["output"],
        json!({ "approval": "succeeded", "output": "approved" })
    );
}

#[test]
fn for_each_outputs_follow_item_order_not_finish_order() {
    let sandbox = Sandbox::new();
    // Earlier items sleep longer, so they finish last.
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "fan"
plugin = "sleep"
for_each = "{{ input.delays }}"
input = { ms = "{{ item }}" }

[[step]]
id = "label"
plugin = "noop"
for_each = "{{ steps.fan.output }}"
input = "{{ index }}:{{ item.slept_ms }}"
"#,
        Some(r#"{"delays": [240, 160, 80, 0]}"#),
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let fan = step(&record, "fan");
    assert_eq!(fan["items"], 4);
    assert_eq!(
        fan["output"],
        json!([{ "slept_ms": 240 }, { "slept_ms": 160 }, { "slept_ms": 80 }, { "slept_ms": 0 }])
    );
    assert_eq!(
        step(&record, "label")["output"],
        json!(["0:240", "1:160", "2:80", "3:0"])
    );
    // Every item has its own attempt, tagged with its position.
    let mut items: Vec<i64> = fan["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["item"].as_i64().unwrap())
        .collect();
    items.sort();
    assert_eq!(items, vec![0, 1, 2, 3]);
}

#[test]
fn for_each_over_an_empty_list_succeeds_with_an_empty_list() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "fan"
plugin = "noop"
for_each = "{{ input.items }}"
input = "{{ item }}"
"#,
        Some(r#"{"items": []}"#),
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(record["output"], json!({ "fan": [] }));
}

#[test]
fn a_failed_step_stops_its_dependents_and_fails_the_run() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "broken"
plugin = "fail"
input = { message = "upstream is down" }

[[step]]
id = "after"
plugin = "noop"
needs = ["broken"]
"#,
        None,
    );
    assert_eq!(outcome.code, 1);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["step"], "broken");
    assert_eq!(record["error"]["kind"], "task_error");
    assert_eq!(record["error"]["message"], "upstream is down");
    let after = step(&record, "after");
    assert_eq!(after["status"], "cancelled");
    assert_eq!(after["error"]["kind"], "dependency_failed");
    assert!(
        outcome.stderr.contains("step `broken` failed"),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome.stderr.contains("upstream is down"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn on_failure_continue_lets_the_run_go_on() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "optional"
plugin = "fail"
on_failure = "continue"
input = { message = "no coffee" }

[[step]]
id = "after"
plugin = "noop"
input = { status = "{{ steps.optional.status }}" }
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(record["status"], "succeeded");
    assert_eq!(step(&record, "optional")["status"], "failed");
    assert_eq!(
        step(&record, "after")["output"],
        json!({ "status": "failed" })
    );
}

#[test]
fn output_table_shapes_the_run_result() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "a"
plugin = "noop"
input = { n = 3 }

[output]
n = "{{ steps.a.output.n }}"
text = "n is {{ steps.a.output.n }}"
run = "{{ run.id }}"
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(record["output"]["n"], json!(3));
    assert_eq!(record["output"]["text"], json!("n is 3"));
    assert_eq!(record["output"]["run"], record["id"]);
}
