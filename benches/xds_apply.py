#!/usr/bin/env python3
"""xDS apply benchmark (issue 5): time and memory for dp and for Envoy to load the same
Kuma-shaped zone-ingress snapshot of N services (one EDS cluster, one
ClusterLoadAssignment and one tag-SNI filter chain per service).

dp reads it with --xds-file; Envoy gets the same resources as static_resources (dp's
file is turned into an Envoy bootstrap, EDS clusters becoming STATIC with the same
endpoints). Measured per run: wall time from process start until the admin /ready
answers 200 with the listener bound, and VmRSS / VmHWM then. Medians of --runs runs.

Usage: benches/xds_apply.py --dp target/release/dp --envoy PATH [--services 10000] [--runs 3]
"""
import argparse, json, os, socket, statistics, subprocess, tempfile, time, urllib.request


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def resources(n, port):
    out = []
    chains = []
    for i in range(n):
        name = f"default:svc-{i}"
        out.append({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": name, "type": "EDS",
                    "connectTimeout": "5s", "edsClusterConfig": {"edsConfig": {"ads": {}, "resourceApiVersion": "V3"}}})
        out.append({"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "clusterName": name,
                    "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress": {
                        "address": "127.0.0.1", "portValue": 20000 + i % 1000}}}}]}]})
        chains.append({"filterChainMatch": {"serverNames": [f"svc-{i}{{mesh=default}}"], "transportProtocol": "tls"},
                       "filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                           "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                           "cluster": name, "statPrefix": f"svc_{i}"}}]})
    out.append({"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "ingress",
                "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "listenerFilters": [{"name": "envoy.filters.listener.tls_inspector", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
                "filterChains": chains})
    return out


def envoy_bootstrap(res, admin_port):
    cla = {r["clusterName"]: r for r in res if r["@type"].endswith("ClusterLoadAssignment")}
    clusters, listeners = [], []
    for r in res:
        if r["@type"].endswith(".Cluster"):
            c = {k: v for k, v in r.items() if k not in ("@type", "edsClusterConfig")}
            c["type"] = "STATIC"
            c["loadAssignment"] = {k: v for k, v in cla[r["name"]].items() if k != "@type"}
            clusters.append(c)
        elif r["@type"].endswith("Listener"):
            listeners.append({k: v for k, v in r.items() if k != "@type"})
    return {"admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin_port}}},
            "staticResources": {"listeners": listeners, "clusters": clusters}}


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                fields[k] = int(v.split()[0]) / 1024
    return fields


def wait_ready(admin_port, listen_port, deadline):
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    socket.create_connection(("127.0.0.1", listen_port), timeout=1).close()
                    return True
        except Exception:
            pass
        time.sleep(0.01)
    return False


def run(cmd, admin_port, listen_port):
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_ready(admin_port, listen_port, start + 300):
            raise SystemExit(f"not ready: {cmd[0]}")
        took = time.monotonic() - start
        time.sleep(0.5)  # let freed memory settle before reading RSS
        return took, status(p.pid)
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", required=True)
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="xds-apply-")
    rows = {}
    for name in ("dp", "envoy"):
        times, rss, hwm = [], [], []
        for _ in range(a.runs):
            admin, listen = free_port(), free_port()
            res = resources(a.services, listen)
            if name == "dp":
                path = os.path.join(d, "dp.json")
                json.dump({"version_info": "1", "resources": res}, open(path, "w"))
                cmd = ["taskset", "-c", "0", a.dp, "run", "--proxy-type=ingress", "--xds-file", path,
                       "--admin-address", f"127.0.0.1:{admin}", "--readiness-port", "0", "--concurrency", "1",
                       "--log-level", "warn"]
            else:
                path = os.path.join(d, "envoy.json")
                json.dump(envoy_bootstrap(res, admin), open(path, "w"))
                cmd = ["taskset", "-c", "0", a.envoy, "-c", path, "--concurrency", "1", "--disable-hot-restart",
                       "--log-level", "warn"]
            took, st = run(cmd, admin, listen)
            times.append(took)
            rss.append(st["VmRSS"])
            hwm.append(st["VmHWM"])
        rows[name] = (statistics.median(times), statistics.median(rss), statistics.median(hwm))
    e = rows["envoy"]
    print(f"xDS apply, {a.services} services (Kuma ingress shape), median of {a.runs} runs, proxy pinned to CPU 0")
    print("| target | time to ready s | RSS after MiB | RSS peak MiB |")
    print("|---|---|---|---|")
    for name, (t, r, h) in rows.items():
        print(f"| {name} | {t:.2f} (E {t / e[0]:.2f}) | {r:.1f} (E {r / e[1]:.2f}) | {h:.1f} (E {h / e[2]:.2f}) |")


if __name__ == "__main__":
    main()
