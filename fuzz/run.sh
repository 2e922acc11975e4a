#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# SECONDS_PER_TARGET defaults to 30 (CI); `fuzz/run.sh 600` is the longer run.
# TARGETs default to all of them: workflow template run_input plugin_loader.
# FUZZ_SANITIZER=address|none (default address) picks cargo fuzz's `-s`;
# FUZZ_CODEGEN_UNITS=16 builds faster (cargo fuzz's default is 1) and runs a
# little slower.
#
# The corpus each run grows stays in fuzz/corpus/<target> (git-ignored) and is
# the starting point of the next run, with the committed seeds in
# fuzz/seeds/<target>. A crash is saved in fuzz/artifacts/<target>/ and makes
# the script exit 1 after the other targets ran; see fuzz/README.md for turning
# one into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
shift || true
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=(workflow template run_input plugin_loader)
fi
# The same flags for `build` and `run`, or `run` builds again.
flags=(-s "${FUZZ_SANITIZER:-address}")
[ -n "${FUZZ_CODEGEN_UNITS:-}" ] && flags+=(--codegen-units "$FUZZ_CODEGEN_UNITS")
case $seconds in '' | *[!0-9]*) echo "usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;; esac

command -v cargo-fuzz > /dev/null || cargo install cargo-fuzz --locked

# cargo fuzz needs nightly rustc flags (-Zsanitizer, sancov passes). Without a
# nightly toolchain, stable with RUSTC_BOOTSTRAP=1 accepts them.
if rustup toolchain list 2> /dev/null | grep -q '^nightly'; then
  cargo=(cargo +nightly fuzz)
else
  echo "fuzz: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
  cargo=(cargo fuzz)
fi
# The host's build script would build the example plugins with this
# toolchain into the main target dir; the fuzz targets do not need them.
export TRELLIS_SKIP_PLUGIN_BUILD=1

started=$(date +%s)
"${cargo[@]}" build "${flags[@]}"
echo "fuzz: built in $(($(date +%s) - started)) s"

# Real components as plugin_loader seeds in longer runs: the test fixtures this
# checkout built (not committed: build output). Each takes seconds to compile
# under the sanitizer, too long for a 30 s run; the `.wat` seeds are small.
if [ "$seconds" -ge 120 ]; then
  mkdir -p fuzz/corpus/plugin_loader
  for wasm in target/plugins-test/noop.wasm target/plugins-test/fail.wasm \
    target/plugins-swap/other-world.wasm; do
    [ -f "$wasm" ] && cp "$wasm" "fuzz/corpus/plugin_loader/seed-$(basename "$wasm")"
  done
fi

failed=()
logs=$(mktemp -d)
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=30)
  # ASan's leak check reports the engine and caches that live for the whole
  # process; leaks are not what these targets look for.
  args+=(-detect_leaks=0)
  [ -f "fuzz/dicts/$target.dict" ] && args+=(-dict="fuzz/dicts/$target.dict")
  log="$logs/$target.log"
  set +e
  "${cargo[@]}" run "${flags[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- "${args[@]}" > "$log" 2>&1
  status=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o '[0-9]*' | tail -1 || true)
  if [ "$status" -eq 0 ]; then
    echo "fuzz $target: ${execs:-?} execs in ${took:-?} s, 0 crashes"
  else
    artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | head -1 | sed 's|.* to .*/fuzz/artifacts|fuzz/artifacts|' || true)
    echo "fuzz $target: ${execs:-?} execs, 1 crash (exit $status): ${artifact:-see the log below}"
    grep -E -A30 'panicked|ERROR: libFuzzer|ERROR: AddressSanitizer' "$log" | head -60 || true
    failed+=("$target")
  fi
done
rm -rf "$logs"

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]} (inputs in fuzz/artifacts/; see fuzz/README.md)" >&2
  exit 1
fi
