//! The SQLite store's tests: the contract every [`Store`] passes
//! (`store/contract.rs`) on a fresh file, then what is SQLite's own (the
//! writer's batches, migrations, the file).

use serde_json::json;

use super::schema::*;
use super::writer::*;
use super::*;
use crate::record::new_run_id;
use crate::store::ItemOutcome;
use std::collections::HashSet;

use crate::store::contract::{Backend, contract_tests, finished_step, new_run, queued_run};

/// A fresh file in a temporary directory.
struct SqliteBackend(tempfile::TempDir);

impl SqliteBackend {
    fn path(&self) -> PathBuf {
        self.0.path().join("trellis.db")
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    async fn fresh() -> Option<Self> {
        Some(SqliteBackend(tempfile::tempdir().unwrap()))
    }

    async fn open(&self, quota: StateQuota) -> Arc<dyn Store> {
        Arc::new(
            SqliteStore::open(&self.path(), Durability::Normal)
                .unwrap()
                .with_state_quota(quota),
        )
    }

    async fn execute(&self, sql: &str) {
        Connection::open(self.path())
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    async fn scalar(&self, sql: &str) -> Option<i64> {
        Connection::open(self.path())
            .unwrap()
            .query_row(sql, [], |row| row.get(0))
            .optional()
            .unwrap()
    }
}

contract_tests!(SqliteBackend);

fn open(dir: &tempfile::TempDir) -> SqliteStore {
    SqliteStore::open(&dir.path().join("trellis.db"), Durability::Normal).unwrap()
}

async fn create(store: &SqliteStore, record: &RunRecord) {
    let created = store.create_run(new_run(record, None)).await.unwrap();
    assert!(matches!(created, Created::New));
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
        conn.execute_batch(UNDO_6).unwrap();
        conn.execute_batch(UNDO_5).unwrap();
        conn.execute_batch(UNDO_4).unwrap();
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

/// Back to schema 5: no index of runs by workflow and status.
const UNDO_6: &str = "DROP INDEX runs_by_workflow_status; PRAGMA user_version = 5;";
/// Back to schema 4: no index of runs by when they finished.
const UNDO_5: &str = "DROP INDEX runs_by_workflow_finished; PRAGMA user_version = 4;";
/// Back to schema 3: no lineage columns.
const UNDO_4: &str = "DROP INDEX runs_by_retry_of; DROP INDEX runs_by_parent;
    ALTER TABLE runs DROP COLUMN retry_of; ALTER TABLE runs DROP COLUMN rerun_of;
    ALTER TABLE runs DROP COLUMN parent_run; ALTER TABLE runs DROP COLUMN parent_step;
    ALTER TABLE runs DROP COLUMN parent_item; ALTER TABLE runs DROP COLUMN pins;
    PRAGMA user_version = 3;";
/// Back to schema 2: no state usage.
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
        conn.execute_batch(UNDO_6).unwrap();
        conn.execute_batch(UNDO_5).unwrap();
        conn.execute_batch(UNDO_4).unwrap();
        conn.execute_batch(UNDO_3).unwrap();
    }
    let store = open(&dir);
    assert_eq!(usage(&dir, "w"), Some((2, 112)));
    assert_eq!(usage(&dir, "v"), Some((1, 1)));
    store.state_set("v", "k", b"abc").await.unwrap();
    assert_eq!(usage(&dir, "v"), Some((1, 4)));
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

/// Every shape of the list query (each set of filters, with and without a
/// cursor) reads its page from one index, in id order, from where the page
/// starts: no scan of the table and no sort, at any number of runs (issue
/// 16). The store never runs `ANALYZE`, so SQLite plans without
/// statistics, from the schema alone: these are the plans at any size.
#[test]
fn every_list_query_reads_one_index_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir));
    let conn = Connection::open(dir.path().join("trellis.db")).unwrap();
    for shape in 0..16 {
        let query = RunQuery {
            workflow: (shape & 1 != 0).then(|| "orders".to_owned()),
            status: (shape & 2 != 0).then_some(RunStatus::Running),
            parent: (shape & 4 != 0).then(new_run_id),
            cursor: (shape & 8 != 0).then(|| crate::store::rows::encode_cursor(&new_run_id())),
            limit: 50,
        };
        let listing = run_listing(&query).unwrap();
        let params = listing.params.iter().map(|param| match param {
            ListParam::Text(text) => SqlValue::Text(text.clone()),
            ListParam::Integer(n) => SqlValue::Integer(*n),
        });
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", listing.sql))
            .unwrap()
            .query_map(rusqlite::params_from_iter(params), |row| row.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // The index that narrows the most: one run's children, then both
        // filters, then one; without a filter, the primary key's.
        let (index, matched) = match (&query.parent, &query.workflow, &query.status) {
            (Some(_), _, _) => ("runs_by_parent", "parent_run=?"),
            (None, Some(_), Some(_)) => ("runs_by_workflow_status", "workflow=? AND status=?"),
            (None, Some(_), None) => ("runs_by_workflow", "workflow=?"),
            (None, None, Some(_)) => ("runs_by_status", "status=?"),
            (None, None, None) => ("sqlite_autoindex_runs_1", ""),
        };
        let range = match (matched, &query.cursor) {
            ("", None) => String::new(),
            ("", Some(_)) => " (id<?)".to_owned(),
            (matched, None) => format!(" ({matched})"),
            (matched, Some(_)) => format!(" ({matched} AND id<?)"),
        };
        let walk = if range.is_empty() { "SCAN" } else { "SEARCH" };
        assert_eq!(
            plan,
            [format!("{walk} runs USING INDEX {index}{range}")],
            "{}",
            listing.sql
        );
    }
}

#[test]
fn a_database_error_keeps_the_driver_error_as_its_source() {
    let error = StoreError::from(rusqlite::Error::QueryReturnedNoRows);
    assert_eq!(
        error.to_string(),
        format!(
            "the store's database failed: {}",
            rusqlite::Error::QueryReturnedNoRows
        )
    );
    let database = std::error::Error::source(&error).expect("the database error");
    let driver = database.source().expect("the driver's error");
    assert!(matches!(
        driver.downcast_ref::<rusqlite::Error>(),
        Some(rusqlite::Error::QueryReturnedNoRows)
    ));
}
