// One run: its DAG (laid out by the server, GET /v1/runs/{id}/graph), live
// over the run's event stream; the selected step's attempts, input, output,
// error, log and resources; and the actions (cancel, retry, retry from a
// step, rerun with edited input), each one call of the public API.

import { memo } from "preact/compat";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import {
  call,
  follow,
  get,
  type Attempt,
  type Layout,
  type Run,
  type RunPage,
  type Step,
} from "./api";
import { ErrorNote, Field, Json, Status, useMark } from "./common";
import { bytes, count, duration, shortId, time } from "./format";
import { Link, navigate } from "./router";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const ATTEMPTS_SHOWN = 50;

/** How a fan-out's items stand: each item's last attempt. */
interface Items {
  total: number;
  byStatus: Record<string, number>;
}

function itemCounts(step: Step): Items | null {
  if (step.items == null) return null;
  const last = new Map<number, string>();
  for (const attempt of step.attempts) {
    if (attempt.item != null) last.set(attempt.item, attempt.status);
  }
  const byStatus: Record<string, number> = {};
  for (const status of last.values()) byStatus[status] = (byStatus[status] ?? 0) + 1;
  const done = last.size;
  if (step.items > done) byStatus.pending = step.items - done;
  return { total: step.items, byStatus };
}

function replaceStep(run: Run, step: Step): Run {
  return { ...run, steps: run.steps.map((s) => (s.id === step.id ? step : s)) };
}

export function RunPage({ id }: { id: string }) {
  const [run, setRun] = useState<Run | null>(null);
  const [layout, setLayout] = useState<Layout | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [selected, setSelected] = useState<string | null>(null);
  const [children, setChildren] = useState<RunPage["runs"]>([]);

  useEffect(() => {
    let live = true;
    Promise.all([get<Run>(`/v1/runs/${id}`), get<Layout>(`/v1/runs/${id}/graph`)])
      .then(([run, layout]) => {
        if (!live) return;
        // With `trellis:dag-rendered`: how much of a load is drawing.
        performance.mark("trellis:dag-data");
        setRun(run);
        setLayout(layout);
        // Open the step that failed, if one did.
        const failed = run.steps.find((s) => s.status === "failed");
        if (failed) setSelected((current) => current ?? failed.id);
      })
      .catch((failure) => live && setError(failure));
    get<RunPage>(`/v1/runs?parent=${id}&limit=100`)
      .then((page) => live && setChildren(page.runs))
      .catch(() => {});
    return () => {
      live = false;
    };
  }, [id]);

  // Live: the run's events move the DAG; a fan-out's items and the log of
  // a running step come with a re-read, at most every `every` ms.
  const finished = run ? TERMINAL.has(run.status) : true;
  useEffect(() => {
    if (!run || finished) return;
    const controller = new AbortController();
    const size = run.steps.reduce((n, s) => n + 1 + (s.items ?? 0), 0);
    const every = size > 2000 ? 1500 : 300;
    let timer: number | undefined;
    let last = 0;
    const reread = () => {
      if (timer !== undefined) return;
      const wait = Math.max(0, last + every - Date.now());
      timer = window.setTimeout(async () => {
        last = Date.now();
        try {
          const fresh = await get<Run>(`/v1/runs/${id}`);
          if (!controller.signal.aborted) setRun(fresh);
        } catch {
          // The next event tries again.
        } finally {
          timer = undefined;
        }
      }, wait);
    };
    follow(`/v1/runs/${id}/events`, controller.signal, (message) => {
      let data: any;
      try {
        data = JSON.parse(message.data);
      } catch {
        return;
      }
      switch (message.event) {
        case "step_started":
          setRun((r) =>
            r && {
              ...r,
              status: r.status === "queued" ? "running" : r.status,
              steps: r.steps.map((s) =>
                s.id === data.step && (s.status === "pending" || s.status === "running")
                  ? { ...s, status: "running" }
                  : s,
              ),
            },
          );
          if (data.item != null) reread();
          break;
        case "step_finished":
          setRun((r) => r && replaceStep(r, data.step as Step));
          break;
        case "run_finished":
          clearTimeout(timer);
          setRun(data.run as Run);
          controller.abort();
          break;
        default:
          reread();
      }
    })
      .catch(() => {})
      .finally(() => {
        // The stream ended (the run finished, or the server went away):
        // one last read shows where the run stands.
        if (!controller.signal.aborted) reread();
      });
    return () => {
      controller.abort();
      clearTimeout(timer);
    };
  }, [id, run !== null, finished]);

  useMark("trellis:dag-rendered", run !== null && layout !== null);

  if (error) {
    return (
      <main>
        <h1>Run {shortId(id)}</h1>
        <ErrorNote error={error} />
      </main>
    );
  }
  if (!run || !layout) return <main aria-busy="true" />;
  const step = selected ? run.steps.find((s) => s.id === selected) ?? null : null;
  return (
    <main data-page="run" class="run-page">
      <RunHeader run={run} children={children} />
      <div class="run-body">
        <Dag run={run} layout={layout} selected={selected} onSelect={setSelected} />
        {step ? (
          <StepPanel run={run} step={step} key={step.id} onClose={() => setSelected(null)} />
        ) : (
          <aside class="panel hint-panel">
            <p>Select a step to see its attempts, input, output, error, log and resources.</p>
          </aside>
        )}
      </div>
    </main>
  );
}

function RunHeader({ run, children }: { run: Run; children: RunPage["runs"] }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const [rerun, setRerun] = useState(false);
  const finished = TERMINAL.has(run.status);

  const act = async (path: string, body?: unknown) => {
    setBusy(true);
    setError(null);
    try {
      const answer = await call<Run>("POST", path, body ?? {});
      if (answer.id !== run.id) navigate(`/ui/runs/${answer.id}`);
    } catch (failure) {
      setError(failure);
    } finally {
      setBusy(false);
    }
  };

  return (
    <section class="run-header" data-run={run.id} data-status={run.status} aria-label="The run">
      <div class="heading">
        <h1>
          <Link href={`/ui/workflows/${encodeURIComponent(run.workflow)}`}>{run.workflow}</Link>{" "}
          <span class="mono muted" title={run.id}>
            {run.id}
          </span>
        </h1>
        <Status status={run.status} />
      </div>
      <dl class="facts">
        <Field label="Created" name="created">
          {time(run.created_at)}
        </Field>
        <Field label="Started" name="started">
          {time(run.started_at)}
        </Field>
        <Field label="Finished" name="finished">
          {time(run.finished_at)}
        </Field>
        <Field label="Duration" name="run-duration">
          {duration(run.duration_ms)}
        </Field>
      </dl>
      <p class="links">
        {run.retry_of && (
          <Link href={`/ui/runs/${run.retry_of}`} data-link="retry_of">
            retry of {shortId(run.retry_of)}
          </Link>
        )}
        {run.rerun_of && (
          <Link href={`/ui/runs/${run.rerun_of}`} data-link="rerun_of">
            rerun of {shortId(run.rerun_of)}
          </Link>
        )}
        {run.parent && (
          <Link href={`/ui/runs/${run.parent.run}`} data-link="parent">
            child of {shortId(run.parent.run)} (step {run.parent.step})
          </Link>
        )}
        {(run.retries ?? []).map((retry) => (
          <Link key={retry} href={`/ui/runs/${retry}`} data-link="retry">
            retried as {shortId(retry)}
          </Link>
        ))}
        {children.map((child) => (
          <Link key={child.id} href={`/ui/runs/${child.id}`} data-link="child">
            child {child.workflow} {shortId(child.id)} ({child.status})
          </Link>
        ))}
      </p>
      {run.error && (
        <p class="error" role="alert">
          {run.error.step ? `Step ${run.error.step}: ` : ""}
          {run.error.message}
        </p>
      )}
      <div class="actions">
        {!finished && (
          <button type="button" data-action="cancel" disabled={busy} onClick={() => act(`/v1/runs/${run.id}/cancel`)}>
            Cancel
          </button>
        )}
        {finished && (
          <button
            type="button"
            data-action="retry"
            disabled={busy}
            title="A new run that reuses the steps that succeeded and runs the rest"
            onClick={() => act(`/v1/runs/${run.id}/retry`)}
          >
            Retry
          </button>
        )}
        {finished && (
          <button type="button" data-action="rerun" disabled={busy} aria-expanded={rerun} onClick={() => setRerun(!rerun)}>
            Rerun…
          </button>
        )}
      </div>
      {rerun && finished && <RerunForm run={run} onRerun={(input) => act(`/v1/runs/${run.id}/rerun`, { input })} />}
      <ErrorNote error={error} />
      <details>
        <summary>Input and output of the run</summary>
        <div class="two">
          <div>
            <h3>Input</h3>
            <Json value={run.input} />
          </div>
          <div>
            <h3>Output</h3>
            <Json value={run.output} />
          </div>
        </div>
      </details>
    </section>
  );
}

function RerunForm({ run, onRerun }: { run: Run; onRerun: (input: unknown) => void }) {
  const [text, setText] = useState(() => JSON.stringify(run.input, null, 2));
  const [error, setError] = useState<string | null>(null);
  return (
    <form
      data-form="rerun"
      class="editor"
      onSubmit={(event) => {
        event.preventDefault();
        try {
          const input = JSON.parse(text);
          setError(null);
          onRerun(input);
        } catch (failure) {
          setError(`The input is not JSON: ${(failure as Error).message}`);
        }
      }}
    >
      <label for="rerun-input">Input of the new run (JSON); every step runs again</label>
      <textarea
        id="rerun-input"
        name="input"
        rows={8}
        spellcheck={false}
        value={text}
        onInput={(event) => setText((event.target as HTMLTextAreaElement).value)}
      />
      {error && (
        <p class="error" role="alert" data-error>
          {error}
        </p>
      )}
      <button type="submit">Rerun with this input</button>
    </form>
  );
}

interface DagProps {
  run: Run;
  layout: Layout;
  selected: string | null;
  onSelect: (id: string) => void;
}

const ZOOMS = [0.25, 0.4, 0.6, 0.8, 1, 1.25];

function Dag({ run, layout, selected, onSelect }: DagProps) {
  const [zoom, setZoom] = useState(() => (layout.nodes.length > 400 ? 2 : 4));
  const steps = useMemo(() => new Map(run.steps.map((s) => [s.id, s])), [run]);
  const places = useMemo(() => new Map(layout.nodes.map((n) => [n.id, n])), [layout]);
  const scale = ZOOMS[zoom];
  const pad = 8;
  return (
    <section class="dag" aria-label="The run's steps">
      <div class="dag-tools">
        <span>
          {count(layout.nodes.length)} step{layout.nodes.length === 1 ? "" : "s"}
        </span>
        <button type="button" aria-label="Zoom out" disabled={zoom === 0} onClick={() => setZoom(zoom - 1)}>
          −
        </button>
        <button type="button" aria-label="Zoom in" disabled={zoom === ZOOMS.length - 1} onClick={() => setZoom(zoom + 1)}>
          +
        </button>
      </div>
      <div class="dag-scroll" tabIndex={0} aria-label="The DAG (scrolls)">
        <svg
          data-dag
          role="group"
          aria-label={`DAG of ${layout.nodes.length} steps`}
          width={(layout.width + 2 * pad) * scale}
          height={(layout.height + 2 * pad) * scale}
          viewBox={`${-pad} ${-pad} ${layout.width + 2 * pad} ${layout.height + 2 * pad}`}
        >
          <Edges layout={layout} places={places} />
          {layout.nodes.map((node) => {
            const step = steps.get(node.id);
            return step ? (
              <DagNode
                key={node.id}
                step={step}
                x={node.x}
                y={node.y}
                width={node.width}
                height={node.height}
                selected={selected === node.id}
                onSelect={onSelect}
              />
            ) : null;
          })}
        </svg>
      </div>
    </section>
  );
}

const Edges = memo(function Edges({ layout, places }: { layout: Layout; places: Map<string, Layout["nodes"][0]> }) {
  const d = layout.edges
    .map(({ from, to }) => {
      const a = places.get(from);
      const b = places.get(to);
      if (!a || !b) return "";
      const x1 = a.x + a.width / 2;
      const y1 = a.y + a.height;
      const x2 = b.x + b.width / 2;
      const y2 = b.y;
      const bend = Math.max(12, (y2 - y1) / 2);
      return `M${x1},${y1}C${x1},${y1 + bend} ${x2},${y2 - bend} ${x2},${y2}`;
    })
    .join("");
  return <path class="edges" d={d} />;
});

interface NodeProps {
  step: Step;
  x: number;
  y: number;
  width: number;
  height: number;
  selected: boolean;
  onSelect: (id: string) => void;
}

const DagNode = memo(function DagNode({ step, x, y, width, height, selected, onSelect }: NodeProps) {
  const items = itemCounts(step);
  // The status in words as well as in colour; the plugin is in the panel.
  let detail: string = step.status;
  if (items) {
    const done = (items.byStatus.succeeded ?? 0) + (items.byStatus.skipped ?? 0);
    const failed = items.byStatus.failed ?? 0;
    detail += ` · ${count(done)}/${count(items.total)}${failed ? `, ${count(failed)} failed` : ""}`;
  } else if (step.duration_ms != null) {
    detail += ` · ${duration(step.duration_ms)}`;
  }
  if (step.reused_from) detail = `reused · ${detail}`;
  if (step.workflow) detail += " · sub-workflow";
  const name = step.id.length > 24 ? step.id.slice(0, 23) + "…" : step.id;
  const shown = detail.length > 30 ? detail.slice(0, 29) + "…" : detail;
  return (
    <g
      data-step={step.id}
      data-status={step.status}
      data-items={step.items ?? undefined}
      data-reused={step.reused_from ?? undefined}
      class={`node node-${step.status}${selected ? " selected" : ""}${step.reused_from ? " reused" : ""}`}
      transform={`translate(${x},${y})`}
      tabIndex={0}
      role="button"
      aria-pressed={selected}
      onClick={() => onSelect(step.id)}
      onKeyDown={(event) => {
        if (event.key === "Enter" || event.key === " ") {
          event.preventDefault();
          onSelect(step.id);
        }
      }}
    >
      <rect width={width} height={height} rx={6} />
      <text x={12} y={21} class="name">
        {name}
      </text>
      <text x={12} y={39} class="detail">
        {shown}
      </text>
    </g>
  );
});

function lastFailed(attempts: Attempt[]): Attempt | undefined {
  for (let i = attempts.length - 1; i >= 0; i--) if (attempts[i].status === "failed") return attempts[i];
  return undefined;
}

function StepPanel({ run, step, onClose }: { run: Run; step: Step; onClose: () => void }) {
  const [chosen, setChosen] = useState<number | null>(null);
  const [shown, setShown] = useState(ATTEMPTS_SHOWN);
  const [onlyFailed, setOnlyFailed] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const heading = useRef<HTMLHeadingElement>(null);
  useEffect(() => heading.current?.focus(), []);

  const attempts = onlyFailed ? step.attempts.filter((a) => a.status === "failed") : step.attempts;
  const attempt =
    chosen != null
      ? step.attempts[chosen]
      : lastFailed(step.attempts) ?? step.attempts[step.attempts.length - 1];
  const items = itemCounts(step);
  const finished = TERMINAL.has(run.status);
  const output =
    attempt?.item != null && Array.isArray(step.output) ? step.output[attempt.item] : step.output;

  const retryFrom = async () => {
    setBusy(true);
    setError(null);
    try {
      const answer = await call<Run>("POST", `/v1/runs/${run.id}/retry`, { from: step.id });
      navigate(`/ui/runs/${answer.id}`);
    } catch (failure) {
      setError(failure);
    } finally {
      setBusy(false);
    }
  };

  return (
    <aside class="panel" data-panel="step" data-step-id={step.id} aria-labelledby="step-heading">
      <div class="heading">
        <h2 id="step-heading" tabIndex={-1} ref={heading}>
          {step.id}
        </h2>
        <Status status={step.status} />
        <button type="button" class="quiet" aria-label="Close the step" onClick={onClose}>
          ×
        </button>
      </div>
      <p class="muted">
        {step.workflow
          ? `sub-workflow ${step.workflow}`
          : `${step.plugin ?? ""}${step.plugin_version ? " " + step.plugin_version : ""}`}
        {step.plugin_digest && (
          <span class="mono" title={step.plugin_digest}>
            {" "}
            {step.plugin_digest.slice(0, 19)}…
          </span>
        )}
      </p>
      {step.reused_from && (
        <p class="note">
          Reused from run{" "}
          <Link href={`/ui/runs/${step.reused_from}`} class="mono">
            {shortId(step.reused_from)}
          </Link>
          : its output was taken over, the step did not run again.
        </p>
      )}
      {items && (
        <p>
          {count(items.total)} items:{" "}
          {Object.entries(items.byStatus)
            .map(([status, n]) => `${count(n)} ${status}`)
            .join(", ")}
        </p>
      )}
      {finished && !step.reused_from && (
        <div class="actions">
          <button type="button" data-action="retry-from" disabled={busy} onClick={retryFrom}>
            Retry from this step
          </button>
        </div>
      )}
      <ErrorNote error={error} />
      {step.attempts.length > 0 && (
        <>
          <h3>
            Attempts ({count(step.attempts.length)})
            {items && (
              <label class="inline">
                <input type="checkbox" checked={onlyFailed} onChange={() => setOnlyFailed(!onlyFailed)} /> failed only
              </label>
            )}
          </h3>
          <ol class="attempts">
            {attempts.slice(0, shown).map((a) => {
              const index = step.attempts.indexOf(a);
              return (
                <li key={index} data-attempt={a.attempt} data-item={a.item ?? undefined}>
                  <button
                    type="button"
                    class={`attempt${a === attempt ? " current" : ""}`}
                    aria-pressed={a === attempt}
                    onClick={() => setChosen(index)}
                  >
                    <Status status={a.status} /> {a.item != null ? `item ${a.item}, ` : ""}attempt {a.attempt} ·{" "}
                    {duration(a.duration_ms)}
                  </button>
                </li>
              );
            })}
          </ol>
          {attempts.length > shown && (
            <button type="button" class="quiet" onClick={() => setShown(shown + ATTEMPTS_SHOWN * 4)}>
              Show more ({count(attempts.length - shown)} left)
            </button>
          )}
        </>
      )}
      {attempt && (
        <section aria-label="The attempt">
          <h3>
            {attempt.item != null ? `Item ${attempt.item}, attempt ${attempt.attempt}` : `Attempt ${attempt.attempt}`}
          </h3>
          <dl class="facts">
            <Field label="Duration" name="duration">
              {duration(attempt.duration_ms)}
            </Field>
            <Field label="Fuel" name="fuel">
              {count(attempt.fuel_consumed)}
            </Field>
            <Field label="Peak memory" name="memory">
              {bytes(attempt.peak_memory)}
            </Field>
            <Field label="Started" name="attempt-started">
              {time(attempt.started_at)}
            </Field>
            {attempt.node && (
              <Field label="Node" name="node">
                {attempt.node}
              </Field>
            )}
            {attempt.child_run && (
              <Field label="Child run" name="child">
                <Link href={`/ui/runs/${attempt.child_run}`} data-link="child" class="mono">
                  {shortId(attempt.child_run)}
                </Link>
              </Field>
            )}
          </dl>
          {attempt.progress && (
            <p>
              <progress max={1} value={attempt.progress.fraction} aria-label="Progress" /> {attempt.progress.message}
            </p>
          )}
          {attempt.error && (
            <div class="error-box" role="alert" data-field="error">
              <strong>{attempt.error.kind}</strong>: {attempt.error.message}
              {attempt.error.retryable ? " (retryable)" : ""}
            </div>
          )}
          <h4>Log</h4>
          {attempt.logs.length ? (
            <pre class="log" data-field="log" tabIndex={0}>
              {attempt.logs.map((line) => `${line.level.padEnd(5)} ${line.message}`).join("\n")}
              {attempt.log_bytes_dropped ? `\n… ${attempt.log_bytes_dropped} bytes dropped (max_log)` : ""}
            </pre>
          ) : (
            <p class="muted" data-field="log">
              No log lines.
            </p>
          )}
          <h4>Input</h4>
          {attempt.input !== undefined ? (
            <Json value={attempt.input} name="input" />
          ) : (
            <p class="muted">Kept for failed attempts only.</p>
          )}
          {attempt.status === "succeeded" && (
            <>
              <h4>Output</h4>
              <Json value={output} name="output" />
            </>
          )}
        </section>
      )}
      {!attempt && step.status !== "pending" && (
        <>
          <h4>Output</h4>
          <Json value={step.output} name="output" />
        </>
      )}
    </aside>
  );
}
