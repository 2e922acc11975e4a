//! Several `trellis serve` nodes on one PostgreSQL (DESIGN.md "Storage and
//! scale-out"): a killed node's runs finish on another, a paused node that
//! lost its lease writes nothing, a cancel reaches the node that runs the
//! run, a node that stops gracefully hands its runs over at once.
//!
//! They need a server: `TRELLIS_TEST_POSTGRES` is its URL (`.ci/run` starts
//! one); without it each test says in one line that it is skipped. Each
//! test's nodes share a schema of their own.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::*;

// `durable` (recovery.rs): `first` and `last` count their executions in
// plugin state, which the nodes share through the database, so a step run
// again on another node shows as a count above its attempts; `nap` logs
// `sleeping N ms` once its attempt is stored as started, then sleeps.
use crate::recovery::DURABLE;

/// A store URL on a fresh schema of the test server; `None`, said in one
/// line, without `TRELLIS_TEST_POSTGRES`.
fn fresh_store(test: &str) -> Option<String> {
    let Ok(url) = std::env::var("TRELLIS_TEST_POSTGRES") else {
        let _ = writeln!(
            std::io::stderr(),
            "cluster::{test}: skipped: TRELLIS_TEST_POSTGRES is not set"
        );
        return None;
    };
    let schema = format!("trellis_e2e_{}", uuid::Uuid::now_v7().simple());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
    });
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!(
        "{url}{separator}options=-c%20search_path%3D{schema}"
    ))
}

fn node(store: &str, id: &str, lease: &str) -> Server {
    Serve::new()
        .workflow("durable.toml", DURABLE)
        .env("TRELLIS_STORE", store)
        .env("TRELLIS_NODE_ID", id)
        .env("TRELLIS_LEASE", lease)
        .start()
}

fn submit(server: &Server, n: usize, ms: u64) -> String {
    let reply = server.post(
        "/v1/workflows/durable/runs",
        &format!(r#"{{"n": {n}, "ms": {ms}}}"#),
    );
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.json()["id"].as_str().unwrap().to_owned()
}

/// Each run succeeded with its own output, and no step that finished ran
/// again: its executions (counted in shared state) are its attempts, or one
/// fewer when the last cut-short attempt had not reached the counter.
/// Returns how many attempts were cut short and made again.
fn check_runs(server: &Server, ids: &[String]) -> usize {
    let mut resumed = 0;
    for (n, id) in ids.iter().enumerate() {
        let run = server.wait_for_run(id);
        assert_eq!(run["status"], "succeeded", "run {n}: {run:#}");
        assert_eq!(run["output"]["n"], n, "run {n}: {run:#}");
        for step_id in ["first", "last"] {
            let step = step(&run, step_id);
            let attempts = step["attempts"].as_array().unwrap();
            let (last, earlier) = attempts.split_last().expect("at least one attempt");
            assert_eq!(last["status"], "succeeded", "run {n} {step_id}: {step:#}");
            for attempt in earlier {
                assert_eq!(
                    attempt["error"]["kind"], "interrupted",
                    "run {n} {step_id}: {step:#}"
                );
            }
            let executions = step["output"]["counter"].as_u64().unwrap() as usize;
            assert!(
                executions == attempts.len() || executions + 1 == attempts.len(),
                "run {n} {step_id}: ran {executions} times, {} attempts: {step:#}",
                attempts.len()
            );
            resumed += attempts.len() - 1;
        }
        // `nap` counts nothing; a kill during its sleep shows as an
        // interrupted attempt before the one that succeeded.
        let nap = step(&run, "nap");
        let attempts = nap["attempts"].as_array().unwrap();
        let (last, earlier) = attempts.split_last().expect("at least one attempt");
        assert_eq!(last["status"], "succeeded", "run {n} nap: {nap:#}");
        assert!(
            earlier.iter().all(|a| a["error"]["kind"] == "interrupted"),
            "run {n} nap: {nap:#}"
        );
        resumed += earlier.len();
    }
    resumed
}

fn nodes(server: &Server) -> Vec<(String, bool)> {
    let reply = server.get("/v1/nodes");
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| {
            (
                node["id"].as_str().unwrap().to_owned(),
                node["alive"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_killed_nodes_runs_finish_on_another() {
    let Some(store) = fresh_store("a_killed_nodes_runs_finish_on_another") else {
        return;
    };
    let a = node(&store, "a", "2s");
    let b = node(&store, "b", "2s");
    assert_eq!(nodes(&b), [("a".to_owned(), true), ("b".to_owned(), true)]);
    let ids: Vec<String> = (0..30)
        .map(|n| submit(&a, n, 300 + (n as u64 * 97) % 1200))
        .collect();
    // Every run of `a` is held by `a`: it is killed while some are in flight.
    a.await_log(&ids[ids.len() - 1], "nap", "sleeping", 1);
    let killed = Instant::now();
    drop(a.crash());
    let resumed = check_runs(&b, &ids);
    let took = killed.elapsed();
    assert!(resumed > 0, "the kill interrupted nothing");
    // The lease (2 s), a sweep (lease/3), the longest nap (1.5 s), with room
    // for a slow machine.
    assert!(took < Duration::from_secs(20), "took {took:?} to finish");
    assert_eq!(nodes(&b), [("a".to_owned(), false), ("b".to_owned(), true)]);
    let all = b.get("/v1/runs?workflow=durable&limit=1000").json();
    assert_eq!(all["runs"].as_array().unwrap().len(), ids.len());
    eprintln!("{resumed} steps re-attempted on b; all done {took:?} after the kill");
}

#[test]
fn a_paused_node_that_lost_its_lease_writes_nothing() {
    let Some(store) = fresh_store("a_paused_node_that_lost_its_lease_writes_nothing") else {
        return;
    };
    let a = node(&store, "a", "2s");
    let b = node(&store, "b", "2s");
    let ids: Vec<String> = (0..8).map(|n| submit(&a, n, 3000)).collect();
    for id in &ids {
        a.await_log(id, "nap", "sleeping", 1);
    }
    a.signal("STOP");
    // `b` takes every run over and finishes it while `a` sleeps.
    check_runs(&b, &ids);
    let finished: Vec<Value> = ids
        .iter()
        .map(|id| b.get(&format!("/v1/runs/{id}")).json())
        .collect();
    a.signal("CONT");
    // Woken, `a` finds out (at its next write or renewal) that its runs
    // are gone and stops them; every write it still tries is refused and
    // logged, and no plugin of theirs runs again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.stderr().matches("late write is dropped").count() < ids.len() {
        assert!(
            Instant::now() < deadline,
            "a's late writes were not all refused:\n{}",
            a.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (id, before) in ids.iter().zip(&finished) {
        let after = b.get(&format!("/v1/runs/{id}")).json();
        assert_eq!(&after, before, "run {id} changed after `a` woke");
    }
}

#[test]
fn a_cancel_on_one_node_stops_the_run_on_another() {
    let Some(store) = fresh_store("a_cancel_on_one_node_stops_the_run_on_another") else {
        return;
    };
    let a = node(&store, "a", "10s");
    let b = node(&store, "b", "10s");
    let id = submit(&a, 0, 60_000);
    a.await_log(&id, "nap", "sleeping", 1);
    let asked = Instant::now();
    let reply = b.post(&format!("/v1/runs/{id}/cancel"), "");
    let took = asked.elapsed();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let run = reply.json();
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(step(&run, "nap")["status"], "cancelled", "{run:#}");
    // Told through NOTIFY, `a` stops the step at once, well before its
    // next renewal (lease/3 = 3.3 s).
    assert!(took < Duration::from_secs(3), "the cancel took {took:?}");
}

#[test]
fn a_node_stopped_gracefully_hands_its_runs_over_at_once() {
    let Some(store) = fresh_store("a_node_stopped_gracefully_hands_its_runs_over_at_once") else {
        return;
    };
    // A lease far longer than the test may wait: only a release moves the
    // runs in time.
    let mut a = node(&store, "a", "60s");
    let b = node(&store, "b", "60s");
    let ids: Vec<String> = (0..6).map(|n| submit(&a, n, 1500)).collect();
    for id in &ids {
        a.await_log(id, "nap", "sleeping", 1);
    }
    let stopped = Instant::now();
    assert_eq!(a.terminate(), 0, "{}", a.stderr());
    assert!(a.stderr().contains("left the cluster"), "{}", a.stderr());
    check_runs(&b, &ids);
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(nodes(&b), [("b".to_owned(), true)]);
}

/// A client of one node follows, live, a run another node runs: every step
/// starts and finishes in its stream, which ends with the finished run.
#[test]
fn events_of_a_run_on_one_node_stream_from_another() {
    let Some(store) = fresh_store("events_of_a_run_on_one_node_stream_from_another") else {
        return;
    };
    let a = node(&store, "a", "10s");
    let b = node(&store, "b", "10s");
    let id = submit(&a, 7, 1500);
    a.await_log(&id, "nap", "sleeping", 1);
    let events = b.events(&id, &[]);
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|event| {
            let step = match event.event.as_str() {
                "step_started" => event.data["step"].as_str().unwrap_or_default(),
                "step_finished" => event.data["step"]["id"].as_str().unwrap_or_default(),
                _ => "",
            };
            (event.event.clone(), step.to_owned())
        })
        .filter(|(name, _)| name != "log")
        .collect();
    let expected: Vec<(String, String)> = [
        ("step_started", "first"),
        ("step_finished", "first"),
        ("step_started", "nap"),
        ("step_finished", "nap"),
        ("step_started", "last"),
        ("step_finished", "last"),
        ("run_finished", ""),
    ]
    .iter()
    .map(|(name, step)| (name.to_string(), step.to_string()))
    .collect();
    assert_eq!(seen, expected);
    let last = events.last().unwrap();
    assert_eq!(last.data["run"]["status"], "succeeded", "{:#}", last.data);
    assert_eq!(last.data["run"]["output"]["n"], 7);
    let ids: Vec<u64> = events.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

/// Chaos on a cluster: three nodes, runs submitted to all of them, nodes
/// killed with SIGKILL and restarted, one paused past its lease and resumed.
/// Every accepted run must succeed with the output its input implies, none
/// missing or doubled, and no step or `for_each` item may show a history a
/// fenced write or a re-run of finished work would leave (the checks of
/// `chaos.rs`). 500 runs and 4 kills by default; the long version is
/// `TRELLIS_CLUSTER_CHAOS_RUNS=2000 TRELLIS_CLUSTER_CHAOS_KILLS=20`;
/// `TRELLIS_CHAOS_SEED` replays the choices.
#[test]
fn a_cluster_loses_nothing_under_kills_and_a_pause() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use crate::chaos::{CHAOS, Job, Rng, env_number, impossible_steps, seed};

    let Some(store) = fresh_store("a_cluster_loses_nothing_under_kills_and_a_pause") else {
        return;
    };
    let runs = env_number("TRELLIS_CLUSTER_CHAOS_RUNS", 500) as usize;
    let kills = env_number("TRELLIS_CLUSTER_CHAOS_KILLS", 4) as usize;
    let seed = seed();
    eprintln!("cluster chaos: seed {seed}, {runs} runs, {kills} kills and a pause");
    let mut rng = Rng(seed);
    let jobs: Arc<Vec<Job>> = Arc::new(
        (0..runs)
            .map(|n| Job {
                n,
                ms: 20 + rng.below(600),
                words: (0..1 + rng.below(3))
                    .map(|_| format!("w{}", rng.below(1000)))
                    .collect(),
                wait: false,
            })
            .collect(),
    );
    let start = |dir: Option<tempfile::TempDir>, id: usize| {
        let serve = match dir {
            Some(dir) => Serve::in_dir(dir),
            None => Serve::new().workflow("chaos.toml", CHAOS),
        };
        serve
            .env("TRELLIS_STORE", &store)
            .env("TRELLIS_NODE_ID", &format!("c{id}"))
            .env("TRELLIS_LEASE", "2s")
            .start()
    };
    let mut servers: Vec<Option<Server>> = (0..3).map(|id| Some(start(None, id))).collect();
    fn server(servers: &[Option<Server>], i: usize) -> &Server {
        servers[i]
            .as_ref()
            .expect("every node is up between rounds")
    }
    let bases: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(
        servers
            .iter()
            .map(|s| s.as_ref().map(|s| s.base.clone()))
            .collect(),
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let accepted: Arc<Mutex<BTreeMap<usize, String>>> = Arc::default();
    let refusals: Arc<Mutex<Vec<String>>> = Arc::default();
    // Four clients, the load spread over about 12 s; each job goes to a
    // node by its number, and to the next one when that node does not
    // answer (same idempotency key).
    let pace = Duration::from_secs_f64(12.0 * 4.0 / runs as f64);
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (jobs, bases, next) = (jobs.clone(), bases.clone(), next.clone());
            let (accepted, refusals) = (accepted.clone(), refusals.clone());
            std::thread::spawn(move || {
                let agent = agent();
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(index) else { return };
                    let mut turn = index;
                    loop {
                        let base = bases.lock().unwrap()[turn % 3].clone();
                        turn += 1;
                        let Some(base) = base else { continue };
                        let answer = agent
                            .post(format!("{base}/v1/workflows/chaos/runs"))
                            .header("content-type", "application/json")
                            .header("idempotency-key", &job.key())
                            .send(job.input().as_bytes())
                            .and_then(|mut r| {
                                Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
                            });
                        match answer {
                            Ok((200 | 202, body)) => {
                                let run: Value = serde_json::from_str(&body).unwrap();
                                let id = run["id"].as_str().unwrap().to_owned();
                                accepted.lock().unwrap().insert(index, id);
                                break;
                            }
                            Ok((status, body)) => {
                                refusals
                                    .lock()
                                    .unwrap()
                                    .push(format!("job {index}: {status} {body}"));
                                break;
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                    std::thread::sleep(pace);
                }
            })
        })
        .collect();

    let paused_round = rng.below(kills as u64 + 1) as usize;
    for round in 0..=kills {
        // Spread over the load: each round waits for its share of it.
        let target = (round + 1) * runs / (kills + 3);
        let deadline = Instant::now() + Duration::from_secs(120);
        while accepted.lock().unwrap().len() < target {
            assert!(Instant::now() < deadline, "round {round}: the load stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
        let victim = rng.below(3) as usize;
        if round == paused_round {
            // Paused until another node sees its lease run out, then woken.
            server(&servers, victim).signal("STOP");
            let witness = server(&servers, (victim + 1) % 3);
            let name = format!("c{victim}");
            let deadline = Instant::now() + Duration::from_secs(60);
            while nodes(witness)
                .iter()
                .any(|(id, alive)| *id == name && *alive)
            {
                assert!(
                    Instant::now() < deadline,
                    "c{victim} stayed alive while paused"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            server(&servers, victim).signal("CONT");
            eprintln!("round {round}: c{victim} paused past its lease, then resumed");
        } else {
            bases.lock().unwrap()[victim] = None;
            let dir = servers[victim].take().unwrap().crash();
            let restarted = start(Some(dir), victim);
            bases.lock().unwrap()[victim] = Some(restarted.base.clone());
            servers[victim] = Some(restarted);
            eprintln!("round {round}: c{victim} killed and restarted");
        }
    }
    for client in clients {
        client.join().unwrap();
    }
    assert_eq!(*refusals.lock().unwrap(), Vec::<String>::new());
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), runs);
    let reader = server(&servers, 0);
    let (mut resumed, mut flaky_interrupted) = (0, 0);
    for (index, id) in &accepted {
        let job = &jobs[*index];
        let run = reader.wait_for_run(id);
        assert_eq!(run["status"], "succeeded", "job {index}: {run:#}");
        assert_eq!(run["output"], job.expected_output(), "job {index}: {run:#}");
        let problems = impossible_steps(&run, job, &mut resumed, &mut flaky_interrupted);
        assert!(
            problems.is_empty(),
            "job {index} ({id}): {problems:#?}\n{run:#}"
        );
    }
    let listed = reader.get("/v1/runs?workflow=chaos&limit=1000").json();
    assert_eq!(
        listed["runs"].as_array().unwrap().len(),
        runs,
        "runs lost or doubled"
    );
    assert!(resumed > 0, "no kill or pause interrupted anything");
    eprintln!("cluster chaos: {resumed} steps or items re-attempted after kills and the pause");
}

/// A database that cannot be reached stops `serve` at once with status 2
/// and a message that names where it looked, never the password. Needs no
/// server.
#[test]
fn serve_refuses_an_unreachable_database_with_status_2() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let outcome = Serve::new()
        .env(
            "TRELLIS_STORE",
            &format!("postgres://trellis:hunter2@127.0.0.1:{port}/orders?connect_timeout=2"),
        )
        .exec();
    assert_eq!(outcome.code, 2, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(&format!(
            "error: cannot start: cannot use the store: the store's database is unavailable: \
             cannot connect to PostgreSQL at 127.0.0.1:{port}/orders: "
        )),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("hunter2"), "{}", outcome.stderr);
    // Before any plugin is compiled: the store is opened first.
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// An upload to one node is active on every node within 2 s: a plugin, a
/// workflow that uses it (a run of it on the other node gets its output),
/// and the plugin's removal.
#[test]
fn uploads_to_one_node_are_active_on_every_node() {
    let Some(store) = fresh_store("uploads_to_one_node_are_active_on_every_node") else {
        return;
    };
    let a = node(&store, "a", "10s");
    let b = node(&store, "b", "10s");
    let has_plugin = |server: &Server| {
        server.get("/v1/plugins").json()["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "versioned")
    };
    let within = |what: &str, mut done: Box<dyn FnMut() -> bool + '_>| {
        let started = Instant::now();
        while !done() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{what}: not on the other node after 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    };
    assert!(!has_plugin(&b));
    let bytes = std::fs::read(
        std::path::Path::new(env!("TRELLIS_SWAP_PLUGIN_DIR")).join("versioned-v1.wasm"),
    )
    .unwrap();
    let reply = a.call(
        "PUT",
        "/v1/plugins/versioned",
        &[("content-type", "application/wasm")],
        Some(&bytes),
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
    let plugin = within("the plugin", Box::new(|| has_plugin(&b)));

    let workflow = "[[step]]\nid = \"v\"\nplugin = \"versioned\"\ninput = \"{{ input.n }}\"\n\n[output]\nversion = \"{{ steps.v.output.version }}\"\n";
    let reply = a.call(
        "PUT",
        "/v1/workflows/shared",
        &[("content-type", "application/toml")],
        Some(workflow.as_bytes()),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let flow = within(
        "the workflow",
        Box::new(|| b.get("/v1/workflows/shared").status == 200),
    );
    let reply = b.post("/v1/workflows/shared/runs?wait=30s", r#"{"n": 3}"#);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["output"]["version"], "1.0.0", "{}", reply.body);

    let reply = a.call("DELETE", "/v1/plugins/versioned", &[], None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let removed = within("the removal", Box::new(|| !has_plugin(&b)));
    for (what, took) in [("plugin", plugin), ("workflow", flow), ("removal", removed)] {
        assert!(took < Duration::from_secs(2), "{what} took {took:?}");
    }
}

/// A TCP proxy in front of the test's PostgreSQL that the test can cut (every
/// connection closed, new ones closed as soon as they open) and restore: the
/// database going away and coming back, as the node sees it, without
/// stopping the server other tests share.
struct Outage {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Outage {
    fn in_front_of(upstream: std::net::SocketAddr) -> Outage {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let outage = Outage {
            addr: listener.local_addr().unwrap(),
            cut: Default::default(),
            open: Default::default(),
        };
        let (cut, open) = (outage.cut.clone(), outage.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if cut.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = std::net::TcpStream::connect(upstream) else {
                    continue;
                };
                let mut open = open.lock().unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                open.extend([client, server]);
            }
        });
        outage
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// `url` with its host and port replaced by the proxy's.
    fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let (authority, path) = rest.split_once('/').unwrap();
        let user = authority
            .rsplit_once('@')
            .map(|(user, _)| format!("{user}@"));
        format!(
            "{scheme}://{}{}/{path}",
            user.unwrap_or_default(),
            self.addr
        )
    }
}

/// The host and port of a `postgres://` URL.
fn address_of(url: &str) -> std::net::SocketAddr {
    use std::net::ToSocketAddrs;
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    host_port.to_socket_addrs().unwrap().next().unwrap()
}

/// The database going away while a node serves: new runs and reads of the
/// store are answered 503 `unavailable` with `Retry-After`; the runs in flight wait for
/// their writes, which the node tries again with backoff; when the database
/// is back every accepted run finishes with its output and no finished step
/// runs again, and new runs are accepted.
#[test]
fn a_database_outage_loses_nothing_accepted() {
    let Some(store) = fresh_store("a_database_outage_loses_nothing_accepted") else {
        return;
    };
    let outage = Outage::in_front_of(address_of(&store));
    let a = node(&outage.url(&store), "a", "2s");
    let ids: Vec<String> = (0..12)
        .map(|n| submit(&a, n, 500 + (n as u64 * 83) % 700))
        .collect();
    a.await_log(&ids[0], "nap", "sleeping", 1);
    outage.cut();
    let refused = a.post("/v1/workflows/durable/runs", r#"{"n": 99, "ms": 1}"#);
    refused.assert_error(503, "unavailable");
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    // A run this node runs is answered from memory; a list needs the store.
    let live = a.get(&format!("/v1/runs/{}", ids[0]));
    assert_eq!(live.status, 200, "{}", live.body);
    a.get("/v1/runs?workflow=durable")
        .assert_error(503, "unavailable");
    // The naps end meanwhile: their results and the next steps' start wait.
    a.await_stderr("the database is unreachable: runs wait for their writes");
    a.await_stderr("cannot renew the lease");
    outage.restore();
    check_runs(&a, &ids);
    let all = a.get("/v1/runs?workflow=durable&limit=1000").json();
    assert_eq!(all["runs"].as_array().unwrap().len(), ids.len(), "{all:#}");
    let after = submit(&a, ids.len(), 1);
    let run = a.wait_for_run(&after);
    assert_eq!(run["status"], "succeeded", "{run:#}");
}

/// Runs finished by this node, from its `/metrics`.
fn runs_finished_here(server: &Server) -> u64 {
    server
        .get("/metrics")
        .body
        .lines()
        .filter(|line| line.starts_with("trellis_runs_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A node with more work than it can run leaves the runs it accepts for a
/// node with room: `a` runs one step at a time, `b` takes the runs `a`
/// cannot start; every run succeeds once.
#[test]
fn a_busy_node_leaves_new_runs_to_a_node_with_room() {
    let Some(store) = fresh_store("a_busy_node_leaves_new_runs_to_a_node_with_room") else {
        return;
    };
    let a = Serve::new()
        .workflow("durable.toml", DURABLE)
        .env("TRELLIS_STORE", &store)
        .env("TRELLIS_NODE_ID", "a")
        .env("TRELLIS_MAX_CONCURRENT_STEPS", "1")
        .start();
    let b = node(&store, "b", "10s");
    let ids: Vec<String> = (0..8).map(|n| submit(&a, n, 600)).collect();
    check_runs(&b, &ids);
    let (on_a, on_b) = (runs_finished_here(&a), runs_finished_here(&b));
    assert_eq!(on_a + on_b, ids.len() as u64, "a ran {on_a}, b ran {on_b}");
    assert!(on_b > 0, "b ran none of them");
    eprintln!("a ran {on_a} runs, b ran {on_b}");
}

/// Retry and sub-workflows on PostgreSQL across two nodes: a parent whose
/// second child fails once, run on one node, is retried on the other, which
/// reuses the children that succeeded; lineage and children read the same
/// from both.
#[test]
fn a_parent_with_children_is_retried_on_another_node() {
    let Some(store) = fresh_store("a_parent_with_children_is_retried_on_another_node") else {
        return;
    };
    let flaky = "[[step]]\nid = \"maybe\"\nplugin = \"fail\"\n\
        input = { counter = \"flaky-{{ input.n }}\", fail_first = \"{{ 1 if input.n == 1 else 0 }}\" }\n";
    let parent = "[[step]]\nid = \"fan\"\nworkflow = \"flaky\"\nfor_each = \"{{ [0, 1, 2] }}\"\n\
        input = { n = \"{{ item }}\" }\n";
    let start = |id: &str| {
        Serve::new()
            .workflow("flaky.toml", flaky)
            .workflow("parent.toml", parent)
            .env("TRELLIS_STORE", &store)
            .env("TRELLIS_NODE_ID", id)
            .start()
    };
    let (a, b) = (start("a"), start("b"));
    let first = a.post("/v1/workflows/parent/runs?wait=60s", "{}");
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.json();
    assert_eq!(first["status"], "failed", "{first}");
    let id = first["id"].as_str().unwrap();

    let retry = b.post(&format!("/v1/runs/{id}/retry?wait=60s"), "");
    assert_eq!(retry.status, 200, "{}", retry.body);
    let retry = retry.json();
    assert_eq!(retry["status"], "succeeded", "{retry}");
    assert_eq!(retry["retry_of"], id);
    let counters: Vec<i64> = step(&retry, "fan")["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|output| output["maybe"]["counter"].as_i64().unwrap())
        .collect();
    assert_eq!(counters, [1, 2, 1]);
    let retry_id = retry["id"].as_str().unwrap();
    for server in [&a, &b] {
        let children = server.get(&format!("/v1/runs?parent={retry_id}")).json();
        let items: Vec<&Value> = children["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|child| &child["parent"]["item"])
            .collect();
        assert_eq!(items, [&json!(1)], "only item 1 ran again: {children}");
        let original = server.get(&format!("/v1/runs/{id}")).json();
        assert_eq!(original["retries"], json!([retry_id]));
        assert_eq!(
            server.get(&format!("/v1/runs?parent={id}")).json()["runs"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
    }
}

/// Four items of 800 ms each on a node that runs one attempt at a time.
const FAN: &str = r#"
[[step]]
id = "each"
plugin = "sleep"
for_each = "{{ input.items }}"
input = { ms = "{{ item }}" }
"#;

fn fan_node(store: &str, id: &str, steps: &str) -> Server {
    Serve::new()
        .workflow("fan.toml", FAN)
        .env("TRELLIS_STORE", store)
        .env("TRELLIS_NODE_ID", id)
        .env("TRELLIS_LEASE", "3s")
        .env("TRELLIS_MAX_CONCURRENT_STEPS", steps)
        .start()
}

/// Steps, not only runs, move between nodes: the items of a fan-out that
/// wait for a permit on a full node are claimed by a node with room, run
/// there once each, and their outcomes finish the run on the node that holds
/// it; a cancel of that run stops the step the other node runs for it.
#[test]
fn steps_waiting_on_a_full_node_run_on_a_node_with_room() {
    let Some(store) = fresh_store("steps_waiting_on_a_full_node_run_on_a_node_with_room") else {
        return;
    };
    let b = fan_node(&store, "b", "8");
    // `a` joins second: it sees `b` from the start.
    let a = fan_node(&store, "a", "1");
    let reply = a.post(
        "/v1/workflows/fan/runs?wait=60s",
        r#"{"items": [800, 800, 800, 800]}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let run = reply.json();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let each = step(&run, "each");
    assert_eq!(
        each["output"],
        serde_json::json!([{"slept_ms": 800}, {"slept_ms": 800}, {"slept_ms": 800}, {"slept_ms": 800}]),
        "{each:#}"
    );
    let attempts = each["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4, "one attempt per item: {each:#}");
    let mut items: Vec<u64> = attempts
        .iter()
        .map(|a| a["item"].as_u64().unwrap())
        .collect();
    items.sort_unstable();
    assert_eq!(items, [0, 1, 2, 3], "{each:#}");
    let on_b = attempts.iter().filter(|a| a["node"] == "b").count();
    let here = attempts.iter().filter(|a| a["node"].is_null()).count();
    assert!(on_b >= 1, "no item ran on b: {each:#}");
    assert_eq!(on_b + here, 4, "{each:#}");
    // `b`'s attempts keep their receipts.
    for attempt in attempts.iter().filter(|a| a["node"] == "b") {
        assert_eq!(attempt["status"], "succeeded", "{attempt:#}");
        assert!(
            attempt["duration_ms"].as_f64().unwrap() >= 800.0,
            "{attempt:#}"
        );
        assert!(
            attempt["fuel_consumed"].as_u64().unwrap() > 0,
            "{attempt:#}"
        );
    }

    // A long fan-out: `b` takes some of its items; a cancel on `a` stops them.
    let reply = a.post(
        "/v1/workflows/fan/runs",
        r#"{"items": [60000, 60000, 60000]}"#,
    );
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["id"].as_str().unwrap().to_owned();
    // `b` logs the runs whose steps it claims.
    b.await_stderr(&id);
    let asked = Instant::now();
    let reply = a.post(&format!("/v1/runs/{id}/cancel"), "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["status"], "cancelled", "{}", reply.body);
    b.await_stderr("was dropped by its run's node: stopping it");
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "b stopped the step {took:?} after the cancel"
    );
}
