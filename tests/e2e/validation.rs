//! `trellis validate` and `trellis run` refuse bad workflows with every
//! problem at once, each at its file, line and column, and exit 2.

use crate::support::*;

/// Validates `text` and returns (exit code, stderr), with the file shown as
/// its full path.
pub(crate) fn validate(text: &str) -> (i32, String, String) {
    let sandbox = Sandbox::new();
    let path = sandbox.write("flow.toml", text);
    let outcome = exec(&[
        "validate",
        path.to_str().unwrap(),
        "--plugin-dir",
        EXAMPLE_PLUGINS,
        "--plugin-dir",
        FIXTURE_PLUGINS,
    ]);
    (outcome.code, outcome.stderr, path.display().to_string())
}

pub(crate) fn assert_reports(stderr: &str, file: &str, line: usize, column: usize, words: &[&str]) {
    let prefix = format!("{file}:{line}:{column}: ");
    let found = stderr.lines().find(|l| l.starts_with(&prefix));
    let Some(found) = found else {
        panic!("no diagnostic at {prefix} in:\n{stderr}")
    };
    for word in words {
        assert!(found.contains(word), "`{found}` does not mention {word:?}");
    }
}

#[test]
fn unknown_fields_are_all_reported_with_their_location() {
    let (code, stderr, file) = validate(
        r#"name = "x"
colour = "blue"

[[step]]
id = "a"
plugin = "noop"
inputs = 1
retries = 3
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert_reports(&stderr, &file, 2, 1, &["colour"]);
    assert_reports(&stderr, &file, 7, 1, &["inputs"]);
    assert_reports(&stderr, &file, 8, 1, &["retries"]);
}

#[test]
fn unknown_plugin_unknown_need_and_unknown_reference() {
    let (code, stderr, file) = validate(
        r#"[[step]]
id = "a"
plugin = "no-such-plugin"

[[step]]
id = "b"
plugin = "noop"
needs = ["a", "ghost"]

[[step]]
id = "c"
plugin = "noop"
input = { x = "{{ steps.phantom.output }}" }
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert_reports(&stderr, &file, 3, 10, &["no-such-plugin"]);
    assert_reports(&stderr, &file, 8, 15, &["ghost"]);
    // The column of `steps.phantom` inside the string.
    assert_reports(&stderr, &file, 13, 19, &["phantom"]);
}

#[test]
fn a_cycle_is_reported_with_its_path() {
    let (code, stderr, file) = validate(
        r#"[[step]]
id = "a"
plugin = "noop"
needs = ["b"]

[[step]]
id = "b"
plugin = "noop"
input = "{{ steps.a.output }}"
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&format!("{file}:")), "{stderr}");
    assert!(stderr.contains("cycle"), "{stderr}");
    assert!(
        stderr.contains("a -> b -> a") || stderr.contains("b -> a -> b"),
        "{stderr}"
    );
}

#[test]
fn duplicate_ids_and_bad_templates() {
    let (code, stderr, file) = validate(
        r#"[[step]]
id = "a"
plugin = "noop"

[[step]]
id = "a"
plugin = "noop"
input = "{{ input.x "
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert_reports(&stderr, &file, 6, 6, &["duplicate", "a"]);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("{file}:8:")) && l.contains("template")),
        "{stderr}"
    );
}

#[test]
fn bad_values_are_located() {
    let (code, stderr, file) = validate(
        r#"[limits]
timeout = "ten seconds"

[[step]]
id = "fetch-user"
plugin = "noop"
for_each = "{{ input.list }}"

[[step]]
id = "b"
plugin = "noop"
input = "{{ item }}"
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("{file}:2:")) && l.contains("timeout")),
        "{stderr}"
    );
    assert_reports(&stderr, &file, 5, 6, &["fetch-user"]);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with(&format!("{file}:12:")) && l.contains("item")),
        "{stderr}"
    );
}

#[test]
fn a_toml_syntax_error_is_located() {
    let (code, stderr, file) = validate("[[step]]\nid = \"a\nplugin = \"noop\"\n");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&format!("{file}:2:")), "{stderr}");
}

#[test]
fn run_refuses_an_invalid_workflow_with_exit_2_and_no_output() {
    let sandbox = Sandbox::new();
    let path = sandbox.write("flow.toml", "[[step]]\nid = \"a\"\nplugin = \"nope\"\n");
    let outcome = run_file(&path, None, &[]);
    assert_eq!(outcome.code, 2);
    assert_eq!(outcome.stdout, "");
    assert!(outcome.stderr.contains("nope"), "{}", outcome.stderr);
}
