//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! attributes and the types' `ToSchema` derives, and the handler that serves it.

use axum::Json;
use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, ResponseBuilder, Type};

use super::{runs, system, workflows};

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Trellis",
        description = "Workflow orchestration whose tasks are WebAssembly components. Errors are `{\"error\": {\"code\", \"message\", \"details\"?}}`.",
    ),
    paths(
        runs::trigger,
        runs::list_runs,
        runs::get_run,
        runs::cancel_run,
        runs::retry_run,
        runs::rerun_run,
        runs::run_events,
        runs::get_run_graph,
        workflows::list_workflows,
        workflows::get_workflow,
        workflows::put_workflow,
        workflows::workflow_stats,
        workflows::list_plugins,
        workflows::put_plugin,
        workflows::delete_plugin,
        system::nodes,
        system::healthz,
        system::metrics,
        openapi,
    ),
    modifiers(&BearerToken, &Unauthorized, &Links),
    security(("bearer" = [])),
    tags(
        (name = "runs", description = "Trigger runs, follow and cancel them"),
        (name = "workflows", description = "The workflows the server runs"),
        (name = "plugins", description = "The task plugins (WASM components) loaded"),
        (name = "system", description = "Liveness, metrics, the nodes, this document"),
    ),
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "system",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)),
)]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The `bearer` scheme: `Authorization: Bearer <auth_token>` when the server
/// has a token.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Every operation that needs the token answers 401 without it: the
/// `unauthorized` error, with `WWW-Authenticate: Bearer`.
struct Unauthorized;

impl Modify for Unauthorized {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let response = ResponseBuilder::new()
            .description(
                "No or a wrong `Authorization: Bearer <token>` (when the server has a token)",
            )
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(ObjectBuilder::new().schema_type(Type::String))
                    .description(Some("`Bearer`"))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                // `security(())` (an open route) overrides the document's
                // `bearer`; `None` inherits it.
                if operation.security.is_none() {
                    operation
                        .responses
                        .responses
                        .insert("401".to_owned(), response.clone().into());
                }
            }
        }
    }
}

/// Links from an answer to the operations that take what it holds: the run
/// a trigger started (its status, its cancel, its events), the workflow a
/// `PUT` stored (a run of it), the plugin an upload activated (its removal).
/// Clients and fuzzers follow them.
struct Links;

impl Modify for Links {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        // (path, method, statuses, [(link name, operation id, [(parameter, expression)])])
        type Targets = &'static [(
            &'static str,
            &'static str,
            &'static [(&'static str, &'static str)],
        )];
        let from: [(&str, &str, &[&str], Targets); 3] = [
            (
                "/v1/workflows/{name}/runs",
                "post",
                &["200", "202"],
                &[
                    ("GetRun", "get_run", &[("id", "$response.body#/id")]),
                    ("CancelRun", "cancel_run", &[("id", "$response.body#/id")]),
                    ("RunEvents", "run_events", &[("id", "$response.body#/id")]),
                ],
            ),
            (
                "/v1/workflows/{name}",
                "put",
                &["200"],
                &[
                    (
                        "GetWorkflow",
                        "get_workflow",
                        &[("name", "$response.body#/name")],
                    ),
                    ("TriggerRun", "trigger", &[("name", "$response.body#/name")]),
                ],
            ),
            (
                "/v1/plugins/{name}",
                "put",
                &["200", "201"],
                &[(
                    "DeletePluginVersion",
                    "delete_plugin",
                    &[
                        ("name", "$response.body#/name"),
                        ("version", "$response.body#/version"),
                    ],
                )],
            ),
        ];
        for (path, method, statuses, targets) in from {
            let Some(item) = openapi.paths.paths.get_mut(path) else {
                continue;
            };
            let operation = match method {
                "post" => item.post.as_mut(),
                "put" => item.put.as_mut(),
                _ => None,
            };
            let Some(operation) = operation else {
                continue;
            };
            for status in statuses {
                let Some(utoipa::openapi::RefOr::T(response)) =
                    operation.responses.responses.get_mut(*status)
                else {
                    continue;
                };
                // utoipa 5's `Link` serializes `operation_id` (not
                // `operationId`), which no reader knows: the links go in as
                // plain JSON through the response's extensions instead.
                let links: serde_json::Map<String, serde_json::Value> = targets
                    .iter()
                    .map(|(name, operation_id, parameters)| {
                        let parameters: serde_json::Map<String, serde_json::Value> = parameters
                            .iter()
                            .map(|(parameter, expression)| {
                                ((*parameter).to_owned(), (*expression).into())
                            })
                            .collect();
                        (
                            (*name).to_owned(),
                            serde_json::json!({
                                "operationId": operation_id,
                                "parameters": parameters,
                            }),
                        )
                    })
                    .collect();
                response
                    .extensions
                    .get_or_insert_with(Default::default)
                    .merge(Extensions::from_iter([(
                        "links",
                        serde_json::Value::Object(links),
                    )]));
            }
        }
    }
}
