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

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::Scheme;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use super::log::LogSink;
use crate::limits::{HostPattern, Limits, default_port};
use crate::record::{LogLevel, LogStream};

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
