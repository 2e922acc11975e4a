// The console's only way to the server: the public API, like any client.
// The token (when the server has one) lives in sessionStorage, goes in the
// Authorization header of every call and never in a URL.

const TOKEN_KEY = "trellis.token";

export function storedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function storeToken(token: string | null): void {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** Fired when the server answers 401: the app asks for the token. */
export const auth = new EventTarget();

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
    /** The error's `details` (for `invalid_input`: `[{ path, message }]`). */
    public details: unknown = null,
  ) {
    super(message);
  }
}

function headers(extra: Record<string, string> = {}): Headers {
  const h = new Headers(extra);
  const token = storedToken();
  if (token) h.set("Authorization", `Bearer ${token}`);
  return h;
}

async function failure(response: Response): Promise<ApiError> {
  let code = "http_" + response.status;
  let message = `${response.status} ${response.statusText}`;
  let details: unknown = null;
  try {
    const body = await response.json();
    if (body?.error) {
      code = body.error.code ?? code;
      message = body.error.message ?? message;
      details = body.error.details ?? null;
    }
  } catch {
    // Not JSON: keep the status line.
  }
  if (response.status === 401) auth.dispatchEvent(new Event("unauthorized"));
  return new ApiError(response.status, code, message, details);
}

/** A JSON call; `body` is sent as JSON unless it is a string or bytes. */
export async function call<T>(
  method: string,
  path: string,
  body?: unknown,
  contentType = "application/json",
): Promise<T> {
  const init: RequestInit = { method, headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    (init.headers as Headers).set("Content-Type", contentType);
    init.body =
      typeof body === "string" || body instanceof ArrayBuffer || body instanceof Blob
        ? (body as BodyInit)
        : JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return (await response.json()) as T;
}

export const get = <T>(path: string) => call<T>("GET", path);

export interface StreamEvent {
  event: string;
  id: string;
  data: string;
}

/**
 * Follows a Server-Sent Events stream with the token in a header (which
 * EventSource cannot send), calling `onEvent` for each message until the
 * stream ends or `signal` aborts.
 */
export async function follow(
  path: string,
  signal: AbortSignal,
  onEvent: (event: StreamEvent) => void,
): Promise<void> {
  const response = await fetch(path, {
    headers: headers({ Accept: "text/event-stream" }),
    signal,
  });
  if (!response.ok || !response.body) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end: number;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const message: StreamEvent = { event: "message", id: "", data: "" };
      const data: string[] = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") message.event = text;
        else if (field === "id") message.id = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) {
        message.data = data.join("\n");
        onEvent(message);
      }
    }
  }
}

// The API's records, as far as the console reads them.

export type RunStatus = "queued" | "running" | "succeeded" | "failed" | "cancelled";
export type StepStatus =
  | "pending"
  | "running"
  | "succeeded"
  | "failed"
  | "skipped"
  | "cancelled";

export interface ErrorRecord {
  kind: string;
  message: string;
  retryable?: boolean;
  details?: unknown;
}

export interface LogLine {
  at_ms: number;
  stream: string;
  level: string;
  message: string;
}

export interface Attempt {
  attempt: number;
  item?: number;
  status: StepStatus;
  error?: ErrorRecord;
  started_at: string;
  duration_ms: number;
  fuel_consumed: number;
  peak_memory: number;
  logs: LogLine[];
  log_bytes_dropped?: number;
  progress?: { fraction: number; message: string };
  child_run?: string;
  node?: string;
  input?: unknown;
}

export interface Step {
  id: string;
  plugin?: string;
  workflow?: string;
  plugin_version?: string;
  plugin_digest?: string;
  status: StepStatus;
  output: unknown;
  error?: ErrorRecord;
  started_at?: string;
  duration_ms?: number;
  items?: number;
  attempts: Attempt[];
  reused_from?: string;
}

export interface Run {
  id: string;
  workflow: string;
  status: RunStatus;
  input: unknown;
  output: unknown;
  error?: { kind?: string; message: string; step?: string };
  created_at: string;
  started_at?: string;
  finished_at?: string;
  duration_ms?: number;
  steps: Step[];
  retry_of?: string;
  rerun_of?: string;
  retries?: string[];
  parent?: { run: string; step: string; item?: number };
}

export interface RunSummary {
  id: string;
  workflow: string;
  status: RunStatus;
  created_at: string;
  started_at?: string;
  finished_at?: string;
  duration_ms?: number;
  retry_of?: string;
  rerun_of?: string;
  parent?: { run: string; step: string };
  trigger?: string;
}

export interface RunPage {
  runs: RunSummary[];
  next_cursor?: string | null;
}

export interface Layout {
  width: number;
  height: number;
  nodes: { id: string; x: number; y: number; width: number; height: number }[];
  edges: { from: string; to: string }[];
}

export interface WorkflowSummary {
  name: string;
  file: string;
  valid: boolean;
  description?: string;
  steps?: number | null;
  errors: { message: string; line: number; column: number; file: string }[];
}

export interface WorkflowDetail extends WorkflowSummary {
  source: string;
  input_schema: unknown;
}

export interface Spread {
  p50: number | null;
  p95: number | null;
  max: number | null;
}

export interface Stats {
  window: string;
  runs: number;
  succeeded: number;
  failed: number;
  cancelled: number;
  completion_rate: number | null;
  error_rate: number | null;
  cycle_time_ms: Spread;
  steps: Record<
    string,
    {
      runs: number;
      failed: number;
      duration_ms: { p50: number | null; p95: number | null };
      fuel: { p50: number | null; max: number | null };
      memory_peak: { p50: number | null; max: number | null };
    }
  >;
}

export interface Plugin {
  name: string;
  version: string;
  digest: string;
  description: string;
  size: number;
  input_schema: unknown;
  output_schema: unknown;
  imports: string[];
  side_effects: string[];
}

export interface PluginList {
  plugins: Plugin[];
  errors: { file: string; message: string }[];
}
