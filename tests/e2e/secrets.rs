//! Secrets: granted per step from `[secrets]` (env or file), readable through
//! `host.config`, and absent from everything a run leaves behind.

use serde_json::{Value, json};

use crate::http::TestServer;
use crate::support::{Sandbox, Serve, run_file, step};

const TOKEN: &str = "tok-7f3a9c1e-DO-NOT-LEAK";
const DB_PASSWORD: &str = "pw-correct-horse-battery";

fn leaky_workflow(echo: &TestServer) -> String {
    format!(
        r#"
name = "leaky"

# Gives the test time to follow the events live.
[[step]]
id = "wait"
plugin = "sleep"
input = {{ ms = 300 }}

# Writes the token to its log, stdout, stderr, progress and output.
[[step]]
id = "leak_out"
plugin = "probe"
input = {{ leak = "api_token" }}
secrets = ["api_token"]
needs = ["wait"]

# Fails with the password in its error message and details.
[[step]]
id = "leak_fail"
plugin = "probe"
input = {{ leak = "db_password", leak_error = true }}
secrets = ["db_password"]
on_failure = "continue"

# Sends the token to a server, which echoes it back.
[[step]]
id = "send"
plugin = "http-request"
input = {{ url = "{url}", bearer_config = "api_token" }}
secrets = ["api_token"]
allow_hosts = ["127.0.0.1:{port}"]

# Names no secret: cannot read them.
[[step]]
id = "nosy"
plugin = "probe"
input = {{ config = ["api_token", "db_password"] }}

# Gets what leak_out gave on.
[[step]]
id = "downstream"
plugin = "probe"
input = {{ got = "{{{{ steps.leak_out.output.leaked.value }}}}" }}
"#,
        url = echo.url("/echo"),
        port = echo.port
    )
}

fn assert_clean(what: &str, text: &str) {
    for secret in [TOKEN, DB_PASSWORD] {
        assert!(
            !text.contains(secret),
            "{what} contains a secret value:\n{text}"
        );
    }
}

#[test]
fn no_trace_of_a_secret_in_records_logs_events_errors_metrics_or_the_database() {
    let echo = TestServer::start();
    let serve = Serve::new().workflow("leaky.toml", &leaky_workflow(&echo));
    let secrets_dir = tempfile::tempdir().unwrap();
    let password_file = secrets_dir.path().join("db");
    std::fs::write(&password_file, format!("{DB_PASSWORD}\n")).unwrap();
    let config = format!(
        "[secrets]\napi_token = {{ env = \"TRELLIS_E2E_API_TOKEN\" }}\ndb_password = {{ file = \"{}\" }}\n",
        password_file.display()
    );
    let server = serve
        .config(&config)
        .env("TRELLIS_E2E_API_TOKEN", TOKEN)
        .env("TRELLIS_LOG", "trace")
        .start();

    let reply = server.post("/v1/workflows/leaky/runs", "{}");
    assert_eq!(reply.status, 202, "{}", reply.body);
    let submitted = reply.json();
    let id = submitted["id"].as_str().unwrap();
    // Followed live, to the end of the run.
    let events = server.events(id, &[]);
    let record = server.wait_for_run(id);
    assert_eq!(record["status"], "succeeded", "{record:#}");

    // The secrets did their job.
    let seen = echo.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["authorization"], format!("Bearer {TOKEN}"));
    // ... and every place the plugins put them shows the mask instead.
    let leak_out = step(&record, "leak_out");
    assert_eq!(leak_out["output"]["leaked"]["value"], "[REDACTED]");
    assert_eq!(
        leak_out["output"]["leaked"]["as_key"],
        json!({ "[REDACTED]": true })
    );
    let messages: Vec<String> = leak_out["attempts"][0]["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        messages,
        [
            "the value of api_token is [REDACTED]",
            "stdout: [REDACTED]",
            "stderr: [REDACTED]"
        ]
    );
    let leak_fail = step(&record, "leak_fail");
    assert_eq!(leak_fail["status"], "failed");
    assert_eq!(leak_fail["error"]["message"], "failed with [REDACTED]");
    assert_eq!(
        leak_fail["error"]["details"],
        json!({ "value": "[REDACTED]" })
    );
    let send = step(&record, "send");
    assert_eq!(
        send["output"]["json"]["headers"]["authorization"],
        "Bearer [REDACTED]"
    );
    let nosy = step(&record, "nosy");
    assert_eq!(
        nosy["output"]["config"],
        json!({ "api_token": null, "db_password": null })
    );
    assert_eq!(
        step(&record, "downstream")["output"]["input"]["got"],
        "[REDACTED]"
    );

    // Now grep everything: the record as the API gives it, the run list, the
    // event log (replayed from the start), metrics, the server's own log, and
    // every file in the data dir (SQLite database and WAL).
    assert_clean("the run record", &record.to_string());
    assert_clean("the run list", &server.get("/v1/runs").body);
    assert!(events.len() > 10, "{events:?}");
    let progress: Vec<&Value> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| &e.data)
        .collect();
    assert!(
        progress
            .iter()
            .any(|p| p.to_string().contains("using [REDACTED]")),
        "{progress:?}"
    );
    for event in &events {
        assert_clean("an event", &event.data.to_string());
    }
    // Replayed after the end, from the store.
    for event in server.events(id, &[("last-event-id", "0")]) {
        assert_clean("a replayed event", &event.data.to_string());
    }
    assert_clean("the metrics", &server.get("/metrics").body);
    // The database and its WAL, byte for byte, while the server still holds them.
    let files = grep_files(&server.data_dir());
    assert!(
        files.iter().any(|f| f.ends_with("trellis.db")),
        "no database among {files:?}"
    );
    let stderr = server.stderr();
    assert!(
        stderr.contains("leaky"),
        "the server logged nothing of the run"
    );
    assert_clean("the server log", &stderr);
}

/// Fails if a file under `dir` (symlinks not followed: the shared code cache)
/// holds a secret's bytes; returns the files read.
fn grep_files(dir: &std::path::Path) -> Vec<String> {
    let mut read = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        let path = entry.path();
        if kind.is_dir() {
            read.extend(grep_files(&path));
        } else if kind.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            for secret in [TOKEN, DB_PASSWORD] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{} holds a secret value",
                    path.display()
                );
            }
            read.push(path.display().to_string());
        }
    }
    read
}

#[test]
fn a_step_cannot_name_a_secret_that_is_not_configured() {
    let sandbox = Sandbox::new();
    let path = sandbox.write(
        "w.toml",
        "[[step]]\nid = \"a\"\nplugin = \"probe\"\nsecrets = [\"nope\"]\n",
    );
    let outcome = run_file(&path, None, &["--config", "/dev/null"]);
    assert_eq!(outcome.code, 2, "{outcome:?}");
    assert!(
        outcome.stderr.contains(&format!(
            "{}:4:12: secret \"nope\" is not configured: trellis.toml has no [secrets]",
            path.display()
        )),
        "{}",
        outcome.stderr
    );
}

#[test]
fn a_secret_whose_variable_is_unset_fails_the_step_without_retrying() {
    let sandbox = Sandbox::new();
    let config = sandbox.write(
        "trellis.toml",
        "[secrets]\ngone = { env = \"TRELLIS_E2E_NEVER_SET\" }\n",
    );
    let path = sandbox.write(
        "w.toml",
        "[retry]\nmax_attempts = 3\n\n[[step]]\nid = \"a\"\nplugin = \"probe\"\nsecrets = [\"gone\"]\n",
    );
    let outcome = run_file(
        &path,
        None,
        &["--json", "--config", config.to_str().unwrap()],
    );
    let record = outcome.json();
    let a = step(&record, "a");
    assert_eq!(a["status"], "failed");
    assert_eq!(
        a["error"],
        json!({
            "kind": "secret",
            "message": "secret \"gone\": environment variable TRELLIS_E2E_NEVER_SET is not set",
            "retryable": false,
        })
    );
}
