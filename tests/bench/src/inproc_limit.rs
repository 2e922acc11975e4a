//! The raw wasmtime limit: what one call of a plugin costs with no Trellis
//! code on the hot path.
//!
//! Trellis's own engine (`trellis::engine::Engine`: pooling allocator, fuel,
//! epoch interruption), a linker with WASI p2 and the `host` and `state`
//! imports as no-ops, and per call: a fresh `Store` with a deny-by-default
//! `WasiCtx`, fuel and an epoch deadline, an instance from the `InstancePre`,
//! one call of `run`. Everything Trellis adds per step (limiter, captured
//! output, records, templates, tasks, the store) is what the other
//! measurements show on top of this.

use std::path::Path;

use anyhow::{anyhow, bail};
use trellis::engine::Engine;
use trellis::plugin::bindings::trellis::plugin::{host, state, types};
use trellis::plugin::bindings::{StepContext, Task, TaskPre};
use wasmtime::Store;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Epoch ticks (5 ms each) before a call is interrupted: far beyond any call
/// here, but set, because an engine with epochs needs a deadline per store.
const EPOCH_DEADLINE_TICKS: u64 = 1000;

/// A compiled plugin ready to be called the raw way.
pub struct RawPlugin {
    engine: Engine,
    pre: TaskPre<BareState>,
    fuel: u64,
    ctx: StepContext,
}

/// The data of a bare store: WASI's context and resource table, nothing else.
pub struct BareState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for BareState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for BareState {}

impl host::Host for BareState {
    async fn log(&mut self, _level: host::LogLevel, _message: String) -> wasmtime::Result<()> {
        Ok(())
    }

    async fn config(&mut self, _key: String) -> wasmtime::Result<Option<String>> {
        Ok(None)
    }

    async fn progress(&mut self, _fraction: f32, _message: String) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl state::Host for BareState {
    async fn get(&mut self, _key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(None)
    }

    async fn set(&mut self, _key: String, _value: Vec<u8>) -> wasmtime::Result<()> {
        Ok(())
    }

    async fn delete(&mut self, _key: String) -> wasmtime::Result<()> {
        Ok(())
    }
}

impl RawPlugin {
    /// Compiles `wasm` for `engine`; every call starts with `fuel`.
    pub fn new(engine: &Engine, wasm: &Path, fuel: u64) -> anyhow::Result<RawPlugin> {
        let mut linker = Linker::new(engine.wasmtime());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        Task::add_to_linker::<_, HasSelf<BareState>>(&mut linker, |state| state)?;
        let component = Component::from_file(engine.wasmtime(), wasm)
            .map_err(|err| anyhow!("compiling {}: {err:#}", wasm.display()))?;
        // Anything else it imports (wasi:http, which Trellis links) traps if
        // called; a plugin measured here never calls it.
        linker.define_unknown_imports_as_traps(&component)?;
        let pre = TaskPre::new(linker.instantiate_pre(&component)?)?;
        Ok(RawPlugin {
            engine: engine.clone(),
            pre,
            fuel,
            ctx: StepContext {
                run_id: "bench".into(),
                workflow: "bench".into(),
                step_id: "limit".into(),
                attempt: 1,
            },
        })
    }

    /// One call of `run` on a fresh instance; its output.
    pub async fn call(&self, input: &str) -> anyhow::Result<String> {
        let data = BareState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(self.engine.wasmtime(), data);
        store.set_fuel(self.fuel)?;
        store.set_epoch_deadline(EPOCH_DEADLINE_TICKS);
        let task = self.pre.instantiate_async(&mut store).await?;
        match task.call_run(&mut store, &self.ctx, input).await? {
            Ok(output) => Ok(output),
            Err(error) => bail!("the plugin failed: {}", error.message),
        }
    }
}
