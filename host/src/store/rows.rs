//! What both stores write and read alike: a new run encoded for its rows, JSON
//! columns, step indexes, page cursors and sizes.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::{DatabaseError, NewRun, StateQuota, StoreError};

/// `list_runs` page sizes.
pub(super) const DEFAULT_PAGE: usize = 50;
pub(super) const MAX_PAGE: usize = 1000;

/// The columns of `runs` a [`RunRecord`](crate::record::RunRecord) is read
/// from (without its steps and retries), in this order.
pub(super) const RUN_COLUMNS: &str = "id, workflow, status, input, output, error, created_at, \
     started_at, finished_at, duration_ms, retry_of, rerun_of, parent_run, parent_step, parent_item";
/// How many [`RUN_COLUMNS`] there are: where the columns a query selects
/// after them start.
pub(super) const RUN_COLUMN_COUNT: usize = 15;

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
    pub(super) retry_of: Option<String>,
    pub(super) rerun_of: Option<String>,
    pub(super) parent_run: Option<String>,
    pub(super) parent_step: Option<String>,
    pub(super) parent_item: Option<i64>,
    /// (step index, position, JSON `ItemRecord`).
    pub(super) items: Vec<(i64, i64, String)>,
    /// JSON `{ name: { digest, file } }` of the pinned workflows, if any.
    pub(super) pins: Option<String>,
    /// (digest, source) of each pinned workflow.
    pub(super) pin_sources: Vec<(String, String)>,
}

/// A pinned workflow as the `pins` column holds it.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct PinRow {
    pub(super) digest: String,
    pub(super) file: String,
}

/// The `pins` column of a run: name -> (digest, file); empty for none.
pub(super) fn decode_pins(
    id: &str,
    column: Option<&str>,
) -> Result<std::collections::BTreeMap<String, PinRow>, StoreError> {
    match column {
        None => Ok(std::collections::BTreeMap::new()),
        Some(text) => decode_json(text, || format!("run {id}: pins")),
    }
}

/// The sha256 of a workflow's text, hex: its key in `workflow_sources`.
pub(super) fn source_digest(source: &str) -> String {
    hex::encode(Sha256::digest(source.as_bytes()))
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
            workflow_digest: source_digest(run.workflow_source),
            workflow_source: run.workflow_source.to_owned(),
            workflow_file: run.workflow_file.to_owned(),
            steps: record
                .steps
                .iter()
                .enumerate()
                .map(|(index, step)| encode_json(step, || format!("run {id}: step {index}")))
                .collect::<Result<_, _>>()?,
            retry_of: record.retry_of.clone(),
            rerun_of: record.rerun_of.clone(),
            parent_run: record.parent.as_ref().map(|parent| parent.run.clone()),
            parent_step: record.parent.as_ref().map(|parent| parent.step.clone()),
            parent_item: record
                .parent
                .as_ref()
                .and_then(|parent| parent.item)
                .map(step_index)
                .transpose()?,
            items: run
                .items
                .iter()
                .map(|(&(index, position), item)| {
                    Ok((
                        step_index(index)?,
                        step_index(position)?,
                        encode_json(item, || format!("run {id}: step {index}: item {position}"))?,
                    ))
                })
                .collect::<Result<_, StoreError>>()?,
            pins: if run.pins.is_empty() {
                None
            } else {
                let rows: std::collections::BTreeMap<&str, PinRow> = run
                    .pins
                    .iter()
                    .map(|(name, text)| {
                        (
                            name.as_str(),
                            PinRow {
                                digest: source_digest(&text.source),
                                file: text.file.clone(),
                            },
                        )
                    })
                    .collect();
                Some(encode_json(&rows, || format!("run {id}: pins"))?)
            },
            pin_sources: run
                .pins
                .values()
                .map(|text| (source_digest(&text.source), text.source.clone()))
                .collect(),
        })
    }
}

/// A child run's parent from its three columns.
pub(super) fn parent_ref(
    run: Option<String>,
    step: Option<String>,
    item: Option<i64>,
) -> Option<crate::record::ParentRef> {
    Some(crate::record::ParentRef {
        run: run?,
        step: step?,
        item: item.and_then(|item| usize::try_from(item).ok()),
    })
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

/// A page of `list_runs`: its parameters, and its SQL as the store writes it
/// (the filters, newest first, one row more than the page: whether it comes
/// tells if there is a next).
pub(super) struct RunListing {
    /// `SELECT ... WHERE ... ORDER BY ... LIMIT <last parameter>`.
    pub(super) sql: String,
    pub(super) params: Vec<ListParam>,
    /// The page size asked for (0 means [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    pub(super) limit: usize,
}

/// A parameter of a [`RunListing`].
pub(super) enum ListParam {
    Text(String),
    Integer(i64),
}

/// What a store writes the SQL of a [`RunListing`] from, each value as the
/// placeholder of its parameter.
pub(super) struct ListFilters {
    /// `(column, value)`: `workflow`, `status`, `parent_run`, in this order,
    /// those the query filters on.
    pub(super) equal: Vec<(&'static str, String)>,
    /// Runs older than this id (a cursor's).
    pub(super) before: Option<String>,
    pub(super) limit: String,
}

impl RunListing {
    /// The page `query` asks for. `placeholder(n)` writes the n-th
    /// parameter in the store's dialect (`?1`, `$1`); `select` writes the
    /// statement that reads the page's runs, newest first.
    pub(super) fn new(
        query: &super::RunQuery,
        placeholder: fn(usize) -> String,
        select: impl FnOnce(&ListFilters) -> String,
    ) -> Result<RunListing, StoreError> {
        let limit = match query.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let mut params = Vec::new();
        let mut equal = Vec::new();
        let filters = [
            ("workflow", query.workflow.clone()),
            ("status", query.status.map(|s| s.as_str().to_owned())),
            ("parent_run", query.parent.clone()),
        ];
        for (column, value) in filters {
            if let Some(value) = value {
                params.push(ListParam::Text(value));
                equal.push((column, placeholder(params.len())));
            }
        }
        let before = match &query.cursor {
            Some(cursor) => {
                params.push(ListParam::Text(decode_cursor(cursor)?));
                Some(placeholder(params.len()))
            }
            None => None,
        };
        params.push(ListParam::Integer(limit as i64 + 1));
        let sql = select(&ListFilters {
            equal,
            before,
            limit: placeholder(params.len()),
        });
        Ok(RunListing { sql, params, limit })
    }

    /// The page of `runs` read (at most one more than the limit).
    pub(super) fn page(&self, mut runs: Vec<crate::record::RunRecord>) -> super::RunPage {
        let next_cursor = if runs.len() > self.limit {
            runs.truncate(self.limit);
            runs.last().map(|run| encode_cursor(&run.id))
        } else {
            None
        };
        super::RunPage { runs, next_cursor }
    }
}

/// ` WHERE a AND b ...` of `conditions`, or nothing without any.
pub(super) fn where_all(conditions: impl IntoIterator<Item = String>) -> String {
    let conditions: Vec<String> = conditions.into_iter().collect();
    if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    }
}

/// A finished run's columns and every step, encoded for `finish_run`.
pub(super) struct FinishedRow {
    pub(super) id: String,
    pub(super) status: &'static str,
    pub(super) output: String,
    pub(super) error: Option<String>,
    pub(super) started_at: Option<String>,
    pub(super) finished_at: Option<String>,
    pub(super) duration_ms: Option<f64>,
    pub(super) steps: Vec<(i64, String)>,
}

impl FinishedRow {
    pub(super) fn encode(record: &crate::record::RunRecord) -> Result<FinishedRow, StoreError> {
        let id = &record.id;
        Ok(FinishedRow {
            id: id.clone(),
            status: record.status.as_str(),
            output: encode_json(&record.output, || format!("run {id}: output"))?,
            error: record
                .error
                .as_ref()
                .map(|error| encode_json(error, || format!("run {id}: error")))
                .transpose()?,
            started_at: record.started_at.clone(),
            finished_at: record.finished_at.clone(),
            duration_ms: record.duration_ms,
            steps: record
                .steps
                .iter()
                .enumerate()
                .map(|(index, step)| {
                    let index = step_index(index)?;
                    Ok((
                        index,
                        encode_json(step, || format!("run {id}: step {index}"))?,
                    ))
                })
                .collect::<Result<_, StoreError>>()?,
        })
    }
}

/// What a `state_set` of `value_len` bytes under `key` takes a workflow's
/// state to, from its `usage` (keys, bytes, as stored) and the length of the
/// value it replaces (`None`: a new key); refused past `quota`.
pub(super) fn state_after_set(
    quota: StateQuota,
    workflow: &str,
    key: &str,
    usage: (i64, i64),
    old_len: Option<i64>,
    value_len: usize,
) -> Result<(u64, u64), StoreError> {
    let (keys, bytes) = (usage.0.max(0) as u64, usage.1.max(0) as u64);
    let after = match old_len {
        Some(old) => (
            keys,
            bytes - (old.max(0) as u64).min(bytes) + value_len as u64,
        ),
        None => (keys + 1, bytes + (key.len() + value_len) as u64),
    };
    match over_quota(quota, workflow, key, (keys, bytes), after) {
        Some(message) => Err(StoreError::StateFull(message)),
        None => Ok(after),
    }
}
