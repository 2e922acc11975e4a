//! The scale-out store: PostgreSQL (13 or later), through `tokio-postgres`
//! with a `deadpool` pool.
//!
//! Writes go through writer tasks, each on a connection of its own, which
//! commit every write already queued in one transaction (a group commit, as
//! SQLite's writer does) in the order they were queued; a run's writes all
//! go to one writer. Reads take any pooled
//! connection; a read of several tables is one `REPEATABLE READ` snapshot.
//!
//! Files: `writer` (the group commit and every write's SQL), `pipeline`
//! (the writer's fast path: a batch's statements sent at once), `schema`
//! (migrations under an advisory lock); here the store, its reads and the
//! connection setup.

mod cluster;
mod pipeline;
mod schema;
mod tasks;
#[cfg(test)]
mod tests;
mod writer;

pub use cluster::{Listener, Renewal};
pub use tasks::{ClaimedTask, DONE_NOTE, TaskState};

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, NoTls, Row};

use super::rows::{
    FinishedRow, ListParam, NewRunRow, RunListing, decode_json, decode_pins, encode_json,
    parent_ref, step_index, where_all,
};
pub(super) use super::rows::{RUN_COLUMN_COUNT, RUN_COLUMNS};
use super::{
    Commit, Created, DatabaseError, ItemRecord, LINGER, NewRun, PinnedWorkflows, Queued, RunPage,
    RunQuery, RunWorkflow, Spread, StateQuota, Store, StoreError, StoredItems, UnfinishedRun,
    WorkflowStats, WorkflowText, stats,
};
use crate::record::{RunRecord, RunStatus, StepRecord};
use writer::{Write, WriteCommand, Written, writer_loop};

/// The fence of a run this node does not hold (any more): no run's epoch.
const LOST: i64 = -1;

/// Writer tasks, each on a connection of its own. A run's writes (and one
/// workflow's state) always go to the same writer, so they commit in the
/// order they were queued; writes of different runs commit side by side.
/// One writer commits one batch at a time and waits for each commit: a
/// second keeps the database busy meanwhile (more, measured on 2 cores, only
/// made the batches smaller).
const WRITERS: usize = 2;

/// Connections the pool keeps at most: the writer's and the readers'.
const POOL_SIZE: usize = 16;
/// How long opening a connection may take, unless the URL says
/// (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read waits for a pooled connection.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// Where the database is, for messages: `host:port/dbname`, never the
/// password.
#[derive(Debug)]
pub(super) struct Label(String);

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Label {
    fn of(config: &tokio_postgres::Config) -> Label {
        use tokio_postgres::config::Host;
        let ports = config.get_ports();
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match host {
                    Host::Tcp(name) => format!("{name}:{port}"),
                    Host::Unix(dir) => format!("{}:{port}", dir.display()),
                }
            })
            .collect();
        let hosts = if hosts.is_empty() {
            "localhost:5432".to_owned()
        } else {
            hosts.join(",")
        };
        match config.get_dbname() {
            Some(db) => Label(format!("{hosts}/{db}")),
            None => Label(hosts),
        }
    }
}

/// The PostgreSQL [`Store`].
pub struct PgStore {
    pool: Pool,
    /// For connections of their own (`LISTEN`).
    config: tokio_postgres::Config,
    label: Arc<Label>,
    /// The writers' queues, one per writer ([`WRITERS`]); empty only while
    /// dropping: closing them stops the writers.
    inboxes: Vec<mpsc::UnboundedSender<WriteCommand>>,
    state_quota: StateQuota,
    /// Set once this store joined a cluster ([`PgStore::join`]).
    member: OnceLock<Member>,
    /// The runs this node holds, with the epoch of its claim: every write of
    /// one checks it (fencing). A run it lost stays, as [`LOST`], so that
    /// nothing more of it is written from here.
    claims: Mutex<HashMap<String, i64>>,
    /// Workflow sources known to be stored (by digest): a new run of one
    /// does not store it again.
    stored_sources: Mutex<std::collections::HashSet<String>>,
}

/// This process as a node of the cluster.
#[derive(Debug)]
struct Member {
    incarnation: String,
    node_id: String,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("at", &self.label.0)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:pw@host:port/db`),
    /// brings its schema up to date and starts the writer. A failure names
    /// the host, never the password.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Database(DatabaseError::with_source(
                format!(
                    "the store URL {} is not a PostgreSQL URL: {e}",
                    super::redact_password(url)
                ),
                e,
            ))
        })?;
        PgStore::connect_with(config).await
    }

    /// [`PgStore::connect`] with a parsed configuration (the tests add a
    /// `search_path` of their own).
    pub async fn connect_with(mut config: tokio_postgres::Config) -> Result<PgStore, StoreError> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("trellis");
        }
        let label = Arc::new(Label::of(&config));
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT + Duration::from_secs(1)))
            .build()
            .map_err(|e| {
                StoreError::Database(DatabaseError::with_source(
                    format!("cannot set up connections to PostgreSQL at {label}: {e}"),
                    e,
                ))
            })?;
        let mut conn = pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(unavailable(&label, e)))?;
        let (inboxes, queues): (Vec<_>, Vec<_>) =
            (0..WRITERS).map(|_| mpsc::unbounded_channel()).unzip();
        let store = PgStore {
            pool: pool.clone(),
            config,
            label: Arc::clone(&label),
            inboxes,
            state_quota: StateQuota::default(),
            member: OnceLock::new(),
            claims: Mutex::new(HashMap::new()),
            stored_sources: Mutex::default(),
        };
        schema::migrate(&mut conn, &store).await?;
        drop(conn);
        for messages in queues {
            tokio::spawn(writer_loop(
                pool.clone(),
                Arc::clone(&label),
                messages,
                LINGER,
            ));
        }
        Ok(store)
    }

    /// The most state a workflow may keep (default: [`StateQuota::default`]).
    pub fn with_state_quota(mut self, quota: StateQuota) -> PgStore {
        self.state_quota = quota;
        self
    }

    /// Where the database is: `host:port/dbname`.
    pub fn location(&self) -> &str {
        &self.label.0
    }

    /// Stores a new run. A node of a cluster that `holds` it runs it: it
    /// holds the run from the start, at epoch 1. One that does not (it is
    /// busy) leaves it ready for any node to claim (no owner, epoch 0) and
    /// says so on the work channel.
    pub async fn create_run_held(
        &self,
        run: NewRun<'_>,
        holds: bool,
    ) -> Result<Created, StoreError> {
        let row = NewRunRow::encode(&run)?;
        let owner = self.incarnation().filter(|_| holds).map(str::to_owned);
        let id = row.id.clone();
        let digest = row.workflow_digest.clone();
        let source_stored = self.stored_sources.lock().unwrap().contains(&digest);
        let created = self
            .write(Write::CreateRun {
                row: Box::new(row),
                owner: owner.clone(),
                source_stored,
            })
            .await?
            .created()?;
        if !source_stored {
            self.stored_sources.lock().unwrap().insert(digest);
        }
        if owner.is_some() && matches!(created, Created::New) {
            self.claims.lock().unwrap().insert(id, 1);
        }
        Ok(created)
    }

    /// Tells every node that a run is ready to be claimed.
    pub async fn announce_ready(&self) -> Result<(), StoreError> {
        let conn = self.reader().await?;
        conn.execute("SELECT pg_notify($1, 'ready')", &[&cluster::WORK_CHANNEL])
            .await
            .map_err(|e| pg_error(&self.label, "announcing a run", e))?;
        Ok(())
    }

    /// Queues a write and waits for the commit that holds it.
    async fn write(&self, write: Write) -> Result<Written, StoreError> {
        self.queue(write, Commit::Now).await
    }

    /// Queues a write now; the future resolves once its commit is done.
    fn queue(
        &self,
        write: Write,
        commit: Commit,
    ) -> impl Future<Output = Result<Written, StoreError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let writer = if self.inboxes.is_empty() {
            None
        } else {
            let mut hasher = std::hash::DefaultHasher::new();
            write.shard_key().hash(&mut hasher);
            self.inboxes
                .get(hasher.finish() as usize % self.inboxes.len())
        };
        let sent = match writer {
            Some(inbox) => inbox
                .send(WriteCommand {
                    write,
                    reply,
                    commit,
                })
                .map_err(|_| StoreError::Closed),
            None => Err(StoreError::Closed),
        };
        async move {
            sent?;
            answer.await.map_err(|_| StoreError::Closed)?
        }
    }

    /// [`Self::queue`] as a [`Queued`]; `prepared` failing fails it at once.
    fn queued(&self, prepared: Result<Write, StoreError>, commit: Commit) -> Queued {
        match prepared {
            Ok(write) => {
                let commit = self.queue(write, commit);
                Queued::new(async move { commit.await.map(drop) })
            }
            Err(err) => {
                tracing::error!(error = %err, "a store write could not be queued");
                Queued::new(std::future::ready(Err(err)))
            }
        }
    }

    /// What a write of run `id` is fenced with: the epoch this node claimed
    /// it under. A node of a cluster writes only the runs it holds: one it
    /// lost, or never held, gets [`LOST`], which no run has. `None` when this
    /// store is not a cluster's node.
    fn fence(&self, id: &str) -> Option<i64> {
        self.member.get()?;
        Some(self.claims.lock().unwrap().get(id).copied().unwrap_or(LOST))
    }

    async fn reader(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(unavailable(&self.label, e)))
    }
}

#[async_trait]
impl Store for PgStore {
    async fn create_run(&self, run: NewRun<'_>) -> Result<Created, StoreError> {
        self.create_run_held(run, true).await
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let mut conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "a read", e);
        // One snapshot: the run and its steps from the same commit.
        let tx = snapshot(&mut conn).await.map_err(failed)?;
        let record = load_run(&tx, &self.label, id).await?;
        tx.commit().await.map_err(failed)?;
        Ok(record)
    }

    async fn run_workflow(&self, id: &str) -> Result<Option<RunWorkflow>, StoreError> {
        let conn = self.reader().await?;
        let rows = query_cached(
            &conn,
            &self.label,
            "SELECT source, workflow_file, pins
             FROM runs JOIN workflow_sources ON digest = workflow_digest WHERE id = $1",
            &[&id],
        )
        .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let mut pinned = PinnedWorkflows::new();
        for (name, pin) in decode_pins(id, row.get(2))? {
            let sources = query_cached(
                &conn,
                &self.label,
                "SELECT source FROM workflow_sources WHERE digest = $1",
                &[&pin.digest],
            )
            .await?;
            let source = sources.first().map(|row| row.get(0)).ok_or_else(|| {
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
            text: WorkflowText {
                source: row.get(0),
                file: row.get(1),
            },
            pins: pinned,
        }))
    }

    async fn list_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let listing = run_listing(query)?;
        let params: Vec<&(dyn ToSql + Sync)> = listing
            .params
            .iter()
            .map(|param| match param {
                ListParam::Text(text) => text as &(dyn ToSql + Sync),
                ListParam::Integer(n) => n as &(dyn ToSql + Sync),
            })
            .collect();
        let conn = self.reader().await?;
        let rows = query_cached(&conn, &self.label, &listing.sql, &params).await?;
        let runs = rows.iter().map(run_from_row).collect::<Result<_, _>>()?;
        Ok(listing.page(runs))
    }

    fn run_started(&self, id: &str, started_at: &str) -> Queued {
        self.queued(
            Ok(Write::RunStarted {
                id: id.to_owned(),
                started_at: started_at.to_owned(),
                fence: self.fence(id),
            }),
            Commit::Soon,
        )
    }

    fn save_step(&self, run_id: &str, index: usize, step: &StepRecord, commit: Commit) -> Queued {
        let prepared = step_index(index).and_then(|index| {
            Ok(Write::SaveStep {
                run_id: run_id.to_owned(),
                index,
                record: encode_json(step, || format!("run {run_id}: step {index}"))?,
                // A finished `for_each` step's record holds its items'
                // outcomes: the items' own rows go (a step without items has
                // none to drop; the run's finish drops any left over).
                drop_items: step.status.is_done() && step.items.is_some(),
                fence: self.fence(run_id),
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
        let prepared = step_index(index).and_then(|index| {
            let position = step_index(position)?;
            Ok(Write::SaveItem {
                run_id: run_id.to_owned(),
                index,
                position,
                record: encode_json(item, || {
                    format!("run {run_id}: step {index}: item {position}")
                })?,
                fence: self.fence(run_id),
            })
        });
        self.queued(prepared, commit)
    }

    async fn finish_run(&self, record: &RunRecord) -> Result<(), StoreError> {
        let id = &record.id;
        let run = Box::new(FinishedRow::encode(record)?);
        let fence = self.fence(id);
        let written = self.write(Write::FinishRun { run, fence }).await;
        let mut claims = self.claims.lock().unwrap();
        match &written {
            Ok(_) => {
                claims.remove(id);
            }
            Err(StoreError::Fenced(_)) => {
                claims.insert(id.clone(), LOST);
            }
            Err(_) => {}
        }
        written.map(drop)
    }

    async fn workflow_stats(
        &self,
        workflow: &str,
        since: &str,
    ) -> Result<WorkflowStats, StoreError> {
        let mut conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "computing a workflow's metrics", e);
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(failed)?;
        let runs = query_cached(
            &tx,
            &self.label,
            &stats::POSTGRES.runs(),
            &[&workflow, &since],
        )
        .await?;
        let row = runs
            .first()
            .ok_or_else(|| StoreError::Corrupt("the metrics query answered no row".into()))?;
        let count = |at: usize| u64::try_from(row.get::<_, i64>(at)).unwrap_or(0);
        let mut stats = WorkflowStats {
            succeeded: count(0),
            failed: count(1),
            cancelled: count(2),
            cycle_time_ms: Spread {
                p50: row.get(3),
                p95: row.get(4),
                max: row.get(5),
            },
            steps: std::collections::BTreeMap::new(),
        };
        for row in query_cached(
            &tx,
            &self.label,
            &stats::POSTGRES.steps(),
            &[&workflow, &since],
        )
        .await?
        {
            let mut values = [None; 9];
            for (at, value) in values.iter_mut().enumerate() {
                *value = row.get::<_, Option<f64>>(3 + at);
            }
            stats.steps.insert(
                row.get(0),
                stats::step_stats(row.get(1), row.get(2), values),
            );
        }
        tx.commit().await.map_err(failed)?;
        Ok(stats)
    }

    async fn unfinished_runs(&self) -> Result<Vec<UnfinishedRun>, StoreError> {
        let mut conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "a read", e);
        let tx = snapshot(&mut conn).await.map_err(failed)?;
        let rows = query_cached(
            &tx,
            &self.label,
            &format!(
                "SELECT {RUN_COLUMNS}, source, workflow_file
                 FROM runs JOIN workflow_sources ON digest = workflow_digest
                 WHERE status IN ('queued', 'running')
                 ORDER BY id"
            ),
            &[],
        )
        .await?;
        let mut unfinished = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut record = run_from_row(row)?;
            record.steps = load_steps(&tx, &self.label, &record.id).await?;
            let items = load_items(&tx, &self.label, &record.id).await?;
            unfinished.push(UnfinishedRun {
                record,
                workflow_source: row.get(RUN_COLUMN_COUNT),
                workflow_file: row.get(RUN_COLUMN_COUNT + 1),
                items,
                cancel_requested: false,
            });
        }
        tx.commit().await.map_err(failed)?;
        Ok(unfinished)
    }

    async fn state_get(&self, workflow: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let conn = self.reader().await?;
        let rows = query_cached(
            &conn,
            &self.label,
            "SELECT value FROM state WHERE workflow = $1 AND key = $2",
            &[&workflow, &key],
        )
        .await?;
        Ok(rows.first().map(|row| row.get(0)))
    }

    async fn state_set(&self, workflow: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(Write::StateSet {
            workflow: workflow.to_owned(),
            key: key.to_owned(),
            value: value.to_owned(),
            quota: self.state_quota,
        })
        .await
        .map(drop)
    }

    async fn state_delete(&self, workflow: &str, key: &str) -> Result<(), StoreError> {
        self.write(Write::StateDelete {
            workflow: workflow.to_owned(),
            key: key.to_owned(),
        })
        .await
        .map(drop)
    }
}

impl Drop for PgStore {
    /// Closes the queue: the writer commits what it holds, then ends.
    fn drop(&mut self) {
        self.inboxes.clear();
    }
}

/// A read-only transaction that sees one commit throughout.
async fn snapshot(
    conn: &mut deadpool_postgres::Object,
) -> Result<deadpool_postgres::Transaction<'_>, tokio_postgres::Error> {
    conn.build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// A statement prepared once per connection, then run.
pub(super) async fn query_cached(
    conn: &impl GenericClient,
    label: &Label,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let statement = conn
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_error(label, "a read", e))?;
    conn.query(&statement, params)
        .await
        .map_err(|e| pg_error(label, "a read", e))
}

/// The SQL of a page of `list_runs`: read newest first from the index of
/// its filters (a run's children by parent; else workflow, status or both),
/// in that index's order.
///
/// Each filter of that index is written as a range of one value
/// (`workflow BETWEEN $1 AND $1`) and leads the `ORDER BY`: the same rows in
/// the same order as `workflow = $1 ... ORDER BY id DESC`, but only the
/// filter's index gives that order without a sort, so that is the plan
/// whatever the planner guesses. With `=`, it may walk the primary key
/// newest first instead, reading each row until enough match, as it takes a
/// filter's runs to be spread evenly over time (issue 16, at 100,000 runs):
/// for a workflow whose runs are all old that walk read 65,000 rows for one
/// page (30 ms), and the generic plan a prepared statement gets after five
/// runs, which knows no value, walked all 100,000 for `status=running` (84
/// ms).
pub(super) fn run_listing(query: &RunQuery) -> Result<RunListing, StoreError> {
    RunListing::new(
        query,
        |n| format!("${n}"),
        |filters| {
            let by_parent = filters
                .equal
                .iter()
                .any(|(column, _)| *column == "parent_run");
            let indexed = |column: &str| !by_parent || column == "parent_run";
            let conditions = filters
                .equal
                .iter()
                .map(|(column, value)| {
                    if indexed(column) {
                        format!("{column} BETWEEN {value} AND {value}")
                    } else {
                        format!("{column} = {value}")
                    }
                })
                .chain(filters.before.iter().map(|id| format!("id < {id}")));
            let order: String = filters
                .equal
                .iter()
                .filter(|(column, _)| indexed(column))
                .map(|(column, _)| format!("{column} DESC, "))
                .collect();
            format!(
                "SELECT {RUN_COLUMNS} FROM runs{} ORDER BY {order}id DESC LIMIT {}",
                where_all(conditions),
                filters.limit
            )
        },
    )
}

/// The run and its steps, or `None`. Call inside a transaction.
pub(super) async fn load_run(
    conn: &impl GenericClient,
    label: &Label,
    id: &str,
) -> Result<Option<RunRecord>, StoreError> {
    let rows = query_cached(
        conn,
        label,
        &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"),
        &[&id],
    )
    .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let mut record = run_from_row(row)?;
    record.steps = load_steps(conn, label, id).await?;
    let retries = query_cached(
        conn,
        label,
        "SELECT id FROM runs WHERE retry_of = $1 ORDER BY id",
        &[&id],
    )
    .await?;
    record.retries = retries.iter().map(|row| row.get(0)).collect();
    Ok(Some(record))
}

pub(super) async fn load_steps(
    conn: &impl GenericClient,
    label: &Label,
    run_id: &str,
) -> Result<Vec<StepRecord>, StoreError> {
    let rows = query_cached(
        conn,
        label,
        "SELECT idx, record FROM steps WHERE run_id = $1 ORDER BY idx",
        &[&run_id],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let index: i64 = row.get(0);
            decode_json(row.get(1), || format!("run {run_id}: step {index}"))
        })
        .collect()
}

pub(super) async fn load_items(
    conn: &impl GenericClient,
    label: &Label,
    run_id: &str,
) -> Result<StoredItems, StoreError> {
    let rows = query_cached(
        conn,
        label,
        "SELECT idx, position, record FROM step_items WHERE run_id = $1",
        &[&run_id],
    )
    .await?;
    let mut items = StoredItems::new();
    for row in &rows {
        let (index, position): (i64, i64) = (row.get(0), row.get(1));
        let what = || format!("run {run_id}: step {index}: item {position}");
        let record = decode_json(row.get(2), what)?;
        let (Ok(index), Ok(position)) = (usize::try_from(index), usize::try_from(position)) else {
            return Err(StoreError::Corrupt(format!("{}: negative index", what())));
        };
        items.insert((index, position), record);
    }
    Ok(items)
}

/// A [`RunRecord`] without steps from the [`RUN_COLUMNS`] of a row.
pub(super) fn run_from_row(row: &Row) -> Result<RunRecord, StoreError> {
    let id: String = row.get(0);
    let status: &str = row.get(2);
    let status: RunStatus = status
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("run {id}: unknown status {status:?}")))?;
    let input = decode_json(row.get(3), || format!("run {id}: input"))?;
    let output = decode_json(row.get(4), || format!("run {id}: output"))?;
    let error = match row.get::<_, Option<&str>>(5) {
        Some(error) => Some(decode_json(error, || format!("run {id}: error"))?),
        None => None,
    };
    Ok(RunRecord {
        workflow: row.get(1),
        status,
        input,
        output,
        error,
        created_at: row.get(6),
        started_at: row.get(7),
        finished_at: row.get(8),
        duration_ms: row.get(9),
        steps: Vec::new(),
        retry_of: row.get(10),
        rerun_of: row.get(11),
        retries: Vec::new(),
        parent: parent_ref(row.get(12), row.get(13), row.get(14)),
        id,
    })
}

/// A driver error, in words that say where and doing what: unavailable when
/// the connection is gone (the API answers 503), else a database failure.
pub(super) fn pg_error(label: &Label, doing: &str, e: tokio_postgres::Error) -> StoreError {
    let detail = match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        None => e.to_string(),
    };
    let message = format!("PostgreSQL at {label}: {doing}: {detail}");
    if e.is_closed() || (e.as_db_error().is_none() && e.code().is_none()) || is_outage(e.code()) {
        StoreError::Unavailable(DatabaseError::with_source(message, e))
    } else {
        StoreError::Database(DatabaseError::with_source(message, e))
    }
}

/// SQLSTATE class 08 (connection exception) and 57P01-57P03 (the server
/// shutting down, crashed, or not yet accepting connections): the database
/// is away, not refusing this statement.
fn is_outage(code: Option<&tokio_postgres::error::SqlState>) -> bool {
    use tokio_postgres::error::SqlState;
    code.is_some_and(|code| {
        code.code().starts_with("08")
            || [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::CRASH_SHUTDOWN,
                SqlState::CANNOT_CONNECT_NOW,
            ]
            .contains(code)
    })
}

/// No connection could be had from the pool (the database is down, refuses
/// us, or every connection is busy past the wait).
pub(super) fn unavailable(label: &Label, e: deadpool_postgres::PoolError) -> DatabaseError {
    let reason = match &e {
        deadpool_postgres::PoolError::Backend(e) => match e.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => e.to_string(),
        },
        other => other.to_string(),
    };
    DatabaseError::with_source(
        format!("cannot connect to PostgreSQL at {label}: {reason}"),
        e,
    )
}
