//! What both stores write and read alike: a new run encoded for its rows, JSON
//! columns, step indexes, page cursors and sizes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::{DatabaseError, NewRun, StateQuota, StoreError};

/// `list_runs` page sizes.
pub(super) const DEFAULT_PAGE: usize = 50;
pub(super) const MAX_PAGE: usize = 1000;

/// A new run, encoded for its rows before it goes to the writer (the JSON
/// and the digest cost CPU the writer thread should not spend).
pub(super) struct NewRunRow {
    pub(super) id: String,
    pub(super) workflow: String,
    pub(super) status: &'static str,
    pub(super) created_at: String,
    pub(super) started_at: Option<String>,
    pub(super) finished_at: Option<String>,
    pub(super) duration_ms: Option<f64>,
    pub(super) input: String,
    pub(super) output: String,
    pub(super) error: Option<String>,
    pub(super) idempotency_key: Option<String>,
    pub(super) workflow_digest: String,
    pub(super) workflow_source: String,
    pub(super) workflow_file: String,
    pub(super) steps: Vec<String>,
}

impl NewRunRow {
    pub(super) fn encode(run: &NewRun<'_>) -> Result<NewRunRow, StoreError> {
        let record = run.record;
        let id = &record.id;
        Ok(NewRunRow {
            id: id.clone(),
            workflow: record.workflow.clone(),
            status: record.status.as_str(),
            created_at: record.created_at.clone(),
            started_at: record.started_at.clone(),
            finished_at: record.finished_at.clone(),
            duration_ms: record.duration_ms,
            input: encode_json(&record.input, || format!("run {id}: input"))?,
            output: encode_json(&record.output, || format!("run {id}: output"))?,
            error: record
                .error
                .as_ref()
                .map(|error| encode_json(error, || format!("run {id}: error")))
                .transpose()?,
            idempotency_key: run.idempotency_key.map(str::to_owned),
            workflow_digest: hex::encode(Sha256::digest(run.workflow_source.as_bytes())),
            workflow_source: run.workflow_source.to_owned(),
            workflow_file: run.workflow_file.to_owned(),
            steps: record
                .steps
                .iter()
                .enumerate()
                .map(|(index, step)| encode_json(step, || format!("run {id}: step {index}")))
                .collect::<Result<_, _>>()?,
        })
    }
}

pub(super) fn step_index(index: usize) -> Result<i64, StoreError> {
    i64::try_from(index).map_err(|_| {
        StoreError::Database(DatabaseError::new(format!(
            "step index {index} is too large"
        )))
    })
}

pub(super) fn encode_json<T: Serialize + ?Sized>(
    value: &T,
    what: impl FnOnce() -> String,
) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| {
        StoreError::Database(DatabaseError::with_source(
            format!("cannot encode {}: {e}", what()),
            e,
        ))
    })
}

pub(super) fn decode_json<T: DeserializeOwned>(
    text: &str,
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))
}

/// A page cursor: the last id of the page, hex-encoded (URL-safe, and
/// opaque so its form can change).
pub(super) fn encode_cursor(last_id: &str) -> String {
    hex::encode(last_id)
}

pub(super) fn decode_cursor(cursor: &str) -> Result<String, StoreError> {
    hex::decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| StoreError::BadCursor(cursor.to_owned()))
}

/// Why a `state_set` that takes a workflow's state from `before` to `after`
/// (keys, bytes) goes past `quota`; `None` when it may. What does not grow
/// the state always may, so a lowered quota still lets it shrink.
pub(super) fn over_quota(
    quota: StateQuota,
    workflow: &str,
    key: &str,
    (keys, bytes): (u64, u64),
    (after_keys, after_bytes): (u64, u64),
) -> Option<String> {
    if after_keys > quota.max_keys && after_keys > keys {
        return Some(format!(
            "the state of workflow `{workflow}` holds {keys} keys, the most it may \
             (state_max_keys); delete keys or raise the limit"
        ));
    }
    if after_bytes > quota.max_bytes && after_bytes > bytes {
        return Some(format!(
            "setting `{key}` would take the state of workflow `{workflow}` to \
             {after_bytes} bytes, more than the {} it may keep (state_max_bytes); \
             delete keys or raise the limit",
            quota.max_bytes
        ));
    }
    None
}
