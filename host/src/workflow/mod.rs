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
//! use trellis::plugin::PluginRef;
//! use trellis::workflow::{self, PluginCatalog, Scope};
//!
//! struct Catalog;
//! impl PluginCatalog for Catalog {
//!     fn check(&self, reference: &PluginRef) -> Result<(), String> {
//!         if reference.name == "uppercase" { Ok(()) } else { Err(format!("no plugin named `{reference}`")) }
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
mod catalog;
mod layout;
mod plan;
mod readable;
pub mod schema;
pub mod template;
mod validate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod ui_tests;

use std::path::Path;

pub use crate::diagnostic::{Diagnostic, Diagnostics};
pub use bounds::Bound;
pub use catalog::{AnyPlugin, PluginCatalog, WithSecrets, WithWorkflows, name_and_calls};
pub use layout::{Layout, LayoutEdge, LayoutNode};
pub use plan::{Backoff, InputSchema, OnFailure, Plan, PlannedStep, RetryPolicy, SchemaViolation};
pub use readable::Readable;
pub use template::{CompiledTemplate, Scope, TemplateError, TemplateValue, Templates};
pub use validate::{MAX_WORKFLOW_NAME, check_workflow_name};

use crate::diagnostic::Reporter;

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
