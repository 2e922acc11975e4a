//! The workflow parser and validator: any text as a workflow file, the way
//! `trellis validate`, the server's workflow dir and `PUT /v1/workflows/{name}`
//! read it. A plan or diagnostics are fine; a panic is not.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Files and request bodies that are not UTF-8 are refused before parsing.
    if let Ok(source) = std::str::from_utf8(data) {
        trellis_fuzz::parse_workflow(source);
    }
});
