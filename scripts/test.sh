#!/usr/bin/env bash
# The project's test command: installs test tools, builds the binaries the end-to-end
# tests start, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each checkout builds into its own target/ unless CARGO_TARGET_DIR says otherwise: a
# shared cache would hand one checkout test binaries built in another (their
# CARGO_MANIFEST_DIR, and so the testdata paths they read, are compiled in).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace "$@"
