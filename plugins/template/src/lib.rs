//! `template`: render text with [MiniJinja] (the Jinja2 dialect Trellis workflows use).
//!
//! Input, one template:
//! ```json
//! { "template": "Hello {{ name }}!", "vars": { "name": "Ada" } }
//! ```
//! -> `{ "text": "Hello Ada!" }`
//!
//! Several named templates at once (they may `{% include %}`, `{% import %}` and
//! `{% extends %}` each other by name):
//! ```json
//! { "templates": { "subject": "Hi {{ name }}", "body": "{% include 'subject' %}, welcome." }, "vars": { "name": "Ada" } }
//! ```
//! -> `{ "texts": { "body": "Hi Ada, welcome.", "subject": "Hi Ada" } }`
//!
//! With both `template` and `templates`, only `template` is rendered (output `text`) and
//! `templates` are the partials it can include.
//!
//! Rules: `vars` (object, default `{}`) is the render context. Undefined variables are
//! errors (strict undefined), so a typo never renders as an empty string. The text is
//! kept as written, trailing newline included. Templates named `*.html`/`*.xml` are
//! HTML-escaped and `*.json` JSON-escaped (MiniJinja's defaults); others are not. The
//! `tojson` filter and `{% break %}`/`{% continue %}` are available.
//!
//! Errors (fatal): neither `template` nor `templates`; `vars` not an object; a syntax
//! error or an undefined variable, with MiniJinja's message, template name and line
//! (details: `{ "kind", "name", "line", "detail" }`).
//!
//! [MiniJinja]: https://docs.rs/minijinja/2

use std::collections::BTreeMap;

use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use trellis_sdk::{StepContext, TaskError};

/// The name `template` renders under, in error messages.
const MAIN: &str = "template";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    template: Option<String>,
    #[serde(default)]
    templates: BTreeMap<String, String>,
    #[serde(default)]
    vars: Map<String, Value>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Output {
    One { text: String },
    Many { texts: BTreeMap<String, String> },
}

#[trellis_sdk::task(
    input_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "additionalProperties": false,
  "anyOf": [{ "required": ["template"] }, { "required": ["templates"] }],
  "properties": {
    "template": { "type": "string", "description": "MiniJinja template to render", "examples": ["Hello {{ name }}"] },
    "templates": { "type": "object", "additionalProperties": { "type": "string" }, "description": "named templates: all rendered when `template` is absent, else partials for it" },
    "vars": { "type": "object", "default": {}, "description": "render context" }
  }
}"#,
    output_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "oneOf": [
    { "required": ["text"], "properties": { "text": { "type": "string" } }, "additionalProperties": false },
    { "required": ["texts"], "properties": { "texts": { "type": "object", "additionalProperties": { "type": "string" } } }, "additionalProperties": false }
  ]
}"#
)]
fn run(_ctx: &StepContext, input: Value) -> Result<Output, TaskError> {
    let input: Input = trellis_sdk::parse_input(input)?;
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    for (name, source) in &input.templates {
        env.add_template(name, source).map_err(template_error)?;
    }

    if let Some(source) = &input.template {
        if input.templates.contains_key(MAIN) {
            return Err(TaskError::fatal(format!(
                "templates: the name `{MAIN}` is taken by the `template` field"
            )));
        }
        env.add_template(MAIN, source).map_err(template_error)?;
        let text = render(&env, MAIN, &input.vars)?;
        return Ok(Output::One { text });
    }
    if input.templates.is_empty() {
        return Err(TaskError::fatal(
            "missing field `template` (a string) or `templates` (an object of named strings)",
        ));
    }
    let texts = input
        .templates
        .keys()
        .map(|name| Ok((name.clone(), render(&env, name, &input.vars)?)))
        .collect::<Result<_, TaskError>>()?;
    Ok(Output::Many { texts })
}

fn render(
    env: &Environment<'_>,
    name: &str,
    vars: &Map<String, Value>,
) -> Result<String, TaskError> {
    let template = env.get_template(name).map_err(template_error)?;
    template.render(vars).map_err(|err| {
        if err.kind() != ErrorKind::UndefinedError {
            return template_error(err);
        }
        // MiniJinja does not say which name was undefined: list the template's names
        // that `vars` lacks (`user.nmae`), so the fix is obvious.
        let mut missing: Vec<String> = template
            .undeclared_variables(true)
            .into_iter()
            .filter(|path| {
                !defined(vars, path)
                    && env
                        .globals()
                        .all(|(global, _)| global != path.split('.').next().unwrap_or_default())
            })
            .collect();
        missing.sort();
        let mut error = template_error(err);
        if !missing.is_empty() {
            error.message = format!("{}; not in vars: {}", error.message, missing.join(", "));
        }
        error
    })
}

/// Whether the dotted `path` (`user.name`) leads to a value in `vars`.
fn defined(vars: &Map<String, Value>, path: &str) -> bool {
    let mut parts = path.split('.');
    let Some(mut value) = parts.next().and_then(|first| vars.get(first)) else {
        return false;
    };
    for part in parts {
        match value {
            Value::Object(map) => match map.get(part) {
                Some(inner) => value = inner,
                None => return false,
            },
            // Indexing into lists or strings: not a missing variable.
            _ => return true,
        }
    }
    true
}

fn template_error(err: Error) -> TaskError {
    let details = serde_json::json!({
        "kind": format!("{:?}", err.kind()),
        "name": err.name(),
        "line": err.line(),
        "detail": err.detail(),
    });
    TaskError::fatal(err.to_string()).with_details(details)
}
