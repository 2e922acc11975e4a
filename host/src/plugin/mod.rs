//! Plugins: loading WASM components, checking them against the
//! `trellis:plugin/task` world, the registry of loaded plugins, and the sandbox
//! each step attempt runs in (host imports, limits, captured output).

pub mod bindings;
mod effects;
mod http;
mod log;
mod reference;
mod registry;
mod sandbox;

pub use effects::SideEffects;
pub use log::StepEvents;
pub use reference::{PluginPin, PluginRef, PluginRefError};
pub use registry::{
    LoadReport, Plugin, PluginError, PluginRegistry, ResolveError, check_plugin_name,
};
pub use sandbox::{AttemptOutcome, Invocation, MemoryStateStore, StateStore};
