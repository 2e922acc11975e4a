//! The runs the `list` part stores before it measures: what a server that
//! has run for a month holds, made up deterministically (the same runs,
//! bar their ids' random bits, every time), and stored through the store's
//! own API.
//!
//! - five workflows of three steps each; one of them, `legacy-import`,
//!   stopped running a while ago, so its runs are all among the oldest (a
//!   filter on it cannot stop early in the newest runs);
//! - finished runs succeeded, failed (5%) or cancelled (0.5%), each with the
//!   step records, attempts, logs and metrics a real run has;
//! - the newest `deploy` runs are still in flight (`running` or `queued`):
//!   their middle step sleeps for an hour, so when `trellis serve` takes
//!   them over they stay in flight while the list is measured; `running` is
//!   the status with very few rows;
//! - one `reports` run in twenty fans out to twenty child runs of `orders`
//!   (a sub-workflow step), for the `parent` filter.
//!
//! Ids are UUIDv7 made from each run's creation time, spread evenly over
//! the 30 days before now, as `trellis serve` would have made them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::{Value, json};
use trellis::record::{
    AttemptRecord, ErrorKind, ErrorRecord, LogLevel, LogLine, LogStream, ParentRef, RunError,
    RunRecord, RunStatus, StepRecord, StepStatus,
};
use trellis::store::{NO_ITEMS, NO_PINS, NewRun, PinnedWorkflows, Store, WorkflowText};

/// A workflow the runs belong to: its name, file and TOML, written to the
/// server's workflow dir and stored with each of its runs.
pub(super) struct Workflow {
    pub name: &'static str,
    pub file: &'static str,
    pub source: &'static str,
    /// Its steps: (id, plugin; empty for the sub-workflow step).
    steps: [(&'static str, &'static str); 3],
}

pub(super) const ORDERS: Workflow = Workflow {
    name: "orders",
    file: "orders.toml",
    source: "[[step]]\nid = \"fetch\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n\n\
             [[step]]\nid = \"price\"\nplugin = \"noop\"\ninput = \"{{ steps.fetch.output }}\"\n\n\
             [[step]]\nid = \"store\"\nplugin = \"noop\"\ninput = \"{{ steps.price.output }}\"\n",
    steps: [("fetch", "noop"), ("price", "noop"), ("store", "noop")],
};

const INVOICES: Workflow = Workflow {
    name: "invoices",
    file: "invoices.toml",
    source: "[[step]]\nid = \"render\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n\n\
             [[step]]\nid = \"sign\"\nplugin = \"noop\"\ninput = \"{{ steps.render.output }}\"\n\n\
             [[step]]\nid = \"send\"\nplugin = \"noop\"\ninput = \"{{ steps.sign.output }}\"\n",
    steps: [("render", "noop"), ("sign", "noop"), ("send", "noop")],
};

pub(super) const REPORTS: Workflow = Workflow {
    name: "reports",
    file: "reports.toml",
    source: "[[step]]\nid = \"collect\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n\n\
             [[step]]\nid = \"fan\"\nworkflow = \"orders\"\nfor_each = \"{{ steps.collect.output.items }}\"\n\
             input = { sku = \"{{ item.sku }}\" }\n\n\
             [[step]]\nid = \"summarize\"\nplugin = \"noop\"\ninput = \"{{ steps.fan.output }}\"\n",
    steps: [("collect", "noop"), ("fan", ""), ("summarize", "noop")],
};

pub(super) const DEPLOY: Workflow = Workflow {
    name: "deploy",
    file: "deploy.toml",
    source: "[[step]]\nid = \"plan\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n\n\
             [[step]]\nid = \"wait\"\nplugin = \"sleep\"\nneeds = [\"plan\"]\ninput = { ms = 3600000 }\n\
             limits = { timeout = \"2h\" }\n\n\
             [[step]]\nid = \"announce\"\nplugin = \"noop\"\nneeds = [\"wait\"]\n\
             input = \"{{ steps.plan.output }}\"\n",
    steps: [("plan", "noop"), ("wait", "sleep"), ("announce", "noop")],
};

pub(super) const LEGACY: Workflow = Workflow {
    name: "legacy-import",
    file: "legacy-import.toml",
    source: "[[step]]\nid = \"read\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n\n\
             [[step]]\nid = \"map\"\nplugin = \"noop\"\ninput = \"{{ steps.read.output }}\"\n\n\
             [[step]]\nid = \"write\"\nplugin = \"noop\"\ninput = \"{{ steps.map.output }}\"\n",
    steps: [("read", "noop"), ("map", "noop"), ("write", "noop")],
};

pub(super) const WORKFLOWS: [&Workflow; 5] = [&ORDERS, &INVOICES, &REPORTS, &DEPLOY, &LEGACY];

/// How long the stored history is.
const HISTORY: Duration = Duration::from_secs(30 * 24 * 3600);
/// `legacy-import` ran in the oldest 35% of the history only, as about
/// 45% of the runs then.
const LEGACY_UNTIL: f64 = 0.35;
const LEGACY_SHARE: f64 = 0.45;
/// The newest 0.5% of the history: `deploy` runs there are still in flight.
const IN_FLIGHT_FROM: f64 = 0.995;
/// Finished runs that failed, and that were cancelled.
const FAILED: f64 = 0.05;
const CANCELLED: f64 = 0.005;
/// `reports` runs that fan out, and how many child runs each starts.
const FAN_OUT_SHARE: f64 = 0.05;
pub(super) const CHILDREN: usize = 20;
/// Creates in flight at once: enough that every writer batch is full.
const IN_FLIGHT: usize = 1024;

/// How many runs went where, to check the answers against.
#[derive(Debug, Default, Clone)]
pub(super) struct Census {
    pub total: usize,
    /// By workflow, then by status as stored (a `queued` run may be
    /// `running` once the server has taken it over).
    pub by_workflow: BTreeMap<&'static str, BTreeMap<&'static str, usize>>,
    /// The newest run that has children, and how many.
    pub newest_parent: Option<(String, usize)>,
}

impl Census {
    pub fn of_workflow(&self, workflow: &str) -> usize {
        self.by_workflow
            .get(workflow)
            .map_or(0, |statuses| statuses.values().sum())
    }

    pub fn of_status(&self, status: RunStatus) -> usize {
        self.by_workflow
            .values()
            .map(|statuses| statuses.get(status.as_str()).copied().unwrap_or(0))
            .sum()
    }

    pub fn of(&self, workflow: &str, status: RunStatus) -> usize {
        self.by_workflow
            .get(workflow)
            .and_then(|statuses| statuses.get(status.as_str()))
            .copied()
            .unwrap_or(0)
    }

    /// `orders 41,502, invoices 23,101, ...; as stored, queued 14, ...`.
    pub fn summary(&self) -> String {
        let workflows = WORKFLOWS
            .iter()
            .map(|w| format!("{} {}", w.name, thousands(self.of_workflow(w.name))))
            .collect::<Vec<_>>()
            .join(", ");
        let statuses = RunStatus::ALL
            .iter()
            .map(|s| format!("{} {}", s.as_str(), thousands(self.of_status(*s))))
            .collect::<Vec<_>>()
            .join(", ");
        format!("{workflows}; as stored, {statuses}")
    }
}

/// `100000` -> `100,000`.
pub(super) fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One run to store.
pub(super) struct Seeded {
    pub record: RunRecord,
    pub workflow: &'static Workflow,
}

/// The `total` runs, oldest first, each made as it is stored (not all held
/// in memory at once).
pub(super) struct Runs {
    total: usize,
    next: usize,
    start_ms: u64,
    step_ms: f64,
    /// Child runs of the last fan-out still to come, the next one last:
    /// (parent id, item, child id).
    children: Vec<(String, usize, String)>,
    census: Census,
}

impl Runs {
    pub fn new(total: usize) -> Runs {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_millis() as u64;
        // The newest run was made a minute ago.
        let end_ms = now_ms - 60_000;
        let history = HISTORY.as_millis() as u64;
        Runs {
            total,
            next: 0,
            start_ms: end_ms - history,
            step_ms: history as f64 / total as f64,
            children: Vec::new(),
            census: Census {
                total,
                ..Census::default()
            },
        }
    }

    /// What was made so far (all of it once the iterator is done).
    pub fn census(&self) -> &Census {
        &self.census
    }

    fn made_at(&self, i: usize) -> u64 {
        self.start_ms + (i as f64 * self.step_ms) as u64
    }

    fn make(&mut self, i: usize) -> Seeded {
        let at = self.made_at(i);
        if let Some((parent, item, id)) = self.children.pop() {
            // A child of the fan-out before it, under the id its parent's
            // attempt names.
            let mut record = run(&id, &ORDERS, finished_status(i), at, i);
            record.parent = Some(ParentRef {
                run: parent,
                step: "fan".into(),
                item: Some(item),
            });
            return self.counted(record, &ORDERS);
        }
        let id = run_id(at);
        let share = unit(i, 1);
        let position = i as f64 / self.total as f64;
        let workflow: &'static Workflow = if position < LEGACY_UNTIL && share < LEGACY_SHARE {
            &LEGACY
        } else {
            match unit(i, 2) {
                x if x < 0.50 => &ORDERS,
                x if x < 0.78 => &INVOICES,
                x if x < 0.93 => &REPORTS,
                _ => &DEPLOY,
            }
        };
        let status = if std::ptr::eq(workflow, &DEPLOY) && position >= IN_FLIGHT_FROM {
            if unit(i, 3) < 0.5 {
                RunStatus::Running
            } else {
                RunStatus::Queued
            }
        } else {
            finished_status(i)
        };
        let mut record = run(&id, workflow, status, at, i);
        let fans_out = std::ptr::eq(workflow, &REPORTS)
            && status == RunStatus::Succeeded
            && unit(i, 4) < FAN_OUT_SHARE
            && i + CHILDREN < self.total;
        if fans_out {
            // The children's ids, made at the times of the runs that follow.
            let ids: Vec<String> = (1..=CHILDREN)
                .map(|k| run_id(self.made_at(i + k)))
                .collect();
            fan_out(&mut record.steps[1], &ids);
            self.census.newest_parent = Some((id.clone(), CHILDREN));
            // Popped from the back: the first child first.
            self.children = ids
                .into_iter()
                .enumerate()
                .rev()
                .map(|(item, child)| (id.clone(), item, child))
                .collect();
        }
        self.counted(record, workflow)
    }

    fn counted(&mut self, record: RunRecord, workflow: &'static Workflow) -> Seeded {
        *self
            .census
            .by_workflow
            .entry(workflow.name)
            .or_default()
            .entry(record.status.as_str())
            .or_default() += 1;
        Seeded { record, workflow }
    }
}

impl Iterator for Runs {
    type Item = Seeded;

    fn next(&mut self) -> Option<Seeded> {
        if self.next == self.total {
            return None;
        }
        let i = self.next;
        self.next += 1;
        Some(self.make(i))
    }
}

/// A finished run's status: mostly succeeded.
fn finished_status(i: usize) -> RunStatus {
    match unit(i, 5) {
        x if x < FAILED => RunStatus::Failed,
        x if x < FAILED + CANCELLED => RunStatus::Cancelled,
        _ => RunStatus::Succeeded,
    }
}

/// A number in [0, 1) that depends on `i` and `salt` only (splitmix64).
fn unit(i: usize, salt: u64) -> f64 {
    let mut z = (i as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(salt.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A UUIDv7 of a run made at `ms` (Unix time): ids sort by creation time.
fn run_id(ms: u64) -> String {
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
    uuid::Uuid::new_v7(ts).to_string()
}

/// `ms` (Unix time) as RFC 3339 with milliseconds, UTC, as records write it.
pub(super) fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        ms % 1000
    )
}

/// The input of run `i`: an order of three items.
fn input(i: usize) -> Value {
    json!({
        "order": 100_000 + i,
        "customer": format!("c-{:05}", i % 7919),
        "items": [
            { "sku": format!("sku-{:04}", i % 997), "qty": 1 + i % 3, "price": 9.5 },
            { "sku": format!("sku-{:04}", i % 991), "qty": 2, "price": 24.0 },
            { "sku": format!("sku-{:04}", i % 983), "qty": 1, "price": 3.25 }
        ],
        "currency": "EUR",
        "note": "deliver to the loading dock, not the front desk"
    })
}

/// One attempt of a step, as the executor records it.
fn attempt(
    number: u32,
    status: StepStatus,
    started_ms: u64,
    duration_ms: f64,
    i: usize,
) -> AttemptRecord {
    let mut attempt = AttemptRecord::running(number, None, rfc3339(started_ms));
    attempt.status = status;
    attempt.duration_ms = duration_ms;
    attempt.fuel_consumed = 40_000 + (i % 5000) as u64;
    attempt.peak_memory = 1_179_648;
    attempt.logs = vec![LogLine {
        at_ms: 0.4,
        stream: LogStream::Log,
        level: LogLevel::Info,
        message: format!("order {}: 3 items", 100_000 + i),
    }];
    if status == StepStatus::Failed {
        attempt.error = Some(upstream_error());
    }
    attempt
}

fn upstream_error() -> ErrorRecord {
    ErrorRecord {
        kind: ErrorKind::TaskError,
        message: "the pricing service answered 503 Service Unavailable".into(),
        retryable: true,
        details: Some(json!({ "status": 503, "retry_after": 30 })),
    }
}

/// A step that ran to `status`, starting at `started_ms`.
fn ran(
    (id, plugin): (&str, &str),
    status: StepStatus,
    started_ms: u64,
    output: Value,
    i: usize,
) -> StepRecord {
    let mut step = StepRecord::pending(id, plugin);
    step.status = status;
    step.started_at = Some(rfc3339(started_ms));
    step.duration_ms = Some(1.2);
    // No plugin version or digest: a run in flight that the server takes
    // over would look for a build of that digest, which it does not have.
    step.attempts = match status {
        StepStatus::Failed => vec![
            attempt(1, StepStatus::Failed, started_ms, 0.9, i),
            attempt(2, StepStatus::Failed, started_ms + 1000, 1.1, i),
        ],
        StepStatus::Running => vec![AttemptRecord::running(1, None, rfc3339(started_ms))],
        _ => vec![attempt(1, status, started_ms, 1.2, i)],
    };
    if status == StepStatus::Failed {
        step.error = Some(upstream_error());
    }
    step.output = output;
    step
}

/// Run `i` of `workflow`, made at `at`, in `status`.
fn run(id: &str, workflow: &Workflow, status: RunStatus, at: u64, i: usize) -> RunRecord {
    let input = input(i);
    let started = at + 3;
    let [first, second, third] = workflow.steps;
    let pending = |(id, plugin): (&str, &str)| {
        if plugin.is_empty() {
            StepRecord::pending_workflow(id, "orders")
        } else {
            StepRecord::pending(id, plugin)
        }
    };
    let priced = json!({ "order": input["order"], "total": 46.25, "currency": "EUR", "lines": 3 });
    let (steps, output, error, finished) = match status {
        RunStatus::Queued => (
            vec![pending(first), pending(second), pending(third)],
            Value::Null,
            None,
            None,
        ),
        RunStatus::Running => (
            vec![
                ran(first, StepStatus::Succeeded, started, input.clone(), i),
                ran(second, StepStatus::Running, started + 2, Value::Null, i),
                pending(third),
            ],
            Value::Null,
            None,
            None,
        ),
        RunStatus::Succeeded => (
            vec![
                ran(first, StepStatus::Succeeded, started, input.clone(), i),
                ran(
                    second,
                    StepStatus::Succeeded,
                    started + 2,
                    priced.clone(),
                    i,
                ),
                ran(third, StepStatus::Succeeded, started + 4, priced.clone(), i),
            ],
            json!({ third.0: priced }),
            None,
            Some(started + 6),
        ),
        RunStatus::Failed => (
            vec![
                ran(first, StepStatus::Succeeded, started, input.clone(), i),
                ran(second, StepStatus::Failed, started + 2, Value::Null, i),
                StepRecord {
                    status: StepStatus::Skipped,
                    ..pending(third)
                },
            ],
            Value::Null,
            Some(RunError {
                step: Some(second.0.into()),
                kind: ErrorKind::TaskError,
                message: upstream_error().message,
            }),
            Some(started + 1004),
        ),
        RunStatus::Cancelled => (
            vec![
                ran(first, StepStatus::Succeeded, started, input.clone(), i),
                ran(second, StepStatus::Cancelled, started + 2, Value::Null, i),
                pending(third),
            ],
            Value::Null,
            Some(RunError {
                step: None,
                kind: ErrorKind::Cancelled,
                message: "cancelled by a request".into(),
            }),
            Some(started + 40),
        ),
    };
    RunRecord {
        id: id.to_owned(),
        workflow: workflow.name.to_owned(),
        status,
        input,
        output,
        error,
        created_at: rfc3339(at),
        started_at: (status != RunStatus::Queued).then(|| rfc3339(started)),
        finished_at: finished.map(rfc3339),
        duration_ms: finished.map(|end| (end - started) as f64),
        steps,
        retry_of: None,
        rerun_of: None,
        retries: Vec::new(),
        parent: None,
    }
}

/// A `reports` run's sub-workflow step as it ends after starting `children`:
/// an attempt per item, each naming its child run.
fn fan_out(step: &mut StepRecord, children: &[String]) {
    let started = step.started_at.clone().unwrap_or_default();
    step.items = Some(children.len());
    step.attempts = children
        .iter()
        .enumerate()
        .map(|(item, child)| {
            let mut attempt = AttemptRecord::running(1, Some(item), started.clone());
            attempt.status = StepStatus::Succeeded;
            attempt.duration_ms = 7.5;
            attempt.child_run = Some(child.clone());
            attempt
        })
        .collect();
}

/// Stores `runs` through `store`, [`IN_FLIGHT`] creates at once, so the
/// writer commits them in full batches; how long it took.
pub(super) async fn store_all(store: Arc<dyn Store>, runs: &mut Runs) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let pins: Arc<PinnedWorkflows> = Arc::new(
        [(
            ORDERS.name.to_owned(),
            WorkflowText {
                source: ORDERS.source.to_owned(),
                file: ORDERS.file.to_owned(),
            },
        )]
        .into(),
    );
    let mut creates = tokio::task::JoinSet::new();
    for seeded in runs.by_ref() {
        while creates.len() >= IN_FLIGHT {
            creates.join_next().await.expect("creates in flight")??;
        }
        let store = Arc::clone(&store);
        let pins = Arc::clone(&pins);
        creates.spawn(async move {
            let Seeded { record, workflow } = seeded;
            let pinned = if std::ptr::eq(workflow, &REPORTS) {
                &*pins
            } else {
                &NO_PINS
            };
            store
                .create_run(NewRun {
                    record: &record,
                    workflow_source: workflow.source,
                    workflow_file: workflow.file,
                    idempotency_key: None,
                    items: &NO_ITEMS,
                    pins: pinned,
                })
                .await
                .with_context(|| format!("storing run {}", record.id))
                .map(drop)
        });
    }
    while let Some(created) = creates.join_next().await {
        created??;
    }
    Ok(began.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_records_write_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
    }

    #[test]
    fn ids_sort_by_creation_time_and_children_are_those_their_parent_names() {
        let mut made = Runs::new(3000);
        let runs: Vec<Seeded> = made.by_ref().collect();
        let census = made.census();
        assert!(runs.windows(2).all(|w| w[0].record.id < w[1].record.id));
        let counted: usize = census.by_workflow.values().flat_map(|s| s.values()).sum();
        assert_eq!(counted, 3000);
        assert!(census.of_workflow(LEGACY.name) > 0 && census.of_status(RunStatus::Running) > 0);

        let (parent, children) = census.newest_parent.clone().expect("a fan-out");
        let fanned = runs.iter().find(|s| s.record.id == parent).unwrap();
        let named: Vec<&str> = fanned.record.steps[1]
            .attempts
            .iter()
            .filter_map(|a| a.child_run.as_deref())
            .collect();
        let kids: Vec<&str> = runs
            .iter()
            .filter(|s| s.record.parent.as_ref().is_some_and(|p| p.run == parent))
            .map(|s| s.record.id.as_str())
            .collect();
        assert_eq!(kids.len(), children);
        assert_eq!(kids, named);
    }
}
