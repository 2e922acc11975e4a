//! The API's one error type and its JSON shape:
//! `{ "error": { "code": "not_found", "message": "...", "details": ... } }`.
//!
//! Each variant has one status and one `code`. A 5xx answer says only
//! "internal error"; what went wrong travels in a response extension to the
//! logging middleware ([`log_server_errors`]), never to the client.

use axum::Json;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::record::RunStatus;
use crate::store::StoreError;
use crate::workflow::{Diagnostic, Diagnostics, SchemaViolation};

/// One problem in a workflow file.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkflowError {
    pub file: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl From<&Diagnostic> for WorkflowError {
    fn from(diagnostic: &Diagnostic) -> Self {
        WorkflowError {
            file: diagnostic.file.clone(),
            line: diagnostic.line,
            column: diagnostic.column,
            message: diagnostic.message.clone(),
        }
    }
}

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_json`: the body is not JSON (with where it broke).
    #[error("the body is not valid JSON: {message}")]
    InvalidJson {
        message: String,
        line: usize,
        column: usize,
    },
    /// 400 `invalid_request`: a path segment, query parameter, header or
    /// non-JSON body is not what the route takes.
    #[error("{0}")]
    InvalidRequest(String),
    /// 401 `unauthorized`: no or a wrong bearer token.
    #[error("this route needs `Authorization: Bearer <token>` with the server's token")]
    Unauthorized,
    /// 404 `not_found`: no such run, workflow or route.
    #[error("{0}")]
    NotFound(String),
    /// 405 `method_not_allowed`.
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// 409 `run_finished`: a finished run cannot be cancelled.
    #[error("run {id} already finished ({})", .status.as_str())]
    RunFinished { id: String, status: RunStatus },
    /// 409 `run_not_finished`: a retry or rerun of a run still going.
    #[error("run {id} has not finished ({}): retry or rerun it once it has, or cancel it first", .status.as_str())]
    RunNotFinished { id: String, status: RunStatus },
    /// 409 `build_gone`: a plugin build the run is pinned to is gone.
    #[error("{0}; send \"upgrade\": true to use the builds loaded now")]
    BuildGone(String),
    /// 422 `unknown_step`: a retry `from` a step the workflow does not have.
    #[error("the workflow has no step `{step}`; its steps are: {}", .steps.join(", "))]
    UnknownStep { step: String, steps: Vec<String> },
    /// 409 `workflow_invalid`: the workflow has errors and refuses runs.
    #[error("workflow `{name}` has errors and refuses runs until it is fixed")]
    WorkflowInvalid {
        name: String,
        diagnostics: Option<Diagnostics>,
    },
    /// 408 `request_timeout`: the body did not arrive within `body_timeout`.
    #[error("the request body did not arrive within {}s", .after.as_secs_f64())]
    RequestTimeout { after: std::time::Duration },
    /// 413 `payload_too_large`.
    #[error("the request body is larger than the server accepts ({limit} bytes at most)")]
    PayloadTooLarge { limit: u64 },
    /// 415 `unsupported_media_type`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422 `invalid_input`: the run input fails the workflow's input schema.
    #[error("the input does not match the workflow's input schema")]
    InvalidInput(Vec<SchemaViolation>),
    /// 422 `invalid_workflow`: an uploaded workflow does not validate.
    #[error("{message}")]
    InvalidWorkflow {
        message: String,
        diagnostics: Diagnostics,
    },
    /// 422 `invalid_plugin`: an uploaded component is not a usable plugin.
    #[error("{0}")]
    InvalidPlugin(String),
    /// 409 `plugin_conflict`: that name and version exist with other bytes.
    #[error("{0}")]
    PluginConflict(String),
    /// 503 `unavailable`: the server is shutting down.
    #[error("the server is shutting down and accepts no new runs")]
    ShuttingDown,
    /// 503 `unavailable`: the store's database cannot be reached; nothing
    /// was accepted, and the same request may be sent again.
    #[error("the database is unavailable; nothing was done, try again shortly")]
    StoreUnavailable(String),
    /// 500 `internal`: the detail is logged, not sent.
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson { .. } | ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RunFinished { .. }
            | ApiError::RunNotFinished { .. }
            | ApiError::BuildGone(_)
            | ApiError::WorkflowInvalid { .. }
            | ApiError::PluginConflict(_) => StatusCode::CONFLICT,
            ApiError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidInput(_)
            | ApiError::UnknownStep { .. }
            | ApiError::InvalidWorkflow { .. }
            | ApiError::InvalidPlugin(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ShuttingDown | ApiError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. } => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::RunFinished { .. } => "run_finished",
            ApiError::RunNotFinished { .. } => "run_not_finished",
            ApiError::BuildGone(_) => "build_gone",
            ApiError::UnknownStep { .. } => "unknown_step",
            ApiError::WorkflowInvalid { .. } => "workflow_invalid",
            ApiError::RequestTimeout { .. } => "request_timeout",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::InvalidInput(_) => "invalid_input",
            ApiError::InvalidWorkflow { .. } => "invalid_workflow",
            ApiError::InvalidPlugin(_) => "invalid_plugin",
            ApiError::PluginConflict(_) => "plugin_conflict",
            ApiError::ShuttingDown | ApiError::StoreUnavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    fn details(&self) -> Option<Value> {
        let list = |diagnostics: &Diagnostics| {
            Value::Array(
                diagnostics
                    .iter()
                    .map(|d| serde_json::to_value(WorkflowError::from(d)).unwrap_or_default())
                    .collect(),
            )
        };
        match self {
            ApiError::InvalidJson { line, column, .. } => {
                Some(serde_json::json!({ "line": line, "column": column }))
            }
            ApiError::RunFinished { status, .. } | ApiError::RunNotFinished { status, .. } => {
                Some(serde_json::json!({ "status": status.as_str() }))
            }
            ApiError::UnknownStep { steps, .. } => Some(serde_json::json!({ "steps": steps })),
            ApiError::WorkflowInvalid { diagnostics, .. } => diagnostics.as_ref().map(list),
            ApiError::InvalidWorkflow { diagnostics, .. } => Some(list(diagnostics)),
            ApiError::InvalidInput(violations) => Some(Value::Array(
                violations
                    .iter()
                    .map(|v| serde_json::json!({ "path": v.path, "message": v.message }))
                    .collect(),
            )),
            _ => None,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::BadCursor(cursor) => ApiError::InvalidRequest(format!(
                "`cursor` {cursor:?} is not a cursor this server gave out: pass the `next_cursor` of the previous page"
            )),
            StoreError::Unavailable(error) => ApiError::StoreUnavailable(error.to_string()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The error body (the OpenAPI schema of every 4xx/5xx answer).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorInfo,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorInfo {
    /// Machine-readable: `invalid_json`, `invalid_request`, `unauthorized`,
    /// `not_found`, `method_not_allowed`, `request_timeout`, `run_finished`,
    /// `run_not_finished`, `build_gone`, `workflow_invalid`,
    /// `plugin_conflict`, `payload_too_large`, `unsupported_media_type`,
    /// `invalid_input`, `unknown_step`, `invalid_workflow`, `invalid_plugin`,
    /// `unavailable`, `internal`.
    pub code: String,
    /// For people.
    pub message: String,
    /// `invalid_json`: `{line, column}`; `invalid_input`: `[{path, message}]`
    /// (JSON Pointers into the input); `invalid_workflow` and
    /// `workflow_invalid`: `[{file, line, column, message}]`;
    /// `run_finished` and `run_not_finished`: `{status}`; `unknown_step`:
    /// `{steps}` (the workflow's step ids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// What a 5xx was about, for [`log_server_errors`] (never sent).
#[derive(Debug, Clone)]
struct InternalDetail(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = ErrorBody {
            error: ErrorInfo {
                code: self.code().to_owned(),
                message: self.to_string(),
                details: self.details(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        match self {
            ApiError::Internal(detail) => {
                response.extensions_mut().insert(InternalDetail(detail));
            }
            ApiError::StoreUnavailable(detail) => {
                tracing::warn!(error = %detail, "a request found the store unavailable");
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

/// Logs every 5xx answer with what went wrong (the client only sees
/// "internal error").
pub(super) async fn log_server_errors(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = next.run(request).await;
    if response.status().is_server_error() {
        let detail = response
            .extensions_mut()
            .remove::<InternalDetail>()
            .map_or_else(|| "no detail".to_owned(), |d| d.0);
        tracing::error!(%method, %path, status = response.status().as_u16(), "{detail}");
    }
    response
}
