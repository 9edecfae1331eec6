#!/usr/bin/env python3
"""Loading a large `--xds-file` (issue 13): peak RSS, CPU and time until ready.

Writes a zone-ingress document in the shape of benches/src/targets.rs (one listener with one
filter chain per server name, `n<i>.svc.bench`, and up to 1,000 STATIC clusters), starts
`dp run --proxy-type=ingress --xds-file` pinned to CPU 0 with one worker, waits for /ready,
and reports VmHWM (peak RSS since start), VmRSS 0.5 s later, the process's CPU seconds and
the time to ready.

Usage: benches/xds_file_load.py --dp target/release/dp [--names 100000]
"""
import argparse, json, os, subprocess, sys, tempfile, time, urllib.request
from procfs import free_port


def document(n, port):
    clusters = [{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": f"c{i}", "type": "STATIC",
                 "connect_timeout": "5s", "load_assignment": {"cluster_name": f"c{i}", "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9}}}}]}]}}
                for i in range(max(1, min(n, 1000)))]
    chains = [{"filter_chain_match": {"server_names": [f"n{i}.svc.bench"], "transport_protocol": "tls"},
               "filters": [{"name": "envoy.filters.network.tcp_proxy", "typed_config": {
                   "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                   "stat_prefix": f"c{i % 1000}", "cluster": f"c{i % 1000}"}}]}
              for i in range(n)]
    listener = {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "listener_filters": [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
                "filter_chains": chains}
    return {"version_info": "1", "resources": clusters + [listener]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", required=True)
    ap.add_argument("--names", type=int, default=100000)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="xds-file-load-")
    path, admin = os.path.join(d, "dp.json"), free_port()
    with open(path, "w") as f:
        json.dump(document(args.names, free_port()), f)
    t = time.monotonic()
    p = subprocess.Popen(["taskset", "-c", "0", args.dp, "run", "--proxy-type=ingress", "--xds-file", path,
                          "--admin-address", f"127.0.0.1:{admin}", "--readiness-port", "0", "--concurrency", "1",
                          "--log-level", "warn"])
    try:
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if p.poll() is not None or time.monotonic() - t > 120:
                sys.exit("xds_file_load: dp did not become ready")
            time.sleep(0.01)
        ready = time.monotonic() - t
        time.sleep(0.5)
        st = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{p.pid}/status") if l.startswith(("VmRSS", "VmHWM"))}
        ticks = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[11:13]
        cpu = sum(int(x) for x in ticks) / os.sysconf("SC_CLK_TCK")
        print(f"{args.names} names, file {os.path.getsize(path) / 2**20:.1f} MiB: ready in {ready:.2f} s, "
              f"CPU {cpu:.2f} s, RSS peak {st['VmHWM'] / 1024:.1f} MiB, RSS after {st['VmRSS'] / 1024:.1f} MiB")
    finally:
        p.kill()
        p.wait()


if __name__ == "__main__":
    main()
