//! Host-side bindings of the `trellis:plugin/task` world, generated from `wit/`.
//!
//! ```ignore
//! let pre = TaskPre::new(linker.instantiate_pre(&component)?)?;
//! let task = pre.instantiate_async(&mut store).await?;
//! let info = task.call_info(&mut store).await?;
//! ```

wasmtime::component::bindgen!({
    path: "../wit",
    world: "trellis:plugin/task",
    imports: { default: async | trappable },
    exports: { default: async },
});
