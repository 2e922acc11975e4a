//! The example workflows in `workflows/` validate, run on the example plugins
//! (the default plugin dir), and produce exactly the documented output
//! (`workflows/EXPECTED.md`). The one that also uses the Python and JavaScript
//! plugins (`new-hires`) is run in `polyglot.rs`.

use serde_json::{Value, json};

use crate::support::*;

/// `trellis run workflows/NAME.toml [--input ...] --json` with no `--plugin-dir`:
/// the example plugins of this build, as a new user gets them.
fn run_example(name: &str, input: Option<&str>) -> Value {
    // The default dirs include the Python and JavaScript plugins: built and
    // compiled once, not by every test process at the same time.
    crate::polyglot::polyglot();
    let path = workspace().join("workflows").join(format!("{name}.toml"));
    let mut cmd = trellis();
    cmd.arg("run").arg(&path).arg("--json");
    if let Some(input) = input {
        cmd.args(["--input", input]);
    }
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{name}: {stderr}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn statuses(record: &Value) -> Vec<(String, String)> {
    record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn every_example_workflow_validates() {
    // Some use the Python and JavaScript plugins that `plugins/build.sh` makes.
    let mut args = vec![
        "validate".to_string(),
        "--plugin-dir".to_string(),
        EXAMPLE_PLUGINS.to_string(),
        "--plugin-dir".to_string(),
        crate::polyglot::polyglot().to_string(),
    ];
    for entry in std::fs::read_dir(workspace().join("workflows")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            args.push(path.display().to_string());
        }
    }
    assert!(args.len() >= 8, "expected at least three example workflows");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let outcome = exec(&args);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(
        outcome
            .stdout
            .lines()
            .filter(|l| l.starts_with("ok: "))
            .count(),
        args.len() - 5
    );
}

#[test]
fn order_pipeline_over_the_limit_needs_approval() {
    let record = run_example("order-pipeline", None);
    assert_eq!(record["status"], "succeeded");
    assert!(
        statuses(&record)
            .iter()
            .all(|(_, status)| status == "succeeded"),
        "{:?}",
        statuses(&record)
    );
    assert_eq!(
        record["output"],
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
fn order_pipeline_under_the_limit_skips_approval() {
    let record = run_example(
        "order-pipeline",
        Some(
            r#"{"order": {"id": "B-2002", "currency": "EUR",
                "customer": {"name": "Alan Turing", "email": "alan@example.org"},
                "items": [{"sku": "TAPE-1", "name": "Paper tape", "price": 7.5, "qty": 4}]},
                "approval_threshold": 250}"#,
        ),
    );
    assert_eq!(step(&record, "approve")["status"], "skipped");
    assert_eq!(
        record["output"],
        json!({ "order_id": "B-2002", "total": 34.9, "currency": "EUR", "approval": "skipped",
                "note": "auto-approved", "receipt": "B-2002-355f1c60787c" })
    );
}

#[test]
fn an_invalid_order_fails_at_validation_with_every_violation() {
    let path = workspace().join("workflows").join("order-pipeline.toml");
    let outcome = run_file(
        &path,
        Some(r#"{"order": {"id": 7, "items": []}}"#),
        &["--json"],
    );
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    let record = outcome.json();
    assert_eq!(record["error"]["step"], "validate");
    assert_eq!(record["error"]["kind"], "task_error");
    let details = step(&record, "validate")["error"]["details"]
        .as_array()
        .unwrap()
        .clone();
    assert!(details.len() >= 2, "{details:#?}");
    assert!(
        outcome.stderr.contains("step `validate` failed"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn word_stats_fans_out_and_merges() {
    let record = run_example("word-stats", None);
    assert_eq!(step(&record, "per_doc")["items"], 3);
    assert_eq!(
        step(&record, "per_doc")["output"].as_array().unwrap().len(),
        3
    );
    let output = &record["output"];
    assert_eq!(output["documents"], 3);
    assert_eq!(output["words"], 46);
    assert_eq!(output["unique"], 32);
    assert_eq!(
        output["top"],
        json!([
            { "word": "the", "count": 6 },
            { "word": "a", "count": 4 },
            { "word": "dog", "count": 2 },
            { "word": "each", "count": 2 },
            { "word": "graph", "count": 2 }
        ])
    );
    assert_eq!(
        output["per_document"],
        json!([
            [{ "word": "the", "count": 3 }, { "word": "dog", "count": 2 }, { "word": "brown", "count": 1 }],
            [{ "word": "a", "count": 4 }, { "word": "each", "count": 2 }, { "word": "is", "count": 2 }],
            [{ "word": "the", "count": 3 }, { "word": "can", "count": 1 }, { "word": "decides", "count": 1 }]
        ])
    );
    assert_eq!(
        output["lengths"],
        json!({ "count": 3, "sum": 46, "min": 12, "max": 19, "mean": 15.333333333333334, "median": 15 })
    );
}

#[test]
fn word_stats_on_given_documents() {
    let record = run_example(
        "word-stats",
        Some(
            r#"{"documents": ["To be, or not to be: that is the question.",
                "All the world is a stage, and all the men and women merely players."], "top": 3}"#,
        ),
    );
    let output = &record["output"];
    assert_eq!(output["documents"], 2);
    assert_eq!(output["words"], 24);
    assert_eq!(output["unique"], 17);
    assert_eq!(
        output["top"],
        json!([{ "word": "the", "count": 3 }, { "word": "all", "count": 2 }, { "word": "and", "count": 2 }])
    );
}

#[test]
fn onboarding_continues_past_an_incomplete_hr_record() {
    let record = run_example("onboarding", None);
    assert_eq!(record["status"], "succeeded");
    let hr = step(&record, "hr_check");
    assert_eq!(hr["status"], "failed");
    assert_eq!(
        hr["attempts"].as_array().unwrap().len(),
        1,
        "a fatal error is not retried"
    );
    for id in [
        "user", "username", "welcome", "avatar", "accounts", "summary",
    ] {
        assert_eq!(step(&record, id)["status"], "succeeded", "{id}");
    }
    // username, welcome, avatar and hr_check only need `user`: they ran side by side.
    let spans: Vec<(f64, f64)> = ["username", "welcome", "avatar", "hr_check"]
        .iter()
        .map(|id| span(&record, id))
        .collect();
    let (_, user_end) = span(&record, "user");
    assert!(spans.iter().all(|(start, _)| *start >= user_end - 1.0));
    assert_eq!(
        record["output"],
        json!({
            "username": "grace.hopper",
            "email": "grace.hopper@example.com",
            "avatar_url": "https://gravatar.com/avatar/a460d7fa831915bb17b55b9151a5278e916f2de6480dc2171845c4b305620428",
            "welcome": {
                "subject": "Welcome to Compilers, Grace!",
                "body": "Hi Grace,\n\nwelcome to the Compilers team! Your first day is 2025-03-03.\nYour accounts will be ready by then."
            },
            "accounts": [
                { "system": "git", "login": "grace.hopper" },
                { "system": "chat", "login": "grace.hopper" },
                { "system": "wiki", "login": "grace.hopper" }
            ],
            "hr_check": "failed",
            "summary": "Onboard Grace Brewster Hopper <grace.hopper@example.com>, Compilers, from 2025-03-03.\nAccounts: git:grace.hopper, chat:grace.hopper, wiki:grace.hopper\nWelcome email: \"Welcome to Compilers, Grace!\"\nHR record: incomplete, HR to follow up"
        })
    );
}

#[test]
fn onboarding_a_complete_record() {
    let record = run_example(
        "onboarding",
        Some(
            r#"{"user": {"name": "Katherine Johnson", "email": "KJohnson@Example.org",
                "team": "Trajectories", "start_date": "2025-06-02", "manager": "Dorothy Vaughan"},
                "systems": ["git", "chat"]}"#,
        ),
    );
    assert!(
        statuses(&record)
            .iter()
            .all(|(_, status)| status == "succeeded"),
        "{:?}",
        statuses(&record)
    );
    assert_eq!(record["output"]["username"], "katherine.johnson");
    assert_eq!(record["output"]["email"], "kjohnson@example.org");
    assert_eq!(record["output"]["hr_check"], "succeeded");
    assert_eq!(
        record["output"]["accounts"],
        json!([{ "system": "git", "login": "katherine.johnson" }, { "system": "chat", "login": "katherine.johnson" }])
    );
    assert_eq!(
        record["output"]["summary"],
        "Onboard Katherine Johnson <kjohnson@example.org>, Trajectories, from 2025-06-02.\nAccounts: git:katherine.johnson, chat:katherine.johnson\nWelcome email: \"Welcome to Trajectories, Katherine!\"\nHR record: complete"
    );
}

/// The README's retry walkthrough with `workflows/ticket.toml`: the ticket
/// system is down, the run fails at `file`; it comes back, `trellis runs
/// retry` starts a run in which only `file` and `report` run, and `trellis
/// runs watch` follows it to exit status 0. (The ticket system is a stand-in
/// on a free port instead of 8089.)
#[test]
fn the_ticket_example_is_retried_from_the_cli_after_its_failed_step() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(workspace().join("workflows/ticket.toml"))
        .unwrap()
        .replace("127.0.0.1:8089", &format!("127.0.0.1:{port}"));
    let server = Serve::new().workflow("ticket.toml", &text).start();
    let first = server.post("/v1/workflows/ticket/runs?wait=30s", "{}");
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.json();
    assert_eq!(first["status"], "failed", "{first}");
    assert_eq!(first["error"]["step"], "file");
    let id = first["id"].as_str().unwrap();

    // The ticket system comes back: it answers every request 200.
    let tickets = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for stream in tickets.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut head);
            let _ = std::io::Write::write_all(
                &mut stream,
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
            );
        }
    });
    let cli = |args: &[&str]| {
        let mut command = trellis();
        command
            .arg("runs")
            .args(args)
            .args(["--server", &server.base]);
        Outcome::from(command.output().unwrap())
    };
    let retried = cli(&["retry", id]);
    assert_eq!(retried.code, 0, "{}", retried.stderr);
    let new = retried.stdout.split_whitespace().next().unwrap().to_owned();
    let watched = cli(&["watch", &new]);
    assert_eq!(watched.code, 0, "{}{}", watched.stdout, watched.stderr);
    assert!(
        watched
            .stdout
            .contains(&format!("step draft succeeded (reused from {id})")),
        "{}",
        watched.stdout
    );
    assert!(
        watched.stdout.contains("step file started (attempt 1)"),
        "{}",
        watched.stdout
    );
    assert!(
        !watched.stdout.contains("step draft started"),
        "{}",
        watched.stdout
    );
    let retry = server.get(&format!("/v1/runs/{new}")).json();
    assert_eq!(retry["retry_of"], id);
    assert_eq!(
        retry["output"]["report"],
        "Filed \"Laptop for Grace Hopper, starting 2025-03-03\": the ticket system answered HTTP 200"
    );
    let shown = cli(&["get", &new]);
    assert!(
        shown.stdout.contains(&format!("reused from {id}")),
        "{}",
        shown.stdout
    );
}
