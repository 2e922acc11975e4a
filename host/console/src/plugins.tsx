// Plugins: what is loaded (versions, digests, schemas, side effects), the
// files that did not load and why, and an upload (PUT /v1/plugins/{name}).

import { useState } from "preact/hooks";
import { call, get, type PluginList } from "./api";
import { ErrorNote, usePoll } from "./common";
import { bytes } from "./format";

export function PluginsPage() {
  const [generation, setGeneration] = useState(0);
  const list = usePoll(() => get<PluginList>("/v1/plugins"), null, [generation]);
  const plugins = list.value?.plugins ?? [];
  return (
    <main data-page={list.value ? "plugins" : undefined}>
      <h1>Plugins</h1>
      <ErrorNote error={list.error} />
      <table>
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">Version</th>
            <th scope="col">Digest</th>
            <th scope="col">Size</th>
            <th scope="col">Side effects</th>
            <th scope="col">Description and schemas</th>
          </tr>
        </thead>
        <tbody>
          {plugins.map((p) => (
            <tr key={p.name + "@" + p.version} data-plugin={p.name} data-version={p.version}>
              <td>{p.name}</td>
              <td>{p.version}</td>
              <td class="mono" title={p.digest}>
                {p.digest.slice(0, 19)}…
              </td>
              <td>{bytes(p.size)}</td>
              <td>{p.side_effects.length ? p.side_effects.join(", ") : "none"}</td>
              <td>
                {p.description}
                {(p.input_schema != null || p.output_schema != null) && (
                  <details>
                    <summary>Schemas</summary>
                    <h3>Input</h3>
                    <pre class="json">{JSON.stringify(p.input_schema, null, 2)}</pre>
                    <h3>Output</h3>
                    <pre class="json">{JSON.stringify(p.output_schema, null, 2)}</pre>
                  </details>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {list.value && list.value.errors.length > 0 && (
        <>
          <h2>Files that did not load</h2>
          <ul class="error">
            {list.value.errors.map((e) => (
              <li key={e.file} data-plugin-error={e.file}>
                <span class="mono">{e.file}</span>: {e.message}
              </li>
            ))}
          </ul>
        </>
      )}
      <Upload onDone={() => setGeneration(generation + 1)} />
    </main>
  );
}

function Upload({ onDone }: { onDone: () => void }) {
  const [name, setName] = useState("");
  const [file, setFile] = useState<File | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [done, setDone] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <section aria-labelledby="upload-heading">
      <h2 id="upload-heading">Upload a plugin</h2>
      <p class="muted">
        A WASM component; it is checked (world, schemas) before it becomes the active version. Runs in flight keep
        the version they started with.
      </p>
      <form
        data-form="upload"
        class="editor"
        onSubmit={async (event) => {
          event.preventDefault();
          if (!file || !name) return;
          setBusy(true);
          setError(null);
          setDone(null);
          try {
            const plugin = await call<{ name: string; version: string; digest: string }>(
              "PUT",
              `/v1/plugins/${encodeURIComponent(name)}`,
              await file.arrayBuffer(),
              "application/wasm",
            );
            setDone(`Loaded ${plugin.name} ${plugin.version} (${plugin.digest.slice(0, 19)}…).`);
            onDone();
          } catch (failure) {
            setError(failure);
          } finally {
            setBusy(false);
          }
        }}
      >
        <label for="upload-name">Name (as its info() gives it)</label>
        <input
          id="upload-name"
          name="name"
          pattern="[a-z0-9_\-]{1,64}"
          required
          value={name}
          onInput={(event) => setName((event.target as HTMLInputElement).value)}
        />
        <label for="upload-file">Component (.wasm)</label>
        <input
          id="upload-file"
          name="file"
          type="file"
          accept=".wasm,application/wasm"
          required
          onChange={(event) => {
            const chosen = (event.target as HTMLInputElement).files?.[0] ?? null;
            setFile(chosen);
            if (chosen && !name) setName(chosen.name.replace(/\.wasm$/, ""));
          }}
        />
        <ErrorNote error={error} />
        {done && (
          <p class="ok" role="status">
            {done}
          </p>
        )}
        <button type="submit" disabled={busy}>
          Upload
        </button>
      </form>
    </section>
  );
}
