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
}

/// The loaded plugins: a reference must resolve to one of them.
impl PluginCatalog for PluginRegistry {
    fn check(&self, reference: &PluginRef) -> Result<(), String> {
        self.resolve(reference)
            .map(|_| ())
            .map_err(|e| e.to_string())
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
