//! Helpers: a temp dir per test, workflow files written into it, the binary
//! run with the example and fixture plugin dirs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The example plugins the build made.
pub const EXAMPLE_PLUGINS: &str = env!("TRELLIS_BUILTIN_PLUGIN_DIR");
/// The test fixtures (noop, fail, spin, sleep, probe, hostile).
pub const FIXTURE_PLUGINS: &str = env!("TRELLIS_TEST_PLUGIN_DIR");

/// The workspace root (for `workflows/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The binary, with the compiled-code cache shared by every test (the first
/// test to load a plugin compiles it; the rest deserialize it).
pub fn trellis() -> Command {
    static WARM: std::sync::Once = std::sync::Once::new();
    // Fill the cache once, before every test's process would compile the same
    // plugins at the same time.
    WARM.call_once(|| {
        let status = bare()
            .args([
                "plugins",
                "list",
                "--plugin-dir",
                EXAMPLE_PLUGINS,
                "--plugin-dir",
                FIXTURE_PLUGINS,
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "the plugins do not load");
    });
    bare()
}

fn bare() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_trellis"));
    cmd.env(
        "TRELLIS_DATA_DIR",
        concat!(env!("CARGO_TARGET_TMPDIR"), "/e2e-data"),
    );
    cmd
}

/// A finished `trellis` process.
#[derive(Debug)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn from(output: Output) -> Outcome {
        Outcome {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// A temp dir holding workflow files for one test.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        Sandbox {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `trellis run FILE --json` with both plugin dirs and an optional input.
    pub fn run_json(&self, workflow: &str, input: Option<&str>) -> (Outcome, Value) {
        let path = self.write("workflow.toml", workflow);
        let outcome = run_file(&path, input, &["--json"]);
        let record = outcome.json();
        (outcome, record)
    }
}

/// `trellis run PATH` with both plugin dirs.
pub fn run_file(path: &Path, input: Option<&str>, extra: &[&str]) -> Outcome {
    let mut cmd = trellis();
    cmd.arg("run").arg(path).args([
        "--plugin-dir",
        EXAMPLE_PLUGINS,
        "--plugin-dir",
        FIXTURE_PLUGINS,
    ]);
    if let Some(input) = input {
        cmd.args(["--input", input]);
    }
    cmd.args(extra);
    Outcome::from(cmd.output().unwrap())
}

/// `trellis ARGS...` as given.
pub fn exec(args: &[&str]) -> Outcome {
    Outcome::from(trellis().args(args).output().unwrap())
}

/// The step record with `id`.
pub fn step<'a>(record: &'a Value, id: &str) -> &'a Value {
    record["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {record:#}"))
}

/// Milliseconds since the epoch of an RFC 3339 timestamp.
pub fn millis(timestamp: &Value) -> f64 {
    let time = humantime::parse_rfc3339(timestamp.as_str().unwrap()).unwrap();
    time.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// (start, end) of a step's first attempt, in ms since the epoch.
pub fn span(record: &Value, id: &str) -> (f64, f64) {
    let attempt = &step(record, id)["attempts"][0];
    let start = millis(&attempt["started_at"]);
    (start, start + attempt["duration_ms"].as_f64().unwrap())
}
