//! The contract of a [`Store`]: one suite of tests that every backend
//! passes, SQLite and PostgreSQL alike. Each backend's own test module says
//! how to get a fresh database ([`Backend`]) and runs the suite with
//! [`contract_tests!`]; what is a backend's own (SQLite's writer and file,
//! PostgreSQL's migrations under a lock) is tested beside it.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::*;
use crate::record::{
    AttemptRecord, ErrorKind, ErrorRecord, LogLevel, LogLine, LogStream, ParentRef, Progress,
    RunError, StepStatus, new_run_id,
};

/// A database a test may use alone, and how to open stores on it.
#[async_trait]
pub(super) trait Backend: Send + Sync + Sized + 'static {
    /// A fresh, empty database; `None` when this backend cannot be tested
    /// here (it has said why, in one line).
    async fn fresh() -> Option<Self>;
    /// A store over the database, with `quota`: each call opens another on
    /// the same data (a reopen, or a second node).
    async fn open(&self, quota: StateQuota) -> Arc<dyn Store>;
    /// Runs `sql` on the database behind the stores.
    async fn execute(&self, sql: &str);
    /// The first column of the first row of `sql`, as an integer.
    async fn scalar(&self, sql: &str) -> Option<i64>;

    /// What the workflow's state weighs, as the store keeps it: (keys, bytes).
    async fn usage(&self, workflow: &str) -> Option<(i64, i64)> {
        let of = |column| format!("SELECT {column} FROM state_usage WHERE workflow = '{workflow}'");
        Some((
            self.scalar(&of("keys")).await?,
            self.scalar(&of("bytes")).await?,
        ))
    }
}

/// Says, in one line that `cargo test` shows (it does not capture a direct
/// write to stderr), that a backend's tests are skipped and why.
pub(super) fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{test}: skipped: {why}");
}

/// The suite, as `#[tokio::test]` functions over `$backend`.
macro_rules! contract_tests {
    ($backend:ty) => {
        $crate::store::contract::contract_tests!(@each $backend;
            a_whole_record_round_trips,
            an_idempotency_key_is_scoped_to_its_workflow,
            concurrent_creates_with_one_key_make_one_run,
            list_pages_newest_first_without_gaps,
            a_cursor_we_did_not_issue_is_rejected,
            save_step_replaces_the_step_at_its_index,
            saves_are_queued_when_called_and_commit_in_order,
            items_are_kept_until_their_step_finishes,
            run_started_then_finish_run,
            unfinished_runs_are_queued_or_running_oldest_first,
            state_is_scoped_by_workflow,
            data_survives_a_reopen,
            corrupt_json_is_reported_as_corrupt,
            state_stops_at_its_quota,
            two_stores_on_one_database_make_one_run_per_key,
            the_quota_holds_across_stores,
            lineage_and_taken_over_items_are_stored_with_a_run,
            workflow_stats_aggregate_the_runs_finished_in_the_window,
        );
    };
    (@each $backend:ty; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                use $crate::store::contract::Backend as _;
                if let Some(backend) = <$backend>::fresh().await {
                    $crate::store::contract::$name(&backend).await;
                }
            }
        )*
    };
}
pub(crate) use contract_tests;

pub(super) const SOURCE: &str = "name = \"orders\"\n[[step]]\nid = \"parse\"\nplugin = \"json\"\n";

pub(super) fn pending_step(id: &str) -> StepRecord {
    StepRecord::pending(id, "json-transform")
}

/// A step that failed once and then succeeded, with every optional field set.
pub(super) fn finished_step(id: &str) -> StepRecord {
    let failed = AttemptRecord {
        child_run: None,
        node: None,
        // What a failed attempt was given is kept with it.
        input: Some(serde_json::json!({ "order": 7, "lines": ["a", "b"] })),
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
        child_run: None,
        node: None,
        input: None,
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
        reused_from: None,
        workflow: None,
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

pub(super) fn queued_run(workflow: &str) -> RunRecord {
    RunRecord {
        retry_of: None,
        rerun_of: None,
        retries: Vec::new(),
        parent: None,
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

pub(super) async fn create(store: &Arc<dyn Store>, record: &RunRecord) {
    let created = store.create_run(new_run(record, None)).await.unwrap();
    assert!(matches!(created, Created::New));
}

pub(super) fn new_run<'a>(record: &'a RunRecord, key: Option<&'a str>) -> NewRun<'a> {
    NewRun {
        pins: &NO_PINS,
        items: &NO_ITEMS,
        record,
        workflow_source: SOURCE,
        workflow_file: "workflows/orders.toml",
        idempotency_key: key,
    }
}

pub(super) async fn a_whole_record_round_trips(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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

pub(super) async fn an_idempotency_key_is_scoped_to_its_workflow(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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

pub(super) async fn concurrent_creates_with_one_key_make_one_run(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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
async fn all_pages(store: &Arc<dyn Store>, mut query: RunQuery) -> (Vec<String>, usize) {
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

pub(super) async fn list_pages_newest_first_without_gaps(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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
            parent: None,
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

pub(super) async fn a_cursor_we_did_not_issue_is_rejected(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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

pub(super) async fn save_step_replaces_the_step_at_its_index(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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
pub(super) async fn saves_are_queued_when_called_and_commit_in_order(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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
pub(super) async fn items_are_kept_until_their_step_finishes(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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
    assert_eq!(
        backend.scalar("SELECT count(*) FROM step_items").await,
        Some(0)
    );

    let missing = store
        .save_item(&new_run_id(), 0, 0, &done, Commit::Now)
        .await;
    assert!(
        matches!(&missing, Err(StoreError::Database(m)) if m.starts_with("there is no run")),
        "{missing:?}"
    );
}

pub(super) async fn run_started_then_finish_run(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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

pub(super) async fn unfinished_runs_are_queued_or_running_oldest_first(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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
            items: &NO_ITEMS,
            pins: &NO_PINS,
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

pub(super) async fn state_is_scoped_by_workflow(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
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

pub(super) fn full(result: Result<(), StoreError>) -> String {
    match result {
        Err(StoreError::StateFull(message)) => message,
        other => panic!("expected StateFull, got {other:?}"),
    }
}

/// A workflow's state stops at its quota of keys and of bytes; updates
/// that do not grow it and deletes always go through; other workflows
/// have their own quota.
pub(super) async fn state_stops_at_its_quota(backend: &impl Backend) {
    let store = backend
        .open(StateQuota {
            max_keys: 2,
            max_bytes: 20,
        })
        .await;
    store.state_set("w", "ab", b"12345").await.unwrap(); // 7 bytes
    store.state_set("w", "cd", b"12345").await.unwrap(); // 14
    assert_eq!(backend.usage("w").await, Some((2, 14)));
    let message = full(store.state_set("w", "ef", b"").await);
    assert_eq!(
        message,
        "the state of workflow `w` holds 2 keys, the most it may (state_max_keys); \
         delete keys or raise the limit"
    );
    // An update adds no key; this one grows it to 20 bytes, the most.
    store.state_set("w", "ab", b"12345678901").await.unwrap();
    assert_eq!(backend.usage("w").await, Some((2, 20)));
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
    assert_eq!(backend.usage("other").await, Some((2, 4)));

    store.state_delete("w", "ab").await.unwrap();
    assert_eq!(backend.usage("w").await, Some((1, 7)));
    store.state_set("w", "ef", b"").await.unwrap();
    assert_eq!(backend.usage("w").await, Some((2, 9)));

    // A lower quota after the fact: what shrinks still goes through.
    drop(store);
    let store = backend
        .open(StateQuota {
            max_keys: 1,
            max_bytes: 4,
        })
        .await;
    store.state_set("w", "cd", b"1").await.unwrap();
    assert_eq!(backend.usage("w").await, Some((2, 5)));
    full(store.state_set("w", "ef", b"123").await);
    full(store.state_set("w", "gh", b"").await);
}

pub(super) async fn data_survives_a_reopen(backend: &impl Backend) {
    let mut record = queued_run("orders");
    record.steps[0] = finished_step("parse");
    {
        let store = backend.open(StateQuota::default()).await;
        create(&store, &record).await;
        store.state_set("orders", "count", b"1").await.unwrap();
    }
    let store = backend.open(StateQuota::default()).await;
    assert_eq!(
        store.get_run(&record.id).await.unwrap().as_ref(),
        Some(&record)
    );
    assert_eq!(
        store.state_get("orders", "count").await.unwrap(),
        Some(b"1".to_vec())
    );
    match store.create_run(new_run(&record, None)).await {
        Err(StoreError::Database(message)) => {
            assert!(message.to_lowercase().contains("unique"), "{message}")
        }
        other => panic!("a second run with the same id: {other:?}"),
    }
}

pub(super) async fn corrupt_json_is_reported_as_corrupt(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
    let record = queued_run("orders");
    create(&store, &record).await;
    backend
        .execute(&format!(
            "UPDATE steps SET record = '{{\"id\": 1' WHERE run_id = '{}' AND idx = 1",
            record.id
        ))
        .await;
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

/// Two stores on one database (two processes, or two nodes of a cluster)
/// racing with one idempotency key make one run, and both answer with it.
pub(super) async fn two_stores_on_one_database_make_one_run_per_key(backend: &impl Backend) {
    let stores = [
        backend.open(StateQuota::default()).await,
        backend.open(StateQuota::default()).await,
    ];
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = Arc::clone(&stores[i % 2]);
            tokio::spawn(async move {
                let record = queued_run("orders");
                let created = store
                    .create_run(new_run(&record, Some("shared")))
                    .await
                    .unwrap();
                (record, created)
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut answers = HashSet::new();
    for task in tasks {
        match task.await.unwrap() {
            (record, Created::New) => winners.push(record),
            (_, Created::Existing(earlier)) => {
                answers.insert(earlier.id.clone());
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create wins");
    assert!(answers.iter().all(|id| *id == winners[0].id), "{answers:?}");
    for store in &stores {
        assert_eq!(
            store.get_run(&winners[0].id).await.unwrap().as_ref(),
            Some(&winners[0])
        );
        let page = store.list_runs(&RunQuery::default()).await.unwrap();
        assert_eq!(page.runs.len(), 1);
    }
}

/// Sets racing on two stores never take a workflow's state past its quota.
pub(super) async fn the_quota_holds_across_stores(backend: &impl Backend) {
    let quota = StateQuota {
        max_keys: 10,
        max_bytes: 1 << 20,
    };
    let stores = [backend.open(quota).await, backend.open(quota).await];
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = Arc::clone(&stores[i % 2]);
            tokio::spawn(async move { store.state_set("w", &format!("k{i:02}"), b"v").await })
        })
        .collect();
    let mut stored = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => stored += 1,
            Err(StoreError::StateFull(_)) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(
        stored, 10,
        "as many sets went through as the quota has keys"
    );
    assert_eq!(backend.usage("w").await, Some((10, 10 * 4)));
    assert_eq!(backend.scalar("SELECT count(*) FROM state").await, Some(10));
}

/// A retry's lineage and the items it took over are stored with it; the
/// original lists its retries, oldest first; child runs list by parent; the
/// run's workflow text is there to plan a retry from.
pub(super) async fn lineage_and_taken_over_items_are_stored_with_a_run(backend: &impl Backend) {
    let store = backend.open(StateQuota::default()).await;
    let original = queued_run("orders");
    create(&store, &original).await;
    let stored = store.run_workflow(&original.id).await.unwrap().unwrap();
    assert_eq!(
        stored.text,
        WorkflowText {
            source: SOURCE.to_owned(),
            file: "workflows/orders.toml".to_owned(),
        }
    );
    assert!(stored.pins.is_empty());
    assert_eq!(store.run_workflow(&new_run_id()).await.unwrap(), None);

    let mut reused = finished_step("parse");
    reused.attempts.clear();
    reused.reused_from = Some(original.id.clone());
    let retry = |steps: Vec<StepRecord>| RunRecord {
        retry_of: Some(original.id.clone()),
        steps,
        ..queued_run("orders")
    };
    let first = retry(vec![reused.clone(), pending_step("price")]);
    let item = ItemRecord {
        item: json!({"sku": "a"}),
        attempts: Vec::new(),
        outcome: Some(ItemOutcome::Output(json!({"ok": true}))),
    };
    let items: StoredItems = [((1, 3), item.clone())].into();
    // It pins two workflows it may call; one has the same text as the run's.
    let pins: PinnedWorkflows = [
        (
            "provision".to_owned(),
            WorkflowText {
                source: "[[step]]\nid = \"p\"\nplugin = \"json\"\n".to_owned(),
                file: "workflows/provision.toml".to_owned(),
            },
        ),
        (
            "orders".to_owned(),
            WorkflowText {
                source: SOURCE.to_owned(),
                file: "elsewhere/orders.toml".to_owned(),
            },
        ),
    ]
    .into();
    let created = store
        .create_run(NewRun {
            items: &items,
            pins: &pins,
            ..new_run(&first, None)
        })
        .await
        .unwrap();
    assert!(matches!(created, Created::New));
    let stored = store.run_workflow(&first.id).await.unwrap().unwrap();
    assert_eq!(stored.pins, pins);
    let second = retry(vec![pending_step("parse"), pending_step("price")]);
    create(&store, &second).await;

    assert_eq!(store.get_run(&first.id).await.unwrap(), Some(first.clone()));
    let stored = store.get_run(&original.id).await.unwrap().unwrap();
    assert_eq!(stored.retries, [first.id.clone(), second.id.clone()]);
    let unfinished = store.unfinished_runs().await.unwrap();
    let first_unfinished = unfinished
        .iter()
        .find(|run| run.record.id == first.id)
        .unwrap();
    assert_eq!(first_unfinished.items, items);
    assert_eq!(first_unfinished.record.steps[0], reused);

    let children: Vec<RunRecord> = (0..3)
        .map(|item| RunRecord {
            parent: Some(ParentRef {
                run: original.id.clone(),
                step: "price".into(),
                item: (item > 0).then_some(item),
            }),
            rerun_of: (item == 2).then(|| second.id.clone()),
            ..queued_run("child")
        })
        .collect();
    for child in &children {
        create(&store, child).await;
    }
    let page = store
        .list_runs(&RunQuery {
            parent: Some(original.id.clone()),
            ..RunQuery::default()
        })
        .await
        .unwrap();
    let listed: Vec<(&str, Option<&ParentRef>, Option<&str>)> = page
        .runs
        .iter()
        .map(|run| {
            (
                run.id.as_str(),
                run.parent.as_ref(),
                run.rerun_of.as_deref(),
            )
        })
        .collect();
    let expected: Vec<(&str, Option<&ParentRef>, Option<&str>)> = children
        .iter()
        .rev()
        .map(|run| {
            (
                run.id.as_str(),
                run.parent.as_ref(),
                run.rerun_of.as_deref(),
            )
        })
        .collect();
    assert_eq!(listed, expected);
    assert!(
        store
            .list_runs(&RunQuery {
                parent: Some(first.id.clone()),
                ..RunQuery::default()
            })
            .await
            .unwrap()
            .runs
            .is_empty()
    );
}

/// A step that ran with `attempts` (fuel, peak memory each).
fn ran_step(id: &str, status: StepStatus, duration_ms: f64, attempts: &[(u64, u64)]) -> StepRecord {
    let template = finished_step(id);
    StepRecord {
        status,
        duration_ms: Some(duration_ms),
        attempts: attempts
            .iter()
            .enumerate()
            .map(|(at, (fuel, memory))| AttemptRecord {
                attempt: at as u32 + 1,
                item: None,
                fuel_consumed: *fuel,
                peak_memory: *memory,
                ..template.attempts[1].clone()
            })
            .collect(),
        ..template
    }
}

/// Finishes a new run of `workflow` created at `created` with `status` at
/// `finished`, with `steps`.
async fn finished_run(
    store: &Arc<dyn Store>,
    workflow: &str,
    status: RunStatus,
    (created, finished): (&str, &str),
    steps: Vec<StepRecord>,
) -> RunRecord {
    let mut record = queued_run(workflow);
    record.created_at = created.into();
    record.steps = steps.iter().map(|step| pending_step(&step.id)).collect();
    create(store, &record).await;
    record.status = status;
    record.started_at = Some(created.into());
    record.finished_at = Some(finished.into());
    record.duration_ms = Some(1.0);
    record.steps = steps;
    store.finish_run(&record).await.unwrap();
    record
}

/// The metrics count the runs of the workflow that finished in the window,
/// by status, with nearest-rank percentiles of their cycle time and, per
/// step that ran, of its duration, fuel (over its attempts) and peak memory.
pub(super) async fn workflow_stats_aggregate_the_runs_finished_in_the_window(
    backend: &impl Backend,
) {
    let store = backend.open(StateQuota::default()).await;
    let skipped = StepRecord {
        status: StepStatus::Skipped,
        ..pending_step("b")
    };
    let cancelled = StepRecord {
        status: StepStatus::Cancelled,
        ..pending_step("b")
    };
    finished_run(
        &store,
        "metrics",
        RunStatus::Succeeded,
        ("2026-01-02T10:00:00.000Z", "2026-01-02T10:00:01.000Z"),
        vec![
            ran_step("a", StepStatus::Succeeded, 100.0, &[(10, 1000), (20, 2000)]),
            ran_step("b", StepStatus::Succeeded, 50.0, &[(5, 500)]),
        ],
    )
    .await;
    finished_run(
        &store,
        "metrics",
        RunStatus::Failed,
        ("2026-01-02T10:00:00.000Z", "2026-01-02T10:00:03.000Z"),
        vec![
            ran_step("a", StepStatus::Failed, 300.0, &[(7, 700)]),
            cancelled.clone(),
        ],
    )
    .await;
    finished_run(
        &store,
        "metrics",
        RunStatus::Cancelled,
        ("2026-01-02T10:00:00.000Z", "2026-01-02T10:00:02.000Z"),
        vec![pending_step("a"), skipped],
    )
    .await;
    // Before the window, another workflow's, and one not finished.
    finished_run(
        &store,
        "metrics",
        RunStatus::Succeeded,
        ("2026-01-01T22:00:00.000Z", "2026-01-01T23:00:00.000Z"),
        vec![ran_step("a", StepStatus::Succeeded, 9000.0, &[(9, 9)])],
    )
    .await;
    finished_run(
        &store,
        "orders",
        RunStatus::Failed,
        ("2026-01-02T10:00:00.000Z", "2026-01-02T10:00:05.000Z"),
        vec![ran_step("a", StepStatus::Failed, 1.0, &[(1, 1)])],
    )
    .await;
    let mut open = queued_run("metrics");
    open.steps = vec![pending_step("a")];
    create(&store, &open).await;

    let stats = store
        .workflow_stats("metrics", "2026-01-02T00:00:00.000Z")
        .await
        .unwrap();
    let spread = |p50: f64, p95: f64, max: f64| Spread {
        p50: Some(p50),
        p95: Some(p95),
        max: Some(max),
    };
    assert_eq!(
        (stats.succeeded, stats.failed, stats.cancelled),
        (1, 1, 1),
        "{stats:#?}"
    );
    assert_eq!(stats.cycle_time_ms, spread(2000.0, 3000.0, 3000.0));
    assert_eq!(
        stats.steps.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "{stats:#?}"
    );
    assert_eq!(
        stats.steps["a"],
        StepStats {
            runs: 2,
            failed: 1,
            duration_ms: spread(100.0, 300.0, 300.0),
            fuel: spread(7.0, 30.0, 30.0),
            memory_peak: spread(700.0, 2000.0, 2000.0),
        }
    );
    assert_eq!(
        stats.steps["b"],
        StepStats {
            runs: 1,
            failed: 0,
            duration_ms: spread(50.0, 50.0, 50.0),
            fuel: spread(5.0, 5.0, 5.0),
            memory_peak: spread(500.0, 500.0, 500.0),
        }
    );

    let none = store
        .workflow_stats("metrics", "2026-02-01T00:00:00.000Z")
        .await
        .unwrap();
    assert_eq!(none, WorkflowStats::default());
}
