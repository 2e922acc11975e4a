//! The validated workflow the executor runs: an immutable DAG of steps in
//! topological order, every template compiled, every default filled in.
//!
//! Nothing here refers back to the TOML: a [`Plan`] only exists once the file
//! passed validation (see `validate`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::readable::Readable;
use super::template::{TemplateValue, Templates};
use crate::limits::{HostPattern, LimitOverrides};
use crate::plugin::PluginRef;

/// A validated workflow. `Send + Sync`: the executor shares it in an `Arc`.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub description: Option<String>,
    /// The display path given to `parse_str` / `load_file`.
    pub file: String,
    /// Topological order: every step comes after the steps it needs; steps that
    /// could go in either order keep the order of the file.
    pub steps: Vec<PlannedStep>,
    /// `[input]`'s schema: a run's input must satisfy it. `None`: any input.
    pub input_schema: Option<InputSchema>,
    /// `[output]`. `None`: the run's output is `{ <id>: output }` of the steps
    /// no other step needs.
    pub output: Option<TemplateValue>,
    /// Renders every [`TemplateValue`] of this plan.
    pub templates: Templates,
    /// Each step's index by id.
    pub(crate) index: Arc<HashMap<String, usize>>,
}

impl Plan {
    /// The workflows this one's sub-workflow steps call, each once, in step
    /// order.
    pub fn calls(&self) -> Vec<String> {
        let mut calls: Vec<String> = Vec::new();
        for name in self.steps.iter().filter_map(|step| step.workflow.as_ref()) {
            if !calls.contains(name) {
                calls.push(name.clone());
            }
        }
        calls
    }

    /// The step with this id.
    pub fn step(&self, id: &str) -> Option<&PlannedStep> {
        self.index.get(id).map(|&index| &self.steps[index])
    }

    /// The steps whose results step `index`'s templates may read: the steps
    /// it needs, and the steps those need, and so on. Validation makes every
    /// step a template reads one of them; a step that is not stays unreadable
    /// even when it happens to have finished, so a run never depends on timing.
    pub fn readable_by(&self, index: usize) -> Readable {
        let mut bits = vec![0u64; self.steps.len().div_ceil(64)];
        let mut stack: Vec<usize> = self.steps[index].needs.clone();
        while let Some(step) = stack.pop() {
            let (word, bit) = (step / 64, 1u64 << (step % 64));
            if bits[word] & bit == 0 {
                bits[word] |= bit;
                stack.extend_from_slice(&self.steps[step].needs);
            }
        }
        Readable::new(self.index.clone(), bits.into())
    }

    /// Indices of the steps no other step needs, in plan order.
    pub fn sinks(&self) -> Vec<usize> {
        let mut needed = vec![false; self.steps.len()];
        for step in &self.steps {
            for &need in &step.needs {
                needed[need] = true;
            }
        }
        (0..self.steps.len()).filter(|&i| !needed[i]).collect()
    }
}

/// The JSON Schema a run's input must satisfy, compiled. Cheap to clone.
#[derive(Clone)]
pub struct InputSchema(Arc<CompiledSchema>);

struct CompiledSchema {
    schema: serde_json::Value,
    description: Option<String>,
    validator: jsonschema::Validator,
}

/// One way an input fails its [`InputSchema`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemaViolation {
    /// JSON Pointer of the failing value in the input: `""` for the input
    /// itself, `"/order/items/0/qty"` for a value inside it.
    pub path: String,
    pub message: String,
}

/// Longest input value (as JSON) quoted in a [`SchemaViolation`] message;
/// a longer one is called "value" (the path says which).
const MAX_QUOTED_VALUE: usize = 80;

impl InputSchema {
    /// Compiles `schema` (its draft from `$schema`, 2020-12 when it has none).
    /// Only references inside the schema resolve: nothing is fetched.
    pub(crate) fn compile(
        schema: serde_json::Value,
        description: Option<String>,
    ) -> Result<Self, jsonschema::ValidationError<'static>> {
        let validator = jsonschema::validator_for(&schema)?;
        Ok(InputSchema(Arc::new(CompiledSchema {
            schema,
            description,
            validator,
        })))
    }

    /// The schema as written in the workflow, as JSON.
    pub fn schema(&self) -> &serde_json::Value {
        &self.0.schema
    }

    /// `[input]`'s `description`.
    pub fn description(&self) -> Option<&str> {
        self.0.description.as_deref()
    }

    /// Every violation, each with the JSON Pointer of the failing value (""
    /// for the root) and a message.
    pub fn validate(&self, input: &serde_json::Value) -> Result<(), Vec<SchemaViolation>> {
        let violations: Vec<SchemaViolation> = self
            .0
            .validator
            .iter_errors(input)
            .map(|error| SchemaViolation {
                path: error.instance_path().as_str().to_owned(),
                message: error_message(&error),
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }
}

/// Only the schema: the compiled validator says nothing more.
impl fmt::Debug for InputSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InputSchema")
            .field("schema", &self.0.schema)
            .finish_non_exhaustive()
    }
}

/// jsonschema's message for `error`, the failing value quoted only when short.
pub(crate) fn error_message(error: &jsonschema::ValidationError<'_>) -> String {
    if is_short(error.instance(), MAX_QUOTED_VALUE) {
        error.to_string()
    } else {
        error.masked().to_string()
    }
}

/// Whether `value` as JSON takes at most `limit` bytes (without writing out
/// more than that).
fn is_short(value: &serde_json::Value, limit: usize) -> bool {
    struct Bounded(usize);
    impl std::io::Write for Bounded {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 = self
                .0
                .checked_sub(bytes.len())
                .ok_or(std::io::ErrorKind::WriteZero)?;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    serde_json::to_writer(Bounded(limit), value).is_ok()
}

#[derive(Debug)]
pub struct PlannedStep {
    pub id: String,
    /// The plugin reference: `name`, `name@1.2.0` or `name@sha256:<hex>`
    /// (an empty name for a sub-workflow step).
    pub plugin: PluginRef,
    /// A sub-workflow step: the workflow each attempt (each item) runs as a
    /// child run, instead of a plugin.
    pub workflow: Option<String>,
    /// Indices into [`Plan::steps`] (all smaller than this step's own index):
    /// the explicit `needs` and every step a template refers to; sorted, no
    /// duplicates.
    pub needs: Vec<usize>,
    /// The plugin's input; JSON `null` when the step has none.
    pub input: TemplateValue,
    /// Read by the plugin through `host.config`.
    pub config: BTreeMap<String, TemplateValue>,
    /// `if`: evaluated once, before any `for_each` fan-out (`item` is not in
    /// scope); false skips the step.
    pub condition: Option<TemplateValue>,
    /// Renders to the list of items; one instance runs per item, with `item`
    /// and `index` in scope for `input` and `config`.
    pub for_each: Option<TemplateValue>,
    /// The workflow's `[limits]` with the step's own `limits` on top; what is
    /// still `None` comes from the engine's defaults.
    pub limits: LimitOverrides,
    pub retry: RetryPolicy,
    pub on_failure: OnFailure,
    /// Where the step may send HTTP requests (`wasi:http`).
    pub allow_hosts: Arc<[HostPattern]>,
    /// The `[secrets]` the plugin may read through `host.config`.
    pub secrets: Vec<String>,
}

/// What a failed step (after its retries) does to the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The run fails; steps not started yet do not start.
    Fail,
    /// The step stays `failed` and the run goes on: steps that need it run and
    /// can test `steps.<id>.status`.
    Continue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// Every retry waits `initial`.
    Fixed,
    /// Retries wait `initial`, then twice as long each time, up to `max`.
    Exponential,
}

/// The most attempts a step (each `for_each` item) may have: the run record
/// keeps every one, with its logs.
pub const MAX_ATTEMPTS: u32 = 100;

/// How often a step is attempted and how long to wait between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// 1 to `MAX_ATTEMPTS`; 1 means no retry.
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    /// What a workflow that says nothing about retries gets: a single attempt.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 1,
            backoff: Backoff::Exponential,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `next_attempt` (2, 3, ...; attempts count from 1):
    /// `initial` for fixed backoff; `initial * 2^(next_attempt - 2)` for
    /// exponential backoff; never more than `max`. Zero for attempt 1.
    pub fn delay_before(&self, next_attempt: u32) -> Duration {
        if next_attempt < 2 {
            return Duration::ZERO;
        }
        let delay = match self.backoff {
            Backoff::Fixed => self.initial,
            Backoff::Exponential => {
                let factor = 1u32.checked_shl(next_attempt - 2).unwrap_or(u32::MAX);
                self.initial.saturating_mul(factor)
            }
        };
        delay.min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_delays_double_up_to_max() {
        let policy = RetryPolicy {
            max_attempts: 10,
            backoff: Backoff::Exponential,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let delays: Vec<u128> = (1..=7)
            .map(|n| policy.delay_before(n).as_millis())
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.delay_before(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn fixed_delays_stay_at_initial() {
        let policy = RetryPolicy {
            backoff: Backoff::Fixed,
            initial: Duration::from_millis(300),
            ..RetryPolicy::default()
        };
        assert_eq!(policy.delay_before(2), Duration::from_millis(300));
        assert_eq!(policy.delay_before(9), Duration::from_millis(300));
    }

    #[test]
    fn default_policy_is_one_attempt() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_attempts, 1);
        assert_eq!(policy.backoff, Backoff::Exponential);
        assert_eq!(policy.initial, Duration::from_millis(100));
        assert_eq!(policy.max, Duration::from_secs(10));
    }

    #[test]
    fn plans_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Plan>();
        check::<InputSchema>();
    }

    #[test]
    fn only_short_values_are_quoted() {
        assert!(is_short(&serde_json::json!("abc"), 5));
        assert!(!is_short(&serde_json::json!("abcd"), 5));
        assert!(!is_short(&serde_json::json!({ "a": [1, 2, 3] }), 5));
    }
}
