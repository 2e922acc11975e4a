// The Trellis console: runs, a run's live DAG, workflows with their metrics,
// plugins. Everything it shows comes from the public API (see api.ts).

import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import "./style.css";
import { ApiError, auth, get, storeToken, storedToken } from "./api";
import { Link, useLocation } from "./router";
import { RunsPage } from "./runs";
import { RunPage } from "./run";
import { WorkflowPage, WorkflowsPage } from "./workflow";
import { PluginsPage } from "./plugins";

type Access = "checking" | "token" | "open";

function TokenForm({ refused, onToken }: { refused: boolean; onToken: (token: string) => void }) {
  const [value, setValue] = useState("");
  return (
    <main class="narrow" data-page="token">
      <h1>Sign in to Trellis</h1>
      <p>This server asks for its API token. The console keeps it for this browser tab only and sends it
        with every call; it never goes in a URL.</p>
      {/* POST, never GET: even without the script the token cannot land in a URL. */}
      <form
        method="post"
        data-form="token"
        onSubmit={(event) => {
          event.preventDefault();
          if (value.trim()) onToken(value.trim());
        }}
      >
        <label for="token">API token</label>
        <input
          id="token"
          name="token"
          type="password"
          autocomplete="current-password"
          value={value}
          onInput={(event) => setValue((event.target as HTMLInputElement).value)}
          required
        />
        {refused && (
          <p class="error" role="alert" data-error>
            The server refused this token.
          </p>
        )}
        <button type="submit">Sign in</button>
      </form>
    </main>
  );
}

function Page({ path }: { path: string }) {
  const parts = path.replace(/^\/ui\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts.length === 0 || (parts[0] === "runs" && parts.length === 1)) return <RunsPage />;
  if (parts[0] === "runs" && parts.length === 2) return <RunPage id={parts[1]} key={parts[1]} />;
  if (parts[0] === "workflows" && parts.length === 1) return <WorkflowsPage />;
  if (parts[0] === "workflows" && parts.length === 2) return <WorkflowPage name={parts[1]} key={parts[1]} />;
  if (parts[0] === "plugins" && parts.length === 1) return <PluginsPage />;
  return (
    <main data-page="missing">
      <h1>No such page</h1>
      <p>
        <Link href="/ui/">Back to the runs</Link>
      </p>
    </main>
  );
}

function App() {
  const location = useLocation();
  // Open until the API says otherwise: a page's first call answers 401
  // when the server wants a token (no call of its own first, so a page
  // gets its data one round trip sooner).
  const [access, setAccess] = useState<Access>("open");
  const [refused, setRefused] = useState(false);

  const probe = async () => {
    try {
      await get("/v1/workflows");
      setAccess("open");
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        // The `unauthorized` listener has brought the form back, saying
        // the token was refused.
      } else {
        // The pages show what is wrong.
        setAccess("open");
      }
    }
  };

  useEffect(() => {
    const unauthorized = () => {
      setRefused(storedToken() !== null);
      storeToken(null);
      setAccess("token");
    };
    auth.addEventListener("unauthorized", unauthorized);
    return () => auth.removeEventListener("unauthorized", unauthorized);
  }, []);

  const section = location.pathname.split("/")[2] || "runs";
  return (
    <>
      <header class="top">
        <Link href="/ui/" class="brand">
          Trellis
        </Link>
        <nav aria-label="Sections">
          {(["runs", "workflows", "plugins"] as const).map((name) => (
            <Link
              key={name}
              href={`/ui/${name}`}
              data-nav={name}
              aria-current={section === name ? "page" : undefined}
            >
              {name[0].toUpperCase() + name.slice(1)}
            </Link>
          ))}
        </nav>
        {access === "open" && storedToken() && (
          <button
            class="quiet"
            type="button"
            onClick={() => {
              storeToken(null);
              setRefused(false);
              setAccess("token");
            }}
          >
            Sign out
          </button>
        )}
      </header>
      {access === "checking" && <main aria-busy="true" />}
      {access === "token" && (
        <TokenForm
          refused={refused}
          onToken={(token) => {
            storeToken(token);
            setAccess("checking");
            probe();
          }}
        />
      )}
      {access === "open" && <Page path={location.pathname} />}
    </>
  );
}

render(<App />, document.getElementById("app")!);
