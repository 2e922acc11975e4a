//! Runs: trigger, status, list, cancel, events.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;
use utoipa::openapi::RefOr;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use super::extract::{ApiPath, ApiQuery, JsonBody, run_id};
use super::{ApiError, AppState};
use crate::record::{RunRecord, RunStatus};
use crate::service::{Again, CancelError, EventSubscription, RunEvent, SubmitError, Submitted};
use crate::store::RunQuery;
use crate::workflow::Layout;

/// The longest `?wait=` a trigger may ask for: a client that wants longer
/// polls `GET /v1/runs/{id}` or follows the events.
pub const MAX_WAIT: Duration = Duration::from_secs(5 * 60);
/// The longest `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Runs per page when `limit` is not given, and the most a page may hold.
pub const DEFAULT_PAGE: usize = 50;
pub const MAX_PAGE: usize = 1000;
/// How often an idle event stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on the answer to a trigger whose `Idempotency-Key` matched an earlier run.
static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TriggerParams {
    /// Wait up to this long for the run to finish (`500ms`, `30s`, `2m`; at
    /// most `5m`): 200 with the finished run, or 202 with the run as it is
    /// if it is still going at the deadline. (Any humantime duration up to
    /// 5m is taken, like `1m 30s`; the pattern has the plain forms.)
    #[param(
        pattern = r"^(0|[0-9]{1,5}ms|([0-9]{1,2}|[12][0-9]{2}|300)s|[0-5]m)$",
        example = "30s"
    )]
    wait: Option<String>,
}

/// Start a run of a workflow.
///
/// The body is the run's input (any JSON; empty = `{}`). Answers once the run
/// is stored durably.
#[utoipa::path(
    post,
    path = "/v1/workflows/{name}/runs",
    tag = "runs",
    params(
        ("name" = String, Path, description = "The workflow's name", pattern = r"^[A-Za-z0-9._-]{1,128}$", example = "order-pipeline"),
        TriggerParams,
        ("Idempotency-Key" = Option<String>, Header,
            description = "1 to 255 printable ASCII characters. A second trigger of the same workflow with the same key starts nothing and answers 200 with the first run",
            nullable = false, min_length = 1, max_length = 255, pattern = r"^[!-~]([ -~]*[!-~])?$"),
    ),
    request_body(content = Option<Value>, content_type = "application/json",
        description = "The run's input; must satisfy the workflow's `[input] schema` if it has one. No body (or only white space) is `{}`"),
    responses(
        (status = 202, description = "Accepted (queued or running); `Location` is the run's URL", body = RunRecord,
            headers(("Location" = String, description = "/v1/runs/{id}"),
                ("Idempotent-Replayed" = String, description = "`true` when the `Idempotency-Key` matched an earlier run, which this is"))),
        (status = 200, description = "With `?wait`: the finished run. With an `Idempotency-Key` seen before: the earlier run (header `Idempotent-Replayed: true`)", body = RunRecord,
            headers(("Location" = String, description = "/v1/runs/{id}"),
                ("Idempotent-Replayed" = String, description = "`true` when the `Idempotency-Key` matched an earlier run, which this is"))),
        (status = 400, description = "Malformed JSON (`details`: line, column), a bad `wait` or `Idempotency-Key`", body = super::ErrorBody),
        (status = 404, description = "No workflow with this name", body = super::ErrorBody),
        (status = 409, description = "The workflow has errors (`details`: its diagnostics)", body = super::ErrorBody),
        (status = 408, description = "The body did not arrive within `body_timeout`", body = super::ErrorBody),
        (status = 413, description = "The body is over `max_body`", body = super::ErrorBody),
        (status = 415, description = "The body is not JSON", body = super::ErrorBody),
        (status = 422, description = "The input fails the workflow's input schema (`details`: `[{path, message}]`)", body = super::ErrorBody),
        (status = 503, description = "The server is shutting down", body = super::ErrorBody),
    ),
)]
pub async fn trigger(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(params): ApiQuery<TriggerParams>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<Value>,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let wait = params.wait.as_deref().map(parse_wait).transpose()?;
    let submitted = state
        .service
        .submit(&name, input, key)
        .await
        .map_err(|error| submit_error(&state, error))?;
    answer_submitted(&state, submitted, wait).await
}

/// What a refused run is, to the client.
fn submit_error(state: &AppState, error: SubmitError) -> ApiError {
    match error {
        SubmitError::UnknownWorkflow(name) => {
            ApiError::NotFound(format!("no workflow named `{name}`"))
        }
        SubmitError::NoSuchRun(id) => no_run(&id),
        SubmitError::RunNotFinished { id, status } => ApiError::RunNotFinished { id, status },
        SubmitError::UnknownStep { step, steps } => ApiError::UnknownStep { step, steps },
        SubmitError::BuildGone(message) => ApiError::BuildGone(message),
        SubmitError::InvalidWorkflow { name, .. } => {
            let diagnostics = state
                .service
                .workflow(&name)
                .and_then(|entry| entry.plan.err())
                .map(|diagnostics| (*diagnostics).clone());
            ApiError::WorkflowInvalid { name, diagnostics }
        }
        SubmitError::InvalidInput(violations) => ApiError::InvalidInput(violations),
        SubmitError::ShuttingDown => ApiError::ShuttingDown,
        SubmitError::Store(error) => error.into(),
    }
}

/// The answer to an accepted run: 202 with the run, or 200 with the
/// finished run (`?wait`) or an earlier run its `Idempotency-Key` named.
async fn answer_submitted(
    state: &AppState,
    submitted: Submitted,
    wait: Option<Duration>,
) -> Result<Response, ApiError> {
    let id = submitted.run.id.clone();
    let (status, run) = match wait {
        None if submitted.created => (StatusCode::ACCEPTED, submitted.run),
        None => (StatusCode::OK, submitted.run),
        Some(timeout) => match wait_for(state, &id, timeout).await? {
            Some(finished) => (StatusCode::OK, finished),
            None => {
                let current = state.service.get_run(&id).await?;
                (StatusCode::ACCEPTED, current.unwrap_or(submitted.run))
            }
        },
    };
    let mut response = (status, Json(run)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/runs/{id}")) {
        response.headers_mut().insert(LOCATION, location);
    }
    if !submitted.created {
        response.headers_mut().insert(
            IDEMPOTENT_REPLAYED.clone(),
            HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

/// `POST /v1/runs/{id}/retry`'s body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    /// Run this step, and every step downstream of it, again in full.
    #[serde(default)]
    from: Option<String>,
    /// Plan the retry as a new run of the workflow would be (the workflow
    /// and plugin builds loaded now), not with the original's.
    #[serde(default)]
    upgrade: bool,
}

/// `POST /v1/runs/{id}/rerun`'s body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RerunBody {
    /// The new run's input (checked against the workflow's input schema);
    /// default: the original's.
    #[serde(default)]
    #[schema(value_type = Option<Value>)]
    input: Option<Value>,
    /// Plan the rerun as a new run of the workflow would be.
    #[serde(default)]
    upgrade: bool,
}

/// Retry a finished run.
///
/// A new run on the same input, with the original's workflow version and
/// plugin builds (unless `upgrade`): a step that succeeded or was skipped,
/// and whose upstream is reused too, is reused (its output, `reused_from`,
/// no attempts, its plugin not called); a `for_each` step that runs again
/// reuses its items that succeeded. `from` runs that step and everything
/// downstream again in full. Answers like a trigger.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/retry",
    tag = "runs",
    params(
        ("id" = String, Path, description = "The run to retry (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
        TriggerParams,
        ("Idempotency-Key" = Option<String>, Header,
            description = "As for a trigger: 1 to 255 printable ASCII characters; the same key again answers with the first run",
            nullable = false, min_length = 1, max_length = 255, pattern = r"^[!-~]([ -~]*[!-~])?$"),
    ),
    request_body(content = Option<RetryBody>, content_type = "application/json", description = "Optional"),
    responses(
        (status = 202, description = "The retry, accepted", body = RunRecord),
        (status = 200, description = "With `?wait`: the finished retry; with an `Idempotency-Key` seen before: the earlier run", body = RunRecord),
        (status = 400, description = "A bad id, body, `wait` or `Idempotency-Key`", body = super::ErrorBody),
        (status = 404, description = "No run with this id", body = super::ErrorBody),
        (status = 409, description = "`run_not_finished`, `build_gone` (a pinned plugin build is gone: send `upgrade`), or `workflow_invalid`", body = super::ErrorBody),
        (status = 422, description = "`unknown_step`: `from` names no step (`details.steps` lists them)", body = super::ErrorBody),
        (status = 503, description = "The server is shutting down, or the store is unavailable", body = super::ErrorBody),
    ),
)]
pub async fn retry_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<TriggerParams>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Option<RetryBody>>,
) -> Result<Response, ApiError> {
    // No body, `{}` and `null` all mean the defaults.
    let body = body.unwrap_or_default();
    let again = Again::Retry { from: body.from };
    run_again(&state, &id, &params, &headers, again, body.upgrade).await
}

/// Run a finished run again.
///
/// Every step runs again, on the original's input or the one given (checked
/// against the workflow's input schema), with the original's workflow
/// version and plugin builds unless `upgrade`. Answers like a trigger.
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/rerun",
    tag = "runs",
    params(
        ("id" = String, Path, description = "The run to run again (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
        TriggerParams,
        ("Idempotency-Key" = Option<String>, Header,
            description = "As for a trigger: 1 to 255 printable ASCII characters; the same key again answers with the first run",
            nullable = false, min_length = 1, max_length = 255, pattern = r"^[!-~]([ -~]*[!-~])?$"),
    ),
    request_body(content = Option<RerunBody>, content_type = "application/json", description = "Optional"),
    responses(
        (status = 202, description = "The rerun, accepted", body = RunRecord),
        (status = 200, description = "With `?wait`: the finished rerun; with an `Idempotency-Key` seen before: the earlier run", body = RunRecord),
        (status = 400, description = "A bad id, body, `wait` or `Idempotency-Key`", body = super::ErrorBody),
        (status = 404, description = "No run with this id", body = super::ErrorBody),
        (status = 409, description = "`run_not_finished`, `build_gone` or `workflow_invalid`", body = super::ErrorBody),
        (status = 422, description = "`invalid_input`: the input fails the workflow's input schema", body = super::ErrorBody),
        (status = 503, description = "The server is shutting down, or the store is unavailable", body = super::ErrorBody),
    ),
)]
pub async fn rerun_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(params): ApiQuery<TriggerParams>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<Option<RerunBody>>,
) -> Result<Response, ApiError> {
    let body = body.unwrap_or_default();
    let again = Again::Rerun { input: body.input };
    run_again(&state, &id, &params, &headers, again, body.upgrade).await
}

/// A retry or a rerun of run `id`, answered like a trigger.
async fn run_again(
    state: &AppState,
    id: &str,
    params: &TriggerParams,
    headers: &HeaderMap,
    again: Again,
    upgrade: bool,
) -> Result<Response, ApiError> {
    let id = run_id(id)?;
    let key = idempotency_key(headers)?;
    let wait = params.wait.as_deref().map(parse_wait).transpose()?;
    let submitted = state
        .service
        .run_again(&id, again, upgrade, key)
        .await
        .map_err(|error| submit_error(state, error))?;
    answer_submitted(state, submitted, wait).await
}

/// The finished run, or `None` at the deadline or when the server stops.
async fn wait_for(
    state: &AppState,
    id: &str,
    timeout: Duration,
) -> Result<Option<RunRecord>, ApiError> {
    tokio::select! {
        finished = state.service.wait(id, timeout) => Ok(finished?),
        () = state.stop.cancelled() => Ok(None),
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(&IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    // As the OpenAPI document says: printable ASCII (`to_str` also lets a tab
    // through), not starting or ending with a space.
    let key = value
        .to_str()
        .ok()
        .filter(|key| {
            key.bytes().all(|b| (b' '..=b'~').contains(&b))
                && !key.starts_with(' ')
                && !key.ends_with(' ')
        })
        .ok_or_else(|| {
            ApiError::InvalidRequest(
                "`Idempotency-Key` must be printable ASCII, without a space at either end"
                    .to_owned(),
            )
        })?;
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::InvalidRequest(format!(
            "`Idempotency-Key` must be 1 to {MAX_IDEMPOTENCY_KEY} characters long, not {}",
            key.len()
        )));
    }
    Ok(Some(key))
}

fn parse_wait(text: &str) -> Result<Duration, ApiError> {
    let wait = humantime::parse_duration(text).map_err(|error| {
        ApiError::InvalidRequest(format!(
            "`wait` is \"{text}\": {error}; write a duration like 30s or 2m (at most 5m)"
        ))
    })?;
    if wait > MAX_WAIT {
        return Err(ApiError::InvalidRequest(format!(
            "`wait` is {text}, longer than the 5m a request may wait: poll GET /v1/runs/{{id}} or follow its events instead"
        )));
    }
    Ok(wait)
}

/// Status, every step and attempt, outputs, errors and metrics of one run.
/// While a step runs, its finished attempts (a fan-out's finished items, a
/// retried step's failed attempts) are there already.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}",
    tag = "runs",
    params(("id" = String, Path, description = "The run id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The run (live while it runs)", body = RunRecord),
        (status = 400, description = "The id is not a UUID", body = super::ErrorBody),
        (status = 404, description = "No run with this id", body = super::ErrorBody),
    ),
)]
pub async fn get_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunRecord>, ApiError> {
    let id = run_id(&id)?;
    match state.service.get_run(&id).await? {
        Some(run) => Ok(Json(run)),
        None => Err(no_run(&id)),
    }
}

/// How the run's DAG is drawn: a layered layout of its workflow version's
/// steps (boxes in pixels, top to bottom) and their `needs`. The console
/// draws a run from it; it is the same for every run of one version.
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/graph",
    tag = "runs",
    params(("id" = String, Path, description = "The run id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The layout: a box per step, in step order, and an edge per need", body = Layout),
        (status = 400, description = "The id is not a UUID", body = super::ErrorBody),
        (status = 404, description = "No run with this id", body = super::ErrorBody),
    ),
)]
pub async fn get_run_graph(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    match state.service.run_layout(&id).await? {
        Some(layout) => Ok(Json(&*layout).into_response()),
        None => Err(no_run(&id)),
    }
}

fn no_run(id: &str) -> ApiError {
    ApiError::NotFound(format!("no run with id {id}"))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Only runs of this workflow.
    workflow: Option<String>,
    /// Only runs in this state: `queued`, `running`, `succeeded`, `failed`, `cancelled`.
    #[param(value_type = Option<RunStatus>)]
    status: Option<String>,
    /// Only the child runs of this run (started by its sub-workflow steps).
    parent: Option<String>,
    /// Runs per page, 1 to 1000 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The `next_cursor` of the previous page (empty: the first page).
    #[param(pattern = "^([0-7][0-9a-fA-F])*$")]
    cursor: Option<String>,
}

/// One page of runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunList {
    /// Without step details (`steps` is empty): `GET /v1/runs/{id}` has them.
    pub runs: Vec<RunRecord>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// List runs, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/runs",
    tag = "runs",
    params(ListParams),
    responses(
        (status = 200, description = "A page of runs", body = RunList),
        (status = 400, description = "A bad `status`, `limit` or `cursor`, or an unknown parameter", body = super::ErrorBody),
    ),
)]
pub async fn list_runs(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<RunList>, ApiError> {
    let status = params.status.as_deref().map(parse_status).transpose()?;
    let limit = match params.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(text) => match text.trim().parse::<usize>() {
            Ok(limit) if (1..=MAX_PAGE).contains(&limit) => limit,
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "`limit` is \"{text}\": write a whole number from 1 to {MAX_PAGE}"
                )));
            }
        },
    };
    let query = RunQuery {
        workflow: params.workflow,
        status,
        parent: params.parent.filter(|parent| !parent.is_empty()),
        limit,
        cursor: params.cursor.filter(|cursor| !cursor.is_empty()),
    };
    let page = state.service.list_runs(&query).await?;
    Ok(Json(RunList {
        runs: page.runs,
        next_cursor: page.next_cursor,
    }))
}

fn parse_status(text: &str) -> Result<RunStatus, ApiError> {
    text.parse().map_err(|_| {
        ApiError::InvalidRequest(format!(
            "`status` is \"{text}\": write queued, running, succeeded, failed or cancelled"
        ))
    })
}

/// Cancel a run: running steps stop at once (not at their timeout).
#[utoipa::path(
    post,
    path = "/v1/runs/{id}/cancel",
    tag = "runs",
    params(("id" = String, Path, description = "The run id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")),
    responses(
        (status = 200, description = "The run, cancelled (or as it stands if it is still winding down)", body = RunRecord),
        (status = 400, description = "The id is not a UUID", body = super::ErrorBody),
        (status = 404, description = "No run with this id", body = super::ErrorBody),
        (status = 409, description = "The run already finished (`details.status`)", body = super::ErrorBody),
    ),
)]
pub async fn cancel_run(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RunRecord>, ApiError> {
    let id = run_id(&id)?;
    match state.service.cancel(&id).await {
        Ok(run) => Ok(Json(run)),
        Err(CancelError::NotFound(_)) => Err(no_run(&id)),
        Err(CancelError::Finished { id, status }) => Err(ApiError::RunFinished { id, status }),
        Err(CancelError::Store(error)) => Err(error.into()),
    }
}

/// Follow a run as Server-Sent Events.
///
/// Each event has `event: <type>`, `id: <seq>` and `data: <JSON>` with the
/// same `type` and `seq`: `step_started`, `log`, `progress`, `step_finished`
/// (the step's record), `run_finished` (the run's record; the stream then
/// ends). What already happened is replayed first, so a late subscriber
/// sees the whole run; `Last-Event-ID` resumes after that event. A
/// subscriber that falls too far behind a live run gets `event: lagged` and
/// the stream ends (reconnect with `Last-Event-ID`).
#[utoipa::path(
    get,
    path = "/v1/runs/{id}/events",
    tag = "runs",
    params(
        ("id" = String, Path, description = "The run id (a UUID)", pattern = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = "^[0-9]{1,19}$",
            description = "Resume after this event (its `id`, the event's `seq`)"),
    ),
    responses(
        (status = 200, description = "`text/event-stream`; each `data` is a RunEvent", content_type = "text/event-stream", body = RunEventMessage),
        (status = 400, description = "The id is not a UUID, or a bad `Last-Event-ID`", body = super::ErrorBody),
        (status = 404, description = "No run with this id", body = super::ErrorBody),
    ),
)]
pub async fn run_events(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = run_id(&id)?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            // As the OpenAPI pattern says: 1 to 19 digits, no sign, no spaces.
            .filter(|text| {
                (1..=19).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::InvalidRequest(
                    "`Last-Event-ID` must be the `id` of an event of this stream".to_owned(),
                )
            })?,
    };
    let subscription = state
        .service
        .events(&id)
        .await?
        .ok_or_else(|| no_run(&id))?;
    let stream = events(subscription, after).take_until(state.stop.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One message of the event stream, as OpenAPI 3.1 describes a
/// `text/event-stream` body (the schema of each event): `event`, `id` and
/// `data`, a [`RunEvent`] as JSON (`contentSchema`); or the last message of
/// a stream that fell behind, `event: lagged` with `{missed, message}`.
pub struct RunEventMessage;

impl utoipa::PartialSchema for RunEventMessage {
    fn schema() -> RefOr<Schema> {
        let string = || ObjectBuilder::new().schema_type(Type::String);
        let json = |schema: Value| {
            string()
                .content_media_type("application/json")
                .extensions(Some(Extensions::from_iter([("contentSchema", schema)])))
        };
        let event = ObjectBuilder::new()
            .property(
                "event",
                string().enum_values(Some([
                    "step_started",
                    "log",
                    "progress",
                    "step_finished",
                    "run_finished",
                ])),
            )
            .required("event")
            .property(
                "id",
                string()
                    .pattern(Some("^[0-9]+$"))
                    .description(Some("The event's `seq`, for `Last-Event-ID`")),
            )
            .required("id")
            .property(
                "data",
                json(serde_json::json!({ "$ref": "#/components/schemas/RunEvent" })),
            )
            .required("data");
        let lagged = ObjectBuilder::new()
            .property("event", string().enum_values(Some(["lagged"])))
            .required("event")
            .property(
                "data",
                json(serde_json::json!({
                    "type": "object",
                    "required": ["missed", "message"],
                    "properties": {
                        "missed": { "type": "integer", "minimum": 0 },
                        "message": { "type": "string" },
                    },
                })),
            )
            .required("data");
        OneOfBuilder::new().item(event).item(lagged).into()
    }
}

impl ToSchema for RunEventMessage {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push(("RunEvent".to_owned(), RunEvent::schema()));
        RunEvent::schemas(schemas);
    }
}

/// The replay, then (while the run goes on) the live events, up to and
/// including `run_finished`; only events after `after`.
fn events(
    subscription: EventSubscription,
    after: u64,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let replayed_up_to = subscription.replay.last().map_or(0, RunEvent::seq);
    let finished = subscription
        .replay
        .iter()
        .any(|event| matches!(event, RunEvent::RunFinished { .. }));
    let skip_up_to = after.max(replayed_up_to);
    let replay = futures::stream::iter(
        subscription
            .replay
            .into_iter()
            .filter(move |event| event.seq() > after)
            .map(|event| run_event(&event)),
    );
    let live = subscription.live.filter(|_| !finished);
    let live = futures::stream::unfold(live, move |receiver| async move {
        let mut receiver = receiver?;
        loop {
            match receiver.recv().await {
                Ok(event) if event.seq() <= skip_up_to => continue,
                Ok(event) => {
                    let last = matches!(event, RunEvent::RunFinished { .. });
                    let next = if last { None } else { Some(receiver) };
                    return Some((run_event(&event), next));
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Some((lagged(missed), None));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    replay.chain(live).map(Ok)
}

/// `event: <type>`, `id: <seq>`, `data: <the event as JSON>`.
fn run_event(event: &RunEvent) -> Event {
    let data = serde_json::to_string(event).unwrap_or_else(|error| {
        serde_json::json!({ "type": "error", "message": error.to_string() }).to_string()
    });
    Event::default()
        .event(event.name())
        .id(event.seq().to_string())
        .data(data)
}

/// The last event of a stream that fell too far behind a live run.
fn lagged(missed: u64) -> Event {
    Event::default().event("lagged").data(
        serde_json::json!({
            "missed": missed,
            "message": "this stream fell behind the run and ends here; reconnect with Last-Event-ID to resume",
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::record::{LogLevel, LogLine, LogStream};

    fn log(seq: u64, message: &str) -> RunEvent {
        RunEvent::Log {
            seq,
            step: "s".to_owned(),
            line: LogLine {
                at_ms: 0.0,
                stream: LogStream::Log,
                level: LogLevel::Info,
                message: message.to_owned(),
            },
        }
    }

    fn finished(seq: u64) -> RunEvent {
        RunEvent::RunFinished {
            seq,
            run: RunRecord {
                retry_of: None,
                rerun_of: None,
                retries: Vec::new(),
                parent: None,
                id: "r".to_owned(),
                workflow: "w".to_owned(),
                status: RunStatus::Succeeded,
                input: Value::Null,
                output: Value::Null,
                error: None,
                created_at: String::new(),
                started_at: None,
                finished_at: None,
                duration_ms: None,
                steps: vec![],
            },
        }
    }

    /// The stream as SSE text, `(event, id)` per event.
    async fn sent(subscription: EventSubscription, after: u64) -> Vec<(String, String)> {
        let response = Sse::new(events(subscription, after)).into_response();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        text.split("\n\n")
            .filter(|block| !block.is_empty())
            .map(|block| {
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|line| line.strip_prefix(name))
                        .unwrap_or("")
                        .to_owned()
                };
                (field("event: "), field("id: "))
            })
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn the_replay_comes_first_then_live_events_until_the_run_finishes() {
        let (sender, receiver) = broadcast::channel(16);
        let subscription = EventSubscription {
            replay: vec![log(1, "a"), log(2, "b")],
            live: Some(receiver),
        };
        // A repeat of the replay is skipped; nothing after run_finished is sent.
        for event in [log(2, "b"), log(3, "c"), finished(4), log(5, "late")] {
            sender.send(event).unwrap();
        }
        assert_eq!(
            sent(subscription, 0).await,
            pairs(&[
                ("log", "1"),
                ("log", "2"),
                ("log", "3"),
                ("run_finished", "4")
            ])
        );
    }

    #[tokio::test]
    async fn last_event_id_skips_what_the_client_has() {
        let subscription = EventSubscription {
            replay: vec![log(1, "a"), log(2, "b"), finished(3)],
            live: None,
        };
        assert_eq!(sent(subscription, 2).await, pairs(&[("run_finished", "3")]));
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_and_cut_off() {
        let (sender, receiver) = broadcast::channel(2);
        let subscription = EventSubscription {
            replay: vec![log(1, "a")],
            live: Some(receiver),
        };
        for seq in 2..=6 {
            sender.send(log(seq, "flood")).unwrap();
        }
        assert_eq!(
            sent(subscription, 0).await,
            pairs(&[("log", "1"), ("lagged", "")])
        );
    }

    #[tokio::test]
    async fn a_closed_channel_ends_the_stream() {
        let (sender, receiver) = broadcast::channel(4);
        sender.send(log(1, "a")).unwrap();
        drop(sender);
        let subscription = EventSubscription {
            replay: vec![],
            live: Some(receiver),
        };
        assert_eq!(sent(subscription, 0).await, pairs(&[("log", "1")]));
    }

    #[test]
    fn wait_takes_human_durations_up_to_five_minutes() {
        assert_eq!(parse_wait("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_wait("1m 30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_wait("5m").unwrap(), MAX_WAIT);
        for bad in ["", "30", "soon", "6m", "-1s", "99999999999999999999h"] {
            let error = parse_wait(bad).unwrap_err();
            assert_eq!(error.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn statuses_parse_as_written() {
        assert_eq!(parse_status("cancelled").unwrap(), RunStatus::Cancelled);
        assert!(parse_status("Cancelled").is_err());
        assert!(parse_status("done").is_err());
    }

    #[test]
    fn idempotency_keys_are_bounded() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers).unwrap(), None);
        headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("order-1"));
        assert_eq!(idempotency_key(&headers).unwrap(), Some("order-1"));
        headers.insert(
            &IDEMPOTENCY_KEY,
            HeaderValue::from_str(&"k".repeat(256)).unwrap(),
        );
        assert!(idempotency_key(&headers).is_err());
        headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static(""));
        assert!(idempotency_key(&headers).is_err());
        // What the OpenAPI pattern refuses, the server refuses (schemathesis
        // found a tab let through).
        for bad in ["a\tb", "\tab", " ab", "ab "] {
            headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_str(bad).unwrap());
            assert!(idempotency_key(&headers).is_err(), "{bad:?}");
        }
        headers.insert(&IDEMPOTENCY_KEY, HeaderValue::from_static("a b~!"));
        assert_eq!(idempotency_key(&headers).unwrap(), Some("a b~!"));
    }
}
