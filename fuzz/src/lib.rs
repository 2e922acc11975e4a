//! What the fuzz targets share: a plugin catalog that needs no plugins, and a
//! dry run of a plan that renders every template the executor would render,
//! in the executor's order, without running a plugin.
//!
//! Nothing here may panic on any input: a panic is what the fuzzer reports.

use serde_json::Value as Json;
use trellis::plugin::PluginRef;
use trellis::workflow::{Plan, PluginCatalog, Scope, TemplateError};

/// Knows every plugin but those whose name starts with `x` (so the "unknown
/// plugin" path is reached too), and every secret but `missing`.
#[derive(Debug)]
pub struct Catalog;

impl PluginCatalog for Catalog {
    fn check(&self, reference: &PluginRef) -> Result<(), String> {
        if reference.name.starts_with('x') {
            Err(format!("no plugin named `{reference}` (loaded: noop)"))
        } else {
            Ok(())
        }
    }

    fn check_secret(&self, name: &str) -> Result<(), String> {
        if name == "missing" {
            Err(format!("no secret named `{name}`"))
        } else {
            Ok(())
        }
    }
}

/// Parses and validates `source` like `trellis validate` and `PUT
/// /v1/workflows/{name}` do, and checks what every diagnostic promises: a
/// message and a 1-based position inside (or just after) the source.
pub fn parse_workflow(source: &str) -> Option<Plan> {
    match trellis::workflow::parse_str(source, "fuzz.toml", "fuzz", &Catalog) {
        Ok(plan) => {
            // Display and Debug walk the whole plan.
            let _ = format!("{plan:?}");
            let _ = plan.sinks();
            Some(plan)
        }
        Err(diagnostics) => {
            assert!(
                !diagnostics.is_empty(),
                "a rejected workflow has no diagnostic"
            );
            let lines = source.lines().count().max(1) + 1;
            for diagnostic in &diagnostics {
                assert!(!diagnostic.message.is_empty(), "an empty diagnostic");
                // The reporter's fallback when validation gave up without
                // saying why: a bug in the validator.
                assert_ne!(
                    diagnostic.message, "the workflow could not be read",
                    "a workflow rejected without a reason"
                );
                assert!(
                    diagnostic.line >= 1 && diagnostic.line <= lines && diagnostic.column >= 1,
                    "a diagnostic outside the source: {diagnostic}"
                );
            }
            let _ = diagnostics.to_string();
            None
        }
    }
}

/// Renders every template of `plan` the way the executor does for a run with
/// `input`, in plan order, as if each step's plugin echoed its input: `if`,
/// then `for_each` (with `item` and `index` per item), `input` and `config` of
/// each instance, and at the end `[output]`. Returns the first template
/// error's message per step (the run would record them) and the output.
pub fn dry_run(plan: &Plan, input: &Json) -> (Vec<String>, Option<Json>) {
    let templates = &plan.templates;
    let mut scope = Scope::new("fuzz-run", &plan.name, input);
    let mut errors = Vec::new();
    for step in &plan.steps {
        let (status, output) = match dry_step(plan, step, &scope) {
            Ok(Some(output)) => ("succeeded", output),
            Ok(None) => ("skipped", Json::Null),
            Err(error) => {
                errors.push(error.to_string());
                ("failed", Json::Null)
            }
        };
        scope.set_step(&step.id, status, &output);
    }
    let output = match &plan.output {
        Some(output) => match templates.render(output, &scope) {
            Ok(value) => Some(value),
            Err(error) => {
                errors.push(error.to_string());
                None
            }
        },
        None => None,
    };
    (errors, output)
}

fn dry_step(
    plan: &Plan,
    step: &trellis::workflow::PlannedStep,
    scope: &Scope,
) -> Result<Option<Json>, TemplateError> {
    let templates = &plan.templates;
    if let Some(condition) = &step.condition
        && !templates.truthy(condition, scope)?
    {
        return Ok(None);
    }
    let instance = |scope: &Scope| -> Result<Json, TemplateError> {
        let input = templates.render(&step.input, scope)?;
        // What the executor hands the plugin.
        let _ = serde_json::to_string(&input).expect("a JSON value serialises");
        for value in step.config.values() {
            templates.render(value, scope)?;
        }
        Ok(input)
    };
    match &step.for_each {
        None => instance(scope).map(Some),
        Some(for_each) => {
            let items = templates.render_list(for_each, scope)?;
            let outputs = items
                .iter()
                .enumerate()
                .map(|(index, item)| instance(&scope.with_item(item, index)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(Json::Array(outputs)))
        }
    }
}

/// `text` as a TOML basic string (JSON's escapes are TOML's, but TOML also
/// wants DEL escaped).
pub fn toml_string(text: &str) -> String {
    Json::String(text.to_owned())
        .to_string()
        .replace('\u{7f}', "\\u007F")
}
