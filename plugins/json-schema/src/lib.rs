//! `json-schema`: validate JSON data against a JSON Schema (crate [jsonschema]).
//!
//! Input:
//! ```json
//! { "schema": { "type": "object", "required": ["id"] }, "data": { "id": 7 }, "mode": "fail", "formats": true }
//! ```
//! - `schema` (object or boolean, required): drafts 4, 6, 7, 2019-09 and 2020-12 (from
//!   `$schema`; default 2020-12). Only local `$ref`s resolve: the sandbox has no network
//!   and no files.
//! - `data` (any JSON, default `null`): the instance to check.
//! - `mode`: `"fail"` (default) or `"report"`.
//! - `formats` (bool, default `true`): check `format` (`email`, `date-time`, `uri`, ...)
//!   rather than treat it as an annotation.
//!
//! Output:
//! - mode `fail`, valid data: `{ "valid": true, "data": <data> }`, so later steps read
//!   `steps.<id>.output.data` knowing it is valid.
//! - mode `report`: `{ "valid": bool, "errors": [{ "path": "/items/0/price", "message": "..." }] }`
//!   (`errors` is empty when valid; `path` is a JSON Pointer into `data`, `""` for the root).
//!
//! Errors (fatal):
//! - mode `fail`, invalid data: `data is invalid: /items/0/price: -1 is less than the
//!   minimum of 0; ...`, with details `[{ "path": "/items/0/price", "message": "..." }]`;
//! - the schema itself is invalid (`schema is invalid: ...`), or `mode` is unknown.
//!
//! [jsonschema]: https://docs.rs/jsonschema

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_sdk::{StepContext, TaskError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    schema: Value,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    mode: Mode,
    #[serde(default = "yes")]
    formats: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Fail,
    Report,
}

#[derive(Serialize)]
struct Problem {
    path: String,
    message: String,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Output {
    Valid { valid: bool, data: Value },
    Report { valid: bool, errors: Vec<Problem> },
}

#[trellis_sdk::task(
    input_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["schema"],
  "additionalProperties": false,
  "properties": {
    "schema": { "type": ["object", "boolean"], "description": "the JSON Schema" },
    "data": { "description": "the instance to validate; default null" },
    "mode": { "enum": ["fail", "report"], "default": "fail" },
    "formats": { "type": "boolean", "default": true, "description": "validate `format` keywords" }
  }
}"#,
    output_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["valid"],
  "properties": {
    "valid": { "type": "boolean" },
    "data": { "description": "mode fail: the validated data" },
    "errors": {
      "type": "array",
      "description": "mode report: every violation",
      "items": {
        "type": "object",
        "required": ["path", "message"],
        "properties": { "path": { "type": "string", "description": "JSON Pointer into data" }, "message": { "type": "string" } }
      }
    }
  }
}"#
)]
fn run(_ctx: &StepContext, input: Value) -> Result<Output, TaskError> {
    let input: Input = trellis_sdk::parse_input(input)?;
    let validator = jsonschema::options()
        .should_validate_formats(input.formats)
        .build(&input.schema)
        .map_err(|err| {
            // A schema that breaks its meta-schema: the location is inside the user's schema.
            let at = err.instance_path().to_string();
            let at = if at.is_empty() {
                String::new()
            } else {
                format!(" at {at}")
            };
            TaskError::fatal(format!("schema is invalid{at}: {err}"))
        })?;
    let problems: Vec<Problem> = validator
        .iter_errors(&input.data)
        .map(|err| Problem {
            path: err.instance_path().to_string(),
            message: err.to_string(),
        })
        .collect();

    match input.mode {
        Mode::Report => Ok(Output::Report {
            valid: problems.is_empty(),
            errors: problems,
        }),
        Mode::Fail if problems.is_empty() => Ok(Output::Valid {
            valid: true,
            data: input.data,
        }),
        Mode::Fail => {
            let listed: Vec<String> = problems
                .iter()
                .map(|p| {
                    format!(
                        "{}: {}",
                        if p.path.is_empty() { "/" } else { &p.path },
                        p.message
                    )
                })
                .collect();
            Err(
                TaskError::fatal(format!("data is invalid: {}", listed.join("; ")))
                    .with_details(problems),
            )
        }
    }
}
