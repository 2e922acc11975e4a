//! The C example plugin `checksum` (plugins/checksum, built by
//! `plugins/build.sh` through plugins/build-c.sh) run by the real binary in a
//! workflow next to Rust plugins: exact checksums, the step config default,
//! `host.log`, bad input as a fatal task error, and `plugins inspect`.
//!
//! The expected values were computed independently, with Python:
//! `zlib.crc32`, `zlib.adler32`, `hashlib.sha256`, and bit-by-bit CRC-32C
//! (polynomial 0x82F63B78) and FNV-1a loops.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::support::*;

/// A plugin dir holding only the built `checksum.wasm` (the whole polyglot
/// dir would make every test process compile the Python and JavaScript
/// components too), kept for the test binary's life.
fn c_plugins() -> &'static str {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let built = PathBuf::from(polyglot_plugins()).join("checksum.wasm");
        let dir = PathBuf::from(concat!(env!("CARGO_TARGET_TMPDIR"), "/e2e-c-plugins"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&built, dir.join("checksum.wasm"))
            .unwrap_or_else(|e| panic!("{}: {e}", built.display()));
        dir
    })
    .to_str()
    .unwrap()
}

/// `trellis run WORKFLOW --json` with the Rust example plugins and `checksum`.
fn run(workflow: &str, input: Option<&str>) -> (Outcome, Value) {
    let sandbox = Sandbox::new();
    let path = sandbox.write("workflow.toml", workflow);
    let outcome = run_with_dirs(&path, input, &[EXAMPLE_PLUGINS, c_plugins()], &["--json"]);
    let record = outcome.json();
    (outcome, record)
}

const PIPELINE: &str = r#"
name = "host-buckets"

# Every algorithm of the C plugin over the same text.
[[step]]
id = "sums"
plugin = "checksum"
for_each = "{{ input.algorithms }}"
input = { data = "{{ input.host }}", algorithm = "{{ item }}" }

# crc32 with a bucket: which of 4 canary groups the host joins.
[[step]]
id = "bucket"
plugin = "checksum"
input = { data = "{{ input.host }}", buckets = 4 }

# No algorithm in the input: the step config's (read through host.config).
[[step]]
id = "configured"
plugin = "checksum"
config = { algorithm = "fnv1a32" }
input = { data = "{{ input.host }}" }

# A Rust plugin on the same text.
[[step]]
id = "sha"
plugin = "hash"
input = { data = "{{ input.host }}" }

# A Rust plugin on the C plugin's output.
[[step]]
id = "note"
plugin = "template"
input.template = "{% raw %}{{ host }}: canary group {{ bucket.bucket }} (crc32 {{ bucket.hex }}, sha256 {{ sha[:12] }}){% endraw %}"
input.vars = { host = "{{ input.host }}", bucket = "{{ steps.bucket.output }}", sha = "{{ steps.sha.output.digest }}" }

[output]
note = "{{ steps.note.output.text }}"
bucket = "{{ steps.bucket.output.bucket }}"
"#;

#[test]
fn checksum_runs_in_a_workflow_next_to_rust_steps() {
    let input = json!({
        "host": "db-02.example.com",
        "algorithms": ["crc32", "crc32c", "adler32", "fnv1a32"]
    })
    .to_string();
    let (outcome, record) = run(PIPELINE, Some(&input));
    assert_eq!(outcome.code, 0, "{}\n{record:#}", outcome.stderr);
    assert_eq!(record["status"], "succeeded", "{record:#}");
    assert_eq!(step(&record, "sums")["plugin"], "checksum");
    assert_eq!(step(&record, "sums")["plugin_version"], "1.0.0");
    assert_eq!(
        step(&record, "sums")["output"],
        json!([
            { "algorithm": "crc32", "value": 3819343465u32, "hex": "e3a68e69", "bytes": 17 },
            { "algorithm": "crc32c", "value": 757295579, "hex": "2d2369db", "bytes": 17 },
            { "algorithm": "adler32", "value": 828311005, "hex": "315f05dd", "bytes": 17 },
            { "algorithm": "fnv1a32", "value": 3597336195u32, "hex": "d66afe83", "bytes": 17 },
        ])
    );
    assert_eq!(
        step(&record, "bucket")["output"],
        json!({ "algorithm": "crc32", "value": 3819343465u32, "hex": "e3a68e69", "bytes": 17, "bucket": 1 })
    );
    assert_eq!(
        step(&record, "configured")["output"],
        json!({ "algorithm": "fnv1a32", "value": 3597336195u32, "hex": "d66afe83", "bytes": 17 })
    );
    // host.log from C lands in the step's log.
    let attempt = &step(&record, "configured")["attempts"][0];
    assert_eq!(attempt["logs"][0]["level"], "debug", "{attempt:#}");
    assert_eq!(
        attempt["logs"][0]["message"],
        "fnv1a32 of 17 bytes: d66afe83"
    );
    assert_eq!(
        record["output"],
        json!({
            "note": "db-02.example.com: canary group 1 (crc32 e3a68e69, sha256 17a44bc7037e)",
            "bucket": 1
        })
    );
}

#[test]
fn checksum_hashes_utf8_bytes_and_escaped_characters() {
    // Non-ASCII text is its UTF-8 bytes (19 here); JSON escapes (which the
    // host writes for control characters, quotes and backslashes) are decoded
    // by the plugin's JSON reader before hashing.
    let workflow = r#"
[[step]]
id = "utf8"
plugin = "checksum"
input = { data = "Grüße, 世界 ✓", algorithm = "crc32c", buckets = 4294967295 }

[[step]]
id = "escaped"
plugin = "checksum"
input = "{{ input }}"
"#;
    let input =
        r#"{"data": "tab\there \"quoted\" back\\slash nul\u0000 unit\u001f end", "buckets": 1000}"#;
    let (outcome, record) = run(workflow, Some(input));
    assert_eq!(outcome.code, 0, "{}\n{record:#}", outcome.stderr);
    assert_eq!(
        step(&record, "utf8")["output"],
        json!({ "algorithm": "crc32c", "value": 3110006788u32, "hex": "b95ef004", "bytes": 19, "bucket": 3110006788u32 })
    );
    assert_eq!(
        step(&record, "escaped")["output"],
        json!({ "algorithm": "crc32", "value": 988160491, "hex": "3ae621eb", "bytes": 43, "bucket": 491 })
    );
}

#[test]
fn checksum_bad_input_is_a_fatal_task_error_naming_the_field() {
    let workflow = r#"
[retry]
max_attempts = 3
initial = "10ms"

[[step]]
id = "sum"
plugin = "checksum"
input = "{{ input }}"
"#;
    let cases = [
        (
            r#"{"data": "x", "algorithm": "md5"}"#,
            "invalid input: field `algorithm`: unknown algorithm \"md5\", expected one of crc32, crc32c, adler32, fnv1a32",
            Some("algorithm"),
        ),
        (
            r#"{"algorithm": "crc32"}"#,
            "invalid input: missing field `data`",
            Some("data"),
        ),
        (
            r#"{"data": ["x"]}"#,
            "invalid input: field `data`: expected a string, got array",
            Some("data"),
        ),
        (
            r#"{"data": "x", "buckets": 0}"#,
            "invalid input: field `buckets`: expected an integer from 1 to 4294967295, got 0",
            Some("buckets"),
        ),
        (
            r#"{"data": "x", "buckets": 2.5}"#,
            "invalid input: field `buckets`: expected an integer from 1 to 4294967295, got 2.5",
            Some("buckets"),
        ),
        (
            r#"{"data": "x", "salt": "y"}"#,
            "invalid input: unknown field `salt`, expected one of `data`, `algorithm`, `buckets`",
            None,
        ),
        (
            r#"["x"]"#,
            "invalid input: expected an object, got array",
            None,
        ),
    ];
    for (input, message, field) in cases {
        let (outcome, record) = run(workflow, Some(input));
        assert_eq!(outcome.code, 1, "{input}: {}", outcome.stderr);
        assert_eq!(record["status"], "failed", "{input}");
        let failed = step(&record, "sum");
        let error = &failed["error"];
        assert_eq!(error["kind"], "task_error", "{input}: {failed:#}");
        assert_eq!(error["message"], message, "{input}");
        assert_eq!(error["retryable"], false, "{input}");
        match field {
            Some(field) => assert_eq!(error["details"], json!({ "field": field }), "{input}"),
            None => assert!(error.get("details").is_none(), "{input}: {error}"),
        }
        assert_eq!(
            failed["attempts"].as_array().unwrap().len(),
            1,
            "{input}: a fatal error is not retried"
        );
        assert!(
            outcome.stderr.contains("step `sum` failed") && outcome.stderr.contains(message),
            "{input}: {}",
            outcome.stderr
        );
    }

    // A bad default in the step config is the step's error too.
    let (outcome, record) = run(
        r#"
[[step]]
id = "sum"
plugin = "checksum"
config = { algorithm = "sha1" }
input = { data = "x" }
"#,
        None,
    );
    assert_eq!(outcome.code, 1, "{}", outcome.stderr);
    assert_eq!(
        step(&record, "sum")["error"]["message"],
        "invalid input: step config `algorithm`: unknown algorithm \"sha1\", expected one of crc32, crc32c, adler32, fnv1a32"
    );
}

#[test]
fn checksum_inspect_shows_its_info_and_schemas() {
    let path = format!("{}/checksum.wasm", polyglot_plugins());
    let outcome = exec(&["plugins", "inspect", &path]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let info = outcome.json();
    assert_eq!(info["name"], "checksum");
    assert_eq!(info["version"], "1.0.0");
    assert!(
        info["description"]
            .as_str()
            .unwrap()
            .starts_with("32-bit checksum of a text"),
        "{info:#}"
    );
    assert_eq!(info["input_schema"]["required"], json!(["data"]));
    assert_eq!(
        info["input_schema"]["properties"]["algorithm"]["enum"],
        json!(["crc32", "crc32c", "adler32", "fnv1a32"])
    );
    assert_eq!(
        info["output_schema"]["required"],
        json!(["algorithm", "value", "hex", "bytes"])
    );
    let imports: Vec<&str> = info["imports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert!(
        imports.contains(&"trellis:plugin/host@0.1.0"),
        "{imports:?}"
    );
    // wasi-libc's needs, adapted to WASI 0.2; no network.
    assert!(
        imports.iter().any(|i| i.starts_with("wasi:cli/stdout@0.2")),
        "{imports:?}"
    );
    assert!(
        !imports
            .iter()
            .any(|i| i.starts_with("wasi:http") || i.starts_with("wasi:sockets")),
        "{imports:?}"
    );
    // Small: about 64 KiB, wasi-libc (printf) and the WASI adapter included.
    let size = info["size"].as_u64().unwrap();
    assert!(size < 200 * 1024, "{size} bytes");
}
