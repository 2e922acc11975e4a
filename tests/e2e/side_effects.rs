//! Side effects decide what a step waits for: a step of a side-effect-free
//! plugin does not wait for the store before it starts, while a step with
//! side effects starts only once everything before it is durable. Checked
//! in one process against a store that makes a write durable only when a
//! write someone waits for ([`Commit::Now`]) arrives, in the order queued,
//! as the real stores' group commit does (but with an endless linger, so a
//! step that did not wait would be caught every time).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Value, json};
use trellis::engine::{Engine, Limits};
use trellis::executor::{Executor, RunOptions};
use trellis::plugin::{MemoryStateStore, PluginRegistry, StateStore};
use trellis::record::{RunRecord, RunStatus, StepRecord, StepStatus};
use trellis::store::{
    Commit, Created, ItemRecord, NewRun, Queued, RunPage, RunQuery, RunWorkflow, Store, StoreError,
    UnfinishedRun, WorkflowStats,
};

use crate::support::*;

/// One step write as the store saw it.
#[derive(Debug, Clone, PartialEq)]
struct Saved {
    step: usize,
    status: StepStatus,
    commit: Commit,
}

#[derive(Default)]
struct Writes {
    /// Queued, not yet durable.
    pending: Vec<Saved>,
    durable: Vec<Saved>,
    /// Every write, in the order queued.
    all: Vec<Saved>,
}

/// Holds [`Commit::Soon`] writes back until a write someone waits for (or
/// the run's end) commits them all, in order.
#[derive(Default)]
struct GateStore {
    writes: Mutex<Writes>,
}

impl GateStore {
    fn durable(&self) -> Vec<Saved> {
        self.writes.lock().unwrap().durable.clone()
    }

    fn all(&self) -> Vec<Saved> {
        self.writes.lock().unwrap().all.clone()
    }

    fn commit_all(writes: &mut Writes) {
        let pending = std::mem::take(&mut writes.pending);
        writes.durable.extend(pending);
    }
}

fn done() -> Queued {
    Queued::new(async { Ok(()) })
}

#[async_trait]
impl Store for GateStore {
    async fn create_run(&self, _: NewRun<'_>) -> Result<Created, StoreError> {
        unreachable!("the executor does not create runs")
    }
    async fn get_run(&self, _: &str) -> Result<Option<RunRecord>, StoreError> {
        unreachable!("the executor does not read runs")
    }
    async fn run_workflow(&self, _: &str) -> Result<Option<RunWorkflow>, StoreError> {
        unreachable!("the executor does not read runs")
    }
    async fn list_runs(&self, _: &RunQuery) -> Result<RunPage, StoreError> {
        unreachable!("the executor does not list runs")
    }
    fn run_started(&self, _: &str, _: &str) -> Queued {
        done()
    }
    fn save_step(&self, _: &str, index: usize, step: &StepRecord, commit: Commit) -> Queued {
        let saved = Saved {
            step: index,
            status: step.status,
            commit,
        };
        let mut writes = self.writes.lock().unwrap();
        writes.all.push(saved.clone());
        writes.pending.push(saved);
        if commit == Commit::Now {
            GateStore::commit_all(&mut writes);
        }
        done()
    }
    fn save_item(&self, _: &str, _: usize, _: usize, _: &ItemRecord, _: Commit) -> Queued {
        unreachable!("no for_each here")
    }
    async fn finish_run(&self, _: &RunRecord) -> Result<(), StoreError> {
        GateStore::commit_all(&mut self.writes.lock().unwrap());
        Ok(())
    }
    async fn unfinished_runs(&self) -> Result<Vec<UnfinishedRun>, StoreError> {
        Ok(Vec::new())
    }
    async fn workflow_stats(&self, _: &str, _: &str) -> Result<WorkflowStats, StoreError> {
        unreachable!("the executor computes no metrics")
    }
    async fn state_get(&self, _: &str, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
        unreachable!("plugin state goes through the executor's StateStore")
    }
    async fn state_set(&self, _: &str, _: &str, _: &[u8]) -> Result<(), StoreError> {
        unreachable!("plugin state goes through the executor's StateStore")
    }
    async fn state_delete(&self, _: &str, _: &str) -> Result<(), StoreError> {
        unreachable!("plugin state goes through the executor's StateStore")
    }
}

/// Plugin state in memory that notes what the store had made durable when a
/// plugin first wrote: the moment the step changed the world.
struct WatchedState {
    store: Arc<GateStore>,
    inner: MemoryStateStore,
    durable_at_first_set: Mutex<Option<Vec<Saved>>>,
}

#[async_trait]
impl StateStore for WatchedState {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(scope, key).await
    }
    async fn set(&self, scope: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.durable_at_first_set
            .lock()
            .unwrap()
            .get_or_insert_with(|| self.store.durable());
        self.inner.set(scope, key, value).await
    }
    async fn delete(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        self.inner.delete(scope, key).await
    }
}

/// `a` and `b` run `noop` (no imports that reach the world), `c` runs
/// `probe`, which writes state.
const CHAIN: &str = r#"
[[step]]
id = "a"
plugin = "noop"
input = "{{ input }}"

[[step]]
id = "b"
plugin = "noop"
needs = ["a"]
input = "{{ steps.a.output }}"

[[step]]
id = "c"
plugin = "probe"
needs = ["b"]
input = { counter = "c", seen = "{{ steps.b.output }}" }
"#;

#[test]
fn a_step_with_side_effects_starts_only_after_its_upstream_is_durable() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let registry = PluginRegistry::new(Engine::new().unwrap()).unwrap();
        let report = registry.load_dirs(&[FIXTURE_PLUGINS.into()]).await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let registry = Arc::new(registry);
        let store = Arc::new(GateStore::default());
        let state = Arc::new(WatchedState {
            store: store.clone(),
            inner: MemoryStateStore::default(),
            durable_at_first_set: Mutex::new(None),
        });
        let executor = Executor::new(registry.clone(), Limits::default(), 4, state.clone());
        let plan = Arc::new(
            trellis::workflow::parse_str(CHAIN, "chain.toml", "chain", registry.as_ref()).unwrap(),
        );
        let record = executor
            .run(
                plan,
                json!({ "order": 7 }),
                RunOptions {
                    store: Some(store.clone() as Arc<dyn Store>),
                    ..RunOptions::default()
                },
            )
            .await;
        assert_eq!(record.status, RunStatus::Succeeded, "{record:#?}");
        assert_eq!(
            record.steps[2].output["input"]["seen"],
            json!({ "order": 7 })
        );

        // When `c` wrote state, `a` and `b` had finished durably.
        let durable = state
            .durable_at_first_set
            .lock()
            .unwrap()
            .clone()
            .expect("probe wrote its counter");
        for step in [0, 1] {
            assert!(
                durable
                    .iter()
                    .any(|saved| saved.step == step && saved.status == StepStatus::Succeeded),
                "step {step}'s result was not durable when `c` started: {durable:?}"
            );
        }

        // How each step's start was queued: `a` and `b` did not wait, `c` did.
        let starts: Vec<(usize, Commit)> = store
            .all()
            .iter()
            .filter(|saved| saved.status == StepStatus::Running)
            .map(|saved| (saved.step, saved.commit))
            .collect();
        assert_eq!(
            starts,
            [(0, Commit::Soon), (1, Commit::Soon), (2, Commit::Now)],
            "{:?}",
            store.all()
        );
        // Nothing of `a` and `b` was waited for: the first write that
        // committed anything was `c`'s start.
        assert!(
            store
                .all()
                .iter()
                .take_while(|saved| saved.step < 2)
                .all(|saved| saved.commit == Commit::Soon),
            "{:?}",
            store.all()
        );
    });
}

/// `GET /v1/plugins` says which plugins have side effects.
#[test]
fn the_plugin_list_shows_side_effects() {
    let server = Serve::new().start();
    let list = server.get("/v1/plugins").json();
    let effects = |name: &str| -> Value {
        list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .find(|plugin| plugin["name"] == name)
            .unwrap_or_else(|| panic!("no plugin {name}: {list:#}"))["side_effects"]
            .clone()
    };
    assert_eq!(effects("noop"), json!([]));
    assert_eq!(effects("json-transform"), json!([]));
    assert_eq!(effects("probe"), json!(["state"]));
    assert_eq!(effects("http-request"), json!(["http"]));
}
