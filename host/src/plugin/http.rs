//! Outbound HTTP for plugins: `wasi:http/outgoing-handler`, granted per step.
//!
//! A step reaches only the hosts its `allow_hosts` lists. Everything else fails
//! inside the guest with `HTTP-request-denied`, and the step log says why. The
//! number of requests per attempt and the size of each request and response
//! body are bounded by the step's limits; a response past its bound is cut off
//! with `HTTP-response-body-size`. Redirects are not followed by the host: a
//! guest that follows one sends a new request, which is checked again.
//!
//! Names are matched as written, before DNS: `allow_hosts = ["api.example.com"]`
//! lets a step reach whatever that name resolves to.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::Scheme;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::sandbox::LogSink;
use crate::engine::Limits;
use crate::record::{LogLevel, LogStream};

/// One `allow_hosts` entry: `[scheme://]host[:port]`.
///
/// - `host` is a name or an IP address (`[::1]` for IPv6), `*.example.com`
///   (any subdomain, not `example.com` itself) or `*` (any host);
/// - without a port only the scheme's default port is allowed (80 for http,
///   443 for https), `:*` allows any port;
/// - without a scheme both http and https are allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    scheme: Option<Scheme>,
    host: HostMatch,
    port: PortMatch,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    Exact(String),
    /// `.example.com` for `*.example.com`.
    Subdomain(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortMatch {
    Default,
    Any,
    Exact(u16),
}

/// Why an `allow_hosts` entry does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(String);

impl HostPattern {
    pub fn parse(text: &str) -> Result<HostPattern, PatternError> {
        let bad = |why: &str| PatternError(format!("\"{text}\" {why}"));
        if text.is_empty() {
            return Err(bad("is empty"));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("contains whitespace"));
        }
        let (scheme, rest) = match text.split_once("://") {
            Some(("http", rest)) => (Some(Scheme::HTTP), rest),
            Some(("https", rest)) => (Some(Scheme::HTTPS), rest),
            Some((other, _)) => {
                return Err(bad(&format!(
                    "has scheme \"{other}\"; only http and https are supported"
                )));
            }
            None => (None, text),
        };
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(bad("has a path; write only the host and port"));
        }
        if rest.contains('@') {
            return Err(bad("has user info; write only the host and port"));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (address, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("has an unclosed '['"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("has text after ']'"))?,
                ),
            };
            address
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| bad("has an invalid IPv6 address"))?;
            (HostMatch::Exact(address.to_ascii_lowercase()), port)
        } else {
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            };
            (parse_host(host).map_err(|why| bad(&why))?, port)
        };
        let port = match port {
            None => PortMatch::Default,
            Some("*") => PortMatch::Any,
            Some(port) => match port.parse::<u16>() {
                Ok(0) | Err(_) => {
                    return Err(bad(&format!(
                        "has port \"{port}\"; a port is 1 to 65535, or *"
                    )));
                }
                Ok(port) => PortMatch::Exact(port),
            },
        };
        Ok(HostPattern { scheme, host, port })
    }

    /// Whether a request with this scheme, host and port may be sent.
    pub fn allows(&self, scheme: &Scheme, host: &str, port: u16) -> bool {
        if self.scheme.as_ref().is_some_and(|s| s != scheme) {
            return false;
        }
        let port_ok = match self.port {
            PortMatch::Any => true,
            PortMatch::Exact(p) => p == port,
            PortMatch::Default => default_port(scheme) == Some(port),
        };
        let host = host.trim_end_matches('.');
        let host_ok = match &self.host {
            HostMatch::Any => true,
            HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
            HostMatch::Subdomain(suffix) => {
                host.len() > suffix.len()
                    && host
                        .get(host.len() - suffix.len()..)
                        .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
            }
        };
        port_ok && host_ok
    }
}

fn parse_host(host: &str) -> Result<HostMatch, String> {
    if host == "*" {
        return Ok(HostMatch::Any);
    }
    let (wild, name) = match host.strip_prefix("*.") {
        Some(name) => (true, name),
        None => (false, host),
    };
    if name.is_empty() {
        return Err("has no host".to_owned());
    }
    if name.contains('*') {
        return Err("has '*' inside the host; use \"*.example.com\" or \"*\"".to_owned());
    }
    let valid = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if !valid {
        return Err(format!("has an invalid host name \"{name}\""));
    }
    let name = name.to_ascii_lowercase();
    Ok(if wild {
        HostMatch::Subdomain(format!(".{name}"))
    } else {
        HostMatch::Exact(name)
    })
}

fn default_port(scheme: &Scheme) -> Option<u16> {
    if *scheme == Scheme::HTTP {
        Some(80)
    } else if *scheme == Scheme::HTTPS {
        Some(443)
    } else {
        None
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(scheme) = &self.scheme {
            write!(f, "{scheme}://")?;
        }
        match &self.host {
            HostMatch::Any => f.write_str("*")?,
            HostMatch::Exact(name) if name.contains(':') => write!(f, "[{name}]")?,
            HostMatch::Exact(name) => f.write_str(name)?,
            HostMatch::Subdomain(suffix) => write!(f, "*{suffix}")?,
        }
        match self.port {
            PortMatch::Default => Ok(()),
            PortMatch::Any => f.write_str(":*"),
            PortMatch::Exact(port) => write!(f, ":{port}"),
        }
    }
}

/// The `wasi:http` hooks of one attempt: the allow-list, the request count and
/// the body bounds. Lives in the step's store.
pub(super) struct HttpPolicy {
    allow: Arc<[HostPattern]>,
    sent: u32,
    max_requests: u32,
    max_request_body: u64,
    max_response_body: u64,
    log: LogSink,
}

impl HttpPolicy {
    pub(super) fn new(allow: Arc<[HostPattern]>, limits: &Limits, log: LogSink) -> HttpPolicy {
        HttpPolicy {
            allow,
            sent: 0,
            max_requests: limits.http_requests,
            max_request_body: limits.http_request_body,
            max_response_body: limits.http_response_body,
            log,
        }
    }

    fn refuse(&self, why: String, error: HttpError) -> SendFuture {
        self.log.line(LogStream::Host, LogLevel::Warn, why);
        Box::new(async move { Err(error) })
    }

    /// `None` if allowed, else why not.
    fn check(&self, uri: &http::Uri) -> Option<String> {
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let Some(host) = uri.host() else {
            return Some("the URL has no host".to_owned());
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Some(port) = uri.port_u16().or_else(|| default_port(&scheme)) else {
            return Some(format!("scheme {scheme} is not supported"));
        };
        if self.allow.iter().any(|p| p.allows(&scheme, host, port)) {
            return None;
        }
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Some(if self.allow.is_empty() {
            format!("{target} is not allowed: the step lists no `allow_hosts`")
        } else {
            let list: Vec<String> = self.allow.iter().map(|p| format!("\"{p}\"")).collect();
            format!(
                "{target} is not allowed: the step's `allow_hosts` is [{}]",
                list.join(", ")
            )
        })
    }
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), HttpError>> + Send>,
                ),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for HttpPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        drop(fut);
        let target = format!("{} {}", request.method(), request.uri());
        if let Some(why) = self.check(request.uri()) {
            return self.refuse(
                format!("http: {target}: {why}"),
                HttpError::HttpRequestDenied,
            );
        }
        if self.sent >= self.max_requests {
            return self.refuse(
                format!(
                    "http: {target}: not allowed: the attempt has sent its {} requests (limits.http_requests)",
                    self.max_requests
                ),
                HttpError::HttpRequestDenied,
            );
        }
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(length) = declared.filter(|&n| n > self.max_request_body) {
            return self.refuse(
                format!(
                    "http: {target}: the request body of {} is over the step's {} (limits.http_request_body)",
                    bytesize::ByteSize(length),
                    bytesize::ByteSize(self.max_request_body)
                ),
                HttpError::HttpRequestBodySize(Some(length)),
            );
        }
        self.sent += 1;
        self.log
            .line(LogStream::Host, LogLevel::Debug, format!("http: {target}"));

        let request = request.map(|body| {
            Bounded::wrap(
                body,
                self.max_request_body,
                Side::Request,
                target.clone(),
                self.log.clone(),
            )
        });
        let max_response_body = self.max_response_body;
        let log = self.log.clone();
        Box::new(async move {
            let (response, io) =
                match wasmtime_wasi_http::default_send_request(request, options).await {
                    Ok(sent) => sent,
                    Err(err) => {
                        log.line(
                            LogStream::Host,
                            LogLevel::Warn,
                            format!("http: {target}: {}", describe(&err)),
                        );
                        return Err(err);
                    }
                };
            log.line(
                LogStream::Host,
                LogLevel::Debug,
                format!("http: {target} -> {}", response.status()),
            );
            let response = response.map(|body| {
                Bounded::wrap(
                    body.boxed_unsync(),
                    max_response_body,
                    Side::Response,
                    target,
                    log,
                )
            });
            Ok((
                response,
                Box::new(io) as Box<dyn Future<Output = Result<(), HttpError>> + Send>,
            ))
        })
    }
}

/// What a log line says about a failed request.
fn describe(err: &HttpError) -> String {
    match err {
        HttpError::Connect(io) => format!("cannot connect: {io}"),
        HttpError::ConnectionTimeout => "connection timed out".to_owned(),
        HttpError::Tls(io) => format!("TLS failed: {io}"),
        HttpError::Hyper(e) => format!("HTTP error: {e}"),
        other => format!("{other:?}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Request,
    Response,
}

/// A body that passes its first `max` bytes, then fails.
struct Bounded {
    inner: WasiBody,
    seen: u64,
    max: u64,
    side: Side,
    target: String,
    log: LogSink,
    /// Set when `max` was reached inside a frame: the error the next poll gives.
    over: Option<HttpError>,
}

impl Bounded {
    /// `body`, passing its first `max` bytes, then failing.
    fn wrap(body: WasiBody, max: u64, side: Side, target: String, log: LogSink) -> WasiBody {
        Bounded {
            inner: body,
            seen: 0,
            max,
            side,
            target,
            log,
            over: None,
        }
        .boxed_unsync()
    }
}

impl Body for Bounded {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if let Some(error) = self.over.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let room = self.max - self.seen;
            self.seen += data.len() as u64;
            if self.seen > self.max {
                let (what, limit, error) = match self.side {
                    Side::Request => (
                        "request",
                        "limits.http_request_body",
                        HttpError::HttpRequestBodySize(Some(self.seen)),
                    ),
                    Side::Response => (
                        "response",
                        "limits.http_response_body",
                        HttpError::HttpResponseBodySize(Some(self.seen)),
                    ),
                };
                self.log.line(
                    LogStream::Host,
                    LogLevel::Warn,
                    format!(
                        "http: {}: the {what} body is over the step's {} ({limit}); cut off",
                        self.target,
                        bytesize::ByteSize(self.max)
                    ),
                );
                // What fits goes through, then the stream fails once; later
                // polls end it.
                let kept = data.slice(..room as usize);
                self.max = u64::MAX;
                self.seen = 0;
                self.inner = http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync();
                if kept.is_empty() {
                    return Poll::Ready(Some(Err(error)));
                }
                self.over = Some(error);
                return Poll::Ready(Some(Ok(Frame::data(kept))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(pattern: &str, url: &str) -> bool {
        let pattern = HostPattern::parse(pattern).unwrap();
        let uri: http::Uri = url.parse().unwrap();
        let scheme = uri.scheme().cloned().unwrap();
        let host = uri
            .host()
            .unwrap()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().or_else(|| default_port(&scheme)).unwrap();
        pattern.allows(&scheme, host, port)
    }

    #[test]
    fn host_and_port_must_both_match() {
        assert!(allows("127.0.0.1:9000", "http://127.0.0.1:9000/x"));
        assert!(!allows("127.0.0.1:9000", "http://127.0.0.1:9001/x"));
        assert!(!allows("127.0.0.1:9000", "http://127.0.0.2:9000/x"));
        assert!(allows("127.0.0.1:*", "http://127.0.0.1:1/"));
    }

    #[test]
    fn no_port_means_the_default_port_of_the_scheme() {
        assert!(allows("api.example.com", "https://api.example.com/v1"));
        assert!(allows("api.example.com", "http://api.example.com/v1"));
        assert!(!allows(
            "api.example.com",
            "https://api.example.com:8443/v1"
        ));
        assert!(allows(
            "https://api.example.com",
            "https://API.example.com/"
        ));
        assert!(!allows(
            "https://api.example.com",
            "http://api.example.com/"
        ));
        assert!(!allows(
            "http://api.example.com:443",
            "https://api.example.com/"
        ));
    }

    #[test]
    fn a_wildcard_matches_subdomains_only() {
        assert!(allows("*.example.com", "https://a.example.com/"));
        assert!(allows("*.example.com", "https://a.b.example.com/"));
        assert!(!allows("*.example.com", "https://example.com/"));
        assert!(!allows("*.example.com", "https://badexample.com/"));
        assert!(!allows("*.example.com", "https://example.com.evil.net/"));
        assert!(allows("*", "https://anything.net/"));
        assert!(!allows("*", "https://anything.net:8443/"));
        assert!(allows("*:*", "http://anything.net:8443/"));
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        assert!(allows("[::1]:8080", "http://[::1]:8080/"));
        assert!(!allows("[::1]:8080", "http://[::2]:8080/"));
        assert_eq!(
            HostPattern::parse("[::1]:8080").unwrap().to_string(),
            "[::1]:8080"
        );
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let error = |text: &str| HostPattern::parse(text).unwrap_err().to_string();
        assert_eq!(
            error("http://a.com/path"),
            "\"http://a.com/path\" has a path; write only the host and port"
        );
        assert_eq!(
            error("ftp://a.com"),
            "\"ftp://a.com\" has scheme \"ftp\"; only http and https are supported"
        );
        assert_eq!(
            error("a.com:99999"),
            "\"a.com:99999\" has port \"99999\"; a port is 1 to 65535, or *"
        );
        assert_eq!(
            error("a.*.com"),
            "\"a.*.com\" has '*' inside the host; use \"*.example.com\" or \"*\""
        );
        assert_eq!(
            error("user@a.com"),
            "\"user@a.com\" has user info; write only the host and port"
        );
        assert_eq!(
            error("a..com"),
            "\"a..com\" has an invalid host name \"a..com\""
        );
        assert_eq!(error(""), "\"\" is empty");
        assert_eq!(error("[::1"), "\"[::1\" has an unclosed '['");
    }

    #[test]
    fn patterns_print_as_written() {
        for text in [
            "https://*.example.com:*",
            "127.0.0.1:9000",
            "*",
            "http://a.b",
        ] {
            assert_eq!(HostPattern::parse(text).unwrap().to_string(), text);
        }
    }
}
