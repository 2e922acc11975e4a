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

/// The fuzzer's hang: a lazy list of 10^17 empty lists, which printing walked
/// one by one without spending fuel.
const HANG: &str = "{{ 677729 * [] * input.big * 77 * 81 }}";

/// A template whose value doubles per instruction (it grew `trellis run`
/// past 8 GiB in 40 seconds).
const DOUBLING: &str = "{% set ns = namespace(l=[input.big]) %}{% for i in range(200) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l }}";

#[test]
fn a_template_over_its_bounds_fails_the_step_and_the_run_with_template_limit() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        &format!(
            r#"
[[step]]
id = "echo"
plugin = "noop"
input = {{ x = "{HANG}" }}
"#
        ),
        Some(r#"{"big": 81511111729}"#),
    );
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    let echo = step(&record, "echo");
    assert_eq!(echo["error"]["kind"], "template_limit", "{echo:#}");
    assert!(
        echo["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the bound on one value (64 MiB)"),
        "{echo:#}"
    );

    let (outcome, record) = sandbox.run_json(
        &format!(
            r#"
[[step]]
id = "echo"
plugin = "noop"
input = {{ x = 1 }}

[output]
all = "{DOUBLING}"
"#
        ),
        Some(r#"{"big": 1}"#),
    );
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["kind"], "template_limit", "{record:#}");
}

#[test]
fn validate_refuses_a_constant_template_over_its_bounds_at_its_place() {
    let (code, stderr, file) = crate::validation::validate(
        r#"[[step]]
id = "echo"
plugin = "noop"
input = { x = "{{ 677729 * [] * 81511111729 * 77 * 81 }}" }
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    crate::validation::assert_reports(
        &stderr,
        &file,
        4,
        19,
        &["template_limit: ", "the bound on one value"],
    );
}

#[test]
fn serve_keeps_serving_while_templates_go_over_their_bounds() {
    let workflow = format!(
        r#"
[[step]]
id = "echo"
plugin = "noop"
input = {{ x = "{{{{ input.big }}}}" }}

[output]
hang = "{HANG}"
"#
    );
    let server = Serve::new().workflow("hostile.toml", &workflow).start();
    let ids: Vec<String> = (0..4)
        .map(|_| {
            let reply = server.post("/v1/workflows/hostile/runs", r#"{"big": 81511111729}"#);
            assert_eq!(reply.status, 202, "{}", reply.body);
            reply.json()["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(server.get("/healthz").status, 200);
    for id in ids {
        let run = server.wait_for_run(&id);
        assert_eq!(run["status"], "failed", "{run:#}");
        assert_eq!(run["error"]["kind"], "template_limit", "{run:#}");
        assert_eq!(server.get("/healthz").status, 200);
    }
}
