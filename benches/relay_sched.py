#!/usr/bin/env python3
"""Where a kept-connection request spends its time inside each sidecar, by kernel tracepoints.

Why: instructions (benches/relay_instructions.py) and system calls per request were equal
for dp and the rustls-era dp while the kept-connection p99 of benches/mtls_bench.py was
not. This VM has no hardware counters, but it has tracepoints. A sidecar pair as
mtls_bench.py builds it (both pinned to CPU 0, the load and the echo app on CPU 1, under
SCHED_FIFO when this script runs under `chrt -f 1`) relays kept-connection requests, and
`perf record` takes every system call entry and exit and every context switch of the two
sidecars for --secs seconds. Each wake-up (epoll_wait returns ... epoll_wait is entered
again) that reads a request or a response is one hop, named by sidecar and by the bytes it
read (plain 64 bytes, or a TLS record: 93 bytes in TLS 1.2, 86 in TLS 1.3), and split into:
  pre_read      epoll_wait returned -> the read entered (the runtime, the TLS library's setup)
  read          the read system call
  read_to_send  the read returned -> the write entered (decrypting or encrypting)
  send          the write system call (it wakes the peer)
  post_send     the write returned -> epoll_wait entered (both share CPU 0: the peer waits)
and the user-space page faults taken in the hop. With --task-polls, uprobes on every tokio
task poll (`Harness::poll`) of the targets' binaries split `pre_read` into `to_poll`
(epoll_wait returned -> the connection's task is polled: the runtime waking it) and
`poll_to_read` (the task's futures down to the read: for a TLS read, the TLS library's work
before it reads the socket). Each probe costs a trap, about a microsecond.
Times include the tracepoints' own cost; compare targets from the same machine and run.

Usage: chrt -f 1 benches/relay_sched.py --loadgen LOADGEN --target dp=dp:DP \
         [--target old=rustls:DP] [--secs 5] [--rate 200] [--conns 10] [--task-polls]
"""
import argparse, collections, json, os, re, shutil, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mtls_bench as mb  # noqa: E402
import relay_instructions as ri  # noqa: E402

EPOLL_WAIT, READS, WRITES = 232, (0, 45), (1, 20, 44)  # x86_64: read, recvfrom; write, writev, sendto
POLL_PARTS = ("to_poll", "poll_to_read")
PARTS = ("pre_read", "read", "read_to_send", "send", "post_send", "total")
LINE = re.compile(r"\s*(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s+(.*)")


def hops(perf_data, roles):
    """{(role, bytes read): [{part: µs}]} from `perf script` of a recording."""
    out = subprocess.run(["perf", "script", "-i", perf_data, "--ns", "-F", "pid,tid,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    open_wake, found = {}, collections.defaultdict(list)
    for line in out.splitlines():
        m = LINE.match(line)
        if not m or int(m[1]) not in roles:
            continue
        role, tid, t, ev, rest = roles[int(m[1])], int(m[2]), float(m[3]) * 1e6, m[4], m[5]
        wake = open_wake.get(tid)
        if ev == "raw_syscalls:sys_exit":
            nr = int(rest.split()[1])
            if nr == EPOLL_WAIT:
                open_wake[tid] = {"start": t, "calls": []}
            elif wake and wake["calls"]:
                wake["calls"][-1].update(exit=t, ret=int(rest.rsplit("=", 1)[1]))
        elif ev.startswith("probe_") and wake:
            wake.setdefault("polls", []).append(t)
        elif ev == "exceptions:page_fault_user" and wake:
            wake["faults"] = wake.get("faults", 0) + 1
        elif ev == "raw_syscalls:sys_enter" and wake:
            nr = int(rest.split()[1])
            if nr != EPOLL_WAIT:
                wake["calls"].append({"nr": nr, "enter": t})
                continue
            del open_wake[tid]
            calls = wake["calls"]
            sends = [c for c in calls if c["nr"] in WRITES and "exit" in c]
            if not calls or calls[0]["nr"] not in READS or "ret" not in calls[0] or not sends:
                continue  # a timer, or a wake-up without a relayed request
            rd, sd = calls[0], sends[-1]
            polled = min([x for x in wake.get("polls", []) if x <= rd["enter"]] or [rd["enter"]])
            found[(role, rd["ret"])].append({
                "to_poll": polled - wake["start"], "poll_to_read": rd["enter"] - polled,
                "pre_read": rd["enter"] - wake["start"], "read": rd["exit"] - rd["enter"],
                "read_to_send": sd["enter"] - rd["exit"], "send": sd["exit"] - sd["enter"],
                "post_send": t - sd["exit"], "total": t - wake["start"], "faults": wake.get("faults", 0)})
    return found


def add_task_probes(binaries):
    """uprobes on every tokio `Harness::poll` of `binaries` (perf probe's groups are named
    `probe_<binary>`); returns the groups to record."""
    groups = set()
    for bi, b in enumerate(sorted(set(binaries))):
        syms = subprocess.run(["nm", "-C", b], capture_output=True, text=True, check=True).stdout
        text = subprocess.run(["readelf", "-lW", b], capture_output=True, text=True, check=True).stdout
        # perf probe takes file offsets: the executable segment's address minus its offset.
        seg = next(line.split() for line in text.splitlines() if "LOAD" in line and "R E" in line)
        delta = int(seg[2], 16) - int(seg[1], 16)
        adds = []
        for i, line in enumerate(x for x in syms.splitlines() if "Harness<" in x and x.endswith("::poll")):
            addr, kind = line.split()[:2]
            if kind in "tT":
                adds += ["-a", f"poll{bi}_{i}=0x{int(addr, 16) - delta:x}"]
        subprocess.run(["perf", "probe", "-q", "-x", b, *adds], check=True, stdout=subprocess.DEVNULL)
        groups.add("probe_" + re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(b)).split("_")[0])
    return groups


def q(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))]


def one_target(args, name, kind, binary, work):
    d = os.path.join(work, name)
    os.makedirs(d)
    pki = mb.make_pki(d, "p256")
    echo = subprocess.Popen(["taskset", "-c", mb.LOAD_CPU, args.loadgen, "mtls-echo", "--secs", "3600"],
                            stdout=subprocess.PIPE, text=True)
    app_port = int(echo.stdout.readline().strip().rsplit(":", 1)[1])
    procs = []
    try:
        row = {}
        inb = mb.start_sidecar("inbound", kind, binary, pki, d, app_port, row)
        procs.append(inb)
        outb = mb.start_sidecar("outbound", kind, binary, pki, d, inb.port, row)
        procs.append(outb)
        load = subprocess.Popen(
            ["taskset", "-c", mb.LOAD_CPU, args.loadgen, "mtls-latency", "--addr", f"127.0.0.1:{outb.port}",
             "--secs", str(args.secs + 4), "--rate", str(args.rate), "--conns", str(args.conns)],
            stdout=subprocess.PIPE, text=True)
        time.sleep(2)  # the connections are open and have echoed once: only relaying is traced
        data = os.path.join(d, "perf.data")
        subprocess.run(["taskset", "-c", mb.LOAD_CPU, "perf", "record", "-q", "-o", data,
                        "-p", f"{inb.pid},{outb.pid}", "-e", "raw_syscalls:sys_enter", "-e",
                        "raw_syscalls:sys_exit", "-e", "sched:sched_switch", "-e", "exceptions:page_fault_user",
                        *[a for g in args.probe_groups for a in ("-e", f"{g}:*")], "--", "sleep", str(args.secs)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.loads(load.communicate(timeout=120)[0].strip().splitlines()[-1])
        if r["errors"]:
            raise SystemExit(f"relay_sched: {name}: {r['errors']} failed requests ({r['first_error']})")
        # taskset execs the sidecar, so the pid perf saw is the sidecar's own.
        return hops(data, {inb.pid: "inbound", outb.pid: "outbound"})
    finally:
        for p in procs:
            p.stop()
        echo.kill()
        echo.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loadgen", required=True)
    ap.add_argument("--target", action="append", required=True, help="NAME=KIND:PATH, KIND dp or rustls")
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--task-polls", action="store_true", help="also split pre_read at the task's poll (uprobes)")
    args = ap.parse_args()
    if not shutil.which("perf"):
        raise SystemExit("relay_sched: needs perf (apt-get install linux-perf)")
    if not os.path.isdir("/sys/kernel/tracing/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)
    work = tempfile.mkdtemp(prefix="relay-sched-")
    targets = [ri.parse_target(t, "relay_sched") for t in args.target]
    parts = (POLL_PARTS if args.task_polls else ()) + PARTS
    args.probe_groups = add_task_probes([os.path.abspath(p) for _, _, p in targets]) if args.task_polls else set()
    try:
        print("| target | hop (sidecar, bytes read) | hops | " + " | ".join(f"{p} p50 µs" for p in parts)
              + " | total p99 µs | page faults per hop |")
        print("|---" * (5 + len(parts)) + "|")
        for name, kind, path in targets:
            found = one_target(args, name, kind, os.path.abspath(path), work)
            sums = collections.defaultdict(float)
            for (role, n), rows in sorted(found.items()):
                if len(rows) < args.secs * args.rate // 4:
                    continue  # a hop seen only a few times (a record of another size)
                cells = []
                for p in parts:
                    v = q([r[p] for r in rows], 0.5)
                    sums[p] += v
                    cells.append(f"{v:.1f}")
                print(f"| {name} | {role}, {n} B | {len(rows)} | " + " | ".join(cells)
                      + f" | {q([r['total'] for r in rows], 0.99):.1f}"
                      + f" | {sum(r['faults'] for r in rows) / len(rows):.2f} |")
            print(f"| {name} | all four hops | | " + " | ".join(f"{sums[p]:.1f}" for p in parts) + " | | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for g in args.probe_groups:
            subprocess.run(["perf", "probe", "-q", "-d", f"{g}:*"], check=False, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
