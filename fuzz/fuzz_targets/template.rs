//! Template evaluation: one MiniJinja template, placed in one of the fields
//! that hold templates (`input`, `config`, `if`, `for_each`, `[output]`),
//! compiled by the validator and rendered against a run input and an earlier
//! step's output, as the executor renders it.
//!
//! Input format (so seeds are readable): the first byte picks the field; the
//! rest is UTF-8 text `TEMPLATE`, optionally followed by `\n---\n` and the run
//! input as JSON and by another `\n---\n` and the earlier step's output as
//! JSON (text that is not JSON is taken as a JSON string).

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value as Json;
use trellis_fuzz::toml_string;

fuzz_target!(|data: &[u8]| {
    let Some((&field, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let mut parts = text.splitn(3, "\n---\n");
    let template = parts.next().unwrap_or_default();
    let input = json(parts.next().unwrap_or("{}"));
    let earlier = json(parts.next().unwrap_or("null"));

    let t = toml_string(template);
    let step = match field % 5 {
        0 => format!("input = {t}"),
        1 => format!("input = \"x\"\nconfig = {{ key = {t} }}"),
        2 => format!("input = \"x\"\nif = {t}"),
        3 => format!("input = \"{{{{ item }}}}\"\nfor_each = {t}"),
        _ => format!("input = \"x\"\n[output]\nvalue = {t}"),
    };
    let source = format!(
        "[[step]]\nid = \"earlier\"\nplugin = \"noop\"\n\n[[step]]\nid = \"t\"\nplugin = \"noop\"\nneeds = [\"earlier\"]\n{step}\n"
    );
    let Some(plan) = trellis_fuzz::parse_workflow(&source) else {
        return;
    };
    let mut scope = trellis::workflow::Scope::new("fuzz-run", &plan.name, &input);
    scope.set_step("earlier", "succeeded", &earlier);
    let Some(step) = plan.step("t") else { return };
    let templates = &plan.templates;
    let _ = templates
        .render(&step.input, &scope)
        .map_err(|e| e.to_string());
    for value in step.config.values() {
        let _ = templates.render(value, &scope).map_err(|e| e.to_string());
    }
    if let Some(condition) = &step.condition {
        let _ = templates
            .truthy(condition, &scope)
            .map_err(|e| e.to_string());
    }
    if let Some(for_each) = &step.for_each
        && let Ok(items) = templates.render_list(for_each, &scope)
    {
        for (index, item) in items.iter().enumerate().take(64) {
            let scope = scope.with_item(item, index);
            let _ = templates
                .render(&step.input, &scope)
                .map_err(|e| e.to_string());
        }
    }
    if let Some(output) = &plan.output {
        let _ = templates.render(output, &scope).map_err(|e| e.to_string());
    }
});

fn json(text: &str) -> Json {
    serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.to_owned()))
}
