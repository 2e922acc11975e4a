//! Each run's live record and event stream while it runs in this process,
//! the events of a finished run rebuilt from its record, and those of a run
//! another node of the cluster runs, followed through the store.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::Service;
use crate::executor::RunObserver;
use crate::record::{
    AttemptRecord, LogLine, Progress, RunRecord, RunStatus, StepRecord, StepStatus, now_rfc3339,
};
use crate::store::StoreError;

/// Events of one run kept for replay; past this, the oldest log events are
/// dropped (step events are always kept).
const MAX_REPLAY_LOGS: usize = 10_000;
/// Live events a slow subscriber may lag behind before it is cut off.
const EVENT_BUFFER: usize = 1024;
/// How often the record of a run another node runs is read again for its
/// events.
const REMOTE_POLL: Duration = Duration::from_millis(200);

/// One event of a run, as the event stream sends it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEvent {
    StepStarted {
        seq: u64,
        step: String,
        attempt: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        item: Option<usize>,
    },
    Log {
        seq: u64,
        step: String,
        line: LogLine,
    },
    Progress {
        seq: u64,
        step: String,
        progress: Progress,
    },
    StepFinished {
        seq: u64,
        step: StepRecord,
    },
    RunFinished {
        seq: u64,
        run: RunRecord,
    },
}

impl RunEvent {
    pub fn seq(&self) -> u64 {
        match self {
            RunEvent::StepStarted { seq, .. }
            | RunEvent::Log { seq, .. }
            | RunEvent::Progress { seq, .. }
            | RunEvent::StepFinished { seq, .. }
            | RunEvent::RunFinished { seq, .. } => *seq,
        }
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            RunEvent::StepStarted { .. } => "step_started",
            RunEvent::Log { .. } => "log",
            RunEvent::Progress { .. } => "progress",
            RunEvent::StepFinished { .. } => "step_finished",
            RunEvent::RunFinished { .. } => "run_finished",
        }
    }
}

/// What a subscriber gets: the events so far, then live ones (if the run is
/// still going). The stream ends after `run_finished`.
pub struct EventSubscription {
    pub replay: Vec<RunEvent>,
    pub live: Option<broadcast::Receiver<RunEvent>>,
}

impl Service {
    /// The run's events so far and, while it runs, the live ones.
    pub async fn events(&self, id: &str) -> Result<Option<EventSubscription>, StoreError> {
        let active = self.inner.active.lock().unwrap().get(id).cloned();
        if let Some(active) = active {
            return Ok(Some(active.subscribe()));
        }
        let Some(run) = self.inner.store.get_run(id).await? else {
            return Ok(None);
        };
        let mut follower = Follower::default();
        let replay = follower.events(&run);
        if run.status.is_terminal() || self.inner.cluster.is_none() {
            return Ok(Some(EventSubscription { replay, live: None }));
        }
        // Another node runs it: its progress shows in the store, as each
        // attempt starts and ends.
        let (live, receiver) = broadcast::channel(EVENT_BUFFER);
        tokio::spawn(self.clone().follow(id.to_owned(), follower, live));
        Ok(Some(EventSubscription {
            replay,
            live: Some(receiver),
        }))
    }

    /// Reads the stored record of a run another node runs every
    /// [`REMOTE_POLL`] and sends what is new, until it finishes or nobody
    /// listens.
    async fn follow(self, id: String, mut follower: Follower, live: broadcast::Sender<RunEvent>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(REMOTE_POLL) => {}
                () = self.inner.closing.cancelled() => return,
            }
            if live.receiver_count() == 0 {
                return;
            }
            match self.inner.store.get_run(&id).await {
                Ok(Some(run)) => {
                    for event in follower.events(&run) {
                        let _ = live.send(event);
                    }
                    if run.status.is_terminal() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(err) => {
                    tracing::warn!(run_id = %id, error = %err, "cannot read a followed run; trying again")
                }
            }
        }
    }
}

/// The events a record shows, each once: a finished run's whole history,
/// or, read again and again, what is new in a run another node runs.
#[derive(Default)]
struct Follower {
    seen: HashSet<EventKey>,
    seq: u64,
}

/// What makes an event the same one in two readings of a record.
#[derive(PartialEq, Eq, Hash)]
enum EventKey {
    Started(String, u32, Option<usize>),
    Log(String, u32, Option<usize>, usize),
    Finished(String),
    Run,
}

impl Follower {
    fn events(&mut self, run: &RunRecord) -> Vec<RunEvent> {
        let mut events = Vec::new();
        for step in &run.steps {
            for attempt in &step.attempts {
                let (number, item) = (attempt.attempt, attempt.item);
                if self.first(EventKey::Started(step.id.clone(), number, item)) {
                    events.push(RunEvent::StepStarted {
                        seq: self.next(),
                        step: step.id.clone(),
                        attempt: number,
                        item,
                    });
                }
                for (index, line) in attempt.logs.iter().enumerate() {
                    if self.first(EventKey::Log(step.id.clone(), number, item, index)) {
                        events.push(RunEvent::Log {
                            seq: self.next(),
                            step: step.id.clone(),
                            line: line.clone(),
                        });
                    }
                }
            }
            if !matches!(step.status, StepStatus::Pending | StepStatus::Running)
                && self.first(EventKey::Finished(step.id.clone()))
            {
                events.push(RunEvent::StepFinished {
                    seq: self.next(),
                    step: step.clone(),
                });
            }
        }
        if run.status.is_terminal() && self.first(EventKey::Run) {
            events.push(RunEvent::RunFinished {
                seq: self.next(),
                run: run.clone(),
            });
        }
        events
    }

    fn first(&mut self, key: EventKey) -> bool {
        self.seen.insert(key)
    }

    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// The events a finished run had, rebuilt from its record.
fn replay(run: &RunRecord) -> Vec<RunEvent> {
    Follower::default().events(run)
}

/// A run going on in this process: its live record and its event log.
pub(super) struct ActiveRun {
    pub(super) cancel: CancellationToken,
    state: Mutex<ActiveState>,
    pub(super) done: watch::Sender<Option<RunRecord>>,
}

struct ActiveState {
    snapshot: RunRecord,
    events: Vec<RunEvent>,
    logs_kept: usize,
    seq: u64,
    /// Made by the first subscriber: a channel preallocates its buffer
    /// (`EVENT_BUFFER` events, ~0.3 MiB), and most runs are never followed.
    live: Option<broadcast::Sender<RunEvent>>,
}

impl ActiveRun {
    pub(super) fn new(record: RunRecord) -> ActiveRun {
        let events = replay(&record);
        let seq = events.len() as u64;
        ActiveRun {
            cancel: CancellationToken::new(),
            state: Mutex::new(ActiveState {
                snapshot: record,
                logs_kept: 0,
                events,
                seq,
                live: None,
            }),
            done: watch::channel(None).0,
        }
    }

    pub(super) fn snapshot(&self) -> RunRecord {
        self.state.lock().unwrap().snapshot.clone()
    }

    pub(super) fn subscribe(&self) -> EventSubscription {
        let mut state = self.state.lock().unwrap();
        // Under the lock: no event falls between the replay and the receiver.
        let live = state
            .live
            .get_or_insert_with(|| broadcast::channel(EVENT_BUFFER).0)
            .subscribe();
        EventSubscription {
            replay: state.events.clone(),
            live: Some(live),
        }
    }

    /// Records an event and sends it to live subscribers.
    fn emit(&self, make: impl FnOnce(u64) -> RunEvent, update: impl FnOnce(&mut RunRecord)) {
        let mut state = self.state.lock().unwrap();
        update(&mut state.snapshot);
        state.seq += 1;
        let event = make(state.seq);
        let is_log = matches!(event, RunEvent::Log { .. });
        if !is_log || state.logs_kept < MAX_REPLAY_LOGS {
            state.logs_kept += usize::from(is_log);
            state.events.push(event.clone());
        }
        if let Some(live) = &state.live {
            let _ = live.send(event);
        }
    }

    /// Changes the snapshot without an event.
    fn update(&self, update: impl FnOnce(&mut RunRecord)) {
        update(&mut self.state.lock().unwrap().snapshot);
    }

    pub(super) fn finish(&self, record: RunRecord) {
        let run = record.clone();
        self.emit(
            |seq| RunEvent::RunFinished { seq, run },
            |snapshot| *snapshot = record.clone(),
        );
        self.done.send_replace(Some(record));
    }
}

impl RunObserver for ActiveRun {
    fn step_started(&self, step: &str, attempt: u32, item: Option<usize>) {
        let id = step.to_string();
        self.emit(
            |seq| RunEvent::StepStarted {
                seq,
                step: id,
                attempt,
                item,
            },
            |snapshot| {
                snapshot.status = RunStatus::Running;
                if let Some(record) = step_mut(snapshot, step) {
                    record.status = StepStatus::Running;
                    record.started_at.get_or_insert_with(now_rfc3339);
                }
            },
        );
    }

    fn step_log(&self, step: &str, line: &LogLine) {
        let (step, line) = (step.to_string(), line.clone());
        self.emit(|seq| RunEvent::Log { seq, step, line }, |_| {});
    }

    fn step_progress(&self, step: &str, progress: &Progress) {
        let (step, progress) = (step.to_string(), progress.clone());
        self.emit(
            |seq| RunEvent::Progress {
                seq,
                step,
                progress,
            },
            |_| {},
        );
    }

    fn step_items(&self, step: &str, count: usize) {
        self.update(|snapshot| {
            if let Some(record) = step_mut(snapshot, step) {
                record.items = Some(count);
            }
        });
    }

    /// Shown by `GET /v1/runs/{id}` while the step goes on: a fan-out's
    /// finished items, a retried step's failed attempts.
    fn attempt_finished(&self, step: &str, attempt: &AttemptRecord) {
        self.update(|snapshot| {
            if let Some(record) = step_mut(snapshot, step) {
                record.attempts.push(attempt.clone());
            }
        });
    }

    fn step_finished(&self, step: &StepRecord) {
        let finished = step.clone();
        self.emit(
            |seq| RunEvent::StepFinished {
                seq,
                step: finished,
            },
            |snapshot| {
                if let Some(record) = step_mut(snapshot, &step.id) {
                    *record = step.clone();
                }
            },
        );
    }
}

/// The step `id` of a run's snapshot.
fn step_mut<'a>(snapshot: &'a mut RunRecord, id: &str) -> Option<&'a mut StepRecord> {
    snapshot.steps.iter_mut().find(|s| s.id == id)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::record::{AttemptRecord, LogLevel, LogStream};
    use crate::service::test_service;

    fn record(status: RunStatus, steps: Vec<StepRecord>) -> RunRecord {
        RunRecord {
            retry_of: None,
            rerun_of: None,
            retries: Vec::new(),
            parent: None,
            id: "run-1".to_owned(),
            workflow: "w".to_owned(),
            status,
            input: Value::Null,
            output: Value::Null,
            error: None,
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            duration_ms: None,
            steps,
        }
    }

    fn line(message: &str) -> LogLine {
        LogLine {
            at_ms: 0.0,
            stream: LogStream::Host,
            level: LogLevel::Info,
            message: message.to_owned(),
        }
    }

    #[test]
    fn a_finished_run_replays_in_order() {
        let mut done = StepRecord::pending("a", "p");
        done.status = StepStatus::Succeeded;
        done.attempts.push(AttemptRecord {
            child_run: None,
            node: None,
            input: None,
            attempt: 1,
            item: None,
            status: StepStatus::Succeeded,
            error: None,
            started_at: now_rfc3339(),
            duration_ms: 1.0,
            fuel_consumed: 0,
            peak_memory: 0,
            logs: vec![line("hello")],
            log_bytes_dropped: 0,
            progress: None,
        });
        let run = record(
            RunStatus::Succeeded,
            vec![done, StepRecord::pending("b", "p")],
        );
        let events = replay(&run);
        let names: Vec<&str> = events.iter().map(RunEvent::name).collect();
        assert_eq!(
            names,
            ["step_started", "log", "step_finished", "run_finished"]
        );
        let seqs: Vec<u64> = events.iter().map(RunEvent::seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    /// A record read again and again (a run another node runs) gives each
    /// event once, in the order they appear, numbered on.
    #[test]
    fn a_followed_record_gives_each_event_once() {
        let attempt = |number: u32, status, logs: Vec<LogLine>| AttemptRecord {
            child_run: None,
            node: None,
            input: None,
            attempt: number,
            item: None,
            status,
            error: None,
            started_at: now_rfc3339(),
            duration_ms: 1.0,
            fuel_consumed: 0,
            peak_memory: 0,
            logs,
            log_bytes_dropped: 0,
            progress: None,
        };
        let mut step = StepRecord::pending("a", "p");
        step.status = StepStatus::Running;
        step.attempts
            .push(attempt(1, StepStatus::Running, Vec::new()));
        let mut run = record(RunStatus::Running, vec![step]);
        let mut follower = Follower::default();
        let names = |events: Vec<RunEvent>| {
            events
                .iter()
                .map(|e| (e.name(), e.seq()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(follower.events(&run)), [("step_started", 1)]);
        assert_eq!(names(follower.events(&run)), []);
        // The attempt ended with a log line and failed; a second one runs.
        run.steps[0].attempts[0] = attempt(1, StepStatus::Failed, vec![line("no")]);
        run.steps[0]
            .attempts
            .push(attempt(2, StepStatus::Running, Vec::new()));
        assert_eq!(
            names(follower.events(&run)),
            [("log", 2), ("step_started", 3)]
        );
        run.steps[0].status = StepStatus::Succeeded;
        run.status = RunStatus::Succeeded;
        assert_eq!(
            names(follower.events(&run)),
            [("step_finished", 4), ("run_finished", 5)]
        );
        assert_eq!(names(follower.events(&run)), []);
    }

    #[tokio::test]
    async fn a_live_run_sends_what_it_records() {
        let run = ActiveRun::new(record(
            RunStatus::Queued,
            vec![StepRecord::pending("a", "p")],
        ));
        let subscription = run.subscribe();
        assert!(subscription.replay.is_empty());
        let mut live = subscription.live.expect("a running run is live");
        run.step_started("a", 1, None);
        run.step_log("a", &line("working"));
        assert_eq!(run.snapshot().status, RunStatus::Running);
        assert_eq!(run.snapshot().steps[0].status, StepStatus::Running);
        assert_eq!(live.recv().await.unwrap().name(), "step_started");
        assert_eq!(live.recv().await.unwrap().name(), "log");

        let mut finished = run.snapshot();
        finished.status = RunStatus::Succeeded;
        run.finish(finished);
        let last = live.recv().await.unwrap();
        assert_eq!((last.name(), last.seq()), ("run_finished", 3));
        let done = run.done.subscribe().borrow().clone();
        assert_eq!(done.map(|r| r.status), Some(RunStatus::Succeeded));
        // A late subscriber gets all of it again.
        assert_eq!(run.subscribe().replay.len(), 3);
    }

    #[tokio::test]
    async fn an_unknown_run_has_no_events() {
        let (_dir, service) = test_service(&[]).await;
        assert!(service.events("no-such-run").await.unwrap().is_none());
    }
}
