// Workflows: the list, and one workflow's source, start form (input
// prefilled from its input schema) and the four process metrics
// (GET /v1/workflows/{name}/stats) as figures and charts.

import { useState } from "preact/hooks";
import { call, get, type Run, type Stats, type WorkflowDetail, type WorkflowSummary } from "./api";
import { ErrorNote, usePoll } from "./common";
import { BarChart, StackBar } from "./charts";
import { bytes, count, duration, percent } from "./format";
import { Link, navigate } from "./router";

export function WorkflowsPage() {
  const list = usePoll(() => get<{ workflows: WorkflowSummary[] }>("/v1/workflows"), null, []);
  return (
    <main data-page={list.value ? "workflows" : undefined}>
      <h1>Workflows</h1>
      <ErrorNote error={list.error} />
      <table>
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Steps</th>
            <th scope="col">File</th>
            <th scope="col">Description</th>
          </tr>
        </thead>
        <tbody>
          {(list.value?.workflows ?? []).map((w) => (
            <tr key={w.name} data-workflow={w.name} data-valid={String(w.valid)}>
              <td>
                <Link href={`/ui/workflows/${encodeURIComponent(w.name)}`}>{w.name}</Link>
                {!w.valid && <span class="status status-failed">invalid</span>}
              </td>
              <td>{w.steps ?? "–"}</td>
              <td class="mono">{w.file}</td>
              <td>{w.description ?? (w.valid ? "" : w.errors[0]?.message)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </main>
  );
}

/** A starting input that the schema describes: defaults, examples, enums. */
export function example(schema: any, depth = 0): unknown {
  if (!schema || typeof schema !== "object" || depth > 8) return {};
  if ("default" in schema) return schema.default;
  if ("const" in schema) return schema.const;
  if (Array.isArray(schema.examples) && schema.examples.length) return schema.examples[0];
  if (Array.isArray(schema.enum) && schema.enum.length) return schema.enum[0];
  const type = Array.isArray(schema.type) ? schema.type[0] : schema.type;
  switch (type ?? (schema.properties ? "object" : undefined)) {
    case "object": {
      const value: Record<string, unknown> = {};
      for (const [name, property] of Object.entries(schema.properties ?? {})) {
        value[name] = example(property, depth + 1);
      }
      return value;
    }
    case "array":
      return schema.minItems > 0 && schema.items ? [example(schema.items, depth + 1)] : [];
    case "string":
      return "";
    case "integer":
    case "number":
      return typeof schema.minimum === "number" ? schema.minimum : 0;
    case "boolean":
      return false;
    case "null":
      return null;
    default:
      return {};
  }
}

export function WorkflowPage({ name }: { name: string }) {
  const detail = usePoll(() => get<WorkflowDetail>(`/v1/workflows/${encodeURIComponent(name)}`), null, [name]);
  const workflow = detail.value;
  return (
    <main data-page={workflow ? "workflow" : undefined} data-workflow={name}>
      <div class="heading">
        <h1>{name}</h1>
        {workflow && !workflow.valid && <span class="status status-failed">invalid</span>}
      </div>
      <ErrorNote error={detail.error} />
      {workflow && (
        <>
          {workflow.description && <p>{workflow.description}</p>}
          {workflow.errors.length > 0 && (
            <ul class="error" role="alert">
              {workflow.errors.map((e, i) => (
                <li key={i}>
                  {e.file}:{e.line}:{e.column}: {e.message}
                </li>
              ))}
            </ul>
          )}
          <p>
            <Link href={`/ui/runs?workflow=${encodeURIComponent(name)}`}>Its runs</Link>
          </p>
          <div class="two">
            {workflow.valid && <StartForm workflow={workflow} />}
            <Metrics name={name} />
          </div>
          <h2>Schedules and webhooks</h2>
          <p class="muted">This workflow has none.</p>
          <details>
            <summary>Source ({workflow.file})</summary>
            <pre class="source" tabIndex={0}>
              {workflow.source}
            </pre>
          </details>
        </>
      )}
    </main>
  );
}

function StartForm({ workflow }: { workflow: WorkflowDetail }) {
  const [text, setText] = useState(() => JSON.stringify(example(workflow.input_schema ?? {}), null, 2));
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState(false);
  return (
    <section aria-labelledby="start-heading">
      <h2 id="start-heading">Start a run</h2>
      <form
        data-form="start"
        class="editor"
        onSubmit={async (event) => {
          event.preventDefault();
          setBusy(true);
          setError(null);
          try {
            // The text as typed: the server says what is wrong with it.
            const run = await call<Run>("POST", `/v1/workflows/${encodeURIComponent(workflow.name)}/runs`, text);
            navigate(`/ui/runs/${run.id}`);
          } catch (failure) {
            setError(failure);
          } finally {
            setBusy(false);
          }
        }}
      >
        <label for="start-input">Input (JSON{workflow.input_schema ? ", checked against the workflow's schema" : ""})</label>
        <textarea
          id="start-input"
          name="input"
          rows={10}
          spellcheck={false}
          value={text}
          onInput={(event) => setText((event.target as HTMLTextAreaElement).value)}
        />
        <ErrorNote error={error} />
        <button type="submit" disabled={busy}>
          Start
        </button>
      </form>
      {workflow.input_schema != null && (
        <details>
          <summary>Input schema</summary>
          <pre class="json">{JSON.stringify(workflow.input_schema, null, 2)}</pre>
        </details>
      )}
    </section>
  );
}

const WINDOWS = ["1h", "24h", "7d", "30d"];

function Figure({ label, metric, value, shown }: { label: string; metric: string; value: number | null; shown: string }) {
  return (
    <div class="figure" data-metric={metric} data-value={value == null ? "" : String(value)}>
      <span class="value">{shown}</span>
      <span class="label">{label}</span>
    </div>
  );
}

function Metrics({ name }: { name: string }) {
  const [window, setWindow] = useState("24h");
  const stats = usePoll(
    () => get<Stats>(`/v1/workflows/${encodeURIComponent(name)}/stats?window=${window}`),
    10_000,
    [name, window],
  );
  const s = stats.value;
  const steps = s ? Object.entries(s.steps) : [];
  return (
    <section aria-labelledby="metrics-heading" class="metrics">
      <div class="heading">
        <h2 id="metrics-heading">Metrics</h2>
        <label>
          over the last{" "}
          <select name="window" value={window} onChange={(e) => setWindow((e.target as HTMLSelectElement).value)}>
            {WINDOWS.map((w) => (
              <option key={w} value={w}>
                {w}
              </option>
            ))}
          </select>
        </label>
      </div>
      <ErrorNote error={stats.error} />
      {s && (
        <>
          <div class="figures">
            <Figure label="runs finished" metric="runs" value={s.runs} shown={count(s.runs)} />
            <Figure label="completion rate" metric="completion_rate" value={s.completion_rate} shown={percent(s.completion_rate)} />
            <Figure label="error rate" metric="error_rate" value={s.error_rate} shown={percent(s.error_rate)} />
            <Figure label="cycle time p50" metric="cycle_p50" value={s.cycle_time_ms.p50} shown={duration(s.cycle_time_ms.p50)} />
            <Figure label="cycle time p95" metric="cycle_p95" value={s.cycle_time_ms.p95} shown={duration(s.cycle_time_ms.p95)} />
            <Figure label="cycle time max" metric="cycle_max" value={s.cycle_time_ms.max} shown={duration(s.cycle_time_ms.max)} />
            <Figure label="succeeded" metric="succeeded" value={s.succeeded} shown={count(s.succeeded)} />
            <Figure label="failed" metric="failed" value={s.failed} shown={count(s.failed)} />
            <Figure label="cancelled" metric="cancelled" value={s.cancelled} shown={count(s.cancelled)} />
          </div>
          <StackBar
            name="outcomes"
            label="How the runs ended"
            parts={[
              { label: "succeeded", value: s.succeeded, tone: "succeeded" },
              { label: "failed", value: s.failed, tone: "failed" },
              { label: "cancelled", value: s.cancelled, tone: "cancelled" },
            ]}
          />
          {steps.length > 0 && (
            <>
              <BarChart
                name="step-duration"
                label="Step duration (p50 and p95)"
                rows={steps.map(([id, st]) => ({ label: id, a: st.duration_ms.p50, b: st.duration_ms.p95 }))}
                legend={["p50", "p95"]}
                format={duration}
              />
              <BarChart
                name="step-fuel"
                label="Fuel per step (p50 and max)"
                rows={steps.map(([id, st]) => ({ label: id, a: st.fuel.p50, b: st.fuel.max }))}
                legend={["p50", "max"]}
                format={count}
              />
              <BarChart
                name="step-memory"
                label="Peak memory per step (p50 and max)"
                rows={steps.map(([id, st]) => ({ label: id, a: st.memory_peak.p50, b: st.memory_peak.max }))}
                legend={["p50", "max"]}
                format={bytes}
              />
              <table class="compact">
                <caption>Per step</caption>
                <thead>
                  <tr>
                    <th scope="col">Step</th>
                    <th scope="col">Ran</th>
                    <th scope="col">Failed</th>
                    <th scope="col">p50</th>
                    <th scope="col">p95</th>
                  </tr>
                </thead>
                <tbody>
                  {steps.map(([id, st]) => (
                    <tr key={id} data-step-stats={id}>
                      <td>{id}</td>
                      <td>{count(st.runs)}</td>
                      <td>{count(st.failed)}</td>
                      <td>{duration(st.duration_ms.p50)}</td>
                      <td>{duration(st.duration_ms.p95)}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </>
          )}
        </>
      )}
    </section>
  );
}
