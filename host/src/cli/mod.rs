//! The `trellis` command line: `run`, `validate`, `plugins list|inspect`,
//! `serve`, and `runs`, a client of a running server (its own exit statuses).
//!
//! Contract (DESIGN.md): stdout carries only the result (the run's output JSON,
//! or with `--json` the whole run record); stderr carries progress and errors.
//! Exit status: 0 succeeded, 1 the run failed, 2 usage or validation error.

mod client;
mod local;
mod runs;

use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Settings};
use crate::engine::{CodeCache, Engine};
use crate::executor::{Executor, RunObserver, RunOptions};
use crate::plugin::{MemoryStateStore, PluginError, PluginRegistry};
use crate::record::{RunRecord, RunStatus, StepRecord, StepStatus};
use crate::secrets::Secrets;
use crate::service::Service;
use crate::telemetry::{LogFormat, Metrics};

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Workflow orchestration whose tasks are WebAssembly components"
)]
struct Cli {
    /// Where compiled plugins are cached (under `cache/`); for `serve`, also
    /// where the runs are stored. Default: `$XDG_CACHE_HOME/trellis` or
    /// `~/.cache/trellis` (`serve`: the configuration's `data_dir`).
    #[arg(long, global = true, env = "TRELLIS_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Compile every plugin afresh, without the compiled-code cache.
    #[arg(long, global = true)]
    no_cache: bool,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    fn code_cache(&self) -> Option<CodeCache> {
        if self.no_cache {
            return None;
        }
        let data_dir = self.data_dir.clone().or_else(|| {
            let cache_home = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache"))
                })?;
            Some(cache_home.join("trellis"))
        })?;
        Some(CodeCache::new(data_dir.join("cache")))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a workflow in this process and print its output.
    Run(RunArgs),
    /// Check workflow files: syntax, fields, plugins, dependencies, templates.
    Validate {
        #[arg(required = true)]
        workflows: Vec<PathBuf>,
        #[command(flatten)]
        plugins: PluginDirs,
        /// A configuration to check the `secrets` that steps name against.
        /// Default: `./trellis.toml` if it exists (else names are not checked).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List or inspect plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Serve the HTTP API: trigger runs, follow them, cancel them.
    ///
    /// Settings come from `trellis.toml` (or `--config`), then `TRELLIS_*`
    /// variables, then these flags. Stops gracefully on Ctrl-C or SIGTERM.
    Serve(ServeArgs),
    /// List, show, retry, rerun, cancel and follow the runs of a running
    /// server (`trellis serve`), over its HTTP API.
    Runs(runs::RunsArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The workflow file (TOML).
    workflow: PathBuf,
    /// The run's input: JSON text, `@FILE` to read it from a file, or `@-` for stdin.
    #[arg(long, short, value_name = "JSON|@FILE")]
    input: Option<String>,
    #[command(flatten)]
    plugins: PluginDirs,
    /// Print the whole run record (steps, attempts, logs, metrics) instead of the output.
    #[arg(long)]
    json: bool,
    /// Steps that may run at once. Default: the configuration's
    /// `max_concurrent_steps` (64 when it sets none).
    #[arg(long, value_name = "N")]
    max_concurrent_steps: Option<NonZeroUsize>,
    /// The configuration whose `[limits]`, `[secrets]` and
    /// `max_concurrent_steps` the run uses. Default: `./trellis.toml` if it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl RunArgs {
    /// The configuration (file, then environment), with the flags over it.
    fn config(&self) -> Result<Config> {
        let flags = Settings {
            max_concurrent_steps: self.max_concurrent_steps.map(|n| Settings::given(n.get())),
            ..Settings::default()
        };
        Ok(Config::load(self.config.as_deref(), flags)?)
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// The configuration file. Default: `./trellis.toml` if it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The address to listen on (port 0: any free port). Default: 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// A directory of plugin `.wasm` files (repeatable). Default: the
    /// configured ones, else the example plugins of this build.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    plugin_dirs: Vec<PathBuf>,
    /// A directory of workflow `.toml` files (repeatable). Default: the
    /// configured ones, else `workflows`.
    #[arg(long = "workflow-dir", value_name = "DIR")]
    workflow_dirs: Vec<PathBuf>,
    /// How log lines are written to stderr (`TRELLIS_LOG` sets the level).
    #[arg(
        long,
        value_enum,
        default_value_t = LogFormat::Text,
        env = "TRELLIS_LOG_FORMAT",
        value_name = "FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// The plugins found in the plugin directories.
    List {
        #[command(flatten)]
        plugins: PluginDirs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check one component and print what it declares.
    Inspect { file: PathBuf },
}

#[derive(Debug, clap::Args)]
struct PluginDirs {
    /// A directory of plugin `.wasm` files (repeatable). Default: the
    /// configured ones (`plugin_dirs` in trellis.toml, `TRELLIS_PLUGIN_DIRS`),
    /// else the example plugins of this build.
    #[arg(long = "plugin-dir", value_name = "DIR")]
    dirs: Vec<PathBuf>,
}

impl PluginDirs {
    /// The dirs given, else those `config` names (which default to the
    /// example plugins of this build).
    fn resolve(&self, config: &Config) -> Result<Vec<PathBuf>> {
        if !self.dirs.is_empty() {
            return Ok(self.dirs.clone());
        }
        if config.plugin_dirs.is_empty() {
            bail!(
                "no plugin directory: pass --plugin-dir DIR (the example plugins are built by `cargo build`)"
            );
        }
        Ok(config.plugin_dirs.clone())
    }
}

/// Parses the arguments, runs the command, maps the outcome to an exit status:
/// an `Err` is a usage problem (bad flag value, missing directory) and exits 2.
pub fn main() -> ExitCode {
    let cli = match Cli::parse() {
        // A blocking HTTP client, with its own exit statuses: it needs
        // neither the runtime nor the logging set up below.
        Cli {
            command: Command::Runs(args),
            ..
        } => return runs::main(args),
        cli => cli,
    };
    // Once, now that the flags say how.
    match &cli.command {
        Command::Serve(args) => crate::telemetry::init(args.log_format, "info"),
        _ => crate::telemetry::init(LogFormat::Text, "warn"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("trellis-worker")
        .build()
        .expect("starting the tokio runtime");
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let cache = cli.code_cache();
    match cli.command {
        Command::Run(args) => {
            let config = args.config()?;
            let dirs = args.plugins.resolve(&config)?;
            run(
                &args.workflow,
                args.input.as_deref(),
                &dirs,
                cache,
                args.json,
                &config,
            )
            .await
        }
        Command::Validate {
            workflows,
            plugins,
            config,
        } => {
            // Secret names are checked only against a configuration that exists.
            let exists = config.is_some() || Path::new(crate::config::DEFAULT_FILE).is_file();
            let config = Config::load(config.as_deref(), Settings::default())?;
            let dirs = plugins.resolve(&config)?;
            let secrets = exists.then(|| Secrets::new(config.secrets));
            let workflow_dirs = config.workflow_dirs.clone();
            validate(&workflows, &dirs, &workflow_dirs, cache, secrets.as_ref()).await
        }
        Command::Plugins(PluginsCommand::List { plugins, json }) => {
            let config = Config::load(None, Settings::default())?;
            list(&plugins.resolve(&config)?, cache, json).await
        }
        Command::Plugins(PluginsCommand::Inspect { file }) => inspect(&file).await,
        Command::Serve(args) => serve(args, cli.data_dir).await,
        Command::Runs(_) => unreachable!("`main` runs `trellis runs` itself"),
    }
}

/// `trellis serve`: a configuration problem (an open bind without a token, a
/// database that cannot be used) exits 2 before anything serves; another
/// failure to start or serve exits 1.
async fn serve(args: ServeArgs, data_dir: Option<PathBuf>) -> Result<ExitCode> {
    let flags = Settings {
        bind: args.bind.map(Settings::given),
        data_dir: data_dir.filter(|dir| !dir.as_os_str().is_empty()),
        plugin_dirs: Some(args.plugin_dirs).filter(|dirs| !dirs.is_empty()),
        workflow_dirs: Some(args.workflow_dirs).filter(|dirs| !dirs.is_empty()),
        ..Settings::default()
    };
    let config = Config::load(args.config.as_deref(), flags)?;
    config.check_bind()?;
    tracing::info!(?config, "starting");
    Metrics::install();
    let service = match Service::start(&config).await {
        Ok(service) => service,
        Err(err) => {
            eprintln!("error: cannot start: {err}");
            // A database that cannot be used is the configuration's problem
            // (or the network's), like a bad flag: 2.
            let status = match err {
                crate::service::StartError::StoreUnusable(_) => 2,
                _ => 1,
            };
            return Ok(ExitCode::from(status));
        }
    };
    // Plugins and workflows dropped into their dirs are picked up live.
    if let Err(err) = service.watch() {
        tracing::warn!(error = %err, "cannot watch the plugin and workflow dirs; changes need a restart");
    }
    let served = crate::api::serve(service.clone(), &config, shutdown_signal()).await;
    // A node of a cluster hands its unfinished runs to the others now,
    // rather than when its lease runs out.
    service.leave().await;
    if let Err(err) = served {
        eprintln!("error: {err:#}");
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C, or SIGTERM (what `docker stop` and Kubernetes send).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    eprintln!("shutting down: no new runs; finishing open requests");
}

/// Loads the plugin directories; warns about unusable files, refuses duplicates.
async fn load_registry(dirs: &[PathBuf], cache: Option<CodeCache>) -> Result<PluginRegistry> {
    let engine = Engine::new()?;
    let mut registry = PluginRegistry::new(engine)?;
    if let Some(cache) = cache {
        registry = registry.with_cache(cache);
    }
    let report = registry.load_dirs(dirs).await;
    let mut fatal = Vec::new();
    for (path, err) in report.errors {
        match err {
            PluginError::Duplicate { .. } | PluginError::Io { .. } => {
                fatal.push(format!("{}: {err}", path.display()))
            }
            _ => eprintln!("warning: skipping plugin {}: {err}", path.display()),
        }
    }
    if !fatal.is_empty() {
        bail!(fatal.join("\n"));
    }
    Ok(registry)
}

fn read_input(input: Option<&str>) -> Result<Value> {
    let text = match input {
        None => return Ok(Value::Object(Default::default())),
        Some("@-") => {
            std::io::read_to_string(std::io::stdin()).context("reading the input from stdin")?
        }
        Some(arg) => match arg.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("reading the input file {file}"))?,
            None => arg.to_string(),
        },
    };
    serde_json::from_str(&text).context("--input is not valid JSON")
}

async fn run(
    workflow: &Path,
    input: Option<&str>,
    dirs: &[PathBuf],
    cache: Option<CodeCache>,
    json: bool,
    config: &Config,
) -> Result<ExitCode> {
    let input = read_input(input)?;
    // Ctrl-C cancels the run: running attempts stop at the next epoch tick and
    // the record (status `cancelled`) is still printed. Listened for from the
    // start, so one that comes while plugins load ends the command there.
    let cancel = CancellationToken::new();
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("cancelling the run (Ctrl-C)");
            on_ctrl_c.cancel();
        }
    });
    let registry = tokio::select! {
        registry = load_registry(dirs, cache) => Arc::new(registry?),
        () = cancel.cancelled() => {
            eprintln!("error: interrupted while loading plugins; the run did not start");
            return Ok(ExitCode::from(130));
        }
    };
    let secrets = Secrets::new(config.secrets.clone());
    let with_secrets = crate::workflow::WithSecrets {
        plugins: registry.as_ref(),
        secrets: &secrets,
    };
    let workflows = local::LocalWorkflows::find(&[workflow], &config.workflow_dirs);
    let catalog = workflows.catalog(&with_secrets);
    let plan = match crate::workflow::load_file(workflow, &catalog) {
        Ok(plan) => Arc::new(plan),
        Err(diagnostics) => {
            eprintln!("{diagnostics}");
            eprintln!("error: {} is not a valid workflow", workflow.display());
            return Ok(ExitCode::from(2));
        }
    };
    let executor = Executor::new(
        registry.clone(),
        config.limits,
        config.max_concurrent_steps,
        Arc::new(MemoryStateStore::default()),
    )
    .with_secrets(secrets.clone());
    let children = Arc::new_cyclic(|this| local::LocalChildren {
        workflows,
        executor: executor.clone(),
        registry,
        secrets,
        this: this.clone(),
    });
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| Arc::new(ProgressObserver::new(plan.steps.len())));
    let options = RunOptions {
        observer: progress.clone().map(|p| p as Arc<dyn RunObserver>),
        cancel,
        children: Some(children as Arc<dyn crate::executor::ChildRuns>),
        ..RunOptions::default()
    };
    let record = executor.run(plan, input, options).await;
    if let Some(progress) = progress {
        progress.bar.finish_and_clear();
    }
    let shown = if json {
        serde_json::to_value(&record)?
    } else {
        record.output.clone()
    };
    println!("{}", serde_json::to_string_pretty(&shown)?);
    report_failure(&record);
    Ok(match record.status {
        RunStatus::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// On stderr: the failing step, its reason and the end of its log.
fn report_failure(record: &RunRecord) {
    let Some(error) = &record.error else { return };
    eprintln!(
        "error: run {} of `{}` {}: {error}",
        record.id,
        record.workflow,
        status_word(record.status)
    );
    let failed = error
        .step
        .as_deref()
        .and_then(|id| record.steps.iter().find(|s| s.id == id));
    if let Some(attempt) = failed.and_then(|step| step.attempts.last()) {
        let tail = attempt.logs.len().saturating_sub(10);
        for line in &attempt.logs[tail..] {
            eprintln!("  [{:?}] {}", line.stream, line.message);
        }
    }
}

fn status_word(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Cancelled => "was cancelled",
        _ => "failed",
    }
}

async fn validate(
    workflows: &[PathBuf],
    dirs: &[PathBuf],
    workflow_dirs: &[PathBuf],
    cache: Option<CodeCache>,
    secrets: Option<&Secrets>,
) -> Result<ExitCode> {
    let registry = load_registry(dirs, cache).await?;
    let files: Vec<&Path> = workflows.iter().map(PathBuf::as_path).collect();
    let known = local::LocalWorkflows::find(&files, workflow_dirs);
    let mut ok = true;
    for path in workflows {
        let loaded = match secrets {
            Some(secrets) => crate::workflow::load_file(
                path,
                &known.catalog(&crate::workflow::WithSecrets {
                    plugins: &registry,
                    secrets,
                }),
            ),
            None => crate::workflow::load_file(path, &known.catalog(&registry)),
        };
        match loaded {
            Ok(plan) => println!(
                "ok: {} ({}, {} steps)",
                path.display(),
                plan.name,
                plan.steps.len()
            ),
            Err(diagnostics) => {
                ok = false;
                eprintln!("{diagnostics}");
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn list(dirs: &[PathBuf], cache: Option<CodeCache>, json: bool) -> Result<ExitCode> {
    let registry = load_registry(dirs, cache).await?;
    if json {
        let list: Vec<Value> = registry.list().iter().map(|p| plugin_json(p)).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        let plugins = registry.list();
        // Columns as wide as their longest value.
        let name = plugins
            .iter()
            .map(|p| p.name.len())
            .max()
            .unwrap_or(0)
            .max(4);
        let version = plugins
            .iter()
            .map(|p| p.version.to_string().len())
            .max()
            .unwrap_or(0)
            .max(7);
        println!(
            "{:<name$} {:<version$} {:>9}  {:<19} DESCRIPTION",
            "NAME", "VERSION", "SIZE", "DIGEST"
        );
        for plugin in plugins {
            println!(
                "{:<name$} {:<version$} {:>9}  sha256:{:<12} {}",
                plugin.name,
                plugin.version.to_string(),
                bytesize::ByteSize(plugin.size).to_string(),
                &plugin.digest[..12],
                plugin.description
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn inspect(file: &Path) -> Result<ExitCode> {
    let registry = PluginRegistry::new(Engine::new()?)?;
    match registry.load_file(file).await {
        Ok(plugin) => {
            println!("{}", serde_json::to_string_pretty(&plugin_json(&plugin))?);
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("error: {} is not a usable plugin: {err}", file.display());
            Ok(ExitCode::from(2))
        }
    }
}

fn plugin_json(plugin: &crate::plugin::Plugin) -> Value {
    let schema = |s: &Option<String>| {
        s.as_deref()
            .and_then(|s| serde_json::from_str::<Value>(s).ok())
    };
    serde_json::json!({
        "name": plugin.name,
        "version": plugin.version.to_string(),
        "description": plugin.description,
        "digest": format!("sha256:{}", plugin.digest),
        "size": plugin.size,
        "path": plugin.path,
        "imports": plugin.imports,
        "side_effects": plugin.side_effects.kinds(),
        "input_schema": schema(&plugin.input_schema),
        "output_schema": schema(&plugin.output_schema),
    })
}

/// A progress bar on a terminal: steps finished out of all.
struct ProgressObserver {
    bar: ProgressBar,
}

impl ProgressObserver {
    fn new(steps: usize) -> ProgressObserver {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
            )
            .expect("a valid progress template"),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        ProgressObserver { bar }
    }
}

impl RunObserver for ProgressObserver {
    fn step_started(&self, step: &str, attempt: u32, item: Option<usize>) {
        let mut message = format!("running {step}");
        if let Some(item) = item {
            message.push_str(&format!("[{item}]"));
        }
        if attempt > 1 {
            message.push_str(&format!(" (attempt {attempt})"));
        }
        self.bar.set_message(message);
    }

    fn step_progress(&self, step: &str, progress: &crate::record::Progress) {
        self.bar.set_message(format!(
            "{step}: {:.0}% {}",
            progress.fraction * 100.0,
            progress.message
        ));
    }

    fn step_finished(&self, step: &StepRecord) {
        self.bar.inc(1);
        if step.status == StepStatus::Failed {
            self.bar.println(format!("✗ {} failed", step.id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `trellis run`'s configuration, as `dispatch` loads it for `args`.
    fn run_config(args: &[&str]) -> Config {
        let cli = Cli::try_parse_from(["trellis", "run", "w.toml"].iter().chain(args)).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not a run command")
        };
        run.config().unwrap()
    }

    #[test]
    fn run_honours_max_concurrent_steps_from_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("trellis.toml");
        std::fs::write(&file, "max_concurrent_steps = 3\n").unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(run_config(&["--config", file]).max_concurrent_steps, 3);
        // The flag wins over the file.
        let flagged = run_config(&["--config", file, "--max-concurrent-steps", "5"]);
        assert_eq!(flagged.max_concurrent_steps, 5);
        // No configuration: the default.
        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "").unwrap();
        let config = run_config(&["--config", empty.to_str().unwrap()]);
        assert_eq!(
            config.max_concurrent_steps,
            Config::default().max_concurrent_steps
        );
    }

    #[test]
    fn run_refuses_zero_concurrent_steps() {
        let parsed =
            Cli::try_parse_from(["trellis", "run", "w.toml", "--max-concurrent-steps", "0"]);
        assert!(parsed.is_err());
    }
}
