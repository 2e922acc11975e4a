//! Golden tests: every `tests/ui/NAME.toml` is validated against the test
//! catalog; diagnostics must equal `NAME.err`, a plan's summary `NAME.plan`.
//! `BLESS=1 cargo test -p trellis --lib workflow::ui_tests` rewrites them.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::tests::CATALOG;
use super::{Plan, TemplateValue, parse_str};

const UI_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ui");

#[test]
fn ui() {
    let bless = std::env::var_os("BLESS").is_some_and(|v| v == "1");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(UI_DIR)
        .expect("tests/ui exists")
        .map(|entry| entry.expect("readable dir").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no cases in {UI_DIR}");

    let mut failures = Vec::new();
    for case in &cases {
        if let Err(failure) = check(case, bless) {
            failures.push(failure);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} ui cases failed (BLESS=1 rewrites the expected files):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

fn check(case: &Path, bless: bool) -> Result<(), String> {
    let stem = case.file_stem().unwrap().to_string_lossy().into_owned();
    let source = std::fs::read_to_string(case).map_err(|e| format!("{stem}: {e}"))?;
    let display = format!("tests/ui/{stem}.toml");
    let (actual, extension, other) = match parse_str(&source, &display, &stem, &CATALOG) {
        Ok(plan) => (summary(&plan), "plan", "err"),
        Err(diagnostics) => (format!("{diagnostics}\n"), "err", "plan"),
    };
    let expected_path = case.with_extension(extension);
    let other_path = case.with_extension(other);
    if bless {
        std::fs::write(&expected_path, &actual).map_err(|e| format!("{stem}: {e}"))?;
        if other_path.exists() {
            std::fs::remove_file(&other_path).map_err(|e| format!("{stem}: {e}"))?;
        }
        return Ok(());
    }
    if other_path.exists() {
        return Err(format!(
            "{stem}: expected {other_path:?}, but got a .{extension}:\n{actual}"
        ));
    }
    let expected = std::fs::read_to_string(&expected_path)
        .map_err(|_| format!("{stem}: no {expected_path:?}; got:\n{actual}"))?;
    if expected != actual {
        return Err(format!(
            "{stem}: .{extension} differs\n--- expected\n{expected}--- actual\n{actual}"
        ));
    }
    Ok(())
}

/// A short, stable description of a plan.
fn summary(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "name: {}", plan.name);
    if let Some(description) = &plan.description {
        let _ = writeln!(out, "description: {description}");
    }
    if let Some(schema) = &plan.input_schema {
        let _ = writeln!(out, "input schema: {}", schema.schema());
        if let Some(description) = schema.description() {
            let _ = writeln!(out, "input description: {description}");
        }
    }
    for (index, step) in plan.steps.iter().enumerate() {
        let needs: Vec<&str> = step
            .needs
            .iter()
            .map(|&i| plan.steps[i].id.as_str())
            .collect();
        let _ = write!(out, "step {index} {} = {}", step.id, step.plugin);
        if !needs.is_empty() {
            let _ = write!(out, " needs [{}]", needs.join(", "));
        }
        out.push('\n');
        let _ = writeln!(out, "  input: {}", kinds(&step.input));
        for (key, value) in &step.config {
            let _ = writeln!(out, "  config.{key}: {}", kinds(value));
        }
        if let Some(condition) = &step.condition {
            let _ = writeln!(out, "  if: {}", kinds(condition));
        }
        if let Some(for_each) = &step.for_each {
            let _ = writeln!(out, "  for_each: {}", kinds(for_each));
        }
        let limits = step.limits;
        let mut parts = Vec::new();
        if let Some(fuel) = limits.fuel {
            parts.push(format!("fuel={fuel}"));
        }
        if let Some(memory) = limits.memory {
            parts.push(format!("memory={memory}"));
        }
        if let Some(timeout) = limits.timeout {
            parts.push(format!("timeout={}", humantime::format_duration(timeout)));
        }
        if let Some(max_output) = limits.max_output {
            parts.push(format!("max_output={max_output}"));
        }
        if let Some(max_log) = limits.max_log {
            parts.push(format!("max_log={max_log}"));
        }
        if let Some(requests) = limits.http_requests {
            parts.push(format!("http_requests={requests}"));
        }
        if let Some(size) = limits.http_request_body {
            parts.push(format!("http_request_body={size}"));
        }
        if let Some(size) = limits.http_response_body {
            parts.push(format!("http_response_body={size}"));
        }
        if !parts.is_empty() {
            let _ = writeln!(out, "  limits: {}", parts.join(" "));
        }
        let retry = step.retry;
        let _ = writeln!(
            out,
            "  retry: {} attempt(s), {:?} {}..{}",
            retry.max_attempts,
            retry.backoff,
            humantime::format_duration(retry.initial),
            humantime::format_duration(retry.max)
        );
        let _ = writeln!(out, "  on_failure: {:?}", step.on_failure);
        if !step.allow_hosts.is_empty() {
            let _ = writeln!(
                out,
                "  allow_hosts: {}",
                step.allow_hosts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if !step.secrets.is_empty() {
            let _ = writeln!(out, "  secrets: {}", step.secrets.join(", "));
        }
    }
    match &plan.output {
        Some(output) => {
            let _ = writeln!(out, "output: {}", kinds(output));
        }
        None => {
            let sinks: Vec<&str> = plan
                .sinks()
                .iter()
                .map(|&i| plan.steps[i].id.as_str())
                .collect();
            let _ = writeln!(out, "output: sinks [{}]", sinks.join(", "));
        }
    }
    out
}

/// The value as written, with each template marked `expr` (JSON value) or
/// `text` (renders to a string).
fn kinds(value: &TemplateValue) -> String {
    match value {
        TemplateValue::Literal(json) => json.to_string(),
        TemplateValue::Expression(template) => format!("expr{:?}", template.source()),
        TemplateValue::Text(template) => format!("text{:?}", template.source()),
        TemplateValue::Array(items) => {
            let items: Vec<String> = items.iter().map(kinds).collect();
            format!("[{}]", items.join(", "))
        }
        TemplateValue::Object(entries) => {
            let entries: Vec<String> = entries
                .iter()
                .map(|(key, value)| format!("{key}: {}", kinds(value)))
                .collect();
            format!("{{{}}}", entries.join(", "))
        }
    }
}
