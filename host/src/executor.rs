//! Runs a validated [`Plan`]: steps in dependency order, independent steps in
//! parallel (bounded by a semaphore shared by every run of the process),
//! `if`, `for_each` fan-out, retries with backoff, `on_failure`, cancellation.
//!
//! No thread per step: steps are tokio tasks; a busy guest yields its worker
//! at every epoch tick.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use futures::FutureExt;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::engine::Limits;
use crate::plugin::{
    AttemptOutcome, Invocation, Plugin, PluginRef, PluginRegistry, StateStore, StepEvents,
};
use crate::record::{
    AttemptRecord, ErrorKind, ErrorRecord, LogLine, ParentRef, Progress, RunError, RunRecord,
    RunStatus, StepRecord, StepStatus, new_run_id, now_rfc3339,
};
use crate::secrets::{Granted, Secrets};
use crate::store::{Commit, ItemOutcome, ItemRecord, Queued, Store, StoreError, StoredItems};
use crate::telemetry;
use crate::workflow::{OnFailure, Plan, SchemaViolation, Scope, TemplateError};

mod remote;
mod retry;

pub use remote::{RemoteAttempt, RemoteOutcome, RemoteSteps};
pub use retry::{rerun_record, retry_record};

/// Live notifications from a run, for progress bars and event streams.
pub trait RunObserver: Send + Sync {
    fn step_started(&self, _step: &str, _attempt: u32, _item: Option<usize>) {}
    /// A `for_each` step rendered its list: it has `count` items.
    fn step_items(&self, _step: &str, _count: usize) {}
    /// An attempt ended (of a step, or of one `for_each` item); the step
    /// may go on (a retry, more items).
    fn attempt_finished(&self, _step: &str, _attempt: &AttemptRecord) {}
    fn step_log(&self, _step: &str, _line: &LogLine) {}
    fn step_progress(&self, _step: &str, _progress: &Progress) {}
    fn step_finished(&self, _step: &StepRecord) {}
}

/// Starts and follows child runs for sub-workflow steps; the service
/// implements it (a child is a run like any other: stored, listed,
/// cancellable).
#[async_trait::async_trait]
pub trait ChildRuns: Send + Sync {
    /// Starts the child run `request` asks for (or, when one with its key
    /// exists, after a restart, takes that one up again) and follows it to
    /// its end, its cancel or the deadline.
    async fn run_child(&self, request: ChildRequest) -> ChildOutcome;
}

/// What one attempt of a sub-workflow step asks of [`ChildRuns`].
pub struct ChildRequest {
    pub parent: ParentRef,
    /// How deep the parent is nested (0: not a child itself).
    pub parent_depth: usize,
    pub workflow: String,
    pub input: Value,
    /// The same for the same attempt after a restart: the child is started
    /// once.
    pub key: String,
    /// The step's `timeout`: the child's wall time at most.
    pub timeout: std::time::Duration,
    /// The parent's: cancelling it cancels the child.
    pub cancel: CancellationToken,
}

/// How a child run ended.
pub struct ChildOutcome {
    /// The child run, if one was started.
    pub run: Option<String>,
    /// Its output, or why the attempt failed.
    pub result: Result<Value, ErrorRecord>,
}

/// How deep sub-workflows may nest: a child of a child ... 16 levels down.
pub const MAX_DEPTH: usize = 16;

/// How a run is started.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Defaults to a new UUIDv7.
    pub run_id: Option<String>,
    pub observer: Option<Arc<dyn RunObserver>>,
    /// Cancelling stops running attempts at the next epoch tick.
    pub cancel: CancellationToken,
    /// Where step results go as they finish; `None` keeps the run in memory.
    pub store: Option<Arc<dyn Store>>,
    /// A resumed run: the `for_each` items its store kept
    /// ([`UnfinishedRun::items`](crate::store::UnfinishedRun::items)).
    pub items: StoredItems,
    /// Where sub-workflow steps start their child runs; `None`: such a step
    /// fails.
    pub children: Option<Arc<dyn ChildRuns>>,
    /// How deep this run is nested (0: not a child run).
    pub depth: usize,
    /// Where attempts waiting for a permit are also offered (a cluster's
    /// other nodes); `None`: they wait here.
    pub remote: Option<Arc<dyn RemoteSteps>>,
}

/// Executes runs. Cheap to clone; clones share the concurrency bound.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<PluginRegistry>,
    defaults: Limits,
    permits: Arc<Semaphore>,
    /// The permits there are: `max_concurrent_steps`.
    max_steps: usize,
    /// Attempts waiting for a permit (the queue-depth gauge).
    waiting: AtomicUsize,
    state: Arc<dyn StateStore>,
    secrets: Secrets,
}

impl Executor {
    /// `max_concurrent_steps` bounds attempts running at once across all runs.
    pub fn new(
        registry: Arc<PluginRegistry>,
        defaults: Limits,
        max_concurrent_steps: usize,
        state: Arc<dyn StateStore>,
    ) -> Executor {
        Executor {
            inner: Arc::new(Inner {
                registry,
                defaults,
                permits: Arc::new(Semaphore::new(max_concurrent_steps.max(1))),
                max_steps: max_concurrent_steps.max(1),
                waiting: AtomicUsize::new(0),
                state,
                secrets: Secrets::default(),
            }),
        }
    }

    /// The `[secrets]` that steps may name; none by default.
    pub fn with_secrets(mut self, secrets: Secrets) -> Executor {
        Arc::get_mut(&mut self.inner)
            .expect("with_secrets is called before the executor is shared")
            .secrets = secrets;
        self
    }

    /// A permit to run one attempt, when one is free.
    async fn permit(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Step attempts waiting for a permit (`max_concurrent_steps` are
    /// running): this process has more work than it can run at once.
    pub fn waiting_steps(&self) -> usize {
        self.inner.waiting.load(Ordering::Relaxed)
    }

    /// Step attempts that could start now.
    pub fn free_steps(&self) -> usize {
        self.inner.permits.available_permits()
    }

    /// Step attempts running now, over all runs.
    pub fn running_steps(&self) -> usize {
        self.inner
            .max_steps
            .saturating_sub(self.inner.permits.available_permits())
    }

    /// The configured secrets.
    pub fn secrets(&self) -> &Secrets {
        &self.inner.secrets
    }

    pub fn registry(&self) -> &Arc<PluginRegistry> {
        &self.inner.registry
    }

    /// Runs `plan` on `input` to the end and returns its record.
    pub async fn run(&self, plan: Arc<Plan>, input: Value, options: RunOptions) -> RunRecord {
        let run_id = options.run_id.clone().unwrap_or_else(new_run_id);
        let record = queued_record(&plan, run_id, input);
        self.execute(plan, record, options).await
    }

    /// Runs `record` (queued, or as stored when the process stopped) to the end.
    ///
    /// Steps that had finished keep their records and are not run again; a
    /// step that was running is attempted again, its attempt numbers going on
    /// from the stored ones (the interrupted attempt is marked so). So is
    /// each `for_each` item in `options.items` that had not finished; the
    /// items that had keep their outcome.
    pub async fn execute(
        &self,
        plan: Arc<Plan>,
        mut record: RunRecord,
        mut options: RunOptions,
    ) -> RunRecord {
        let started = Instant::now();
        let run_id = record.id.clone();
        let input = record.input.clone();
        record.status = RunStatus::Running;
        let started_at = record.started_at.get_or_insert_with(now_rfc3339).clone();
        // Not waited for: the first step's start write commits it too.
        if let Some(store) = &options.store {
            store.run_started(&run_id, &started_at).detach();
        }

        // Which steps are done already (a resumed run) and which will run.
        let mut items = std::mem::take(&mut options.items);
        prepare_resume(&mut record, &mut items);
        let done: Vec<bool> = record.steps.iter().map(|s| s.status.is_done()).collect();
        let earlier_attempts: Vec<Vec<AttemptRecord>> = record
            .steps
            .iter()
            .map(|s| {
                if s.status.is_done() {
                    Vec::new()
                } else {
                    s.attempts.clone()
                }
            })
            .collect();

        let plugins = match self.pin(&plan, &mut record) {
            Ok(plugins) => plugins,
            Err(error) => {
                record.error = Some(error);
                return self
                    .finish(record, started, RunStatus::Failed, options.store.as_deref())
                    .await;
            }
        };

        let run = Arc::new(RunContext {
            executor: self.clone(),
            plan: plan.clone(),
            plugins,
            run_id,
            observer: options.observer.clone(),
            cancel: options.cancel.clone(),
            store: options.store.clone(),
            earlier_attempts,
            items,
            children: options.children.clone(),
            depth: options.depth,
            remote: options.remote.clone(),
        });

        let n = plan.steps.len();
        let mut waiting: Vec<usize> = plan
            .steps
            .iter()
            .map(|s| s.needs.iter().filter(|&&need| !done[need]).count())
            .collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (index, step) in plan.steps.iter().enumerate() {
            for &need in &step.needs {
                dependents[need].push(index);
            }
        }

        let mut scope = Scope::new(&run.run_id, &plan.name, &input);
        let mut failure: Option<RunError> = None;
        for (index, step_record) in record
            .steps
            .iter()
            .enumerate()
            .filter(|(index, _)| done[*index])
        {
            let step = &plan.steps[index];
            scope.set_step(&step.id, step_record.status.as_str(), &step_record.output);
            if step_record.status == StepStatus::Failed && step.on_failure == OnFailure::Fail {
                failure.get_or_insert_with(|| step_failure(step_record));
            }
        }
        // Steps run as tasks of their own, so the steps of a run that are
        // ready together run in parallel. A step that is the only one running
        // runs inside the run's task instead (a chain, mostly): handing it to
        // another task, and its result back, cost each step two wake-ups
        // across threads.
        let mut tasks = JoinSet::new();
        let mut inline: Option<StepFuture> = None;
        let start = |index: usize, scope: &Scope, record: &mut StepRecord| -> StepFuture {
            record.status = StepStatus::Running;
            let run = run.clone();
            let scope = scope.for_step(run.plan.readable_by(index));
            let base = record.clone();
            let span = tracing::info_span!(
                "step",
                run_id = %run.run_id,
                step_id = %run.plan.steps[index].id,
                task = %task_label(&run.plan.steps[index], run.plugins[index].as_deref()),
            );
            Box::pin(
                async move { (index, run.run_step(index, scope, base).await) }.instrument(span),
            )
        };
        let launch = |ready: Vec<usize>,
                      scope: &Scope,
                      steps: &mut [StepRecord],
                      tasks: &mut JoinSet<(usize, StepRecord)>,
                      inline: &mut Option<StepFuture>| {
            let alone = ready.len() == 1 && tasks.is_empty() && inline.is_none();
            for index in ready {
                let step = start(index, scope, &mut steps[index]);
                if alone {
                    *inline = Some(step);
                } else {
                    tasks.spawn(step);
                }
            }
        };
        if failure.is_none() {
            let ready = (0..n).filter(|&i| waiting[i] == 0 && !done[i]).collect();
            launch(ready, &scope, &mut record.steps, &mut tasks, &mut inline);
        }

        loop {
            let finished = match inline.take() {
                Some(step) => {
                    let finished = AssertUnwindSafe(step)
                        .catch_unwind()
                        .await
                        .map_err(|panic| panic_message(panic.as_ref()));
                    // A step that never waits (a noop, a store in memory) would
                    // let a long chain hold its thread: count each step against
                    // the task's budget, as `join_next` does, so tokio makes
                    // the run yield now and then.
                    tokio::task::consume_budget().await;
                    finished
                }
                None => match tasks.join_next().await {
                    None => break,
                    Some(joined) => joined.map_err(|join_error| join_error.to_string()),
                },
            };
            let (index, step_record) = match finished {
                Ok(done) => done,
                Err(reason) => {
                    // A bug in the host, not the guest: fail the run, keep serving.
                    tracing::error!(error = %reason, "step task failed");
                    failure.get_or_insert(RunError {
                        step: None,
                        kind: ErrorKind::Trap,
                        message: format!("internal error: {reason}"),
                    });
                    continue;
                }
            };
            let step = &plan.steps[index];
            scope.set_step(&step.id, step_record.status.as_str(), &step_record.output);
            if step_record.status == StepStatus::Failed
                && step.on_failure == OnFailure::Fail
                && failure.is_none()
            {
                let error = step_record.error.clone().unwrap_or(ErrorRecord {
                    kind: ErrorKind::Trap,
                    message: "failed".into(),
                    retryable: false,
                    details: None,
                });
                failure = Some(RunError {
                    step: Some(step.id.clone()),
                    kind: error.kind,
                    message: error.message,
                });
            }
            if let Some(observer) = &run.observer {
                observer.step_finished(&step_record);
            }
            record.steps[index] = step_record;
            // Queued before any step that needs it starts, and committed at
            // the latest with the write that records that step's start: after
            // a crash, a finished step some step went on from keeps its output
            // and is not run again. Not waited for here, so the two share a
            // commit.
            if let Some(store) = &options.store {
                store
                    .save_step(&run.run_id, index, &record.steps[index], Commit::Soon)
                    .detach();
            }
            let mut ready = Vec::new();
            for &dependent in &dependents[index] {
                waiting[dependent] -= 1;
                if waiting[dependent] == 0
                    && !done[dependent]
                    && failure.is_none()
                    && !options.cancel.is_cancelled()
                {
                    ready.push(dependent);
                }
            }
            launch(ready, &scope, &mut record.steps, &mut tasks, &mut inline);
        }

        // Steps that never started: say why.
        let cancelled = options.cancel.is_cancelled();
        for step_record in &mut record.steps {
            if step_record.status == StepStatus::Pending {
                step_record.status = StepStatus::Cancelled;
                step_record.error = Some(match (&failure, cancelled) {
                    (Some(failure), _) => ErrorRecord {
                        kind: ErrorKind::DependencyFailed,
                        message: format!(
                            "not run: step `{}` failed",
                            failure.step.as_deref().unwrap_or("?")
                        ),
                        retryable: false,
                        details: None,
                    },
                    _ => ErrorRecord {
                        kind: ErrorKind::Cancelled,
                        message: "not run: the run was cancelled".into(),
                        retryable: false,
                        details: None,
                    },
                });
            }
        }

        let status = if let Some(failure) = failure {
            record.error = Some(failure);
            RunStatus::Failed
        } else if cancelled {
            record.error = Some(RunError {
                step: None,
                kind: ErrorKind::Cancelled,
                message: "the run was cancelled".into(),
            });
            RunStatus::Cancelled
        } else {
            match self.output(&plan, &scope, &record) {
                Ok(output) => {
                    record.output = output;
                    RunStatus::Succeeded
                }
                Err(error) => {
                    record.error = Some(RunError {
                        step: None,
                        kind: template_error_kind(&error),
                        message: error.to_string(),
                    });
                    RunStatus::Failed
                }
            }
        };
        self.finish(record, started, status, options.store.as_deref())
            .await
    }

    /// Resolves every step's plugin and records the build (version, digest)
    /// in `record`: the run keeps these exact builds to its end, across
    /// retries and restarts. A step already pinned (a resumed run, or one
    /// pinned when it was accepted) gets that build or an error, never
    /// another build of the same name.
    pub fn pin(
        &self,
        plan: &Plan,
        record: &mut RunRecord,
    ) -> Result<Vec<Option<Arc<Plugin>>>, RunError> {
        let mut plugins = Vec::with_capacity(plan.steps.len());
        for (step, step_record) in plan.steps.iter().zip(&mut record.steps) {
            if step.workflow.is_some() {
                plugins.push(None);
                continue;
            }
            let reference = match &step_record.plugin_digest {
                Some(digest) => PluginRef::digest(step.plugin.name.as_str(), digest),
                None => step.plugin.clone(),
            };
            let plugin = self
                .inner
                .registry
                .resolve(&reference)
                .map_err(|err| RunError {
                    step: Some(step.id.clone()),
                    kind: ErrorKind::Plugin,
                    message: err.to_string(),
                })?;
            step_record.plugin_version = Some(plugin.version.to_string());
            step_record.plugin_digest = Some(format!("sha256:{}", plugin.digest));
            plugins.push(Some(plugin));
        }
        Ok(plugins)
    }

    /// `[output]`, or `{ sink id: output }` for the steps no other step needs.
    fn output(
        &self,
        plan: &Plan,
        scope: &Scope,
        record: &RunRecord,
    ) -> Result<Value, TemplateError> {
        if let Some(output) = &plan.output {
            return plan.templates.render(output, scope);
        }
        let mut needed = vec![false; plan.steps.len()];
        for step in &plan.steps {
            for &need in &step.needs {
                needed[need] = true;
            }
        }
        let sinks: serde_json::Map<String, Value> = plan
            .steps
            .iter()
            .zip(&record.steps)
            .enumerate()
            .filter(|(index, _)| !needed[*index])
            .map(|(_, (step, step_record))| (step.id.clone(), step_record.output.clone()))
            .collect();
        Ok(Value::Object(sinks))
    }

    async fn finish(
        &self,
        mut record: RunRecord,
        started: Instant,
        status: RunStatus,
        store: Option<&dyn Store>,
    ) -> RunRecord {
        record.status = status;
        record.finished_at = Some(now_rfc3339());
        // A resumed run counts the time of this incarnation only.
        record.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        if let Some(store) = store
            && let Err(err) = store.finish_run(&record).await
        {
            tracing::error!(run_id = %record.id, error = %err, "cannot store the finished run");
        }
        record
    }
}

/// Readies a run as stored when the process stopped to go on: each step that
/// had not finished gets its stored `for_each` items' attempts (moved out of
/// `items`, in item order), its attempts that were running are marked
/// interrupted, and it is pending again. Steps that had finished are left as
/// they are. Running it twice changes nothing more.
pub fn prepare_resume(record: &mut RunRecord, items: &mut StoredItems) {
    for (index, step_record) in record.steps.iter_mut().enumerate() {
        if step_record.status.is_done() {
            continue;
        }
        for (_, item) in items.range_mut((index, 0)..=(index, usize::MAX)) {
            step_record.attempts.append(&mut item.attempts);
        }
        for attempt in &mut step_record.attempts {
            if attempt.status == StepStatus::Running {
                attempt.status = StepStatus::Failed;
                attempt.error = Some(ErrorRecord {
                    kind: ErrorKind::Interrupted,
                    message: "the host stopped during this attempt".into(),
                    retryable: true,
                    details: None,
                });
            }
        }
        step_record.status = StepStatus::Pending;
        step_record.error = None;
    }
}

/// A queued run of `plan`: every step pending.
pub fn queued_record(plan: &Plan, run_id: String, input: Value) -> RunRecord {
    RunRecord {
        id: run_id,
        workflow: plan.name.clone(),
        status: RunStatus::Queued,
        input,
        output: Value::Null,
        error: None,
        created_at: now_rfc3339(),
        started_at: None,
        finished_at: None,
        duration_ms: None,
        steps: plan.steps.iter().map(pending_step).collect(),
        retry_of: None,
        rerun_of: None,
        retries: Vec::new(),
        parent: None,
    }
}

/// A step of `plan` that has not started.
fn pending_step(step: &crate::workflow::PlannedStep) -> StepRecord {
    match &step.workflow {
        Some(workflow) => StepRecord::pending_workflow(&step.id, workflow),
        None => StepRecord::pending(&step.id, step.plugin.to_string()),
    }
}

/// What a step runs, for logs: its plugin's label, or `workflow <name>`.
fn task_label(step: &crate::workflow::PlannedStep, plugin: Option<&Plugin>) -> String {
    match (plugin, &step.workflow) {
        (Some(plugin), _) => plugin.label(),
        (None, Some(workflow)) => format!("workflow {workflow}"),
        (None, None) => step.plugin.to_string(),
    }
}

fn step_failure(step: &StepRecord) -> RunError {
    let error = step.error.clone().unwrap_or(ErrorRecord {
        kind: ErrorKind::Trap,
        message: "failed".into(),
        retryable: false,
        details: None,
    });
    RunError {
        step: Some(step.id.clone()),
        kind: error.kind,
        message: error.message,
    }
}

/// The outcome of one instance of a step, with every attempt it took.
type InstanceResult = (Result<Value, ErrorRecord>, Vec<AttemptRecord>);

/// What every step task of one run shares.
struct RunContext {
    executor: Executor,
    plan: Arc<Plan>,
    /// Per step: its plugin (`None`: a sub-workflow step).
    plugins: Vec<Option<Arc<Plugin>>>,
    run_id: String,
    observer: Option<Arc<dyn RunObserver>>,
    cancel: CancellationToken,
    store: Option<Arc<dyn Store>>,
    /// Per step: the attempts previous incarnations stored (one cut short
    /// by the stop is marked interrupted), `for_each` items' included.
    earlier_attempts: Vec<Vec<AttemptRecord>>,
    /// The `for_each` items previous incarnations stored, for their item and
    /// outcome (their attempts are in `earlier_attempts`).
    items: StoredItems,
    children: Option<Arc<dyn ChildRuns>>,
    depth: usize,
    remote: Option<Arc<dyn RemoteSteps>>,
}

/// Where an attempt runs.
enum Slot {
    /// Here, under this permit; `started`: its start is recorded already
    /// (it was offered first).
    Here {
        permit: tokio::sync::OwnedSemaphorePermit,
        started: bool,
    },
    /// On another node, which ran it: its outcome, and that node.
    Ran(AttemptOutcome, String),
}

impl RunContext {
    async fn run_step(
        self: Arc<Self>,
        index: usize,
        scope: Scope,
        mut record: StepRecord,
    ) -> StepRecord {
        let step = &self.plan.steps[index];
        let templates = &self.plan.templates;
        let started = Instant::now();
        record.started_at = Some(now_rfc3339());
        let fail = |mut record: StepRecord, error: ErrorRecord| {
            record.status = StepStatus::Failed;
            record.error = Some(error);
            record
        };

        if let Some(condition) = &step.condition {
            match templates.truthy(condition, &scope) {
                Ok(true) => {}
                Ok(false) => {
                    record.status = StepStatus::Skipped;
                    record.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                    return record;
                }
                Err(err) => return fail(record, template_error(&err)),
            }
        }

        // Read once for every attempt and item of the step.
        let secrets = match Granted::read(&self.executor.inner.secrets, &step.secrets) {
            Ok(granted) => Arc::new(granted),
            Err(err) => {
                let error = ErrorRecord {
                    kind: ErrorKind::Secret,
                    message: err.to_string(),
                    retryable: false,
                    details: None,
                };
                return fail(record, error);
            }
        };
        let (result, attempts) = match &step.for_each {
            None => self.clone().run_instance(index, scope, None, secrets).await,
            Some(for_each) => {
                let items = match templates.render_list(for_each, &scope) {
                    Ok(items) => items,
                    Err(err) => return fail(record, template_error(&err)),
                };
                record.items = Some(items.len());
                if let Some(observer) = &self.observer {
                    observer.step_items(&step.id, items.len());
                }
                let mut results: Vec<Option<InstanceResult>> =
                    (0..items.len()).map(|_| None).collect();
                // One task per item: items run in parallel, bounded by the
                // executor's permits like any other attempt. An item a
                // previous incarnation finished keeps its outcome (its
                // attempts are in the record already).
                let mut tasks = JoinSet::new();
                for (position, item) in items.into_iter().enumerate() {
                    let stored = self.items.get(&(index, position));
                    if let Some(ItemRecord {
                        item: stored_item,
                        outcome: Some(outcome),
                        ..
                    }) = stored
                        && *stored_item == item
                    {
                        results[position] = Some((outcome.to_result(), Vec::new()));
                        continue;
                    }
                    let run = self.clone();
                    let scope = scope.with_item(&item, position);
                    let secrets = secrets.clone();
                    tasks.spawn(async move {
                        (
                            position,
                            run.run_instance(index, scope, Some((position, item)), secrets)
                                .await,
                        )
                    });
                }
                while let Some(joined) = tasks.join_next().await {
                    match joined {
                        Ok((position, result)) => results[position] = Some(result),
                        Err(join_error) => {
                            tracing::error!(error = %join_error, "for_each task failed")
                        }
                    }
                }
                let mut outputs = Vec::with_capacity(results.len());
                let mut attempts = Vec::new();
                let mut first_error = None;
                for (position, result) in results.into_iter().enumerate() {
                    let (result, item_attempts) = result.unwrap_or_else(|| {
                        (
                            Err(internal_error("the item's task ended abnormally")),
                            Vec::new(),
                        )
                    });
                    attempts.extend(item_attempts);
                    match result {
                        Ok(output) => outputs.push(output),
                        Err(mut error) => {
                            outputs.push(Value::Null);
                            if first_error.is_none() {
                                error.message = format!("item {position}: {}", error.message);
                                first_error = Some(error);
                            }
                        }
                    }
                }
                // A failed fan-out keeps the outputs of the items that
                // succeeded (`null` for the others): a retry reuses them.
                match first_error {
                    None => (Ok(Value::Array(outputs)), attempts),
                    Some(error) => {
                        record.output = Value::Array(outputs);
                        (Err(error), attempts)
                    }
                }
            }
        };

        record.attempts.extend(attempts);
        if step.for_each.is_some() {
            // Earlier incarnations' attempts first: group them by item.
            record.attempts.sort_by_key(|attempt| attempt.item);
        }
        record.duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        match result {
            Ok(output) => {
                record.status = StepStatus::Succeeded;
                record.output = output;
                record
            }
            Err(error) if error.kind == ErrorKind::Cancelled => {
                record.status = StepStatus::Cancelled;
                record.error = Some(error);
                record
            }
            Err(error) => fail(record, error),
        }
    }

    /// Stores the attempts of a step (of one `for_each` item) so far and,
    /// with `started`, that this attempt has started: after a crash the next
    /// incarnation numbers its attempts on from there, and an attempt that
    /// failed before the crash (one waiting out its backoff) keeps its error.
    /// The record stored replaces the step's (the item's): it keeps the
    /// attempts of earlier incarnations too, or a second crash would lose
    /// them. An item's record also keeps its `outcome` once it has one.
    ///
    /// The write is queued at once; the caller awaits it, or [`detach`]es it.
    fn save_progress(
        &self,
        index: usize,
        item: Option<&(usize, Value)>,
        this_incarnation: &[AttemptRecord],
        started: Option<u32>,
        outcome: Option<&Result<Value, ErrorRecord>>,
        commit: Commit,
    ) -> Option<Queued> {
        let store = self.store.as_ref()?;
        let step = &self.plan.steps[index];
        let plugin = self.plugins[index].as_deref();
        let position = item.map(|(position, _)| *position);
        let mut attempts: Vec<AttemptRecord> = self.earlier_attempts[index]
            .iter()
            .filter(|attempt| attempt.item == position)
            .cloned()
            .collect();
        attempts.extend_from_slice(this_incarnation);
        if let Some(attempt) = started {
            attempts.push(AttemptRecord::running(attempt, position, now_rfc3339()));
        }
        if let Some((position, item)) = item {
            let record = ItemRecord {
                item: item.clone(),
                attempts,
                outcome: outcome.and_then(ItemOutcome::of),
            };
            return Some(store.save_item(&self.run_id, index, *position, &record, commit));
        }
        let record = StepRecord {
            plugin_version: plugin.map(|plugin| plugin.version.to_string()),
            plugin_digest: plugin.map(|plugin| format!("sha256:{}", plugin.digest)),
            status: StepStatus::Running,
            attempts,
            ..pending_step(step)
        };
        Some(store.save_step(&self.run_id, index, &record, commit))
    }

    /// Waits for a write of [`Self::save_progress`]; a failure is logged.
    /// A write the store refused because another node holds the run now
    /// (fenced) stops the run here: nothing more of it may land.
    async fn saved(&self, index: usize, write: Option<Queued>) {
        if let Some(write) = write
            && let Err(err) = write.await
        {
            let step = &self.plan.steps[index].id;
            if let StoreError::Fenced(message) = &err {
                tracing::warn!(run_id = %self.run_id, step, "{message}; stopping the run here");
                self.cancel.cancel();
                return;
            }
            tracing::error!(run_id = %self.run_id, step, error = %err, "cannot store the step's attempts");
        }
    }

    /// One invocation of the step (one `for_each` item), with its retries.
    async fn run_instance(
        self: Arc<Self>,
        index: usize,
        scope: Scope,
        item: Option<(usize, Value)>,
        secrets: Arc<Granted>,
    ) -> InstanceResult {
        let position = item.as_ref().map(|(position, _)| *position);
        let step = &self.plan.steps[index];
        let templates = &self.plan.templates;
        let input = match templates.render(&step.input, &scope) {
            Ok(input) => input,
            Err(err) => return (Err(template_error(&err)), Vec::new()),
        };
        if let Some(workflow) = step.workflow.clone() {
            return self
                .clone()
                .run_children(index, &workflow, input, item)
                .await;
        }
        let input = serde_json::to_string(&input).expect("a JSON value serialises");
        let mut config = BTreeMap::new();
        for (key, value) in &step.config {
            match templates.render(value, &scope) {
                Ok(Value::String(text)) => config.insert(key.clone(), text),
                Ok(other) => config.insert(key.clone(), other.to_string()),
                Err(err) => return (Err(template_error(&err)), Vec::new()),
            };
        }
        let limits = step.limits.apply(self.executor.inner.defaults);
        let events: Option<Arc<dyn StepEvents>> = self.observer.as_ref().map(|observer| {
            Arc::new(ForwardEvents {
                step: step.id.clone(),
                observer: observer.clone(),
            }) as _
        });

        let mut attempts = Vec::new();
        // A resumed step (item) goes on numbering from the stored attempts,
        // and gets at least one more attempt even if the interrupted one was
        // the last.
        let previous = self.earlier_attempts[index]
            .iter()
            .filter(|a| a.item == position)
            .map(|a| a.attempt)
            .max()
            .unwrap_or(0);
        let mut attempt = previous + 1;
        let mut last_attempt = step.retry.max_attempts.max(previous + 1);
        let plugin = self.plugins[index]
            .as_ref()
            .expect("a plugin step has its plugin");
        loop {
            let waiting = self.executor.inner.waiting.fetch_add(1, Ordering::Relaxed) + 1;
            telemetry::queue_depth(waiting);
            // A permit here; after `OFFER_AFTER` without one, and with other
            // nodes to offer it to, whichever comes first: a permit here or a
            // node that claims the attempt (stored as started first).
            let offerable = self
                .remote
                .as_ref()
                .is_some_and(|remote| remote.available());
            let offer_after = async {
                if offerable {
                    tokio::time::sleep(remote::OFFER_AFTER).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            let slot = tokio::select! {
                permit = self.executor.permit() => Some(Slot::Here { permit, started: false }),
                _ = self.cancel.cancelled() => None,
                () = offer_after => {
                    if self
                        .start_attempt(index, item.as_ref(), &attempts, attempt)
                        .await
                    {
                        let request = RemoteAttempt {
                            run_id: self.run_id.clone(),
                            workflow: self.plan.name.clone(),
                            step_id: step.id.clone(),
                            attempt,
                            plugin: plugin.name.clone(),
                            digest: plugin.digest.clone(),
                            input: input.clone(),
                            config: config.clone(),
                            secrets: step.secrets.clone(),
                            allow_hosts: step.allow_hosts.iter().map(ToString::to_string).collect(),
                            limits,
                        };
                        self.permit_or_remote(&request).await
                    } else {
                        None
                    }
                }
            };
            let waiting = self.executor.inner.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
            telemetry::queue_depth(waiting);
            let Some(slot) = slot else {
                return (Err(cancelled_error()), attempts);
            };
            let (outcome, ran_on) = match slot {
                Slot::Ran(outcome, node) => (outcome, Some(node)),
                Slot::Here { permit, started } => {
                    telemetry::steps_in_flight(1);
                    tracing::debug!(attempt, item = position, "attempt started");
                    // Stored before a plugin with side effects runs (whatever
                    // the attempt does, a restart knows it started); queued
                    // for one without (see `start_attempt`).
                    if !started
                        && !self
                            .start_attempt(index, item.as_ref(), &attempts, attempt)
                            .await
                    {
                        // Cancelled, or the store refused the start: another
                        // node holds the run now (fenced), and the plugin must
                        // not run.
                        drop(permit);
                        telemetry::steps_in_flight(-1);
                        return (Err(cancelled_error()), attempts);
                    }
                    let outcome = plugin
                        .invoke(Invocation {
                            run_id: self.run_id.clone(),
                            workflow: self.plan.name.clone(),
                            step_id: step.id.clone(),
                            attempt,
                            input: input.clone(),
                            config: config.clone(),
                            secrets: secrets.clone(),
                            allow_hosts: step.allow_hosts.clone(),
                            limits,
                            state: self.executor.inner.state.clone(),
                            events: events.clone(),
                            cancel: self.cancel.clone(),
                        })
                        .await;
                    drop(permit);
                    telemetry::steps_in_flight(-1);
                    (outcome, None)
                }
            };
            telemetry::step_attempt(
                &plugin.name,
                if outcome.result.is_ok() {
                    "succeeded"
                } else {
                    "failed"
                },
                outcome.duration,
                outcome.fuel_consumed,
            );
            let (result, mut attempt_record) = attempt_record(attempt, position, outcome);
            if attempt_record.status == StepStatus::Failed {
                // The failure path only: the text parsed again.
                attempt_record.input = serde_json::from_str(&input).ok();
            }
            if ran_on.is_some()
                && result
                    .as_ref()
                    .is_err_and(|error| error.kind == ErrorKind::Interrupted)
            {
                // Its node died during it: one more attempt, as after a
                // restart, whatever the retry policy says.
                last_attempt = last_attempt.max(attempt + 1);
            }
            attempt_record.node = ran_on;
            if let Some(observer) = &self.observer {
                observer.attempt_finished(&step.id, &attempt_record);
            }
            attempts.push(attempt_record);
            match self
                .after_attempt(
                    index,
                    item.as_ref(),
                    &attempts,
                    result,
                    attempt,
                    last_attempt,
                )
                .await
            {
                Some(result) => return (result, attempts),
                None => attempt += 1,
            }
        }
    }

    /// A permit here, or the outcome of a node that claimed `request` first;
    /// `None` if the run was cancelled (or is no longer this node's)
    /// meanwhile. If the offer cannot be made, the attempt waits here.
    async fn permit_or_remote(&self, request: &RemoteAttempt) -> Option<Slot> {
        let remote = self.remote.as_ref()?;
        let task = match remote.offer(request).await {
            Ok(task) => task,
            Err(err) => {
                if matches!(err, StoreError::Fenced(_)) {
                    tracing::warn!(run_id = %self.run_id, "{err}; stopping the run here");
                    self.cancel.cancel();
                    return None;
                }
                tracing::warn!(run_id = %self.run_id, error = %err, "cannot offer a step to the cluster; it waits for room here");
                return tokio::select! {
                    permit = self.executor.permit() => Some(Slot::Here { permit, started: true }),
                    _ = self.cancel.cancelled() => None,
                };
            }
        };
        let ran = |outcome: Option<RemoteOutcome>| {
            outcome.map(|outcome| {
                let (outcome, node) = outcome.into_parts();
                Slot::Ran(outcome, node)
            })
        };
        tokio::select! {
            permit = self.executor.permit() => {
                if remote.withdraw(&task).await {
                    return Some(Slot::Here { permit, started: true });
                }
                // Another node claimed it first: its outcome it is.
                drop(permit);
                tokio::select! {
                    outcome = remote.outcome(&task) => ran(outcome),
                    _ = self.cancel.cancelled() => {
                        remote.forget(&task).await;
                        None
                    }
                }
            }
            outcome = remote.outcome(&task) => ran(outcome),
            _ = self.cancel.cancelled() => {
                remote.forget(&task).await;
                None
            }
        }
    }

    /// Says attempt `attempt` of step `index` (of one `for_each` item) has
    /// started: `false` if the run was cancelled meanwhile, or the store
    /// refused (another node holds the run), and the attempt must not go on.
    ///
    /// A step with side effects (a sub-workflow, a plugin that can send
    /// HTTP or write state) waits until the store has its start, and so,
    /// since a run's writes commit in the order they were queued, everything
    /// before it: its upstream results are durable before it changes the
    /// world, and a restart knows it started. A side-effect-free plugin's
    /// start is queued and not waited for: after a crash it may run again,
    /// which changes nothing, and its run does not wait for a commit per step.
    async fn start_attempt(
        &self,
        index: usize,
        item: Option<&(usize, Value)>,
        attempts: &[AttemptRecord],
        attempt: u32,
    ) -> bool {
        if let Some(observer) = &self.observer {
            let position = item.map(|(position, _)| *position);
            observer.step_started(&self.plan.steps[index].id, attempt, position);
        }
        let side_effect_free = self.plugins[index]
            .as_deref()
            .is_some_and(|plugin| plugin.side_effects.none());
        if side_effect_free {
            if let Some(write) =
                self.save_progress(index, item, attempts, Some(attempt), None, Commit::Soon)
            {
                write.detach();
            }
        } else {
            let write = self.save_progress(index, item, attempts, Some(attempt), None, Commit::Now);
            self.saved(index, write).await;
        }
        !self.cancel.is_cancelled()
    }

    /// After an attempt of step `index` (of one `for_each` item) that ended
    /// with `result`: `None` when it is to be tried again (the failed attempt
    /// is stored and the backoff waited out), else the instance's result (an
    /// item's outcome is queued for the store).
    async fn after_attempt(
        &self,
        index: usize,
        item: Option<&(usize, Value)>,
        attempts: &[AttemptRecord],
        result: Result<Value, ErrorRecord>,
        attempt: u32,
        last_attempt: u32,
    ) -> Option<Result<Value, ErrorRecord>> {
        match result {
            Err(error) if error.retryable && attempt < last_attempt => {
                let write = self.save_progress(index, item, attempts, None, None, Commit::Now);
                self.saved(index, write).await;
                let delay = self.plan.steps[index].retry.delay_before(attempt + 1);
                // After the store has the failed attempt: what a restart
                // during the backoff shows of it (tests wait for this).
                tracing::debug!(
                    attempt,
                    item = item.map(|(position, _)| *position),
                    ?delay,
                    "attempt failed and stored; retrying after the backoff"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => None,
                    _ = self.cancel.cancelled() => Some(Err(cancelled_error())),
                }
            }
            result => {
                // A step's own record is stored when it finishes; an item's,
                // with its outcome, now, without waiting: the step's record
                // is queued after it.
                if item.is_some()
                    && let Some(write) =
                        self.save_progress(index, item, attempts, None, Some(&result), Commit::Soon)
                {
                    write.detach();
                }
                Some(result)
            }
        }
    }
}

impl RunContext {
    /// The attempts of a sub-workflow step (of one `for_each` item): each
    /// starts a child run of `workflow` on `input` and ends with it, retried
    /// as the step's policy says. No executor permit is held while a child
    /// runs (its own steps take them).
    async fn run_children(
        self: Arc<Self>,
        index: usize,
        workflow: &str,
        input: Value,
        item: Option<(usize, Value)>,
    ) -> InstanceResult {
        let step = &self.plan.steps[index];
        let position = item.as_ref().map(|(position, _)| *position);
        let earlier: Vec<&AttemptRecord> = self.earlier_attempts[index]
            .iter()
            .filter(|a| a.item == position)
            .collect();
        let previous = earlier.iter().map(|a| a.attempt).max().unwrap_or(0);
        // Attempts a stop cut short do not count: the attempt after one
        // takes its child up again instead of starting another.
        let cut_short = earlier
            .iter()
            .filter(|a| {
                a.error
                    .as_ref()
                    .is_some_and(|e| e.kind == ErrorKind::Interrupted)
            })
            .count() as u32;
        let mut attempt = previous + 1;
        let last_attempt = step.retry.max_attempts.max(previous + 1);
        let timeout = step.limits.apply(self.executor.inner.defaults).timeout;
        let mut attempts = Vec::new();
        loop {
            if !self
                .start_attempt(index, item.as_ref(), &attempts, attempt)
                .await
            {
                return (Err(cancelled_error()), attempts);
            }
            let started_at = now_rfc3339();
            let started = Instant::now();
            let outcome = match (&self.children, self.depth) {
                (None, _) => ChildOutcome {
                    run: None,
                    result: Err(workflow_error(
                        "sub-workflow steps run under `trellis serve`, which keeps child runs"
                            .to_owned(),
                    )),
                },
                (Some(_), depth) if depth >= MAX_DEPTH => ChildOutcome {
                    run: None,
                    result: Err(workflow_error(format!(
                        "sub-workflows nest deeper than {MAX_DEPTH} levels: this run is \
                         {depth} levels down already"
                    ))),
                },
                (Some(children), depth) => {
                    let request = ChildRequest {
                        parent: ParentRef {
                            run: self.run_id.clone(),
                            step: step.id.clone(),
                            item: position,
                        },
                        parent_depth: depth,
                        workflow: workflow.to_owned(),
                        input: input.clone(),
                        key: format!(
                            "child:{}:{}:{}:{}",
                            self.run_id,
                            step.id,
                            position.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                            attempt - cut_short
                        ),
                        timeout,
                        cancel: self.cancel.clone(),
                    };
                    children.run_child(request).await
                }
            };
            let (status, error) = match &outcome.result {
                Ok(_) => (StepStatus::Succeeded, None),
                Err(error) if error.kind == ErrorKind::Cancelled => {
                    (StepStatus::Cancelled, Some(error.clone()))
                }
                Err(error) => (StepStatus::Failed, Some(error.clone())),
            };
            let record = AttemptRecord {
                child_run: outcome.run,
                error,
                ..AttemptRecord {
                    status,
                    duration_ms: started.elapsed().as_secs_f64() * 1000.0,
                    ..AttemptRecord::running(attempt, position, started_at)
                }
            };
            if let Some(observer) = &self.observer {
                observer.attempt_finished(&step.id, &record);
            }
            attempts.push(record);
            match self
                .after_attempt(
                    index,
                    item.as_ref(),
                    &attempts,
                    outcome.result,
                    attempt,
                    last_attempt,
                )
                .await
            {
                Some(result) => return (result, attempts),
                None => attempt += 1,
            }
        }
    }
}

/// A finished child run as its parent's attempt sees it: its output, or
/// why the attempt failed (a failed child is retryable: the step's retry
/// policy decides whether another child run starts).
pub fn child_result(child: &RunRecord) -> Result<Value, ErrorRecord> {
    if child.status == RunStatus::Succeeded {
        return Ok(child.output.clone());
    }
    let status = child.status;
    let (kind, why) = match &child.error {
        Some(error) => (error.kind, error.to_string()),
        None => (ErrorKind::Workflow, status.to_string()),
    };
    Err(ErrorRecord {
        kind: if status == RunStatus::Cancelled {
            ErrorKind::Cancelled
        } else {
            kind
        },
        message: format!("child run {} {status}: {why}", child.id),
        retryable: status == RunStatus::Failed,
        details: Some(serde_json::json!({ "child_run": child.id })),
    })
}

/// A child run's input that fails its workflow's `[input] schema`: the
/// step fails with `invalid_input`, not retried.
pub fn child_input_error(workflow: &str, violations: &[SchemaViolation]) -> ErrorRecord {
    let said: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.path, v.message))
        .collect();
    ErrorRecord {
        kind: ErrorKind::InvalidInput,
        message: format!(
            "the input does not match the input schema of workflow `{workflow}`: {}",
            said.join("; ")
        ),
        retryable: false,
        details: Some(Value::Array(
            violations
                .iter()
                .map(|v| serde_json::json!({ "path": v.path, "message": v.message }))
                .collect(),
        )),
    }
}

/// A sub-workflow step that cannot start its child.
fn workflow_error(message: String) -> ErrorRecord {
    ErrorRecord {
        kind: ErrorKind::Workflow,
        message,
        retryable: false,
        details: None,
    }
}

/// A step's run, boxed: spawned as a task of its own or awaited in the run's.
type StepFuture = Pin<Box<dyn Future<Output = (usize, StepRecord)> + Send>>;

/// What a panic in a step's run said, as a task's `JoinError` would.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    format!("step panicked: {message}")
}

fn attempt_record(
    attempt: u32,
    item: Option<usize>,
    outcome: AttemptOutcome,
) -> (Result<Value, ErrorRecord>, AttemptRecord) {
    let (status, error) = match &outcome.result {
        Ok(_) => (StepStatus::Succeeded, None),
        Err(error) if error.kind == ErrorKind::Cancelled => {
            (StepStatus::Cancelled, Some(error.clone()))
        }
        Err(error) => (StepStatus::Failed, Some(error.clone())),
    };
    let record = AttemptRecord {
        attempt,
        item,
        status,
        error,
        started_at: outcome.started_at,
        duration_ms: outcome.duration.as_secs_f64() * 1000.0,
        fuel_consumed: outcome.fuel_consumed,
        peak_memory: outcome.peak_memory,
        logs: outcome.logs,
        log_bytes_dropped: outcome.log_bytes_dropped,
        progress: outcome.progress,
        child_run: None,
        node: None,
        input: None,
    };
    (outcome.result, record)
}

/// `template_limit` for a template over a bound on time or memory, else
/// `template`.
fn template_error_kind(error: &TemplateError) -> ErrorKind {
    match error {
        TemplateError::Limit { .. } => ErrorKind::TemplateLimit,
        _ => ErrorKind::Template,
    }
}

fn template_error(error: &TemplateError) -> ErrorRecord {
    ErrorRecord {
        kind: template_error_kind(error),
        message: error.to_string(),
        retryable: false,
        details: None,
    }
}

fn cancelled_error() -> ErrorRecord {
    ErrorRecord {
        kind: ErrorKind::Cancelled,
        message: "the run was cancelled".into(),
        retryable: false,
        details: None,
    }
}

fn internal_error(message: &str) -> ErrorRecord {
    ErrorRecord {
        kind: ErrorKind::Trap,
        message: format!("internal error: {message}"),
        retryable: false,
        details: None,
    }
}

/// Forwards a step's live log and progress to the run's observer.
struct ForwardEvents {
    step: String,
    observer: Arc<dyn RunObserver>,
}

impl StepEvents for ForwardEvents {
    fn log(&self, line: &LogLine) {
        self.observer.step_log(&self.step, line);
    }
    fn progress(&self, progress: &Progress) {
        self.observer.step_progress(&self.step, progress);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_step_run_is_reported_with_its_message() {
        let caught = |f: fn()| std::panic::catch_unwind(f).unwrap_err();
        let literal = caught(|| panic!("index out of bounds"));
        let formatted = caught(|| panic!("step {} failed", 3));
        let other = caught(|| std::panic::panic_any(7_u8));
        assert_eq!(
            panic_message(literal.as_ref()),
            "step panicked: index out of bounds"
        );
        assert_eq!(
            panic_message(formatted.as_ref()),
            "step panicked: step 3 failed"
        );
        assert_eq!(panic_message(other.as_ref()), "step panicked: no message");
    }
}
