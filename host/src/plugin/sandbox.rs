//! The sandbox of one step attempt: a fresh `Store` and instance with its own
//! fuel, memory cap, deadline and captured output, and the host imports the
//! guest may call (`host`, `state`, WASI p2 deny-by-default).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::bindings::trellis::plugin::{host, state, types};
use super::bindings::{StepContext, TaskPre};
use super::http::HttpPolicy;
use super::log::{GuestOutput, LogSink, MAX_LINE, StepEvents};
use crate::engine::{Engine, MAX_TABLE_ELEMENTS};
use crate::limits::{HostPattern, Limits};
use crate::record::{ErrorKind, ErrorRecord, LogLevel, LogLine, LogStream, Progress, now_rfc3339};
use crate::secrets::Granted;
use crate::store::StoreError;

/// Bytes a table element is counted as against the step's memory limit.
const TABLE_ELEMENT_BYTES: u64 = 8;
/// A state key longer than this is refused (it is stored per workflow).
const MAX_STATE_KEY: usize = 1024;
/// A state value larger than this is refused.
const MAX_STATE_VALUE: usize = 1024 * 1024;
/// Durable key-value state, scoped to a workflow (the `state` import). An
/// error traps the guest: state it cannot read or write is a host fault.
#[async_trait::async_trait]
pub trait StateStore: Send + Sync {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn set(&self, scope: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError>;
    async fn delete(&self, scope: &str, key: &str) -> Result<(), StoreError>;
}

/// State kept in memory for the life of the process.
#[derive(Debug, Default)]
pub struct MemoryStateStore {
    map: Mutex<HashMap<(String, String), Vec<u8>>>,
}

#[async_trait::async_trait]
impl StateStore for MemoryStateStore {
    async fn get(&self, scope: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let map = self.map.lock().unwrap();
        Ok(map.get(&(scope.to_string(), key.to_string())).cloned())
    }
    async fn set(&self, scope: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let mut map = self.map.lock().unwrap();
        map.insert((scope.to_string(), key.to_string()), value);
        Ok(())
    }
    async fn delete(&self, scope: &str, key: &str) -> Result<(), StoreError> {
        let mut map = self.map.lock().unwrap();
        map.remove(&(scope.to_string(), key.to_string()));
        Ok(())
    }
}

/// Everything one attempt needs.
pub struct Invocation {
    pub run_id: String,
    pub workflow: String,
    pub step_id: String,
    pub attempt: u32,
    pub input: String,
    pub config: BTreeMap<String, String>,
    /// The values of the secrets the step names, readable through
    /// `host.config` like `config` and masked in everything the attempt
    /// leaves behind.
    pub secrets: Arc<Granted>,
    /// Where the step may send HTTP requests.
    pub allow_hosts: Arc<[HostPattern]>,
    pub limits: Limits,
    pub state: Arc<dyn StateStore>,
    pub events: Option<Arc<dyn StepEvents>>,
    pub cancel: CancellationToken,
}

/// What one attempt did.
#[derive(Debug)]
pub struct AttemptOutcome {
    pub result: Result<Value, ErrorRecord>,
    pub started_at: String,
    pub duration: Duration,
    pub fuel_consumed: u64,
    pub peak_memory: u64,
    pub logs: Vec<LogLine>,
    pub log_bytes_dropped: u64,
    pub progress: Option<Progress>,
}

/// Why the epoch callback or a timer stopped the guest.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Interrupted {
    #[error("deadline reached")]
    Timeout,
    #[error("cancelled")]
    Cancelled,
}

/// Whether the epoch callback stopped the guest at its deadline.
pub(crate) fn deadline_reached(err: &wasmtime::Error) -> bool {
    matches!(
        err.downcast_ref::<Interrupted>(),
        Some(Interrupted::Timeout)
    ) || matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt))
}

/// The data of a step's `Store`.
pub struct StepState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    log: LogSink,
    http: WasiHttpCtx,
    http_policy: HttpPolicy,
    config: BTreeMap<String, String>,
    secrets: Arc<Granted>,
    state: Arc<dyn StateStore>,
    state_scope: String,
    progress: Option<Progress>,
    events: Option<Arc<dyn StepEvents>>,
    deadline: Instant,
    cancel: CancellationToken,
}

impl StepState {
    /// A state for `info()` probes: no config, no state, small limits.
    pub(crate) fn probe(limits: &Limits) -> StepState {
        StepState::new(
            limits,
            BTreeMap::new(),
            Arc::default(),
            Arc::from([]),
            Arc::new(MemoryStateStore::default()),
            String::new(),
            None,
            CancellationToken::new(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        limits: &Limits,
        config: BTreeMap<String, String>,
        secrets: Arc<Granted>,
        allow_hosts: Arc<[HostPattern]>,
        state: Arc<dyn StateStore>,
        state_scope: String,
        events: Option<Arc<dyn StepEvents>>,
        cancel: CancellationToken,
    ) -> StepState {
        let log = LogSink::new(limits.max_log, events.clone(), secrets.redactor().cloned());
        let http_policy = HttpPolicy::new(allow_hosts, limits, log.clone());
        // Deny by default: no preopened directories, no environment, no
        // arguments, no sockets; stdout and stderr go into the step log.
        let wasi = WasiCtx::builder()
            .stdout(GuestOutput::new(log.clone(), LogStream::Stdout))
            .stderr(GuestOutput::new(log.clone(), LogStream::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        StepState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: limits.memory,
                ..Default::default()
            },
            log,
            http: WasiHttpCtx::new(),
            http_policy,
            config,
            secrets,
            state,
            state_scope,
            progress: None,
            events,
            deadline: Instant::now() + limits.timeout,
            cancel,
        }
    }
}

impl WasiView for StepState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for StepState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_policy,
        }
    }
}

/// Sets up a store for a fresh instance: limiter, fuel, epoch deadline.
pub(crate) fn new_store(engine: &Engine, data: StepState, fuel: u64) -> Store<StepState> {
    let mut store = Store::new(engine.wasmtime(), data);
    store.limiter(|state| &mut state.limiter);
    store.set_fuel(fuel).expect("fuel is enabled on the engine");
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|ctx| {
        let data = ctx.data();
        if data.cancel.is_cancelled() {
            return Err(wasmtime::Error::new(Interrupted::Cancelled));
        }
        if Instant::now() >= data.deadline {
            return Err(wasmtime::Error::new(Interrupted::Timeout));
        }
        // Give the tokio worker back every tick so a busy guest cannot starve
        // other steps or the API.
        Ok(UpdateDeadline::Yield(1))
    });
    store
}

/// Runs one attempt of `pre` in a fresh sandbox.
pub(crate) async fn invoke(
    engine: &Engine,
    pre: &TaskPre<StepState>,
    inv: Invocation,
) -> AttemptOutcome {
    let started_at = now_rfc3339();
    let started = Instant::now();
    let limits = inv.limits;
    let data = StepState::new(
        &limits,
        inv.config,
        inv.secrets,
        inv.allow_hosts,
        inv.state,
        inv.workflow.clone(),
        inv.events,
        inv.cancel.clone(),
    );
    let deadline = data.deadline;
    let mut store = new_store(engine, data, limits.fuel);
    let ctx = StepContext {
        run_id: inv.run_id,
        workflow: inv.workflow,
        step_id: inv.step_id,
        attempt: inv.attempt,
    };

    let called = {
        let call = async {
            let task = pre.instantiate_async(&mut store).await?;
            task.call_run(&mut store, &ctx, &inv.input).await
        };
        // The epoch callback stops a busy guest; these two stop one that is
        // parked in a host call (a sleep, a poll) where epochs cannot reach.
        tokio::select! {
            biased;
            _ = inv.cancel.cancelled() => Err(wasmtime::Error::new(Interrupted::Cancelled)),
            result = tokio::time::timeout_at(deadline.into(), call) => match result {
                Ok(result) => result,
                Err(_elapsed) => Err(wasmtime::Error::new(Interrupted::Timeout)),
            },
        }
    };

    let fuel_consumed = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
    let data = store.into_data();
    let result = match called {
        Ok(Ok(output)) => parse_output(output, &limits),
        Ok(Err(task_error)) => Err(ErrorRecord {
            kind: ErrorKind::TaskError,
            message: task_error.message,
            retryable: task_error.retryable,
            details: task_error
                .details
                .map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d))),
        }),
        Err(err) => Err(classify(&err, &data, &limits)),
    };
    let mut result = result;
    if let Some(redactor) = data.secrets.redactor() {
        match &mut result {
            Ok(output) => redactor.json(output),
            Err(error) => {
                redactor.string(&mut error.message);
                if let Some(details) = &mut error.details {
                    redactor.json(details);
                }
            }
        }
    }
    let peak_memory = data.limiter.peak;
    let (logs, log_bytes_dropped) = data.log.finish();
    AttemptOutcome {
        result,
        started_at,
        duration: started.elapsed(),
        fuel_consumed,
        peak_memory,
        logs,
        log_bytes_dropped,
        progress: data.progress,
    }
}

fn parse_output(output: String, limits: &Limits) -> Result<Value, ErrorRecord> {
    if output.len() as u64 > limits.max_output {
        return Err(ErrorRecord {
            kind: ErrorKind::OutputTooLarge,
            message: format!(
                "the plugin returned {} of output; the step allows {} (limits.max_output)",
                bytesize::ByteSize(output.len() as u64),
                bytesize::ByteSize(limits.max_output)
            ),
            retryable: false,
            details: None,
        });
    }
    serde_json::from_str(&output).map_err(|err| {
        let mut shown: String = output.chars().take(80).collect();
        if shown.len() < output.len() {
            shown.push('…');
        }
        ErrorRecord {
            kind: ErrorKind::InvalidOutput,
            message: format!("the plugin returned output that is not JSON ({err}): {shown:?}"),
            retryable: false,
            details: None,
        }
    })
}

/// Turns a wasmtime error into a reason a user can act on. What the limiter
/// saw wins over the trap code: a guest that cannot grow its memory usually
/// aborts, which shows as `unreachable`.
fn classify(err: &wasmtime::Error, data: &StepState, limits: &Limits) -> ErrorRecord {
    let record = |kind: ErrorKind, message: String, retryable: bool| ErrorRecord {
        kind,
        message,
        retryable,
        details: None,
    };
    if let Some(interrupted) = err.downcast_ref::<Interrupted>() {
        return match interrupted {
            Interrupted::Timeout => record(
                ErrorKind::Timeout,
                format!(
                    "the attempt ran longer than its timeout of {}",
                    humantime::format_duration(limits.timeout)
                ),
                true,
            ),
            Interrupted::Cancelled => {
                record(ErrorKind::Cancelled, "the run was cancelled".into(), false)
            }
        };
    }
    if let Some((stream, max_log)) = data.log.flooded() {
        let stream = if stream == LogStream::Stderr {
            "stderr"
        } else {
            "stdout"
        };
        return record(
            ErrorKind::LogFlood,
            format!(
                "the plugin kept writing to {stream} far past the step's log limit of {} (limits.max_log)",
                bytesize::ByteSize(max_log)
            ),
            false,
        );
    }
    match data.limiter.refused {
        Some(Refusal::Memory(total)) => {
            return record(
                ErrorKind::MemoryLimit,
                format!(
                    "the instance asked for {} of memory; the step allows {} (limits.memory)",
                    bytesize::ByteSize(total),
                    bytesize::ByteSize(limits.memory)
                ),
                false,
            );
        }
        Some(Refusal::TableElements(elements)) => {
            return record(
                ErrorKind::TableLimit,
                format!(
                    "the instance asked for a table of {elements} elements; a table may hold at most {MAX_TABLE_ELEMENTS}"
                ),
                false,
            );
        }
        None => {}
    }
    // A `string` the guest hands over (its output, a host call's argument)
    // is checked when it is read: bytes that are not UTF-8 are as final as
    // output that is not JSON, so this is not retried.
    if let Some(utf8) = err.downcast_ref::<std::str::Utf8Error>() {
        return record(
            ErrorKind::InvalidOutput,
            format!("the plugin handed the host a string that is not UTF-8 ({utf8})"),
            false,
        );
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => record(
            ErrorKind::FuelExhausted,
            format!(
                "the attempt used all of its {} fuel (limits.fuel)",
                limits.fuel
            ),
            false,
        ),
        Some(Trap::Interrupt) => record(
            ErrorKind::Timeout,
            format!(
                "the attempt ran longer than its timeout of {}",
                humantime::format_duration(limits.timeout)
            ),
            true,
        ),
        Some(Trap::StackOverflow) => record(
            ErrorKind::StackOverflow,
            "the plugin overflowed its stack (unbounded recursion?)".into(),
            false,
        ),
        Some(trap) => {
            if let Some(panic) = data.log.panic_message() {
                return record(ErrorKind::Panic, panic, true);
            }
            let hint = match trap {
                Trap::MemoryOutOfBounds => {
                    " (a Rust plugin that recurses without end shows this when its shadow stack runs out)"
                }
                _ => "",
            };
            record(ErrorKind::Trap, format!("{trap}{hint}"), true)
        }
        None => {
            if let Some(panic) = data.log.panic_message() {
                return record(ErrorKind::Panic, panic, true);
            }
            record(ErrorKind::Trap, format!("{err:#}"), true)
        }
    }
}

/// Bounds memories and tables of one instance, added up: a component may have
/// several, and each would otherwise get the whole limit. Also bounds the
/// elements of each table (`MAX_TABLE_ELEMENTS`).
#[derive(Debug, Default)]
struct MemoryLimiter {
    limit: u64,
    used: u64,
    peak: u64,
    /// What the guest asked for when it was first refused.
    refused: Option<Refusal>,
}

/// Why the limiter refused a memory or table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Memories and tables together would have been this many bytes, over
    /// `limits.memory`.
    Memory(u64),
    /// One table would have had this many elements, over `MAX_TABLE_ELEMENTS`.
    TableElements(u64),
}

impl MemoryLimiter {
    fn grow(&mut self, by: u64) -> bool {
        let wanted = self.used.saturating_add(by);
        if wanted > self.limit {
            self.refused.get_or_insert(Refusal::Memory(wanted));
            return false;
        }
        self.used = wanted;
        self.peak = self.peak.max(wanted);
        true
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past its own maximum the growth fails after this answer: counting
        // it would charge the step for memory it never got.
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        Ok(self.grow(desired.saturating_sub(current) as u64))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > MAX_TABLE_ELEMENTS {
            self.refused
                .get_or_insert(Refusal::TableElements(desired as u64));
            return Ok(false);
        }
        // wasmtime checks the table's own maximum (its type's, or the pool
        // slot's) only after asking: a guest that keeps trying to grow a
        // full table must not use up its memory limit on growth it never got.
        if maximum.is_some_and(|maximum| desired > maximum) {
            return Ok(false);
        }
        Ok(self.grow((desired.saturating_sub(current) as u64).saturating_mul(TABLE_ELEMENT_BYTES)))
    }
}

fn cut(mut text: String) -> String {
    text.truncate(text.floor_char_boundary(MAX_LINE));
    text
}

impl types::Host for StepState {}

impl host::Host for StepState {
    async fn log(&mut self, level: host::LogLevel, message: String) -> wasmtime::Result<()> {
        let level = match level {
            host::LogLevel::Trace => LogLevel::Trace,
            host::LogLevel::Debug => LogLevel::Debug,
            host::LogLevel::Info => LogLevel::Info,
            host::LogLevel::Warn => LogLevel::Warn,
            host::LogLevel::Error => LogLevel::Error,
        };
        self.log.line(LogStream::Log, level, cut(message));
        Ok(())
    }

    async fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        // The validator refuses a config key that is also a secret's name.
        Ok(self
            .config
            .get(&key)
            .or_else(|| self.secrets.get(&key))
            .cloned())
    }

    async fn progress(&mut self, fraction: f32, message: String) -> wasmtime::Result<()> {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut message = cut(message);
        if let Some(redactor) = self.secrets.redactor() {
            redactor.string(&mut message);
        }
        let progress = Progress { fraction, message };
        if let Some(events) = &self.events {
            events.progress(&progress);
        }
        self.progress = Some(progress);
        Ok(())
    }
}

fn state_error(error: StoreError) -> wasmtime::Error {
    wasmtime::Error::msg(format!("the state store failed: {error}"))
}

fn check_key(key: &str) -> wasmtime::Result<()> {
    if key.len() > MAX_STATE_KEY {
        return Err(wasmtime::Error::msg(format!(
            "state key of {} bytes is longer than the {MAX_STATE_KEY} allowed",
            key.len()
        )));
    }
    Ok(())
}

impl state::Host for StepState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        check_key(&key)?;
        self.state
            .get(&self.state_scope, &key)
            .await
            .map_err(state_error)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<()> {
        check_key(&key)?;
        if value.len() > MAX_STATE_VALUE {
            return Err(wasmtime::Error::msg(format!(
                "state value of {} bytes is larger than the {MAX_STATE_VALUE} allowed",
                value.len()
            )));
        }
        self.state
            .set(&self.state_scope, &key, value)
            .await
            .map_err(state_error)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        check_key(&key)?;
        self.state
            .delete(&self.state_scope, &key)
            .await
            .map_err(state_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limiter_adds_up_memories_and_tables() {
        let mut limiter = MemoryLimiter {
            limit: 1000,
            ..Default::default()
        };
        assert!(limiter.memory_growing(0, 600, None).unwrap());
        assert!(limiter.table_growing(0, 50, None).unwrap()); // 400 bytes
        assert!(
            !limiter.memory_growing(0, 100, None).unwrap(),
            "a second memory shares the limit"
        );
        assert_eq!(limiter.refused, Some(Refusal::Memory(1100)));
        assert_eq!(limiter.peak, 1000);
    }

    #[test]
    fn a_table_is_bounded_in_elements_and_failed_growth_is_not_counted() {
        let mut limiter = MemoryLimiter {
            limit: u64::MAX,
            ..Default::default()
        };
        let max = MAX_TABLE_ELEMENTS as usize;
        assert!(limiter.table_growing(0, max, None).unwrap());
        assert!(!limiter.table_growing(max, max + 1, None).unwrap());
        assert_eq!(
            limiter.refused,
            Some(Refusal::TableElements(MAX_TABLE_ELEMENTS + 1))
        );

        let mut limiter = MemoryLimiter {
            limit: 1000,
            ..Default::default()
        };
        assert!(limiter.table_growing(0, 10, Some(10)).unwrap());
        for _ in 0..1000 {
            // A full table of maximum 10: refused, and not charged.
            assert!(!limiter.table_growing(10, 11, Some(10)).unwrap());
        }
        assert_eq!(limiter.used, 80);
        assert_eq!(limiter.refused, None);
        assert!(!limiter.memory_growing(0, 200, Some(100)).unwrap());
        assert_eq!(limiter.used, 80);
    }
}
