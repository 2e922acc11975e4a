//! The web console: a Preact app (`host/console`) built by `build.rs` and
//! embedded here, served at `/ui/` (`/` redirects there).
//!
//! Every `/ui/...` path answers with the app, which routes in the browser
//! and reads everything through the public API with the user's token: the
//! pages themselves hold no data, so they are served without the token. A
//! strict Content-Security-Policy allows only this origin's script, style
//! and connections: no inline script, nothing from elsewhere.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::ApiError;

/// Where the console lives.
pub const PREFIX: &str = "/ui";

/// What the console's pages may load and where they may connect: this
/// origin only. `style-src` without `'unsafe-inline'` too: the app sets
/// styles through the DOM, never with `style` attributes in markup.
pub const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

struct Asset {
    bytes: &'static [u8],
    content_type: &'static str,
    /// A digest of the bytes, for `If-None-Match`.
    etag: HeaderValue,
}

impl Asset {
    fn new(bytes: &'static [u8], content_type: &'static str) -> Asset {
        let digest = blake3::hash(bytes).to_hex();
        Asset {
            bytes,
            content_type,
            etag: HeaderValue::from_str(&format!("\"{}\"", &digest[..32]))
                .expect("hex is a valid header value"),
        }
    }

    fn response(&self, headers: &HeaderMap) -> Response {
        let fresh = headers
            .get(IF_NONE_MATCH)
            .is_some_and(|tags| tags.as_bytes() == self.etag.as_bytes());
        let mut response = if fresh {
            StatusCode::NOT_MODIFIED.into_response()
        } else {
            (
                [(CONTENT_TYPE, HeaderValue::from_static(self.content_type))],
                self.bytes,
            )
                .into_response()
        };
        let headers = response.headers_mut();
        headers.insert(ETAG, self.etag.clone());
        // Revalidated on each load: a new build is seen at once.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        secure(headers);
        response
    }
}

fn secure(headers: &mut HeaderMap) {
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
}

static INDEX: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_bytes!(concat!(env!("OUT_DIR"), "/console/index.html")),
        "text/html; charset=utf-8",
    )
});

static APP_JS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_bytes!(concat!(env!("OUT_DIR"), "/console/app.js")),
        "text/javascript; charset=utf-8",
    )
});

static APP_CSS: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        include_bytes!(concat!(env!("OUT_DIR"), "/console/app.css")),
        "text/css; charset=utf-8",
    )
});

/// Whether `path` is the console's (or the redirect to it): served without
/// the token.
pub fn is_console(path: &str) -> bool {
    path == "/"
        || path
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `GET /` and `GET /ui`.
pub async fn to_console() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/` and every page under it: the app.
pub async fn page(headers: HeaderMap) -> Response {
    INDEX.response(&headers)
}

/// `GET /ui/assets/{file}`.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let asset = match file.as_str() {
        "app.js" => &*APP_JS,
        "app.css" => &*APP_CSS,
        _ => return ApiError::NotFound(format!("no console asset {file}")).into_response(),
    };
    asset.response(&headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_paths_are_the_root_and_what_is_under_ui() {
        for open in ["/", "/ui", "/ui/", "/ui/runs/x", "/ui/assets/app.js"] {
            assert!(is_console(open), "{open}");
        }
        for guarded in ["/uix", "/v1/runs", "/ui-secret", "//", "/metrics"] {
            assert!(!is_console(guarded), "{guarded}");
        }
    }

    #[test]
    fn the_policy_allows_no_inline_script_and_nothing_from_elsewhere() {
        assert!(!POLICY.contains("unsafe"));
        assert!(!POLICY.contains("http"));
        assert!(POLICY.contains("script-src 'self'"));
        assert!(POLICY.contains("connect-src 'self'"));
    }
}
