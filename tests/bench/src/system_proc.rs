//! Processes the system part starts and watches: a `trellis serve` child on a
//! loopback port of its own, and what `/proc` says about it (RSS, CPU time).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use super::client::Conn;

/// Stderr lines kept to explain a failure.
const KEPT_LINES: usize = 40;

/// A `trellis serve` this process started; killed (by its PID) when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// From spawn to the `listening on` line.
    pub listening_after: Duration,
    log: Arc<Mutex<VecDeque<String>>>,
    /// The wasm instance pool's address ranges (see [`Server::rss_split_mib`]).
    pool: Vec<(u64, u64)>,
}

impl Server {
    /// Starts `trellis serve --bind 127.0.0.1:0 ARGS...` in `cwd` (so no
    /// `trellis.toml` of the caller's is read) and waits for its address.
    pub fn start(trellis: &Path, cwd: &Path, args: &[&str]) -> anyhow::Result<Server> {
        Server::start_with_env(trellis, cwd, args, &[])
    }

    /// [`Server::start`] with these environment variables set.
    pub fn start_with_env(
        trellis: &Path,
        cwd: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let began = Instant::now();
        let mut child = Command::new(trellis)
            .arg("serve")
            .args(["--bind", "127.0.0.1:0"])
            .args(args)
            .current_dir(cwd)
            .env_remove("TRELLIS_LOG")
            .env_remove("TRELLIS_BIND")
            .env_remove("TRELLIS_DATA_DIR")
            .env_remove("TRELLIS_PLUGIN_DIRS")
            .env_remove("TRELLIS_WORKFLOW_DIRS")
            .env_remove("TRELLIS_MAX_CONCURRENT_STEPS")
            .env_remove("TRELLIS_AUTH_TOKEN")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", trellis.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            // Drains stderr for the server's whole life, so it never blocks on it.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = line.strip_prefix("listening on http://") {
                        let _ = tx.send(addr.trim().to_owned());
                    }
                    let mut log = log.lock().unwrap();
                    if log.len() == KEPT_LINES {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            });
        }
        let mut server = Server {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            listening_after: Duration::ZERO,
            log,
            pool: Vec::new(),
        };
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(addr) => {
                server.listening_after = began.elapsed();
                server.addr = addr
                    .parse()
                    .with_context(|| format!("the server listens on `{addr}`?"))?;
                Ok(server)
            }
            Err(_) => {
                let status = server.child.try_wait()?;
                bail!(
                    "trellis serve did not start (exit {status:?}):\n{}",
                    server.log_tail()
                )
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the server wrote to stderr.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap();
        log.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Fails if the server exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("trellis serve exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        Ok(status_kib(self.pid(), "VmRSS")? / 1024.0)
    }

    /// The RSS in the wasm instance pool (the pooling allocator's big
    /// reservations: linear memories, tables, fiber stacks) and in everything
    /// else (heap, code, thread stacks), MiB, from `/proc/PID/smaps`. The
    /// pool's ranges are those of the mappings of 512 MiB or more when first
    /// asked (the server splits them later, mapping images into slots).
    pub fn rss_split_mib(&mut self) -> anyhow::Result<(f64, f64)> {
        const POOL_MIN: u64 = 512 << 20;
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.pid()))?;
        let mut mappings = Vec::new();
        let mut range = (0, 0);
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-')
                && let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                range = (start, end);
            } else if first == "Rss:" {
                let kib: f64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0.0);
                mappings.push((range, kib / 1024.0));
            }
        }
        if self.pool.is_empty() {
            self.pool = mappings
                .iter()
                .map(|(range, _)| *range)
                .filter(|(start, end)| end - start >= POOL_MIN)
                .collect();
        }
        let (mut pool, mut rest) = (0.0, 0.0);
        for ((start, end), mib) in mappings {
            if self.pool.iter().any(|(s, e)| *s <= start && end <= *e) {
                pool += mib;
            } else {
                rest += mib;
            }
        }
        Ok((pool, rest))
    }

    /// The peak RSS so far.
    pub fn hwm_mib(&self) -> anyhow::Result<f64> {
        Ok(status_kib(self.pid(), "VmHWM")? / 1024.0)
    }

    /// User + system CPU seconds the server has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(&format!("/proc/{}/stat", self.pid()))
    }

    /// CPU seconds per thread name (`trellis-worker`, `trellis-store-w`...),
    /// of the threads alive now.
    pub fn thread_cpu_seconds(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        let mut by_name = BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", self.pid()))? {
            let dir = task?.path();
            let (Ok(name), Ok(cpu)) = (
                std::fs::read_to_string(dir.join("comm")),
                cpu_seconds(&dir.join("stat").to_string_lossy()),
            ) else {
                continue; // the thread ended meanwhile
            };
            *by_name.entry(name.trim().to_owned()).or_insert(0.0) += cpu;
        }
        Ok(by_name)
    }

    /// The server's Prometheus metrics.
    pub fn metrics(&self, conn: &mut Conn) -> anyhow::Result<Metrics> {
        let answer = conn.get("/metrics")?;
        if answer.status != 200 {
            bail!("GET /metrics: {} {}", answer.status, answer.text());
        }
        Ok(Metrics::parse(&answer.text()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counters the harness follows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics {
    pub accepted: f64,
    pub finished: f64,
    /// Finished with status `succeeded`.
    pub succeeded: f64,
    pub steps_in_flight: f64,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut metrics = Metrics::default();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            match name {
                "trellis_runs_accepted_total" => metrics.accepted += value,
                "trellis_runs_total" => {
                    metrics.finished += value;
                    if series.contains("status=\"succeeded\"") {
                        metrics.succeeded += value;
                    }
                }
                "trellis_steps_in_flight" => metrics.steps_in_flight += value,
                _ => {}
            }
        }
        metrics
    }

    /// Accepted and not finished.
    pub fn in_flight(&self) -> f64 {
        self.accepted - self.finished
    }
}

/// A `kB` line of `/proc/PID/status`.
fn status_kib(pid: u32, key: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// User + system CPU seconds of this process (every thread, live or gone).
pub fn own_cpu_seconds() -> anyhow::Result<f64> {
    cpu_seconds("/proc/self/stat")
}

fn cpu_seconds(stat: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(stat)?;
    // Fields after the `(comm)`, which may hold spaces: state is field 3,
    // utime 14, stime 15.
    let after = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ) in stat")?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i - 3).context("short stat")?.parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / clock_ticks())
}

/// CPU seconds every core of the machine has spent busy (not idle or
/// waiting for I/O), from `/proc/stat`: with the server's and our own, what
/// the rest of the machine took meanwhile.
pub fn machine_busy_seconds() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|field| field.parse().ok())
        .collect();
    ensure!(ticks.len() >= 5, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal (guest is in user).
    let busy: f64 = ticks.iter().take(8).sum::<f64>() - ticks[3] - ticks[4];
    Ok(busy / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`, from `getconf` (no libc here); 100 if unknown.
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sum_labelled_series() {
        let text = "# TYPE trellis_runs_total counter\n\
            trellis_runs_total{workflow=\"a\",status=\"succeeded\"} 7\n\
            trellis_runs_total{workflow=\"a\",status=\"cancelled\"} 2\n\
            trellis_runs_accepted_total{workflow=\"a\"} 12\n\
            trellis_steps_in_flight 3\n";
        let metrics = Metrics::parse(text);
        assert_eq!(metrics.finished, 9.0);
        assert_eq!(metrics.succeeded, 7.0);
        assert_eq!(metrics.accepted, 12.0);
        assert_eq!(metrics.in_flight(), 3.0);
        assert_eq!(metrics.steps_in_flight, 3.0);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        assert!(own_cpu_seconds().unwrap() >= 0.0);
        assert!(machine_busy_seconds().unwrap() > 0.0);
        assert!(status_kib(std::process::id(), "VmRSS").unwrap() > 0.0);
    }
}
