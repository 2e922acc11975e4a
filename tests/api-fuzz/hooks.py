"""schemathesis hooks for tests/api-fuzz/run.sh (SCHEMATHESIS_HOOKS).

schemathesis knows how to send JSON, not the API's other request bodies: a
workflow as TOML text (`PUT /v1/workflows/{name}`) and a WebAssembly
component (`PUT /v1/plugins/{name}`). Both go as the generated value's bytes:
a string as UTF-8, raw bytes as they are, anything else as its JSON text.
"""

import json

import schemathesis


def _bytes(value):
    if isinstance(value, bytes):
        return value
    if hasattr(value, "data") and isinstance(value.data, bytes):  # schemathesis' Binary
        return value.data
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogatepass")
    return json.dumps(value, default=str).encode()


@schemathesis.serializer("application/toml")
def toml(ctx, value):
    return _bytes(value)


@schemathesis.serializer("application/wasm")
def wasm(ctx, value):
    return _bytes(value)
