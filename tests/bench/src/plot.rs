//! The plot of per-step latency by workload. To be written.

use std::path::Path;

use crate::report::Measurement;

pub fn per_step(_results: &[Measurement], _path: &Path) -> anyhow::Result<()> {
    Ok(())
}
