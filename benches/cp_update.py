#!/usr/bin/env python3
"""cp's CPU for one-Dataplane changes at scale, on its own (issue 13).

Starts `cp` (memory store, zone `zone-1`), registers N Dataplanes of one service each
through the REST API, connects one `dp` zone ingress over Delta ADS (so every change is
also an xDS regeneration), then PUTs `--updates` new Dataplanes one at a time, waiting for
cp and the proxy to be idle after each. Prints cp's CPU time per change (utime + stime of
/proc/<pid>/stat: 10 ms resolution, but it keeps the time of threads that exited, which a
sum over live threads loses when tokio retires an idle blocking thread), the registration time (the REST PUTs, then until cp is idle again), and
cp's resident memory per Dataplane ((VmRSS with them - VmRSS before) / N, read when idle). Reuses the process helpers of xds_apply.py.

    python3 benches/cp_update.py --cp target/release/cp --dp target/release/dp
"""
import argparse, os, subprocess, sys, tempfile, time, types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xds_apply as X  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cp", required=True)
    ap.add_argument("--dp", required=True)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--updates", type=int, default=5)
    ap.add_argument("--perf", metavar="FILE", help="record cp with `perf record --call-graph dwarf` during the "
                    "updates only, into FILE (the CPU figures then include perf's overhead)")
    ap.add_argument("--perf-of", choices=("cp", "dp"), default="cp", help="the process --perf records")
    args = ap.parse_args()
    a = types.SimpleNamespace(dp=args.dp, cp=args.cp, envoy="", services=args.services)
    d = tempfile.mkdtemp(prefix="cp-update-")
    cp = X.ControlPlane(a.cp, d)
    try:
        cp.put("/meshes/default", X.MESH)
        X.wait_idle([cp.proc.pid], quiet=0.3, limit=60)
        rss0 = rss_kib(cp.proc.pid)
        t0, reg_cpu0, client0 = time.monotonic(), X.cpu_ticks_s(cp.proc.pid), time.process_time()
        reg = X.register(cp, a.services)
        client_cpu = time.process_time() - client0
        X.wait_idle([cp.proc.pid], quiet=0.3, limit=60)
        settled = time.monotonic() - t0 - 0.3  # the quiet period itself is not work
        reg_cpu = X.cpu_ticks_s(cp.proc.pid) - reg_cpu0
        rss1 = rss_kib(cp.proc.pid)
        open(os.path.join(d, "zone-token"), "w").write(cp.zone_token())
        proc, admin, listen, t0 = X.start_proxy("dp", a, cp, None, d, 0)
        if not X.wait_ready(admin, listen, t0 + 300):
            raise SystemExit("the dp zone ingress did not become ready")
        # Past the reconcilers' least interval (1 s): the ingress's join rewrites its
        # availableServices in a pass that may be held back that long, and it belongs here,
        # not to the first change.
        X.wait_idle([proc.pid, cp.proc.pid], quiet=1.2, limit=30)
        per = []
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-q", "-F", "299", "--call-graph", "dwarf,32768", "-o", args.perf,
                                     "-p", str(cp.proc.pid if args.perf_of == "cp" else proc.pid)], stdout=subprocess.DEVNULL)
            time.sleep(1)  # perf attaches before the first change
        for i in range(args.updates):
            c0 = X.cpu_ticks_s(cp.proc.pid)
            cp.put(f"/meshes/default/dataplanes/extra-{i}", X.dataplane(i * 97 % a.services, 60000 + i, name=f"extra-{i}"))
            # Longer than the reconcilers' least interval (1 s), so that a run held back by it
            # is counted with the change that caused it.
            X.wait_idle([proc.pid, cp.proc.pid], quiet=1.2, limit=15)
            per.append((X.cpu_ticks_s(cp.proc.pid) - c0) * 1e3)
        if perf:
            perf.send_signal(2)
            perf.wait()
        proc.stop()
    finally:
        cp.stop()
    in_order = ", ".join(f"{x:.0f}" for x in per)
    per.sort()
    print(f"{a.services} Dataplanes registered in {reg:.2f} s (REST), cp idle {settled:.2f} s after the first PUT, "
          f"cp CPU for them {reg_cpu:.2f} s (the Python client's: {client_cpu:.2f} s); "
          f"cp RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, {(rss1 - rss0) / a.services:.1f} KiB per Dataplane; "
          f"cp CPU per one-Dataplane change, ms: median {per[len(per) // 2]:.0f}, mean {sum(per) / len(per):.1f} (in order: {in_order})")


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    main()
