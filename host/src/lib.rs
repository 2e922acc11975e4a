//! Trellis: workflow orchestration whose tasks are WebAssembly components.
//!
//! Data flows one way: trigger ([`api`], [`cli`]) -> [`service`] -> [`executor`] -> [`plugin`] sandbox ->
//! [`record`]. [`workflow`] turns TOML into a validated plan; [`engine`] owns
//! wasmtime.
//!
//! The modules stack in layers, bottom first. A module uses only the modules
//! listed before it (the layers below, and those before it in its own layer);
//! an upward need becomes a trait defined below and implemented above (as
//! [`plugin::StateStore`] and [`executor::RunObserver`] are). A unit test
//! (`layer_tests.rs`) reads this list and fails on an import against it.
//!
//! 1. shared vocabulary: [`limits`], [`diagnostic`], [`record`], [`telemetry`]
//! 2. [`engine`], [`secrets`], [`store`], [`config`]
//! 3. [`plugin`]
//! 4. [`workflow`]
//! 5. [`executor`]
//! 6. [`service`]
//! 7. [`api`]
//! 8. [`cli`]

pub mod api;
pub mod cli;
pub mod config;
pub mod diagnostic;
pub mod engine;
pub mod executor;
#[cfg(test)]
mod layer_tests;
pub mod limits;
pub mod plugin;
pub mod record;
pub mod secrets;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod workflow;
