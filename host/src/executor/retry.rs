//! What a retry or a rerun of a finished run starts from: a new queued run
//! whose record already holds what it takes over from the original.

use std::collections::HashMap;

use serde_json::Value;

use super::queued_record;
use crate::record::{RunRecord, StepRecord, StepStatus};
use crate::store::{ItemOutcome, ItemRecord, StoredItems};
use crate::workflow::{Plan, Scope};

/// A retry of `original` as the queued run `run_id` of `plan` (the
/// original's workflow, or the one loaded now when upgrading), on the same
/// input.
///
/// A step is reused when it succeeded or was skipped in the original (a
/// step of the same id and the same plugin or workflow) and every step it
/// needs is reused too: it keeps the original's record (status, output,
/// builds) without attempts, with `reused_from`, and does not run. With
/// `from` (a step index), that step and every step downstream of it run
/// again in full; any other step that runs again keeps the original's
/// builds (unless `upgrade`), and a `for_each` step takes over the items
/// that succeeded, returned here to be stored with the run.
pub fn retry_record(
    plan: &Plan,
    original: &RunRecord,
    from: Option<usize>,
    upgrade: bool,
    run_id: String,
) -> (RunRecord, StoredItems) {
    let mut record = queued_record(plan, run_id, original.input.clone());
    record.retry_of = Some(original.id.clone());
    let before = earlier_steps(original);
    // The original's results, as its steps' templates saw them: what its
    // `for_each` lists rendered to.
    let mut scope = Scope::new(&original.id, &plan.name, &original.input);
    for step in &original.steps {
        scope.set_step(&step.id, step.status.as_str(), &step.output);
    }
    let mut forced = vec![false; plan.steps.len()];
    let mut reused = vec![false; plan.steps.len()];
    let mut items = StoredItems::new();
    for (index, step) in plan.steps.iter().enumerate() {
        forced[index] = from == Some(index) || step.needs.iter().any(|&need| forced[need]);
        let new = &mut record.steps[index];
        let Some(earlier) = before
            .get(step.id.as_str())
            .filter(|earlier| same_task(earlier, new))
        else {
            continue;
        };
        reused[index] = !forced[index]
            && matches!(earlier.status, StepStatus::Succeeded | StepStatus::Skipped)
            && step.needs.iter().all(|&need| reused[need]);
        if reused[index] {
            *new = StepRecord {
                attempts: Vec::new(),
                started_at: None,
                duration_ms: None,
                reused_from: Some(original.id.clone()),
                ..(*earlier).clone()
            };
            continue;
        }
        if !upgrade {
            new.plugin_version.clone_from(&earlier.plugin_version);
            new.plugin_digest.clone_from(&earlier.plugin_digest);
        }
        if forced[index] {
            continue;
        }
        let (Some(for_each), Value::Array(outputs)) = (&step.for_each, &earlier.output) else {
            continue;
        };
        let Ok(list) = plan
            .templates
            .render_list(for_each, &scope.for_step(plan.readable_by(index)))
        else {
            continue;
        };
        for attempt in &earlier.attempts {
            let Some(position) = attempt
                .item
                .filter(|_| attempt.status == StepStatus::Succeeded)
            else {
                continue;
            };
            if let (Some(item), Some(output)) = (list.get(position), outputs.get(position)) {
                items.insert(
                    (index, position),
                    ItemRecord {
                        item: item.clone(),
                        attempts: Vec::new(),
                        outcome: Some(ItemOutcome::Output(output.clone())),
                    },
                );
            }
        }
    }
    (record, items)
}

/// A rerun of `original` as the queued run `run_id` of `plan`, on `input`:
/// every step runs again, with the original's builds unless `upgrade`.
pub fn rerun_record(
    plan: &Plan,
    original: &RunRecord,
    input: Value,
    upgrade: bool,
    run_id: String,
) -> RunRecord {
    let mut record = queued_record(plan, run_id, input);
    record.rerun_of = Some(original.id.clone());
    if !upgrade {
        let before = earlier_steps(original);
        for new in &mut record.steps {
            if let Some(earlier) = before.get(new.id.as_str()).filter(|e| same_task(e, new)) {
                new.plugin_version.clone_from(&earlier.plugin_version);
                new.plugin_digest.clone_from(&earlier.plugin_digest);
            }
        }
    }
    record
}

fn earlier_steps(original: &RunRecord) -> HashMap<&str, &StepRecord> {
    original
        .steps
        .iter()
        .map(|step| (step.id.as_str(), step))
        .collect()
}

/// The step runs the same plugin (as the workflow names it) or the same
/// sub-workflow in both runs.
fn same_task(earlier: &StepRecord, new: &StepRecord) -> bool {
    earlier.plugin == new.plugin && earlier.workflow == new.workflow
}
