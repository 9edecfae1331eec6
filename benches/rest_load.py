"""A lean REST load for cp: PUTs encoded before the clock starts, sent one at a time on a
keep-alive raw socket per writer. http.client's response parsing cost more CPU than cp's
handling of the request, on the CPUs the writers share with cp, so registration figures were
the client's as much as cp's. Used by store_bench.py and xds_apply.py (and the benches built
on it)."""
import json
import socket
import time


def put_request(host, path, body):
    """The bytes of one PUT with a JSON body."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return (f"PUT {path} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n").encode() + data


def _response(sock, buf):
    """Reads one response (cp answers with content-length); returns (status, body, what follows)."""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            raise RuntimeError("cp closed the connection")
        buf += more
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            raise RuntimeError("cp closed the connection")
        rest += more
    return int(head[9:12]), rest[:length], rest[length:]


def send(api, requests):
    """Sends (name, request bytes) pairs on one keep-alive connection, one at a time; raises on
    a status other than 200/201. Returns each request's latency (s) and the CPU time taken
    (of the process: a thread's share is not separable)."""
    host, port = api.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cpu0 = time.process_time()
    out, buf = [], b""
    try:
        for name, req in requests:
            t = time.monotonic()
            sock.sendall(req)
            status, body, buf = _response(sock, buf)
            out.append(time.monotonic() - t)
            if status not in (200, 201):
                raise RuntimeError(f"PUT {name}: {status} {body[:200]!r}")
    finally:
        sock.close()
    return out, time.process_time() - cpu0
