#!/usr/bin/env bash
# Regenerates proxy/symbol-order.txt: the functions a release dp runs at start and on its
# data path, which scripts/build-dp.sh has lld link first and together
# (benches/symbol_order.py says why and which workloads). Run it when
# `benches/symbol_order.py --check --dp target/release/dp` finds much less than all of the
# list (renamed or new code on the hot path), and commit the file.
#
# Usage: scripts/dp-symbol-order.sh   (a release build of dp, loadgen, cp and ctl; dp under
#        callgrind, about 2 minutes; a relink)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v valgrind >/dev/null; then
  echo "dp-symbol-order: apt-get install valgrind"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
# dp as scripts/build-dp.sh builds it, in its own cargo invocation: built together with cp,
# dp's dependencies get the union of both packages' features, different code, and 4 % of the
# functions profiled there are not in the dp that is deployed.
scripts/build-dp.sh -p benches --bin loadgen
cargo build --release -q -p cp --bin cp --bin ctl
r="$CARGO_TARGET_DIR/release"
python3 benches/symbol_order.py --dp "$r/dp" --loadgen "$r/loadgen" --cp "$r/cp" --ctl "$r/ctl"
scripts/build-dp.sh -p benches --bin loadgen
python3 benches/symbol_order.py --check --dp "$CARGO_TARGET_DIR/release/dp"
