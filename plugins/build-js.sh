#!/usr/bin/env bash
# Builds every JavaScript plugin under plugins/ (a folder holding `plugin.js`)
# into $TRELLIS_POLYGLOT_OUT/<folder>.wasm with componentize-js, for the world
# `trellis:plugin/task` in wit/.
#
# On first use it installs componentize-js, pinned by plugins/tools/js/
# package.json and package-lock.json, from npm into $TRELLIS_TOOLS (`npm ci`).
# A plugin is rebuilt only when its output is older than one of its files, wit/,
# the pinned tool or this script. Normally called by plugins/build.sh, which
# sets the variables below; runs on its own too.
#
#   plugins/build-js.sh            # every JavaScript plugin
#   plugins/build-js.sh slugify    # only these folders
#
# The build turns off componentize-js's `http` and `fetch-event` features: no
# fetch(), so the component imports no wasi:http (which would otherwise be
# linked into every JavaScript plugin, used or not); stdio, clocks and random
# stay (console.log goes to the step log).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${TRELLIS_ROOT:-$(dirname "$here")}"
out="${TRELLIS_POLYGLOT_OUT:-$root/target/plugins-polyglot}"
tools="${TRELLIS_TOOLS:-$root/target/tools}"
wit="$root/wit"
pins="$here/tools/js"
prefix="$tools/componentize-js"
tool="$prefix/node_modules/.bin/componentize-js"

fail() {
    echo "plugins/build-js.sh: $*" >&2
    exit 1
}

# The JavaScript plugin folders: given on the command line, else every
# plugins/*/ with a plugin.js.
dirs=()
if [ $# -gt 0 ]; then
    for name in "$@"; do
        [ -f "$here/$name/plugin.js" ] || fail "no JavaScript plugin '$name' (expected $here/$name/plugin.js)"
        dirs+=("$here/$name")
    done
else
    for source in "$here"/*/plugin.js; do
        [ -f "$source" ] && dirs+=("$(dirname "$source")")
    done
fi
if [ ${#dirs[@]} -eq 0 ]; then
    echo "js: no plugins (no plugins/*/plugin.js)"
    exit 0
fi

# One build at a time per tools dir (tests and a user may start one together); the
# second one then finds the plugins up to date.
mkdir -p "$tools"
if command -v flock >/dev/null; then
    exec 9>"$tools/.build-js.lock"
    flock 9
fi

# Which plugins are out of date: skip the tool install when none is.
stale=()
for dir in "${dirs[@]}"; do
    wasm="$out/$(basename "$dir").wasm"
    if [ ! -f "$wasm" ] ||
        [ -n "$(find "$dir" "$wit" "$pins" "${BASH_SOURCE[0]}" -type f -newer "$wasm" -print -quit)" ]; then
        stale+=("$dir")
    fi
done
if [ ${#stale[@]} -eq 0 ]; then
    echo "js: ${#dirs[@]} plugin(s) up to date in $out"
    exit 0
fi

# componentize-js exactly as the lock file pins it, installed once and again
# whenever the lock file changes. `.pinned-lock.json` (a copy of the lock file)
# is written last, so an interrupted install is redone.
if ! cmp -s "$pins/package-lock.json" "$prefix/.pinned-lock.json" || [ ! -x "$tool" ]; then
    command -v node >/dev/null ||
        fail "node not found: install Node.js 18 or newer with npm (Debian: apt-get install nodejs npm)"
    command -v npm >/dev/null ||
        fail "npm not found: install npm (Debian: apt-get install npm)"
    major="$(node -p 'process.versions.node.split(".")[0]')"
    [ "$major" -ge 18 ] ||
        fail "node is $(node --version); componentize-js needs Node.js 18 or newer"
    echo "js: installing componentize-js (plugins/tools/js/package-lock.json) into $prefix"
    rm -rf "$prefix"
    mkdir -p "$prefix"
    cp "$pins/package.json" "$pins/package-lock.json" "$prefix/"
    npm ci --prefix "$prefix" --no-audit --no-fund --loglevel=error >&2 ||
        fail "npm ci could not install componentize-js from the npm registry"
    [ -x "$tool" ] || fail "npm ci did not install $tool"
    cp "$pins/package-lock.json" "$prefix/.pinned-lock.json"
fi

mkdir -p "$out"
for dir in "${stale[@]}"; do
    name="$(basename "$dir")"
    wasm="$out/$name.wasm"
    echo "js: building $name"
    start=$(date +%s)
    # Build next to the output, then rename: a half-written file is never loaded.
    if ! "$tool" "$dir/plugin.js" --wit "$wit" --world-name task \
        --disable http fetch-event --out "$wasm.$$.tmp" >&2; then
        rm -f "$wasm.$$.tmp"
        fail "componentize-js failed for $dir (see above)"
    fi
    mv "$wasm.$$.tmp" "$wasm"
    echo "js: built $wasm ($(($(stat -c %s "$wasm") / 1024)) KiB, $(($(date +%s) - start)) s)"
done
