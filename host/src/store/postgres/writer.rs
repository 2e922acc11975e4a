//! A group-commit writer: one task on one connection takes every write
//! already queued (up to [`MAX_BATCH`]) and commits them in one transaction,
//! in the order they were queued (a step's later record wins). If the batch
//! fails, each of its writes is tried again in a transaction of its own, so
//! a write that fails fails alone. A [`Commit::Soon`] batch may wait up to the
//! linger for company, as SQLite's writer does. While the database cannot be
//! reached, a run's progress is held and tried again with backoff (the run
//! waits); new runs and plugin state fail at once with `Unavailable`.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool, Transaction};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

use super::{Label, pg_error, pipeline, unavailable};
use crate::store::rows::{FinishedRow, NewRunRow, state_after_set};
use crate::store::{Commit, Created, DatabaseError, OUTAGE_BACKOFF, StateQuota, StoreError};

/// The most writes one transaction takes.
const MAX_BATCH: usize = 256;

/// One write, as the store's methods prepared it.
///
/// A write of a run carries the `fence` of this node's claim on it: the
/// epoch it was claimed under, which the run must still have for the write
/// to land (`None`: this store is not a cluster's node, or does not hold the
/// run).
pub(super) enum Write {
    CreateRun {
        row: Box<NewRunRow>,
        /// The node incarnation that holds the run from the start.
        owner: Option<String>,
        /// The workflow's source is stored already (by an earlier run).
        source_stored: bool,
    },
    RunStarted {
        id: String,
        started_at: String,
        fence: Option<i64>,
    },
    SaveStep {
        run_id: String,
        index: i64,
        record: String,
        /// A finished `for_each` step's record: its items' rows are dropped.
        drop_items: bool,
        fence: Option<i64>,
    },
    SaveItem {
        run_id: String,
        index: i64,
        position: i64,
        record: String,
        fence: Option<i64>,
    },
    FinishRun {
        run: Box<FinishedRow>,
        fence: Option<i64>,
    },
    StateSet {
        workflow: String,
        key: String,
        value: Vec<u8>,
        quota: StateQuota,
    },
    StateDelete {
        workflow: String,
        key: String,
    },
}

/// What a write gives back.
pub(super) enum Written {
    Run(Created),
    Done,
}

pub(super) struct WriteCommand {
    pub(super) write: Write,
    pub(super) reply: oneshot::Sender<Result<Written, StoreError>>,
    pub(super) commit: Commit,
}

/// How long the writer waits before it tries the database again after it
/// was found unreachable.
const FIRST_BACKOFF: Duration = OUTAGE_BACKOFF.0;
const MAX_BACKOFF: Duration = OUTAGE_BACKOFF.1;

impl Write {
    /// The run a write of a run's progress is about, and its fence.
    pub(super) fn run_and_fence(&self) -> Option<(&str, Option<i64>)> {
        match self {
            Write::RunStarted { id, fence, .. } => Some((id, *fence)),
            Write::SaveStep { run_id, fence, .. } | Write::SaveItem { run_id, fence, .. } => {
                Some((run_id, *fence))
            }
            Write::FinishRun { run, fence } => Some((&run.id, *fence)),
            Write::CreateRun { .. } | Write::StateSet { .. } | Write::StateDelete { .. } => None,
        }
    }

    /// A write of plugin state (not of a run).
    pub(super) fn is_state(&self) -> bool {
        matches!(self, Write::StateSet { .. } | Write::StateDelete { .. })
    }

    /// What picks the writer: the run, or the workflow of plugin state.
    pub(super) fn shard_key(&self) -> &str {
        match self {
            Write::CreateRun { row, .. } => &row.id,
            Write::StateSet { workflow, .. } | Write::StateDelete { workflow, .. } => workflow,
            _ => self.run_and_fence().map_or("", |(id, _)| id),
        }
    }

    /// A write of a run's progress (the executor waits for it before it goes
    /// on): kept and tried again while the database is unreachable, so the
    /// run waits instead of losing what it did. Everything else (a new run,
    /// plugin state) fails at once: the API answers 503 to a new run, and
    /// the service tries plugin state again itself, within the step's
    /// timeout.
    fn waits_out_outages(&self) -> bool {
        matches!(
            self,
            Write::RunStarted { .. }
                | Write::SaveStep { .. }
                | Write::SaveItem { .. }
                | Write::FinishRun { .. }
        )
    }
}

/// Takes what is queued, commits it as one batch, answers, repeats; ends once
/// the store is dropped and the queue is empty.
///
/// While the database is unreachable the writes that wait out outages are
/// held, in their order, and tried again with a growing backoff; the others
/// queued meanwhile are answered `Unavailable` at once.
pub(super) async fn writer_loop(
    pool: Pool,
    label: Arc<Label>,
    mut inbox: mpsc::UnboundedReceiver<WriteCommand>,
    linger: Duration,
) {
    let mut conn: Option<Object> = None;
    let mut held: Vec<WriteCommand> = Vec::new();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut batch = std::mem::take(&mut held);
        if batch.is_empty() {
            match inbox.recv().await {
                Some(first) => batch.push(first),
                None => return,
            }
        }
        while batch.len() < MAX_BATCH {
            match inbox.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        let urgent = |batch: &[WriteCommand]| batch.iter().any(|c| c.commit == Commit::Now);
        if !urgent(&batch) {
            let deadline = tokio::time::Instant::now() + linger;
            while !urgent(&batch) && batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, inbox.recv()).await {
                    Ok(Some(command)) => batch.push(command),
                    // The deadline passed, or the store is gone.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        let Some(outage) = commit_batch(&pool, &label, &mut conn, batch, &mut held).await else {
            backoff = FIRST_BACKOFF;
            continue;
        };
        tracing::warn!(
            held = held.len(),
            retry_in = ?backoff,
            error = %outage,
            "the database is unreachable: runs wait for their writes, which are tried again"
        );
        let until = tokio::time::Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                command = inbox.recv() => match command {
                    Some(command) if command.write.waits_out_outages() => held.push(command),
                    Some(command) => answer(command.reply, Err(StoreError::Unavailable(outage.clone()))),
                    None => {
                        tracing::error!(
                            writes = held.len(),
                            "the store closed while the database was unreachable: \
                             these runs' last steps are not stored and run again where they resume"
                        );
                        return;
                    }
                },
            }
        }
    }
}

/// Commits `batch` in one transaction, or, if that fails, each write in its
/// own; answers each. When the database is unreachable the writes that wait
/// out outages go to `held` (in order) and the error is returned.
async fn commit_batch(
    pool: &Pool,
    label: &Label,
    conn: &mut Option<Object>,
    batch: Vec<WriteCommand>,
    held: &mut Vec<WriteCommand>,
) -> Option<DatabaseError> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = None;
        match pool.get().await {
            Ok(fresh) => *conn = Some(fresh),
            Err(e) => {
                let error = unavailable(label, e);
                hold_or_fail(batch, held, &error);
                return Some(error);
            }
        }
    }
    let client = conn.as_mut()?;
    let writes: Vec<&Write> = batch.iter().map(|command| &command.write).collect();
    match run(client, label, &writes).await {
        Ok(results) => {
            for (command, result) in batch.into_iter().zip(results) {
                answer(command.reply, result);
            }
            None
        }
        Err(StoreError::Unavailable(error)) => {
            *conn = None;
            hold_or_fail(batch, held, &error);
            Some(error)
        }
        Err(error) if batch.len() == 1 => {
            if let Some(command) = batch.into_iter().next() {
                answer(command.reply, Err(error));
            }
            None
        }
        Err(_) => {
            let mut outage = None;
            for command in batch {
                if outage.is_some() {
                    hold_or_fail(vec![command], held, outage.as_ref()?);
                    continue;
                }
                let result = run(client, label, &[&command.write])
                    .await
                    .and_then(|mut results| results.pop().unwrap_or(Ok(Written::Done)));
                match result {
                    Err(StoreError::Unavailable(error)) => {
                        hold_or_fail(vec![command], held, &error);
                        outage = Some(error);
                    }
                    result => answer(command.reply, result),
                }
            }
            if outage.is_some() {
                *conn = None;
            }
            outage
        }
    }
}

/// Holds the writes of `batch` that wait out outages; fails the others.
fn hold_or_fail(batch: Vec<WriteCommand>, held: &mut Vec<WriteCommand>, error: &DatabaseError) {
    for command in batch {
        if command.write.waits_out_outages() {
            held.push(command);
        } else {
            answer(command.reply, Err(StoreError::Unavailable(error.clone())));
        }
    }
}

fn answer(
    reply: oneshot::Sender<Result<Written, StoreError>>,
    result: Result<Written, StoreError>,
) {
    // Nobody waits for a write whose [`Queued`] was dropped (the executor's
    // writes it goes on from): its failure is logged here.
    match reply.send(result) {
        Err(Err(StoreError::Fenced(message))) => tracing::warn!("{message}"),
        Err(Err(err)) => tracing::error!(error = %err, "a store write nobody waited for failed"),
        _ => {}
    }
}

/// `writes` in one transaction: the writes of runs pipelined (each has its
/// own result: a fenced write changes nothing and the others commit), plugin
/// state one statement at a time, since its quota needs each answer before
/// the next statement. `Err`: the transaction failed as a whole and nothing
/// of it was committed.
async fn run(
    client: &mut Object,
    label: &Label,
    writes: &[&Write],
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let failed = |e| pg_error(label, "a write", e);
    let tx = client.transaction().await.map_err(failed)?;
    let mut results = pipeline::run(&tx, label, writes).await?;
    for (result, write) in results.iter_mut().zip(writes) {
        if write.is_state() {
            *result = Ok(apply_state(&tx, label, write).await?);
        }
    }
    tx.commit().await.map_err(failed)?;
    Ok(results)
}

async fn execute(
    tx: &Transaction<'_>,
    label: &Label,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let statement = tx
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_error(label, "a write", e))?;
    tx.execute(&statement, params)
        .await
        .map_err(|e| pg_error(label, "a write", e))
}

/// Run `id` is no longer this node's, which held it at `epoch`.
pub(super) fn fenced_error(id: &str, epoch: i64) -> StoreError {
    let why = if epoch < 0 {
        "this node no longer holds it".to_owned()
    } else {
        format!("this node held it at epoch {epoch}")
    };
    StoreError::Fenced(format!(
        "run {id} was taken over by another node after this node's lease ran out \
         ({why}): this node's late write is dropped"
    ))
}

/// The epoch of run `id`, if there is such a run.
pub(super) async fn epoch_of(
    tx: &Transaction<'_>,
    label: &Label,
    id: &str,
) -> Result<Option<i64>, StoreError> {
    let statement = tx
        .prepare_cached("SELECT epoch FROM runs WHERE id = $1")
        .await
        .map_err(|e| pg_error(label, "a write", e))?;
    let row = tx
        .query_opt(&statement, &[&id])
        .await
        .map_err(|e| pg_error(label, "a write", e))?;
    Ok(row.map(|row| row.get(0)))
}

pub(super) fn no_such_run(id: &str) -> StoreError {
    StoreError::Database(DatabaseError::new(format!("there is no run {id}")))
}

/// A write of plugin state, in `tx`.
async fn apply_state(
    tx: &Transaction<'_>,
    label: &Label,
    write: &Write,
) -> Result<Written, StoreError> {
    match write {
        Write::StateSet {
            workflow,
            key,
            value,
            quota,
        } => state_set(tx, label, workflow, key, value, *quota).await,
        Write::StateDelete { workflow, key } => {
            let statement = tx
                .prepare_cached(
                    "DELETE FROM state WHERE workflow = $1 AND key = $2
                     RETURNING octet_length(key) + octet_length(value)",
                )
                .await
                .map_err(|e| pg_error(label, "a write", e))?;
            let deleted = tx
                .query_opt(&statement, &[workflow, key])
                .await
                .map_err(|e| pg_error(label, "a write", e))?;
            if let Some(row) = deleted {
                let bytes: i32 = row.get(0);
                execute(
                    tx,
                    label,
                    "UPDATE state_usage SET keys = keys - 1, bytes = bytes - $2
                     WHERE workflow = $1",
                    &[workflow, &i64::from(bytes)],
                )
                .await?;
            }
            Ok(Written::Done)
        }
        _ => Ok(Written::Done),
    }
}

/// The answer to a new run whose idempotency key another run holds: that
/// run, as it is now.
pub(super) async fn create_run_existing(
    tx: &Transaction<'_>,
    label: &Label,
    row: &NewRunRow,
) -> Result<Written, StoreError> {
    {
        let statement = tx
            .prepare_cached("SELECT id FROM runs WHERE workflow = $1 AND idempotency_key = $2")
            .await
            .map_err(|e| pg_error(label, "a write", e))?;
        let earlier = tx
            .query_opt(&statement, &[&row.workflow, &row.idempotency_key])
            .await
            .map_err(|e| pg_error(label, "a write", e))?
            .map(|r| r.get::<_, String>(0));
        let Some(id) = earlier else {
            return Err(StoreError::Corrupt(format!(
                "run {}: its idempotency key conflicts with a run that cannot be found",
                row.id
            )));
        };
        let record = super::load_run(tx, label, &id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("run {id} vanished while being read")))?;
        Ok(Written::Run(Created::Existing(Box::new(record))))
    }
}

async fn state_set(
    tx: &Transaction<'_>,
    label: &Label,
    workflow: &str,
    key: &str,
    value: &[u8],
    quota: StateQuota,
) -> Result<Written, StoreError> {
    let failed = |e| pg_error(label, "a write", e);
    // The usage row, locked: one workflow's sets and deletes on any node
    // take their turn here, so the quota holds across nodes.
    execute(
        tx,
        label,
        "INSERT INTO state_usage (workflow, keys, bytes) VALUES ($1, 0, 0) ON CONFLICT DO NOTHING",
        &[&workflow],
    )
    .await?;
    let usage = tx
        .prepare_cached("SELECT keys, bytes FROM state_usage WHERE workflow = $1 FOR UPDATE")
        .await
        .map_err(failed)?;
    let row = tx.query_one(&usage, &[&workflow]).await.map_err(failed)?;
    let (keys, bytes): (i64, i64) = (row.get(0), row.get(1));
    let old = tx
        .prepare_cached("SELECT octet_length(value) FROM state WHERE workflow = $1 AND key = $2")
        .await
        .map_err(failed)?;
    let old: Option<i32> = tx
        .query_opt(&old, &[&workflow, &key])
        .await
        .map_err(failed)?
        .map(|row| row.get(0));
    let (after_keys, after_bytes) = state_after_set(
        quota,
        workflow,
        key,
        (keys, bytes),
        old.map(i64::from),
        value.len(),
    )?;
    execute(
        tx,
        label,
        "INSERT INTO state (workflow, key, value) VALUES ($1, $2, $3)
         ON CONFLICT (workflow, key) DO UPDATE SET value = excluded.value",
        &[&workflow, &key, &value],
    )
    .await?;
    execute(
        tx,
        label,
        "UPDATE state_usage SET keys = $2, bytes = $3 WHERE workflow = $1",
        &[&workflow, &(after_keys as i64), &(after_bytes as i64)],
    )
    .await?;
    Ok(Written::Done)
}

impl Written {
    pub(super) fn created(self) -> Result<Created, StoreError> {
        match self {
            Written::Run(created) => Ok(created),
            Written::Done => Err(StoreError::Database(DatabaseError::new(
                "the writer answered create_run with nothing",
            ))),
        }
    }
}
