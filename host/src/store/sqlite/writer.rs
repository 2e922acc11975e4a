//! The group-commit writer: one thread owns the only read-write connection,
//! takes every command already queued (up to [`MAX_BATCH`]) and runs them in
//! one transaction, each under its own savepoint so that a command that fails
//! fails alone. A [`Commit::Soon`] batch may wait up to the linger for company.

use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::MAX_BATCH;
use crate::store::{Commit, Created, DatabaseError, StoreError};

/// What the writer thread is asked to do.
pub(super) enum Message {
    Write(WriteCommand),
    /// A read of an in-memory store, which has no other connection. It
    /// answers by itself.
    Read(ReadOp),
}

/// A read run on the writer's connection.
pub(super) type ReadOp = Box<dyn FnOnce(&mut Connection) + Send>;

/// The SQL of one write, run on the writer's connection.
pub(super) type WriteOp = Box<dyn FnOnce(&Connection) -> Result<Written, StoreError> + Send>;

/// One write, run inside a batch's transaction under its own savepoint.
pub(super) struct WriteCommand {
    pub(super) op: WriteOp,
    /// Answered after the commit (or with the reason there was none).
    pub(super) reply: oneshot::Sender<Result<Written, StoreError>>,
    pub(super) commit: Commit,
}

/// What a write gives back.
pub(super) enum Written {
    Run(Created),
    Done,
}

/// Takes what is queued, commits it as one batch, answers, repeats; ends once
/// the store is dropped and the queue is empty.
///
/// A batch of [`Commit::Soon`] writes alone (nobody waits for them) waits up
/// to `linger` ([`LINGER`]) for more: a finished step's write then shares its commit with
/// the next step's start, which the executor does wait for, instead of
/// committing just before it and making it wait for two commits in a row. A
/// [`Commit::Now`] write, a read or a full batch ends the wait at once.
pub(super) fn writer_loop(
    mut conn: Connection,
    messages: mpsc::Receiver<Message>,
    linger: Duration,
) {
    while let Ok(first) = messages.recv() {
        let mut batch = Batch::default();
        batch.push(first);
        batch.take_queued(&messages);
        if !batch.urgent && !batch.full() {
            let deadline = std::time::Instant::now() + linger;
            while !batch.urgent && !batch.full() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match messages.recv_timeout(left) {
                    Ok(message) => {
                        batch.push(message);
                        batch.take_queued(&messages);
                    }
                    // The deadline passed, or the store is gone: commit what
                    // there is.
                    Err(_) => break,
                }
            }
        }
        tracing::trace!(
            writes = batch.writes.len(),
            reads = batch.reads.len(),
            "store batch"
        );
        commit_batch(&mut conn, batch.writes);
        // After the commit: a read queued behind a write sees it.
        for read in batch.reads {
            read(&mut conn);
        }
    }
}

/// What the writer takes off its queue for one commit.
#[derive(Default)]
struct Batch {
    writes: Vec<WriteCommand>,
    reads: Vec<ReadOp>,
    /// Someone waits: a [`Commit::Now`] write or a read.
    urgent: bool,
}

impl Batch {
    fn push(&mut self, message: Message) {
        match message {
            Message::Write(write) => {
                self.urgent |= write.commit == Commit::Now;
                self.writes.push(write);
            }
            Message::Read(read) => {
                self.urgent = true;
                self.reads.push(read);
            }
        }
    }

    fn full(&self) -> bool {
        self.writes.len() + self.reads.len() >= MAX_BATCH
    }

    /// Adds what is already queued, up to a full batch, without waiting.
    fn take_queued(&mut self, messages: &mpsc::Receiver<Message>) {
        while !self.full() {
            match messages.try_recv() {
                Ok(message) => self.push(message),
                Err(_) => break,
            }
        }
    }
}

/// Runs `writes` in as few transactions as possible (one, unless SQLite
/// abandons a transaction on an error) and answers each.
pub(super) fn commit_batch(conn: &mut Connection, writes: Vec<WriteCommand>) {
    let mut writes = writes.into_iter().peekable();
    while writes.peek().is_some() {
        // IMMEDIATE: take the write lock now, so another process cannot make
        // the first write of the batch fail half way.
        let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                let error = DatabaseError::with_source(e.to_string(), e);
                for write in writes {
                    let _ = write.reply.send(Err(StoreError::Database(error.clone())));
                }
                return;
            }
        };
        let mut done = Vec::new();
        let mut abandoned = None;
        for write in writes.by_ref() {
            let result = apply(&mut tx, write.op);
            // Some errors (disk full, I/O) make SQLite roll the whole
            // transaction back: the writes before this one are gone too.
            if tx.is_autocommit() {
                abandoned = Some(match &result {
                    Err(e) => e.to_string(),
                    Ok(_) => "the transaction ended unexpectedly".to_owned(),
                });
            }
            done.push((write.reply, result));
            if abandoned.is_some() {
                break;
            }
        }
        let failure = match abandoned {
            Some(reason) => Some(reason),
            None => tx.commit().err().map(|e| e.to_string()),
        };
        for (reply, result) in done {
            let result = match (&failure, result) {
                (Some(reason), Ok(_)) => Err(StoreError::Database(DatabaseError::new(format!(
                    "the batch holding this write was rolled back: {reason}"
                )))),
                (_, result) => result,
            };
            // Nobody waits for a write whose [`Queued`] was dropped (the
            // executor's writes it goes on from): its failure is logged here.
            if let Err(Err(err)) = reply.send(result) {
                tracing::error!(error = %err, "a store write nobody waited for failed");
            }
        }
    }
}

/// Runs one write under a savepoint: kept if it succeeds, undone if not.
fn apply(tx: &mut rusqlite::Transaction<'_>, op: WriteOp) -> Result<Written, StoreError> {
    let savepoint = tx.savepoint()?;
    let written = op(&savepoint)?; // dropping the savepoint rolls it back
    savepoint.commit()?;
    Ok(written)
}
