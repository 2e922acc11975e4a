//! Attempts another node runs: an attempt that waited [`OFFER_AFTER`] for a
//! permit of this node is also offered to the cluster (if it has other live
//! nodes); whichever comes first, a permit here or a node that claims it,
//! runs it. A short wait (a burst) is never offered: the round trips would
//! cost more than they save. The node that
//! holds the run gets the outcome back and goes on as with its own.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::Limits;
use crate::plugin::AttemptOutcome;
use crate::record::{ErrorRecord, LogLine, Progress};
use crate::store::StoreError;

/// How long an attempt waits for a permit here before it is offered too.
pub const OFFER_AFTER: Duration = Duration::from_millis(100);

/// Everything another node needs to run one attempt: the build by digest
/// (every node can load it: builds live in the database), the rendered
/// input and config, the names of the secrets it is granted (read from the
/// running node's `[secrets]`), its hosts and limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteAttempt {
    pub run_id: String,
    pub workflow: String,
    pub step_id: String,
    pub attempt: u32,
    pub plugin: String,
    /// sha256 of the build, hex.
    pub digest: String,
    pub input: String,
    pub config: BTreeMap<String, String>,
    pub secrets: Vec<String>,
    pub allow_hosts: Vec<String>,
    pub limits: Limits,
}

/// What the attempt did, as the node that ran it tells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteOutcome {
    pub result: Result<Value, ErrorRecord>,
    pub started_at: String,
    pub duration_ms: f64,
    pub fuel_consumed: u64,
    pub peak_memory: u64,
    pub logs: Vec<LogLine>,
    pub log_bytes_dropped: u64,
    pub progress: Option<Progress>,
    /// The `node_id` of the node that ran it.
    pub node: String,
}

impl RemoteOutcome {
    pub fn new(outcome: AttemptOutcome, node: String) -> RemoteOutcome {
        RemoteOutcome {
            result: outcome.result,
            started_at: outcome.started_at,
            duration_ms: outcome.duration.as_secs_f64() * 1000.0,
            fuel_consumed: outcome.fuel_consumed,
            peak_memory: outcome.peak_memory,
            logs: outcome.logs,
            log_bytes_dropped: outcome.log_bytes_dropped,
            progress: outcome.progress,
            node,
        }
    }

    /// The outcome, and the node that ran it.
    pub fn into_parts(self) -> (AttemptOutcome, String) {
        (
            AttemptOutcome {
                result: self.result,
                started_at: self.started_at,
                duration: Duration::from_secs_f64(self.duration_ms.max(0.0) / 1000.0),
                fuel_consumed: self.fuel_consumed,
                peak_memory: self.peak_memory,
                logs: self.logs,
                log_bytes_dropped: self.log_bytes_dropped,
                progress: self.progress,
            },
            self.node,
        )
    }
}

/// The cluster, as the executor offers attempts to it.
#[async_trait]
pub trait RemoteSteps: Send + Sync {
    /// Whether there is anyone to offer to now (other live nodes).
    fn available(&self) -> bool;
    /// Offers `attempt` to the other nodes; the task's id.
    async fn offer(&self, attempt: &RemoteAttempt) -> Result<String, StoreError>;
    /// Takes task `task` back unless a node claimed it: `true` if taken
    /// back (this node runs the attempt itself).
    async fn withdraw(&self, task: &str) -> bool;
    /// Waits for the outcome of `task`; `None` if the task is gone (the run
    /// is no longer this node's).
    async fn outcome(&self, task: &str) -> Option<RemoteOutcome>;
    /// Drops `task`, whose outcome nobody wants any more (the run was
    /// cancelled).
    async fn forget(&self, task: &str);
}

impl super::Executor {
    /// Runs an attempt another node offered (and this one claimed) under a
    /// permit of this node: `plugin` is the build the request names,
    /// `secrets` and `allow_hosts` what it grants, read here.
    pub async fn run_claimed(
        &self,
        plugin: &crate::plugin::Plugin,
        request: RemoteAttempt,
        secrets: std::sync::Arc<crate::secrets::Granted>,
        allow_hosts: std::sync::Arc<[crate::limits::HostPattern]>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> AttemptOutcome {
        let permit = self.permit().await;
        crate::telemetry::steps_in_flight(1);
        let outcome = plugin
            .invoke(crate::plugin::Invocation {
                run_id: request.run_id,
                workflow: request.workflow,
                step_id: request.step_id,
                attempt: request.attempt,
                input: request.input,
                config: request.config,
                secrets,
                allow_hosts,
                limits: request.limits,
                state: self.inner.state.clone(),
                events: None,
                cancel,
            })
            .await;
        drop(permit);
        crate::telemetry::steps_in_flight(-1);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_survives_its_trip_through_json() {
        let outcome = RemoteOutcome {
            result: Err(ErrorRecord {
                kind: crate::record::ErrorKind::TaskError,
                message: "no".into(),
                retryable: true,
                details: Some(serde_json::json!({ "why": 1 })),
            }),
            started_at: "2026-12-07T22:00:00.000Z".into(),
            duration_ms: 12.5,
            fuel_consumed: 7,
            peak_memory: 65536,
            logs: Vec::new(),
            log_bytes_dropped: 3,
            progress: None,
            node: "b".into(),
        };
        let text = serde_json::to_string(&outcome).unwrap();
        let back: RemoteOutcome = serde_json::from_str(&text).unwrap();
        assert_eq!(back, outcome);
        let (attempt, node) = back.into_parts();
        assert_eq!(node, "b");
        assert_eq!(attempt.duration, Duration::from_micros(12_500));
        assert_eq!(attempt.log_bytes_dropped, 3);
    }
}
