//! Plugins written in Python (componentize-py) and JavaScript (componentize-js),
//! built by `plugins/build.sh`, run by the real binary next to the Rust example
//! plugins: the mixed example workflow, each plugin inside a workflow, bad input
//! per language, and `plugins inspect`.

use std::path::Path;

use serde_json::{Value, json};

use crate::support::*;

/// The polyglot plugin dir, built, with its plugins compiled into the shared
/// code cache once (a Python or JavaScript component takes seconds to
/// compile: not once per test process). `target/plugins-polyglot` is also a
/// default plugin dir, so a test that runs with the defaults warms it first.
pub(crate) fn polyglot() -> &'static str {
    static WARM: std::sync::Once = std::sync::Once::new();
    let dir = polyglot_plugins();
    WARM.call_once(|| {
        let outcome = exec(&["plugins", "list", "--plugin-dir", dir]);
        assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    });
    dir
}

/// `trellis run PATH --json` with the example, fixture and polyglot plugin dirs.
fn run_path(path: &Path, input: Option<&str>) -> (Outcome, Value) {
    let dirs = [EXAMPLE_PLUGINS, FIXTURE_PLUGINS, polyglot()];
    let outcome = run_with_dirs(path, input, &dirs, &["--json"]);
    let record = outcome.json();
    (outcome, record)
}

/// A workflow given as text, run like [`run_path`].
fn run_text(workflow: &str, input: Option<&str>) -> (Outcome, Value) {
    let sandbox = Sandbox::new();
    let path = sandbox.write("workflow.toml", workflow);
    run_path(&path, input)
}

/// Runs `workflow` and asserts that it succeeded.
fn succeed(workflow: &str, input: Option<&str>) -> Value {
    let (outcome, record) = run_text(workflow, input);
    assert_eq!(outcome.code, 0, "{}\n{record:#}", outcome.stderr);
    assert_eq!(record["status"], "succeeded", "{record:#}");
    record
}

/// The messages a step's first attempt logged through `host.log`.
fn logs(record: &Value, id: &str) -> Vec<String> {
    step(record, id)["attempts"][0]["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts the run failed at step `id` with a fatal task error `message`,
/// tried once although the workflow allows retries.
#[track_caller]
fn assert_fails_at(outcome: &Outcome, record: &Value, id: &str, message: &str) {
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert_eq!(record["status"], "failed");
    assert_eq!(record["error"]["step"], id, "{record:#}");
    assert_eq!(record["error"]["kind"], "task_error", "{record:#}");
    let failed = step(record, id);
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["message"], message, "{failed:#}");
    assert_eq!(failed["error"]["retryable"], false);
    assert_eq!(
        failed["attempts"].as_array().unwrap().len(),
        1,
        "a fatal error is not retried"
    );
    assert!(
        outcome.stderr.contains(&format!("step `{id}` failed")),
        "{}",
        outcome.stderr
    );
}

#[test]
fn new_hires_runs_python_javascript_and_rust_steps_to_the_documented_output() {
    let path = workspace().join("workflows").join("new-hires.toml");
    let (outcome, record) = run_path(&path, None);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    for id in [
        "source",
        "parse",
        "clean",
        "logins",
        "order_by",
        "lead_time",
        "notice",
        "accounts",
        "check",
        "batch",
        "ticket",
    ] {
        assert_eq!(step(&record, id)["status"], "succeeded", "{id}");
    }
    assert_eq!(step(&record, "order_by")["items"], 3);
    assert_eq!(step(&record, "lead_time")["items"], 3);
    assert_eq!(step(&record, "parse")["plugin"], "csv-parse");
    assert_eq!(step(&record, "logins")["plugin"], "slugify");
    // Python's and JavaScript's host.log lines land in the step log.
    assert_eq!(
        logs(&record, "parse"),
        ["read 5 record(s) with 6 column(s)"]
    );
    assert_eq!(
        logs(&record, "clean"),
        [
            r#"record 2 rejected: email: not an email address: "alan.turing@example""#,
            r#"record 4 repeats record 0 (email "ada.lovelace@example.com")"#,
            "3 record(s) kept, 1 rejected, 1 duplicate(s)",
        ]
    );
    assert_eq!(
        step(&record, "lead_time")["attempts"][0]["logs"][0]["level"],
        "info"
    );
    // workflows/EXPECTED.md, "new-hires".
    assert_eq!(
        record["output"],
        json!({
            "batch": "da9a7c532000",
            "accounts": [
                { "login": "ada.lovelace", "name": "Ada Lovelace", "email": "ada.lovelace@example.com",
                  "phone": "+442079460958", "team": "Analytics", "start_date": "2025-03-07",
                  "order_laptop_by": "2025-02-28", "notice_days": 4, "urgent": true },
                { "login": "grace.hopper.2", "name": "Grace Hopper", "email": "grace.hopper@example.com",
                  "phone": "+15550100999", "team": "Compilers", "start_date": "2025-03-17",
                  "order_laptop_by": null, "notice_days": 10, "urgent": false },
                { "login": "jose.nunez.garcia", "name": "José Núñez-García", "email": "jose.nunez@example.com",
                  "phone": "+442079460000", "team": "Analytics", "start_date": "2025-04-22",
                  "order_laptop_by": "2025-04-11", "notice_days": 34, "urgent": false }
            ],
            "rejected": [
                { "index": 2, "field": "email", "reason": "not an email address: \"alan.turing@example\"" }
            ],
            "duplicates": [{ "index": 4, "of": 0, "value": "ada.lovelace@example.com" }],
            "notice": { "count": 3, "sum": 48, "min": 4, "max": 34, "mean": 16, "median": 10 },
            "ticket": "New hires batch da9a7c532000: 3 account(s) to create.\n- ada.lovelace <ada.lovelace@example.com>, Analytics, starts 2025-03-07, order a laptop by 2025-02-28 (URGENT: 4 business days' notice)\n- grace.hopper.2 <grace.hopper@example.com>, Compilers, starts 2025-03-17\n- jose.nunez.garcia <jose.nunez@example.com>, Analytics, starts 2025-04-22, order a laptop by 2025-04-11\nNot imported:\n- row 3: email: not an email address: \"alan.turing@example\"\n- row 5: repeats row 1\nNotice: 4 to 34 business days, median 10."
        })
    );
}

#[test]
fn new_hires_on_a_given_csv() {
    let path = workspace().join("workflows").join("new-hires.toml");
    let input = json!({
        "csv": "Full name,E-mail,Phone,Team,Start date,Laptop\nkatherine johnson,KJ@Example.org,+1 757 555 0101,Trajectories,02.06.2025,yes\n",
        "as_of": "2025-05-26",
        "existing_logins": []
    })
    .to_string();
    let (outcome, record) = run_path(&path, Some(&input));
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(
        record["output"],
        json!({
            "batch": "59b878ffe241",
            "accounts": [
                { "login": "katherine.johnson", "name": "Katherine Johnson", "email": "kj@example.org",
                  "phone": "+17575550101", "team": "Trajectories", "start_date": "2025-06-02",
                  "order_laptop_by": "2025-05-26", "notice_days": 5, "urgent": false }
            ],
            "rejected": [],
            "duplicates": [],
            "notice": { "count": 1, "sum": 5, "min": 5, "max": 5, "mean": 5, "median": 5 },
            "ticket": "New hires batch 59b878ffe241: 1 account(s) to create.\n- katherine.johnson <kj@example.org>, Trajectories, starts 2025-06-02, order a laptop by 2025-05-26\nNot imported: none\nNotice: 5 to 5 business days, median 5."
        })
    );
}

/// Python `csv-parse` between Rust steps: a semicolon export, its amounts summed
/// by `aggregate` and its rows filtered by `json-transform`.
#[test]
fn csv_parse_feeds_rust_steps() {
    let record = succeed(
        r#"
[[step]]
id = "parse"
plugin = "csv-parse"
input = { text = "{{ input.csv }}", delimiter = ";" }

[[step]]
id = "totals"
plugin = "aggregate"
input = { values = "{{ steps.parse.output.records | map(attribute='amount') | list }}" }

[[step]]
id = "open"
plugin = "json-transform"
input = { filter = "map(select(.paid | not) | .invoice)", data = "{{ steps.parse.output.records }}" }

[output]
columns = "{{ steps.parse.output.columns }}"
records = "{{ steps.parse.output.records }}"
totals = "{{ steps.totals.output }}"
open = "{{ steps.open.output }}"
"#,
        Some(
            &json!({ "csv": "invoice ; amount;paid;zip\nINV-1;120.5;TRUE;01234\n\n\"INV-2; late\";80;false;\nINV-3;0.25;False;99999\n" })
                .to_string(),
        ),
    );
    assert_eq!(
        record["output"],
        json!({
            "columns": ["invoice", "amount", "paid", "zip"],
            "records": [
                { "invoice": "INV-1", "amount": 120.5, "paid": true, "zip": "01234" },
                { "invoice": "INV-2; late", "amount": 80, "paid": false, "zip": null },
                { "invoice": "INV-3", "amount": 0.25, "paid": false, "zip": 99999 }
            ],
            "totals": { "count": 3, "sum": 200.75, "min": 0.25, "max": 120.5, "mean": 66.91666666666667, "median": 80 },
            "open": ["INV-2; late", "INV-3"]
        })
    );
    assert_eq!(
        logs(&record, "parse"),
        ["read 3 record(s) with 4 column(s)"]
    );
}

/// Python `normalize-records` reads its country code from the step's config
/// (host.config); Rust `json-schema` then checks the cleaned records.
#[test]
fn normalize_records_uses_step_config_and_feeds_json_schema() {
    let record = succeed(
        r#"
[[step]]
id = "clean"
plugin = "normalize-records"
config = { country_code = "+49" }

[step.input]
records = "{{ input.people }}"
fields = { name = "name", email = "email", phone = "phone", joined = "date", active = "bool", salary = "number" }
required = ["email"]
unique = "email"
date_formats = ["%d.%m.%Y"]
keep_other = false

[[step]]
id = "check"
plugin = "json-schema"
input = { data = "{{ steps.clean.output.records }}", mode = "report", schema = { type = "array", items = { type = "object", required = ["name", "email", "phone"], properties = { email = { format = "email" }, phone = { type = "string", pattern = "^\\+[0-9]+$" } } } } }
"#,
        Some(
            &json!({ "people": [
                { "name": "  LUDWIG VAN BEETHOVEN", "email": "LvB@Example.DE ", "phone": "030 1234 5678", "joined": "17.12.2024", "active": "Yes", "salary": "1,234.50", "notes": "dropped" },
                { "name": "o'neil-smith", "email": "bad@", "phone": "+1 555 0100" },
                { "name": "Clara McDonald", "email": "lvb@example.de", "phone": "0049 89 123456" },
                { "name": "Clara Schumann", "email": "clara@example.de", "phone": "0049 (89) 654-321", "active": "off", "salary": 950 }
            ] })
            .to_string(),
        ),
    );
    let clean = &step(&record, "clean")["output"];
    assert_eq!(
        clean,
        &json!({
            "records": [
                { "name": "Ludwig van Beethoven", "email": "lvb@example.de", "phone": "+493012345678",
                  "joined": "2024-12-17", "active": true, "salary": 1234.5 },
                { "name": "Clara Schumann", "email": "clara@example.de", "phone": "+4989654321",
                  "joined": null, "active": false, "salary": 950 }
            ],
            "count": 2,
            "rejected": [{ "index": 1, "field": "email", "reason": "not an email address: \"bad@\"" }],
            "duplicates": [{ "index": 2, "of": 0, "value": "lvb@example.de" }]
        })
    );
    assert_eq!(
        step(&record, "check")["output"],
        json!({ "valid": true, "errors": [] })
    );
    let lines = logs(&record, "clean");
    assert_eq!(
        lines.last().unwrap(),
        "2 record(s) kept, 1 rejected, 1 duplicate(s)"
    );
    assert_eq!(
        step(&record, "clean")["attempts"][0]["logs"][0]["level"],
        "warn"
    );
}

/// JavaScript `slugify` between Rust steps: unique logins, then a Rust
/// `template` and `hash` over them.
#[test]
fn slugify_feeds_template_and_hash() {
    let record = succeed(
        r#"
[[step]]
id = "slugs"
plugin = "slugify"
input = { texts = "{{ input.names }}", separator = ".", unique = true, taken = ["ada.lovelace"] }

[[step]]
id = "title"
plugin = "slugify"
input = { text = "Crème Brûlée: 10 Recipes for Ærøskøbing & Łódź!", max_length = 30 }

[[step]]
id = "mail"
plugin = "template"
input = { template = "{% raw %}{% for l in logins %}{{ l }}@example.com{% if not loop.last %}, {% endif %}{% endfor %}{% endraw %}", vars = { logins = "{{ steps.slugs.output.slugs }}" } }

[[step]]
id = "digest"
plugin = "hash"
input = { data = "{{ steps.title.output.slug }}" }

[output]
slugs = "{{ steps.slugs.output.slugs }}"
title = "{{ steps.title.output.slug }}"
mail = "{{ steps.mail.output.text }}"
bytes = "{{ steps.digest.output.bytes }}"
"#,
        Some(
            r#"{"names": ["Ada Lovelace", "Grace O'Neil-Hopper", "ADA LOVELACE", "Straße", "Åsa Øberg"]}"#,
        ),
    );
    assert_eq!(
        record["output"],
        json!({
            "slugs": ["ada.lovelace.2", "grace.oneil.hopper", "ada.lovelace.3", "strasse", "asa.oberg"],
            "title": "creme-brulee-10-recipes-for",
            "mail": "ada.lovelace.2@example.com, grace.oneil.hopper@example.com, ada.lovelace.3@example.com, strasse@example.com, asa.oberg@example.com",
            "bytes": 27
        })
    );
}

/// JavaScript `date-math` fanned out by `for_each` over dates that a Rust step
/// picked; its log lines reach the step log.
#[test]
fn date_math_fans_out_after_a_rust_step() {
    let record = succeed(
        r#"
[[step]]
id = "due"
plugin = "json-transform"
input = { filter = "map(select(.status == \"open\") | .opened)", data = "{{ input.tickets }}" }

[[step]]
id = "sla"
plugin = "date-math"
for_each = "{{ steps.due.output }}"
input = { date = "{{ item }}", business_days = 3, holidays = ["2025-12-25", "2025-12-26"], until = "2025-12-31" }

[[step]]
id = "quarter_end"
plugin = "date-math"
input = { date = "2025-01-31", add = "P1M", weekend = ["fri", "sat"] }
"#,
        Some(
            r#"{"tickets": [
                {"opened": "2025-12-22", "status": "open"},
                {"opened": "2025-12-19", "status": "closed"},
                {"opened": "2025-12-27", "status": "open"}]}"#,
        ),
    );
    assert_eq!(step(&record, "sla")["items"], 2);
    assert_eq!(
        step(&record, "sla")["output"],
        json!([
            { "date": "2025-12-29", "weekday": "Monday", "iso_week": "2026-W01", "quarter": 4,
              "business_day": true, "days_until": 2, "business_days_until": 2 },
            { "date": "2025-12-31", "weekday": "Wednesday", "iso_week": "2026-W01", "quarter": 4,
              "business_day": true, "days_until": 0, "business_days_until": 0 }
        ])
    );
    assert_eq!(
        step(&record, "quarter_end")["output"],
        json!({ "date": "2025-02-28", "weekday": "Friday", "iso_week": "2025-W09", "quarter": 1,
                "business_day": false })
    );
    assert_eq!(
        logs(&record, "quarter_end"),
        ["2025-01-31 + P1M = 2025-02-28 (Friday)"]
    );
}

#[test]
fn bad_input_to_a_python_plugin_fails_its_step_naming_the_field() {
    let workflow = r#"
[retry]
max_attempts = 3
initial = "10ms"

[[step]]
id = "first"
plugin = "hash"
input = { data = "{{ input.csv }}" }

[[step]]
id = "parse"
plugin = "csv-parse"
needs = ["first"]
input = { text = "{{ input.csv }}" }
"#;
    let (outcome, record) = run_text(workflow, Some(r#"{"csv": "a,b\n1,2\n\n3,4,5\n"}"#));
    assert_fails_at(
        &outcome,
        &record,
        "parse",
        "invalid input: field `text`: line 4 has 3 fields, the header has 2 (set `ragged` to pad or cut rows)",
    );
    assert_eq!(step(&record, "first")["status"], "succeeded");

    // A wrong type, and a bad value from the step's config.
    let (outcome, record) = run_text(workflow, Some(r#"{"csv": 42}"#));
    assert_fails_at(
        &outcome,
        &record,
        "parse",
        "invalid input: field `text`: expected a string, got a number",
    );
    let (outcome, record) = run_text(
        r#"
[[step]]
id = "clean"
plugin = "normalize-records"
config = { country_code = "49" }
input = { records = [{ phone = "030 123456" }], fields = { phone = "phone" } }
"#,
        None,
    );
    assert_fails_at(
        &outcome,
        &record,
        "clean",
        "invalid step config `country_code`: expected + and 1 to 3 digits, got \"49\"",
    );
}

#[test]
fn bad_input_to_a_javascript_plugin_fails_its_step_naming_the_field() {
    let workflow = r#"
[retry]
max_attempts = 3
initial = "10ms"

[[step]]
id = "first"
plugin = "json-transform"
input = { filter = ".", data = "{{ input }}" }

[[step]]
id = "deadline"
plugin = "date-math"
input = "{{ steps.first.output }}"
"#;
    let (outcome, record) = run_text(
        workflow,
        Some(r#"{"date": "2025-01-31", "holidays": ["2025-02-03", "2025-02-30"]}"#),
    );
    assert_fails_at(
        &outcome,
        &record,
        "deadline",
        "invalid input: field `holidays[1]`: no such date \"2025-02-30\"",
    );
    let (outcome, record) = run_text(workflow, Some(r#"{"date": "2025-01-31", "add": "P1H"}"#));
    assert_fails_at(
        &outcome,
        &record,
        "deadline",
        "invalid input: field `add`: expected an ISO 8601 duration of whole days such as \"P1M\", \"P2W3D\" or \"-P10D\", got \"P1H\"",
    );
    let (outcome, record) = run_text(
        r#"
[[step]]
id = "slug"
plugin = "slugify"
input = { texts = ["Ada", "!!!"] }
"#,
        None,
    );
    assert_fails_at(
        &outcome,
        &record,
        "slug",
        "invalid input: field `texts[1]`: no letters or digits in \"!!!\"",
    );
}

#[test]
fn plugins_inspect_shows_a_python_and_a_javascript_plugin() {
    let dir = polyglot();
    for (file, name, required, output_required) in [
        (
            "csv-parse.wasm",
            "csv-parse",
            json!(["text"]),
            json!(["columns", "records", "count"]),
        ),
        (
            "date-math.wasm",
            "date-math",
            json!(["date"]),
            json!(["date", "weekday", "iso_week", "quarter", "business_day"]),
        ),
    ] {
        let path = format!("{dir}/{file}");
        let outcome = exec(&["plugins", "inspect", &path]);
        assert_eq!(outcome.code, 0, "{}", outcome.stderr);
        let info = outcome.json();
        assert_eq!(info["name"], name);
        assert_eq!(info["version"], "1.0.0");
        assert!(!info["description"].as_str().unwrap().is_empty());
        assert_eq!(info["input_schema"]["type"], "object");
        assert_eq!(info["input_schema"]["required"], required);
        assert_eq!(info["input_schema"]["additionalProperties"], false);
        assert_eq!(info["output_schema"]["required"], output_required);
        let imports: Vec<&str> = info["imports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap())
            .collect();
        assert!(
            imports.contains(&"trellis:plugin/host@0.1.0"),
            "{imports:?}"
        );
        // JavaScript plugins are built without fetch(): no wasi:http import.
        assert!(
            !imports.iter().any(|i| i.starts_with("wasi:http/")),
            "{imports:?}"
        );
    }

    // `plugins list` shows all four with their versions.
    let outcome = exec(&["plugins", "list", "--plugin-dir", dir]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    for name in ["csv-parse", "normalize-records", "slugify", "date-math"] {
        assert!(
            outcome
                .stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name) && l.contains("1.0.0")),
            "{name} missing:\n{}",
            outcome.stdout
        );
    }
}
