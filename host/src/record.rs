//! The run record: what a run did, step by step and attempt by attempt.
//!
//! One shape everywhere: `trellis run --json` prints it, the store keeps it and
//! `GET /v1/runs/{id}` answers with it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `queued -> running -> succeeded | failed | cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: the run will not change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Succeeded | RunStatus::Failed | RunStatus::Cancelled
        )
    }

    /// Every status, in the order a run goes through them.
    pub const ALL: [RunStatus; 5] = [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];
}

/// A text that names no [`RunStatus`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown run status \"{0}\": write queued, running, succeeded, failed or cancelled")]
pub struct UnknownRunStatus(pub String);

/// The status's name as [`RunStatus::as_str`] writes it (the JSON name), exactly.
impl std::str::FromStr for RunStatus {
    type Err = UnknownRunStatus;

    fn from_str(text: &str) -> Result<Self, UnknownRunStatus> {
        RunStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
            .ok_or_else(|| UnknownRunStatus(text.to_owned()))
    }
}

impl std::fmt::Display for RunStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one step of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Cancelled,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or skipped: a resumed run keeps the step as it is.
    /// A cancelled step of a run that was still going is attempted again.
    pub fn is_done(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped
        )
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an attempt (or a step, or a run) failed. Each kind reads differently to
/// a user and retries differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The plugin returned `task-error`.
    TaskError,
    /// The guest panicked (Rust `panic!`, an abort).
    Panic,
    /// The guest trapped (out-of-bounds access, unreachable, division by zero...).
    Trap,
    /// The guest's native wasm stack ran out (unbounded recursion).
    StackOverflow,
    /// The attempt used all of its fuel.
    FuelExhausted,
    /// The instance asked for more memory than the step's `memory` limit.
    MemoryLimit,
    /// A table of the instance grew past the host's bound on table elements
    /// (`table.grow` without end).
    TableLimit,
    /// The attempt ran past the step's `timeout`.
    Timeout,
    /// The output was larger than the step's `max_output`.
    OutputTooLarge,
    /// The output was not JSON, or a string the plugin handed over was not UTF-8.
    InvalidOutput,
    /// The guest kept writing to stdout/stderr far past the step's `max_log`.
    LogFlood,
    /// A template of the step (`input`, `config`, `if`, `for_each`) or of `[output]` failed.
    Template,
    /// A template went over a bound on the time or memory one evaluation may
    /// take (its message names the bound).
    TemplateLimit,
    /// The plugin could not be instantiated or is not loaded.
    Plugin,
    /// A secret the step names could not be read (not configured, its
    /// variable unset, its file unreadable).
    Secret,
    /// A sub-workflow step could not start its child run: the workflow is
    /// not loaded or has errors, or sub-workflows nest too deep.
    Workflow,
    /// A child run's input fails its workflow's input schema.
    InvalidInput,
    /// The run or step was cancelled.
    Cancelled,
    /// The host stopped (crashed, was killed) while the attempt ran.
    Interrupted,
    /// A dependency failed, so the step never ran.
    DependencyFailed,
}

impl ErrorKind {
    /// A short phrase for people.
    pub fn describe(self) -> &'static str {
        match self {
            ErrorKind::TaskError => "task error",
            ErrorKind::Panic => "plugin panicked",
            ErrorKind::Trap => "plugin trapped",
            ErrorKind::StackOverflow => "stack overflow",
            ErrorKind::FuelExhausted => "fuel exhausted",
            ErrorKind::MemoryLimit => "memory limit exceeded",
            ErrorKind::TableLimit => "table limit exceeded",
            ErrorKind::Timeout => "timed out",
            ErrorKind::OutputTooLarge => "output too large",
            ErrorKind::InvalidOutput => "output is not valid JSON",
            ErrorKind::LogFlood => "log flood",
            ErrorKind::Template => "template error",
            ErrorKind::TemplateLimit => "template over its limit",
            ErrorKind::Plugin => "plugin unavailable",
            ErrorKind::Secret => "secret unavailable",
            ErrorKind::Workflow => "sub-workflow unavailable",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::DependencyFailed => "dependency failed",
        }
    }
}

/// A typed failure, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorRecord {
    pub kind: ErrorKind,
    pub message: String,
    /// Whether the retry policy may try again.
    pub retryable: bool,
    /// JSON details from a `task-error`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl std::fmt::Display for ErrorRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.describe(), self.message)
    }
}

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    /// `host.log` from the plugin.
    Log,
    Stdout,
    Stderr,
    /// Trellis itself (truncation notices).
    Host,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One line of a step's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogLine {
    /// Milliseconds since the attempt started.
    pub at_ms: f64,
    pub stream: LogStream,
    pub level: LogLevel,
    pub message: String,
}

/// One attempt of a step (of one `for_each` item).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptRecord {
    /// Counts from 1, as `step-context.attempt`.
    pub attempt: u32,
    /// The `for_each` position, for fan-out steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
    pub started_at: String,
    pub duration_ms: f64,
    pub fuel_consumed: u64,
    /// Bytes over all memories and tables of the instance at their largest.
    pub peak_memory: u64,
    pub logs: Vec<LogLine>,
    /// Log bytes dropped past the step's `max_log`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub log_bytes_dropped: u64,
    /// The last `host.progress` the plugin reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// A sub-workflow step's attempt: the child run it started (or, after a
    /// restart, went on waiting for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_run: Option<String>,
    /// The node that ran the attempt, when another node of the cluster than
    /// the one holding the run claimed it (its `node_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A failed attempt of a plugin step: the input it was given (rendered),
    /// to see what the step failed on. Not kept for attempts that succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
}

impl AttemptRecord {
    /// An attempt that has started and not ended: what the store holds of
    /// it while it runs (a restart finds it and calls it interrupted).
    pub fn running(attempt: u32, item: Option<usize>, started_at: String) -> AttemptRecord {
        AttemptRecord {
            attempt,
            item,
            status: StepStatus::Running,
            error: None,
            started_at,
            duration_ms: 0.0,
            fuel_consumed: 0,
            peak_memory: 0,
            logs: Vec::new(),
            log_bytes_dropped: 0,
            progress: None,
            child_run: None,
            node: None,
            input: None,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub fraction: f32,
    pub message: String,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StepRecord {
    pub id: String,
    /// The plugin reference as the workflow wrote it; empty (and left out of
    /// the JSON) for a sub-workflow step.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plugin: String,
    /// A sub-workflow step: the workflow each of its attempts runs as a
    /// child run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// What it resolved to when the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_digest: Option<String>,
    pub status: StepStatus,
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// `for_each` steps: how many items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<usize>,
    pub attempts: Vec<AttemptRecord>,
    /// A step a retry took over from the run it retries (its output, not
    /// run again): that run's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused_from: Option<String>,
}

impl StepRecord {
    /// A step that has not started.
    pub fn pending(id: impl Into<String>, plugin: impl Into<String>) -> StepRecord {
        StepRecord {
            id: id.into(),
            plugin: plugin.into(),
            plugin_version: None,
            plugin_digest: None,
            status: StepStatus::Pending,
            output: Value::Null,
            error: None,
            started_at: None,
            duration_ms: None,
            items: None,
            attempts: Vec::new(),
            reused_from: None,
            workflow: None,
        }
    }

    /// A sub-workflow step that has not started.
    pub fn pending_workflow(id: impl Into<String>, workflow: impl Into<String>) -> StepRecord {
        StepRecord {
            workflow: Some(workflow.into()),
            ..StepRecord::pending(id, String::new())
        }
    }
}

/// The failure that ended a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunError {
    /// The step that failed, if a step did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            Some(step) => write!(
                f,
                "step `{step}` failed: {}: {}",
                self.kind.describe(),
                self.message
            ),
            None => write!(f, "{}: {}", self.kind.describe(), self.message),
        }
    }
}

/// The sub-workflow step a child run was started by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ParentRef {
    /// The parent run's id.
    pub run: String,
    /// The parent's step.
    pub step: String,
    /// The `for_each` position, for a fan-out step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<usize>,
}

/// A whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    pub id: String,
    pub workflow: String,
    pub status: RunStatus,
    pub input: Value,
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RunError>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    pub steps: Vec<StepRecord>,
    /// A retry: the run it retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// A rerun: the run it runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    /// The retries of this run, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<String>,
    /// A child run: the sub-workflow step that started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

/// Now, as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A new run id: a UUIDv7, so ids sort by creation time.
pub fn new_run_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_statuses_parse_as_they_serialize() {
        for status in RunStatus::ALL {
            assert_eq!(status.as_str().parse::<RunStatus>(), Ok(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                Value::String(status.to_string())
            );
        }
        assert_eq!(
            "Cancelled".parse::<RunStatus>().unwrap_err().to_string(),
            "unknown run status \"Cancelled\": write queued, running, succeeded, failed or cancelled"
        );
    }
}
