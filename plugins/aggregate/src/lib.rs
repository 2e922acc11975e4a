//! `aggregate`: statistics over numbers, word counts over text, and merging word
//! counts from several documents.
//!
//! The input has exactly one of `values`, `text`, `lists` or `counts`.
//!
//! **Numbers** — `{ "values": [3, 1.5, 10] }` ->
//! `{ "count": 3, "sum": 14.5, "min": 1.5, "max": 10, "mean": 4.833333333333333, "median": 3 }`.
//! Whole results are written as integers (`10`, not `10.0`). The median of an even count
//! is the mean of the two middle values. An empty list gives `count` 0, `sum` 0 and
//! `null` for the rest.
//!
//! **Words** — all three word modes answer the same shape, so one aggregate's output
//! can feed another:
//! ```json
//! { "words": 6, "unique": 4,
//!   "top": [{ "word": "the", "count": 2 }, { "word": "cat", "count": 1 }],
//!   "counts": { "cat": 1, "mat": 1, "sat": 1, "the": 2 } }
//! ```
//! `words` counts every word, `unique` the distinct ones, `top` lists the `top` (input,
//! default 10) most frequent, ties broken alphabetically, and `counts` holds every word
//! (keys sorted). Words are lowercased; text splits on every character that is not a
//! letter or digit (so `don't` is `don` and `t`).
//! - `{ "text": "The cat sat on the mat", "top": 10 }`: one document.
//! - `{ "lists": [["the cat", "sat"], ["the", "dog"]] }`: several documents given as lists
//!   of strings; every string is split into words as `text` is.
//! - `{ "counts": [ ... ], "top": 10 }`: merge word counts. Each element is either a map
//!   `{ "word": count }` or the output of an earlier word-mode aggregate (an object whose
//!   `counts` is such a map). Counts of the same word add up; `null` elements (a
//!   skipped or failed document) are ignored.
//!
//! Fan-out then merge, in a workflow:
//! ```toml
//! [[step]]
//! id = "per_doc"
//! plugin = "aggregate"
//! for_each = "{{ input.documents }}"
//! input = { text = "{{ item }}" }
//!
//! [[step]]
//! id = "merged"
//! plugin = "aggregate"
//! input = { counts = "{{ steps.per_doc.output }}", top = 5 }
//! ```
//!
//! Errors (fatal): none or several of the four modes; a value that is not a number; a
//! count that is not a non-negative integer; `top` with `values`. The message names the
//! field, e.g. ``invalid input: field `values[2]`: invalid type: string "x", expected f64``.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use trellis_sdk::{StepContext, TaskError};

const DEFAULT_TOP: usize = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    values: Option<Vec<f64>>,
    text: Option<String>,
    lists: Option<Vec<Vec<String>>>,
    counts: Option<Vec<Option<Map<String, Value>>>>,
    top: Option<usize>,
}

#[derive(Serialize)]
struct Stats {
    count: usize,
    sum: Value,
    min: Value,
    max: Value,
    mean: Value,
    median: Value,
}

#[derive(Serialize)]
struct WordStats {
    words: u64,
    unique: usize,
    top: Vec<WordCount>,
    counts: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct WordCount {
    word: String,
    count: u64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Output {
    Numbers(Stats),
    Words(WordStats),
}

#[trellis_sdk::task(
    input_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "additionalProperties": false,
  "oneOf": [
    { "required": ["values"], "not": { "required": ["top"] } },
    { "required": ["text"] },
    { "required": ["lists"] },
    { "required": ["counts"] }
  ],
  "properties": {
    "values": { "type": "array", "items": { "type": "number" } },
    "text": { "type": "string" },
    "lists": { "type": "array", "items": { "type": "array", "items": { "type": "string" } } },
    "counts": {
      "type": "array",
      "description": "word-count maps, or earlier word-mode aggregate outputs (objects with `counts`)",
      "items": { "type": ["object", "null"] }
    },
    "top": { "type": "integer", "minimum": 0, "default": 10 }
  }
}"#,
    output_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "oneOf": [
    {
      "required": ["count", "sum", "min", "max", "mean", "median"],
      "properties": {
        "count": { "type": "integer" }, "sum": { "type": "number" },
        "min": { "type": ["number", "null"] }, "max": { "type": ["number", "null"] },
        "mean": { "type": ["number", "null"] }, "median": { "type": ["number", "null"] }
      }
    },
    {
      "required": ["words", "unique", "top", "counts"],
      "properties": {
        "words": { "type": "integer" }, "unique": { "type": "integer" },
        "top": {
          "type": "array",
          "items": { "type": "object", "required": ["word", "count"], "properties": { "word": { "type": "string" }, "count": { "type": "integer" } } }
        },
        "counts": { "type": "object", "additionalProperties": { "type": "integer" } }
      }
    }
  ]
}"#
)]
fn run(_ctx: &StepContext, input: Value) -> Result<Output, TaskError> {
    let input: Input = trellis_sdk::parse_input(input)?;
    let modes = [
        input.values.is_some(),
        input.text.is_some(),
        input.lists.is_some(),
        input.counts.is_some(),
    ];
    if modes.iter().filter(|&&given| given).count() != 1 {
        return Err(TaskError::fatal(
            "invalid input: give exactly one of `values` (numbers), `text`, `lists` or `counts`",
        ));
    }
    let top = input.top.unwrap_or(DEFAULT_TOP);

    if let Some(values) = input.values {
        if input.top.is_some() {
            return Err(TaskError::fatal(
                "invalid input: field `top` applies to `text`, `lists` and `counts`, not `values`",
            ));
        }
        return Ok(Output::Numbers(stats(values)));
    }

    let mut counts = BTreeMap::new();
    if let Some(text) = input.text {
        count_words(&text, &mut counts);
    }
    for list in input.lists.into_iter().flatten() {
        for text in list {
            count_words(&text, &mut counts);
        }
    }
    for (index, doc) in input.counts.into_iter().flatten().enumerate() {
        if let Some(doc) = doc {
            merge_counts(index, doc, &mut counts)?;
        }
    }
    Ok(Output::Words(word_stats(counts, top)))
}

fn stats(mut values: Vec<f64>) -> Stats {
    let count = values.len();
    let sum: f64 = values.iter().sum();
    if count == 0 {
        return Stats {
            count,
            sum: number(sum),
            min: Value::Null,
            max: Value::Null,
            mean: Value::Null,
            median: Value::Null,
        };
    }
    values.sort_by(f64::total_cmp);
    let middle = count / 2;
    let median = if count % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    };
    Stats {
        count,
        sum: number(sum),
        min: number(values[0]),
        max: number(values[count - 1]),
        mean: number(sum / count as f64),
        median: number(median),
    }
}

/// Whole numbers as JSON integers (`3`, not `3.0`), so templates and comparisons
/// downstream see what a person would write.
fn number(x: f64) -> Value {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53: every integer below is an f64
    if x.fract() == 0.0 && x.abs() < EXACT {
        Value::from(x as i64)
    } else {
        Value::from(x)
    }
}

fn count_words(text: &str, counts: &mut BTreeMap<String, u64>) {
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_default() += 1;
    }
}

/// Add one document's counts: a `{ word: count }` map, or an earlier aggregate's output.
fn merge_counts(
    index: usize,
    mut doc: Map<String, Value>,
    counts: &mut BTreeMap<String, u64>,
) -> Result<(), TaskError> {
    let (map, at) = match doc.remove("counts") {
        Some(Value::Object(inner)) => (inner, format!("counts[{index}].counts")),
        Some(other) => {
            doc.insert("counts".to_owned(), other);
            (doc, format!("counts[{index}]"))
        }
        None => (doc, format!("counts[{index}]")),
    };
    for (word, count) in map {
        let Some(count) = count.as_u64() else {
            return Err(TaskError::fatal(format!(
                "invalid input: field `{at}.{word}`: expected a non-negative integer count, found {count}"
            )));
        };
        *counts.entry(word.to_lowercase()).or_default() += count;
    }
    Ok(())
}

fn word_stats(counts: BTreeMap<String, u64>, top: usize) -> WordStats {
    let mut ranked: Vec<(&String, &u64)> = counts.iter().collect();
    // BTreeMap order is alphabetical and the sort is stable: ties stay alphabetical.
    ranked.sort_by(|a, b| b.1.cmp(a.1));
    let top = ranked
        .into_iter()
        .take(top)
        .map(|(word, &count)| WordCount {
            word: word.clone(),
            count,
        })
        .collect();
    WordStats {
        words: counts.values().sum(),
        unique: counts.len(),
        top,
        counts,
    }
}
