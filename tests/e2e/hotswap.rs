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
    // Both versions are listed; the upload was written to the plugin dir.
    let list = server.get("/v1/plugins").json();
    let versions: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "versioned")
        .map(|p| p["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1.0.0", "2.0.0"]);
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
