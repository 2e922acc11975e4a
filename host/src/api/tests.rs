//! The router without a socket (`tower::ServiceExt::oneshot`), on a service
//! with no plugins: every refusal, auth, and the OpenAPI document. Runs that
//! execute are in the end-to-end tests (`tests/e2e/serve.rs`).

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;
use crate::config::Config;

struct Fixture {
    _dir: tempfile::TempDir,
    service: Service,
}

/// A service with no plugins and one workflow file, which therefore has errors.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let workflows = dir.path().join("workflows");
    std::fs::create_dir(&workflows).unwrap();
    std::fs::write(
        workflows.join("broken.toml"),
        "[[step]]\nid = \"a\"\nplugin = \"missing\"\n",
    )
    .unwrap();
    let config = Config {
        data_dir: dir.path().join("data"),
        plugin_dirs: vec![],
        workflow_dirs: vec![workflows],
        ..Config::default()
    };
    let service = Service::start(&config).await.unwrap();
    Fixture { _dir: dir, service }
}

impl Fixture {
    fn app(&self, auth_token: Option<&str>, max_body: u64) -> Router {
        router(
            self.service.clone(),
            ApiConfig {
                auth_token: auth_token.map(str::to_owned),
                max_body,
                ..ApiConfig::default()
            },
        )
    }
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, body: &str) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// `(status, code)` of an error answer; panics if the body is not the error shape.
fn code(answer: &(StatusCode, Value)) -> (u16, &str) {
    let code = answer.1["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {}", answer.1));
    assert!(answer.1["error"]["message"].is_string(), "{}", answer.1);
    (answer.0.as_u16(), code)
}

#[tokio::test]
async fn every_refusal_is_a_json_error() {
    let fixture = fixture().await;
    let app = fixture.app(None, 64);
    let run = "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b";
    let cases: Vec<(Request<Body>, u16, &str)> = vec![
        (get("/nowhere"), 404, "not_found"),
        (
            Request::delete("/v1/runs").body(Body::empty()).unwrap(),
            405,
            "method_not_allowed",
        ),
        (get("/v1/runs/not-a-uuid"), 400, "invalid_request"),
        (get(&format!("/v1/runs/{run}")), 404, "not_found"),
        (get(&format!("/v1/runs/{run}/events")), 404, "not_found"),
        (
            post_json(&format!("/v1/runs/{run}/cancel"), ""),
            404,
            "not_found",
        ),
        (get("/v1/runs?status=done"), 400, "invalid_request"),
        (get("/v1/runs?limit=0"), 400, "invalid_request"),
        (get("/v1/runs?limit=1001"), 400, "invalid_request"),
        (get("/v1/runs?limit=ten"), 400, "invalid_request"),
        (get("/v1/runs?cursor=nothex"), 400, "invalid_request"),
        (get("/v1/runs?page=2"), 400, "invalid_request"),
        (get("/v1/workflows/nope"), 404, "not_found"),
        (get("/v1/workflows/%FF"), 400, "invalid_request"),
        (post_json("/v1/workflows/nope/runs", "{}"), 404, "not_found"),
        (
            post_json("/v1/workflows/broken/runs", "{}"),
            409,
            "workflow_invalid",
        ),
        (
            post_json("/v1/workflows/broken/runs", "{\"a\": "),
            400,
            "invalid_json",
        ),
        (
            post_json("/v1/workflows/broken/runs?wait=forever", "{}"),
            400,
            "invalid_request",
        ),
        (
            post_json("/v1/workflows/broken/runs", &"1".repeat(65)),
            413,
            "payload_too_large",
        ),
        (
            Request::post("/v1/workflows/broken/runs")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            Request::post("/v1/workflows/broken/runs")
                .header("idempotency-key", "k".repeat(256))
                .body(Body::empty())
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            Request::put("/v1/workflows/a%2Fb")
                .body(Body::from("[[step]]"))
                .unwrap(),
            400,
            "invalid_request",
        ),
        (
            Request::put("/v1/workflows/x")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap(),
            415,
            "unsupported_media_type",
        ),
        (
            Request::put("/v1/workflows/x")
                .body(Body::from(vec![0xff, 0xfe]))
                .unwrap(),
            400,
            "invalid_request",
        ),
    ];
    for (request, status, expected) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let answer = send(&app, request).await;
        assert_eq!(code(&answer), (status, expected), "{what}: {}", answer.1);
    }
}

#[tokio::test]
async fn malformed_json_says_where() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    let answer = send(
        &app,
        post_json("/v1/workflows/broken/runs", "{\n  \"a\": [1,, 2]\n}"),
    )
    .await;
    assert_eq!(code(&answer), (400, "invalid_json"));
    assert_eq!(
        answer.1["error"]["details"],
        json!({ "line": 2, "column": 11 })
    );
}

#[tokio::test]
async fn an_invalid_workflow_lists_its_errors() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    let answer = send(&app, post_json("/v1/workflows/broken/runs", "")).await;
    assert_eq!(code(&answer), (409, "workflow_invalid"));
    let details = answer.1["error"]["details"].as_array().unwrap();
    assert_eq!(details[0]["line"], 3, "{}", answer.1);
    assert!(
        details[0]["message"].as_str().unwrap().contains("missing"),
        "{}",
        answer.1
    );

    let (status, list) = send(&app, get("/v1/workflows")).await;
    assert_eq!(status, 200);
    let broken = &list["workflows"][0];
    assert_eq!(broken["name"], "broken");
    assert_eq!(broken["valid"], false);
    assert_eq!(broken["steps"], Value::Null);
    assert_eq!(broken["errors"][0]["line"], 3);
    assert!(
        broken["errors"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("broken.toml")
    );
}

#[tokio::test]
async fn a_workflow_put_with_errors_is_refused_and_the_old_one_stays() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    let put = |name: &str, body: &str| {
        Request::put(format!("/v1/workflows/{name}"))
            .header(header::CONTENT_TYPE, "application/toml")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let answer = send(
        &app,
        put("broken", "[[step]]\nid = \"b\"\nplugin = \"gone\"\n"),
    )
    .await;
    assert_eq!(code(&answer), (422, "invalid_workflow"));
    assert_eq!(answer.1["error"]["details"][0]["line"], 3, "{}", answer.1);
    let (_, kept) = send(&app, get("/v1/workflows/broken")).await;
    assert!(
        kept["source"].as_str().unwrap().contains("missing"),
        "{kept}"
    );

    let answer = send(&app, put("other", "name = \"third\"\n")).await;
    assert_eq!(code(&answer), (422, "invalid_workflow"));
    assert!(
        answer.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("third"),
        "{}",
        answer.1
    );
    let (status, _) = send(&app, get("/v1/workflows/other")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_token_guards_every_route_but_healthz() {
    let fixture = fixture().await;
    let app = fixture.app(Some("s3cret"), 1024);
    let with = |uri: &str, authorization: Option<&str>| {
        let mut request = Request::get(uri);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        request.body(Body::empty()).unwrap()
    };
    for (method, path) in ROUTES {
        let uri = path
            .replace("{name}", "broken")
            .replace("{id}", "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b");
        let request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let answer = send(&app, request).await;
        if *path == "/healthz" {
            assert_eq!(answer.0, 200);
        } else {
            assert_eq!(code(&answer), (401, "unauthorized"), "{method} {uri}");
        }
    }
    for wrong in [
        "Bearer s3cre",
        "Bearer s3cret2",
        "Basic s3cret",
        "s3cret",
        "Bearer ",
    ] {
        let answer = send(&app, with("/v1/workflows", Some(wrong))).await;
        assert_eq!(code(&answer), (401, "unauthorized"), "{wrong}");
    }
    let response = app
        .clone()
        .oneshot(with("/v1/workflows", None))
        .await
        .unwrap();
    assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
    for right in ["Bearer s3cret", "bearer s3cret"] {
        let (status, _) = send(&app, with("/v1/workflows", Some(right))).await;
        assert_eq!(status, 200, "{right}");
    }
    // Unknown paths too: no probing for routes without the token.
    let answer = send(&app, with("/v2/anything", None)).await;
    assert_eq!(code(&answer), (401, "unauthorized"));
}

#[tokio::test]
async fn the_console_is_served_without_the_token_under_a_strict_policy() {
    let fixture = fixture().await;
    let app = fixture.app(Some("s3cret"), 1024);
    for (path, to) in [("/", "/ui/"), ("/ui", "/ui/")] {
        let response = app.clone().oneshot(get(path)).await.unwrap();
        assert!(
            response.status().is_redirection(),
            "{path}: {}",
            response.status()
        );
        assert_eq!(response.headers()[header::LOCATION], to, "{path}");
    }
    for page in [
        "/ui/",
        "/ui/runs",
        "/ui/runs/0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b",
        "/ui/plugins",
    ] {
        let response = app.clone().oneshot(get(page)).await.unwrap();
        assert_eq!(response.status(), 200, "{page}");
        let headers = response.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let policy = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(!policy.contains("unsafe-inline"), "{policy}");
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains("<title>Trellis</title>"), "{html}");
        // The page holds no data: nothing of the store is in it.
        assert!(!html.contains("broken"), "{html}");
    }
    let response = app.clone().oneshot(get("/ui/assets/app.js")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    let etag = response.headers()[header::ETAG].clone();
    let again = Request::get("/ui/assets/app.js")
        .header(header::IF_NONE_MATCH, etag)
        .body(Body::empty())
        .unwrap();
    assert_eq!(app.clone().oneshot(again).await.unwrap().status(), 304);
    let answer = send(&app, get("/ui/assets/secrets.txt")).await;
    assert_eq!(code(&answer), (404, "not_found"));
    // The data stays behind the token.
    let answer = send(&app, get("/v1/runs")).await;
    assert_eq!(code(&answer), (401, "unauthorized"));
    let answer = send(&app, get("/uiv1/runs")).await;
    assert_eq!(code(&answer), (401, "unauthorized"));
}

#[tokio::test]
async fn healthz_and_metrics() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    assert_eq!(
        send(&app, get("/healthz")).await,
        (StatusCode::OK, json!({ "status": "ok" }))
    );
    let response = app.clone().oneshot(get("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(
        text.contains("# TYPE trellis_runs_in_flight gauge"),
        "{text}"
    );
}

#[tokio::test]
async fn the_openapi_document_has_every_route() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    let (status, document) = send(&app, get("/v1/openapi.json")).await;
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.1.0");
    for (method, path) in ROUTES {
        let operation = &document["paths"][path][method.to_lowercase()];
        assert!(operation.is_object(), "{method} {path} is not documented");
        assert!(
            operation["responses"]["200"].is_object() || operation["responses"]["202"].is_object(),
            "{method} {path}"
        );
    }
    let documented: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "the document has routes the router lacks"
    );
    let schemas = document["components"]["schemas"].as_object().unwrap();
    for schema in [
        "RunRecord",
        "StepRecord",
        "AttemptRecord",
        "RunList",
        "ErrorBody",
        "RunEvent",
        "WorkflowDetail",
        "PluginList",
    ] {
        assert!(schemas.contains_key(schema), "no schema {schema}");
    }
    assert_eq!(
        document["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        document["paths"]["/healthz"]["get"]["security"],
        json!([{}])
    );
}

#[tokio::test]
async fn a_panic_is_a_500_without_detail() {
    let response = panicked(Box::new(String::from("secret detail")));
    assert_eq!(response.status(), 500);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        body,
        json!({ "error": { "code": "internal", "message": "internal error" } })
    );
}

/// The schema of a documented parameter, with the document's components so
/// that its `$ref`s resolve.
fn parameter_schema(document: &Value, method: &str, path: &str, name: &str) -> Value {
    let parameters = document["paths"][path][method]["parameters"]
        .as_array()
        .unwrap_or_else(|| panic!("{method} {path} has no parameters"));
    let parameter = parameters
        .iter()
        .find(|parameter| parameter["name"] == name)
        .unwrap_or_else(|| panic!("{method} {path} has no parameter {name}"));
    let mut schema = parameter["schema"].clone();
    schema["components"] = document["components"].clone();
    schema
}

/// Whether `text`, as sent in a URL or header, fits `schema`.
fn fits(schema: &Value, text: &str) -> bool {
    let types = schema["type"].to_string();
    let value = if types.contains("integer") {
        match text.parse::<i64>() {
            Ok(number) => json!(number),
            Err(_) => json!(text),
        }
    } else {
        json!(text)
    };
    jsonschema::is_valid(schema, &value)
}

/// What the document says a parameter takes is what the server takes: each
/// sample fits the parameter's schema exactly when the server does not answer
/// 400 for it. (schemathesis generates from these schemas: a schema looser than
/// the server fails its positive tests, a stricter one its negative tests.)
#[tokio::test]
async fn parameter_schemas_agree_with_the_server() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    let (_, document) = send(&app, get("/v1/openapi.json")).await;
    let run = "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b";
    let enc = |text: &str| text.replace(' ', "%20").replace('+', "%2B");
    type MakeRequest = Box<dyn Fn(&str) -> Request<Body>>;
    let (k255, k256) = ("k".repeat(255), "k".repeat(256));
    let (x64, x65, x128, x129) = (
        "x".repeat(64),
        "x".repeat(65),
        "x".repeat(128),
        "x".repeat(129),
    );
    let cursor = hex::encode(run);
    let cases: Vec<(&str, &str, &str, MakeRequest, Vec<&str>)> = vec![
        (
            "post",
            "/v1/workflows/{name}/runs",
            "wait",
            Box::new(move |v| {
                post_json(&format!("/v1/workflows/broken/runs?wait={}", enc(v)), "{}")
            }),
            vec![
                "0", "1ms", "99999ms", "0s", "59s", "299s", "300s", "0m", "5m", "301s", "6m", "1h",
                "5", "", "soon",
            ],
        ),
        (
            "post",
            "/v1/workflows/{name}/runs",
            "Idempotency-Key",
            Box::new(|v| {
                Request::post("/v1/workflows/broken/runs")
                    .header("idempotency-key", v)
                    .body(Body::empty())
                    .unwrap()
            }),
            vec!["k", "order 42", "~!", &k255, &k256],
        ),
        (
            "get",
            "/v1/runs",
            "status",
            Box::new(move |v| get(&format!("/v1/runs?status={}", enc(v)))),
            vec![
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                "done",
                "",
                "Failed",
            ],
        ),
        (
            "get",
            "/v1/runs",
            "limit",
            Box::new(move |v| get(&format!("/v1/runs?limit={}", enc(v)))),
            vec!["1", "50", "1000", "0", "1001", "-1", "ten", ""],
        ),
        (
            "get",
            "/v1/runs",
            "cursor",
            Box::new(move |v| get(&format!("/v1/runs?cursor={}", enc(v)))),
            vec![&cursor, "", "41", "nothex", "4", "ff"],
        ),
        (
            "get",
            "/v1/runs/{id}",
            "id",
            Box::new(|v| get(&format!("/v1/runs/{v}"))),
            vec![
                run,
                "0190B5A4-7C1E-7D3A-9F2B-1C2D3E4F5A6B",
                "42",
                "not-a-uuid",
            ],
        ),
        (
            "get",
            "/v1/runs/{id}/events",
            "Last-Event-ID",
            Box::new(move |v| {
                Request::get(format!("/v1/runs/{run}/events"))
                    .header("last-event-id", v)
                    .body(Body::empty())
                    .unwrap()
            }),
            vec![
                "0",
                "7",
                "9999999999999999999",
                "18446744073709551615",
                "+5",
                "1 2",
                "-1",
                "x",
                "null",
            ],
        ),
        (
            "put",
            "/v1/workflows/{name}",
            "name",
            Box::new(|v| {
                Request::put(format!("/v1/workflows/{v}"))
                    .header(header::CONTENT_TYPE, "application/toml")
                    .body(Body::from("[[step]]\nid = \"a\"\nplugin = \"missing\"\n"))
                    .unwrap()
            }),
            vec!["order-pipeline", "a.b_C9", &x128, &x129, "a%20b", "%C3%A9"],
        ),
        (
            "delete",
            "/v1/plugins/{name}",
            "name",
            Box::new(|v| {
                Request::delete(format!("/v1/plugins/{v}"))
                    .body(Body::empty())
                    .unwrap()
            }),
            vec!["json-transform", "a_1", &x64, &x65, "Hash", "a.b"],
        ),
        (
            "delete",
            "/v1/plugins/{name}",
            "version",
            Box::new(move |v| {
                Request::delete(format!("/v1/plugins/hash?version={}", enc(v)))
                    .body(Body::empty())
                    .unwrap()
            }),
            vec![
                "1.0.0",
                "0.10.2-rc.1+build.5",
                "1.0",
                "01.0.0",
                "1.0.0-01",
                "v1",
                "",
            ],
        ),
    ];
    for (method, path, name, request, samples) in cases {
        let schema = parameter_schema(&document, method, path, name);
        for sample in samples {
            let (status, body) = send(&app, request(sample)).await;
            assert_eq!(
                fits(&schema, sample),
                status != StatusCode::BAD_REQUEST,
                "{method} {path} {name}={sample:?}: the server answered {status} {body}"
            );
        }
    }
}

/// Found by the API fuzzer: these answered text/plain (axum's own rejection).
#[tokio::test]
async fn a_plugin_delete_query_that_does_not_parse_is_a_json_error() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    for uri in [
        "/v1/plugins/hash?version=1.0.0&version=2.0.0",
        "/v1/plugins/hash?force=true",
    ] {
        let answer = send(&app, Request::delete(uri).body(Body::empty()).unwrap()).await;
        assert_eq!(
            code(&answer),
            (400, "invalid_request"),
            "{uri}: {}",
            answer.1
        );
    }
}

/// Found by the API fuzzer: what the document promised did not match what the
/// server sends.
#[tokio::test]
async fn the_openapi_document_matches_the_answers() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1024);
    let (_, document) = send(&app, get("/v1/openapi.json")).await;

    // Every guarded route answers 401 without the token.
    for (method, path) in ROUTES {
        let responses = &document["paths"][path][method.to_lowercase()]["responses"];
        if *path == "/healthz" {
            assert!(responses["401"].is_null(), "{method} {path}");
        } else {
            assert_eq!(
                responses["401"]["content"]["application/json"]["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{method} {path}"
            );
            assert!(
                responses["401"]["headers"]["WWW-Authenticate"].is_object(),
                "{method} {path}"
            );
        }
    }

    // A path segment that is not UTF-8 is a 400 on every route that has one.
    for (method, path) in ROUTES.iter().filter(|(_, path)| path.contains('{')) {
        let responses = &document["paths"][path][method.to_lowercase()]["responses"];
        assert!(responses["400"].is_object(), "{method} {path}: no 400");
    }

    // Every link leads to an operation of the document, with parameters it has.
    let operations: std::collections::HashMap<&str, &Value> = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .map(|operation| (operation["operationId"].as_str().unwrap(), operation))
        .collect();
    let mut links = 0;
    for item in document["paths"].as_object().unwrap().values() {
        for operation in item.as_object().unwrap().values() {
            for response in operation["responses"].as_object().unwrap().values() {
                for (name, link) in response["links"].as_object().into_iter().flatten() {
                    links += 1;
                    let target = operations[link["operationId"].as_str().unwrap()];
                    for parameter in link["parameters"].as_object().unwrap().keys() {
                        assert!(
                            target["parameters"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .any(|p| p["name"] == parameter.as_str()),
                            "link {name}: {} has no parameter {parameter}",
                            link["operationId"]
                        );
                    }
                }
            }
        }
    }
    assert!(links >= 9, "{links} links");

    // A trigger without a body is taken (as `{}`).
    let trigger = &document["paths"]["/v1/workflows/{name}/runs"]["post"];
    assert_ne!(trigger["requestBody"]["required"], true, "{trigger}");

    // A plugin upload is bytes, and a bad name is a 400.
    let upload = &document["paths"]["/v1/plugins/{name}"]["put"];
    assert_eq!(
        upload["requestBody"]["content"]["application/wasm"]["schema"]["format"],
        "binary"
    );
    assert!(upload["responses"]["400"].is_object());

    // Each event of the stream: `event`, `id`, and `data` holding a RunEvent
    // as JSON. A real event fits both.
    let events = &document["paths"]["/v1/runs/{id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
        ["schema"];
    let mut message_schema = events.clone();
    message_schema["components"] = document["components"].clone();
    let event = crate::service::RunEvent::StepStarted {
        seq: 3,
        step: "fetch".to_owned(),
        attempt: 1,
        item: Some(2),
    };
    let message = json!({
        "event": event.name(),
        "id": event.seq().to_string(),
        "data": serde_json::to_string(&event).unwrap(),
    });
    assert!(
        jsonschema::is_valid(&message_schema, &message),
        "{message} does not fit {events}"
    );
    let resolved = &document["components"]["schemas"][events["$ref"]
        .as_str()
        .unwrap()
        .trim_start_matches("#/components/schemas/")];
    let data = &resolved["oneOf"][0]["properties"]["data"];
    assert_eq!(data["contentMediaType"], "application/json");
    let mut data_schema = data["contentSchema"].clone();
    data_schema["components"] = document["components"].clone();
    assert!(jsonschema::is_valid(
        &data_schema,
        &serde_json::to_value(&event).unwrap()
    ));
    assert!(!jsonschema::is_valid(&data_schema, &message));
}

/// On SQLite the store has one node: this one, alive, running nothing.
#[tokio::test]
async fn the_nodes_of_a_single_server_are_itself() {
    let fixture = fixture().await;
    let app = fixture.app(None, 1 << 20);
    let (status, body) = send(&app, get("/v1/nodes")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let nodes = body["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{body}");
    let node = &nodes[0];
    let id = node["id"].as_str().unwrap();
    assert!(
        id.ends_with(&format!("-{}", std::process::id())),
        "the default node id is <hostname>-<pid>: {id}"
    );
    assert_eq!(node["alive"], true);
    assert_eq!(node["running_steps"], 0);
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert!(node["started_at"].as_str().unwrap() <= node["last_seen"].as_str().unwrap());
}

/// A store that cannot be reached answers 503 `unavailable` and says to
/// try again; the detail (which names the database) stays in the log.
#[test]
fn an_unavailable_store_is_a_503_to_retry() {
    let error = ApiError::from(crate::store::StoreError::Unavailable(
        crate::store::DatabaseError::new(
            "cannot connect to PostgreSQL at db:5432/x: connection refused",
        ),
    ));
    assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.code(), "unavailable");
    assert!(!error.to_string().contains("db:5432"), "{error}");
    let response = error.into_response();
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
}
