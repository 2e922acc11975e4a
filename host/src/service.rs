//! The long-running side of Trellis, behind the HTTP API: accepts runs
//! durably, runs them, resumes unfinished runs on start, answers status,
//! cancels, and streams each run's events (replayed to late subscribers).
//!
//! The API layer (`api`) only translates HTTP to these calls.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::{CodeCache, Engine};
use crate::executor::{Executor, RunObserver, RunOptions, queued_record};
use crate::plugin::{Plugin, PluginRegistry, StateStore};
use crate::record::{
    LogLine, Progress, RunRecord, RunStatus, StepRecord, StepStatus, new_run_id, now_rfc3339,
};
use crate::store::{
    Created, NewRun, RunPage, RunQuery, SqliteStore, Store, StoreError, StoredItems,
};
use crate::workflow::{self, Diagnostics, Plan, SchemaViolation};

/// How long a watched dir must be quiet before it is rescanned.
const WATCH_QUIET: Duration = Duration::from_millis(250);

/// Events of one run kept for replay; past this, the oldest log events are
/// dropped (step events are always kept).
const MAX_REPLAY_LOGS: usize = 10_000;
/// Live events a slow subscriber may lag behind before it is cut off.
const EVENT_BUFFER: usize = 1024;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("cannot set up plugins: {0}")]
    Plugins(#[from] crate::plugin::PluginError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("the `{0}` store is not supported yet: use store = \"sqlite\"")]
    UnsupportedStore(String),
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a run was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no workflow named `{0}`")]
    UnknownWorkflow(String),
    #[error("workflow `{name}` has errors and refuses runs until fixed:\n{diagnostics}")]
    InvalidWorkflow { name: String, diagnostics: String },
    #[error("the input does not match the workflow's input schema")]
    InvalidInput(Vec<SchemaViolation>),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

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

/// Why a run could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no run with id `{0}`")]
    NotFound(String),
    #[error("run `{id}` already finished ({status:?})")]
    Finished { id: String, status: RunStatus },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A run was accepted (or an earlier one with the same idempotency key found).
#[derive(Debug, Clone)]
pub struct Submitted {
    pub run: RunRecord,
    /// `false`: the idempotency key matched an earlier run, which this is.
    pub created: bool,
}

/// A workflow file the service knows, valid or not.
#[derive(Debug, Clone)]
pub struct WorkflowEntry {
    pub name: String,
    pub file: String,
    pub source: String,
    pub plan: Result<Arc<Plan>, Arc<Diagnostics>>,
}

/// One event of a run, as the event stream sends it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    StepStarted {
        seq: u64,
        step: String,
        attempt: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        item: Option<usize>,
    },
    Log {
        seq: u64,
        step: String,
        line: LogLine,
    },
    Progress {
        seq: u64,
        step: String,
        progress: Progress,
    },
    StepFinished {
        seq: u64,
        step: StepRecord,
    },
    RunFinished {
        seq: u64,
        run: RunRecord,
    },
}

impl RunEvent {
    pub fn seq(&self) -> u64 {
        match self {
            RunEvent::StepStarted { seq, .. }
            | RunEvent::Log { seq, .. }
            | RunEvent::Progress { seq, .. }
            | RunEvent::StepFinished { seq, .. }
            | RunEvent::RunFinished { seq, .. } => *seq,
        }
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            RunEvent::StepStarted { .. } => "step_started",
            RunEvent::Log { .. } => "log",
            RunEvent::Progress { .. } => "progress",
            RunEvent::StepFinished { .. } => "step_finished",
            RunEvent::RunFinished { .. } => "run_finished",
        }
    }
}

/// What a subscriber gets: the events so far, then live ones (if the run is
/// still going). The stream ends after `run_finished`.
pub struct EventSubscription {
    pub replay: Vec<RunEvent>,
    pub live: Option<broadcast::Receiver<RunEvent>>,
}

/// The service. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

struct Inner {
    executor: Executor,
    store: Arc<dyn Store>,
    registry: Arc<PluginRegistry>,
    workflows: RwLock<BTreeMap<String, WorkflowEntry>>,
    /// Where `PUT /v1/workflows/{name}` writes: the first workflow dir.
    workflow_dir: Option<PathBuf>,
    /// Where `PUT /v1/plugins/{name}` writes: `<data_dir>/uploads`, the first
    /// plugin dir (uploads are data, like runs: never written into build
    /// output or a directory the operator manages).
    plugin_dir: PathBuf,
    /// The plugin dirs, watched for files that appear, change or go.
    plugin_dirs: Vec<PathBuf>,
    /// The workflow dirs, likewise.
    workflow_dirs: Vec<PathBuf>,
    /// Plugin files that are not usable, with the reason (listed by
    /// `GET /v1/plugins`); the version loaded before stays active.
    plugin_errors: RwLock<BTreeMap<PathBuf, String>>,
    /// Serialises rescans of the watched dirs.
    rescan: tokio::sync::Mutex<()>,
    /// Kept alive while the service runs.
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
    /// Every plugin build this service has run, by digest
    /// (`<data dir>/plugins/<hex>.wasm`): a run resumed after a restart gets
    /// the exact bytes it started with, even if the plugin was replaced.
    blobs: PathBuf,
    active: Mutex<HashMap<String, Arc<ActiveRun>>>,
    /// Set when the service shuts down: no new runs start.
    closing: CancellationToken,
}

impl Service {
    /// Loads plugins and workflows, opens the store, resumes unfinished runs.
    pub async fn start(config: &Config) -> Result<Service, StartError> {
        if let crate::config::StoreKind::Postgres(url) = &config.store {
            return Err(StartError::UnsupportedStore(url.clone()));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let engine = Engine::new()?;
        let registry =
            PluginRegistry::new(engine)?.with_cache(CodeCache::new(config.data_dir.join("cache")));
        let uploads = config.data_dir.join("uploads");
        std::fs::create_dir_all(&uploads).map_err(|source| StartError::DataDir {
            path: uploads.clone(),
            source,
        })?;
        let plugin_dirs: Vec<PathBuf> = std::iter::once(uploads.clone())
            .chain(
                config
                    .plugin_dirs
                    .iter()
                    .filter(|dir| **dir != uploads)
                    .cloned(),
            )
            .collect();
        let report = registry.load_dirs(&plugin_dirs).await;
        for (path, err) in &report.errors {
            tracing::warn!(path = %path.display(), error = %err, "plugin not loaded");
        }
        tracing::info!(plugins = report.loaded, "plugins loaded");
        let registry = Arc::new(registry);

        let durability = match config.durability {
            crate::config::Durability::Normal => crate::store::Durability::Normal,
            crate::config::Durability::Fsync => crate::store::Durability::Fsync,
        };
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&config.data_dir.join("trellis.db"), durability)?
                .with_state_quota(config.state_quota),
        );
        let executor = Executor::new(
            registry.clone(),
            config.limits,
            config.max_concurrent_steps,
            Arc::new(DurableState(store.clone())),
        )
        .with_secrets(crate::secrets::Secrets::new(config.secrets.clone()));
        let service = Service {
            inner: Arc::new(Inner {
                executor,
                store,
                registry,
                workflows: RwLock::new(BTreeMap::new()),
                workflow_dir: config.workflow_dirs.first().cloned(),
                plugin_dir: uploads,
                plugin_dirs,
                workflow_dirs: config.workflow_dirs.clone(),
                plugin_errors: RwLock::new(
                    report
                        .errors
                        .iter()
                        .map(|(path, err)| (path.clone(), err.to_string()))
                        .collect(),
                ),
                rescan: tokio::sync::Mutex::new(()),
                watcher: Mutex::new(None),
                blobs: config.data_dir.join("plugins"),
                active: Mutex::new(HashMap::new()),
                closing: CancellationToken::new(),
            }),
        };
        // A copy of every build a run may pin; read again only when there is
        // none yet (a warm start reads nothing).
        for plugin in service.inner.registry.list() {
            if let Some(path) = &plugin.path
                && !service.blob_path(&plugin.digest).exists()
            {
                match std::fs::read(path) {
                    Ok(bytes) => service.keep_blob(&plugin, &bytes),
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err, "cannot keep a copy of the plugin")
                    }
                }
            }
        }
        service.rescan_workflows();
        service.recover().await?;
        Ok(service)
    }

    fn plan(&self, source: &str, file: &str, default_name: &str) -> WorkflowEntry {
        let catalog = crate::secrets::WithSecrets {
            plugins: self.inner.registry.as_ref(),
            secrets: self.inner.executor.secrets(),
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
    /// workflow dir before it is used, so a restart still has it.
    pub fn put_workflow(
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

    fn rescan_workflows(&self) {
        let mut seen = std::collections::BTreeSet::new();
        for dir in &self.inner.workflow_dirs {
            for path in files_with_extension(dir, "toml") {
                let file = path.display().to_string();
                seen.insert(file.clone());
                let Ok(source) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let unchanged = self
                    .workflows()
                    .iter()
                    .any(|w| w.file == file && w.source == source);
                if unchanged {
                    continue;
                }
                let stem = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("workflow")
                    .to_string();
                let entry = self.plan(&source, &file, &stem);
                let mut workflows = self.inner.workflows.write().unwrap();
                match &entry.plan {
                    Ok(_) => {
                        tracing::info!(workflow = %entry.name, file, "workflow loaded");
                        workflows.insert(entry.name.clone(), entry);
                    }
                    Err(diagnostics) => {
                        let keeps_valid =
                            workflows.get(&entry.name).is_some_and(|w| w.plan.is_ok());
                        tracing::warn!(workflow = %entry.name, "workflow refused{}:\n{diagnostics}",
                            if keeps_valid { "; the loaded version stays" } else { "" });
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
    fn blob_path(&self, digest: &str) -> PathBuf {
        self.inner.blobs.join(format!("{digest}.wasm"))
    }

    fn keep_blob(&self, plugin: &Plugin, bytes: &[u8]) {
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
    pub async fn put_plugin(
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
        if let Ok(existing) = registry.resolve(&format!("{name}@{}", plugin.version)) {
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
    /// flight that use them finish with them.
    pub fn delete_plugin(&self, name: &str, version: Option<&semver::Version>) -> Vec<Arc<Plugin>> {
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
    async fn restore_pinned(&self, runs: &[crate::store::UnfinishedRun]) {
        let registry = &self.inner.registry;
        let mut wanted = std::collections::BTreeSet::new();
        for run in runs {
            for step in &run.record.steps {
                if let Some(digest) = step
                    .plugin_digest
                    .as_deref()
                    .and_then(|d| d.strip_prefix("sha256:"))
                {
                    let name = step.plugin.split('@').next().unwrap_or(&step.plugin);
                    if registry
                        .resolve(&format!("{name}@sha256:{digest}"))
                        .is_err()
                    {
                        wanted.insert(digest.to_string());
                    }
                }
            }
        }
        for digest in wanted {
            let path = self.blob_path(&digest);
            match registry.load_file(&path).await {
                Ok(plugin) => {
                    tracing::info!(plugin = %plugin.label(), digest, "restored a pinned plugin build");
                    registry.retire(Arc::new(plugin));
                }
                Err(err) => tracing::warn!(digest, error = %err, "a pinned plugin build is gone"),
            }
        }
    }

    /// Accepts a run: durable when this returns, then started.
    pub async fn submit(
        &self,
        name: &str,
        input: Value,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, SubmitError> {
        if self.inner.closing.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let entry = self
            .workflow(name)
            .ok_or_else(|| SubmitError::UnknownWorkflow(name.to_string()))?;
        let plan = match &entry.plan {
            Ok(plan) => plan.clone(),
            Err(diagnostics) => {
                return Err(SubmitError::InvalidWorkflow {
                    name: name.to_string(),
                    diagnostics: diagnostics.to_string(),
                });
            }
        };
        if let Some(schema) = &plan.input_schema {
            schema.validate(&input).map_err(SubmitError::InvalidInput)?;
        }
        let mut record = queued_record(&plan, new_run_id(), input);
        // Pinned before it is stored: a restart resumes it with these builds.
        // A plugin gone since the workflow loaded fails the run when it starts.
        let _ = self.inner.executor.pin(&plan, &mut record);
        // Registered before it is stored, so an event subscriber or a cancel
        // that sees it stored also finds it here.
        let active = Arc::new(ActiveRun::new(record.clone()));
        self.inner
            .active
            .lock()
            .unwrap()
            .insert(record.id.clone(), active.clone());
        let created = self
            .inner
            .store
            .create_run(NewRun {
                record: &record,
                workflow_source: &entry.source,
                workflow_file: &entry.file,
                idempotency_key,
            })
            .await;
        match created {
            Ok(Created::New) => {}
            Ok(Created::Existing(existing)) => {
                self.inner.active.lock().unwrap().remove(&record.id);
                let run = self.live(&existing.id).unwrap_or(*existing);
                return Ok(Submitted {
                    run,
                    created: false,
                });
            }
            Err(err) => {
                self.inner.active.lock().unwrap().remove(&record.id);
                return Err(err.into());
            }
        }
        crate::telemetry::run_accepted(&plan.name);
        self.spawn(plan, record.clone(), StoredItems::new(), active);
        Ok(Submitted {
            run: record,
            created: true,
        })
    }

    /// Runs `record` in the background; `items` are the `for_each` items a
    /// resumed run had stored.
    fn spawn(
        &self,
        plan: Arc<Plan>,
        record: RunRecord,
        items: StoredItems,
        active: Arc<ActiveRun>,
    ) {
        let service = self.clone();
        let span = tracing::info_span!("run", run_id = %record.id, workflow = %record.workflow);
        let run = async move {
            let options = RunOptions {
                run_id: Some(record.id.clone()),
                observer: Some(active.clone()),
                cancel: active.cancel.clone(),
                store: Some(service.inner.store.clone()),
                items,
            };
            let record = service.inner.executor.execute(plan, record, options).await;
            crate::telemetry::run_finished(&record.workflow, record.status.as_str());
            service.retire(&active, record);
        };
        tokio::spawn(tracing::Instrument::instrument(run, span));
    }

    /// Resumes every run that was queued or running when the process stopped.
    async fn recover(&self) -> Result<(), StoreError> {
        let unfinished = self.inner.store.unfinished_runs().await?;
        if !unfinished.is_empty() {
            tracing::info!(runs = unfinished.len(), "resuming unfinished runs");
        }
        self.restore_pinned(&unfinished).await;
        for mut run in unfinished {
            // Before its live snapshot is made, so `GET /v1/runs/{id}` shows
            // the attempts the stop cut short as interrupted, not running.
            crate::executor::prepare_resume(&mut run.record, &mut run.items);
            let name = run.record.workflow.clone();
            let entry = match workflow::parse_str(
                &run.workflow_source,
                &run.workflow_file,
                &name,
                &PinnedCatalog(&self.inner.registry),
            ) {
                Ok(plan) => WorkflowEntry {
                    name: name.clone(),
                    file: run.workflow_file.clone(),
                    source: run.workflow_source.clone(),
                    plan: Ok(Arc::new(plan)),
                },
                Err(diagnostics) => WorkflowEntry {
                    name: name.clone(),
                    file: run.workflow_file.clone(),
                    source: run.workflow_source.clone(),
                    plan: Err(Arc::new(diagnostics)),
                },
            };
            let active = Arc::new(ActiveRun::new(run.record.clone()));
            self.inner
                .active
                .lock()
                .unwrap()
                .insert(run.record.id.clone(), active.clone());
            match entry.plan {
                Ok(plan) => self.spawn(plan, run.record, run.items, active),
                Err(diagnostics) => {
                    // The definition it started with no longer plans (a plugin
                    // it needs is gone): it cannot go on.
                    let mut record = run.record;
                    record.status = RunStatus::Failed;
                    record.finished_at = Some(now_rfc3339());
                    record.error = Some(crate::record::RunError {
                        step: None,
                        kind: crate::record::ErrorKind::Plugin,
                        message: format!(
                            "cannot resume the run: its workflow no longer loads:\n{diagnostics}"
                        ),
                    });
                    self.inner.store.finish_run(&record).await?;
                    self.retire(&active, record);
                }
            }
        }
        Ok(())
    }

    /// Ends a run this process was running, once the store holds its
    /// finished `record`. It leaves `active` before its waiters hear of the
    /// end, so a client that got its finished run never sees it counted as
    /// in flight; anyone who looks in between reads the store.
    fn retire(&self, active: &ActiveRun, record: RunRecord) {
        self.inner.active.lock().unwrap().remove(&record.id);
        active.finish(record);
    }

    fn live(&self, id: &str) -> Option<RunRecord> {
        let active = self.inner.active.lock().unwrap().get(id).cloned()?;
        Some(active.snapshot())
    }

    /// The run: live while it runs, from the store once finished.
    pub async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        if let Some(run) = self.live(id) {
            return Ok(Some(run));
        }
        self.inner.store.get_run(id).await
    }

    pub async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        self.inner.store.list_runs(query).await
    }

    /// The finished run, or `None` if it is still running after `timeout`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<RunRecord>, StoreError> {
        let active = self.inner.active.lock().unwrap().get(id).cloned();
        match active {
            Some(active) => {
                let mut done = active.done.subscribe();
                let finished = tokio::time::timeout(timeout, done.wait_for(|d| d.is_some())).await;
                Ok(match finished {
                    Ok(Ok(record)) => record.clone(),
                    _ => None,
                })
            }
            None => Ok(self
                .inner
                .store
                .get_run(id)
                .await?
                .filter(|r| r.status.is_terminal())),
        }
    }

    /// Stops a run: running attempts stop at the next epoch tick.
    pub async fn cancel(&self, id: &str) -> Result<RunRecord, CancelError> {
        let active = self.inner.active.lock().unwrap().get(id).cloned();
        if let Some(active) = active {
            active.cancel.cancel();
            let mut done = active.done.subscribe();
            if let Ok(Ok(record)) =
                tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| d.is_some())).await
                && let Some(record) = record.clone()
            {
                return Ok(record);
            }
            return Ok(active.snapshot());
        }
        match self.inner.store.get_run(id).await? {
            None => Err(CancelError::NotFound(id.to_string())),
            Some(run) => Err(CancelError::Finished {
                id: id.to_string(),
                status: run.status,
            }),
        }
    }

    /// The run's events so far and, while it runs, the live ones.
    pub async fn events(&self, id: &str) -> Result<Option<EventSubscription>, StoreError> {
        let active = self.inner.active.lock().unwrap().get(id).cloned();
        if let Some(active) = active {
            return Ok(Some(active.subscribe()));
        }
        Ok(self
            .inner
            .store
            .get_run(id)
            .await?
            .map(|run| EventSubscription {
                replay: replay(&run),
                live: None,
            }))
    }

    /// Runs in this process that have not finished.
    pub fn in_flight(&self) -> usize {
        self.inner.active.lock().unwrap().len()
    }

    /// Stops accepting new work (for a graceful shutdown).
    pub fn close(&self) {
        self.inner.closing.cancel();
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

/// The events a finished run had, rebuilt from its record.
fn replay(run: &RunRecord) -> Vec<RunEvent> {
    let mut events = Vec::new();
    let mut seq = 0;
    let mut next = || {
        seq += 1;
        seq
    };
    for step in &run.steps {
        for attempt in &step.attempts {
            events.push(RunEvent::StepStarted {
                seq: next(),
                step: step.id.clone(),
                attempt: attempt.attempt,
                item: attempt.item,
            });
            for line in &attempt.logs {
                events.push(RunEvent::Log {
                    seq: next(),
                    step: step.id.clone(),
                    line: line.clone(),
                });
            }
        }
        if !matches!(step.status, StepStatus::Pending | StepStatus::Running) {
            events.push(RunEvent::StepFinished {
                seq: next(),
                step: step.clone(),
            });
        }
    }
    if run.status.is_terminal() {
        events.push(RunEvent::RunFinished {
            seq: next(),
            run: run.clone(),
        });
    }
    events
}

/// A run going on in this process: its live record and its event log.
struct ActiveRun {
    cancel: CancellationToken,
    state: Mutex<ActiveState>,
    done: watch::Sender<Option<RunRecord>>,
}

struct ActiveState {
    snapshot: RunRecord,
    events: Vec<RunEvent>,
    logs_kept: usize,
    seq: u64,
    /// Made by the first subscriber: a channel preallocates its buffer
    /// (`EVENT_BUFFER` events, ~0.3 MiB), and most runs are never followed.
    live: Option<broadcast::Sender<RunEvent>>,
}

impl ActiveRun {
    fn new(record: RunRecord) -> ActiveRun {
        let events = replay(&record);
        let seq = events.len() as u64;
        ActiveRun {
            cancel: CancellationToken::new(),
            state: Mutex::new(ActiveState {
                snapshot: record,
                logs_kept: 0,
                events,
                seq,
                live: None,
            }),
            done: watch::channel(None).0,
        }
    }

    fn snapshot(&self) -> RunRecord {
        self.state.lock().unwrap().snapshot.clone()
    }

    fn subscribe(&self) -> EventSubscription {
        let mut state = self.state.lock().unwrap();
        // Under the lock: no event falls between the replay and the receiver.
        let live = state
            .live
            .get_or_insert_with(|| broadcast::channel(EVENT_BUFFER).0)
            .subscribe();
        EventSubscription {
            replay: state.events.clone(),
            live: Some(live),
        }
    }

    /// Records an event and sends it to live subscribers.
    fn emit(&self, make: impl FnOnce(u64) -> RunEvent, update: impl FnOnce(&mut RunRecord)) {
        let mut state = self.state.lock().unwrap();
        update(&mut state.snapshot);
        state.seq += 1;
        let event = make(state.seq);
        let is_log = matches!(event, RunEvent::Log { .. });
        if !is_log || state.logs_kept < MAX_REPLAY_LOGS {
            state.logs_kept += usize::from(is_log);
            state.events.push(event.clone());
        }
        if let Some(live) = &state.live {
            let _ = live.send(event);
        }
    }

    /// Changes the snapshot without an event.
    fn update(&self, update: impl FnOnce(&mut RunRecord)) {
        update(&mut self.state.lock().unwrap().snapshot);
    }

    fn finish(&self, record: RunRecord) {
        let run = record.clone();
        self.emit(
            |seq| RunEvent::RunFinished { seq, run },
            |snapshot| *snapshot = record.clone(),
        );
        self.done.send_replace(Some(record));
    }
}

impl RunObserver for ActiveRun {
    fn step_started(&self, step: &str, attempt: u32, item: Option<usize>) {
        let id = step.to_string();
        self.emit(
            |seq| RunEvent::StepStarted {
                seq,
                step: id,
                attempt,
                item,
            },
            |snapshot| {
                snapshot.status = RunStatus::Running;
                if let Some(record) = step_mut(snapshot, step) {
                    record.status = StepStatus::Running;
                    record.started_at.get_or_insert_with(now_rfc3339);
                }
            },
        );
    }

    fn step_log(&self, step: &str, line: &LogLine) {
        let (step, line) = (step.to_string(), line.clone());
        self.emit(|seq| RunEvent::Log { seq, step, line }, |_| {});
    }

    fn step_progress(&self, step: &str, progress: &crate::record::Progress) {
        let (step, progress) = (step.to_string(), progress.clone());
        self.emit(
            |seq| RunEvent::Progress {
                seq,
                step,
                progress,
            },
            |_| {},
        );
    }

    fn step_items(&self, step: &str, count: usize) {
        self.update(|snapshot| {
            if let Some(record) = step_mut(snapshot, step) {
                record.items = Some(count);
            }
        });
    }

    /// Shown by `GET /v1/runs/{id}` while the step goes on: a fan-out's
    /// finished items, a retried step's failed attempts.
    fn attempt_finished(&self, step: &str, attempt: &crate::record::AttemptRecord) {
        self.update(|snapshot| {
            if let Some(record) = step_mut(snapshot, step) {
                record.attempts.push(attempt.clone());
            }
        });
    }

    fn step_finished(&self, step: &StepRecord) {
        let finished = step.clone();
        self.emit(
            |seq| RunEvent::StepFinished {
                seq,
                step: finished,
            },
            |snapshot| {
                if let Some(record) = step_mut(snapshot, &step.id) {
                    *record = step.clone();
                }
            },
        );
    }
}

/// The step `id` of a run's snapshot.
fn step_mut<'a>(snapshot: &'a mut RunRecord, id: &str) -> Option<&'a mut StepRecord> {
    snapshot.steps.iter_mut().find(|s| s.id == id)
}

/// The catalog a resumed run is planned against: the loaded plugins and the
/// retired builds that runs are pinned to.
struct PinnedCatalog<'a>(&'a PluginRegistry);

impl workflow::PluginCatalog for PinnedCatalog<'_> {
    fn check(&self, reference: &str) -> Result<(), String> {
        let name = reference.split('@').next().unwrap_or(reference);
        if self.0.resolve(reference).is_ok() || self.0.has_retired(name) {
            Ok(())
        } else {
            self.0
                .resolve(reference)
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

/// Plugin `state` kept in the store.
struct DurableState(Arc<dyn Store>);

#[async_trait::async_trait]
impl StateStore for DurableState {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.0
            .state_get(scope, key)
            .await
            .map_err(|e| e.to_string())
    }
    async fn set(&self, scope: &str, key: &str, value: Vec<u8>) -> Result<(), String> {
        self.0
            .state_set(scope, key, &value)
            .await
            .map_err(|e| e.to_string())
    }
    async fn delete(&self, scope: &str, key: &str) -> Result<(), String> {
        self.0
            .state_delete(scope, key)
            .await
            .map_err(|e| e.to_string())
    }
}
