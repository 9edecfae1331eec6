#!/usr/bin/env python3
"""Does a sidecar's outbound (UpstreamTlsContext as Kuma's) resume its TLS sessions?
Usage: benches/mtls_resume_check.py dp|envoy BINARY [N]
Inbound = `openssl s_server -www` with the backend identity, client cert required; it tells
each connection `New, TLSv1.x` or `Reused, TLSv1.x`. Outbound = dp (or Envoy) from the bench's
config. N connections through the outbound, one HTTP/1.0 GET each."""
import os, socket, subprocess, sys, tempfile, time, json, re
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mtls_bench as mb
from procfs import free_port

kind, binary, n = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 20
d = tempfile.mkdtemp()
pki = mb.make_pki(d, "p256")
srv_port = free_port()
cert, key = pki["backend"]
srv = subprocess.Popen(["openssl", "s_server", "-accept", str(srv_port), "-cert", cert, "-key", key,
                        "-CAfile", pki["ca"], "-Verify", "2", "-www", "-quiet"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
time.sleep(0.5)
out_port = free_port()
p = mb.Proxy(kind, "outbound", binary, d, *mb.outbound(pki, out_port, srv_port, mb.TAG_SNI, kind != "envoy"), out_port)
res = []
try:
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", out_port), timeout=5)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        buf = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            buf += c
        s.close()
        t = buf.decode(errors="replace")
        m = re.search(r"^(New|Reused), (TLSv[0-9.]+)", t, re.M)
        res.append(f"{m.group(1)} {m.group(2)}" if m else "?" + t[:200])
finally:
    p.stop(); srv.kill()
    import shutil; shutil.rmtree(d, ignore_errors=True)
from collections import Counter
print(kind, dict(Counter(res)))
