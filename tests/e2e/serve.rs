//! `trellis serve`: the HTTP API driven over a socket, like a client would.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;
// Every route the router serves, as the OpenAPI document must list them.
use trellis::api::ROUTES;

/// Returns its input.
const ECHO: &str = "[[step]]\nid = \"echo\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n";

/// Sleeps `input.ms` (default 300) in one step.
const NAP: &str = r#"
[limits]
timeout = "120s"

[[step]]
id = "nap"
plugin = "sleep"
input = { ms = "{{ input.ms | default(300) }}" }
"#;

/// Logs `sleeping N ms` once under way, then sleeps `input.ms`.
const PROBE_NAP: &str = r#"
[limits]
timeout = "120s"

[[step]]
id = "nap"
plugin = "probe"
input = { sleep_ms = "{{ input.ms }}" }
"#;

/// Logs one line.
const LOGS: &str = r#"
[[step]]
id = "probe"
plugin = "probe"
input = { logs = [["info", "hello from the probe"]] }
"#;

const NO_SUCH_RUN: &str = "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b";

fn id_of(run: &Value) -> String {
    run["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_triggered_run_with_wait_answers_with_the_finished_run() {
    let server = Serve::new()
        .workflow("echo.toml", ECHO)
        .args(&[
            "--workflow-dir",
            workspace().join("workflows").to_str().unwrap(),
        ])
        .start();

    let reply = server.post("/v1/workflows/echo/runs?wait=30s", r#"{"who": "world"}"#);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let run = reply.json();
    assert_eq!(run["status"], "succeeded");
    assert_eq!(run["workflow"], "echo");
    assert_eq!(run["input"], json!({ "who": "world" }));
    assert_eq!(run["output"], json!({ "echo": { "who": "world" } }));
    assert_eq!(step(&run, "echo")["status"], "succeeded");
    assert_eq!(
        reply.header("location"),
        Some(format!("/v1/runs/{}", id_of(&run)).as_str())
    );
    // The same record afterwards.
    assert_eq!(server.get(&format!("/v1/runs/{}", id_of(&run))).json(), run);

    // The example pipeline (no body: input `{}`), as workflows/EXPECTED.md says.
    let reply = server.call(
        "POST",
        "/v1/workflows/order-pipeline/runs?wait=30s",
        &[],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let run = reply.json();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(
        run["output"],
        json!({
            "order_id": "A-1001",
            "total": 133.4,
            "currency": "EUR",
            "approval": "succeeded",
            "note": "Order A-1001 from Ada Lovelace comes to 133.4 EUR, over the 100 EUR limit: a manager must approve it before it ships.",
            "receipt": "A-1001-4b47d94774c7"
        })
    );
}

#[test]
fn a_triggered_run_is_accepted_then_polled_to_the_end() {
    let server = Serve::new().workflow("nap.toml", NAP).start();
    let reply = server.post("/v1/workflows/nap/runs", r#"{"ms": 400}"#);
    assert_eq!(reply.status, 202, "{}", reply.body);
    let accepted = reply.json();
    assert!(
        ["queued", "running"].contains(&accepted["status"].as_str().unwrap()),
        "{accepted:#}"
    );
    let location = reply.header("location").unwrap().to_owned();
    assert_eq!(location, format!("/v1/runs/{}", id_of(&accepted)));

    let run = server.wait_for_run(&id_of(&accepted));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], json!({ "nap": { "slept_ms": 400 } }));
    assert_eq!(server.get(&location).json(), run);

    // `?wait` shorter than the run: 202 with the run as it stands.
    let reply = server.post("/v1/workflows/nap/runs?wait=100ms", r#"{"ms": 1500}"#);
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert!(
        ["queued", "running"].contains(&reply.json()["status"].as_str().unwrap()),
        "{}",
        reply.body
    );
}

#[test]
fn runs_are_listed_newest_first_a_page_at_a_time() {
    let server = Serve::new()
        .workflow("pager.toml", ECHO)
        .workflow(
            "other.toml",
            "[[step]]\nid = \"maybe\"\nplugin = \"fail\"\ninput = \"{{ input }}\"\n",
        )
        .start();
    let mut created = Vec::new();
    for n in 0..7 {
        let reply = server.post(
            "/v1/workflows/pager/runs?wait=30s",
            &format!(r#"{{"n": {n}}}"#),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        created.push(id_of(&reply.json()));
    }
    let failed = server.post("/v1/workflows/other/runs?wait=30s", r#"{"message": "no"}"#);
    assert_eq!(failed.json()["status"], "failed", "{}", failed.body);
    let succeeded = server.post(
        "/v1/workflows/other/runs?wait=30s",
        r#"{"succeed_on_attempt": 1}"#,
    );
    assert_eq!(
        succeeded.json()["status"],
        "succeeded",
        "{}",
        succeeded.body
    );

    // Pages of 3 over the 7 `pager` runs: 3, 3, 1, each newest first.
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut path = "/v1/runs?workflow=pager&limit=3".to_owned();
    loop {
        let page = server.get(&path);
        assert_eq!(page.status, 200, "{}", page.body);
        let page = page.json();
        let runs = page["runs"].as_array().unwrap();
        sizes.push(runs.len());
        for run in runs {
            assert_eq!(run["workflow"], "pager");
            assert_eq!(run["status"], "succeeded");
            assert_eq!(run["steps"], json!([]), "pages carry no step details");
            seen.push(id_of(run));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/runs?workflow=pager&limit=3&cursor={cursor}"),
            None => {
                assert_eq!(page["next_cursor"], Value::Null);
                break;
            }
        }
    }
    assert_eq!(sizes, [3, 3, 1]);
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    // Filters.
    let all = server.get("/v1/runs").json();
    assert_eq!(all["runs"].as_array().unwrap().len(), 9);
    assert_eq!(all["next_cursor"], Value::Null);
    let only_failed = server.get("/v1/runs?status=failed").json();
    let only_failed = only_failed["runs"].as_array().unwrap();
    assert_eq!(only_failed.len(), 1);
    assert_eq!(id_of(&only_failed[0]), id_of(&failed.json()));
    let other_ok = server
        .get("/v1/runs?workflow=other&status=succeeded")
        .json();
    let other_ok = other_ok["runs"].as_array().unwrap();
    assert_eq!(other_ok.len(), 1);
    assert_eq!(id_of(&other_ok[0]), id_of(&succeeded.json()));
    let none = server.get("/v1/runs?workflow=pager&status=failed").json();
    assert_eq!(none, json!({ "runs": [], "next_cursor": null }));
}

#[test]
fn cancel_stops_a_running_step_at_once() {
    let server = Serve::new().workflow("nap.toml", PROBE_NAP).start();
    // A minute of sleep, under a two-minute timeout; cancelled once the
    // plugin says it sleeps.
    let accepted = server
        .post("/v1/workflows/nap/runs", r#"{"ms": 60000}"#)
        .json();
    let id = id_of(&accepted);
    server.await_log(&id, "nap", "sleeping", 1);

    let asked = Instant::now();
    let reply = server.post(&format!("/v1/runs/{id}/cancel"), "");
    let took = asked.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let run = reply.json();
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(step(&run, "nap")["status"], "cancelled", "{run:#}");
    assert!(took < Duration::from_secs(5), "cancel took {took:?}");
    assert_eq!(
        server.get(&format!("/v1/runs/{id}")).json()["status"],
        "cancelled"
    );

    // Finished runs cannot be cancelled (again).
    let again = server.post(&format!("/v1/runs/{id}/cancel"), "");
    let body = again.assert_error(409, "run_finished");
    assert_eq!(body["error"]["details"]["status"], "cancelled");
    let done = server
        .post("/v1/workflows/nap/runs?wait=30s", r#"{"ms": 1}"#)
        .json();
    let body = server
        .post(&format!("/v1/runs/{}/cancel", id_of(&done)), "")
        .assert_error(409, "run_finished");
    assert_eq!(body["error"]["details"]["status"], "succeeded");
}

#[test]
fn a_late_subscriber_gets_the_whole_run_replayed() {
    let server = Serve::new().workflow("logs.toml", LOGS).start();
    let run = server.post("/v1/workflows/logs/runs?wait=30s", "{}").json();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let id = id_of(&run);

    let events = server.events(&id, &[]);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["step_started", "log", "step_finished", "run_finished"]
    );
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event.id, Some(n as u64 + 1));
        assert_eq!(event.data["seq"], n as u64 + 1);
        assert_eq!(event.data["type"], event.event);
    }
    assert_eq!(events[0].data["step"], "probe");
    assert_eq!(events[0].data["attempt"], 1);
    assert_eq!(events[1].data["step"], "probe");
    assert_eq!(events[1].data["line"]["message"], "hello from the probe");
    assert_eq!(events[1].data["line"]["level"], "info");
    assert_eq!(events[2].data["step"]["id"], "probe");
    assert_eq!(events[2].data["step"]["status"], "succeeded");
    assert_eq!(events[3].data["run"]["id"], id);
    assert_eq!(events[3].data["run"]["status"], "succeeded");
    assert_eq!(events[3].data["run"]["output"], run["output"]);

    // `Last-Event-ID` resumes after that event.
    let rest = server.events(&id, &[("last-event-id", "2")]);
    let names: Vec<&str> = rest.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["step_finished", "run_finished"]);
    assert_eq!(rest[0].id, Some(3));

    server
        .call("GET", &format!("/v1/runs/{NO_SUCH_RUN}/events"), &[], None)
        .assert_error(404, "not_found");
}

/// `nap` calls a server the test holds back: it cannot finish before the
/// test has received its `step_started` event, so receiving that event at
/// all proves the stream is live (a stream replayed at the end would leave
/// the run waiting at the gate until the gate gives up).
#[test]
fn a_live_run_streams_its_events_as_they_happen() {
    let gate = Gate::start();
    let server = Serve::new()
        .workflow(
            "live.toml",
            &format!(
                r#"
[[step]]
id = "first"
plugin = "probe"
input = {{ logs = [["info", "one"]] }}

[[step]]
id = "nap"
plugin = "http-request"
needs = ["first"]
input = {{ url = "{}" }}
allow_hosts = ["{}"]

[[step]]
id = "last"
plugin = "probe"
needs = ["nap"]
input = {{ logs = [["warn", "two"]] }}
"#,
                gate.url("/held"),
                gate.host()
            ),
        )
        .start();
    let accepted = server.post("/v1/workflows/live/runs", "{}");
    assert_eq!(accepted.status, 202, "{}", accepted.body);
    let id = id_of(&accepted.json());

    let mut events = Vec::new();
    let mut opened_after = None;
    for event in server.event_stream(&id, &[]) {
        let nap_started = event.event == "step_started" && event.data["step"] == "nap";
        events.push(event);
        if nap_started {
            // Received while `nap` is held at the gate: live.
            opened_after = Some(events.len());
            gate.open();
        }
    }
    assert!(!gate.timed_out(), "`nap` waited at the gate for a minute");
    assert_eq!(
        opened_after,
        Some(4),
        "the gate opened after {opened_after:?} events"
    );
    let described: Vec<String> = events
        .iter()
        .map(|e| {
            let step = match &e.data["step"] {
                Value::String(id) => id.clone(),
                Value::Object(step) => step["id"].as_str().unwrap().to_owned(),
                _ => String::new(),
            };
            format!("{} {step}", e.event).trim().to_owned()
        })
        .collect();
    assert_eq!(
        described,
        [
            "step_started first",
            "log first",
            "step_finished first",
            "step_started nap",
            // The request and its answer, in the step's log as they happen.
            "log nap",
            "log nap",
            "step_finished nap",
            "step_started last",
            "log last",
            "step_finished last",
            "run_finished",
        ]
    );
    // No gaps, no repeats.
    for (n, event) in events.iter().enumerate() {
        assert_eq!(event.id, Some(n as u64 + 1), "{described:?}");
    }
    let request = events[4].data["line"]["message"].as_str().unwrap();
    assert!(request.starts_with("http: GET"), "{request}");
    assert_eq!(events[6].data["step"]["output"]["json"]["path"], "/held");
    assert_eq!(events[8].data["line"]["message"], "two");
    assert_eq!(events[10].data["run"]["status"], "succeeded");
}

#[test]
fn an_idempotency_key_starts_a_run_once_per_workflow() {
    let server = Serve::new()
        .workflow("echo.toml", ECHO)
        .workflow("nap.toml", NAP)
        .start();
    let key = [
        ("content-type", "application/json"),
        ("idempotency-key", "order-42"),
    ];
    let first = server.call(
        "POST",
        "/v1/workflows/echo/runs",
        &key,
        Some(br#"{"n": 1}"#),
    );
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.header("idempotent-replayed"), None);
    let second = server.call(
        "POST",
        "/v1/workflows/echo/runs",
        &key,
        Some(br#"{"n": 2}"#),
    );
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(id_of(&second.json()), id_of(&first.json()));
    assert_eq!(
        second.json()["input"],
        json!({ "n": 1 }),
        "the first run's input"
    );
    assert_eq!(second.header("location"), first.header("location"));

    // The same key on another workflow is another run.
    let other = server.call(
        "POST",
        "/v1/workflows/nap/runs",
        &key,
        Some(br#"{"ms": 1}"#),
    );
    assert_eq!(other.status, 202, "{}", other.body);
    assert_ne!(id_of(&other.json()), id_of(&first.json()));

    // Only one `echo` run exists.
    let listed = server.get("/v1/runs?workflow=echo").json();
    assert_eq!(listed["runs"].as_array().unwrap().len(), 1);

    let long = "k".repeat(256);
    server
        .call(
            "POST",
            "/v1/workflows/echo/runs",
            &[("idempotency-key", &long)],
            Some(b"{}"),
        )
        .assert_error(400, "invalid_request");
}

#[test]
fn input_that_fails_the_workflow_schema_is_refused_with_its_paths() {
    let server = Serve::new()
        .workflow(
            "typed.toml",
            r#"
[input]
description = "An order line"
schema = { type = "object", required = ["sku", "qty"], properties = { sku = { type = "string" }, qty = { type = "integer", minimum = 1 } } }

[[step]]
id = "echo"
plugin = "noop"
input = "{{ input }}"
"#,
        )
        .start();
    let reply = server.post("/v1/workflows/typed/runs", r#"{"qty": 0}"#);
    let body = reply.assert_error(422, "invalid_input");
    let details = body["error"]["details"].as_array().unwrap();
    let paths: BTreeSet<&str> = details
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, BTreeSet::from(["", "/qty"]), "{body:#}");
    for detail in details {
        assert!(!detail["message"].as_str().unwrap().is_empty(), "{body:#}");
    }
    let missing = details.iter().find(|d| d["path"] == "").unwrap();
    assert!(
        missing["message"].as_str().unwrap().contains("sku"),
        "{body:#}"
    );

    // Nothing was stored.
    assert_eq!(server.get("/v1/runs").json()["runs"], json!([]));

    let ok = server.post(
        "/v1/workflows/typed/runs?wait=30s",
        r#"{"sku": "A", "qty": 2}"#,
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        ok.json()["output"],
        json!({ "echo": { "sku": "A", "qty": 2 } })
    );

    let workflow = server.get("/v1/workflows/typed").json();
    assert_eq!(workflow["input_schema"]["required"], json!(["sku", "qty"]));
}

#[test]
fn a_token_guards_every_route_but_healthz() {
    let mut server = Serve::new()
        .workflow("echo.toml", ECHO)
        .env("TRELLIS_AUTH_TOKEN", "let-me-in")
        .start();
    for (method, path) in ROUTES {
        let path = path.replace("{name}", "echo").replace("{id}", NO_SUCH_RUN);
        let reply = server.call(method, &path, &[], None);
        if path == "/healthz" {
            assert_eq!(reply.status, 200);
            assert_eq!(reply.json(), json!({ "status": "ok" }));
        } else {
            reply.assert_error(401, "unauthorized");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        }
        for wrong in [
            "Bearer let-me-i",
            "Bearer let-me-inn",
            "let-me-in",
            "Basic let-me-in",
        ] {
            let reply = server.call(method, &path, &[("authorization", wrong)], None);
            if path != "/healthz" {
                reply.assert_error(401, "unauthorized");
            }
        }
    }
    let reply = server.call(
        "GET",
        "/v1/workflows",
        &[("authorization", "Bearer let-me-in")],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);

    server.token = Some("let-me-in".to_owned());
    let run = server.post("/v1/workflows/echo/runs?wait=30s", "[1]");
    assert_eq!(run.status, 200, "{}", run.body);
    assert_eq!(run.json()["output"], json!({ "echo": [1] }));
    assert_eq!(server.events(&id_of(&run.json()), &[]).len(), 3);
    assert_eq!(server.get("/healthz").status, 200);
}

#[test]
fn without_a_token_everything_is_open_on_loopback() {
    let server = Serve::new().workflow("echo.toml", ECHO).start();
    assert!(
        server.base.starts_with("http://127.0.0.1:"),
        "{}",
        server.base
    );
    assert_eq!(server.get("/v1/workflows").status, 200);
    assert_eq!(server.get("/v1/plugins").status, 200);
    assert_eq!(
        server.post("/v1/workflows/echo/runs?wait=30s", "{}").status,
        200
    );
}

#[test]
fn an_open_bind_needs_a_token() {
    let outcome = Serve::new().bind("0.0.0.0:0").exec();
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(
            "refusing to listen on 0.0.0.0:0 without an auth token: set auth_token in trellis.toml or TRELLIS_AUTH_TOKEN, or bind 127.0.0.1"
        ),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("listening"), "{}", outcome.stderr);

    // With one it starts.
    let server = Serve::new()
        .bind("0.0.0.0:0")
        .config("auth_token = \"open-sesame\"\n")
        .start();
    assert!(
        server.base.starts_with("http://0.0.0.0:"),
        "{}",
        server.base
    );
}

#[test]
fn bad_requests_get_json_errors_and_hurt_nothing() {
    let server = Serve::new()
        .workflow("echo.toml", ECHO)
        .workflow(
            "broken.toml",
            "[[step]]\nid = \"x\"\nplugin = \"no-such-plugin\"\n",
        )
        .config("max_body = \"1KiB\"\n")
        .start();
    let finished = server.post("/v1/workflows/echo/runs?wait=30s", "{}").json();
    let finished = id_of(&finished);
    // Each refusal: a JSON error with its status and code, never a 5xx.
    let check = |method: &str,
                 path: &str,
                 content_type: Option<&str>,
                 body: &[u8],
                 expected: (u16, &str)| {
        let headers: Vec<(&str, &str)> = content_type
            .map(|t| ("content-type", t))
            .into_iter()
            .collect();
        let body = (!body.is_empty()).then_some(body);
        let reply = server.call(method, path, &headers, body);
        assert!(
            reply.status < 500,
            "{method} {path}: {} {}",
            reply.status,
            reply.body
        );
        let error = reply.assert_error(expected.0, expected.1);
        if expected.1 == "invalid_json" {
            let details = &error["error"]["details"];
            assert!(
                details["line"].as_u64().unwrap() >= 1,
                "{method} {path}: {error}"
            );
            assert!(details["column"].is_u64(), "{method} {path}: {error}");
        }
    };
    const JSON: Option<&str> = Some("application/json");
    const TOML: Option<&str> = Some("application/toml");
    let trigger = "/v1/workflows/echo/runs";
    let bad_json = (400, "invalid_json");
    let bad_request = (400, "invalid_request");
    let not_found = (404, "not_found");
    let wrong_method = (405, "method_not_allowed");
    let too_large = (413, "payload_too_large");
    let wrong_type = (415, "unsupported_media_type");

    check("POST", trigger, JSON, b"{\"a\": [1,", bad_json);
    check("POST", trigger, JSON, b"{'a': 1}", bad_json);
    check("POST", trigger, JSON, "[".repeat(600).as_bytes(), bad_json);
    check("POST", trigger, JSON, &[b'"', 0xff, 0xfe, b'"'], bad_json);
    check("POST", trigger, Some("text/plain"), b"{}", wrong_type);
    check(
        "POST",
        trigger,
        Some("application/x-www-form-urlencoded"),
        b"a=1",
        wrong_type,
    );
    let big = format!("[{}1]", "1,".repeat(1024));
    check("POST", trigger, JSON, big.as_bytes(), too_large);
    let big = format!("# {}", "x".repeat(2048));
    check("PUT", "/v1/workflows/big", TOML, big.as_bytes(), too_large);
    check("POST", "/v1/workflows/nope/runs", JSON, b"{}", not_found);
    check(
        "POST",
        "/v1/workflows/broken/runs",
        JSON,
        b"{}",
        (409, "workflow_invalid"),
    );
    check("GET", "/v1/workflows/nope", None, b"", not_found);
    check(
        "GET",
        &format!("/v1/runs/{NO_SUCH_RUN}"),
        None,
        b"",
        not_found,
    );
    check(
        "POST",
        &format!("/v1/runs/{NO_SUCH_RUN}/cancel"),
        None,
        b"",
        not_found,
    );
    check("GET", "/v1/runs/not-a-run-id", None, b"", bad_request);
    check("GET", "/v1/runs/%FF%FE", None, b"", bad_request);
    check("POST", "/v1/runs/42/cancel", None, b"", bad_request);
    check(
        "GET",
        "/v1/runs/..%2F..%2Fetc/events",
        None,
        b"",
        bad_request,
    );
    for wait in ["soon", "10", "1h", "-1s"] {
        check(
            "POST",
            &format!("{trigger}?wait={wait}"),
            JSON,
            b"{}",
            bad_request,
        );
    }
    check(
        "POST",
        &format!("/v1/runs/{finished}/cancel"),
        None,
        b"",
        (409, "run_finished"),
    );
    for query in [
        "status=finished",
        "limit=-1",
        "limit=0",
        "limit=100000",
        "cursor=%00%01",
        "cursor=00ff",
        "pge=2",
    ] {
        check("GET", &format!("/v1/runs?{query}"), None, b"", bad_request);
    }
    let reply = server.call(
        "GET",
        &format!("/v1/runs/{finished}/events"),
        &[("last-event-id", "later")],
        None,
    );
    reply.assert_error(400, "invalid_request");
    check("PUT", "/v1/workflows/a%20b", TOML, b"[[step]]", bad_request);
    check(
        "PUT",
        "/v1/workflows/junk",
        TOML,
        b"this is = = not toml",
        (422, "invalid_workflow"),
    );
    check("PUT", "/v1/workflows/junk", JSON, b"{}", wrong_type);
    check("GET", "/v2/runs", None, b"", not_found);
    // (`GET /` redirects to the console.)
    check("GET", "/nothing", None, b"", not_found);
    check(
        "DELETE",
        &format!("/v1/runs/{finished}"),
        None,
        b"",
        wrong_method,
    );
    check("GET", trigger, None, b"", wrong_method);
    check("PATCH", "/healthz", None, b"", wrong_method);

    let error = server
        .post("/v1/workflows/echo/runs", "{\n  \"a\": [1,, 2]\n}")
        .assert_error(400, "invalid_json");
    assert_eq!(
        error["error"]["details"],
        json!({ "line": 2, "column": 11 })
    );
    let error = server
        .post("/v1/workflows/broken/runs", "{}")
        .assert_error(409, "workflow_invalid");
    assert!(
        error["error"]["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-plugin"),
        "{error}"
    );

    // The server is fine, and nothing it accepted was lost.
    assert_eq!(server.get("/healthz").status, 200);
    let run = server.post("/v1/workflows/echo/runs?wait=30s", r#"{"still": "ok"}"#);
    assert_eq!(run.status, 200, "{}", run.body);
    assert_eq!(run.json()["output"], json!({ "echo": { "still": "ok" } }));
    let listed = server.get("/v1/runs").json();
    assert_eq!(listed["runs"].as_array().unwrap().len(), 2, "{listed:#}");
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}

#[test]
fn metrics_count_finished_runs() {
    let server = Serve::new().workflow("metered.toml", ECHO).start();
    const RUNS: usize = 20;
    for n in 1..=RUNS {
        let run = server.post("/v1/workflows/metered/runs?wait=30s", "{}");
        assert_eq!(run.json()["status"], "succeeded");
        // A client that holds its finished run never sees it still in flight.
        let metrics = server.get("/metrics").body;
        assert!(
            metrics.contains("trellis_runs_in_flight 0"),
            "after run {n}:\n{metrics}"
        );
    }
    let reply = server.get("/metrics");
    assert_eq!(reply.status, 200);
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        reply.headers
    );
    let line = reply
        .body
        .lines()
        .find(|line| {
            line.starts_with(r#"trellis_runs_total{workflow="metered",status="succeeded"}"#)
        })
        .unwrap_or_else(|| panic!("no trellis_runs_total:\n{}", reply.body));
    assert!(line.ends_with(&format!(" {RUNS}")), "{line}");
    assert!(
        reply.body.contains("# TYPE trellis_runs_total counter"),
        "{}",
        reply.body
    );
    assert!(
        reply
            .body
            .contains("trellis_step_duration_seconds_bucket{plugin=\"noop\""),
        "{}",
        reply.body
    );
    assert!(
        reply.body.contains("trellis_runs_in_flight 0"),
        "{}",
        reply.body
    );
}

#[test]
fn the_openapi_document_lists_every_route() {
    let server = Serve::new().workflow("echo.toml", ECHO).start();
    let reply = server.get("/v1/openapi.json");
    assert_eq!(reply.status, 200);
    let document = reply.json();
    assert!(document["openapi"].as_str().unwrap().starts_with("3."));
    assert!(document["info"]["title"].is_string());
    let paths = document["paths"].as_object().unwrap();
    for (method, path) in ROUTES {
        let operation = &paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is not in the document"))[method.to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {path} is not in the document"
        );
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty()),
            "{method} {path}"
        );
        // And the server does serve it (whatever it answers, not "no route").
        let concrete = path.replace("{name}", "echo").replace("{id}", NO_SUCH_RUN);
        let served = server.call(method, &concrete, &[], None);
        assert!(
            served.status != 405 && !served.body.contains("\"no route"),
            "{method} {path}: {} {}",
            served.status,
            served.body
        );
    }
    let documented: usize = paths
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        documented,
        ROUTES.len(),
        "the document has routes this list lacks"
    );
    // Request and response schemas are there, resolvable.
    let schemas = document["components"]["schemas"].as_object().unwrap();
    let trigger = &paths["/v1/workflows/{name}/runs"]["post"];
    assert!(
        trigger["requestBody"]["content"]["application/json"].is_object(),
        "{trigger:#}"
    );
    for status in [
        "200", "202", "400", "404", "409", "413", "415", "422", "503",
    ] {
        let schema = &trigger["responses"][status]["content"]["application/json"]["schema"]["$ref"];
        let name = schema
            .as_str()
            .unwrap_or_else(|| panic!("{status}: {trigger:#}"));
        let name = name.strip_prefix("#/components/schemas/").unwrap();
        assert!(schemas.contains_key(name), "{name}");
    }
    for name in [
        "RunRecord",
        "StepRecord",
        "AttemptRecord",
        "RunStatus",
        "RunList",
        "RunEvent",
        "ErrorBody",
        "WorkflowList",
        "WorkflowDetail",
        "PluginList",
    ] {
        assert!(schemas.contains_key(name), "no schema {name}");
    }
    let record = &schemas["RunRecord"]["properties"];
    for field in [
        "id",
        "workflow",
        "status",
        "input",
        "output",
        "steps",
        "created_at",
    ] {
        assert!(record[field].is_object(), "RunRecord.{field}");
    }
}

/// Every key of the record at run, step and attempt level.
fn shape(record: &Value) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let keys = |value: &Value| -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    };
    let steps = record["steps"].as_array().unwrap();
    let step_keys = steps.iter().flat_map(keys).collect();
    let attempt_keys = steps
        .iter()
        .flat_map(|s| s["attempts"].as_array().unwrap().iter().flat_map(keys))
        .collect();
    (keys(record), step_keys, attempt_keys)
}

#[test]
fn a_run_over_http_has_the_same_record_as_the_command_line() {
    let workflow = r#"
[[step]]
id = "first"
plugin = "probe"
input = { logs = [["info", "hi"]] }

[[step]]
id = "second"
plugin = "noop"
input = "{{ steps.first.output.ctx.step_id }}"
"#;
    let server = Serve::new().workflow("same.toml", workflow).start();
    let over_http = server
        .post("/v1/workflows/same/runs?wait=30s", r#"{"x": 1}"#)
        .json();
    assert_eq!(over_http["status"], "succeeded", "{over_http:#}");

    let sandbox = Sandbox::new();
    let path = sandbox.write("same.toml", workflow);
    let outcome = run_file(&path, Some(r#"{"x": 1}"#), &["--json"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let from_cli = outcome.json();

    assert_eq!(shape(&over_http), shape(&from_cli));
    assert_eq!(over_http["output"], from_cli["output"]);
    assert_eq!(over_http["output"], json!({ "second": "first" }));
    let (run_keys, _, attempt_keys) = shape(&over_http);
    for key in [
        "id",
        "workflow",
        "status",
        "input",
        "output",
        "created_at",
        "finished_at",
        "steps",
    ] {
        assert!(run_keys.contains(key), "{key}: {run_keys:?}");
    }
    for key in [
        "attempt",
        "status",
        "fuel_consumed",
        "peak_memory",
        "duration_ms",
        "logs",
    ] {
        assert!(attempt_keys.contains(key), "{key}: {attempt_keys:?}");
    }
}

#[test]
fn workflows_can_be_put_listed_and_run() {
    let server = Serve::new().workflow("echo.toml", ECHO).start();
    let put = |name: &str, text: &str| {
        server.call(
            "PUT",
            &format!("/v1/workflows/{name}"),
            &[("content-type", "application/toml")],
            Some(text.as_bytes()),
        )
    };
    let reply = put(
        "shout",
        "description = \"Echo, uploaded\"\n[[step]]\nid = \"v1\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n",
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let entry = reply.json();
    assert_eq!(entry["name"], "shout");
    assert_eq!(entry["valid"], true);
    assert_eq!(entry["steps"], 1);
    assert_eq!(entry["description"], "Echo, uploaded");
    assert!(entry["source"].as_str().unwrap().contains("id = \"v1\""));

    let run = server
        .post("/v1/workflows/shout/runs?wait=30s", "\"hey\"")
        .json();
    assert_eq!(run["output"], json!({ "v1": "hey" }));

    // A broken replacement is refused with its diagnostics; the old one stays.
    let refused = put(
        "shout",
        "[[step]]\nid = \"v2\"\nplugin = \"noop\"\nneeds = [\"ghost\"]\n",
    );
    let body = refused.assert_error(422, "invalid_workflow");
    let detail = &body["error"]["details"][0];
    assert_eq!(detail["line"], 4, "{body:#}");
    assert!(detail["column"].as_u64().unwrap() >= 1);
    assert!(
        detail["message"].as_str().unwrap().contains("ghost"),
        "{body:#}"
    );
    let run = server
        .post("/v1/workflows/shout/runs?wait=30s", "\"again\"")
        .json();
    assert_eq!(run["output"], json!({ "v1": "again" }));

    // A good replacement takes over.
    let reply = put(
        "shout",
        "[[step]]\nid = \"v3\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n",
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let run = server.post("/v1/workflows/shout/runs?wait=30s", "3").json();
    assert_eq!(run["output"], json!({ "v3": 3 }));

    let listed = server.get("/v1/workflows").json();
    let names: Vec<&str> = listed["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "shout"]);
    let echo = &listed["workflows"][0];
    assert_eq!(echo["valid"], true);
    assert_eq!(echo["steps"], 1);
    assert_eq!(echo["errors"], json!([]));
    assert!(echo["file"].as_str().unwrap().ends_with("echo.toml"));

    let plugins = server.get("/v1/plugins").json();
    let plugins = plugins["plugins"].as_array().unwrap();
    let noop = plugins.iter().find(|p| p["name"] == "noop").unwrap();
    assert_eq!(noop["version"], "1.0.0");
    assert!(noop["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(noop["size"].as_u64().unwrap() > 0);
    assert!(plugins.iter().any(|p| p["name"] == "json-transform"));
    assert!(plugins.iter().any(|p| p["name"] == "sleep"));
}

#[test]
fn sigterm_stops_the_server_gracefully() {
    let mut server = Serve::new()
        .workflow("nap.toml", NAP)
        .args(&["--log-format", "json"])
        .env("TRELLIS_LOG", "debug")
        .start();
    let done = server.post("/v1/workflows/nap/runs?wait=30s", r#"{"ms": 1}"#);
    assert_eq!(done.status, 200);
    // A request waiting on a long run answers (202) when the server stops.
    let base = server.base.clone();
    let waiting = std::thread::spawn(move || {
        let mut response = agent()
            .post(format!("{base}/v1/workflows/nap/runs?wait=60s"))
            .header("content-type", "application/json")
            .send(r#"{"ms": 30000}"#)
            .unwrap();
        (
            response.status().as_u16(),
            response.body_mut().read_to_string().unwrap(),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.get("/v1/runs?status=running").json()["runs"] == json!([]) {
        assert!(Instant::now() < deadline, "the nap never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let asked = Instant::now();
    assert_eq!(server.terminate(), 0, "{}", server.stderr());
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
    let (status, body) = waiting.join().unwrap();
    assert_eq!(status, 202, "{body}");
    let stderr = server.stderr();
    assert!(stderr.contains("shutting down"), "{stderr}");
    assert!(
        stderr.lines().last().unwrap().contains("stopped"),
        "{stderr}"
    );
    // `--log-format json`: every log line is a JSON object.
    let logs: Vec<Value> = stderr
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        logs.iter()
            .any(|log| log["fields"]["message"] == "listening"),
        "{stderr}"
    );
    // Requests are logged at debug.
    assert!(
        logs.iter().any(|log| log["span"]["name"] == "request"),
        "{stderr}"
    );
}

#[test]
fn a_bad_configuration_is_refused_at_start() {
    let outcome = Serve::new().config("max_concurrent_steps = 0\n").exec();
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome
            .stderr
            .contains("trellis.toml:1:24: `max_concurrent_steps` must be at least 1"),
        "{}",
        outcome.stderr
    );
    let outcome = Serve::new().env("TRELLIS_MAX_BODY", "lots").exec();
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("TRELLIS_MAX_BODY: invalid size"),
        "{}",
        outcome.stderr
    );
}

/// While a fan-out runs, `GET /v1/runs/{id}` shows how many items it has and
/// each item's finished attempts, not only once the whole step has ended.
/// Three items answer at once and the fourth waits at a gate the test
/// opens, so the run is seen mid-way for sure, whatever the machine's speed.
#[test]
fn a_running_fan_out_shows_its_finished_items() {
    let gate = Gate::start();
    let server = Serve::new()
        .workflow(
            "fan.toml",
            &format!(
                r#"
[[step]]
id = "each"
plugin = "http-request"
for_each = "{{{{ input.items }}}}"
input = {{ url = "{}/{{{{ item }}}}" }}
allow_hosts = ["{}"]
"#,
                gate.url(""),
                gate.host()
            ),
        )
        .start();
    let items = ["a", "b", "c", "held"];
    let reply = server.post(
        "/v1/workflows/fan/runs",
        &json!({ "items": items }).to_string(),
    );
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["id"].as_str().unwrap().to_string();
    gate.await_waiting(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let run = server.get(&format!("/v1/runs/{id}")).json();
        let done = step(&run, "each")["attempts"].as_array().unwrap().len();
        assert!(done <= 3, "an item went through the closed gate: {run:#}");
        if done == 3 {
            break run;
        }
        assert!(Instant::now() < deadline, "{run:#}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(seen["status"], "running", "{seen:#}");
    let each = step(&seen, "each");
    assert_eq!(each["status"], "running", "{each:#}");
    assert_eq!(each["items"], 4, "{each:#}");
    let mut shown: Vec<u64> = Vec::new();
    for attempt in each["attempts"].as_array().unwrap() {
        assert_eq!(attempt["status"], "succeeded", "{attempt:#}");
        assert_eq!(attempt["attempt"], 1, "{attempt:#}");
        shown.push(attempt["item"].as_u64().unwrap());
    }
    shown.sort_unstable();
    assert_eq!(shown, [0, 1, 2], "the finished items: {each:#}");

    gate.open();
    let run = server.wait_for_run(&id);
    assert!(!gate.timed_out());
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let each = step(&run, "each");
    assert_eq!(each["attempts"].as_array().unwrap().len(), 4, "{each:#}");
    for (n, item) in items.iter().enumerate() {
        assert_eq!(
            each["output"][n]["json"]["path"],
            format!("/{item}"),
            "{each:#}"
        );
    }
}
