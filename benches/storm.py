#!/usr/bin/env python3
"""Connection set-up latency while dp rebuilds a large configuration (issue 13's storm).

dp runs with `--xds-file` holding the 10,000-service zone-ingress snapshot of
xds_apply.py (SNI names `svc-<i>.storm`, every endpoint one local backend), one worker
thread (`--concurrency 1`), pinned to CPU 0. A client on CPU 1 opens connections one after
another: connect, send a TLS ClientHello for a random service, and wait for the backend's
first byte (the backend writes as soon as dp's upstream connection arrives). That time is
the connection's set-up latency. It is measured while the file stays the same, then while a
writer replaces it every `--every` seconds (`--files` times) with a version that changes every cluster's
`connectTimeout` (a whole rebuild each time). Prints the p50/p99/max of both and the p99
the storm adds.

    python3 benches/storm.py --dp target/release/dp [--dp other-dp ...]
"""
import argparse, json, os, random, socket, ssl, statistics, sys, tempfile, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xds_apply as X  # noqa: E402


def client_hello(sni):
    """The first flight of a TLS client for `sni`, as bytes."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def snapshot(n, listen, backend, timeout):
    res = X.resources(n, listen)
    for r in res:
        if r["@type"].endswith("Cluster"):
            r["connectTimeout"] = timeout
        elif r["@type"] == X.EDS_TYPE:
            r["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]["portValue"] = backend
        elif r["@type"].endswith("Listener"):
            for i, c in enumerate(r["filterChains"]):
                c["filterChainMatch"]["serverNames"] = [f"svc-{i}.storm"]
    return {"version_info": timeout, "resources": res}


def write_atomic(path, blob):
    """Writes encoded bytes: the writer thread shares the client's interpreter, and a
    `json.dump` there held the GIL for milliseconds at a time while the client waited (it
    showed up as about 1.5 ms on the storm's p99, whatever dp did)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)


def backend_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)

    def serve():
        while True:
            c, _ = srv.accept()
            try:
                c.sendall(b"k")
            except OSError:
                pass
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def one(listen, hello):
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", listen), timeout=10)
    try:
        s.sendall(hello)
        if s.recv(1) != b"k":
            raise RuntimeError("no byte from the backend")
    finally:
        s.close()
    return (time.perf_counter() - t) * 1e3


def applied(admin):
    """How many configuration versions dp applied (its `config_update_success` counter),
    so that a storm dp did not act on cannot pass for one it handled well."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if "config_update_success" in line and not line.startswith("#"):
                return int(line.rsplit(" ", 1)[1])
    raise SystemExit("dp's /stats/prometheus has no config_update_success")


def measure(listen, hellos, count):
    return sorted(one(listen, random.choice(hellos)) for _ in range(count))


def pct(v, p):
    return v[min(len(v) - 1, int(len(v) * p))]


def run(dp, n, count, every, files, cpus):
    d = tempfile.mkdtemp(prefix="storm-")
    backend = backend_server()
    admin, listen = X.free_port(), X.free_port()
    path = os.path.join(d, "xds.json")
    docs = [json.dumps(snapshot(n, listen, backend, t)).encode() for t in ("5s", "6s")]
    write_atomic(path, docs[0])
    proc = X.Proc(["taskset", "-c", cpus, dp, "run", "--xds-file", path, "--admin-address", f"127.0.0.1:{admin}",
                   "--concurrency", "1", "--log-level", "warn"], log_path=os.path.join(d, "dp.log"))
    try:
        if not X.wait_ready(admin, listen, time.monotonic() + 120):
            raise SystemExit(f"{dp} not ready; see {d}/dp.log")
        hellos = [client_hello(f"svc-{i}.storm") for i in random.sample(range(n), 200)]
        measure(listen, hellos, 200)  # warm-up
        quiet = measure(listen, hellos, count)
        stop = threading.Event()
        rebuilds = [0]

        def storm():
            i = 1
            while not stop.is_set():
                write_atomic(path, docs[i % 2])
                rebuilds[0] += 1
                i += 1
                stop.wait(every)

        w = threading.Thread(target=storm)
        w.start()
        try:
            stormy = []
            while rebuilds[0] < files:
                stormy.append(one(listen, random.choice(hellos)))
            stormy.sort()
        finally:
            stop.set()
            w.join()
        return quiet, stormy, rebuilds[0], applied(admin) - 1  # less the first version
    finally:
        proc.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", action="append", required=True, help="dp binaries to compare (repeat)")
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--count", type=int, default=3000, help="connections per phase")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between file replacements")
    ap.add_argument("--dp-cpus", default="0", help="CPUs dp may run on (taskset -c); the client is on CPU 1")
    ap.add_argument("--files", type=int, default=15, help="file replacements during the storm phase")
    a = ap.parse_args()
    os.sched_setaffinity(0, {1})
    print("| dp | quiet p50 ms | quiet p99 ms | storm p50 ms | storm p99 ms | storm max ms | p99 added ms | files written | versions applied | storm connections |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dp in a.dp:
        quiet, stormy, n, versions = run(dp, a.services, a.count, a.every, a.files, a.dp_cpus)
        print(f"| {dp} | {pct(quiet, .5):.2f} | {pct(quiet, .99):.2f} | {pct(stormy, .5):.2f} | "
              f"{pct(stormy, .99):.2f} | {stormy[-1]:.1f} | {pct(stormy, .99) - pct(quiet, .99):.2f} | {n} | {versions} | {len(stormy)} |",
              flush=True)


if __name__ == "__main__":
    main()
