#!/usr/bin/env python3
"""Store benchmark (issue 15): cp's REST write throughput and change-to-ACK latency on
the PostgreSQL store against the memory store, at N Dataplanes (10,000 by default).

For each store, one standalone zone `cp run` (release build; dataplane auth off so that
the load is the store, not tokens) with a plain Mesh `default`:

1. Create: N Dataplanes (`dp-<i>`, service `svc-<i mod S>`, S = N/10 services of ten
   instances) PUT through the REST API by --workers processes, each on one keep-alive
   connection (a raw socket; every request encoded before the clock starts, so that the
   writers take little of the CPUs they share with cp). Writes/s over the whole phase, each
   PUT's latency, and the writers' CPU time.
2. Update: --updates PUTs that change an existing Dataplane's inbound port, same workers.
3. Change-to-ACK: a `dp` sidecar (`bench-client`, an outbound to `svc-0`) connects; then,
   --runs times, `dp-0` (a `svc-0` instance) is PUT with a new port and the time is taken
   from just before the PUT until the proxy logs `applied xDS update (ACK)` for
   ClusterLoadAssignment. It includes cp's 100 ms xDS debounce (KUMA_XDS_DEBOUNCE, the
   default) and the rebuild of the proxy's snapshot over N Dataplanes.
   On PostgreSQL also across instances: a second cp instance on the same database, the
   proxy connected to it, the PUT made on the first (write, NOTIFY, the second
   instance's copy, its xDS push), and the time until the second instance's REST API
   serves a change made on the first.

PostgreSQL is a throwaway server (Debian's package, initdb into a temporary directory,
fsync off) on the same machine. Everything shares the machine's CPUs: figures are for
comparing the stores with each other in the same run, not absolute capacities.

Usage: benches/store_bench.py --cp target/release/cp --dp target/release/dp
           [--dataplanes 10000] [--updates 2000] [--workers 8] [--runs 20] [--quick]
           [--out-md FILE] [--json FILE]
--quick: 1,000 Dataplanes, 500 updates, 10 runs.
"""
import argparse, glob, http.client, json, multiprocessing, os, pwd, shutil, signal, socket, statistics, subprocess
import sys, tempfile, threading, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rest_load  # noqa: E402

MESH = {"type": "Mesh", "name": "default"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))] if v else float("nan")


class Proc:
    """A child process whose output lines are collected with arrival times."""

    def __init__(self, cmd, env=None, user=None):
        self.lines, self.cv = [], threading.Condition()
        kw = {}
        if user is not None:
            kw = {"user": user[0], "group": user[1], "extra_groups": []}
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=env, **kw)
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self):
        for raw in self.p.stdout:
            t = time.monotonic()
            with self.cv:
                self.lines.append((t, raw.decode("utf-8", "replace").rstrip("\n")))
                self.cv.notify_all()

    def mark(self):
        with self.cv:
            return len(self.lines)

    def wait_line(self, parts, start=0, timeout=60.0):
        deadline = time.monotonic() + timeout
        with self.cv:
            i = start
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if all(p in line for p in parts):
                        return t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    tail = "\n".join(l for _, l in self.lines[-20:])
                    raise SystemExit(f"no log line with {parts} (exit {self.p.poll()}); last lines:\n{tail}")
                self.cv.wait(left)

    def rss_mib(self):
        try:
            for l in open(f"/proc/{self.p.pid}/status"):
                if l.startswith("VmRSS:"):
                    return int(l.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def stop(self, sig=signal.SIGKILL):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


class Postgres:
    """initdb + postgres as an unprivileged user on a free port."""

    def __init__(self, work):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
        if not bins:
            raise SystemExit("PostgreSQL is not installed (Debian's `postgresql` package): run scripts/setup.sh")
        self.bin = os.path.dirname(bins[-1])
        self.dir = os.path.join(work, "pg")
        os.makedirs(os.path.join(self.dir, "data"))
        pw = os.path.join(self.dir, "pw")
        open(pw, "w").write("bench")
        user = None
        if os.geteuid() == 0:
            n = pwd.getpwnam("nobody")
            user = (n.pw_uid, n.pw_gid)
            for p in (self.dir, os.path.join(self.dir, "data"), pw):
                os.chown(p, *user)
        kw = {"user": user[0], "group": user[1], "extra_groups": []} if user else {}
        subprocess.run([f"{self.bin}/initdb", "-D", f"{self.dir}/data", "-U", "kuma", "--pwfile", pw,
                        "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL, cwd=self.dir, **kw)
        self.port = free_port()
        self.proc = Proc([f"{self.bin}/postgres", "-D", f"{self.dir}/data", "-p", str(self.port),
                          "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                          "-c", "fsync=off", "-c", "max_connections=300"], user=user)
        deadline = time.monotonic() + 30
        while subprocess.run([f"{self.bin}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]).returncode:
            if time.monotonic() > deadline or self.proc.p.poll() is not None:
                raise SystemExit("PostgreSQL did not start:\n" + "\n".join(l for _, l in self.proc.lines))
            time.sleep(0.05)

    def env(self, db):
        return {"KUMA_STORE_TYPE": "postgres", "KUMA_STORE_POSTGRES_HOST": "127.0.0.1",
                "KUMA_STORE_POSTGRES_PORT": str(self.port), "KUMA_STORE_POSTGRES_USER": "kuma",
                "KUMA_STORE_POSTGRES_PASSWORD": "bench", "KUMA_STORE_POSTGRES_DB_NAME": db}

    def create_db(self, cp, db):
        subprocess.run([f"{self.bin}/psql", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "kuma",
                        "-d", "postgres", "-c", f'CREATE DATABASE "{db}"'], check=True,
                       env={**os.environ, "PGPASSWORD": "bench"})
        subprocess.run([cp, "migrate", "up"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, **self.env(db)})

    def stop(self):
        self.proc.stop(signal.SIGINT)


def start_cp(cp, work, name, extra_env):
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    addr_file = os.path.join(d, "addresses.json")
    env = {**os.environ, "KUMA_GENERAL_WORK_DIR": d, "KUMA_MULTIZONE_ZONE_NAME": "zone-1",
           "KUMA_DP_SERVER_AUTHN_DP_PROXY_TYPE": "none", "KUMA_LOG_LEVEL": "warn", **extra_env}
    p = Proc([cp, "run", "--bind-address", "127.0.0.1", "--api-port", "0", "--dp-server-port", "0",
              "--address-file", addr_file], env=env)
    deadline = time.monotonic() + 60
    while not os.path.exists(addr_file):
        if time.monotonic() > deadline or p.p.poll() is not None:
            raise SystemExit("cp did not start:\n" + "\n".join(l for _, l in p.lines))
        time.sleep(0.02)
    a = json.load(open(addr_file))
    p.api, p.dp_server, p.ca = a["api"], a["dp_server"], a["ca_cert_file"]
    return p


def request(conn, method, path, body=None):
    conn.request(method, path, body=None if body is None else json.dumps(body),
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    return r.status, data


def dataplane(i, services, port):
    return {"type": "Dataplane", "mesh": "default", "name": f"dp-{i}",
            "networking": {"address": "127.0.0.1",
                           "inbound": [{"port": port, "tags": {"kuma.io/service": f"svc-{i % services}"}}]}}


def _worker(args):
    """One writer process: its slice of PUTs on one connection (rest_load.send)."""
    api, requests = args
    return rest_load.send(api, requests)


def write_phase(pool, api, items, services, workers):
    requests = [(f"dp-{i}", rest_load.put_request(api, f"/meshes/default/dataplanes/dp-{i}", dataplane(i, services, p)))
                for i, p in items]
    chunks = [(api, requests[w::workers]) for w in range(workers)]
    t = time.monotonic()
    parts = pool.map(_worker, chunks)
    wall = time.monotonic() - t
    lat = [x for part, _ in parts for x in part]
    return {"writes": len(items), "seconds": round(wall, 3), "writes_per_s": round(len(items) / wall, 1),
            "p50_ms": round(pct(lat, 50) * 1000, 2), "p99_ms": round(pct(lat, 99) * 1000, 2),
            "writers_cpu_s": round(sum(cpu for _, cpu in parts), 3)}


def start_client(dp, cp_proc, work):
    d = os.path.join(work, "client")
    os.makedirs(d, exist_ok=True)
    out_port, in_port, app_port = free_port(), free_port(), free_port()
    res = (f"type: Dataplane\nmesh: default\nname: bench-client\nnetworking:\n  address: 127.0.0.1\n  inbound:\n"
           f"  - port: {in_port}\n    servicePort: {app_port}\n    tags:\n      kuma.io/service: bench-client\n"
           f"  outbound:\n  - port: {out_port}\n    tags:\n      kuma.io/service: svc-0\n")
    f = os.path.join(d, "dp.yaml")
    open(f, "w").write(res)
    admin = free_port()
    p = Proc([dp, "run", "--proxy-type=dataplane", f"--cp-address=https://localhost:{cp_proc.dp_server.rsplit(':', 1)[1]}",
              "--ca-cert-file", cp_proc.ca, "--dataplane-file", f, "--admin-address", f"127.0.0.1:{admin}",
              "--readiness-port", "0"], env={**os.environ, "KUMA_DNS_ENABLED": "false"})
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except Exception:
            pass
        if time.monotonic() > deadline or p.p.poll() is not None:
            raise SystemExit("dp did not get ready:\n" + "\n".join(l for _, l in p.lines[-30:]))
        time.sleep(0.05)
    return p


def ack_latency(writer_api, client, services, runs):
    host, port = writer_api.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    out = []
    for r in range(runs):
        time.sleep(0.3)  # pacing: let the previous push settle (not a synchronisation)
        mark = client.mark()
        t = time.monotonic()
        status, body = request(conn, "PUT", "/meshes/default/dataplanes/dp-0", dataplane(0, services, 40000 + r))
        if status != 200:
            raise SystemExit(f"PUT dp-0: {status} {body[:200]!r}")
        t1, _ = client.wait_line(["applied xDS update (ACK)", "ClusterLoadAssignment"], start=mark)
        out.append(t1 - t)
    conn.close()
    return {"runs": runs, "p50_ms": round(pct(out, 50) * 1000, 1), "p90_ms": round(pct(out, 90) * 1000, 1),
            "max_ms": round(max(out) * 1000, 1)}


def propagation(a_api, b_api, runs):
    ha, pa = a_api.rsplit(":", 1)
    hb, pb = b_api.rsplit(":", 1)
    ca = http.client.HTTPConnection(ha, int(pa), timeout=60)
    cb = http.client.HTTPConnection(hb, int(pb), timeout=60)
    out = []
    for r in range(runs):
        name = f"prop-{r}"
        tp = {"type": "TrafficPermission", "mesh": "default", "name": name,
              "sources": [{"match": {"kuma.io/service": "*"}}], "destinations": [{"match": {"kuma.io/service": "*"}}]}
        t = time.monotonic()
        status, body = request(ca, "PUT", f"/meshes/default/traffic-permissions/{name}", tp)
        if status not in (200, 201):
            raise SystemExit(f"PUT {name}: {status} {body[:200]!r}")
        while request(cb, "GET", f"/meshes/default/traffic-permissions/{name}")[0] != 200:
            if time.monotonic() - t > 10:
                raise SystemExit(f"{name} did not reach the other instance within 10 s")
        out.append(time.monotonic() - t)
    return {"runs": runs, "p50_ms": round(pct(out, 50) * 1000, 2), "p90_ms": round(pct(out, 90) * 1000, 2),
            "max_ms": round(max(out) * 1000, 2)}


def bench_store(kind, args, work, pool, pg):
    env = {}
    if kind == "postgres":
        pg.create_db(args.cp, "bench")
        env = pg.env("bench")
    a = start_cp(args.cp, work, f"{kind}-a", env)
    res = {"store": kind}
    try:
        st, body = request(http.client.HTTPConnection(*a.api.rsplit(":", 1)), "PUT", "/meshes/default", MESH)
        assert st in (200, 201), body
        n, services = args.dataplanes, max(1, args.dataplanes // 10)
        res["create"] = write_phase(pool, a.api, [(i, 10000 + i % 50000) for i in range(n)], services, args.workers)
        upd = [(i * 7919 % n, 20000 + (i % 20000)) for i in range(args.updates)]
        res["update"] = write_phase(pool, a.api, upd, services, args.workers)
        res["cp_rss_mib"] = round(a.rss_mib(), 1)
        client = start_client(args.dp, a, os.path.join(work, f"{kind}-client"))
        try:
            res["ack_same_instance"] = ack_latency(a.api, client, services, args.runs)
        finally:
            client.stop()
        if kind == "postgres":
            b = start_cp(args.cp, work, f"{kind}-b", env)
            try:
                res["propagation"] = propagation(a.api, b.api, args.runs)
                client = start_client(args.dp, b, os.path.join(work, f"{kind}-client-b"))
                try:
                    res["ack_other_instance"] = ack_latency(a.api, client, services, args.runs)
                finally:
                    client.stop()
            finally:
                b.stop()
    finally:
        a.stop()
    return res


def markdown(results, args, started, took):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    lines = ["<!-- store-bench:start -->", f"## Store: PostgreSQL against memory, {args.dataplanes:,} Dataplanes (issue 15)", "",
             f"- Command: `scripts/bench-store.sh{' --quick' if args.quick else ''}` (builds cp and dp in release, "
             f"then `benches/store_bench.py`)",
             f"- Date: {started}; took {took:.0f} s",
             f"- Machine: {cpu}, {os.cpu_count()} CPUs, shared by cp, PostgreSQL {pgver()}, the proxy and the load "
             f"({args.workers} writer processes, one keep-alive connection each: raw sockets, requests encoded before the "
             "clock starts)",
             f"- {args.dataplanes:,} Dataplanes in {max(1, args.dataplanes // 10):,} services; updates change one "
             "Dataplane's inbound port; change-to-ACK is from just before the PUT of `dp-0` to the `dp` client "
             "(outbound `svc-0`) logging the ClusterLoadAssignment ACK, including cp's 100 ms xDS debounce", "",
             "| store | create writes/s | create p50 / p99 ms | update writes/s | update p50 / p99 ms | cp RSS MiB | "
             "change-to-ACK p50 / p90 / max ms | other instance: change-to-ACK p50 / p90 / max ms | "
             "other instance: REST visible p50 / p90 / max ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c, u, a = r["create"], r["update"], r["ack_same_instance"]
        o = r.get("ack_other_instance")
        p = r.get("propagation")
        lines.append(
            f"| {r['store']} | {c['writes_per_s']:,.0f} | {c['p50_ms']} / {c['p99_ms']} | {u['writes_per_s']:,.0f} | "
            f"{u['p50_ms']} / {u['p99_ms']} | {r['cp_rss_mib']} | {a['p50_ms']} / {a['p90_ms']} / {a['max_ms']} | "
            + (f"{o['p50_ms']} / {o['p90_ms']} / {o['max_ms']}" if o else "–") + " | "
            + (f"{p['p50_ms']} / {p['p90_ms']} / {p['max_ms']}" if p else "–") + " |")
    mem, pgr = results[0], results[-1]
    lines += ["", "The writers' CPU time for the creates: " + ", ".join(
        f"{r['store']} {r['create'].get('writers_cpu_s', float('nan')):.2f} s" for r in results) + "."]
    lines += ["", f"PostgreSQL ÷ memory: create {pgr['create']['writes_per_s'] / mem['create']['writes_per_s']:.2f}×, "
                  f"update {pgr['update']['writes_per_s'] / mem['update']['writes_per_s']:.2f}× the writes/s; "
                  f"change-to-ACK p50 {pgr['ack_same_instance']['p50_ms'] - mem['ack_same_instance']['p50_ms']:+.1f} ms.",
              "<!-- store-bench:end -->"]
    return "\n".join(lines) + "\n"


def pgver():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    try:
        return subprocess.run([bins[-1], "--version"], capture_output=True, text=True).stdout.split()[2]
    except Exception:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cp", required=True)
    ap.add_argument("--dp", required=True)
    ap.add_argument("--dataplanes", type=int, default=10000)
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-md")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if args.quick:
        args.dataplanes, args.updates, args.runs = 1000, 500, 10
    work = tempfile.mkdtemp(prefix="store-bench-")
    os.chmod(work, 0o755)
    # Copies: a concurrent `cargo build` must not swap the binaries mid-run.
    for b in ("cp", "dp"):
        dst = os.path.join(work, b)
        shutil.copy2(getattr(args, b), dst)
        setattr(args, b, dst)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    pg = None
    try:
        pg = Postgres(work)
        with multiprocessing.Pool(args.workers) as pool:
            results = [bench_store("memory", args, work, pool, pg), bench_store("postgres", args, work, pool, pg)]
    finally:
        if pg:
            pg.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    md = markdown(results, args, started, time.monotonic() - t0)
    if args.json:
        json.dump({"date": started, "dataplanes": args.dataplanes, "results": results}, open(args.json, "w"), indent=2)
    if args.out_md:
        open(args.out_md, "w").write(md)
    print(md)


if __name__ == "__main__":
    main()
