//! End-to-end tests: they run the built `trellis` binary like a user would, on
//! the example plugins and the test fixtures that the build compiled to wasm.
//!
//! One test binary, one module per feature (ripgrep's layout).

mod support;

mod again;
mod attack;
mod c_plugin;
mod chaos;
mod cli;
mod cluster;
mod console;
mod examples;
mod hostile;
mod hostile_serve;
mod hotswap;
mod http;
mod limits;
mod polyglot;
mod recovery;
mod retries;
mod runs_cli;
mod scheduling;
mod secrets;
mod serve;
mod side_effects;
mod stats;
mod subworkflows;
mod templates;
mod validation;
