//! The PostgreSQL store's tests: the contract every [`Store`] passes
//! (`store/contract.rs`), then what is PostgreSQL's own (migrations under a
//! lock, a newer schema refused, an unreachable database named).
//!
//! They need a server: `TRELLIS_TEST_POSTGRES` is its URL (`.ci/run` starts
//! a throwaway one). Each test works in a schema of its own, made fresh, so
//! tests run in parallel on one database. Without the variable each test
//! says in one line that it is skipped.

use std::sync::Arc;

use async_trait::async_trait;

use super::*;
use crate::store::contract::{self, Backend, contract_tests};

/// The variable that names the test server.
const URL_VARIABLE: &str = "TRELLIS_TEST_POSTGRES";

/// A fresh schema on the test server.
struct PgBackend {
    /// The server's URL with the schema as `search_path`.
    config: tokio_postgres::Config,
}

impl PgBackend {
    async fn client(&self) -> tokio_postgres::Client {
        connect(&self.config).await
    }
}

async fn connect(config: &tokio_postgres::Config) -> tokio_postgres::Client {
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

#[async_trait]
impl Backend for PgBackend {
    async fn fresh() -> Option<Self> {
        let test = std::thread::current()
            .name()
            .unwrap_or("a postgres test")
            .to_owned();
        let Ok(url) = std::env::var(URL_VARIABLE) else {
            contract::skipped(&test, &format!("{URL_VARIABLE} is not set"));
            return None;
        };
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        let schema = format!("trellis_test_{}", uuid::Uuid::now_v7().simple());
        connect(&config)
            .await
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        config.options(format!("-c search_path={schema}"));
        Some(PgBackend { config })
    }

    async fn open(&self, quota: StateQuota) -> Arc<dyn Store> {
        Arc::new(
            PgStore::connect_with(self.config.clone())
                .await
                .unwrap()
                .with_state_quota(quota),
        )
    }

    async fn execute(&self, sql: &str) {
        self.client().await.batch_execute(sql).await.unwrap();
    }

    async fn scalar(&self, sql: &str) -> Option<i64> {
        let row = self.client().await.query_opt(sql, &[]).await.unwrap()?;
        Some(
            row.try_get::<_, i64>(0)
                .or_else(|_| row.try_get::<_, i32>(0).map(i64::from))
                .unwrap(),
        )
    }
}

contract_tests!(PgBackend);

/// Nodes starting at once on a new database: each sees the schema whole
/// and it is migrated once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_at_once_migrate_once() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let config = backend.config.clone();
            tokio::spawn(async move { PgStore::connect_with(config).await })
        })
        .collect();
    for open in opens {
        let store = open.await.unwrap().unwrap();
        let page = store.list_runs(&RunQuery::default()).await.unwrap();
        assert!(page.runs.is_empty());
    }
    assert_eq!(
        backend.scalar("SELECT version FROM trellis_schema").await,
        Some(schema::MIGRATIONS.len() as i64)
    );
    assert_eq!(
        backend.scalar("SELECT count(*) FROM trellis_schema").await,
        Some(1)
    );
}

#[tokio::test]
async fn a_newer_schema_is_refused_not_migrated_down() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    drop(backend.open(StateQuota::default()).await);
    backend
        .execute("UPDATE trellis_schema SET version = 99")
        .await;
    match PgStore::connect_with(backend.config.clone()).await {
        Err(StoreError::Database(message)) => {
            assert!(message.contains("schema version 99"), "{message}");
            assert!(message.contains("newer trellis"), "{message}");
        }
        other => panic!("opened a database from the future: {other:?}"),
    }
    assert_eq!(
        backend.scalar("SELECT version FROM trellis_schema").await,
        Some(99),
        "left as it was"
    );
}

/// Each list query reads its page through an index where the planner has a
/// choice (20,000 runs, vacuumed and analyzed, as autovacuum leaves them),
/// for the values that make a poor plan read the table: a status or a
/// workflow of few runs, a workflow whose runs are all old, two filters with
/// no run in common, a deep page. A prepared statement (`list_runs` uses
/// one) is planned for its values at first and may get a generic plan after
/// five runs: both are checked. A plan reads no more rows of the table than
/// the page holds (50, plus one to know there is a next), and at most a few
/// index pages besides (a bitmap scan's entries).
#[tokio::test]
async fn list_queries_read_their_page_through_an_index() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    drop(backend.open(StateQuota::default()).await);
    // 1% `rare` (never failed), 15% `old` (all among the oldest 30%), 5%
    // failed, 0.1% running, 40 children of one run.
    backend
        .execute(
            "INSERT INTO workflow_sources (digest, source) VALUES ('d', '');
             INSERT INTO runs (id, workflow, status, created_at, input, output,
                 workflow_digest, workflow_file, parent_run)
             SELECT lpad(i::text, 8, '0'),
                 CASE WHEN i % 100 = 0 THEN 'rare'
                      WHEN i <= 6000 AND i % 2 = 1 THEN 'old' ELSE 'common' END,
                 CASE WHEN i % 1000 = 0 THEN 'running'
                      WHEN i % 20 = 5 THEN 'failed' ELSE 'succeeded' END,
                 '', repeat('x', 500), '{}', 'd', 'w.toml',
                 CASE WHEN i % 500 = 7 THEN 'parent' END
             FROM generate_series(1, 20000) AS i",
        )
        .await;
    backend.execute("VACUUM ANALYZE runs").await;
    let query = |workflow: Option<&str>, status: Option<RunStatus>, below: Option<u32>| RunQuery {
        workflow: workflow.map(str::to_owned),
        status,
        parent: None,
        limit: 50,
        cursor: below.map(|id| crate::store::rows::encode_cursor(&format!("{id:08}"))),
    };
    let cases = [
        query(None, None, None),
        query(None, Some(RunStatus::Running), None),
        query(None, Some(RunStatus::Cancelled), None),
        query(None, Some(RunStatus::Succeeded), None),
        query(Some("rare"), None, None),
        query(Some("old"), None, None),
        query(Some("rare"), Some(RunStatus::Failed), None),
        query(Some("rare"), Some(RunStatus::Running), None),
        query(Some("old"), Some(RunStatus::Succeeded), None),
        query(Some("common"), Some(RunStatus::Failed), None),
        query(None, None, Some(5000)),
        query(Some("common"), None, Some(5000)),
        query(Some("rare"), Some(RunStatus::Succeeded), Some(5000)),
        RunQuery {
            parent: Some("parent".into()),
            status: Some(RunStatus::Succeeded),
            ..query(Some("common"), None, None)
        },
    ];
    let client = backend.client().await;
    for plans in ["force_custom_plan", "force_generic_plan"] {
        client
            .batch_execute(&format!("SET plan_cache_mode = {plans}; DEALLOCATE ALL"))
            .await
            .unwrap();
        for (n, case) in cases.iter().enumerate() {
            let listing = run_listing(case).unwrap();
            let values: Vec<String> = listing
                .params
                .iter()
                .map(|param| match param {
                    ListParam::Text(text) => format!("'{text}'"),
                    ListParam::Integer(n) => n.to_string(),
                })
                .collect();
            client
                .batch_execute(&format!("PREPARE page{n} AS {}", listing.sql))
                .await
                .unwrap();
            let explain = format!(
                "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) EXECUTE page{n}({})",
                values.join(", ")
            );
            let rows = client.query(&explain, &[]).await.unwrap();
            let plan: serde_json::Value =
                serde_json::from_str(&rows[0].get::<_, Json>(0).0).unwrap();
            let plan = &plan[0]["Plan"];
            let (rows, entries) = reads(plan);
            assert!(
                rows <= 51.0 && entries <= 1000.0,
                "{plans}: {case:?} read {rows} rows and {entries} bitmap entries:\n{plan:#}"
            );
        }
    }
}

use tokio_postgres::types::{FromSql, Type};

/// A `json` column's text.
struct Json(String);

impl<'a> FromSql<'a> for Json {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Json, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Json(String::from_utf8(raw.to_vec())?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSON
    }
}

/// What the scans of an `EXPLAIN (ANALYZE, FORMAT JSON)` plan read, over
/// all their loops: rows of the table (those they returned and those their
/// filters threw away; a sequential scan counts as the whole table), and
/// the entries of bitmap index scans.
fn reads(plan: &serde_json::Value) -> (f64, f64) {
    let count = |key: &str| plan[key].as_f64().unwrap_or(0.0);
    let loops = count("Actual Loops");
    let (mut rows, mut entries) = match plan["Node Type"].as_str().unwrap_or_default() {
        "Seq Scan" => (f64::INFINITY, 0.0),
        "Bitmap Index Scan" => (0.0, count("Actual Rows") * loops),
        node if node.ends_with("Scan") => (
            (count("Actual Rows")
                + count("Rows Removed by Filter")
                + count("Rows Removed by Index Recheck"))
                * loops,
            0.0,
        ),
        _ => (0.0, 0.0),
    };
    for below in plan["Plans"].as_array().into_iter().flatten() {
        let (more_rows, more_entries) = reads(below);
        rows += more_rows;
        entries += more_entries;
    }
    (rows, entries)
}

/// Nothing listens on the port: the error says where, is `Unavailable`
/// (so a request answers 503), and never shows the password.
#[tokio::test]
async fn an_unreachable_database_is_named_without_its_password() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://trellis:s3cret-pw@127.0.0.1:{port}/trellis?connect_timeout=2");
    match PgStore::connect(&url).await {
        Err(StoreError::Unavailable(error)) => {
            let message = error.to_string();
            assert!(
                message.starts_with(&format!(
                    "cannot connect to PostgreSQL at 127.0.0.1:{port}/trellis: "
                )),
                "{message}"
            );
            assert!(!message.contains("s3cret-pw"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match PgStore::connect("postgres://u:pw@db:notaport/x").await {
        Err(StoreError::Database(error)) => {
            assert!(
                error.starts_with("the store URL postgres://u:<redacted>@db:notaport/x is not"),
                "{}",
                &*error
            );
        }
        other => panic!("{other:?}"),
    }
}

// ---- the cluster: claims, leases, fencing ----------------------------------

use crate::record::{RunRecord, StepStatus};
use crate::store::CatalogChange;
use crate::store::contract::{finished_step, new_run, pending_step, queued_run};

const LEASE: Duration = Duration::from_secs(30);

/// A store of the backend's database that joined the cluster as `node`.
async fn node(backend: &PgBackend, node: &str) -> PgStore {
    let store = PgStore::connect_with(backend.config.clone()).await.unwrap();
    store.join(node, "test", LEASE).await.unwrap();
    store
}

/// Ends `node`'s lease now, as if it had stopped renewing (no waiting).
async fn expire(backend: &PgBackend, node: &str) {
    backend
        .execute(&format!(
            "UPDATE nodes SET lease_until = clock_timestamp() - interval '1 second' \
             WHERE id = '{node}'"
        ))
        .await;
}

async fn create_held(store: &PgStore) -> RunRecord {
    let record = queued_run("orders");
    let created = store.create_run(new_run(&record, None)).await.unwrap();
    assert!(matches!(created, Created::New));
    record
}

fn ids(runs: &[UnfinishedRun]) -> Vec<&str> {
    runs.iter().map(|run| run.record.id.as_str()).collect()
}

/// A run is held by the node that accepted it; another node claims it only
/// once that node's lease ran out, and gets it as stored.
#[tokio::test]
async fn a_claim_takes_only_runs_whose_holder_is_gone() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let mut record = create_held(&a).await;
    a.run_started(&record.id, "t1").await.unwrap();
    let done = finished_step("parse");
    a.save_step(&record.id, 0, &done, Commit::Now)
        .await
        .unwrap();
    assert!(b.claim(10, true).await.unwrap().is_empty(), "a is alive");

    expire(&backend, "a").await;
    let claimed = b.claim(10, true).await.unwrap();
    assert_eq!(ids(&claimed), [record.id.as_str()]);
    record.status = RunStatus::Running;
    record.started_at = Some("t1".into());
    record.steps[0] = done;
    assert_eq!(claimed[0].record, record);
    assert_eq!(claimed[0].workflow_source, contract::SOURCE);
    assert!(!claimed[0].cancel_requested);
    assert!(b.claim(10, true).await.unwrap().is_empty(), "claimed once");
    assert!(a.claim(10, true).await.unwrap().is_empty(), "b is alive");
    assert_eq!(
        backend
            .scalar(&format!(
                "SELECT epoch FROM runs WHERE id = '{}'",
                record.id
            ))
            .await,
        Some(2)
    );
}

/// Once another node claimed a run, nothing the old holder writes of it
/// lands; its next renewal says it lost the run.
#[tokio::test]
async fn a_node_that_lost_a_run_writes_nothing_of_it() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let record = create_held(&a).await;
    expire(&backend, "a").await;
    assert_eq!(b.claim(10, true).await.unwrap().len(), 1);
    let mut running = pending_step("price");
    running.status = StepStatus::Running;
    b.save_step(&record.id, 1, &running, Commit::Now)
        .await
        .unwrap();
    let held_by_b = b.get_run(&record.id).await.unwrap().unwrap();

    let late = [
        a.save_step(&record.id, 1, &finished_step("price"), Commit::Now)
            .await,
        a.run_started(&record.id, "t9").await,
        a.save_item(
            &record.id,
            1,
            0,
            &ItemRecord {
                item: serde_json::json!(1),
                attempts: Vec::new(),
                outcome: None,
            },
            Commit::Soon,
        )
        .await,
    ];
    for result in late {
        match result {
            Err(StoreError::Fenced(message)) => assert!(
                message.contains("late write is dropped") && message.contains(&record.id),
                "{message}"
            ),
            other => panic!("a fenced write: {other:?}"),
        }
    }
    // Its next renewal tells it; from then on it writes nothing of the run.
    let renewal = a.renew(LEASE, 0).await.unwrap();
    assert_eq!(renewal.lost, std::slice::from_ref(&record.id));
    assert!(renewal.cancel.is_empty());
    assert_eq!(
        a.renew(LEASE, 0).await.unwrap(),
        Renewal {
            peers: 1,
            ..Renewal::default()
        },
        "nothing lost or to cancel; `b` is a peer"
    );
    let mut finished = held_by_b.clone();
    finished.status = RunStatus::Failed;
    assert!(matches!(
        a.finish_run(&finished).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(b.get_run(&record.id).await.unwrap().unwrap(), held_by_b);
    assert_eq!(
        backend
            .scalar(&format!(
                "SELECT count(*) FROM step_items WHERE run_id = '{}'",
                record.id
            ))
            .await,
        Some(0)
    );
    // A late write in a batch with others fails alone.
    let other = create_held(&a).await;
    let fenced = a.save_step(&record.id, 0, &finished_step("parse"), Commit::Soon);
    let fine = a.save_step(&other.id, 0, &finished_step("parse"), Commit::Now);
    assert!(matches!(fenced.await, Err(StoreError::Fenced(_))));
    fine.await.unwrap();
    assert_eq!(b.get_run(&record.id).await.unwrap().unwrap(), held_by_b);
    let other = a.get_run(&other.id).await.unwrap().unwrap();
    assert_eq!(other.steps[0], finished_step("parse"));
}

/// Nodes claiming at once share the claimable runs: each is claimed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_claiming_at_once_claim_each_run_once() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let gone = node(&backend, "gone").await;
    let mut all = Vec::new();
    for _ in 0..60 {
        all.push(create_held(&gone).await.id);
    }
    expire(&backend, "gone").await;
    let claimers: Vec<_> = ["b", "c", "d"]
        .into_iter()
        .map(|name| {
            let config = backend.config.clone();
            tokio::spawn(async move {
                let store = PgStore::connect_with(config).await.unwrap();
                store.join(name, "test", LEASE).await.unwrap();
                let mut mine = Vec::new();
                loop {
                    let batch = store.claim(7, true).await.unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.into_iter().map(|run| run.record.id));
                }
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for claimer in claimers {
        claimed.extend(claimer.await.unwrap());
    }
    claimed.sort();
    all.sort();
    assert_eq!(claimed, all, "every run claimed exactly once");
}

/// A node that leaves releases its runs: another claims them at once,
/// and a listener hears of it.
#[tokio::test]
async fn leaving_releases_runs_at_once() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let mut listener = b.listen().await.unwrap();
    let record = create_held(&a).await;
    assert_eq!(a.leave().await.unwrap(), 1);
    let note = tokio::time::timeout(Duration::from_secs(10), listener.next())
        .await
        .expect("no notification");
    assert_eq!(note.as_deref(), Some("released"));
    assert_eq!(ids(&b.claim(10, true).await.unwrap()), [record.id.as_str()]);
    let nodes = b.nodes().await.unwrap();
    assert_eq!(
        nodes
            .iter()
            .map(|n| (n.id.as_str(), n.alive))
            .collect::<Vec<_>>(),
        [("b", true)]
    );
}

/// A cancel asked on any node reaches the holder at its renewal (and at
/// once through the work channel); a run claimed after it comes marked.
#[tokio::test]
async fn a_cancel_request_reaches_whoever_holds_the_run() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let mut listener = a.listen().await.unwrap();
    let record = create_held(&a).await;
    assert!(b.request_cancel(&record.id).await.unwrap());
    let note = tokio::time::timeout(Duration::from_secs(10), listener.next())
        .await
        .expect("no notification");
    assert_eq!(note.as_deref(), Some("cancel"));
    let renewal = a.renew(LEASE, 3).await.unwrap();
    assert_eq!(renewal.cancel, std::slice::from_ref(&record.id));
    assert!(renewal.lost.is_empty());
    expire(&backend, "a").await;
    let claimed = b.claim(10, true).await.unwrap();
    assert!(claimed[0].cancel_requested);

    let mut finished = claimed[0].record.clone();
    finished.status = RunStatus::Cancelled;
    b.finish_run(&finished).await.unwrap();
    assert!(!b.request_cancel(&record.id).await.unwrap(), "finished");
    assert!(!b.request_cancel("no-such-run").await.unwrap());
    let nodes = b.nodes().await.unwrap();
    let a_row = nodes.iter().find(|n| n.id == "a").unwrap();
    assert_eq!((a_row.alive, a_row.running_steps), (false, 3));
}

/// Uploads made on one node come to the others in order, not back to it.
#[tokio::test]
async fn uploads_are_shared_in_order_with_the_other_nodes() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let mut listener = b.listen().await.unwrap();
    let changes = [
        CatalogChange::PutPlugin {
            name: "p".into(),
            bytes: vec![0, 97, 115, 109],
        },
        CatalogChange::PutWorkflow {
            name: "w".into(),
            source: "[[step]]\nid = \"ä\"\n".into(),
        },
        CatalogChange::DeletePlugin {
            name: "p".into(),
            version: Some("1.0.0".into()),
        },
        CatalogChange::DeletePlugin {
            name: "q".into(),
            version: None,
        },
    ];
    for change in &changes {
        a.publish(change).await.unwrap();
    }
    let note = tokio::time::timeout(Duration::from_secs(10), listener.next())
        .await
        .expect("no notification");
    assert_eq!(note.as_deref(), Some("catalog"));
    let (seen, newest) = b.catalog_since(0).await.unwrap();
    assert_eq!(
        seen.iter()
            .map(|(_, change)| change.clone())
            .collect::<Vec<_>>(),
        changes
    );
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(newest, seen.last().unwrap().0);
    assert_eq!(a.catalog_since(0).await.unwrap(), (Vec::new(), newest));
    assert_eq!(b.catalog_since(newest).await.unwrap(), (Vec::new(), newest));
}

/// Many writes of each kind queued at once (one batch of the pipelined
/// path, one statement per kind): runs created with one key make one run,
/// a step saved twice keeps its later record, items dropped by their step's
/// finish are gone while another step's stay, and a run finished in the
/// batch is finished.
#[tokio::test]
async fn one_batch_of_many_writes_of_each_kind() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let store = node(&backend, "a").await;
    let records: Vec<RunRecord> = (0..8).map(|_| queued_run("orders")).collect();
    let keys = [
        Some("k"),
        None,
        Some("k"),
        None,
        Some("k"),
        None,
        None,
        None,
    ];
    let created = futures::future::join_all(
        records
            .iter()
            .zip(keys)
            .map(|(record, key)| store.create_run(new_run(record, key))),
    )
    .await;
    let new: Vec<&RunRecord> = records
        .iter()
        .zip(&created)
        .filter(|(_, created)| matches!(created, Ok(Created::New)))
        .map(|(record, _)| record)
        .collect();
    assert_eq!(new.len(), 6, "{created:?}");
    let keyed: Vec<_> = created
        .iter()
        .filter_map(|created| match created {
            Ok(Created::Existing(run)) => Some(run.id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(keyed.len(), 2, "{created:?}");
    assert!(keyed.iter().all(|id| *id == keyed[0]));

    let item = |n: i64| ItemRecord {
        item: serde_json::json!(n),
        attempts: Vec::new(),
        outcome: None,
    };
    let mut running = pending_step("parse");
    running.status = StepStatus::Running;
    let mut queued = Vec::new();
    for record in &new {
        queued.push(store.run_started(&record.id, "t1"));
        queued.push(store.save_step(&record.id, 0, &running, Commit::Soon));
        queued.push(store.save_item(&record.id, 0, 0, &item(0), Commit::Soon));
        queued.push(store.save_item(&record.id, 1, 0, &item(1), Commit::Soon));
        queued.push(store.save_step(&record.id, 0, &finished_step("parse"), Commit::Soon));
    }
    let finished = {
        let mut finished = (*new[0]).clone();
        finished.status = RunStatus::Cancelled;
        finished
    };
    let (results, finish) = tokio::join!(
        futures::future::join_all(queued),
        store.finish_run(&finished)
    );
    for result in results {
        result.unwrap();
    }
    finish.unwrap();
    let run = store.get_run(&finished.id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    let unfinished = store.unfinished_runs().await.unwrap();
    assert_eq!(unfinished.len(), new.len() - 1);
    for run in unfinished {
        assert_eq!(run.record.status, RunStatus::Running);
        assert_eq!(run.record.started_at.as_deref(), Some("t1"));
        assert_eq!(run.record.steps[0], finished_step("parse"));
        assert_eq!(run.items.keys().collect::<Vec<_>>(), vec![&(1, 0)]);
    }
}

/// A run a busy node leaves for others has no owner: a claim takes it only
/// when it asks for ready runs, and then the claimer holds it.
#[tokio::test]
async fn a_ready_run_left_by_a_busy_node_is_claimed_by_one_with_room() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let busy = node(&backend, "busy").await;
    let free = node(&backend, "free").await;
    let record = queued_run("orders");
    let created = busy
        .create_run_held(new_run(&record, None), false)
        .await
        .unwrap();
    assert!(matches!(created, Created::New));
    busy.announce_ready().await.unwrap();
    // Not taken over (its node is alive), only claimed as ready work.
    assert!(free.claim(10, false).await.unwrap().is_empty());
    let claimed = free.claim(10, true).await.unwrap();
    assert_eq!(ids(&claimed), [record.id.as_str()]);
    assert_eq!(claimed[0].record.status, RunStatus::Queued);
    assert!(
        busy.claim(10, true).await.unwrap().is_empty(),
        "claimed once"
    );
    // The claimer holds it: its writes land, the busy node's do not.
    free.run_started(&record.id, "t1").await.unwrap();
    assert!(matches!(
        busy.run_started(&record.id, "t2").await,
        Err(StoreError::Fenced(_))
    ));
}

/// Steps of one run queued one after the other (a step's end and the next
/// one's start, or the last step's end and the run's) share a statement:
/// they land as queued, a row written twice keeps the later record, and when
/// the run is fenced each of them says so.
#[tokio::test]
async fn steps_queued_together_land_in_order_and_are_fenced_together() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let record = create_held(&a).await;
    let mut running = pending_step("parse");
    running.status = StepStatus::Running;
    let mut price_running = pending_step("price");
    price_running.status = StepStatus::Running;
    // Finished steps without `for_each` items (whose rows would be dropped in
    // a statement of their own).
    let parse_done = StepRecord {
        items: None,
        ..finished_step("parse")
    };
    let price_done = StepRecord {
        items: None,
        ..finished_step("price")
    };
    // One batch: nothing runs the writer (a current-thread runtime) before
    // the last is awaited.
    let queued = [
        a.save_step(&record.id, 0, &running, Commit::Soon),
        a.save_step(&record.id, 1, &price_running, Commit::Soon),
        a.save_step(&record.id, 0, &parse_done, Commit::Soon),
        a.save_step(&record.id, 1, &price_done, Commit::Now),
    ];
    for result in futures::future::join_all(queued).await {
        result.unwrap();
    }
    let stored = a.get_run(&record.id).await.unwrap().unwrap();
    assert_eq!(stored.steps, [parse_done.clone(), price_done.clone()]);

    // A step's end queued just before its run's end: the run's end carries it.
    let other = create_held(&a).await;
    let finished = RunRecord {
        status: RunStatus::Succeeded,
        steps: vec![parse_done, price_done],
        ..other.clone()
    };
    let (step, finish) = tokio::join!(
        a.save_step(&other.id, 1, &price_running, Commit::Soon),
        a.finish_run(&finished)
    );
    step.unwrap();
    finish.unwrap();
    assert_eq!(a.get_run(&other.id).await.unwrap().unwrap(), finished);

    let b = node(&backend, "b").await;
    expire(&backend, "a").await;
    assert_eq!(b.claim(10, true).await.unwrap().len(), 1);
    let late = [
        a.save_step(&record.id, 0, &running, Commit::Soon),
        a.save_step(&record.id, 1, &price_running, Commit::Soon),
    ];
    let taken = RunRecord {
        id: record.id.clone(),
        ..finished.clone()
    };
    let (late, finish) = tokio::join!(futures::future::join_all(late), a.finish_run(&taken));
    for result in late.into_iter().chain([finish]) {
        assert!(matches!(result, Err(StoreError::Fenced(_))), "{result:?}");
    }
    assert_eq!(
        b.get_run(&record.id).await.unwrap().unwrap().steps,
        stored.steps
    );

    let gone = [
        b.save_step(
            "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b",
            0,
            &running,
            Commit::Soon,
        ),
        b.save_step(
            "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b",
            1,
            &running,
            Commit::Now,
        ),
    ];
    for result in futures::future::join_all(gone).await {
        assert!(
            matches!(&result, Err(e) if e.to_string().contains("0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b")),
            "{result:?}"
        );
    }
}

/// Runs whose whole progress is queued together (side-effect-free steps do
/// not wait for the store): each run's start and steps, interleaved with
/// other runs', land with its end, which carries them; a run not finished in
/// the batch keeps each write; and once the runs are taken over, every one of
/// those writes says it was fenced and none lands.
#[tokio::test]
async fn runs_queued_interleaved_with_their_ends_land_and_are_fenced() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let mut running = pending_step("parse");
    running.status = StepStatus::Running;
    let done = StepRecord {
        items: None,
        ..finished_step("parse")
    };
    let runs = [
        create_held(&a).await,
        create_held(&a).await,
        create_held(&a).await,
    ];
    let finished: Vec<RunRecord> = runs
        .iter()
        .map(|run| RunRecord {
            status: RunStatus::Succeeded,
            started_at: Some("2026-12-07T21:00:00.000Z".to_owned()),
            steps: vec![done.clone(), pending_step("price")],
            ..run.clone()
        })
        .collect();
    let batch = |store: &PgStore| {
        let mut queued = Vec::new();
        for run in &runs {
            queued.push(store.run_started(&run.id, "2026-12-07T21:00:00.000Z"));
        }
        for run in &runs {
            queued.push(store.save_step(&run.id, 0, &running, Commit::Soon));
        }
        for run in &runs {
            queued.push(store.save_step(&run.id, 0, &done, Commit::Soon));
        }
        queued
    };
    // One batch per writer: nothing runs the writers (a current-thread
    // runtime) before the joins are awaited. The third run does not finish.
    let (progress, first, second) = tokio::join!(
        futures::future::join_all(batch(&a)),
        a.finish_run(&finished[0]),
        a.finish_run(&finished[1]),
    );
    for result in progress.into_iter().chain([first, second]) {
        result.unwrap();
    }
    for run in &finished[..2] {
        assert_eq!(a.get_run(&run.id).await.unwrap().unwrap(), *run);
    }
    let open = a.get_run(&runs[2].id).await.unwrap().unwrap();
    assert_eq!(open.status, RunStatus::Running);
    assert_eq!(open.steps, [done.clone(), pending_step("price")]);

    let b = node(&backend, "b").await;
    expire(&backend, "a").await;
    assert_eq!(b.claim(10, true).await.unwrap().len(), 1);
    let open_id = &runs[2].id;
    let late = [
        a.run_started(open_id, "2026-12-07T21:00:00.000Z"),
        a.save_step(open_id, 0, &running, Commit::Soon),
        a.save_step(open_id, 0, &done, Commit::Soon),
    ];
    let end = RunRecord {
        id: open_id.clone(),
        ..finished[0].clone()
    };
    let (late, end) = tokio::join!(futures::future::join_all(late), a.finish_run(&end));
    for result in late.into_iter().chain([end]) {
        assert!(matches!(result, Err(StoreError::Fenced(_))), "{result:?}");
    }
    assert_eq!(b.get_run(open_id).await.unwrap().unwrap(), open);
}

/// A step offered by the node holding its run is claimed by one node only,
/// in batches, and not again; its outcome reaches the holder; a task not yet
/// claimed can be withdrawn, a claimed one not; a claimer whose lease ran out
/// leaves its task orphaned and cannot store an outcome for it; and once the
/// run is taken over its tasks are neither claimable nor finishable.
#[tokio::test]
async fn offered_steps_are_claimed_once_and_fenced_by_lease_and_epoch() {
    let Some(backend) = PgBackend::fresh().await else {
        return;
    };
    let a = node(&backend, "a").await;
    let b = node(&backend, "b").await;
    let c = node(&backend, "c").await;
    let run = create_held(&a).await;
    for task in ["t1", "t2", "t3"] {
        a.offer_task(task, &run.id, &format!("{{\"task\":\"{task}\"}}"))
            .await
            .unwrap();
    }
    // Only the holder offers.
    assert!(matches!(
        b.offer_task("t9", &run.id, "{}").await,
        Err(StoreError::Fenced(_))
    ));

    let (first, second) = tokio::join!(b.claim_tasks(2), c.claim_tasks(2));
    let (first, second) = (first.unwrap(), second.unwrap());
    let mut claimed: Vec<&str> = first.iter().chain(&second).map(|t| t.id.as_str()).collect();
    claimed.sort_unstable();
    assert_eq!(claimed, ["t1", "t2", "t3"], "each claimed once");
    assert!(first.iter().chain(&second).all(|t| t.run_id == run.id));
    assert_eq!(
        first
            .iter()
            .chain(&second)
            .find(|t| t.id == "t1")
            .unwrap()
            .request,
        "{\"task\":\"t1\"}"
    );
    assert!(b.claim_tasks(10).await.unwrap().is_empty());
    assert!(
        !a.withdraw_task("t1").await.unwrap(),
        "claimed: not withdrawn"
    );
    assert_eq!(a.task_state("t1").await.unwrap(), TaskState::Open);

    let b_has = |id: &str| first.iter().any(|t| t.id == id);
    let (mine, theirs) = if b_has("t1") { (&b, &c) } else { (&c, &b) };
    assert!(!theirs.finish_task("t1", "\"not mine\"").await.unwrap());
    assert!(mine.finish_task("t1", "\"ok\"").await.unwrap());
    assert_eq!(
        a.task_state("t1").await.unwrap(),
        TaskState::Done("\"ok\"".to_owned())
    );
    a.remove_task("t1").await.unwrap();
    assert_eq!(a.task_state("t1").await.unwrap(), TaskState::Gone);

    // An unclaimed task is withdrawn.
    a.offer_task("t4", &run.id, "{}").await.unwrap();
    assert!(a.withdraw_task("t4").await.unwrap());
    assert_eq!(a.task_state("t4").await.unwrap(), TaskState::Gone);

    // The claimer of t2 dies: its task is orphaned, and not claimed again.
    let t2_claimer = if b_has("t2") { "b" } else { "c" };
    let t2_store = if b_has("t2") { &b } else { &c };
    expire(&backend, t2_claimer).await;
    assert_eq!(
        a.task_state("t2").await.unwrap(),
        TaskState::Orphaned(t2_claimer.to_owned())
    );
    assert!(a.claim_tasks(10).await.unwrap().is_empty());
    assert!(!t2_store.finish_task("t2", "\"late\"").await.unwrap());

    // The run is taken over: what a offered is dropped by the sweep.
    a.offer_task("t5", &run.id, "{}").await.unwrap();
    expire(&backend, "a").await;
    let d = node(&backend, "d").await;
    assert_eq!(d.claim(10, false).await.unwrap().len(), 1);
    assert!(
        d.claim_tasks(10).await.unwrap().is_empty(),
        "t5 is a's epoch's"
    );
    let t3_store = if b_has("t3") { &b } else { &c };
    assert!(!t3_store.finish_task("t3", "\"late\"").await.unwrap());
    assert_eq!(d.sweep_tasks().await.unwrap(), 3, "t2, t3 and t5");
    assert_eq!(a.task_state("t5").await.unwrap(), TaskState::Gone);
}
