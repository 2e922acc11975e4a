//! Retries: attempts count from 1, backoff, retryable vs not.

use serde_json::json;

use crate::support::*;

#[test]
fn a_retryable_error_is_retried_until_it_passes() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[retry]
max_attempts = 5
backoff = "fixed"
initial = "50ms"

[[step]]
id = "flaky"
plugin = "fail"
input = { message = "try again", retryable = true, succeed_on_attempt = 3 }
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let flaky = step(&record, "flaky");
    assert_eq!(flaky["status"], "succeeded");
    assert_eq!(flaky["output"], json!({ "attempt": 3 }));
    let attempts = flaky["attempts"].as_array().unwrap();
    let numbers: Vec<u64> = attempts
        .iter()
        .map(|a| a["attempt"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    let statuses: Vec<&str> = attempts
        .iter()
        .map(|a| a["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["failed", "failed", "succeeded"]);
    assert_eq!(attempts[0]["error"]["message"], "try again");
    assert_eq!(attempts[0]["error"]["retryable"], true);
    // The backoff waited at least `initial` between attempts.
    for pair in attempts.windows(2) {
        let gap = millis(&pair[1]["started_at"]) - millis(&pair[0]["started_at"]);
        assert!(gap >= 50.0, "attempts only {gap} ms apart");
    }
}

#[test]
fn attempts_stop_at_max_attempts() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "flaky"
plugin = "fail"
retry = { max_attempts = 2, initial = "10ms" }
input = { message = "still down", retryable = true }
"#,
        None,
    );
    assert_eq!(outcome.code, 1);
    let flaky = step(&record, "flaky");
    assert_eq!(flaky["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(flaky["error"]["message"], "still down");
}

#[test]
fn a_non_retryable_error_is_not_retried() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[retry]
max_attempts = 4
initial = "10ms"

[[step]]
id = "fatal"
plugin = "fail"
input = { message = "bad request", retryable = false, details = { field = "email" } }
"#,
        None,
    );
    assert_eq!(outcome.code, 1);
    let fatal = step(&record, "fatal");
    assert_eq!(fatal["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(fatal["error"]["kind"], "task_error");
    assert_eq!(fatal["error"]["details"], json!({ "field": "email" }));
}

#[test]
fn exponential_backoff_doubles_the_wait() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        r#"
[[step]]
id = "flaky"
plugin = "fail"
retry = { max_attempts = 3, backoff = "exponential", initial = "100ms", max = "10s" }
input = { message = "later", retryable = true, succeed_on_attempt = 3 }
"#,
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let attempts = step(&record, "flaky")["attempts"]
        .as_array()
        .unwrap()
        .clone();
    let first_gap = millis(&attempts[1]["started_at"]) - millis(&attempts[0]["started_at"]);
    let second_gap = millis(&attempts[2]["started_at"]) - millis(&attempts[1]["started_at"]);
    assert!(first_gap >= 100.0, "first wait {first_gap} ms");
    assert!(second_gap >= 200.0, "second wait {second_gap} ms");
}
