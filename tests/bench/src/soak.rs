//! Soak (issue 7): a fresh `trellis serve` (`--trellis`) takes `--soak-runs`
//! runs of a 3-step workflow from `--soak-clients` concurrent keep-alive
//! clients on loopback, each POST with `?wait`. Every answer is checked: a
//! transport error, a status other than 200/202, a run not `succeeded` or
//! with another output than its input implies is an error. Meanwhile the
//! server's RSS is sampled; memory is *flat* when the mean RSS of the last
//! quarter of the runs is at most [`FLAT_GROWTH`] above that of the second
//! quarter (the first is warm-up: instance pool, caches, allocator arenas).
//!
//! `trellis-bench --soak [--soak-runs 20000] [--soak-clients 128]`; with
//! `--smoke`, [`SMOKE_RUNS`] runs from [`SMOKE_CLIENTS`] clients (also part
//! of a plain `--smoke` run), where only the errors are judged.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::Options;
use crate::report::{Measurement, quantiles};
use crate::system::Env;
use crate::system::client::{Conn, Response};

pub const SMOKE_RUNS: usize = 400;
pub const SMOKE_CLIENTS: usize = 16;

/// How much the last quarter's mean RSS may exceed the second quarter's.
const FLAT_GROWTH: f64 = 0.05;

/// Each step transforms what the previous one passed on, so the output
/// proves all three ran on this run's input: `n` tripled, `tag` upper-cased
/// and suffixed.
const WORKFLOW: &str = r#"
name = "soak"

[[step]]
id = "parse"
plugin = "noop"
input = "{{ input }}"

[[step]]
id = "double"
plugin = "noop"
input = { n = "{{ steps.parse.output.n * 2 }}", tag = "{{ steps.parse.output.tag | upper }}" }

[[step]]
id = "sum"
plugin = "noop"
input = { n = "{{ steps.double.output.n + input.n }}", tag = "{{ steps.double.output.tag }}-{{ input.n }}" }

[output]
n = "{{ steps.sum.output.n }}"
tag = "{{ steps.sum.output.tag }}"
"#;

fn input(n: usize) -> String {
    json!({ "n": n, "tag": format!("run{n}") }).to_string()
}

fn expected_output(n: usize) -> Value {
    json!({ "n": 3 * n, "tag": format!("RUN{n}-{n}") })
}

/// One RSS sample.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Runs completed when it was taken.
    completed: usize,
    /// `VmRSS` and its anonymous part (`RssAnon`: heap, pool pages), MiB.
    rss: f64,
    anon: f64,
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<f64>,
    errors: usize,
    first_errors: Vec<String>,
    /// Answered 202 (not finished within the wait), then polled to the end.
    late: usize,
}

impl Tally {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(what);
        }
    }
}

pub fn run(options: &Options) -> anyhow::Result<Vec<Measurement>> {
    let (runs, clients) = if options.smoke {
        (SMOKE_RUNS, SMOKE_CLIENTS)
    } else {
        (options.soak_runs, options.soak_clients)
    };
    anyhow::ensure!(
        runs >= 4 && clients >= 1,
        "--soak-runs >= 4, --soak-clients >= 1"
    );
    let env = Env::new(options)?;
    let work = env.dir("soak")?;
    let workflows = env.dir("soak/workflows")?;
    std::fs::write(workflows.join("soak.toml"), WORKFLOW)?;
    let server = env.serve(&work, "data", &workflows, &[])?;
    std::thread::sleep(Duration::from_millis(500));
    let pid = server.pid();
    let (idle, _) = rss_mib(pid)?;
    eprintln!(
        "soak: {runs} runs, {clients} clients, server {} (pid {pid}), idle RSS {idle:.1} MiB",
        env.trellis().display()
    );

    let issued = AtomicUsize::new(0);
    let completed = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let samples = Mutex::new(Vec::new());
    let cpu_before = server.cpu_seconds()?;
    let began = Instant::now();
    let tallies: Vec<anyhow::Result<Tally>> = std::thread::scope(|scope| {
        scope.spawn(|| {
            // Every 20 ms: several samples per tenth of the runs unless
            // those go faster than 5,000 runs/s.
            while !done.load(Ordering::SeqCst) {
                if let Ok((rss, anon)) = rss_mib(pid) {
                    samples.lock().unwrap().push(Sample {
                        completed: completed.load(Ordering::SeqCst),
                        rss,
                        anon,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let handles: Vec<_> = (0..clients)
            .map(|_| scope.spawn(|| client(server.addr, runs, &issued, &completed)))
            .collect();
        let tallies = handles
            .into_iter()
            .map(|h| h.join().expect("a client thread panicked"))
            .collect();
        done.store(true, Ordering::SeqCst);
        tallies
    });
    let elapsed = began.elapsed();
    let server_cpu = server.cpu_seconds()? - cpu_before;
    let mut tally = Tally::default();
    for one in tallies {
        let one = one?;
        tally.latencies.extend(one.latencies);
        tally.errors += one.errors;
        tally.late += one.late;
        for error in one.first_errors {
            if tally.first_errors.len() < 5 {
                tally.first_errors.push(error);
            }
        }
    }
    let (after, after_anon) = rss_mib(pid)?;

    // What the store holds: every run, once, succeeded.
    let mut conn = Conn::connect(server.addr)?;
    let stored = count_runs(&mut conn, "succeeded")?;
    let all = count_runs(&mut conn, "")?;
    if stored != runs || all != runs {
        tally.error(format!(
            "the store lists {all} runs, {stored} succeeded; {runs} were submitted"
        ));
    }
    let mut samples = samples.into_inner().unwrap();
    samples.push(Sample {
        completed: runs,
        rss: after,
        anon: after_anon,
    });
    drop(server);

    let throughput = runs as f64 / elapsed.as_secs_f64();
    let (p50, p90, p99, max) = quantiles(&tally.latencies);
    let memory = Memory::of(&samples, runs);
    let flat = memory.growth() <= FLAT_GROWTH;

    eprintln!(
        "soak: {runs} runs in {:.1} s = {throughput:.0} runs/s, {} errors, {} late (202, then polled); \
         latency p50 {p50:.1} ms, p90 {p90:.1} ms, p99 {p99:.1} ms, max {max:.1} ms; server CPU {server_cpu:.1} s",
        elapsed.as_secs_f64(),
        tally.errors,
        tally.late,
    );
    for error in &tally.first_errors {
        eprintln!("soak: error: {error}");
    }
    eprintln!("soak: RSS (MiB) idle {idle:.1}, at each tenth of the runs:");
    for (tenth, sample) in &memory.tenths {
        eprintln!(
            "soak:   {:>3}% ({:>6} runs): VmRSS {:>7.1}, RssAnon {:>7.1}",
            tenth * 10,
            sample.completed,
            sample.rss,
            sample.anon
        );
    }
    eprintln!(
        "soak: quarters' mean VmRSS {:.1} / {:.1} / {:.1} / {:.1} MiB, max {:.1} MiB; \
         last vs second quarter {:+.1}%, {:+.0} bytes per run ({}: <= +{:.0}%)",
        memory.quarters[0],
        memory.quarters[1],
        memory.quarters[2],
        memory.quarters[3],
        memory.max,
        memory.growth() * 100.0,
        memory.bytes_per_run(runs),
        if flat { "flat" } else { "NOT flat" },
        FLAT_GROWTH * 100.0,
    );

    let label = format!("{runs} 3-step runs, ?wait, {clients} clients");
    let tenths = memory
        .tenths
        .iter()
        .map(|(tenth, s)| format!("{}%: {:.0}", tenth * 10, s.rss))
        .collect::<Vec<_>>()
        .join(", ");
    let results = vec![
        Measurement::new("soak", format!("{label}: completed"), throughput, "runs/s")
            .target("0 errors", tally.errors == 0)
            .note(format!(
                "{runs} runs in {:.1} s, {} errors, {} answered 202 then polled; every output checked; server CPU {server_cpu:.1} s",
                elapsed.as_secs_f64(),
                tally.errors,
                tally.late
            )),
        Measurement::new("soak", format!("{label}: latency p50"), p50, "ms").note(format!(
            "p90 {p90:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
        )),
        Measurement::new("soak", format!("{label}: RSS, last quarter"), memory.quarters[3], "MiB")
            .target(
                format!("flat: <= second quarter +{:.0}%", FLAT_GROWTH * 100.0),
                flat,
            )
            .note(format!(
                "VmRSS MiB idle {idle:.0}; {tenths}; quarters' means {:.0}/{:.0}/{:.0}/{:.0} ({:+.1}%, {:+.0} B/run); max {:.0}",
                memory.quarters[0],
                memory.quarters[1],
                memory.quarters[2],
                memory.quarters[3],
                memory.growth() * 100.0,
                memory.bytes_per_run(runs),
                memory.max
            )),
    ];
    if tally.errors > 0 {
        bail!(
            "soak: {} errors, first: {:?}",
            tally.errors,
            tally.first_errors
        );
    }
    if !options.smoke && !flat {
        bail!(
            "soak: memory is not flat: the last quarter's mean VmRSS is {:+.1}% over the second's",
            memory.growth() * 100.0
        );
    }
    Ok(results)
}

/// One client: a keep-alive connection, one run at a time until `runs` are
/// issued.
fn client(
    addr: SocketAddr,
    runs: usize,
    issued: &AtomicUsize,
    completed: &AtomicUsize,
) -> anyhow::Result<Tally> {
    let mut conn = Conn::connect(addr)?;
    let mut tally = Tally::default();
    loop {
        let n = issued.fetch_add(1, Ordering::SeqCst);
        if n >= runs {
            return Ok(tally);
        }
        let sent = Instant::now();
        let answer = conn.post_json("/v1/workflows/soak/runs?wait=60s", input(n).as_bytes());
        let latency = sent.elapsed().as_secs_f64() * 1e3;
        let checked = match answer {
            Ok(answer) if answer.status == 200 => check(n, &answer),
            Ok(answer) if answer.status == 202 => {
                tally.late += 1;
                answer
                    .json()
                    .and_then(|run| finished(&mut conn, &run))
                    .and_then(|answer| check(n, &answer))
            }
            Ok(answer) => Err(anyhow::anyhow!("{} {}", answer.status, answer.text())),
            Err(error) => {
                let _ = conn.reconnect();
                Err(error.into())
            }
        };
        match checked {
            Ok(()) => tally.latencies.push(latency),
            Err(error) => tally.error(format!("run {n}: {error}")),
        }
        completed.fetch_add(1, Ordering::SeqCst);
    }
}

/// The run succeeded with the output its input implies.
fn check(n: usize, answer: &Response) -> anyhow::Result<()> {
    let run = answer.json()?;
    if run["status"] != "succeeded" {
        bail!("status {}: {}", run["status"], run["error"]);
    }
    let expected = expected_output(n);
    if run["output"] != expected {
        bail!("output {} instead of {expected}", run["output"]);
    }
    if run["input"]["n"] != n {
        bail!("the answer is run {}'s", run["input"]["n"]);
    }
    Ok(())
}

/// Polls a run that was not finished within the wait until it is.
fn finished(conn: &mut Conn, run: &Value) -> anyhow::Result<Response> {
    let id = run["id"].as_str().context("no run id")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer = conn.get(&format!("/v1/runs/{id}"))?;
        let status = answer.json()?["status"].clone();
        if status != "queued" && status != "running" {
            return Ok(answer);
        }
        if Instant::now() > deadline {
            bail!("run {id} still {status} after 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs of the soak workflow the store lists (with this status, if any).
fn count_runs(conn: &mut Conn, status: &str) -> anyhow::Result<usize> {
    let mut count = 0;
    let mut cursor = String::new();
    loop {
        let mut path = "/v1/runs?workflow=soak&limit=1000".to_owned();
        if !status.is_empty() {
            path.push_str(&format!("&status={status}"));
        }
        if !cursor.is_empty() {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let answer = conn.get(&path)?;
        if answer.status != 200 {
            bail!("GET {path}: {} {}", answer.status, answer.text());
        }
        let page = answer.json()?;
        count += page["runs"].as_array().map_or(0, Vec::len);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = next.to_owned(),
            None => return Ok(count),
        }
    }
}

/// The RSS over the soak, by share of the runs completed.
struct Memory {
    /// The first sample at or past each tenth (1..=10) of the runs.
    tenths: Vec<(usize, Sample)>,
    /// Mean VmRSS over each quarter of the runs, MiB.
    quarters: [f64; 4],
    max: f64,
}

impl Memory {
    fn of(samples: &[Sample], runs: usize) -> Memory {
        let tenths = (1..=10)
            .filter_map(|tenth| {
                samples
                    .iter()
                    .find(|s| s.completed * 10 >= runs * tenth)
                    .map(|s| (tenth, *s))
            })
            .collect();
        let mut quarters = [f64::NAN; 4];
        for (quarter, mean) in quarters.iter_mut().enumerate() {
            let within: Vec<f64> = samples
                .iter()
                .filter(|s| {
                    let at = s.completed * 4;
                    at >= runs * quarter && (at < runs * (quarter + 1) || quarter == 3)
                })
                .map(|s| s.rss)
                .collect();
            if !within.is_empty() {
                *mean = within.iter().sum::<f64>() / within.len() as f64;
            }
        }
        Memory {
            tenths,
            quarters,
            max: samples.iter().map(|s| s.rss).fold(0.0, f64::max),
        }
    }

    /// The last quarter's mean over the second's, minus one.
    fn growth(&self) -> f64 {
        self.quarters[3] / self.quarters[1] - 1.0
    }

    /// What the growth from the second quarter to the last comes to per run
    /// (their means are half the runs apart), bytes.
    fn bytes_per_run(&self, runs: usize) -> f64 {
        (self.quarters[3] - self.quarters[1]) * 1024.0 * 1024.0 / (runs as f64 / 2.0)
    }
}

/// `VmRSS` and `RssAnon` of a process, MiB.
fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> anyhow::Result<f64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    Ok((kib("VmRSS")? / 1024.0, kib("RssAnon")? / 1024.0))
}

/// `target/plugins-test` next to the binary's profile dir, else from the cwd.
#[cfg(test)]
mod tests {
    use super::*;

    fn sample(completed: usize, rss: f64) -> Sample {
        Sample {
            completed,
            rss,
            anon: rss / 2.0,
        }
    }

    #[test]
    fn memory_is_judged_by_quarters_of_the_runs() {
        // 100 runs: warm-up growth in the first quarter does not count.
        let samples: Vec<Sample> = (0..=100)
            .map(|c| sample(c, if c < 25 { 50.0 + c as f64 } else { 100.0 }))
            .collect();
        let memory = Memory::of(&samples, 100);
        assert_eq!(memory.tenths.len(), 10);
        assert_eq!(memory.tenths[0].1.completed, 10);
        assert_eq!(memory.quarters[1], 100.0);
        assert_eq!(memory.quarters[3], 100.0);
        assert!(memory.growth().abs() < 1e-9);
        // A leak: RSS keeps rising with the runs.
        let leaking: Vec<Sample> = (0..=100).map(|c| sample(c, 100.0 + c as f64)).collect();
        let memory = Memory::of(&leaking, 100);
        assert!(memory.growth() > FLAT_GROWTH, "{}", memory.growth());
        assert_eq!(memory.max, 200.0);
    }

    #[test]
    fn the_expected_output_follows_the_workflow() {
        assert_eq!(expected_output(7), json!({ "n": 21, "tag": "RUN7-7" }));
        assert_eq!(
            serde_json::from_str::<Value>(&input(7)).unwrap(),
            json!({ "n": 7, "tag": "run7" })
        );
    }
}
