//! The cluster's side of the PostgreSQL store: nodes and their leases, runs
//! claimed under them, and the epochs that fence a node that lost its claim.
//!
//! Time is the database's (`clock_timestamp()`), never a node's own clock, so
//! nodes whose clocks disagree still agree on whose lease ran out.
//!
//! - A node joins as a new incarnation (a UUID per process) under its
//!   `node_id`, with a lease that [`PgStore::renew`] extends.
//! - A run belongs to the incarnation in `runs.owner`. The node that accepts
//!   a run owns it from the start (epoch 1); a run whose owner's lease ran out,
//!   or that was released, is claimed by [`PgStore::claim`] with
//!   `FOR UPDATE SKIP LOCKED`, which adds one to its epoch.
//! - Each write of a run this store claimed checks that the run still has
//!   the epoch it was claimed with (`writer::fence`), under a row lock that a
//!   claim must wait for: once another node claimed the run, nothing of the
//!   old owner's lands.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

use super::{
    LOST, Member, PgStore, RUN_COLUMN_COUNT, load_items, load_steps, pg_error, query_cached,
    run_from_row,
};
use crate::store::{CatalogChange, DatabaseError, Node, StoreError, UnfinishedRun};

/// The channel of `LISTEN/NOTIFY` that says work may be waiting: runs
/// released, a run ready that its node left for others, a cancel asked.
pub(super) const WORK_CHANNEL: &str = "trellis_work";

/// What a renewal found about the runs this node holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Runs another node claimed since (this node's lease ran out): their
    /// late results are dropped.
    pub lost: Vec<String>,
    /// Runs someone asked to cancel (on any node).
    pub cancel: Vec<String>,
    /// Other nodes whose lease holds: someone to offer steps to.
    pub peers: usize,
}

impl PgStore {
    /// Joins the cluster as a new incarnation of `node_id`, with a lease of
    /// `lease` from now. Rows of nodes gone for a day are removed.
    pub async fn join(
        &self,
        node_id: &str,
        version: &str,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let incarnation = uuid::Uuid::now_v7().to_string();
        let conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "joining the cluster", e);
        conn.execute(
            "DELETE FROM nodes WHERE lease_until < clock_timestamp() - interval '1 day'",
            &[],
        )
        .await
        .map_err(failed)?;
        conn.execute(
            "INSERT INTO nodes (incarnation, id, version, started_at, last_seen, lease_until)
             VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp(),
                     clock_timestamp() + make_interval(secs => $4))",
            &[&incarnation, &node_id, &version, &lease.as_secs_f64()],
        )
        .await
        .map_err(failed)?;
        self.member
            .set(Member {
                incarnation,
                node_id: node_id.to_owned(),
            })
            .map_err(|_| {
                StoreError::Database(DatabaseError::new("this store already joined the cluster"))
            })
    }

    pub(super) fn member(&self) -> Result<&Member, StoreError> {
        self.member.get().ok_or_else(|| {
            StoreError::Database(DatabaseError::new("this store has not joined the cluster"))
        })
    }

    /// This node's incarnation, once joined.
    pub fn incarnation(&self) -> Option<&str> {
        self.member.get().map(|member| member.incarnation.as_str())
    }

    /// Extends this node's lease to `lease` from now (its row is made again
    /// if someone removed it) and tells which of its runs it lost or was
    /// asked to cancel.
    pub async fn renew(&self, lease: Duration, running_steps: u64) -> Result<Renewal, StoreError> {
        let member = self.member()?;
        let (ids, epochs): (Vec<String>, Vec<i64>) = self
            .claims
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, epoch)| **epoch != LOST)
            .map(|(id, epoch)| (id.clone(), *epoch))
            .unzip();
        let conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "renewing the lease", e);
        let peers = conn
            .query_one(
                "INSERT INTO nodes (incarnation, id, version, started_at, last_seen, lease_until,
                 running_steps)
             VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp(),
                     clock_timestamp() + make_interval(secs => $4), $5)
             ON CONFLICT (incarnation) DO UPDATE SET last_seen = excluded.last_seen,
                 lease_until = excluded.lease_until, running_steps = excluded.running_steps
             RETURNING (SELECT count(*) FROM nodes
                        WHERE incarnation <> $1 AND lease_until >= clock_timestamp())",
                &[
                    &member.incarnation,
                    &member.node_id,
                    &env!("CARGO_PKG_VERSION"),
                    &lease.as_secs_f64(),
                    &(running_steps.min(i64::MAX as u64) as i64),
                ],
            )
            .await
            .map_err(failed)?
            .get::<_, i64>(0);
        let mut renewal = Renewal {
            peers: usize::try_from(peers).unwrap_or(0),
            ..Renewal::default()
        };
        if ids.is_empty() {
            return Ok(renewal);
        }
        let rows = query_cached(
            &conn,
            &self.label,
            "SELECT c.id, r.epoch <> c.epoch OR r.owner IS DISTINCT FROM $3, r.cancel_requested
             FROM unnest($1::text[], $2::bigint[]) AS c (id, epoch)
             JOIN runs r ON r.id = c.id
             WHERE r.epoch <> c.epoch OR r.owner IS DISTINCT FROM $3 OR r.cancel_requested",
            &[&ids, &epochs, &member.incarnation],
        )
        .await?;
        let mut claims = self.claims.lock().unwrap();
        for row in rows {
            let id: String = row.get(0);
            if row.get::<_, bool>(1) {
                claims.insert(id.clone(), LOST);
                renewal.lost.push(id);
            } else if row.get::<_, bool>(2) {
                renewal.cancel.push(id);
            }
        }
        Ok(renewal)
    }

    /// Claims up to `limit` unfinished runs nobody holds (released, or whose
    /// owner's lease ran out, and with `ready` those never started that a
    /// busy node left for others), oldest first, and reads them as a
    /// restart would: this node resumes them.
    pub async fn claim(&self, limit: i64, ready: bool) -> Result<Vec<UnfinishedRun>, StoreError> {
        let member = self.member()?;
        let mut conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "claiming runs", e);
        let tx = conn.transaction().await.map_err(failed)?;
        let claimed = query_cached(
            &tx,
            &self.label,
            "WITH claimable AS (
                 SELECT r.id FROM runs r
                 WHERE r.status IN ('queued', 'running')
                   AND ($3 OR r.owner IS NOT NULL OR r.epoch > 0)
                   AND (r.owner IS NULL OR NOT EXISTS (
                       SELECT 1 FROM nodes n
                       WHERE n.incarnation = r.owner AND n.lease_until >= clock_timestamp()))
                 ORDER BY r.id
                 LIMIT $2
                 FOR UPDATE OF r SKIP LOCKED)
             UPDATE runs SET owner = $1, epoch = runs.epoch + 1
             FROM claimable WHERE runs.id = claimable.id
             RETURNING runs.id, runs.epoch",
            &[&member.incarnation, &limit, &ready],
        )
        .await?;
        let mut runs = Vec::with_capacity(claimed.len());
        let mut epochs = Vec::with_capacity(claimed.len());
        for row in &claimed {
            let id: String = row.get(0);
            epochs.push((id.clone(), row.get::<_, i64>(1)));
            let rows = query_cached(
                &tx,
                &self.label,
                &format!(
                    "SELECT {}, source, workflow_file, cancel_requested
                     FROM runs JOIN workflow_sources ON digest = workflow_digest
                     WHERE id = $1",
                    super::RUN_COLUMNS
                ),
                &[&id],
            )
            .await?;
            let Some(row) = rows.first() else {
                return Err(StoreError::Corrupt(format!(
                    "run {id} vanished while claimed"
                )));
            };
            let mut record = run_from_row(row)?;
            record.steps = load_steps(&tx, &self.label, &id).await?;
            let items = load_items(&tx, &self.label, &id).await?;
            runs.push(UnfinishedRun {
                record,
                workflow_source: row.get(RUN_COLUMN_COUNT),
                workflow_file: row.get(RUN_COLUMN_COUNT + 1),
                items,
                cancel_requested: row.get(RUN_COLUMN_COUNT + 2),
            });
        }
        tx.commit().await.map_err(failed)?;
        self.claims.lock().unwrap().extend(epochs);
        Ok(runs)
    }

    /// Leaves the cluster: this node's unfinished runs are released for the
    /// others to claim at once (they are told), and its row goes.
    pub async fn leave(&self) -> Result<u64, StoreError> {
        let member = self.member()?;
        let mut conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "leaving the cluster", e);
        let tx = conn.transaction().await.map_err(failed)?;
        let released = tx
            .execute(
                "UPDATE runs SET owner = NULL
                 WHERE owner = $1 AND status IN ('queued', 'running')",
                &[&member.incarnation],
            )
            .await
            .map_err(failed)?;
        tx.execute(
            "DELETE FROM nodes WHERE incarnation = $1",
            &[&member.incarnation],
        )
        .await
        .map_err(failed)?;
        if released > 0 {
            tx.execute("SELECT pg_notify($1, 'released')", &[&WORK_CHANNEL])
                .await
                .map_err(failed)?;
        }
        tx.commit().await.map_err(failed)?;
        self.claims.lock().unwrap().clear();
        Ok(released)
    }

    /// Asks whichever node runs `id` to cancel it (it is told at once).
    /// `false`: no such unfinished run.
    pub async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        let mut conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "asking for a cancel", e);
        let tx = conn.transaction().await.map_err(failed)?;
        let asked = tx
            .execute(
                "UPDATE runs SET cancel_requested = true
                 WHERE id = $1 AND status IN ('queued', 'running')",
                &[&id],
            )
            .await
            .map_err(failed)?;
        if asked > 0 {
            tx.execute("SELECT pg_notify($1, 'cancel')", &[&WORK_CHANNEL])
                .await
                .map_err(failed)?;
        }
        tx.commit().await.map_err(failed)?;
        Ok(asked > 0)
    }

    /// Records an upload this node made, for the others to apply (they are
    /// told at once).
    pub async fn publish(&self, change: &CatalogChange) -> Result<(), StoreError> {
        let member = self.member()?;
        let (kind, name, version, content): (&str, &str, Option<&str>, Option<&[u8]>) = match change
        {
            CatalogChange::PutPlugin { name, bytes } => ("put_plugin", name, None, Some(bytes)),
            CatalogChange::DeletePlugin { name, version } => {
                ("delete_plugin", name, version.as_deref(), None)
            }
            CatalogChange::PutWorkflow { name, source } => {
                ("put_workflow", name, None, Some(source.as_bytes()))
            }
        };
        let mut conn = self.reader().await?;
        let failed = |e| pg_error(&self.label, "sharing an upload", e);
        let tx = conn.transaction().await.map_err(failed)?;
        tx.execute(
            "INSERT INTO catalog (change, name, version, content, incarnation)
             VALUES ($1, $2, $3, $4, $5)",
            &[&kind, &name, &version, &content, &member.incarnation],
        )
        .await
        .map_err(failed)?;
        tx.execute("SELECT pg_notify($1, 'catalog')", &[&WORK_CHANNEL])
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)
    }

    /// The uploads after `seq` that other nodes made, oldest first, with
    /// their sequence numbers; and the newest sequence number seen.
    pub async fn catalog_since(
        &self,
        seq: i64,
    ) -> Result<(Vec<(i64, CatalogChange)>, i64), StoreError> {
        let member = self.member()?;
        let conn = self.reader().await?;
        let rows = query_cached(
            &conn,
            &self.label,
            "SELECT seq, change, name, version, content, incarnation = $2
             FROM catalog WHERE seq > $1 ORDER BY seq",
            &[&seq, &member.incarnation],
        )
        .await?;
        let mut newest = seq;
        let mut changes = Vec::new();
        for row in &rows {
            let seq: i64 = row.get(0);
            newest = newest.max(seq);
            if row.get::<_, bool>(5) {
                continue;
            }
            let name: String = row.get(2);
            let content: Option<Vec<u8>> = row.get(4);
            let change = match row.get::<_, &str>(1) {
                "put_plugin" => CatalogChange::PutPlugin {
                    name,
                    bytes: content.unwrap_or_default(),
                },
                "delete_plugin" => CatalogChange::DeletePlugin {
                    name,
                    version: row.get(3),
                },
                "put_workflow" => CatalogChange::PutWorkflow {
                    name,
                    source: String::from_utf8(content.unwrap_or_default()).map_err(|_| {
                        StoreError::Corrupt(format!("catalog {seq}: a workflow that is not UTF-8"))
                    })?,
                },
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "catalog {seq}: unknown change {other:?}"
                    )));
                }
            };
            changes.push((seq, change));
        }
        Ok((changes, newest))
    }

    /// The nodes seen in the last hour, by id; `alive` while their lease runs.
    pub async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let conn = self.reader().await?;
        let rows = query_cached(
            &conn,
            &self.label,
            "SELECT id, incarnation,
                 to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                 to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                 running_steps, version, lease_until >= clock_timestamp()
             FROM nodes
             WHERE last_seen >= clock_timestamp() - interval '1 hour'
             ORDER BY id, started_at",
            &[],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|row| Node {
                id: row.get(0),
                incarnation: row.get(1),
                started_at: row.get(2),
                last_seen: row.get(3),
                running_steps: row.get::<_, i64>(4).max(0) as u64,
                version: row.get(5),
                alive: row.get(6),
            })
            .collect())
    }

    /// A connection that `LISTEN`s on the work channel: each notification
    /// sends its payload. The channel closes when the connection breaks;
    /// listen again then (the sweep covers what was missed).
    pub async fn listen(&self) -> Result<Listener, StoreError> {
        let failed = |e| pg_error(&self.label, "listening for work", e);
        let (client, mut connection) = self.config.connect(NoTls).await.map_err(failed)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(note)) => {
                        if sender.send(note.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(error = %err, "the LISTEN connection broke");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {WORK_CHANNEL}"))
            .await
            .map_err(failed)?;
        Ok(Listener {
            _client: client,
            notes: receiver,
        })
    }
}

/// A `LISTEN` on the work channel; see [`PgStore::listen`].
pub struct Listener {
    _client: tokio_postgres::Client,
    notes: mpsc::UnboundedReceiver<String>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Listener")
    }
}

impl Listener {
    /// The next notification's payload; `None` once the connection broke.
    pub async fn next(&mut self) -> Option<String> {
        self.notes.recv().await
    }
}
