//! Swap-test fixture: a well-formed component that the host can compile but that
//! does not implement `trellis:plugin/task` (no `info`, no `run`). Built with
//! `wit-bindgen` directly, not the SDK.

// The generated export glue is `unsafe` (the SDK hides the same behind its own crate).
#![allow(unsafe_code)]

wit_bindgen::generate!({
    inline: "
        package test:other;

        world other {
            export greet: func(name: string) -> string;
        }
    ",
    world: "other",
});

struct Other;

impl Guest for Other {
    fn greet(name: String) -> String {
        format!("hello, {name}")
    }
}

export!(Other);
