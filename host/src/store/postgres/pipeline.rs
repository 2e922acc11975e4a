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
//!
//! Each write is one statement, and some share one: a new run and its steps;
//! a finished run, its steps and the end of its items; steps of one run
//! queued one after the other (a step's end and the next one's start); and
//! whatever of a run's progress is queued in the same batch as its end
//! (which sets its start, writes every step's final record and drops its
//! items). A 3-step run whose steps wait for the store costs six
//! statements, where it cost twelve; one of side-effect-free steps, whose
//! progress lands with its end, costs two.

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
/// A new run and its steps in one statement: nothing (no row) if its key
/// was taken.
const RUN: &str = "WITH created AS (
         INSERT INTO runs (id, workflow, status, created_at, started_at, finished_at,
             duration_ms, input, output, error, idempotency_key, workflow_digest, workflow_file,
             owner, epoch, retry_of, rerun_of, parent_run, parent_step, parent_item, pins)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $18, $19,
             $20, $21, $22, $23)
         ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING id),
     new_steps AS (
         INSERT INTO steps (run_id, idx, record)
         SELECT created.id, s.idx, s.record
         FROM created, unnest($16::bigint[], $17::text[]) AS s (idx, record))
     SELECT 1 FROM created";
/// The `for_each` items a retry takes over, stored with it (unless its key
/// was taken).
const NEW_ITEMS: &str = "INSERT INTO step_items (run_id, idx, position, record)
     SELECT $1, i.idx, i.position, i.record
     FROM unnest($2::bigint[], $3::bigint[], $4::text[]) AS i (idx, position, record)
     WHERE EXISTS (SELECT 1 FROM runs WHERE id = $1)";
const STARTED: &str = "UPDATE runs SET status = 'running', started_at = $2
     WHERE id = $1 AND status IN ('queued', 'running') AND ($3::bigint IS NULL OR epoch = $3)";
const STEP: &str = concat!(
    "WITH held AS (",
    held!("$1", "$4"),
    ") INSERT INTO steps (run_id, idx, record) SELECT $1, $2, $3 FROM held
     ON CONFLICT (run_id, idx) DO UPDATE SET record = excluded.record"
);
/// Several steps of one run, written one after the other (a step's finished
/// record and the next step's start), in one statement.
const STEPS: &str = concat!(
    "WITH held AS (",
    held!("$1", "$4"),
    ") INSERT INTO steps (run_id, idx, record)
     SELECT $1, s.idx, s.record FROM held, unnest($2::bigint[], $3::text[]) AS s (idx, record)
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
/// A finished run in one statement: its row; its steps, most of which were
/// stored as they finished, so a row that would not change is left alone (no
/// new row version); and its `for_each` items dropped.
const FINISH: &str = "WITH done AS (
         UPDATE runs SET status = $2, output = $3, error = $4, started_at = $5,
             finished_at = $6, duration_ms = $7
         WHERE id = $1 AND ($8::bigint IS NULL OR epoch = $8)
         RETURNING id),
     all_steps AS (
         INSERT INTO steps (run_id, idx, record)
         SELECT done.id, s.idx, s.record FROM done, unnest($9::bigint[], $10::text[]) AS s (idx, record)
         ON CONFLICT (run_id, idx) DO UPDATE SET record = excluded.record
         WHERE steps.record <> excluded.record),
     all_items AS (
         DELETE FROM step_items WHERE run_id = $1 AND EXISTS (SELECT 1 FROM done))
     SELECT 1 FROM done";

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
    let mut prepared = Vec::with_capacity(9);
    for sql in [
        SOURCE, RUN, NEW_ITEMS, STARTED, STEP, STEPS, DROP_ITEMS, ITEM, FINISH,
    ] {
        prepared.push(tx.prepare_cached(sql).await.map_err(failed)?);
    }
    let [
        source,
        run,
        new_items,
        started,
        step,
        steps,
        drop_step_items,
        item,
        finish,
    ] = <[_; 9]>::try_from(prepared).expect("nine statements");

    // Steps written just before their run's end are carried by the end,
    // which writes every step's final record: by which write, if so. Steps
    // of one run written one after the other go in one statement: how many
    // writes, from each one, that statement carries (0: carried by another).
    let finishing = finishing(writes);
    let mut carries = vec![1usize; writes.len()];
    let mut first: Option<usize> = None;
    for at in 0..writes.len() {
        if finishing[at].is_some() {
            carries[at] = 0;
            first = None;
            continue;
        }
        match first {
            Some(first) if mergeable(writes[first], writes[at], &writes[first..at]) => {
                carries[first] += 1;
                carries[at] = 0;
            }
            _ => first = Some(at),
        }
    }

    // What each statement borrows, made before any statement is.
    let arrays: Vec<(Vec<i64>, Vec<&str>)> = writes
        .iter()
        .enumerate()
        .map(|(at, write)| match write {
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
            Write::SaveStep { .. } if carries[at] > 1 => writes[at..at + carries[at]]
                .iter()
                .map(|write| match write {
                    Write::SaveStep { index, record, .. } => (*index, record.as_str()),
                    _ => unreachable!("only steps are merged"),
                })
                .unzip(),
            _ => (Vec::new(), Vec::new()),
        })
        .collect();
    // A retry's items taken over: (indexes, positions, records).
    let items: Vec<(Vec<i64>, Vec<i64>, Vec<&str>)> = writes
        .iter()
        .map(|write| match write {
            Write::CreateRun { row, .. } => (
                row.items.iter().map(|(index, _, _)| *index).collect(),
                row.items.iter().map(|(_, position, _)| *position).collect(),
                row.items
                    .iter()
                    .map(|(_, _, record)| record.as_str())
                    .collect(),
            ),
            _ => (Vec::new(), Vec::new(), Vec::new()),
        })
        .collect();
    let epochs: Vec<i64> = writes
        .iter()
        .map(|write| match write {
            Write::CreateRun { owner, .. } => i64::from(owner.is_some()),
            _ => 0,
        })
        .collect();

    let mut statements: Vec<Statement<'_>> = Vec::with_capacity(writes.len() * 2);
    // Per write: the index of its main statement in `statements`, and what
    // its changing nothing means.
    let mut mains: Vec<(usize, Check)> = Vec::with_capacity(writes.len());
    for (at, write) in writes.iter().enumerate() {
        if finishing[at].is_some() {
            // Carried by the run's end, whose statement comes later.
            mains.push((usize::MAX, Check::Held));
            continue;
        }
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
                for (digest, text) in &row.pin_sources {
                    statements.push(exec(tx, &source, vec![digest, text]));
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
                        indices,
                        records,
                        &row.retry_of,
                        &row.rerun_of,
                        &row.parent_run,
                        &row.parent_step,
                        &row.parent_item,
                        &row.pins,
                    ],
                ));
                let (item_indices, positions, item_records) = &items[at];
                if !item_indices.is_empty() {
                    statements.push(exec(
                        tx,
                        &new_items,
                        vec![&row.id, item_indices, positions, item_records],
                    ));
                }
            }
            Write::RunStarted {
                id,
                started_at,
                fence,
            } => {
                mains.push((statements.len(), Check::Started));
                statements.push(exec(tx, &started, vec![id, started_at, fence]));
            }
            // Carried by the statement of an earlier write.
            Write::SaveStep { .. } if carries[at] == 0 => {
                let carrier = mains.last().expect("an earlier step carries it").0;
                mains.push((carrier, Check::Held));
            }
            Write::SaveStep { run_id, fence, .. } if carries[at] > 1 => {
                mains.push((statements.len(), Check::Held));
                statements.push(exec(tx, &steps, vec![run_id, indices, records, fence]));
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
                        indices,
                        records,
                    ],
                ));
            }
            Write::StateSet { .. } | Write::StateDelete { .. } => {
                mains.push((usize::MAX, Check::None));
            }
        }
    }
    for (at, finish) in finishing.iter().enumerate() {
        if let Some(finish) = finish {
            mains[at] = mains[*finish];
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

/// For each write, the run's end that carries it: a write of the run's
/// progress queued before its end in the same batch, under the same fence,
/// that the end's statement makes moot: the run's start (the end sets
/// `started_at`), a step's record (the end writes every step's final one)
/// and an item's (the end drops the run's items). Writes of other runs may
/// lie between; any other write of the same run stops the search.
fn finishing(writes: &[&Write]) -> Vec<Option<usize>> {
    let mut finishing = vec![None; writes.len()];
    for (at, write) in writes.iter().enumerate() {
        let Write::FinishRun { run, fence } = write else {
            continue;
        };
        for before in (0..at).rev() {
            let carried = match writes[before] {
                Write::SaveStep {
                    run_id,
                    index,
                    fence: step_fence,
                    ..
                } if *run_id == run.id => {
                    step_fence == fence && run.steps.iter().any(|(stored, _)| stored == index)
                }
                Write::RunStarted {
                    id,
                    fence: started_fence,
                    ..
                } if *id == run.id => started_fence == fence,
                Write::SaveItem {
                    run_id,
                    fence: item_fence,
                    ..
                } if *run_id == run.id => item_fence == fence,
                Write::CreateRun { row, .. } if row.id == run.id => false,
                Write::FinishRun { run: other, .. } if other.id == run.id => false,
                // Another run's write, or plugin state.
                _ => continue,
            };
            if !carried {
                break;
            }
            finishing[before] = Some(at);
        }
    }
    finishing
}

/// Whether the step write `next` can go in the statement of `first`, the
/// step write it follows with `between` (from `first` on) before it: steps
/// of the same run under the same fence, each row once, none whose items are
/// dropped.
fn mergeable(first: &Write, next: &Write, between: &[&Write]) -> bool {
    fn step(write: &Write) -> Option<(&str, i64, Option<i64>)> {
        match write {
            Write::SaveStep {
                run_id,
                index,
                drop_items: false,
                fence,
                ..
            } => Some((run_id.as_str(), *index, *fence)),
            _ => None,
        }
    }
    let (Some((run, _, fence)), Some((next_run, next_index, next_fence))) =
        (step(first), step(next))
    else {
        return false;
    };
    run == next_run
        && fence == next_fence
        && between
            .iter()
            .all(|write| step(write).is_some_and(|(r, index, _)| r == run && index != next_index))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rows::FinishedRow;

    fn step(run: &str, index: i64, fence: Option<i64>) -> Write {
        Write::SaveStep {
            run_id: run.to_owned(),
            index,
            record: "{}".to_owned(),
            drop_items: false,
            fence,
        }
    }

    fn finish(run: &str, steps: &[i64], fence: Option<i64>) -> Write {
        Write::FinishRun {
            run: Box::new(FinishedRow {
                id: run.to_owned(),
                status: "succeeded",
                output: "null".to_owned(),
                error: None,
                started_at: None,
                finished_at: None,
                duration_ms: None,
                steps: steps
                    .iter()
                    .map(|index| (*index, "{}".to_owned()))
                    .collect(),
            }),
            fence,
        }
    }

    fn started(run: &str, fence: Option<i64>) -> Write {
        Write::RunStarted {
            id: run.to_owned(),
            started_at: String::new(),
            fence,
        }
    }

    /// A run's progress queued in the batch of its end is carried by the
    /// end, other runs' writes between them or not; a write of the run the
    /// end cannot stand for (another fence, a step it does not write) keeps
    /// its statement, and so does everything of the run before it.
    #[test]
    fn a_runs_end_carries_its_progress_queued_in_the_same_batch() {
        let writes = [
            started("x", Some(1)),
            step("x", 0, Some(1)),
            started("y", Some(1)),
            step("y", 0, Some(1)),
            step("x", 0, Some(1)),
            step("x", 1, Some(1)),
            step("y", 1, Some(1)),
            finish("x", &[0, 1], Some(1)),
            step("y", 2, Some(1)),
        ];
        let writes: Vec<&Write> = writes.iter().collect();
        assert_eq!(
            finishing(&writes),
            [
                Some(7),
                Some(7),
                None,
                None,
                Some(7),
                Some(7),
                None,
                None,
                None
            ]
        );

        let writes = [
            started("x", Some(1)),
            step("x", 0, Some(2)),
            step("x", 5, Some(1)),
            step("x", 1, Some(1)),
            finish("x", &[0, 1], Some(1)),
        ];
        let writes: Vec<&Write> = writes.iter().collect();
        assert_eq!(
            finishing(&writes),
            [None, None, None, Some(4), None],
            "the unknown step 5 stops the search"
        );
    }
}
