//! Misbehaving plugins: each is stopped or contained with its own reason, and
//! the host goes on serving: the next step, and the next run in the same
//! process, succeed.
//!
//! Besides the `hostile` fixture (Rust), components written by hand in
//! `plugins/fixtures/wat/` do what no language's bindings would emit: grow a
//! table without end, define many memories, return bytes that are not UTF-8
//! ([`wat_plugins`] turns them into binaries).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Value, json};

use crate::support::*;

/// The components of `plugins/fixtures/wat/`, encoded once per test binary.
pub struct WatPlugins {
    /// The loadable ones (`wat-table-grow`, `wat-invalid-utf8`,
    /// `wat-many-memories`): a plugin dir.
    pub dir: PathBuf,
    /// The ones a host must refuse at load (`refused/`), as files.
    pub refused: PathBuf,
}

impl WatPlugins {
    pub fn dir(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    /// `refused/<name>.wat` as a binary.
    pub fn refused(&self, name: &str) -> PathBuf {
        self.refused.join(format!("{name}.wasm"))
    }
}

/// Encodes `plugins/fixtures/wat/*.wat` into `CARGO_TARGET_TMPDIR/wat-plugins/`
/// and `refused/*.wat` into `.../wat-refused/` (with the `wat` crate, as
/// wasmtime's own tests do; nothing binary is committed).
pub fn wat_plugins() -> &'static WatPlugins {
    static ENCODED: OnceLock<WatPlugins> = OnceLock::new();
    ENCODED.get_or_init(|| {
        let source = workspace().join("plugins").join("fixtures").join("wat");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let plugins = WatPlugins {
            dir: out.join("wat-plugins"),
            refused: out.join("wat-refused"),
        };
        encode_dir(&source, &plugins.dir);
        encode_dir(&source.join("refused"), &plugins.refused);
        plugins
    })
}

fn encode_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "wat") {
            continue;
        }
        let bytes = wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let dest = to.join(path.with_extension("wasm").file_name().unwrap());
        // Rewritten only when it changed: a server watching the dir of
        // another test sees no event.
        if std::fs::read(&dest).ok().as_deref() != Some(&bytes[..]) {
            let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, &bytes).unwrap();
            std::fs::rename(&tmp, &dest).unwrap();
        }
    }
}

/// A TCP server on 127.0.0.1 that reads each request's head, sends `reply`
/// (maybe nothing) and then holds the connection open without a further
/// byte: an HTTP server that stalls.
pub struct StalledServer {
    pub port: u16,
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl StalledServer {
    pub fn start(reply: &'static [u8]) -> StalledServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let keep = keep.clone();
                std::thread::spawn(move || {
                    // After the request: hyper drops a connection that
                    // answers before it has sent its request.
                    let mut head = Vec::new();
                    let mut chunk = [0; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = stream.write_all(reply);
                    keep.lock().unwrap().push(stream);
                });
            }
        });
        StalledServer { port, _held: held }
    }
}

/// Runs `plugin` with `input` as the only step of a workflow whose top holds
/// `head` (`[limits]`, `[retry]`), with the fixture and WAT plugin dirs.
fn one_step(head: &str, plugin: &str, step_extra: &str, input: &str) -> Value {
    let sandbox = Sandbox::new();
    let path = sandbox.write(
        "workflow.toml",
        &format!(
            r#"
{head}

[[step]]
id = "bad"
plugin = "{plugin}"
input = {input}
{step_extra}
"#
        ),
    );
    let outcome = run_with_dirs(
        &path,
        None,
        &[EXAMPLE_PLUGINS, FIXTURE_PLUGINS, wat_plugins().dir()],
        &["--json"],
    );
    assert!(outcome.code == 0 || outcome.code == 1, "{}", outcome.stderr);
    step(&outcome.json(), "bad").clone()
}

/// Runs `hostile` with `input` under `limits` as the only step of a workflow.
fn hostile(limits: &str, input: &str) -> Value {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        &format!(
            r#"
[limits]
{limits}

[[step]]
id = "bad"
plugin = "hostile"
input = {input}
"#
        ),
        None,
    );
    assert!(outcome.code == 0 || outcome.code == 1, "{}", outcome.stderr);
    step(&record, "bad").clone()
}

fn kind(step: &Value) -> &str {
    step["error"]["kind"].as_str().unwrap_or("none")
}

fn message(step: &Value) -> &str {
    step["error"]["message"].as_str().unwrap_or("")
}

#[test]
fn an_infinite_loop_is_stopped_by_fuel() {
    let bad = hostile(
        "fuel = 50_000_000\ntimeout = \"30s\"",
        r#"{ mode = "loop" }"#,
    );
    assert_eq!(kind(&bad), "fuel_exhausted", "{bad:#}");
    assert_eq!(bad["attempts"][0]["fuel_consumed"], 50_000_000);
}

#[test]
fn an_infinite_loop_is_stopped_by_the_timeout() {
    let bad = hostile(
        "fuel = 1_000_000_000_000\ntimeout = \"300ms\"",
        r#"{ mode = "loop" }"#,
    );
    assert_eq!(kind(&bad), "timeout", "{bad:#}");
    let took = bad["attempts"][0]["duration_ms"].as_f64().unwrap();
    assert!((300.0..3000.0).contains(&took), "stopped after {took} ms");
}

#[test]
fn a_guest_parked_in_a_host_call_is_stopped_by_the_timeout() {
    let bad = hostile("timeout = \"300ms\"", r#"{ mode = "sleep_forever" }"#);
    assert_eq!(kind(&bad), "timeout", "{bad:#}");
    assert!(bad["attempts"][0]["duration_ms"].as_f64().unwrap() < 3000.0);
}

#[test]
fn unbounded_allocation_hits_the_memory_limit() {
    let bad = hostile("memory = \"32MiB\"", r#"{ mode = "alloc" }"#);
    assert_eq!(kind(&bad), "memory_limit", "{bad:#}");
    assert!(message(&bad).contains("32.0 MiB"), "{bad:#}");
    assert!(bad["attempts"][0]["peak_memory"].as_u64().unwrap() <= 32 * 1024 * 1024);
}

#[test]
fn infinite_recursion_is_stopped() {
    let bad = hostile("", r#"{ mode = "recurse" }"#);
    // Rust's shadow stack in linear memory usually runs out first (an
    // out-of-bounds trap); a native stack overflow is the other outcome.
    assert!(matches!(kind(&bad), "stack_overflow" | "trap"), "{bad:#}");
    assert!(
        message(&bad).contains("stack") || message(&bad).contains("out of bounds"),
        "{bad:#}"
    );
}

#[test]
fn a_panic_reports_the_panic_message() {
    let bad = hostile("", r#"{ mode = "panic" }"#);
    assert_eq!(kind(&bad), "panic", "{bad:#}");
    assert!(
        message(&bad).contains("hostile plugin panicked on purpose"),
        "{bad:#}"
    );
    assert!(message(&bad).contains("panicked at"), "{bad:#}");
}

#[test]
fn oversized_output_is_refused() {
    let bad = hostile(
        "max_output = \"1MiB\"",
        r#"{ mode = "big_output", bytes = 2_097_152 }"#,
    );
    assert_eq!(kind(&bad), "output_too_large", "{bad:#}");
    assert!(message(&bad).contains("1.0 MiB"), "{bad:#}");
}

#[test]
fn output_that_is_not_json_is_refused() {
    let bad = hostile("", r#"{ mode = "bad_json" }"#);
    assert_eq!(kind(&bad), "invalid_output", "{bad:#}");
    assert!(message(&bad).contains("this is not json"), "{bad:#}");
}

#[test]
fn a_stdout_flood_is_cut_at_the_log_limit() {
    let bad = hostile(
        "max_log = \"64KiB\"",
        r#"{ mode = "stdout_flood", bytes = 4_000_000 }"#,
    );
    // Contained: the step finishes, the log keeps 64 KiB and counts the rest.
    assert_eq!(bad["status"], "succeeded", "{bad:#}");
    let attempt = &bad["attempts"][0];
    let kept: usize = attempt["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap().len())
        .sum();
    assert!(kept <= 64 * 1024 + 200, "kept {kept} bytes of log");
    assert!(attempt["log_bytes_dropped"].as_u64().unwrap() > 3_000_000);
    let last = attempt["logs"].as_array().unwrap().last().unwrap();
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("log truncated"),
        "{last:#}"
    );
}

#[test]
fn an_endless_stdout_flood_is_stopped() {
    // Writing costs the guest little fuel but the host real work, so output far
    // past the log limit stops the attempt.
    let bad = hostile("max_log = \"16KiB\"", r#"{ mode = "stdout_flood" }"#);
    assert_eq!(kind(&bad), "log_flood", "{bad:#}");
    assert!(message(&bad).contains("stdout"), "{bad:#}");
    assert!(bad["attempts"][0]["duration_ms"].as_f64().unwrap() < 30_000.0);
}

#[test]
fn reading_a_host_file_is_denied() {
    let bad = hostile("", r#"{ mode = "read_file", path = "/etc/passwd" }"#);
    assert_eq!(kind(&bad), "task_error", "{bad:#}");
    assert!(message(&bad).starts_with("read /etc/passwd:"), "{bad:#}");
    assert!(
        !bad.to_string().contains("root:"),
        "the file leaked: {bad:#}"
    );
}

#[test]
fn the_environment_is_empty() {
    // SAFETY of the assertion: the test process has variables (PATH at least).
    assert!(std::env::var_os("PATH").is_some());
    let bad = hostile("", r#"{ mode = "read_env" }"#);
    assert_eq!(bad["status"], "succeeded", "{bad:#}");
    assert_eq!(bad["output"]["vars"], json!([]));
    assert_eq!(bad["output"]["home"], json!(null));
}

/// In one process: every hostile mode, then a healthy run, on one executor.
#[test]
fn the_next_run_in_the_same_process_succeeds() {
    use trellis::engine::{Engine, Limits};
    use trellis::executor::{Executor, RunOptions};
    use trellis::plugin::{MemoryStateStore, PluginRegistry};
    use trellis::record::RunStatus;

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let registry = PluginRegistry::new(Engine::new().unwrap()).unwrap();
        let report = registry.load_dirs(&[FIXTURE_PLUGINS.into()]).await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let registry = Arc::new(registry);
        let executor = Executor::new(
            registry.clone(),
            Limits::default(),
            8,
            Arc::new(MemoryStateStore::default()),
        );
        let plan = |text: &str| {
            Arc::new(
                trellis::workflow::parse_str(text, "inline.toml", "inline", registry.as_ref())
                    .unwrap(),
            )
        };

        let hostile = plan(
            r#"
[limits]
fuel = 100_000_000
memory = "16MiB"
timeout = "500ms"
max_output = "64KiB"

[[step]]
id = "bad"
plugin = "hostile"
input = { mode = "{{ input.mode }}", bytes = 1_000_000 }
"#,
        );
        let healthy = plan(
            r#"
[[step]]
id = "ok"
plugin = "noop"
input = { fine = true }
"#,
        );
        for mode in [
            "loop",
            "alloc",
            "recurse",
            "panic",
            "big_output",
            "bad_json",
            "sleep_forever",
        ] {
            let record = executor
                .run(
                    hostile.clone(),
                    json!({ "mode": mode }),
                    RunOptions::default(),
                )
                .await;
            assert_eq!(record.status, RunStatus::Failed, "mode {mode}: {record:#?}");
            let record = executor
                .run(healthy.clone(), json!({}), RunOptions::default())
                .await;
            assert_eq!(
                record.status,
                RunStatus::Succeeded,
                "after {mode}: {record:#?}"
            );
            assert_eq!(record.output, json!({ "ok": { "fine": true } }));
        }
    });
}

#[test]
fn a_table_that_grows_without_end_hits_the_table_limit() {
    let bad = one_step("[retry]\nmax_attempts = 3", "wat-table-grow", "", "{}");
    assert_eq!(kind(&bad), "table_limit", "{bad:#}");
    assert_eq!(
        message(&bad),
        "the instance asked for a table of 100001 elements; a table may hold at most 100000",
        "{bad:#}"
    );
    assert_eq!(bad["error"]["retryable"], false);
    assert_eq!(bad["attempts"].as_array().unwrap().len(), 1, "not retried");
    // The 64 KiB memory and 99,001 elements of 8 bytes (1 + 99 x 1,000):
    // the refused growth and the ones after it are not counted.
    assert_eq!(
        bad["attempts"][0]["peak_memory"].as_u64().unwrap(),
        65_536 + 99_001 * 8
    );
}

#[test]
fn many_memories_add_up_against_the_memory_limit() {
    let bad = one_step(
        "[limits]\nmemory = \"16MiB\"",
        "wat-many-memories",
        "",
        "{}",
    );
    assert_eq!(kind(&bad), "memory_limit", "{bad:#}");
    assert!(
        message(&bad).contains("the step allows 16.0 MiB"),
        "{bad:#}"
    );
    assert!(bad["attempts"][0]["peak_memory"].as_u64().unwrap() <= 16 << 20);
    // With room, the sixteen memories (30 MiB) are fine.
    let good = one_step("", "wat-many-memories", "", "{}");
    assert_eq!(good["status"], "succeeded", "{good:#}");
    assert_eq!(good["output"], json!({ "memories": 16 }));
    assert_eq!(
        good["attempts"][0]["peak_memory"].as_u64().unwrap(),
        15 * (2 << 20) + 65_536
    );
}

#[test]
fn a_component_with_too_many_memories_is_refused_at_load() {
    let file = wat_plugins().refused("too-many-memories");
    let outcome = exec(&["plugins", "inspect", file.to_str().unwrap()]);
    assert_eq!(outcome.code, 2, "{outcome:?}");
    assert!(
        outcome.stderr.contains("is not a usable plugin")
            && outcome.stderr.contains("21 Wasm linear memories")
            && outcome.stderr.contains("maximum of 16"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn output_that_is_not_utf8_is_refused_and_not_retried() {
    let bad = one_step(
        "[retry]\nmax_attempts = 3\ninitial = \"10ms\"",
        "wat-invalid-utf8",
        "",
        "{}",
    );
    assert_eq!(kind(&bad), "invalid_output", "{bad:#}");
    assert_eq!(
        message(&bad),
        "the plugin handed the host a string that is not UTF-8 (invalid utf-8 sequence of 1 bytes from index 4)",
        "{bad:#}"
    );
    assert_eq!(bad["error"]["retryable"], false);
    assert_eq!(bad["attempts"].as_array().unwrap().len(), 1, "not retried");
}

#[test]
fn output_that_is_not_json_is_not_retried() {
    let bad = one_step(
        "[retry]\nmax_attempts = 3\ninitial = \"10ms\"",
        "hostile",
        "",
        r#"{ mode = "bad_json" }"#,
    );
    assert_eq!(kind(&bad), "invalid_output", "{bad:#}");
    assert_eq!(bad["attempts"].as_array().unwrap().len(), 1, "not retried");
}

/// An `http-request` step to `server` with a 1 s timeout and no retry.
fn stalled_request(server: &StalledServer) -> Value {
    one_step(
        "[limits]\ntimeout = \"1s\"",
        "http-request",
        &format!("allow_hosts = [\"127.0.0.1:{}\"]", server.port),
        &format!(r#"{{ url = "http://127.0.0.1:{}/slow" }}"#, server.port),
    )
}

#[test]
fn a_guest_waiting_on_a_server_that_never_answers_is_stopped_by_the_timeout() {
    let server = StalledServer::start(b"");
    let bad = stalled_request(&server);
    assert_eq!(kind(&bad), "timeout", "{bad:#}");
    assert_eq!(
        message(&bad),
        "the attempt ran longer than its timeout of 1s"
    );
    let took = bad["attempts"][0]["duration_ms"].as_f64().unwrap();
    assert!((1000.0..3000.0).contains(&took), "stopped after {took} ms");
}

#[test]
fn a_guest_reading_a_body_that_stalls_is_stopped_by_the_timeout() {
    let server = StalledServer::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\n\r\nthe first bytes",
    );
    let bad = stalled_request(&server);
    assert_eq!(kind(&bad), "timeout", "{bad:#}");
    let took = bad["attempts"][0]["duration_ms"].as_f64().unwrap();
    assert!((1000.0..3000.0).contains(&took), "stopped after {took} ms");
}

#[test]
fn an_info_that_loops_is_cut_off_at_load() {
    let file = Path::new(env!("TRELLIS_SWAP_PLUGIN_DIR")).join("slow-info.wasm");
    let outcome = exec(&["plugins", "inspect", file.to_str().unwrap()]);
    assert_eq!(outcome.code, 2, "{outcome:?}");
    assert!(
        outcome.stderr.contains(
            "info() failed: it used all of its 100000000 fuel without answering (info() must answer at once: does it loop?)"
        ),
        "{}",
        outcome.stderr
    );
}
