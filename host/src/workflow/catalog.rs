//! What validation asks of the world outside the file: which plugins and
//! secrets exist ([`PluginCatalog`]). The plugin registry answers for plugins;
//! [`WithSecrets`] adds the configured secrets.

use crate::plugin::{PluginRef, PluginRegistry};
use crate::secrets::Secrets;

/// The plugins a workflow may use; the plugin registry implements it.
pub trait PluginCatalog {
    /// Ok if `reference` (`name`, `name@1.2.0`, `name@sha256:<hex>`) names a
    /// loaded plugin; Err(a full sentence for the user, e.g. "no plugin named
    /// `x` (loaded: a, b)").
    fn check(&self, reference: &PluginRef) -> Result<(), String>;

    /// Ok if a step may name the secret `name`; Err(a full sentence). The
    /// default knows no configuration and accepts every name (the run checks
    /// again when the step starts).
    fn check_secret(&self, name: &str) -> Result<(), String> {
        let _ = name;
        Ok(())
    }

    /// The workflows that workflow `name` calls from its sub-workflow steps,
    /// if a workflow of that name is known; `None` if not. The default knows
    /// no workflows.
    fn workflow_calls(&self, name: &str) -> Option<Vec<String>> {
        let _ = name;
        None
    }
}

/// The loaded plugins: a reference must resolve to one of them.
impl PluginCatalog for PluginRegistry {
    fn check(&self, reference: &PluginRef) -> Result<(), String> {
        self.resolve(reference)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A catalog that takes every plugin and workflow: for reading the shape of
/// a workflow text that was checked when it was accepted (a run's stored
/// text, laid out for the console).
pub struct AnyPlugin;

impl PluginCatalog for AnyPlugin {
    fn check(&self, _reference: &PluginRef) -> Result<(), String> {
        Ok(())
    }

    fn workflow_calls(&self, _name: &str) -> Option<Vec<String>> {
        Some(Vec::new())
    }
}

/// A catalog that also knows which secrets are configured: workflows are
/// validated against it where a configuration exists (`serve`, `run`).
pub struct WithSecrets<'a> {
    pub plugins: &'a dyn PluginCatalog,
    pub secrets: &'a Secrets,
}

impl PluginCatalog for WithSecrets<'_> {
    fn check(&self, reference: &PluginRef) -> Result<(), String> {
        self.plugins.check(reference)
    }

    fn workflow_calls(&self, name: &str) -> Option<Vec<String>> {
        self.plugins.workflow_calls(name)
    }

    fn check_secret(&self, name: &str) -> Result<(), String> {
        if self.secrets.contains(name) {
            return Ok(());
        }
        let configured: Vec<&str> = self.secrets.names().collect();
        Err(if configured.is_empty() {
            format!(
                "secret \"{name}\" is not configured: trellis.toml has no [secrets] \
                 (add `{name} = {{ env = \"VAR\" }}` or `{{ file = \"PATH\" }}`)"
            )
        } else {
            format!(
                "secret \"{name}\" is not configured in [secrets] of trellis.toml (configured: {})",
                configured.join(", ")
            )
        })
    }
}

/// A catalog that also knows the workflows a sub-workflow step may call:
/// each one's name and the workflows it calls in turn (for cycles).
pub struct WithWorkflows<'a> {
    pub inner: &'a dyn PluginCatalog,
    pub workflows: &'a std::collections::HashMap<String, Vec<String>>,
}

impl PluginCatalog for WithWorkflows<'_> {
    fn check(&self, reference: &PluginRef) -> Result<(), String> {
        self.inner.check(reference)
    }

    fn check_secret(&self, name: &str) -> Result<(), String> {
        self.inner.check_secret(name)
    }

    fn workflow_calls(&self, name: &str) -> Option<Vec<String>> {
        self.workflows.get(name).cloned()
    }
}

/// A workflow's name (`name`, else `default_name`) and the workflows its
/// sub-workflow steps call, read from its text without validating it (a
/// workflow with errors still says what it calls). Text that is not TOML
/// calls nothing.
pub fn name_and_calls(source: &str, default_name: &str) -> (String, Vec<String>) {
    let Ok(table) = source.parse::<toml::Table>() else {
        return (default_name.to_owned(), Vec::new());
    };
    let name = table
        .get("name")
        .and_then(toml::Value::as_str)
        .unwrap_or(default_name)
        .to_owned();
    let mut calls: Vec<String> = Vec::new();
    let steps = table.get("step").and_then(toml::Value::as_array);
    for step in steps.into_iter().flatten() {
        if let Some(called) = step.get("workflow").and_then(toml::Value::as_str)
            && !calls.iter().any(|known| known == called)
        {
            calls.push(called.to_owned());
        }
    }
    (name, calls)
}
