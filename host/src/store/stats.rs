//! The four process metrics of a workflow (`GET /v1/workflows/{name}/stats`),
//! computed in the database: one aggregate query over the runs that finished
//! in the window, one over their steps. Percentiles are nearest-rank: the
//! value at rank ceil(p/100 * n) of the n values sorted, found with
//! `ROW_NUMBER()` (both SQLite and PostgreSQL have window functions; SQLite
//! has no percentile aggregate).
//!
//! Each query is written once, for both databases: `{json}`, `{num}` and
//! `{cycle}` stand for how each reads a JSON field, a JSON number and a run's
//! cycle time, and `{workflow}`, `{since}` for its parameters.

/// The runs that finished in the window: counts by status and the spread of
/// the cycle time (created to finished).
const RUNS: &str = "
WITH done AS (
    SELECT status, {cycle} AS cycle
    FROM runs
    WHERE workflow = {workflow} AND finished_at >= {since}
      AND status IN ('succeeded', 'failed', 'cancelled')),
ranked AS (
    SELECT cycle, ROW_NUMBER() OVER (ORDER BY cycle) AS rn, COUNT(*) OVER () AS n FROM done)
SELECT
    (SELECT COUNT(*) FROM done WHERE status = 'succeeded'),
    (SELECT COUNT(*) FROM done WHERE status = 'failed'),
    (SELECT COUNT(*) FROM done WHERE status = 'cancelled'),
    (SELECT MAX(CASE WHEN rn = (50 * n + 99) / 100 THEN cycle END) FROM ranked),
    (SELECT MAX(CASE WHEN rn = (95 * n + 99) / 100 THEN cycle END) FROM ranked),
    (SELECT MAX(cycle) FROM ranked)";

/// Per step of those runs, the steps that ran: how many, how many failed,
/// and the spread of duration, fuel (over its attempts) and peak memory (the
/// largest of its attempts).
const STEPS: &str = "
WITH done AS (
    SELECT id FROM runs
    WHERE workflow = {workflow} AND finished_at >= {since}
      AND status IN ('succeeded', 'failed', 'cancelled')),
ran AS (
    SELECT {json_id} AS step, {json_status} AS status, {duration} AS duration,
           ({fuel}) AS fuel, ({memory}) AS memory
    FROM steps JOIN done ON steps.run_id = done.id
    WHERE {json_status} IN ('succeeded', 'failed') AND {not_reused}),
ranked AS (
    SELECT step, status, duration, fuel, memory,
           ROW_NUMBER() OVER (PARTITION BY step ORDER BY duration) AS rd,
           ROW_NUMBER() OVER (PARTITION BY step ORDER BY fuel) AS rf,
           ROW_NUMBER() OVER (PARTITION BY step ORDER BY memory) AS rm,
           COUNT(*) OVER (PARTITION BY step) AS n
    FROM ran)
SELECT step, COUNT(*), SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END),
    MAX(CASE WHEN rd = (50 * n + 99) / 100 THEN duration END),
    MAX(CASE WHEN rd = (95 * n + 99) / 100 THEN duration END),
    MAX(duration),
    MAX(CASE WHEN rf = (50 * n + 99) / 100 THEN fuel END),
    MAX(CASE WHEN rf = (95 * n + 99) / 100 THEN fuel END),
    MAX(fuel),
    MAX(CASE WHEN rm = (50 * n + 99) / 100 THEN memory END),
    MAX(CASE WHEN rm = (95 * n + 99) / 100 THEN memory END),
    MAX(memory)
FROM ranked GROUP BY step ORDER BY step";

/// How one database writes the pieces of [`RUNS`] and [`STEPS`].
pub(super) struct Dialect {
    pub(super) workflow: &'static str,
    pub(super) since: &'static str,
    pub(super) cycle: &'static str,
    pub(super) json_id: &'static str,
    pub(super) json_status: &'static str,
    pub(super) duration: &'static str,
    pub(super) fuel: &'static str,
    pub(super) memory: &'static str,
    pub(super) not_reused: &'static str,
}

pub(super) const SQLITE: Dialect = Dialect {
    workflow: "?1",
    since: "?2",
    // `unixepoch(.., 'subsec')`: seconds with their milliseconds (julianday
    // would be off by tens of microseconds).
    cycle: "ROUND((unixepoch(finished_at, 'subsec') - unixepoch(created_at, 'subsec')) * 1000.0, 3)",
    json_id: "json_extract(steps.record, '$.id')",
    json_status: "json_extract(steps.record, '$.status')",
    duration: "CAST(json_extract(steps.record, '$.duration_ms') AS REAL)",
    fuel: "SELECT CAST(SUM(json_extract(a.value, '$.fuel_consumed')) AS REAL) \
           FROM json_each(steps.record, '$.attempts') AS a",
    memory: "SELECT CAST(MAX(json_extract(a.value, '$.peak_memory')) AS REAL) \
             FROM json_each(steps.record, '$.attempts') AS a",
    not_reused: "json_extract(steps.record, '$.reused_from') IS NULL",
};

pub(super) const POSTGRES: Dialect = Dialect {
    workflow: "$1",
    since: "$2",
    cycle: "ROUND(EXTRACT(EPOCH FROM (finished_at::timestamptz - created_at::timestamptz)) * 1000.0, 3)::float8",
    json_id: "(steps.record::jsonb ->> 'id')",
    json_status: "(steps.record::jsonb ->> 'status')",
    duration: "(steps.record::jsonb ->> 'duration_ms')::float8",
    fuel: "SELECT SUM((a ->> 'fuel_consumed')::float8) \
           FROM jsonb_array_elements(steps.record::jsonb -> 'attempts') AS a",
    memory: "SELECT MAX((a ->> 'peak_memory')::float8) \
             FROM jsonb_array_elements(steps.record::jsonb -> 'attempts') AS a",
    not_reused: "(steps.record::jsonb -> 'reused_from') IS NULL",
};

impl Dialect {
    fn fill(&self, sql: &str) -> String {
        sql.replace("{workflow}", self.workflow)
            .replace("{since}", self.since)
            .replace("{cycle}", self.cycle)
            .replace("{json_id}", self.json_id)
            .replace("{json_status}", self.json_status)
            .replace("{duration}", self.duration)
            .replace("{fuel}", self.fuel)
            .replace("{memory}", self.memory)
            .replace("{not_reused}", self.not_reused)
    }

    /// The runs query: one row of succeeded, failed, cancelled (counts) and
    /// the cycle time's p50, p95, max.
    pub(super) fn runs(&self) -> String {
        self.fill(RUNS)
    }

    /// The steps query: per step, its id, runs, failed, then p50, p95, max
    /// of duration, fuel and peak memory.
    pub(super) fn steps(&self) -> String {
        self.fill(STEPS)
    }
}

/// Nine spread values in the steps query's order: duration, fuel, memory.
pub(super) fn step_stats(runs: i64, failed: i64, values: [Option<f64>; 9]) -> super::StepStats {
    let spread = |at: usize| super::Spread {
        p50: values[at],
        p95: values[at + 1],
        max: values[at + 2],
    };
    super::StepStats {
        runs: u64::try_from(runs).unwrap_or(0),
        failed: u64::try_from(failed).unwrap_or(0),
        duration_ms: spread(0),
        fuel: spread(3),
        memory_peak: spread(6),
    }
}
