//! Child runs: a sub-workflow step's attempt starts a run of another
//! workflow, a run like any other (stored, listed, followed, cancellable),
//! and ends with it.

use std::sync::Arc;
use std::time::Duration;

use super::Service;
use super::catalog::PinnedCatalog;
use crate::executor::{
    ChildOutcome, ChildRequest, ChildRuns, MAX_DEPTH, child_input_error, child_result,
    queued_record,
};
use crate::record::{ErrorKind, ErrorRecord, RunRecord, new_run_id};
use crate::store::{StoreError, StoredItems, WorkflowText};
use crate::workflow;

/// The service, as the executor's [`ChildRuns`].
pub(super) struct Children(pub(super) Service);

#[async_trait::async_trait]
impl ChildRuns for Children {
    async fn run_child(&self, request: ChildRequest) -> ChildOutcome {
        let service = &self.0;
        let failed = |kind, message: String, retryable| ChildOutcome {
            run: None,
            result: Err(ErrorRecord {
                kind,
                message,
                retryable,
                details: None,
            }),
        };
        let name = &request.workflow;
        // The version the topmost run pinned when it was accepted (a run
        // from before pins existed takes the one loaded now).
        let pins = match service.inner.store.run_workflow(&request.parent.run).await {
            Ok(stored) => stored.map(|stored| stored.pins).unwrap_or_default(),
            Err(error) => {
                return failed(
                    ErrorKind::Workflow,
                    format!("cannot read the workflows the run pinned: {error}"),
                    true,
                );
            }
        };
        let (plan, text) = match pins.get(name) {
            Some(text) => match workflow::parse_str(
                &text.source,
                &text.file,
                name,
                &PinnedCatalog(&service.inner.registry),
            ) {
                Ok(plan) => (Arc::new(plan), text.clone()),
                Err(diagnostics) => {
                    return failed(
                        ErrorKind::Workflow,
                        format!(
                            "the pinned version of workflow `{name}` no longer loads:\n{diagnostics}"
                        ),
                        false,
                    );
                }
            },
            None => {
                let Some(entry) = service.workflow(name) else {
                    return failed(
                        ErrorKind::Workflow,
                        format!("no workflow named `{name}` is loaded"),
                        false,
                    );
                };
                match entry.plan {
                    Ok(plan) => (
                        plan,
                        WorkflowText {
                            source: entry.source,
                            file: entry.file,
                        },
                    ),
                    Err(diagnostics) => {
                        return failed(
                            ErrorKind::Workflow,
                            format!(
                                "workflow `{name}` has errors and refuses runs:\n{diagnostics}"
                            ),
                            false,
                        );
                    }
                }
            }
        };
        if let Some(schema) = &plan.input_schema
            && let Err(violations) = schema.validate(&request.input)
        {
            return ChildOutcome {
                run: None,
                result: Err(child_input_error(name, &violations)),
            };
        }
        let mut record = queued_record(&plan, new_run_id(), request.input);
        record.parent = Some(request.parent);
        let _ = service.inner.executor.pin(&plan, &mut record);
        let submitted = match service
            .accept(
                plan,
                &text,
                record,
                Some(&request.key),
                StoredItems::new(),
                &pins,
            )
            .await
        {
            Ok(submitted) => submitted,
            Err(error) => {
                // The store was unreachable, or the server is stopping: the
                // step's retries may do better.
                return failed(
                    ErrorKind::Workflow,
                    format!("cannot start a run of workflow `{name}`: {error}"),
                    true,
                );
            }
        };
        let id = submitted.run.id.clone();
        let ended = tokio::select! {
            ended = service.until_finished(&id) => ended,
            () = request.cancel.cancelled() => {
                let _ = service.cancel(&id).await;
                return ChildOutcome {
                    run: Some(id),
                    result: Err(ErrorRecord {
                        kind: ErrorKind::Cancelled,
                        message: "the run was cancelled".into(),
                        retryable: false,
                        details: None,
                    }),
                };
            }
            () = tokio::time::sleep(request.timeout) => {
                let _ = service.cancel(&id).await;
                return ChildOutcome {
                    result: Err(ErrorRecord {
                        kind: ErrorKind::Timeout,
                        message: format!(
                            "child run {id} of workflow `{name}` did not finish within the step's \
                             timeout of {}; it was cancelled",
                            humantime::format_duration(request.timeout)
                        ),
                        retryable: true,
                        details: None,
                    }),
                    run: Some(id),
                };
            }
        };
        let result = match ended {
            Err(error) => Err(ErrorRecord {
                kind: ErrorKind::Workflow,
                message: format!("cannot follow child run {id}: {error}"),
                retryable: true,
                details: None,
            }),
            Ok(child) => child_result(&child),
        };
        ChildOutcome {
            run: Some(id),
            result,
        }
    }
}

impl Service {
    /// The run once it finished, wherever it runs: here (its end is
    /// awaited), or elsewhere or not taken up yet (the store is read now and
    /// then).
    pub(super) async fn until_finished(&self, id: &str) -> Result<RunRecord, StoreError> {
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(finished) = self.wait(id, Duration::from_secs(3600)).await? {
                return Ok(finished);
            }
            if self.inner.store.get_run(id).await?.is_none() {
                return Err(StoreError::Database(
                    format!("there is no run {id}").as_str().into(),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// How deep `record` is nested: 0 for a run without a parent, else its
    /// parent's depth plus one (at most [`MAX_DEPTH`] + 1 lookups).
    pub(super) async fn depth_of(&self, record: &RunRecord) -> usize {
        let mut depth = 0;
        let mut parent = record.parent.clone();
        while let Some(up) = parent {
            depth += 1;
            if depth > MAX_DEPTH {
                break;
            }
            parent = match self.get_run(&up.run).await {
                Ok(Some(run)) => run.parent,
                _ => None,
            };
        }
        depth
    }
}
