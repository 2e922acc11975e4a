//! `trellis runs`: list, show, retry, rerun, cancel and follow the runs of
//! a running server, as a plain client of its HTTP API (DESIGN.md, "HTTP
//! API" and "Command line").
//!
//! Contract: with `--json`, stdout gets the API's JSON as the server sent it
//! (one line; `watch`: one `{"event", "data"}` object per line); without it,
//! tables and one line per event. Errors go to stderr as `error: ...`. Exit
//! status: 0 done; 1 the server refused or could not be reached, or the
//! watched run failed or was cancelled; 2 a usage error (a bad flag,
//! `--server` or `--input`), before any request.
//!
//! The answers are read into small views of the run record below, not into
//! [`crate::record::RunRecord`]: a client shows what it finds and ignores
//! fields it does not know.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::client::{
    BadServerUrl, BadToken, Client, ClientError, Origin, SERVER_ENV, ServerUrl, TOKEN_ENV,
};
use crate::record::{ErrorRecord, RunError, RunStatus, StepStatus};

#[derive(Debug, Args)]
pub(super) struct RunsArgs {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: RunsCommand,
}

/// Options of every `trellis runs` command.
#[derive(Debug, Args)]
struct Common {
    /// The server's URL. Default: `TRELLIS_SERVER`, else
    /// http://127.0.0.1:8080. The bearer token, if the server needs one,
    /// comes from `TRELLIS_AUTH_TOKEN`.
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// Print the API's JSON (one line) instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum RunsCommand {
    /// List runs, newest first, a page at a time.
    List(ListArgs),
    /// Show one run: its times, its error, and a table of its steps.
    Get {
        #[arg(value_parser = run_id)]
        id: String,
    },
    /// Start a new run from a finished one, on the same input: steps that
    /// succeeded are reused, the rest run again.
    Retry {
        #[arg(value_parser = run_id)]
        id: String,
        /// Run this step and every step downstream of it again in full.
        #[arg(long, value_name = "STEP")]
        from: Option<String>,
        /// Use the newest workflow version and plugin builds, not the original's.
        #[arg(long)]
        upgrade: bool,
    },
    /// Start a new run from a finished one, every step again.
    Rerun {
        #[arg(value_parser = run_id)]
        id: String,
        /// A new input: JSON text, `@FILE` to read it from a file, or `@-`
        /// for stdin. Default: the original run's input.
        #[arg(long, short, value_name = "JSON|@FILE")]
        input: Option<String>,
        /// Use the newest workflow version and plugin builds, not the original's.
        #[arg(long)]
        upgrade: bool,
    },
    /// Cancel a run: its running steps stop at once.
    Cancel {
        #[arg(value_parser = run_id)]
        id: String,
    },
    /// Follow a run's events until it finishes (a finished run's are
    /// replayed). Exit status 0 if it succeeded, 1 if it failed or was cancelled.
    Watch {
        #[arg(value_parser = run_id)]
        id: String,
    },
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Only runs of this workflow.
    #[arg(long, value_name = "NAME")]
    workflow: Option<String>,
    /// Only runs in this state: queued, running, succeeded, failed or cancelled.
    #[arg(long)]
    status: Option<RunStatus>,
    /// Only the child runs of this run (its sub-workflow steps).
    #[arg(long, value_name = "ID", value_parser = run_id)]
    parent: Option<String>,
    /// Runs per page, 1 to 1000. Default: the server's (50).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    limit: Option<u32>,
    /// The page after the one that printed this cursor.
    #[arg(long)]
    cursor: Option<String>,
}

impl ListArgs {
    /// The query string's pairs, for those given.
    fn query(&self) -> Vec<(&'static str, String)> {
        [
            ("workflow", self.workflow.clone()),
            ("status", self.status.map(|status| status.to_string())),
            ("parent", self.parent.clone()),
            ("limit", self.limit.map(|limit| limit.to_string())),
            ("cursor", self.cursor.clone()),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect()
    }

    /// The command that prints the page after this one.
    fn next_page(&self, cursor: &str, server: &ServerUrl) -> String {
        let mut command = String::from("trellis runs list");
        if server.origin() == Origin::Flag {
            command.push_str(&format!(" --server {}", shell_word(server.url())));
        }
        for (name, value) in self.query() {
            if name != "cursor" {
                command.push_str(&format!(" --{name} {}", shell_word(&value)));
            }
        }
        command.push_str(&format!(" --cursor {cursor}"));
        command
    }
}

/// A run id is a UUID; checked here, so that it can go into a URL path as it is.
fn run_id(text: &str) -> Result<String, String> {
    uuid::Uuid::parse_str(text)
        .map(|uuid| uuid.hyphenated().to_string())
        .map_err(|_| "run ids are UUIDs like 0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b".to_owned())
}

/// Why `trellis runs` stopped short.
#[derive(Debug, thiserror::Error)]
enum RunsError {
    /// The server refused, or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `--server` or `TRELLIS_SERVER` is no usable URL.
    #[error(transparent)]
    Server(#[from] BadServerUrl),
    /// `TRELLIS_AUTH_TOKEN` cannot be sent.
    #[error(transparent)]
    Token(#[from] BadToken),
    /// `--input` could not be read or is not JSON (what and where).
    #[error("{0:#}")]
    Input(anyhow::Error),
    /// The event stream closed, and the run is still going.
    #[error(
        "the event stream of run {id} ended while the run is {status}: did the server at {server} stop?"
    )]
    StreamEnded {
        id: String,
        status: RunStatus,
        server: String,
    },
    /// stdout is closed (a pipe whose reader stopped).
    #[error("cannot write to stdout: {0}")]
    Output(#[from] std::io::Error),
}

impl RunsError {
    fn exit_status(&self) -> u8 {
        match self {
            RunsError::Server(_) | RunsError::Token(_) | RunsError::Input(_) => 2,
            _ => 1,
        }
    }
}

/// Runs the command; prints an error and maps it to its exit status.
pub(super) fn main(args: RunsArgs) -> ExitCode {
    match execute(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_status())
        }
    }
}

fn execute(args: RunsArgs) -> Result<ExitCode, RunsError> {
    let env = |name| std::env::var(name).ok();
    let server = ServerUrl::resolve(args.common.server.as_deref(), env(SERVER_ENV).as_deref())?;
    let client = Client::new(server, env(TOKEN_ENV).as_deref())?;
    let json = args.common.json;
    match args.command {
        RunsCommand::List(list) => list_runs(&client, &list, json),
        RunsCommand::Get { id } => get_run(&client, &id, json),
        RunsCommand::Retry { id, from, upgrade } => {
            let mut body = Map::new();
            if let Some(from) = from {
                body.insert("from".to_owned(), Value::String(from));
            }
            start_from(&client, &id, "retry", body, upgrade, json)
        }
        RunsCommand::Rerun { id, input, upgrade } => {
            let mut body = Map::new();
            if let Some(input) = input {
                let input = super::read_input(Some(&input)).map_err(RunsError::Input)?;
                body.insert("input".to_owned(), input);
            }
            start_from(&client, &id, "rerun", body, upgrade, json)
        }
        RunsCommand::Cancel { id } => cancel_run(&client, &id, json),
        RunsCommand::Watch { id } => watch_run(&client, &id, json),
    }
}

fn run_path(id: &str) -> String {
    format!("/v1/runs/{id}")
}

/// A line on stdout (an error if stdout is gone).
fn print(text: &str) -> Result<(), RunsError> {
    writeln!(std::io::stdout().lock(), "{text}")?;
    Ok(())
}

/// The body as the server sent it, on one line.
fn print_json(body: &str) -> Result<(), RunsError> {
    print(body.trim())
}

fn list_runs(client: &Client, args: &ListArgs, json: bool) -> Result<ExitCode, RunsError> {
    let answer = client.get("/v1/runs", &args.query())?;
    if json {
        print_json(&answer.body)?;
        return Ok(ExitCode::SUCCESS);
    }
    let page: Page = answer.parse()?;
    if page.runs.is_empty() {
        print("no runs")?;
    } else {
        print(&runs_table(&page.runs))?;
    }
    if let Some(cursor) = &page.next_cursor {
        print(&format!(
            "next page: {}",
            args.next_page(cursor, client.server())
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn get_run(client: &Client, id: &str, json: bool) -> Result<ExitCode, RunsError> {
    let answer = client.get(&run_path(id), &[])?;
    if json {
        print_json(&answer.body)?;
        return Ok(ExitCode::SUCCESS);
    }
    let run: Run = answer.parse()?;
    print(&run_header(&run))?;
    print("")?;
    print(&steps_table(&run.steps))?;
    Ok(ExitCode::SUCCESS)
}

/// `retry` or `rerun`: `body` plus `upgrade`; prints the new run.
fn start_from(
    client: &Client,
    id: &str,
    how: &str,
    mut body: Map<String, Value>,
    upgrade: bool,
    json: bool,
) -> Result<ExitCode, RunsError> {
    if upgrade {
        body.insert("upgrade".to_owned(), Value::Bool(true));
    }
    let path = format!("{}/{how}", run_path(id));
    let answer = client.post(&path, Some(&Value::Object(body)))?;
    if json {
        print_json(&answer.body)?;
        return Ok(ExitCode::SUCCESS);
    }
    let run: Run = answer.parse()?;
    print(&format!("{} {}", run.id, run.status))?;
    // On stderr, so that `$(trellis runs retry ID)` is the id and status only.
    eprintln!("follow it: {}", follow_command(client.server(), &run.id));
    Ok(ExitCode::SUCCESS)
}

/// `trellis runs watch ID`, with `--server` if the user gave one.
fn follow_command(server: &ServerUrl, id: &str) -> String {
    match server.origin() {
        Origin::Flag => format!(
            "trellis runs watch --server {} {id}",
            shell_word(server.url())
        ),
        _ => format!("trellis runs watch {id}"),
    }
}

fn cancel_run(client: &Client, id: &str, json: bool) -> Result<ExitCode, RunsError> {
    let answer = client.post(&format!("{}/cancel", run_path(id)), None)?;
    if json {
        print_json(&answer.body)?;
        return Ok(ExitCode::SUCCESS);
    }
    let run: Run = answer.parse()?;
    print(&format!("{} {}", run.id, run.status))?;
    Ok(ExitCode::SUCCESS)
}

/// Prints each event until `run_finished`; picks the stream up again after
/// `lagged` (from the last event seen). A stream that ends without
/// `run_finished` (the server went away) is settled by reading the run.
fn watch_run(client: &Client, id: &str, json: bool) -> Result<ExitCode, RunsError> {
    let path = format!("{}/events", run_path(id));
    let mut last_seen = None;
    loop {
        let mut lagged = false;
        for event in client.events(&path, last_seen)? {
            let event = event?;
            last_seen = event.id.or(last_seen);
            let data = serde_json::from_str(&event.data).unwrap_or(Value::String(event.data));
            if json {
                let line = serde_json::json!({ "event": event.event, "data": data });
                print(&line.to_string())?;
            }
            if event.event == "lagged" {
                lagged = true;
                break;
            }
            // An event this client does not know prints nothing.
            let known = serde_json::from_value::<RunEvent>(data).ok();
            if let (false, Some(known)) = (json, &known) {
                print(&event_line(known))?;
            }
            if event.event == "run_finished" {
                let status = match known {
                    Some(RunEvent::RunFinished { run }) => run.status,
                    _ => fetch_run(client, id)?.status,
                };
                return Ok(exit_for(status));
            }
        }
        if !lagged {
            break;
        }
    }
    let run = fetch_run(client, id)?;
    if !run.status.is_terminal() {
        return Err(RunsError::StreamEnded {
            id: id.to_owned(),
            status: run.status,
            server: client.server().url().to_owned(),
        });
    }
    if !json {
        print(&run_finished_line(&run))?;
    }
    Ok(exit_for(run.status))
}

fn fetch_run(client: &Client, id: &str) -> Result<Run, RunsError> {
    Ok(client.get(&run_path(id), &[])?.parse()?)
}

fn exit_for(status: RunStatus) -> ExitCode {
    match status {
        RunStatus::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

// ---- What the answers hold (the fields shown) ----

/// `GET /v1/runs`.
#[derive(Debug, Deserialize)]
struct Page {
    runs: Vec<Run>,
    next_cursor: Option<String>,
}

/// A run record, as `GET /v1/runs/{id}` answers it.
#[derive(Debug, Deserialize)]
struct Run {
    id: String,
    workflow: String,
    status: RunStatus,
    error: Option<RunError>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    duration_ms: Option<f64>,
    #[serde(default)]
    steps: Vec<Step>,
    retry_of: Option<String>,
    rerun_of: Option<String>,
    #[serde(default)]
    retries: Vec<String>,
    parent: Option<Parent>,
}

/// The step of another run that started this one (a sub-workflow).
#[derive(Debug, Deserialize)]
struct Parent {
    run: String,
    step: String,
    item: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Step {
    id: String,
    status: StepStatus,
    error: Option<ErrorRecord>,
    duration_ms: Option<f64>,
    items: Option<usize>,
    #[serde(default)]
    attempts: Vec<Attempt>,
    /// A retry's step that took the original run's result.
    reused_from: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Attempt {
    /// The run a sub-workflow step's attempt started.
    child_run: Option<String>,
}

/// The `data` of an event on `GET /v1/runs/{id}/events`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum RunEvent {
    StepStarted {
        step: String,
        attempt: u32,
        item: Option<usize>,
    },
    Log {
        step: String,
        line: LogLine,
    },
    Progress {
        step: String,
        progress: Progress,
    },
    StepFinished {
        step: Step,
    },
    RunFinished {
        run: Run,
    },
}

#[derive(Debug, Deserialize)]
struct LogLine {
    stream: String,
    level: String,
    message: String,
}

#[derive(Debug, Deserialize)]
struct Progress {
    fraction: f64,
    message: String,
}

// ---- How they print ----

fn runs_table(runs: &[Run]) -> String {
    let mut table = Table::new(&["ID", "WORKFLOW", "STATUS", "CREATED", "DURATION"]);
    for run in runs {
        table.row([
            run.id.clone(),
            run.workflow.clone(),
            run.status.to_string(),
            time(&run.created_at),
            run.duration_ms.map_or_else(|| "-".to_owned(), duration),
        ]);
    }
    table.render()
}

/// `field  value` lines: what `get` shows above the steps.
fn run_header(run: &Run) -> String {
    let mut fields = Table::default();
    let mut field = |name: &str, value: String| fields.row([name.to_owned(), value]);
    field("run", run.id.clone());
    field("workflow", run.workflow.clone());
    field("status", run.status.to_string());
    field("created", time(&run.created_at));
    if let Some(started) = &run.started_at {
        field("started", time(started));
    }
    if let Some(finished) = &run.finished_at {
        field("finished", time(finished));
    }
    if let Some(ms) = run.duration_ms {
        field("duration", duration(ms));
    }
    if let Some(error) = &run.error {
        field("error", error.to_string());
    }
    if let Some(original) = &run.retry_of {
        field("retry of", original.clone());
    }
    if let Some(original) = &run.rerun_of {
        field("rerun of", original.clone());
    }
    if let Some(parent) = &run.parent {
        let item = parent
            .item
            .map(|item| format!(" item {item}"))
            .unwrap_or_default();
        field(
            "parent",
            format!("{} step {}{item}", parent.run, parent.step),
        );
    }
    if !run.retries.is_empty() {
        field("retries", run.retries.join(", "));
    }
    fields.render()
}

fn steps_table(steps: &[Step]) -> String {
    let mut table = Table::new(&["STEP", "STATUS", "ATTEMPTS", "DURATION", "DETAIL"]);
    for step in steps {
        table.row([
            step.id.clone(),
            step.status.to_string(),
            step.attempts.len().to_string(),
            step.duration_ms.map_or_else(|| "-".to_owned(), duration),
            step_detail(step),
        ]);
    }
    table.render()
}

/// The error, else where a reused result came from, else the child runs
/// or the number of items.
fn step_detail(step: &Step) -> String {
    if let Some(error) = &step.error {
        return error.to_string();
    }
    if let Some(original) = &step.reused_from {
        return format!("reused from {original}");
    }
    let children: Vec<&str> = step
        .attempts
        .iter()
        .filter_map(|attempt| attempt.child_run.as_deref())
        .collect();
    match (children.as_slice(), step.items) {
        ([child], _) => format!("child run {child}"),
        ([], Some(items)) => format!("{items} items"),
        ([], None) => String::new(),
        (children, _) => format!("{} child runs", children.len()),
    }
}

/// One line for an event, without a time.
fn event_line(event: &RunEvent) -> String {
    match event {
        RunEvent::StepStarted {
            step,
            attempt,
            item,
        } => {
            let item = item.map(|item| format!("[{item}]")).unwrap_or_default();
            format!("step {step}{item} started (attempt {attempt})")
        }
        RunEvent::Log { step, line } => {
            let source = match line.stream.as_str() {
                "log" => &line.level,
                stream => stream,
            };
            format!("  {step} [{source}] {}", line.message)
        }
        RunEvent::Progress { step, progress } => format!(
            "  {step} {:.0}% {}",
            progress.fraction * 100.0,
            progress.message
        ),
        RunEvent::StepFinished { step } => step_finished_line(step),
        RunEvent::RunFinished { run } => run_finished_line(run),
    }
}

/// `step parse succeeded in 1.2 ms`, `step charge failed in 4.0 ms after 3
/// attempts: task error: declined`, `step b skipped`.
fn step_finished_line(step: &Step) -> String {
    let mut line = format!("step {} {}", step.id, step.status);
    if let Some(original) = &step.reused_from {
        line.push_str(&format!(" (reused from {original})"));
        return line;
    }
    if let Some(ms) = step
        .duration_ms
        .filter(|_| step.status != StepStatus::Skipped)
    {
        line.push_str(&format!(" in {}", duration(ms)));
    }
    match step.items {
        Some(items) => line.push_str(&format!(" ({items} items)")),
        None if step.attempts.len() > 1 => {
            line.push_str(&format!(" after {} attempts", step.attempts.len()))
        }
        None => {}
    }
    if let Some(error) = &step.error {
        line.push_str(&format!(": {error}"));
    }
    line
}

/// `run succeeded in 12 ms`, `run failed in 3.1 ms: step `x` failed: ...`.
fn run_finished_line(run: &Run) -> String {
    let mut line = format!("run {}", run.status);
    if let Some(ms) = run.duration_ms {
        line.push_str(&format!(" in {}", duration(ms)));
    }
    if let Some(error) = &run.error {
        line.push_str(&format!(": {error}"));
    }
    line
}

/// `0.4 ms`, `12 ms`, `1.5 s`, `2m 3s`.
fn duration(ms: f64) -> String {
    let ms = ms.max(0.0);
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 59_950.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        let seconds = std::time::Duration::from_secs((ms / 1000.0).round() as u64);
        humantime::format_duration(seconds).to_string()
    }
}

/// An RFC 3339 time to the second (`2025-06-01T12:00:00Z`); as given if it
/// does not parse.
fn time(text: &str) -> String {
    humantime::parse_rfc3339_weak(text)
        .map(|time| humantime::format_rfc3339_seconds(time).to_string())
        .unwrap_or_else(|_| text.to_owned())
}

/// `value` as one shell word (quoted when it has more than safe characters).
fn shell_word(value: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_.:/@%+=,".contains(c);
    if !value.is_empty() && value.chars().all(safe) {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// Text a server (a plugin's log line, an error message) sent, safe for a
/// terminal and on one line: control characters (line breaks, escape
/// sequences) are written as escapes.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Rows printed in columns as wide as their widest cell, two spaces apart.
/// (A dozen lines: not worth a dependency.)
#[derive(Default)]
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|cell| cell.to_string()).collect()],
        }
    }

    fn row<const N: usize>(&mut self, cells: [String; N]) {
        self.rows
            .push(cells.iter().map(|cell| printable(cell)).collect());
    }

    fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|column| {
                self.rows
                    .iter()
                    .filter_map(|row| row.get(column))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let lines: Vec<String> = self
            .rows
            .iter()
            .map(|row| {
                let cells: Vec<String> = row
                    .iter()
                    .zip(&widths)
                    .map(|(cell, width)| format!("{cell:<width$}"))
                    .collect();
                cells.join("  ").trim_end().to_owned()
            })
            .collect();
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(json: Value) -> Run {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn tables_are_as_wide_as_their_cells() {
        let mut table = Table::new(&["A", "LONGER"]);
        table.row(["wide cell".to_owned(), "x".to_owned()]);
        table.row(["b".to_owned(), String::new()]);
        assert_eq!(table.render(), "A          LONGER\nwide cell  x\nb");
    }

    #[test]
    fn server_text_is_printed_on_one_line_without_escape_sequences() {
        let mut table = Table::default();
        table.row(["a\nb".to_owned(), "\u{1b}[31mred".to_owned()]);
        assert_eq!(table.render(), r"a\nb  \u{1b}[31mred");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(0.42), "0.4 ms");
        assert_eq!(duration(12.4), "12 ms");
        assert_eq!(duration(1500.0), "1.5 s");
        assert_eq!(duration(123_000.0), "2m 3s");
        assert_eq!(duration(f64::NAN), "0.0 ms");
    }

    #[test]
    fn times_are_shown_to_the_second() {
        assert_eq!(time("2025-06-01T12:00:00.123Z"), "2025-06-01T12:00:00Z");
        assert_eq!(time("yesterday"), "yesterday");
    }

    #[test]
    fn a_run_header_shows_where_the_run_came_from() {
        let run = run(serde_json::json!({
            "id": "r2", "workflow": "w", "status": "failed",
            "created_at": "2025-06-01T12:00:00.123Z", "duration_ms": 3.04,
            "error": { "step": "b", "kind": "task_error", "message": "boom" },
            "retry_of": "r1", "retries": ["r3", "r4"],
            "parent": { "run": "p", "step": "provision", "item": 2 },
            "steps": [],
        }));
        assert_eq!(
            run_header(&run),
            [
                "run       r2",
                "workflow  w",
                "status    failed",
                "created   2025-06-01T12:00:00Z",
                "duration  3.0 ms",
                "error     step `b` failed: task error: boom",
                "retry of  r1",
                "parent    p step provision item 2",
                "retries   r3, r4",
            ]
            .join("\n")
        );
    }

    #[test]
    fn steps_show_their_error_or_where_their_result_came_from() {
        let run = run(serde_json::json!({
            "id": "r", "workflow": "w", "status": "failed", "created_at": "",
            "steps": [
                { "id": "a", "status": "succeeded", "reused_from": "r0", "attempts": [] },
                { "id": "b", "status": "failed", "duration_ms": 4.0,
                  "error": { "kind": "task_error", "message": "declined", "retryable": false },
                  "attempts": [{}, {}, {}] },
                { "id": "c", "status": "succeeded", "duration_ms": 20.0,
                  "attempts": [{ "child_run": "k1" }] },
                { "id": "d", "status": "skipped", "attempts": [] },
            ],
        }));
        assert_eq!(
            steps_table(&run.steps),
            [
                "STEP  STATUS     ATTEMPTS  DURATION  DETAIL",
                "a     succeeded  0         -         reused from r0",
                "b     failed     3         4.0 ms    task error: declined",
                "c     succeeded  1         20 ms     child run k1",
                "d     skipped    0         -",
            ]
            .join("\n")
        );
        let lines: Vec<String> = run.steps.iter().map(step_finished_line).collect();
        assert_eq!(
            lines,
            [
                "step a succeeded (reused from r0)",
                "step b failed in 4.0 ms after 3 attempts: task error: declined",
                "step c succeeded in 20 ms",
                "step d skipped",
            ]
        );
    }

    #[test]
    fn events_read_as_one_line_each() {
        let line = |data: Value| event_line(&serde_json::from_value(data).unwrap());
        assert_eq!(
            line(
                serde_json::json!({ "type": "step_started", "seq": 1, "step": "fan", "attempt": 2, "item": 3 })
            ),
            "step fan[3] started (attempt 2)"
        );
        assert_eq!(
            line(serde_json::json!({ "type": "log", "seq": 2, "step": "p",
                "line": { "at_ms": 1.0, "stream": "log", "level": "warn", "message": "careful" } })),
            "  p [warn] careful"
        );
        assert_eq!(
            line(serde_json::json!({ "type": "log", "seq": 3, "step": "p",
                "line": { "at_ms": 1.0, "stream": "stdout", "level": "info", "message": "hi" } })),
            "  p [stdout] hi"
        );
        assert_eq!(
            line(
                serde_json::json!({ "type": "progress", "seq": 4, "step": "p",
                "progress": { "fraction": 0.5, "message": "half" } })
            ),
            "  p 50% half"
        );
        assert_eq!(
            line(
                serde_json::json!({ "type": "run_finished", "seq": 5, "run": {
                "id": "r", "workflow": "w", "status": "succeeded", "created_at": "",
                "duration_ms": 12.0, "steps": [] } })
            ),
            "run succeeded in 12 ms"
        );
    }

    #[test]
    fn the_next_page_command_keeps_the_filters() {
        let args = ListArgs {
            workflow: Some("my flow".to_owned()),
            status: Some(RunStatus::Failed),
            parent: None,
            limit: Some(5),
            cursor: Some("00aa".to_owned()),
        };
        let server = ServerUrl::resolve(Some("http://h:1"), None).unwrap();
        assert_eq!(
            args.next_page("01bb", &server),
            "trellis runs list --server http://h:1 --workflow 'my flow' --status failed --limit 5 --cursor 01bb"
        );
    }

    #[test]
    fn run_ids_are_uuids() {
        assert_eq!(
            run_id("0190B5A4-7C1E-7D3A-9F2B-1C2D3E4F5A6B").unwrap(),
            "0190b5a4-7c1e-7d3a-9f2b-1c2d3e4f5a6b"
        );
        assert!(run_id("../workflows").is_err());
    }
}
