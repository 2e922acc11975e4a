//! Step attempts claimed one by one: a node whose attempts wait for a permit
//! offers them to the others as tasks (a row each, and a `NOTIFY`); a node
//! with room claims tasks in batches with `FOR UPDATE SKIP LOCKED` under its
//! lease, runs them and stores each outcome; the node that holds the run
//! takes the outcome and goes on with the run as if it had run the attempt
//! itself (it alone writes the run's records, under its fence).
//!
//! - A task whose claimer's lease ran out is not claimed again (it may
//!   have done part of its work): its holder finds it orphaned and makes
//!   another attempt, as a restart does with an attempt cut short.
//! - A task is the run's at the epoch it was offered under: once another
//!   node took the run over, its tasks are no longer claimable and an
//!   outcome stored for one is dropped (the new holder runs the step again).
//! - The holder withdraws a task nobody claimed yet when a permit of its
//!   own came first, and removes it once it has the outcome.

use super::{PgStore, cluster::WORK_CHANNEL, pg_error, query_cached};
use crate::store::StoreError;

/// Where a task is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    /// Gone: withdrawn, or its run was taken over or finished.
    Gone,
    /// Waiting to be claimed, or running on the node that claimed it.
    Open,
    /// Claimed by a node (its `node_id`) whose lease ran out: it will not
    /// say how it went.
    Orphaned(String),
    /// Run: its outcome (JSON).
    Done(String),
}

/// A task claimed by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedTask {
    pub id: String,
    pub run_id: String,
    /// The attempt to run (JSON), as offered.
    pub request: String,
}

/// The note on the work channel that says task `id` has its outcome.
pub const DONE_NOTE: &str = "done:";

impl PgStore {
    /// Offers an attempt of run `run_id` (held by this node) to the cluster
    /// as task `id`.
    pub async fn offer_task(
        &self,
        id: &str,
        run_id: &str,
        request: &str,
    ) -> Result<(), StoreError> {
        let member = self.member()?;
        let conn = self.reader().await?;
        let offered = conn
            .execute(
                "INSERT INTO step_tasks (id, run_id, epoch, request)
                 SELECT $1, id, epoch, $3 FROM runs WHERE id = $2 AND owner = $4",
                &[&id, &run_id, &request, &member.incarnation],
            )
            .await
            .map_err(|e| pg_error(&self.label, "offering a step", e))?;
        if offered == 0 {
            return Err(StoreError::Fenced(format!(
                "run {run_id} is no longer held by this node: its step is not offered"
            )));
        }
        conn.execute("SELECT pg_notify($1, 'task')", &[&WORK_CHANNEL])
            .await
            .map_err(|e| pg_error(&self.label, "offering a step", e))?;
        Ok(())
    }

    /// Withdraws task `id` if nobody claimed it yet: `true` if withdrawn.
    pub async fn withdraw_task(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.reader().await?;
        let withdrawn = conn
            .execute(
                "DELETE FROM step_tasks WHERE id = $1 AND claimed_by IS NULL",
                &[&id],
            )
            .await
            .map_err(|e| pg_error(&self.label, "withdrawing a step", e))?;
        Ok(withdrawn == 1)
    }

    /// Removes task `id`, claimed or not (its holder has its outcome, or no
    /// longer wants it).
    pub async fn remove_task(&self, id: &str) -> Result<(), StoreError> {
        let conn = self.reader().await?;
        conn.execute("DELETE FROM step_tasks WHERE id = $1", &[&id])
            .await
            .map_err(|e| pg_error(&self.label, "removing a step", e))?;
        Ok(())
    }

    /// Where task `id` is.
    pub async fn task_state(&self, id: &str) -> Result<TaskState, StoreError> {
        let conn = self.reader().await?;
        let rows = query_cached(
            &conn,
            &self.label,
            "SELECT outcome, claimed_by IS NOT NULL AND NOT EXISTS (
                 SELECT 1 FROM nodes n
                 WHERE n.incarnation = claimed_by AND n.lease_until >= clock_timestamp())
             , (SELECT n.id FROM nodes n WHERE n.incarnation = claimed_by)
             FROM step_tasks WHERE id = $1",
            &[&id],
        )
        .await?;
        Ok(match rows.first() {
            None => TaskState::Gone,
            Some(row) => match (row.get::<_, Option<String>>(0), row.get::<_, bool>(1)) {
                (Some(outcome), _) => TaskState::Done(outcome),
                (None, true) => TaskState::Orphaned(
                    row.get::<_, Option<String>>(2)
                        .unwrap_or_else(|| "a node gone from the cluster".to_owned()),
                ),
                (None, false) => TaskState::Open,
            },
        })
    }

    /// Claims up to `limit` tasks: offered under their run's current epoch
    /// and not claimed yet. Oldest first.
    pub async fn claim_tasks(&self, limit: i64) -> Result<Vec<ClaimedTask>, StoreError> {
        let member = self.member()?;
        let conn = self.reader().await?;
        let rows = query_cached(
            &conn,
            &self.label,
            "WITH claimable AS (
                 SELECT t.id FROM step_tasks t JOIN runs r ON r.id = t.run_id
                 WHERE t.claimed_by IS NULL
                   AND r.epoch = t.epoch
                   AND r.status IN ('queued', 'running')
                 ORDER BY t.id
                 LIMIT $2
                 FOR UPDATE OF t SKIP LOCKED)
             UPDATE step_tasks SET claimed_by = $1
             FROM claimable WHERE step_tasks.id = claimable.id
             RETURNING step_tasks.id, step_tasks.run_id, step_tasks.request",
            &[&member.incarnation, &limit],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|row| ClaimedTask {
                id: row.get(0),
                run_id: row.get(1),
                request: row.get(2),
            })
            .collect())
    }

    /// Stores the outcome of task `id`, which this node claimed, and tells
    /// its holder. `false`: the task is no longer this node's to finish (its
    /// run was taken over or ended, or it was claimed again after this
    /// node's lease ran out, and its holder made another attempt), and the
    /// outcome is dropped.
    pub async fn finish_task(&self, id: &str, outcome: &str) -> Result<bool, StoreError> {
        let member = self.member()?;
        let conn = self.reader().await?;
        let stored = conn
            .execute(
                "UPDATE step_tasks SET outcome = $2
                 FROM runs r
                 WHERE step_tasks.id = $1 AND step_tasks.claimed_by = $3
                   AND step_tasks.outcome IS NULL
                   AND EXISTS (SELECT 1 FROM nodes n
                       WHERE n.incarnation = $3 AND n.lease_until >= clock_timestamp())
                   AND r.id = step_tasks.run_id AND r.epoch = step_tasks.epoch",
                &[&id, &outcome, &member.incarnation],
            )
            .await
            .map_err(|e| pg_error(&self.label, "storing a step's outcome", e))?;
        if stored == 0 {
            return Ok(false);
        }
        conn.execute(
            "SELECT pg_notify($1, $2)",
            &[&WORK_CHANNEL, &format!("{DONE_NOTE}{id}")],
        )
        .await
        .map_err(|e| pg_error(&self.label, "storing a step's outcome", e))?;
        Ok(true)
    }

    /// Tasks that can no longer finish (their run was taken over or ended):
    /// removed. Returns how many.
    pub async fn sweep_tasks(&self) -> Result<u64, StoreError> {
        let conn = self.reader().await?;
        conn.execute(
            "DELETE FROM step_tasks t USING runs r
             WHERE r.id = t.run_id
               AND (r.epoch <> t.epoch OR r.status NOT IN ('queued', 'running'))",
            &[],
        )
        .await
        .map_err(|e| pg_error(&self.label, "sweeping step tasks", e))
    }
}
