//! Extractors whose rejections are [`ApiError`]s, so a bad request is answered
//! in the API's own error shape and never with axum's plain-text bodies.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::{ApiError, AppState};

/// A JSON body. No `Content-Type` is taken as JSON (`curl -d` aside, most
/// clients send one); any other media type than JSON is refused (415). An
/// empty body is `{}`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        if let Some(media_type) = media_type(request.headers())?
            && !is_json(&media_type)
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the body must be JSON (`Content-Type: application/json`), not `{media_type}`"
            )));
        }
        let bytes = body(request, state).await?;
        parse_json_body(&bytes).map(JsonBody)
    }
}

/// A JSON request body as `JsonBody` reads it: blank is `{}`; JSON that
/// does not parse is `invalid_json` with where it broke.
pub fn parse_json_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(text).map_err(|error| ApiError::InvalidJson {
        message: error.to_string(),
        line: error.line(),
        column: error.column(),
    })
}

/// A TOML document as text (`application/toml`, any `text/*`, or no
/// `Content-Type`).
#[derive(Debug)]
pub struct TomlBody(pub String);

impl FromRequest<AppState> for TomlBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        if let Some(media_type) = media_type(request.headers())?
            && !(media_type == "application/toml"
                || media_type == "application/x-toml"
                || media_type.starts_with("text/"))
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the body must be a TOML workflow (`Content-Type: application/toml`), not `{media_type}`"
            )));
        }
        let bytes = body(request, state).await?;
        String::from_utf8(bytes.to_vec())
            .map(TomlBody)
            .map_err(|error| {
                ApiError::InvalidRequest(format!(
                    "the body is not UTF-8 text (invalid byte at offset {})",
                    error.utf8_error().valid_up_to()
                ))
            })
    }
}

/// A WebAssembly component (`application/wasm`, `application/octet-stream`,
/// or no `Content-Type`).
#[derive(Debug)]
pub struct WasmBody(pub Vec<u8>);

impl FromRequest<AppState> for WasmBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        if let Some(media_type) = media_type(request.headers())?
            && media_type != "application/wasm"
            && media_type != "application/octet-stream"
        {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the body must be a WebAssembly component (`Content-Type: application/wasm`), not `{media_type}`"
            )));
        }
        Ok(WasmBody(body(request, state).await?.to_vec()))
    }
}

/// The body, at most the configured `max_body` bytes (else 413), read within
/// `body_timeout` (else 408: a client trickling its body cannot hold a
/// connection and a buffer for ever).
async fn body(request: Request, state: &AppState) -> Result<Bytes, ApiError> {
    let read = Bytes::from_request(request, state);
    tokio::time::timeout(state.body_timeout, read)
        .await
        .map_err(|_| ApiError::RequestTimeout {
            after: state.body_timeout,
        })?
        .map_err(|rejection: BytesRejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.max_body,
                }
            } else {
                ApiError::InvalidRequest(format!("cannot read the request body: {rejection}"))
            }
        })
}

/// The media type of `Content-Type`, lower case and without parameters.
fn media_type(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| {
        ApiError::UnsupportedMediaType("the `Content-Type` header is not ASCII".to_owned())
    })?;
    let media_type = value.split(';').next().unwrap_or("").trim();
    Ok(Some(media_type.to_ascii_lowercase()))
}

/// `application/json` or a `+json` type (`application/merge-patch+json`).
fn is_json(media_type: &str) -> bool {
    media_type == "application/json"
        || media_type
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json"))
}

/// A path parameter; a segment that does not decode is a 400.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| ApiPath(path.0))
            .map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))
    }
}

/// Query parameters; an unknown one, or one that does not parse, is a 400.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| ApiQuery(query.0))
            .map_err(|rejection| ApiError::InvalidRequest(rejection.body_text()))
    }
}

/// A run id from the path: a UUID in any of its spellings, answered in the
/// canonical lower-case hyphenated form the store uses.
pub fn run_id(id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|uuid| uuid.hyphenated().to_string())
        .map_err(|_| {
            let shown: String = id.chars().take(80).collect();
            ApiError::InvalidRequest(format!(
                "`{shown}` is not a run id: run ids are UUIDs like 0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        for yes in [
            "application/json",
            "application/merge-patch+json",
            "application/vnd.api+json",
        ] {
            assert!(is_json(yes), "{yes}");
        }
        for no in ["text/plain", "application/jsonx", "text/json+x", ""] {
            assert!(!is_json(no), "{no}");
        }
    }

    #[test]
    fn media_type_drops_parameters_and_case() {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            "Application/JSON; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(
            media_type(&headers).unwrap().as_deref(),
            Some("application/json")
        );
    }

    #[test]
    fn run_ids_are_canonical_uuids() {
        assert_eq!(
            run_id("0190B5A4-7C1E-7D3A-9F2B-1C2D3E4F5A6B").unwrap(),
            "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b"
        );
        for bad in [
            "",
            "42",
            "../etc/passwd",
            "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6",
        ] {
            assert!(run_id(bad).is_err(), "{bad}");
        }
    }
}
