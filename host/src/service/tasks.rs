//! Steps claimed one by one across the cluster (DESIGN.md "Storage and
//! scale-out": work, runs ready to start and steps ready to run, is claimed
//! in batches). A node whose permits are all taken offers the attempts that
//! wait for one ([`RemoteSteps`]); a node with room claims them on the
//! work channel's `task` note or its sweep, runs them and stores each
//! outcome; the holder of the run is told by a `done:<task>` note (or finds
//! it on its own sweep) and goes on with the run.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::Service;
use super::cluster::Cluster;
use crate::executor::{RemoteAttempt, RemoteOutcome, RemoteSteps};
use crate::limits::HostPattern;
use crate::plugin::{AttemptOutcome, Plugin, PluginRef};
use crate::record::{ErrorKind, ErrorRecord, now_rfc3339};
use crate::secrets::Granted;
use crate::store::{StoreError, TaskState};

/// How often a holder looks at a task it waits for, besides the note.
const RECHECK: Duration = Duration::from_millis(500);

/// The cluster as the executor of this node offers attempts to it.
pub(super) struct ClusterSteps(pub(super) Service);

impl Service {
    /// Where a run's attempts are offered when this node is full: the
    /// cluster, if this node is one's.
    pub(super) fn remote_steps(&self) -> Option<Arc<dyn RemoteSteps>> {
        self.inner
            .cluster
            .as_ref()
            .map(|_| Arc::new(ClusterSteps(self.clone())) as Arc<dyn RemoteSteps>)
    }

    /// Claims as many offered attempts as this node has room for, and runs
    /// each in a task of its own.
    pub(super) async fn claim_tasks(&self, cluster: &Cluster) -> Result<usize, StoreError> {
        if self.inner.closing.is_cancelled() {
            return Ok(0);
        }
        let room = self.inner.executor.free_steps();
        if room == 0 {
            return Ok(0);
        }
        let tasks = cluster.store.claim_tasks(room as i64).await?;
        let claimed = tasks.len();
        if claimed > 0 {
            let mut runs: Vec<&str> = tasks.iter().map(|task| task.run_id.as_str()).collect();
            runs.sort_unstable();
            runs.dedup();
            tracing::info!(
                steps = claimed,
                runs = %runs.join(","),
                "claimed steps offered by other nodes"
            );
        }
        for task in tasks {
            let service = self.clone();
            tokio::spawn(async move {
                let id = task.id.clone();
                let Some(cluster) = &service.inner.cluster else {
                    return;
                };
                // Stopped when its holder drops the task (the run was
                // cancelled, or taken over) or this node closes.
                let cancel = service.inner.closing.child_token();
                let run = service.run_task(&task.request, cancel.clone());
                let watch = async {
                    loop {
                        tokio::time::sleep(RECHECK).await;
                        if let Ok(TaskState::Gone) = cluster.store.task_state(&id).await {
                            tracing::info!(task = %id, run_id = %task.run_id, "a step this node runs for another was dropped by its run's node: stopping it");
                            cancel.cancel();
                            return;
                        }
                    }
                };
                let outcome = tokio::select! {
                    outcome = run => outcome,
                    () = watch => return,
                };
                let text = serde_json::to_string(&outcome).expect("an outcome serialises");
                match cluster.store.finish_task(&id, &text).await {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!(
                        task = %id,
                        run_id = %task.run_id,
                        "the run of a step this node ran was taken over or ended meanwhile: its outcome is dropped"
                    ),
                    Err(err) => tracing::warn!(
                        task = %id,
                        error = %err,
                        "cannot store the outcome of a step this node ran; its run's node runs it again"
                    ),
                }
                // Room again: more may be waiting.
                cluster.wake.notify_one();
            });
        }
        Ok(claimed)
    }

    /// Runs one offered attempt here.
    async fn run_task(
        &self,
        request: &str,
        cancel: tokio_util::sync::CancellationToken,
    ) -> RemoteOutcome {
        let node = self.inner.node_id.clone();
        let failed = |kind: ErrorKind, message: String, retryable: bool| {
            not_run(kind, message, retryable, node.clone())
        };
        let request: RemoteAttempt = match serde_json::from_str(request) {
            Ok(request) => request,
            Err(err) => {
                return failed(
                    ErrorKind::Plugin,
                    format!("node {node} cannot read the step offered to it: {err}"),
                    true,
                );
            }
        };
        let Some(plugin) = self.build(&request.plugin, &request.digest).await else {
            return failed(
                ErrorKind::Plugin,
                format!(
                    "node {node} does not have build sha256:{} of plugin `{}`: give every node \
                     the same plugin files, or upload plugins through the API",
                    request.digest, request.plugin
                ),
                true,
            );
        };
        let secrets = match Granted::read(self.inner.executor.secrets(), &request.secrets) {
            Ok(granted) => Arc::new(granted),
            Err(err) => {
                return failed(ErrorKind::Secret, format!("on node {node}: {err}"), false);
            }
        };
        let mut hosts = Vec::with_capacity(request.allow_hosts.len());
        for pattern in &request.allow_hosts {
            match HostPattern::parse(pattern) {
                Ok(pattern) => hosts.push(pattern),
                Err(err) => {
                    return failed(ErrorKind::Workflow, format!("allow_hosts: {err}"), false);
                }
            }
        }
        let outcome = self
            .inner
            .executor
            .run_claimed(&plugin, request, secrets, hosts.into(), cancel)
            .await;
        RemoteOutcome::new(outcome, node)
    }

    /// Build `digest` of plugin `name`: loaded, or kept from an earlier run.
    async fn build(&self, name: &str, digest: &str) -> Option<Arc<Plugin>> {
        let reference = PluginRef::digest(name, digest);
        if let Ok(plugin) = self.inner.registry.resolve(&reference) {
            return Some(plugin);
        }
        self.restore_build(digest).await.ok()
    }
}

#[async_trait]
impl RemoteSteps for ClusterSteps {
    fn available(&self) -> bool {
        self.0
            .cluster()
            .is_ok_and(|cluster| cluster.peers.load(std::sync::atomic::Ordering::Relaxed) > 0)
    }

    async fn offer(&self, attempt: &RemoteAttempt) -> Result<String, StoreError> {
        let cluster = self.0.cluster()?;
        let id = crate::record::new_run_id();
        let request = serde_json::to_string(attempt).expect("a request serialises");
        cluster
            .store
            .offer_task(&id, &attempt.run_id, &request)
            .await?;
        Ok(id)
    }

    async fn withdraw(&self, task: &str) -> bool {
        let Ok(cluster) = self.0.cluster() else {
            return true;
        };
        match cluster.store.withdraw_task(task).await {
            Ok(withdrawn) => withdrawn,
            Err(err) => {
                // Not known to be withdrawn: wait for the outcome instead.
                tracing::warn!(task, error = %err, "cannot withdraw an offered step");
                false
            }
        }
    }

    async fn outcome(&self, task: &str) -> Option<RemoteOutcome> {
        let cluster = self.0.cluster().ok()?;
        loop {
            let done = cluster.task_done(task);
            match cluster.store.task_state(task).await {
                Ok(TaskState::Done(text)) => {
                    cluster.forget_waiter(task);
                    if let Err(err) = cluster.store.remove_task(task).await {
                        tracing::debug!(task, error = %err, "cannot remove a finished step task; the sweep does");
                    }
                    return match serde_json::from_str(&text) {
                        Ok(outcome) => Some(outcome),
                        Err(err) => {
                            tracing::error!(task, error = %err, "the outcome of a step another node ran cannot be read");
                            None
                        }
                    };
                }
                Ok(TaskState::Gone) => {
                    cluster.forget_waiter(task);
                    return None;
                }
                Ok(TaskState::Orphaned(claimer)) => {
                    cluster.forget_waiter(task);
                    if let Err(err) = cluster.store.remove_task(task).await {
                        tracing::debug!(task, error = %err, "cannot remove an orphaned step task; the sweep does");
                    }
                    return Some(interrupted(claimer));
                }
                Ok(TaskState::Open) => {}
                Err(err) => {
                    tracing::warn!(task, error = %err, "cannot read an offered step; trying again")
                }
            }
            // The note, or a look again in a while (a lost note, a claimer
            // that died and whose task another node claims again).
            let _ = tokio::time::timeout(RECHECK, done).await;
        }
    }

    async fn forget(&self, task: &str) {
        let Ok(cluster) = self.0.cluster() else {
            return;
        };
        cluster.forget_waiter(task);
        if let Err(err) = cluster.store.remove_task(task).await {
            tracing::debug!(task, error = %err, "cannot remove a step task; the sweep does");
        }
    }
}

/// The outcome of an attempt whose node died (its lease ran out) while it
/// ran it: cut short, as a restart finds one.
fn interrupted(node: String) -> RemoteOutcome {
    not_run(
        ErrorKind::Interrupted,
        "the node that claimed this attempt stopped during it (its lease ran out)".into(),
        true,
        node,
    )
}

/// An attempt that did not run (or whose run nobody can tell): its error.
fn not_run(kind: ErrorKind, message: String, retryable: bool, node: String) -> RemoteOutcome {
    RemoteOutcome::new(
        AttemptOutcome {
            result: Err(ErrorRecord {
                kind,
                message,
                retryable,
                details: None,
            }),
            started_at: now_rfc3339(),
            duration: Duration::ZERO,
            fuel_consumed: 0,
            peak_memory: 0,
            logs: Vec::new(),
            log_bytes_dropped: 0,
            progress: None,
        },
        node,
    )
}
