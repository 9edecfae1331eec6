#!/usr/bin/env bash
# Sidecar mesh mTLS benchmark (issue 10): dp vs Envoy 1.40 as Kuma sidecars (inbound mTLS
# handshakes per core, request latency through an outbound -> inbound sidecar pair, idle RSS,
# binary size), with dp as it was before mesh TLS moved to BoringSSL (rustls, commit
# $BENCH_BASELINE_REV, default dbd2531) as the baseline, in the same run.
# benches/mtls_bench.py does the measuring (its header says what each figure is); this
# script installs Envoy, builds what it needs, and writes the section into
# benches/RESULTS.md (between the mtls-bench markers, replacing the previous one; scripts/bench.sh
# keeps it) and the raw figures into benches/mtls_results.json.
#
# Usage: scripts/bench-mtls.sh [--quick] [extra benches/mtls_bench.py options, e.g. --runs 3,
#          --key rsa2048, --dp PATH --dp-desc TEXT to measure a dp built elsewhere]
#   full: about 20 minutes of measuring; --quick: about 1 minute.
#   BENCH_SKIP_BUILD=1 uses the dp and loadgen already in $CARGO_TARGET_DIR/release.
#   The baseline is built once (release, in a temporary git worktree, into
#   $BENCH_BASELINE_TARGET, default /tmp/dp-rustls-target; both are removed afterwards, unless
#   BENCH_KEEP_BASELINE_TARGET=1) and only its binary is kept, as $BENCH_BASELINE_DP (default
#   /tmp/dp-rustls-<rev>/dp): the first run takes 10-20 minutes longer on 2 cores.
#   BENCH_BASELINE_REV=none skips it.
#
# Sidecars are pinned to CPU 0, the load client and the echo app to CPU 1, all under
# SCHED_FIFO priority 1 (chrt) when allowed; BENCH_SCHED=other runs them normally.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
args=()
for a in "$@"; do args+=("$a"); done

scripts/bench-setup.sh
envoy="$(scripts/bench-envoy-path.sh)"
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  echo "bench-mtls: building dp and loadgen (release)"
  scripts/build-dp.sh -p benches --bin loadgen
fi
bin="$CARGO_TARGET_DIR/release"
[ "$(nproc)" -ge 2 ] || { echo "bench-mtls: needs at least 2 CPUs" >&2; exit 1; }

# The rustls baseline: dp at the last commit before the BoringSSL switch. Built once in a
# temporary worktree into a temporary target directory; only the binary is kept (the target
# directory is a few GB and is removed, the disk here is small).
rev="${BENCH_BASELINE_REV:-dbd2531}"
baseline=()
if [ "$rev" != none ]; then
  full="$(git rev-parse "$rev^{commit}")"
  short="$(git rev-parse --short "$full")"
  bdp="${BENCH_BASELINE_DP:-/tmp/dp-rustls-$short/dp}"
  if [ ! -x "$bdp" ]; then
    btarget="${BENCH_BASELINE_TARGET:-/tmp/dp-rustls-target}"
    wt="$(mktemp -d)/dp-baseline"
    echo "bench-mtls: building the baseline dp at $short (release, worktree $wt, target $btarget)"
    cleanup_baseline() {
      git -C "$root" worktree remove --force "$wt" 2>/dev/null || true
      [ -n "${BENCH_KEEP_BASELINE_TARGET:-}" ] || rm -rf "$btarget"
    }
    trap cleanup_baseline EXIT
    git worktree add -q --detach "$wt" "$full"
    (cd "$wt" && CARGO_TARGET_DIR="$btarget" cargo build --release -q -p proxy --bin dp)
    mkdir -p "$(dirname "$bdp")"
    cp "$btarget/release/dp" "$bdp.tmp" && mv "$bdp.tmp" "$bdp"
    cleanup_baseline
    trap - EXIT
  fi
  baseline=(--dp-rustls "$bdp" --rustls-desc "$short (rustls 0.23, release)")
fi

sched=()
if [ "${BENCH_SCHED:-fifo}" = fifo ] && chrt -f 1 true 2>/dev/null; then
  sched=(chrt -f 1)
fi
# How much of the link order (proxy/symbol-order.txt) this build matched: a stale file
# shows here as a low share, and as a larger idle RSS.
order="$(python3 benches/symbol_order.py --check --dp "$bin/dp" --brief)"
desc="$(git rev-parse --short HEAD)$(git diff --quiet -- proxy Cargo.lock Cargo.toml 2>/dev/null || echo ' (+ uncommitted changes)') (BoringSSL, release; $order)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"${sched[@]}" taskset -c 1 python3 benches/mtls_bench.py --dp "$bin/dp" --dp-desc "$desc" "${baseline[@]}" \
  --envoy "$envoy" --loadgen "$bin/loadgen" --out-md "$work/mtls.md" --json "$root/benches/mtls_results.json" \
  "${args[@]}" >/dev/null

# The analysis of the last figures (hand-written, dated) follows the generated tables.
if [ -f benches/mtls_analysis.md ]; then
  { echo; cat benches/mtls_analysis.md; } >>"$work/mtls.md"
fi

# Replace the section in RESULTS.md (or append it).
results="$root/benches/RESULTS.md"
python3 - "$results" "$work/mtls.md" <<'EOF'
import re, sys
path, new = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
block = f"<!-- mtls-bench:start -->\n{new}\n<!-- mtls-bench:end -->"
try:
    text = open(path).read()
except FileNotFoundError:
    text = "# Benchmark results\n"
pat = re.compile(r"<!-- mtls-bench:start -->.*?<!-- mtls-bench:end -->", re.S)
text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
open(path, "w").write(text)
EOF
echo "bench-mtls: wrote the sidecar mTLS section of benches/RESULTS.md"
