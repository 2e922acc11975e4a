//! The workflow file as written: serde types for the TOML, nothing resolved yet.
//!
//! Every table denies unknown fields. Fields are optional here even when the
//! workflow requires them (`id`, `plugin`): the validation pass reports a missing
//! one with a better message and location than serde could. Values that
//! validation must locate (ids, references, templates) keep their span.
//!
//! `parse` reports *every* problem serde finds, not just the first: it parses
//! the document into toml's spanned tree, deserializes, and on an error records
//! it, drops the offending entry from the tree and tries again.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::plan::{Backoff, OnFailure};
use crate::diagnostic::Reporter;
use crate::limits::{HumanDuration, LimitsTable};

/// A whole workflow file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a workflow table")]
pub struct WorkflowFile {
    pub name: Option<Spanned<String>>,
    pub description: Option<String>,
    pub limits: Option<LimitsTable>,
    pub retry: Option<RetryTable>,
    pub input: Option<Spanned<InputTable>>,
    #[serde(default)]
    pub step: Vec<Spanned<StepTable>>,
    pub output: Option<Spanned<TomlValue>>,
}

/// `[retry]`, or a step's `retry`: each key overrides the one below it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table of retry settings")]
pub struct RetryTable {
    pub max_attempts: Option<Spanned<u32>>,
    pub backoff: Option<Backoff>,
    pub initial: Option<Spanned<HumanDuration>>,
    pub max: Option<Spanned<HumanDuration>>,
}

/// `[input]`: what a run's input must look like.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an [input] table")]
pub struct InputTable {
    /// A JSON Schema, written as TOML or as a string of JSON text.
    pub schema: Option<Spanned<TomlValue>>,
    pub description: Option<String>,
}

/// One `[[step]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[step]] table")]
pub struct StepTable {
    pub id: Option<Spanned<String>>,
    pub plugin: Option<Spanned<String>>,
    /// A sub-workflow step: the workflow each attempt runs as a child run
    /// (instead of `plugin`).
    pub workflow: Option<Spanned<String>>,
    pub description: Option<String>,
    #[serde(default)]
    pub needs: Vec<Spanned<String>>,
    pub input: Option<Spanned<TomlValue>>,
    pub config: Option<Spanned<BTreeMap<String, Spanned<TomlValue>>>>,
    #[serde(rename = "if")]
    pub condition: Option<Spanned<TomlValue>>,
    pub for_each: Option<Spanned<TomlValue>>,
    pub limits: Option<LimitsTable>,
    pub retry: Option<RetryTable>,
    pub on_failure: Option<OnFailure>,
    #[serde(default)]
    pub allow_hosts: Vec<Spanned<String>>,
    /// Names of `[secrets]` (trellis.toml) the plugin may read through `host.config`.
    #[serde(default)]
    pub secrets: Vec<Spanned<String>>,
}

/// Any TOML value, with the span of every value inside it (templates in
/// `input`, `config`, `if`, `for_each` and `[output]` are located by them).
#[derive(Debug, Clone, PartialEq)]
pub enum TomlValue {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    /// A TOML date/time, kept as written in RFC 3339 form.
    Datetime(String),
    Array(Vec<Spanned<TomlValue>>),
    Table(BTreeMap<String, Spanned<TomlValue>>),
}

impl<'de> Deserialize<'de> for TomlValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TomlValueVisitor;

        impl<'de> Visitor<'de> for TomlValueVisitor {
            type Value = TomlValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<TomlValue, E> {
                Ok(TomlValue::Boolean(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TomlValue, E> {
                Ok(TomlValue::Integer(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TomlValue, E> {
                i64::try_from(v)
                    .map(TomlValue::Integer)
                    .map_err(|_| E::custom("integer out of range"))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<TomlValue, E> {
                Ok(TomlValue::Float(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<TomlValue, E> {
                Ok(TomlValue::String(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<TomlValue, E> {
                Ok(TomlValue::String(v))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TomlValue, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(TomlValue::Array(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TomlValue, A::Error> {
                use toml_datetime::de::VisitMap;
                let mut table = BTreeMap::new();
                match VisitMap::next_key_seed(&mut map)? {
                    None => return Ok(TomlValue::Table(table)),
                    Some(VisitMap::Datetime(datetime)) => {
                        return Ok(TomlValue::Datetime(datetime.to_string()));
                    }
                    Some(VisitMap::Key(key)) => {
                        table.insert(key.into_owned(), map.next_value()?);
                    }
                }
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value()?;
                    table.insert(key, value);
                }
                Ok(TomlValue::Table(table))
            }
        }

        deserializer.deserialize_any(TomlValueVisitor)
    }
}

/// One step of a path through the TOML tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Key(String),
    Index(usize),
}

/// The deserialized file, and the entries dropped from it because they were
/// wrong (already reported; validation must not complain that they are missing).
pub(crate) struct Parsed {
    pub file: WorkflowFile,
    pub dropped: Vec<Vec<Segment>>,
}

impl Parsed {
    /// Whether `key` of the `index`th `[[step]]` was dropped as wrong.
    pub(crate) fn dropped_step_key(&self, index: usize, key: &str) -> bool {
        self.dropped.iter().any(|path| {
            matches!(path.as_slice(),
                [Segment::Key(step), Segment::Index(i), Segment::Key(k)]
                    if step == "step" && *i == index && k == key)
        })
    }

    pub(crate) fn dropped_top_key(&self, key: &str) -> bool {
        self.dropped
            .iter()
            .any(|path| matches!(path.as_slice(), [Segment::Key(k)] if k == key))
    }
}

/// Parses and deserializes `source`, reporting every syntax error, unknown field
/// and wrong value. `None` when the document could not be read at all.
pub(crate) fn parse(report: &mut Reporter<'_>) -> Option<Parsed> {
    let source = report.source();
    let (tree, syntax_errors) = DeTable::parse_recoverable(source);
    if !syntax_errors.is_empty() {
        // What follows a syntax error is guesswork: report only these.
        for error in syntax_errors {
            let offset = error.span().map_or(0, |span| span.start);
            report.error_at(offset, error.message().to_owned());
        }
        return None;
    }

    let mut tree = tree;
    let mut dropped = Vec::new();
    // Each round drops one entry, so this ends; the cap is a guard against a
    // toml error that points at nothing we can drop.
    let rounds = count_entries(tree.get_ref()) + 1;
    for _ in 0..rounds {
        let error = match WorkflowFile::deserialize(toml::de::Deserializer::from(tree.clone())) {
            Ok(file) => return Some(Parsed { file, dropped }),
            Err(error) => error,
        };
        let span = error.span().unwrap_or(0..0);
        let Some(path) = locate(tree.get_ref(), &span) else {
            report.error_at(span.start, error.message().to_owned());
            return None;
        };
        report.error_at(
            span.start,
            describe_error(error.message(), &path, tree.get_ref()),
        );
        remove(tree.get_mut(), &path);
        dropped.push(path);
    }
    None
}

fn count_entries(table: &DeTable<'_>) -> usize {
    table
        .iter()
        .map(|(_, value)| {
            1 + match value.get_ref() {
                DeValue::Table(table) => count_entries(table),
                DeValue::Array(array) => array
                    .iter()
                    .map(|item| match item.get_ref() {
                        DeValue::Table(table) => count_entries(table),
                        _ => 0,
                    })
                    .sum(),
                _ => 0,
            }
        })
        .sum()
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The deepest table entry whose key or value holds `span`.
fn locate(table: &DeTable<'_>, span: &Range<usize>) -> Option<Vec<Segment>> {
    fn walk(
        table: &DeTable<'_>,
        span: &Range<usize>,
        path: &mut Vec<Segment>,
        best: &mut Option<Vec<Segment>>,
    ) {
        for (key, value) in table.iter() {
            path.push(Segment::Key(key.get_ref().to_string()));
            let here = contains(&key.span(), span) || contains(&value.span(), span);
            if here && best.as_ref().is_none_or(|best| best.len() < path.len()) {
                *best = Some(path.clone());
            }
            match value.get_ref() {
                DeValue::Table(inner) => walk(inner, span, path, best),
                DeValue::Array(array) => {
                    for (index, item) in array.iter().enumerate() {
                        if let DeValue::Table(inner) = item.get_ref() {
                            path.push(Segment::Index(index));
                            walk(inner, span, path, best);
                            path.pop();
                        }
                    }
                }
                _ => {}
            }
            path.pop();
        }
    }
    let mut best = None;
    walk(table, span, &mut Vec::new(), &mut best);
    best
}

fn remove(table: &mut DeTable<'_>, path: &[Segment]) {
    let Some((Segment::Key(key), rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.remove(key.as_str());
        return;
    }
    let Some(value) = table.get_mut(key.as_str()) else {
        return;
    };
    match (value.get_mut(), rest.split_first()) {
        (DeValue::Table(inner), _) => remove(inner, rest),
        (DeValue::Array(array), Some((Segment::Index(index), rest))) => {
            if let Some(DeValue::Table(inner)) = array.get_mut(*index).map(|item| item.get_mut()) {
                remove(inner, rest);
            }
        }
        _ => {}
    }
}

fn table_at<'t, 'i>(table: &'t DeTable<'i>, path: &[Segment]) -> Option<&'t DeTable<'i>> {
    let Some((first, rest)) = path.split_first() else {
        return Some(table);
    };
    let Segment::Key(key) = first else {
        return None;
    };
    match (table.get(key.as_str())?.get_ref(), rest.split_first()) {
        (DeValue::Table(inner), _) => table_at(inner, rest),
        (DeValue::Array(array), Some((Segment::Index(index), rest))) => {
            match array.get(*index)?.get_ref() {
                DeValue::Table(inner) => table_at(inner, rest),
                _ => None,
            }
        }
        _ => None,
    }
}

/// "step `fetch`" or "step #2", for the `index`th `[[step]]` of the tree.
fn step_label(tree: &DeTable<'_>, index: usize) -> String {
    let step = table_at(tree, &[Segment::Key("step".into()), Segment::Index(index)]);
    match step.and_then(|step| step.get("id")).map(|id| id.get_ref()) {
        Some(DeValue::String(id)) if !id.is_empty() => format!("step `{id}`"),
        _ => format!("step #{}", index + 1),
    }
}

/// The message for a serde error at `path`, said in the workflow's terms.
fn describe_error(message: &str, path: &[Segment], tree: &DeTable<'_>) -> String {
    let (prefix, keys) = match path {
        [Segment::Key(step), Segment::Index(index), rest @ ..] if step == "step" => {
            (Some(step_label(tree, *index)), rest)
        }
        _ => (None, path),
    };
    let keys: Vec<&str> = keys
        .iter()
        .filter_map(|segment| match segment {
            Segment::Key(key) => Some(key.as_str()),
            Segment::Index(_) => None,
        })
        .collect();
    let Some((last, parents)) = keys.split_last() else {
        return message.to_owned();
    };

    if let Some(expected) = unknown_field_expected(message) {
        let place = match (&prefix, parents) {
            (None, []) => "at the top level".to_owned(),
            (None, parents) => format!("in [{}]", parents.join(".")),
            (Some(step), []) => format!("in {step}"),
            (Some(step), parents) => format!("in `{}` of {step}", parents.join(".")),
        };
        let mut text = format!("unknown field `{last}` {place}");
        match super::closest(last, expected.iter().map(String::as_str)) {
            Some(suggestion) => text.push_str(&format!("; did you mean `{suggestion}`?")),
            None if expected.is_empty() => {}
            None => text.push_str(&format!(" (known fields: {})", expected.join(", "))),
        }
        if prefix.is_none() && parents.is_empty() && *last == "steps" {
            text.push_str(" (each step is a [[step]] table)");
        }
        return text;
    }

    if prefix.is_none() && keys == ["step"] && message.contains("expected a sequence") {
        return "`step` must be an array of tables: write each step as `[[step]]`".to_owned();
    }

    let field = keys.join(".");
    match prefix {
        Some(step) => format!("{step}: `{field}`: {message}"),
        None => format!("`{field}`: {message}"),
    }
}

/// The expected field names of serde's "unknown field `x`, expected ..." message.
fn unknown_field_expected(message: &str) -> Option<Vec<String>> {
    let rest = message.strip_prefix("unknown field `")?;
    let (_, rest) = rest.split_once('`')?;
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limits::Size;

    fn parse_ok(source: &str) -> WorkflowFile {
        let mut report = Reporter::new("t.toml", source);
        let parsed = parse(&mut report).expect("parses");
        assert!(!report.has_errors());
        parsed.file
    }

    fn errors(source: &str) -> String {
        let mut report = Reporter::new("t.toml", source);
        let _ = parse(&mut report);
        report.finish::<()>(None).unwrap_err().to_string()
    }

    #[test]
    fn reads_every_field() {
        let file = parse_ok(
            r#"
name = "n"
description = "d"
[limits]
fuel = 5
memory = "1KiB"
timeout = "250ms"
max_output = 10
max_log = "1 KB"
[retry]
max_attempts = 3
backoff = "fixed"
initial = "1s"
max = "1m"
[[step]]
id = "a"
plugin = "p@1.0.0"
description = "x"
needs = ["b"]
input = { list = [1, 2.5, true, 1979-05-27T07:32:00Z], text = "{{ input }}" }
config = { k = "v" }
if = "{{ true }}"
for_each = [1]
limits = { fuel = 1 }
retry = { backoff = "exponential" }
on_failure = "continue"
allow_hosts = ["example.com:443"]
[output]
x = 1
"#,
        );
        assert_eq!(file.name.unwrap().into_inner(), "n");
        let limits = file.limits.unwrap();
        assert_eq!(limits.memory.unwrap().into_inner(), Size(1024));
        assert_eq!(limits.max_log.unwrap().into_inner(), Size(1000));
        assert_eq!(
            limits.timeout.unwrap().into_inner(),
            HumanDuration(Duration::from_millis(250))
        );
        let step = file.step.into_iter().next().unwrap().into_inner();
        assert_eq!(step.on_failure, Some(OnFailure::Continue));
        let TomlValue::Table(input) = step.input.unwrap().into_inner() else {
            panic!("input is a table")
        };
        let TomlValue::Array(list) = input["list"].get_ref() else {
            panic!("list is an array")
        };
        assert_eq!(list[1].get_ref(), &TomlValue::Float(2.5));
        assert_eq!(
            list[3].get_ref(),
            &TomlValue::Datetime("1979-05-27T07:32:00Z".into())
        );
    }

    #[test]
    fn reports_every_unknown_field_and_wrong_value() {
        let text = errors(
            r#"nmae = "x"
[limits]
timout = "1s"
memory = "lots"
[[step]]
id = "a"
plugn = "p"
retry = { max_attempts = "3", bakoff = "fixed" }
"#,
        );
        assert_eq!(
            text,
            "t.toml:1:1: unknown field `nmae` at the top level; did you mean `name`?\n\
             t.toml:3:1: unknown field `timout` in [limits]; did you mean `timeout`?\n\
             t.toml:4:10: `limits.memory`: invalid size \"lots\"; write it like \"64MiB\", \"512KiB\", \"1GB\" or as a number of bytes\n\
             t.toml:7:1: unknown field `plugn` in step `a`; did you mean `plugin`?\n\
             t.toml:8:26: step `a`: `retry.max_attempts`: invalid type: string \"3\", expected u32\n\
             t.toml:8:31: unknown field `bakoff` in `retry` of step `a`; did you mean `backoff`?"
        );
    }

    #[test]
    fn syntax_errors_are_reported_alone() {
        let text = errors("a = = 1\nbogus = 2\n");
        assert!(text.starts_with("t.toml:1:5: "), "{text}");
        assert!(!text.contains("bogus"), "{text}");
    }

    #[test]
    fn a_step_table_instead_of_an_array() {
        assert_eq!(
            errors("[step]\nid = \"a\"\n"),
            "t.toml:1:1: `step` must be an array of tables: write each step as `[[step]]`"
        );
    }
}
