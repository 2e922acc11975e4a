#!/usr/bin/env bash
# API fuzzing: schemathesis (pinned in requirements.txt beside this file)
# generates requests from the OpenAPI document of a live `trellis serve` and
# checks every answer: no 5xx, status code, content type, headers and body as
# documented. Then the server must still be alive.
#
#   tests/api-fuzz/run.sh                 # 200 test cases per operation and phase at most
#   FUZZ_EXAMPLES=1000 tests/api-fuzz/run.sh
#   FUZZ_SEED=1234 tests/api-fuzz/run.sh  # replay a run (schemathesis prints its seed)
#   FUZZ_KEEP=1 tests/api-fuzz/run.sh     # keep the server's log, data and the report
#
# Environment: TRELLIS (the binary; default target/debug/trellis, build it
# first), FUZZ_EXAMPLES, FUZZ_SEED, FUZZ_WORKERS (default 2), FUZZ_KEEP,
# FUZZ_CACHE (compiled plugins; default target/api-fuzz/cache), PYTHON (for
# the venv; default python3), TRELLIS_TOOLS (where the venv goes; default
# target/tools). Extra arguments go to `schemathesis run` (e.g.
# --include-path-regex runs).
#
# The server runs on a throwaway data dir with copies of the example plugins
# and workflows: uploads (`PUT`) write into the first plugin and workflow dir
# and `DELETE /v1/plugins/{name}` removes the plugin's file, so the fuzzer must
# not get the repository's own. Exit status: 0 when every check passed and the
# server survived, 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
trellis="${TRELLIS:-$root/target/debug/trellis}"
examples="${FUZZ_EXAMPLES:-200}"
workers="${FUZZ_WORKERS:-2}"
tools="${TRELLIS_TOOLS:-$root/target/tools}"
venv="$tools/schemathesis"
requirements="$here/requirements.txt"

fail() {
    echo "tests/api-fuzz/run.sh: $*" >&2
    exit 1
}

[ -x "$trellis" ] || fail "no trellis binary at $trellis (cargo build -p trellis, or set TRELLIS)"
command -v curl >/dev/null || fail "curl not found"

# The venv's Python: $PYTHON, else python3.
python="${PYTHON:-python3}"
command -v "$python" >/dev/null ||
    fail "$python not found: install Python 3.10 or newer with the venv module (Debian: apt-get install python3 python3-venv)"

# schemathesis in its own venv, installed again when requirements.txt or the
# Python changes (the marker holds both and is written last).
stamp="$(sha256sum "$requirements" | cut -d' ' -f1) $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$stamp" ]; then
    echo "--- installing schemathesis into $venv ($python)"
    rm -rf "$venv"
    "$python" -m venv "$venv" || fail "$python -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes \
        -r "$requirements" || fail "pip could not install $requirements from PyPI"
    echo "$stamp" > "$venv/.installed"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/trellis-api-fuzz.XXXXXX")"
server=""
cleanup() {
    if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
    fi
    if [ "${FUZZ_KEEP:-}" = 1 ]; then
        echo "kept $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# Copies of the example plugins and workflows (see above).
plugin_args=()
for dir in "$root/target/plugins" "$root/target/plugins-polyglot"; do
    if compgen -G "$dir/*.wasm" >/dev/null; then
        mkdir -p "$work/$(basename "$dir")"
        cp "$dir"/*.wasm "$work/$(basename "$dir")/"
        plugin_args+=(--plugin-dir "$work/$(basename "$dir")")
    else
        echo "warning: no plugins in $dir (cargo build; plugins/build.sh): workflows that use them refuse runs" >&2
    fi
done
mkdir -p "$work/workflows"
cp "$root"/workflows/*.toml "$work/workflows/"
: > "$work/trellis.toml" # not a trellis.toml of the current dir
# The compiled-code cache outlives the data dir (it is keyed by the plugin's
# digest and the engine build): only the first run compiles the plugins.
cache="${FUZZ_CACHE:-$root/target/api-fuzz/cache}"
mkdir -p "$cache" "$work/data"
ln -s "$cache" "$work/data/cache"

# Real components for some of the uploads (see hooks.py): a new plugin, two
# versions of one, and a build that is already loaded. Named by their info().
: > "$work/uploads.tsv"
for file in "$root/target/plugins-test/noop.wasm" "$root/target/plugins-swap/versioned-v1.wasm" \
    "$root/target/plugins-swap/versioned-v2.wasm" "$work/plugins/hash.wasm"; do
    [ -f "$file" ] || continue
    name="$("$trellis" plugins inspect "$file" 2>/dev/null | sed -n 's/^  "name": "\(.*\)",$/\1/p')"
    [ -n "$name" ] && printf '%s\t%s\n' "$name" "$file" >> "$work/uploads.tsv"
done

token="fuzz-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
echo "--- starting $trellis serve (the first start compiles the plugins)"
TRELLIS_AUTH_TOKEN="$token" "$trellis" serve --config "$work/trellis.toml" \
    --bind 127.0.0.1:0 --data-dir "$work/data" --workflow-dir "$work/workflows" \
    "${plugin_args[@]}" 2> "$work/serve.log" &
server=$!

# `listening on http://ADDR` comes once the plugins are compiled.
address=""
for _ in $(seq 3000); do
    address="$(sed -n 's|^listening on http://\([^ ]*\)$|\1|p' "$work/serve.log" | head -1)"
    [ -n "$address" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; fail "serve exited before listening"; }
    sleep 0.2
done
[ -n "$address" ] || { cat "$work/serve.log"; fail "serve did not listen within 10 minutes"; }
base="http://$address"
for _ in $(seq 100); do
    curl -sf "$base/healthz" > /dev/null && break
    sleep 0.1
done
curl -sf "$base/healthz" > /dev/null || { cat "$work/serve.log"; fail "$base/healthz does not answer"; }
echo "serving on $base"

# A few real runs first, so that listing runs returns real records.
auth=(-H "Authorization: Bearer $token")
for workflow in order-pipeline word-stats; do
    curl -s -o /dev/null "${auth[@]}" -X POST -H 'Content-Type: application/json' -d '{}' \
        "$base/v1/workflows/$workflow/runs?wait=30s" || true
done

seed_args=()
[ -n "${FUZZ_SEED:-}" ] && seed_args=(--seed "$FUZZ_SEED")

echo "--- schemathesis: $examples examples per operation, checks: all"
status=0
start=$(date +%s)
PYTHONPATH="$here" SCHEMATHESIS_HOOKS=hooks FUZZ_UPLOADS="$work/uploads.tsv" \
    "$venv/bin/schemathesis" --config-file "$here/schemathesis.toml" run "$base/v1/openapi.json" \
    --header "Authorization: Bearer $token" \
    --checks all \
    --max-examples "$examples" \
    --workers "$workers" \
    --request-timeout 60 \
    --report ndjson --report-dir "$work/report" \
    "${seed_args[@]}" "$@" || status=$?
elapsed=$(($(date +%s) - start))

echo "--- what was tried (unique test cases per phase, API calls, statuses)"
"$venv/bin/python" "$here/summary.py" "$work"/report/ndjson-*.ndjson || status=1

# The server must have survived, without a panic (a handler's panic is a 500
# that the checks see too; one elsewhere might not be).
sed 's/\x1b\[[0-9;]*m//g' "$work/serve.log" > "$work/serve.txt"
if ! kill -0 "$server" 2>/dev/null; then
    echo "FAIL: the server died during the fuzzing"
    tail -50 "$work/serve.txt"
    status=1
elif grep -q "^thread '.*' panicked at" "$work/serve.txt"; then
    echo "FAIL: the server panicked"
    grep -A5 "^thread '.*' panicked at" "$work/serve.txt" | head -50
    status=1
else
    echo "the server is still up (pid $server)"
fi
if grep -q ' ERROR ' "$work/serve.txt"; then
    echo "--- errors in the server log:"
    grep ' ERROR ' "$work/serve.txt" | head -20
fi
if [ "$status" = 0 ]; then
    echo "API fuzzing passed in ${elapsed}s"
else
    echo "API fuzzing FAILED (exit status $status; FUZZ_SEED=<the seed above> replays it)"
fi
exit "$status"
