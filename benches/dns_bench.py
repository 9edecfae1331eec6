#!/usr/bin/env python3
"""DNS benchmark (issue 5): dp vs Envoy's dns_filter vs unbound, each serving the same
Kuma-style `.mesh` table, loaded by dnsperf.

Names: N services `svc-<i>_ns-<i % 50>_svc_80.mesh`, each with its dotted alias
`svc-<i>.ns-<i % 50>.svc.80.mesh` (Kuma's CP sends both), one VIP each from 240.0.0.0/4:
2N names in every server. Queries use only the underscore form.

* dp: `--xds-file` with one UDP listener + `envoy.filters.udp.dns_filter` (inline table),
  the shape Kuma sends to sidecars; reload = atomic rewrite of the file (dp watches it with inotify).
* Envoy: the same Listener resource through LDS from a file
  (`dynamic_resources.lds_config.path_config_source`); reload = atomic rename.
* unbound: `local-zone: "mesh." static` + one `local-data` per name;
  reload = rewrite of unbound.conf + `unbound-control reload`.

Servers run one at a time, pinned to CPU 0 (`taskset -c 0`, one worker thread each);
dnsperf runs on CPU 1. Per run and server:
* p99 latency at a fixed rate (`dnsperf -Q RATE -v`: every reply's latency is printed,
  the percentile is computed here) and CPU per query at that rate;
* max QPS (dnsperf without -Q) and CPU per query at saturation: utime+stime of the
  server (/proc/<pid>/stat, all threads) over the run / queries completed;
* RSS after the load (VmRSS, 0.5 s after it) and peak (VmHWM);
* reload: from the config change until a UDP query for one added name is answered.
Figures are medians of --runs runs; dp's carry their ratio to unbound (U) and Envoy (E).

Usage: benches/dns_bench.py --dp target/release/dp --envoy PATH [--runs 3] [--names 10000]
       [--quick] [--out-md FILE] [--json FILE]
"""
import argparse, ipaddress, json, os, random, re, shutil, socket, statistics, struct, subprocess, sys, tempfile, time
import urllib.request
from procfs import free_port, mem

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
DNS_FILTER = "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig"
SERVERS = ("dp", "envoy", "unbound")
LABEL = {"dp": "dp", "envoy": "Envoy", "unbound": "unbound"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def names(n):
    """[(underscore name, dotted alias, VIP)] for services 0..n-1."""
    out = []
    for i in range(n):
        svc = f"svc-{i}_ns-{i % 50}_svc_80"
        out.append((f"{svc}.mesh", f"{svc.replace('_', '.')}.mesh", str(ipaddress.IPv4Address(0xF0000001 + i))))
    return out


def listener_doc(recs, port):
    """dp's --xds-file and Envoy's LDS file: one DiscoveryResponse-shaped document."""
    vds = [{"name": name, "endpoint": {"addressList": {"address": [ip]}}, "answerTtl": "30s"}
           for u, d, ip in recs for name in (u, d)]
    vds.sort(key=lambda v: v["name"])  # Kuma sorts them by name
    listener = {
        "@type": LISTENER, "name": "kuma:dns",
        "address": {"socketAddress": {"protocol": "UDP", "address": "127.0.0.1", "portValue": port}},
        "listenerFilters": [{"name": "envoy.filters.udp.dns_filter", "typedConfig": {
            "@type": DNS_FILTER, "statPrefix": "kuma_dns",
            "serverConfig": {"inlineDnsTable": {"virtualDomains": vds}}}}]}
    return {"version_info": str(len(recs)), "resources": [listener]}


def unbound_conf(recs, port, d):
    lines = ["server:", "  interface: 127.0.0.1", f"  port: {port}", "  num-threads: 1", "  do-daemonize: no",
             '  chroot: ""', '  username: ""', f'  directory: "{d}"', '  pidfile: ""', "  use-syslog: no",
             '  logfile: ""', "  verbosity: 0", "  do-not-query-localhost: yes", "  do-ip6: no",
             # No validator: local data never reaches the modules; this only spares memory.
             '  module-config: "iterator"', '  local-zone: "mesh." static']
    lines += [f'  local-data: "{name}. 30 IN A {ip}"' for u, dd, ip in recs for name in (u, dd)]
    lines += ["remote-control:", "  control-enable: yes", f"  control-interface: {d}/unbound.ctl",
              "  control-use-cert: no", ""]
    return "\n".join(lines)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def query(port, name, timeout=0.05):
    """One A query over UDP; the answer's addresses (empty on NXDOMAIN/NODATA/no reply)."""
    qid = random.randrange(65536)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    msg = struct.pack(">6H", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(msg, ("127.0.0.1", port))
            r = s.recv(4096)
        except OSError:
            return []
    if len(r) < 12 or r[:2] != msg[:2] or r[3] & 0x0F:
        return []
    ancount = struct.unpack(">H", r[6:8])[0]
    pos, ips = 12 + len(qname) + 4, []
    for _ in range(ancount):
        while r[pos] and r[pos] < 0xC0:  # owner name: labels, then a 0 or a 2-byte pointer
            pos += 1 + r[pos]
        pos += 2 if r[pos] else 1
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", r[pos:pos + 10])
        if rtype == 1 and rdlen == 4:
            ips.append(str(ipaddress.IPv4Address(r[pos + 10:pos + 14])))
        pos += 10 + rdlen
    return ips


def wait_answer(port, name, ip, deadline, proc):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"dns_bench: server exited with {proc.returncode}")
        if query(port, name) == [ip]:
            return True
        time.sleep(0.001)
    return False


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def client_sched():
    """Under SCHED_FIFO (scripts/bench.sh), dnsperf gets SCHED_RR at the same priority: its
    threads share CPU 1, and once (with FIFO) one of them spun and starved the others, so a
    2 s run never ended. RR differs from FIFO only in rotating equal-priority threads."""
    if os.sched_getscheduler(0) != os.SCHED_FIFO:
        return []
    return ["chrt", "-r", str(os.sched_getparam(0).sched_priority)]


def dnsperf(args, port, qfile, seconds, rate=None):
    """Runs dnsperf on CPU 1; returns its summary (and per-reply latencies when rate is set)."""
    cmd = client_sched() + ["taskset", "-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", qfile,
                            "-l", str(seconds), "-c", "1", "-T", "1", "-t", "1"]
    cmd += ["-Q", str(rate), "-q", "1000", "-v"] if rate else ["-q", str(args.outstanding)]
    for attempt in (1, 2):  # a hung dnsperf is killed and run once more
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 15).stdout
            break
        except subprocess.TimeoutExpired:
            print(f"dns_bench: dnsperf did not finish (attempt {attempt}): {' '.join(cmd)}", file=sys.stderr)
    else:
        raise SystemExit("dns_bench: dnsperf hung twice")
    num = lambda key: float(re.search(key + r":\s+([0-9.]+)", out).group(1))
    res = {"completed": int(num("Queries completed")), "lost": int(num("Queries lost")),
           "qps": num("Queries per second"), "avg_ms": num(r"Average Latency \(s\)") * 1e3,
           "noerror": int((re.search(r"NOERROR (\d+)", out) or [0, 0])[1])}
    if rate:
        # "> NOERROR name A 0.000123" per reply; a lost query ("> T name A") counts as infinitely slow.
        lat = sorted(float(w[-1]) if re.fullmatch(r"[0-9.]+", w[-1]) else float("inf")
                     for w in (line.split() for line in out.splitlines() if line.startswith("> ")))
        res["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else float("nan")
        res["p50_ms"] = lat[len(lat) // 2] * 1e3 if lat else float("nan")
    return res


def start(kind, args, d, recs, port):
    """Writes the config and starts the server pinned to CPU 0; returns (process, reload, startup
    seconds). reload(new records) renders the new config and returns the function that applies it,
    so that the timed part of a reload excludes this script's own JSON/config rendering."""
    doc = listener_doc(recs, port)
    if kind == "dp":
        path = os.path.join(d, "dp.json")
        write_atomic(path, json.dumps(doc))
        admin = free_port()
        cmd = [args.dp, "run", "--proxy-type=dataplane", "--xds-file", path, "--admin-address",
               f"127.0.0.1:{admin}", "--readiness-port", "0", "--concurrency", "1", "--log-level", "warn"]
        def reload(new):
            text = json.dumps(listener_doc(new, port))
            return lambda: write_atomic(path, text)
    elif kind == "envoy":
        lds = os.path.join(d, "lds.json")
        write_atomic(lds, json.dumps(doc))
        admin = free_port()
        boot = {"node": {"id": "dns-bench", "cluster": "dns-bench"},
                "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
                "dynamicResources": {"ldsConfig": {"resourceApiVersion": "V3", "pathConfigSource": {"path": lds}}}}
        path = os.path.join(d, "envoy.json")
        write_atomic(path, json.dumps(boot))
        cmd = [args.envoy, "-c", path, "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
        def reload(new):
            text = json.dumps(listener_doc(new, port))
            return lambda: write_atomic(lds, text)
    else:
        path = os.path.join(d, "unbound.conf")
        write_atomic(path, unbound_conf(recs, port, d))
        cmd = [args.unbound, "-d", "-c", path]

        def reload(new):
            text = unbound_conf(new, port, d)

            def apply():
                write_atomic(path, text)
                subprocess.run([args.unbound_control, "-c", path, "reload"], check=True, capture_output=True)
            return apply
    log = open(os.path.join(d, f"{kind}.log"), "w")
    proc = subprocess.Popen(["taskset", "-c", "0"] + cmd, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    deadline = t0 + 120
    if kind == "dp":  # dp's readiness: the file applied
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except Exception:
                pass
            time.sleep(0.01)
    u, _, ip = recs[-1]
    if not wait_answer(port, u, ip, deadline, proc):
        proc.kill()
        raise SystemExit(f"dns_bench: {kind} did not answer {u} (log: {log.name})")
    return proc, reload, time.monotonic() - t0


def run_one(kind, args, d, recs, qfile):
    port = free_port()
    proc, reload, startup = start(kind, args, d, recs, port)
    try:
        # Every server must answer the same thing: spot-check a few names against their VIP
        # (three tries each: one lost datagram is not a wrong answer).
        for u, dotted, ip in recs[:: max(1, len(recs) // 5)]:
            got = [query(port, u, 1) for _ in range(3)]
            if [ip] not in got:
                raise SystemExit(f"dns_bench: {kind} answered {u} with {got}, want {ip}")
        c0 = cpu_seconds(proc.pid)
        fixed = dnsperf(args, port, qfile, args.fixed_seconds, args.rate)
        c1 = cpu_seconds(proc.pid)
        sat = dnsperf(args, port, qfile, args.seconds)
        c2 = cpu_seconds(proc.pid)
        time.sleep(0.5)  # RSS once the load is over
        m = mem(proc.pid)
        # Reload: one more name; the clock starts before the config is touched.
        new = names(len(recs) + 1)
        u, _, ip = new[-1]
        apply = reload(new)
        c3, t = cpu_seconds(proc.pid), time.monotonic()
        apply()
        if not wait_answer(port, u, ip, t + 30, proc):
            raise SystemExit(f"dns_bench: {kind} never answered {u} after the reload")
        reload_ms = (time.monotonic() - t) * 1e3
        reload_cpu_ms = (cpu_seconds(proc.pid) - c3) * 1e3
        return {"startup_s": startup, "max_qps": sat["qps"], "cpu_us_max": (c2 - c1) * 1e6 / max(1, sat["completed"]),
                "cpu_busy_max": (c2 - c1) / args.seconds, "p99_ms": fixed["p99_ms"], "p50_ms": fixed["p50_ms"],
                "lost_fixed": fixed["lost"], "cpu_us_fixed": (c1 - c0) * 1e6 / max(1, fixed["completed"]),
                "rss_idle_mib": m["VmRSS"], "rss_peak_mib": m["VmHWM"], "reload_ms": reload_ms,
                "reload_cpu_ms": reload_cpu_ms, "saturation": sat, "fixed": fixed}
    finally:
        proc.kill()
        proc.wait()


COLUMNS = [("max_qps", "max QPS", "{:,.0f}"), ("cpu_us_max", "CPU µs/query at max", "{:.2f}"),
           ("cpu_us_fixed", "CPU µs/query at {rate}", "{:.2f}"), ("p99_ms", "p99 ms at {rate}", "{:.3f}"),
           ("rss_idle_mib", "RSS idle MiB", "{:.1f}"), ("rss_peak_mib", "RSS peak MiB", "{:.1f}"),
           ("reload_ms", "reload ms", "{:.0f}")]


def versions(args):
    def first(cmd, pattern):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            m = re.search(pattern, out.stdout + out.stderr)
            return m.group(1) if m else "?"
        except OSError:
            return "?"
    return {"envoy": first([args.envoy, "--version"], r"version: \S+?/(\d+\.\d+\.\d+)/"),
            "unbound": first([args.unbound, "-V"], r"Version (\S+)"),
            "dnsperf": first(["dnsperf", "-H"], r"Version (\S+)")}


def markdown(args, med, cmdline, ver):
    rate = f"{args.rate:,} qps"
    out = [f"## DNS: {args.names:,} .mesh names", "",
           f"{args.names:,} Kuma-style services (`svc-<i>_ns-<i%50>_svc_80.mesh` and the dotted alias: "
           f"{2 * args.names:,} names, IPv4 VIPs from 240.0.0.0/4) served by each server in turn, pinned to CPU 0 "
           "(one worker thread); dnsperf on CPU 1 queries the underscore names (A, no EDNS) in a shuffled "
           f"order. Median of {args.runs} run(s); dp's figures carry their ratio to unbound (U) and Envoy (E) "
           "from the same runs.", "",
           "| server | " + " | ".join(h.format(rate=rate) for _, h, _ in COLUMNS) + " |",
           "|---|" + "---|" * len(COLUMNS)]
    for s in SERVERS:
        cells = []
        for key, _, fmt in COLUMNS:
            v = med[s][key]
            cell = fmt.format(v)
            if s == "dp":
                cell += f" (U {v / med['unbound'][key]:.2f}, E {v / med['envoy'][key]:.2f})"
            cells.append(cell)
        out.append(f"| {LABEL[s]} | " + " | ".join(cells) + " |")
    busy = ", ".join(f"{LABEL[s]} {med[s]['cpu_busy_max'] * 100:.0f}%" for s in SERVERS)
    lost = ", ".join(f"{LABEL[s]} {med[s]['lost_fixed']:.0f}" for s in SERVERS)
    sched = " under `chrt -f 1` (servers SCHED_FIFO, dnsperf SCHED_RR)" if client_sched() else ""
    out += ["",
            f"- Command: `{cmdline}`{sched}; Envoy {ver['envoy']}, unbound {ver['unbound']}, dnsperf {ver['dnsperf']}",
            f"- max QPS: `dnsperf -s 127.0.0.1 -p PORT -d QUERIES -l {args.seconds} -c 1 -T 1 -t 1 "
            f"-q {args.outstanding}` (no rate limit, {args.outstanding} queries outstanding); server CPU busy during "
            f"it: {busy} (near 100% = the server, not dnsperf, is the limit). CPU per query = utime+stime of the "
            "server process (/proc/PID/stat, all threads) over the run / queries completed.",
            f"- p99: `dnsperf ... -l {args.fixed_seconds} -Q {args.rate} -q 1000 -v`; dnsperf prints only the "
            "average, so the percentile is taken over the per-reply latencies `-v` prints (client-side, includes "
            "dnsperf's own timing; a lost query counts as infinitely slow). Queries lost in it (median): " + lost + ".",
            "- RSS idle: VmRSS 0.5 s after the load; RSS peak: VmHWM since start (includes loading the config).",
            "- reload: one name added (dp: atomic rewrite of `--xds-file`, which dp watches with inotify; Envoy: atomic "
            "rename of the LDS file; unbound: rewrite of unbound.conf + `unbound-control reload`) until a UDP query "
            "for it is answered (polled every ~1 ms).", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", required=True)
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--unbound", default=shutil.which("unbound") or "/usr/sbin/unbound")
    ap.add_argument("--unbound-control", default=shutil.which("unbound-control") or "/usr/sbin/unbound-control")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--names", type=int, default=10000)
    ap.add_argument("--rate", type=int, default=20000, help="fixed rate of the p99 run (qps)")
    ap.add_argument("--seconds", type=int, default=3, help="length of the max-QPS run")
    ap.add_argument("--fixed-seconds", type=int, default=3, help="length of the fixed-rate run")
    ap.add_argument("--outstanding", type=int, default=200, help="dnsperf -q of the max-QPS run")
    ap.add_argument("--quick", action="store_true", help="1 run, 2 s per load run (~20 s in all)")
    ap.add_argument("--out-md")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.seconds, args.fixed_seconds = 1, 2, 2
    for tool in ("dnsperf", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"dns_bench: `{tool}` not found (scripts/bench-setup.sh installs it)")
    d = tempfile.mkdtemp(prefix="dns-bench-")
    try:
        recs = names(args.names)
        qfile = os.path.join(d, "queries")
        order = [u for u, _, _ in recs]
        random.Random(5).shuffle(order)
        with open(qfile, "w") as f:
            f.writelines(f"{u} A\n" for u in order)
        runs = {s: [] for s in SERVERS}
        for i in range(args.runs):  # interleaved, so that drift on the machine hits all three alike
            for s in SERVERS:
                r = run_one(s, args, d, recs, qfile)
                runs[s].append(r)
                print(f"dns_bench: run {i + 1}/{args.runs} {s}: {r['max_qps']:,.0f} qps, "
                      f"{r['cpu_us_max']:.2f} µs/q, p99 {r['p99_ms']:.3f} ms, reload {r['reload_ms']:.0f} ms",
                      file=sys.stderr, flush=True)
        keys = [k for k, _, _ in COLUMNS] + ["cpu_busy_max", "startup_s", "p50_ms", "lost_fixed", "reload_cpu_ms"]
        med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in keys} for s in SERVERS}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    # Paths differ per machine: shown by their base name.
    cmdline = " ".join(["benches/dns_bench.py"] + [os.path.basename(a) if "/" in a else a for a in sys.argv[1:]])
    ver = versions(args)
    md = markdown(args, med, cmdline, ver)
    print(md)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k not in ("out_md", "json")},
                       "versions": ver, "sched_fifo": os.sched_getscheduler(0) == os.SCHED_FIFO,
                       "median": med, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
