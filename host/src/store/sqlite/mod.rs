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
//! Files: `writer` (the group commit), `schema` (migrations and connection
//! setup), `tests`; here the store itself, its reads and the row encodings.

mod schema;
#[cfg(test)]
mod tests;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::rows::{
    FinishedRow, ListParam, NewRunRow, RUN_COLUMN_COUNT, RUN_COLUMNS, RunListing, decode_json,
    decode_pins, encode_json, parent_ref, state_after_set, step_index, where_all,
};
use super::{
    Commit, Created, DatabaseError, ItemRecord, LINGER, NewRun, PinnedWorkflows, Queued, RunPage,
    RunQuery, RunWorkflow, Spread, StateQuota, Store, StoreError, StoredItems, UnfinishedRun,
    WorkflowStats, WorkflowText, stats,
};
use crate::record::{RunRecord, RunStatus, StepRecord};
use schema::{configure_writer, migrate};
use writer::{Message, WriteCommand, Written, writer_loop};

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

/// The most commands one transaction takes: enough to share a commit among
/// many writers, few enough that the first of them does not wait long.
const MAX_BATCH: usize = 256;
/// How long a connection waits for a lock another process holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Read connections opened up front, and the most kept idle.
const READERS_AT_OPEN: usize = 2;
const MAX_IDLE_READERS: usize = 4;
/// Prepared statements kept per connection (`list_runs` alone has 16 shapes).
const STATEMENT_CACHE: usize = 64;
/// After a checkpoint the WAL file is truncated to this size.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

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
        let in_file = |e: rusqlite::Error| {
            StoreError::Database(DatabaseError::with_source(
                format!("{}: {e}", path.display()),
                e,
            ))
        };
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
            .map_err(|e| {
                StoreError::Database(DatabaseError::with_source(
                    format!("cannot start the writer thread: {e}"),
                    e,
                ))
            })?;
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
                Queued::new(async move { commit.await.map(drop) })
            }
            Err(err) => {
                tracing::error!(error = %err, "a store write could not be queued");
                Queued::new(std::future::ready(Err(err)))
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
                .map_err(|e| {
                    StoreError::Database(DatabaseError::with_source(
                        format!("a read did not finish: {e}"),
                        e,
                    ))
                })?
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

/// The SQL of a page of `list_runs`. With a parent, the parent's index,
/// named: a run's children are few, but SQLite, which plans without
/// statistics, would rather take the index of workflow and status for a
/// query that filters on those too (two columns matched beat one), and
/// that index may hold most of the table.
fn run_listing(query: &RunQuery) -> Result<RunListing, StoreError> {
    RunListing::new(
        query,
        |n| format!("?{n}"),
        |filters| {
            let table = if query.parent.is_some() {
                "runs INDEXED BY runs_by_parent"
            } else {
                "runs"
            };
            let conditions = filters
                .equal
                .iter()
                .map(|(column, value)| format!("{column} = {value}"))
                .chain(filters.before.iter().map(|id| format!("id < {id}")));
            format!(
                "SELECT {RUN_COLUMNS} FROM {table}{} ORDER BY id DESC LIMIT {}",
                where_all(conditions),
                filters.limit
            )
        },
    )
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
                let mut insert_source = conn.prepare_cached(
                    "INSERT INTO workflow_sources (digest, source) VALUES (?1, ?2)
                     ON CONFLICT DO NOTHING",
                )?;
                insert_source.execute((&row.workflow_digest, &row.workflow_source))?;
                for (digest, source) in &row.pin_sources {
                    insert_source.execute((digest, source))?;
                }
                conn.prepare_cached(
                    "INSERT INTO runs (id, workflow, status, created_at, started_at, finished_at,
                         duration_ms, input, output, error, idempotency_key, workflow_digest,
                         workflow_file, retry_of, rerun_of, parent_run, parent_step, parent_item,
                         pins)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                         ?16, ?17, ?18, ?19)",
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
                    row.retry_of,
                    row.rerun_of,
                    row.parent_run,
                    row.parent_step,
                    row.parent_item,
                    row.pins,
                ])?;
                let mut insert_step = conn.prepare_cached(
                    "INSERT INTO steps (run_id, idx, record) VALUES (?1, ?2, ?3)",
                )?;
                for (index, step) in row.steps.iter().enumerate() {
                    insert_step.execute((&row.id, step_index(index)?, step))?;
                }
                let mut insert_item = conn.prepare_cached(
                    "INSERT INTO step_items (run_id, idx, position, record) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for (index, position, item) in &row.items {
                    insert_item.execute((&row.id, index, position, item))?;
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

    async fn run_workflow(&self, id: &str) -> Result<Option<RunWorkflow>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let found: Option<(String, String, Option<String>)> = conn
                .prepare_cached(
                    "SELECT source, workflow_file, pins
                     FROM runs JOIN workflow_sources ON digest = workflow_digest WHERE id = ?1",
                )?
                .query_row([&id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .optional()?;
            let Some((source, file, pins)) = found else {
                return Ok(None);
            };
            let mut source_of =
                conn.prepare_cached("SELECT source FROM workflow_sources WHERE digest = ?1")?;
            let mut pinned = PinnedWorkflows::new();
            for (name, pin) in decode_pins(&id, pins.as_deref())? {
                let source: String = source_of
                    .query_row([&pin.digest], |row| row.get(0))
                    .optional()?
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "run {id}: pinned workflow `{name}` ({}) is not stored",
                            pin.digest
                        ))
                    })?;
                pinned.insert(
                    name,
                    WorkflowText {
                        source,
                        file: pin.file,
                    },
                );
            }
            Ok(Some(RunWorkflow {
                text: WorkflowText { source, file },
                pins: pinned,
            }))
        })
        .await
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let listing = run_listing(query)?;
        self.read(move |conn| {
            let params = listing.params.iter().map(|param| match param {
                ListParam::Text(text) => SqlValue::Text(text.clone()),
                ListParam::Integer(n) => SqlValue::Integer(*n),
            });
            let mut statement = conn.prepare_cached(&listing.sql)?;
            let mut rows = statement.query(rusqlite::params_from_iter(params))?;
            let mut runs = Vec::new();
            while let Some(row) = rows.next()? {
                runs.push(run_from_row(row)?);
            }
            Ok(listing.page(runs))
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
        let FinishedRow {
            id,
            status,
            output,
            error,
            started_at,
            finished_at,
            duration_ms,
            steps,
        } = FinishedRow::encode(record)?;
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

    async fn workflow_stats(
        &self,
        workflow: &str,
        since: &str,
    ) -> Result<WorkflowStats, StoreError> {
        let (workflow, since) = (workflow.to_owned(), since.to_owned());
        self.read(move |conn| {
            let tx = conn.transaction()?;
            let mut stats = tx.prepare_cached(&stats::SQLITE.runs())?.query_row(
                (&workflow, &since),
                |row| {
                    let count = |at: usize| -> rusqlite::Result<u64> {
                        Ok(u64::try_from(row.get::<_, i64>(at)?).unwrap_or(0))
                    };
                    Ok(WorkflowStats {
                        succeeded: count(0)?,
                        failed: count(1)?,
                        cancelled: count(2)?,
                        cycle_time_ms: Spread {
                            p50: row.get(3)?,
                            p95: row.get(4)?,
                            max: row.get(5)?,
                        },
                        steps: std::collections::BTreeMap::new(),
                    })
                },
            )?;
            let mut statement = tx.prepare_cached(&stats::SQLITE.steps())?;
            let mut rows = statement.query((&workflow, &since))?;
            while let Some(row) = rows.next()? {
                let mut values = [None; 9];
                for (at, value) in values.iter_mut().enumerate() {
                    *value = row.get(3 + at)?;
                }
                stats.steps.insert(
                    row.get(0)?,
                    stats::step_stats(row.get(1)?, row.get(2)?, values),
                );
            }
            Ok(stats)
        })
        .await
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
                    workflow_source: row.get(RUN_COLUMN_COUNT)?,
                    workflow_file: row.get(RUN_COLUMN_COUNT + 1)?,
                    items,
                    cancel_requested: false,
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
            state_after_set(quota, &workflow, &key, (keys, bytes), old, value.len())?;
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
        StoreError::Database(DatabaseError::with_source(e.to_string(), e))
    }
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
    let mut retries = conn.prepare_cached("SELECT id FROM runs WHERE retry_of = ?1 ORDER BY id")?;
    record.retries = retries
        .query_map([id], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
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
    let status: RunStatus = status
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("run {id}: unknown status {status:?}")))?;
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
        retry_of: row.get(10)?,
        rerun_of: row.get(11)?,
        retries: Vec::new(),
        parent: parent_ref(row.get(12)?, row.get(13)?, row.get(14)?),
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
            StoreError::Database(DatabaseError::new(format!("there is no run {run_id}")))
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
        Err(StoreError::Database(DatabaseError::new(format!(
            "there is no run {id}"
        ))))
    }
}
