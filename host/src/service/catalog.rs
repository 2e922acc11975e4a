//! The plugins and workflows the service serves: loaded from their dirs,
//! watched for changes, uploaded through the API, and a kept copy (blob) of
//! every plugin build a run may be pinned to.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Service;
use crate::plugin::{Plugin, PluginError, PluginRef, PluginRegistry};
use crate::record::RunRecord;
use crate::store::CatalogChange;
use crate::workflow::{self, Diagnostics, Plan, PluginCatalog};

/// How long a watched dir must be quiet before it is rescanned.
const WATCH_QUIET: Duration = Duration::from_millis(250);

/// Why a workflow was not added.
#[derive(Debug, thiserror::Error)]
pub enum PutWorkflowError {
    #[error("the workflow has errors:\n{0}")]
    Invalid(Arc<Diagnostics>),
    #[error("{0}")]
    Save(String),
}

/// Writes `file` in `dir` through a temporary file and a rename: a crash
/// leaves the old file or the new one, never half of one.
fn write_atomically(dir: &Path, file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(file).map_err(|e| e.error)?;
    Ok(())
}

/// Why an uploaded plugin was not activated.
#[derive(Debug, thiserror::Error)]
pub enum PutPluginError {
    /// Not a usable plugin: not wasm, a core module, another world, a bad
    /// `info()`. The previous versions keep serving.
    #[error("{0}")]
    Invalid(crate::plugin::PluginError),
    #[error("the component's info() names it `{actual}`, not `{expected}`")]
    WrongName { expected: String, actual: String },
    #[error(
        "{name} {version} is already loaded with another digest (sha256:{digest}): bump the version, or DELETE it first"
    )]
    Conflict {
        name: String,
        version: String,
        digest: String,
    },
    #[error("{0}")]
    Save(String),
}

/// A workflow file the service knows, valid or not.
#[derive(Debug, Clone)]
pub struct WorkflowEntry {
    pub name: String,
    pub file: String,
    pub source: String,
    pub plan: Result<Arc<Plan>, Arc<Diagnostics>>,
}

impl Service {
    pub(super) fn plan(&self, source: &str, file: &str, default_name: &str) -> WorkflowEntry {
        self.plan_among(source, file, default_name, &self.known_workflows())
    }

    /// Every workflow loaded (valid or not) and the workflows it calls.
    fn known_workflows(&self) -> HashMap<String, Vec<String>> {
        self.inner
            .workflows
            .read()
            .unwrap()
            .values()
            .map(|entry| match &entry.plan {
                Ok(plan) => (entry.name.clone(), plan.calls()),
                Err(_) => workflow::name_and_calls(&entry.source, &entry.name),
            })
            .collect()
    }

    /// Plans a workflow against the plugins, the secrets and `workflows` (the
    /// ones its sub-workflow steps may call).
    fn plan_among(
        &self,
        source: &str,
        file: &str,
        default_name: &str,
        workflows: &HashMap<String, Vec<String>>,
    ) -> WorkflowEntry {
        let secrets = crate::workflow::WithSecrets {
            plugins: self.inner.registry.as_ref(),
            secrets: self.inner.executor.secrets(),
        };
        let catalog = crate::workflow::WithWorkflows {
            inner: &secrets,
            workflows,
        };
        match workflow::parse_str(source, file, default_name, &catalog) {
            Ok(plan) => WorkflowEntry {
                name: plan.name.clone(),
                file: file.to_string(),
                source: source.to_string(),
                plan: Ok(Arc::new(plan)),
            },
            Err(diagnostics) => WorkflowEntry {
                name: default_name.to_string(),
                file: file.to_string(),
                source: source.to_string(),
                plan: Err(Arc::new(diagnostics)),
            },
        }
    }

    /// Adds or replaces a workflow from TOML text; refuses one with errors
    /// (the previous version stays). A valid one is written to the first
    /// workflow dir before it is used, so a restart still has it, and is
    /// shared with the other nodes of a cluster.
    pub async fn put_workflow(
        &self,
        name: &str,
        source: &str,
    ) -> Result<WorkflowEntry, PutWorkflowError> {
        let entry = self.activate_workflow(name, source)?;
        self.share(CatalogChange::PutWorkflow {
            name: name.to_owned(),
            source: source.to_owned(),
        })
        .await;
        Ok(entry)
    }

    /// [`Service::put_workflow`] on this node only.
    pub(super) fn activate_workflow(
        &self,
        name: &str,
        source: &str,
    ) -> Result<WorkflowEntry, PutWorkflowError> {
        let file = match &self.inner.workflow_dir {
            Some(dir) => dir.join(format!("{name}.toml")),
            None => PathBuf::from(format!("{name}.toml")),
        };
        let entry = self.plan(source, &file.display().to_string(), name);
        let plan = entry.plan.clone().map_err(PutWorkflowError::Invalid)?;
        if let Some(dir) = &self.inner.workflow_dir {
            write_atomically(dir, &file, source.as_bytes()).map_err(|e| {
                PutWorkflowError::Save(format!("cannot write {}: {e}", file.display()))
            })?;
        }
        let entry = WorkflowEntry {
            name: plan.name.clone(),
            ..entry
        };
        self.inner
            .workflows
            .write()
            .unwrap()
            .insert(entry.name.clone(), entry.clone());
        Ok(entry)
    }

    pub fn workflows(&self) -> Vec<WorkflowEntry> {
        self.inner
            .workflows
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect()
    }

    pub fn workflow(&self, name: &str) -> Option<WorkflowEntry> {
        self.inner.workflows.read().unwrap().get(name).cloned()
    }

    pub fn plugins(&self) -> Vec<Arc<Plugin>> {
        self.inner.registry.list()
    }

    /// Watches the plugin and workflow dirs: a file that appears, changes or
    /// goes is picked up after the dir has been quiet for a moment
    /// (debounced), validated first, and activated only if valid.
    pub fn watch(&self) -> Result<(), notify::Error> {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
                    let _ = tx.send(());
                }
            })?;
        for dir in self
            .inner
            .plugin_dirs
            .iter()
            .chain(&self.inner.workflow_dirs)
        {
            if dir.is_dir() {
                watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
            }
        }
        *self.inner.watcher.lock().unwrap() = Some(watcher);
        let service = self.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Debounce: a copy or an editor's save is several events.
                while let Ok(Some(())) = tokio::time::timeout(WATCH_QUIET, rx.recv()).await {}
                service.rescan().await;
            }
        });
        Ok(())
    }

    /// Brings plugins and workflows in line with the files in their dirs.
    pub async fn rescan(&self) {
        let _one_at_a_time = self.inner.rescan.lock().await;
        self.rescan_plugins().await;
        self.rescan_workflows();
    }

    async fn rescan_plugins(&self) {
        let registry = &self.inner.registry;
        let watched = |path: &Path| {
            self.inner
                .plugin_dirs
                .iter()
                .any(|dir| path.parent() == Some(dir.as_path()))
        };
        let mut current: BTreeMap<PathBuf, Arc<Plugin>> = registry
            .list()
            .into_iter()
            .filter_map(|p| {
                p.path
                    .clone()
                    .filter(|path| watched(path))
                    .map(|path| (path, p))
            })
            .collect();
        let files: Vec<PathBuf> = self
            .inner
            .plugin_dirs
            .iter()
            .flat_map(|dir| files_with_extension(dir, "wasm"))
            .collect();
        let mut errors = BTreeMap::new();
        for path in files {
            let old = current.remove(&path);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if old.as_ref().is_some_and(|old| old.digest == digest) {
                continue;
            }
            if old.is_none() && self.inner.plugin_errors.read().unwrap().contains_key(&path) {
                // Known bad, unless it changed: try again below only if so.
                if registry.list().iter().any(|p| p.digest == digest) {
                    continue;
                }
            }
            match registry.compile(&bytes, Some(path.clone())).await {
                Ok(plugin) => {
                    let label = plugin.label();
                    self.keep_blob(&plugin, &bytes);
                    if let Some(old) = &old {
                        registry.remove(&old.name, Some(&old.version));
                    }
                    match registry.insert(plugin) {
                        Ok(_) => {
                            tracing::info!(path = %path.display(), plugin = %label, digest, "plugin activated")
                        }
                        Err(err) => {
                            tracing::warn!(path = %path.display(), error = %err, "plugin not activated");
                            errors.insert(path, err.to_string());
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "plugin refused; the loaded version stays");
                    errors.insert(path, err.to_string());
                }
            }
        }
        for (path, gone) in current {
            registry.remove(&gone.name, Some(&gone.version));
            tracing::info!(path = %path.display(), plugin = %gone.label(), "plugin file removed: plugin removed");
        }
        *self.inner.plugin_errors.write().unwrap() = errors;
    }

    pub(super) fn rescan_workflows(&self) {
        let mut seen = std::collections::BTreeSet::new();
        // Every file first, so a workflow may call one that loads after it.
        let mut files = Vec::new();
        let mut known = self.known_workflows();
        for dir in &self.inner.workflow_dirs {
            for path in files_with_extension(dir, "toml") {
                let Ok(source) = std::fs::read_to_string(&path) else {
                    seen.insert(path.display().to_string());
                    continue;
                };
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("workflow")
                    .to_string();
                let (name, calls) = workflow::name_and_calls(&source, &stem);
                known.insert(name, calls);
                files.push((path, source, stem));
            }
        }
        for (path, source, stem) in files {
            let file = path.display().to_string();
            seen.insert(file.clone());
            {
                // A file that did not change is planned again only if it
                // had errors (a workflow it calls may have come since).
                let unchanged = self
                    .workflows()
                    .iter()
                    .any(|w| w.file == file && w.source == source && w.plan.is_ok());
                if unchanged {
                    continue;
                }
                let entry = self.plan_among(&source, &file, &stem, &known);
                let was_refused = self
                    .workflows()
                    .iter()
                    .any(|w| w.file == file && w.source == source);
                if was_refused && entry.plan.is_err() {
                    continue;
                }
                let mut workflows = self.inner.workflows.write().unwrap();
                match &entry.plan {
                    Ok(_) => {
                        tracing::info!(workflow = %entry.name, file, "workflow loaded");
                        workflows.insert(entry.name.clone(), entry);
                    }
                    Err(diagnostics) => {
                        let keeps_valid =
                            workflows.get(&entry.name).is_some_and(|w| w.plan.is_ok());
                        let waits_for_examples = diagnostics.iter().all(|diagnostic| {
                            diagnostic.message.contains(crate::config::BUILD_EXAMPLES)
                        });
                        if waits_for_examples {
                            // A fresh clone: not a failure, a step not taken yet.
                            tracing::info!(workflow = %entry.name,
                                "workflow not loaded: it uses example plugins that are not built yet; \
                                 `{}` builds them; then start `trellis serve` again:\n{diagnostics}",
                                crate::config::BUILD_EXAMPLES);
                        } else {
                            tracing::warn!(workflow = %entry.name, "workflow refused{}:\n{diagnostics}",
                                if keeps_valid { "; the loaded version stays" } else { "" });
                        }
                        if !keeps_valid {
                            workflows.insert(entry.name.clone(), entry);
                        }
                    }
                }
            }
        }
        let dirs: Vec<&PathBuf> = self.inner.workflow_dirs.iter().collect();
        self.inner.workflows.write().unwrap().retain(|name, entry| {
            let in_watched = dirs
                .iter()
                .any(|dir| Path::new(&entry.file).parent() == Some(dir.as_path()));
            let keep = !in_watched || seen.contains(&entry.file);
            if !keep {
                tracing::info!(workflow = %name, "workflow file removed: workflow removed");
            }
            keep
        });
    }

    /// Plugin files that could not be loaded, with the reason.
    pub fn plugin_errors(&self) -> Vec<(PathBuf, String)> {
        self.inner
            .plugin_errors
            .read()
            .unwrap()
            .iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }

    /// Stores the bytes of a plugin build by digest (once).
    /// Where the kept copy of the build with this sha256 (hex) lives.
    pub(super) fn blob_path(&self, digest: &str) -> PathBuf {
        self.inner.blobs.join(format!("{digest}.wasm"))
    }

    pub(super) fn keep_blob(&self, plugin: &Plugin, bytes: &[u8]) {
        let path = self.blob_path(&plugin.digest);
        if !path.exists()
            && let Err(err) = write_atomically(&self.inner.blobs, &path, bytes)
        {
            tracing::warn!(path = %path.display(), error = %err, "cannot keep a copy of the plugin");
        }
    }

    /// Validates and activates an uploaded plugin: compiled, checked against
    /// the world, `info()` answered, then written to the plugin dir and made
    /// visible. New runs use it at once; runs in flight keep what they have.
    /// A new build is shared with the other nodes of a cluster.
    pub async fn put_plugin(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(Arc<Plugin>, bool), PutPluginError> {
        let shared = self.is_clustered().then(|| bytes.clone());
        let (plugin, created) = self.activate_plugin(name, bytes).await?;
        if created && let Some(bytes) = shared {
            self.share(CatalogChange::PutPlugin {
                name: name.to_owned(),
                bytes,
            })
            .await;
        }
        Ok((plugin, created))
    }

    /// [`Service::put_plugin`] on this node only.
    pub(super) async fn activate_plugin(
        &self,
        name: &str,
        bytes: Vec<u8>,
    ) -> Result<(Arc<Plugin>, bool), PutPluginError> {
        let registry = &self.inner.registry;
        let plugin = registry
            .compile(&bytes, None)
            .await
            .map_err(PutPluginError::Invalid)?;
        if plugin.name != name {
            return Err(PutPluginError::WrongName {
                expected: name.to_string(),
                actual: plugin.name,
            });
        }
        if let Ok(existing) = registry.resolve(&PluginRef::version(name, plugin.version.clone())) {
            if existing.digest == plugin.digest {
                return Ok((existing, false));
            }
            return Err(PutPluginError::Conflict {
                name: name.to_string(),
                version: plugin.version.to_string(),
                digest: existing.digest.clone(),
            });
        }
        self.keep_blob(&plugin, &bytes);
        let mut plugin = plugin;
        let dir = &self.inner.plugin_dir;
        let file = dir.join(format!("{name}-{}.wasm", plugin.version));
        write_atomically(dir, &file, &bytes)
            .map_err(|e| PutPluginError::Save(format!("cannot write {}: {e}", file.display())))?;
        plugin.path = Some(file);
        let plugin = registry.insert(plugin).map_err(PutPluginError::Invalid)?;
        tracing::info!(plugin = %plugin.label(), digest = %plugin.digest, "plugin activated");
        Ok((plugin, true))
    }

    /// Removes every version of `name`, or one; their files go too. Runs in
    /// flight that use them finish with them. The other nodes of a cluster
    /// remove them too.
    pub async fn delete_plugin(
        &self,
        name: &str,
        version: Option<&semver::Version>,
    ) -> Vec<Arc<Plugin>> {
        let removed = self.remove_plugin(name, version);
        if !removed.is_empty() {
            self.share(CatalogChange::DeletePlugin {
                name: name.to_owned(),
                version: version.map(ToString::to_string),
            })
            .await;
        }
        removed
    }

    /// [`Service::delete_plugin`] on this node only.
    pub(super) fn remove_plugin(
        &self,
        name: &str,
        version: Option<&semver::Version>,
    ) -> Vec<Arc<Plugin>> {
        let removed = self.inner.registry.remove(name, version);
        for plugin in &removed {
            if let Some(path) = &plugin.path
                && let Err(err) = std::fs::remove_file(path)
            {
                tracing::warn!(path = %path.display(), error = %err, "cannot delete the plugin file");
            }
            tracing::info!(plugin = %plugin.label(), "plugin removed");
        }
        removed
    }

    /// Makes the builds that unfinished runs were pinned to resolvable again,
    /// from the kept copies, when the plugin dirs no longer have them.
    pub(super) async fn restore_pinned(&self, runs: &[&RunRecord]) {
        let registry = &self.inner.registry;
        let mut wanted = std::collections::BTreeSet::new();
        for run in runs {
            for step in &run.steps {
                // The record keeps the reference as text, checked when the
                // run was accepted.
                if let Some(digest) = step
                    .plugin_digest
                    .as_deref()
                    .and_then(|d| d.strip_prefix("sha256:"))
                    && let Ok(reference) = step.plugin.parse::<PluginRef>()
                    && registry
                        .resolve(&PluginRef::digest(reference.name, digest))
                        .is_err()
                {
                    wanted.insert(digest.to_string());
                }
            }
        }
        for digest in wanted {
            match self.restore_build(&digest).await {
                Ok(plugin) => {
                    tracing::info!(plugin = %plugin.label(), digest, "restored a pinned plugin build");
                }
                Err(err) => tracing::warn!(digest, error = %err, "a pinned plugin build is gone"),
            }
        }
    }

    /// Build `digest` from the kept copy, resolvable by digest from now on
    /// (retired: not the active version).
    pub(super) async fn restore_build(&self, digest: &str) -> Result<Arc<Plugin>, PluginError> {
        let registry = &self.inner.registry;
        let plugin = Arc::new(registry.load_file(&self.blob_path(digest)).await?);
        registry.retire(plugin.clone());
        Ok(plugin)
    }
}

/// The files of `dir` (not recursive) whose extension is `extension`, sorted;
/// none (with a warning) if the dir cannot be read.
fn files_with_extension(dir: &Path, extension: &str) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!(dir = %dir.display(), error = %err, "cannot read the dir");
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == extension) && p.is_file())
        .collect();
    files.sort();
    files
}

/// The catalog a resumed run is planned against: the loaded plugins and the
/// retired builds that runs are pinned to.
pub(super) struct PinnedCatalog<'a>(pub(super) &'a PluginRegistry);

impl PluginCatalog for PinnedCatalog<'_> {
    /// Any: the run was checked when it was accepted, and a child workflow
    /// is looked up again when its step starts.
    fn workflow_calls(&self, _name: &str) -> Option<Vec<String>> {
        Some(Vec::new())
    }

    fn check(&self, reference: &PluginRef) -> Result<(), String> {
        if self.0.resolve(reference).is_ok() || self.0.has_retired(&reference.name) {
            Ok(())
        } else {
            self.0
                .resolve(reference)
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::test_service;

    /// No plugin is loaded in these tests, so every step's plugin is unknown.
    const BROKEN: &str = "[[step]]\nid = \"a\"\nplugin = \"missing\"\n";

    #[tokio::test]
    async fn workflow_files_are_listed_with_their_errors() {
        let (_dir, service) = test_service(&[("broken.toml", BROKEN)]).await;
        let entry = service.workflow("broken").expect("listed by its file stem");
        let diagnostics = entry.plan.expect_err("no plugin is loaded");
        assert!(diagnostics.to_string().contains("missing"), "{diagnostics}");
        assert_eq!(service.workflows().len(), 1);
        assert!(service.plugins().is_empty());
    }

    #[tokio::test]
    async fn an_invalid_upload_is_refused_and_not_written() {
        let (dir, service) = test_service(&[]).await;
        match service.put_workflow("new", BROKEN).await {
            Err(PutWorkflowError::Invalid(diagnostics)) => {
                assert!(diagnostics.to_string().contains("missing"), "{diagnostics}")
            }
            other => panic!("accepted an invalid workflow: {other:?}"),
        }
        assert!(!dir.path().join("workflows/new.toml").exists());
        assert!(service.workflow("new").is_none());
    }

    #[tokio::test]
    async fn a_rescan_follows_the_workflow_dir() {
        let (dir, service) = test_service(&[("one.toml", BROKEN)]).await;
        let workflows = dir.path().join("workflows");
        std::fs::write(workflows.join("two.toml"), BROKEN).unwrap();
        std::fs::remove_file(workflows.join("one.toml")).unwrap();
        service.rescan().await;
        let names: Vec<String> = service.workflows().into_iter().map(|w| w.name).collect();
        assert_eq!(names, ["two"]);
    }

    #[test]
    fn files_are_found_by_extension_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["b.wasm", "a.wasm", "c.toml"] {
            std::fs::write(dir.path().join(file), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("d.wasm")).unwrap();
        assert_eq!(
            files_with_extension(dir.path(), "wasm"),
            [dir.path().join("a.wasm"), dir.path().join("b.wasm")]
        );
        assert!(files_with_extension(&dir.path().join("none"), "wasm").is_empty());
    }

    #[test]
    fn a_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/w.toml");
        write_atomically(&dir.path().join("sub"), &file, b"old").unwrap();
        write_atomically(&dir.path().join("sub"), &file, b"new").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"new");
        assert_eq!(
            std::fs::read_dir(dir.path().join("sub")).unwrap().count(),
            1
        );
    }
}
