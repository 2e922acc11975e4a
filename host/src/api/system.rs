//! Liveness, metrics and the nodes sharing the store.

use std::sync::Once;

use axum::Json;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::error::ApiError;
use crate::store::Node;

const RUNS_IN_FLIGHT: &str = "trellis_runs_in_flight";

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`: the server answers.
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Liveness: 200 while the server answers. Needs no token.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "system",
    security(()),
    responses((status = 200, description = "The server is up", body = Health)),
)]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Metrics in the Prometheus text format: runs by workflow and final status,
/// step durations, fuel, queue depth, steps and runs in flight.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain; version=0.0.4", body = String)),
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    static DESCRIBE: Once = Once::new();
    DESCRIBE.call_once(|| {
        metrics::describe_gauge!(
            RUNS_IN_FLIGHT,
            metrics::Unit::Count,
            "Runs accepted by this process and not finished."
        );
    });
    metrics::gauge!(RUNS_IN_FLIGHT).set(state.service.in_flight() as f64);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

/// The nodes sharing the store (`GET /v1/nodes`).
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeList {
    pub nodes: Vec<Node>,
}

/// The nodes sharing this server's store: on PostgreSQL every node of the
/// cluster seen in the last hour, on SQLite this one.
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "system",
    responses(
        (status = 200, description = "The nodes, by id", body = NodeList),
        (status = 503, description = "The database is unavailable", body = super::error::ErrorBody),
    ),
)]
pub async fn nodes(State(state): State<AppState>) -> Result<Json<NodeList>, ApiError> {
    Ok(Json(NodeList {
        nodes: state.service.nodes().await?,
    }))
}
