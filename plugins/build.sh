#!/usr/bin/env bash
# Builds the example plugins written in Python, JavaScript and C into
# target/plugins-polyglot/ (the Rust plugins are built by `cargo build`).
#
# Each language has its own script, plugins/build-<lang>.sh, which installs the
# pinned tools it needs into target/tools/ on first use and rebuilds a plugin
# only when its sources (or wit/) changed. Usage: plugins/build.sh [LANG...]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
export TRELLIS_ROOT="$root"
export TRELLIS_POLYGLOT_OUT="${TRELLIS_POLYGLOT_OUT:-$root/target/plugins-polyglot}"
export TRELLIS_TOOLS="${TRELLIS_TOOLS:-$root/target/tools}"
mkdir -p "$TRELLIS_POLYGLOT_OUT" "$TRELLIS_TOOLS"

langs=("$@")
if [ ${#langs[@]} -eq 0 ]; then
    langs=(python js c)
fi
for lang in "${langs[@]}"; do
    script="$here/build-$lang.sh"
    if [ ! -f "$script" ]; then
        echo "plugins/build.sh: no build script for language '$lang' ($script)" >&2
        exit 2
    fi
    bash "$script"
done
