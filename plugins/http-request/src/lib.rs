//! `http-request`: one HTTP request (following redirects) to a host the step's
//! `allow_hosts` lists, through `wasi:http/outgoing-handler`.
//!
//! Input:
//! ```json
//! { "url": "https://api.example.com/v1/users", "method": "POST",
//!   "headers": { "accept": "application/json" }, "body": { "name": "Ada" },
//!   "bearer_config": "api_token", "follow_redirects": 5, "fail_on_status": true }
//! ```
//! - `url` (required): `http://` or `https://`.
//! - `method`: default `GET`.
//! - `headers`: name -> value (or a list of values).
//! - `body`: a string is sent as is; any other JSON value is sent as JSON text
//!   with `content-type: application/json` (unless `headers` sets one).
//! - `bearer_config`: a `host.config` key (typically a secret the step names in
//!   `secrets`) whose value is sent as `authorization: Bearer <value>`.
//! - `headers_from_config`: header name -> `host.config` key, for API keys.
//! - `follow_redirects`: how many redirects to follow (default 5; 0: none).
//!   Each one is a new request, so its host must be allowed too.
//! - `fail_on_status`: default true: a 4xx/5xx status fails the step (5xx, 408
//!   and 429 retryable); false returns it as output.
//!
//! Output: `{ "status": 200, "headers": { name: value }, "body": "...",
//! "json": <body parsed, when it is JSON>, "url": "<final url>", "redirects": 0 }`.
//! Header names are lowercase; repeated headers are joined with ", ".
//!
//! Errors: a host not in `allow_hosts` fails with "not allowed" (fatal); a
//! connection problem or timeout is retryable; a response over the step's
//! `limits.http_response_body` is fatal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_sdk::{StepContext, TaskError};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use wasip2::io::streams::StreamError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    url: String,
    #[serde(default = "get")]
    method: String,
    #[serde(default)]
    headers: BTreeMap<String, HeaderValue>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    bearer_config: Option<String>,
    #[serde(default)]
    headers_from_config: BTreeMap<String, String>,
    #[serde(default = "five")]
    follow_redirects: u32,
    #[serde(default = "yes")]
    fail_on_status: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderValue {
    One(String),
    Many(Vec<String>),
}

fn get() -> String {
    "GET".to_owned()
}
fn five() -> u32 {
    5
}
fn yes() -> bool {
    true
}

#[derive(Serialize)]
struct Output {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    json: Option<Value>,
    url: String,
    redirects: u32,
}

struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

#[trellis_sdk::task(
    input_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["url"],
  "additionalProperties": false,
  "properties": {
    "url": { "type": "string", "description": "http:// or https:// URL; its host must be in the step's allow_hosts" },
    "method": { "type": "string", "default": "GET" },
    "headers": { "type": "object", "additionalProperties": { "type": ["string", "array"] } },
    "body": { "description": "a string is sent as is; other JSON as application/json" },
    "bearer_config": { "type": "string", "description": "host.config key whose value is sent as a bearer token" },
    "headers_from_config": { "type": "object", "additionalProperties": { "type": "string" } },
    "follow_redirects": { "type": "integer", "minimum": 0, "default": 5 },
    "fail_on_status": { "type": "boolean", "default": true }
  }
}"#,
    output_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["status", "headers", "body", "url", "redirects"],
  "properties": {
    "status": { "type": "integer" },
    "headers": { "type": "object", "additionalProperties": { "type": "string" } },
    "body": { "type": "string" },
    "json": { "description": "the body parsed, when it is JSON" },
    "url": { "type": "string" },
    "redirects": { "type": "integer" }
  }
}"#
)]
fn run(_ctx: &StepContext, input: Value) -> Result<Output, TaskError> {
    let input: Input = trellis_sdk::parse_input(input)?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in &input.headers {
        match value {
            HeaderValue::One(v) => headers.push((name.to_ascii_lowercase(), v.clone())),
            HeaderValue::Many(vs) => {
                for v in vs {
                    headers.push((name.to_ascii_lowercase(), v.clone()));
                }
            }
        }
    }
    if let Some(key) = &input.bearer_config {
        let token = config_value(key, "bearer_config")?;
        headers.push(("authorization".to_owned(), format!("Bearer {token}")));
    }
    for (name, key) in &input.headers_from_config {
        let value = config_value(key, &format!("headers_from_config.{name}"))?;
        headers.push((name.to_ascii_lowercase(), value));
    }
    let body = match input.body {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.into_bytes()),
        Some(other) => {
            if !headers.iter().any(|(name, _)| name == "content-type") {
                headers.push(("content-type".to_owned(), "application/json".to_owned()));
            }
            Some(serde_json::to_vec(&other).expect("JSON serialises"))
        }
    };

    let mut url = url::Url::parse(&input.url)
        .map_err(|err| TaskError::fatal(format!("invalid input: field `url`: {err}")))?;
    let mut method = input.method.to_ascii_uppercase();
    let mut body = body;
    let mut redirects = 0;
    loop {
        let response = send(&method, &url, &headers, body.as_deref())?;
        let location = response.headers.get("location");
        if matches!(response.status, 301 | 302 | 303 | 307 | 308)
            && redirects < input.follow_redirects
            && let Some(location) = location
        {
            let next = url.join(location).map_err(|err| {
                TaskError::fatal(format!(
                    "{method} {url}: bad redirect location {location:?}: {err}"
                ))
            })?;
            trellis_sdk::log::info(format!(
                "{method} {url} -> {}; following to {next}",
                response.status
            ));
            // 303 (and, as browsers do, 301/302 after a POST) switch to GET.
            if response.status == 303 || (matches!(response.status, 301 | 302) && method == "POST")
            {
                method = "GET".to_owned();
                body = None;
                headers.retain(|(name, _)| name != "content-type");
            }
            // Credentials stay with the host they were meant for.
            if next.host_str() != url.host_str()
                || next.port_or_known_default() != url.port_or_known_default()
            {
                headers.retain(|(name, _)| {
                    name != "authorization" && !input.headers_from_config.contains_key(name)
                });
            }
            url = next;
            redirects += 1;
            continue;
        }
        if input.fail_on_status && response.status >= 400 {
            let text = String::from_utf8_lossy(&response.body);
            let excerpt: String = text.chars().take(500).collect();
            let message = format!("{method} {url} answered {}: {excerpt}", response.status);
            return Err(
                if response.status >= 500 || matches!(response.status, 408 | 429) {
                    TaskError::retryable(message)
                } else {
                    TaskError::fatal(message)
                }
                .with_details(serde_json::json!({ "status": response.status })),
            );
        }
        let text = String::from_utf8_lossy(&response.body).into_owned();
        let json = response
            .headers
            .get("content-type")
            .filter(|ct| ct.contains("json"))
            .and_then(|_| serde_json::from_str(&text).ok());
        return Ok(Output {
            status: response.status,
            headers: response.headers,
            body: text,
            json,
            url: url.to_string(),
            redirects,
        });
    }
}

fn config_value(key: &str, field: &str) -> Result<String, TaskError> {
    trellis_sdk::config(key).ok_or_else(|| {
        TaskError::fatal(format!(
            "invalid input: field `{field}`: no config or secret named \"{key}\" (grant it with `secrets = [\"{key}\"]` or `config`)"
        ))
    })
}

/// One request, its whole response.
fn send(
    method: &str,
    url: &url::Url,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> Result<Response, TaskError> {
    let target = format!("{method} {url}");
    let fields = Fields::new();
    if let Some(bytes) = body
        && !headers.iter().any(|(name, _)| name == "content-length")
    {
        fields
            .append("content-length", bytes.len().to_string().as_bytes())
            .map_err(|err| TaskError::fatal(format!("{target}: header content-length: {err:?}")))?;
    }
    for (name, value) in headers {
        fields
            .append(name, value.as_bytes())
            .map_err(|err| TaskError::fatal(format!("{target}: header {name}: {err:?}")))?;
    }
    let request = OutgoingRequest::new(fields);
    let method_value = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_owned()),
    };
    let bad = |what: &str| TaskError::fatal(format!("{target}: invalid {what}"));
    request
        .set_method(&method_value)
        .map_err(|()| bad("method"))?;
    let scheme = match url.scheme() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => {
            return Err(TaskError::fatal(format!(
                "invalid input: field `url`: scheme {other:?} is not http or https"
            )));
        }
    };
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| bad("scheme"))?;
    let authority = match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_owned(),
        (None, _) => return Err(bad("URL: no host")),
    };
    request
        .set_authority(Some(&authority))
        .map_err(|()| bad("authority"))?;
    let path = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| bad("path"))?;

    // Sent first, then the body is streamed to it (the host buffers little).
    let outgoing = request.body().map_err(|()| bad("body"))?;
    let future = outgoing_handler::handle(request, None).map_err(|code| failure(&target, code))?;
    if let Some(bytes) = body {
        let stream = outgoing.write().map_err(|()| bad("body stream"))?;
        for chunk in bytes.chunks(4096) {
            if let Err(err) = stream.blocking_write_and_flush(chunk) {
                drop(stream);
                // The request itself may say why (a refused host, a limit).
                if let Some(Ok(Err(code))) = future.get() {
                    return Err(failure(&target, code));
                }
                return Err(TaskError::fatal(format!(
                    "{target}: writing the body: {}",
                    stream_error(err)
                )));
            }
        }
        drop(stream);
    }
    OutgoingBody::finish(outgoing, None).map_err(|code| failure(&target, code))?;
    let response = loop {
        if let Some(result) = future.get() {
            break result
                .map_err(|()| TaskError::fatal(format!("{target}: response already taken")))?
                .map_err(|code| failure(&target, code))?;
        }
        future.subscribe().block();
    };

    let status = response.status();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in response.headers().entries() {
        let value = String::from_utf8_lossy(&value).into_owned();
        headers
            .entry(name.to_ascii_lowercase())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value)
            })
            .or_insert(value);
    }
    let incoming = response
        .consume()
        .map_err(|()| TaskError::fatal(format!("{target}: no response body")))?;
    let stream = incoming
        .stream()
        .map_err(|()| TaskError::fatal(format!("{target}: no response body stream")))?;
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(err)) => {
                let code = wasip2::http::types::http_error_code(&err);
                let why = match code {
                    Some(ErrorCode::HttpResponseBodySize(_)) => {
                        "the response body is over the step's limits.http_response_body: cut off"
                            .to_owned()
                    }
                    Some(code) => describe(&code),
                    // The host's own bound arrives as text, not as a code.
                    None if err.to_debug_string().contains("response body size") => {
                        "the response body is over the step's limits.http_response_body: cut off"
                            .to_owned()
                    }
                    None => err.to_debug_string(),
                };
                return Err(TaskError::fatal(format!(
                    "{target}: reading the response body after {} bytes: {why}",
                    body.len()
                )));
            }
        }
    }
    drop(stream);
    let _trailers = IncomingBody::finish(incoming);
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn stream_error(err: StreamError) -> String {
    match err {
        StreamError::Closed => "stream closed".to_owned(),
        StreamError::LastOperationFailed(err) => match wasip2::http::types::http_error_code(&err) {
            Some(code) => describe(&code),
            None => err.to_debug_string(),
        },
    }
}

/// A request that could not be made: a refused host is fatal (retrying will
/// not change the allow-list), network trouble is retryable.
fn failure(target: &str, code: ErrorCode) -> TaskError {
    let why = describe(&code);
    match code {
        ErrorCode::HttpRequestDenied
        | ErrorCode::HttpRequestBodySize(_)
        | ErrorCode::HttpResponseBodySize(_)
        | ErrorCode::HttpRequestUriInvalid
        | ErrorCode::HttpProtocolError => TaskError::fatal(format!("{target}: {why}")),
        _ => TaskError::retryable(format!("{target}: {why}")),
    }
}

fn describe(code: &ErrorCode) -> String {
    match code {
        ErrorCode::HttpRequestDenied => {
            "not allowed: the host is not in the step's allow_hosts (or its request limit is reached; see the step log)".to_owned()
        }
        ErrorCode::HttpRequestBodySize(_) => {
            "the request body is over the step's limits.http_request_body".to_owned()
        }
        ErrorCode::HttpResponseBodySize(_) => {
            "the response body is over the step's limits.http_response_body: cut off".to_owned()
        }
        ErrorCode::ConnectionRefused => "connection refused".to_owned(),
        ErrorCode::ConnectionTimeout => "connection timed out".to_owned(),
        ErrorCode::DnsError(_) => "the host name does not resolve".to_owned(),
        other => format!("{other:?}"),
    }
}
