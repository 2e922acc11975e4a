//! The embedded store: one SQLite file in the data dir, in WAL mode.
//!
//! Writes go through one writer thread that owns the only read-write
//! connection. It takes every command already queued (up to [`MAX_BATCH`]) and
//! runs them in one transaction, a group commit: many concurrent runs pay for
//! one commit (and, with [`Durability::Fsync`], one fsync) instead of one each.
//! Each command runs under its own savepoint, so a command that fails fails
//! alone. A caller's future resolves only after the commit that holds its
//! write.
//!
//! Reads use a small pool of read-only connections on tokio's blocking pool.
//! In WAL mode a reader sees the last commit and never waits for the writer.
//!
//! The schema is [`MIGRATIONS`], applied in order and counted in
//! `PRAGMA user_version`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::{
    Commit, Created, ItemRecord, LINGER, NewRun, Queued, RunPage, RunQuery, StateQuota, Store,
    StoreError, StoredItems, UnfinishedRun,
};
use crate::record::{RunRecord, RunStatus, StepRecord};

/// When a commit is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// A commit survives a killed process, not a power loss
    /// (`synchronous=NORMAL`: the WAL is synced at checkpoints only).
    #[default]
    Normal,
    /// A commit survives a power loss too (`synchronous=FULL`: the WAL is
    /// synced at every commit, which group commit shares among many writes).
    Fsync,
}

/// Schema versions, oldest first. `PRAGMA user_version` counts those applied.
/// Append only: a released migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: runs, steps, workflow sources, plugin state.
    "
    -- The workflow text each run was planned from, once per distinct text.
    CREATE TABLE workflow_sources (
        digest TEXT PRIMARY KEY NOT NULL,   -- sha256 of source, hex
        source TEXT NOT NULL
    ) STRICT;

    CREATE TABLE runs (
        id              TEXT PRIMARY KEY NOT NULL,  -- UUIDv7: sorts by creation time
        workflow        TEXT NOT NULL,
        status          TEXT NOT NULL,              -- queued, running, succeeded, failed, cancelled
        created_at      TEXT NOT NULL,
        started_at      TEXT,
        finished_at     TEXT,
        duration_ms     REAL,
        input           TEXT NOT NULL,              -- JSON
        output          TEXT NOT NULL,              -- JSON
        error           TEXT,                       -- JSON RunError
        idempotency_key TEXT,
        workflow_digest TEXT NOT NULL REFERENCES workflow_sources (digest),
        workflow_file   TEXT NOT NULL
    ) STRICT;
    CREATE INDEX runs_by_workflow ON runs (workflow, id);
    CREATE INDEX runs_by_status ON runs (status, id);
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (workflow, idempotency_key)
        WHERE idempotency_key IS NOT NULL;

    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx    INTEGER NOT NULL,                    -- position in the workflow's step order
        record TEXT NOT NULL,                       -- JSON StepRecord, attempts included
        PRIMARY KEY (run_id, idx)
    ) STRICT;

    CREATE TABLE state (
        workflow TEXT NOT NULL,
        key      TEXT NOT NULL,
        value    BLOB NOT NULL,
        PRIMARY KEY (workflow, key)
    ) STRICT;
    ",
    // 2: the finished items of running `for_each` steps.
    "
    CREATE TABLE step_items (
        run_id   TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx      INTEGER NOT NULL,                  -- the step's position in step order
        position INTEGER NOT NULL,                  -- the item's position in `for_each`
        record   TEXT NOT NULL,                     -- JSON ItemRecord
        PRIMARY KEY (run_id, idx, position)
    ) STRICT;
    ",
    // 3: how much state each workflow keeps, kept up to date by triggers, so
    // the quota check costs one row read.
    "
    CREATE TABLE state_usage (
        workflow TEXT PRIMARY KEY NOT NULL,
        keys     INTEGER NOT NULL,
        bytes    INTEGER NOT NULL                   -- of keys and values
    ) STRICT;
    INSERT INTO state_usage (workflow, keys, bytes)
        SELECT workflow, count(*), sum(length(CAST(key AS BLOB)) + length(value))
        FROM state GROUP BY workflow;
    CREATE TRIGGER state_inserted AFTER INSERT ON state BEGIN
        INSERT INTO state_usage (workflow, keys, bytes)
            VALUES (new.workflow, 1, length(CAST(new.key AS BLOB)) + length(new.value))
            ON CONFLICT (workflow) DO UPDATE SET keys = keys + 1, bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER state_updated AFTER UPDATE OF value ON state BEGIN
        UPDATE state_usage SET bytes = bytes - length(old.value) + length(new.value)
            WHERE workflow = new.workflow;
    END;
    CREATE TRIGGER state_deleted AFTER DELETE ON state BEGIN
        UPDATE state_usage
            SET keys = keys - 1, bytes = bytes - length(CAST(old.key AS BLOB)) - length(old.value)
            WHERE workflow = old.workflow;
    END;
    ",
];

/// The most commands one transaction takes: enough to share a commit among
/// many writers, few enough that the first of them does not wait long.
const MAX_BATCH: usize = 256;
/// How long a connection waits for a lock another process holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections opened up front, and the most kept idle.
const READERS_AT_OPEN: usize = 2;
const MAX_IDLE_READERS: usize = 4;
/// Prepared statements kept per connection (`list_runs` alone has 8 shapes).
const STATEMENT_CACHE: usize = 64;
/// After a checkpoint the WAL file is truncated to this size.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// `list_runs` page sizes.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 1000;

/// Columns of `runs` that make a [`RunRecord`] (without steps), in the order
/// [`run_from_row`] reads them.
const RUN_COLUMNS: &str =
    "id, workflow, status, input, output, error, created_at, started_at, finished_at, duration_ms";

/// The SQLite [`Store`].
pub struct SqliteStore {
    /// `None` for an in-memory store.
    path: Option<PathBuf>,
    /// `None` only while dropping: closing it stops the writer.
    inbox: Option<mpsc::Sender<Message>>,
    writer: Option<JoinHandle<()>>,
    /// `None` for an in-memory store, whose only connection is the writer's:
    /// reads then queue behind writes.
    readers: Option<Arc<ReaderPool>>,
    state_quota: StateQuota,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date. The directory must exist.
    pub fn open(path: &Path, durability: Durability) -> Result<SqliteStore, StoreError> {
        let in_file = |e: rusqlite::Error| StoreError::Database(format!("{}: {e}", path.display()));
        let mut conn = Connection::open(path).map_err(in_file)?;
        let name = path.display().to_string();
        configure_writer(&conn, durability, true, &name)?;
        migrate(&mut conn, &name)?;
        let readers = Arc::new(ReaderPool {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        });
        for _ in 0..READERS_AT_OPEN {
            let reader = readers.open().map_err(in_file)?;
            readers.give_back(reader);
        }
        Self::start(conn, Some(path.to_owned()), Some(readers))
    }

    /// A private database in memory, gone when the store is dropped: for
    /// tests and one-shot `trellis run`. Reads and writes share one connection.
    pub fn open_in_memory() -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open_in_memory()?;
        configure_writer(&conn, Durability::Normal, false, ":memory:")?;
        migrate(&mut conn, ":memory:")?;
        Self::start(conn, None, None)
    }

    fn start(
        conn: Connection,
        path: Option<PathBuf>,
        readers: Option<Arc<ReaderPool>>,
    ) -> Result<SqliteStore, StoreError> {
        let (inbox, messages) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("trellis-store-writer".into())
            .spawn(move || writer_loop(conn, messages, LINGER))
            .map_err(|e| StoreError::Database(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            path,
            inbox: Some(inbox),
            writer: Some(writer),
            readers,
            state_quota: StateQuota::default(),
        })
    }

    /// The most state a workflow may keep (default: [`StateQuota::default`]).
    pub fn with_state_quota(mut self, quota: StateQuota) -> SqliteStore {
        self.state_quota = quota;
        self
    }

    /// Queues a write and waits for the commit that holds it.
    async fn write(
        &self,
        op: impl FnOnce(&Connection) -> Result<Written, StoreError> + Send + 'static,
    ) -> Result<Written, StoreError> {
        self.queue(op, Commit::Now).await
    }

    /// Queues a write now; the future resolves once its commit is done.
    fn queue(
        &self,
        op: impl FnOnce(&Connection) -> Result<Written, StoreError> + Send + 'static,
        commit: Commit,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Message::Write(WriteCommand {
            op: Box::new(op),
            reply,
            commit,
        }));
        async move {
            sent?;
            answer.await.map_err(|_| StoreError::Closed)?
        }
    }

    /// [`Self::queue`] as a [`Queued`]; `prepared` failing fails it at once.
    fn queued(
        &self,
        prepared: Result<
            impl FnOnce(&Connection) -> Result<Written, StoreError> + Send + 'static,
            StoreError,
        >,
        commit: Commit,
    ) -> Queued {
        match prepared {
            Ok(op) => {
                let commit = self.queue(op, commit);
                Box::pin(async move { commit.await.map(drop) })
            }
            Err(err) => {
                tracing::error!(error = %err, "a store write could not be queued");
                Box::pin(std::future::ready(Err(err)))
            }
        }
    }

    /// Runs `read` on a read connection, off the async workers.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        match &self.readers {
            Some(pool) => {
                let pool = Arc::clone(pool);
                tokio::task::spawn_blocking(move || {
                    let mut conn = pool.take()?;
                    let result = read(&mut conn);
                    pool.give_back(conn);
                    result
                })
                .await
                .map_err(|e| StoreError::Database(format!("a read did not finish: {e}")))?
            }
            None => {
                let (reply, answer) = oneshot::channel();
                self.send(Message::Read(Box::new(move |conn| {
                    let _ = reply.send(read(conn));
                })))?;
                answer.await.map_err(|_| StoreError::Closed)?
            }
        }
    }

    fn send(&self, message: Message) -> Result<(), StoreError> {
        self.inbox
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(message)
            .map_err(|_| StoreError::Closed)
    }
}

impl Drop for SqliteStore {
    /// Closes the queue and waits for the writer to commit what it holds.
    fn drop(&mut self) {
        self.inbox = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_run(&self, run: NewRun<'_>) -> Result<Created, StoreError> {
        let row = NewRunRow::encode(&run)?;
        let written = self
            .write(move |conn| {
                if let Some(key) = &row.idempotency_key {
                    let earlier: Option<String> = conn
                        .prepare_cached(
                            "SELECT id FROM runs WHERE workflow = ?1 AND idempotency_key = ?2",
                        )?
                        .query_row((&row.workflow, key), |r| r.get(0))
                        .optional()?;
                    if let Some(id) = earlier {
                        let record = load_run(conn, &id)?.ok_or_else(|| {
                            StoreError::Corrupt(format!("run {id} vanished while being read"))
                        })?;
                        return Ok(Written::Run(Created::Existing(Box::new(record))));
                    }
                }
                conn.prepare_cached(
                    "INSERT INTO workflow_sources (digest, source) VALUES (?1, ?2)
                     ON CONFLICT DO NOTHING",
                )?
                .execute((&row.workflow_digest, &row.workflow_source))?;
                conn.prepare_cached(
                    "INSERT INTO runs (id, workflow, status, created_at, started_at, finished_at,
                         duration_ms, input, output, error, idempotency_key, workflow_digest,
                         workflow_file)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
                )?
                .execute(rusqlite::params![
                    row.id,
                    row.workflow,
                    row.status,
                    row.created_at,
                    row.started_at,
                    row.finished_at,
                    row.duration_ms,
                    row.input,
                    row.output,
                    row.error,
                    row.idempotency_key,
                    row.workflow_digest,
                    row.workflow_file,
                ])?;
                let mut insert_step = conn.prepare_cached(
                    "INSERT INTO steps (run_id, idx, record) VALUES (?1, ?2, ?3)",
                )?;
                for (index, step) in row.steps.iter().enumerate() {
                    insert_step.execute((&row.id, step_index(index)?, step))?;
                }
                Ok(Written::Run(Created::New))
            })
            .await?;
        match written {
            Written::Run(created) => Ok(created),
            Written::Done => Err(StoreError::Database(
                "the writer answered create_run with nothing".into(),
            )),
        }
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            // One read transaction: the run and its steps from the same commit.
            let tx = conn.transaction()?;
            load_run(&tx, &id)
        })
        .await
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let limit = match query.limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let before = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let mut conditions = Vec::new();
        let mut params = Vec::new();
        if let Some(workflow) = &query.workflow {
            params.push(SqlValue::Text(workflow.clone()));
            conditions.push(format!("workflow = ?{}", params.len()));
        }
        if let Some(status) = query.status {
            params.push(SqlValue::Text(status_name(status).to_owned()));
            conditions.push(format!("status = ?{}", params.len()));
        }
        if let Some(before) = before {
            params.push(SqlValue::Text(before));
            conditions.push(format!("id < ?{}", params.len()));
        }
        // One more than asked: whether it comes tells if there is a next page.
        params.push(SqlValue::Integer(limit as i64 + 1));
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs {filter} ORDER BY id DESC LIMIT ?{}",
            params.len()
        );
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(&sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(params))?;
            let mut runs = Vec::new();
            while let Some(row) = rows.next()? {
                runs.push(run_from_row(row)?);
            }
            let next_cursor = if runs.len() > limit {
                runs.truncate(limit);
                runs.last().map(|run| encode_cursor(&run.id))
            } else {
                None
            };
            Ok(RunPage { runs, next_cursor })
        })
        .await
    }

    fn run_started(&self, id: &str, started_at: &str) -> Queued {
        let (id, started_at) = (id.to_owned(), started_at.to_owned());
        self.queued(
            Ok(move |conn: &Connection| {
                // A run that already finished (cancelled while it was being
                // started) stays finished: a restart must not resume it.
                let changed = conn
                    .prepare_cached(
                        "UPDATE runs SET status = 'running', started_at = ?2
                     WHERE id = ?1 AND status IN ('queued', 'running')",
                    )?
                    .execute((&id, &started_at))?;
                if changed == 0 {
                    require_run(conn, &id)?;
                }
                Ok(Written::Done)
            }),
            Commit::Soon,
        )
    }

    fn save_step(&self, run_id: &str, index: usize, step: &StepRecord, commit: Commit) -> Queued {
        let run_id = run_id.to_owned();
        // A finished step's record holds every item's attempts and output.
        let finished = step.status.is_done();
        let prepared = step_index(index).and_then(|index| {
            let record = encode_json(step, || format!("run {run_id}: step {index}"))?;
            Ok(move |conn: &Connection| {
                upsert_step(conn, &run_id, index, &record)?;
                if finished {
                    conn.prepare_cached("DELETE FROM step_items WHERE run_id = ?1 AND idx = ?2")?
                        .execute((&run_id, index))?;
                }
                Ok(Written::Done)
            })
        });
        self.queued(prepared, commit)
    }

    fn save_item(
        &self,
        run_id: &str,
        index: usize,
        position: usize,
        item: &ItemRecord,
        commit: Commit,
    ) -> Queued {
        let run_id = run_id.to_owned();
        let prepared = step_index(index).and_then(|index| {
            let position = step_index(position)?;
            let record = encode_json(item, || {
                format!("run {run_id}: step {index}: item {position}")
            })?;
            Ok(move |conn: &Connection| {
                conn.prepare_cached(
                    "INSERT INTO step_items (run_id, idx, position, record)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (run_id, idx, position) DO UPDATE SET record = excluded.record",
                )?
                .execute((&run_id, index, position, &record))
                .map_err(|e| no_such_run(e, &run_id))?;
                Ok(Written::Done)
            })
        });
        self.queued(prepared, commit)
    }

    async fn finish_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        let id = record.id.clone();
        let status = status_name(record.status);
        let output = encode_json(&record.output, || format!("run {id}: output"))?;
        let error = record
            .error
            .as_ref()
            .map(|error| encode_json(error, || format!("run {id}: error")))
            .transpose()?;
        let (started_at, finished_at, duration_ms) = (
            record.started_at.clone(),
            record.finished_at.clone(),
            record.duration_ms,
        );
        let steps = record
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
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.write(move |conn| {
            let changed = conn
                .prepare_cached(
                    "UPDATE runs SET status = ?2, output = ?3, error = ?4, started_at = ?5,
                         finished_at = ?6, duration_ms = ?7
                     WHERE id = ?1",
                )?
                .execute(rusqlite::params![
                    id,
                    status,
                    output,
                    error,
                    started_at,
                    finished_at,
                    duration_ms
                ])?;
            if changed == 0 {
                require_run(conn, &id)?;
            }
            for (index, step) in &steps {
                upsert_step(conn, &id, *index, step)?;
            }
            conn.prepare_cached("DELETE FROM step_items WHERE run_id = ?1")?
                .execute([&id])?;
            Ok(Written::Done)
        })
        .await
        .map(drop)
    }

    async fn unfinished_runs(&self) -> Result<Vec<UnfinishedRun>, StoreError> {
        self.read(|conn| {
            let tx = conn.transaction()?;
            let mut statement = tx.prepare_cached(&format!(
                "SELECT {RUN_COLUMNS}, source, workflow_file
                 FROM runs JOIN workflow_sources ON digest = workflow_digest
                 WHERE status IN ('queued', 'running')
                 ORDER BY id"
            ))?;
            let mut rows = statement.query(())?;
            let mut unfinished = Vec::new();
            while let Some(row) = rows.next()? {
                let mut record = run_from_row(row)?;
                record.steps = load_steps(&tx, &record.id)?;
                let items = load_items(&tx, &record.id)?;
                unfinished.push(UnfinishedRun {
                    record,
                    workflow_source: row.get(10)?,
                    workflow_file: row.get(11)?,
                    items,
                });
            }
            Ok(unfinished)
        })
        .await
    }

    async fn state_get(&self, workflow: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let (workflow, key) = (workflow.to_owned(), key.to_owned());
        self.read(move |conn| {
            Ok(conn
                .prepare_cached("SELECT value FROM state WHERE workflow = ?1 AND key = ?2")?
                .query_row((&workflow, &key), |row| row.get(0))
                .optional()?)
        })
        .await
    }

    async fn state_set(&self, workflow: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (workflow, key, value) = (workflow.to_owned(), key.to_owned(), value.to_owned());
        let quota = self.state_quota;
        self.write(move |conn| {
            let (keys, bytes): (i64, i64) = conn
                .prepare_cached("SELECT keys, bytes FROM state_usage WHERE workflow = ?1")?
                .query_row([&workflow], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?
                .unwrap_or((0, 0));
            let old: Option<i64> = conn
                .prepare_cached("SELECT length(value) FROM state WHERE workflow = ?1 AND key = ?2")?
                .query_row((&workflow, &key), |row| row.get(0))
                .optional()?;
            let (keys, bytes) = (keys.max(0) as u64, bytes.max(0) as u64);
            let (after_keys, after_bytes) = match old {
                Some(old) => (
                    keys,
                    bytes - (old.max(0) as u64).min(bytes) + value.len() as u64,
                ),
                None => (keys + 1, bytes + (key.len() + value.len()) as u64),
            };
            if after_keys > quota.max_keys && after_keys > keys {
                return Err(StoreError::StateFull(format!(
                    "the state of workflow `{workflow}` holds {keys} keys, the most it may \
                     (state_max_keys); delete keys or raise the limit"
                )));
            }
            if after_bytes > quota.max_bytes && after_bytes > bytes {
                return Err(StoreError::StateFull(format!(
                    "setting `{key}` would take the state of workflow `{workflow}` to \
                     {after_bytes} bytes, more than the {} it may keep (state_max_bytes); \
                     delete keys or raise the limit",
                    quota.max_bytes
                )));
            }
            conn.prepare_cached(
                "INSERT INTO state (workflow, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (workflow, key) DO UPDATE SET value = excluded.value",
            )?
            .execute((&workflow, &key, &value))?;
            Ok(Written::Done)
        })
        .await
        .map(drop)
    }

    async fn state_delete(&self, workflow: &str, key: &str) -> Result<(), StoreError> {
        let (workflow, key) = (workflow.to_owned(), key.to_owned());
        self.write(move |conn| {
            conn.prepare_cached("DELETE FROM state WHERE workflow = ?1 AND key = ?2")?
                .execute((&workflow, &key))?;
            Ok(Written::Done)
        })
        .await
        .map(drop)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

// ---- the writer -------------------------------------------------------------

/// What the writer thread is asked to do.
enum Message {
    Write(WriteCommand),
    /// A read of an in-memory store, which has no other connection. It
    /// answers by itself.
    Read(ReadOp),
}

/// A read run on the writer's connection.
type ReadOp = Box<dyn FnOnce(&mut Connection) + Send>;

/// The SQL of one write, run on the writer's connection.
type WriteOp = Box<dyn FnOnce(&Connection) -> Result<Written, StoreError> + Send>;

/// One write, run inside a batch's transaction under its own savepoint.
struct WriteCommand {
    op: WriteOp,
    /// Answered after the commit (or with the reason there was none).
    reply: oneshot::Sender<Result<Written, StoreError>>,
    commit: Commit,
}

/// What a write gives back.
enum Written {
    Run(Created),
    Done,
}

/// Takes what is queued, commits it as one batch, answers, repeats; ends once
/// the store is dropped and the queue is empty.
///
/// A batch of [`Commit::Soon`] writes alone (nobody waits for them) waits up
/// to `linger` ([`LINGER`]) for more: a finished step's write then shares its commit with
/// the next step's start, which the executor does wait for, instead of
/// committing just before it and making it wait for two commits in a row. A
/// [`Commit::Now`] write, a read or a full batch ends the wait at once.
fn writer_loop(mut conn: Connection, messages: mpsc::Receiver<Message>, linger: Duration) {
    while let Ok(first) = messages.recv() {
        let mut batch = Batch::default();
        batch.push(first);
        batch.take_queued(&messages);
        if !batch.urgent && !batch.full() {
            let deadline = std::time::Instant::now() + linger;
            while !batch.urgent && !batch.full() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match messages.recv_timeout(left) {
                    Ok(message) => {
                        batch.push(message);
                        batch.take_queued(&messages);
                    }
                    // The deadline passed, or the store is gone: commit what
                    // there is.
                    Err(_) => break,
                }
            }
        }
        tracing::trace!(
            writes = batch.writes.len(),
            reads = batch.reads.len(),
            "store batch"
        );
        commit_batch(&mut conn, batch.writes);
        // After the commit: a read queued behind a write sees it.
        for read in batch.reads {
            read(&mut conn);
        }
    }
}

/// What the writer takes off its queue for one commit.
#[derive(Default)]
struct Batch {
    writes: Vec<WriteCommand>,
    reads: Vec<ReadOp>,
    /// Someone waits: a [`Commit::Now`] write or a read.
    urgent: bool,
}

impl Batch {
    fn push(&mut self, message: Message) {
        match message {
            Message::Write(write) => {
                self.urgent |= write.commit == Commit::Now;
                self.writes.push(write);
            }
            Message::Read(read) => {
                self.urgent = true;
                self.reads.push(read);
            }
        }
    }

    fn full(&self) -> bool {
        self.writes.len() + self.reads.len() >= MAX_BATCH
    }

    /// Adds what is already queued, up to a full batch, without waiting.
    fn take_queued(&mut self, messages: &mpsc::Receiver<Message>) {
        while !self.full() {
            match messages.try_recv() {
                Ok(message) => self.push(message),
                Err(_) => break,
            }
        }
    }
}

/// Runs `writes` in as few transactions as possible (one, unless SQLite
/// abandons a transaction on an error) and answers each.
fn commit_batch(conn: &mut Connection, writes: Vec<WriteCommand>) {
    let mut writes = writes.into_iter().peekable();
    while writes.peek().is_some() {
        // IMMEDIATE: take the write lock now, so another process cannot make
        // the first write of the batch fail half way.
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let message = e.to_string();
                for write in writes {
                    let _ = write.reply.send(Err(StoreError::Database(message.clone())));
                }
                return;
            }
        };
        let mut done = Vec::new();
        let mut abandoned = None;
        for write in writes.by_ref() {
            let result = apply(&mut tx, write.op);
            // Some errors (disk full, I/O) make SQLite roll the whole
            // transaction back: the writes before this one are gone too.
            if tx.is_autocommit() {
                abandoned = Some(match &result {
                    Err(e) => e.to_string(),
                    Ok(_) => "the transaction ended unexpectedly".to_owned(),
                });
            }
            done.push((write.reply, result));
            if abandoned.is_some() {
                break;
            }
        }
        let failure = match abandoned {
            Some(reason) => Some(reason),
            None => tx.commit().err().map(|e| e.to_string()),
        };
        for (reply, result) in done {
            let result = match (&failure, result) {
                (Some(reason), Ok(_)) => Err(StoreError::Database(format!(
                    "the batch holding this write was rolled back: {reason}"
                ))),
                (_, result) => result,
            };
            // Nobody waits for a write whose [`Queued`] was dropped (the
            // executor's writes it goes on from): its failure is logged here.
            if let Err(Err(err)) = reply.send(result) {
                tracing::error!(error = %err, "a store write nobody waited for failed");
            }
        }
    }
}

/// Runs one write under a savepoint: kept if it succeeds, undone if not.
fn apply(tx: &mut rusqlite::Transaction<'_>, op: WriteOp) -> Result<Written, StoreError> {
    let savepoint = tx.savepoint()?;
    let written = op(&savepoint)?; // dropping the savepoint rolls it back
    savepoint.commit()?;
    Ok(written)
}

// ---- connections ------------------------------------------------------------

fn configure_writer(
    conn: &Connection,
    durability: Durability,
    wal: bool,
    name: &str,
) -> Result<(), StoreError> {
    let in_file = |e: rusqlite::Error| StoreError::Database(format!("{name}: {e}"));
    conn.busy_timeout(BUSY_TIMEOUT).map_err(in_file)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    if wal {
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))
            .map_err(in_file)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Database(format!(
                "{name}: cannot switch to WAL mode (the journal mode is {mode})"
            )));
        }
    }
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Fsync => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(in_file)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(in_file)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(in_file)?;
    Ok(())
}

/// Applies the migrations the database lacks, all in one transaction, so two
/// processes opening a new file at once do not both migrate it.
fn migrate(conn: &mut Connection, name: &str) -> Result<(), StoreError> {
    let in_file = |e: rusqlite::Error| StoreError::Database(format!("{name}: {e}"));
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(in_file)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(in_file)?;
    let known = MIGRATIONS.len();
    let applied = usize::try_from(version).unwrap_or(usize::MAX);
    if applied > known {
        return Err(StoreError::Database(format!(
            "{name} has schema version {version}, newer than the newest this trellis knows \
             ({known}): it was written by a newer trellis; use that one, or another data dir"
        )));
    }
    if applied == known {
        return Ok(());
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(migration).map_err(|e| {
            StoreError::Database(format!("{name}: schema migration {}: {e}", index + 1))
        })?;
    }
    tx.pragma_update(None, "user_version", known as i64)
        .map_err(in_file)?;
    tx.commit().map_err(in_file)
}

/// Idle read-only connections.
struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReaderPool {
    /// An idle connection, or a new one when all are busy: a read never
    /// waits for another read.
    fn take(&self) -> Result<Connection, StoreError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match idle {
            Some(conn) => Ok(conn),
            None => Ok(self.open()?),
        }
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(conn)
    }
}

// ---- rows -------------------------------------------------------------------

/// A new run, encoded for its rows before it goes to the writer (the JSON
/// and the digest cost CPU the writer thread should not spend).
struct NewRunRow {
    id: String,
    workflow: String,
    status: &'static str,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    duration_ms: Option<f64>,
    input: String,
    output: String,
    error: Option<String>,
    idempotency_key: Option<String>,
    workflow_digest: String,
    workflow_source: String,
    workflow_file: String,
    steps: Vec<String>,
}

impl NewRunRow {
    fn encode(run: &NewRun<'_>) -> Result<NewRunRow, StoreError> {
        let record = run.record;
        let id = &record.id;
        Ok(NewRunRow {
            id: id.clone(),
            workflow: record.workflow.clone(),
            status: status_name(record.status),
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

/// The run and its steps, or `None`. Call inside a transaction.
fn load_run(conn: &Connection, id: &str) -> Result<Option<RunRecord>, StoreError> {
    let mut statement =
        conn.prepare_cached(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"))?;
    let mut rows = statement.query([id])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    let mut record = run_from_row(row)?;
    record.steps = load_steps(conn, id)?;
    Ok(Some(record))
}

fn load_steps(conn: &Connection, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
    let mut statement =
        conn.prepare_cached("SELECT idx, record FROM steps WHERE run_id = ?1 ORDER BY idx")?;
    let mut rows = statement.query([run_id])?;
    let mut steps = Vec::new();
    while let Some(row) = rows.next()? {
        let index: i64 = row.get(0)?;
        steps.push(decode_json(text(row, 1)?, || {
            format!("run {run_id}: step {index}")
        })?);
    }
    Ok(steps)
}

fn load_items(conn: &Connection, run_id: &str) -> Result<StoredItems, StoreError> {
    let mut statement =
        conn.prepare_cached("SELECT idx, position, record FROM step_items WHERE run_id = ?1")?;
    let mut rows = statement.query([run_id])?;
    let mut items = StoredItems::new();
    while let Some(row) = rows.next()? {
        let (index, position): (i64, i64) = (row.get(0)?, row.get(1)?);
        let what = || format!("run {run_id}: step {index}: item {position}");
        let record = decode_json(text(row, 2)?, what)?;
        let (Ok(index), Ok(position)) = (usize::try_from(index), usize::try_from(position)) else {
            return Err(StoreError::Corrupt(format!("{}: negative index", what())));
        };
        items.insert((index, position), record);
    }
    Ok(items)
}

/// A [`RunRecord`] without steps from the [`RUN_COLUMNS`] of a row.
fn run_from_row(row: &Row<'_>) -> Result<RunRecord, StoreError> {
    let id: String = row.get(0)?;
    let status = text(row, 2)?;
    let status = parse_status(status)
        .ok_or_else(|| StoreError::Corrupt(format!("run {id}: unknown status {status:?}")))?;
    let input = decode_json(text(row, 3)?, || format!("run {id}: input"))?;
    let output = decode_json(text(row, 4)?, || format!("run {id}: output"))?;
    let error = match row.get_ref(5)?.as_str_or_null() {
        Ok(Some(error)) => Some(decode_json(error, || format!("run {id}: error"))?),
        Ok(None) => None,
        Err(e) => return Err(StoreError::Corrupt(format!("run {id}: error: {e}"))),
    };
    Ok(RunRecord {
        workflow: row.get(1)?,
        status,
        input,
        output,
        error,
        created_at: row.get(6)?,
        started_at: row.get(7)?,
        finished_at: row.get(8)?,
        duration_ms: row.get(9)?,
        steps: Vec::new(),
        id,
    })
}

/// A text column, borrowed (JSON columns can be large).
fn text<'r>(row: &'r Row<'_>, column: usize) -> Result<&'r str, StoreError> {
    row.get_ref(column)?
        .as_str()
        .map_err(|e| StoreError::Corrupt(format!("column {column}: {e}")))
}

fn upsert_step(
    conn: &Connection,
    run_id: &str,
    index: i64,
    record: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO steps (run_id, idx, record) VALUES (?1, ?2, ?3)
         ON CONFLICT (run_id, idx) DO UPDATE SET record = excluded.record",
    )?
    .execute((run_id, index, record))
    .map_err(|e| no_such_run(e, run_id))?;
    Ok(())
}

/// A foreign-key failure on `run_id` says the run is not there.
fn no_such_run(e: rusqlite::Error, run_id: &str) -> StoreError {
    match e.sqlite_error() {
        Some(error)
            if error.code == ErrorCode::ConstraintViolation
                && error.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY =>
        {
            StoreError::Database(format!("there is no run {run_id}"))
        }
        _ => e.into(),
    }
}

/// Fails unless the run exists.
fn require_run(conn: &Connection, id: &str) -> Result<(), StoreError> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")?
        .exists([id])?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::Database(format!("there is no run {id}")))
    }
}

fn step_index(index: usize) -> Result<i64, StoreError> {
    i64::try_from(index)
        .map_err(|_| StoreError::Database(format!("step index {index} is too large")))
}

fn encode_json<T: Serialize + ?Sized>(
    value: &T,
    what: impl FnOnce() -> String,
) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|e| StoreError::Database(format!("cannot encode {}: {e}", what())))
}

fn decode_json<T: DeserializeOwned>(
    text: &str,
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{}: {e}", what())))
}

fn status_name(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Queued => "queued",
        RunStatus::Running => "running",
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "cancelled",
    }
}

fn parse_status(name: &str) -> Option<RunStatus> {
    Some(match name {
        "queued" => RunStatus::Queued,
        "running" => RunStatus::Running,
        "succeeded" => RunStatus::Succeeded,
        "failed" => RunStatus::Failed,
        "cancelled" => RunStatus::Cancelled,
        _ => return None,
    })
}

/// A page cursor: the last id of the page, hex-encoded (URL-safe, and
/// opaque so its form can change).
fn encode_cursor(last_id: &str) -> String {
    hex::encode(last_id)
}

fn decode_cursor(cursor: &str) -> Result<String, StoreError> {
    hex::decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| StoreError::BadCursor(cursor.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::{Value, json};

    use super::*;
    use crate::record::{
        AttemptRecord, ErrorKind, ErrorRecord, LogLevel, LogLine, LogStream, Progress, RunError,
        StepStatus, new_run_id,
    };
    use crate::store::ItemOutcome;

    const SOURCE: &str = "name = \"orders\"\n[[step]]\nid = \"parse\"\nplugin = \"json\"\n";

    fn open(dir: &tempfile::TempDir) -> SqliteStore {
        SqliteStore::open(&dir.path().join("trellis.db"), Durability::Normal).unwrap()
    }

    fn pending_step(id: &str) -> StepRecord {
        StepRecord::pending(id, "json-transform")
    }

    /// A step that failed once and then succeeded, with every optional field set.
    fn finished_step(id: &str) -> StepRecord {
        let failed = AttemptRecord {
            attempt: 1,
            item: Some(0),
            status: StepStatus::Failed,
            error: Some(ErrorRecord {
                kind: ErrorKind::TaskError,
                message: "upstream said no".into(),
                retryable: true,
                details: Some(json!({"code": 503, "retry_after": [1, 2.5]})),
            }),
            started_at: "2026-01-02T03:04:05.006Z".into(),
            duration_ms: 1.25,
            fuel_consumed: 123_456,
            peak_memory: 1_114_112,
            logs: vec![LogLine {
                at_ms: 0.5,
                stream: LogStream::Stderr,
                level: LogLevel::Warn,
                message: "retrying — ünïcode".into(),
            }],
            log_bytes_dropped: 42,
            progress: Some(Progress {
                fraction: 0.5,
                message: "half way".into(),
            }),
        };
        let succeeded = AttemptRecord {
            attempt: 2,
            item: Some(0),
            status: StepStatus::Succeeded,
            error: None,
            started_at: "2026-01-02T03:04:05.106Z".into(),
            duration_ms: 2.0,
            fuel_consumed: 99,
            peak_memory: 65_536,
            logs: Vec::new(),
            log_bytes_dropped: 0,
            progress: None,
        };
        StepRecord {
            id: id.into(),
            plugin: "json-transform@1.0.0".into(),
            plugin_version: Some("1.0.0".into()),
            plugin_digest: Some("sha256:abcd".into()),
            status: StepStatus::Succeeded,
            output: json!([{"total": 120.5}]),
            error: None,
            started_at: Some("2026-01-02T03:04:05.006Z".into()),
            duration_ms: Some(101.0),
            items: Some(1),
            attempts: vec![failed, succeeded],
        }
    }

    fn queued_run(workflow: &str) -> RunRecord {
        RunRecord {
            id: new_run_id(),
            workflow: workflow.into(),
            status: RunStatus::Queued,
            input: json!({"items": [1, 2, 3], "customer": {"name": "Ada"}}),
            output: Value::Null,
            error: None,
            created_at: "2026-01-02T03:04:05.000Z".into(),
            started_at: None,
            finished_at: None,
            duration_ms: None,
            steps: vec![pending_step("parse"), pending_step("price")],
        }
    }

    fn new_run<'a>(record: &'a RunRecord, key: Option<&'a str>) -> NewRun<'a> {
        NewRun {
            record,
            workflow_source: SOURCE,
            workflow_file: "workflows/orders.toml",
            idempotency_key: key,
        }
    }

    async fn create(store: &SqliteStore, record: &RunRecord) {
        let created = store.create_run(new_run(record, None)).await.unwrap();
        assert!(matches!(created, Created::New));
    }

    #[tokio::test]
    async fn a_whole_record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut record = queued_run("orders");
        record.status = RunStatus::Failed;
        record.output = json!({"total": 120.5, "lines": ["a", "b"]});
        record.error = Some(RunError {
            step: Some("price".into()),
            kind: ErrorKind::FuelExhausted,
            message: "used 1000000 fuel".into(),
        });
        record.started_at = Some("2026-01-02T03:04:05.001Z".into());
        record.finished_at = Some("2026-01-02T03:04:06.001Z".into());
        record.duration_ms = Some(1000.25);
        record.steps = vec![finished_step("parse"), pending_step("price")];

        create(&store, &record).await;

        assert_eq!(store.get_run(&record.id).await.unwrap(), Some(record));
        assert_eq!(store.get_run(&new_run_id()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_idempotency_key_is_scoped_to_its_workflow() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let first = queued_run("orders");
        let again = queued_run("orders");
        let elsewhere = queued_run("billing");

        let created = store.create_run(new_run(&first, Some("k1"))).await.unwrap();
        assert!(matches!(created, Created::New));
        match store.create_run(new_run(&again, Some("k1"))).await.unwrap() {
            Created::Existing(earlier) => assert_eq!(*earlier, first),
            Created::New => panic!("a repeated key made a second run"),
        }
        assert_eq!(store.get_run(&again.id).await.unwrap(), None);
        let created = store
            .create_run(new_run(&elsewhere, Some("k1")))
            .await
            .unwrap();
        assert!(matches!(created, Created::New));
        // Runs without a key never collide.
        create(&store, &queued_run("orders")).await;
        create(&store, &queued_run("orders")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_with_one_key_make_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(&dir));
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let record = queued_run("orders");
                    let created = store
                        .create_run(new_run(&record, Some("same")))
                        .await
                        .unwrap();
                    (record.id, created)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut earlier_ids = HashSet::new();
        for task in tasks {
            match task.await.unwrap() {
                (id, Created::New) => winners.push(id),
                (_, Created::Existing(earlier)) => {
                    earlier_ids.insert(earlier.id);
                }
            }
        }
        assert_eq!(winners.len(), 1, "exactly one create wins");
        assert!(earlier_ids.iter().all(|id| *id == winners[0]));
        let page = store.list_runs(&RunQuery::default()).await.unwrap();
        assert_eq!(page.runs.len(), 1);
        assert_eq!(page.runs[0].id, winners[0]);
    }

    /// Every page of `query`, followed by cursor.
    async fn all_pages(store: &SqliteStore, mut query: RunQuery) -> (Vec<String>, usize) {
        let mut ids = Vec::new();
        let mut pages = 0;
        loop {
            let page = store.list_runs(&query).await.unwrap();
            pages += 1;
            let limit = if query.limit == 0 { 50 } else { query.limit };
            assert!(page.runs.len() <= limit);
            for run in &page.runs {
                assert!(run.steps.is_empty(), "pages carry no steps");
                ids.push(run.id.clone());
            }
            match page.next_cursor {
                Some(cursor) => query.cursor = Some(cursor),
                None => return (ids, pages),
            }
        }
    }

    #[tokio::test]
    async fn list_pages_newest_first_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut all = Vec::new();
        for i in 0..120 {
            let mut record = queued_run(if i % 2 == 0 { "even" } else { "odd" });
            if i % 3 == 0 {
                record.status = RunStatus::Succeeded;
            }
            create(&store, &record).await;
            all.push(record);
        }
        let newest_first = |keep: &dyn Fn(&RunRecord) -> bool| {
            let mut ids: Vec<String> = all
                .iter()
                .filter(|r| keep(r))
                .map(|r| r.id.clone())
                .collect();
            ids.sort_unstable_by(|a, b| b.cmp(a));
            ids
        };

        let (ids, pages) = all_pages(
            &store,
            RunQuery {
                limit: 7,
                ..RunQuery::default()
            },
        )
        .await;
        assert_eq!(ids, newest_first(&|_| true));
        assert_eq!(pages, 18); // 17 full pages of 7, then 1

        // 60 runs in pages of 10: the sixth page is full and the last.
        let (ids, pages) = all_pages(
            &store,
            RunQuery {
                workflow: Some("even".into()),
                limit: 10,
                ..RunQuery::default()
            },
        )
        .await;
        assert_eq!(ids, newest_first(&|r| r.workflow == "even"));
        assert_eq!(pages, 6);

        let (ids, _) = all_pages(
            &store,
            RunQuery {
                workflow: Some("odd".into()),
                status: Some(RunStatus::Succeeded),
                limit: 3,
                cursor: None,
            },
        )
        .await;
        let expected = newest_first(&|r| r.workflow == "odd" && r.status == RunStatus::Succeeded);
        assert_eq!(expected.len(), 20);
        assert_eq!(ids, expected);

        let (ids, _) = all_pages(
            &store,
            RunQuery {
                status: Some(RunStatus::Queued),
                limit: 1000,
                ..RunQuery::default()
            },
        )
        .await;
        assert_eq!(ids, newest_first(&|r| r.status == RunStatus::Queued));

        // Limit 0 means 50; more than 1000 is cut to 1000.
        let page = store.list_runs(&RunQuery::default()).await.unwrap();
        assert_eq!(page.runs.len(), 50);
        assert_eq!(page.runs[0], {
            let mut newest = all.iter().max_by(|a, b| a.id.cmp(&b.id)).unwrap().clone();
            newest.steps.clear();
            newest
        });
        let page = store
            .list_runs(&RunQuery {
                limit: 5000,
                ..RunQuery::default()
            })
            .await
            .unwrap();
        assert_eq!((page.runs.len(), page.next_cursor), (120, None));

        let page = store
            .list_runs(&RunQuery {
                workflow: Some("nobody".into()),
                ..RunQuery::default()
            })
            .await
            .unwrap();
        assert!(page.runs.is_empty());
        assert_eq!(page.next_cursor, None);
    }

    #[tokio::test]
    async fn a_cursor_we_did_not_issue_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        for bad in ["not-hex!", "abc", "", "ff"] {
            let result = store
                .list_runs(&RunQuery {
                    cursor: Some(bad.into()),
                    ..RunQuery::default()
                })
                .await;
            match result {
                Err(StoreError::BadCursor(cursor)) => assert_eq!(cursor, bad),
                other => panic!("cursor {bad:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn save_step_replaces_the_step_at_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut record = queued_run("orders");
        create(&store, &record).await;

        let mut running = pending_step("price");
        running.status = StepStatus::Running;
        running.started_at = Some("2026-01-02T03:04:05.000Z".into());
        store
            .save_step(&record.id, 1, &running, Commit::Now)
            .await
            .unwrap();
        record.steps[1] = running;
        assert_eq!(
            store.get_run(&record.id).await.unwrap().as_ref(),
            Some(&record)
        );

        let done = finished_step("price");
        store
            .save_step(&record.id, 1, &done, Commit::Now)
            .await
            .unwrap();
        record.steps[1] = done;
        assert_eq!(store.get_run(&record.id).await.unwrap(), Some(record));

        let missing = store
            .save_step(&new_run_id(), 0, &pending_step("x"), Commit::Now)
            .await;
        assert!(
            matches!(&missing, Err(StoreError::Database(m)) if m.starts_with("there is no run")),
            "{missing:?}"
        );
    }

    /// A save is queued when it is called: dropped unpolled, it still
    /// commits, and a write queued after it and waited for commits it too,
    /// in call order (the later record of a step wins).
    #[tokio::test]
    async fn saves_are_queued_when_called_and_commit_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut record = queued_run("orders");
        create(&store, &record).await;
        let mut running = pending_step("parse");
        running.status = StepStatus::Running;
        let done = finished_step("parse");
        let first = store.save_step(&record.id, 0, &running, Commit::Soon);
        let second = store.save_step(&record.id, 0, &done, Commit::Soon);
        drop(first);
        store
            .save_step(&record.id, 1, &done, Commit::Now)
            .await
            .unwrap();
        // `second` was never polled either.
        let record_id = record.id.clone();
        record.steps = vec![done.clone(), done];
        assert_eq!(store.get_run(&record.id).await.unwrap(), Some(record));
        second.await.unwrap();
        // A write that cannot even be prepared fails without being queued.
        let bad = store
            .save_step(&record_id, usize::MAX, &pending_step("x"), Commit::Now)
            .await;
        assert!(
            matches!(&bad, Err(StoreError::Database(m)) if m.contains("is too large")),
            "{bad:?}"
        );
    }

    /// The items of a running `for_each` step come back with the unfinished
    /// run; a newer record of an item replaces the older; the step's
    /// finished record drops them, and so does the run's end.
    #[tokio::test]
    async fn items_are_kept_until_their_step_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let record = queued_run("orders");
        create(&store, &record).await;
        store.run_started(&record.id, "t1").await.unwrap();
        let attempts = finished_step("price").attempts;
        let cut_short = ItemRecord {
            item: json!({"sku": "b"}),
            attempts: vec![AttemptRecord {
                status: StepStatus::Running,
                ..attempts[1].clone()
            }],
            outcome: None,
        };
        let done = ItemRecord {
            item: json!({"sku": "a"}),
            attempts: attempts.clone(),
            outcome: Some(ItemOutcome::Output(json!({"total": 1}))),
        };
        let failed = ItemRecord {
            item: json!("c"),
            attempts: attempts[..1].to_vec(),
            outcome: Some(ItemOutcome::Error(attempts[0].error.clone().unwrap())),
        };
        store
            .save_item(&record.id, 1, 0, &cut_short, Commit::Now)
            .await
            .unwrap();
        store
            .save_item(&record.id, 1, 0, &done, Commit::Now)
            .await
            .unwrap();
        store
            .save_item(&record.id, 1, 7, &failed, Commit::Now)
            .await
            .unwrap();
        store
            .save_item(&record.id, 0, 2, &cut_short, Commit::Now)
            .await
            .unwrap();

        let unfinished = store.unfinished_runs().await.unwrap();
        assert_eq!(unfinished.len(), 1);
        let items: Vec<_> = unfinished[0].items.iter().collect();
        assert_eq!(
            items,
            vec![(&(0, 2), &cut_short), (&(1, 0), &done), (&(1, 7), &failed)]
        );
        // Not part of the record: a step's record is its own.
        assert_eq!(unfinished[0].record.steps[1], pending_step("price"));

        // Saving step 0 running keeps its items; finished, drops them.
        let mut running = pending_step("parse");
        running.status = StepStatus::Running;
        store
            .save_step(&record.id, 0, &running, Commit::Now)
            .await
            .unwrap();
        let kept = store.unfinished_runs().await.unwrap().remove(0).items;
        assert_eq!(kept.len(), 3);
        store
            .save_step(&record.id, 0, &finished_step("parse"), Commit::Now)
            .await
            .unwrap();
        let kept = store.unfinished_runs().await.unwrap().remove(0).items;
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec![&(1, 0), &(1, 7)]);

        let mut finished = record.clone();
        finished.status = RunStatus::Failed;
        store.finish_run(&finished).await.unwrap();
        let conn = Connection::open(dir.path().join("trellis.db")).unwrap();
        let left: i64 = conn
            .query_row("SELECT count(*) FROM step_items", [], |row| row.get(0))
            .unwrap();
        assert_eq!(left, 0);

        let missing = store
            .save_item(&new_run_id(), 0, 0, &done, Commit::Now)
            .await;
        assert!(
            matches!(&missing, Err(StoreError::Database(m)) if m.starts_with("there is no run")),
            "{missing:?}"
        );
    }

    /// A database an older trellis wrote (schema 1) opens, gains the newer
    /// tables, and keeps its runs.
    #[tokio::test]
    async fn an_older_schema_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        let store = open(&dir);
        let record = queued_run("orders");
        create(&store, &record).await;
        drop(store);
        // Back to what schema 1 had: a run, and no `step_items`.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(UNDO_3).unwrap();
            conn.execute_batch("DROP TABLE step_items; PRAGMA user_version = 1;")
                .unwrap();
        }
        let store = open(&dir);
        assert_eq!(
            store.get_run(&record.id).await.unwrap(),
            Some(record.clone())
        );
        let item = ItemRecord {
            item: json!(1),
            attempts: Vec::new(),
            outcome: Some(ItemOutcome::Output(json!(2))),
        };
        store
            .save_item(&record.id, 0, 0, &item, Commit::Now)
            .await
            .unwrap();
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[tokio::test]
    async fn run_started_then_finish_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut record = queued_run("orders");
        create(&store, &record).await;

        store
            .run_started(&record.id, "2026-01-02T03:04:05.500Z")
            .await
            .unwrap();
        let started = store.get_run(&record.id).await.unwrap().unwrap();
        assert_eq!(started.status, RunStatus::Running);
        assert_eq!(
            started.started_at.as_deref(),
            Some("2026-01-02T03:04:05.500Z")
        );

        record.status = RunStatus::Succeeded;
        record.output = json!({"total": 3});
        record.started_at = started.started_at;
        record.finished_at = Some("2026-01-02T03:04:06.000Z".into());
        record.duration_ms = Some(500.0);
        record.steps = vec![finished_step("parse"), finished_step("price")];
        store.finish_run(&record).await.unwrap();
        assert_eq!(
            store.get_run(&record.id).await.unwrap().as_ref(),
            Some(&record)
        );

        // A late `run_started` does not bring a finished run back.
        store
            .run_started(&record.id, "2026-01-02T03:09:00.000Z")
            .await
            .unwrap();
        assert_eq!(store.get_run(&record.id).await.unwrap(), Some(record));

        let mut unknown = queued_run("orders");
        unknown.status = RunStatus::Failed;
        assert!(store.finish_run(&unknown).await.is_err());
        assert!(store.run_started(&unknown.id, "now").await.is_err());
    }

    #[tokio::test]
    async fn unfinished_runs_are_queued_or_running_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let queued = queued_run("orders");
        let running = queued_run("orders");
        let finished = queued_run("orders");
        let other = queued_run("billing");
        for record in [&queued, &running, &finished] {
            create(&store, record).await;
        }
        let other_source = "name = \"billing\"\n";
        let created = store
            .create_run(NewRun {
                record: &other,
                workflow_source: other_source,
                workflow_file: "billing.toml",
                idempotency_key: None,
            })
            .await
            .unwrap();
        assert!(matches!(created, Created::New));
        store.run_started(&running.id, "t1").await.unwrap();
        let step = finished_step("parse");
        store
            .save_step(&running.id, 0, &step, Commit::Now)
            .await
            .unwrap();
        let mut done = finished.clone();
        done.status = RunStatus::Cancelled;
        store.finish_run(&done).await.unwrap();

        let unfinished = store.unfinished_runs().await.unwrap();
        let ids: Vec<&str> = unfinished.iter().map(|u| u.record.id.as_str()).collect();
        let mut expected = vec![queued.id.as_str(), running.id.as_str(), other.id.as_str()];
        expected.sort_unstable();
        assert_eq!(ids, expected);
        for run in &unfinished {
            if run.record.id == other.id {
                assert_eq!(run.workflow_source, other_source);
                assert_eq!(run.workflow_file, "billing.toml");
                assert_eq!(run.record, other);
            } else {
                assert_eq!(run.workflow_source, SOURCE);
                assert_eq!(run.workflow_file, "workflows/orders.toml");
            }
            if run.record.id == running.id {
                assert_eq!(run.record.status, RunStatus::Running);
                assert_eq!(run.record.steps[0], step);
                assert_eq!(run.record.steps[1], pending_step("price"));
            }
        }
    }

    #[tokio::test]
    async fn state_is_scoped_by_workflow() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(store.state_get("a", "k").await.unwrap(), None);
        store.state_set("a", "k", b"one").await.unwrap();
        store.state_set("b", "k", &[0, 255, 7]).await.unwrap();
        assert_eq!(
            store.state_get("a", "k").await.unwrap(),
            Some(b"one".to_vec())
        );
        assert_eq!(
            store.state_get("b", "k").await.unwrap(),
            Some(vec![0, 255, 7])
        );
        store.state_set("a", "k", b"two").await.unwrap();
        assert_eq!(
            store.state_get("a", "k").await.unwrap(),
            Some(b"two".to_vec())
        );
        store.state_set("a", "empty", b"").await.unwrap();
        assert_eq!(
            store.state_get("a", "empty").await.unwrap(),
            Some(Vec::new())
        );
        store.state_delete("a", "k").await.unwrap();
        assert_eq!(store.state_get("a", "k").await.unwrap(), None);
        assert_eq!(
            store.state_get("b", "k").await.unwrap(),
            Some(vec![0, 255, 7])
        );
        // Deleting what is not there is not an error.
        store.state_delete("a", "k").await.unwrap();
    }

    /// Takes a database back to schema 2.
    const UNDO_3: &str = "DROP TRIGGER state_inserted; DROP TRIGGER state_updated;
        DROP TRIGGER state_deleted; DROP TABLE state_usage; PRAGMA user_version = 2;";

    fn usage(dir: &tempfile::TempDir, workflow: &str) -> Option<(i64, i64)> {
        Connection::open(dir.path().join("trellis.db"))
            .unwrap()
            .query_row(
                "SELECT keys, bytes FROM state_usage WHERE workflow = ?1",
                [workflow],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .unwrap()
    }

    fn full(result: Result<(), StoreError>) -> String {
        match result {
            Err(StoreError::StateFull(message)) => message,
            other => panic!("expected StateFull, got {other:?}"),
        }
    }

    /// A workflow's state stops at its quota of keys and of bytes; updates
    /// that do not grow it and deletes always go through; other workflows
    /// have their own quota.
    #[tokio::test]
    async fn state_stops_at_its_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).with_state_quota(StateQuota {
            max_keys: 2,
            max_bytes: 20,
        });
        store.state_set("w", "ab", b"12345").await.unwrap(); // 7 bytes
        store.state_set("w", "cd", b"12345").await.unwrap(); // 14
        assert_eq!(usage(&dir, "w"), Some((2, 14)));
        let message = full(store.state_set("w", "ef", b"").await);
        assert_eq!(
            message,
            "the state of workflow `w` holds 2 keys, the most it may (state_max_keys); \
             delete keys or raise the limit"
        );
        // An update adds no key; this one grows it to 20 bytes, the most.
        store.state_set("w", "ab", b"12345678901").await.unwrap();
        assert_eq!(usage(&dir, "w"), Some((2, 20)));
        let message = full(store.state_set("w", "cd", b"123456").await);
        assert_eq!(
            message,
            "setting `cd` would take the state of workflow `w` to 21 bytes, more than the 20 it \
             may keep (state_max_bytes); delete keys or raise the limit"
        );
        assert_eq!(
            store.state_get("w", "cd").await.unwrap(),
            Some(b"12345".to_vec()),
            "a refused set changes nothing"
        );
        store.state_set("other", "x", b"1").await.unwrap();
        store.state_set("other", "y", b"2").await.unwrap();
        assert_eq!(usage(&dir, "other"), Some((2, 4)));

        store.state_delete("w", "ab").await.unwrap();
        assert_eq!(usage(&dir, "w"), Some((1, 7)));
        store.state_set("w", "ef", b"").await.unwrap();
        assert_eq!(usage(&dir, "w"), Some((2, 9)));

        // A lower quota after the fact: what shrinks still goes through.
        drop(store);
        let store = open(&dir).with_state_quota(StateQuota {
            max_keys: 1,
            max_bytes: 4,
        });
        store.state_set("w", "cd", b"1").await.unwrap();
        assert_eq!(usage(&dir, "w"), Some((2, 5)));
        full(store.state_set("w", "ef", b"123").await);
        full(store.state_set("w", "gh", b"").await);
    }

    /// State written before the quota existed (schema 2) is counted when the
    /// store moves to schema 3, multi-byte keys in bytes.
    #[tokio::test]
    async fn existing_state_is_counted_by_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store.state_set("w", "ключ", b"123").await.unwrap(); // 8 + 3 bytes
        store.state_set("w", "k", &[0; 100]).await.unwrap(); // 1 + 100
        store.state_set("v", "k", b"").await.unwrap(); // 1
        drop(store);
        {
            let conn = Connection::open(dir.path().join("trellis.db")).unwrap();
            conn.execute_batch(UNDO_3).unwrap();
        }
        let store = open(&dir);
        assert_eq!(usage(&dir, "w"), Some((2, 112)));
        assert_eq!(usage(&dir, "v"), Some((1, 1)));
        store.state_set("v", "k", b"abc").await.unwrap();
        assert_eq!(usage(&dir, "v"), Some((1, 4)));
    }

    #[tokio::test]
    async fn data_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = queued_run("orders");
        record.steps[0] = finished_step("parse");
        {
            let store = open(&dir);
            create(&store, &record).await;
            store.state_set("orders", "count", b"1").await.unwrap();
        }
        let store = SqliteStore::open(&dir.path().join("trellis.db"), Durability::Fsync).unwrap();
        assert_eq!(
            store.get_run(&record.id).await.unwrap().as_ref(),
            Some(&record)
        );
        assert_eq!(
            store.state_get("orders", "count").await.unwrap(),
            Some(b"1".to_vec())
        );
        match store.create_run(new_run(&record, None)).await {
            Err(StoreError::Database(message)) => assert!(message.contains("UNIQUE"), "{message}"),
            other => panic!("a second run with the same id: {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_schema_version_is_recorded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trellis.db");
        drop(open(&dir));
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");

        // Opening again applies nothing and keeps the version.
        drop(open(&dir));
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        match SqliteStore::open(&path, Durability::Normal) {
            Err(StoreError::Database(message)) => {
                assert!(message.contains("schema version 99"), "{message}");
                assert!(message.contains("newer trellis"), "{message}");
            }
            other => panic!("opened a database from the future: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_missing_directory_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("trellis.db");
        match SqliteStore::open(&path, Durability::Normal) {
            Err(StoreError::Database(message)) => {
                assert!(message.contains("no-such-dir"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn corrupt_json_is_reported_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let record = queued_run("orders");
        create(&store, &record).await;
        let conn = Connection::open(dir.path().join("trellis.db")).unwrap();
        conn.execute(
            "UPDATE steps SET record = '{\"id\": 1' WHERE run_id = ?1 AND idx = 1",
            [&record.id],
        )
        .unwrap();
        match store.get_run(&record.id).await {
            Err(StoreError::Corrupt(message)) => {
                assert!(
                    message.contains(&format!("run {}: step 1", record.id)),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_in_memory_store_reads_its_writes() {
        let store = SqliteStore::open_in_memory().unwrap();
        let record = queued_run("orders");
        create(&store, &record).await;
        assert_eq!(
            store.get_run(&record.id).await.unwrap().as_ref(),
            Some(&record)
        );
        store.state_set("orders", "k", b"v").await.unwrap();
        assert_eq!(
            store.state_get("orders", "k").await.unwrap(),
            Some(b"v".to_vec())
        );
        let page = store.list_runs(&RunQuery::default()).await.unwrap();
        assert_eq!(page.runs.len(), 1);
        assert_eq!(store.unfinished_runs().await.unwrap().len(), 1);
    }

    /// Builds a write command whose reply the test can await.
    fn command(
        op: impl FnOnce(&Connection) -> Result<Written, StoreError> + Send + 'static,
    ) -> (WriteCommand, oneshot::Receiver<Result<Written, StoreError>>) {
        command_to(op, Commit::Now)
    }

    fn command_to(
        op: impl FnOnce(&Connection) -> Result<Written, StoreError> + Send + 'static,
        commit: Commit,
    ) -> (WriteCommand, oneshot::Receiver<Result<Written, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (
            WriteCommand {
                op: Box::new(op),
                reply,
                commit,
            },
            answer,
        )
    }

    /// A writer thread on a fresh database that lingers `linger`, and the
    /// number of commits it has made so far.
    fn counted_writer(
        dir: &tempfile::TempDir,
        linger: Duration,
    ) -> (
        mpsc::Sender<Message>,
        Arc<std::sync::atomic::AtomicUsize>,
        JoinHandle<()>,
    ) {
        let mut conn = Connection::open(dir.path().join("w.db")).unwrap();
        migrate(&mut conn, "w.db").unwrap();
        let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = commits.clone();
        conn.commit_hook(Some(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            false
        }))
        .unwrap();
        let (send, messages) = mpsc::channel();
        let thread = std::thread::spawn(move || writer_loop(conn, messages, linger));
        (send, commits, thread)
    }

    /// A write nobody waits for is held back until one somebody waits for
    /// comes (or a read): the two share one commit.
    #[test]
    fn a_write_nobody_waits_for_shares_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (send, commits, thread) = counted_writer(&dir, Duration::from_secs(60));
        let (soon, soon_answer) = command_to(set_state("soon"), Commit::Soon);
        send.send(Message::Write(soon)).unwrap();
        // Ample time for the writer to take it and commit, were it to.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 0);
        let (now, now_answer) = command(set_state("now"));
        send.send(Message::Write(now)).unwrap();
        assert!(matches!(
            now_answer.blocking_recv().unwrap(),
            Ok(Written::Done)
        ));
        assert!(matches!(
            soon_answer.blocking_recv().unwrap(),
            Ok(Written::Done)
        ));
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);

        // A read ends the wait too, and sees the write.
        let (soon, soon_answer) = command_to(set_state("soon-2"), Commit::Soon);
        send.send(Message::Write(soon)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (seen, saw) = std::sync::mpsc::channel();
        send.send(Message::Read(Box::new(move |conn: &mut Connection| {
            let keys: i64 = conn
                .query_row("SELECT count(*) FROM state", [], |row| row.get(0))
                .unwrap();
            seen.send(keys).unwrap();
        })))
        .unwrap();
        assert_eq!(saw.recv().unwrap(), 3);
        assert!(soon_answer.blocking_recv().unwrap().is_ok());
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 2);
        drop(send);
        thread.join().unwrap();
    }

    /// With nothing after it, a write nobody waits for still commits once
    /// the linger is over; when the store goes, at once.
    #[test]
    fn a_lone_write_nobody_waits_for_commits_after_the_linger() {
        let dir = tempfile::tempdir().unwrap();
        let linger = Duration::from_millis(50);
        let (send, commits, thread) = counted_writer(&dir, linger);
        let sent = std::time::Instant::now();
        let (soon, answer) = command_to(set_state("alone"), Commit::Soon);
        send.send(Message::Write(soon)).unwrap();
        assert!(answer.blocking_recv().unwrap().is_ok());
        assert!(sent.elapsed() >= linger, "{:?}", sent.elapsed());
        assert_eq!(commits.load(std::sync::atomic::Ordering::SeqCst), 1);

        let (send_2, commits_2, thread_2) = counted_writer(&dir, Duration::from_secs(60));
        let (soon, answer) = command_to(set_state("last"), Commit::Soon);
        send_2.send(Message::Write(soon)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(send_2);
        assert!(answer.blocking_recv().unwrap().is_ok());
        thread_2.join().unwrap();
        assert_eq!(commits_2.load(std::sync::atomic::Ordering::SeqCst), 1);
        drop(send);
        thread.join().unwrap();
    }

    fn set_state(key: &'static str) -> impl FnOnce(&Connection) -> Result<Written, StoreError> {
        move |conn| {
            conn.execute(
                "INSERT INTO state (workflow, key, value) VALUES ('w', ?1, x'00')",
                [key],
            )?;
            Ok(Written::Done)
        }
    }

    #[test]
    fn a_failing_write_fails_alone_in_its_batch() {
        let mut conn = Connection::open_in_memory().unwrap();
        configure_writer(&conn, Durability::Normal, false, ":memory:").unwrap();
        migrate(&mut conn, ":memory:").unwrap();
        let (first, first_answer) = command(set_state("first"));
        // Writes a row, then fails: its row must not stay.
        let (failing, failing_answer) = command(|conn| {
            set_state("half")(conn)?;
            conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(Written::Done)
        });
        let (last, last_answer) = command(set_state("last"));
        commit_batch(&mut conn, vec![first, failing, last]);

        assert!(matches!(
            first_answer.blocking_recv(),
            Ok(Ok(Written::Done))
        ));
        match failing_answer.blocking_recv() {
            Ok(Err(StoreError::Database(message))) => {
                assert!(message.contains("no_such_table"), "{message}")
            }
            _ => panic!("the failing write succeeded"),
        }
        assert!(matches!(last_answer.blocking_recv(), Ok(Ok(Written::Done))));
        let keys: Vec<String> = conn
            .prepare("SELECT key FROM state ORDER BY key")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(keys, ["first", "last"]);
        assert!(conn.is_autocommit(), "the batch is committed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_are_all_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(&dir));
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let record = queued_run(if i % 2 == 0 { "a" } else { "b" });
                    store.create_run(new_run(&record, None)).await.unwrap();
                    store
                        .save_step(&record.id, 0, &finished_step("parse"), Commit::Now)
                        .await
                        .unwrap();
                    record.id
                })
            })
            .collect();
        let mut ids = HashSet::new();
        for task in tasks {
            ids.insert(task.await.unwrap());
        }
        drop(store);
        let store = open(&dir);
        let page = store
            .list_runs(&RunQuery {
                limit: 1000,
                ..RunQuery::default()
            })
            .await
            .unwrap();
        let listed: HashSet<String> = page.runs.into_iter().map(|r| r.id).collect();
        assert_eq!(listed, ids);
        let any = ids.iter().next().unwrap();
        let run = store.get_run(any).await.unwrap().unwrap();
        assert_eq!(run.steps[0], finished_step("parse"));
    }
}
