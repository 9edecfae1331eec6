#!/usr/bin/env bash
# Builds the release dp as we ship it: with the functions it runs at start and on its data
# path linked first and together (proxy/symbol-order.txt; benches/symbol_order.py says why:
# about 6 MiB less resident memory per idle dp). A plain `cargo build --release` gives the same
# code in the linker's default order.
#
# Usage: scripts/build-dp.sh [more cargo build arguments, e.g. -p benches --bin loadgen]
#   The binary is $CARGO_TARGET_DIR/release/dp (default target/). After a code change the
#   second step relinks dp (a minute or two on 2 cores); otherwise both are no-ops.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$CARGO_TARGET_DIR/release"
# The same path in both steps (build.rs relinks when the file's content changes); it holds
# this build's symbol names for the functions the list names.
export DP_SYMBOL_ORDER_FILE="$CARGO_TARGET_DIR/release/dp.symbol-order"
[ -e "$DP_SYMBOL_ORDER_FILE" ] || : >"$DP_SYMBOL_ORDER_FILE"
cargo build --release -q -p proxy --bin dp "$@"
python3 benches/symbol_order.py --resolve "$DP_SYMBOL_ORDER_FILE" --dp "$CARGO_TARGET_DIR/release/dp" --brief
cargo build --release -q -p proxy --bin dp "$@"
