//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! attributes and the types' `ToSchema` derives.

use utoipa::Modify;
use utoipa::OpenApi;
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
    modifiers(&BearerToken, &Unauthorized),
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
