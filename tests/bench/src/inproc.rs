//! In-process measurements (see main.rs). To be written.

use crate::Options;
use crate::report::Measurement;

pub fn run(_options: &Options) -> anyhow::Result<Vec<Measurement>> {
    Ok(Vec::new())
}
