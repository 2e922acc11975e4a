//! Whole-pipeline tests: TOML text in, a plan or diagnostics out.

use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::plugin::PluginRef;

/// Plugins by name; a pinned reference matches on its name.
pub(super) struct TestCatalog(pub &'static [&'static str]);

impl PluginCatalog for TestCatalog {
    fn check(&self, reference: &PluginRef) -> Result<(), String> {
        let name = reference.name.as_str();
        if self.0.contains(&name) {
            Ok(())
        } else {
            Err(format!(
                "no plugin named `{name}` (loaded: {})",
                self.0.join(", ")
            ))
        }
    }
}

pub(super) const CATALOG: TestCatalog =
    TestCatalog(&["json-parse", "price", "http-post", "uppercase", "noop"]);

fn plan(source: &str) -> Plan {
    match parse_str(source, "w.toml", "w", &CATALOG) {
        Ok(plan) => plan,
        Err(diagnostics) => panic!("unexpected diagnostics:\n{diagnostics}"),
    }
}

fn errors(source: &str) -> Vec<String> {
    match parse_str(source, "w.toml", "w", &CATALOG) {
        Ok(plan) => panic!("expected diagnostics, got a plan: {plan:?}"),
        Err(diagnostics) => diagnostics.iter().map(ToString::to_string).collect(),
    }
}

/// The one diagnostic of `source`.
fn error(source: &str) -> String {
    let errors = errors(source);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    errors.into_iter().next().unwrap()
}

const DESIGN_EXAMPLE: &str = r#"
name = "order-pipeline"          # defaults to the file stem
description = "Validate, price and notify"

[limits]
fuel = 50_000_000
memory = "64MiB"
timeout = "10s"

[retry]
max_attempts = 3
backoff = "exponential"
initial = "100ms"
max = "10s"

[[step]]
id = "parse"
plugin = "json-parse"
input = "{{ input }}"

[[step]]
id = "price"
plugin = "price"
needs = ["parse"]
input = { items = "{{ steps.parse.output.items }}", currency = "EUR" }
config = { table = "standard" }

[[step]]
id = "notify"
plugin = "http-post"
needs = ["price"]
if = "{{ steps.price.output.total > 100 }}"
for_each = "{{ steps.parse.output.items }}"
allow_hosts = ["127.0.0.1:9000"]
on_failure = "continue"

[output]
total = "{{ steps.price.output.total }}"
"#;

#[test]
fn the_design_example_plans() {
    let plan = plan(DESIGN_EXAMPLE);
    assert_eq!(plan.name, "order-pipeline");
    assert_eq!(
        plan.description.as_deref(),
        Some("Validate, price and notify")
    );
    assert_eq!(plan.file, "w.toml");
    let ids: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["parse", "price", "notify"]);
    assert_eq!(plan.steps[1].needs, [0]);
    assert_eq!(
        plan.steps[2].needs,
        [0, 1],
        "for_each reads parse: implicit need"
    );
    assert_eq!(plan.steps[2].plugin, "http-post");
    assert_eq!(plan.steps[2].on_failure, OnFailure::Continue);
    assert_eq!(plan.steps[0].on_failure, OnFailure::Fail);
    assert_eq!(
        plan.steps[2].allow_hosts[..],
        [crate::limits::HostPattern::parse("127.0.0.1:9000").unwrap()]
    );
    let limits = plan.steps[0].limits;
    assert_eq!(limits.fuel, Some(50_000_000));
    assert_eq!(limits.memory, Some(64 * 1024 * 1024));
    assert_eq!(limits.timeout, Some(Duration::from_secs(10)));
    assert_eq!(limits.max_output, None);
    assert_eq!(plan.steps[1].retry.max_attempts, 3);
    assert_eq!(plan.sinks(), [2]);

    // Run it through the templates the way the executor will.
    let mut scope = Scope::new(
        "r1",
        &plan.name,
        &json!({"items": [{"sku": "a"}, {"sku": "b"}]}),
    );
    let t = &plan.templates;
    assert_eq!(
        t.render(&plan.steps[0].input, &scope).unwrap(),
        json!({"items": [{"sku": "a"}, {"sku": "b"}]})
    );
    scope.set_step(
        "parse",
        "succeeded",
        &json!({"items": [{"sku": "a"}, {"sku": "b"}]}),
    );
    assert_eq!(
        t.render(&plan.steps[1].input, &scope).unwrap(),
        json!({"items": [{"sku": "a"}, {"sku": "b"}], "currency": "EUR"})
    );
    assert_eq!(
        t.render(&plan.steps[1].config["table"], &scope).unwrap(),
        json!("standard")
    );
    scope.set_step("price", "succeeded", &json!({"total": 150}));
    let notify = &plan.steps[2];
    assert!(
        t.truthy(notify.condition.as_ref().unwrap(), &scope)
            .unwrap()
    );
    let items = t
        .render_list(notify.for_each.as_ref().unwrap(), &scope)
        .unwrap();
    assert_eq!(items, [json!({"sku": "a"}), json!({"sku": "b"})]);
    assert_eq!(t.render(&notify.input, &scope).unwrap(), Json::Null);
    assert_eq!(
        t.render(plan.output.as_ref().unwrap(), &scope).unwrap(),
        json!({"total": 150})
    );
}

use serde_json::Value as Json;

#[test]
fn defaults_when_the_workflow_says_nothing() {
    let plan = plan("[[step]]\nid = \"a\"\nplugin = \"noop\"\n");
    assert_eq!(plan.name, "w", "the name defaults to the file stem");
    assert_eq!(plan.description, None);
    assert!(plan.output.is_none());
    let step = &plan.steps[0];
    assert_eq!(step.retry, RetryPolicy::default());
    assert_eq!(step.limits, crate::engine::LimitOverrides::default());
    assert_eq!(step.input.as_literal(), Some(&Json::Null));
    assert!(step.config.is_empty() && step.condition.is_none() && step.for_each.is_none());
}

#[test]
fn step_limits_and_retry_override_per_key() {
    let plan = plan(
        r#"
[limits]
fuel = 100
memory = 2048
timeout = "5s"
[retry]
max_attempts = 4
backoff = "fixed"
max = "1m"
[[step]]
id = "a"
plugin = "noop"
limits = { timeout = "250ms", max_log = "1KiB" }
retry = { initial = "2s" }
[[step]]
id = "b"
plugin = "noop"
"#,
    );
    let a = &plan.steps[0];
    assert_eq!(a.limits.fuel, Some(100));
    assert_eq!(a.limits.memory, Some(2048));
    assert_eq!(a.limits.timeout, Some(Duration::from_millis(250)));
    assert_eq!(a.limits.max_log, Some(1024));
    assert_eq!(
        a.retry,
        RetryPolicy {
            max_attempts: 4,
            backoff: Backoff::Fixed,
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
        }
    );
    let b = &plan.steps[1];
    assert_eq!(b.limits.timeout, Some(Duration::from_secs(5)));
    assert_eq!(b.retry.initial, Duration::from_millis(100));
}

#[test]
fn references_imply_needs_and_order_is_topological() {
    let plan = plan(
        r#"
[[step]]
id = "report"
plugin = "noop"
input = "{{ steps.total.output }} of {{ steps.load.output | length }}"

[[step]]
id = "total"
plugin = "noop"
config = { source = "{{ steps.load.status }}" }

[[step]]
id = "load"
plugin = "noop"

[[step]]
id = "audit"
plugin = "noop"
if = "{{ steps.load.output }}"

[[step]]
id = "independent"
plugin = "noop"
needs = ["audit", "audit"]

# Read only through a slice, beside an explicit `needs` (workflows/new-hires.toml).
[[step]]
id = "digest"
plugin = "noop"
needs = ["audit"]
input.vars = { short = "{{ steps.total.output.digest[:12] }}" }
"#,
    );
    let ids: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
    // load first (nothing before it), then in file order what became ready.
    assert_eq!(
        ids,
        ["load", "total", "report", "audit", "independent", "digest"]
    );
    let index = |id: &str| ids.iter().position(|s| *s == id).unwrap();
    assert_eq!(
        plan.steps[index("report")].needs,
        [index("load"), index("total")]
    );
    assert_eq!(plan.steps[index("total")].needs, [index("load")]);
    assert_eq!(plan.steps[index("independent")].needs, [index("audit")]);
    assert_eq!(
        plan.steps[index("digest")].needs,
        [index("total"), index("audit")]
    );
    for (i, step) in plan.steps.iter().enumerate() {
        assert!(
            step.needs.iter().all(|&need| need < i),
            "{} comes after its needs",
            step.id
        );
    }
}

#[test]
fn ties_keep_file_order() {
    let plan = plan(
        "[[step]]\nid = \"c\"\nplugin = \"noop\"\n[[step]]\nid = \"a\"\nplugin = \"noop\"\n[[step]]\nid = \"b\"\nplugin = \"noop\"\n",
    );
    let ids: Vec<&str> = plan.steps.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["c", "a", "b"]);
}

#[test]
fn literal_values_keep_their_types() {
    let plan = plan(
        r#"
[[step]]
id = "a"
plugin = "noop"
input = { n = 1, f = 2.5, b = true, when = 1979-05-27, list = [1, "two"], nested = { s = "{{ input.x }}", k = 3 } }
"#,
    );
    let scope = Scope::new("r", "w", &json!({"x": [1]}));
    assert_eq!(
        plan.templates.render(&plan.steps[0].input, &scope).unwrap(),
        json!({"n": 1, "f": 2.5, "b": true, "when": "1979-05-27", "list": [1, "two"], "nested": {"s": [1], "k": 3}})
    );
}

#[test]
fn missing_id_and_plugin() {
    assert_eq!(
        errors("[[step]]\nplugin = \"noop\"\n[[step]]\nid = \"b\"\n"),
        [
            "w.toml:1:1: step #1 has no `id`",
            "w.toml:3:1: step `b` has no `plugin` (or `workflow`, for a sub-workflow)"
        ]
    );
}

#[test]
fn duplicate_ids_point_at_the_second() {
    assert_eq!(
        error("[[step]]\nid = \"a\"\nplugin = \"noop\"\n[[step]]\nid = \"a\"\nplugin = \"noop\"\n"),
        "w.toml:5:6: duplicate step id `a` (line 2 already uses it)"
    );
}

#[test]
fn workflow_names_are_url_and_file_safe() {
    let source = "[[step]]\nid = \"a\"\nplugin = \"noop\"\n";
    for good in ["w", "order-pipeline", "v1.2_x"] {
        let plan = parse_str(source, "f.toml", good, &CATALOG).unwrap();
        assert_eq!(plan.name, good);
    }
    // From the file name: reported at the top of the file, with the way out.
    for bad in ["my flow", "..", "naïve", "a%2Fb"] {
        let errors = parse_str(source, "f.toml", bad, &CATALOG).unwrap_err();
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with(&format!(
                "f.toml:1:1: workflow name \"{bad}\" may only contain"
            )),
            "{errors:#?}"
        );
        assert!(
            errors[0].ends_with("rename the file, or set `name = \"...\"`"),
            "{errors:#?}"
        );
    }
    // A `name` in the file wins over the file name, and is checked at its value.
    let plan = parse_str(
        &format!("name = \"ok\"\n{source}"),
        "f.toml",
        "my flow",
        &CATALOG,
    );
    assert_eq!(plan.unwrap().name, "ok");
    for bad in ["../etc/passwd", ".", "a b", &"x".repeat(129)] {
        let errors = parse_str(
            &format!("name = \"{bad}\"\n{source}"),
            "f.toml",
            "w",
            &CATALOG,
        )
        .unwrap_err();
        let first = errors.iter().next().unwrap().to_string();
        assert!(first.starts_with("f.toml:1:8: workflow name"), "{first}");
    }
}

#[test]
fn invalid_ids() {
    assert_eq!(
        error("[[step]]\nid = \"fetch-user\"\nplugin = \"noop\"\n"),
        "w.toml:2:6: step id `fetch-user` may only contain letters, digits and `_` (templates refer to it as steps.<id>); try `fetch_user`"
    );
}

#[test]
fn unknown_plugin_uses_the_catalog_sentence() {
    assert_eq!(
        error("[[step]]\nid = \"a\"\nplugin = \"uppercse@1.0.0\"\n"),
        "w.toml:3:10: no plugin named `uppercse` (loaded: json-parse, price, http-post, uppercase, noop)"
    );
    assert!(
        error("[[step]]\nid = \"a\"\nplugin = \"uppercase@1.0\"\n").contains("is not a version")
    );
}

#[test]
fn unknown_and_self_needs() {
    assert_eq!(
        errors(
            "[[step]]\nid = \"fetch\"\nplugin = \"noop\"\nneeds = [\"fetch\"]\n[[step]]\nid = \"b\"\nplugin = \"noop\"\nneeds = [\"fecth\", \"nothing\"]\n"
        ),
        [
            "w.toml:4:10: step `fetch` needs itself",
            "w.toml:8:10: step `b` needs `fecth`, but there is no step `fecth`; did you mean `fetch`?",
            "w.toml:8:19: step `b` needs `nothing`, but there is no step `nothing`",
        ]
    );
}

#[test]
fn cycles_are_named_in_order() {
    assert_eq!(
        error(
            r#"[[step]]
id = "a"
plugin = "noop"
needs = ["c"]
[[step]]
id = "b"
plugin = "noop"
input = "{{ steps.a.output }}"
[[step]]
id = "c"
plugin = "noop"
needs = ["b"]
[[step]]
id = "d"
plugin = "noop"
needs = ["a"]
"#
        ),
        "w.toml:4:10: dependency cycle: a -> c -> b -> a (each step needs the next)"
    );
}

#[test]
fn template_syntax_errors_point_into_the_string() {
    assert_eq!(
        error("[[step]]\nid = \"a\"\nplugin = \"noop\"\ninput = { x = \"n: {{ input.n + }}\" }\n"),
        "w.toml:4:32: template syntax error: unexpected end of variable block"
    );
    // Escapes move the text: the error falls back to the string's start.
    assert_eq!(
        error("[[step]]\nid = \"a\"\nplugin = \"noop\"\ninput = \"\\t{{ input.n + }}\"\n"),
        "w.toml:4:9: template syntax error: unexpected end of variable block"
    );
    // Multi-line literal strings map line and column.
    assert_eq!(
        error("[[step]]\nid = \"a\"\nplugin = \"noop\"\ninput = '''\nline one\n  {% if x %}'''\n"),
        "w.toml:6:11: template syntax error: unexpected end of input, expected end of block"
    );
}

#[test]
fn unknown_references_in_templates() {
    assert_eq!(
        errors(
            r#"[[step]]
id = "fetch"
plugin = "noop"
[[step]]
id = "b"
plugin = "noop"
input = { a = "{{ steps.fecth.output }}", b = "x {{ inptu.y }}", c = "{{ run.name }}", d = "{{ steps.fetch.outptu }}", e = "{{ steps.b.output }}" }
[[step]]
id = "c"
plugin = "noop"
input = "{{ steps.fecth.output[:3] }}"
"#
        ),
        [
            "w.toml:7:19: `steps.fecth` refers to an unknown step `fecth`; did you mean `fetch`?",
            "w.toml:7:53: unknown variable `inptu` (templates can read input, steps.<id>, run); did you mean `input`?",
            "w.toml:7:74: `run.name` does not exist: `run` has `id` and `workflow`",
            "w.toml:7:96: `steps.fetch.outptu` does not exist: a step has `output` and `status`",
            "w.toml:7:128: step `b` reads its own result (`steps.b`); a template can only read the steps that ran before",
            "w.toml:11:13: `steps.fecth` refers to an unknown step `fecth`; did you mean `fetch`?",
        ]
    );
}

#[test]
fn item_only_inside_for_each() {
    assert_eq!(
        errors(
            r#"[[step]]
id = "a"
plugin = "noop"
input = "{{ input.items }} {{ item }}"
[[step]]
id = "b"
plugin = "noop"
for_each = "{{ input.items }}"
if = "{{ index > 0 }}"
input = "{{ item }} #{{ index }}"
[output]
x = "{{ item }}"
"#
        ),
        [
            "w.toml:4:31: `item` is only defined in a step with `for_each`",
            "w.toml:9:10: `index` is not defined in `if`: the condition is checked once, before `for_each` fans out (filter the list in `for_each` instead)",
            "w.toml:12:9: `item` is not defined in [output]",
        ]
    );
}

#[test]
fn limit_and_retry_values() {
    assert_eq!(
        errors(
            r#"[limits]
fuel = 0
memory = "8GiB"
timeout = "0s"
[retry]
max_attempts = 0
initial = "30s"
[[step]]
id = "a"
plugin = "noop"
limits = { memory = 0 }
retry = { initial = "2s", max = "1s" }
[[step]]
id = "b"
plugin = "noop"
retry = { max = "20ms" }
[[step]]
id = "c"
plugin = "noop"
retry = { max_attempts = 101 }
[[step]]
id = "d"
plugin = "noop"
retry = { max_attempts = 100 }
"#
        ),
        [
            "w.toml:2:8: `fuel` must be at least 1",
            "w.toml:3:10: `memory` is 8.0 GiB, but a wasm32 instance cannot use more than 4.0 GiB",
            "w.toml:4:11: `timeout` must be longer than 0s",
            "w.toml:6:16: `max_attempts` must be at least 1 (1 means no retry)",
            "w.toml:7:11: retry `initial` (30s) is longer than `max` (10s, from the default)",
            "w.toml:11:21: `memory` must be more than 0 bytes",
            "w.toml:12:21: retry `initial` (2s) is longer than `max` (1s)",
            "w.toml:16:17: retry `initial` (30s, from [retry]) is longer than `max` (20ms)",
            "w.toml:20:26: `max_attempts` is 101, more than 100: the run record keeps every \
             attempt; to retry over a longer time, raise `max`",
        ]
    );
}

#[test]
fn wrong_types_and_values_are_located() {
    assert_eq!(
        errors(
            r#"[limits]
timeout = "10 parsecs"
[[step]]
id = "a"
plugin = "noop"
limits = { max_output = "huge", fuel = "lots" }
retry = { backoff = "linear" }
on_failure = "ignore"
needs = "b"
"#
        ),
        [
            "w.toml:2:11: `limits.timeout`: invalid duration \"10 parsecs\" (unknown time unit \"parsecs\"); write it like \"250ms\", \"10s\" or \"1m 30s\"",
            "w.toml:6:25: step `a`: `limits.max_output`: invalid size \"huge\"; write it like \"64MiB\", \"512KiB\", \"1GB\" or as a number of bytes",
            "w.toml:6:40: step `a`: `limits.fuel`: invalid type: string \"lots\", expected u64",
            "w.toml:7:21: step `a`: `retry.backoff`: unknown variant `linear`, expected `fixed` or `exponential`",
            "w.toml:8:14: step `a`: `on_failure`: unknown variant `ignore`, expected `fail` or `continue`",
            "w.toml:9:9: step `a`: `needs`: invalid type: string \"b\", expected a sequence",
        ]
    );
}

#[test]
fn a_workflow_needs_steps() {
    assert_eq!(
        error("name = \"empty\"\n"),
        "w.toml:1:1: the workflow has no steps: add a [[step]] with an `id` and a `plugin`"
    );
}

#[test]
fn output_refers_to_known_steps() {
    assert_eq!(
        error("[[step]]\nid = \"a\"\nplugin = \"noop\"\n[output]\nx = \"{{ steps.b.output }}\"\n"),
        "w.toml:5:9: `steps.b` refers to an unknown step `b`"
    );
    // A whole-string output and `steps` as a whole are fine there.
    let plan = plan("output = \"{{ steps }}\"\n[[step]]\nid = \"a\"\nplugin = \"noop\"\n");
    let mut scope = Scope::new("r", "w", &Json::Null);
    scope.set_step("a", "succeeded", &json!(7));
    assert_eq!(
        plan.templates
            .render(plan.output.as_ref().unwrap(), &scope)
            .unwrap(),
        json!({"a": {"output": 7, "status": "succeeded"}})
    );
}

#[test]
fn a_step_reads_only_the_steps_it_waits_for() {
    // c waits for b, b for a; d runs beside them all.
    let plan = plan(
        r#"
[[step]]
id = "a"
plugin = "noop"
[[step]]
id = "b"
plugin = "noop"
input = "{{ steps.a.output }}"
[[step]]
id = "c"
plugin = "noop"
input = "{{ steps.b.output }}"
[[step]]
id = "d"
plugin = "noop"
"#,
    );
    let index = |id: &str| plan.steps.iter().position(|s| s.id == id).unwrap();
    let readable = plan.readable_by(index("c"));
    assert!(readable.allows("a") && readable.allows("b"));
    assert!(!readable.allows("c") && !readable.allows("d") && !readable.allows("zz"));
    assert!(readable.forbids("d") && !readable.forbids("zz"));

    let mut scope = Scope::new("r", "w", &Json::Null);
    for id in ["a", "b", "d"] {
        scope.set_step(id, "succeeded", &json!(id));
    }
    let render = |text: &str, scope: &Scope| {
        let mut builder = template::TemplatesBuilder::new();
        let value = builder.compile(text, "input").unwrap().unwrap().value;
        builder.finish().render(&value, scope)
    };
    let seen_by_c = scope.for_step(readable);
    // d has finished, but c does not wait for it: whatever the timing, c does
    // not see it, and is told why.
    assert_eq!(
        render("{{ steps | list }}", &seen_by_c).unwrap(),
        json!(["a", "b"])
    );
    assert_eq!(
        render("{{ steps.a.output ~ steps.b.output }}", &seen_by_c).unwrap(),
        json!("ab")
    );
    assert_eq!(
        render("{{ steps.d.output }}", &seen_by_c)
            .unwrap_err()
            .to_string(),
        "input: `{{ steps.d.output }}`: `steps.d` is undefined: this step does not wait for \
         step `d`; add it to `needs`"
    );
    // The run's scope, which `[output]` reads, has them all.
    assert_eq!(
        render("{{ steps | list }}", &scope).unwrap(),
        json!(["a", "b", "d"])
    );
}

#[test]
fn if_and_for_each_types() {
    assert_eq!(
        errors("[[step]]\nid = \"a\"\nplugin = \"noop\"\nif = 1\nfor_each = { a = 1 }\n"),
        [
            "w.toml:4:6: `if` must be a template string like \"{{ steps.check.output.ok }}\" or a boolean",
            "w.toml:5:12: `for_each` must be a template string like \"{{ input.items }}\" or an array",
        ]
    );
}

#[test]
fn unreadable_files_are_a_diagnostic() {
    let error = load_file(Path::new("/nonexistent/x.toml"), &CATALOG).unwrap_err();
    assert_eq!(error.len(), 1);
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/x.toml:1:1: cannot read the workflow file: "),
        "{error}"
    );
}

#[test]
fn load_file_names_the_workflow_after_the_file() {
    let dir = std::env::temp_dir().join(format!("trellis-workflow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nightly-report.toml");
    std::fs::write(&path, "[[step]]\nid = \"a\"\nplugin = \"noop\"\n").unwrap();
    let plan = load_file(&path, &CATALOG).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(plan.name, "nightly-report");
    assert_eq!(plan.file, path.display().to_string());
}

/// A 40-step chain, each step reading the one before, plans and renders in well
/// under a millisecond per step; a 1000-item fan-out renders in linear time.
#[test]
fn planning_and_rendering_are_fast() {
    let mut source =
        String::from("[[step]]\nid = \"s0\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n");
    for i in 1..40 {
        source.push_str(&format!(
            "[[step]]\nid = \"s{i}\"\nplugin = \"noop\"\ninput = {{ prev = \"{{{{ steps.s{}.output }}}}\", n = \"{{{{ steps.s{}.output.n + 1 }}}}\", label = \"step {{{{ run.id }}}}-{i}\" }}\n",
            i - 1,
            i - 1
        ));
    }
    let started = Instant::now();
    let plan = plan(&source);
    let mut scope = Scope::new("r", &plan.name, &json!({"n": 0}));
    for step in &plan.steps {
        let input = plan.templates.render(&step.input, &scope).unwrap();
        let n = input.get("n").cloned().unwrap_or(json!(0));
        scope.set_step(&step.id, "succeeded", &json!({"n": n}));
    }
    let chain = started.elapsed();
    eprintln!("40-step chain: plan + render in {chain:?}");
    assert_eq!(plan.steps.len(), 40);
    assert!(
        chain < Duration::from_millis(40),
        "40-step chain took {chain:?}"
    );

    let plan = self::plan(
        "[[step]]\nid = \"fan\"\nplugin = \"noop\"\nfor_each = \"{{ input.items }}\"\ninput = { value = \"{{ item }}\", at = \"{{ index }}\", of = \"{{ input.items | length }}\" }\n",
    );
    let items: Vec<Json> = (0..1000).map(|i| json!({"id": i})).collect();
    let scope = Scope::new("r", "w", &json!({ "items": items }));
    let step = &plan.steps[0];
    let started = Instant::now();
    let list = plan
        .templates
        .render_list(step.for_each.as_ref().unwrap(), &scope)
        .unwrap();
    for (index, item) in list.iter().enumerate() {
        let input = plan
            .templates
            .render(&step.input, &scope.with_item(item, index))
            .unwrap();
        assert_eq!(input["at"], json!(index));
    }
    let fan_out = started.elapsed();
    eprintln!("1000-item fan-out rendered in {fan_out:?}");
    assert!(
        fan_out < Duration::from_millis(200),
        "1000-item fan-out took {fan_out:?}"
    );
}

#[test]
fn steps_can_be_an_inline_array_and_values_literal() {
    let plan = plan(
        r#"step = [
  { id = "a", plugin = "noop", if = true, for_each = [1, "{{ input.extra }}"] },
  { id = "b", plugin = "noop", if = "false" },
]"#,
    );
    let scope = Scope::new("r", "w", &json!({"extra": {"k": 2}}));
    let a = &plan.steps[0];
    assert!(
        plan.templates
            .truthy(a.condition.as_ref().unwrap(), &scope)
            .unwrap()
    );
    assert_eq!(
        plan.templates
            .render_list(a.for_each.as_ref().unwrap(), &scope)
            .unwrap(),
        [json!(1), json!({"k": 2})]
    );
    let b = &plan.steps[1];
    assert!(
        !plan
            .templates
            .truthy(b.condition.as_ref().unwrap(), &scope)
            .unwrap()
    );
}

#[test]
fn dynamic_step_lookups_and_values_without_json_form() {
    assert_eq!(
        errors(
            "[[step]]\nid = \"a\"\nplugin = \"noop\"\ninput = { x = \"{{ steps['b'].output }}\", y = nan }\n[[step]]\nid = \"b\"\nplugin = \"noop\"\n"
        ),
        [
            "w.toml:4:19: read another step as `steps.<id>.output` with its id written out, so that Trellis knows which steps this one waits for",
            "w.toml:4:46: NaN has no JSON form",
        ]
    );
}

/// A one-step workflow with `input` (an `[input]` table) in front.
fn with_input(input: &str) -> String {
    format!("{input}\n[[step]]\nid = \"a\"\nplugin = \"noop\"\n")
}

const ORDER_SCHEMA: &str = r#"[input]
description = "An order to price"
schema = { type = "object", required = ["order", "customer"], properties = { customer = { type = "string" }, order = { type = "object", properties = { items = { type = "array", items = { type = "object", properties = { qty = { type = "integer", minimum = 1 } } } } } } } }
"#;

#[test]
fn input_schema_accepts_valid_input() {
    let plan = plan(&with_input(ORDER_SCHEMA));
    let schema = plan.input_schema.as_ref().expect("an input schema");
    assert_eq!(schema.description(), Some("An order to price"));
    assert_eq!(schema.schema()["required"], json!(["order", "customer"]));
    assert_eq!(
        schema.validate(&json!({ "customer": "ada", "order": { "items": [{ "qty": 2 }] } })),
        Ok(())
    );
    // Debug shows the schema, not the compiled validator.
    let debug = format!("{schema:?}");
    assert!(debug.starts_with("InputSchema { schema: "), "{debug}");
    // Clones share the schema and its compiled validator.
    assert!(std::ptr::eq(schema.clone().schema(), schema.schema()));
}

#[test]
fn input_schema_lists_every_violation_with_its_path() {
    let plan = plan(&with_input(ORDER_SCHEMA));
    let schema = plan.input_schema.unwrap();
    let violations = schema
        .validate(
            &json!({ "order": { "items": [{ "qty": "three" }, { "qty": 2 }, { "qty": 0 }] } }),
        )
        .unwrap_err();
    let violation = |path: &str, message: &str| SchemaViolation {
        path: path.to_owned(),
        message: message.to_owned(),
    };
    assert_eq!(
        violations,
        [
            violation("", "\"customer\" is a required property"),
            violation("/order/items/0/qty", "\"three\" is not of type \"integer\""),
            violation("/order/items/2/qty", "0 is less than the minimum of 1"),
        ]
    );
    assert_eq!(
        serde_json::to_value(&violations[0]).unwrap(),
        json!({ "path": "", "message": "\"customer\" is a required property" })
    );
}

#[test]
fn violations_do_not_quote_long_values() {
    let plan = plan(&with_input("[input]\nschema = { type = \"array\" }"));
    let long = json!({ "text": "x".repeat(200) });
    assert_eq!(
        plan.input_schema.unwrap().validate(&long),
        Err(vec![SchemaViolation {
            path: String::new(),
            message: "value is not of type \"array\"".to_owned(),
        }])
    );
}

#[test]
fn a_workflow_without_input_accepts_any_input() {
    assert!(plan(&with_input("")).input_schema.is_none());
}

#[test]
fn input_schema_as_json_text() {
    let from_text = plan(&with_input(
        r#"[input]
schema = '''
{
  "type": "object",
  "required": ["order"],
  "properties": { "order": { "type": "object" } }
}
'''"#,
    ));
    let from_toml = plan(&with_input(
        r#"[input]
schema = { type = "object", required = ["order"], properties = { order = { type = "object" } } }"#,
    ));
    let from_text = from_text.input_schema.unwrap();
    assert_eq!(from_text.schema(), from_toml.input_schema.unwrap().schema());
    assert!(from_text.description().is_none());
    assert_eq!(
        from_text.validate(&json!({ "order": 1 })),
        Err(vec![SchemaViolation {
            path: "/order".to_owned(),
            message: "1 is not of type \"object\"".to_owned(),
        }])
    );
}

#[test]
fn input_schema_as_a_table_of_its_own() {
    let plan = plan(&with_input(
        "[input.schema]\ntype = \"object\"\nproperties.n.type = \"integer\"\n",
    ));
    assert_eq!(
        plan.input_schema.unwrap().validate(&json!({ "n": 1.5 })),
        Err(vec![SchemaViolation {
            path: "/n".to_owned(),
            message: "1.5 is not of type \"integer\"".to_owned(),
        }])
    );
}

#[test]
fn invalid_input_schema_is_reported_where_it_is_wrong() {
    assert_eq!(
        errors(&with_input(
            r#"[input]
schema = { type = "object", required = "order", properties = { order = { type = "strng" } } }"#
        )),
        [
            "w.toml:2:40: invalid input schema at /required: \"order\" is not of type \"array\"",
            "w.toml:2:81: invalid input schema at /properties/order/type: \"strng\" is not valid under any of the schemas listed in the 'anyOf' keyword",
        ]
    );
    assert_eq!(
        error(&with_input("[input]\nschema = 5")),
        "w.toml:2:10: invalid input schema: 5 is not of types \"boolean\", \"object\""
    );
    assert_eq!(
        error(&with_input("[input]\nschema = { maximum = inf }")),
        "w.toml:2:22: inf has no JSON form"
    );
    // In JSON text, at the text; the pointer says where inside.
    assert_eq!(
        error(&with_input("[input]\nschema = '''{ \"minLength\": -1 }'''")),
        "w.toml:2:10: invalid input schema at /minLength: -1 is less than the minimum of 0"
    );
}

#[test]
fn input_schema_resolves_no_outside_reference() {
    let text = error(&with_input(
        "[input]\nschema = { \"$ref\" = \"https://example.com/order.json\" }",
    ));
    assert!(
        text.starts_with(
            "w.toml:2:10: invalid input schema: Resource 'https://example.com/order.json'"
        ),
        "{text}"
    );
    let text = error(&with_input(
        "[input]\nschema = { \"$ref\" = \"file:///etc/passwd\" }",
    ));
    assert!(
        text.starts_with("w.toml:2:10: invalid input schema: "),
        "{text}"
    );
    // References inside the schema work.
    let plan = plan(&with_input(
        "[input]\nschema = { \"$defs\" = { qty = { type = \"integer\" } }, items = { \"$ref\" = \"#/$defs/qty\" } }",
    ));
    assert!(
        plan.input_schema
            .unwrap()
            .validate(&json!([1, "2"]))
            .is_err()
    );
}

#[test]
fn input_schema_text_that_is_not_json() {
    assert_eq!(
        error(&with_input(
            "[input]\nschema = '''\n{\n  \"type\": \"object\",\n}\n'''"
        )),
        "w.toml:5:1: the input schema is not valid JSON: trailing comma"
    );
    assert_eq!(
        error(&with_input("[input]\nschema = \"object\"")),
        "w.toml:2:11: the input schema is not valid JSON: expected value; a string `schema` is \
         JSON text, like '''{ \"type\": \"object\" }''' (or write the schema as a TOML table)"
    );
    // With escapes the text cannot be located inside the string.
    assert_eq!(
        error(&with_input("[input]\nschema = \"{\\\"type\\\": }\"")),
        "w.toml:2:10: the input schema is not valid JSON: expected value \
         (line 1, column 10 of the JSON text)"
    );
}

#[test]
fn unknown_keys_in_input_and_input_without_schema() {
    assert_eq!(
        errors(&with_input(
            "[input]\nschema = {}\nshcema = 1\ncolor = \"red\""
        )),
        [
            "w.toml:3:1: unknown field `shcema` in [input]; did you mean `schema`?",
            "w.toml:4:1: unknown field `color` in [input] (known fields: schema, description)",
        ]
    );
    assert_eq!(
        error(&with_input("[input]\ndescription = \"anything\"")),
        "w.toml:1:1: [input] has no `schema`: give the JSON Schema a run's input must match, \
         like `schema = { type = \"object\" }`"
    );
    assert_eq!(
        error(&with_input("input = \"{}\"")),
        "w.toml:1:9: `input`: invalid type: string \"{}\", expected an [input] table"
    );
}
