//! The run-input path: any bytes as the body of `POST
//! /v1/workflows/{name}/runs` (or `trellis run --input`), against the example
//! workflows and one with an `[input]` schema. The body is parsed as the API
//! parses it, checked against the workflow's schema, and on success every
//! template of the workflow is rendered with it, in the executor's order (see
//! `trellis_fuzz::dry_run`).

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use trellis::workflow::Plan;

/// A workflow whose templates and schema look into the input in many ways.
const SCHEMA_WORKFLOW: &str = r##"
name = "fuzz-input"

[input]
description = "an order"
schema = { type = "object", properties = { items = { type = "array", maxItems = 64, items = { type = "object", properties = { qty = { type = "integer", minimum = 0 }, sku = { type = "string", pattern = "^[A-Z]+-[0-9]+$" } } } }, note = { type = "string", maxLength = 200 }, threshold = { type = "number" }, tags = { type = "array", uniqueItems = true }, email = { type = "string", format = "email" } } }

[[step]]
id = "each"
plugin = "noop"
if = "{{ input.items | default([]) | length > 0 }}"
for_each = "{{ input.items | default([]) }}"
input = { sku = "{{ item.sku | default('?') | lower }}", qty = "{{ item.qty | default(0) * 2 }}", index = "{{ index }}", line = "#{{ index }}: {{ item }}" }

[[step]]
id = "sum"
plugin = "noop"
input = { total = "{{ steps.each.output | map(attribute='qty') | sum }}", note = "{{ input.note | default('') | title | replace('a', 'b') }}", tags = "{{ input.tags | default([]) | sort | join(',') }}" }
config = { threshold = "{{ input.threshold | default(100) }}" }

[[step]]
id = "big"
plugin = "noop"
if = "{{ steps.sum.output.total > (input.threshold | default(100)) }}"
input = "{{ input | tojson }}"

[output]
total = "{{ steps.sum.output.total }}"
big = "{{ steps.big.status }}"
keys = "{{ input | list | sort }}"
echo = "{{ input }}"
text = "{% for key, value in input | items %}{{ key }}={{ value }};{% endfor %}"
"##;

static PLANS: LazyLock<Vec<Plan>> = LazyLock::new(|| {
    [
        SCHEMA_WORKFLOW,
        include_str!("../../workflows/order-pipeline.toml"),
        include_str!("../../workflows/word-stats.toml"),
        include_str!("../../workflows/onboarding.toml"),
        include_str!("../../workflows/new-hires.toml"),
    ]
    .into_iter()
    .map(|source| {
        trellis::workflow::parse_str(source, "fuzz.toml", "fuzz", &trellis_fuzz::Catalog)
            .unwrap_or_else(|diagnostics| panic!("a seed workflow is invalid:\n{diagnostics}"))
    })
    .collect()
});

fuzz_target!(|data: &[u8]| {
    let input: serde_json::Value = match trellis::api::parse_json_body(data) {
        Ok(input) => input,
        Err(error) => {
            // The API answers 400 with the message, line and column.
            let _ = error.to_string();
            return;
        }
    };
    for plan in PLANS.iter() {
        if let Some(schema) = &plan.input_schema
            && let Err(violations) = schema.validate(&input)
        {
            // The API answers 422 with every violation.
            assert!(
                !violations.is_empty(),
                "a refused input without a violation"
            );
            let _ = serde_json::to_string(&violations).expect("violations serialise");
            continue;
        }
        // The run record keeps the input.
        let _ = serde_json::to_string(&input).expect("a JSON value serialises");
        trellis_fuzz::dry_run(plan, &input);
    }
});
