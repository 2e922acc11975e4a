#!/usr/bin/env bash
# Builds every Python plugin under plugins/ (a folder holding `app.py`) into
# $TRELLIS_POLYGLOT_OUT/<folder>.wasm with componentize-py, for the world
# `trellis:plugin/task` in wit/.
#
# On first use it installs componentize-py (version pinned below) from PyPI
# into a venv under $TRELLIS_TOOLS. A plugin is rebuilt only when its output is
# older than one of its files, wit/ or this script. Normally called by
# plugins/build.sh, which sets the variables below; runs on its own too.
#
#   plugins/build-python.sh            # every Python plugin
#   plugins/build-python.sh csv-parse  # only these folders
set -euo pipefail

COMPONENTIZE_PY_VERSION=0.25.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${TRELLIS_ROOT:-$(dirname "$here")}"
out="${TRELLIS_POLYGLOT_OUT:-$root/target/plugins-polyglot}"
tools="${TRELLIS_TOOLS:-$root/target/tools}"
wit="$root/wit"
venv="$tools/componentize-py-$COMPONENTIZE_PY_VERSION"
tool="$venv/bin/componentize-py"

fail() {
    echo "plugins/build-python.sh: $*" >&2
    exit 1
}

# The Python plugin folders: given on the command line, else every
# plugins/*/ with an app.py.
dirs=()
if [ $# -gt 0 ]; then
    for name in "$@"; do
        [ -f "$here/$name/app.py" ] || fail "no Python plugin '$name' (expected $here/$name/app.py)"
        dirs+=("$here/$name")
    done
else
    for app in "$here"/*/app.py; do
        [ -f "$app" ] && dirs+=("$(dirname "$app")")
    done
fi
if [ ${#dirs[@]} -eq 0 ]; then
    echo "python: no plugins (no plugins/*/app.py)"
    exit 0
fi

# One build at a time per tools dir (tests and a user may start one together); the
# second one then finds the plugins up to date.
mkdir -p "$tools"
if command -v flock >/dev/null; then
    exec 9>"$tools/.build-python.lock"
    flock 9
fi

# Which plugins are out of date: skip the tool install when none is.
stale=()
for dir in "${dirs[@]}"; do
    wasm="$out/$(basename "$dir").wasm"
    if [ ! -f "$wasm" ] ||
        [ -n "$(find "$dir" "$wit" "${BASH_SOURCE[0]}" -type f -newer "$wasm" \
            -not -path '*/__pycache__/*' -print -quit)" ]; then
        stale+=("$dir")
    fi
done
if [ ${#stale[@]} -eq 0 ]; then
    echo "python: ${#dirs[@]} plugin(s) up to date in $out"
    exit 0
fi

# componentize-py in its own venv, installed once. The marker is written last,
# so an interrupted install is redone.
if [ ! -f "$venv/.installed" ]; then
    command -v python3 >/dev/null ||
        fail "python3 not found: install Python 3.10 or newer with the venv module (Debian: apt-get install python3 python3-venv)"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        fail "python3 is $(python3 --version 2>&1); componentize-py needs 3.10 or newer"
    echo "python: installing componentize-py $COMPONENTIZE_PY_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" ||
        fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "componentize-py==$COMPONENTIZE_PY_VERSION" ||
        fail "pip could not install componentize-py==$COMPONENTIZE_PY_VERSION from PyPI"
    touch "$venv/.installed"
fi

mkdir -p "$out"
for dir in "${stale[@]}"; do
    name="$(basename "$dir")"
    wasm="$out/$name.wasm"
    echo "python: building $name"
    start=$(date +%s)
    # Build next to the output, then rename: a half-written file is never loaded.
    # PYTHONDONTWRITEBYTECODE keeps __pycache__ out of the source folder.
    # VIRTUAL_ENV: look for packages in the tool's venv only, not in the
    # system's site-packages (plugins use the standard library).
    if ! VIRTUAL_ENV="$venv" PYTHONDONTWRITEBYTECODE=1 "$tool" --quiet -d "$wit" -w task \
        componentize app -p "$dir" -o "$wasm.$$.tmp"; then
        rm -f "$wasm.$$.tmp"
        fail "componentize-py failed for $dir (see above)"
    fi
    mv "$wasm.$$.tmp" "$wasm"
    echo "python: built $wasm ($(($(stat -c %s "$wasm") / 1024)) KiB, $(($(date +%s) - start)) s)"
done
