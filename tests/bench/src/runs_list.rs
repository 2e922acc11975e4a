//! The `list` part: `GET /v1/runs` with 100,000 runs stored (issue 16: the
//! runs list answers in under 200 ms p95).
//!
//! For each store, SQLite and, when `TRELLIS_BENCH_POSTGRES` (or
//! `TRELLIS_TEST_POSTGRES`) names a server, PostgreSQL on a fresh schema:
//!
//! 1. the runs of `runs_list_seed.rs` are stored through the store's own
//!    API (`Store::create_run`, many at once, so that the writer commits
//!    them in full batches); PostgreSQL then gets the `VACUUM ANALYZE` its
//!    autovacuum would give a table that grew this much;
//! 2. `trellis serve` starts on that data (it takes the runs still in
//!    flight over, as after a restart);
//! 3. one keep-alive client asks each query of [`queries`] over and over,
//!    one request at a time, after a warm-up: p50, p95 and the maximum,
//!    against the goal; every answer is checked (each run matches the
//!    filter, newest first, the page as full as the data says);
//! 4. then every query at once, from [`Scale::clients`] clients.
//!
//! The client shares the machine's cores with the server (and PostgreSQL).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde::Serialize;
use trellis::record::RunStatus;
use trellis::store::{Durability, PgStore, SqliteStore, Store};

use crate::Options;
use crate::report::percentile;
use crate::system::Env;
use crate::system::client::Conn;
use crate::system::process::Server;

#[path = "runs_list_seed.rs"]
mod seed;

use seed::{Census, DEPLOY, LEGACY, ORDERS, Runs, WORKFLOWS, thousands};

/// Issue 16's goal: the p95 of each query.
const GOAL_P95_MS: f64 = 200.0;
/// The page size asked for (the API's default).
const PAGE: usize = 50;

/// How much of everything to do.
struct Scale {
    runs: usize,
    /// The page the deep queries ask for (following the cursor there).
    deep_page: usize,
    warmup: usize,
    samples: usize,
    /// The load of every query at once: clients, and requests each.
    clients: usize,
    per_client: usize,
}

const FULL: Scale = Scale {
    runs: 100_000,
    deep_page: 100,
    warmup: 10,
    samples: 200,
    clients: 16,
    per_client: 100,
};

const SMOKE: Scale = Scale {
    runs: 2_000,
    deep_page: 5,
    warmup: 1,
    samples: 3,
    clients: 4,
    per_client: 5,
};

/// What the part measured, for `runs-list.{md,json}` and BENCHMARKS.md.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub runs: usize,
    /// The runs by workflow and by status.
    pub census: String,
    pub stores: Vec<StoreListing>,
}

/// One store's figures.
#[derive(Debug, Serialize)]
pub struct StoreListing {
    pub store: &'static str,
    /// How the runs were stored, and how long it took.
    pub seeded: String,
    pub rows: Vec<Row>,
}

/// One query's latency.
#[derive(Debug, Serialize)]
pub struct Row {
    pub query: String,
    /// The request as the table shows it.
    pub request: String,
    /// Runs on the page it answers (`None`: pages of several queries).
    pub runs: Option<usize>,
    pub samples: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub max_ms: f64,
    pub met: bool,
}

impl Listing {
    /// The table BENCHMARKS.md quotes, with a line on the data above it.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "{} runs stored ({}); `trellis serve` takes those queued or running over.",
            thousands(self.runs),
            self.census
        );
        for store in &self.stores {
            out.push_str(&format!(" {}: {}.", store.store, store.seeded));
        }
        out.push_str(
            "\n\n| store | query | request | runs on the page | p50 | p95 | max | goal |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        for store in &self.stores {
            for row in &store.rows {
                let met = if row.met { "✅" } else { "❌" };
                out.push_str(&format!(
                    "| {} | {} | `{}` | {} | {} | {} | {} | p95 < {GOAL_P95_MS:.0} ms {met} |\n",
                    store.store,
                    row.query,
                    row.request,
                    row.runs.map_or_else(String::new, |runs| runs.to_string()),
                    ms(row.p50_ms),
                    ms(row.p95_ms),
                    ms(row.max_ms),
                ));
            }
        }
        out
    }
}

fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0} ms")
    } else if value >= 10.0 {
        format!("{value:.1} ms")
    } else {
        format!("{value:.2} ms")
    }
}

pub fn run(options: &Options) -> anyhow::Result<Listing> {
    let scale = if options.smoke { &SMOKE } else { &FULL };
    let env = Env::new(options)?;
    let began = Instant::now();
    eprintln!("list: SQLite...");
    let (sqlite, census) = on_sqlite(&env, scale)?;
    let mut stores = vec![sqlite];
    match crate::postgres::server_url() {
        Some(url) => {
            eprintln!("list: PostgreSQL...");
            stores.push(on_postgres(&env, scale, &url)?);
        }
        None => eprintln!("list: no PostgreSQL named (TRELLIS_BENCH_POSTGRES): no PostgreSQL rows"),
    }
    eprintln!("list: took {:.1} s", began.elapsed().as_secs_f64());
    Ok(Listing {
        runs: scale.runs,
        census: census.summary(),
        stores,
    })
}

/// The runs in a SQLite data dir, then `serve` on it.
fn on_sqlite(env: &Env, scale: &Scale) -> anyhow::Result<(StoreListing, Census)> {
    let work = prepare(env, "list-sqlite")?;
    let data = work.join("data");
    std::fs::create_dir_all(&data)?;
    let mut runs = Runs::new(scale.runs);
    let took = runtime()?.block_on(async {
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&data.join("trellis.db"), Durability::Normal)
                .context("opening the SQLite store")?,
        );
        seed::store_all(store, &mut runs).await
        // The store is dropped here: its writer commits what it holds.
    })?;
    let size = std::fs::read_dir(&data)?
        .filter_map(|entry| entry.ok()?.metadata().ok())
        .map(|meta| meta.len())
        .sum::<u64>();
    let seeded = format!(
        "stored in {:.1} s through `Store::create_run` ({} runs/s), {} MiB of database",
        took.as_secs_f64(),
        thousands((scale.runs as f64 / took.as_secs_f64()) as usize),
        size >> 20
    );
    eprintln!("list: SQLite: {seeded}");
    let census = runs.census().clone();
    let server = env.serve(&work, "data", &work.join("workflows"), &[])?;
    let rows = measure(&server, scale, &census)?;
    Ok((
        StoreListing {
            store: "SQLite",
            seeded,
            rows,
        },
        census,
    ))
}

/// The runs in a fresh schema on the server at `url`, then `serve` on it.
fn on_postgres(env: &Env, scale: &Scale, url: &str) -> anyhow::Result<StoreListing> {
    let work = prepare(env, "list-postgres")?;
    let mut runs = Runs::new(scale.runs);
    let (store_url, took, analyzed) = runtime()?.block_on(async {
        let store_url = crate::postgres::fresh_schema(url, &[]).await?;
        let store: Arc<dyn Store> = Arc::new(
            PgStore::connect(&store_url)
                .await
                .context("connecting the PostgreSQL store")?,
        );
        let took = seed::store_all(store, &mut runs).await?;
        // What autovacuum does to a table that grew this much (statistics
        // for the planner, the visibility map), now rather than within the
        // next minute; and a checkpoint, so that no query pays for the
        // inserts' one.
        let began = Instant::now();
        let (client, connection) = tokio_postgres::connect(&store_url, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(connection);
        client.batch_execute("VACUUM ANALYZE runs, steps").await?;
        if let Err(err) = client.batch_execute("CHECKPOINT").await {
            eprintln!("list: no CHECKPOINT after storing the runs ({err})");
        }
        anyhow::Ok((store_url, took, began.elapsed()))
    })?;
    let seeded = format!(
        "stored in {:.1} s through `Store::create_run` ({} runs/s), then `VACUUM ANALYZE` \
         ({:.1} s)",
        took.as_secs_f64(),
        thousands((scale.runs as f64 / took.as_secs_f64()) as usize),
        analyzed.as_secs_f64()
    );
    eprintln!("list: PostgreSQL: {seeded}");
    let census = runs.census().clone();
    let server = env.serve(
        &work,
        "data",
        &work.join("workflows"),
        &[("TRELLIS_STORE", store_url.as_str())],
    )?;
    let rows = measure(&server, scale, &census)?;
    Ok(StoreListing {
        store: "PostgreSQL",
        seeded,
        rows,
    })
}

/// A work dir with the workflows the runs belong to.
fn prepare(env: &Env, name: &str) -> anyhow::Result<PathBuf> {
    let work = env.dir(name)?;
    let workflows = work.join("workflows");
    std::fs::create_dir_all(&workflows)?;
    for workflow in WORKFLOWS {
        std::fs::write(workflows.join(workflow.file), workflow.source)?;
    }
    Ok(work)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// What every run on a page must be.
#[derive(Debug, Clone, Default)]
struct Filter {
    workflow: Option<&'static str>,
    status: Option<RunStatus>,
    parent: Option<String>,
    /// A deep page: every id is below the last one of the page before.
    below: Option<String>,
}

/// One query of the list.
#[derive(Debug, Clone)]
struct Query {
    label: String,
    /// The request as the table shows it.
    shown: String,
    path: String,
    filter: Filter,
    /// The runs the page holds; `None` for runs in flight (the server moves
    /// them on).
    expect: Option<usize>,
}

impl Query {
    fn new(label: &str, query: &str, filter: Filter, expect: Option<usize>) -> Query {
        Query {
            label: label.to_owned(),
            shown: format!("?{query}"),
            path: format!("/v1/runs?{query}"),
            filter,
            expect: expect.map(|matching| matching.min(PAGE)),
        }
    }

    /// Checks an answer; the number of runs on its page.
    fn check(&self, answer: &crate::system::client::Response) -> anyhow::Result<usize> {
        ensure!(
            answer.status == 200,
            "{}: {} {}",
            self.path,
            answer.status,
            answer.text()
        );
        let page = answer.json()?;
        let runs = page["runs"]
            .as_array()
            .with_context(|| format!("{}: no runs in {page}", self.path))?;
        let mut previous: Option<&str> = self.filter.below.as_deref();
        for run in runs {
            let id = run["id"].as_str().context("a run without an id")?;
            ensure!(
                previous.is_none_or(|p| id < p),
                "{}: {id} is not older than {previous:?}",
                self.path
            );
            previous = Some(id);
            let matches = |field: &str, want: Option<&str>| {
                want.is_none_or(|want| run[field].as_str() == Some(want))
            };
            ensure!(
                matches("workflow", self.filter.workflow)
                    && matches("status", self.filter.status.map(RunStatus::as_str))
                    && self
                        .filter
                        .parent
                        .as_deref()
                        .is_none_or(|parent| run["parent"]["run"].as_str() == Some(parent)),
                "{}: {run} does not match the filter",
                self.path
            );
        }
        if let Some(expect) = self.expect {
            ensure!(
                runs.len() == expect,
                "{}: {} runs, not {expect}",
                self.path,
                runs.len()
            );
        }
        Ok(runs.len())
    }
}

/// The cursor of page `page` of `query` (1: none), following `next_cursor`
/// from the first page, and the last id before it; each page checked.
fn cursor_to(
    conn: &mut Conn,
    query: &str,
    filter: &Filter,
    page: usize,
) -> anyhow::Result<(String, String)> {
    let mut cursor = None;
    let mut last = None;
    for n in 1..page {
        let path = match &cursor {
            None => format!("/v1/runs?{query}"),
            Some(cursor) => format!("/v1/runs?{query}&cursor={cursor}"),
        };
        let walk = Query {
            label: format!("page {n}"),
            shown: String::new(),
            path: path.clone(),
            filter: Filter {
                below: last.clone(),
                ..filter.clone()
            },
            expect: Some(PAGE),
        };
        let answer = conn.get(&path)?;
        walk.check(&answer)?;
        let body = answer.json()?;
        last = body["runs"][PAGE - 1]["id"].as_str().map(str::to_owned);
        cursor = Some(
            body["next_cursor"]
                .as_str()
                .with_context(|| format!("{path}: no next_cursor"))?
                .to_owned(),
        );
    }
    Ok((
        cursor.context("a deep page is past page 1")?,
        last.context("a deep page is past page 1")?,
    ))
}

/// The queries, as a user of the list (or the console) asks them.
fn queries(conn: &mut Conn, scale: &Scale, census: &Census) -> anyhow::Result<Vec<Query>> {
    let by = |workflow: Option<&'static str>, status: Option<RunStatus>| Filter {
        workflow,
        status,
        ..Filter::default()
    };
    let deep = scale.deep_page;
    let skipped = (deep - 1) * PAGE;
    let all = format!("limit={PAGE}");
    let (all_cursor, all_last) = cursor_to(conn, &all, &Filter::default(), deep)?;
    let orders = format!("workflow={}&limit={PAGE}", ORDERS.name);
    let (orders_cursor, orders_last) =
        cursor_to(conn, &orders, &by(Some(ORDERS.name), None), deep)?;
    let (parent, children) = census
        .newest_parent
        .clone()
        .context("the runs have no fan-out")?;
    Ok(vec![
        Query::new("newest runs", &all, Filter::default(), Some(census.total)),
        Query::new(
            "one workflow",
            &orders,
            by(Some(ORDERS.name), None),
            Some(census.of_workflow(ORDERS.name)),
        ),
        Query::new(
            "a workflow whose runs are all old",
            &format!("workflow={}&limit={PAGE}", LEGACY.name),
            by(Some(LEGACY.name), None),
            Some(census.of_workflow(LEGACY.name)),
        ),
        Query::new(
            "one status",
            &format!("status=failed&limit={PAGE}"),
            by(None, Some(RunStatus::Failed)),
            Some(census.of_status(RunStatus::Failed)),
        ),
        Query::new(
            "a status with very few runs",
            &format!("status=running&limit={PAGE}"),
            by(None, Some(RunStatus::Running)),
            None,
        ),
        Query::new(
            "workflow and status",
            &format!("workflow={}&status=failed&limit={PAGE}", ORDERS.name),
            by(Some(ORDERS.name), Some(RunStatus::Failed)),
            Some(census.of(ORDERS.name, RunStatus::Failed)),
        ),
        Query::new(
            "workflow and status, all old",
            &format!("workflow={}&status=succeeded&limit={PAGE}", LEGACY.name),
            by(Some(LEGACY.name), Some(RunStatus::Succeeded)),
            Some(census.of(LEGACY.name, RunStatus::Succeeded)),
        ),
        Query::new(
            "workflow and status, none match",
            &format!("workflow={}&status=running&limit={PAGE}", LEGACY.name),
            by(Some(LEGACY.name), Some(RunStatus::Running)),
            Some(0),
        ),
        Query {
            shown: format!("?{all}&cursor=<page {}'s>", deep - 1),
            ..Query::new(
                &format!("page {deep}"),
                &format!("{all}&cursor={all_cursor}"),
                Filter {
                    below: Some(all_last),
                    ..Filter::default()
                },
                Some(census.total.saturating_sub(skipped)),
            )
        },
        Query {
            shown: format!("?{orders}&cursor=<page {}'s>", deep - 1),
            ..Query::new(
                &format!("page {deep} of one workflow"),
                &format!("{orders}&cursor={orders_cursor}"),
                Filter {
                    below: Some(orders_last),
                    ..by(Some(ORDERS.name), None)
                },
                Some(census.of_workflow(ORDERS.name).saturating_sub(skipped)),
            )
        },
        Query {
            shown: format!("?parent=<a run with {children} children>&limit={PAGE}"),
            ..Query::new(
                "child runs of one run",
                &format!("parent={parent}&limit={PAGE}"),
                Filter {
                    parent: Some(parent.clone()),
                    ..Filter::default()
                },
                Some(children),
            )
        },
    ])
}

/// Every query, one request at a time, then all at once.
fn measure(server: &Server, scale: &Scale, census: &Census) -> anyhow::Result<Vec<Row>> {
    let mut conn = Conn::connect(server.addr)?;
    settle(&mut conn, census)?;
    let queries = queries(&mut conn, scale, census)?;
    let mut rows = Vec::new();
    for query in &queries {
        let mut runs = 0;
        for _ in 0..scale.warmup {
            runs = query.check(&conn.get(&query.path)?)?;
        }
        let mut samples = Vec::with_capacity(scale.samples);
        for _ in 0..scale.samples {
            let sent = Instant::now();
            let answer = conn.get(&query.path)?;
            samples.push(sent.elapsed().as_secs_f64() * 1e3);
            runs = query.check(&answer)?;
        }
        rows.push(row(&query.label, &query.shown, Some(runs), &mut samples));
    }
    rows.push(all_at_once(server, scale, &queries)?);
    Ok(rows)
}

/// Waits until the server has taken over the runs in flight: none of them
/// is `queued` any more, or the count stopped moving (they wait for step
/// permits).
fn settle(conn: &mut Conn, census: &Census) -> anyhow::Result<()> {
    let in_flight = census.of(DEPLOY.name, RunStatus::Queued);
    let path = "/v1/runs?status=queued&limit=1000";
    let began = Instant::now();
    let mut last = usize::MAX;
    loop {
        let queued = conn.get(path)?.json()?["runs"]
            .as_array()
            .map_or(0, Vec::len);
        if queued == 0 || queued == last || began.elapsed() > Duration::from_secs(30) {
            eprintln!(
                "list: {queued} of {in_flight} queued runs still queued after {:.1} s",
                began.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        last = queued;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every query at once: `clients` clients, each going round the queries
/// (starting at a different one) on a keep-alive connection of its own.
fn all_at_once(server: &Server, scale: &Scale, queries: &[Query]) -> anyhow::Result<Row> {
    let per_client: Vec<anyhow::Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..scale.clients)
            .map(|client| {
                scope.spawn(move || {
                    let mut conn = Conn::connect(server.addr)?;
                    let mut samples = Vec::with_capacity(scale.per_client);
                    for n in 0..scale.per_client {
                        let query = &queries[(client + n) % queries.len()];
                        let sent = Instant::now();
                        let answer = conn.get(&query.path)?;
                        samples.push(sent.elapsed().as_secs_f64() * 1e3);
                        query.check(&answer)?;
                    }
                    Ok(samples)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread panicked"))
            .collect()
    });
    let mut samples = Vec::new();
    for one in per_client {
        samples.extend(one?);
    }
    Ok(row(
        &format!("all of the above, {} clients at once", scale.clients),
        "each of the above in turn",
        None,
        &mut samples,
    ))
}

fn row(query: &str, request: &str, runs: Option<usize>, samples: &mut [f64]) -> Row {
    let p95 = percentile(samples, 95.0);
    Row {
        query: query.to_owned(),
        request: request.to_owned(),
        runs,
        samples: samples.len(),
        p50_ms: percentile(samples, 50.0),
        p95_ms: p95,
        max_ms: percentile(samples, 100.0),
        met: p95 < GOAL_P95_MS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_query_and_judges_the_p95() {
        let listing = Listing {
            runs: 100_000,
            census: "orders 50,000".into(),
            stores: vec![StoreListing {
                store: "SQLite",
                seeded: "stored in 4.0 s".into(),
                rows: vec![
                    row("newest runs", "?limit=50", Some(50), &mut [1.0, 2.0, 3.0]),
                    row("slow", "?status=x", None, &mut [150.0, 250.0]),
                ],
            }],
        };
        let table = listing.markdown();
        assert!(table.starts_with(
            "100,000 runs stored (orders 50,000); `trellis serve` takes those queued or running \
             over. SQLite: stored in 4.0 s."
        ));
        assert!(
            table.contains(
                "| SQLite | newest runs | `?limit=50` | 50 | 2.00 ms | 3.00 ms | 3.00 ms | p95 < 200 ms ✅ |"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "| SQLite | slow | `?status=x` |  | 150 ms | 250 ms | 250 ms | p95 < 200 ms ❌ |"
            ),
            "{table}"
        );
    }
}
