//! Chaos: `trellis serve` is killed with SIGKILL at random moments while
//! clients keep submitting runs, and restarted on the same data dir each
//! time. At the end every run the server accepted must have succeeded with
//! exactly the output its input implies, none may be missing or doubled, and
//! no step may show an impossible history (a finished step run again).
//!
//! Bounded for CI by default. The long version:
//!
//! ```sh
//! TRELLIS_CHAOS_ROUNDS=20 TRELLIS_CHAOS_RUNS=1000 cargo test -p trellis --test e2e chaos -- --nocapture
//! ```
//!
//! `TRELLIS_CHAOS_SEED=N` replays the random choices of a run (the seed is
//! printed); the threads' timing is not replayed, so a replay lands its kills
//! near, not at, the same places.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use crate::support::*;

/// A chain with a fan-out in which every step, and every item of the
/// fan-out, counts its executions in durable plugin state (one key per run,
/// step and item): a finished step or item run again unseen shows as a count
/// above its attempts. `nap` and each `fan` item log `sleeping N ms` once
/// under way, then sleep, so a kill can be aimed at them; `flaky` fails
/// twice on purpose and is retried.
pub(super) const CHAOS: &str = r#"
name = "chaos"

[[step]]
id = "first"
plugin = "probe"
input = { counter = "{{ run.id }}-first", n = "{{ input.n }}" }

[[step]]
id = "nap"
plugin = "probe"
needs = ["first"]
input = { counter = "{{ run.id }}-nap", n = "{{ input.n }}", sleep_ms = "{{ input.ms }}" }

[[step]]
id = "fan"
plugin = "probe"
needs = ["nap"]
for_each = "{{ input.words }}"
input = { counter = "{{ run.id }}-fan-{{ index }}", n = "{{ input.n }}", data = "{{ item }}-{{ input.n }}", sleep_ms = 50 }

[[step]]
id = "flaky"
plugin = "fail"
needs = ["first"]
retry = { max_attempts = 5, backoff = "fixed", initial = "200ms" }
input = { message = "try again", retryable = true, succeed_on_attempt = 3, counter = "{{ run.id }}-flaky" }

[[step]]
id = "last"
plugin = "probe"
needs = ["fan", "flaky"]
input = { counter = "{{ run.id }}-last", n = "{{ input.n }}" }

[output]
n = "{{ steps.last.output.input.n }}"
fan = "{{ steps.fan.output | map(attribute='input') | map(attribute='data') | list }}"
flaky = "{{ steps.flaky.status }}"
"#;

/// Client threads submitting runs.
const CLIENTS: usize = 8;

/// One run to submit: its input, and the output it must end with.
pub(super) struct Job {
    pub(super) n: usize,
    pub(super) ms: u64,
    pub(super) words: Vec<String>,
    /// Submitted with `?wait=30s`: the request is open while the run goes,
    /// so a kill cuts it off and the client retries with the same key.
    pub(super) wait: bool,
}

impl Job {
    pub(super) fn input(&self) -> String {
        json!({ "n": self.n, "ms": self.ms, "words": self.words }).to_string()
    }

    pub(super) fn key(&self) -> String {
        format!("chaos-{}", self.n)
    }

    /// What item `index` of `fan` passes on.
    fn item(&self, index: usize) -> String {
        format!("{}-{}", self.words[index], self.n)
    }

    pub(super) fn expected_output(&self) -> Value {
        let fan: Vec<String> = (0..self.words.len()).map(|i| self.item(i)).collect();
        json!({ "n": self.n, "fan": fan, "flaky": "succeeded" })
    }
}

/// SplitMix64: a seeded generator, so a failing seed can be replayed (the
/// test crate has no `rand`).
pub(super) struct Rng(pub(super) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// `TRELLIS_CHAOS_SEED`, else one from the clock.
pub(super) fn seed() -> u64 {
    env_number(
        "TRELLIS_CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    )
}

pub(super) fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// What the clients saw, shared with the thread that kills the server.
#[derive(Default)]
struct Load {
    /// The live server's base URL; `None` while it is down.
    base: Mutex<Option<String>>,
    /// The next job to submit.
    next: AtomicUsize,
    /// Job index -> the run id the server answered with (2xx).
    accepted: Mutex<BTreeMap<usize, String>>,
    /// Requests that got no answer (the server died under them).
    transport_errors: AtomicUsize,
    /// Retries answered `200` with the earlier run: the server had stored
    /// the run but died before it answered.
    found_on_retry: AtomicUsize,
    /// Answers other than 202/200.
    refusals: Mutex<Vec<String>>,
    /// Job index -> the finished run a client was answered with (`?wait`):
    /// what it was told must still hold at the end.
    told: Mutex<BTreeMap<usize, Value>>,
}

impl Load {
    fn base(&self) -> Option<String> {
        self.base.lock().unwrap().clone()
    }

    fn accepted(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

/// Submits jobs until none are left, at a pace that spreads them over the
/// rounds; a request that gets no answer is retried, with the same
/// idempotency key, once the server is back.
fn client(load: &Load, jobs: &[Job], pace: Duration) {
    let agent = agent();
    loop {
        let index = load.next.fetch_add(1, Ordering::SeqCst);
        let Some(job) = jobs.get(index) else { return };
        let mut retry = false;
        loop {
            let Some(base) = load.base() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let wait = if job.wait { "?wait=30s" } else { "" };
            let answer = agent
                .post(format!("{base}/v1/workflows/chaos/runs{wait}"))
                .header("content-type", "application/json")
                .header("idempotency-key", &job.key())
                .send(job.input().as_bytes())
                .and_then(|mut response| {
                    let status = response.status().as_u16();
                    let replayed = response
                        .headers()
                        .get("idempotent-replayed")
                        .is_some_and(|v| v == "true");
                    let body = response.body_mut().read_to_string()?;
                    Ok((status, replayed, body))
                });
            match answer {
                Ok((200 | 202, replayed, body)) => {
                    let run: Value = serde_json::from_str(&body).unwrap();
                    let id = run["id"].as_str().unwrap().to_owned();
                    if replayed {
                        assert!(retry, "a first request was answered as a replay: {body}");
                        load.found_on_retry.fetch_add(1, Ordering::SeqCst);
                    }
                    if ["succeeded", "failed", "cancelled"]
                        .contains(&run["status"].as_str().unwrap())
                    {
                        load.told.lock().unwrap().insert(index, run);
                    }
                    load.accepted.lock().unwrap().insert(index, id);
                    break;
                }
                Ok((status, _, body)) => {
                    load.refusals
                        .lock()
                        .unwrap()
                        .push(format!("job {index}: {status} {body}"));
                    break;
                }
                Err(_) => {
                    load.transport_errors.fetch_add(1, Ordering::SeqCst);
                    retry = true;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        std::thread::sleep(pace);
    }
}

#[test]
fn accepted_runs_survive_repeated_sigkill() {
    let rounds = env_number("TRELLIS_CHAOS_ROUNDS", 5) as usize;
    let runs = env_number("TRELLIS_CHAOS_RUNS", 300) as usize;
    let seed = seed();
    eprintln!(
        "chaos: seed {seed} (replay with TRELLIS_CHAOS_SEED={seed}), {rounds} rounds, {runs} runs"
    );
    let mut rng = Rng(seed);
    let jobs: Vec<Job> = (0..runs)
        .map(|n| Job {
            n,
            ms: 20 + rng.below(800),
            words: (0..1 + rng.below(4))
                .map(|_| format!("w{}", rng.below(1000)))
                .collect(),
            wait: rng.below(3) == 0,
        })
        .collect();

    // The load takes about a second per round (plus the last stretch after
    // the last restart), whatever the number of runs.
    let pace = Duration::from_secs_f64((rounds + 1) as f64 * CLIENTS as f64 / runs as f64);
    let load = Arc::new(Load::default());
    let jobs = Arc::new(jobs);
    // When the server now running was started: an attempt that started
    // after this started on it.
    let mut server_started = SystemTime::now();
    let mut server = Serve::new().workflow("chaos.toml", CHAOS).start();
    *load.base.lock().unwrap() = Some(server.base.clone());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (load, jobs) = (load.clone(), jobs.clone());
            std::thread::spawn(move || client(&load, &jobs, pace))
        })
        .collect();

    let mut in_flight_at_kills = Vec::new();
    let mut interrupted_at_kills = Vec::new();
    // The run the last kill was aimed at.
    let mut aimed_at: Option<String> = None;
    for round in 0..rounds {
        // The kill is aimed at an attempt under way, found by waiting for
        // its run's events, not by waiting a time: once the load has passed
        // a random point of this round's share, the newest accepted run is
        // followed until `nap`, or a random item of `fan`, logs that it
        // sleeps (its start is stored by then), and the kill follows at
        // once. One round in four, instead, the kill comes while the server
        // resumes what the last kill cut short: when the run it was aimed at
        // has an attempt under way again.
        let share = runs as f64 / (rounds + 1) as f64;
        let target =
            ((round as f64 + 0.2 + 0.7 * rng.below(1000) as f64 / 1000.0) * share) as usize;
        let mut aimed = false;
        if round > 0
            && rng.below(4) == 0
            && let Some(id) = &aimed_at
        {
            aimed = await_new_sleep(&server, id, None);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut tried = BTreeSet::new();
        while !aimed {
            while load.accepted() < target.max(1) {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: only {} runs accepted, waiting for {target}:\n{}",
                    load.accepted(),
                    server.stderr()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            // The newest run not tried yet this round.
            let candidate = load
                .accepted
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|(index, _)| !tried.contains(*index))
                .map(|(index, id)| (*index, id.clone()));
            let Some((index, id)) = candidate else {
                panic!("round {round}: every accepted run finished before a kill could be aimed");
            };
            tried.insert(index);
            let run = server.get(&format!("/v1/runs/{id}")).json();
            if ["succeeded", "failed", "cancelled"].contains(&run["status"].as_str().unwrap()) {
                continue;
            }
            let job = &jobs[index];
            let (step, nth) = match rng.below(2) {
                0 => ("nap", 1),
                _ => ("fan", 1 + rng.below(job.words.len() as u64) as usize),
            };
            let mut seen = 0;
            aimed = server.await_event(&id, |event| {
                seen += usize::from(is_log(event, step, "sleeping"));
                seen == nth
            });
            if aimed {
                aimed_at = Some(id);
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no run was seen under way:\n{}",
                server.stderr()
            );
        }
        *load.base.lock().unwrap() = None;
        let dir = server.crash();
        let killed_started = server_started;
        server_started = SystemTime::now();
        server = Serve::in_dir(dir).start();
        *load.base.lock().unwrap() = Some(server.base.clone());
        // The kill cut work short: some attempt that had started on the
        // killed server is now recorded as interrupted, in the run the kill
        // was aimed at or in another the restart resumed.
        let mut resumed = unfinished(&server);
        in_flight_at_kills.push(resumed.len());
        resumed.extend(aimed_at.clone());
        let interrupted = interrupted_since(&server, &resumed, killed_started);
        assert!(
            interrupted > 0,
            "seed {seed}, round {round}: the kill interrupted no attempt; the restart resumed {} runs",
            in_flight_at_kills[round]
        );
        interrupted_at_kills.push(interrupted);
    }
    for client in clients {
        client.join().unwrap();
    }
    // The server started after the last kill finishes what is left.

    let accepted = load.accepted.lock().unwrap().clone();
    let mut problems = Vec::new();
    problems.extend(load.refusals.lock().unwrap().iter().cloned());
    let deadline = Instant::now() + Duration::from_secs(180);
    let (mut succeeded, mut lost, mut stuck, mut resumed_steps) = (0, 0, 0, 0);
    let mut flaky_interrupted = 0;
    for (&index, id) in &accepted {
        let job = &jobs[index];
        let run = loop {
            let reply = server.get(&format!("/v1/runs/{id}"));
            if reply.status == 404 {
                break None;
            }
            assert_eq!(reply.status, 200, "{}", reply.body);
            let run = reply.json();
            let status = run["status"].as_str().unwrap().to_owned();
            if ["succeeded", "failed", "cancelled"].contains(&status.as_str())
                || Instant::now() > deadline
            {
                break Some(run);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let Some(run) = run else {
            lost += 1;
            problems.push(format!("run {index} ({id}) was accepted and is gone"));
            continue;
        };
        match run["status"].as_str().unwrap() {
            "succeeded" => {}
            "queued" | "running" => {
                stuck += 1;
                problems.push(format!("run {index} ({id}) never finished: {run:#}"));
                continue;
            }
            _ => {
                problems.push(format!("run {index} ({id}) did not succeed: {run:#}"));
                continue;
            }
        }
        let expected = job.expected_output();
        if run["output"] != expected {
            problems.push(format!(
                "run {index} ({id}): output {} instead of {expected}",
                run["output"]
            ));
            continue;
        }
        if let Some(told) = load.told.lock().unwrap().get(&index)
            && (told["status"] != run["status"] || told["output"] != run["output"])
        {
            problems.push(format!(
                "run {index} ({id}): a client was told {} {}, it ended {} {}",
                told["status"], told["output"], run["status"], run["output"]
            ));
        }
        let step_problems = impossible_steps(&run, job, &mut resumed_steps, &mut flaky_interrupted);
        if step_problems.is_empty() {
            succeeded += 1;
        }
        problems.extend(
            step_problems
                .into_iter()
                .map(|p| format!("run {index} ({id}): {p}")),
        );
    }

    // Nothing doubled: the store holds exactly the accepted runs, one per job.
    let mut stored = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/v1/runs?workflow=chaos&limit=1000".to_owned();
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = server.get(&path).json();
        for run in page["runs"].as_array().unwrap() {
            let id = run["id"].as_str().unwrap().to_owned();
            assert!(stored.insert(id.clone()), "run {id} listed twice");
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let accepted_ids: BTreeSet<String> = accepted.values().cloned().collect();
    for extra in stored.difference(&accepted_ids) {
        problems.push(format!(
            "run {extra} is stored but no client was answered with it (a duplicate?)"
        ));
    }
    if accepted_ids.len() != accepted.len() {
        problems.push("two jobs were answered with the same run".to_owned());
    }
    if accepted.len() != runs {
        problems.push(format!(
            "{} of {runs} jobs were never accepted",
            runs - accepted.len()
        ));
    }

    eprintln!(
        "chaos: seed {seed}: {rounds} rounds, runs accepted {}, succeeded {succeeded}, lost {lost}, \
         stuck {stuck}; runs unfinished after each restart {in_flight_at_kills:?}, \
         attempts each kill interrupted {interrupted_at_kills:?}; \
         {} requests cut off by a kill, {} retries found the run stored (idempotency key); \
         {resumed_steps} steps re-attempted after a kill; \
         {flaky_interrupted} attempts of the retried step recorded as interrupted",
        accepted.len(),
        load.transport_errors.load(Ordering::SeqCst),
        load.found_on_retry.load(Ordering::SeqCst),
    );
    assert!(
        problems.is_empty(),
        "seed {seed}: {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(
        in_flight_at_kills.iter().any(|&n| n > 0),
        "no kill found a run in flight: the test proved nothing"
    );
}

/// Follows run `id` until a step (`step`, or any) that started on this
/// server logs that it sleeps; false if the run ends first. A resumed run's
/// events begin with its stored history, replayed: an attempt the record
/// already had when we subscribed is not under way here.
fn await_new_sleep(server: &Server, id: &str, step: Option<&str>) -> bool {
    let run = server.get(&format!("/v1/runs/{id}")).json();
    if ["succeeded", "failed", "cancelled"].contains(&run["status"].as_str().unwrap_or("")) {
        return false;
    }
    let known: BTreeSet<(String, Option<u64>, Option<u64>)> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["attempts"].as_array().unwrap().iter().map(|a| {
                (
                    s["id"].as_str().unwrap().to_owned(),
                    a["item"].as_u64(),
                    a["attempt"].as_u64(),
                )
            })
        })
        .collect();
    let mut started = BTreeSet::new();
    server.await_event(id, |event| {
        let name = event.data["step"].as_str().unwrap_or("").to_owned();
        if event.event == "step_started" {
            let attempt = (
                name.clone(),
                event.data["item"].as_u64(),
                event.data["attempt"].as_u64(),
            );
            if !known.contains(&attempt) {
                started.insert(name.clone());
            }
        }
        step.is_none_or(|step| step == name)
            && started.contains(&name)
            && is_log(event, &name, "sleeping")
    })
}

/// The ids of the runs the server lists as queued or running.
fn unfinished(server: &Server) -> BTreeSet<String> {
    ["queued", "running"]
        .iter()
        .flat_map(|status| {
            let page = server.get(&format!("/v1/runs?status={status}&limit=1000"));
            page.json()["runs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|run| run["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Attempts of the runs `ids` that started after `since` (on the server
/// that was killed then) and are recorded as interrupted.
fn interrupted_since(server: &Server, ids: &BTreeSet<String>, since: SystemTime) -> usize {
    let since_ms = since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0;
    let mut interrupted = 0;
    for id in ids {
        let run = server.get(&format!("/v1/runs/{id}")).json();
        for step in run["steps"].as_array().unwrap() {
            interrupted += step["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| {
                    a["error"]["kind"] == "interrupted" && millis(&a["started_at"]) >= since_ms
                })
                .count();
        }
    }
    interrupted
}

/// Whether the executions a plugin counted (`counter` in its output, kept
/// in durable state) fit the attempts recorded: every attempt counted once,
/// except that one a kill cut short may have been cut before it counted.
/// More executions than attempts: a finished step or item ran again unseen.
fn count_fits(attempts: &[&Value], counter: &Value) -> bool {
    let interrupted = attempts
        .iter()
        .filter(|a| a["error"]["kind"] == "interrupted")
        .count();
    counter
        .as_u64()
        .is_some_and(|n| (attempts.len() - interrupted..=attempts.len()).contains(&(n as usize)))
}

/// What a run's steps show that cannot have happened; counts the steps
/// that a kill cut short and that were attempted again.
pub(super) fn impossible_steps(
    run: &Value,
    job: &Job,
    resumed: &mut usize,
    flaky_interrupted: &mut usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    let id = run["id"].as_str().unwrap();
    for step_id in ["first", "nap", "last"] {
        let step = step(run, step_id);
        let attempts: Vec<&Value> = step["attempts"].as_array().unwrap().iter().collect();
        if step["status"] != "succeeded" {
            problems.push(format!("step {step_id} is {}", step["status"]));
            continue;
        }
        let Some((last, earlier)) = attempts.split_last() else {
            problems.push(format!("step {step_id} succeeded with no attempt"));
            continue;
        };
        if last["status"] != "succeeded" {
            problems.push(format!("step {step_id}: the last attempt is {last}"));
        }
        // Only attempts a kill cut short come before the one that
        // succeeded: a finished step never ran again.
        for attempt in earlier {
            if attempt["error"]["kind"] != "interrupted" {
                problems.push(format!(
                    "step {step_id}: an attempt before the last is not an interrupted one: {attempt}"
                ));
            }
        }
        let numbers: Vec<u64> = attempts
            .iter()
            .map(|a| a["attempt"].as_u64().unwrap())
            .collect();
        if numbers != (1..=attempts.len() as u64).collect::<Vec<_>>() {
            problems.push(format!("step {step_id}: attempts numbered {numbers:?}"));
        }
        if attempts.len() > 1 {
            *resumed += 1;
        }
        // The output is the last attempt's.
        let output = &step["output"];
        if !count_fits(&attempts, &output["counter"]) {
            problems.push(format!(
                "step {step_id} ran {} times, {} attempts recorded",
                output["counter"],
                attempts.len()
            ));
        }
        if output["ctx"]["attempt"] != attempts.len() || output["ctx"]["run_id"] != id {
            problems.push(format!(
                "step {step_id}: output from another attempt or run: {}",
                output["ctx"]
            ));
        }
        if output["input"]["n"] != job.n {
            problems.push(format!("step {step_id}: input {}", output["input"]));
        }
    }
    // The retried step: failed twice on purpose, then succeeded, its
    // attempts numbered on across kills, each one counted; an attempt
    // recorded as interrupted ran when a kill came.
    let flaky = step(run, "flaky");
    let attempts: Vec<&Value> = flaky["attempts"].as_array().unwrap().iter().collect();
    let numbers: Vec<u64> = attempts
        .iter()
        .map(|a| a["attempt"].as_u64().unwrap())
        .collect();
    if numbers != (1..=attempts.len() as u64).collect::<Vec<_>>()
        || attempts.len() < 3
        || flaky["status"] != "succeeded"
        || flaky["output"]["attempt"] != attempts.len()
    {
        problems.push(format!("flaky: {flaky:#}"));
    }
    if !count_fits(&attempts, &flaky["output"]["counter"]) {
        problems.push(format!(
            "flaky ran {} times, {} attempts recorded",
            flaky["output"]["counter"],
            attempts.len()
        ));
    }
    if let Some((last, earlier)) = attempts.split_last() {
        if last["status"] != "succeeded" {
            problems.push(format!("flaky: the last attempt is {last}"));
        }
        for attempt in earlier {
            match attempt["error"]["kind"].as_str() {
                Some("interrupted") => *flaky_interrupted += 1,
                _ if attempt["error"]["message"] == "try again" => {}
                _ => problems.push(format!("flaky: an attempt {attempt}")),
            }
        }
    }
    // The fan-out: each item succeeded once (its last attempt), in order,
    // and counted as many executions as it has attempts.
    let fan = step(run, "fan");
    if fan["items"] != job.words.len() {
        problems.push(format!("fan: {} items for {:?}", fan["items"], job.words));
    }
    let mut per_item: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for attempt in fan["attempts"].as_array().unwrap() {
        per_item
            .entry(attempt["item"].as_u64().unwrap_or(u64::MAX))
            .or_default()
            .push(attempt);
    }
    if per_item.keys().copied().ne(0..job.words.len() as u64) {
        problems.push(format!(
            "fan: attempts for items {:?}",
            per_item.keys().collect::<Vec<_>>()
        ));
    }
    for (item, attempts) in per_item {
        let succeeded = attempts
            .iter()
            .filter(|a| a["status"] == "succeeded")
            .count();
        if succeeded != 1 || attempts.last().unwrap()["status"] != "succeeded" {
            problems.push(format!("fan item {item}: attempts {attempts:?}"));
        }
        if attempts.len() > 1 {
            *resumed += 1;
        }
        let output = &fan["output"][item as usize];
        if !count_fits(&attempts, &output["counter"]) {
            problems.push(format!(
                "fan item {item} ran {} times, {} attempts recorded",
                output["counter"],
                attempts.len()
            ));
        }
        if output["ctx"]["attempt"] != attempts.len()
            || ((item as usize) < job.words.len()
                && output["input"]["data"] != job.item(item as usize))
        {
            problems.push(format!("fan item {item}: output {output}"));
        }
    }
    problems
}

/// A step cut short twice keeps the records of both interrupted attempts:
/// the re-attempt's "started" record must not replace the step's stored
/// attempts (it did: the second kill left `[2]`, and the run ended `[2, 3]`).
#[test]
fn a_step_cut_short_twice_keeps_both_attempts() {
    let server = Serve::new().workflow("chaos.toml", CHAOS).start();
    let job = Job {
        n: 1,
        ms: 2000,
        words: vec!["once".to_owned()],
        wait: false,
    };
    let reply = server.post("/v1/workflows/chaos/runs", &job.input());
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    // Killed once `nap` sleeps in its first attempt (its start is stored).
    server.await_log(&id, "nap", "sleeping", 1);
    let server = Serve::in_dir(server.crash()).start();
    // Killed again once it sleeps in its second.
    assert!(
        await_new_sleep(&server, &id, Some("nap")),
        "`nap` never resumed"
    );
    let server = Serve::in_dir(server.crash()).start();

    let run = server.wait_for_run(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], job.expected_output());
    let nap = step(&run, "nap");
    let attempts: Vec<(u64, &str, &str)> = nap["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64().unwrap(),
                a["status"].as_str().unwrap(),
                a["error"]["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            (1, "failed", "interrupted"),
            (2, "failed", "interrupted"),
            (3, "succeeded", "")
        ],
        "{nap:#}"
    );
    assert_eq!(step(&run, "first")["attempts"].as_array().unwrap().len(), 1);
    // Three attempts, three executions: each kill came after the counter.
    assert_eq!(nap["output"]["counter"], 3, "{nap:#}");
}

/// An attempt that failed and was waiting out its backoff when the server
/// was killed keeps its own error: it was stored as still running, so the
/// restart called it interrupted and its reason was lost.
#[test]
fn a_failed_attempt_keeps_its_error_across_a_kill_in_its_backoff() {
    const BACKOFF: &str = r#"
[[step]]
id = "flaky"
plugin = "fail"
retry = { max_attempts = 3, backoff = "fixed", initial = "5s" }
input = { message = "try again", retryable = true, succeed_on_attempt = 2 }
"#;
    // The executor logs at debug when a failed attempt is stored and the
    // backoff begins.
    let server = Serve::new()
        .env("TRELLIS_LOG", "info,trellis::executor=debug")
        .workflow("backoff.toml", BACKOFF)
        .start();
    let reply = server.post("/v1/workflows/backoff/runs", "{}");
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    // Attempt 1 fails at once; the kill comes while it waits to retry.
    server.await_stderr("attempt failed and stored; retrying after the backoff");
    let server = Serve::in_dir(server.crash()).start();

    let run = server.wait_for_run(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let flaky = step(&run, "flaky");
    let attempts = flaky["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{flaky:#}");
    assert_eq!(attempts[0]["status"], "failed", "{flaky:#}");
    assert_eq!(attempts[0]["error"]["message"], "try again", "{flaky:#}");
    assert_eq!(attempts[0]["error"]["retryable"], true, "{flaky:#}");
    assert_eq!(attempts[1]["attempt"], 2, "{flaky:#}");
    assert_eq!(attempts[1]["status"], "succeeded", "{flaky:#}");
}
