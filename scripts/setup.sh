#!/usr/bin/env bash
# Installs what the tests use beyond cargo, on a fresh Debian machine. Idempotent.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v dig >/dev/null || need+=(dnsutils)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq "${need[@]}" >/dev/null; fi
fi
