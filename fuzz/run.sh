#!/usr/bin/env bash
# Builds the fuzz targets and runs each, in one of two modes:
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     random, for a time (the long run)
#   fuzz/run.sh --runs N [--seed S] [TARGET...]      fixed seed and count (CI)
#
# SECONDS_PER_TARGET defaults to 30; `fuzz/run.sh 600` is the long run. Its
# corpus grows in fuzz/corpus/<target> (git-ignored) from run to run, and the
# random seed changes every time: it looks for new inputs, and two runs of the
# same commit may disagree.
#
# `--runs N` has no time in it, so the machine's speed cannot change the
# verdict (fuzz/README.md says what still can vary): every target starts
# from a fresh corpus holding only the committed inputs (fuzz/seeds/<target>
# and fuzz/regressions/<target>), which libFuzzer replays first, then makes
# N inputs (`-runs=N`) from its generator seeded with S (`-seed=S`, default 1).
# Nothing depends on how fast the machine is: no `-max_total_time`.
#
# TARGETs default to all of them: workflow template run_input plugin_loader.
# FUZZ_SANITIZER=address|none (default address) picks cargo fuzz's `-s`;
# FUZZ_CODEGEN_UNITS=16 builds faster (cargo fuzz's default is 1) and runs a
# little slower.
#
# A crash is saved in fuzz/artifacts/<target>/ and makes the script exit 1
# after the other targets ran; see fuzz/README.md for turning one into a
# regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...] | fuzz/run.sh --runs N [--seed S] [TARGET...]" >&2
  exit 2
}
number() { case $1 in '' | *[!0-9]*) usage ;; esac; }

seconds=30
runs=
seed=1
if [ "${1:-}" = --runs ]; then
  runs=${2:-}
  number "$runs"
  shift 2
  if [ "${1:-}" = --seed ]; then
    seed=${2:-}
    number "$seed"
    shift 2
  fi
elif [ $# -gt 0 ]; then
  seconds=$1
  number "$seconds"
  shift
fi
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=(workflow template run_input plugin_loader)
fi
# The same flags for `build` and `run`, or `run` builds again.
flags=(-s "${FUZZ_SANITIZER:-address}")
[ -n "${FUZZ_CODEGEN_UNITS:-}" ] && flags+=(--codegen-units "$FUZZ_CODEGEN_UNITS")

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

# Real components as plugin_loader seeds in longer random runs: the test
# fixtures this checkout built (not committed: build output). Each takes
# seconds to compile under the sanitizer, too long for a 30 s run; the `.wat`
# seeds are small.
if [ -z "$runs" ] && [ "$seconds" -ge 120 ]; then
  mkdir -p fuzz/corpus/plugin_loader
  for wasm in target/plugins-test/noop.wasm target/plugins-test/fail.wasm \
    target/plugins-swap/other-world.wasm; do
    [ -f "$wasm" ] && cp "$wasm" "fuzz/corpus/plugin_loader/seed-$(basename "$wasm")"
  done
fi

failed=()
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "fuzz/artifacts/$target"
  # The first dir is where libFuzzer writes what it finds; the others are
  # only read. The committed inputs are replayed first in both modes.
  if [ -n "$runs" ]; then
    corpus="$logs/corpus-$target"
    mkdir -p "$corpus"
    args=(-seed="$seed" -runs="$runs")
  else
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    args=(-max_total_time="$seconds")
  fi
  dirs=("$corpus" "fuzz/seeds/$target")
  [ -d "fuzz/regressions/$target" ] && dirs+=("fuzz/regressions/$target")
  args+=(-print_final_stats=1 -timeout=30)
  # ASan's leak check reports the engine and caches that live for the whole
  # process; leaks are not what these targets look for.
  args+=(-detect_leaks=0)
  [ -f "fuzz/dicts/$target.dict" ] && args+=(-dict="fuzz/dicts/$target.dict")
  log="$logs/$target.log"
  began=$(date +%s)
  set +e
  "${cargo[@]}" run "${flags[@]}" "$target" "${dirs[@]}" -- "${args[@]}" > "$log" 2>&1
  status=$?
  set -e
  took=$(($(date +%s) - began))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
  inputs=$(grep -o 'seed corpus: files: [0-9]*' "$log" | grep -o '[0-9]*$' | head -1 || true)
  mode=${runs:+, seed $seed}
  if [ "$status" -eq 0 ]; then
    echo "fuzz $target: ${execs:-?} execs in $took s (${inputs:-?} committed inputs replayed$mode), coverage ${cov:-?}, 0 crashes"
  else
    artifact=$(grep -o 'Test unit written to [^ ]*' "$log" | head -1 | sed 's|.* to .*/fuzz/artifacts|fuzz/artifacts|' || true)
    echo "fuzz $target: ${execs:-?} execs in $took s$mode, 1 crash (exit $status): ${artifact:-see the log below}"
    grep -E -A30 'panicked|ERROR: libFuzzer|ERROR: AddressSanitizer' "$log" | head -60 || true
    failed+=("$target")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashes in ${failed[*]} (inputs in fuzz/artifacts/; see fuzz/README.md)" >&2
  exit 1
fi
