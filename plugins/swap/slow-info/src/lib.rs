//! Swap-test fixture: `info()` spins forever, so loading or inspecting it must be
//! cut off by fuel or a deadline. `run` returns `{}`. Implements the raw `Guest`
//! trait (like `hostile`) because the SDK attribute's `info` always answers.

use std::hint::black_box;

use trellis_sdk::bindings::Guest;
use trellis_sdk::{PluginInfo, StepContext, TaskError};

struct SlowInfo;

impl Guest for SlowInfo {
    fn info() -> PluginInfo {
        let mut i = 0u64;
        loop {
            i = black_box(i.wrapping_add(1));
        }
    }

    fn run(_ctx: StepContext, _input: String) -> Result<String, TaskError> {
        Ok("{}".to_owned())
    }
}

trellis_sdk::bindings::export!(SlowInfo with_types_in trellis_sdk::bindings);
