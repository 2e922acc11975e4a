// Pieces every page uses.

import type { ComponentChildren } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { ApiError } from "./api";

export function Status({ status }: { status: string }) {
  return <span class={`status status-${status}`}>{status}</span>;
}

/** What a list of `details` says: the schema's (or the workflow's) own words, each with where. */
function detailLines(details: unknown): string[] {
  if (!Array.isArray(details)) return [];
  return details
    .filter((d) => d && typeof d.message === "string")
    .map((d) => {
      const where =
        typeof d.path === "string"
          ? d.path || "/"
          : typeof d.line === "number"
            ? `${d.file ?? ""}:${d.line}:${d.column ?? 0}`
            : "";
      return where ? `${where}: ${d.message}` : d.message;
    });
}

export function ErrorNote({ error }: { error: unknown }) {
  if (!error) return null;
  const message =
    error instanceof ApiError
      ? `${error.message} (${error.code})`
      : error instanceof Error
        ? error.message
        : String(error);
  const lines = error instanceof ApiError ? detailLines(error.details) : [];
  return (
    <div class="error" role="alert" data-error>
      <p>{message}</p>
      {lines.length > 0 && (
        <ul>
          {lines.map((line, i) => (
            <li key={i}>{line}</li>
          ))}
        </ul>
      )}
    </div>
  );
}

export function Field({ label, name, children }: { label: string; name: string; children: ComponentChildren }) {
  return (
    <div class="field">
      <dt>{label}</dt>
      <dd data-field={name}>{children}</dd>
    </div>
  );
}

export function Json({ value, name }: { value: unknown; name?: string }) {
  const text = JSON.stringify(value, null, 2) ?? "null";
  return (
    <pre class="json" data-field={name} tabIndex={0}>
      {text.length > 200_000 ? text.slice(0, 200_000) + "\n… (cut at 200,000 characters)" : text}
    </pre>
  );
}

/**
 * Calls `load` now and every `every` ms while the tab is visible (not at
 * all when `every` is null); gives its last value and error.
 */
export function usePoll<T>(load: () => Promise<T>, every: number | null, deps: unknown[]) {
  const [value, setValue] = useState<T | null>(null);
  const [error, setError] = useState<unknown>(null);
  const generation = useRef(0);
  useEffect(() => {
    const mine = ++generation.current;
    let timer: number | undefined;
    const tick = async () => {
      try {
        const next = await load();
        if (generation.current !== mine) return;
        setValue(next);
        setError(null);
      } catch (failure) {
        if (generation.current !== mine) return;
        setError(failure);
      }
      if (every != null && generation.current === mine) {
        timer = window.setTimeout(() => {
          if (document.visibilityState === "hidden") {
            document.addEventListener("visibilitychange", tick, { once: true });
          } else {
            tick();
          }
        }, every);
      }
    };
    tick();
    return () => {
      generation.current++;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", tick);
    };
  }, deps);
  return { value, error, setValue };
}

/** Marks a performance point once, when `ready` first turns true. */
export function useMark(name: string, ready: boolean) {
  const done = useRef(false);
  useEffect(() => {
    if (ready && !done.current) {
      done.current = true;
      performance.mark(name);
    }
  }, [ready]);
}
