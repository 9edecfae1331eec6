#!/usr/bin/env python3
"""cp with two zones syncing through global (issue 13): what one Dataplane change costs each
control plane, and how long zone-2 takes to learn it.

Starts a global `cp`, then zone-1 and zone-2 federated with it (KDS over TLS on loopback),
creates the mesh on global, registers `--services` Dataplanes in zone-1 (one service each, over
REST) and connects a `dp` zone ingress to zone-1. zone-1's ingress, with an `availableServices`
entry per service, is what zone-2 learns through global. Once zone-2 holds it with every
service, the bench adds one Dataplane at a time in zone-1 (a second instance of an existing
service), twice over:

* CPU pass: nothing polls; each control plane's utime+stime (/proc/<pid>/stat) from the PUT
  until the three control planes and the ingress have been idle for 1.2 s (longer than the
  reconcilers' least interval of 1 s, so a pass held back by it is counted with its change).
* Latency pass: from the PUT until zone-2's REST API shows the new instance count on zone-1's
  ingress (polled every 20 ms; each poll reads the whole list, so this pass is not used for CPU).

Usage: benches/cp_multizone.py --cp target/release/cp --dp target/release/dp [--services 10000]
"""
import argparse, json, os, sys, tempfile, threading, time, types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xds_apply as X  # noqa: E402


def instances(zone, from_zone):
    """{service: instances} of the ZoneIngresses of `from_zone` that `zone` holds."""
    out = {}
    for i in zone.get("/zoneingresses")["items"]:
        if i.get("zone") == from_zone:
            for s in i.get("availableServices") or []:
                svc = s.get("tags", {}).get("kuma.io/service")
                out[svc] = out.get(svc, 0) + int(s.get("instances", 0))
    return out


def wait_for(what, check, limit):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.02)
    raise SystemExit(f"timed out waiting for {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cp", required=True)
    ap.add_argument("--dp", required=True)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--updates", type=int, default=9)
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="cp-multizone-")
    started = []
    try:
        quiet = {"KUMA_LOG_LEVEL": "warn"}
        glob = X.ControlPlane(args.cp, d, "global", {"KUMA_MODE": "global", **quiet}, kds=True)
        started.append(glob)
        kds = f"grpcs://localhost:{glob.kds.rsplit(':', 1)[1]}"
        zones = []
        for z in ("zone-1", "zone-2"):
            zones.append(X.ControlPlane(args.cp, d, z, {"KUMA_MODE": "zone", "KUMA_MULTIZONE_ZONE_NAME": z, **quiet,
                                                        "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS": kds,
                                                        "KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE": glob.ca_file}))
            started.append(zones[-1])
        z1, z2 = zones
        wait_for("both zones online on global",
                 lambda: sorted(i["name"] for i in glob.get("/zones")["items"]) == ["zone-1", "zone-2"], 60)
        glob.put("/meshes/default", X.MESH)
        wait_for("the mesh in zone-1", lambda: X.request("GET", z1.api, "/meshes/default")[0] == 200, 60)
        cps = [glob, z1, z2]
        rss0 = [X.mem(c.proc.pid)["VmRSS"] for c in cps]  # MiB
        t0 = time.monotonic()
        reg = X.register(z1, args.services)
        # The ingress: what zone-2 learns of zone-1's services.
        a = types.SimpleNamespace(dp=args.dp, envoy="", services=args.services)
        open(os.path.join(d, "zone-token"), "w").write(zone_token(glob))  # minted on global, as the seed guide does
        proc, admin, listen, tp = X.start_proxy("dp", a, z1, None, d, 0)
        started.append(proc)
        if not X.wait_ready(admin, listen, tp + 300):
            raise SystemExit("the dp zone ingress did not become ready")
        t_sync = wait_for("zone-2 to hold zone-1's ingress with every service",
                          lambda: len(instances(z2, "zone-1")) >= args.services, 600)
        pids = [c.proc.pid for c in cps] + [proc.pid]
        X.wait_idle(pids, quiet=1.0, limit=120)
        rss1 = [X.mem(c.proc.pid)["VmRSS"] for c in cps]
        per = []  # (global, zone-1, zone-2) ms
        for i in range(args.updates):
            c0 = [X.cpu_ticks_s(c.proc.pid) for c in cps]
            z1.put(f"/meshes/default/dataplanes/extra-{i}", X.dataplane(i * 97 % args.services, 60000 + i, name=f"extra-{i}"))
            X.wait_idle(pids, quiet=1.2, limit=30)
            per.append([(X.cpu_ticks_s(c.proc.pid) - b) * 1e3 for c, b in zip(cps, c0)])
        lat = []
        for i in range(args.updates):
            svc = f"svc-{(i * 89 + 13) % args.services}"
            t = time.monotonic()
            z1.put(f"/meshes/default/dataplanes/late-{i}", X.dataplane(int(svc[4:]), 61000 + i, name=f"late-{i}"))
            want = 2 + sum(1 for j in range(args.updates) if (j * 97 % args.services) == int(svc[4:]))
            seen = wait_for(f"zone-2 to see {svc} with {want} instances",
                            lambda: instances(z2, "zone-1").get(svc, 0) >= want, 60)
            lat.append((seen - t) * 1e3)
            X.wait_idle(pids, quiet=0.3, limit=30)
    finally:
        for p in reversed(started):
            p.stop()
    med = lambda v: sorted(v)[len(v) // 2]
    names = ["global", "zone-1", "zone-2"]
    print(f"{args.services} Dataplanes registered in zone-1 in {reg:.2f} s; zone-2 held them all "
          f"{t_sync - t0:.1f} s after the first PUT")
    for n, r0, r1 in zip(names, rss0, rss1):
        print(f"  {n}: RSS {r0:.1f} -> {r1:.1f} MiB, {(r1 - r0) * 1024 / args.services:.1f} KiB per Dataplane")
    for k, n in enumerate(names):
        v = [p[k] for p in per]
        print(f"  {n}: CPU per one-Dataplane change in zone-1, ms: median {med(v):.0f} (each: "
              f"{', '.join(f'{x:.0f}' for x in sorted(v))})")
    tot = [sum(p) for p in per]
    print(f"  all three: median {med(tot):.0f} ms per change")
    print(f"  PUT in zone-1 until zone-2 shows it, ms: median {med(lat):.0f}, max {max(lat):.0f} "
          f"(each: {', '.join(f'{x:.0f}' for x in sorted(lat))})")


def zone_token(glob):
    st, out = X.request("POST", glob.api, "/tokens/zone", {"zone": "zone-1", "scope": ["ingress"]})
    if st != 200:
        raise SystemExit(f"zone token: {st} {out[:300]!r}")
    return out.decode().strip()


if __name__ == "__main__":
    main()
