//! The schema ([`MIGRATIONS`], applied in order and counted in
//! `PRAGMA user_version`) and how the writer's connection is set up.

use rusqlite::{Connection, TransactionBehavior};

use super::{BUSY_TIMEOUT, Durability, JOURNAL_SIZE_LIMIT, STATEMENT_CACHE};
use crate::store::{DatabaseError, StoreError};

/// Schema versions, oldest first. `PRAGMA user_version` counts those applied.
/// Append only: a released migration never changes.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: runs, steps, workflow sources, plugin state.
    "
    -- The workflow text each run was planned from, once per distinct text.
    CREATE TABLE workflow_sources (
        digest TEXT PRIMARY KEY NOT NULL,   -- sha256 of source, hex
        source TEXT NOT NULL
    ) STRICT;

    CREATE TABLE runs (
        id              TEXT PRIMARY KEY NOT NULL,  -- UUIDv7: sorts by creation time
        workflow        TEXT NOT NULL,
        status          TEXT NOT NULL,              -- queued, running, succeeded, failed, cancelled
        created_at      TEXT NOT NULL,
        started_at      TEXT,
        finished_at     TEXT,
        duration_ms     REAL,
        input           TEXT NOT NULL,              -- JSON
        output          TEXT NOT NULL,              -- JSON
        error           TEXT,                       -- JSON RunError
        idempotency_key TEXT,
        workflow_digest TEXT NOT NULL REFERENCES workflow_sources (digest),
        workflow_file   TEXT NOT NULL
    ) STRICT;
    CREATE INDEX runs_by_workflow ON runs (workflow, id);
    CREATE INDEX runs_by_status ON runs (status, id);
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (workflow, idempotency_key)
        WHERE idempotency_key IS NOT NULL;

    CREATE TABLE steps (
        run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx    INTEGER NOT NULL,                    -- position in the workflow's step order
        record TEXT NOT NULL,                       -- JSON StepRecord, attempts included
        PRIMARY KEY (run_id, idx)
    ) STRICT;

    CREATE TABLE state (
        workflow TEXT NOT NULL,
        key      TEXT NOT NULL,
        value    BLOB NOT NULL,
        PRIMARY KEY (workflow, key)
    ) STRICT;
    ",
    // 2: the finished items of running `for_each` steps.
    "
    CREATE TABLE step_items (
        run_id   TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx      INTEGER NOT NULL,                  -- the step's position in step order
        position INTEGER NOT NULL,                  -- the item's position in `for_each`
        record   TEXT NOT NULL,                     -- JSON ItemRecord
        PRIMARY KEY (run_id, idx, position)
    ) STRICT;
    ",
    // 3: how much state each workflow keeps, kept up to date by triggers, so
    // the quota check costs one row read.
    "
    CREATE TABLE state_usage (
        workflow TEXT PRIMARY KEY NOT NULL,
        keys     INTEGER NOT NULL,
        bytes    INTEGER NOT NULL                   -- of keys and values
    ) STRICT;
    INSERT INTO state_usage (workflow, keys, bytes)
        SELECT workflow, count(*), sum(length(CAST(key AS BLOB)) + length(value))
        FROM state GROUP BY workflow;
    CREATE TRIGGER state_inserted AFTER INSERT ON state BEGIN
        INSERT INTO state_usage (workflow, keys, bytes)
            VALUES (new.workflow, 1, length(CAST(new.key AS BLOB)) + length(new.value))
            ON CONFLICT (workflow) DO UPDATE SET keys = keys + 1, bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER state_updated AFTER UPDATE OF value ON state BEGIN
        UPDATE state_usage SET bytes = bytes - length(old.value) + length(new.value)
            WHERE workflow = new.workflow;
    END;
    CREATE TRIGGER state_deleted AFTER DELETE ON state BEGIN
        UPDATE state_usage
            SET keys = keys - 1, bytes = bytes - length(CAST(old.key AS BLOB)) - length(old.value)
            WHERE workflow = old.workflow;
    END;
    ",
    // 4: lineage (retries, reruns, child runs) and pinned sub-workflows.
    "
    ALTER TABLE runs ADD COLUMN retry_of TEXT;      -- the run a retry retries
    ALTER TABLE runs ADD COLUMN rerun_of TEXT;      -- the run a rerun runs again
    ALTER TABLE runs ADD COLUMN parent_run TEXT;    -- a child run's parent run,
    ALTER TABLE runs ADD COLUMN parent_step TEXT;   -- its sub-workflow step
    ALTER TABLE runs ADD COLUMN parent_item INTEGER; -- and `for_each` position
    -- The workflows its sub-workflow steps may call, as they were when it was
    -- accepted: JSON { name: { digest, file } } (sources in workflow_sources).
    ALTER TABLE runs ADD COLUMN pins TEXT;
    CREATE INDEX runs_by_retry_of ON runs (retry_of) WHERE retry_of IS NOT NULL;
    CREATE INDEX runs_by_parent ON runs (parent_run, id) WHERE parent_run IS NOT NULL;
    ",
    // 5: a workflow's runs by when they finished (its metrics over a window).
    "
    CREATE INDEX runs_by_workflow_finished ON runs (workflow, finished_at)
        WHERE finished_at IS NOT NULL;
    ",
    // 6: a workflow's runs of one status, newest first (`GET /v1/runs` with
    // both filters). Without it the list walks one filter's index and reads
    // each row for the other: every newer run of that status, when the
    // workflow's runs are old (issue 16: 60,000 rows for one page).
    "
    CREATE INDEX runs_by_workflow_status ON runs (workflow, status, id);
    ",
];

pub(super) fn configure_writer(
    conn: &Connection,
    durability: Durability,
    wal: bool,
    name: &str,
) -> Result<(), StoreError> {
    let in_file = |e: rusqlite::Error| {
        StoreError::Database(DatabaseError::with_source(format!("{name}: {e}"), e))
    };
    conn.busy_timeout(BUSY_TIMEOUT).map_err(in_file)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    if wal {
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "wal", |row| row.get(0))
            .map_err(in_file)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Database(DatabaseError::new(format!(
                "{name}: cannot switch to WAL mode (the journal mode is {mode})"
            ))));
        }
    }
    let synchronous = match durability {
        Durability::Normal => "NORMAL",
        Durability::Fsync => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(in_file)?;
    conn.pragma_update(None, "foreign_keys", true)
        .map_err(in_file)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
        .map_err(in_file)?;
    Ok(())
}

/// Applies the migrations the database lacks, all in one transaction, so two
/// processes opening a new file at once do not both migrate it.
pub(super) fn migrate(conn: &mut Connection, name: &str) -> Result<(), StoreError> {
    let in_file = |e: rusqlite::Error| {
        StoreError::Database(DatabaseError::with_source(format!("{name}: {e}"), e))
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(in_file)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(in_file)?;
    let known = MIGRATIONS.len();
    let applied = usize::try_from(version).unwrap_or(usize::MAX);
    if applied > known {
        return Err(StoreError::Database(DatabaseError::new(format!(
            "{name} has schema version {version}, newer than the newest this trellis knows \
             ({known}): it was written by a newer trellis; use that one, or another data dir"
        ))));
    }
    if applied == known {
        return Ok(());
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(migration).map_err(|e| {
            StoreError::Database(DatabaseError::with_source(
                format!("{name}: schema migration {}: {e}", index + 1),
                e,
            ))
        })?;
    }
    tx.pragma_update(None, "user_version", known as i64)
        .map_err(in_file)?;
    tx.commit().map_err(in_file)
}
