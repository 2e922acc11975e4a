//! `json-transform`: run a jq filter (the [jaq] dialect) over JSON.
//!
//! Input:
//! ```json
//! { "filter": ".items | map(.price * .qty) | add", "data": { "items": [{ "price": 2.5, "qty": 2 }] }, "all": false }
//! ```
//! - `filter` (string, required): a jq program; jaq's core and standard library are
//!   available (`map`, `select`, `group_by`, `ascii_downcase`, `split`, `test`, `gsub`,
//!   `tojson`, `round`, ...).
//! - `data` (any JSON, default `null`): the filter's input `.`.
//! - `all` (bool, default `false`): return the list of all results.
//!
//! Output: the filter's single result (`null` when it yields none), or with
//! `"all": true` the list of all its results in order. Numbers come out as jq prints
//! them: a whole number has no fraction (`35.5 * 2` gives `71`), NaN and infinities are
//! `null`. Above: `5`.
//!
//! Errors (all fatal: the same filter over the same data fails the same way):
//! - the filter does not parse or names an unknown filter or variable: jaq's message
//!   and the column, e.g. ``filter: undefined filter `mapp` at column 6``;
//! - the filter fails at run time (`error("x")`, `"a" - 1`, `halt_error`): `filter
//!   failed: <jaq's message>`; `halt` (exit code 0) just ends the output;
//! - without `all`, the filter yields more than one result (wrap it in `[...]`);
//! - a field of the wrong type: ``invalid input: field `filter`: invalid type: ...``.
//!
//! [jaq]: https://github.com/01mf02/jaq

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::Val;
use serde::Deserialize;
use serde_json::Value;
use trellis_sdk::{StepContext, TaskError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    filter: String,
    #[serde(default)]
    data: Val,
    #[serde(default)]
    all: bool,
}

#[trellis_sdk::task(
    input_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["filter"],
  "additionalProperties": false,
  "properties": {
    "filter": { "type": "string", "description": "jq program (jaq dialect)", "examples": [".items | map(.price) | add"] },
    "data": { "description": "the filter's input; default null" },
    "all": { "type": "boolean", "default": false, "description": "return the list of all results instead of the single result" }
  }
}"#,
    output_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "description": "the filter's single result (null if none), or with all=true the array of all results"
}"#
)]
fn run(_ctx: &StepContext, input: Value) -> Result<Value, TaskError> {
    let input: Input = trellis_sdk::parse_input(input)?;
    let filter_text = input.filter.as_str();
    let program = File {
        code: filter_text,
        path: (),
    };
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs()
        .chain(jaq_std::funs())
        .chain(jaq_json::funs());

    let arena = Arena::default();
    let modules = Loader::new(defs)
        .load(&arena, program)
        .map_err(|errs| compile_error(filter_text, load_messages(filter_text, errs)))?;
    let filter = Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|errs| {
            let messages = errs
                .into_iter()
                .flat_map(|(_file, undefined)| undefined)
                .map(|(name, kind)| {
                    let column = column(filter_text, name);
                    format!("undefined {} `{name}` at column {column}", kind.as_str())
                })
                .collect();
            compile_error(filter_text, messages)
        })?;

    let ctx = Ctx::<data::JustLut<Val>>::new(&filter.lut, Vars::new([]));
    let mut results = Vec::new();
    for result in filter.id.run((ctx, input.data)) {
        match result {
            Ok(val) => results.push(to_json(val)),
            Err(exn) => match exn.get_err() {
                Ok(err) => {
                    let message = match err.into_val() {
                        Val::TStr(text) => String::from_utf8_lossy(&text).into_owned(),
                        other => other.to_string(),
                    };
                    return Err(TaskError::fatal(format!("filter failed: {message}")));
                }
                // `halt` ends the program like jq's exit: 0 keeps what was output so far.
                Err(exn) => match exn.get_halt() {
                    Ok(0) => break,
                    Ok(code) => {
                        return Err(TaskError::fatal(format!(
                            "filter halted with exit code {code}"
                        )));
                    }
                    Err(_) => return Err(TaskError::fatal("filter failed")),
                },
            },
        }
        if !input.all && results.len() > 1 {
            return Err(TaskError::fatal(
                "filter yielded more than one result: wrap it in [...] or set \"all\": true",
            ));
        }
    }
    if input.all {
        return Ok(Value::Array(results));
    }
    Ok(results.pop().unwrap_or(Value::Null))
}

fn compile_error(filter: &str, messages: Vec<String>) -> TaskError {
    TaskError::fatal(format!("filter: {}", messages.join("; ")))
        .with_details(serde_json::json!({ "filter": filter, "errors": messages }))
}

/// jaq's lex and parse errors as sentences with a column.
fn load_messages(code: &str, errs: jaq_core::load::Errors<&str, ()>) -> Vec<String> {
    use jaq_core::load::Error;
    let mut messages = Vec::new();
    for (_file, err) in errs {
        match err {
            Error::Io(errs) => {
                messages.extend(errs.into_iter().map(|(path, e)| format!("{path}: {e}")))
            }
            Error::Lex(errs) => messages.extend(errs.into_iter().map(|(expected, found)| {
                format!(
                    "expected {} at column {}",
                    expected.as_str(),
                    column(code, found)
                )
            })),
            Error::Parse(errs) => messages.extend(errs.into_iter().map(|(expected, found)| {
                let at = column(code, found);
                let found = if found.is_empty() {
                    "end of filter".to_string()
                } else {
                    format!("`{found}`")
                };
                format!(
                    "expected {} at column {at}, found {found}",
                    expected.as_str()
                )
            })),
        }
    }
    messages
}

/// 1-based column (in characters) of `part`, a slice of `whole`; the end if it is not one.
fn column(whole: &str, part: &str) -> usize {
    let start = part.as_ptr() as usize;
    let base = whole.as_ptr() as usize;
    let offset = if start >= base && start <= base + whole.len() {
        start - base
    } else {
        whole.len()
    };
    whole[..offset].chars().count() + 1
}

/// jaq values are a superset of JSON: byte strings become text, non-string keys their
/// JSON text, and numbers JSON cannot hold (NaN, infinities) `null`, as jq prints them.
fn to_json(val: Val) -> Value {
    match val {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(b),
        Val::Num(n) => match serde_json::from_str(&n.to_string()) {
            Ok(Value::Number(n)) => whole_as_integer(n),
            _ => Value::Null,
        },
        Val::TStr(bytes) | Val::BStr(bytes) => {
            Value::String(String::from_utf8_lossy(&bytes).into_owned())
        }
        Val::Arr(items) => Value::Array(items.iter().cloned().map(to_json).collect()),
        Val::Obj(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let key = match key {
                        Val::TStr(bytes) | Val::BStr(bytes) => {
                            String::from_utf8_lossy(bytes).into_owned()
                        }
                        other => other.to_string(),
                    };
                    (key, to_json(value.clone()))
                })
                .collect(),
        ),
    }
}

/// jq prints a computed whole number without a fraction (`35.5 * 2` is `71`); jaq keeps
/// floats apart (`71.0`). Answer like jq, so templates downstream show `71`.
fn whole_as_integer(n: serde_json::Number) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: every integer below is an f64
    match n.as_f64() {
        Some(x) if n.is_f64() && x.fract() == 0.0 && x.abs() < EXACT => Value::from(x as i64),
        _ => Value::Number(n),
    }
}
