//! `trellis runs`: the command line as a client of a running `trellis serve`,
//! checked against what the HTTP API itself answers.

use std::process::Command;

use serde_json::{Value, json};

use crate::support::*;

/// Two steps, the second on the first's output; the probe logs a line.
const TWO_STEPS: &str = r#"
[[step]]
id = "first"
plugin = "noop"
input = "{{ input }}"

[[step]]
id = "second"
plugin = "probe"
needs = ["first"]
input = { logs = [["info", "hello from the probe"]] }
"#;

/// A first step that succeeds, then one that fails with `input.message`.
const FAILS: &str = r#"
[[step]]
id = "first"
plugin = "noop"
input = "{{ input }}"

[[step]]
id = "maybe"
plugin = "fail"
needs = ["first"]
input = { message = "{{ input.message }}" }
"#;

/// Sleeps `input.ms` in one step.
const NAP: &str = r#"
[limits]
timeout = "120s"

[[step]]
id = "nap"
plugin = "sleep"
input = { ms = "{{ input.ms | default(300) }}" }
"#;

/// `trellis runs ARGS... --server <server>`, with neither `TRELLIS_SERVER`
/// nor `TRELLIS_AUTH_TOKEN` from the test's environment.
fn runs(server: &Server, args: &[&str]) -> Outcome {
    runs_with(args, &["--server", &server.base], &[])
}

/// `trellis runs ARGS... EXTRA...` with these variables.
fn runs_with(args: &[&str], extra: &[&str], envs: &[(&str, &str)]) -> Outcome {
    let mut command: Command = trellis();
    command
        .arg("runs")
        .args(args)
        .args(extra)
        .env_remove("TRELLIS_SERVER")
        .env_remove("TRELLIS_AUTH_TOKEN")
        .envs(envs.iter().copied());
    let output = command.output().unwrap();
    Outcome {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[track_caller]
fn assert_code(outcome: &Outcome, code: i32) {
    assert_eq!(
        outcome.code, code,
        "stdout:\n{}\nstderr:\n{}",
        outcome.stdout, outcome.stderr
    );
}

/// Starts a run of `workflow` and waits for its end; returns its record.
fn finished_run(server: &Server, workflow: &str, input: Value) -> Value {
    let reply = server.post(
        &format!("/v1/workflows/{workflow}/runs?wait=60s"),
        &input.to_string(),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn id_of(run: &Value) -> String {
    run["id"].as_str().unwrap().to_owned()
}

/// The words of the table row that starts with `first`.
fn row<'a>(table: &'a str, first: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|line| line.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first} in:\n{table}"))
        .split_whitespace()
        .collect()
}

#[test]
fn runs_list_shows_the_servers_runs_as_a_table_or_its_json() {
    let server = Serve::new()
        .workflow("two.toml", TWO_STEPS)
        .workflow("fails.toml", FAILS)
        .start();
    let a = finished_run(&server, "two", json!({ "n": 1 }));
    let b = finished_run(&server, "two", json!({ "n": 2 }));
    let failed = finished_run(&server, "fails", json!({ "message": "no" }));
    assert_eq!(failed["status"], "failed", "{failed:#}");

    // --json: exactly the API's page.
    let listed = runs(&server, &["list", "--json"]);
    assert_code(&listed, 0);
    assert_eq!(listed.stdout.lines().count(), 1, "{}", listed.stdout);
    assert_eq!(listed.json(), server.get("/v1/runs").json());

    // The table: a header, then a row per run, newest first.
    let table = runs(&server, &["list"]);
    assert_code(&table, 0);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "WORKFLOW", "STATUS", "CREATED", "DURATION"]
    );
    assert_eq!(lines.len(), 4, "{}", table.stdout);
    let order: Vec<&str> = lines[1..]
        .iter()
        .map(|line| line.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(order, [id_of(&failed), id_of(&b), id_of(&a)]);
    for run in [&a, &b, &failed] {
        let cells = row(&table.stdout, &id_of(run));
        assert_eq!(cells[1], run["workflow"]);
        assert_eq!(cells[2], run["status"]);
        // Created to the second: the record's time without its milliseconds.
        let created = run["created_at"].as_str().unwrap();
        assert_eq!(cells[3], format!("{}Z", &created[..19]));
        assert!(["ms", "s"].contains(&cells[5]), "{cells:?}");
    }
    // Every column starts at the same place on every line.
    let status_at = lines[0].find("STATUS").unwrap();
    for line in &lines[1..] {
        assert!(
            line[status_at..].starts_with("succeeded") || line[status_at..].starts_with("failed"),
            "{}",
            table.stdout
        );
    }

    // Filters.
    let two = runs(&server, &["list", "--workflow", "two"]);
    assert_code(&two, 0);
    assert_eq!(two.stdout.lines().count(), 3, "{}", two.stdout);
    assert!(!two.stdout.contains(&id_of(&failed)), "{}", two.stdout);
    let only_failed = runs(&server, &["list", "--status", "failed", "--json"]);
    assert_code(&only_failed, 0);
    assert_eq!(
        only_failed.json(),
        server.get("/v1/runs?status=failed").json()
    );
    assert_eq!(only_failed.json()["runs"].as_array().unwrap().len(), 1);
    let none = runs(
        &server,
        &["list", "--workflow", "fails", "--status", "succeeded"],
    );
    assert_code(&none, 0);
    assert_eq!(none.stdout.trim(), "no runs");

    // A page at a time: the last line says how to get the next one.
    let first_page = runs(&server, &["list", "--workflow", "two", "--limit", "1"]);
    assert_code(&first_page, 0);
    assert_eq!(row(&first_page.stdout, &id_of(&b))[2], "succeeded");
    let next = first_page.stdout.lines().last().unwrap();
    let command = next
        .strip_prefix("next page: trellis runs ")
        .unwrap_or_else(|| panic!("no next page line: {}", first_page.stdout));
    let args: Vec<&str> = command.split_whitespace().collect();
    assert!(
        command.starts_with(&format!(
            "list --server {} --workflow two --limit 1 --cursor ",
            server.base
        )),
        "{command}"
    );
    let second_page = runs_with(&args, &[], &[]);
    assert_code(&second_page, 0);
    assert_eq!(
        second_page.stdout.lines().count(),
        2,
        "{}",
        second_page.stdout
    );
    assert_eq!(row(&second_page.stdout, &id_of(&a))[1], "two");
}

#[test]
fn runs_get_shows_a_run_and_its_steps() {
    let server = Serve::new()
        .workflow("two.toml", TWO_STEPS)
        .workflow("fails.toml", FAILS)
        .start();
    let run = finished_run(&server, "two", json!({ "n": 1 }));
    let id = id_of(&run);

    let json = runs(&server, &["get", &id, "--json"]);
    assert_code(&json, 0);
    assert_eq!(json.stdout.lines().count(), 1);
    assert_eq!(json.json(), server.get(&format!("/v1/runs/{id}")).json());

    let shown = runs(&server, &["get", &id]);
    assert_code(&shown, 0);
    let (header, steps) = shown.stdout.split_once("\n\n").unwrap();
    assert_eq!(row(header, "run"), ["run", &id]);
    assert_eq!(row(header, "workflow"), ["workflow", "two"]);
    assert_eq!(row(header, "status"), ["status", "succeeded"]);
    for field in ["created", "started", "finished", "duration"] {
        assert_eq!(
            row(header, field).len(),
            2 + usize::from(field == "duration")
        );
    }
    assert!(!header.contains("error"), "{header}");
    assert_eq!(
        steps
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["STEP", "STATUS", "ATTEMPTS", "DURATION", "DETAIL"]
    );
    for step_id in ["first", "second"] {
        let cells = row(steps, step_id);
        assert_eq!(cells[1], "succeeded");
        assert_eq!(cells[2], "1");
        assert!(["ms", "s"].contains(&cells[4]), "{cells:?}");
    }

    // A failed run: its error above, the failing step's reason in its row.
    let failed = finished_run(&server, "fails", json!({ "message": "no luck" }));
    let shown = runs(&server, &["get", &id_of(&failed)]);
    assert_code(&shown, 0);
    assert!(
        shown
            .stdout
            .contains("error     step `maybe` failed: task error: no luck"),
        "{}",
        shown.stdout
    );
    let cells = row(&shown.stdout, "maybe");
    assert_eq!(cells[1..3], ["failed", "1"]);
    assert!(
        shown
            .stdout
            .lines()
            .any(|line| line.starts_with("maybe") && line.ends_with("task error: no luck"))
    );
    assert_eq!(row(&shown.stdout, "first")[1], "succeeded");

    // No such run: the server's 404, exit 1.
    let missing = runs(&server, &["get", "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b"]);
    assert_code(&missing, 1);
    assert_eq!(
        missing.stderr.trim(),
        "error: 404 not_found: no run with id 0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b"
    );
    assert!(missing.stdout.is_empty());
}

#[test]
fn runs_cancel_stops_a_sleeping_run() {
    let server = Serve::new().workflow("nap.toml", NAP).start();
    let reply = server.post("/v1/workflows/nap/runs", r#"{"ms": 60000}"#);
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = id_of(&reply.json());
    assert!(
        server.await_event(&id, |event| event.event == "step_started"),
        "the nap never started"
    );

    let cancelled = runs(&server, &["cancel", &id]);
    assert_code(&cancelled, 0);
    assert_eq!(cancelled.stdout.trim(), format!("{id} cancelled"));
    let run = server.wait_for_run(&id);
    assert_eq!(run["status"], "cancelled");
    assert_eq!(step(&run, "nap")["status"], "cancelled");

    // Watching it now: its history, then exit 1.
    let watched = runs(&server, &["watch", &id]);
    assert_code(&watched, 1);
    assert_eq!(
        watched.stdout.lines().next(),
        Some("step nap started (attempt 1)")
    );
    assert!(
        watched
            .stdout
            .lines()
            .last()
            .unwrap()
            .starts_with("run cancelled"),
        "{}",
        watched.stdout
    );

    // A finished run cannot be cancelled again: the server's 409.
    let again = runs(&server, &["cancel", &id]);
    assert_code(&again, 1);
    assert_eq!(
        again.stderr.trim(),
        format!("error: 409 run_finished: run {id} already finished (cancelled)")
    );
}

#[test]
fn runs_watch_follows_a_run_to_its_end() {
    let server = Serve::new()
        .workflow("two.toml", TWO_STEPS)
        .workflow("fails.toml", FAILS)
        .workflow("nap.toml", NAP)
        .start();

    // A run still going when the watch starts.
    let reply = server.post("/v1/workflows/nap/runs", r#"{"ms": 500}"#);
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = id_of(&reply.json());
    let watched = runs(&server, &["watch", &id]);
    assert_code(&watched, 0);
    let lines: Vec<&str> = watched.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", watched.stdout);
    assert_eq!(lines[0], "step nap started (attempt 1)");
    assert!(
        lines[1].starts_with("step nap succeeded in "),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("run succeeded in "), "{}", lines[2]);
    assert_eq!(
        server.get(&format!("/v1/runs/{id}")).json()["status"],
        "succeeded"
    );

    // Every step, the probe's log line, the end.
    let run = finished_run(&server, "two", json!({ "n": 1 }));
    let id = id_of(&run);
    let watched = runs(&server, &["watch", &id]);
    assert_code(&watched, 0);
    let lines: Vec<&str> = watched.stdout.lines().collect();
    assert_eq!(lines[0], "step first started (attempt 1)");
    assert!(
        lines[1].starts_with("step first succeeded in "),
        "{}",
        lines[1]
    );
    assert_eq!(lines[2], "step second started (attempt 1)");
    assert_eq!(lines[3], "  second [info] hello from the probe");
    assert!(
        lines[4].starts_with("step second succeeded in "),
        "{}",
        lines[4]
    );
    assert!(lines[5].starts_with("run succeeded in "), "{}", lines[5]);
    assert_eq!(lines.len(), 6, "{}", watched.stdout);

    // --json: one object per event, as the event stream has them.
    let watched = runs(&server, &["watch", &id, "--json"]);
    assert_code(&watched, 0);
    let events: Vec<Value> = watched
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let streamed = server.events(&id, &[]);
    assert_eq!(events.len(), streamed.len());
    for (printed, sent) in events.iter().zip(&streamed) {
        assert_eq!(printed["event"], sent.event.as_str());
        assert_eq!(printed["data"]["type"], sent.data["type"]);
        assert_eq!(printed["data"]["seq"], sent.data["seq"]);
    }
    let last = events.last().unwrap();
    assert_eq!(last["event"], "run_finished");
    assert_eq!(
        last["data"]["run"],
        server.get(&format!("/v1/runs/{id}")).json()
    );

    // A failing run: its reason, exit 1.
    let failed = finished_run(&server, "fails", json!({ "message": "no" }));
    let watched = runs(&server, &["watch", &id_of(&failed)]);
    assert_code(&watched, 1);
    assert!(
        watched
            .stdout
            .lines()
            .any(|line| line.starts_with("step maybe failed in ")
                && line.ends_with(": task error: no")),
        "{}",
        watched.stdout
    );
    let last = watched.stdout.lines().last().unwrap();
    assert!(
        last.starts_with("run failed in ")
            && last.ends_with(": step `maybe` failed: task error: no"),
        "{last}"
    );
}

#[test]
fn runs_sends_the_token_from_the_environment() {
    let mut server = Serve::new()
        .workflow("two.toml", TWO_STEPS)
        .env("TRELLIS_AUTH_TOKEN", "let-me-in")
        .start();
    // For the test's own calls.
    server.token = Some("let-me-in".to_owned());
    let run = finished_run(&server, "two", json!({}));
    let id = id_of(&run);
    let flag = ["--server", server.base.as_str()];

    let missing = runs_with(&["list"], &flag, &[]);
    assert_code(&missing, 1);
    assert!(
        missing.stderr.starts_with("error: 401 unauthorized: ")
            && missing
                .stderr
                .trim_end()
                .ends_with("(TRELLIS_AUTH_TOKEN is not set)"),
        "{}",
        missing.stderr
    );

    let wrong = runs_with(&["get", &id], &flag, &[("TRELLIS_AUTH_TOKEN", "guess-123")]);
    assert_code(&wrong, 1);
    assert!(
        wrong
            .stderr
            .contains("(the server refused the token in TRELLIS_AUTH_TOKEN)"),
        "{}",
        wrong.stderr
    );
    assert!(!wrong.stderr.contains("guess-123"), "{}", wrong.stderr);

    let token = [("TRELLIS_AUTH_TOKEN", "let-me-in")];
    let listed = runs_with(&["list", "--json"], &flag, &token);
    assert_code(&listed, 0);
    assert_eq!(listed.json(), server.get("/v1/runs").json());
    let watched = runs_with(&["watch", &id], &flag, &token);
    assert_code(&watched, 0);
    assert!(
        watched.stdout.contains("step second started"),
        "{}",
        watched.stdout
    );
    assert!(!watched.stdout.contains("let-me-in") && !watched.stderr.contains("let-me-in"));

    // The server from TRELLIS_SERVER rather than --server.
    let from_env = runs_with(
        &["get", &id, "--json"],
        &[],
        &[("TRELLIS_SERVER", server.base.as_str()), token[0]],
    );
    assert_code(&from_env, 0);
    assert_eq!(from_env.json()["id"], id.as_str());
}

#[test]
fn runs_names_a_server_it_cannot_reach() {
    // A port nobody listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");

    let by_flag = runs_with(&["list"], &["--server", &url], &[]);
    assert_code(&by_flag, 1);
    assert!(
        by_flag.stderr.starts_with(&format!(
            "error: cannot reach the server at {url} (given by --server): "
        )),
        "{}",
        by_flag.stderr
    );
    assert!(
        by_flag.stderr.to_lowercase().contains("refused"),
        "{}",
        by_flag.stderr
    );

    let by_env = runs_with(
        &["watch", "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b"],
        &[],
        &[("TRELLIS_SERVER", url.as_str())],
    );
    assert_code(&by_env, 1);
    assert!(
        by_env.stderr.starts_with(&format!(
            "error: cannot reach the server at {url} (from TRELLIS_SERVER): "
        )),
        "{}",
        by_env.stderr
    );
}

#[test]
fn runs_refuses_bad_arguments_before_any_request() {
    // Nothing listens here: a usage error must come first.
    let server = ["--server", "http://127.0.0.1:9"];
    let id = "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b";

    let bad_json = runs_with(&["rerun", id, "--input", "{not json"], &server, &[]);
    assert_code(&bad_json, 2);
    assert!(
        bad_json.stderr.starts_with(
            "error: --input is not valid JSON: key must be a string at line 1 column 2"
        ),
        "{}",
        bad_json.stderr
    );

    let sandbox = Sandbox::new();
    let file = sandbox.write("input.json", "{\"a\": 1,\n}");
    let bad_file = runs_with(
        &["rerun", id, "--input", &format!("@{}", file.display())],
        &server,
        &[],
    );
    assert_code(&bad_file, 2);
    assert!(
        bad_file.stderr.contains("line 2 column 1"),
        "{}",
        bad_file.stderr
    );
    let missing_file = runs_with(
        &["rerun", id, "--input", "@/no/such/file.json"],
        &server,
        &[],
    );
    assert_code(&missing_file, 2);
    assert!(
        missing_file
            .stderr
            .contains("reading the input file /no/such/file.json"),
        "{}",
        missing_file.stderr
    );

    for (args, expected) in [
        (vec!["get", "42"], "run ids are UUIDs"),
        (
            vec!["list", "--status", "done"],
            "unknown run status \"done\"",
        ),
        (vec!["list", "--limit", "0"], "--limit"),
        (vec!["get"], "<ID>"),
    ] {
        let outcome = runs_with(&args, &server, &[]);
        assert_code(&outcome, 2);
        assert!(
            outcome.stderr.contains(expected),
            "{args:?}: {}",
            outcome.stderr
        );
    }

    let https = runs_with(&["list"], &["--server", "https://example.com"], &[]);
    assert_code(&https, 2);
    assert!(https.stderr.contains("plain HTTP only"), "{}", https.stderr);
}

#[test]
fn runs_retry_and_rerun_from_the_cli() {
    let server = Serve::new().workflow("fails.toml", FAILS).start();
    let original = finished_run(&server, "fails", json!({ "message": "first try" }));
    assert_eq!(original["status"], "failed", "{original:#}");
    let original_id = id_of(&original);

    // retry: same input; the step that succeeded is reused.
    let retried = runs(&server, &["retry", &original_id]);
    assert_code(&retried, 0);
    let words: Vec<&str> = retried.stdout.split_whitespace().collect();
    assert_eq!(words.len(), 2, "{}", retried.stdout);
    assert!(
        ["queued", "running", "failed"].contains(&words[1]),
        "{}",
        retried.stdout
    );
    assert!(
        retried.stderr.contains(&format!(
            "trellis runs watch --server {} {}",
            server.base, words[0]
        )),
        "{}",
        retried.stderr
    );
    let retry = server.wait_for_run(words[0]);
    assert_eq!(retry["retry_of"], original_id.as_str(), "{retry:#}");
    assert_eq!(retry["input"], original["input"]);
    assert_eq!(retry["status"], "failed");
    assert_eq!(step(&retry, "first")["reused_from"], original_id.as_str());
    let shown = runs(&server, &["get", words[0]]);
    assert_code(&shown, 0);
    assert_eq!(row(&shown.stdout, "retry"), ["retry", "of", &original_id]);
    assert!(
        shown.stdout.lines().any(|line| line.starts_with("first")
            && line.ends_with(&format!("reused from {original_id}"))),
        "{}",
        shown.stdout
    );
    // The original lists its retries.
    let shown = runs(&server, &["get", &original_id]);
    assert_eq!(row(&shown.stdout, "retries"), ["retries", words[0]]);

    // --from and --json: the API's answer, the step run again.
    let from = runs(
        &server,
        &["retry", &original_id, "--from", "first", "--json"],
    );
    assert_code(&from, 0);
    let accepted = from.json();
    assert_eq!(accepted["retry_of"], original_id.as_str());
    let from_run = server.wait_for_run(&id_of(&accepted));
    assert!(
        step(&from_run, "first")["reused_from"].is_null(),
        "{from_run:#}"
    );
    assert_eq!(
        step(&from_run, "first")["attempts"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // rerun with a new input.
    let rerun = runs(
        &server,
        &["rerun", &original_id, "--input", r#"{"message": "again"}"#],
    );
    assert_code(&rerun, 0);
    let rerun_id = rerun.stdout.split_whitespace().next().unwrap().to_owned();
    let rerun_run = server.wait_for_run(&rerun_id);
    assert_eq!(rerun_run["rerun_of"], original_id.as_str(), "{rerun_run:#}");
    assert_eq!(rerun_run["input"], json!({ "message": "again" }));
    assert_eq!(
        rerun_run["error"]["message"]
            .as_str()
            .map(|m| m.contains("again")),
        Some(true),
        "{rerun_run:#}"
    );
    // ... from a file, with --upgrade.
    let sandbox = Sandbox::new();
    let file = sandbox.write("input.json", r#"{"message": "from a file"}"#);
    let rerun = runs(
        &server,
        &[
            "rerun",
            &original_id,
            "--input",
            &format!("@{}", file.display()),
            "--upgrade",
            "--json",
        ],
    );
    assert_code(&rerun, 0);
    assert_eq!(rerun.json()["rerun_of"], original_id.as_str());
    assert_eq!(rerun.json()["input"], json!({ "message": "from a file" }));

    // An unknown step for --from: the server's 422.
    let unknown = runs(&server, &["retry", &original_id, "--from", "nope"]);
    assert_code(&unknown, 1);
    assert!(
        unknown.stderr.starts_with("error: 422 "),
        "{}",
        unknown.stderr
    );
}
