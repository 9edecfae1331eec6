#!/usr/bin/env bash
# Captures real TLS ClientHellos into clienthello/testdata/*.bin.
#
# Dev tool, not run by the tests. Safe to re-run: each capture is overwritten
# (the bytes change, since randoms and key shares are random, but the SNI and
# ALPN asserted by tests/captures.rs stay the same). Needs python3, openssl and
# curl (`apt-get install curl openssl`), and cargo for the rustls capture.
#
# For each client, a tiny python3 server listens on 127.0.0.1 on an ephemeral
# port, reads TLS records until the handshake message is complete, saves
# exactly those records and hangs up; the client runs under `timeout` and its
# failure (the server never answers) is expected. The rustls capture needs no
# network: examples/rustls_client_hello.rs writes the hello to stdout.
#
# Finally the captures are copied to fuzz/corpus/client_hello/seed-<name>.
#
# Usage: clienthello/testdata/capture.sh [NAME...]   (default: all)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crate_dir="$(dirname "$here")"
corpus="$crate_dir/../fuzz/corpus/client_hello"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# capture OUT CMD...: runs CMD with {PORT} replaced by the server's port.
capture() {
    local out="$1"
    shift
    python3 - "$out.tmp" >"$tmp/port" <<'PY' &
import socket, sys

srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
srv.settimeout(20)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(10)
data = b""


def complete(d):
    """Length of the records holding a complete handshake message, or None."""
    pos, hs = 0, b""
    while len(d) >= pos + 5:
        if d[pos] != 22:
            sys.exit("not a handshake record")
        n = int.from_bytes(d[pos + 3 : pos + 5], "big")
        if len(d) < pos + 5 + n:
            return None
        hs += d[pos + 5 : pos + 5 + n]
        pos += 5 + n
        if len(hs) >= 4 and len(hs) >= 4 + int.from_bytes(hs[1:4], "big"):
            return pos
    return None


while (n := complete(data)) is None:
    chunk = conn.recv(65536)
    if not chunk:
        sys.exit("client closed before a complete ClientHello")
    data += chunk
with open(sys.argv[1], "wb") as f:
    f.write(data[:n])
conn.close()
PY
    local server=$!
    local port=""
    for _ in $(seq 100); do
        port="$(cat "$tmp/port")"
        [[ -n "$port" ]] && break
        sleep 0.1
    done
    [[ -n "$port" ]] || { echo "capture server did not start" >&2; exit 1; }
    local args=("${@//\{PORT\}/$port}")
    timeout 10 "${args[@]}" </dev/null >/dev/null 2>&1 || true
    wait "$server"
    mv "$out.tmp" "$out"
    echo "captured $(basename "$out"): $(wc -c <"$out") bytes"
}

capture_openssl_tls13() {
    capture "$here/openssl-tls13.bin" openssl s_client -connect 127.0.0.1:{PORT} \
        -servername openssl.example.com -alpn h2,http/1.1
}
capture_openssl_tls12() {
    capture "$here/openssl-tls12.bin" openssl s_client -tls1_2 -connect 127.0.0.1:{PORT} \
        -servername tls12.example.com
}
capture_openssl_tls10() {
    # TLS 1.0 needs security level 0 with OpenSSL 3.
    capture "$here/openssl-tls10.bin" openssl s_client -tls1 -cipher DEFAULT@SECLEVEL=0 \
        -connect 127.0.0.1:{PORT} -servername tls10.example.com
}
capture_openssl_nosni() {
    capture "$here/openssl-nosni.bin" openssl s_client -connect 127.0.0.1:{PORT} -noservername
}
capture_python() {
    capture "$here/python.bin" python3 -c '
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.set_alpn_protocols(["http/1.1"])
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as s:
    ctx.wrap_socket(s, server_hostname="python.example.com")
' {PORT}
}
capture_curl() {
    capture "$here/curl.bin" curl -sk --max-time 5 \
        --resolve curl.example.com:{PORT}:127.0.0.1 https://curl.example.com:{PORT}/
}
capture_rustls_pq() {
    cargo run -q --manifest-path "$crate_dir/Cargo.toml" --example rustls_client_hello -- \
        rustls.example.com h2,http/1.1 >"$here/rustls-pq.bin.tmp"
    mv "$here/rustls-pq.bin.tmp" "$here/rustls-pq.bin"
    echo "captured rustls-pq.bin: $(wc -c <"$here/rustls-pq.bin") bytes"
}

all=(openssl-tls13 openssl-tls12 openssl-tls10 openssl-nosni python curl rustls-pq)
names=("$@")
((${#names[@]})) || names=("${all[@]}")
for name in "${names[@]}"; do
    "capture_${name//-/_}"
done

mkdir -p "$corpus"
for f in "$here"/*.bin; do
    cp "$f" "$corpus/seed-$(basename "$f" .bin)"
done
