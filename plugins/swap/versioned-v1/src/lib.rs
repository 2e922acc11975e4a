//! Swap-test fixture: plugin `versioned` at version 1.0.0 (`versioned-v2` is the
//! same name at 2.0.0). Returns `{ "version": "1.0.0", "input": <input> }`.

use serde_json::{Value, json};
use trellis_sdk::{StepContext, TaskError};

#[trellis_sdk::task(name = "versioned", version = "1.0.0")]
fn run(_ctx: &StepContext, input: Value) -> Result<Value, TaskError> {
    Ok(json!({ "version": "1.0.0", "input": input }))
}
