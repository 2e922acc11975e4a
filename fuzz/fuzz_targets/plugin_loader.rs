//! The plugin loader: any bytes as an uploaded plugin (`PUT
//! /v1/plugins/{name}`, a `.wasm` file in a plugin dir, `trellis plugins
//! inspect`). The registry checks the header, compiles the component with the
//! process's engine, links it against the host's imports, checks the
//! `trellis:plugin/task` world and calls `info()` in a sandbox. An error is
//! fine; a panic, a crash or a hang is not.
//!
//! Input that starts with `(` or `;` is WebAssembly text (`.wat`; as bytes it
//! would be refused at the header anyway): it is assembled first, so seeds can
//! be readable components and mutations of them stay well-formed more often.
//! `TRELLIS_FUZZ_VERBOSE=1` prints why each input was refused.
//!
//! One engine, linker and runtime for every input, and no code cache: nothing
//! is written to disk.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use trellis::engine::Engine;
use trellis::plugin::PluginRegistry;

struct Loader {
    runtime: tokio::runtime::Runtime,
    registry: PluginRegistry,
}

static LOADER: LazyLock<Loader> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let engine = Engine::new().expect("the wasm engine");
    let registry = PluginRegistry::new(engine).expect("the plugin registry");
    Loader { runtime, registry }
});

static VERBOSE: LazyLock<bool> =
    LazyLock::new(|| std::env::var_os("TRELLIS_FUZZ_VERBOSE").is_some());

fuzz_target!(|data: &[u8]| {
    let assembled;
    let data = match data.first() {
        Some(b'(' | b';') => match std::str::from_utf8(data).map(wat::parse_str) {
            Ok(Ok(binary)) => {
                assembled = binary;
                &assembled[..]
            }
            _ => return,
        },
        _ => data,
    };
    let loader = &*LOADER;
    match loader.runtime.block_on(loader.registry.compile(data, None)) {
        Ok(plugin) => {
            // What `plugins inspect` and `GET /v1/plugins` show.
            assert!(!plugin.name.is_empty() && plugin.name.len() <= 64);
            assert_eq!(plugin.size, data.len() as u64);
            let _ = (plugin.label(), format!("{plugin:?}"), &plugin.imports);
            if *VERBOSE {
                eprintln!("loaded: {} imports {:?}", plugin.label(), plugin.imports);
            }
        }
        Err(error) => {
            let message = error.to_string();
            if *VERBOSE {
                eprintln!("refused: {message}");
            }
        }
    }
});
