//! The plugins a process knows: loaded from files, checked against the
//! `trellis:plugin/task` world, named by their `info()`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::Trap;
use wasmtime::component::{Component, Linker};

use super::bindings::{Task, TaskPre};
use super::effects::SideEffects;
use super::reference::{PluginPin, PluginRef};
use super::sandbox::{self, AttemptOutcome, Invocation, StepState};
use crate::engine::{
    CodeCache, Engine, Limits, MAX_MEMORIES_PER_COMPONENT, MAX_TABLES_PER_COMPONENT,
};

/// What `info()` may use: it should answer at once.
const INFO_LIMITS: Limits = Limits {
    fuel: 100_000_000,
    memory: 64 * 1024 * 1024,
    timeout: Duration::from_secs(2),
    max_output: 1024 * 1024,
    max_log: 64 * 1024,
    // info() sends no requests (and a probe store allows no hosts anyway).
    http_requests: 0,
    http_request_body: 0,
    http_response_body: 0,
};

/// Why a file is not a usable plugin.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("not a WebAssembly file (no `\\0asm` header)")]
    NotWasm,
    #[error(
        "a core WebAssembly module, not a component: build for wasm32-wasip2 or run `wasm-tools component new`"
    )]
    CoreModule,
    #[error("does not compile: {0}")]
    Compile(String),
    #[error(
        "defines {memories} linear memories and {tables} tables; a component may define at most {MAX_MEMORIES_PER_COMPONENT} and {MAX_TABLES_PER_COMPONENT}"
    )]
    TooManyResources { memories: u32, tables: u32 },
    #[error("needs imports the host does not provide: {0}")]
    Link(String),
    #[error("does not implement the trellis:plugin/task world: {0}")]
    World(String),
    #[error("info() failed: {0}")]
    Info(String),
    #[error("info() answered an invalid {field} {value:?}: {reason}")]
    BadInfo {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("{name} {version} is loaded twice: {first} and {second}")]
    Duplicate {
        name: String,
        version: String,
        first: String,
        second: String,
    },
}

/// Why a plugin reference does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no plugin named `{name}` is loaded{}", unknown_hint(.name, .known))]
    UnknownName { name: String, known: Vec<String> },
    #[error("plugin `{name}` has no version {version} (loaded: {})", .available.join(", "))]
    NoVersion {
        name: String,
        version: String,
        available: Vec<String>,
    },
    #[error("plugin `{name}` has no build with digest sha256:{digest}")]
    NoDigest { name: String, digest: String },
}

/// What to do about an unknown plugin: build it, if it is an example
/// plugin of this checkout that is not built yet; else, what is loaded.
fn unknown_hint(name: &str, known: &[String]) -> String {
    match crate::config::unbuilt_example(name) {
        Some(language) => format!(
            ": it is one of the {language} example plugins, which `{}` builds",
            crate::config::BUILD_EXAMPLES
        ),
        None => known_list(known),
    }
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        " (no plugins are loaded: is the plugin directory right?)".to_string()
    } else {
        format!(" (loaded: {})", known.join(", "))
    }
}

/// A loaded, checked plugin. Immutable: a run that resolved it keeps it.
pub struct Plugin {
    pub name: String,
    pub version: semver::Version,
    pub description: String,
    pub input_schema: Option<String>,
    pub output_schema: Option<String>,
    /// sha256 of the component's bytes, hex.
    pub digest: String,
    pub size: u64,
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    /// The imports the component declares.
    pub imports: Vec<String>,
    /// What it can change outside its output (from its imports).
    pub side_effects: SideEffects,
    pre: TaskPre<StepState>,
    engine: Engine,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("version", &self.version.to_string())
            .field("digest", &self.digest)
            .finish()
    }
}

impl Plugin {
    /// Runs one attempt in a fresh sandbox.
    pub async fn invoke(&self, invocation: Invocation) -> AttemptOutcome {
        sandbox::invoke(&self.engine, &self.pre, invocation).await
    }

    /// `name@version`.
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

/// Outcome of loading a set of directories.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Files that were skipped, with the reason.
    pub errors: Vec<(PathBuf, PluginError)>,
}

/// The plugins of a process, by name, each name's versions in ascending order.
///
/// Plugins come and go while runs use them: a run holds the `Arc<Plugin>` it
/// resolved, so replacing or removing a plugin never affects a run in flight.
/// A removed or replaced build stays resolvable by its digest (`retired`), so
/// a run pinned to it can still go on.
pub struct PluginRegistry {
    engine: Engine,
    linker: Arc<Linker<StepState>>,
    cache: Option<CodeCache>,
    plugins: RwLock<BTreeMap<String, Vec<Arc<Plugin>>>>,
    retired: RwLock<BTreeMap<String, Arc<Plugin>>>,
}

impl std::fmt::Debug for PluginRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRegistry")
            .field("plugins", &self.plugins)
            .finish()
    }
}

impl PluginRegistry {
    /// An empty registry whose plugins may import WASI p2 (deny-by-default),
    /// `wasi:http` (behind each step's allow-list) and the `host` and `state`
    /// interfaces.
    pub fn new(engine: Engine) -> Result<PluginRegistry, PluginError> {
        let mut linker = Linker::new(engine.wasmtime());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Link(e.to_string()))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| PluginError::Link(e.to_string()))?;
        Task::add_to_linker::<_, wasmtime::component::HasSelf<StepState>>(&mut linker, |state| {
            state
        })
        .map_err(|e| PluginError::Link(e.to_string()))?;
        Ok(PluginRegistry {
            engine,
            linker: Arc::new(linker),
            cache: None,
            plugins: RwLock::new(BTreeMap::new()),
            retired: RwLock::new(BTreeMap::new()),
        })
    }

    /// Keep compiled components in `cache`: a warm start does not recompile.
    pub fn with_cache(mut self, cache: CodeCache) -> PluginRegistry {
        self.cache = Some(cache);
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles and checks a component: that it is one, that the host can
    /// satisfy its imports, that it exports the world, and that `info()`
    /// answers with a valid name and semver version.
    pub async fn compile(
        &self,
        bytes: &[u8],
        path: Option<PathBuf>,
    ) -> Result<Plugin, PluginError> {
        match bytes.get(..8) {
            Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => return Err(PluginError::CoreModule),
            Some([0, b'a', b's', b'm', ..]) => {}
            _ => return Err(PluginError::NotWasm),
        }
        let digest = hex::encode(Sha256::digest(bytes));
        let engine = self.engine.clone();
        let owned = bytes.to_vec();
        let cache = self.cache.clone();
        let key = digest.clone();
        let label = match &path {
            Some(path) => path.display().to_string(),
            None => format!("sha256:{}", &digest[..12]),
        };
        let component = tokio::task::spawn_blocking(move || {
            // Only on a cache miss: seconds for a Python or JavaScript plugin.
            let compile = || {
                let started = std::time::Instant::now();
                tracing::info!(plugin = %label, "compiling (first load; the code is cached afterwards)");
                let compiled = Component::new(engine.wasmtime(), &owned);
                tracing::info!(plugin = %label, elapsed_ms = started.elapsed().as_millis() as u64, "compiled");
                compiled
            };
            match cache {
                Some(cache) => cache.get_or_compile(engine.wasmtime(), &key, compile),
                None => compile(),
            }
        })
        .await
        .map_err(|e| PluginError::Compile(e.to_string()))?
        .map_err(|e| PluginError::Compile(format!("{e:#}")))?;
        // The pooling allocator refuses such a component in `Component::new`
        // already; without the pool (its memory could not be reserved) this
        // is the check.
        if let Some(needs) = component.resources_required()
            && (needs.num_memories > MAX_MEMORIES_PER_COMPONENT
                || needs.num_tables > MAX_TABLES_PER_COMPONENT)
        {
            return Err(PluginError::TooManyResources {
                memories: needs.num_memories,
                tables: needs.num_tables,
            });
        }
        let imports = component
            .component_type()
            .imports(self.engine.wasmtime())
            .map(|(name, _)| name.to_string())
            .collect();
        let side_effects = SideEffects::of(&component, self.engine.wasmtime());
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::Link(format!("{e:#}")))?;
        let pre = TaskPre::new(instance_pre).map_err(|e| PluginError::World(format!("{e:#}")))?;
        let info = probe_info(&self.engine, &pre).await?;
        let name = info.name.trim().to_string();
        if let Err(reason) = check_plugin_name(&name) {
            return Err(PluginError::BadInfo {
                field: "name",
                value: info.name,
                reason,
            });
        }
        let version =
            semver::Version::parse(info.version.trim()).map_err(|e| PluginError::BadInfo {
                field: "version",
                value: info.version.clone(),
                reason: format!("not a semver version: {e}"),
            })?;
        for (field, schema) in [
            ("input-schema", &info.input_schema),
            ("output-schema", &info.output_schema),
        ] {
            if let Some(schema) = schema {
                serde_json::from_str::<serde_json::Value>(schema).map_err(|e| {
                    PluginError::BadInfo {
                        field,
                        value: schema.chars().take(60).collect(),
                        reason: format!("not JSON: {e}"),
                    }
                })?;
            }
        }
        Ok(Plugin {
            name,
            version,
            description: info.description,
            input_schema: info.input_schema,
            output_schema: info.output_schema,
            digest,
            size: bytes.len() as u64,
            path,
            imports,
            side_effects,
            pre,
            engine: self.engine.clone(),
        })
    }

    /// Loads one file.
    pub async fn load_file(&self, path: &Path) -> Result<Plugin, PluginError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| PluginError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        self.compile(&bytes, Some(path.to_path_buf())).await
    }

    /// Loads every `*.wasm` file in `dirs` (not recursive). A file that is not a
    /// usable plugin is reported and skipped; two files with the same name and
    /// version are an error for the second.
    pub async fn load_dirs(&self, dirs: &[PathBuf]) -> LoadReport {
        let mut report = LoadReport::default();
        let mut files = Vec::new();
        for dir in dirs {
            match std::fs::read_dir(dir) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|ext| ext == "wasm") && p.is_file())
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(source) => report.errors.push((
                    dir.clone(),
                    PluginError::Io {
                        path: dir.clone(),
                        source,
                    },
                )),
            }
        }
        // Compile concurrently: Cranelift work runs on blocking threads.
        let loads = files.iter().map(|path| self.load_file(path));
        let results = futures::future::join_all(loads).await;
        for (path, result) in files.into_iter().zip(results) {
            match result.and_then(|plugin| self.insert(plugin).map(drop)) {
                Ok(()) => report.loaded += 1,
                Err(err) => report.errors.push((path, err)),
            }
        }
        report
    }

    /// Adds a plugin; refuses a second one with the same name and version.
    pub fn insert(&self, plugin: Plugin) -> Result<Arc<Plugin>, PluginError> {
        let mut plugins = self.plugins.write().unwrap();
        let versions = plugins.entry(plugin.name.clone()).or_default();
        if let Some(existing) = versions.iter().find(|p| p.version == plugin.version) {
            let show = |p: &Plugin| {
                p.path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| format!("sha256:{}", p.digest))
            };
            return Err(PluginError::Duplicate {
                name: plugin.name.clone(),
                version: plugin.version.to_string(),
                first: show(existing),
                second: show(&plugin),
            });
        }
        let plugin = Arc::new(plugin);
        versions.push(plugin.clone());
        versions.sort_by(|a, b| a.version.cmp(&b.version));
        Ok(plugin)
    }

    /// Adds a plugin, replacing the build with the same name and version if
    /// there is one (a file that changed); returns the replaced build.
    pub fn replace(&self, plugin: Plugin) -> (Arc<Plugin>, Option<Arc<Plugin>>) {
        let mut plugins = self.plugins.write().unwrap();
        let versions = plugins.entry(plugin.name.clone()).or_default();
        let replaced = versions
            .iter()
            .position(|p| p.version == plugin.version)
            .map(|at| versions.remove(at));
        let plugin = Arc::new(plugin);
        versions.push(plugin.clone());
        versions.sort_by(|a, b| a.version.cmp(&b.version));
        drop(plugins);
        if let Some(old) = &replaced {
            self.retire(old.clone());
        }
        (plugin, replaced)
    }

    /// Removes every version of `name`, or only `version`; returns what was removed.
    pub fn remove(&self, name: &str, version: Option<&semver::Version>) -> Vec<Arc<Plugin>> {
        let mut plugins = self.plugins.write().unwrap();
        let Some(versions) = plugins.get_mut(name) else {
            return Vec::new();
        };
        let (removed, kept): (Vec<_>, Vec<_>) = versions
            .drain(..)
            .partition(|p| version.is_none_or(|v| &p.version == v));
        *versions = kept;
        if versions.is_empty() {
            plugins.remove(name);
        }
        drop(plugins);
        for plugin in &removed {
            self.retire(plugin.clone());
        }
        removed
    }

    /// Whether a retired build of `name` is kept.
    pub fn has_retired(&self, name: &str) -> bool {
        self.retired
            .read()
            .unwrap()
            .values()
            .any(|p| p.name == name)
    }

    /// Keeps a build that left the registry resolvable by its digest.
    pub fn retire(&self, plugin: Arc<Plugin>) {
        self.retired
            .write()
            .unwrap()
            .insert(plugin.digest.clone(), plugin);
    }

    /// `name` (the highest version), `name@1.2.0` or `name@sha256:<hex>`.
    pub fn resolve(&self, reference: &PluginRef) -> Result<Arc<Plugin>, ResolveError> {
        let name = reference.name.as_str();
        let plugins = self.plugins.read().unwrap();
        if let PluginPin::Digest(digest) = &reference.pin
            && !plugins
                .get(name)
                .is_some_and(|versions| versions.iter().any(|p| p.digest == *digest))
            && let Some(retired) = self
                .retired
                .read()
                .unwrap()
                .get(digest.as_str())
                .filter(|p| p.name == name)
        {
            return Ok(retired.clone());
        }
        let Some(versions) = plugins.get(name) else {
            return Err(ResolveError::UnknownName {
                name: name.to_string(),
                known: plugins.keys().cloned().collect(),
            });
        };
        match &reference.pin {
            PluginPin::Latest => Ok(versions
                .last()
                .expect("a name has at least one version")
                .clone()),
            PluginPin::Digest(digest) => versions
                .iter()
                .find(|p| p.digest == *digest)
                .cloned()
                .ok_or_else(|| ResolveError::NoDigest {
                    name: name.to_string(),
                    digest: digest.clone(),
                }),
            PluginPin::Version(version) => versions
                .iter()
                .find(|p| p.version == *version)
                .cloned()
                .ok_or_else(|| ResolveError::NoVersion {
                    name: name.to_string(),
                    version: version.to_string(),
                    available: versions.iter().map(|p| p.version.to_string()).collect(),
                }),
        }
    }

    /// Every loaded plugin, by name then version.
    pub fn list(&self) -> Vec<Arc<Plugin>> {
        self.plugins
            .read()
            .unwrap()
            .values()
            .flatten()
            .cloned()
            .collect()
    }
}

async fn probe_info(
    engine: &Engine,
    pre: &TaskPre<StepState>,
) -> Result<super::bindings::PluginInfo, PluginError> {
    let mut store = sandbox::new_store(engine, StepState::probe(&INFO_LIMITS), INFO_LIMITS.fuel);
    let call = async {
        let task = pre.instantiate_async(&mut store).await?;
        task.call_info(&mut store).await
    };
    let no_answer = || {
        PluginError::Info(format!(
            "no answer within {} (info() must answer at once)",
            humantime::format_duration(INFO_LIMITS.timeout)
        ))
    };
    match tokio::time::timeout(INFO_LIMITS.timeout, call).await {
        Ok(Ok(info)) => Ok(info),
        Ok(Err(err)) if sandbox::deadline_reached(&err) => Err(no_answer()),
        Ok(Err(err)) => Err(PluginError::Info(match err.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => format!(
                "it used all of its {} fuel without answering (info() must answer at once: does it loop?)",
                INFO_LIMITS.fuel
            ),
            // The trap itself, without the wasm backtrace wasmtime puts first.
            Some(trap) => format!("the plugin trapped: {trap}"),
            None => format!("{err:#}"),
        })),
        Err(_) => Err(no_answer()),
    }
}

/// A plugin name, as `info()` answers it and as URLs and file names
/// (`<name>-<version>.wasm`) carry it: 1 to 64 lowercase letters, digits,
/// `-` or `_`.
pub fn check_plugin_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if !name.is_empty() && name.len() <= 64 && name.chars().all(allowed) {
        Ok(())
    } else {
        Err("use 1 to 64 lowercase letters, digits, `-` or `_`".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_component_with_too_many_memories_is_refused_with_or_without_the_pool() {
        let source = include_str!("../../../plugins/fixtures/wat/refused/too-many-memories.wat");
        let bytes = wat::parse_str(source).unwrap();

        let pooled = PluginRegistry::new(Engine::new().unwrap()).unwrap();
        if pooled.engine().is_pooling() {
            let err = pooled.compile(&bytes, None).await.unwrap_err();
            assert!(
                err.to_string().contains(
                    "21 Wasm linear memories, which exceeds the configured maximum of 16"
                ),
                "{err}"
            );
        }

        let on_demand = PluginRegistry::new(Engine::on_demand()).unwrap();
        let err = on_demand.compile(&bytes, None).await.unwrap_err();
        assert!(
            matches!(
                err,
                PluginError::TooManyResources {
                    memories: 21,
                    tables: 0
                }
            ),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "defines 21 linear memories and 0 tables; a component may define at most 16 and 64"
        );
    }
}
