#!/usr/bin/env bash
# Builds every C plugin under plugins/ (a folder holding `plugin.c`) into
# $TRELLIS_POLYGLOT_OUT/<folder>.wasm, for the world `trellis:plugin/task` in
# wit/. Every `*.c` file of the folder is compiled, with the folder and the
# generated bindings (`task.h`) on the include path.
#
# The steps (docs/plugins.md, section C explains them):
#   1. C bindings for the world: task.h, task.c, task_component_type.o
#      (`trellis-c-toolchain bindings`, the generator of `wit-bindgen c`);
#   2. clang-14 --target=wasm32-wasi -mexec-model=reactor: a core module
#      (Debian's clang, wasm-ld and wasi-libc);
#   3. `trellis-c-toolchain component`: the core module becomes a component,
#      its wasi_snapshot_preview1 imports adapted to WASI 0.2 by wasmtime 48's
#      reactor adapter (what `wasm-tools component new --adapt` does).
#
# On first use it installs what is missing: the Debian packages below (with
# apt-get when running as root; otherwise it names them and stops), and
# trellis-c-toolchain, a workspace crate (plugins/tools/c-toolchain) built with
# cargo into $TRELLIS_TOOLS. A plugin is rebuilt only when its output is older
# than one of its files, wit/, the tool's sources or this script. Normally
# called by plugins/build.sh, which sets the variables below; runs on its own.
#
#   plugins/build-c.sh             # every C plugin
#   plugins/build-c.sh checksum    # only these folders
set -euo pipefail

# Debian 12 (bookworm) packages: the compiler, the wasm linker, the C library
# for wasm32-wasi and the compiler's runtime builtins for wasm32.
APT_PACKAGES=(clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32)
# Elsewhere, name a clang that targets wasm32-wasi with its sysroot (e.g.
# wasi-sdk's bin/clang) in TRELLIS_C_CLANG: the packages are then not checked.
CLANG="${TRELLIS_C_CLANG:-clang-14}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${TRELLIS_ROOT:-$(dirname "$here")}"
out="${TRELLIS_POLYGLOT_OUT:-$root/target/plugins-polyglot}"
tools="${TRELLIS_TOOLS:-$root/target/tools}"
wit="$root/wit"
crate="$here/tools/c-toolchain"
tool_target="$tools/c-toolchain"
tool="$tool_target/debug/trellis-c-toolchain"
build="$root/target/build-c"

fail() {
    echo "plugins/build-c.sh: $*" >&2
    exit 1
}

# The C plugin folders: given on the command line, else every plugins/*/
# with a plugin.c.
dirs=()
if [ $# -gt 0 ]; then
    for name in "$@"; do
        [ -f "$here/$name/plugin.c" ] || fail "no C plugin '$name' (expected $here/$name/plugin.c)"
        dirs+=("$here/$name")
    done
else
    for source in "$here"/*/plugin.c; do
        [ -f "$source" ] && dirs+=("$(dirname "$source")")
    done
fi
if [ ${#dirs[@]} -eq 0 ]; then
    echo "c: no plugins (no plugins/*/plugin.c)"
    exit 0
fi

# Which plugins are out of date: skip the tool install when none is.
stale=()
for dir in "${dirs[@]}"; do
    wasm="$out/$(basename "$dir").wasm"
    if [ ! -f "$wasm" ] ||
        [ -n "$(find "$dir" "$wit" "$crate/src" "$crate/Cargo.toml" "${BASH_SOURCE[0]}" \
            -type f -newer "$wasm" -print -quit)" ]; then
        stale+=("$dir")
    fi
done
if [ ${#stale[@]} -eq 0 ]; then
    echo "c: ${#dirs[@]} plugin(s) up to date in $out"
    exit 0
fi

# The Debian packages, installed once.
missing=()
if [ -z "${TRELLIS_C_CLANG:-}" ]; then
    for package in "${APT_PACKAGES[@]}"; do
        if [ "$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null)" != installed ]; then
            missing+=("$package")
        fi
    done
fi
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null ||
        fail "needs the Debian 12 packages ${APT_PACKAGES[*]}, and apt-get is not here: or set TRELLIS_C_CLANG to a clang for wasm32-wasi with its sysroot (e.g. wasi-sdk's bin/clang)"
    [ "$(id -u)" -eq 0 ] ||
        fail "missing Debian packages; install them, then build again: sudo apt-get install ${missing[*]}"
    echo "c: installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    log="$tools/apt-get-c.log"
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
        # A fresh image has no package lists yet.
        { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } >"$log" 2>&1 || {
            cat "$log" >&2
            fail "apt-get install ${missing[*]} failed (see above)"
        }
    fi
fi
command -v "$CLANG" >/dev/null || fail "$CLANG not found"

# trellis-c-toolchain: cargo builds it once and rebuilds it only when its
# sources or Cargo.lock change (a second of checking otherwise). Its own target
# dir: no waiting on the lock of a `cargo build` or `cargo test` in progress.
command -v "${CARGO:-cargo}" >/dev/null || fail "cargo not found: install Rust (https://rustup.rs)"
if [ ! -x "$tool" ]; then
    echo "c: building trellis-c-toolchain (plugins/tools/c-toolchain) into $tool_target"
fi
(cd "$root" && env -u CARGO_BUILD_TARGET -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET_DIR \
    "${CARGO:-cargo}" build --quiet -p trellis-c-toolchain --target-dir "$tool_target") ||
    fail "cargo could not build trellis-c-toolchain (see above)"

# The bindings depend on wit/ only: generated once for every plugin.
bindings="$build/bindings"
"$tool" bindings "$wit" --world task --out-dir "$bindings" ||
    fail "generating the C bindings for wit/ failed"

mkdir -p "$out"
for dir in "${stale[@]}"; do
    name="$(basename "$dir")"
    wasm="$out/$name.wasm"
    core="$build/$name.core.wasm"
    echo "c: building $name"
    start=$(date +%s)
    sources=("$dir"/*.c)
    # -mexec-model=reactor: a library whose exports the host calls, not a
    # main(); wasi-libc's constructors run from `_initialize` first.
    # -s: no names or debug info in the shipped component.
    if ! "$CLANG" --target=wasm32-wasi -mexec-model=reactor -O2 -std=c11 \
        -Wall -Wextra -Wno-unused-parameter \
        -I "$dir" -I "$bindings" \
        -o "$core" "${sources[@]}" "$bindings/task.c" "$bindings/task_component_type.o" \
        -s; then
        fail "clang failed for $dir (see above)"
    fi
    # Build next to the output, then rename: a half-written file is never loaded.
    rm -f "$wasm.tmp"
    if ! "$tool" component "$core" -o "$wasm.tmp"; then
        rm -f "$wasm.tmp"
        fail "making a component of $core failed (see above)"
    fi
    mv "$wasm.tmp" "$wasm"
    echo "c: built $wasm ($(($(stat -c %s "$wasm") / 1024)) KiB, $(($(date +%s) - start)) s)"
done
