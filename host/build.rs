//! Builds the plugins in `plugins/` for `wasm32-wasip2`, the way wasmtime's
//! test-programs are built: a nested `cargo build` into its own target dir.
//!
//! Example plugins land in `target/plugins/`, test fixtures in
//! `target/plugins-test/`, and hot-swap fixtures (`plugins/swap/`, kept out of
//! the test plugin dir so a test can add them to a running server) in
//! `target/plugins-swap/`; the binary knows the first as its default plugin
//! dir. Set `TRELLIS_SKIP_PLUGIN_BUILD=1` to skip (packaging the host alone).

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "plugin";

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.parent().unwrap().to_path_buf();
    let plugins_dir = workspace.join("plugins");
    let out_examples = workspace.join("target").join("plugins");
    let out_fixtures = workspace.join("target").join("plugins-test");
    let out_swap = workspace.join("target").join("plugins-swap");
    println!(
        "cargo:rustc-env=TRELLIS_BUILTIN_PLUGIN_DIR={}",
        out_examples.display()
    );
    println!(
        "cargo:rustc-env=TRELLIS_TEST_PLUGIN_DIR={}",
        out_fixtures.display()
    );
    println!(
        "cargo:rustc-env=TRELLIS_SWAP_PLUGIN_DIR={}",
        out_swap.display()
    );
    // Made by `plugins/build.sh` (Python, JavaScript, C), not by this script.
    println!(
        "cargo:rustc-env=TRELLIS_POLYGLOT_PLUGIN_DIR={}",
        workspace.join("target").join("plugins-polyglot").display()
    );
    println!("cargo:rerun-if-env-changed=TRELLIS_SKIP_PLUGIN_BUILD");
    for watched in ["plugins", "plugin-sdk", "wit", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    if std::env::var_os("TRELLIS_SKIP_PLUGIN_BUILD").is_some() {
        return;
    }

    let examples = packages(&plugins_dir);
    let fixtures = packages(&plugins_dir.join("fixtures"));
    let swap = packages(&plugins_dir.join("swap"));
    if examples.is_empty() && fixtures.is_empty() && swap.is_empty() {
        return;
    }
    ensure_target();

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = workspace.join("target").join("wasm");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--target",
            TARGET,
            "--profile",
            PROFILE,
            "--target-dir",
        ])
        .arg(&target_dir);
    for name in examples.iter().chain(&fixtures).chain(&swap) {
        cmd.args(["-p", name]);
    }
    // The outer build's flags are for the host, not for wasm guests.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo to build the plugins");
    if !status.success() {
        panic!(
            "building the plugins in {} for {TARGET} failed (see above)",
            plugins_dir.display()
        );
    }

    let built = target_dir.join(TARGET).join(PROFILE);
    copy_outputs(&built, &examples, &out_examples);
    copy_outputs(&built, &fixtures, &out_fixtures);
    copy_outputs(&built, &swap, &out_swap);
}

/// Package names of the plugin crates directly under `dir`.
fn packages(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| {
            let manifest = entry.ok()?.path().join("Cargo.toml");
            let text = std::fs::read_to_string(&manifest).ok()?;
            let doc: toml::Table = toml::from_str(&text).ok()?;
            Some(doc.get("package")?.get("name")?.as_str()?.to_string())
        })
        .collect();
    names.sort();
    names
}

/// Installs the wasm target if the toolchain lacks it: rustup does not act on
/// `rust-toolchain.toml`'s `targets` by itself here.
fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("running rustc --print sysroot");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib").join("rustlib").join(TARGET).is_dir() {
        return;
    }
    let status = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    match status {
        Ok(status) if status.success() => {}
        _ => panic!(
            "the {TARGET} target is not installed and `rustup target add {TARGET}` failed: install it, then build again"
        ),
    }
}

/// Copies `name.wasm` (file names use `_`) to `to/name.wasm` when it changed.
fn copy_outputs(built: &Path, names: &[String], to: &Path) {
    std::fs::create_dir_all(to).expect("creating the plugin output dir");
    for name in names {
        let from = built.join(format!("{}.wasm", name.replace('-', "_")));
        let dest = to.join(format!("{name}.wasm"));
        let bytes =
            std::fs::read(&from).unwrap_or_else(|e| panic!("reading {}: {e}", from.display()));
        if std::fs::read(&dest).ok().as_deref() != Some(&bytes[..]) {
            std::fs::write(&dest, &bytes)
                .unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
        }
    }
}
