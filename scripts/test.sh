#!/usr/bin/env bash
# The project's test command: installs test tools, builds the binaries the end-to-end
# tests start, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mesh-target}"
scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace "$@"
