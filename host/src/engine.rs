//! The one wasmtime [`Engine`] of a Trellis process and the [`Limits`] every step
//! runs under.
//!
//! Owns the wasmtime `Config` (component model, pooling allocator, fuel, epoch
//! interruption) and the single epoch ticker thread shared by every store.

use std::time::Duration;

pub use crate::limits::{LimitOverrides, Limits, MAX_MEMORY};

/// How often the epoch ticker advances the engine's epoch. Deadlines and
/// cancellation are checked at this granularity, and a busy guest yields its
/// tokio worker this often.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Elements one table of an instance may hold. A guest that grows a table
/// without end (`table.grow` in a loop) is refused past this, with its own
/// error (`table_limit`): each element is a pointer of host memory (also
/// counted against `memory`), and every table slot of the pooling allocator
/// reserves this many. Compilers emit far fewer: a Rust plugin's function
/// table holds hundreds of entries, a Python or JavaScript one thousands.
pub const MAX_TABLE_ELEMENTS: u64 = 100_000;

/// Linear memories one component may define, over all its core instances.
/// Each is a reservation of virtual memory (and a pool slot); a component with
/// thousands could exhaust the host's mappings for every other step, so one
/// with more is refused when it is loaded. Components made by componentize-py
/// or -js hold a few.
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 16;

/// Tables one component may define, over all its core instances (see
/// [`MAX_MEMORIES_PER_COMPONENT`]).
pub const MAX_TABLES_PER_COMPONENT: u32 = 64;

/// The native stack a guest may use. A guest that recurses without end traps
/// with a stack overflow instead of taking the host thread's stack.
const MAX_WASM_STACK: usize = 512 * 1024;

/// Errors creating the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot configure the wasm engine: {0}")]
    Config(String),
}

/// The process-wide wasmtime engine: one `Engine`, one epoch ticker thread.
///
/// Cloning is cheap; every clone shares the engine and the ticker. The ticker
/// stops when the last engine handle is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    pooling: bool,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("pooling", &self.pooling)
            .finish()
    }
}

impl Engine {
    /// An engine with the pooling allocator; falls back to on-demand allocation
    /// when the pool's virtual memory cannot be reserved (e.g. under `ulimit -v`).
    pub fn new() -> Result<Engine, EngineError> {
        match wasmtime::Engine::new(&Self::config(true)) {
            Ok(engine) => Ok(Self::start(engine, true)),
            Err(pool_err) => {
                tracing::warn!(error = %pool_err, "pooling allocator unavailable; allocating instances on demand");
                let engine = wasmtime::Engine::new(&Self::config(false))
                    .map_err(|err| EngineError::Config(err.to_string()))?;
                Ok(Self::start(engine, false))
            }
        }
    }

    /// An engine without the pool, as [`Engine::new`] falls back to: for
    /// tests of what must hold either way.
    #[cfg(test)]
    pub(crate) fn on_demand() -> Engine {
        let engine = wasmtime::Engine::new(&Self::config(false)).expect("an on-demand engine");
        Self::start(engine, false)
    }

    fn config(pooling: bool) -> wasmtime::Config {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        // Fuel bounds a step's CPU work deterministically; epochs bound its wall
        // clock and let cancellation reach a busy guest.
        config.consume_fuel(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(MAX_WASM_STACK);
        config.async_stack_size(MAX_WASM_STACK + 512 * 1024);
        config.parallel_compilation(true);
        if pooling {
            let mut pool = wasmtime::PoolingAllocationConfig::new();
            // Instances in flight at once (steps plus `info()` probes).
            pool.total_component_instances(1000);
            pool.total_core_instances(4000);
            pool.total_memories(2000);
            pool.total_tables(4000);
            pool.total_stacks(1000);
            // Components made by componentize-py/js hold several core modules.
            pool.max_core_instances_per_component(64);
            pool.max_memories_per_component(MAX_MEMORIES_PER_COMPONENT);
            pool.max_tables_per_component(MAX_TABLES_PER_COMPONENT);
            pool.max_memories_per_module(2);
            pool.max_tables_per_module(8);
            pool.max_component_instance_size(1 << 20);
            pool.max_core_instance_size(1 << 20);
            // The sandbox's limiter refuses growth past this first, so a
            // guest sees the same limit with or without the pool.
            pool.table_elements(MAX_TABLE_ELEMENTS as usize);
            pool.max_memory_size(MAX_MEMORY as usize);
            // Keeping a little of each slot resident doubles fresh-instance
            // throughput on two threads (see WASMTIME-NOTES.md).
            pool.linear_memory_keep_resident(4 << 20);
            pool.table_keep_resident(64 << 10);
            // Reset only the pages a guest dirtied (Linux 6.7+; off where the
            // kernel lacks it): measured 6.3% -> 0.1% of a busy server's CPU,
            // and the pool's resident memory after 20,000 runs 72 MiB -> 3 MiB.
            pool.pagemap_scan(wasmtime::Enabled::Auto);
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        config
    }

    fn start(engine: wasmtime::Engine, pooling: bool) -> Engine {
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("trellis-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })
            .expect("spawning the epoch ticker thread");
        Engine {
            inner: engine,
            pooling,
        }
    }

    /// The wasmtime engine.
    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner
    }

    /// Whether instances come from the pooling allocator.
    pub fn is_pooling(&self) -> bool {
        self.pooling
    }
}

/// Compiled components on disk, keyed by the component's digest and by the
/// engine's compatibility hash (wasmtime version and every setting that
/// changes machine code), so a stale entry is never even looked up.
///
/// An entry is the serialized component (`.cwasm`), memory-mapped when loaded
/// (no copy: a 40 MB Python component costs page cache, not heap), and a
/// `.b3` file with the BLAKE3 hash of it, checked before wasmtime sees the
/// bytes: a torn or corrupt entry is deleted and rebuilt.
#[derive(Debug, Clone)]
pub struct CodeCache {
    dir: std::path::PathBuf,
}

impl CodeCache {
    pub fn new(dir: impl Into<std::path::PathBuf>) -> CodeCache {
        CodeCache { dir: dir.into() }
    }

    fn path(&self, engine: &wasmtime::Engine, digest: &str) -> std::path::PathBuf {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        self.dir
            .join(format!("{digest}-{:016x}.cwasm", hasher.finish()))
    }

    /// The cached compilation of the component whose bytes hash to `digest`,
    /// or `compile()`'s, which is then stored (best effort).
    pub fn get_or_compile(
        &self,
        engine: &wasmtime::Engine,
        digest: &str,
        compile: impl FnOnce() -> wasmtime::Result<wasmtime::component::Component>,
    ) -> wasmtime::Result<wasmtime::component::Component> {
        let path = self.path(engine, digest);
        let sum = path.with_extension("b3");
        if path.exists() {
            let expected = std::fs::read_to_string(&sum).ok();
            let actual = hash_file(&path).ok();
            if expected.is_some() && expected == actual {
                // SAFETY: wasmtime requires that the file came from
                // `Component::serialize` of a compatible engine and is not
                // changed while mapped. It was written by `store` below with
                // exactly that (its name carries the engine's compatibility
                // hash), its hash was checked just now, and entries are only
                // ever replaced by rename, never written in place.
                #[allow(unsafe_code)]
                let loaded =
                    unsafe { wasmtime::component::Component::deserialize_file(engine, &path) };
                match loaded {
                    Ok(component) => return Ok(component),
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err, "unusable compiled-code cache entry; recompiling")
                    }
                }
            } else if expected.is_none() {
                // Torn between the two renames, or written by an older build.
                tracing::debug!(path = %path.display(), "compiled-code cache entry without its hash; recompiling");
            } else {
                tracing::warn!(path = %path.display(), "corrupt compiled-code cache entry; recompiling");
            }
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&sum);
        }
        let component = compile()?;
        if let Err(err) = self.store(&path, &component) {
            tracing::warn!(path = %path.display(), error = %err, "cannot write the compiled-code cache");
        }
        Ok(component)
    }

    fn store(
        &self,
        path: &std::path::Path,
        component: &wasmtime::component::Component,
    ) -> anyhow::Result<()> {
        let code = component.serialize()?;
        std::fs::create_dir_all(&self.dir)?;
        // Write then rename: a reader never sees half a file. The hash goes
        // last: until it is there the entry does not count.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &code)?;
        std::fs::rename(&tmp, path)?;
        let sum = path.with_extension("b3");
        let tmp = sum.with_extension(format!("b3tmp{}", std::process::id()));
        std::fs::write(&tmp, blake3::hash(&code).to_hex().as_bytes())?;
        std::fs::rename(&tmp, sum)?;
        Ok(())
    }
}

/// The BLAKE3 hash of a file, in hex, read in chunks (not into memory whole).
fn hash_file(path: &std::path::Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_counting(
        engine: &Engine,
        cache: &CodeCache,
        compiles: &mut u32,
    ) -> wasmtime::component::Component {
        cache
            .get_or_compile(engine.wasmtime(), "feed", || {
                *compiles += 1;
                wasmtime::component::Component::new(engine.wasmtime(), "(component)")
            })
            .unwrap()
    }

    #[test]
    fn limit_overrides_apply_per_field() {
        let step = LimitOverrides {
            fuel: Some(5),
            ..Default::default()
        };
        let workflow = LimitOverrides {
            fuel: Some(9),
            memory: Some(1024),
            ..Default::default()
        };
        let merged = step.over(&workflow).apply(Limits::default());
        assert_eq!(merged.fuel, 5);
        assert_eq!(merged.memory, 1024);
        assert_eq!(merged.timeout, Limits::default().timeout);
    }

    #[test]
    fn the_code_cache_reuses_entries_and_rebuilds_corrupt_ones() {
        let engine = Engine::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = CodeCache::new(dir.path());
        let mut compiles = 0;
        compile_counting(&engine, &cache, &mut compiles);
        compile_counting(&engine, &cache, &mut compiles);
        assert_eq!(compiles, 1, "a warm entry is not recompiled");

        let entry = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .find(|path| path.extension().is_some_and(|e| e == "cwasm"))
            .unwrap();
        let mut bytes = std::fs::read(&entry).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&entry, &bytes).unwrap();
        compile_counting(&engine, &cache, &mut compiles);
        assert_eq!(compiles, 2, "a corrupt entry is rebuilt");
        compile_counting(&engine, &cache, &mut compiles);
        assert_eq!(compiles, 2, "and the rebuilt entry is used");

        std::fs::write(&entry, b"short").unwrap();
        compile_counting(&engine, &cache, &mut compiles);
        assert_eq!(compiles, 3, "a truncated entry is rebuilt");

        std::fs::remove_file(entry.with_extension("b3")).unwrap();
        compile_counting(&engine, &cache, &mut compiles);
        assert_eq!(compiles, 4, "an entry without its hash is rebuilt");
        compile_counting(&engine, &cache, &mut compiles);
        assert_eq!(compiles, 4);
    }
}
