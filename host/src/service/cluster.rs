//! This service as a node of a cluster (several `trellis serve` on one
//! PostgreSQL; DESIGN.md "Storage and scale-out").
//!
//! The node joins under its `node_id`, resumes the runs it can claim (those
//! of nodes whose lease ran out, or that were released), then keeps its lease
//! in the background: every `lease`/3 it renews the lease, stops the runs it
//! lost or was asked to cancel, and claims what is claimable. A `NOTIFY` on
//! the work channel (runs released, a cancel asked) does the same at once;
//! the periodic sweep only catches what a lost notification or an expired
//! lease leaves.
//!
//! A node whose step attempts wait for a permit (it has more work than
//! `max_concurrent_steps`) does not take the runs it accepts: it stores them
//! ready, with no owner, and says so on the channel; a node with room claims
//! as many as it could start, and claims more each time a run of its own
//! ends while ready runs may be waiting. Leaving (a graceful stop) releases its unfinished runs so
//! the others take them at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Service;
use crate::store::{CatalogChange, DONE_NOTE, Listener, Node, PgStore, Renewal, StoreError};

/// Runs claimed in one transaction.
const CLAIM_BATCH: i64 = 64;
/// How long a broken `LISTEN` connection waits before it is made again.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// The node's place in the cluster.
pub(super) struct Cluster {
    pub(super) store: Arc<PgStore>,
    pub(super) lease: Duration,
    /// The last upload of the shared catalog this node applied (one sync
    /// at a time).
    pub(super) catalog_seq: tokio::sync::Mutex<i64>,
    /// Wakes the lease loop to claim ready runs (this node made room).
    pub(super) wake: tokio::sync::Notify,
    /// Runs may be waiting ready (a busy node left them; this one was busy
    /// when told): claim some when there is room.
    pub(super) ready_waiting: AtomicBool,
    /// Steps this node offered and waits for, by task: woken by the task's
    /// `done:` note.
    pub(super) waiters:
        std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Other live nodes at the last renewal: steps are offered only if some.
    pub(super) peers: std::sync::atomic::AtomicUsize,
}

impl Cluster {
    /// Resolves when task `task` is said to be done (or at once, if it was
    /// said since the last call for it).
    pub(super) fn task_done(&self, task: &str) -> impl std::future::Future<Output = ()> + use<> {
        let notify = self
            .waiters
            .lock()
            .unwrap()
            .entry(task.to_owned())
            .or_default()
            .clone();
        async move { notify.notified().await }
    }

    pub(super) fn forget_waiter(&self, task: &str) {
        self.waiters.lock().unwrap().remove(task);
    }

    fn tell_done(&self, task: &str) {
        if let Some(notify) = self.waiters.lock().unwrap().get(task) {
            notify.notify_one();
        }
    }
}

/// `<hostname>-<pid>`: the default `node_id`, unique among the processes
/// of one machine.
pub(super) fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".to_owned());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(48)
        .collect();
    format!("{host}-{}", std::process::id())
}

impl Service {
    /// Joins the cluster, resumes every run it can claim, and keeps the
    /// lease from then on.
    pub(super) async fn join_cluster(&self) -> Result<(), StoreError> {
        let Some(cluster) = &self.inner.cluster else {
            return Ok(());
        };
        cluster
            .store
            .join(
                &self.inner.node_id,
                env!("CARGO_PKG_VERSION"),
                cluster.lease,
            )
            .await?;
        tracing::info!(
            node_id = %self.inner.node_id,
            incarnation = cluster.store.incarnation().unwrap_or_default(),
            lease = ?cluster.lease,
            "joined the cluster"
        );
        // The nodes there are (someone to offer steps to?) from the start.
        self.act_on(cluster.store.renew(cluster.lease, 0).await?);
        // Uploads made on other nodes first: a run claimed next may need them.
        self.sync_catalog(cluster).await?;
        self.claim_all(cluster).await?;
        tokio::spawn(self.clone().keep_lease());
        Ok(())
    }

    /// Applies the uploads other nodes made since the last sync: each goes
    /// through the same validation as an upload to this node.
    async fn sync_catalog(&self, cluster: &Cluster) -> Result<(), StoreError> {
        let mut applied = cluster.catalog_seq.lock().await;
        let (changes, newest) = cluster.store.catalog_since(*applied).await?;
        for (seq, change) in changes {
            self.apply_change(seq, change).await;
        }
        *applied = newest;
        Ok(())
    }

    async fn apply_change(&self, seq: i64, change: CatalogChange) {
        match change {
            CatalogChange::PutPlugin { name, bytes } => {
                match self.activate_plugin(&name, bytes).await {
                    Ok((plugin, true)) => {
                        tracing::info!(seq, plugin = %plugin.label(), "plugin uploaded on another node activated")
                    }
                    Ok((_, false)) => {}
                    Err(err) => {
                        tracing::warn!(seq, plugin = %name, error = %err, "a plugin uploaded on another node is not usable here")
                    }
                }
            }
            CatalogChange::DeletePlugin { name, version } => {
                let version = version
                    .as_deref()
                    .and_then(|v| semver::Version::parse(v).ok());
                let removed = self.remove_plugin(&name, version.as_ref());
                if !removed.is_empty() {
                    tracing::info!(seq, plugin = %name, "plugin removed on another node");
                }
            }
            CatalogChange::PutWorkflow { name, source } => {
                let unchanged = self
                    .workflow(&name)
                    .is_some_and(|entry| entry.source == source);
                if unchanged {
                    return;
                }
                match self.activate_workflow(&name, &source) {
                    Ok(_) => {
                        tracing::info!(seq, workflow = %name, "workflow uploaded on another node")
                    }
                    Err(err) => {
                        tracing::warn!(seq, workflow = %name, error = %err, "a workflow uploaded on another node is not usable here")
                    }
                }
            }
        }
    }

    /// Whether this node is one of a cluster's (on PostgreSQL).
    pub(super) fn is_clustered(&self) -> bool {
        self.inner.cluster.is_some()
    }

    /// Shares an upload made on this node with the others (on PostgreSQL;
    /// nothing to do alone). A failure leaves it active here only, and is
    /// logged.
    pub(super) async fn share(&self, change: CatalogChange) {
        if let Some(cluster) = &self.inner.cluster
            && let Err(err) = cluster.store.publish(&change).await
        {
            tracing::error!(error = %err, "an upload could not be shared: it is active on this node only");
        }
    }

    /// Claims and resumes batches of runs whose node is gone until none is
    /// left, then as many ready runs as there is room for.
    async fn claim_all(&self, cluster: &Cluster) -> Result<usize, StoreError> {
        let mut claimed = 0;
        while !self.inner.closing.is_cancelled() {
            let runs = cluster.store.claim(CLAIM_BATCH, false).await?;
            let batch = runs.len();
            if batch > 0 {
                tracing::info!(runs = batch, "claimed runs to resume");
            }
            self.resume(runs).await?;
            claimed += batch;
            if batch < CLAIM_BATCH as usize {
                break;
            }
        }
        // Ready runs too: one whose announcement was missed is found here.
        Ok(claimed + self.claim_ready(cluster).await?)
    }

    /// Claims ready runs (left by busy nodes) while this node has room: as
    /// many as steps could start now. Called when ready runs may be waiting:
    /// told so, on a sweep, or when a run ended here while they were.
    async fn claim_ready(&self, cluster: &Cluster) -> Result<usize, StoreError> {
        if self.inner.closing.is_cancelled() || self.is_busy() {
            return Ok(0);
        }
        let room = self
            .inner
            .executor
            .free_steps()
            .clamp(1, CLAIM_BATCH as usize);
        let runs = cluster.store.claim(room as i64, true).await?;
        let batch = runs.len();
        // A full batch: more may be waiting.
        cluster
            .ready_waiting
            .store(batch == room, Ordering::Relaxed);
        if batch > 0 {
            tracing::debug!(runs = batch, "claimed ready runs");
        }
        self.resume(runs).await?;
        Ok(batch)
    }

    /// Whether this node, on a cluster, has more work than it can run at
    /// once (step attempts wait for a permit): new runs are then left for
    /// a node with room. Alone, a node queues them itself.
    pub(super) fn is_busy(&self) -> bool {
        self.inner.cluster.is_some() && self.inner.executor.waiting_steps() > 0
    }

    /// A run this node accepted was left ready for others: tell them.
    pub(super) fn left_ready(&self) {
        let Some(cluster) = &self.inner.cluster else {
            return;
        };
        cluster.ready_waiting.store(true, Ordering::Relaxed);
        let store = cluster.store.clone();
        tokio::spawn(async move {
            if let Err(err) = store.announce_ready().await {
                tracing::warn!(error = %err, "cannot announce a ready run; the sweep finds it");
            }
        });
    }

    /// A run ended here: if ready runs may be waiting, claim some.
    pub(super) fn room_made(&self) {
        if let Some(cluster) = &self.inner.cluster
            && cluster.ready_waiting.load(Ordering::Relaxed)
        {
            cluster.wake.notify_one();
        }
    }

    /// Renews the lease, acts on what it finds, claims: every lease/3 and
    /// at each notification, until the service closes.
    async fn keep_lease(self) {
        let Some(cluster) = &self.inner.cluster else {
            return;
        };
        let period = cluster.lease / 3;
        let mut listener: Option<Listener> = None;
        let mut relisten = tokio::time::Instant::now();
        let mut sweep = tokio::time::Instant::now() + period;
        loop {
            if listener.is_none() && tokio::time::Instant::now() >= relisten {
                match cluster.store.listen().await {
                    Ok(listening) => listener = Some(listening),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot listen for work; the sweep still runs");
                        relisten = tokio::time::Instant::now() + RELISTEN_AFTER;
                    }
                }
            }
            tokio::select! {
                () = self.inner.closing.cancelled() => return,
                () = tokio::time::sleep_until(sweep) => {
                    sweep = tokio::time::Instant::now() + period;
                }
                note = next_note(&mut listener) => match note.as_deref() {
                    None => {
                        listener = None;
                        relisten = tokio::time::Instant::now() + RELISTEN_AFTER;
                    }
                    // A step another node ran: wake who waits for it.
                    Some(note) if note.starts_with(DONE_NOTE) => {
                        cluster.tell_done(&note[DONE_NOTE.len()..]);
                        continue;
                    }
                    // A step offered: claim, if there is room.
                    Some("task") => {
                        self.claim_tasks_logged(cluster).await;
                        continue;
                    }
                    // A ready run: claim, if there is room; nothing else.
                    Some("ready") => {
                        cluster.ready_waiting.store(true, Ordering::Relaxed);
                        self.claim_ready_logged(cluster).await;
                        continue;
                    }
                    Some(_) => {}
                },
                () = cluster.wake.notified() => {
                    self.claim_tasks_logged(cluster).await;
                    self.claim_ready_logged(cluster).await;
                    continue;
                }
            }
            if let Err(err) = self.sync_catalog(cluster).await {
                tracing::warn!(error = %err, "cannot read the uploads of other nodes; trying again");
            }
            let running = self.inner.executor.running_steps() as u64;
            match cluster.store.renew(cluster.lease, running).await {
                Ok(renewal) => self.act_on(renewal),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot renew the lease; trying again");
                    continue;
                }
            }
            if let Err(err) = self.claim_all(cluster).await {
                tracing::warn!(error = %err, "cannot claim runs; trying again");
            }
            if let Err(err) = cluster.store.sweep_tasks().await {
                tracing::debug!(error = %err, "cannot sweep step tasks; trying again");
            }
            self.claim_tasks_logged(cluster).await;
        }
    }

    async fn claim_tasks_logged(&self, cluster: &Cluster) {
        if let Err(err) = self.claim_tasks(cluster).await {
            tracing::warn!(error = %err, "cannot claim offered steps; trying again");
        }
    }

    /// This node's place in the cluster.
    pub(super) fn cluster(&self) -> Result<&Cluster, StoreError> {
        self.inner.cluster.as_ref().ok_or_else(|| {
            StoreError::Database(crate::store::DatabaseError::new(
                "this node is not a cluster's: it offers no steps",
            ))
        })
    }

    async fn claim_ready_logged(&self, cluster: &Cluster) {
        if let Err(err) = self.claim_ready(cluster).await {
            tracing::warn!(error = %err, "cannot claim ready runs; trying again");
        }
    }

    /// Stops here the runs another node took over (their late writes are
    /// fenced anyway) and those someone asked to cancel.
    fn act_on(&self, renewal: Renewal) {
        if let Some(cluster) = &self.inner.cluster {
            cluster.peers.store(renewal.peers, Ordering::Relaxed);
        }
        let active = self.inner.active.lock().unwrap();
        for id in &renewal.lost {
            if let Some(run) = active.get(id) {
                tracing::warn!(run_id = %id, "another node took this run over (this node's lease ran out): stopping it here");
                run.cancel.cancel();
            }
        }
        for id in &renewal.cancel {
            if let Some(run) = active.get(id) {
                tracing::info!(run_id = %id, "cancel asked on another node");
                run.cancel.cancel();
            }
        }
    }

    /// Leaves the cluster (a graceful stop): the unfinished runs this node
    /// holds are released for the others to claim at once.
    pub async fn leave(&self) {
        let Some(cluster) = &self.inner.cluster else {
            return;
        };
        self.close();
        match cluster.store.leave().await {
            Ok(released) => tracing::info!(released, "left the cluster"),
            Err(err) => {
                tracing::warn!(error = %err, "cannot leave the cluster; its runs move when the lease runs out")
            }
        }
    }

    /// The nodes sharing the store: the cluster's, or this one alone.
    pub async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        match &self.inner.cluster {
            Some(cluster) => cluster.store.nodes().await,
            None => {
                let now = crate::record::now_rfc3339();
                Ok(vec![Node {
                    id: self.inner.node_id.clone(),
                    incarnation: self.inner.node_id.clone(),
                    started_at: self.inner.started_at.clone(),
                    last_seen: now,
                    running_steps: self.inner.executor.running_steps() as u64,
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    alive: true,
                }])
            }
        }
    }

    /// Asks the node that runs `id` to cancel it: `false` when no such run is
    /// unfinished. Only a cluster has other nodes to ask.
    pub(super) async fn request_cancel(&self, id: &str) -> Result<bool, StoreError> {
        match &self.inner.cluster {
            Some(cluster) => cluster.store.request_cancel(id).await,
            None => Ok(false),
        }
    }
}

async fn next_note(listener: &mut Option<Listener>) -> Option<String> {
    match listener {
        Some(listener) => listener.next().await,
        None => std::future::pending().await,
    }
}
