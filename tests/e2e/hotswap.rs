//! Plugins change while the server runs: uploads are validated before they
//! become visible, runs keep the builds they started with (across a restart
//! too), new runs see the new build at once.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::support::*;

/// `versioned` 1.0.0 and 2.0.0, another world, an `info()` that loops.
const SWAP_PLUGINS: &str = env!("TRELLIS_SWAP_PLUGIN_DIR");

fn swap(name: &str) -> PathBuf {
    Path::new(SWAP_PLUGINS).join(format!("{name}.wasm"))
}

/// Sleeps `input.ms`, then asks `versioned` for its version.
const VERSIONED: &str = r#"
[[step]]
id = "nap"
plugin = "sleep"
input = { ms = "{{ input.ms }}" }

[[step]]
id = "v"
plugin = "versioned"
needs = ["nap"]
input = "{{ input.n }}"

[output]
version = "{{ steps.v.output.version }}"
n = "{{ steps.v.output.input }}"
"#;

fn upload(server: &Server, name: &str, bytes: &[u8]) -> Reply {
    server.call(
        "PUT",
        &format!("/v1/plugins/{name}"),
        &[("content-type", "application/wasm")],
        Some(bytes),
    )
}

fn start(server: &Server, n: usize, ms: u64) -> String {
    let reply = server.post(
        "/v1/workflows/versioned/runs",
        &format!(r#"{{"n": {n}, "ms": {ms}}}"#),
    );
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.json()["id"].as_str().unwrap().to_string()
}

fn version_now(server: &Server) -> Value {
    let reply = server.post(
        "/v1/workflows/versioned/runs?wait=30s",
        r#"{"n": 0, "ms": 0}"#,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["output"]["version"].clone()
}

#[test]
fn an_upload_swaps_the_plugin_under_load() {
    let server = Serve::new()
        .own_plugin_dir(&[&swap("versioned-v1")])
        .workflow("versioned.toml", VERSIONED)
        .start();
    let before: Vec<String> = (0..100)
        .map(|n| start(&server, n, 300 + (n as u64 * 7) % 400))
        .collect();

    let v2 = std::fs::read(swap("versioned-v2")).unwrap();
    let reply = upload(&server, "versioned", &v2);
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(reply.json()["version"], "2.0.0");
    let after: Vec<String> = (100..120).map(|n| start(&server, n, 10)).collect();

    for (n, id) in before.iter().enumerate() {
        let run = server.wait_for_run(id);
        assert_eq!(run["status"], "succeeded", "{run:#}");
        assert_eq!(
            run["output"],
            json!({ "version": "1.0.0", "n": n }),
            "run {n} started before the swap"
        );
        assert_eq!(step(&run, "v")["plugin_version"], "1.0.0");
    }
    for (n, id) in after.iter().enumerate() {
        let run = server.wait_for_run(id);
        assert_eq!(
            run["output"],
            json!({ "version": "2.0.0", "n": n + 100 }),
            "run {} started after",
            n + 100
        );
    }
    // Both versions are listed.
    let list = server.get("/v1/plugins").json();
    let versions: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "versioned")
        .map(|p| p["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1.0.0", "2.0.0"]);
    // It was written to the data dir's uploads, not to a configured plugin dir.
    let uploaded = server.data_dir().join("uploads/versioned-2.0.0.wasm");
    assert_eq!(std::fs::read(&uploaded).unwrap(), v2);
    assert!(!server.plugin_dir().join("versioned-2.0.0.wasm").exists());
    // The same bytes again: nothing changes.
    assert_eq!(upload(&server, "versioned", &v2).status, 200);
}

#[test]
fn bad_uploads_are_refused_and_the_old_version_keeps_serving() {
    let server = Serve::new()
        .own_plugin_dir(&[&swap("versioned-v1")])
        .workflow("versioned.toml", VERSIONED)
        .start();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "versioned",
            b"this is not wasm".to_vec(),
            "not a WebAssembly file",
        ),
        (
            "versioned",
            b"\0asm\x01\0\0\0".to_vec(),
            "core WebAssembly module",
        ),
        (
            "versioned",
            std::fs::read(swap("other-world")).unwrap(),
            "does not implement the trellis:plugin/task world",
        ),
        (
            "slow-info",
            std::fs::read(swap("slow-info")).unwrap(),
            "info() failed",
        ),
        (
            "other-name",
            std::fs::read(swap("versioned-v2")).unwrap(),
            "names it `versioned`",
        ),
    ];
    for (name, bytes, reason) in cases {
        let reply = upload(&server, name, &bytes);
        let body = reply.assert_error(422, "invalid_plugin");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{name}: {message}");
        assert_eq!(version_now(&server), "1.0.0", "after refusing {name}");
    }
    let reply = server.call(
        "PUT",
        "/v1/plugins/versioned",
        &[("content-type", "text/plain")],
        Some(b"x"),
    );
    reply.assert_error(415, "unsupported_media_type");
    let names: Vec<String> = server.get("/v1/plugins").json()["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !names.contains(&"slow-info".to_string()) && !names.contains(&"other-name".to_string()),
        "{names:?}"
    );
}

#[test]
fn delete_removes_a_version_and_new_runs_take_the_next() {
    let server = Serve::new()
        .own_plugin_dir(&[&swap("versioned-v1"), &swap("versioned-v2")])
        .workflow("versioned.toml", VERSIONED)
        .start();
    assert_eq!(version_now(&server), "2.0.0");
    let in_flight = start(&server, 7, 500);
    let reply = server.call("DELETE", "/v1/plugins/versioned?version=2.0.0", &[], None);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["removed"][0]["version"], "2.0.0");
    assert_eq!(version_now(&server), "1.0.0");
    // The run that resolved 2.0.0 before the delete finishes with it.
    let run = server.wait_for_run(&in_flight);
    assert_eq!(run["output"], json!({ "version": "2.0.0", "n": 7 }));

    server
        .call("DELETE", "/v1/plugins/versioned?version=9.9.9", &[], None)
        .assert_error(404, "not_found");
    server
        .call("DELETE", "/v1/plugins/versioned?version=nine", &[], None)
        .assert_error(400, "invalid_request");
    assert_eq!(
        server
            .call("DELETE", "/v1/plugins/versioned", &[], None)
            .status,
        200
    );
    server
        .call("DELETE", "/v1/plugins/versioned", &[], None)
        .assert_error(404, "not_found");
}

#[test]
fn a_run_pinned_to_a_removed_build_resumes_with_it_after_a_crash() {
    let server = Serve::new()
        .own_plugin_dir(&[&swap("versioned-v1")])
        .workflow("versioned.toml", VERSIONED)
        .start();
    let id = start(&server, 3, 1500);
    let v2 = std::fs::read(swap("versioned-v2")).unwrap();
    assert_eq!(upload(&server, "versioned", &v2).status, 201);
    assert_eq!(
        server
            .call("DELETE", "/v1/plugins/versioned?version=1.0.0", &[], None)
            .status,
        200
    );
    let dir = server.crash();

    // 1.0.0's file is gone from the plugin dir; the run still gets it.
    let server = Serve::in_dir(dir).start();
    let run = server.wait_for_run(&id);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], json!({ "version": "1.0.0", "n": 3 }));
    assert_eq!(version_now(&server), "2.0.0");
}

/// Polls `GET /v1/plugins` until `check` holds (the watcher debounces).
fn until_plugins(server: &Server, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let list = server.get("/v1/plugins").json();
        if check(&list) {
            return list;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never happened: {list:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn has_version(list: &Value, version: &str) -> bool {
    list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "versioned" && p["version"] == version)
}

#[test]
fn a_file_dropped_in_the_plugin_dir_swaps_the_plugin_under_load() {
    let server = Serve::new()
        .own_plugin_dir(&[&swap("versioned-v1")])
        .workflow("versioned.toml", VERSIONED)
        .start();
    let before: Vec<String> = (0..100)
        .map(|n| start(&server, n, 300 + (n as u64 * 7) % 400))
        .collect();
    let dir = server.plugin_dir();
    std::fs::copy(swap("versioned-v2"), dir.join("versioned-v2.wasm")).unwrap();
    until_plugins(&server, "2.0.0 activated", |list| {
        has_version(list, "2.0.0")
    });
    let after: Vec<String> = (100..120).map(|n| start(&server, n, 10)).collect();
    for (n, id) in before.iter().enumerate() {
        let run = server.wait_for_run(id);
        assert_eq!(
            run["output"],
            json!({ "version": "1.0.0", "n": n }),
            "run {n}: {run:#}"
        );
    }
    for (n, id) in after.iter().enumerate() {
        let run = server.wait_for_run(id);
        assert_eq!(run["output"], json!({ "version": "2.0.0", "n": n + 100 }));
    }

    // A bad file is refused and listed; what was loaded keeps serving.
    std::fs::write(dir.join("garbage.wasm"), b"not wasm at all").unwrap();
    std::fs::copy(swap("other-world"), dir.join("versioned-v2.wasm")).unwrap();
    let list = until_plugins(&server, "the bad files listed", |list| {
        list["errors"].as_array().unwrap().len() == 2
    });
    let errors = list["errors"].to_string();
    assert!(errors.contains("not a WebAssembly file"), "{errors}");
    assert!(
        errors.contains("does not implement the trellis:plugin/task world"),
        "{errors}"
    );
    assert!(
        has_version(&list, "2.0.0"),
        "the loaded 2.0.0 stays: {list:#}"
    );
    assert_eq!(version_now(&server), "2.0.0");

    // A file that goes takes its plugin with it.
    std::fs::remove_file(dir.join("versioned-v2.wasm")).unwrap();
    until_plugins(&server, "2.0.0 removed", |list| !has_version(list, "2.0.0"));
    assert_eq!(version_now(&server), "1.0.0");
}

#[test]
fn workflow_files_are_picked_up_and_a_bad_edit_keeps_the_old_version() {
    let server = Serve::new().start();
    let dir = server.workflow_dir();
    let trigger = |word: &str| {
        server.post(
            "/v1/workflows/live/runs?wait=30s",
            &format!(r#"{{"word": "{word}"}}"#),
        )
    };
    let wait_until = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never happened"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    std::fs::write(
        dir.join("live.toml"),
        "[[step]]\nid = \"a\"\nplugin = \"noop\"\ninput = \"{{ input.word }}\"\n",
    )
    .unwrap();
    wait_until("live.toml loaded", &|| trigger("one").status == 200);
    assert_eq!(trigger("one").json()["output"], json!({ "a": "one" }));

    std::fs::write(
        dir.join("live.toml"),
        "[[step]]\nid = \"a\"\nplugin = \"no-such-plugin\"\n",
    )
    .unwrap();
    // The watcher read the edit and refused it: only then does the next
    // run say anything about what a bad edit does.
    wait_until("the bad edit refused", &|| {
        let log = server.stderr();
        log.contains("workflow refused; the loaded version stays") && log.contains("no-such-plugin")
    });
    assert_eq!(
        trigger("two").json()["output"],
        json!({ "a": "two" }),
        "the valid version stays"
    );

    std::fs::remove_file(dir.join("live.toml")).unwrap();
    wait_until("live.toml removed", &|| trigger("three").status == 404);
}
