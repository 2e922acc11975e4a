//! Workflow files: the TOML model, its validation, and the [`Plan`] the
//! executor runs.
//!
//! The data goes through three stages, and only the last leaves this module:
//!
//! 1. [`schema`]: serde types of the file as written (`deny_unknown_fields`,
//!    spans kept where validation needs a location);
//! 2. `validate`: ids, references, plugins, templates, the dependency graph,
//!    limits, retries and the `[input]` JSON Schema; every problem is
//!    reported at once, each as `FILE:LINE:COL: message`;
//! 3. [`Plan`]: an immutable DAG in run order, templates compiled, defaults
//!    filled in.
//!
//! Templates are MiniJinja (see [`template`]); the executor renders them with
//! [`Templates`] and a [`Scope`].
//!
//! ```
//! use trellis::workflow::{self, PluginCatalog, Scope};
//!
//! struct Catalog;
//! impl PluginCatalog for Catalog {
//!     fn check(&self, reference: &str) -> Result<(), String> {
//!         if reference == "uppercase" { Ok(()) } else { Err(format!("no plugin named `{reference}`")) }
//!     }
//! }
//!
//! let plan = workflow::parse_str(r#"
//!     [[step]]
//!     id = "shout"
//!     plugin = "uppercase"
//!     input = { text = "{{ input.name }}!" }
//! "#, "hello.toml", "hello", &Catalog).unwrap();
//!
//! let scope = Scope::new("run-1", &plan.name, &serde_json::json!({ "name": "ada" }));
//! let input = plan.templates.render(&plan.steps[0].input, &scope).unwrap();
//! assert_eq!(input, serde_json::json!({ "text": "ada!" }));
//! ```

mod bounds;
mod diagnostic;
mod plan;
pub mod schema;
pub mod template;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod ui_tests;

use std::path::Path;

pub use bounds::Bound;
pub use diagnostic::{Diagnostic, Diagnostics};
pub use plan::{
    Backoff, InputSchema, OnFailure, Plan, PlannedStep, Readable, RetryPolicy, SchemaViolation,
};
pub use template::{CompiledTemplate, Scope, TemplateError, TemplateValue, Templates};
pub use validate::{MAX_WORKFLOW_NAME, check_workflow_name};

use diagnostic::Reporter;

/// The plugins a workflow may use; the plugin registry implements it.
pub trait PluginCatalog {
    /// Ok if `reference` ("name", "name@1.2.0", "name@sha256:<hex>") names a
    /// loaded plugin; Err(a full sentence for the user, e.g. "no plugin named
    /// `x` (loaded: a, b)").
    fn check(&self, reference: &str) -> Result<(), String>;

    /// Ok if a step may name the secret `name`; Err(a full sentence). The
    /// default knows no configuration and accepts every name (the run checks
    /// again when the step starts).
    fn check_secret(&self, name: &str) -> Result<(), String> {
        let _ = name;
        Ok(())
    }
}

/// Reads and validates a workflow file. Its name defaults to the file stem;
/// diagnostics show `path` as given.
pub fn load_file(path: &Path, catalog: &dyn PluginCatalog) -> Result<Plan, Diagnostics> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|error| {
        Diagnostics(vec![Diagnostic {
            file: file.clone(),
            line: 1,
            column: 1,
            message: format!("cannot read the workflow file: {error}"),
        }])
    })?;
    let default_name = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    parse_str(&source, &file, &default_name, catalog)
}

/// Validates a workflow given as text. `file` is only used in diagnostics and
/// [`Plan::file`]; `default_name` is the workflow's name when it sets none.
pub fn parse_str(
    source: &str,
    file: &str,
    default_name: &str,
    catalog: &dyn PluginCatalog,
) -> Result<Plan, Diagnostics> {
    let mut report = Reporter::new(file, source);
    let plan = schema::parse(&mut report)
        .and_then(|parsed| validate::validate(parsed, file, default_name, catalog, &mut report));
    report.finish(plan)
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|candidate| (strsim::damerau_levenshtein(word, candidate), candidate))
        .filter(|(distance, candidate)| {
            let longest = word.chars().count().max(candidate.chars().count());
            *distance > 0 && *distance < longest && *distance <= (longest / 3).max(1)
        })
        .min_by_key(|(distance, candidate)| (*distance, *candidate))
        .map(|(_, candidate)| candidate)
}
