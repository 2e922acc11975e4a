//! The HTTP API (DESIGN.md, "HTTP API"): axum routes over [`Service`], the
//! OpenAPI document, bearer-token auth, Server-Sent Events.
//!
//! Boundary: this module translates HTTP to [`Service`] calls and their
//! answers back to HTTP; runs, workflows and plugins live in the service.
//! Every answer that is not a success is an [`ApiError`] in one JSON shape.
//!
//! ```no_run
//! # async fn example(config: trellis::config::Config) -> anyhow::Result<()> {
//! let service = trellis::service::Service::start(&config).await?;
//! trellis::api::serve(service, &config, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await
//! # }
//! ```

mod console;
mod error;
mod extract;
mod openapi;
mod runs;
mod system;
mod workflows;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use error::{ApiError, ErrorBody, ErrorInfo, WorkflowError};
pub use extract::parse_json_body;
pub use openapi::ApiDoc;
pub use runs::{MAX_WAIT, RunList};
pub use workflows::{PluginList, PluginSummary, WorkflowDetail, WorkflowList, WorkflowSummary};

use crate::config::Config;
use crate::service::Service;
use crate::telemetry::Metrics;

/// Every route the router serves, as `(method, path)`; the OpenAPI document
/// lists each one (a unit test checks).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/workflows/{name}/runs"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/runs/{id}"),
    ("POST", "/v1/runs/{id}/cancel"),
    ("POST", "/v1/runs/{id}/retry"),
    ("POST", "/v1/runs/{id}/rerun"),
    ("GET", "/v1/runs/{id}/events"),
    ("GET", "/v1/runs/{id}/graph"),
    ("GET", "/v1/workflows"),
    ("GET", "/v1/workflows/{name}"),
    ("PUT", "/v1/workflows/{name}"),
    ("GET", "/v1/workflows/{name}/stats"),
    ("GET", "/v1/plugins"),
    ("PUT", "/v1/plugins/{name}"),
    ("DELETE", "/v1/plugins/{name}"),
    ("GET", "/v1/nodes"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/v1/openapi.json"),
];

/// The one route open without the token: a load balancer's liveness probe.
const OPEN_ROUTE: &str = "/healthz";

/// How long requests still open at shutdown (a `?wait`, an upload) may take
/// to finish before the server stops anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the router needs from the configuration.
#[derive(Clone)]
pub struct ApiConfig {
    /// Every route but `/healthz` requires `Authorization: Bearer <token>`;
    /// `None`: no auth (only safe on loopback: `Config::check_bind`).
    pub auth_token: Option<String>,
    /// The largest request body, in bytes (413 above it).
    pub max_body: u64,
    /// How long reading a whole request body may take (408 after it).
    pub body_timeout: Duration,
}

impl ApiConfig {
    pub fn from_config(config: &Config) -> ApiConfig {
        ApiConfig {
            auth_token: config.auth_token.clone(),
            max_body: config.max_body,
            body_timeout: config.body_timeout,
        }
    }
}

/// The configuration's defaults.
impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig::from_config(&Config::default())
    }
}

/// Without the token.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field(
                "auth_token",
                &self.auth_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_body", &self.max_body)
            .field("body_timeout", &self.body_timeout)
            .finish()
    }
}

/// What every handler gets.
#[derive(Clone)]
pub(crate) struct AppState {
    service: Service,
    /// SHA-256 of the token: comparing digests in constant time hides the
    /// token's length as well as its bytes.
    token: Option<Arc<[u8; 32]>>,
    max_body: u64,
    body_timeout: Duration,
    metrics: Metrics,
    /// Cancelled at shutdown: open event streams end and `?wait`s answer.
    stop: CancellationToken,
}

/// The API over `service`.
pub fn router(service: Service, config: ApiConfig) -> Router {
    build(service, config, CancellationToken::new())
}

fn build(service: Service, config: ApiConfig, stop: CancellationToken) -> Router {
    let state = AppState {
        service,
        token: config
            .auth_token
            .as_deref()
            .map(|token| Arc::new(digest(token))),
        max_body: config.max_body,
        body_timeout: config.body_timeout,
        metrics: Metrics::install(),
        stop,
    };
    let max_body = usize::try_from(config.max_body).unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/workflows/{name}/runs", post(runs::trigger))
        .route("/v1/runs", get(runs::list_runs))
        .route("/v1/runs/{id}", get(runs::get_run))
        .route("/v1/runs/{id}/cancel", post(runs::cancel_run))
        .route("/v1/runs/{id}/retry", post(runs::retry_run))
        .route("/v1/runs/{id}/rerun", post(runs::rerun_run))
        .route("/v1/runs/{id}/events", get(runs::run_events))
        .route("/v1/runs/{id}/graph", get(runs::get_run_graph))
        .route("/v1/workflows", get(workflows::list_workflows))
        .route(
            "/v1/workflows/{name}",
            get(workflows::get_workflow).put(workflows::put_workflow),
        )
        .route("/v1/workflows/{name}/stats", get(workflows::workflow_stats))
        .route("/v1/plugins", get(workflows::list_plugins))
        .route(
            "/v1/plugins/{name}",
            put(workflows::put_plugin).delete(workflows::delete_plugin),
        )
        .route("/v1/nodes", get(system::nodes))
        .route(OPEN_ROUTE, get(system::healthz))
        .route("/metrics", get(system::metrics))
        .route("/v1/openapi.json", get(openapi::openapi))
        .route("/", get(console::to_console))
        .route(console::PREFIX, get(console::to_console))
        .route("/ui/", get(console::page))
        .route("/ui/assets/{file}", get(console::asset))
        .route("/ui/{*page}", get(console::page))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(from_fn_with_state(state.clone(), require_token))
        .layer(CatchPanicLayer::custom(panicked))
        .layer(from_fn(error::log_server_errors))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    tracing::info_span!(
                        "request",
                        method = %request.method(),
                        path = %request.uri().path(),
                    )
                })
                // One line per request is for debugging (TRELLIS_LOG=debug):
                // at info it costs ~6% of a busy server's CPU.
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::WARN)),
        )
        .with_state(state)
}

/// Serves the API on `config.bind` until `shutdown` completes, then stops
/// gracefully: the service takes no new runs (503), event streams and
/// `?wait`s end, no new connection is accepted, and requests in flight get
/// `SHUTDOWN_GRACE` to finish. Runs still going are resumed by the next
/// start (they are durable).
///
/// Slow or idle clients cannot hold the server: a request's headers (and the
/// silence before them on a keep-alive connection) get `header_timeout`, its
/// body `body_timeout`, and at most `max_connections` are served at once
/// (more wait in the listen backlog). HTTP/1.1 only.
///
/// The first thing it prints (stderr) is `listening on http://ADDR`, with the
/// address actually bound (so port 0 works).
pub async fn serve(
    service: Service,
    config: &Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let address = listener.local_addr()?;
    eprintln!("listening on http://{address}");
    tracing::info!(%address, "listening");

    let stop = CancellationToken::new();
    let app = build(
        service.clone(),
        ApiConfig::from_config(config),
        stop.clone(),
    );
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = accept(&listener, &connections) => accepted,
        };
        let (stream, permit) = accepted;
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    service.close();
    stop.cancel();
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("requests still open {SHUTDOWN_GRACE:?} after shutdown began; stopping anyway");
        }
    }
    Ok(())
}

/// The next connection, once fewer than `max_connections` are open. An error
/// that belongs to one connection (it was reset before it was accepted) is
/// skipped; one that does not (out of file descriptors) is logged and retried
/// after a pause, so the server neither spins nor stops.
async fn accept(
    listener: &tokio::net::TcpListener,
    connections: &Arc<Semaphore>,
) -> (tokio::net::TcpStream, OwnedSemaphorePermit) {
    let permit = Arc::clone(connections)
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Small answers go out at once rather than after a delayed ACK.
                let _ = stream.set_nodelay(true);
                return (stream, permit);
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(err) => {
                tracing::error!(error = %err, "cannot accept a connection; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// With a token configured, every route but [`OPEN_ROUTE`] (and every
/// unknown path) needs `Authorization: Bearer <token>`.
async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.token
        && request.uri().path() != OPEN_ROUTE
        && !console::is_console(request.uri().path())
    {
        let given = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        let valid = given.is_some_and(|token| bool::from(digest(token).ct_eq(expected.as_ref())));
        if !valid {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// The token of `Bearer <token>` (the scheme in any case, RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("no route {}", request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
    }
}

/// A handler panicked: a 500 like any other (logged with the message).
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    ApiError::Internal(format!("a handler panicked: {message}")).into_response()
}
