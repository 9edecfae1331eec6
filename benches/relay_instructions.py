#!/usr/bin/env python3
"""User-space instructions per request of a sidecar pair on kept connections, by callgrind.

Why: the kept-connection p99 of benches/mtls_bench.py moves with the machine from run to
run; the instructions a sidecar executes per request do not, and they say where its CPU
goes (callgrind_annotate on the files this leaves). A sidecar pair as mtls_bench.py builds
it (inbound: mTLS terminated; outbound: mTLS originated with the target's SNI) runs under
callgrind twice, with 4 kept connections at 100 requests/s for --short and for --long
seconds; (instructions of the long run - of the short one) / (requests more) is the cost
of a request, without start-up, handshakes and shutdown. Each --target is NAME=KIND:PATH,
KIND `dp` (Kuma's tag SNI) or `rustls` (the rustls-era dp, a DNS SNI).

--cache-sim adds callgrind's cache simulation (an L1 instruction and data cache and a
last-level cache, each process alone): misses per request, for when the instructions are
equal and the time is not. This VM has no hardware counters to count real ones.

Usage: benches/relay_instructions.py --loadgen LOADGEN --target dp=dp:DP [--target old=rustls:DP]
       [--short 5] [--long 15] [--keep DIR] [--cache-sim [--valgrind-arg=--D1=4096,2,64 ...]]
"""
import argparse, json, os, shutil, subprocess, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mtls_bench as mb  # noqa: E402
import symbol_order as so  # noqa: E402

RATE, CONNS = 100, 4


def totals(callgrind_file):
    """{event: count} from the `events:` and `totals:` (or `summary:`) lines of a callgrind
    output file (Ir, and with the cache simulation I1mr, D1mr, ILmr, DLmr, ...)."""
    events = None
    with open(callgrind_file) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith(("totals:", "summary:")) and events:
                return dict(zip(events, map(int, line.split()[1:])))
    raise SystemExit(f"relay_instructions: no totals in {callgrind_file}")


def parse_target(t, tool):
    """NAME=KIND:PATH, KIND `dp` or `rustls`: (name, kind, path)."""
    name, _, spec = t.partition("=")
    kind, _, path = spec.partition(":")
    if kind not in ("dp", "rustls") or not path:
        raise SystemExit(f"{tool}: --target {t}: want NAME=dp:PATH or NAME=rustls:PATH")
    return name, kind, path


def one_run(args, kind, binary, secs, d):
    """A sidecar pair under callgrind, `secs` of kept-connection requests; (requests,
    {role: instructions})."""
    os.makedirs(d, exist_ok=True)
    pki = mb.make_pki(d, "p256")
    echo = subprocess.Popen([args.loadgen, "mtls-echo", "--secs", "3600"], stdout=subprocess.PIPE, text=True)
    app_port = int(echo.stdout.readline().strip().rsplit(":", 1)[1])
    extra = "".join(f"{a} " for a in (["--cache-sim=yes"] if args.cache_sim else []) + args.valgrind_arg)
    grinds = {role: so.Grind(d, binary, role, extra) for role in ("inbound", "outbound")}
    procs, requests = [], 0
    try:
        row = {}
        inb = mb.start_sidecar("inbound", kind, grinds["inbound"].wrapper, pki, d, app_port, row)
        procs.append(inb)
        outb = mb.start_sidecar("outbound", kind, grinds["outbound"].wrapper, pki, d, inb.port, row)
        procs.append(outb)
        r = json.loads(subprocess.run(
            [args.loadgen, "mtls-latency", "--addr", f"127.0.0.1:{outb.port}", "--secs", str(secs),
             "--rate", str(RATE), "--conns", str(CONNS)], capture_output=True, text=True, timeout=600,
            check=True).stdout.strip().splitlines()[-1])
        if r["errors"]:
            raise SystemExit(f"relay_instructions: {r['errors']} failed requests ({r['first_error']})")
        requests = r["requests"]
    finally:
        for p in procs:
            so.stop(p.proc)
        echo.kill()
        echo.wait()
    return requests, {role: totals(g.out) for role, g in grinds.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--target", action="append", required=True, help="NAME=KIND:PATH, KIND dp or rustls")
    ap.add_argument("--short", type=int, default=5)
    ap.add_argument("--long", type=int, default=15)
    ap.add_argument("--keep", help="leave the callgrind files in this directory")
    ap.add_argument("--cache-sim", action="store_true", help="also count simulated cache misses")
    ap.add_argument("--valgrind-arg", action="append", default=[],
                    help="passed to callgrind, e.g. --valgrind-arg=--D1=4096,2,64 (smaller caches: a "
                         "sidecar's caches are mostly cold after its peer ran)")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("relay_instructions: needs valgrind (apt-get install valgrind)")
    work = args.keep or tempfile.mkdtemp(prefix="relay-instructions-")
    try:
        for t in args.target:
            name, kind, path = parse_target(t, "relay_instructions")
            n0, ir0 = one_run(args, kind, path, args.short, os.path.join(work, f"{name}-short"))
            n1, ir1 = one_run(args, kind, path, args.long, os.path.join(work, f"{name}-long"))
            per = {role: {ev: (ir1[role][ev] - ir0[role][ev]) / max(1, n1 - n0) for ev in ir0[role]}
                   for role in ir0}
            print(f"{name}: user-space instructions per request: inbound {per['inbound']['Ir']:.0f}, "
                  f"outbound {per['outbound']['Ir']:.0f} ({n1 - n0} requests apart)")
            for ev in [e for e in per["inbound"] if e != "Ir"]:
                print(f"{name}:   {ev} per request: inbound {per['inbound'][ev]:.1f}, "
                      f"outbound {per['outbound'][ev]:.1f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
