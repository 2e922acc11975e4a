//! Templates: the JSON-value rule, interpolation, scope.

use serde_json::json;

use crate::support::*;

#[test]
fn a_lone_expression_keeps_its_json_type() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "echo"
plugin = "noop"
input = { number = "{{ input.n }}", object = "{{ input.obj }}", list = "{{ input.list }}", sum = "{{ input.n + 1 }}", flag = "{{ input.n > 1 }}", text = "n={{ input.n }}", literal = 7, nested = { deep = ["{{ input.list[1] }}", "x"] } }
"#,
        Some(r#"{"n": 41, "obj": {"a": [1, {"b": null}]}, "list": ["p", "q"]}"#),
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(
        step(&record, "echo")["output"],
        json!({
            "number": 41,
            "object": { "a": [1, { "b": null }] },
            "list": ["p", "q"],
            "sum": 42,
            "flag": true,
            "text": "n=41",
            "literal": 7,
            "nested": { "deep": ["q", "x"] }
        })
    );
}

#[test]
fn the_whole_input_can_be_passed_on() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "echo"
plugin = "noop"
input = "{{ input }}"
"#,
        Some(r#"{"k": [true, 1.5, "s"]}"#),
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(
        record["output"],
        json!({ "echo": { "k": [true, 1.5, "s"] } })
    );
}

#[test]
fn an_undefined_value_fails_the_step_with_a_template_error() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "echo"
plugin = "noop"
input = { x = "{{ input.missing.deeper }}" }
"#,
        None,
    );
    assert_eq!(outcome.code, 1);
    let echo = step(&record, "echo");
    assert_eq!(echo["status"], "failed");
    assert_eq!(echo["error"]["kind"], "template");
    assert!(
        echo["error"]["message"].as_str().unwrap().contains("input"),
        "{echo:#}"
    );
}

#[test]
fn host_imports_see_context_config_state_and_logs() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
name = "probing"

[[step]]
id = "probe"
plugin = "probe"
config = { region = "eu-{{ input.zone }}", retries = 3 }
input = { config = ["region", "retries", "absent"], counter = "visits", logs = [["info", "hello from the guest"], ["error", "and an error"]], progress = [[0.5, "half way"]], stdout = "printed line\n", stderr = "warned line\n" }

[[step]]
id = "again"
plugin = "probe"
needs = ["probe"]
input = { counter = "visits" }
"#,
        Some(r#"{"zone": "west"}"#),
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let probe = step(&record, "probe");
    let output = &probe["output"];
    assert_eq!(output["ctx"]["run_id"], record["id"]);
    assert_eq!(output["ctx"]["workflow"], "probing");
    assert_eq!(output["ctx"]["step_id"], "probe");
    assert_eq!(output["ctx"]["attempt"], 1);
    assert_eq!(
        output["config"],
        json!({ "region": "eu-west", "retries": "3", "absent": null })
    );
    assert_eq!(output["counter"], 1);
    // State is scoped to the workflow and shared by its steps.
    assert_eq!(step(&record, "again")["output"]["counter"], 2);

    let attempt = &probe["attempts"][0];
    let logs: Vec<(String, String, String)> = attempt["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap().to_string(),
                l["level"].as_str().unwrap().to_string(),
                l["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for expected in [
        ("log", "info", "hello from the guest"),
        ("log", "error", "and an error"),
        ("stdout", "info", "printed line"),
        ("stderr", "warn", "warned line"),
    ] {
        assert!(
            logs.iter()
                .any(|(s, l, m)| (s.as_str(), l.as_str(), m.as_str()) == expected),
            "{expected:?} not in {logs:?}"
        );
    }
    assert_eq!(
        attempt["progress"],
        json!({ "fraction": 0.5, "message": "half way" })
    );
    assert!(attempt["fuel_consumed"].as_u64().unwrap() > 0);
    assert!(attempt["peak_memory"].as_u64().unwrap() >= 65536);
}
