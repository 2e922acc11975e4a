// The runs list: newest first, filtered by workflow and status, paged by
// cursor, and live on its first page (polled every 2 s while visible).

import { useState } from "preact/hooks";
import { get, type RunPage, type WorkflowSummary } from "./api";
import { ErrorNote, Status, useMark, usePoll } from "./common";
import { duration, shortId, time } from "./format";
import { Link, navigate, useLocation } from "./router";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const PAGE = 50;
const LIVE_EVERY_MS = 2000;

export function RunsPage() {
  const location = useLocation();
  const workflow = location.searchParams.get("workflow") ?? "";
  const status = location.searchParams.get("status") ?? "";
  // The cursors of the pages before this one: empty on the first page.
  const [cursors, setCursors] = useState<string[]>([]);
  const cursor = cursors[cursors.length - 1];

  const query = new URLSearchParams({ limit: String(PAGE) });
  if (workflow) query.set("workflow", workflow);
  if (status) query.set("status", status);
  if (cursor) query.set("cursor", cursor);
  const page = usePoll(
    () => get<RunPage>(`/v1/runs?${query}`),
    cursor ? null : LIVE_EVERY_MS,
    [workflow, status, cursor],
  );
  const workflows = usePoll(() => get<{ workflows: WorkflowSummary[] }>("/v1/workflows"), null, []);
  useMark("trellis:runs-rendered", page.value !== null);

  const filter = (name: string, value: string) => {
    const params = new URLSearchParams(location.search);
    if (value) params.set(name, value);
    else params.delete(name);
    setCursors([]);
    const search = params.toString();
    navigate(`/ui/runs${search ? "?" + search : ""}`, true);
  };

  const runs = page.value?.runs ?? [];
  return (
    <main data-page={page.value ? "runs" : undefined}>
      <div class="heading">
        <h1>Runs</h1>
        <p class="hint">{cursor ? "An older page: not live." : "Live: new runs appear as they start."}</p>
      </div>
      <div class="filters">
        <label>
          Workflow{" "}
          <select name="workflow" value={workflow} onChange={(e) => filter("workflow", (e.target as HTMLSelectElement).value)}>
            <option value="">all</option>
            {(workflows.value?.workflows ?? []).map((w) => (
              <option key={w.name} value={w.name}>
                {w.name}
              </option>
            ))}
            {workflow && !workflows.value?.workflows.some((w) => w.name === workflow) && (
              <option value={workflow}>{workflow}</option>
            )}
          </select>
        </label>
        <label>
          Status{" "}
          <select name="status" value={status} onChange={(e) => filter("status", (e.target as HTMLSelectElement).value)}>
            <option value="">all</option>
            {STATUSES.map((s) => (
              <option key={s} value={s}>
                {s}
              </option>
            ))}
          </select>
        </label>
      </div>
      <ErrorNote error={page.error} />
      <table class="runs">
        <caption class="visually-hidden">Runs, newest first</caption>
        <thead>
          <tr>
            <th scope="col">Status</th>
            <th scope="col">Run</th>
            <th scope="col">Workflow</th>
            <th scope="col">Created</th>
            <th scope="col">Duration</th>
            <th scope="col">From</th>
          </tr>
        </thead>
        <tbody>
          {runs.map((run) => (
            <tr key={run.id} data-run={run.id} data-status={run.status}>
              <td>
                <Status status={run.status} />
              </td>
              <td>
                <Link href={`/ui/runs/${run.id}`} class="mono" title={run.id}>
                  {shortId(run.id)}
                </Link>
              </td>
              <td>
                <Link href={`/ui/workflows/${encodeURIComponent(run.workflow)}`}>{run.workflow}</Link>
              </td>
              <td>{time(run.created_at)}</td>
              <td>{duration(run.duration_ms)}</td>
              <td>
                {run.retry_of && (
                  <Link href={`/ui/runs/${run.retry_of}`} class="mono">
                    retry of {shortId(run.retry_of)}
                  </Link>
                )}
                {run.rerun_of && (
                  <Link href={`/ui/runs/${run.rerun_of}`} class="mono">
                    rerun of {shortId(run.rerun_of)}
                  </Link>
                )}
                {run.parent && (
                  <Link href={`/ui/runs/${run.parent.run}`} class="mono">
                    child of {shortId(run.parent.run)}
                  </Link>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {page.value && runs.length === 0 && <p class="empty">No runs{workflow || status ? " match these filters" : " yet"}.</p>}
      <div class="pager">
        <button type="button" data-action="newer" disabled={!cursor} onClick={() => setCursors(cursors.slice(0, -1))}>
          ← Newer
        </button>
        <button
          type="button"
          data-action="older"
          disabled={!page.value?.next_cursor}
          onClick={() => page.value?.next_cursor && setCursors([...cursors, page.value.next_cursor])}
        >
          Older →
        </button>
      </div>
    </main>
  );
}
