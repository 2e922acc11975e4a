//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! attributes and the types' `ToSchema` derives.

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

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
        runs::run_events,
        workflows::list_workflows,
        workflows::get_workflow,
        workflows::put_workflow,
        workflows::list_plugins,
        workflows::put_plugin,
        workflows::delete_plugin,
        system::healthz,
        system::metrics,
        system::openapi,
    ),
    modifiers(&BearerToken),
    security(("bearer" = [])),
    tags(
        (name = "runs", description = "Trigger runs, follow and cancel them"),
        (name = "workflows", description = "The workflows the server runs"),
        (name = "plugins", description = "The task plugins (WASM components) loaded"),
        (name = "system", description = "Liveness, metrics, this document"),
    ),
)]
pub struct ApiDoc;

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
