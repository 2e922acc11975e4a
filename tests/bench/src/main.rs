//! `trellis-bench`: the whole-system benchmark harness (issue 6). One process,
//! one run, side by side:
//!
//! - `inproc`: the raw wasmtime limit, per-step overhead in memory and durable,
//!   workflow shapes (chain10, chain40, fanout100, fanout1000, diamond) and
//!   3-step runs back to back and 64 at once;
//! - `system`: HTTP load against `trellis serve`, cold starts, memory with
//!   10,000 runs in flight.
//!
//! Writes `results.json`, `results.md` (the table) and `per-step.svg` (the
//! plot) to `--out`. `--smoke` runs a few iterations of each, to prove the
//! harness works (CI), not to measure.

mod inproc;
mod plot;
#[allow(dead_code)] // until every part uses all of it
mod report;
mod system;

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "trellis-bench",
    about = "Benchmarks of Trellis (see BENCHMARKS.md)"
)]
pub struct Options {
    /// A few iterations of everything: proves the harness works, measures nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Where results.json, results.md and per-step.svg go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Only these parts (inproc, system); default both.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The `trellis` binary the system part starts (a release build).
    #[arg(long, default_value = "target/release/trellis")]
    pub trellis: PathBuf,
}

impl Options {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    std::fs::create_dir_all(&options.out)?;
    let mut results = Vec::new();
    if options.wants("inproc") {
        results.extend(inproc::run(&options)?);
    }
    if options.wants("system") {
        results.extend(system::run(&options)?);
    }
    let table = report::markdown(&results);
    println!("{table}");
    std::fs::write(options.out.join("results.md"), &table)?;
    std::fs::write(
        options.out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    plot::per_step(&results, &options.out.join("per-step.svg"))?;
    eprintln!(
        "wrote {}/results.{{md,json}} and per-step.svg",
        options.out.display()
    );
    Ok(())
}
