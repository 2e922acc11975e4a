//! The API's attack surface, from outside: clients that send their headers
//! or body slowly (or never), more connections than the server serves at
//! once, bodies over the limit without a length, and names that try to climb
//! out of their directory. Each is refused or cut off with its reason, and
//! the server goes on serving everyone else.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

const ECHO: &str = "[[step]]\nid = \"echo\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n";

fn connect(server: &Server) -> TcpStream {
    let address = server.base.strip_prefix("http://").unwrap();
    let stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection (or 30 s pass); what it sent.
fn read_to_close(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(err) => panic!("the server did not close the connection: {err}"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn slow_and_idle_clients_are_cut_off_and_others_are_served_meanwhile() {
    let server = Serve::new()
        .workflow("echo.toml", ECHO)
        .config("header_timeout = \"1s\"\nbody_timeout = \"1s\"\n")
        .start();

    // Headers that never end (slowloris).
    let mut slow_headers = connect(&server);
    slow_headers
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    // A body that never arrives.
    let mut slow_body = connect(&server);
    slow_body
        .write_all(
            b"POST /v1/workflows/echo/runs HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\": ",
        )
        .unwrap();
    // A keep-alive connection that goes quiet after one request.
    let mut idle = connect(&server);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let started = Instant::now();

    // Meanwhile everyone else is served.
    let run = server.post("/v1/workflows/echo/runs?wait=30s", r#"{"n": 1}"#);
    assert_eq!(run.status, 200, "{}", run.body);
    assert_eq!(run.json()["output"], json!({ "echo": { "n": 1 } }));

    let answer = read_to_close(&mut slow_headers);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let answer = read_to_close(&mut slow_body);
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        answer.contains(r#""code":"request_timeout""#),
        "a JSON error: {answer}"
    );
    assert!(
        answer.contains("did not arrive within 1s"),
        "says why: {answer}"
    );
    let answer = read_to_close(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    // Each was cut off by its timeout, not by the test's own 30 s.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "closed after {took:?}");

    // The half-sent run was never started: only the one above exists.
    let runs = server.get("/v1/runs").json();
    assert_eq!(runs["runs"].as_array().unwrap().len(), 1, "{runs:#}");
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn connections_over_the_limit_wait_their_turn() {
    let server = Serve::new()
        .config("max_connections = 2\nheader_timeout = \"2s\"\n")
        .start();
    // Two connections that say nothing hold both slots...
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(&server)).collect();
    for stream in &mut held {
        stream.write_all(b"GET /hea").unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    // ...so a third is answered only once the header timeout frees one.
    let started = Instant::now();
    assert_eq!(server.get("/healthz").status, 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "answered after {waited:?}, while both slots were held"
    );
    for stream in &mut held {
        let answer = read_to_close(stream);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
    }
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn a_chunked_body_over_the_limit_is_refused_without_being_buffered() {
    let server = Serve::new()
        .workflow("echo.toml", ECHO)
        .config("max_body = \"1KiB\"\n")
        .start();
    let mut stream = connect(&server);
    stream
        .write_all(
            b"POST /v1/workflows/echo/runs HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap();
    // 64 KiB in 1 KiB chunks, no Content-Length: the limit is the bytes read.
    let chunk = format!("400\r\n{}\r\n", "1".repeat(1024));
    for _ in 0..64 {
        if stream.write_all(chunk.as_bytes()).is_err() {
            break; // the server answered and closed: fine
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n");
    let answer = read_to_close(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    let runs = server.get("/v1/runs").json();
    assert_eq!(runs["runs"], json!([]), "nothing was started");
}

#[test]
fn names_cannot_climb_out_of_their_directories() {
    let server = Serve::new()
        .own_plugin_dir(&[])
        .workflow("echo.toml", ECHO)
        // A file whose name is no workflow name: listed with the reason.
        .workflow("my flow.toml", ECHO)
        .start();
    let outside = server.workflow_dir().parent().unwrap().to_owned();
    let before = tree(&outside);

    let bad_request = (400, "invalid_request");
    let toml = [("content-type", "application/toml")];
    let wasm = [("content-type", "application/wasm")];
    let cases: &[Case] = &[
        (
            "PUT",
            "/v1/workflows/..%2Fescaped",
            &toml,
            ECHO.as_bytes(),
            bad_request,
        ),
        (
            "PUT",
            "/v1/workflows/..%2F..%2Ftmp%2Fx",
            &toml,
            ECHO.as_bytes(),
            bad_request,
        ),
        (
            "PUT",
            "/v1/workflows/..",
            &toml,
            ECHO.as_bytes(),
            bad_request,
        ),
        (
            "PUT",
            "/v1/workflows/%2e%2e",
            &toml,
            ECHO.as_bytes(),
            bad_request,
        ),
        (
            "PUT",
            "/v1/workflows/a%00b",
            &toml,
            ECHO.as_bytes(),
            bad_request,
        ),
        (
            "PUT",
            "/v1/workflows/%C3%A9t%C3%A9",
            &toml,
            ECHO.as_bytes(),
            bad_request,
        ),
        (
            "PUT",
            &format!("/v1/workflows/{}", "x".repeat(129)),
            &toml,
            ECHO.as_bytes(),
            bad_request,
        ),
        ("PUT", "/v1/plugins/..%2Fnoop", &wasm, b"\0asm", bad_request),
        ("PUT", "/v1/plugins/..", &wasm, b"\0asm", bad_request),
        ("PUT", "/v1/plugins/NOOP", &wasm, b"\0asm", bad_request),
        (
            "DELETE",
            "/v1/plugins/..%2F..%2Fplugins",
            &[],
            b"",
            bad_request,
        ),
        ("DELETE", "/v1/plugins/no%20such", &[], b"", bad_request),
        (
            "GET",
            "/v1/workflows/..%2Fecho",
            &[],
            b"",
            (404, "not_found"),
        ),
        (
            "POST",
            "/v1/workflows/..%2Fecho/runs",
            &[],
            b"{}",
            (404, "not_found"),
        ),
        ("GET", "/v1/runs/..%2F..%2Fdata", &[], b"", bad_request),
    ];
    for (method, path, headers, body, (status, code)) in cases {
        let body = (!body.is_empty()).then_some(*body);
        let reply = server.call(method, path, headers, body);
        let what = format!("{method} {path}");
        assert_eq!(
            (
                reply.status,
                reply.json()["error"]["code"].as_str().unwrap_or("")
            ),
            (*status, *code),
            "{what}: {}",
            reply.body
        );
    }
    // Nothing was written anywhere.
    assert_eq!(tree(&outside), before);

    // The oddly named file is listed, refused with its reason.
    let listed = server.get("/v1/workflows").json();
    let odd = listed["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "my flow")
        .unwrap_or_else(|| panic!("{listed:#}"));
    assert_eq!(odd["valid"], false, "{odd:#}");
    assert!(
        odd.to_string().contains("rename the file"),
        "says what to do: {odd:#}"
    );
    // And the server is fine.
    let run = server.post("/v1/workflows/echo/runs?wait=30s", "{}");
    assert_eq!(run.status, 200, "{}", run.body);
}

/// A request (method, path, headers, body) and the status and code it gets.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    &'a [u8],
    (u16, &'a str),
);

/// Every path under `dir`, with its size: what a request may not change.
fn tree(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let name = path.display().to_string();
            // The data dir changes on its own (SQLite's WAL, the cache).
            if name.contains("/data") {
                continue;
            }
            if meta.is_dir() {
                stack.push(path);
            }
            found.push((name, meta.len()));
        }
    }
    found.sort();
    found
}
