#!/usr/bin/env bash
# Store benchmark (issue 15): cp's REST write throughput and change-to-ACK latency,
# PostgreSQL against memory, at 10,000 Dataplanes (--quick: 1,000). Builds cp and dp in
# release, runs benches/store_bench.py (a throwaway PostgreSQL from Debian's package; run
# scripts/setup.sh first), and puts its section into benches/RESULTS.md between the
# `store-bench` markers (replacing the previous one, or appended); raw figures in
# benches/store_results.json. About 70 s of measuring on 2 CPUs (--quick: about 16 s), plus the build.
#
# Usage: scripts/bench-store.sh [--quick] [store_bench.py options]
#   BENCH_SKIP_BUILD=1 uses the binaries already in $CARGO_TARGET_DIR/release.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  echo "bench-store: building cp and dp (release)"
  scripts/build-dp.sh -p cp --bin cp
fi
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 benches/store_bench.py --cp "$bin/cp" --dp "$bin/dp" --out-md "$work/store.md" \
  --json benches/store_results.json "$@" >/dev/null
results=benches/RESULTS.md
touch "$results"
if grep -q '^<!-- store-bench:start -->$' "$results"; then
  # Replace the previous section in place.
  awk -v new="$work/store.md" '
    /^<!-- store-bench:start -->$/ { while ((getline l < new) > 0) print l; skip = 1; next }
    /^<!-- store-bench:end -->$/ { skip = 0; next }
    !skip { print }
  ' "$results" >"$work/results.md"
  cp "$work/results.md" "$results"
else
  { echo; cat "$work/store.md"; } >>"$results"
fi
echo "bench-store: wrote its section of $results"
