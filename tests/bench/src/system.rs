//! Whole-system measurements against the `trellis` binary (`--trellis`, a
//! release build), each a process of its own on loopback:
//!
//! - **http**: 3-step noop runs POSTed by N concurrent keep-alive clients to
//!   `trellis serve`, with `?wait=10s` (runs/s completed, p50/p99 latency) and
//!   without (runs/s accepted, then completed);
//! - **cold**: `trellis run` of a 10-step chain as a whole process, compiled-code
//!   cache warm and `--no-cache`; `serve` start to the first accepted run with
//!   20 plugins, cache cold and warm;
//! - **cluster**: nodes on one PostgreSQL, when one is named: runs/s over
//!   HTTP with 1, 2 and 3 nodes, takeover after a kill (`system_cluster.rs`);
//! - **memory**: the server's RSS idle, with 10,000 runs in flight (accepted,
//!   not finished), and after they all finish;
//! - **console**: the web console drawing a 2,000-step run and a `for_each`
//!   of 10,000 items in Debian's chromium (`system_console.rs`).
//!
//! The load generator runs on the same machine as the server and shares its
//! cores: every HTTP figure says how much CPU each side used, and how much
//! went to other processes meanwhile.
//!
//! `TRELLIS_BENCH_SYSTEM=http,memory` (any of `http`, `cluster`, `trellis run`,
//! `serve`, `memory`, `console`) runs only those parts, for profiling one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use crate::Options;
use crate::report::{Measurement, median, percentile, quantiles};

#[path = "system_http.rs"]
pub(crate) mod client;
#[path = "system_cluster.rs"]
mod cluster;
#[path = "system_console.rs"]
mod console;
#[path = "system_proc.rs"]
pub(crate) mod process;

use client::Conn;
use process::{Metrics, Server, machine_busy_seconds, own_cpu_seconds};

/// The issue 6 targets.
const TARGET_RUNS_PER_S: f64 = 5_000.0;
const TARGET_P99_MS: f64 = 20.0;
const TARGET_RSS_MIB: f64 = 1024.0;

/// The small JSON object every chain passes on.
const INPUT: &[u8] = br#"{"order":42,"customer":"acme","items":["a","b","c"],"total":99.5}"#;

/// What a 3-step chain of `noop` answers for [`INPUT`]: its sink step's
/// output, which is the input passed on.
fn chain3_output() -> Value {
    let input: Value = serde_json::from_slice(INPUT).expect("INPUT is JSON");
    json!({ "s3": input })
}

/// How much of everything to do.
struct Scale {
    /// Concurrent clients of the `?wait` load, one level after another.
    levels: &'static [usize],
    /// Per level: stop after this many runs or this long, whichever first.
    runs_per_level: usize,
    time_per_level: Duration,
    /// Runs of the no-wait load, and its clients.
    nowait_runs: usize,
    nowait_clients: usize,
    /// Timed `trellis run`s per cache state.
    cold_runs: usize,
    /// Server starts per cache state.
    serve_rounds: usize,
    /// Runs in flight for the memory figure, and how many times over.
    in_flight: usize,
    memory_rounds: usize,
    /// Timed loads of each large run's console page.
    console_loads: usize,
}

const FULL: Scale = Scale {
    levels: &[16, 64, 128],
    runs_per_level: 5_000,
    time_per_level: Duration::from_secs(20),
    nowait_runs: 5_000,
    nowait_clients: 64,
    cold_runs: 10,
    serve_rounds: 5,
    in_flight: 10_000,
    memory_rounds: 2,
    console_loads: 7,
};

const SMOKE: Scale = Scale {
    levels: &[4, 16],
    runs_per_level: 100,
    time_per_level: Duration::from_secs(2),
    nowait_runs: 100,
    nowait_clients: 16,
    cold_runs: 2,
    serve_rounds: 1,
    in_flight: 300,
    memory_rounds: 1,
    console_loads: 1,
};

/// What every part needs: absolute paths (servers run in a temp dir) and a
/// scratch dir removed at the end.
pub(crate) struct Env {
    trellis: PathBuf,
    /// `target/plugins-test`: the noop and sleep fixtures.
    fixtures: PathBuf,
    scratch: tempfile::TempDir,
    scale: &'static Scale,
}

impl Env {
    pub(crate) fn new(options: &Options) -> anyhow::Result<Env> {
        let trellis = std::fs::canonicalize(&options.trellis).with_context(|| {
            format!(
                "no trellis binary at {} (build it: cargo build --release -p trellis)",
                options.trellis.display()
            )
        })?;
        // target/release/trellis -> target/plugins-test, else from the cwd.
        let fixtures = trellis
            .parent()
            .and_then(Path::parent)
            .map(|target| target.join("plugins-test"))
            .filter(|dir| dir.join("noop.wasm").is_file())
            .or_else(|| std::fs::canonicalize("target/plugins-test").ok())
            .filter(|dir| dir.join("noop.wasm").is_file())
            .context("no target/plugins-test/noop.wasm: build the fixtures (cargo build)")?;
        Ok(Env {
            trellis,
            fixtures,
            scratch: tempfile::Builder::new()
                .prefix("trellis-bench-system")
                .tempdir()?,
            scale: if options.smoke { &SMOKE } else { &FULL },
        })
    }

    /// A fresh dir under the scratch dir.
    pub(crate) fn dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.scratch.path().join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn fixtures_arg(&self) -> &str {
        self.fixtures.to_str().expect("a UTF-8 path")
    }

    /// `trellis serve` in `work`, on the data dir `work/<data>`, with the
    /// fixture plugins and the workflows in `workflows`.
    pub(crate) fn serve(
        &self,
        work: &Path,
        data: &str,
        workflows: &Path,
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        Server::start_with_env(
            &self.trellis,
            work,
            &[
                "--data-dir",
                arg(&work.join(data)),
                "--plugin-dir",
                self.fixtures_arg(),
                "--workflow-dir",
                arg(workflows),
            ],
            envs,
        )
    }

    pub(crate) fn trellis(&self) -> &Path {
        &self.trellis
    }
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

pub fn run(options: &Options) -> anyhow::Result<Vec<Measurement>> {
    let env = Env::new(options)?;
    let mut results = Vec::new();
    type Part = fn(&Env) -> anyhow::Result<Vec<Measurement>>;
    let parts: [(&str, Part); 6] = [
        ("http", http),
        ("cluster", cluster::cluster),
        ("cold start: trellis run", cold_run),
        ("cold start: serve", cold_serve),
        ("memory", memory),
        ("console", console::console),
    ];
    let only = std::env::var("TRELLIS_BENCH_SYSTEM").unwrap_or_default();
    for (name, part) in parts {
        if !only.is_empty() && !only.split(',').any(|want| name.contains(want.trim())) {
            continue;
        }
        let began = Instant::now();
        eprintln!("system: {name}...");
        results.extend(part(&env).with_context(|| format!("system part `{name}`"))?);
        eprintln!("system: {name} took {:.1} s", began.elapsed().as_secs_f64());
    }
    Ok(results)
}

/// A workflow of `n` noop steps in a chain, each passing its input on.
fn chain_workflow(n: usize) -> String {
    let mut toml = String::new();
    for i in 1..=n {
        let input = if i == 1 {
            "{{ input }}".to_owned()
        } else {
            format!("{{{{ steps.s{}.output }}}}", i - 1)
        };
        toml.push_str(&format!(
            "[[step]]\nid = \"s{i}\"\nplugin = \"noop\"\ninput = \"{input}\"\n\n"
        ));
    }
    toml
}

// ---------------------------------------------------------------- HTTP load

/// What one load level did.
pub(crate) struct Load {
    elapsed: Duration,
    /// Per request, ms.
    latencies: Vec<f64>,
    /// 200: finished (with `?wait`).
    finished: usize,
    /// 202: accepted, not finished (yet).
    accepted: usize,
    errors: usize,
    first_error: Option<String>,
    client_cpu: f64,
    server_cpu: f64,
    /// Every core's busy time: what neither side used was someone else's.
    machine_cpu: f64,
    /// The server's CPU seconds by thread name.
    server_threads: BTreeMap<String, f64>,
}

impl Load {
    fn requests(&self) -> usize {
        self.finished + self.accepted + self.errors
    }

    fn per_s(&self, n: usize) -> f64 {
        n as f64 / self.elapsed.as_secs_f64()
    }

    /// `server x.xx cores (threads...), client y.yy, other processes z.zz`,
    /// and the server's CPU time per request.
    fn cpu_note(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let threads = self
            .server_threads
            .iter()
            .filter(|(_, cpu)| **cpu / secs >= 0.01)
            .map(|(name, cpu)| format!("{name} {:.2}", cpu / secs))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "CPU: server {:.2} cores ({:.0} µs per request; by thread: {threads}), client {:.2}, other processes {:.2} (the load generator shares the machine's {} cores)",
            self.server_cpu / secs,
            self.server_cpu * 1e6 / self.requests().max(1) as f64,
            self.client_cpu / secs,
            ((self.machine_cpu - self.server_cpu - self.client_cpu) / secs).max(0.0),
            cores()
        )
    }

    /// Fails the run on any error: a refused request, a lost connection, a
    /// run that did not succeed or answered the wrong output. Figures of a
    /// load with errors would not be comparable, and the smoke run in CI is
    /// there to catch them.
    fn check(&self, what: &str) -> anyhow::Result<()> {
        ensure!(
            self.errors == 0,
            "{what}: {} errors of {} requests; the first: {}",
            self.errors,
            self.requests(),
            self.first_error.as_deref().unwrap_or("")
        );
        Ok(())
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `clients` threads, each on its own keep-alive connection, POST `body` to
/// `path` back to back until `max` requests in all or `max_time`. A run
/// answered finished (200) counts as an error unless it succeeded with
/// `expected` as its output. With several servers (the nodes of a
/// cluster), client `i` talks to server `i mod n`, and the server CPU is
/// theirs together.
pub(crate) fn load(
    servers: &[&Server],
    path: &str,
    body: &[u8],
    expected: &Value,
    clients: usize,
    max: usize,
    max_time: Duration,
) -> anyhow::Result<Load> {
    let server_cpu_now = || -> anyhow::Result<(f64, BTreeMap<String, f64>)> {
        let mut cpu = 0.0;
        let mut threads = BTreeMap::new();
        for server in servers {
            cpu += server.cpu_seconds()?;
            for (name, seconds) in server.thread_cpu_seconds()? {
                *threads.entry(name).or_insert(0.0) += seconds;
            }
        }
        Ok((cpu, threads))
    };
    let issued = AtomicUsize::new(0);
    let client_cpu = own_cpu_seconds()?;
    let (server_cpu, threads_before) = server_cpu_now()?;
    let machine_cpu = machine_busy_seconds()?;
    let began = Instant::now();
    let deadline = began + max_time;
    let per_client: Vec<anyhow::Result<Load>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let addr = servers[i % servers.len()].addr;
                let issued = &issued;
                scope.spawn(move || client(addr, path, body, expected, issued, max, deadline))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread panicked"))
            .collect()
    });
    let elapsed = began.elapsed();
    let (server_cpu_after, threads_after) = server_cpu_now()?;
    let mut total = Load {
        elapsed,
        latencies: Vec::new(),
        finished: 0,
        accepted: 0,
        errors: 0,
        first_error: None,
        client_cpu: own_cpu_seconds()? - client_cpu,
        server_cpu: server_cpu_after - server_cpu,
        machine_cpu: machine_busy_seconds()? - machine_cpu,
        server_threads: threads_after
            .into_iter()
            .map(|(name, cpu)| {
                let before = threads_before.get(&name).copied().unwrap_or(0.0);
                (name, cpu - before)
            })
            .collect(),
    };
    for one in per_client {
        let one = one?;
        total.latencies.extend(one.latencies);
        total.finished += one.finished;
        total.accepted += one.accepted;
        total.errors += one.errors;
        total.first_error = total.first_error.or(one.first_error);
    }
    Ok(total)
}

/// One client thread of [`load`].
fn client(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    expected: &Value,
    issued: &AtomicUsize,
    max: usize,
    deadline: Instant,
) -> anyhow::Result<Load> {
    let mut conn = Conn::connect(addr)?;
    let mut mine = Load {
        elapsed: Duration::ZERO,
        latencies: Vec::with_capacity(max.min(1 << 16)),
        finished: 0,
        accepted: 0,
        errors: 0,
        first_error: None,
        client_cpu: 0.0,
        server_cpu: 0.0,
        machine_cpu: 0.0,
        server_threads: BTreeMap::new(),
    };
    while issued.fetch_add(1, Ordering::Relaxed) < max && Instant::now() < deadline {
        let sent = Instant::now();
        let answer = conn.post_json(path, body);
        let latency = sent.elapsed();
        let problem = match answer {
            Ok(answer) if answer.status == 202 => {
                mine.accepted += 1;
                mine.latencies.push(latency.as_secs_f64() * 1e3);
                None
            }
            Ok(answer) if answer.status == 200 => match finished_run(&answer, expected) {
                Ok(()) => {
                    mine.finished += 1;
                    mine.latencies.push(latency.as_secs_f64() * 1e3);
                    None
                }
                Err(problem) => Some(problem),
            },
            Ok(answer) => Some(format!("{} {}", answer.status, answer.text())),
            Err(error) => {
                let _ = conn.reconnect();
                Some(error.to_string())
            }
        };
        if let Some(problem) = problem {
            mine.errors += 1;
            mine.first_error.get_or_insert(problem);
        }
    }
    Ok(mine)
}

/// A finished run as `?wait` answers it: succeeded, with `expected` as its
/// output.
fn finished_run(answer: &client::Response, expected: &Value) -> Result<(), String> {
    let run: Value = serde_json::from_slice(&answer.body)
        .map_err(|e| format!("the answer is not JSON ({e}): {}", answer.text()))?;
    if run["status"] != "succeeded" {
        return Err(format!("a run ended {}: {}", run["status"], answer.text()));
    }
    if run["output"] != *expected {
        return Err(format!(
            "a run gave {}, not {expected}: {}",
            run["output"],
            answer.text()
        ));
    }
    Ok(())
}

/// Polls `/metrics` until nothing is in flight; how long that took, and the
/// metrics then.
fn wait_until_drained(
    server: &mut Server,
    timeout: Duration,
) -> anyhow::Result<(Duration, Metrics)> {
    let began = Instant::now();
    let mut conn = Conn::connect(server.addr)?;
    loop {
        let metrics = server.metrics(&mut conn)?;
        if metrics.in_flight() <= 0.0 {
            return Ok((began.elapsed(), metrics));
        }
        server.check_alive()?;
        if began.elapsed() > timeout {
            bail!(
                "{} runs still in flight after {timeout:?}",
                metrics.in_flight()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn http(env: &Env) -> anyhow::Result<Vec<Measurement>> {
    let scale = env.scale;
    let work = env.dir("http")?;
    let workflows = env.dir("http/workflows")?;
    std::fs::write(workflows.join("chain3.toml"), chain_workflow(3))?;
    let mut server = env.serve(&work, "data", &workflows, &[])?;
    let expected = chain3_output();
    // Warm up: plugins instantiated, SQLite pages and the allocator warm.
    warm_up(env, &[&server], "warm-up")?;
    let mut results = Vec::new();
    for &clients in scale.levels {
        results.extend(waited_level(env, &mut server, clients, "")?);
    }

    // Fire and forget: how fast runs are accepted, and then completed.
    let clients = scale.nowait_clients;
    let nowait = load(
        &[&server],
        "/v1/workflows/chain3/runs",
        INPUT,
        &expected,
        clients,
        scale.nowait_runs,
        Duration::from_secs(120),
    )?;
    nowait.check("no wait")?;
    let (drained, metrics) = wait_until_drained(&mut server, Duration::from_secs(600))?;
    let not_succeeded = metrics.finished - metrics.succeeded;
    let done_after = nowait.elapsed + drained;
    let accepted = nowait.per_s(nowait.accepted + nowait.finished);
    let completed = nowait.accepted as f64 / done_after.as_secs_f64();
    let mut latencies = nowait.latencies.clone();
    let (p50, p99) = if latencies.is_empty() {
        (f64::NAN, f64::NAN)
    } else {
        (median(&mut latencies), percentile(&mut latencies, 99.0))
    };
    results.push(
        Measurement::new(
            "http",
            format!("3-step runs, no wait, {clients} clients: accepted"),
            accepted,
            "runs/s",
        )
        .note(format!(
            "{} requests in {:.2} s: {} accepted (202), {} errors; answer p50 {p50:.1} ms, p99 {p99:.1} ms; {}",
            nowait.requests(),
            nowait.elapsed.as_secs_f64(),
            nowait.accepted,
            nowait.errors,
            nowait.cpu_note()
        )),
    );
    results.push(
        Measurement::new(
            "http",
            format!("3-step runs, no wait, {clients} clients: completed"),
            completed,
            "runs/s",
        )
        .target(
            format!(">= {TARGET_RUNS_PER_S:.0} runs/s"),
            completed >= TARGET_RUNS_PER_S && nowait.errors == 0 && not_succeeded == 0.0,
        )
        .note(format!(
            "all {} done {:.2} s after the first request ({:.2} s after the last answer); runs not succeeded since the server started: {not_succeeded:.0}",
            nowait.accepted,
            done_after.as_secs_f64(),
            drained.as_secs_f64()
        )),
    );
    drop(server);

    // The same with the access log off: `serve` logs every request at info
    // by default; this says what that line costs.
    let clients = scale.levels[scale.levels.len() / 2];
    let mut quiet = env.serve(&work, "data-quiet", &workflows, &[("TRELLIS_LOG", "warn")])?;
    warm_up(env, &[&quiet], "warm-up")?;
    results.extend(waited_level(
        env,
        &mut quiet,
        clients,
        ", TRELLIS_LOG=warn",
    )?);
    Ok(results)
}

/// Runs a tenth of a level's runs (at most 3 s) through `servers`, so
/// that plugins are instantiated and the database and allocator are warm;
/// any error fails the part.
pub(crate) fn warm_up(env: &Env, servers: &[&Server], what: &str) -> anyhow::Result<()> {
    load(
        servers,
        "/v1/workflows/chain3/runs?wait=10s",
        INPUT,
        &chain3_output(),
        16,
        env.scale.runs_per_level / 10,
        Duration::from_secs(3),
    )?
    .check(what)
}

/// One level of the `?wait` load: runs/s and latency.
fn waited_level(
    env: &Env,
    server: &mut Server,
    clients: usize,
    label: &str,
) -> anyhow::Result<Vec<Measurement>> {
    let scale = env.scale;
    let load = load(
        &[server],
        "/v1/workflows/chain3/runs?wait=10s",
        INPUT,
        &chain3_output(),
        clients,
        scale.runs_per_level,
        scale.time_per_level,
    )?;
    server.check_alive()?;
    load.check(&format!("?wait, {clients} clients{label}"))?;
    let completed = load.per_s(load.finished);
    let name = format!("3-step runs, ?wait, {clients} clients{label}");
    let mut rows = vec![
        Measurement::new(
            "http",
            format!("{name}: completed"),
            completed,
            "runs/s",
        )
        .target(
            format!(">= {TARGET_RUNS_PER_S:.0} runs/s"),
            completed >= TARGET_RUNS_PER_S && load.errors == 0,
        )
        .note(format!(
            "{} requests in {:.1} s: {} finished (200), {} not finished within the wait (202), {} errors; accepted {:.0}/s; {}",
            load.requests(),
            load.elapsed.as_secs_f64(),
            load.finished,
            load.accepted,
            load.errors,
            load.per_s(load.finished + load.accepted),
            load.cpu_note()
        )),
    ];
    rows.extend(latency_rows(&name, &load));
    Ok(rows)
}

/// The latency rows of a load: the p50, and the p99 that carries the target
/// (so the targets table shows the figure its target is about).
fn latency_rows(name: &str, load: &Load) -> [Measurement; 2] {
    let (p50, p90, p99, max) = quantiles(&load.latencies);
    [
        Measurement::new("http", format!("{name}: latency p50"), p50, "ms").note(format!(
            "p90 {p90:.1} ms, max {max:.1} ms over {} requests",
            load.latencies.len()
        )),
        Measurement::new("http", format!("{name}: latency p99"), p99, "ms")
            .target(
                format!("p99 < {TARGET_P99_MS:.0} ms"),
                p99 < TARGET_P99_MS && load.errors == 0,
            )
            .note(format!("{} errors", load.errors)),
    ]
}

// ---------------------------------------------------------------- cold start

/// Wall times of `runs` runs of `command`, ms; each must exit 0.
fn time_process(mut command: impl FnMut() -> Command, runs: usize) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let mut command = command();
        command.stdin(Stdio::null()).stdout(Stdio::null());
        let began = Instant::now();
        let out = command.stderr(Stdio::piped()).output()?;
        let took = began.elapsed();
        ensure!(
            out.status.success(),
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        times.push(took.as_secs_f64() * 1e3);
    }
    Ok(times)
}

/// `median ms (min, max, n)` of `times`, and the median.
fn summary(times: &mut [f64]) -> (f64, String) {
    let mid = median(times);
    let note = format!(
        "min {:.1}, max {:.1} ms, n={}",
        times[0],
        times[times.len() - 1],
        times.len()
    );
    (mid, note)
}

fn cold_run(env: &Env) -> anyhow::Result<Vec<Measurement>> {
    let runs = env.scale.cold_runs;
    let work = env.dir("cold-run")?;
    let plugins = env.dir("cold-run/plugins")?;
    std::fs::copy(env.fixtures.join("noop.wasm"), plugins.join("noop.wasm"))?;
    let workflow = work.join("w1-chain10.toml");
    std::fs::write(&workflow, chain_workflow(10))?;
    let data = work.join("data");
    let input = std::str::from_utf8(INPUT)?;
    let trellis_run = |extra: &[&str]| {
        let mut command = Command::new(&env.trellis);
        command
            .current_dir(&work)
            .env_remove("TRELLIS_DATA_DIR")
            .args(["run", arg(&workflow), "--plugin-dir", arg(&plugins)])
            .args(["--input", input])
            .args(extra);
        command
    };
    // The process floor: exec, dynamic linking, clap, exit.
    let mut floor = time_process(
        || {
            let mut command = Command::new(&env.trellis);
            command.arg("--version");
            command
        },
        runs,
    )?;
    let (floor, _) = summary(&mut floor);
    // Fill the cache, then time warm starts.
    time_process(|| trellis_run(&["--data-dir", arg(&data)]), 1)?;
    let mut warm = time_process(|| trellis_run(&["--data-dir", arg(&data)]), runs)?;
    let mut cold = time_process(
        || trellis_run(&["--data-dir", arg(&data), "--no-cache"]),
        runs,
    )?;
    let (warm_median, warm_note) = summary(&mut warm);
    let (cold_median, cold_note) = summary(&mut cold);
    Ok(vec![
        Measurement::new(
            "cold",
            "trellis run chain10 (W1), code cache warm",
            warm_median,
            "ms",
        )
        .note(format!(
            "whole process, 1 plugin (noop); {warm_note}; `trellis --version` takes {floor:.1} ms"
        )),
        Measurement::new(
            "cold",
            "trellis run chain10 (W1), --no-cache",
            cold_median,
            "ms",
        )
        .note(format!(
            "whole process, compiles noop with Cranelift; {cold_note}"
        )),
    ])
}

/// Start to first accepted run: the port of the old `tests/bench/restart.py`.
fn cold_serve(env: &Env) -> anyhow::Result<Vec<Measurement>> {
    const PLUGINS: usize = 20;
    let work = env.dir("cold-serve")?;
    let plugins = env.dir("cold-serve/plugins")?;
    let workflows = env.dir("cold-serve/workflows")?;
    // The noop fixture at 20 versions: the version string its info() answers
    // patched in place (1.0.0, 1.1.0, ..., 2.9.0), so each is a component of
    // its own with its own digest, compiled and probed on its own.
    let noop = std::fs::read(env.fixtures.join("noop.wasm"))?;
    let at: Vec<usize> = noop
        .windows(5)
        .enumerate()
        .filter(|(_, w)| *w == b"1.0.0")
        .map(|(i, _)| i)
        .collect();
    ensure!(
        at.len() == 1,
        "noop.wasm holds `1.0.0` {} times, not once: the version is not where this harness expects it",
        at.len()
    );
    for i in 0..PLUGINS {
        let version = format!("{}.{}.0", 1 + i / 10, i % 10);
        let mut bytes = noop.clone();
        bytes[at[0]..at[0] + 5].copy_from_slice(version.as_bytes());
        std::fs::write(plugins.join(format!("noop-{version}.wasm")), bytes)?;
    }
    std::fs::write(
        workflows.join("first.toml"),
        "[[step]]\nid = \"a\"\nplugin = \"noop@1.0.0\"\ninput = 1\n",
    )?;
    let start = |data: &Path| -> anyhow::Result<(f64, f64)> {
        let began = Instant::now();
        let server = Server::start(
            &env.trellis,
            &work,
            &[
                "--data-dir",
                arg(data),
                "--plugin-dir",
                arg(&plugins),
                "--workflow-dir",
                arg(&workflows),
            ],
        )?;
        let mut conn = Conn::connect(server.addr)?;
        let answer = conn.post_json("/v1/workflows/first/runs", b"{}")?;
        let took = began.elapsed();
        ensure!(
            answer.status == 202,
            "the server refused the run: {} {}",
            answer.status,
            answer.text()
        );
        Ok((
            took.as_secs_f64() * 1e3,
            server.listening_after.as_secs_f64() * 1e3,
        ))
    };
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let (mut cold_listening, mut warm_listening) = (Vec::new(), Vec::new());
    for round in 0..env.scale.serve_rounds {
        let data = work.join(format!("data-{round}"));
        let (took, listening) = start(&data)?; // empty cache
        cold.push(took);
        cold_listening.push(listening);
        let (took, listening) = start(&data)?; // the cache the cold start wrote
        warm.push(took);
        warm_listening.push(listening);
        std::fs::remove_dir_all(&data)?;
    }
    let (cold_median, cold_note) = summary(&mut cold);
    let (warm_median, warm_note) = summary(&mut warm);
    Ok(vec![
        Measurement::new(
            "cold",
            format!("serve start to first accepted run, {PLUGINS} plugins, cache cold"),
            cold_median,
            "ms",
        )
        .note(format!(
            "{cold_note}; `listening` after {:.1} ms (median)",
            median(&mut cold_listening)
        )),
        Measurement::new(
            "cold",
            format!("serve start to first accepted run, {PLUGINS} plugins, cache warm"),
            warm_median,
            "ms",
        )
        .note(format!(
            "{warm_note}; `listening` after {:.1} ms (median)",
            median(&mut warm_listening)
        )),
    ])
}

// ---------------------------------------------------------------- memory

/// RSS idle, with `in_flight` runs accepted and not finished, and after they
/// finish. The first `max_concurrent_steps` runs sleep (the `sleep` fixture)
/// until cancelled, holding every step permit, so the others stay queued:
/// nothing finishes while the in-flight figure is taken.
fn memory(env: &Env) -> anyhow::Result<Vec<Measurement>> {
    const PERMITS: usize = 64;
    const CONNECTIONS: usize = 16;
    let scale = env.scale;
    let work = env.dir("memory")?;
    let workflows = env.dir("memory/workflows")?;
    std::fs::write(
        work.join("trellis.toml"),
        format!("max_concurrent_steps = {PERMITS}\n"),
    )?;
    std::fs::write(
        workflows.join("inflight.toml"),
        "[[step]]\nid = \"nap\"\nplugin = \"sleep\"\ninput = { ms = \"{{ input.ms }}\" }\nlimits = { timeout = \"30m\" }\n\n\
         [[step]]\nid = \"b\"\nplugin = \"noop\"\ninput = \"{{ steps.nap.output }}\"\n\n\
         [[step]]\nid = \"c\"\nplugin = \"noop\"\ninput = \"{{ steps.b.output }}\"\n",
    )?;
    let mut server = env.serve(&work, "data", &workflows, &[])?;
    let mut conn = Conn::connect(server.addr)?;
    std::thread::sleep(Duration::from_millis(500));
    let idle = server.rss_mib()?;
    let (idle_pool, idle_heap) = server.rss_split_mib()?;

    let mut results = Vec::new();
    let mut rounds = Vec::new();
    for round in 1..=scale.memory_rounds {
        // The blockers: long sleeps that hold every permit.
        let began = Instant::now();
        let mut blockers = Vec::new();
        for _ in 0..PERMITS {
            let answer = conn.post_json("/v1/workflows/inflight/runs", br#"{"ms":1200000}"#)?;
            ensure!(
                answer.status == 202,
                "blocker refused: {} {}",
                answer.status,
                answer.text()
            );
            let id = answer.json()?["id"]
                .as_str()
                .context("no run id")?
                .to_owned();
            blockers.push(id);
        }
        let blockers_took = began.elapsed();
        let waited = Instant::now();
        while server.metrics(&mut conn)?.steps_in_flight < PERMITS as f64 {
            server.check_alive()?;
            ensure!(
                waited.elapsed() < Duration::from_secs(60),
                "the blockers did not all start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The flood: the rest, as fast as CONNECTIONS clients can.
        let flood = load(
            &[&server],
            "/v1/workflows/inflight/runs",
            br#"{"ms":0}"#,
            // Answered 202 (no `?wait`): the output is checked by the count
            // of runs that succeeded once they drained.
            &json!({ "c": { "slept_ms": 0 } }),
            CONNECTIONS,
            scale.in_flight - PERMITS,
            Duration::from_secs(600),
        )?;
        flood.check("flood")?;
        let accept_time = blockers_took + flood.elapsed;
        // Sample while they wait.
        let mut rss: f64 = 0.0;
        for _ in 0..5 {
            rss = rss.max(server.rss_mib()?);
            std::thread::sleep(Duration::from_millis(100));
        }
        let metrics = server.metrics(&mut conn)?;
        let in_flight = metrics.in_flight();
        let hwm = server.hwm_mib()?;
        let (pool, heap) = server.rss_split_mib()?;
        // Let them go: cancel the blockers, then the rest run through.
        let drain_began = Instant::now();
        for id in &blockers {
            let answer = conn.post_json(&format!("/v1/runs/{id}/cancel"), b"")?;
            ensure!(
                answer.status == 200,
                "cancel {id}: {} {}",
                answer.status,
                answer.text()
            );
        }
        let (rest, metrics) = wait_until_drained(&mut server, Duration::from_secs(1800))?;
        let drained = drain_began.elapsed() + rest;
        // The blockers end cancelled; every other run must succeed.
        let expected = (round * PERMITS) as f64;
        ensure!(
            metrics.finished - metrics.succeeded == expected,
            "{} runs did not succeed, {expected} blockers were cancelled",
            metrics.finished - metrics.succeeded
        );
        std::thread::sleep(Duration::from_millis(500));
        let after = server.rss_mib()?;
        let (pool_after, heap_after) = server.rss_split_mib()?;
        rounds.push((rss, after, drained, pool_after, heap_after));
        if round == 1 {
            results.push(
                Measurement::new(
                    "memory",
                    format!("accept {} runs (no wait)", scale.in_flight),
                    accept_time.as_secs_f64(),
                    "s",
                )
                .note(format!(
                    "{:.0} runs/s over {CONNECTIONS} keep-alive connections ({PERMITS} sleeping blockers first, one at a time, {:.2} s); flood answer p99 {:.1} ms; {}",
                    scale.in_flight as f64 / accept_time.as_secs_f64(),
                    blockers_took.as_secs_f64(),
                    percentile(&mut flood.latencies.clone(), 99.0),
                    flood.cpu_note()
                )),
            );
            let row = Measurement::new(
                "memory",
                format!("RSS with {} runs in flight", scale.in_flight),
                rss,
                "MiB",
            );
            // The target is for 10,000 runs: a smoke run's few say nothing.
            let row = if scale.in_flight >= 10_000 {
                row.target("<= 1 GiB", rss <= TARGET_RSS_MIB)
            } else {
                row
            };
            results.push(
                row
                .note(format!(
                    "{in_flight:.0} accepted and not finished by /metrics ({PERMITS} running a sleep step, the rest queued); {:.1} KiB per run over idle; {pool:.0} MiB in the wasm instance pool, {heap:.0} MiB elsewhere (heap); peak (VmHWM) {hwm:.0} MiB",
                    (rss - idle) * 1024.0 / in_flight.max(1.0)
                )),
            );
        }
    }
    results.insert(
        0,
        Measurement::new("memory", "RSS idle (serve, 6 fixture plugins)", idle, "MiB")
            .note(format!("VmRSS of trellis serve 0.5 s after it listens, before any run ({idle_pool:.0} MiB wasm pool, {idle_heap:.0} MiB elsewhere)")),
    );
    let last = rounds.last().copied().context("no memory round")?;
    results.push(
        Measurement::new("memory", "RSS after they all finish", last.1, "MiB")
            .note(format!(
                "{}; flat if each round ends where the one before did",
                rounds
                    .iter()
                    .enumerate()
                    .map(|(i, (peak, after, drained, pool, heap))| format!(
                        "round {}: {peak:.0} MiB in flight, {after:.0} MiB after ({pool:.0} MiB wasm pool, {heap:.0} MiB heap), drained in {:.1} s ({:.0} runs/s)",
                        i + 1,
                        drained.as_secs_f64(),
                        scale.in_flight as f64 / drained.as_secs_f64()
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
    );
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_pass_each_output_on() {
        let toml = chain_workflow(3);
        assert!(toml.contains("id = \"s1\"\nplugin = \"noop\"\ninput = \"{{ input }}\""));
        assert!(toml.contains("id = \"s3\"\nplugin = \"noop\"\ninput = \"{{ steps.s2.output }}\""));
        assert_eq!(toml.matches("[[step]]").count(), 3);
    }

    #[test]
    fn the_latency_target_is_judged_and_shown_on_the_p99() {
        let load = |latencies: Vec<f64>, errors| Load {
            elapsed: Duration::from_secs(1),
            latencies,
            finished: 100,
            accepted: 0,
            errors,
            first_error: None,
            client_cpu: 0.0,
            server_cpu: 0.0,
            machine_cpu: 0.0,
            server_threads: BTreeMap::new(),
        };
        // 98 fast answers and 2 slow ones: the p50 meets 20 ms, the p99 does not.
        let mut slow_tail = vec![5.0; 98];
        slow_tail.extend([30.0, 40.0]);
        let [p50, p99] = latency_rows("x", &load(slow_tail, 0));
        assert_eq!(
            (p50.name.as_str(), p50.value, &p50.target),
            ("x: latency p50", 5.0, &None)
        );
        assert_eq!(p99.name, "x: latency p99");
        assert_eq!(p99.value, 30.0);
        assert_eq!(p99.target, Some(("p99 < 20 ms".to_owned(), false)));
        let [_, p99] = latency_rows("x", &load(vec![5.0; 100], 0));
        assert_eq!((p99.value, p99.target.unwrap().1), (5.0, true));
        let [_, p99] = latency_rows("x", &load(vec![5.0; 100], 1));
        assert!(!p99.target.unwrap().1, "an error fails the target");
    }

    fn answer(body: &str) -> client::Response {
        client::Response {
            status: 200,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_finished_run_counts_only_with_the_expected_output() {
        let expected = chain3_output();
        let input = std::str::from_utf8(INPUT).unwrap();
        let good = format!(r#"{{"status":"succeeded","output":{{"s3":{input}}}}}"#);
        assert_eq!(finished_run(&answer(&good), &expected), Ok(()));
        let wrong = r#"{"status":"succeeded","output":{"s3":{"order":41}}}"#;
        assert!(
            finished_run(&answer(wrong), &expected)
                .unwrap_err()
                .contains("a run gave")
        );
        let failed = r#"{"status":"failed","output":null}"#;
        assert!(
            finished_run(&answer(failed), &expected)
                .unwrap_err()
                .contains("ended \"failed\"")
        );
        assert!(finished_run(&answer("nope"), &expected).is_err());
    }
}
