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
    build_console(&workspace);
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

/// Builds the web console (`host/console`, TypeScript + Preact) into
/// `$OUT_DIR/console/` (index.html, app.js, app.css), which `api::console`
/// embeds. Its npm packages are installed, exactly as `package-lock.json`
/// pins them, into `target/console/node_modules` when the lock changes; esbuild
/// bundles the app. Without node and npm (or with
/// `TRELLIS_SKIP_CONSOLE_BUILD=1`) the binary gets a page that says how to
/// build it, and the rest of the host works.
fn build_console(workspace: &Path) {
    let source = workspace.join("host").join("console");
    for watched in ["src", "index.html", "package.json", "package-lock.json"] {
        println!("cargo:rerun-if-changed={}", source.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=TRELLIS_SKIP_CONSOLE_BUILD");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("console");
    std::fs::create_dir_all(&out).expect("creating the console output dir");
    let skip = std::env::var_os("TRELLIS_SKIP_CONSOLE_BUILD").is_some_and(|v| v != "0");
    let result = if skip {
        Err("TRELLIS_SKIP_CONSOLE_BUILD is set".to_string())
    } else {
        bundle_console(workspace, &source, &out)
    };
    if let Err(why) = result {
        println!("cargo:warning=the web console is not built ({why}); /ui/ says how to build it");
        let page = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Trellis</title></head>\
             <body><main><h1>Trellis</h1><p>This build has no console: {}. Install Node.js 18 or \
             later with npm, then build again (<code>cargo build -p trellis</code>). The API at \
             <a href=\"/v1/openapi.json\">/v1/openapi.json</a> works without it.</p></main></body></html>",
            why.replace('&', "&amp;").replace('<', "&lt;")
        );
        std::fs::write(out.join("index.html"), page).expect("writing the console placeholder");
        std::fs::write(out.join("app.js"), "").expect("writing the console placeholder");
        std::fs::write(out.join("app.css"), "").expect("writing the console placeholder");
    }
}

fn bundle_console(workspace: &Path, source: &Path, out: &Path) -> Result<(), String> {
    let tools = workspace.join("target").join("console");
    std::fs::create_dir_all(&tools).map_err(|e| format!("creating {}: {e}", tools.display()))?;
    let lock = std::fs::read(source.join("package-lock.json"))
        .map_err(|e| format!("reading host/console/package-lock.json: {e}"))?;
    // Builds of two profiles run their build scripts at once: one installs,
    // the other waits for it.
    let guard = std::fs::File::create(tools.join(".install-lock"))
        .map_err(|e| format!("creating the install lock in {}: {e}", tools.display()))?;
    guard
        .lock()
        .map_err(|e| format!("locking {}: {e}", tools.display()))?;
    let installed = tools.join("node_modules").join(".trellis-lock");
    if std::fs::read(&installed).ok().as_deref() != Some(&lock[..]) {
        for file in ["package.json", "package-lock.json"] {
            std::fs::copy(source.join(file), tools.join(file))
                .map_err(|e| format!("copying {file}: {e}"))?;
        }
        let status = Command::new("npm")
            .current_dir(&tools)
            .args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--loglevel=error",
            ])
            .status()
            .map_err(|e| format!("running npm: {e}"))?;
        if !status.success() {
            return Err(format!("`npm ci` in {} failed ({status})", tools.display()));
        }
        std::fs::write(&installed, &lock)
            .map_err(|e| format!("writing {}: {e}", installed.display()))?;
    }
    drop(guard);
    let esbuild = tools
        .join("node_modules")
        .join("esbuild")
        .join("bin")
        .join("esbuild");
    let status = Command::new("node")
        .arg(&esbuild)
        .arg(source.join("src").join("main.tsx"))
        .args([
            "--bundle",
            "--minify",
            "--format=esm",
            "--target=es2022",
            "--jsx=automatic",
            "--jsx-import-source=preact",
            "--log-level=warning",
            "--legal-comments=none",
        ])
        .arg(format!("--outfile={}", out.join("app.js").display()))
        // The app's imports resolve from the installed packages.
        .env("NODE_PATH", tools.join("node_modules"))
        .status()
        .map_err(|e| format!("running node: {e}"))?;
    if !status.success() {
        return Err(format!("esbuild failed ({status}; see above)"));
    }
    if !out.join("app.css").exists() {
        std::fs::write(out.join("app.css"), "").map_err(|e| e.to_string())?;
    }
    std::fs::copy(source.join("index.html"), out.join("index.html"))
        .map_err(|e| format!("copying index.html: {e}"))?;
    Ok(())
}
