#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a short while (default 20 s each)
# on the stable toolchain, starting from its corpus fuzz/corpus/<target>.
# Exits non-zero if a target crashes (the input is saved in
# fuzz/artifacts/<target>/; reproduce with
#   cd fuzz && cargo fuzz run -s none <target> artifacts/<target>/<file>).
#
# Usage: scripts/fuzz-smoke.sh [SECONDS]
# The fuzz build uses its own target dir, $MESH_FUZZ_TARGET_DIR, by default
# fuzz/target in this checkout (instrumented builds must not share the
# workspace's target dir).
set -euo pipefail

seconds="${1:-20}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${MESH_FUZZ_TARGET_DIR:-$root/fuzz/target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

cd "$root/fuzz"
mapfile -t targets < <(cargo fuzz list)
if ((${#targets[@]} == 0)); then
    echo "fuzz-smoke: no fuzz targets found" >&2
    exit 1
fi

for target in "${targets[@]}"; do
    corpus="$root/fuzz/corpus/$target"
    mkdir -p "$corpus"
    echo "fuzz-smoke: $target for ${seconds}s (corpus: $(find "$corpus" -type f | wc -l) files)"
    cargo fuzz run -s none "$target" "$corpus" -- -max_total_time="$seconds"
done
echo "fuzz-smoke: ${#targets[@]} target(s) ran ${seconds}s each without a crash"
