//! Trellis: workflow orchestration whose tasks are WebAssembly components.
//!
//! Data flows one way: trigger ([`api`], [`cli`]) -> [`service`] -> [`executor`] -> [`plugin`] sandbox ->
//! [`record`]. [`workflow`] turns TOML into a validated plan; [`engine`] owns
//! wasmtime.

pub mod api;
pub mod cli;
pub mod config;
pub mod diagnostic;
pub mod engine;
pub mod executor;
pub mod limits;
pub mod plugin;
pub mod record;
pub mod secrets;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod workflow;
