//! Outbound HTTP (`wasi:http`) through the `http-request` example plugin,
//! against servers on 127.0.0.1 that the tests start: the allow-list, other
//! ports, redirects, and the size and count bounds.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::support::{Sandbox, step};

/// What a test server saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// An HTTP/1.1 server on 127.0.0.1 (one thread per connection), answering:
/// - `/json`: `{"hello":"world"}`;
/// - `/bytes/N`: N bytes of `x`;
/// - `/redirect?to=URL`: 302 to URL;
/// - `/echo`: the request as JSON (method, path, headers, body);
/// - anything else: 404.
pub struct TestServer {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl TestServer {
    pub fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let log = log.clone();
                std::thread::spawn(move || serve_one(stream, &log));
            }
        });
        TestServer { port, seen }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve_one(stream: TcpStream, log: &Mutex<Vec<Seen>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let seen = Seen {
        method,
        path: path.clone(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    log.lock().unwrap().push(seen.clone());

    let (status, extra, content_type, body): (&str, String, &str, Vec<u8>) = if path == "/json" {
        (
            "200 OK",
            String::new(),
            "application/json",
            br#"{"hello":"world"}"#.to_vec(),
        )
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap();
        ("200 OK", String::new(), "text/plain", vec![b'x'; n])
    } else if let Some(to) = path.strip_prefix("/redirect?to=") {
        (
            "302 Found",
            format!("location: {to}\r\n"),
            "text/plain",
            Vec::new(),
        )
    } else if path == "/echo" {
        let echo = json!({
            "method": seen.method, "path": seen.path,
            "headers": seen.headers, "body": seen.body,
        });
        (
            "200 OK",
            String::new(),
            "application/json",
            echo.to_string().into_bytes(),
        )
    } else {
        (
            "404 Not Found",
            String::new(),
            "text/plain",
            b"no such path".to_vec(),
        )
    };
    let mut stream = stream;
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{extra}connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&body);
}

/// One `http-request` step with `input` (passed as the run's input) and
/// `allow_hosts`, plus extra step lines; returns the step record.
fn request(input: Value, allow_hosts: &[String], extra: &str) -> Value {
    let workflow = format!(
        "[[step]]\nid = \"call\"\nplugin = \"http-request\"\ninput = \"{{{{ input }}}}\"\nallow_hosts = {}\n{extra}\n",
        serde_json::to_string(allow_hosts).unwrap()
    );
    let sandbox = Sandbox::new();
    let (_, record) = sandbox.run_json(&workflow, Some(&input.to_string()));
    step(&record, "call").clone()
}

fn logs(step: &Value) -> String {
    step["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["logs"].as_array().cloned().unwrap_or_default())
        .map(|line| format!("{}: {}", line["stream"], line["message"].as_str().unwrap()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn an_allowed_host_answers() {
    let server = TestServer::start();
    let allow = [format!("127.0.0.1:{}", server.port)];
    let step = request(json!({ "url": server.url("/json") }), &allow, "");
    assert_eq!(step["status"], "succeeded", "{step:#}");
    let output = &step["output"];
    assert_eq!(output["status"], 200);
    assert_eq!(output["json"], json!({ "hello": "world" }));
    assert_eq!(output["body"], r#"{"hello":"world"}"#);
    assert_eq!(output["headers"]["content-type"], "application/json");
    assert_eq!(output["redirects"], 0);
    assert_eq!(server.requests().len(), 1);
    assert!(logs(&step).contains(&format!("http: GET {} -> 200 OK", server.url("/json"))));
}

#[test]
fn method_headers_and_a_json_body_reach_the_server() {
    let server = TestServer::start();
    let allow = [format!("http://127.0.0.1:{}", server.port)];
    let input = json!({
        "url": server.url("/echo"), "method": "post",
        "headers": { "X-Request-Id": "r-1" }, "body": { "name": "Ada" },
    });
    let step = request(input, &allow, "");
    assert_eq!(step["status"], "succeeded", "{step:#}");
    let echo = &step["output"]["json"];
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["headers"]["x-request-id"], "r-1");
    assert_eq!(echo["headers"]["content-type"], "application/json");
    assert_eq!(echo["body"], r#"{"name":"Ada"}"#);
}

#[test]
fn a_host_not_listed_is_refused_inside_the_guest() {
    let server = TestServer::start();
    // The same server by another name: names are matched as written.
    let allow = [format!("localhost:{}", server.port)];
    let step = request(json!({ "url": server.url("/json") }), &allow, "");
    assert_eq!(step["status"], "failed");
    let error = &step["error"];
    assert_eq!(error["kind"], "task_error");
    assert_eq!(error["retryable"], false);
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("not allowed"), "{message}");
    let logs = logs(&step);
    assert!(
        logs.contains(&format!(
            "http: GET {}: 127.0.0.1:{} is not allowed: the step's `allow_hosts` is [\"localhost:{}\"]",
            server.url("/json"),
            server.port,
            server.port
        )),
        "{logs}"
    );
    assert!(server.requests().is_empty(), "the request went out");
}

#[test]
fn a_step_without_allow_hosts_reaches_nothing() {
    let server = TestServer::start();
    let step = request(json!({ "url": server.url("/json") }), &[], "");
    assert_eq!(step["status"], "failed");
    assert!(logs(&step).contains("is not allowed: the step lists no `allow_hosts`"));
    assert!(server.requests().is_empty());
}

#[test]
fn another_port_of_an_allowed_host_is_refused() {
    let allowed = TestServer::start();
    let other = TestServer::start();
    let allow = [format!("127.0.0.1:{}", allowed.port)];
    let step = request(json!({ "url": other.url("/json") }), &allow, "");
    assert_eq!(step["status"], "failed");
    assert!(
        step["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not allowed")
    );
    assert!(logs(&step).contains(&format!("127.0.0.1:{} is not allowed", other.port)));
    assert!(other.requests().is_empty(), "the other port was reached");
}

#[test]
fn a_redirect_is_followed_only_to_allowed_hosts() {
    let a = TestServer::start();
    let b = TestServer::start();
    let allow = [format!("127.0.0.1:{}", a.port)];

    // To the same host: followed.
    let to_a = a.url(&format!("/redirect?to={}", a.url("/json")));
    let step = request(json!({ "url": to_a }), &allow, "");
    assert_eq!(step["status"], "succeeded", "{step:#}");
    assert_eq!(step["output"]["redirects"], 1);
    assert_eq!(step["output"]["url"], a.url("/json"));
    assert_eq!(step["output"]["json"], json!({ "hello": "world" }));

    // To a host not listed: refused, and the other server sees nothing.
    let to_b = a.url(&format!("/redirect?to={}", b.url("/json")));
    let step = request(json!({ "url": to_b }), &allow, "");
    assert_eq!(step["status"], "failed");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("GET {}: not allowed", b.url("/json"))),
        "{message}"
    );
    assert!(logs(&step).contains(&format!("127.0.0.1:{} is not allowed", b.port)));
    assert!(
        b.requests().is_empty(),
        "the redirect reached a host not listed"
    );
}

#[test]
fn an_oversized_response_is_cut_off_with_a_clear_error() {
    let server = TestServer::start();
    let allow = [format!("127.0.0.1:{}", server.port)];
    let extra = "limits = { http_response_body = \"1KiB\" }";
    let step = request(json!({ "url": server.url("/bytes/100000") }), &allow, extra);
    assert_eq!(step["status"], "failed");
    let message = step["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "reading the response body after 1024 bytes: the response body is over the step's limits.http_response_body: cut off"
        ),
        "{message}"
    );
    assert!(
        logs(&step).contains(
            "the response body is over the step's 1.0 KiB (limits.http_response_body); cut off"
        ),
        "{}",
        logs(&step)
    );
    // Within the limit, the same plugin reads all of it.
    let step = request(json!({ "url": server.url("/bytes/1000") }), &allow, extra);
    assert_eq!(step["status"], "succeeded");
    assert_eq!(step["output"]["body"].as_str().unwrap().len(), 1000);
}

#[test]
fn an_oversized_request_body_is_refused() {
    let server = TestServer::start();
    let allow = [format!("127.0.0.1:{}", server.port)];
    let input = json!({ "url": server.url("/echo"), "method": "POST", "body": "y".repeat(5000) });
    let step = request(input, &allow, "limits = { http_request_body = \"1KiB\" }");
    assert_eq!(step["status"], "failed");
    assert!(
        logs(&step).contains("limits.http_request_body"),
        "{}",
        logs(&step)
    );
    assert!(server.requests().is_empty(), "an oversized body went out");
}

#[test]
fn the_number_of_requests_per_attempt_is_bounded() {
    let server = TestServer::start();
    let allow = [format!("127.0.0.1:{}", server.port)];
    // A redirect is a second request; the step allows one.
    let url = server.url(&format!("/redirect?to={}", server.url("/json")));
    let step = request(
        json!({ "url": url }),
        &allow,
        "limits = { http_requests = 1 }",
    );
    assert_eq!(step["status"], "failed");
    assert!(
        logs(&step)
            .contains("not allowed: the attempt has sent its 1 requests (limits.http_requests)"),
        "{}",
        logs(&step)
    );
    assert_eq!(server.requests().len(), 1);
}

#[test]
fn an_error_status_fails_the_step_and_5xx_would_retry() {
    let server = TestServer::start();
    let allow = [format!("127.0.0.1:{}", server.port)];
    let step = request(json!({ "url": server.url("/missing") }), &allow, "");
    assert_eq!(step["status"], "failed");
    assert_eq!(step["error"]["retryable"], false);
    assert_eq!(
        step["error"]["message"],
        format!("GET {} answered 404: no such path", server.url("/missing"))
    );
    assert_eq!(step["error"]["details"], json!({ "status": 404 }));
    let step = request(
        json!({ "url": server.url("/missing"), "fail_on_status": false }),
        &allow,
        "",
    );
    assert_eq!(step["status"], "succeeded");
    assert_eq!(step["output"]["status"], 404);
}
