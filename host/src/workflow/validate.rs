//! The validation pass: from the file as written ([`schema`](super::schema)) to
//! a [`Plan`], checking what serde cannot: ids, references, plugins, templates,
//! the dependency graph, limits, retry settings and the input's JSON Schema.
//!
//! Every problem is reported, each at the place in the file that has to change.
//! A plan is only built when there was none.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::ops::Range;

use humantime::format_duration;
use serde_json::Value as Json;
use toml::Spanned;

use super::PluginCatalog;
use super::closest;
use super::plan::{
    InputSchema, MAX_ATTEMPTS, OnFailure, Plan, PlannedStep, RetryPolicy, error_message,
};
use super::schema::{InputTable, Parsed, RetryTable, StepTable, TomlValue};
use super::template::{SCOPE_NAMES, TemplateValue, TemplatesBuilder};
use crate::diagnostic::Reporter;
use crate::limits::{HostPattern, LimitOverrides, LimitsTable};
use crate::plugin::PluginRef;

pub(crate) fn validate(
    parsed: Parsed,
    file_name: &str,
    default_name: &str,
    catalog: &dyn PluginCatalog,
    report: &mut Reporter<'_>,
) -> Option<Plan> {
    let validator = Validator {
        report,
        catalog,
        templates: TemplatesBuilder::new(),
        ids: HashMap::new(),
        name: String::new(),
    };
    validator.workflow(parsed, file_name, default_name)
}

struct Validator<'r, 's> {
    report: &'r mut Reporter<'s>,
    catalog: &'r dyn PluginCatalog,
    /// The workflow's own name (a sub-workflow step may not lead back to it).
    name: String,
    templates: TemplatesBuilder,
    /// Step id -> (index in file order, span of the id).
    ids: HashMap<String, (usize, Range<usize>)>,
}

/// A step that passed its own checks, in file order, before sorting.
struct Draft {
    id: String,
    plugin: PluginRef,
    workflow: Option<String>,
    /// (file index of the needed step, where the dependency is written).
    needs: Vec<(usize, Range<usize>)>,
    input: TemplateValue,
    config: BTreeMap<String, TemplateValue>,
    condition: Option<TemplateValue>,
    for_each: Option<TemplateValue>,
    limits: LimitOverrides,
    retry: RetryPolicy,
    on_failure: OnFailure,
    allow_hosts: Vec<HostPattern>,
    secrets: Vec<String>,
}

/// Where the retry settings a table does not set come from: "[retry]" or "the
/// default".
#[derive(Clone, Copy)]
struct RetrySources {
    initial: &'static str,
    max: &'static str,
}

/// Where a template is, which decides what it may read.
#[derive(Clone, Copy)]
enum Place {
    /// `input` or `config` of a step (file index); `item` is in scope with `for_each`.
    StepValue { step: usize, for_each: bool },
    /// `if` of a step.
    Condition { step: usize },
    /// `for_each` of a step.
    ForEach { step: usize },
    /// `[output]`.
    Output,
}

impl Place {
    fn step(self) -> Option<usize> {
        match self {
            Place::StepValue { step, .. } | Place::Condition { step } | Place::ForEach { step } => {
                Some(step)
            }
            Place::Output => None,
        }
    }

    /// Why `item`/`index` cannot be read here, or `None` if it can.
    fn item_unavailable(self, name: &str) -> Option<String> {
        match self {
            Place::StepValue { for_each: true, .. } => None,
            Place::StepValue {
                for_each: false, ..
            } => Some(format!(
                "`{name}` is only defined in a step with `for_each`"
            )),
            Place::Condition { .. } => Some(format!(
                "`{name}` is not defined in `if`: the condition is checked once, before `for_each` \
                 fans out (filter the list in `for_each` instead)"
            )),
            Place::ForEach { .. } => Some(format!(
                "`{name}` is not defined in `for_each` itself, only in the step's `input` and `config`"
            )),
            Place::Output => Some(format!("`{name}` is not defined in [output]")),
        }
    }
}

impl Validator<'_, '_> {
    /// A sub-workflow step's `workflow`: a known workflow that does not lead
    /// back to this one. `None` (reported) if not.
    fn sub_workflow(&mut self, workflow: &Spanned<String>, label: &str) -> Option<String> {
        let called = workflow.get_ref();
        if *called == self.name {
            self.report.error(
                &workflow.span(),
                format!(
                    "{label} calls workflow `{called}`, this workflow itself: workflows may not \
                     call each other in a cycle"
                ),
            );
            return None;
        }
        if self.catalog.workflow_calls(called).is_none() {
            self.report.error(
                &workflow.span(),
                format!(
                    "{label} calls workflow `{called}`, but no workflow of that name is loaded"
                ),
            );
            return None;
        }
        // Depth first from the called workflow; `path[i]` calls `path[i + 1]`.
        let mut path = vec![called.clone()];
        let mut seen = std::collections::HashSet::new();
        if let Some(cycle) = self.leads_back(&mut path, &mut seen) {
            self.report.error(
                &workflow.span(),
                format!(
                    "{label} calls workflow `{called}`, and {}: workflows may not call each \
                     other in a cycle",
                    cycle
                ),
            );
            return None;
        }
        Some(called.clone())
    }

    /// How the last workflow of `path` calls this one again, in words, if it
    /// does.
    fn leads_back(
        &self,
        path: &mut Vec<String>,
        seen: &mut std::collections::HashSet<String>,
    ) -> Option<String> {
        let last = path.last()?.clone();
        if !seen.insert(last.clone()) {
            return None;
        }
        for next in self.catalog.workflow_calls(&last).unwrap_or_default() {
            path.push(next.clone());
            if next == self.name {
                let steps: Vec<String> = path
                    .windows(2)
                    .map(|pair| format!("`{}` calls `{}`", pair[0], pair[1]))
                    .collect();
                return Some(steps.join(", "));
            }
            if let Some(cycle) = self.leads_back(path, seen) {
                return Some(cycle);
            }
            path.pop();
        }
        None
    }

    fn workflow(mut self, parsed: Parsed, file_name: &str, default_name: &str) -> Option<Plan> {
        let file = &parsed.file;
        let name = match &file.name {
            Some(name) => {
                if let Err(message) = check_workflow_name(name.get_ref()) {
                    self.report.error(&name.span(), message);
                }
                name.get_ref().clone()
            }
            None => {
                if let Err(message) = check_workflow_name(default_name) {
                    self.report.error_at(
                        0,
                        format!(
                            "{message}; the name comes from the file name: rename the file, or set `name = \"...\"`"
                        ),
                    );
                }
                default_name.to_owned()
            }
        };
        self.name.clone_from(&name);

        let limits = self.limits(file.limits.as_ref());
        let defaults = RetrySources {
            initial: "the default",
            max: "the default",
        };
        let retry = self.retry(file.retry.as_ref(), &RetryPolicy::default(), defaults);
        let from_workflow = |set: bool| if set { "[retry]" } else { "the default" };
        let retry_source = RetrySources {
            initial: from_workflow(file.retry.as_ref().is_some_and(|r| r.initial.is_some())),
            max: from_workflow(file.retry.as_ref().is_some_and(|r| r.max.is_some())),
        };

        let input_schema = file.input.as_ref().and_then(|input| self.input(input));

        if file.step.is_empty() && !parsed.dropped_top_key("step") {
            self.report.error_at(
                0,
                "the workflow has no steps: add a [[step]] with an `id` and a `plugin`",
            );
        }

        // Ids first: references may point forward.
        for (index, step) in file.step.iter().enumerate() {
            match &step.get_ref().id {
                Some(id) => {
                    if let Err(message) = check_step_id(id.get_ref()) {
                        self.report.error(&id.span(), message);
                    }
                    if let Some((_, first)) = self.ids.get(id.get_ref()) {
                        let line = self.report.line(first.start);
                        self.report.error(
                            &id.span(),
                            format!(
                                "duplicate step id `{}` (line {line} already uses it)",
                                id.get_ref()
                            ),
                        );
                    } else {
                        self.ids.insert(id.get_ref().clone(), (index, id.span()));
                    }
                }
                None if parsed.dropped_step_key(index, "id") => {}
                None => self
                    .report
                    .error(&step.span(), format!("step #{} has no `id`", index + 1)),
            }
        }

        let mut drafts: Vec<Option<Draft>> = Vec::with_capacity(file.step.len());
        for (index, step) in file.step.iter().enumerate() {
            drafts.push(self.step(index, step, &parsed, &limits, &retry, retry_source));
        }

        let output = file
            .output
            .as_ref()
            .map(|output| self.value(output, "output", Place::Output, &mut Vec::new()));

        let order = self.order(&drafts);
        if self.report.has_errors() {
            return None;
        }
        // Without a reported problem every step has a draft.
        let order = order?;
        if drafts.iter().any(Option::is_none) {
            return None;
        }

        let mut position = vec![0; drafts.len()];
        for (planned, &index) in order.iter().enumerate() {
            position[index] = planned;
        }
        let steps: Vec<PlannedStep> = order
            .iter()
            .filter_map(|&index| drafts[index].take())
            .map(|draft| {
                let mut needs: Vec<usize> = draft
                    .needs
                    .iter()
                    .map(|(need, _)| position[*need])
                    .collect();
                needs.sort_unstable();
                needs.dedup();
                PlannedStep {
                    id: draft.id,
                    plugin: draft.plugin,
                    workflow: draft.workflow,
                    needs,
                    input: draft.input,
                    config: draft.config,
                    condition: draft.condition,
                    for_each: draft.for_each,
                    limits: draft.limits,
                    retry: draft.retry,
                    on_failure: draft.on_failure,
                    allow_hosts: draft.allow_hosts.into(),
                    secrets: draft.secrets,
                }
            })
            .collect();

        let index = steps
            .iter()
            .enumerate()
            .map(|(i, step)| (step.id.clone(), i))
            .collect();
        Some(Plan {
            index: std::sync::Arc::new(index),
            name,
            description: file.description.clone(),
            file: file_name.to_owned(),
            steps,
            input_schema,
            output,
            templates: self.templates.finish(),
        })
    }

    fn step(
        &mut self,
        index: usize,
        step: &Spanned<StepTable>,
        parsed: &Parsed,
        workflow_limits: &LimitOverrides,
        workflow_retry: &RetryPolicy,
        retry_source: RetrySources,
    ) -> Option<Draft> {
        let table = step.get_ref();
        let id = table.id.as_ref().map(|id| id.get_ref().clone());
        let label = match &id {
            Some(id) => format!("step `{id}`"),
            None => format!("step #{}", index + 1),
        };

        let workflow = table
            .workflow
            .as_ref()
            .map(|workflow| self.sub_workflow(workflow, &label));
        let plugin = match (&table.plugin, &table.workflow) {
            (Some(plugin), Some(workflow)) => {
                self.report.error(
                    &workflow.span(),
                    format!(
                        "{label} has both `plugin` and `workflow`: a step runs a plugin or a \
                         sub-workflow, so keep one"
                    ),
                );
                let _ = plugin;
                None
            }
            (None, Some(_)) => Some(PluginRef::latest("")),
            (Some(plugin), None) => {
                let written = plugin.get_ref();
                let checked = written
                    .parse::<PluginRef>()
                    .map_err(|error| error.to_string())
                    .and_then(|reference| self.catalog.check(&reference).map(|()| reference));
                match checked {
                    Ok(reference) => Some(reference),
                    Err(message) => {
                        self.report.error(&plugin.span(), message);
                        // Reported, so no plan comes of it; the step still
                        // takes part in the checks that follow.
                        Some(PluginRef::latest(written.as_str()))
                    }
                }
            }
            (None, None) => {
                if !parsed.dropped_step_key(index, "plugin")
                    && !parsed.dropped_step_key(index, "workflow")
                {
                    self.report.error(
                        &step.span(),
                        format!("{label} has no `plugin` (or `workflow`, for a sub-workflow)"),
                    );
                }
                None
            }
        };
        if table.workflow.is_some() {
            // What only a plugin reads.
            let only_plugins = [
                ("config", table.config.as_ref().map(|config| config.span())),
                (
                    "allow_hosts",
                    table.allow_hosts.first().map(|host| host.span()),
                ),
                ("secrets", table.secrets.first().map(|name| name.span())),
            ];
            for (key, span) in only_plugins {
                if let Some(span) = span {
                    self.report.error(
                        &span,
                        format!(
                            "{label} runs a sub-workflow: `{key}` is for plugin steps (the \
                             child workflow's own steps set theirs)"
                        ),
                    );
                }
            }
        }

        let mut needs = Vec::new();
        for need in &table.needs {
            match self.ids.get(need.get_ref()) {
                Some((need_index, _)) if *need_index == index => {
                    self.report
                        .error(&need.span(), format!("{label} needs itself"));
                }
                Some((need_index, _)) => needs.push((*need_index, need.span())),
                None => {
                    let message = format!(
                        "{label} needs `{}`, but there is no step `{}`{}",
                        need.get_ref(),
                        need.get_ref(),
                        self.suggest_id(need.get_ref())
                    );
                    self.report.error(&need.span(), message);
                }
            }
        }

        let for_each_given = table.for_each.is_some();
        let prefix = format!("{label} ");
        let input = match &table.input {
            Some(input) => self.value(
                input,
                &format!("{prefix}input"),
                Place::StepValue {
                    step: index,
                    for_each: for_each_given,
                },
                &mut needs,
            ),
            None => TemplateValue::default(),
        };
        let mut config = BTreeMap::new();
        if let Some(table) = &table.config {
            for (key, value) in table.get_ref() {
                let field = format!("{prefix}config{}", key_path(key));
                let value = self.value(
                    value,
                    &field,
                    Place::StepValue {
                        step: index,
                        for_each: for_each_given,
                    },
                    &mut needs,
                );
                config.insert(key.clone(), value);
            }
        }
        let condition = table.condition.as_ref().map(|condition| {
            if !matches!(condition.get_ref(), TomlValue::String(_) | TomlValue::Boolean(_)) {
                self.report.error(
                    &condition.span(),
                    "`if` must be a template string like \"{{ steps.check.output.ok }}\" or a boolean",
                );
            }
            self.value(condition, &format!("{prefix}if"), Place::Condition { step: index }, &mut needs)
        });
        let for_each = table.for_each.as_ref().map(|for_each| {
            if !matches!(
                for_each.get_ref(),
                TomlValue::String(_) | TomlValue::Array(_)
            ) {
                self.report.error(
                    &for_each.span(),
                    "`for_each` must be a template string like \"{{ input.items }}\" or an array",
                );
            }
            self.value(
                for_each,
                &format!("{prefix}for_each"),
                Place::ForEach { step: index },
                &mut needs,
            )
        });

        let limits = self.limits(table.limits.as_ref()).over(workflow_limits);
        let retry = self.retry(table.retry.as_ref(), workflow_retry, retry_source);

        let mut allow_hosts = Vec::new();
        for host in &table.allow_hosts {
            match HostPattern::parse(host.get_ref()) {
                Ok(pattern) => allow_hosts.push(pattern),
                Err(why) => self.report.error(
                    &host.span(),
                    format!(
                        "`allow_hosts` entry {why} (an entry is [scheme://]host[:port], \
                         like \"api.example.com\", \"127.0.0.1:9000\" or \"https://*.example.com\")"
                    ),
                ),
            }
        }

        let mut secrets: Vec<String> = Vec::new();
        for name in &table.secrets {
            let text = name.get_ref();
            if !crate::secrets::is_name(text) {
                self.report.error(
                    &name.span(),
                    format!(
                        "`secrets` entry \"{text}\" is not a secret name: use the name of an entry of \
                         [secrets] in trellis.toml, like \"api_token\""
                    ),
                );
            } else if secrets.contains(text) {
                self.report
                    .error(&name.span(), format!("`secrets` names \"{text}\" twice"));
            } else if let Some(key) = table
                .config
                .as_ref()
                .and_then(|config| config.get_ref().keys().find(|key| *key == text))
            {
                self.report.error(
                    &name.span(),
                    format!(
                        "`secrets` entry \"{key}\" is also a `config` key: the plugin reads both \
                         through host.config, so rename one"
                    ),
                );
            } else {
                if let Err(why) = self.catalog.check_secret(text) {
                    self.report.error(&name.span(), why);
                }
                secrets.push(text.clone());
            }
        }

        Some(Draft {
            id: id?,
            plugin: plugin?,
            workflow: workflow.flatten(),
            needs,
            input,
            config,
            condition,
            for_each,
            limits,
            retry,
            on_failure: table.on_failure.unwrap_or(OnFailure::Fail),
            allow_hosts,
            secrets,
        })
    }

    /// Compiles every string inside `value` as a template, checking what it reads
    /// and adding the steps it reads to `needs`.
    fn value(
        &mut self,
        value: &Spanned<TomlValue>,
        field: &str,
        place: Place,
        needs: &mut Vec<(usize, Range<usize>)>,
    ) -> TemplateValue {
        match value.get_ref() {
            TomlValue::String(text) => self.string(text, value.span(), field, place, needs),
            TomlValue::Integer(n) => TemplateValue::Literal(Json::from(*n)),
            TomlValue::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(number) => TemplateValue::Literal(Json::Number(number)),
                None => {
                    self.report
                        .error(&value.span(), format!("{f} has no JSON form"));
                    TemplateValue::default()
                }
            },
            TomlValue::Boolean(b) => TemplateValue::Literal(Json::Bool(*b)),
            TomlValue::Datetime(text) => TemplateValue::Literal(Json::String(text.clone())),
            TomlValue::Array(items) => {
                let items: Vec<TemplateValue> = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.value(item, &format!("{field}[{i}]"), place, needs))
                    .collect();
                if items.iter().all(|item| item.as_literal().is_some()) {
                    TemplateValue::Literal(Json::Array(items.into_iter().map(literal).collect()))
                } else {
                    TemplateValue::Array(items)
                }
            }
            TomlValue::Table(table) => {
                let entries: Vec<(String, TemplateValue)> = table
                    .iter()
                    .map(|(key, item)| {
                        let field = format!("{field}{}", key_path(key));
                        (key.clone(), self.value(item, &field, place, needs))
                    })
                    .collect();
                if entries.iter().all(|(_, item)| item.as_literal().is_some()) {
                    TemplateValue::Literal(Json::Object(
                        entries
                            .into_iter()
                            .map(|(key, item)| (key, literal(item)))
                            .collect(),
                    ))
                } else {
                    TemplateValue::Object(entries)
                }
            }
        }
    }

    fn string(
        &mut self,
        text: &str,
        span: Range<usize>,
        field: &str,
        place: Place,
        needs: &mut Vec<(usize, Range<usize>)>,
    ) -> TemplateValue {
        match self.templates.compile(text, field) {
            Ok(None) => TemplateValue::Literal(Json::String(text.to_owned())),
            Ok(Some(compiled)) => {
                for path in &compiled.references {
                    self.reference(path, text, &span, place, needs);
                }
                compiled.value
            }
            Err(error) => {
                let offset = error
                    .range
                    .and_then(|range| self.offset_in(text, &span, range.start))
                    .unwrap_or(span.start);
                self.report.error_at(
                    offset,
                    format!("{}: {}", error.kind.describe(), error.message),
                );
                TemplateValue::default()
            }
        }
    }

    /// Checks one path a template reads (`input.x`, `steps.a.output`, `item`...).
    fn reference(
        &mut self,
        path: &str,
        text: &str,
        span: &Range<usize>,
        place: Place,
        needs: &mut Vec<(usize, Range<usize>)>,
    ) {
        let mut segments = path.split('.');
        let root = segments.next().unwrap_or_default();
        let locate = |this: &Self, needle: &str| {
            find_word(text, needle)
                .and_then(|at| this.offset_in(text, span, at))
                .unwrap_or(span.start)
        };
        match root {
            "input" => {}
            "run" => {
                if let Some(attribute) = segments.next()
                    && attribute != "id"
                    && attribute != "workflow"
                {
                    let at = locate(self, &format!("run.{attribute}"));
                    self.report.error_at(
                        at,
                        format!("`run.{attribute}` does not exist: `run` has `id` and `workflow`"),
                    );
                }
            }
            "steps" => {
                let Some(id) = segments.next() else {
                    if place.step().is_some() {
                        let at = locate(self, "steps");
                        self.report.error_at(
                            at,
                            "read another step as `steps.<id>.output` with its id written out, \
                             so that Trellis knows which steps this one waits for",
                        );
                    }
                    return;
                };
                let at = locate(self, &format!("steps.{id}"));
                match self.ids.get(id) {
                    None => {
                        let message = format!(
                            "`steps.{id}` refers to an unknown step `{id}`{}",
                            self.suggest_id(id)
                        );
                        self.report.error_at(at, message);
                    }
                    Some((index, _)) if Some(*index) == place.step() => {
                        self.report.error_at(
                            at,
                            format!(
                                "step `{id}` reads its own result (`steps.{id}`); \
                                 a template can only read the steps that ran before"
                            ),
                        );
                    }
                    Some((index, _)) => needs.push((*index, at..at)),
                }
                if let Some(attribute) = segments.next()
                    && attribute != "output"
                    && attribute != "status"
                {
                    self.report.error_at(
                        at,
                        format!(
                            "`steps.{id}.{attribute}` does not exist: a step has `output` and `status`"
                        ),
                    );
                }
            }
            "item" | "index" => {
                if let Some(message) = place.item_unavailable(root) {
                    let at = locate(self, root);
                    self.report.error_at(at, message);
                }
            }
            other if self.templates.is_global(other) => {}
            other => {
                let at = locate(self, other);
                let names = match place {
                    Place::StepValue { for_each: true, .. } => {
                        "input, steps.<id>, run, item, index"
                    }
                    _ => "input, steps.<id>, run",
                };
                let suggestion = closest(other, SCOPE_NAMES)
                    .map(|name| format!("; did you mean `{name}`?"))
                    .unwrap_or_default();
                self.report.error_at(
                    at,
                    format!("unknown variable `{other}` (templates can read {names}){suggestion}"),
                );
            }
        }
    }

    /// The byte offset in the file of byte `at` of the string `text` written at
    /// `span`, when the string is written without escapes.
    fn offset_in(&self, text: &str, span: &Range<usize>, at: usize) -> Option<usize> {
        let raw = self.report.source().get(span.clone())?;
        for delimiter in ["\"\"\"", "'''", "\"", "'"] {
            if raw.len() >= 2 * delimiter.len()
                && raw.starts_with(delimiter)
                && raw.ends_with(delimiter)
            {
                let mut start = span.start + delimiter.len();
                let mut inner = &raw[delimiter.len()..raw.len() - delimiter.len()];
                if delimiter.len() == 3 {
                    // TOML drops a newline right after the opening delimiter.
                    for newline in ["\r\n", "\n"] {
                        if let Some(rest) = inner.strip_prefix(newline) {
                            start += newline.len();
                            inner = rest;
                            break;
                        }
                    }
                }
                return (inner == text).then_some(start + at);
            }
        }
        None
    }

    /// `[input]`: the schema as JSON, checked against its meta-schema and compiled.
    fn input(&mut self, table: &Spanned<InputTable>) -> Option<InputSchema> {
        let Some(schema) = &table.get_ref().schema else {
            self.report.error(
                &table.span(),
                "[input] has no `schema`: give the JSON Schema a run's input must match, \
                 like `schema = { type = \"object\" }`",
            );
            return None;
        };
        let (json, from_text) = match schema.get_ref() {
            TomlValue::String(text) => (self.json_text(text, schema.span())?, true),
            _ => (self.json(schema)?, false),
        };
        // A problem inside a schema written as TOML is reported where it is
        // written; inside JSON text, at the text (the message has the pointer).
        let locate = |pointer: &str| {
            if from_text {
                schema.span().start
            } else {
                span_at(schema, pointer).start
            }
        };
        let message = |error: &jsonschema::ValidationError<'_>| {
            let at = error.instance_path().as_str();
            let at = if at.is_empty() {
                String::new()
            } else {
                format!(" at {at}")
            };
            format!("invalid input schema{at}: {}", error_message(error))
        };

        // Every way the schema breaks its draft's rules; compiling stops at the first.
        let problems: Vec<(usize, String)> = match jsonschema::meta::validator_for(&json) {
            Ok(meta) => meta
                .iter_errors(&json)
                .map(|error| (locate(error.instance_path().as_str()), message(&error)))
                .collect(),
            Err(error) => vec![(schema.span().start, message(&error))],
        };
        if !problems.is_empty() {
            for (at, message) in problems {
                self.report.error_at(at, message);
            }
            return None;
        }
        match InputSchema::compile(json, table.get_ref().description.clone()) {
            Ok(compiled) => Some(compiled),
            Err(error) => {
                self.report
                    .error_at(locate(error.instance_path().as_str()), message(&error));
                None
            }
        }
    }

    /// A schema written as TOML, as JSON; `None` (reported) if it has no JSON form.
    fn json(&mut self, value: &Spanned<TomlValue>) -> Option<Json> {
        Some(match value.get_ref() {
            TomlValue::String(text) => Json::String(text.clone()),
            TomlValue::Integer(n) => Json::from(*n),
            TomlValue::Float(f) => match serde_json::Number::from_f64(*f) {
                Some(number) => Json::Number(number),
                None => {
                    self.report
                        .error(&value.span(), format!("{f} has no JSON form"));
                    return None;
                }
            },
            TomlValue::Boolean(b) => Json::Bool(*b),
            TomlValue::Datetime(text) => Json::String(text.clone()),
            TomlValue::Array(items) => {
                // Convert every item, so that every problem is reported.
                let items: Vec<Option<Json>> = items.iter().map(|item| self.json(item)).collect();
                Json::Array(items.into_iter().collect::<Option<_>>()?)
            }
            TomlValue::Table(table) => {
                let entries: Vec<(String, Option<Json>)> = table
                    .iter()
                    .map(|(key, item)| (key.clone(), self.json(item)))
                    .collect();
                Json::Object(
                    entries
                        .into_iter()
                        .map(|(key, item)| Some((key, item?)))
                        .collect::<Option<_>>()?,
                )
            }
        })
    }

    /// A schema written as a string of JSON text, parsed; `None` (reported) if
    /// it is not JSON.
    fn json_text(&mut self, text: &str, span: Range<usize>) -> Option<Json> {
        let error = match serde_json::from_str(text) {
            Ok(json) => return Some(json),
            Err(error) => error,
        };
        let (line, column) = (error.line(), error.column());
        let full = error.to_string();
        let reason = full
            .strip_suffix(&format!(" at line {line} column {column}"))
            .unwrap_or(&full);
        // serde_json counts columns in bytes, the column of the offending byte.
        let line_start: usize = text
            .split_inclusive('\n')
            .take(line.saturating_sub(1))
            .map(str::len)
            .sum();
        let at = (line_start + column.saturating_sub(1)).min(text.len());
        let mut message = format!("the input schema is not valid JSON: {reason}");
        let offset = match self.offset_in(text, &span, at) {
            Some(offset) => offset,
            None => {
                message.push_str(&format!(" (line {line}, column {column} of the JSON text)"));
                span.start
            }
        };
        if !text.trim_start().starts_with('{') {
            message.push_str(
                "; a string `schema` is JSON text, like '''{ \"type\": \"object\" }''' \
                 (or write the schema as a TOML table)",
            );
        }
        self.report.error_at(offset, message);
        None
    }

    fn suggest_id(&self, id: &str) -> String {
        closest(id, self.ids.keys().map(String::as_str))
            .map(|name| format!("; did you mean `{name}`?"))
            .unwrap_or_default()
    }

    fn limits(&mut self, table: Option<&LimitsTable>) -> LimitOverrides {
        let Some(table) = table else {
            return LimitOverrides::default();
        };
        table.overrides(&mut |_, span, message| self.report.error(&span, message))
    }

    /// `table` on top of `base`, key by key. `base_source` says where `base`'s
    /// values come from, for the message when `initial` exceeds `max`.
    fn retry(
        &mut self,
        table: Option<&RetryTable>,
        base: &RetryPolicy,
        base_source: RetrySources,
    ) -> RetryPolicy {
        let Some(table) = table else {
            return *base;
        };
        if let Some(attempts) = &table.max_attempts {
            let n = *attempts.get_ref();
            if n == 0 {
                self.report.error(
                    &attempts.span(),
                    "`max_attempts` must be at least 1 (1 means no retry)",
                );
            } else if n > MAX_ATTEMPTS {
                self.report.error(
                    &attempts.span(),
                    format!(
                        "`max_attempts` is {n}, more than {MAX_ATTEMPTS}: the run record keeps \
                         every attempt; to retry over a longer time, raise `max`"
                    ),
                );
            }
        }
        let policy = RetryPolicy {
            max_attempts: table
                .max_attempts
                .as_ref()
                .map_or(base.max_attempts, |n| *n.get_ref()),
            backoff: table.backoff.unwrap_or(base.backoff),
            initial: table
                .initial
                .as_ref()
                .map_or(base.initial, |d| d.get_ref().0),
            max: table.max.as_ref().map_or(base.max, |d| d.get_ref().0),
        };
        let span = table
            .initial
            .as_ref()
            .map(Spanned::span)
            .or_else(|| table.max.as_ref().map(Spanned::span));
        if let Some(span) = span
            && policy.initial > policy.max
        {
            let from = |set: bool, source: &str| {
                if set {
                    String::new()
                } else {
                    format!(", from {source}")
                }
            };
            self.report.error(
                &span,
                format!(
                    "retry `initial` ({}{}) is longer than `max` ({}{})",
                    format_duration(policy.initial),
                    from(table.initial.is_some(), base_source.initial),
                    format_duration(policy.max),
                    from(table.max.is_some(), base_source.max),
                ),
            );
        }
        policy
    }

    /// File indices of the steps in run order: dependencies first, ties in file
    /// order. `None` (with every cycle reported) when there is a cycle.
    fn order(&mut self, drafts: &[Option<Draft>]) -> Option<Vec<usize>> {
        let count = drafts.len();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); count];
        let mut waiting_on = vec![0usize; count];
        let mut edge_at: HashMap<(usize, usize), usize> = HashMap::new();
        for (index, draft) in drafts.iter().enumerate() {
            let Some(draft) = draft else { continue };
            let mut needs: Vec<usize> = draft.needs.iter().map(|(need, _)| *need).collect();
            needs.sort_unstable();
            needs.dedup();
            for &need in &needs {
                dependents[need].push(index);
            }
            waiting_on[index] = needs.len();
            for (need, span) in &draft.needs {
                edge_at.entry((index, *need)).or_insert(span.start);
            }
        }

        let mut ready: BinaryHeap<Reverse<usize>> = (0..count)
            .filter(|&i| waiting_on[i] == 0)
            .map(Reverse)
            .collect();
        let mut order = Vec::with_capacity(count);
        while let Some(Reverse(index)) = ready.pop() {
            order.push(index);
            for &dependent in &dependents[index] {
                waiting_on[dependent] -= 1;
                if waiting_on[dependent] == 0 {
                    ready.push(Reverse(dependent));
                }
            }
        }
        if order.len() == count {
            return Some(order);
        }

        // Every step left waits on another step left: walking from any of them
        // along its first unfinished need must come back round.
        let mut in_reported_cycle = vec![false; count];
        for start in 0..count {
            if waiting_on[start] == 0 || in_reported_cycle[start] {
                continue;
            }
            let mut path = vec![start];
            let mut seen_at: HashMap<usize, usize> = HashMap::from([(start, 0)]);
            let cycle = loop {
                let current = *path.last().unwrap_or(&start);
                let Some(next) = drafts[current].as_ref().and_then(|draft| {
                    let mut needs: Vec<usize> = draft
                        .needs
                        .iter()
                        .map(|(need, _)| *need)
                        .filter(|&need| waiting_on[need] > 0)
                        .collect();
                    needs.sort_unstable();
                    needs.first().copied()
                }) else {
                    break None;
                };
                if let Some(&at) = seen_at.get(&next) {
                    break Some(path[at..].to_vec());
                }
                seen_at.insert(next, path.len());
                path.push(next);
            };
            let Some(mut cycle) = cycle else { continue };
            if cycle.iter().any(|&step| in_reported_cycle[step]) {
                continue;
            }
            for &step in &cycle {
                in_reported_cycle[step] = true;
            }
            // Start at the step that comes first in the file.
            let first = cycle
                .iter()
                .enumerate()
                .min_by_key(|(_, step)| **step)
                .map_or(0, |(i, _)| i);
            cycle.rotate_left(first);
            let names: Vec<&str> = cycle
                .iter()
                .chain(std::iter::once(&cycle[0]))
                .map(|&step| drafts[step].as_ref().map_or("?", |draft| draft.id.as_str()))
                .collect();
            let at = edge_at
                .get(&(cycle[0], cycle[1 % cycle.len()]))
                .copied()
                .unwrap_or(0);
            self.report.error_at(
                at,
                format!(
                    "dependency cycle: {} (each step needs the next)",
                    names.join(" -> ")
                ),
            );
        }
        None
    }
}

/// The span of the value at JSON Pointer `pointer` inside `value`, or of the
/// deepest value on the way there that exists.
fn span_at(value: &Spanned<TomlValue>, pointer: &str) -> Range<usize> {
    let mut here = value;
    for segment in pointer.split('/').skip(1) {
        let key = segment.replace("~1", "/").replace("~0", "~");
        let next = match here.get_ref() {
            TomlValue::Table(table) => table.get(&key),
            TomlValue::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        match next {
            Some(next) => here = next,
            None => break,
        }
    }
    here.span()
}

fn literal(value: TemplateValue) -> Json {
    match value {
        TemplateValue::Literal(json) => json,
        _ => Json::Null,
    }
}

/// `.key`, or `["key"]` when the key is not an identifier.
fn key_path(key: &str) -> String {
    if is_identifier(key) {
        format!(".{key}")
    } else {
        format!("[{}]", Json::String(key.to_owned()))
    }
}

fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The byte offset of `needle` in `haystack` where it is a whole name, not part
/// of a longer one (`item` in `input.items` does not count).
fn find_word(haystack: &str, needle: &str) -> Option<usize> {
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    haystack
        .match_indices(needle)
        .map(|(at, _)| at)
        .find(|&at| {
            let before = haystack[..at].chars().next_back();
            let after = haystack[at + needle.len()..].chars().next();
            !before.is_some_and(|c| is_name(c) || c == '.') && !after.is_some_and(is_name)
        })
}

/// Step ids are template names: `steps.<id>` must parse.
fn check_step_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("a step id cannot be empty".to_owned());
    }
    if is_identifier(id) {
        return Ok(());
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut suggestion: String = id
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .collect();
    if suggestion.starts_with(|c: char| c.is_ascii_digit()) {
        suggestion.insert(0, '_');
    }
    if id.chars().all(allowed) {
        Err(format!(
            "step id `{id}` must start with a letter or `_` (templates refer to it as steps.<id>); try `{suggestion}`"
        ))
    } else {
        Err(format!(
            "step id `{id}` may only contain letters, digits and `_` (templates refer to it as steps.<id>); try `{suggestion}`"
        ))
    }
}

/// The longest workflow name.
pub const MAX_WORKFLOW_NAME: usize = 128;

/// A workflow name is a URL segment and a file name: 1 to
/// [`MAX_WORKFLOW_NAME`] letters, digits, `-`, `_` and `.`, not `.` or `..`.
pub fn check_workflow_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !name.is_empty()
        && name.len() <= MAX_WORKFLOW_NAME
        && name.chars().all(allowed)
        && name != "."
        && name != ".."
    {
        Ok(())
    } else {
        let shown: String = name.chars().take(MAX_WORKFLOW_NAME).collect();
        Err(format!(
            "workflow name \"{shown}\" may only contain letters, digits, `-`, `_` and `.`, \
             at most {MAX_WORKFLOW_NAME} of them, and may not be `.` or `..` \
             (it is part of the API's URLs and of a file name)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_plugin_reference(reference: &str) -> Result<(), String> {
        reference
            .parse::<PluginRef>()
            .map(drop)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn step_ids_must_be_template_names() {
        assert!(check_step_id("fetch_user").is_ok());
        assert!(check_step_id("_x1").is_ok());
        assert_eq!(
            check_step_id("fetch-user").unwrap_err(),
            "step id `fetch-user` may only contain letters, digits and `_` (templates refer to it as steps.<id>); try `fetch_user`"
        );
        assert_eq!(
            check_step_id("1st").unwrap_err(),
            "step id `1st` must start with a letter or `_` (templates refer to it as steps.<id>); try `_1st`"
        );
        assert!(check_step_id("").is_err());
        assert!(check_step_id("é").is_err());
    }

    #[test]
    fn plugin_references() {
        assert!(check_plugin_reference("uppercase").is_ok());
        assert!(check_plugin_reference("uppercase@1.2.0").is_ok());
        assert!(check_plugin_reference("uppercase@1.2.0-beta.1").is_ok());
        assert!(check_plugin_reference(&format!("u@sha256:{}", "ab".repeat(32))).is_ok());
        assert!(check_plugin_reference("u@sha256:abc").is_err());
        assert!(check_plugin_reference("u@1.2").is_err());
        assert!(check_plugin_reference("@1.2.0").is_err());
        assert!(check_plugin_reference("").is_err());
    }

    #[test]
    fn words_are_found_whole() {
        assert_eq!(find_word("{{ input.items }} {{ item }}", "item"), Some(21));
        assert_eq!(find_word("{{ input.items }}", "item"), None);
        assert_eq!(find_word("{{ steps.a.output }}", "steps.a"), Some(3));
        assert_eq!(find_word("{{ steps.ab }}", "steps.a"), None);
    }

    #[test]
    fn key_paths() {
        assert_eq!(key_path("items"), ".items");
        assert_eq!(key_path("a-b"), "[\"a-b\"]");
    }
}
