//! The run lifecycle: a run is accepted durably (`submit`), runs in the
//! background, is resumed after a restart (`recover`), and can be waited for
//! or cancelled.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::Service;
use super::catalog::{PinnedCatalog, WorkflowEntry};
use super::events::ActiveRun;
use crate::executor::{RunOptions, queued_record};
use crate::record::{ErrorKind, RunError, RunRecord, RunStatus, new_run_id, now_rfc3339};
use crate::store::{
    Created, NewRun, PinnedWorkflows, RunPage, RunQuery, StoreError, StoredItems, UnfinishedRun,
    WorkflowText,
};
use crate::workflow::{self, Layout, Plan, SchemaViolation};

/// Why a run was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no workflow named `{0}`")]
    UnknownWorkflow(String),
    /// A retry or rerun of a run that is not there.
    #[error("no run with id {0}")]
    NoSuchRun(String),
    /// A retry or rerun of a run still going.
    #[error(
        "run {id} has not finished ({status}): retry or rerun it once it has, or cancel it first"
    )]
    RunNotFinished { id: String, status: RunStatus },
    /// A retry `from` a step the workflow does not have.
    #[error("the workflow has no step `{step}`; its steps are: {}", .steps.join(", "))]
    UnknownStep { step: String, steps: Vec<String> },
    /// A plugin build the run is pinned to is gone from this server.
    #[error("{0}; retry with \"upgrade\": true to use the builds loaded now")]
    BuildGone(String),
    #[error("workflow `{name}` has errors and refuses runs until fixed:\n{diagnostics}")]
    InvalidWorkflow { name: String, diagnostics: String },
    #[error("the input does not match the workflow's input schema")]
    InvalidInput(Vec<SchemaViolation>),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a run could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no run with id `{0}`")]
    NotFound(String),
    #[error("run `{id}` already finished ({status:?})")]
    Finished { id: String, status: RunStatus },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How a new run goes again over a finished one.
#[derive(Debug, Clone)]
pub enum Again {
    /// The same input; what succeeded is reused, except `from` (a step id)
    /// and everything downstream of it.
    Retry { from: Option<String> },
    /// Every step again, on the original's input or this one.
    Rerun { input: Option<Value> },
}

/// A run was accepted (or an earlier one with the same idempotency key found).
#[derive(Debug, Clone)]
pub struct Submitted {
    pub run: RunRecord,
    /// `false`: the idempotency key matched an earlier run, which this is.
    pub created: bool,
}

impl Service {
    /// Accepts a run: durable when this returns, then started.
    pub async fn submit(
        &self,
        name: &str,
        input: Value,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, SubmitError> {
        if self.inner.closing.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let entry = self
            .workflow(name)
            .ok_or_else(|| SubmitError::UnknownWorkflow(name.to_string()))?;
        let plan = match &entry.plan {
            Ok(plan) => plan.clone(),
            Err(diagnostics) => {
                return Err(SubmitError::InvalidWorkflow {
                    name: name.to_string(),
                    diagnostics: diagnostics.to_string(),
                });
            }
        };
        if let Some(schema) = &plan.input_schema {
            schema.validate(&input).map_err(SubmitError::InvalidInput)?;
        }
        let mut record = queued_record(&plan, new_run_id(), input);
        // Pinned before it is stored: a restart resumes it with these builds.
        // A plugin gone since the workflow loaded fails the run when it starts.
        let _ = self.inner.executor.pin(&plan, &mut record);
        let pins = self.pins_for(&plan);
        let text = WorkflowText {
            source: entry.source,
            file: entry.file,
        };
        self.accept(
            plan,
            &text,
            record,
            idempotency_key,
            StoredItems::new(),
            &pins,
        )
        .await
    }

    /// The workflows `plan`'s sub-workflow steps call, and theirs, all the
    /// way down, as they are loaded now (a run keeps these versions).
    pub(super) fn pins_for(&self, plan: &Plan) -> PinnedWorkflows {
        let mut pins = PinnedWorkflows::new();
        let mut wanted = plan.calls();
        while let Some(name) = wanted.pop() {
            if pins.contains_key(&name) {
                continue;
            }
            let Some(entry) = self.workflow(&name) else {
                continue;
            };
            if let Ok(called) = &entry.plan {
                wanted.extend(called.calls());
            }
            pins.insert(
                name,
                WorkflowText {
                    source: entry.source,
                    file: entry.file,
                },
            );
        }
        pins
    }

    /// Stores `record` (queued, its builds pinned) durably, then starts it
    /// here, or leaves it for a node of the cluster with room.
    pub(super) async fn accept(
        &self,
        plan: Arc<Plan>,
        text: &WorkflowText,
        record: RunRecord,
        idempotency_key: Option<&str>,
        items: StoredItems,
        pins: &PinnedWorkflows,
    ) -> Result<Submitted, SubmitError> {
        // Registered before it is stored, so an event subscriber or a cancel
        // that sees it stored also finds it here.
        let active = Arc::new(ActiveRun::new(record.clone()));
        self.inner
            .active
            .lock()
            .unwrap()
            .insert(record.id.clone(), active.clone());
        let new_run = NewRun {
            record: &record,
            workflow_source: &text.source,
            workflow_file: &text.file,
            idempotency_key,
            items: &items,
            pins,
        };
        // A node of a cluster with more work than it can run leaves the run
        // ready for a node with room (this one too, once it has some).
        let busy = self.is_busy();
        let created = match &self.inner.cluster {
            Some(cluster) if busy => cluster.store.create_run_held(new_run, false).await,
            _ => self.inner.store.create_run(new_run).await,
        };
        match created {
            Ok(Created::New) if busy => {
                self.inner.active.lock().unwrap().remove(&record.id);
                crate::telemetry::run_accepted(&plan.name);
                self.left_ready();
                return Ok(Submitted {
                    run: record,
                    created: true,
                });
            }
            Ok(Created::New) => {}
            Ok(Created::Existing(existing)) => {
                self.inner.active.lock().unwrap().remove(&record.id);
                let run = self.live(&existing.id).unwrap_or(*existing);
                return Ok(Submitted {
                    run,
                    created: false,
                });
            }
            Err(err) => {
                self.inner.active.lock().unwrap().remove(&record.id);
                return Err(err.into());
            }
        }
        crate::telemetry::run_accepted(&plan.name);
        self.spawn(plan, record.clone(), items, active);
        Ok(Submitted {
            run: record,
            created: true,
        })
    }

    /// A new run from the finished run `id`: a retry (`Again::Retry`) reuses
    /// what succeeded, a rerun (`Again::Rerun`) runs every step again. Both
    /// keep the original's workflow version and plugin builds unless
    /// `upgrade`, which plans them as a new run of the workflow would be.
    pub async fn run_again(
        &self,
        id: &str,
        again: Again,
        upgrade: bool,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted, SubmitError> {
        if self.inner.closing.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let original = self
            .get_run(id)
            .await?
            .ok_or_else(|| SubmitError::NoSuchRun(id.to_owned()))?;
        if !original.status.is_terminal() {
            return Err(SubmitError::RunNotFinished {
                id: id.to_owned(),
                status: original.status,
            });
        }
        let (plan, text, pins) = if upgrade {
            let name = &original.workflow;
            let entry = self
                .workflow(name)
                .ok_or_else(|| SubmitError::UnknownWorkflow(name.clone()))?;
            match entry.plan {
                Ok(plan) => {
                    let pins = self.pins_for(&plan);
                    let text = WorkflowText {
                        source: entry.source,
                        file: entry.file,
                    };
                    (plan, text, pins)
                }
                Err(diagnostics) => {
                    return Err(SubmitError::InvalidWorkflow {
                        name: name.clone(),
                        diagnostics: diagnostics.to_string(),
                    });
                }
            }
        } else {
            let stored = self
                .inner
                .store
                .run_workflow(id)
                .await?
                .ok_or_else(|| SubmitError::NoSuchRun(id.to_owned()))?;
            self.restore_pinned(&[&original]).await;
            let plan = workflow::parse_str(
                &stored.text.source,
                &stored.text.file,
                &original.workflow,
                &PinnedCatalog(&self.inner.registry),
            )
            .map_err(|diagnostics| SubmitError::InvalidWorkflow {
                name: original.workflow.clone(),
                diagnostics: diagnostics.to_string(),
            })?;
            (Arc::new(plan), stored.text, stored.pins)
        };
        let (mut record, items) = match again {
            Again::Retry { from } => {
                let from = match from {
                    None => None,
                    Some(step) => Some(plan.steps.iter().position(|s| s.id == step).ok_or_else(
                        || SubmitError::UnknownStep {
                            step,
                            steps: plan.steps.iter().map(|s| s.id.clone()).collect(),
                        },
                    )?),
                };
                crate::executor::retry_record(&plan, &original, from, upgrade, new_run_id())
            }
            Again::Rerun { input } => {
                let input = input.unwrap_or_else(|| original.input.clone());
                if let Some(schema) = &plan.input_schema {
                    schema.validate(&input).map_err(SubmitError::InvalidInput)?;
                }
                let record =
                    crate::executor::rerun_record(&plan, &original, input, upgrade, new_run_id());
                (record, StoredItems::new())
            }
        };
        if let Err(error) = self.inner.executor.pin(&plan, &mut record) {
            return Err(SubmitError::BuildGone(error.to_string()));
        }
        self.accept(plan, &text, record, idempotency_key, items, &pins)
            .await
    }

    /// Runs `record` in the background; `items` are the `for_each` items a
    /// resumed run had stored.
    fn spawn(
        &self,
        plan: Arc<Plan>,
        record: RunRecord,
        items: StoredItems,
        active: Arc<ActiveRun>,
    ) {
        let service = self.clone();
        let span = tracing::info_span!("run", run_id = %record.id, workflow = %record.workflow);
        let run = async move {
            let depth = service.depth_of(&record).await;
            let options = RunOptions {
                run_id: Some(record.id.clone()),
                observer: Some(active.clone()),
                cancel: active.cancel.clone(),
                store: Some(service.inner.store.clone()),
                items,
                children: Some(Arc::new(super::children::Children(service.clone()))),
                depth,
                remote: service.remote_steps(),
            };
            let record = service.inner.executor.execute(plan, record, options).await;
            crate::telemetry::run_finished(&record.workflow, record.status.as_str());
            service.retire(&active, record);
        };
        tokio::spawn(tracing::Instrument::instrument(run, span));
    }

    /// Resumes every run that was queued or running when the process stopped.
    pub(super) async fn recover(&self) -> Result<(), StoreError> {
        let unfinished = self.inner.store.unfinished_runs().await?;
        if !unfinished.is_empty() {
            tracing::info!(runs = unfinished.len(), "resuming unfinished runs");
        }
        self.resume(unfinished).await
    }

    /// Goes on with runs stored unfinished: after a restart, or claimed from
    /// a node of the cluster whose lease ran out.
    pub(super) async fn resume(&self, unfinished: Vec<UnfinishedRun>) -> Result<(), StoreError> {
        let records: Vec<&RunRecord> = unfinished.iter().map(|run| &run.record).collect();
        self.restore_pinned(&records).await;
        for mut run in unfinished {
            // Before its live snapshot is made, so `GET /v1/runs/{id}` shows
            // the attempts the stop cut short as interrupted, not running.
            crate::executor::prepare_resume(&mut run.record, &mut run.items);
            let name = run.record.workflow.clone();
            let entry = match workflow::parse_str(
                &run.workflow_source,
                &run.workflow_file,
                &name,
                &PinnedCatalog(&self.inner.registry),
            ) {
                Ok(plan) => WorkflowEntry {
                    name: name.clone(),
                    file: run.workflow_file.clone(),
                    source: run.workflow_source.clone(),
                    plan: Ok(Arc::new(plan)),
                },
                Err(diagnostics) => WorkflowEntry {
                    name: name.clone(),
                    file: run.workflow_file.clone(),
                    source: run.workflow_source.clone(),
                    plan: Err(Arc::new(diagnostics)),
                },
            };
            let active = Arc::new(ActiveRun::new(run.record.clone()));
            if run.cancel_requested {
                // Asked while the node that ran it was gone: it stops at once.
                active.cancel.cancel();
            }
            self.inner
                .active
                .lock()
                .unwrap()
                .insert(run.record.id.clone(), active.clone());
            match entry.plan {
                Ok(plan) => self.spawn(plan, run.record, run.items, active),
                Err(diagnostics) => {
                    // The definition it started with no longer plans (a plugin
                    // it needs is gone): it cannot go on.
                    let mut record = run.record;
                    record.status = RunStatus::Failed;
                    record.finished_at = Some(now_rfc3339());
                    record.error = Some(RunError {
                        step: None,
                        kind: ErrorKind::Plugin,
                        message: format!(
                            "cannot resume the run: its workflow no longer loads:\n{diagnostics}"
                        ),
                    });
                    self.inner.store.finish_run(&record).await?;
                    self.retire(&active, record);
                }
            }
        }
        Ok(())
    }

    /// Ends a run this process was running, once the store holds its
    /// finished `record`. It leaves `active` before its waiters hear of the
    /// end, so a client that got its finished run never sees it counted as
    /// in flight; anyone who looks in between reads the store.
    fn retire(&self, active: &ActiveRun, record: RunRecord) {
        self.inner.active.lock().unwrap().remove(&record.id);
        active.finish(record);
        self.room_made();
    }

    fn live(&self, id: &str) -> Option<RunRecord> {
        let active = self.inner.active.lock().unwrap().get(id).cloned()?;
        Some(active.snapshot())
    }

    /// The run: live while it runs, from the store once finished.
    pub async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        if let Some(run) = self.live(id) {
            return Ok(Some(run));
        }
        self.inner.store.get_run(id).await
    }

    /// How run `id`'s DAG is drawn: the layout of the workflow version it
    /// runs (kept per version, for the few hundred versions asked about
    /// last). `None`: no such run.
    pub async fn run_layout(&self, id: &str) -> Result<Option<Arc<Layout>>, StoreError> {
        /// Layouts kept; past it the cache starts again.
        const KEPT: usize = 256;
        let Some(stored) = self.inner.store.run_workflow(id).await? else {
            return Ok(None);
        };
        let key: [u8; 32] =
            <sha2::Sha256 as sha2::Digest>::digest(stored.text.source.as_bytes()).into();
        if let Some(layout) = self.inner.layouts.lock().unwrap().get(&key) {
            return Ok(Some(layout.clone()));
        }
        // The text was valid when the run was accepted; only its shape
        // matters here, so any plugin and workflow it names will do.
        let plan = workflow::parse_str(
            &stored.text.source,
            &stored.text.file,
            "layout",
            &workflow::AnyPlugin,
        )
        .map_err(|diagnostics| {
            StoreError::Corrupt(format!(
                "run {id}'s workflow text no longer parses: {diagnostics}"
            ))
        })?;
        // Tens of milliseconds for thousands of steps: off the runtime.
        let layout = tokio::task::spawn_blocking(move || Layout::of(&plan))
            .await
            .map(Arc::new)
            .map_err(|err| {
                StoreError::Corrupt(format!("laying out run {id}'s DAG failed: {err}"))
            })?;
        let mut layouts = self.inner.layouts.lock().unwrap();
        if layouts.len() >= KEPT {
            layouts.clear();
        }
        layouts.insert(key, layout.clone());
        Ok(Some(layout))
    }

    pub async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        self.inner.store.list_runs(query).await
    }

    /// The metrics of workflow `name` over its runs that finished within
    /// `window` of now.
    pub async fn workflow_stats(
        &self,
        name: &str,
        window: Duration,
    ) -> Result<crate::store::WorkflowStats, StoreError> {
        // Records start in 1970 at the earliest (RFC 3339 as written here).
        let since = std::time::SystemTime::now()
            .checked_sub(window)
            .filter(|since| *since > std::time::UNIX_EPOCH)
            .unwrap_or(std::time::UNIX_EPOCH);
        let since = humantime::format_rfc3339_millis(since).to_string();
        self.inner.store.workflow_stats(name, &since).await
    }

    /// The finished run, or `None` if it is still running after `timeout`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Option<RunRecord>, StoreError> {
        let active = self.inner.active.lock().unwrap().get(id).cloned();
        match active {
            Some(active) => {
                let mut done = active.done.subscribe();
                let finished = tokio::time::timeout(timeout, done.wait_for(|d| d.is_some())).await;
                Ok(match finished {
                    Ok(Ok(record)) => record.clone(),
                    _ => None,
                })
            }
            None if self.inner.cluster.is_some() => Ok(self
                .stored_until_finished(id, timeout)
                .await?
                .filter(|r| r.status.is_terminal())),
            None => Ok(self
                .inner
                .store
                .get_run(id)
                .await?
                .filter(|r| r.status.is_terminal())),
        }
    }

    /// Stops a run: running attempts stop at the next epoch tick.
    pub async fn cancel(&self, id: &str) -> Result<RunRecord, CancelError> {
        let active = self.inner.active.lock().unwrap().get(id).cloned();
        if let Some(active) = active {
            active.cancel.cancel();
            let mut done = active.done.subscribe();
            if let Ok(Ok(record)) =
                tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| d.is_some())).await
                && let Some(record) = record.clone()
            {
                return Ok(record);
            }
            return Ok(active.snapshot());
        }
        if self.request_cancel(id).await? {
            // Another node runs it: it stops there once told (at once,
            // through NOTIFY; at its next renewal if that was lost).
            return self
                .stored_until_finished(id, CANCEL_WAIT)
                .await?
                .ok_or_else(|| CancelError::NotFound(id.to_string()));
        }
        match self.inner.store.get_run(id).await? {
            None => Err(CancelError::NotFound(id.to_string())),
            Some(run) => Err(CancelError::Finished {
                id: id.to_string(),
                status: run.status,
            }),
        }
    }
}

/// How long a cancel of a run another node runs waits for it to end.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

impl Service {
    /// The stored run once it finished (another node runs it), or as
    /// stored after `timeout`; `None` if there is no such run.
    async fn stored_until_finished(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Option<RunRecord>, StoreError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(10);
        loop {
            let Some(run) = self.inner.store.get_run(id).await? else {
                return Ok(None);
            };
            if run.status.is_terminal() || tokio::time::Instant::now() >= deadline {
                return Ok(Some(run));
            }
            // Another node's progress shows only in the store.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::service::test_service;

    #[tokio::test]
    async fn a_run_needs_a_known_valid_workflow_and_an_open_service() {
        let broken = "[[step]]\nid = \"a\"\nplugin = \"missing\"\n";
        let (_dir, service) = test_service(&[("broken.toml", broken)]).await;
        assert!(matches!(
            service.submit("nope", json!({}), None).await,
            Err(SubmitError::UnknownWorkflow(name)) if name == "nope"
        ));
        match service.submit("broken", json!({}), None).await {
            Err(SubmitError::InvalidWorkflow { name, diagnostics }) => {
                assert_eq!(name, "broken");
                assert!(diagnostics.contains("missing"), "{diagnostics}");
            }
            other => panic!("a broken workflow ran: {other:?}"),
        }
        service.close();
        assert!(matches!(
            service.submit("broken", json!({}), None).await,
            Err(SubmitError::ShuttingDown)
        ));
        assert_eq!(service.in_flight(), 0);
    }

    #[tokio::test]
    async fn an_unknown_run_is_not_found() {
        let (_dir, service) = test_service(&[]).await;
        let id = crate::record::new_run_id();
        assert_eq!(service.get_run(&id).await.unwrap(), None);
        assert_eq!(
            service.wait(&id, Duration::from_millis(1)).await.unwrap(),
            None
        );
        assert!(matches!(
            service.cancel(&id).await,
            Err(CancelError::NotFound(missing)) if missing == id
        ));
        let page = service.list_runs(&RunQuery::default()).await.unwrap();
        assert!(page.runs.is_empty());
    }
}
