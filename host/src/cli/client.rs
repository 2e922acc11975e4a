//! The HTTP client behind `trellis runs`: where the server is, the bearer
//! token, one request at a time, the API's JSON errors, and a run's
//! Server-Sent Events read line by line as they arrive.
//!
//! Boundary: this module knows HTTP and the API's error shape, not what a
//! run looks like; `runs` reads the answers and prints them.
//!
//! Blocking (ureq), on purpose: the command makes one request, waits for it,
//! prints, maybe makes the next. Nothing overlaps, so it needs no async
//! runtime, and `cli::main` calls it before building one.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use ureq::http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use ureq::http::{HeaderValue, Response, Uri};

/// Where `trellis serve` listens out of the box.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";
/// The variable that names the server when `--server` does not.
pub const SERVER_ENV: &str = "TRELLIS_SERVER";
/// The variable that holds the bearer token (the server reads the same one).
pub const TOKEN_ENV: &str = "TRELLIS_AUTH_TOKEN";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The server sends an idle event stream a keep-alive comment every 15 s, so
/// a minute without a byte means it is gone (stopped, paused, cut off); the
/// same bound serves the plain answers, which come at once.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer, and the longest line of an event stream (a
/// `run_finished` carries the whole run record, logs and all): what a
/// broken or hostile server can make the command hold in memory.
const MAX_ANSWER: u64 = 256 * 1024 * 1024;
/// How much of a body that is not the API's JSON error an error message shows.
const EXCERPT: usize = 200;

/// Where the server's URL came from, which an error message says, so that a
/// user who did not set it learns that the default was tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag => f.write_str("given by --server"),
            Origin::Env => write!(f, "from {SERVER_ENV}"),
            Origin::Default => write!(f, "the default: neither --server nor {SERVER_ENV} is set"),
        }
    }
}

/// The server's base URL (`http://host:port`, maybe with a path prefix, no
/// trailing slash) and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    url: String,
    origin: Origin,
}

/// A `--server` or `TRELLIS_SERVER` that is no URL this client can use.
#[derive(Debug, thiserror::Error)]
#[error("{given:?} ({origin}) is not a server URL: {reason}")]
pub struct BadServerUrl {
    given: String,
    origin: Origin,
    reason: &'static str,
}

impl ServerUrl {
    /// `--server`, else `TRELLIS_SERVER` (when not empty), else the default.
    pub fn resolve(flag: Option<&str>, env: Option<&str>) -> Result<ServerUrl, BadServerUrl> {
        let (given, origin) = match (flag, env.filter(|value| !value.trim().is_empty())) {
            (Some(flag), _) => (flag, Origin::Flag),
            (None, Some(env)) => (env, Origin::Env),
            (None, None) => (DEFAULT_SERVER, Origin::Default),
        };
        let bad = |reason| BadServerUrl {
            given: given.to_owned(),
            origin,
            reason,
        };
        let url = given.trim().trim_end_matches('/');
        let uri: Uri = url
            .parse()
            .map_err(|_| bad("write it like http://127.0.0.1:8080"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "this client speaks plain HTTP only; reach an HTTPS server through a local tunnel or proxy",
                ));
            }
            _ => return Err(bad("write it with its scheme, like http://127.0.0.1:8080")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("it names no host; write it like http://127.0.0.1:8080"));
        }
        if uri.query().is_some() {
            return Err(bad("a server URL has no query (`?...`)"));
        }
        Ok(ServerUrl {
            url: url.to_owned(),
            origin,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.url, self.origin)
    }
}

/// A `TRELLIS_AUTH_TOKEN` that cannot go in a header (the message never
/// shows the token).
#[derive(Debug, thiserror::Error)]
#[error(
    "{TOKEN_ENV} holds characters an HTTP header cannot carry (a line break, a control character)"
)]
pub struct BadToken;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused, in the API's shape `{"error": {"code", "message"}}`.
    #[error("{status} {code}: {message}{hint}")]
    Api {
        status: u16,
        code: String,
        message: String,
        /// What the client can add (about the token, for a 401), or empty.
        hint: String,
    },
    /// An error status without the API's JSON: a proxy's page, another
    /// program on that port.
    #[error("{status} from {server} (not the API's JSON error): {excerpt}")]
    Status {
        status: u16,
        server: String,
        excerpt: String,
    },
    /// No connection, or no answer to the request.
    #[error("cannot reach the server at {server}: {cause}")]
    Unreachable { server: ServerUrl, cause: String },
    /// The answer broke off while it was read.
    #[error("the answer from {server} broke off: {cause}")]
    Broken { server: String, cause: String },
    /// A success whose body is not what the API documents.
    #[error("{server} answered {path} with something that is not the API's JSON ({cause})")]
    Unexpected {
        server: String,
        path: String,
        cause: String,
    },
}

/// A success: the body as the server sent it, so that `--json` can print
/// exactly that.
#[derive(Debug)]
pub struct Answer {
    pub body: String,
    server: String,
    path: String,
}

impl Answer {
    /// The body read as `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_str(&self.body).map_err(|error| ClientError::Unexpected {
            server: self.server.clone(),
            path: self.path.clone(),
            cause: error.to_string(),
        })
    }
}

/// A client of one server, with the token if there is one.
pub struct Client {
    agent: ureq::Agent,
    server: ServerUrl,
    authorization: Option<HeaderValue>,
}

impl Client {
    /// `token`: the bearer token, if set and not empty.
    pub fn new(server: ServerUrl, token: Option<&str>) -> Result<Client, BadToken> {
        let authorization = token
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .map(|token| {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| BadToken)?;
                value.set_sensitive(true);
                Ok(value)
            })
            .transpose()?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT))
            .build()
            .into();
        Ok(Client {
            agent,
            server,
            authorization,
        })
    }

    pub fn server(&self) -> &ServerUrl {
        &self.server
    }

    /// `GET path?query`; `query` pairs are percent-encoded.
    pub fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Answer, ClientError> {
        let mut request = self.agent.get(self.url(path));
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        for (name, value) in query {
            request = request.query(*name, value);
        }
        let response = request.call().map_err(|error| self.unreachable(&error))?;
        self.answer(path, response)
    }

    /// `POST path` with a JSON body, or with none (`content-length: 0`).
    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Answer, ClientError> {
        let mut request = self.agent.post(self.url(path));
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        // Always a sized body: an empty *chunked* one may still be on its way
        // when the server answers early (a 401), and hyper then drops the
        // connection (see the e2e harness's `Server::call`).
        let bytes = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                body.to_string().into_bytes()
            }
            None => Vec::new(),
        };
        let response = request
            .send(&bytes[..])
            .map_err(|error| self.unreachable(&error))?;
        self.answer(path, response)
    }

    /// `GET path` as a Server-Sent Events stream, after the event
    /// `last_event_id` if given (`Last-Event-ID`).
    pub fn events(&self, path: &str, last_event_id: Option<u64>) -> Result<Events, ClientError> {
        let mut request = self
            .agent
            .get(self.url(path))
            .header(ACCEPT, "text/event-stream");
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let mut response = request.call().map_err(|error| self.unreachable(&error))?;
        let status = response.status();
        if !status.is_success() {
            let body = self.body(&mut response)?;
            return Err(self.refusal(status.as_u16(), &body));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        if !content_type.starts_with("text/event-stream") {
            return Err(self.unexpected(
                path,
                format!("content-type {content_type:?}, not text/event-stream"),
            ));
        }
        Ok(Events {
            reader: BufReader::new(Box::new(response.into_body().into_reader())),
            server: self.server.url.clone(),
            done: false,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url)
    }

    /// The body of a success, or the error an error status stands for.
    fn answer(
        &self,
        path: &str,
        mut response: Response<ureq::Body>,
    ) -> Result<Answer, ClientError> {
        let status = response.status();
        let body = self.body(&mut response)?;
        if status.is_success() {
            return Ok(Answer {
                body,
                server: self.server.url.clone(),
                path: path.to_owned(),
            });
        }
        Err(self.refusal(status.as_u16(), &body))
    }

    /// The whole body (at most [`MAX_ANSWER`] bytes) as text.
    fn body(&self, response: &mut Response<ureq::Body>) -> Result<String, ClientError> {
        response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|error| ClientError::Broken {
                server: self.server.url.clone(),
                cause: cause(&error),
            })
    }

    /// The API's error in `body`, or the body itself when it is not one.
    fn refusal(&self, status: u16, body: &str) -> ClientError {
        let error = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|value| value.get("error").cloned());
        let field = |name: &str| {
            error
                .as_ref()
                .and_then(|error| error.get(name))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        match (field("code"), field("message")) {
            (Some(code), Some(message)) => ClientError::Api {
                status,
                hint: self.hint(status),
                code,
                message,
            },
            _ => ClientError::Status {
                status,
                server: self.server.url.clone(),
                excerpt: body.trim().chars().take(EXCERPT).collect(),
            },
        }
    }

    /// For a 401: whether a token was sent at all.
    fn hint(&self, status: u16) -> String {
        match (status, &self.authorization) {
            (401, None) => format!(" ({TOKEN_ENV} is not set)"),
            (401, Some(_)) => format!(" (the server refused the token in {TOKEN_ENV})"),
            _ => String::new(),
        }
    }

    fn unreachable(&self, error: &ureq::Error) -> ClientError {
        ClientError::Unreachable {
            server: self.server.clone(),
            cause: cause(error),
        }
    }

    fn unexpected(&self, path: &str, cause: String) -> ClientError {
        ClientError::Unexpected {
            server: self.server.url.clone(),
            path: path.to_owned(),
            cause,
        }
    }
}

/// A transport error in words (ureq's own wording of the common ones is
/// terse: "io: ...").
fn cause(error: &ureq::Error) -> String {
    match error {
        ureq::Error::Io(error) => error.to_string(),
        ureq::Error::Timeout(timeout) => format!("no answer in time ({timeout})"),
        ureq::Error::HostNotFound => "its host name does not resolve".to_owned(),
        ureq::Error::ConnectionFailed => "the connection failed".to_owned(),
        other => other.to_string(),
    }
}

/// One Server-Sent Event: its name (`message` when the server gave none),
/// its `id` if it had a numeric one, and its data as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<u64>,
    pub data: String,
}

/// The events of a stream as they arrive, read a line at a time (never the
/// whole stream). Ends when the server closes the stream; an error (a broken
/// connection, a read timeout) is the last item.
pub struct Events {
    reader: BufReader<Box<dyn Read>>,
    server: String,
    done: bool,
}

impl Events {
    /// The next line without its line ending, or `None` at the end.
    fn line(&mut self) -> Result<Option<String>, ClientError> {
        let mut line = String::new();
        let read = (&mut self.reader)
            .take(MAX_ANSWER)
            .read_line(&mut line)
            .map_err(|error| ClientError::Broken {
                server: self.server.clone(),
                cause: error.to_string(),
            })?;
        if read == 0 {
            return Ok(None);
        }
        if !line.ends_with('\n') && read as u64 == MAX_ANSWER {
            return Err(ClientError::Broken {
                server: self.server.clone(),
                cause: format!("an event is longer than {MAX_ANSWER} bytes"),
            });
        }
        let trimmed = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(trimmed);
        Ok(Some(line))
    }
}

impl Iterator for Events {
    type Item = Result<SseEvent, ClientError>;

    /// As the SSE specification reads a stream: `field: value` lines, an
    /// event per blank line, `:` comments (keep-alives) skipped, `data`
    /// lines joined with a newline, an event cut off by the end dropped.
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let (mut event, mut id, mut data) = (None::<String>, None, None::<String>);
        loop {
            let line = match self.line() {
                Ok(Some(line)) => line,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(error) => {
                    self.done = true;
                    return Some(Err(error));
                }
            };
            if line.is_empty() {
                match data.take() {
                    Some(data) => {
                        return Some(Ok(SseEvent {
                            event: event.unwrap_or_else(|| "message".to_owned()),
                            id,
                            data,
                        }));
                    }
                    None => {
                        event = None;
                        continue;
                    }
                }
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_owned()),
                "id" => id = value.parse().ok(),
                "data" => match &mut data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => data = Some(value.to_owned()),
                },
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &'static str) -> Vec<SseEvent> {
        let stream = Events {
            reader: BufReader::new(Box::new(text.as_bytes())),
            server: "test".to_owned(),
            done: false,
        };
        stream.map(Result::unwrap).collect()
    }

    fn event(name: &str, id: Option<u64>, data: &str) -> SseEvent {
        SseEvent {
            event: name.to_owned(),
            id,
            data: data.to_owned(),
        }
    }

    #[test]
    fn events_are_read_as_the_specification_says() {
        let text = ": keep-alive\n\nevent: log\nid: 2\ndata: {\"a\":1}\n\n\
                    event: run_finished\r\ndata:{}\r\ndata: x\r\n\r\n\
                    data: cut off";
        assert_eq!(
            events(text),
            [
                event("log", Some(2), "{\"a\":1}"),
                event("run_finished", None, "{}\nx"),
            ]
        );
        // No data: no event, and the name does not carry over.
        assert_eq!(
            events("event: lost\n\ndata: 1\n\n"),
            [event("message", None, "1")]
        );
    }

    #[test]
    fn the_server_comes_from_the_flag_then_the_environment_then_the_default() {
        let resolve = |flag, env| ServerUrl::resolve(flag, env).unwrap();
        let flag = resolve(Some("http://a:1/"), Some("http://b:2"));
        assert_eq!((flag.url(), flag.origin()), ("http://a:1", Origin::Flag));
        let env = resolve(None, Some("http://b:2/prefix"));
        assert_eq!(
            (env.url(), env.origin()),
            ("http://b:2/prefix", Origin::Env)
        );
        let default = resolve(None, Some("  "));
        assert_eq!(
            (default.url(), default.origin()),
            (DEFAULT_SERVER, Origin::Default)
        );
        assert_eq!(
            default.to_string(),
            "http://127.0.0.1:8080 (the default: neither --server nor TRELLIS_SERVER is set)"
        );
    }

    #[test]
    fn a_server_url_needs_plain_http_and_a_host() {
        for (bad, reason) in [
            ("localhost:8080", "scheme"),
            ("https://example.com", "plain HTTP"),
            ("ftp://example.com", "scheme"),
            ("http://", "like http"),
            ("http://a:1/?x=1", "query"),
            ("not a url", "like http"),
        ] {
            let error = ServerUrl::resolve(Some(bad), None).unwrap_err().to_string();
            assert!(error.contains(reason), "{bad}: {error}");
            assert!(error.contains("given by --server"), "{bad}: {error}");
        }
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused_without_showing_it() {
        let server = ServerUrl::resolve(None, None).unwrap();
        let error = Client::new(server.clone(), Some("secret\nvalue"))
            .err()
            .unwrap()
            .to_string();
        assert!(!error.contains("secret"), "{error}");
        assert!(
            Client::new(server.clone(), Some("  "))
                .unwrap()
                .authorization
                .is_none()
        );
        assert!(
            Client::new(server, Some("t0k3n"))
                .unwrap()
                .authorization
                .is_some()
        );
    }

    #[test]
    fn an_error_answer_reads_as_status_code_and_message() {
        let server = ServerUrl::resolve(None, None).unwrap();
        let client = Client::new(server, None).unwrap();
        let body = r#"{"error": {"code": "not_found", "message": "no run with id x"}}"#;
        assert_eq!(
            client.refusal(404, body).to_string(),
            "404 not_found: no run with id x"
        );
        let unauthorized = r#"{"error": {"code": "unauthorized", "message": "needs a token"}}"#;
        assert_eq!(
            client.refusal(401, unauthorized).to_string(),
            "401 unauthorized: needs a token (TRELLIS_AUTH_TOKEN is not set)"
        );
        assert_eq!(
            client
                .refusal(502, "<html>Bad gateway</html>\n")
                .to_string(),
            "502 from http://127.0.0.1:8080 (not the API's JSON error): <html>Bad gateway</html>"
        );
    }
}
