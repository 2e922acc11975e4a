//! **console**: how fast the web console draws a large run (issue 16: "a run
//! of 2,000 steps and a `for_each` of 10,000 items render in under 1 s").
//!
//! `trellis serve` runs a 2,000-step workflow (20 lanes of 100 noop steps,
//! lanes crossing every third layer) and a `for_each` over 10,000 items;
//! Debian's chromium, driven through its chromedriver (WebDriver), opens each
//! run's page several times in one session. The console marks
//! `trellis:dag-data` when the run and its layout have arrived and
//! `trellis:dag-rendered` once the DAG is in the page and painted; the figure
//! is the time from navigation to `trellis:dag-rendered` (median of the
//! loads), the note splits it into data and drawing. Without chromium and
//! chromedriver the part says so and measures nothing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

use super::Env;
use super::client::Conn;
use crate::report::{Measurement, median};

/// The budget of issue 16.
const BUDGET_MS: f64 = 1000.0;
const LANES: usize = 20;
const LAYERS: usize = 100;
const ITEMS: usize = 10_000;

/// 2,000 noop steps: `LANES` lanes of `LAYERS`, each step after the one
/// above it and, every third layer, after its neighbour's too.
fn wide_workflow() -> String {
    let mut text = String::from("name = \"wide2000\"\n");
    for layer in 0..LAYERS {
        for lane in 0..LANES {
            text.push_str(&format!(
                "\n[[step]]\nid = \"s{layer:03}_{lane:02}\"\nplugin = \"noop\"\n"
            ));
            if layer > 0 {
                let mut needs = vec![format!("\"s{:03}_{lane:02}\"", layer - 1)];
                if layer.is_multiple_of(3) {
                    needs.push(format!("\"s{:03}_{:02}\"", layer - 1, (lane + 1) % LANES));
                }
                text.push_str(&format!("needs = [{}]\n", needs.join(", ")));
            }
        }
    }
    text
}

const FAN_WORKFLOW: &str = r#"name = "fan10000"

[[step]]
id = "each"
plugin = "noop"
for_each = "{{ input.items }}"
input = "{{ item }}"

[[step]]
id = "after"
plugin = "noop"
needs = ["each"]
"#;

fn tool(var: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default));
    path.is_file().then_some(path)
}

/// A chromedriver on a port it picks, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(chromedriver: &Path) -> anyhow::Result<Driver> {
        let mut child = Command::new(chromedriver)
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", chromedriver.display()))?;
        let stdout = child.stdout.take().context("chromedriver's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    let _ = tx.send(rest.trim_end_matches('.').trim().parse::<u16>());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(port)) => Ok(Driver { child, port }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("chromedriver did not say its port: {other:?}")
            }
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn session(driver: &Driver, chrome: &Path, profile: &Path) -> anyhow::Result<Client> {
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chrome,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions",
                "--disable-background-networking",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
        {
            Ok(client) => return Ok(client),
            Err(err) if Instant::now() > deadline => bail!("no browser session: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One load of `url`: (ms to `trellis:dag-data`, ms to `trellis:dag-rendered`).
async fn load(client: &Client, url: &str, steps: u64) -> anyhow::Result<(f64, f64)> {
    client.goto(url).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let marks = client
            .execute(
                "const at = (n) => { const m = performance.getEntriesByName(n)[0]; return m ? m.startTime : null; };
                 return [at('trellis:dag-data'), at('trellis:dag-rendered'), document.querySelectorAll('[data-step]').length];",
                vec![],
            )
            .await?;
        if let (Some(data), Some(drawn)) = (marks[0].as_f64(), marks[1].as_f64()) {
            ensure!(
                marks[2].as_u64() == Some(steps),
                "{url}: {} step nodes, not {steps}",
                marks[2]
            );
            return Ok((data, drawn));
        }
        ensure!(Instant::now() < deadline, "{url}: never rendered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A finished run of `workflow` on `input`: its id.
fn finished_run(conn: &mut Conn, workflow: &str, input: &Value) -> anyhow::Result<String> {
    let answer = conn.post_json(
        &format!("/v1/workflows/{workflow}/runs?wait=5m"),
        input.to_string().as_bytes(),
    )?;
    let run = answer.json()?;
    ensure!(
        answer.status == 200 && run["status"] == "succeeded",
        "{workflow}: {} {}",
        answer.status,
        answer.text().chars().take(300).collect::<String>()
    );
    Ok(run["id"].as_str().context("a run id")?.to_owned())
}

pub(super) fn console(env: &Env) -> anyhow::Result<Vec<Measurement>> {
    let (Some(chromedriver), Some(chrome)) = (
        tool("CHROMEDRIVER", "/usr/bin/chromedriver"),
        tool("CHROME", "/usr/bin/chromium"),
    ) else {
        eprintln!(
            "console: skipped, no chromium and chromedriver (apt-get install chromium chromium-driver)"
        );
        return Ok(Vec::new());
    };
    let loads = env.scale.console_loads;
    let work = env.dir("console")?;
    let workflows = work.join("workflows");
    std::fs::create_dir_all(&workflows)?;
    std::fs::write(workflows.join("wide2000.toml"), wide_workflow())?;
    std::fs::write(workflows.join("fan10000.toml"), FAN_WORKFLOW)?;
    let server = env.serve(&work, "data", &workflows, &[])?;
    let mut conn = Conn::connect(server.addr)?;
    let wide = finished_run(&mut conn, "wide2000", &json!({}))?;
    let items: Vec<usize> = (0..ITEMS).collect();
    let fan = finished_run(&mut conn, "fan10000", &json!({ "items": items }))?;
    let record = conn.get(&format!("/v1/runs/{fan}"))?;
    let record_bytes = record.body.len();

    let driver = Driver::start(&chromedriver)?;
    let profile = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let base = format!("http://{}", server.addr);
    let pages = [
        (
            "2,000-step run",
            wide,
            (LANES * LAYERS) as u64,
            String::new(),
        ),
        (
            "for_each of 10,000 items",
            fan,
            2,
            format!("; the run's record is {:.1} MB", record_bytes as f64 / 1e6),
        ),
    ];
    runtime.block_on(async {
        let client = session(&driver, &chrome, profile.path()).await?;
        let mut results = Vec::new();
        for (name, run, steps, extra) in pages {
            let url = format!("{base}/ui/runs/{run}");
            // One load to warm the browser's caches, not counted.
            load(&client, &url, steps).await?;
            let (mut data, mut drawn) = (Vec::new(), Vec::new());
            for _ in 0..loads {
                let (at_data, at_drawn) = load(&client, &url, steps).await?;
                data.push(at_data);
                drawn.push(at_drawn);
            }
            let mut drawing: Vec<f64> = drawn.iter().zip(&data).map(|(d, a)| d - a).collect();
            let max = drawn.iter().copied().fold(0.0, f64::max);
            let value = median(&mut drawn);
            results.push(
                Measurement::new("console", format!("{name} drawn"), value, "ms")
                    .target(format!("< {BUDGET_MS:.0} ms"), value < BUDGET_MS)
                    .note(format!(
                        "from navigation to the DAG painted, median of {loads} loads (max {max:.0} ms): data there at {:.0} ms, then {:.0} ms to draw{extra}; chromium headless, server in release",
                        median(&mut data),
                        median(&mut drawing),
                    )),
            );
        }
        client.close().await?;
        Ok(results)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wide_workflow_has_two_thousand_steps_each_after_the_layer_above() {
        let text = wide_workflow();
        assert_eq!(text.matches("[[step]]").count(), 2000);
        assert!(text.contains("id = \"s098_19\"\nplugin = \"noop\"\nneeds = [\"s097_19\"]\n"));
        assert!(
            text.contains(
                "id = \"s003_19\"\nplugin = \"noop\"\nneeds = [\"s002_19\", \"s002_00\"]\n"
            )
        );
    }
}
