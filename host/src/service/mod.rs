//! The long-running side of Trellis, behind the HTTP API: accepts runs
//! durably, runs them, resumes unfinished runs on start, answers status,
//! cancels, and streams each run's events (replayed to late subscribers).
//!
//! The API layer (`api`) only translates HTTP to these calls. Three jobs, a
//! file each, all methods of the one [`Service`]:
//!
//! - `catalog`: the plugins and workflows it serves: loading, watching their
//!   dirs, uploads, and the kept copies (blobs) of every plugin build a run
//!   may be pinned to;
//! - `runs`: the run lifecycle: submit, recover after a restart, wait, cancel;
//! - `events`: each run's live record and event stream while it runs;
//! - `children`: the child runs of sub-workflow steps.
//!
//! This file starts the service and holds what the three share.

mod catalog;
mod children;
mod cluster;
mod events;
mod runs;
mod tasks;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use crate::config::{Config, StoreKind};
use crate::engine::{CodeCache, Engine};
use crate::executor::Executor;
use crate::plugin::{PluginRegistry, StateStore};
use crate::store::{PgStore, SqliteStore, Store, StoreError};

pub use catalog::{PutPluginError, PutWorkflowError, WorkflowEntry};
use events::ActiveRun;
pub use events::{EventSubscription, RunEvent};
pub use runs::{Again, CancelError, SubmitError, Submitted};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    #[error("cannot set up plugins: {0}")]
    Plugins(#[from] crate::plugin::PluginError),
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The configured database cannot be used (unreachable, refusing us, a
    /// newer schema, another node on it): a problem of the configuration or
    /// the environment, which `trellis serve` exits 2 on.
    #[error("cannot use the store: {0}")]
    StoreUnusable(#[source] StoreError),
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
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
    /// On PostgreSQL: this node's place in the cluster.
    cluster: Option<cluster::Cluster>,
    /// This node's name (`node_id`, or `<hostname>-<pid>`).
    node_id: String,
    started_at: String,
    /// The DAG layouts of the workflow versions runs were asked about, by
    /// the SHA-256 of the workflow's text (see [`Service::run_layout`]).
    layouts: Mutex<HashMap<[u8; 32], Arc<crate::workflow::Layout>>>,
}

impl Service {
    /// Loads plugins and workflows, opens the store, resumes unfinished runs.
    pub async fn start(config: &Config) -> Result<Service, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        // First, so that a database that cannot be reached fails the start
        // at once, not after every plugin is compiled.
        let (store, postgres) = open_store(config).await?;
        let node_id = config
            .node_id
            .clone()
            .unwrap_or_else(cluster::default_node_id);
        let cluster = postgres.map(|store| cluster::Cluster {
            store,
            lease: config.lease,
            catalog_seq: tokio::sync::Mutex::new(0),
            wake: tokio::sync::Notify::new(),
            ready_waiting: std::sync::atomic::AtomicBool::new(false),
            waiters: std::sync::Mutex::default(),
            peers: std::sync::atomic::AtomicUsize::new(0),
        });
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
                cluster,
                node_id,
                started_at: crate::record::now_rfc3339(),
                layouts: Mutex::new(HashMap::new()),
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
        if service.inner.cluster.is_some() {
            service.join_cluster().await?;
        } else {
            service.recover().await?;
        }
        Ok(service)
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

/// The configured store, opened and migrated; on PostgreSQL, the same store
/// as the cluster's.
async fn open_store(config: &Config) -> Result<(Arc<dyn Store>, Option<Arc<PgStore>>), StartError> {
    match &config.store {
        StoreKind::Sqlite => {
            let durability = match config.durability {
                crate::config::Durability::Normal => crate::store::Durability::Normal,
                crate::config::Durability::Fsync => crate::store::Durability::Fsync,
            };
            let store = SqliteStore::open(&config.data_dir.join("trellis.db"), durability)?
                .with_state_quota(config.state_quota);
            Ok((Arc::new(store), None))
        }
        StoreKind::Postgres(url) => {
            let store = Arc::new(
                PgStore::connect(url)
                    .await
                    .map_err(StartError::StoreUnusable)?
                    .with_state_quota(config.state_quota),
            );
            tracing::info!(at = store.location(), "store: PostgreSQL");
            Ok((store.clone(), Some(store)))
        }
    }
}

/// Plugin `state` kept in the store. While the store's database cannot be
/// reached, a state call waits and tries again with backoff, as the run's own
/// writes do: the step's timeout bounds the wait, and an outage shorter than
/// that costs the plugin nothing but time.
struct DurableState(Arc<dyn Store>);

async fn waiting_out_outages<T, F, Fut>(mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let (mut wait, longest) = crate::store::OUTAGE_BACKOFF;
    loop {
        match call().await {
            Err(StoreError::Unavailable(error)) => {
                tracing::debug!(error = %error, retry_in = ?wait, "plugin state: the database is unreachable");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(longest);
            }
            other => return other,
        }
    }
}

#[async_trait::async_trait]
impl StateStore for DurableState {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        waiting_out_outages(|| self.0.state_get(scope, key)).await
    }
    async fn set(&self, scope: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        waiting_out_outages(|| self.0.state_set(scope, key, &value)).await
    }
    async fn delete(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        waiting_out_outages(|| self.0.state_delete(scope, key)).await
    }
}

/// A service over a fresh data dir, with no plugins and `workflows` (file
/// name, TOML) in its one workflow dir, for the unit tests of each part.
#[cfg(test)]
pub(super) async fn test_service(workflows: &[(&str, &str)]) -> (tempfile::TempDir, Service) {
    let dir = tempfile::tempdir().unwrap();
    let workflow_dir = dir.path().join("workflows");
    std::fs::create_dir(&workflow_dir).unwrap();
    for (file, source) in workflows {
        std::fs::write(workflow_dir.join(file), source).unwrap();
    }
    let config = Config {
        data_dir: dir.path().join("data"),
        plugin_dirs: vec![],
        workflow_dirs: vec![workflow_dir],
        ..Config::default()
    };
    let service = Service::start(&config).await.unwrap();
    (dir, service)
}
