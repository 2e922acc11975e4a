//! The command line contract: stdout, stderr, exit status; `plugins`.

use serde_json::json;

use crate::support::*;

#[test]
fn run_prints_only_the_output_on_stdout() {
    let sandbox = Sandbox::new();
    let path = sandbox.write(
        "flow.toml",
        "[[step]]\nid = \"echo\"\nplugin = \"noop\"\ninput = \"{{ input.who }}\"\n",
    );
    let outcome = run_file(&path, Some(r#"{"who": "world"}"#), &[]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(outcome.json(), json!({ "echo": "world" }));
}

#[test]
fn input_can_come_from_a_file() {
    let sandbox = Sandbox::new();
    let path = sandbox.write(
        "flow.toml",
        "[[step]]\nid = \"echo\"\nplugin = \"noop\"\ninput = \"{{ input }}\"\n",
    );
    let input = sandbox.write("input.json", r#"{"from": "file"}"#);
    let outcome = run_file(&path, Some(&format!("@{}", input.display())), &[]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(outcome.json(), json!({ "echo": { "from": "file" } }));
}

#[test]
fn bad_input_json_is_a_usage_error() {
    let sandbox = Sandbox::new();
    let path = sandbox.write("flow.toml", "[[step]]\nid = \"echo\"\nplugin = \"noop\"\n");
    let outcome = run_file(&path, Some("{not json"), &[]);
    assert_eq!(outcome.code, 2);
    assert!(
        outcome.stderr.contains("--input is not valid JSON"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn json_record_has_attempt_metrics() {
    let sandbox = Sandbox::new();
    let (outcome, record) = sandbox.run_json(
        "[[step]]\nid = \"echo\"\nplugin = \"noop\"\ninput = [1, 2]\n",
        None,
    );
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    assert_eq!(record["status"], "succeeded");
    assert_eq!(record["workflow"], "workflow");
    assert!(record["id"].as_str().unwrap().len() == 36);
    let echo = step(&record, "echo");
    assert_eq!(echo["plugin"], "noop");
    assert_eq!(echo["plugin_version"], "1.0.0");
    assert!(
        echo["plugin_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let attempt = &echo["attempts"][0];
    assert_eq!(attempt["attempt"], 1);
    assert_eq!(attempt["status"], "succeeded");
    assert!(attempt["fuel_consumed"].as_u64().unwrap() > 1000);
    assert!(attempt["peak_memory"].as_u64().unwrap() > 0);
    assert!(attempt["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(attempt["logs"].is_array());
}

#[test]
fn plugins_list_shows_names_and_versions() {
    let outcome = exec(&["plugins", "list", "--plugin-dir", EXAMPLE_PLUGINS, "--json"]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let list = outcome.json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for expected in [
        "aggregate",
        "hash",
        "json-schema",
        "json-transform",
        "template",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    for plugin in list.as_array().unwrap() {
        assert!(
            semver_like(plugin["version"].as_str().unwrap()),
            "{plugin:#}"
        );
        assert!(
            !plugin["description"].as_str().unwrap().is_empty(),
            "{plugin:#}"
        );
    }
}

fn semver_like(version: &str) -> bool {
    version.split('.').count() == 3
        && version
            .split('.')
            .all(|p| p.chars().next().is_some_and(|c| c.is_ascii_digit()))
}

#[test]
fn plugins_inspect_describes_a_component_and_refuses_garbage() {
    let noop = format!("{FIXTURE_PLUGINS}/noop.wasm");
    let outcome = exec(&["plugins", "inspect", &noop]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let info = outcome.json();
    assert_eq!(info["name"], "noop");
    assert!(info["imports"].as_array().unwrap().iter().any(|i| {
        i.as_str()
            .unwrap()
            .starts_with("trellis:plugin/types@0.1.0")
    }));
    assert_eq!(info["side_effects"], serde_json::json!([]));
    let probe = exec(&[
        "plugins",
        "inspect",
        &format!("{FIXTURE_PLUGINS}/probe.wasm"),
    ]);
    assert_eq!(probe.json()["side_effects"], serde_json::json!(["state"]));

    let sandbox = Sandbox::new();
    let garbage = sandbox.write("garbage.wasm", "definitely not wasm");
    let outcome = exec(&["plugins", "inspect", garbage.to_str().unwrap()]);
    assert_eq!(outcome.code, 2);
    assert!(
        outcome.stderr.contains("not a WebAssembly file"),
        "{}",
        outcome.stderr
    );

    // A core module (the smallest one) is not a component.
    let core = sandbox.dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let outcome = exec(&["plugins", "inspect", core.to_str().unwrap()]);
    assert_eq!(outcome.code, 2);
    assert!(
        outcome.stderr.contains("core WebAssembly module"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn two_plugins_with_the_same_name_and_version_are_an_error() {
    let sandbox = Sandbox::new();
    let dir = sandbox.dir.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(format!("{FIXTURE_PLUGINS}/noop.wasm"), dir.join("a.wasm")).unwrap();
    std::fs::copy(format!("{FIXTURE_PLUGINS}/noop.wasm"), dir.join("b.wasm")).unwrap();
    let outcome = exec(&["plugins", "list", "--plugin-dir", dir.to_str().unwrap()]);
    assert_eq!(outcome.code, 2);
    assert!(
        outcome.stderr.contains("noop 1.0.0 is loaded twice"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn a_pinned_version_resolves_and_a_missing_one_is_refused() {
    let sandbox = Sandbox::new();
    let path = sandbox.write(
        "ok.toml",
        "[[step]]\nid = \"a\"\nplugin = \"noop@1.0.0\"\ninput = 1\n",
    );
    let outcome = run_file(&path, None, &[]);
    assert_eq!(outcome.code, 0, "{}", outcome.stderr);
    let path = sandbox.write(
        "bad.toml",
        "[[step]]\nid = \"a\"\nplugin = \"noop@9.9.9\"\n",
    );
    let outcome = run_file(&path, None, &[]);
    assert_eq!(outcome.code, 2);
    assert!(
        outcome.stderr.contains("no version 9.9.9"),
        "{}",
        outcome.stderr
    );
}

#[test]
fn ctrl_c_cancels_the_run_and_still_prints_its_record() {
    let sandbox = Sandbox::new();
    let path = sandbox.write(
        "flow.toml",
        "[[step]]\nid = \"nap\"\nplugin = \"sleep\"\ninput = { ms = 30000 }\n\n[[step]]\nid = \"after\"\nplugin = \"noop\"\nneeds = [\"nap\"]\n",
    );
    let mut child = trellis()
        .arg("run")
        .arg(&path)
        .args(["--plugin-dir", FIXTURE_PLUGINS, "--json"])
        .env("TRELLIS_LOG", "trellis::executor=debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the step has started (its debug line), however long loading took.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("attempt started") {
        let read = std::io::BufRead::read_line(&mut stderr, &mut seen).unwrap();
        assert!(read > 0, "the step never started: {seen}");
    }
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    std::io::Read::read_to_string(&mut stderr, &mut seen).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = seen;
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let record: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(record["status"], "cancelled");
    assert_eq!(step(&record, "nap")["status"], "cancelled");
    assert!(step(&record, "nap")["duration_ms"].as_f64().unwrap() < 20_000.0);
    assert_eq!(step(&record, "after")["status"], "cancelled");
    assert!(stderr.contains("was cancelled"), "{stderr}");
}

/// Without `--plugin-dir`, `run`, `validate` and `plugins list` use the
/// configured plugin dirs: `plugin_dirs` in `./trellis.toml` (relative to the
/// file), else `TRELLIS_PLUGIN_DIRS`, else the example plugins of the build.
#[test]
fn commands_without_plugin_dirs_use_the_configured_ones() {
    let sandbox = Sandbox::new();
    let mine = sandbox.dir.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::copy(
        std::path::Path::new(FIXTURE_PLUGINS).join("probe.wasm"),
        mine.join("probe.wasm"),
    )
    .unwrap();
    // `probe` is a test fixture, not an example plugin.
    let flow = sandbox.write(
        "flow.toml",
        "[[step]]\nid = \"p\"\nplugin = \"probe\"\ninput = { n = 3 }\n",
    );
    let in_sandbox = |args: &[&str], env: Option<&str>| {
        let mut cmd = trellis();
        cmd.current_dir(sandbox.dir.path()).args(args);
        match env {
            Some(dirs) => cmd.env("TRELLIS_PLUGIN_DIRS", dirs),
            None => cmd.env_remove("TRELLIS_PLUGIN_DIRS"),
        };
        let output = cmd.output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let run = ["run", flow.to_str().unwrap()];

    // Out of the box: the examples, which have no `probe`.
    let (code, _, stderr) = in_sandbox(&run, None);
    assert_eq!(code, Some(2), "{stderr}");
    // Each diagnostic, and the verdict, on a line of its own.
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].ends_with("no plugin named `probe` is loaded")
            || lines[0].contains("no plugin named `probe` is loaded ("),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("error: ") && lines[1].ends_with("is not a valid workflow"),
        "{stderr}"
    );

    // From the environment.
    let (code, stdout, stderr) = in_sandbox(&run, Some(mine.to_str().unwrap()));
    assert_eq!(code, Some(0), "{stderr}");
    let output: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(output["p"]["input"]["n"], 3, "{output:#}");

    // From ./trellis.toml, relative to it.
    sandbox.write("trellis.toml", "plugin_dirs = [\"mine\"]\n");
    let (code, stdout, stderr) = in_sandbox(&run, None);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["p"]["input"]["n"],
        3
    );
    let (code, stdout, stderr) = in_sandbox(&["validate", flow.to_str().unwrap()], None);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
    let (code, stdout, stderr) = in_sandbox(&["plugins", "list", "--json"], None);
    assert_eq!(code, Some(0), "{stderr}");
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["probe"]);

    // A flag still wins over the file.
    let (code, _, stderr) = in_sandbox(
        &[
            "run",
            flow.to_str().unwrap(),
            "--plugin-dir",
            EXAMPLE_PLUGINS,
        ],
        None,
    );
    assert_eq!(code, Some(2), "{stderr}");
}
