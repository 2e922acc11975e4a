//! Persistence behind one trait: runs, their steps (with attempts, errors,
//! metrics and bounded logs), plugin `state`, idempotency keys.
//!
//! [`SqliteStore`] is the embedded default (one file in the data dir, WAL).
//! Every method is async; implementations may batch writes (group commit),
//! but a method returns only once its write is committed.

#[cfg(test)]
mod contract;
mod postgres;
mod rows;
mod sqlite;
mod stats;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::record::{AttemptRecord, ErrorKind, ErrorRecord, RunRecord, RunStatus, StepRecord};

pub use postgres::{ClaimedTask, DONE_NOTE, Listener, PgStore, Renewal, TaskState};
pub use sqlite::{Durability, SqliteStore};

/// `postgres://user:secret@host/db` -> `postgres://user:<redacted>@host/db`.
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:<redacted>{}", &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store's database failed: {0}")]
    Database(#[source] DatabaseError),
    #[error("the store holds data it cannot read: {0}")]
    Corrupt(String),
    /// The database cannot be reached (down, refusing connections, or the
    /// connection broke): the API answers 503 and the caller may try again.
    #[error("the store's database is unavailable: {0}")]
    Unavailable(#[source] DatabaseError),
    #[error("the store is closed")]
    Closed,
    #[error("the run cursor {0:?} is not valid")]
    BadCursor(String),
    /// A write of a run this node no longer holds: another node claimed it
    /// after this one's lease ran out. The write is dropped.
    #[error("{0}")]
    Fenced(String),
    /// A `state_set` would take a workflow's state past its [`StateQuota`].
    #[error("{0}")]
    StateFull(String),
}

/// A failure of the database under the store: what happened, in words (which
/// include the driver's message), and the driver's own error when there is
/// one, kept as the [`source`](std::error::Error::source) for whoever wants
/// its kind or code. Reads as its message (`Deref<Target = str>`). Cheap to
/// clone: a batch that fails answers every write in it with the same error.
#[derive(Debug, Clone)]
pub struct DatabaseError {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl DatabaseError {
    /// A failure the store itself detected (no driver error behind it).
    pub fn new(message: impl Into<String>) -> DatabaseError {
        DatabaseError {
            message: message.into(),
            source: None,
        }
    }

    /// `message` about the driver's `source`.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> DatabaseError {
        DatabaseError {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }
}

impl From<String> for DatabaseError {
    fn from(message: String) -> DatabaseError {
        DatabaseError::new(message)
    }
}

impl From<&str> for DatabaseError {
    fn from(message: &str) -> DatabaseError {
        DatabaseError::new(message)
    }
}

impl std::ops::Deref for DatabaseError {
    type Target = str;

    fn deref(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DatabaseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// The most plugin `state` one workflow may keep: keys, and bytes of keys and
/// values together. A `set` past either fails (the attempt with it); `delete`
/// makes room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateQuota {
    pub max_keys: u64,
    pub max_bytes: u64,
}

impl Default for StateQuota {
    fn default() -> Self {
        StateQuota {
            max_keys: 100_000,
            max_bytes: 1 << 30,
        }
    }
}

/// A run as accepted: its record (status `queued`, every step `pending`), the
/// exact workflow text it runs (so a restart re-plans the same definition) and
/// the idempotency key it was submitted with.
#[derive(Debug, Clone)]
pub struct NewRun<'a> {
    pub record: &'a RunRecord,
    /// The workflow's TOML source and the file name it was loaded from.
    pub workflow_source: &'a str,
    pub workflow_file: &'a str,
    pub idempotency_key: Option<&'a str>,
    /// `for_each` items a retry took over from the run it retries, stored
    /// with the run: its steps that run again start from them.
    pub items: &'a StoredItems,
    /// The versions of the workflows its sub-workflow steps call (and
    /// theirs, all the way down), fixed when it was accepted.
    pub pins: &'a PinnedWorkflows,
}

/// A workflow's text as a run was planned from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkflowText {
    pub source: String,
    /// The file it was loaded from.
    pub file: String,
}

/// The workflows a run's sub-workflow steps may start, by name, as they
/// were when the run (or its topmost parent) was accepted.
pub type PinnedWorkflows = BTreeMap<String, WorkflowText>;

/// No pinned workflows: a run without sub-workflow steps.
pub static NO_PINS: PinnedWorkflows = PinnedWorkflows::new();

/// What a run was planned from: its workflow's text and the workflows it
/// may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunWorkflow {
    pub text: WorkflowText,
    pub pins: PinnedWorkflows,
}

/// What `create_run` did.
#[derive(Debug, Clone)]
pub enum Created {
    /// The run is stored.
    New,
    /// A run with the same idempotency key and workflow exists: this one.
    Existing(Box<RunRecord>),
}

/// A run that was queued or running when the process stopped.
#[derive(Debug, Clone)]
pub struct UnfinishedRun {
    /// As stored: finished steps keep their records; a step that was
    /// running has the attempts that had finished.
    pub record: RunRecord,
    pub workflow_source: String,
    pub workflow_file: String,
    /// The stored items of its running `for_each` steps, by (step index,
    /// item position).
    pub items: StoredItems,
    /// Someone asked to cancel it before this process took it over (a
    /// cluster's node that died while running it).
    pub cancel_requested: bool,
}

/// An upload made on one node of a cluster, which every other node applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogChange {
    PutPlugin {
        name: String,
        bytes: Vec<u8>,
    },
    /// Every version of `name`, or one.
    DeletePlugin {
        name: String,
        version: Option<String>,
    },
    PutWorkflow {
        name: String,
        source: String,
    },
}

/// A node of the cluster (`GET /v1/nodes`): a `trellis serve` process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    /// Its `node_id` (default `<hostname>-<pid>`).
    #[schema(example = "worker-a")]
    pub id: String,
    /// This process of it (a node restarted is a new incarnation).
    pub incarnation: String,
    pub started_at: String,
    /// Its last lease renewal.
    pub last_seen: String,
    /// Step attempts it was running at that renewal.
    pub running_steps: u64,
    /// The trellis version it runs.
    pub version: String,
    /// Whether its lease still runs; a node whose lease ran out has lost its
    /// runs to the others. Nodes not seen for an hour are not listed.
    pub alive: bool,
}

/// `for_each` items stored while their step runs, by (step index, position).
pub type StoredItems = BTreeMap<(usize, usize), ItemRecord>;

/// No items: what a new run that is not a retry starts from.
pub static NO_ITEMS: StoredItems = StoredItems::new();

/// One `for_each` item of a step that has not finished, as stored after each
/// of its attempts starts and ends: after a restart, an item that had
/// finished is not run again, and one cut short goes on numbering its
/// attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    /// The item as `for_each` gave it: a resumed step reuses the outcome only
    /// for the same item at the same position.
    pub item: Value,
    pub attempts: Vec<AttemptRecord>,
    /// Once the item finished: its output, or the error that failed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ItemOutcome>,
}

/// How a `for_each` item ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemOutcome {
    Output(Value),
    Error(ErrorRecord),
}

impl ItemOutcome {
    /// How an item's attempts ended, as stored: a cancelled item has not
    /// finished, so it has no outcome.
    pub fn of(result: &Result<Value, ErrorRecord>) -> Option<ItemOutcome> {
        match result {
            Ok(output) => Some(ItemOutcome::Output(output.clone())),
            Err(error) if error.kind == ErrorKind::Cancelled => None,
            Err(error) => Some(ItemOutcome::Error(error.clone())),
        }
    }

    /// The item's result, as its attempts gave it.
    pub fn to_result(&self) -> Result<Value, ErrorRecord> {
        match self {
            ItemOutcome::Output(output) => Ok(output.clone()),
            ItemOutcome::Error(error) => Err(error.clone()),
        }
    }
}

/// `GET /v1/runs` filters and paging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunQuery {
    pub workflow: Option<String>,
    pub status: Option<RunStatus>,
    /// The child runs of this run.
    pub parent: Option<String>,
    /// At most this many (the store caps it at 1000; 0 means 50).
    pub limit: usize,
    /// Opaque: the `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of runs, newest first. The runs carry no step details (`steps` is
/// empty) to keep pages small; `GET /v1/runs/{id}` has them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunPage {
    pub runs: Vec<RunRecord>,
    /// Pass as `cursor` for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// How the values of one measure spread: nearest-rank percentiles over the
/// values there are (`None`: no values).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Spread {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub max: Option<f64>,
}

/// One step of a workflow over the runs of a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepStats {
    /// Runs in which the step ran (succeeded or failed; not skipped,
    /// cancelled before it started, or reused by a retry).
    pub runs: u64,
    pub failed: u64,
    /// From its first attempt's start to its end, retries included.
    pub duration_ms: Spread,
    /// Over all its attempts.
    pub fuel: Spread,
    /// Bytes, the largest of its attempts.
    pub memory_peak: Spread,
}

/// The four process metrics of one workflow over the runs that finished in
/// a window, as the store computes them (one aggregate query each for runs
/// and steps, not a scan in Rust).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkflowStats {
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// From a run's creation (accepted) to its end.
    pub cycle_time_ms: Spread,
    pub steps: BTreeMap<String, StepStats>,
}

/// A write the store has queued, resolving once it is committed (or failed).
///
/// The write is queued when the method that returns it is called, not when
/// this is first polled, and one run's writes commit in the order they were
/// queued (writes of different runs may commit side by side): the executor stores a finished step without waiting, starts the steps that need
/// it, and the write that records their start (which it does wait for)
/// commits the finished step too, in the same group commit. Dropping it does
/// not cancel the write; the store then logs its failure, if it fails. So that
/// a write nobody waits for is a choice, not an oversight, that is said with
/// [`Queued::detach`].
#[must_use = "the write commits anyway: await it, or call `.detach()` when nobody waits"]
pub struct Queued(Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>);

impl Queued {
    /// A write that resolves with `commit`.
    pub fn new(commit: impl Future<Output = Result<(), StoreError>> + Send + 'static) -> Queued {
        Queued(Box::pin(commit))
    }

    /// Lets the write commit without waiting for it: the store logs it if it
    /// fails. (Waiting in a task of its own would cost a spawn and a wake-up
    /// per write on the writer's critical path.)
    pub fn detach(self) {}
}

impl Future for Queued {
    type Output = Result<(), StoreError>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        self.get_mut().0.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Queued")
    }
}

/// Whether anyone waits for the commit of a [`Queued`] write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The caller waits: commit it as soon as the writer gets to it.
    Now,
    /// Nobody waits (the caller drops the [`Queued`]): the store may hold it
    /// back briefly (SQLite: at most [`LINGER`]) so that it shares a commit
    /// with the write that follows, which on a run's critical path is the
    /// next step's start.
    Soon,
}

/// While the database is unreachable, how long to wait before trying again:
/// the first wait, doubled each time up to the second. The writer's held
/// writes and the service's plugin-state calls wait the same way.
pub const OUTAGE_BACKOFF: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(100),
    std::time::Duration::from_secs(2),
);

/// How long the SQLite writer holds back a batch of [`Commit::Soon`] writes
/// waiting for company; a [`Commit::Now`] write or a read ends the wait.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// Durable storage of runs and state.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a new run durably. With an idempotency key that was already used
    /// for the same workflow, stores nothing and returns the earlier run.
    async fn create_run(&self, run: NewRun<'_>) -> Result<Created, StoreError>;

    /// The whole record: run fields, every step, every attempt, and the
    /// ids of the run's retries.
    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError>;

    /// The workflow text the run was planned from, and the versions of the
    /// workflows it may call.
    async fn run_workflow(&self, id: &str) -> Result<Option<RunWorkflow>, StoreError>;

    /// Runs newest first (by id: ids are UUIDv7, so by creation time).
    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError>;

    /// The run moved to `running` (sets `status` and `started_at`).
    /// Queued when called, like [`Store::save_step`], as [`Commit::Soon`].
    fn run_started(&self, id: &str, started_at: &str) -> Queued;

    /// A step's record at `index` in the workflow's step order, replacing any
    /// earlier one: called when a step starts, after each attempt, and when it
    /// finishes.
    ///
    /// Queued when called (see [`Queued`]): a caller that need not wait for
    /// this commit may go on, and the next write it waits for commits this
    /// one too. `commit` says whether the caller waits for it.
    fn save_step(&self, run_id: &str, index: usize, step: &StepRecord, commit: Commit) -> Queued;

    /// A `for_each` item's record at `position` of the step at `index`,
    /// replacing any earlier one. The items of a step are dropped once the
    /// step's finished record is saved (succeeded, failed or skipped), and
    /// all of a run's when it finishes.
    ///
    /// Queued when called, like [`Store::save_step`].
    fn save_item(
        &self,
        run_id: &str,
        index: usize,
        position: usize,
        item: &ItemRecord,
        commit: Commit,
    ) -> Queued;

    /// The run ended: status, output, error, finish time, and every step.
    async fn finish_run(&self, record: &RunRecord) -> Result<(), StoreError>;

    /// Runs whose status is `queued` or `running`, oldest first.
    async fn unfinished_runs(&self) -> Result<Vec<UnfinishedRun>, StoreError>;

    /// The metrics of `workflow` over its runs that finished at `since`
    /// (RFC 3339, UTC, as records write it) or later.
    async fn workflow_stats(
        &self,
        workflow: &str,
        since: &str,
    ) -> Result<WorkflowStats, StoreError>;

    /// Plugin state, scoped to a workflow.
    async fn state_get(&self, workflow: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Fails with [`StoreError::StateFull`] when the workflow's state would
    /// go past the store's [`StateQuota`].
    async fn state_set(&self, workflow: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;
    async fn state_delete(&self, workflow: &str, key: &str) -> Result<(), StoreError>;
}
