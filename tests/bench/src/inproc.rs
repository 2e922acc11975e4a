//! The in-process part: the raw wasmtime limit, the per-step overhead of the
//! executor in memory and of the durable service, the workflow shapes and
//! runs per second, all in this process, one after the other, on one tokio
//! runtime (worker threads = cores, as `trellis serve` has).
//!
//! - **limit** (`inproc_limit.rs`): fresh store + instance + `run` of
//!   `noop`, no Trellis code on the hot path;
//! - **sandbox**: the same through `Plugin::invoke` (Trellis's sandbox: the
//!   limiter, captured output, the outcome), no executor;
//! - **memory**: `Executor::run` with no store;
//! - **durable**: `Service::submit` + `Service::wait` with the SQLite store
//!   in a temporary data dir: what a caller of the API waits for, minus HTTP;
//! - **postgres**: the same on PostgreSQL (a node of a cluster of one, in a
//!   schema of its own), when `TRELLIS_BENCH_POSTGRES` (or
//!   `TRELLIS_TEST_POSTGRES`) names a server: 1 step, chain10 and chain40.
//!
//! Each figure is the median of many runs after a warm-up; the note gives the
//! sample count and the p99 (or the range, for few samples). The limit is
//! measured again at the end: if the machine got busier meanwhile, the two
//! differ.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use trellis::config::Config;
use trellis::engine::{Engine, Limits};
use trellis::executor::{Executor, RunOptions};
use trellis::plugin::{Invocation, MemoryStateStore, Plugin, PluginRegistry, StateStore};
use trellis::record::{RunRecord, RunStatus};
use trellis::service::Service;
use trellis::workflow::{self, Plan};

use crate::Options;
use crate::report::{Measurement, median, percentile};

#[path = "inproc_limit.rs"]
mod limit;
#[path = "inproc_workflows.rs"]
mod workloads;

use limit::RawPlugin;
use workloads::Workload;

/// Where host/build.rs puts the test fixtures and the example plugins.
const TEST_PLUGINS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/plugins-test");
const EXAMPLE_PLUGINS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/plugins");

/// Steps running at once over all runs: `trellis serve`'s default.
const MAX_CONCURRENT_STEPS: usize = 64;
/// Runs in flight at once in the concurrent runs/s measurement.
const CONCURRENT_RUNS: usize = 64;
/// How long one durable run may take before the benchmark gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The targets of issue 6.
const STEP_MEMORY_TARGET: f64 = 1.5;
const STEP_DURABLE_TARGET: f64 = 3.0;

/// How many times to measure one thing: a warm-up, then at least `min`
/// samples, then more until `max` or until `time` has passed.
#[derive(Debug, Clone, Copy)]
struct Budget {
    warmup: usize,
    min: usize,
    max: usize,
    time: Duration,
}

impl Budget {
    const fn new(warmup: usize, min: usize, max: usize, millis: u64) -> Budget {
        Budget {
            warmup,
            min,
            max,
            time: Duration::from_millis(millis),
        }
    }

    /// Smoke mode: three of each, to prove it works.
    fn or_smoke(self, smoke: bool) -> Budget {
        if smoke { Budget::new(0, 3, 3, 0) } else { self }
    }
}

/// Budgets in normal mode: about a minute over everything in a release build.
const FAST_CALL: Budget = Budget::new(500, 2_000, 100_000, 2_500);
const SHORT_RUN: Budget = Budget::new(100, 500, 50_000, 3_000);
const MEDIUM_RUN: Budget = Budget::new(20, 100, 10_000, 3_000);
const LONG_RUN: Budget = Budget::new(3, 15, 1_000, 4_000);
const RUNS_PER_SECOND: Budget = Budget::new(64, 0, usize::MAX, 3_000);

/// Samples in µs.
struct Samples(Vec<f64>);

impl Samples {
    fn median(&mut self) -> f64 {
        median(&mut self.0)
    }

    /// `n=2000, p99 41.2 µs`, or the range when there are too few for a p99.
    fn note(&mut self, unit: &str) -> String {
        let scale = if unit == "ms" { 1e-3 } else { 1.0 };
        let n = self.0.len();
        if n >= 100 {
            let p99 = percentile(&mut self.0, 99.0) * scale;
            format!("n={n}, p99 {p99:.1} {unit}")
        } else {
            let low = percentile(&mut self.0, 0.0) * scale;
            let high = percentile(&mut self.0, 100.0) * scale;
            format!("n={n}, range {low:.2}–{high:.2} {unit}")
        }
    }
}

/// Times `once` per `budget`. The future is made before the clock starts, so
/// what its closure clones is not counted.
async fn sample<F, Fut>(budget: Budget, mut once: F) -> anyhow::Result<Samples>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    for _ in 0..budget.warmup {
        once().await?;
    }
    let started = Instant::now();
    let mut samples = Vec::with_capacity(budget.min);
    while samples.len() < budget.min
        || (samples.len() < budget.max && started.elapsed() < budget.time)
    {
        let run = once();
        let t = Instant::now();
        run.await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(Samples(samples))
}

/// Everything the measurements share.
struct Bench {
    smoke: bool,
    raw: Arc<RawPlugin>,
    noop: Arc<Plugin>,
    executor: Executor,
    service: Service,
    /// The same service on PostgreSQL, when a server is named.
    postgres: Option<Service>,
    plans: BTreeMap<&'static str, Arc<Plan>>,
    /// The raw limit, µs per call.
    limit_us: f64,
    /// The raw limit with a call on every worker thread at once, µs of wall
    /// time per call: what a fan-out's items are compared with.
    parallel_limit_us: f64,
    results: Vec<Measurement>,
    /// Keeps the service's dirs until the end.
    _dirs: tempfile::TempDir,
}

pub fn run(options: &Options) -> anyhow::Result<Vec<Measurement>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let smoke = options.smoke;
    let started = Instant::now();
    // On a worker, like a request handler: the main thread only waits.
    let results = runtime.block_on(async move { tokio::spawn(measure(smoke)).await? })?;
    eprintln!(
        "inproc: {} measurements in {:.1} s{}",
        results.len(),
        started.elapsed().as_secs_f64(),
        if smoke { " (smoke)" } else { "" }
    );
    Ok(results)
}

/// The store of the `postgres` rows: a fresh schema on the server that
/// `TRELLIS_BENCH_POSTGRES` (else `TRELLIS_TEST_POSTGRES`) names; `None`
/// (said once) without one.
async fn postgres_store() -> anyhow::Result<Option<trellis::config::StoreKind>> {
    let Some(url) = crate::postgres::server_url() else {
        eprintln!("inproc: no PostgreSQL named (TRELLIS_BENCH_POSTGRES): no postgres rows");
        return Ok(None);
    };
    let store = crate::postgres::fresh_schema(&url, &[]).await?;
    Ok(Some(trellis::config::StoreKind::Postgres(store)))
}

fn plugin_file(dir: &str, name: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(dir).join(format!("{name}.wasm"));
    ensure!(
        path.is_file(),
        "{} is missing: build the plugins first (`cargo build -p trellis` runs host/build.rs)",
        path.display()
    );
    Ok(path)
}

async fn measure(smoke: bool) -> anyhow::Result<Vec<Measurement>> {
    let mut bench = Bench::set_up(smoke).await?;
    bench.limit().await?;
    bench.parallel_limit().await?;
    bench.sandbox().await?;
    let step1 = workloads::single();
    bench.step_overhead(&step1).await?;
    let shapes = [
        workloads::chain("chain10", 10, None),
        workloads::chain("chain40", 40, Some(3.0)),
        workloads::fanout("fanout100", 100, None),
        workloads::fanout("fanout1000", 1000, Some(50.0)),
        workloads::diamond(),
    ];
    for shape in &shapes {
        bench.shape(shape).await?;
    }
    let chain3 = workloads::chain("chain3", 3, None);
    bench.runs_per_second(&chain3).await?;
    bench.limit_again().await?;
    Ok(bench.results)
}

impl Bench {
    async fn set_up(smoke: bool) -> anyhow::Result<Bench> {
        let noop_file = plugin_file(TEST_PLUGINS, "noop")?;
        let aggregate_file = plugin_file(EXAMPLE_PLUGINS, "aggregate")?;

        let engine = Engine::new()?;
        if !engine.is_pooling() {
            eprintln!("inproc: warning: the pooling allocator is unavailable; figures are slower");
        }
        let raw = RawPlugin::new(&engine, &noop_file, Limits::default().fuel)?;

        let registry = PluginRegistry::new(engine)?;
        let mut noop = None;
        for file in [&noop_file, &aggregate_file] {
            let plugin = registry
                .load_file(file)
                .await
                .with_context(|| format!("loading {}", file.display()))?;
            let plugin = registry.insert(plugin)?;
            if plugin.name == "noop" {
                noop = Some(plugin);
            }
        }
        let noop = noop.ok_or_else(|| anyhow!("{} is not `noop`", noop_file.display()))?;
        let registry = Arc::new(registry);
        let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
        let executor = Executor::new(
            registry.clone(),
            Limits::default(),
            MAX_CONCURRENT_STEPS,
            state,
        );

        let all = [
            workloads::single(),
            workloads::chain("chain3", 3, None),
            workloads::chain("chain10", 10, None),
            workloads::chain("chain40", 40, None),
            workloads::fanout("fanout100", 100, None),
            workloads::fanout("fanout1000", 1000, None),
            workloads::diamond(),
        ];

        // The service: its own plugin dir (only what the workflows use, so
        // start-up compiles two plugins), workflow dir and data dir.
        let dirs = tempfile::tempdir()?;
        let plugin_dir = dirs.path().join("plugins");
        let workflow_dir = dirs.path().join("workflows");
        std::fs::create_dir_all(&plugin_dir)?;
        std::fs::create_dir_all(&workflow_dir)?;
        for file in [&noop_file, &aggregate_file] {
            std::fs::copy(
                file,
                plugin_dir.join(file.file_name().expect("a file name")),
            )?;
        }
        let mut plans = BTreeMap::new();
        for workload in &all {
            let file = workflow_dir.join(format!("{}.toml", workload.name));
            std::fs::write(&file, &workload.source)?;
            let plan = workflow::parse_str(
                &workload.source,
                &file.display().to_string(),
                workload.name,
                registry.as_ref(),
            )
            .map_err(|diagnostics| anyhow!("{}: {diagnostics}", workload.name))?;
            plans.insert(workload.name, Arc::new(plan));
        }
        let config = Config {
            data_dir: dirs.path().join("data"),
            plugin_dirs: vec![plugin_dir],
            workflow_dirs: vec![workflow_dir],
            max_concurrent_steps: MAX_CONCURRENT_STEPS,
            ..Config::default()
        };
        let service = Service::start(&config).await?;
        let postgres = match postgres_store().await? {
            Some(store) => Some(
                Service::start(&Config {
                    data_dir: dirs.path().join("data-postgres"),
                    store,
                    ..config.clone()
                })
                .await?,
            ),
            None => None,
        };
        for service in std::iter::once(&service).chain(&postgres) {
            for workload in &all {
                let entry = service
                    .workflow(workload.name)
                    .ok_or_else(|| anyhow!("the service did not load {}", workload.name))?;
                if let Err(diagnostics) = entry.plan {
                    bail!("the service refused {}: {diagnostics}", workload.name);
                }
            }
        }

        Ok(Bench {
            smoke,
            raw: Arc::new(raw),
            noop,
            executor,
            service,
            postgres,
            plans,
            limit_us: f64::NAN,
            parallel_limit_us: f64::NAN,
            results: Vec::new(),
            _dirs: dirs,
        })
    }

    fn budget(&self, normal: Budget) -> Budget {
        normal.or_smoke(self.smoke)
    }

    fn report(&mut self, measurement: Measurement) {
        eprintln!(
            "inproc: {:<40} {:>10.2} {:<6} {}",
            measurement.name, measurement.value, measurement.unit, measurement.note
        );
        self.results.push(measurement);
    }

    /// The raw wasmtime limit.
    async fn limit(&mut self) -> anyhow::Result<()> {
        let mut samples = self.raw_samples().await?;
        self.limit_us = samples.median();
        let note = samples.note("µs");
        self.report(
            Measurement::new("limit", "raw wasmtime call (noop)", self.limit_us, "µs")
                .per_step_us(self.limit_us)
                .ratio(1.0)
                .note(format!(
                    "fresh Store + instantiate (pooling) + run, fuel and epoch on; {note}"
                )),
        );
        Ok(())
    }

    /// The raw limit with one call in flight per worker thread (the
    /// runtime has one per core, as `trellis serve` has): µs of wall time
    /// per call. A fan-out runs its items on every worker at once, so its
    /// per-step time is compared with this, not with a call made alone
    /// (on 2 cores a fan-out could otherwise look twice as cheap as the
    /// floor).
    async fn parallel_limit(&mut self) -> anyhow::Result<()> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let budget = self.budget(FAST_CALL);
        let input = Arc::new(workloads::single().input.to_string());
        // Every task warms up, then all start measuring together.
        let start = Arc::new(tokio::sync::Barrier::new(threads));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..threads {
            let (raw, input, start) = (self.raw.clone(), input.clone(), start.clone());
            tasks.spawn(async move {
                for _ in 0..budget.warmup.div_ceil(threads) {
                    raw.call(&input).await?;
                }
                start.wait().await;
                let began = Instant::now();
                let (min, max) = (budget.min.div_ceil(threads), budget.max.div_ceil(threads));
                let mut calls = 0;
                while calls < min || (calls < max && began.elapsed() < budget.time) {
                    let output = raw.call(&input).await?;
                    ensure!(output == *input, "noop answered {output}");
                    calls += 1;
                }
                anyhow::Ok((calls, began.elapsed()))
            });
        }
        let (mut calls, mut wall) = (0, Duration::ZERO);
        while let Some(done) = tasks.join_next().await {
            let (n, took) = done??;
            calls += n;
            wall = wall.max(took);
        }
        let us = wall.as_secs_f64() * 1e6 / calls as f64;
        self.parallel_limit_us = us;
        self.report(
            Measurement::new(
                "limit",
                format!("raw wasmtime calls, {threads} at once (noop)"),
                us,
                "µs",
            )
            .per_step_us(us)
            .note(format!(
                "wall time per call with one call in flight per worker thread ({threads}); {calls} calls in {:.2} s; fan-outs are compared with this",
                wall.as_secs_f64()
            )),
        );
        Ok(())
    }

    async fn raw_samples(&self) -> anyhow::Result<Samples> {
        let input = workloads::single().input.to_string();
        let raw = &self.raw;
        sample(self.budget(FAST_CALL), || async {
            let output = raw.call(&input).await?;
            ensure!(output == input, "noop answered {output}");
            Ok(())
        })
        .await
    }

    /// The limit once more, to show how much the machine drifted.
    async fn limit_again(&mut self) -> anyhow::Result<()> {
        let mut samples = self.raw_samples().await?;
        let again = samples.median();
        if let Some(limit) = self.results.iter_mut().find(|m| m.group == "limit") {
            limit.note = format!(
                "{}; {again:.1} µs when measured again at the end",
                limit.note
            );
        }
        Ok(())
    }

    /// `Plugin::invoke`: the sandbox without the executor.
    async fn sandbox(&mut self) -> anyhow::Result<()> {
        let input = workloads::single().input.to_string();
        let state: Arc<dyn StateStore> = Arc::new(MemoryStateStore::default());
        let noop = &self.noop;
        let mut samples = sample(self.budget(FAST_CALL), || {
            let invocation = Invocation {
                run_id: "bench".into(),
                workflow: "bench".into(),
                step_id: "sandbox".into(),
                attempt: 1,
                input: input.clone(),
                config: BTreeMap::new(),
                secrets: Default::default(),
                allow_hosts: Arc::from([]),
                limits: Limits::default(),
                state: state.clone(),
                events: None,
                cancel: CancellationToken::new(),
            };
            async move {
                let outcome = noop.invoke(invocation).await;
                match outcome.result {
                    Ok(_) => Ok(()),
                    Err(error) => bail!("noop failed: {}", error.message),
                }
            }
        })
        .await?;
        let us = samples.median();
        let note = samples.note("µs");
        self.report(
            Measurement::new("step", "1 step (sandbox only)", us, "µs")
                .per_step_us(us)
                .ratio(us / self.limit_us)
                .note(note),
        );
        Ok(())
    }

    /// One run of `workload` in memory (the executor, no store), checked.
    fn memory_run(&self, workload: &Workload) -> impl Fn() -> RunFuture + use<> {
        let executor = self.executor.clone();
        let plan = self.plans[workload.name].clone();
        let input = workload.input.clone();
        let expected = Arc::new(workload.expected.clone());
        move || {
            let (executor, plan, input, expected) = (
                executor.clone(),
                plan.clone(),
                input.clone(),
                expected.clone(),
            );
            Box::pin(async move {
                let record = executor.run(plan, input, RunOptions::default()).await;
                check(&record, &expected)
            })
        }
    }

    /// One run of `workload` through `service` (durable), checked.
    fn durable_run(
        &self,
        service: &Service,
        workload: &Workload,
    ) -> impl Fn() -> RunFuture + use<> {
        let service = service.clone();
        let name = workload.name;
        let input = workload.input.clone();
        let expected = Arc::new(workload.expected.clone());
        move || {
            let (service, input, expected) = (service.clone(), input.clone(), expected.clone());
            Box::pin(async move {
                let submitted = service.submit(name, input, None).await?;
                let record = service
                    .wait(&submitted.run.id, RUN_TIMEOUT)
                    .await?
                    .ok_or_else(|| anyhow!("{name}: no result within {RUN_TIMEOUT:?}"))?;
                check(&record, &expected)
            })
        }
    }

    /// One step, in memory and durable (and on PostgreSQL), as a ratio to
    /// the limit.
    async fn step_overhead(&mut self, workload: &Workload) -> anyhow::Result<()> {
        for mode in self.modes(true) {
            let once = self.run_fn(workload, mode);
            let mut samples = sample(self.budget(SHORT_RUN), once).await?;
            let us = samples.median();
            let ratio = us / self.limit_us;
            let note = samples.note("µs");
            let mut measurement = Measurement::new("step", format!("1 step ({mode})"), us, "µs")
                .per_step_us(us)
                .ratio(ratio)
                .note(note);
            let target = match mode {
                "memory" => Some(STEP_MEMORY_TARGET),
                "durable" => Some(STEP_DURABLE_TARGET),
                _ => None,
            };
            if let Some(target) = target {
                measurement = measurement.target(format!("<= {target}x"), ratio <= target);
            }
            self.report(measurement);
        }
        Ok(())
    }

    /// `memory` and `durable` (SQLite), and `postgres` where `with_postgres`
    /// and a server is named.
    fn modes(&self, with_postgres: bool) -> Vec<&'static str> {
        let mut modes = vec!["memory", "durable"];
        if with_postgres && self.postgres.is_some() {
            modes.push("postgres");
        }
        modes
    }

    fn run_fn(&self, workload: &Workload, mode: &str) -> Box<dyn Fn() -> RunFuture + Send + Sync> {
        match (mode, &self.postgres) {
            ("memory", _) => Box::new(self.memory_run(workload)),
            ("postgres", Some(postgres)) => Box::new(self.durable_run(postgres, workload)),
            _ => Box::new(self.durable_run(&self.service, workload)),
        }
    }

    /// A workflow shape, in memory and durable: ms per run and µs per step.
    async fn shape(&mut self, workload: &Workload) -> anyhow::Result<()> {
        let normal = match workload.steps {
            0..=10 => SHORT_RUN,
            11..=200 => MEDIUM_RUN,
            _ => LONG_RUN,
        };
        let with_postgres = workload.name.starts_with("chain");
        for mode in self.modes(with_postgres) {
            let once = self.run_fn(workload, mode);
            let mut samples = sample(self.budget(normal), once).await?;
            let us = samples.median();
            let per_step = us / workload.steps as f64;
            let (limit, against) = if workload.parallel {
                (
                    self.parallel_limit_us,
                    "; ratio to the limit with as many calls at once",
                )
            } else {
                (self.limit_us, "")
            };
            let mut measurement = Measurement::new(
                "workload",
                format!("{} ({mode})", workload.name),
                us / 1000.0,
                "ms",
            )
            .per_step_us(per_step)
            .ratio(per_step / limit)
            .note(format!(
                "{} steps; {}{against}",
                workload.steps,
                samples.note("ms")
            ));
            if let Some(target) = workload.target_ms {
                measurement = measurement.target(format!("<= {target} ms"), us / 1000.0 <= target);
            }
            self.report(measurement);
        }
        Ok(())
    }

    /// 3-step runs back to back, then `CONCURRENT_RUNS` at once; runs/s.
    async fn runs_per_second(&mut self, workload: &Workload) -> anyhow::Result<()> {
        for mode in ["memory", "durable"] {
            let once = self.run_fn(workload, mode);
            let mut samples = sample(self.budget(SHORT_RUN), once).await?;
            // Back to back: the runs' time is the time they took together.
            let elapsed = samples.0.iter().sum::<f64>() / 1e6;
            let runs = samples.0.len();
            let per_second = runs as f64 / elapsed;
            let latency = samples.median();
            let note = format!(
                "{runs} runs in {elapsed:.2} s; latency median {:.0} µs, {}",
                latency,
                samples.note("µs").replace(&format!("n={runs}, "), "")
            );
            self.report(
                Measurement::new(
                    "runs",
                    format!("{}-step runs back to back ({mode})", workload.steps),
                    per_second,
                    "runs/s",
                )
                .per_step_us(latency / workload.steps as f64)
                .note(note),
            );
        }
        for mode in ["memory", "durable"] {
            let once: Arc<dyn Fn() -> RunFuture + Send + Sync> = if mode == "memory" {
                Arc::new(self.memory_run(workload))
            } else {
                Arc::new(self.durable_run(&self.service, workload))
            };
            let budget = self.budget(RUNS_PER_SECOND);
            let (runs, elapsed, mut latencies) = concurrently(once, budget, self.smoke).await?;
            let per_second = runs as f64 / elapsed;
            let amortised = 1e6 / per_second / workload.steps as f64;
            let note = format!(
                "{runs} runs in {elapsed:.2} s; latency median {:.1} ms, p99 {:.1} ms; {amortised:.1} µs of wall time per step",
                median(&mut latencies) / 1000.0,
                percentile(&mut latencies, 99.0) / 1000.0,
            );
            self.report(
                Measurement::new(
                    "runs",
                    format!(
                        "{}-step runs, {CONCURRENT_RUNS} concurrent ({mode})",
                        workload.steps
                    ),
                    per_second,
                    "runs/s",
                )
                .note(note),
            );
        }
        Ok(())
    }
}

type RunFuture = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// `CONCURRENT_RUNS` tasks each running `once` in a loop: after a warm-up,
/// until the budget's time is up (or, in smoke mode, once each). Returns the
/// runs finished, the seconds it took and every run's latency in µs.
async fn concurrently(
    once: Arc<dyn Fn() -> RunFuture + Send + Sync>,
    budget: Budget,
    smoke: bool,
) -> anyhow::Result<(usize, f64, Vec<f64>)> {
    for _ in 0..budget.warmup.div_ceil(CONCURRENT_RUNS) {
        let mut warmup = tokio::task::JoinSet::new();
        for _ in 0..CONCURRENT_RUNS {
            warmup.spawn(once());
        }
        while let Some(done) = warmup.join_next().await {
            done??;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENT_RUNS {
        let (once, stop) = (once.clone(), stop.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let t = Instant::now();
                once().await?;
                latencies.push(t.elapsed().as_secs_f64() * 1e6);
                if smoke || stop.load(Ordering::Relaxed) {
                    return anyhow::Ok(latencies);
                }
            }
        });
    }
    tokio::time::sleep(budget.time).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok((latencies.len(), elapsed, latencies))
}

/// The run succeeded with the expected output.
fn check(record: &RunRecord, expected: &Value) -> anyhow::Result<()> {
    if record.status != RunStatus::Succeeded {
        bail!(
            "run {} of {} ended {:?}: {:?}",
            record.id,
            record.workflow,
            record.status,
            record.error
        );
    }
    ensure!(
        &record.output == expected,
        "run {} of {} gave {}, not {}",
        record.id,
        record.workflow,
        record.output,
        expected
    );
    Ok(())
}
