#!/usr/bin/env python3
"""xDS apply benchmark (issue 5): time and memory for dp and for Envoy to take the same
Kuma zone-ingress snapshot of N services (one EDS cluster, one ClusterLoadAssignment and
one tag-SNI filter chain per service), then a one-endpoint Delta update.

Two parts, each dp vs Envoy 1.40, the proxy pinned to CPU 0 (taskset -c 0, one worker),
this script and cp on CPU 1; medians of --runs runs:

1. File mode. dp reads the snapshot with --xds-file; Envoy gets the same resources as
   static_resources (dp's file turned into an Envoy bootstrap, EDS clusters becoming
   STATIC with the same endpoints). Wall time from process start until the admin /ready
   answers 200 with the listener bound, the proxy's CPU time until then, VmRSS / VmHWM
   0.5 s later.

2. Delta ADS through our control plane. One `cp run` (zone-1) gets a builtin-mTLS mesh and
   N Dataplanes (one service each, all on 127.0.0.1, different ports), registered through
   the REST API with concurrent keep-alive PUTs (the API has no bulk write). Per run a
   fresh proxy connects as ZoneIngress `ingress-01` over Delta ADS (dp: `--xds-variant
   DELTA_GRPC`, as dp's default is GRPC; Envoy: the bootstrap cp serves for a request with
   feature `feature-delta-grpc`, i.e. `api_type: DELTA_GRPC`, fetched before Envoy starts):
   * time from process start to ready (/ready 200 and the listener accepting), the proxy's
     CPU time until then, RSS 0.5 s later and the peak (VmHWM);
   * once proxy and cp are idle, one more Dataplane is PUT for an existing service (that
     service's ClusterLoadAssignment gains one endpoint; nothing else changes). Measured:
     (a) wall time from the PUT to the proxy logging that it applied the update (dp: its
     `applied xDS update (ACK)` line for ClusterLoadAssignment; Envoy: `Delta config for
     ...ClusterLoadAssignment accepted`, its `config` logger raised to debug through
     /logging after the start). It includes cp's 100 ms debounce and its regeneration of
     the N-service snapshot, the same for both proxies; the part after the first byte of
     cp's push reached the proxy's ADS socket (tcp_info bytes_received, polled every
     millisecond through sock_diag) is reported apart. (b) the proxy's CPU time from just
     before the PUT until proxy and cp are idle again (sum of its threads' on-CPU time from
     /proc/<pid>/task/*/schedstat, in nanoseconds; /proc/<pid>/stat's utime+stime, 10 ms
     ticks, is in the JSON too); for Envoy the PUT is made right after one of its 5-second
     stats flushes (a CPU burst of its own with thousands of clusters, recorded apart).
     (c) VmRSS then. (d) bytes its ADS connection received
     meanwhile (tcp_info). cp's CPU time for the update is recorded as well.
   The added Dataplane is deleted after each run (with no proxy connected), so every
   run starts from the same snapshot. dp and Envoy runs alternate.

No proxy's admin API is polled during a measurement window: a /config_dump or /stats of
N services would cost the proxy CPU. Under --sched fifo (the default when `chrt` is
allowed, as in scripts/bench.sh) cp and the proxies run SCHED_FIFO (priority 1 unless
--fifo-priority), so ordinary work on the machine does not preempt them. Other work can
still share the CPUs (another FIFO workload, interrupts), so each run waits for both CPUs
to be idle of other processes first (up to --quiet-wait s), and a run during which other
processes used more than 5 % of either CPU is repeated (up to --attempts tries); the
output says how many runs were repeated or kept disturbed. The binaries are copied first,
so a concurrent `cargo build` into the same target directory cannot swap them mid-run.

Usage:
  benches/xds_apply.py --dp $CARGO_TARGET_DIR/release/dp --envoy "$(scripts/bench-envoy-path.sh)"
                       [--cp .../cp] [--services 10000] [--runs 3] [--quick]
                       [--out-md FILE] [--json FILE] [--parts file,delta] [--sched fifo|other]
                       [--fifo-priority 1] [--attempts 3] [--quiet-wait 30] [--keep]
--quick: 1,000 services, 1 run (about 10 s); the full run takes about 80 s.
--cp defaults to `cp` beside --dp.
"""
import argparse, base64, concurrent.futures, http.client, json, os, shutil, signal, socket, ssl, statistics, subprocess
import struct, sys, tempfile, threading, time, urllib.request
from procfs import free_port, mem, schedstat_ns
import rest_load

PROXY_CPU = "0"
HELPER_CPU = "1"
ZONE = "zone-1"
MESH = {"type": "Mesh", "name": "default",
        "mtls": {"enabledBackend": "ca-1", "backends": [{"name": "ca-1", "type": "builtin"}]}}
EDS_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# Prefix of the commands of cp and the proxies: `chrt -f <--fifo-priority>` under --sched fifo.
# This script stays SCHED_OTHER except while it times an update (see `boosted`).
SCHED = []
SCHED_PRIORITY = [1]


# ---------------------------------------------------------------- /proc readings

def cpu_ns(pid):
    """On-CPU nanoseconds of all live threads of pid."""
    return schedstat_ns(pid, 0)


def cpu_ticks_s(pid):
    """utime + stime of /proc/<pid>/stat, in seconds (10 ms resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


_NL = None


def _sock_diag(sockid=None):
    """sock_diag request for established IPv4 TCP sockets with their tcp_info: a dump of all
    of them, or the one socket `sockid` (48 bytes of inet_diag_sockid). Yields
    (sockid, tcpi_bytes_received)."""
    global _NL
    if _NL is None:
        _NL = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4)  # NETLINK_SOCK_DIAG
    # inet_diag_req_v2: family, protocol, ext = 1 << (INET_DIAG_INFO - 1), pad, states = 1 << ESTABLISHED
    req = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 1 << 1, 1 << 1) + (sockid or bytes(48))
    flags = 0x1 if sockid else 0x301  # NLM_F_REQUEST (| NLM_F_DUMP)
    _NL.sendto(struct.pack("=IHHII", 16 + len(req), 20, flags, 1, 0) + req, (0, 0))  # SOCK_DIAG_BY_FAMILY
    while True:
        data = _NL.recv(1 << 16)
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if kind == 3:  # NLMSG_DONE
                return
            if kind == 2:  # NLMSG_ERROR (also the answer when the socket is gone)
                return
            msg = off + 16
            found = 0
            attr = msg + 72  # sizeof(inet_diag_msg)
            while attr + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, attr)
                if alen < 4:
                    break
                if atype == 2 and alen >= 4 + 136:  # INET_DIAG_INFO: struct tcp_info
                    found = struct.unpack_from("=Q", data, attr + 4 + 128)[0]  # tcpi_bytes_received
                attr += (alen + 3) & ~3
            yield bytes(data[msg + 4:msg + 52]), found
            off += (length + 3) & ~3
        if not sockid:
            continue
        return


def ads_socket(cp_port):
    """The client end of the connection to 127.0.0.1:cp_port (the proxy's ADS stream)."""
    for sockid, _ in list(_sock_diag()):  # read the whole dump before returning
        if struct.unpack_from(">H", sockid, 2)[0] == cp_port:
            return sockid
    return None


def ads_bytes(sockid):
    """Bytes received so far on that socket (tcpi_bytes_received): one netlink round trip
    and an exact socket lookup, nothing asked of the proxy."""
    for _, n in _sock_diag(sockid):
        return n
    return 0


def wait_bytes(sockid, above, timeout=60.0, every=0.001):
    """Polls until the socket has received more than `above` bytes: the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ads_bytes(sockid) > above:
            return time.monotonic()
        time.sleep(every)
    return None


def wait_idle(pids, quiet=0.2, limit=10.0, tolerance_ns=2_000_000):
    """Waits until none of pids used more than tolerance_ns of CPU for `quiet` seconds."""
    deadline = time.monotonic() + limit
    last = [cpu_ns(p) for p in pids]
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = [cpu_ns(p) for p in pids]
        if any(n - l > tolerance_ns for n, l in zip(now, last)):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


def after_burst(pid, limit=6.0, burst_ns=20_000_000):
    """Waits (up to `limit` s) for a burst of periodic work of pid (more than burst_ns of CPU
    within 100 ms) to start and end; returns the CPU nanoseconds of the burst (0: none).
    Envoy flushes its stats every 5 s (stats_flush_interval), which with thousands of
    clusters is a burst of its own: an update timed right after it is not charged with it."""
    deadline = time.monotonic() + limit
    samples = [(time.monotonic(), cpu_ns(pid))]

    def used_since(ago):
        t, c = samples[-1]
        return c - next(c0 for t0, c0 in samples if t0 >= t - ago)

    start = None
    while time.monotonic() < deadline:
        time.sleep(0.01)
        samples.append((time.monotonic(), cpu_ns(pid)))
        samples = samples[-30:]
        if start is None:
            if used_since(0.1) > burst_ns:
                start = next(c for t, c in samples if t >= samples[-1][0] - 0.1)
        elif used_since(0.05) < 500_000:
            return samples[-1][1] - start
    return 0


def cpu_busy_s():
    """Busy time of CPU 0 and CPU 1 so far (user, nice, system, irq, softirq, steal), seconds."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *v = line.split()
            if name in (f"cpu{PROXY_CPU}", f"cpu{HELPER_CPU}"):
                v = [int(x) for x in v]
                out[name[3:]] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    return out


def run_wait_ns(pid):
    """Nanoseconds the live threads of pid spent runnable but waiting for a CPU."""
    return schedstat_ns(pid, 1)


class Others:
    """Whether other work on the machine got in the way of a run: how long our proxy and cp
    waited for their CPU while runnable (schedstat run delay), and, for the record, how much
    CPU time processes other than ours used on the two CPUs (busy time from /proc/stat minus
    our proxy's on CPU 0 and cp's and this script's on CPU 1)."""

    def __init__(self, proxy_pid=None, cp_pid=None):
        self.proxy_pid, self.cp_pid = proxy_pid, cp_pid
        self.start = self._sample()

    def _sample(self):
        # Process totals (utime + stime, exited threads included), in the same ticks as /proc/stat.
        busy = cpu_busy_s()
        ours0 = cpu_ticks_s(self.proxy_pid) if self.proxy_pid else 0.0
        ours1 = cpu_ticks_s(os.getpid()) + (cpu_ticks_s(self.cp_pid) if self.cp_pid else 0.0)
        waits = [run_wait_ns(p) / 1e9 if p else 0.0 for p in (self.proxy_pid, self.cp_pid)]
        return time.monotonic(), busy[PROXY_CPU] - ours0, busy[HELPER_CPU] - ours1, waits

    def set_proxy(self, pid):
        """The proxy started after the baseline was taken (its times then were 0)."""
        self.proxy_pid = pid

    def finish(self):
        """Takes the final sample (while the proxy still runs)."""
        self.end = self._sample()

    def used(self):
        """Until finish() (or now): seconds elapsed, other processes' CPU seconds on CPU 0 and
        on CPU 1, and the run delays of the proxy and of cp in seconds."""
        t, o0, o1, (w0, w1) = getattr(self, "end", None) or self._sample()
        _, s0, s1, (v0, v1) = self.start
        return t - self.start[0], max(0.0, o0 - s0), max(0.0, o1 - s1), w0 - v0, w1 - v1

    def disturbed(self, share=0.05, floor=0.05):
        """Other processes used more than `share` of CPU 0 or of CPU 1 during the run (and
        more than `floor` s). (The run delays are recorded, not judged: the threads of one
        process pinned to one CPU wait for each other too.)"""
        wall, o0, o1, w_proxy, w_cp = self.used()
        limit = max(floor, share * wall)
        return o0 > limit or o1 > limit, (o0, o1, w_proxy, w_cp)


def wait_quiet(limit, cp_pid=None, window=0.5, share=0.05):
    """Waits up to `limit` s for a `window` in which other processes used under `share` of
    each CPU; returns whether one came."""
    deadline = time.monotonic() + limit
    while True:
        o = Others(cp_pid=cp_pid)
        time.sleep(window)
        if not o.disturbed(share, floor=0.0)[0]:
            return True
        if time.monotonic() >= deadline:
            return False


QUIET_WAIT = [30.0]  # --quiet-wait


def attempt(what, run_once, attempts, cp_pid=None):
    """Runs run_once() (which returns (row, Others)) until a run was not disturbed by other
    work on the machine, at most `attempts` times, each after waiting (up to --quiet-wait)
    for the CPUs to be free of other work; the last row is kept either way."""
    for i in range(attempts):
        if not wait_quiet(0.0, cp_pid):
            print(f"  {what}: other processes are using the CPUs; waiting up to {QUIET_WAIT[0]:.0f} s",
                  file=sys.stderr)
            if not wait_quiet(QUIET_WAIT[0], cp_pid):
                print(f"  {what}: still busy; measuring anyway", file=sys.stderr)
        row, others = run_once()
        bad, (o0, o1, w_proxy, w_cp) = others.disturbed()
        row.update(others_cpu_s=[round(o0, 3), round(o1, 3)], run_delay_s=[round(w_proxy, 4), round(w_cp, 4)],
                   attempts=i + 1)
        if not bad:
            return row
        print(f"  {what}: other processes used {o0:.2f} s of CPU 0 and {o1:.2f} s of CPU 1 during the run; "
              f"{'again' if i + 1 < attempts else 'kept (no attempts left)'}", file=sys.stderr)
        row["disturbed"] = True
    return row


class boosted:
    """Under --sched fifo: the given threads of this script (and the calling one) run at
    SCHED_FIFO one above cp's priority inside the block (cp shares this CPU), so that the
    instants they take are not delayed by cp's work. Only while no child exits: a reaping
    thread above a dying child on its CPU can spin in the kernel (shrink_dcache_parent)
    waiting for that child forever."""

    def __init__(self, *threads):
        self.tids = [threading.get_native_id()] + [t.native_id for t in threads]

    def _set(self, policy, prio):
        if SCHED:
            for tid in self.tids:
                try:
                    os.sched_setscheduler(tid, policy, os.sched_param(prio))
                except OSError:
                    pass

    def __enter__(self):
        self._set(os.SCHED_FIFO, SCHED_PRIORITY[0] + 1)

    def __exit__(self, *exc):
        self._set(os.SCHED_OTHER, 0)


# ---------------------------------------------------------------- processes

class Proc:
    """A child process whose stdout+stderr lines are collected with arrival times."""

    def __init__(self, cmd, env=None, log_path=None):
        self.lines = []  # (monotonic time, line)
        self.cv = threading.Condition()
        self.log = open(log_path, "w") if log_path else None
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=env)
        self.pid = self.p.pid
        self.reader = threading.Thread(target=self._follow, daemon=True)
        self.reader.start()

    def _follow(self):
        for raw in self.p.stdout:
            t = time.monotonic()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if self.log:
                self.log.write(line + "\n")
            with self.cv:
                self.lines.append((t, line))
                self.cv.notify_all()
        if self.log:
            self.log.close()

    def mark(self):
        with self.cv:
            return len(self.lines)

    def wait_line(self, parts, start=0, timeout=30.0):
        """First line from index `start` containing every one of parts: (time, line)."""
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

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait()
        self.reader.join(5)  # it closes the log at end of output


def request(method, addr, path, body=None, headers=None, timeout=10, conn=None):
    c = conn or http.client.HTTPConnection(*addr.rsplit(":", 1), timeout=timeout)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    c.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
    r = c.getresponse()
    out = r.read()
    if conn is None:
        c.close()
    return r.status, out


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


# ---------------------------------------------------------------- part 1: file mode

def resources(n, port):
    out = []
    chains = []
    for i in range(n):
        name = f"default:svc-{i}"
        out.append({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": name, "type": "EDS",
                    "connectTimeout": "5s", "edsClusterConfig": {"edsConfig": {"ads": {}, "resourceApiVersion": "V3"}}})
        out.append({"@type": EDS_TYPE, "clusterName": name,
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


def run_file_once(cmd, admin_port, listen_port):
    others = Others()
    start = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    others.set_proxy(p.pid)
    try:
        if not wait_ready(admin_port, listen_port, start + 300):
            raise SystemExit(f"not ready: {cmd[0]}")
        took = time.monotonic() - start
        cpu = cpu_ns(p.pid) / 1e9
        time.sleep(0.5)  # let freed memory settle before reading RSS
        st = mem(p.pid)
        others.finish()
        return {"ready_s": took, "ready_cpu_s": cpu, "rss_mib": st["VmRSS"], "peak_mib": st["VmHWM"]}, others
    finally:
        p.kill()
        p.wait()


def summarize(runs):
    """Medians of the numeric figures of the runs, plus every run's figures under `runs`."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    row = {k: statistics.median(r[k] for r in runs) for k in keys}
    row["runs"] = {k: [r.get(k) for r in runs] for k in list(runs[0]) + ["disturbed"] if k != "update_log"}
    row["disturbed_runs"] = sum(1 for r in runs if r.get("disturbed"))
    row["repeated_runs"] = sum(r.get("attempts", 1) - 1 for r in runs)
    return row


def file_mode(a, d):
    runs = {"dp": [], "envoy": []}
    for _ in range(a.runs):
        for name in runs:  # interleaved, so that drift affects both alike
            def once(name=name):
                admin, listen = free_port(), free_port()
                res = resources(a.services, listen)
                if name == "dp":
                    path = os.path.join(d, "dp.json")
                    json.dump({"version_info": "1", "resources": res}, open(path, "w"))
                    cmd = SCHED + ["taskset", "-c", PROXY_CPU, a.dp, "run", "--proxy-type=ingress", "--xds-file",
                                   path, "--admin-address", f"127.0.0.1:{admin}", "--readiness-port", "0",
                                   "--concurrency", "1", "--log-level", "warn"]
                else:
                    path = os.path.join(d, "envoy.json")
                    json.dump(envoy_bootstrap(res, admin), open(path, "w"))
                    cmd = SCHED + ["taskset", "-c", PROXY_CPU, a.envoy, "-c", path, "--concurrency", "1",
                                   "--disable-hot-restart", "--log-level", "warn"]
                return run_file_once(cmd, admin, listen)

            r = attempt(f"file {name}", once, a.attempts)
            runs[name].append(r)
            print(f"  file {name}: ready {r['ready_s']:.2f} s (CPU {r['ready_cpu_s']:.2f} s), RSS {r['rss_mib']:.1f} "
                  f"MiB, peak {r['peak_mib']:.1f} MiB", file=sys.stderr)
    return {name: summarize(rs) for name, rs in runs.items()}


# ---------------------------------------------------------------- part 2: Delta ADS through cp

class ControlPlane:
    def __init__(self, cp_bin, d, name="cp", env=None, kds=False):
        """A `cp run` in `<d>/<name>`: a standalone zone ZONE, or what `env` says (mode, zone,
        global address); `kds` also serves KDS (global) on any free port."""
        self.dir = os.path.join(d, name)
        os.makedirs(self.dir, exist_ok=True)
        addr_file = os.path.join(self.dir, "addresses.json")
        env = dict(os.environ, KUMA_GENERAL_WORK_DIR=self.dir, **(env or {"KUMA_MULTIZONE_ZONE_NAME": ZONE}))
        self.proc = Proc(SCHED + ["taskset", "-c", HELPER_CPU, cp_bin, "run", "--bind-address", "127.0.0.1",
                          "--dp-server-port", "0", "--api-port", "0", "--address-file", addr_file]
                         + (["--kds-port", "0"] if kds else []),
                         env=env, log_path=os.path.join(self.dir, "cp.log"))
        deadline = time.monotonic() + 30
        while not os.path.exists(addr_file):
            if time.monotonic() > deadline or self.proc.p.poll() is not None:
                raise SystemExit(f"{name} did not start; see {self.dir}/cp.log")
            time.sleep(0.02)
        v = json.load(open(addr_file))
        self.api, self.ca_file = v["api"], v["ca_cert_file"]
        self.dp_server, self.kds = v.get("dp_server"), v.get("kds")
        self.dp_port = int(self.dp_server.rsplit(":", 1)[1]) if self.dp_server else 0

    def get(self, path):
        st, out = request("GET", self.api, path, timeout=30)
        if st != 200:
            raise SystemExit(f"GET {path}: {st} {out[:300]!r}")
        return json.loads(out)

    def put(self, path, body, conn=None):
        st, out = request("PUT", self.api, path, body, conn=conn)
        if st not in (200, 201):
            raise SystemExit(f"PUT {path}: {st} {out[:300]!r}")

    def delete(self, path):
        st, out = request("DELETE", self.api, path)
        if st != 200:
            raise SystemExit(f"DELETE {path}: {st} {out[:300]!r}")

    def zone_token(self):
        st, out = request("POST", self.api, "/tokens/zone", {"zone": ZONE, "scope": ["ingress"]})
        if st != 200:
            raise SystemExit(f"zone token: {st} {out[:300]!r}")
        return out.decode().strip()

    def bootstrap(self, token, ingress):
        """POST /bootstrap as kuma-dp would for Envoy 1.40 with Delta xDS: the bootstrap YAML."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        c = http.client.HTTPSConnection("127.0.0.1", self.dp_port, context=ctx, timeout=30)
        body = {"mesh": "", "name": ingress["name"], "proxyType": "ingress", "dataplaneToken": token,
                "dataplaneResource": json.dumps(ingress), "operatingSystem": "linux",
                "features": ["feature-delta-grpc"],
                "version": {"kumaDp": {"version": "2.14.3"}, "envoy": {"version": "1.40.0", "kumaDpCompatible": True}}}
        st, out = request("POST", None, "/bootstrap", body, headers={"accept": "application/json"}, conn=c)
        c.close()
        if st != 200:
            raise SystemExit(f"bootstrap: {st} {out[:300]!r}")
        return base64.b64decode(json.loads(out)["bootstrap"])

    def stop(self):
        self.proc.stop()


def dataplane(i, port, name=None):
    return {"type": "Dataplane", "mesh": "default", "name": name or f"dp-{i}",
            "networking": {"address": "127.0.0.1", "inbound": [{"port": port, "tags": {"kuma.io/service": f"svc-{i}"}}]}}


def register(cp, n, workers=8):
    """PUTs n Dataplanes with `workers` keep-alive connections (threads; requests encoded
    before the clock starts, see rest_load.py); returns seconds taken."""
    requests = [(f"dp-{i}", rest_load.put_request(cp.api, f"/meshes/default/dataplanes/dp-{i}",
                                                  dataplane(i, 20000 + i % 40000))) for i in range(n)]
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(rest_load.send, cp.api, requests[w::workers]) for w in range(workers)]:
            f.result()
    return time.monotonic() - start


def start_proxy(kind, a, cp, token, d, run):
    """Starts dp or Envoy as ZoneIngress ingress-01 over Delta ADS: (Proc, admin port, listener port, t0)."""
    admin, listen = free_port(), free_port()
    ingress = {"type": "ZoneIngress", "name": "ingress-01",
               "networking": {"address": "127.0.0.1", "port": listen, "advertisedAddress": "127.0.0.1",
                              "advertisedPort": listen, "admin": {"port": admin}}}
    log = os.path.join(d, f"{kind}-delta-{run}.log")
    if kind == "dp":
        token_file = os.path.join(d, "zone-token")
        ingress_file = os.path.join(d, "ingress.json")
        json.dump(ingress, open(ingress_file, "w"))
        cmd = SCHED + ["taskset", "-c", PROXY_CPU, a.dp, "run", "--proxy-type=ingress",
               f"--cp-address=https://127.0.0.1:{cp.dp_port}", "--dataplane-token-file", token_file,
               "--ca-cert-file", cp.ca_file, "--dataplane-file", ingress_file, "--xds-variant", "DELTA_GRPC",
               "--admin-address", f"127.0.0.1:{admin}", "--readiness-port", "0", "--concurrency", "1",
               "--log-level", "info"]
    else:
        # What kuma-dp does for Envoy: fetch the bootstrap, then run Envoy on it (the fetch is
        # outside Envoy's timing; dp's timing includes its own /bootstrap request).
        boot = os.path.join(d, "envoy-bootstrap.yaml")
        open(boot, "wb").write(cp.bootstrap(token, ingress))
        cmd = SCHED + ["taskset", "-c", PROXY_CPU, a.envoy, "-c", boot, "--concurrency", "1", "--disable-hot-restart",
               "--log-level", "info"]
    t0 = time.monotonic()
    return Proc(cmd, log_path=log), admin, listen, t0


def delta_run(kind, a, cp, token, d, run, service):
    others = Others(cp_pid=cp.proc.pid)
    proc, admin, listen, t0 = start_proxy(kind, a, cp, token, d, run)
    others.set_proxy(proc.pid)
    extra = f"extra-{kind}-{run}"
    try:
        if not wait_ready(admin, listen, t0 + 300):
            tail = "\n".join(l for _, l in proc.lines[-20:])
            raise SystemExit(f"{kind} not ready over Delta ADS; last lines:\n{tail}")
        ready = time.monotonic() - t0
        ready_cpu = cpu_ns(proc.pid) / 1e9
        time.sleep(0.5)
        st = mem(proc.pid)
        sock = ads_socket(cp.dp_port)
        if sock is None:
            raise SystemExit(f"{kind}: no ADS connection to port {cp.dp_port} found")
        snapshot_bytes = ads_bytes(sock)
        if kind == "envoy":
            # Envoy says when a Delta response was accepted at debug level, logger `config`.
            code, out = request("POST", f"127.0.0.1:{admin}", "/logging?config=debug")
            if code != 200:
                raise SystemExit(f"envoy /logging: {code} {out[:200]!r}")
            done = ["Delta config for", EDS_TYPE, "accepted with 1 resources added"]
        else:
            done = ["applied xDS update (ACK)", EDS_TYPE, "upserts=1 "]
        # Start from quiet: after the start-up cp regenerates once more (its availableServices
        # tracker rewrites the ZoneIngress) and finds nothing to send.
        if not wait_idle([proc.pid, cp.proc.pid], quiet=0.3, limit=20):
            print(f"  warning: {kind} or cp not idle before the update", file=sys.stderr)
        # Envoy's stats flush (every 5 s, ~0.15 s of CPU with 10,000 clusters) would otherwise
        # land in one update window out of a few; dp has no such periodic work.
        flush_ns = after_burst(proc.pid) if kind == "envoy" else 0
        mark = proc.mark()
        with boosted(proc.reader):
            cpu0, ticks0, bytes0, cp0 = cpu_ns(proc.pid), cpu_ticks_s(proc.pid), ads_bytes(sock), cpu_ns(cp.proc.pid)
            t1 = time.monotonic()
            cp.put(f"/meshes/default/dataplanes/{extra}", dataplane(service, 60000 + run, name=extra))
            t_recv = wait_bytes(sock, bytes0)  # the first bytes of cp's push reach the proxy's socket
            t2, line = proc.wait_line(done, start=mark, timeout=60)
            wait_idle([proc.pid, cp.proc.pid], quiet=0.2, limit=5)
            cpu1, ticks1, bytes1, cp1 = cpu_ns(proc.pid), cpu_ticks_s(proc.pid), ads_bytes(sock), cpu_ns(cp.proc.pid)
        after = mem(proc.pid)
        if t2 < t1:
            raise SystemExit(f"{kind}: the applied line came before the update was made: {line}")
        if t_recv is None or t_recv > t2 + 0.002:
            print(f"  warning: {kind}: push seen on the socket at {t_recv}, after the applied line at {t2}",
                  file=sys.stderr)
        # Both instants are taken by this script to about a millisecond: a proxy that applies
        # within that shows 0.
        t_recv = min(t_recv or t2, t2)
        updates = [l for _, l in proc.lines[mark:] if ("applied xDS update" in l or "Delta config for" in l)]
        row = {"ready_s": ready, "ready_cpu_s": ready_cpu, "rss_mib": st["VmRSS"], "peak_mib": st["VmHWM"],
               "update_s": t2 - t1, "update_cp_s": t_recv - t1, "update_proxy_s": t2 - t_recv,
               "update_cpu_ms": (cpu1 - cpu0) / 1e6, "update_cpu_ticks_ms": (ticks1 - ticks0) * 1000,
               "update_rss_mib": after["VmRSS"], "update_peak_mib": after["VmHWM"],
               "update_bytes": bytes1 - bytes0, "snapshot_bytes": snapshot_bytes,
               "update_cp_cpu_ms": (cp1 - cp0) / 1e6, "periodic_burst_ms": flush_ns / 1e6, "update_log": updates}
        print(f"  delta {kind} run {run}: ready {ready:.2f} s (CPU {ready_cpu:.2f} s), RSS {st['VmRSS']:.1f} MiB "
              f"(peak {st['VmHWM']:.1f}); update {row['update_s'] * 1000:.0f} ms (cp {row['update_cp_s'] * 1000:.0f} "
              f"+ proxy {row['update_proxy_s'] * 1000:.1f}), CPU {row['update_cpu_ms']:.1f} ms, "
              f"RSS {after['VmRSS']:.1f} MiB, {bytes1 - bytes0} B received; cp CPU {row['update_cp_cpu_ms']:.0f} ms",
              file=sys.stderr)
        for l in updates:
            print(f"    {l[:200]}", file=sys.stderr)
        others.finish()
        return row, others
    finally:
        proc.stop()
        # Back to the same snapshot for the next run (no proxy connected now).
        try:
            cp.delete(f"/meshes/default/dataplanes/{extra}")
        except SystemExit:
            pass


def delta_mode(a, d):
    cp = ControlPlane(a.cp, d)
    try:
        cp.put("/meshes/default", MESH)
        reg = register(cp, a.services)
        print(f"  registered {a.services} Dataplanes in {reg:.2f} s ({a.services / reg:.0f}/s)", file=sys.stderr)
        token = cp.zone_token()
        open(os.path.join(d, "zone-token"), "w").write(token)
        wait_idle([cp.proc.pid], quiet=0.3, limit=60)
        runs = {"dp": [], "envoy": []}
        for r in range(a.runs):  # interleaved, so that drift affects both alike
            for kind in runs:
                service = (r * 7919 + (0 if kind == "dp" else 1)) % a.services
                runs[kind].append(attempt(f"delta {kind}", lambda: delta_run(kind, a, cp, token, d, r, service),
                                          a.attempts, cp.proc.pid))
                wait_idle([cp.proc.pid], quiet=0.3, limit=30)
        rows = {}
        for kind, rs in runs.items():
            rows[kind] = summarize(rs)
            rows[kind]["update_log"] = rs[-1]["update_log"]
        return rows, reg
    finally:
        cp.stop()


# ---------------------------------------------------------------- output

def ratio(v, e, floor=0.0):
    """v / e; when e is below the measurement's resolution `floor`, a bound with the floor."""
    if floor and e < floor:
        return f"> {v / floor:.0f}" if v >= floor else "~1"
    return f"{v / e:.2f}" if e else "-"


def markdown(a, file_rows, delta_rows, reg, started):
    n = f"{a.services:,}"
    out = [f"## xDS: {n}-service zone-ingress snapshot", ""]
    out.append(f"Command: `python3 benches/xds_apply.py {' '.join(a.argv)}` "
               f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}). "
               f"Proxies pinned to CPU 0 (`taskset -c 0`, one worker thread), cp and the script to CPU 1"
               f"{f' (cp and the proxies under SCHED_FIFO priority {a.fifo_priority}; the script one above while it times an update)' if a.fifo else ''}. "
               f"dp and cp from {a.versions['source']} ({a.versions['dp']}); Envoy {a.versions['envoy']}. "
               f"Medians of {a.runs} run(s), dp and Envoy alternating; (E x) = the figure ÷ Envoy's.")
    rows = [r for r in (file_rows or {}).values()] + [r for r in (delta_rows or {}).values()]
    repeated, disturbed = sum(r["repeated_runs"] for r in rows), sum(r["disturbed_runs"] for r in rows)
    out.append(f"Each run starts when other processes leave both CPUs idle (waiting up to {a.quiet_wait:.0f} s); a "
               f"run during which they used more than 5 % of CPU 0 or CPU 1 is repeated, up to {a.attempts} tries: "
               f"{repeated} repeated"
               + (f", {disturbed} still disturbed and kept" if disturbed else ", none kept disturbed") + ".")
    out.append("")
    if file_rows:
        out.append(f"File mode: the same Kuma-shaped ingress snapshot ({n} EDS clusters, {n} load assignments, one "
                   f"listener with {n} tag-SNI chains); dp reads it with `--xds-file`, Envoy as `static_resources` "
                   f"(STATIC clusters). Time from process start to `/ready` 200 with the listener accepting; "
                   f"RSS 0.5 s later; CPU to ready is the proxy's CPU time until then.")
        out.append("")
        out.append("| target | time to ready s | CPU to ready s | RSS after MiB | RSS peak MiB |")
        out.append("|---|---|---|---|---|")
        e = file_rows["envoy"]
        for name, r in file_rows.items():
            out.append(f"| {name} | {r['ready_s']:.2f} (E {ratio(r['ready_s'], e['ready_s'])}) | "
                       f"{r['ready_cpu_s']:.2f} (E {ratio(r['ready_cpu_s'], e['ready_cpu_s'])}) | "
                       f"{r['rss_mib']:.1f} (E {ratio(r['rss_mib'], e['rss_mib'])}) | "
                       f"{r['peak_mib']:.1f} (E {ratio(r['peak_mib'], e['peak_mib'])}) |")
        out.append("")
    if delta_rows:
        out.append(f"Delta ADS from our `cp` (zone `{ZONE}`, {n} Dataplanes of one service each, registered by "
                   f"concurrent REST PUTs in {reg:.1f} s): the proxy connects as ZoneIngress and gets {n} clusters, "
                   f"{n} load assignments and a listener with {n} SNI chains (dp: `--xds-variant DELTA_GRPC`; Envoy "
                   f"1.40 on the bootstrap cp serves for `feature-delta-grpc`, `api_type: DELTA_GRPC`). Then one "
                   f"Dataplane is added to an existing service: one ClusterLoadAssignment changes. "
                   f"*Time to ready*: process start to `/ready` 200 with the listener accepting (dp's includes its "
                   f"own `/bootstrap` request; Envoy's bootstrap is fetched before it starts); *CPU to ready*: the "
                   f"proxy's CPU time until then. *Update wall*: from the REST PUT to the proxy's log line saying "
                   f"it applied the update (dp: `applied xDS update (ACK)`; Envoy: `Delta config for ... accepted`, "
                   f"logger `config` at debug); it includes cp's 100 ms debounce and its regeneration of the "
                   f"{n}-service snapshot, the same for both proxies. *Of which proxy*: from the first byte of cp's "
                   f"push arriving on the proxy's ADS socket (tcp_info `bytes_received` polled through sock_diag "
                   f"every ms) to that log line. *Update CPU*: the proxy's on-CPU time, all threads "
                   f"(`/proc/<pid>/task/*/schedstat`), from the PUT until proxy and cp are idle again. *Bytes*: what its ADS "
                   f"connection received meanwhile (TLS records of the Delta response with gRPC and HTTP/2 framing).")
        out.append("")
        out.append("| target | time to ready s | CPU to ready s | RSS after MiB | RSS peak MiB | update wall ms | "
                   "of which proxy ms | update CPU ms | RSS after update MiB | update bytes received |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        e = delta_rows["envoy"]
        for name in ("dp", "envoy"):
            r = delta_rows[name]

            def cell(key, fmt, scale=1, floor=0.0):
                return f"{format(r[key] * scale, fmt)} (E {ratio(r[key], e[key], floor)})"

            out.append(f"| {name} | {cell('ready_s', '.2f')} | {cell('ready_cpu_s', '.2f')} | "
                       f"{cell('rss_mib', '.1f')} | {cell('peak_mib', '.1f')} | {cell('update_s', '.0f', 1000)} | "
                       f"{cell('update_proxy_s', '.1f', 1000, 0.001)} | {cell('update_cpu_ms', '.1f')} | "
                       f"{cell('update_rss_mib', '.1f')} | {cell('update_bytes', '.0f')} |")
        out.append("")
        out.append(f"Envoy, idle with the {n} services, flushes its stats every 5 s at a cost of "
                   f"{delta_rows['envoy']['periodic_burst_ms']:.0f} ms of CPU (median burst); its updates are timed "
                   f"right after such a flush, so that the update CPU does not include one. "
                   "Initial snapshot received over ADS: " + ", ".join(
            f"{k} {delta_rows[k]['snapshot_bytes'] / 1048576:.2f} MiB" for k in ("dp", "envoy")) + ". "
                   "cp's CPU time for the one-endpoint update (PUT until cp and proxy are idle again): " + ", ".join(
            f"{delta_rows[k]['update_cp_cpu_ms']:.0f} ms with {k}" for k in ("dp", "envoy")) + " (it varies from "
                   "run to run with whether cp regenerates the snapshot once or twice: the ZoneIngress "
                   "`availableServices` rewrite that follows the Dataplane change may fall in the same debounce "
                   "window or not).")
        out.append("")
    out.append(f"Script wall time: {time.monotonic() - a.t_start:.0f} s.")
    return "\n".join(out) + "\n"


def binaries(a, d):
    """Copies dp and cp into the work directory (a concurrent `cargo build` into the same target
    directory cannot swap them mid-run) and describes what is measured."""
    out = {}
    os.makedirs(os.path.join(d, "bin"))
    for name in ("dp", "cp"):
        src = getattr(a, name)
        dst = os.path.join(d, "bin", name)
        shutil.copy2(src, dst)
        mtime = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.stat(src).st_mtime))
        out[name] = f"{os.path.basename(src)} built {mtime}"
        setattr(a, name, dst)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "diff", "--quiet"]).returncode != 0
        out["source"] = head + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        out["source"] = "unknown"
    try:
        v = subprocess.run([a.envoy, "--version"], capture_output=True, text=True).stdout
        out["envoy"] = next((w for w in v.split() if "/RELEASE/" in w or "/DEBUG/" in w), v.strip()[-60:])
    except OSError:
        out["envoy"] = "unknown"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dp", required=True)
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--cp", help="cp binary (default: `cp` beside --dp)")
    ap.add_argument("--services", type=int)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--quick", action="store_true", help="1,000 services, 1 run")
    ap.add_argument("--parts", default="file,delta", help="file, delta or both (default)")
    ap.add_argument("--out-md", help="also write the markdown section here")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--sched", choices=("fifo", "other"), default=os.environ.get("BENCH_SCHED", "fifo"),
                    help="fifo (default when allowed, as in scripts/bench.sh): cp and the proxies run SCHED_FIFO "
                         "priority 1 so that other work on the machine does not preempt them; other: no chrt")
    ap.add_argument("--attempts", type=int, default=3,
                    help="tries per run when other processes used the CPUs meanwhile (default 3)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="before each run, wait up to this many seconds for other processes to leave the CPUs "
                         "idle (default 30)")
    ap.add_argument("--fifo-priority", type=int, default=1,
                    help="SCHED_FIFO priority of cp and the proxies under --sched fifo (default 1, as "
                         "scripts/bench.sh; raise it when another FIFO workload at that priority shares the CPUs)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    a = ap.parse_args()
    a.argv = sys.argv[1:]
    SCHED_PRIORITY[0] = a.fifo_priority
    QUIET_WAIT[0] = a.quiet_wait
    a.t_start = time.monotonic()
    a.services = a.services or (1000 if a.quick else 10000)
    a.runs = a.runs or (1 if a.quick else 3)
    a.cp = a.cp or os.path.join(os.path.dirname(os.path.abspath(a.dp)), "cp")
    parts = set(a.parts.split(","))
    try:
        os.sched_setaffinity(0, {int(HELPER_CPU)})
    except OSError:
        pass
    a.fifo = False
    if a.sched == "fifo":
        try:
            subprocess.run(["chrt", "-f", "1", "true"], check=True, capture_output=True)
            SCHED[:] = ["chrt", "-f", str(a.fifo_priority)]
            a.fifo = True
        except (OSError, AttributeError, subprocess.CalledProcessError):
            print("xds_apply: SCHED_FIFO not allowed; running under the normal scheduler", file=sys.stderr)
    started = time.time()
    d = tempfile.mkdtemp(prefix="xds-apply-")
    try:
        a.versions = binaries(a, d)
        file_rows = delta_rows = None
        reg = 0.0
        if "file" in parts:
            print(f"xds_apply: file mode, {a.services} services", file=sys.stderr)
            file_rows = file_mode(a, d)
        if "delta" in parts:
            print(f"xds_apply: Delta ADS through cp, {a.services} services", file=sys.stderr)
            delta_rows, reg = delta_mode(a, d)
        md = markdown(a, file_rows, delta_rows, reg, started)
        print(md)
        if a.out_md:
            open(a.out_md, "w").write(md)
        if a.json:
            json.dump({"services": a.services, "runs": a.runs, "date": started, "versions": a.versions,
                       "file": file_rows,
                       "delta": delta_rows, "register_s": reg, "script_s": time.monotonic() - a.t_start},
                      open(a.json, "w"), indent=2)
    finally:
        if a.keep:
            print(f"xds_apply: logs in {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
