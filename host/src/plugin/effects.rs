//! What a plugin can change outside its own output, read once from the
//! imports its component declares.
//!
//! A step whose plugin can change nothing (no outbound HTTP, no state
//! writes) is harmless to run twice: after a crash it may simply run again.
//! Such a step does not wait for the store before it starts (its start and
//! its result are queued and commit with the next write anyone waits for);
//! a step with side effects waits until everything before it is durable.
//!
//! The sandbox gives a step no sockets, no preopened directories and no
//! environment, so WASI's CLI, clock, random, I/O and filesystem interfaces
//! cannot reach the world. Any import not known to be harmless counts as a
//! side effect, so a future host interface is safe by default.

use serde::Serialize;
use wasmtime::component::types::ComponentItem;

/// The interfaces (by prefix of the import's name) a step can use without
/// changing anything outside its output.
const HARMLESS: &[&str] = &[
    "trellis:plugin/types",
    "trellis:plugin/host",
    "wasi:cli/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:io/",
    // No preopened directories: nothing to open.
    "wasi:filesystem/",
    // Sockets are refused by the sandbox (allow_tcp/allow_udp false).
    "wasi:sockets/",
];

/// The functions of `trellis:plugin/state` that change state.
const STATE_WRITES: &[&str] = &["set", "delete"];

/// A plugin's side effects, by kind; empty: side-effect free.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SideEffects(Vec<String>);

impl SideEffects {
    /// From the component's imports.
    pub fn of(
        component: &wasmtime::component::Component,
        engine: &wasmtime::Engine,
    ) -> SideEffects {
        let mut kinds: Vec<String> = Vec::new();
        let mut add = |kind: String| {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        };
        for (name, item) in component.component_type().imports(engine) {
            if name.starts_with("wasi:http/") {
                add("http".to_owned());
            } else if name.starts_with("trellis:plugin/state") {
                let writes = match item.ty {
                    ComponentItem::ComponentInstance(instance) => instance
                        .exports(engine)
                        .any(|(function, _)| STATE_WRITES.contains(&function)),
                    // Not an instance: the linker refuses it anyway.
                    _ => true,
                };
                if writes {
                    add("state".to_owned());
                }
            } else if !HARMLESS.iter().any(|prefix| name.starts_with(prefix)) {
                add(format!("import {name}"));
            }
        }
        kinds.sort();
        SideEffects(kinds)
    }

    /// Running it again changes nothing outside its output.
    pub fn none(&self) -> bool {
        self.0.is_empty()
    }

    /// The kinds: `http`, `state`, or `import <name>` for an interface not
    /// known to be harmless.
    pub fn kinds(&self) -> &[String] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effects_of(wat: &str) -> SideEffects {
        let engine = wasmtime::Engine::default();
        let component = wasmtime::component::Component::new(&engine, wat).unwrap();
        SideEffects::of(&component, &engine)
    }

    #[test]
    fn state_reads_logs_clocks_and_random_are_harmless() {
        let effects = effects_of(
            r#"(component
                (import "trellis:plugin/state@0.1.0" (instance
                    (export "get" (func (param "key" string) (result (option (list u8)))))))
                (import "trellis:plugin/host@0.1.0" (instance
                    (export "progress" (func (param "fraction" f32) (param "message" string)))))
                (import "wasi:clocks/monotonic-clock@0.2.6" (instance
                    (export "now" (func (result u64)))))
                (import "wasi:random/random@0.2.6" (instance
                    (export "get-random-u64" (func (result u64)))))
            )"#,
        );
        assert!(effects.none(), "{effects:?}");
    }

    #[test]
    fn state_writes_http_and_unknown_interfaces_are_side_effects() {
        let effects = effects_of(
            r#"(component
                (import "trellis:plugin/state@0.1.0" (instance
                    (export "get" (func (param "key" string) (result (option (list u8)))))
                    (export "delete" (func (param "key" string)))))
                (import "wasi:http/outgoing-handler@0.2.6" (instance))
                (import "wasi:keyvalue/store@0.2.0" (instance))
            )"#,
        );
        assert!(!effects.none());
        assert_eq!(
            effects.kinds(),
            ["http", "import wasi:keyvalue/store@0.2.0", "state"]
        );
        let set_only = effects_of(
            r#"(component
                (import "trellis:plugin/state@0.1.0" (instance
                    (export "set" (func (param "key" string) (param "value" (list u8))))))
            )"#,
        );
        assert_eq!(set_only.kinds(), ["state"]);
    }
}
