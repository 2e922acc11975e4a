//! The SQLite store's tests: its contract as a [`Store`] (what a PostgreSQL
//! store must pass too), then what is SQLite's own (the writer's batches,
//! migrations, the file).

use std::collections::HashSet;

use serde_json::{Value, json};

use super::schema::*;
use super::writer::*;
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
