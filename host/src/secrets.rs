//! Secrets: `[secrets]` of `trellis.toml`, granted to a step by name
//! (`secrets = ["api_token"]`) and read by its plugin through `host.config`.
//!
//! Values are read when a step that names them starts (so a rotated file is
//! picked up without a restart), once for all its attempts and `for_each`
//! items, and live only in their sandboxes. Everything the attempt leaves behind (its output, its
//! error, its log lines and progress, and so the run record, the events and
//! the host's own logs) passes through a [`Redactor`] that replaces each value
//! with [`REDACTED`]. As with CI systems that mask secrets, a value that the
//! plugin transforms (encodes, splits) before writing it out is not recognised.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::Value;

/// What a secret's value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Whether `text` can name a secret: letters, digits, `_`, `-` and `.`.
pub fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 128
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Where a secret's value comes from: `{ env = "VAR" }` or `{ file = "/path" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable of the server process.
    Env(String),
    /// A file (e.g. a mounted Docker or Kubernetes secret), read whole; a
    /// relative path in `trellis.toml` is relative to that file's directory.
    File(PathBuf),
}

/// A `[secrets]` entry as written; exactly one key must be set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretTable {
    env: Option<String>,
    file: Option<PathBuf>,
}

const SECRET_SOURCE: &str = "write { env = \"VAR\" } or { file = \"/path\" }";

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;

        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = SecretSource;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a secret source: {SECRET_SOURCE}")
            }

            // Never echo the string: it may be the secret itself.
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretSource, E> {
                Err(E::custom(format!(
                    "a secret's value does not belong in the configuration file: {SECRET_SOURCE}"
                )))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<SecretSource, A::Error> {
                let table = SecretTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match (table.env, table.file) {
                    (Some(var), None) => Ok(SecretSource::Env(var)),
                    (None, Some(path)) => Ok(SecretSource::File(path)),
                    _ => Err(de::Error::custom(format!(
                        "a secret comes from exactly one place: {SECRET_SOURCE}"
                    ))),
                }
            }
        }

        deserializer.deserialize_any(SecretVisitor)
    }
}

/// Where each configured secret comes from.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    sources: BTreeMap<String, SecretSource>,
}

/// Why a secret's value cannot be had. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret \"{name}\" is not configured: add it to [secrets] in trellis.toml")]
    Unknown { name: String },
    #[error("secret \"{name}\": environment variable {var} is not set")]
    EnvMissing { name: String, var: String },
    #[error("secret \"{name}\": cannot read {}: {source}", path.display())]
    File {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret \"{name}\" is empty")]
    Empty { name: String },
}

impl Secrets {
    pub fn new(sources: BTreeMap<String, SecretSource>) -> Secrets {
        Secrets { sources }
    }

    /// The configured names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }

    /// Whether `name` is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.sources.contains_key(name)
    }

    /// Reads the values of `names`. A file's content loses one trailing
    /// newline (as `echo token > file` writes it).
    pub fn resolve(&self, names: &[String]) -> Result<BTreeMap<String, String>, SecretError> {
        let mut values = BTreeMap::new();
        for name in names {
            let source = self
                .sources
                .get(name)
                .ok_or_else(|| SecretError::Unknown { name: name.clone() })?;
            let value = match source {
                SecretSource::Env(var) => {
                    std::env::var(var).map_err(|_| SecretError::EnvMissing {
                        name: name.clone(),
                        var: var.clone(),
                    })?
                }
                SecretSource::File(path) => {
                    let mut text =
                        std::fs::read_to_string(path).map_err(|source| SecretError::File {
                            name: name.clone(),
                            path: path.clone(),
                            source,
                        })?;
                    if text.ends_with('\n') {
                        text.pop();
                        if text.ends_with('\r') {
                            text.pop();
                        }
                    }
                    text
                }
            };
            if value.is_empty() {
                return Err(SecretError::Empty { name: name.clone() });
            }
            values.insert(name.clone(), value);
        }
        Ok(values)
    }
}

/// What one step was granted: the values of the secrets it names and the
/// redactor of those values, made once per step and shared by its attempts.
#[derive(Debug, Default)]
pub struct Granted {
    values: BTreeMap<String, String>,
    redactor: Option<Arc<Redactor>>,
}

impl Granted {
    /// The values of `names`, read now.
    pub fn read(secrets: &Secrets, names: &[String]) -> Result<Granted, SecretError> {
        if names.is_empty() {
            return Ok(Granted::default());
        }
        let values = secrets.resolve(names)?;
        let redactor = Redactor::new(values.values().map(String::as_str)).map(Arc::new);
        Ok(Granted { values, redactor })
    }

    /// The value of the granted secret `name`.
    pub fn get(&self, name: &str) -> Option<&String> {
        self.values.get(name)
    }

    /// Masks the granted values; `None` when nothing was granted.
    pub fn redactor(&self) -> Option<&Arc<Redactor>> {
        self.redactor.as_ref()
    }
}

/// Replaces secret values in text and JSON.
#[derive(Debug, Clone)]
pub struct Redactor {
    matcher: AhoCorasick,
}

impl Redactor {
    /// A redactor of `values` (empty ones are ignored); `None` if none is left.
    /// Each value is also matched in its JSON-escaped form, as it appears
    /// inside a JSON document a plugin writes to its log.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Redactor> {
        let mut patterns: Vec<String> = Vec::new();
        for value in values.into_iter().filter(|v| !v.is_empty()) {
            patterns.push(value.to_owned());
            let escaped = serde_json::to_string(value).expect("a string serializes");
            let escaped = &escaped[1..escaped.len() - 1];
            if escaped != value {
                patterns.push(escaped.to_owned());
            }
        }
        if patterns.is_empty() {
            return None;
        }
        let matcher = aho_corasick::AhoCorasickBuilder::new()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&patterns)
            .expect("secret patterns build");
        Some(Redactor { matcher })
    }

    /// `text` with every value replaced by [`REDACTED`].
    pub fn text<'t>(&self, text: &'t str) -> Cow<'t, str> {
        if self.matcher.is_match(text) {
            let mut out = String::with_capacity(text.len());
            self.matcher.replace_all_with(text, &mut out, |_, _, dst| {
                dst.push_str(REDACTED);
                true
            });
            Cow::Owned(out)
        } else {
            Cow::Borrowed(text)
        }
    }

    /// Replaces values in place in `text`.
    pub fn string(&self, text: &mut String) {
        if let Cow::Owned(redacted) = self.text(text) {
            *text = redacted;
        }
    }

    /// Every string and object key of `value`, redacted.
    pub fn json(&self, value: &mut Value) {
        match value {
            Value::String(text) => self.string(text),
            Value::Array(items) => items.iter_mut().for_each(|item| self.json(item)),
            Value::Object(map) => {
                if map.keys().any(|key| self.matcher.is_match(key)) {
                    let entries = std::mem::take(map);
                    for (key, value) in entries {
                        map.insert(self.text(&key).into_owned(), value);
                    }
                }
                map.values_mut().for_each(|item| self.json(item));
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_replaced_in_text_and_json() {
        let redactor = Redactor::new(["s3cr3t-token", "", "p\"w"]).unwrap();
        assert_eq!(
            redactor.text("token=s3cr3t-token; again s3cr3t-token"),
            "token=[REDACTED]; again [REDACTED]"
        );
        assert!(matches!(redactor.text("nothing here"), Cow::Borrowed(_)));
        // The escaped form, as it appears inside JSON text.
        assert_eq!(redactor.text(r#"{"pw":"p\"w"}"#), r#"{"pw":"[REDACTED]"}"#);
        let mut value = json!({
            "a": ["x s3cr3t-token y", 1, null],
            "s3cr3t-token": {"pw": "p\"w"},
        });
        redactor.json(&mut value);
        assert_eq!(
            value,
            json!({"a": ["x [REDACTED] y", 1, null], "[REDACTED]": {"pw": "[REDACTED]"}})
        );
    }

    #[test]
    fn no_values_no_redactor() {
        assert!(Redactor::new([""]).is_none());
        assert!(Redactor::new(std::iter::empty()).is_none());
    }

    #[test]
    fn values_come_from_env_and_files_and_errors_never_show_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), "hunter2\n").unwrap();
        std::fs::write(dir.path().join("empty"), "").unwrap();
        // Setting a variable is unsafe in edition 2024: read PATH, and one
        // that no one sets.
        let var = "TRELLIS_TEST_SECRET_NEVER_SET";
        let secrets = Secrets::new(BTreeMap::from([
            ("db".to_owned(), SecretSource::File(dir.path().join("db"))),
            ("home".to_owned(), SecretSource::Env("PATH".to_owned())),
            ("gone".to_owned(), SecretSource::Env(var.to_owned())),
            (
                "nofile".to_owned(),
                SecretSource::File(dir.path().join("nope")),
            ),
            (
                "empty".to_owned(),
                SecretSource::File(dir.path().join("empty")),
            ),
        ]));
        let values = secrets
            .resolve(&["db".to_owned(), "home".to_owned()])
            .unwrap();
        assert_eq!(values["db"], "hunter2");
        assert_eq!(values["home"], std::env::var("PATH").unwrap());
        let error = |name: &str| secrets.resolve(&[name.to_owned()]).unwrap_err().to_string();
        assert_eq!(
            error("gone"),
            format!("secret \"gone\": environment variable {var} is not set")
        );
        assert!(error("nofile").starts_with("secret \"nofile\": cannot read "));
        assert_eq!(error("empty"), "secret \"empty\" is empty");
        assert_eq!(
            error("other"),
            "secret \"other\" is not configured: add it to [secrets] in trellis.toml"
        );
    }
}
