#!/usr/bin/env bash
# Installs what the web UI's browser test (tests/tests/gui.rs) needs on a fresh Debian
# machine: Debian's Chromium at /usr/bin/chromium and the npm packages of tests/gui
# (playwright-core, which drives that Chromium; it downloads no browser of its own).
# Node.js and npm come from Debian when the machine has none. Idempotent: does nothing when both are
# already there and tests/gui/node_modules matches package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v npm >/dev/null || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup-gui: installing ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${need[@]}" >/dev/null
fi
# npm writes node_modules/.package-lock.json on every install: older than the lock (or
# absent) means node_modules is stale.
stamp=tests/gui/node_modules/.package-lock.json
if [ ! -f "$stamp" ] || [ tests/gui/package-lock.json -nt "$stamp" ]; then
  echo "setup-gui: npm ci in tests/gui"
  (cd tests/gui && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
fi
