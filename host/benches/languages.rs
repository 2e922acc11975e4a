//! Fresh-instance cost of one step attempt, per plugin language: a new Store
//! and instance (pooling allocator, fuel and epoch deadline on) and one call
//! of `run`, through the same `Plugin::invoke` the executor uses.
//!
//! `cargo bench -p trellis --bench languages` (after `plugins/build.sh` for the
//! Python, JavaScript and C plugins; a plugin whose file is missing is skipped
//! with a note). Compiled code is cached under `target/bench-cache`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use tokio_util::sync::CancellationToken;
use trellis::engine::{CodeCache, Engine, Limits};
use trellis::plugin::{Invocation, MemoryStateStore, Plugin, PluginRegistry};

/// (label, plugin file, input).
fn cases() -> Vec<(&'static str, PathBuf, &'static str)> {
    let examples = Path::new(env!("TRELLIS_BUILTIN_PLUGIN_DIR"));
    let fixtures = Path::new(env!("TRELLIS_TEST_PLUGIN_DIR"));
    let polyglot = Path::new(env!("TRELLIS_POLYGLOT_PLUGIN_DIR"));
    vec![
        ("rust/noop", fixtures.join("noop.wasm"), r#"{"n":1}"#),
        (
            "rust/hash",
            examples.join("hash.wasm"),
            r#"{"data":"web-01.example.com"}"#,
        ),
        (
            "c/checksum",
            polyglot.join("checksum.wasm"),
            r#"{"data":"web-01.example.com"}"#,
        ),
        (
            "js/slugify",
            polyglot.join("slugify.wasm"),
            r#"{"text":"Crème Brûlée: 10 Recipes!"}"#,
        ),
        (
            "python/csv-parse",
            polyglot.join("csv-parse.wasm"),
            r#"{"text":"name,qty\nAda,2\n"}"#,
        ),
    ]
}

fn invocation(input: &str, state: &Arc<MemoryStateStore>) -> Invocation {
    Invocation {
        run_id: "bench".into(),
        workflow: "bench".into(),
        step_id: "step".into(),
        attempt: 1,
        input: input.into(),
        config: BTreeMap::new(),
        secrets: Default::default(),
        allow_hosts: Arc::from([]),
        limits: Limits::default(),
        state: state.clone(),
        events: None,
        cancel: CancellationToken::new(),
    }
}

fn languages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = Engine::new().unwrap();
    let cache_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-cache");
    let registry = PluginRegistry::new(engine)
        .unwrap()
        .with_cache(CodeCache::new(cache_dir));
    let state = Arc::new(MemoryStateStore::default());
    let mut group = c.benchmark_group("fresh_instance");
    for (label, file, input) in cases() {
        if !file.is_file() {
            eprintln!(
                "skipping {label}: {} is not built (run plugins/build.sh)",
                file.display()
            );
            continue;
        }
        let plugin: Plugin = rt.block_on(registry.load_file(&file)).unwrap();
        // Check once that it really succeeds: a failing call is not a benchmark.
        let outcome = rt.block_on(plugin.invoke(invocation(input, &state)));
        assert!(outcome.result.is_ok(), "{label}: {:?}", outcome.result);
        group.bench_function(label, |b| {
            b.to_async(&rt).iter(|| async {
                plugin
                    .invoke(invocation(input, &state))
                    .await
                    .result
                    .is_ok()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, languages);
criterion_main!(benches);
