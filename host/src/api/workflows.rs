//! Workflows (list, read, add/replace) and plugins (list).

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type};

use super::error::WorkflowError;
use super::extract::{ApiPath, ApiQuery, TomlBody, WasmBody};
use super::{ApiError, AppState};
use crate::service::{PutPluginError, PutWorkflowError, WorkflowEntry};
use crate::workflow::{Diagnostic, Diagnostics};

/// The request body example of `PUT /v1/workflows/{name}`.
const EXAMPLE_WORKFLOW: &str = r#"description = "Says hello to the name in the input"

[[step]]
id = "greet"
plugin = "json-transform"
input = { filter = ".greeting", data = { greeting = 'hello {{ input.name | default("world") }}' } }
"#;

/// A workflow the server knows, valid or not.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowSummary {
    pub name: String,
    /// Where it came from: the file in a workflow dir, or `<name>.toml` for
    /// one uploaded with `PUT`.
    pub file: String,
    /// Whether it validated; an invalid workflow refuses runs (409).
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How many steps (`null` when it does not validate).
    pub steps: Option<usize>,
    /// Every problem found, in file order; empty when valid.
    pub errors: Vec<WorkflowError>,
}

/// A workflow with its source and input schema.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowDetail {
    #[serde(flatten)]
    pub summary: WorkflowSummary,
    /// The TOML text.
    pub source: String,
    /// `[input] schema` (a JSON Schema) or `null` (any input).
    pub input_schema: Option<Value>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowList {
    /// By name.
    pub workflows: Vec<WorkflowSummary>,
}

fn summary(entry: &WorkflowEntry) -> WorkflowSummary {
    let (valid, description, steps, errors) = match &entry.plan {
        Ok(plan) => (
            true,
            plan.description.clone(),
            Some(plan.steps.len()),
            vec![],
        ),
        Err(diagnostics) => (
            false,
            None,
            None,
            diagnostics.iter().map(WorkflowError::from).collect(),
        ),
    };
    WorkflowSummary {
        name: entry.name.clone(),
        file: entry.file.clone(),
        valid,
        description,
        steps,
        errors,
    }
}

fn detail(entry: &WorkflowEntry) -> WorkflowDetail {
    let input_schema = entry
        .plan
        .as_ref()
        .ok()
        .and_then(|plan| plan.input_schema.as_ref())
        .map(|schema| schema.schema().clone());
    WorkflowDetail {
        summary: summary(entry),
        source: entry.source.clone(),
        input_schema,
    }
}

/// The loaded workflows, with their validation errors if any.
#[utoipa::path(
    get,
    path = "/v1/workflows",
    tag = "workflows",
    responses((status = 200, description = "Every workflow, by name", body = WorkflowList)),
)]
pub async fn list_workflows(State(state): State<AppState>) -> Json<WorkflowList> {
    Json(WorkflowList {
        workflows: state.service.workflows().iter().map(summary).collect(),
    })
}

/// One workflow, with its source and input schema.
#[utoipa::path(
    get,
    path = "/v1/workflows/{name}",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name", pattern = r"^[A-Za-z0-9._-]{1,128}$", example = "order-pipeline")),
    responses(
        (status = 200, description = "The workflow", body = WorkflowDetail),
        (status = 400, description = "The name is not UTF-8 once percent-decoded", body = super::ErrorBody),
        (status = 404, description = "No workflow with this name", body = super::ErrorBody),
    ),
)]
pub async fn get_workflow(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<WorkflowDetail>, ApiError> {
    state
        .service
        .workflow(&name)
        .map(|entry| Json(detail(&entry)))
        .ok_or_else(|| ApiError::NotFound(format!("no workflow named `{name}`")))
}

/// The default window of `GET /v1/workflows/{name}/stats`.
const DEFAULT_WINDOW: &str = "24h";

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// How far back from now: a whole number and a unit (`ms`, `s`, `m`,
    /// `h`, `d`), such as `30m`, `24h` or `7d`; default `24h`. Runs that
    /// finished in it count.
    #[param(example = "24h", pattern = "^[1-9][0-9]{0,5}(ms|s|m|h|d)$")]
    window: Option<String>,
}

/// The four process metrics of a workflow over a window.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowStatsBody {
    /// The window, as given (or the default).
    pub window: String,
    /// Runs that finished in the window (succeeded + failed + cancelled).
    pub runs: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// succeeded / runs; `null` with no runs.
    pub completion_rate: Option<f64>,
    /// failed / runs; `null` with no runs.
    pub error_rate: Option<f64>,
    /// From a run's acceptance to its end: nearest-rank percentiles.
    pub cycle_time_ms: crate::store::Spread,
    /// By step id: the steps that ran in those runs.
    pub steps: std::collections::BTreeMap<String, crate::store::StepStats>,
}

/// The four process metrics of a workflow: completion rate, cycle time,
/// error rate and resource use (per step: duration, fuel, peak memory), over
/// its runs that finished in the window, computed by the store.
#[utoipa::path(
    get,
    path = "/v1/workflows/{name}/stats",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name", pattern = r"^[A-Za-z0-9._-]{1,128}$", example = "order-pipeline"), StatsParams),
    responses(
        (status = 200, description = "The metrics", body = WorkflowStatsBody),
        (status = 400, description = "A bad `window`, or an unknown parameter", body = super::ErrorBody),
        (status = 404, description = "No workflow with this name", body = super::ErrorBody),
        (status = 503, description = "The store cannot be reached", body = super::ErrorBody),
    ),
)]
pub async fn workflow_stats(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<StatsParams>,
) -> Result<Json<WorkflowStatsBody>, ApiError> {
    let window = params.window.unwrap_or_else(|| DEFAULT_WINDOW.to_owned());
    let length = match window_length(&window) {
        Some(length) => length,
        None => {
            return Err(ApiError::InvalidRequest(format!(
                "`window` is \"{window}\": write a whole number from 1 to 999999 and a unit \
                 (ms, s, m, h or d), such as 30m, 24h or 7d"
            )));
        }
    };
    if state.service.workflow(&name).is_none() {
        return Err(ApiError::NotFound(format!("no workflow named `{name}`")));
    }
    let stats = state.service.workflow_stats(&name, length).await?;
    let runs = stats.succeeded + stats.failed + stats.cancelled;
    let rate = |n: u64| (runs > 0).then(|| n as f64 / runs as f64);
    Ok(Json(WorkflowStatsBody {
        window,
        runs,
        succeeded: stats.succeeded,
        failed: stats.failed,
        cancelled: stats.cancelled,
        completion_rate: rate(stats.succeeded),
        error_rate: rate(stats.failed),
        cycle_time_ms: stats.cycle_time_ms,
        steps: stats.steps,
    }))
}

/// `window`'s length, if it is a whole number from 1 to 999999 and a unit.
fn window_length(window: &str) -> Option<std::time::Duration> {
    let split = window.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = window.split_at(split);
    if digits.is_empty() || digits.len() > 6 || digits.starts_with('0') {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(n * millis))
}

/// Add or replace a workflow. It is validated first: one with errors is
/// refused (422) and the version before it, if any, stays.
#[utoipa::path(
    put,
    path = "/v1/workflows/{name}",
    tag = "workflows",
    params(("name" = String, Path, description = "The workflow's name: letters, digits, `-`, `_`, `.`", pattern = r"^[A-Za-z0-9._-]{1,128}$", example = "hello")),
    request_body(content = String, content_type = "application/toml", description = "The workflow file (TOML); its `name`, if set, must be the one in the URL",
        example = json!(EXAMPLE_WORKFLOW)),
    responses(
        (status = 200, description = "The workflow, now active", body = WorkflowDetail),
        (status = 400, description = "A bad name, or a body that is not UTF-8", body = super::ErrorBody),
        (status = 408, description = "The body did not arrive within `body_timeout`", body = super::ErrorBody),
        (status = 413, description = "The body is over `max_body`", body = super::ErrorBody),
        (status = 415, description = "The body is not TOML", body = super::ErrorBody),
        (status = 422, description = "The workflow does not validate (`details`: `[{file, line, column, message}]`)", body = super::ErrorBody),
    ),
)]
pub async fn put_workflow(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    TomlBody(source): TomlBody,
) -> Result<Json<WorkflowDetail>, ApiError> {
    check_name(&name)?;
    check_declared_name(&name, &source)?;
    match state.service.put_workflow(&name, &source).await {
        Ok(entry) => {
            tracing::info!(workflow = %entry.name, "workflow added or replaced");
            Ok(Json(detail(&entry)))
        }
        Err(PutWorkflowError::Save(message)) => Err(ApiError::Internal(message)),
        Err(PutWorkflowError::Invalid(diagnostics)) => Err(ApiError::InvalidWorkflow {
            message: format!(
                "workflow `{name}` has {} and was not saved",
                plural(diagnostics.len(), "error")
            ),
            diagnostics: (*diagnostics).clone(),
        }),
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// A workflow name in a URL: what a workflow file may be named.
fn check_name(name: &str) -> Result<(), ApiError> {
    crate::workflow::check_workflow_name(name).map_err(ApiError::InvalidRequest)
}

/// A plugin name in a URL: what `info()` may answer (plugin::registry).
fn check_plugin_name(name: &str) -> Result<(), ApiError> {
    crate::plugin::check_plugin_name(name)
        .map_err(|reason| ApiError::InvalidRequest(format!("plugin name {name:?}: {reason}")))
}

/// A `name = "..."` in the file must be the name in the URL, or the workflow
/// would be stored under another name than the one it was put at.
fn check_declared_name(name: &str, source: &str) -> Result<(), ApiError> {
    // A file that is not TOML gets its diagnostics from validation.
    let Ok(table) = source.parse::<toml::Table>() else {
        return Ok(());
    };
    match table.get("name") {
        Some(toml::Value::String(declared)) if declared != name => {
            let line = source
                .lines()
                .position(|line| line.trim_start().starts_with("name"))
                .map_or(1, |index| index + 1);
            let message = format!(
                "the workflow calls itself `{declared}`, but it is being put at `{name}`: make them the same, or leave `name` out"
            );
            Err(ApiError::InvalidWorkflow {
                message: message.clone(),
                diagnostics: Diagnostics(vec![Diagnostic {
                    file: format!("{name}.toml"),
                    line,
                    column: 1,
                    message,
                }]),
            })
        }
        _ => Ok(()),
    }
}

/// The body of a plugin upload: a WebAssembly component's bytes.
pub struct WasmComponent;

impl utoipa::PartialSchema for WasmComponent {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
            .content_media_type("application/wasm")
            .into()
    }
}

impl ToSchema for WasmComponent {}

/// A loaded plugin.
#[derive(Debug, Serialize, ToSchema)]
pub struct PluginSummary {
    pub name: String,
    /// Semver, from the plugin's `info()`.
    pub version: String,
    /// `sha256:<hex>` of the component's bytes; `name@sha256:<hex>` pins it.
    pub digest: String,
    pub description: String,
    /// Bytes.
    pub size: u64,
    /// The JSON Schema of its input, if it declares one.
    pub input_schema: Option<Value>,
    pub output_schema: Option<Value>,
    /// The interfaces the component imports.
    pub imports: Vec<String>,
    /// What the plugin can change outside its output, read from its imports:
    /// `http` (it imports `wasi:http`), `state` (it imports `state.set` or
    /// `state.delete`), `import <name>` (an interface not known to be
    /// harmless). Empty: side-effect free. Such a step does not wait for the
    /// store before it starts (after a crash it may run again, which changes
    /// nothing); a step with side effects starts only once everything before
    /// it is stored.
    pub side_effects: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginList {
    /// By name, then version.
    pub plugins: Vec<PluginSummary>,
    /// Files in the plugin dirs that are not usable plugins, with the reason
    /// (the version loaded before, if any, stays active).
    pub errors: Vec<PluginFileError>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginFileError {
    pub file: String,
    pub message: String,
}

/// The loaded plugins.
#[utoipa::path(
    get,
    path = "/v1/plugins",
    tag = "plugins",
    responses((status = 200, description = "Every loaded plugin", body = PluginList)),
)]
pub async fn list_plugins(State(state): State<AppState>) -> Json<PluginList> {
    let mut loaded = state.service.plugins();
    loaded.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    let plugins = loaded.iter().map(|plugin| plugin_summary(plugin)).collect();
    let errors = state
        .service
        .plugin_errors()
        .into_iter()
        .map(|(file, message)| PluginFileError {
            file: file.display().to_string(),
            message,
        })
        .collect();
    Json(PluginList { plugins, errors })
}

fn plugin_summary(plugin: &crate::plugin::Plugin) -> PluginSummary {
    let schema = |text: &Option<String>| {
        text.as_deref()
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
    };
    PluginSummary {
        name: plugin.name.clone(),
        version: plugin.version.to_string(),
        digest: format!("sha256:{}", plugin.digest),
        description: plugin.description.clone(),
        size: plugin.size,
        input_schema: schema(&plugin.input_schema),
        output_schema: schema(&plugin.output_schema),
        imports: plugin.imports.clone(),
        side_effects: plugin.side_effects.kinds().to_vec(),
    }
}

/// Upload a plugin: compiled and checked against the `trellis:plugin/task`
/// world (its imports, its exports, an `info()` that answers) before it
/// becomes visible; new runs use it at once, runs in flight keep theirs.
#[utoipa::path(
    put,
    path = "/v1/plugins/{name}",
    tag = "plugins",
    params(("name" = String, Path, description = "The name the component's info() must give: 1 to 64 lowercase letters, digits, `-`, `_`", pattern = "^[a-z0-9_-]{1,64}$", example = "checksum")),
    request_body(content = inline(WasmComponent), content_type = "application/wasm", description = "The component"),
    responses(
        (status = 201, description = "Activated", body = PluginSummary),
        (status = 200, description = "The same build was already loaded", body = PluginSummary),
        (status = 400, description = "A bad name", body = super::ErrorBody),
        (status = 409, description = "That name and version are loaded with other bytes", body = super::ErrorBody),
        (status = 408, description = "The body did not arrive within `body_timeout`", body = super::ErrorBody),
        (status = 413, description = "Larger than max_body", body = super::ErrorBody),
        (status = 415, description = "Not application/wasm", body = super::ErrorBody),
        (status = 422, description = "Not a usable plugin (the reason says why); the loaded versions keep serving", body = super::ErrorBody),
    ),
)]
pub async fn put_plugin(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    WasmBody(bytes): WasmBody,
) -> Result<(axum::http::StatusCode, Json<PluginSummary>), ApiError> {
    check_plugin_name(&name)?;
    match state.service.put_plugin(&name, bytes).await {
        Ok((plugin, created)) => {
            let status = if created {
                axum::http::StatusCode::CREATED
            } else {
                axum::http::StatusCode::OK
            };
            Ok((status, Json(plugin_summary(&plugin))))
        }
        Err(PutPluginError::Save(message)) => Err(ApiError::Internal(message)),
        Err(err @ PutPluginError::Conflict { .. }) => {
            Err(ApiError::PluginConflict(err.to_string()))
        }
        Err(err) => Err(ApiError::InvalidPlugin(format!(
            "not a usable plugin: {err}"
        ))),
    }
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Only this version (default: every version).
    #[param(
        pattern = r"^(0|[1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,18})(-(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)(\.(0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$",
        example = "1.0.0"
    )]
    pub version: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Removed {
    pub removed: Vec<PluginSummary>,
}

/// Remove a plugin (every version, or `?version=`). Runs in flight that use
/// it finish with it.
#[utoipa::path(
    delete,
    path = "/v1/plugins/{name}",
    tag = "plugins",
    params(("name" = String, Path, description = "The plugin's name", pattern = "^[a-z0-9_-]{1,64}$", example = "checksum"), DeleteQuery),
    responses(
        (status = 200, description = "Removed", body = Removed),
        (status = 400, description = "A bad name or `version`, or an unknown parameter", body = super::ErrorBody),
        (status = 404, description = "No such plugin or version", body = super::ErrorBody),
    ),
)]
pub async fn delete_plugin(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<Json<Removed>, ApiError> {
    check_plugin_name(&name)?;
    let version = match &query.version {
        Some(text) => Some(semver::Version::parse(text).map_err(|e| {
            ApiError::InvalidRequest(format!("`version` {text:?} is not a semver version: {e}"))
        })?),
        None => None,
    };
    let removed = state.service.delete_plugin(&name, version.as_ref()).await;
    if removed.is_empty() {
        return Err(ApiError::NotFound(match &query.version {
            Some(version) => format!("no plugin `{name}` at version {version}"),
            None => format!("no plugin named `{name}`"),
        }));
    }
    Ok(Json(Removed {
        removed: removed.iter().map(|p| plugin_summary(p)).collect(),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_window_is_a_whole_number_and_a_unit() {
        use std::time::Duration;
        assert_eq!(
            super::window_length("24h"),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            super::window_length("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            super::window_length("999999d"),
            Some(Duration::from_secs(999_999 * 86_400))
        );
        for bad in [
            "", "0s", "05m", "1000000d", "1.5h", "1h30m", "h", "24", "24 h", "-1h", "24H",
        ] {
            assert_eq!(super::window_length(bad), None, "{bad}");
        }
    }

    use super::*;

    #[test]
    fn names_are_url_safe() {
        for good in ["order-pipeline", "a.b_c", "X1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", "a\0b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_name(&"x".repeat(128)).is_ok());
        for good in ["hash", "json-schema", "a_1"] {
            assert!(check_plugin_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Hash",
            "a.b",
            "..",
            "a/b",
            "../etc",
            "%2e%2e",
            &"x".repeat(65),
        ] {
            assert!(check_plugin_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_declared_name_must_match_the_url() {
        assert!(check_declared_name("a", "[[step]]\nid = \"s\"\n").is_ok());
        assert!(check_declared_name("a", "name = \"a\"\n").is_ok());
        assert!(check_declared_name("a", "not toml [").is_ok());
        let error = check_declared_name("a", "# hi\nname = \"b\"\n").unwrap_err();
        match error {
            ApiError::InvalidWorkflow { diagnostics, .. } => {
                assert_eq!(diagnostics.0[0].line, 2);
            }
            other => panic!("{other:?}"),
        }
    }
}
