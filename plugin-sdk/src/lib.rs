//! Write a Trellis task plugin in Rust.
//!
//! A plugin is a WebAssembly component that implements the `trellis:plugin/task`
//! world (see `wit/trellis.wit`). This crate generates the bindings, turns JSON
//! into your types and back, and exports them with one attribute:
//!
//! ```ignore
//! use serde::{Deserialize, Serialize};
//! use trellis_sdk::{StepContext, TaskError};
//!
//! #[derive(Deserialize)]
//! struct Input { text: String }
//!
//! #[derive(Serialize)]
//! struct Output { text: String }
//!
//! #[trellis_sdk::task(name = "uppercase", version = "1.0.0")]
//! fn run(ctx: &StepContext, input: Input) -> Result<Output, TaskError> {
//!     trellis_sdk::log::info(format!("step {} attempt {}", ctx.step_id, ctx.attempt));
//!     Ok(Output { text: input.text.to_uppercase() })
//! }
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release` (crate type
//! `cdylib`); the `.wasm` file is the plugin.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The bindings generated from `wit/`. Most plugins never name them.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "trellis:plugin/task",
        pub_export_macro: true,
        default_bindings_module: "trellis_sdk::bindings",
        generate_all,
    });
}

pub use bindings::trellis::plugin::types::{PluginInfo, StepContext, TaskError};
pub use trellis_sdk_macro::task;

impl TaskError {
    /// A failure that retrying will not mend (bad input, a refused request).
    pub fn fatal(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            retryable: false,
            details: None,
        }
    }

    /// A failure that may pass on another attempt (a busy service, a timeout).
    pub fn retryable(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            retryable: true,
            details: None,
        }
    }

    /// Attach machine-readable details (stored as JSON in the attempt record).
    pub fn with_details(mut self, details: impl Serialize) -> Self {
        self.details = serde_json::to_string(&details).ok();
        self
    }
}

/// Lines in the step's log (kept in the run record, shown by `trellis run --json`).
pub mod log {
    use crate::bindings::trellis::plugin::host::{self, LogLevel};

    pub fn trace(message: impl AsRef<str>) {
        host::log(LogLevel::Trace, message.as_ref())
    }
    pub fn debug(message: impl AsRef<str>) {
        host::log(LogLevel::Debug, message.as_ref())
    }
    pub fn info(message: impl AsRef<str>) {
        host::log(LogLevel::Info, message.as_ref())
    }
    pub fn warn(message: impl AsRef<str>) {
        host::log(LogLevel::Warn, message.as_ref())
    }
    pub fn error(message: impl AsRef<str>) {
        host::log(LogLevel::Error, message.as_ref())
    }
}

/// A value from the step's `config` table (or a secret granted to the step).
pub fn config(key: &str) -> Option<String> {
    bindings::trellis::plugin::host::config(key)
}

/// Report progress: `fraction` in 0.0..=1.0 and a short message.
pub fn progress(fraction: f32, message: impl AsRef<str>) {
    bindings::trellis::plugin::host::progress(fraction, message.as_ref())
}

/// Durable key-value state, scoped to the workflow: what one run sets, later
/// runs of the same workflow read.
pub mod state {
    use crate::bindings::trellis::plugin::state as raw;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    pub fn get(key: &str) -> Option<Vec<u8>> {
        raw::get(key)
    }
    pub fn set(key: &str, value: &[u8]) {
        raw::set(key, value)
    }
    pub fn delete(key: &str) {
        raw::delete(key)
    }

    /// `get` and parse as JSON; `None` when absent or not valid JSON for `T`.
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Option<T> {
        get(key).and_then(|bytes| serde_json::from_slice(&bytes).ok())
    }

    /// `set` a value as JSON.
    pub fn set_json<T: Serialize>(key: &str, value: &T) {
        let bytes = serde_json::to_vec(value).expect("a Serialize value turns into JSON");
        set(key, &bytes)
    }
}

#[doc(hidden)]
pub mod __private {
    use super::*;

    /// Parse the input JSON, call the task, serialise its output.
    pub fn run_json<I, O, F>(ctx: &StepContext, input: &str, task: F) -> Result<String, TaskError>
    where
        I: DeserializeOwned,
        O: Serialize,
        F: FnOnce(&StepContext, I) -> Result<O, TaskError>,
    {
        let input: I = serde_json::from_str(input)
            .map_err(|err| TaskError::fatal(format!("invalid input: {err}")))?;
        let output = task(ctx, input)?;
        serde_json::to_string(&output)
            .map_err(|err| TaskError::fatal(format!("output is not JSON: {err}")))
    }
}

/// Typed input from a JSON value, with an error that names the field that
/// does not fit (`invalid input: field `mode`: unknown variant ...`). For a
/// task that takes `serde_json::Value` and checks it in steps.
pub fn parse_input<T: DeserializeOwned>(input: serde_json::Value) -> Result<T, TaskError> {
    serde_path_to_error::deserialize(input).map_err(|err| {
        let path = err.path().to_string();
        let err = err.into_inner();
        match path.as_str() {
            "." => TaskError::fatal(format!("invalid input: {err}")),
            _ => TaskError::fatal(format!("invalid input: field `{path}`: {err}")),
        }
    })
}
