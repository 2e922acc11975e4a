//! `trellis-bench`: the whole-system benchmark harness (issue 6). One process,
//! one run, side by side:
//!
//! - `inproc`: the raw wasmtime limit, per-step overhead in memory and durable,
//!   workflow shapes (chain10, chain40, fanout100, fanout1000, diamond) and
//!   3-step runs back to back and 64 at once;
//! - `system`: HTTP load against `trellis serve`, cold starts, memory with
//!   10,000 runs in flight;
//! - `list`: `GET /v1/runs` against `trellis serve` with 100,000 runs
//!   stored, on SQLite and PostgreSQL (issue 16; `runs_list.rs`);
//! - `soak` (`--soak`, its own mode; a small one in `--smoke`): 20,000 runs
//!   from 128 clients, every output checked, RSS flat.
//!
//! Writes `results.json`, `results.md` (the machine, the filesystem of the
//! data dirs and the table) and `per-step.svg` (the plot) to `--out`, and
//! the `list` part's own table to `runs-list.{md,json}`. `--smoke` runs a
//! few iterations of each, to prove the harness works (CI), not to measure.
//!
//! `--update` rewrites in the markdown file only the tables of the parts
//! that ran: the results and targets tables when `inproc` or `system` did,
//! the runs-list table when `list` did (so `--only list` leaves the rest).

mod inproc;
mod plot;
mod postgres;
#[allow(dead_code)] // until every part uses all of it
mod report;
mod runs_list;
mod soak;
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
    /// Only these parts (inproc, system, list; soak in --smoke); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The `trellis` binary the system part starts (a release build).
    #[arg(long, default_value = "target/release/trellis")]
    pub trellis: PathBuf,
    /// Also write the table into this markdown file, between the lines
    /// `<!-- results:start -->` and `<!-- results:end -->` (BENCHMARKS.md).
    #[arg(long, value_name = "FILE")]
    pub update: Option<PathBuf>,
    /// Only the soak (see soak.rs): many runs against one server, every
    /// output checked, RSS sampled; fails on any error or growing memory.
    #[arg(long)]
    pub soak: bool,
    /// Runs in the soak.
    #[arg(long, default_value_t = 20_000)]
    pub soak_runs: usize,
    /// Concurrent keep-alive clients in the soak.
    #[arg(long, default_value_t = 128)]
    pub soak_clients: usize,
}

impl Options {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// The allocator `trellis` itself uses (host/src/main.rs), so the in-process
/// figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    std::fs::create_dir_all(&options.out)?;
    if options.soak {
        let results = soak::run(&options)?;
        println!("{}", report::markdown(&results));
        std::fs::write(
            options.out.join("soak.json"),
            serde_json::to_string_pretty(&results)?,
        )?;
        return Ok(());
    }
    // The parts that make the results table (and the plot).
    let tabled = options.wants("inproc")
        || options.wants("system")
        || (options.smoke && options.wants("soak"));
    let mut results = Vec::new();
    if options.wants("inproc") {
        results.extend(inproc::run(&options)?);
    }
    if options.wants("system") {
        results.extend(system::run(&options)?);
    }
    // The full soak is a mode of its own (`--soak`); a smoke run proves it works.
    if options.smoke && options.wants("soak") {
        results.extend(soak::run(&options)?);
    }
    let listing = if options.wants("list") {
        Some(runs_list::run(&options)?)
    } else {
        None
    };
    let machine = machine();
    let mut sections = Vec::new();
    if tabled {
        let table = report::markdown(&results);
        println!("{machine}\n\n{table}");
        std::fs::write(
            options.out.join("results.md"),
            format!("{machine}\n\n{table}"),
        )?;
        std::fs::write(
            options.out.join("results.json"),
            serde_json::to_string_pretty(&results)?,
        )?;
        plot::per_step(&results, &options.out.join("per-step.svg"))?;
        eprintln!(
            "wrote {}/results.{{md,json}} and per-step.svg",
            options.out.display()
        );
        sections.push(("results", format!("{machine}\n\n{table}")));
        sections.push(("targets", report::targets(&results)));
    }
    if let Some(listing) = &listing {
        let text = format!("{machine}\n\n{}", listing.markdown());
        println!("{text}");
        std::fs::write(options.out.join("runs-list.md"), &text)?;
        std::fs::write(
            options.out.join("runs-list.json"),
            serde_json::to_string_pretty(listing)?,
        )?;
        eprintln!("wrote {}/runs-list.{{md,json}}", options.out.display());
        sections.push(("runs-list", text));
    }
    if let Some(doc) = &options.update {
        let mut text = std::fs::read_to_string(doc)?;
        for (name, body) in &sections {
            text = splice(&text, name, body)
                .ok_or_else(|| anyhow::anyhow!("{} lacks the {name} markers", doc.display()))?;
        }
        std::fs::write(doc, text)?;
        let names: Vec<&str> = sections.iter().map(|(name, _)| *name).collect();
        eprintln!(
            "updated the {} tables in {}",
            names.join(", "),
            doc.display()
        );
    }
    Ok(())
}

/// `text` with what is between the `<!-- NAME:start -->` and
/// `<!-- NAME:end -->` markers replaced by `body`.
fn splice(text: &str, name: &str, body: &str) -> Option<String> {
    let start_marker = format!("<!-- {name}:start -->");
    let end_marker = format!("<!-- {name}:end -->");
    let start = text.find(&start_marker)? + start_marker.len();
    let end = start + text[start..].find(&end_marker)?;
    Some(format!("{}\n{body}{}", &text[..start], &text[end..]))
}

/// The machine, for the record: CPU model and count, memory, kernel, date,
/// and the filesystem the data dirs were on (every durable figure depends
/// on what a commit costs there: tmpfs makes it free).
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let when = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    // The servers' and the durable service's data dirs are temporary dirs.
    let data = std::env::temp_dir();
    let data = std::fs::canonicalize(&data).unwrap_or(data);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let filesystem = match filesystem(&mounts, &data) {
        Some((kind, mount)) => format!("{kind} (mounted on {mount})"),
        None => "an unknown filesystem".to_owned(),
    };
    format!(
        "Measured {when} on {cpus} x {model}, {memory} RAM, Linux {}; data dirs in {}, on {filesystem}.",
        kernel.trim(),
        data.display()
    )
}

/// The type and mount point of the filesystem holding `path`, from the text
/// of /proc/mounts: the mount whose point is the longest prefix of the path
/// (the last one wins when two share a point: it is mounted over the other).
fn filesystem(mounts: &str, path: &std::path::Path) -> Option<(String, String)> {
    let mut best: Option<(usize, String, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_device), Some(point), Some(kind)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // Spaces and tabs in mount points are written as octal escapes.
        let point = point.replace("\\040", " ").replace("\\011", "\t");
        if path.starts_with(&point) && best.as_ref().is_none_or(|(len, ..)| point.len() >= *len) {
            best = Some((point.len(), kind.to_owned(), point));
        }
    }
    best.map(|(_, kind, point)| (kind, point))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_table_replaces_what_is_between_the_markers() {
        let doc = "# B\n<!-- results:start -->\nold\n<!-- results:end -->\nafter\n";
        let out = super::splice(doc, "results", "On M.\n\n| t |\n").unwrap();
        assert_eq!(
            out,
            "# B\n<!-- results:start -->\nOn M.\n\n| t |\n<!-- results:end -->\nafter\n"
        );
        assert!(super::splice(doc, "targets", "x").is_none());
        assert!(super::splice("no markers", "results", "x").is_none());
    }

    #[test]
    fn the_filesystem_is_the_longest_mount_point_holding_the_path() {
        let mounts = "/dev/vda / ext4 rw,relatime 0 0\n\
                      proc /proc proc rw 0 0\n\
                      tmpfs /tmp tmpfs rw,nosuid 0 0\n\
                      tmpfs /tmpdata tmpfs rw 0 0\n";
        let at = |path: &str| super::filesystem(mounts, std::path::Path::new(path));
        assert_eq!(at("/tmp/x/y"), Some(("tmpfs".into(), "/tmp".into())));
        assert_eq!(at("/home/me"), Some(("ext4".into(), "/".into())));
        // A prefix of the text is not a parent dir.
        assert_eq!(at("/tmpx/a"), Some(("ext4".into(), "/".into())));
        assert_eq!(super::filesystem("", std::path::Path::new("/tmp")), None);
    }
}
