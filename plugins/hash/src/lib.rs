//! `hash`: checksum of text or JSON (RustCrypto hashes and BLAKE3).
//!
//! Input:
//! ```json
//! { "data": "hello", "algorithm": "sha256", "encoding": "hex" }
//! ```
//! - `data` (required): a string is hashed as its UTF-8 bytes; any other JSON value
//!   (object, array, number, bool, null) as its compact `serde_json` text, e.g.
//!   `{"id":1,"qty":2}` (object keys sorted, no spaces), so equal data gives equal digests.
//! - `algorithm`: `sha256` (default), `sha384`, `sha512`, `sha1`, `md5`, `blake3`
//!   (`sha1` and `md5` only for interoperability, not for security).
//! - `encoding`: `hex` (default, lowercase) or `base64` (standard alphabet, padded).
//!
//! Output: `{ "algorithm": "sha256", "digest": "2cf24d…", "bytes": 5 }` where `bytes` is
//! the length of the hashed input in bytes.
//!
//! Errors (fatal): `data` missing; unknown `algorithm` or `encoding`.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest as _;
use trellis_sdk::{StepContext, TaskError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    data: Value,
    #[serde(default)]
    algorithm: Algorithm,
    #[serde(default)]
    encoding: Encoding,
}

#[derive(Deserialize, Serialize, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Algorithm {
    #[default]
    Sha256,
    Sha384,
    Sha512,
    Sha1,
    Md5,
    Blake3,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    #[default]
    Hex,
    Base64,
}

#[derive(Serialize)]
struct Output {
    algorithm: Algorithm,
    digest: String,
    bytes: usize,
}

#[trellis_sdk::task(
    input_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["data"],
  "additionalProperties": false,
  "properties": {
    "data": { "description": "a string (hashed as UTF-8) or any JSON value (hashed as compact JSON text)" },
    "algorithm": { "enum": ["sha256", "sha384", "sha512", "sha1", "md5", "blake3"], "default": "sha256" },
    "encoding": { "enum": ["hex", "base64"], "default": "hex" }
  }
}"#,
    output_schema = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["algorithm", "digest", "bytes"],
  "properties": {
    "algorithm": { "type": "string" },
    "digest": { "type": "string" },
    "bytes": { "type": "integer", "minimum": 0, "description": "length of the hashed input" }
  }
}"#
)]
fn run(_ctx: &StepContext, input: Value) -> Result<Output, TaskError> {
    let input: Input = trellis_sdk::parse_input(input)?;
    let bytes = match input.data {
        Value::String(text) => text.into_bytes(),
        mut other => {
            // Sorted keys whatever serde_json's features: equal data, equal digest.
            other.sort_all_objects();
            serde_json::to_vec(&other).expect("a JSON value serialises")
        }
    };
    let digest = match input.algorithm {
        Algorithm::Sha256 => sha2::Sha256::digest(&bytes).to_vec(),
        Algorithm::Sha384 => sha2::Sha384::digest(&bytes).to_vec(),
        Algorithm::Sha512 => sha2::Sha512::digest(&bytes).to_vec(),
        Algorithm::Sha1 => sha1::Sha1::digest(&bytes).to_vec(),
        Algorithm::Md5 => md5::Md5::digest(&bytes).to_vec(),
        Algorithm::Blake3 => blake3::hash(&bytes).as_bytes().to_vec(),
    };
    let digest = match input.encoding {
        Encoding::Hex => hex::encode(digest),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(digest),
    };
    Ok(Output {
        algorithm: input.algorithm,
        digest,
        bytes: bytes.len(),
    })
}
