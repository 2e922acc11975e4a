//! The PostgreSQL schema ([`MIGRATIONS`], applied in order, their count kept
//! in `trellis_schema`) and how it is brought up to date: in one transaction
//! under an advisory lock, so several nodes starting at once migrate it once.

use deadpool_postgres::Object;

use super::{PgStore, pg_error};
use crate::store::{DatabaseError, StoreError};

/// The advisory-lock class of Trellis's locks ("trel"); the second key is
/// the schema's name hashed, so stores in two schemas of one database (the
/// tests do that) do not wait for each other.
pub(super) const LOCK_CLASS: i32 = 0x7472_656c;

/// Schema versions, oldest first. Append only: a released migration never
/// changes. The tables mirror SQLite's (`store/sqlite/schema.rs`); ids sort
/// bytewise (`COLLATE "C"`), as UUIDv7 text sorts by creation time.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: runs, steps, items of running `for_each` steps, workflow sources,
    // plugin state and what each workflow's state weighs.
    r#"
    CREATE TABLE workflow_sources (
        digest text COLLATE "C" PRIMARY KEY,   -- sha256 of source, hex
        source text NOT NULL
    );

    CREATE TABLE runs (
        id              text COLLATE "C" PRIMARY KEY, -- UUIDv7: sorts by creation time
        workflow        text NOT NULL,
        status          text NOT NULL,                -- queued, running, succeeded, failed, cancelled
        created_at      text NOT NULL,
        started_at      text,
        finished_at     text,
        duration_ms     double precision,
        input           text NOT NULL,                -- JSON
        output          text NOT NULL,                -- JSON
        error           text,                         -- JSON RunError
        idempotency_key text,
        workflow_digest text COLLATE "C" NOT NULL REFERENCES workflow_sources (digest),
        workflow_file   text NOT NULL,
        -- The cluster: the node incarnation that runs it (NULL: nobody, any
        -- node may claim it), the claim's epoch (each claim adds one; every
        -- write of the owner checks it: fencing), and a cancel asked of
        -- whichever node runs it.
        owner            text COLLATE "C",
        epoch            bigint NOT NULL DEFAULT 0,
        cancel_requested boolean NOT NULL DEFAULT false
    );
    CREATE INDEX runs_unfinished ON runs (id) WHERE status IN ('queued', 'running');
    CREATE INDEX runs_by_workflow ON runs (workflow, id);
    CREATE INDEX runs_by_status ON runs (status, id);
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (workflow, idempotency_key)
        WHERE idempotency_key IS NOT NULL;

    CREATE TABLE steps (
        run_id text COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx    bigint NOT NULL,                       -- position in the workflow's step order
        record text NOT NULL,                         -- JSON StepRecord, attempts included
        PRIMARY KEY (run_id, idx)
    );

    CREATE TABLE step_items (
        run_id   text COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        idx      bigint NOT NULL,                     -- the step's position in step order
        position bigint NOT NULL,                     -- the item's position in `for_each`
        record   text NOT NULL,                       -- JSON ItemRecord
        PRIMARY KEY (run_id, idx, position)
    );

    CREATE TABLE state (
        workflow text NOT NULL,
        key      text NOT NULL,
        value    bytea NOT NULL,
        PRIMARY KEY (workflow, key)
    );

    -- The nodes of the cluster, one row per process (incarnation); a node
    -- whose lease ran out loses its runs to the others.
    CREATE TABLE nodes (
        incarnation   text COLLATE "C" PRIMARY KEY,  -- UUID of the process
        id            text NOT NULL,                 -- node_id
        version       text NOT NULL,
        started_at    timestamptz NOT NULL,
        last_seen     timestamptz NOT NULL,
        lease_until   timestamptz NOT NULL,
        running_steps bigint NOT NULL DEFAULT 0
    );

    -- Kept by the store in the transaction of each set and delete, whose
    -- row lock serialises one workflow's writers on every node.
    CREATE TABLE state_usage (
        workflow text PRIMARY KEY,
        keys     bigint NOT NULL,
        bytes    bigint NOT NULL                      -- of keys and values
    );
    "#,
    // 2: uploads (plugins, workflows, deletions) as a log every node applies,
    // so an upload to one node is active on all.
    r#"
    CREATE TABLE catalog (
        seq         bigserial PRIMARY KEY,
        change      text NOT NULL,                    -- put_plugin, delete_plugin, put_workflow
        name        text NOT NULL,
        version     text,                             -- delete_plugin of one version
        content     bytea,                            -- the component, or the workflow's TOML
        incarnation text NOT NULL,                    -- the node it was made on
        made_at     timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    "#,
    // 3: lineage (retries, reruns, child runs) and pinned sub-workflows.
    r#"
    ALTER TABLE runs
        ADD COLUMN retry_of    text COLLATE "C",      -- the run a retry retries
        ADD COLUMN rerun_of    text COLLATE "C",      -- the run a rerun runs again
        ADD COLUMN parent_run  text COLLATE "C",      -- a child run's parent run,
        ADD COLUMN parent_step text,                  -- its sub-workflow step
        ADD COLUMN parent_item bigint,                -- and `for_each` position
        -- The workflows its sub-workflow steps may call, as they were when it
        -- was accepted: JSON { name: { digest, file } }.
        ADD COLUMN pins        text;
    CREATE INDEX runs_by_retry_of ON runs (retry_of) WHERE retry_of IS NOT NULL;
    CREATE INDEX runs_by_parent ON runs (parent_run, id) WHERE parent_run IS NOT NULL;
    "#,
    // 4: step attempts a busy node offers to the others (see tasks.rs).
    r#"
    CREATE TABLE step_tasks (
        id          text COLLATE "C" PRIMARY KEY,     -- UUIDv7
        run_id      text COLLATE "C" NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        epoch       bigint NOT NULL,                  -- the run's, when offered
        request     text NOT NULL,                    -- JSON: the attempt to run
        claimed_by  text,                             -- the incarnation running it
        outcome     text                              -- JSON, once it ran
    );
    CREATE INDEX step_tasks_unclaimed ON step_tasks (id) WHERE claimed_by IS NULL;
    "#,
    // 5: a workflow's runs by when they finished (its metrics over a window).
    r#"
    CREATE INDEX runs_by_workflow_finished ON runs (workflow, finished_at)
        WHERE finished_at IS NOT NULL;
    "#,
    // 6: a workflow's runs of one status, newest first (`GET /v1/runs` with
    // both filters), as SQLite's schema 6.
    r#"
    CREATE INDEX runs_by_workflow_status ON runs (workflow, status, id);
    "#,
];

/// Applies the migrations the database lacks, in one transaction holding the
/// schema's advisory lock; refuses a schema newer than this binary knows.
pub(super) async fn migrate(conn: &mut Object, store: &PgStore) -> Result<(), StoreError> {
    let at = &store.label;
    let failed = |e: tokio_postgres::Error| pg_error(at, "schema migration", e);
    let tx = conn.transaction().await.map_err(failed)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(current_schema()))",
        &[&LOCK_CLASS],
    )
    .await
    .map_err(failed)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS trellis_schema (
             one     boolean PRIMARY KEY DEFAULT true CHECK (one),
             version integer NOT NULL
         )",
    )
    .await
    .map_err(failed)?;
    let version: i32 = tx
        .query_opt("SELECT version FROM trellis_schema", &[])
        .await
        .map_err(failed)?
        .map(|row| row.get(0))
        .unwrap_or(0);
    let known = MIGRATIONS.len();
    let applied = usize::try_from(version).unwrap_or(usize::MAX);
    if applied > known {
        return Err(StoreError::Database(DatabaseError::new(format!(
            "the database at {at} has schema version {version}, newer than the newest this \
             trellis knows ({known}): it was written by a newer trellis; use that one, or \
             another database"
        ))));
    }
    if applied == known {
        return Ok(());
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.batch_execute(migration)
            .await
            .map_err(|e| pg_error(at, &format!("schema migration {}", index + 1), e))?;
    }
    tx.execute(
        "INSERT INTO trellis_schema (version) VALUES ($1)
         ON CONFLICT (one) DO UPDATE SET version = excluded.version",
        &[&(known as i32)],
    )
    .await
    .map_err(failed)?;
    tx.commit().await.map_err(failed)
}
