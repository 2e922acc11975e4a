//! How the writer writes runs: a batch of run writes in one transaction whose
//! statements are all sent before any answer is read (a pipeline), so the
//! batch costs a few round trips however many writes it holds, where one
//! statement at a time cost one round trip each.
//!
//! Each write's fence is part of its own statements (they change nothing of
//! a run this node no longer holds, and hold the run's row `FOR SHARE` when
//! they do), so no statement waits for another's answer. A write whose main
//! statement changed nothing is looked into afterwards, in the same
//! transaction: the run was fenced, is not there, or (a run started after it
//! finished) needed nothing. A statement that fails aborts the transaction:
//! the batch fails and the writer tries each write alone (the same way, in a
//! pipeline of one). Writes of plugin state are left to the writer.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use super::writer::{Write, Written, create_run_existing, fenced_error, no_such_run};
use super::{Label, pg_error};
use crate::store::{Created, StoreError};

type Param<'a> = &'a (dyn ToSql + Sync);
type Statement<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// `statement` with `params`, not yet sent.
fn exec<'a>(
    tx: &'a Transaction<'_>,
    statement: &'a tokio_postgres::Statement,
    params: Vec<Param<'a>>,
) -> Statement<'a> {
    Box::pin(tx.execute_raw(statement, params))
}

/// The held-run condition every fenced statement carries: `$fence` is the
/// epoch this node claimed the run under (NULL: not a cluster's write).
macro_rules! held {
    ($id:literal, $fence:literal) => {
        concat!(
            "SELECT 1 FROM runs WHERE id = ",
            $id,
            " AND (",
            $fence,
            "::bigint IS NULL OR epoch = ",
            $fence,
            ") FOR SHARE"
        )
    };
}

const SOURCE: &str =
    "INSERT INTO workflow_sources (digest, source) VALUES ($1, $2) ON CONFLICT DO NOTHING";
const RUN: &str = "INSERT INTO runs (id, workflow, status, created_at, started_at, finished_at,
         duration_ms, input, output, error, idempotency_key, workflow_digest, workflow_file,
         owner, epoch)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
     ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING";
/// A new run's steps, unless the run was not inserted (its key was taken).
const NEW_STEPS: &str = "INSERT INTO steps (run_id, idx, record)
     SELECT $1, s.idx, s.record FROM unnest($2::bigint[], $3::text[]) AS s (idx, record)
     WHERE EXISTS (SELECT 1 FROM runs WHERE id = $1)";
const STARTED: &str = "UPDATE runs SET status = 'running', started_at = $2
     WHERE id = $1 AND status IN ('queued', 'running') AND ($3::bigint IS NULL OR epoch = $3)";
const STEP: &str = concat!(
    "WITH held AS (",
    held!("$1", "$4"),
    ") INSERT INTO steps (run_id, idx, record) SELECT $1, $2, $3 FROM held
     ON CONFLICT (run_id, idx) DO UPDATE SET record = excluded.record"
);
const DROP_ITEMS: &str = concat!(
    "DELETE FROM step_items WHERE run_id = $1 AND idx = $2 AND EXISTS (",
    held!("$1", "$3"),
    ")"
);
const ITEM: &str = concat!(
    "WITH held AS (",
    held!("$1", "$5"),
    ") INSERT INTO step_items (run_id, idx, position, record) SELECT $1, $2, $3, $4 FROM held
     ON CONFLICT (run_id, idx, position) DO UPDATE SET record = excluded.record"
);
const FINISH: &str = "UPDATE runs SET status = $2, output = $3, error = $4, started_at = $5,
         finished_at = $6, duration_ms = $7
     WHERE id = $1 AND ($8::bigint IS NULL OR epoch = $8)";
/// A finished run's steps: most were stored as they finished, and a row
/// that would not change is left alone (no new row version).
const ALL_STEPS: &str = concat!(
    "WITH held AS (",
    held!("$1", "$4"),
    ") INSERT INTO steps (run_id, idx, record)
     SELECT $1, s.idx, s.record FROM held, unnest($2::bigint[], $3::text[]) AS s (idx, record)
     ON CONFLICT (run_id, idx) DO UPDATE SET record = excluded.record
     WHERE steps.record <> excluded.record"
);
const ALL_ITEMS: &str = concat!(
    "DELETE FROM step_items WHERE run_id = $1 AND EXISTS (",
    held!("$1", "$2"),
    ")"
);

/// What a write's main statement changing nothing means.
#[derive(Clone, Copy)]
enum Check {
    /// Nothing to look into.
    None,
    /// The run's key was taken: the earlier run is the answer.
    Created,
    /// Fenced, or no such run; else (a finished run started again) fine.
    Started,
    /// Fenced, or no such run.
    Held,
}

/// `writes` in the transaction `tx`, pipelined; `Err` if any statement
/// failed (the transaction is then aborted).
pub(super) async fn run(
    tx: &Transaction<'_>,
    label: &Label,
    writes: &[&Write],
) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
    let failed = |e| pg_error(label, "a write", e);
    // Prepared once per connection (cached), before the pipeline.
    let mut prepared = Vec::with_capacity(10);
    for sql in [
        SOURCE, RUN, NEW_STEPS, STARTED, STEP, DROP_ITEMS, ITEM, FINISH, ALL_STEPS, ALL_ITEMS,
    ] {
        prepared.push(tx.prepare_cached(sql).await.map_err(failed)?);
    }
    let [
        source,
        run,
        new_steps,
        started,
        step,
        drop_step_items,
        item,
        finish,
        all_steps,
        all_items,
    ] = <[_; 10]>::try_from(prepared).expect("ten statements");

    // What each statement borrows, made before any statement is.
    let arrays: Vec<(Vec<i64>, Vec<&str>)> = writes
        .iter()
        .map(|write| match write {
            Write::CreateRun { row, .. } => (
                (0..row.steps.len() as i64).collect(),
                row.steps.iter().map(String::as_str).collect(),
            ),
            Write::FinishRun { run, .. } => (
                run.steps.iter().map(|(index, _)| *index).collect(),
                run.steps
                    .iter()
                    .map(|(_, record)| record.as_str())
                    .collect(),
            ),
            _ => (Vec::new(), Vec::new()),
        })
        .collect();
    let epochs: Vec<i64> = writes
        .iter()
        .map(|write| match write {
            Write::CreateRun { owner, .. } => i64::from(owner.is_some()),
            _ => 0,
        })
        .collect();

    let mut statements: Vec<Statement<'_>> = Vec::with_capacity(writes.len() * 3);
    // Per write: the index of its main statement in `statements`, and what
    // its changing nothing means.
    let mut mains: Vec<(usize, Check)> = Vec::with_capacity(writes.len());
    for (at, write) in writes.iter().enumerate() {
        let (indices, records) = &arrays[at];
        match write {
            Write::CreateRun {
                row,
                owner,
                source_stored,
            } => {
                if !source_stored {
                    statements.push(exec(
                        tx,
                        &source,
                        vec![&row.workflow_digest, &row.workflow_source],
                    ));
                }
                mains.push((statements.len(), Check::Created));
                statements.push(exec(
                    tx,
                    &run,
                    vec![
                        &row.id,
                        &row.workflow,
                        &row.status,
                        &row.created_at,
                        &row.started_at,
                        &row.finished_at,
                        &row.duration_ms,
                        &row.input,
                        &row.output,
                        &row.error,
                        &row.idempotency_key,
                        &row.workflow_digest,
                        &row.workflow_file,
                        owner,
                        &epochs[at],
                    ],
                ));
                statements.push(exec(tx, &new_steps, vec![&row.id, indices, records]));
            }
            Write::RunStarted {
                id,
                started_at,
                fence,
            } => {
                mains.push((statements.len(), Check::Started));
                statements.push(exec(tx, &started, vec![id, started_at, fence]));
            }
            Write::SaveStep {
                run_id,
                index,
                record,
                drop_items,
                fence,
            } => {
                mains.push((statements.len(), Check::Held));
                statements.push(exec(tx, &step, vec![run_id, index, record, fence]));
                if *drop_items {
                    statements.push(exec(tx, &drop_step_items, vec![run_id, index, fence]));
                }
            }
            Write::SaveItem {
                run_id,
                index,
                position,
                record,
                fence,
            } => {
                mains.push((statements.len(), Check::Held));
                statements.push(exec(
                    tx,
                    &item,
                    vec![run_id, index, position, record, fence],
                ));
            }
            Write::FinishRun { run, fence } => {
                mains.push((statements.len(), Check::Held));
                statements.push(exec(
                    tx,
                    &finish,
                    vec![
                        &run.id,
                        &run.status,
                        &run.output,
                        &run.error,
                        &run.started_at,
                        &run.finished_at,
                        &run.duration_ms,
                        fence,
                    ],
                ));
                statements.push(exec(tx, &all_steps, vec![&run.id, indices, records, fence]));
                statements.push(exec(tx, &all_items, vec![&run.id, fence]));
            }
            Write::StateSet { .. } | Write::StateDelete { .. } => {
                mains.push((usize::MAX, Check::None));
            }
        }
    }
    let answers = pipeline(statements).await;
    let mut changed = Vec::with_capacity(answers.len());
    for answer in answers {
        changed.push(answer.map_err(failed)?);
    }

    let mut results = Vec::with_capacity(writes.len());
    for (write, (main, check)) in writes.iter().zip(mains) {
        let nothing = changed.get(main).is_some_and(|rows| *rows == 0);
        results.push(match (nothing, check) {
            (false, Check::Created) => Ok(Written::Run(Created::New)),
            (false, _) | (true, Check::None) => Ok(Written::Done),
            (true, Check::Created) => match write {
                Write::CreateRun { row, .. } => create_run_existing(tx, label, row).await,
                _ => unreachable!("only a new run is checked as created"),
            },
            (true, Check::Started | Check::Held) => {
                let (id, fence) = write.run_and_fence().expect("a run's write");
                match super::writer::epoch_of(tx, label, id).await? {
                    None => Err(no_such_run(id)),
                    Some(epoch) if fence.is_some_and(|fence| fence != epoch) => {
                        Err(fenced_error(id, fence.unwrap_or_default()))
                    }
                    Some(_) => Ok(Written::Done),
                }
            }
        });
    }
    Ok(results)
}

/// Runs `statements` as a pipeline: every request is sent (tokio-postgres
/// sends one when its future is first polled) before any answer is awaited;
/// the answers come back in order.
async fn pipeline(mut statements: Vec<Statement<'_>>) -> Vec<Result<u64, tokio_postgres::Error>> {
    let mut answers: Vec<Option<Result<u64, tokio_postgres::Error>>> =
        statements.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (statement, answer) in statements.iter_mut().zip(answers.iter_mut()) {
            if let Poll::Ready(result) = statement.as_mut().poll(cx) {
                *answer = Some(result);
            }
        }
        Poll::Ready(())
    })
    .await;
    let mut out = Vec::with_capacity(statements.len());
    for (statement, answer) in statements.into_iter().zip(answers) {
        out.push(match answer {
            Some(result) => result,
            None => statement.await,
        });
    }
    out
}
