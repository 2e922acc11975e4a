//! Sub-workflows for `trellis run` and `trellis validate`, without a server:
//! the workflows a step may call are the workflow files next to the one
//! given and in the configured workflow dirs; `run` runs each child in
//! memory, like its parent.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::executor::{
    ChildOutcome, ChildRequest, ChildRuns, Executor, RunOptions, child_input_error, child_result,
    queued_record,
};
use crate::plugin::PluginRegistry;
use crate::record::{ErrorKind, ErrorRecord, new_run_id};
use crate::secrets::Secrets;
use crate::workflow::{self, PluginCatalog, WithSecrets, WithWorkflows};

/// The workflow files a workflow may call: by name, the file and the
/// workflows it calls in turn.
pub(super) struct LocalWorkflows {
    files: HashMap<String, PathBuf>,
    calls: HashMap<String, Vec<String>>,
}

impl LocalWorkflows {
    /// Every `*.toml` file in the dirs of `workflows` and in `dirs`; a name
    /// found twice keeps its first file.
    pub(super) fn find(workflows: &[&Path], dirs: &[PathBuf]) -> LocalWorkflows {
        let mut found = LocalWorkflows {
            files: HashMap::new(),
            calls: HashMap::new(),
        };
        let mut seen_dirs: Vec<PathBuf> = Vec::new();
        let parents = workflows.iter().map(|file| match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        });
        for dir in parents.chain(dirs.iter().cloned()) {
            if seen_dirs.contains(&dir) {
                continue;
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
                .collect();
            files.sort();
            for path in files {
                let Ok(source) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let stem = path
                    .file_stem()
                    .map(|stem| stem.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let (name, calls) = workflow::name_and_calls(&source, &stem);
                found.calls.entry(name.clone()).or_insert(calls);
                found.files.entry(name).or_insert(path);
            }
            seen_dirs.push(dir);
        }
        found
    }

    /// `inner` that also knows these workflows.
    pub(super) fn catalog<'a>(&'a self, inner: &'a dyn PluginCatalog) -> WithWorkflows<'a> {
        WithWorkflows {
            inner,
            workflows: &self.calls,
        }
    }
}

/// Child runs in memory, for `trellis run`.
pub(super) struct LocalChildren {
    pub(super) workflows: LocalWorkflows,
    pub(super) executor: Executor,
    pub(super) registry: Arc<PluginRegistry>,
    pub(super) secrets: Secrets,
    /// Itself, for the children's own sub-workflow steps.
    pub(super) this: std::sync::Weak<LocalChildren>,
}

#[async_trait::async_trait]
impl ChildRuns for LocalChildren {
    async fn run_child(&self, request: ChildRequest) -> ChildOutcome {
        let failed = |kind, message: String| ChildOutcome {
            run: None,
            result: Err(ErrorRecord {
                kind,
                message,
                retryable: false,
                details: None,
            }),
        };
        let name = &request.workflow;
        let Some(file) = self.workflows.files.get(name) else {
            return failed(
                ErrorKind::Workflow,
                format!("no workflow named `{name}` next to the workflow or in the workflow dirs"),
            );
        };
        let loaded = {
            let secrets = WithSecrets {
                plugins: self.registry.as_ref(),
                secrets: &self.secrets,
            };
            workflow::load_file(file, &self.workflows.catalog(&secrets))
        };
        let plan = match loaded {
            Ok(plan) => Arc::new(plan),
            Err(diagnostics) => {
                return failed(
                    ErrorKind::Workflow,
                    format!("workflow `{name}` has errors:\n{diagnostics}"),
                );
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
        let id = record.id.clone();
        let cancel = request.cancel.child_token();
        let options = RunOptions {
            run_id: Some(id.clone()),
            cancel: cancel.clone(),
            children: self.this.upgrade().map(|this| this as Arc<dyn ChildRuns>),
            depth: request.parent_depth + 1,
            ..RunOptions::default()
        };
        let run = self.executor.execute(plan, record, options);
        tokio::pin!(run);
        let child = tokio::select! {
            child = &mut run => child,
            () = tokio::time::sleep(request.timeout) => {
                cancel.cancel();
                let _ = run.await;
                return ChildOutcome {
                    run: Some(id.clone()),
                    result: Err(ErrorRecord {
                        kind: ErrorKind::Timeout,
                        message: format!(
                            "child run {id} of workflow `{name}` did not finish within the step's timeout of {}",
                            humantime::format_duration(request.timeout)
                        ),
                        retryable: true,
                        details: None,
                    }),
                };
            }
        };
        let result = child_result(&child);
        ChildOutcome {
            run: Some(id),
            result,
        }
    }
}
