//! Helpers: a temp dir per test, workflow files written into it, the binary
//! run with the example and fixture plugin dirs; `trellis serve` on a free
//! port and an HTTP client for it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The example plugins the build made.
pub const EXAMPLE_PLUGINS: &str = env!("TRELLIS_BUILTIN_PLUGIN_DIR");
/// The test fixtures (noop, fail, spin, sleep, probe, hostile).
pub const FIXTURE_PLUGINS: &str = env!("TRELLIS_TEST_PLUGIN_DIR");

/// The Python, JavaScript and C example plugins, which `plugins/build.sh`
/// makes (it installs its pinned tools on first use). Runs the script once
/// per test binary, so `cargo test` alone builds them; returns their dir.
pub fn polyglot_plugins() -> &'static str {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let output = Command::new("bash")
            .arg(workspace().join("plugins").join("build.sh"))
            .output()
            .expect("running plugins/build.sh");
        assert!(
            output.status.success(),
            "plugins/build.sh failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    });
    env!("TRELLIS_POLYGLOT_PLUGIN_DIR")
}

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
    pub fn from(output: Output) -> Outcome {
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
    run_with_dirs(path, input, &[EXAMPLE_PLUGINS, FIXTURE_PLUGINS], extra)
}

/// `trellis run PATH` with these plugin dirs.
pub fn run_with_dirs(path: &Path, input: Option<&str>, dirs: &[&str], extra: &[&str]) -> Outcome {
    let mut cmd = trellis();
    cmd.arg("run").arg(path);
    for dir in dirs {
        cmd.args(["--plugin-dir", dir]);
    }
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

/// A `trellis serve` to start: a temp dir with `workflows/`, `data/` (whose
/// compiled-code cache is the one every test shares) and optionally a
/// `trellis.toml`.
pub struct Serve {
    dir: tempfile::TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Serve {
    /// `serve --bind 127.0.0.1:0` with the example and fixture plugins and
    /// the temp dir's `workflows/` (empty until [`Serve::workflow`]).
    pub fn new() -> Serve {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("workflows")).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        // Warm the shared cache (once per test binary), then use it.
        drop(trellis());
        let shared = Path::new(concat!(env!("CARGO_TARGET_TMPDIR"), "/e2e-data/cache"));
        #[cfg(unix)]
        std::os::unix::fs::symlink(shared, data.join("cache")).unwrap();
        Serve::in_dir(dir)
    }

    /// The same server again, on the data and workflows of a stopped one.
    pub fn in_dir(dir: tempfile::TempDir) -> Serve {
        let data = dir.path().join("data");
        let workflows = dir.path().join("workflows");
        let mut args: Vec<String> = [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // A server's own plugin dir (see `own_plugin_dir`) comes first.
        let own = dir.path().join("plugins");
        if own.is_dir() {
            args.extend(["--plugin-dir".to_owned(), own.to_str().unwrap().to_owned()]);
        }
        for arg in [
            "--plugin-dir",
            EXAMPLE_PLUGINS,
            "--plugin-dir",
            FIXTURE_PLUGINS,
            "--workflow-dir",
        ] {
            args.push(arg.to_owned());
        }
        args.push(workflows.to_str().unwrap().to_owned());
        Serve {
            dir,
            args,
            envs: Vec::new(),
        }
    }

    /// Writes `workflows/<file>`.
    pub fn workflow(self, file: &str, text: &str) -> Serve {
        std::fs::write(self.dir.path().join("workflows").join(file), text).unwrap();
        self
    }

    /// Puts a plugin dir of this server's own first (where uploads are
    /// written), holding copies of `files`; returns the builder.
    pub fn own_plugin_dir(mut self, files: &[&Path]) -> Serve {
        let dir = self.dir.path().join("plugins");
        std::fs::create_dir_all(&dir).unwrap();
        for file in files {
            std::fs::copy(file, dir.join(file.file_name().unwrap())).unwrap();
        }
        let flag = self
            .args
            .iter()
            .position(|arg| arg == "--plugin-dir")
            .unwrap();
        self.args.insert(flag, dir.to_str().unwrap().to_owned());
        self.args.insert(flag, "--plugin-dir".to_owned());
        self
    }

    /// Writes `trellis.toml` and passes `--config` to it.
    pub fn config(self, text: &str) -> Serve {
        let path = self.dir.path().join("trellis.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_owned();
        self.args(&["--config", &path])
    }

    /// `--bind ADDR` instead of `127.0.0.1:0`.
    pub fn bind(mut self, address: &str) -> Serve {
        let flag = self.args.iter().position(|arg| arg == "--bind").unwrap();
        self.args[flag + 1] = address.to_owned();
        self
    }

    pub fn args(mut self, args: &[&str]) -> Serve {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Serve {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = bare();
        cmd.args(&self.args)
            .env_remove("TRELLIS_AUTH_TOKEN")
            .env_remove("TRELLIS_BIND")
            .env_remove("TRELLIS_LOG")
            .env_remove("TRELLIS_LOG_FORMAT")
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs it to the end (for a server that must refuse to start).
    pub fn exec(self) -> Outcome {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("`trellis serve` did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Outcome::from(child.wait_with_output().unwrap())
    }

    /// Starts it and waits for `listening on http://ADDR`.
    pub fn start(self) -> Server {
        let mut child = self
            .command()
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (address_tx, address_rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = line.strip_prefix("listening on ") {
                    let _ = address_tx.send(address.to_owned());
                }
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut server = Server {
            child,
            base: String::new(),
            token: None,
            stderr,
            agent: agent(),
            _dir: self.dir,
        };
        match address_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => server.base = base,
            Err(_) => panic!("`trellis serve` did not start:\n{}", server.stderr()),
        }
        server
    }
}

/// An HTTP client that returns 4xx/5xx answers instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// A running `trellis serve`, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Sent as `Authorization: Bearer` by [`Server::call`] when set.
    pub token: Option<String>,
    stderr: Arc<Mutex<String>>,
    agent: ureq::Agent,
    _dir: tempfile::TempDir,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The header's value (names are compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts this is the API's JSON error with `status` and `code`.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{:?}",
            self.headers
        );
        let body = self.json();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            !body["error"]["message"].as_str().unwrap().is_empty(),
            "{body}"
        );
        body
    }
}

impl Server {
    /// `METHOD path` with `headers` and `body`; the token if set.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        let mut request = headers.iter().fold(request, |request, (name, value)| {
            request.header(*name, *value)
        });
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        // A bodiless POST or PUT goes out with `content-length: 0`: with `()`
        // ureq sends an empty *chunked* body whose last chunk may arrive after
        // an early answer (a 401); hyper then closes the connection, and the
        // next call on it from the pool can fail with "peer disconnected".
        let response = match (body, method) {
            (Some(body), _) => self.agent.run(request.body(body.to_vec()).unwrap()),
            (None, "POST" | "PUT" | "PATCH") => self.agent.run(request.body(Vec::new()).unwrap()),
            (None, _) => self.agent.run(request.body(()).unwrap()),
        };
        let mut response =
            response.unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.stderr()));
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .unwrap();
        Reply {
            status: response.status().as_u16(),
            headers,
            body,
        }
    }

    pub fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[], None)
    }

    /// POST with a JSON body.
    pub fn post(&self, path: &str, json: &str) -> Reply {
        self.call(
            "POST",
            path,
            &[("content-type", "application/json")],
            Some(json.as_bytes()),
        )
    }

    /// Polls the run until it is `succeeded`, `failed` or `cancelled`.
    pub fn wait_for_run(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let run = self.get(&format!("/v1/runs/{id}")).json();
            if ["succeeded", "failed", "cancelled"].contains(&run["status"].as_str().unwrap()) {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} did not finish: {run:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The events of a run as `(event, id, data)`, read until the stream ends.
    pub fn events(&self, id: &str, headers: &[(&str, &str)]) -> Vec<SseEvent> {
        self.event_stream(id, headers).collect()
    }

    /// The events of a run as they arrive.
    pub fn event_stream(
        &self,
        id: &str,
        headers: &[(&str, &str)],
    ) -> impl Iterator<Item = SseEvent> + use<> {
        let mut request = self.agent.get(format!("{}/v1/runs/{id}/events", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = request.call().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        SseReader {
            lines: BufReader::new(response.into_body().into_reader()).lines(),
        }
    }

    /// Reads the run's events (those so far, then live ones) until `until`
    /// holds for one; false if the stream ended first (the run finished, or
    /// the server went away).
    pub fn await_event(&self, id: &str, mut until: impl FnMut(&SseEvent) -> bool) -> bool {
        self.event_stream(id, &[]).any(|event| until(&event))
    }

    /// Reads the run's events until the `n`th log line of `step` that starts
    /// with `text`; panics if the run ends first. A plugin's log line is
    /// sent while it runs, so this waits for an attempt to be under way, not
    /// for a time that a slow machine may overrun (and the host stores an
    /// attempt's start before the plugin runs).
    pub fn await_log(&self, id: &str, step: &str, text: &str, n: usize) {
        let mut seen = 0;
        let found = self.await_event(id, |event| {
            if is_log(event, step, text) {
                seen += 1;
            }
            seen == n
        });
        assert!(
            found,
            "run {id} ended before step {step} logged {text:?} {n} times:\n{}",
            self.stderr()
        );
    }

    /// Waits (at most a minute) until the server's log has `text`.
    pub fn await_stderr(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.stderr().contains(text) {
            assert!(
                Instant::now() < deadline,
                "the server never logged {text:?}:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's own plugin dir (see [`Serve::own_plugin_dir`]).
    pub fn plugin_dir(&self) -> PathBuf {
        self._dir.path().join("plugins")
    }

    /// The server's data dir (SQLite files, cache link, plugin blobs).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// The server's workflow dir.
    pub fn workflow_dir(&self) -> PathBuf {
        self._dir.path().join("workflows")
    }

    /// Kills the process with SIGKILL (no chance to clean up) and hands back
    /// its directory, to start a new server on the same data.
    pub fn crash(mut self) -> tempfile::TempDir {
        let status = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap();
        let placeholder = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self._dir, placeholder)
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> i32 {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "no exit after SIGTERM:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `event` is a log line of `step` that starts with `text`.
pub fn is_log(event: &SseEvent, step: &str, text: &str) -> bool {
    event.event == "log"
        && event.data["step"] == step
        && event.data["line"]["message"]
            .as_str()
            .is_some_and(|message| message.starts_with(text))
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<u64>,
    pub data: Value,
}

struct SseReader<R> {
    lines: std::io::Lines<R>,
}

impl<R: BufRead> Iterator for SseReader<R> {
    type Item = SseEvent;

    fn next(&mut self) -> Option<SseEvent> {
        let (mut event, mut id, mut data) = (None, None, String::new());
        loop {
            let line = self.lines.next()?.ok()?;
            if line.is_empty() {
                if event.is_none() && data.is_empty() {
                    continue; // after a keep-alive comment
                }
                return Some(SseEvent {
                    event: event.unwrap_or_else(|| "message".to_owned()),
                    id,
                    data: serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}")),
                });
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_owned()),
                "id" => id = Some(value.parse().unwrap()),
                "data" => {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(value);
                }
                _ => {}
            }
        }
    }
}

/// A local HTTP server whose answers the test holds back: a request for a
/// path that starts with `/held` waits until [`Gate::open`] (at most a
/// minute, then 503), any other is answered at once; each answer is
/// `{"path": "<path>"}`. A step that calls it (the `http-request` plugin)
/// stays running until the test has seen what it wants to see, so the test
/// waits for that, not for a time window.
pub struct Gate {
    pub port: u16,
    state: Arc<(Mutex<GateState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    /// Requests that reached the gate.
    waiting: usize,
    /// A request gave up waiting.
    timed_out: bool,
}

impl Gate {
    pub fn start() -> Gate {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state: Arc<(Mutex<GateState>, std::sync::Condvar)> = Arc::default();
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = shared.clone();
                std::thread::spawn(move || gate_answer(stream, &state));
            }
        });
        Gate { port, state }
    }

    /// `127.0.0.1:PORT`, for `allow_hosts`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits (at most a minute) until `n` requests wait at the gate.
    pub fn await_waiting(&self, n: usize) {
        let (lock, signal) = &*self.state;
        let state = lock.lock().unwrap();
        let (state, _) = signal
            .wait_timeout_while(state, Duration::from_secs(60), |s| s.waiting < n)
            .unwrap();
        assert!(
            state.waiting >= n,
            "{} requests reached the gate, not {n}",
            state.waiting
        );
    }

    /// Lets every held request (and every later one) through.
    pub fn open(&self) {
        let (lock, signal) = &*self.state;
        lock.lock().unwrap().open = true;
        signal.notify_all();
    }

    /// Whether a held request gave up before the gate opened.
    pub fn timed_out(&self) -> bool {
        self.state.0.lock().unwrap().timed_out
    }
}

fn gate_answer(stream: std::net::TcpStream, state: &(Mutex<GateState>, std::sync::Condvar)) {
    use std::io::Write;
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    // The headers, up to the blank line (GET: no body).
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
            break;
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut status = "200 OK";
    if path.starts_with("/held") {
        let (lock, signal) = state;
        let mut guard = lock.lock().unwrap();
        guard.waiting += 1;
        signal.notify_all();
        let (mut guard, _) = signal
            .wait_timeout_while(guard, Duration::from_secs(60), |s| !s.open)
            .unwrap();
        if !guard.open {
            guard.timed_out = true;
            status = "503 Service Unavailable";
        }
    }
    let body = serde_json::json!({ "path": path }).to_string();
    let mut stream = stream;
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}
