//! Building blocks of the multi-zone tests: zone tokens, zone proxies and sidecars
//! started against a zone CP, requests through a client's outbound, and the traffic a
//! test keeps flowing while it breaks things.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Backend, Cp, Dp, read_line, temp_dir, wait_within};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Kuma's allow-all MeshTrafficPermission for mesh `default`, a YAML document to append to
/// the Mesh's: with mTLS on, an inbound that no permission selects lets nobody in.
#[macro_export]
macro_rules! allow_all {
    () => {
        "---\ntype: MeshTrafficPermission\nname: allow-all\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  \
         from:\n  - targetRef:\n      kind: Mesh\n    default:\n      action: Allow\n"
    };
}

/// Mesh `default` with builtin mTLS, and everyone allowed to talk to everyone.
pub const MESH: &str = concat!(
    "type: Mesh\nname: default\nmtls:\n  enabledBackend: ca-1\n  backends:\n  - name: ca-1\n    type: builtin\n",
    allow_all!()
);
/// What the seed guide and Kuma promise for convergence across zones.
pub const SYNC: Duration = Duration::from_secs(30);

/// A loopback port free for both TCP and UDP right now (DNS listeners bind both: a port
/// free only for TCP made a DNS test fail now and then).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Picked below the kernel's ephemeral range: a port from that range (what binding
    // port 0 hands out) can be taken by any outgoing connection's local end before the
    // process it is meant for binds it, and was (a sidecar's inbound port taken by one of
    // cp's PostgreSQL connections; the listener NACKed "Address already in use"). Ports
    // below the range are taken only by explicit binds.
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // One seed per process: the walk below hands out distinct ports only if every call
    // takes the same walk. It was drawn per call (the clock's nanoseconds), and two calls
    // in a row could land on one port, both checks passing because nothing was bound to it
    // yet: a test got the same port for dp's DNS proxy and for the port that must stay
    // silent, and its `dig` there was answered.
    static SEED: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let (low, high) = (10_000u32, ephemeral_start().max(10_001));
    let seed = *SEED.get_or_init(|| {
        std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
    });
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // A stride coprime with the span (7,919 is prime) visits every port before repeating;
        // in u64, so that no wrap-around breaks the walk.
        let step = (u64::from(seed) + u64::from(n) * 7_919) % u64::from(high - low);
        let port = (u64::from(low) + step) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no loopback port below the ephemeral range free for both TCP and UDP");
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A zone token minted on global, as the seed guide does (`ctl generate zone-token`).
pub fn zone_token(global: &Cp, zone: &str, scopes: &[&str]) -> String {
    let mut args = vec!["generate", "zone-token", "--zone", zone];
    for s in scopes {
        args.extend(["--scope", s]);
    }
    global.ctl(&args).trim().to_string()
}

/// A dataplane token from the zone's CP, once the mesh's signing key arrived from global.
pub fn dataplane_token(zone: &Cp, name: &str) -> String {
    wait_within(SYNC, "the dataplane token signing key to reach the zone", || {
        let (status, out) = zone.ctl_status(&["generate", "dataplane-token", "--name", name, "-m", "default"]);
        status.success().then(|| out.trim().to_string())
    })
}

pub fn start_dp(zone: &Cp, proxy_type: &str, token: &str, resource: &str, env: &[(&str, &str)]) -> Dp {
    let dir = temp_dir("mz-dp");
    let token_file = write(&dir, "token", token);
    let resource_file = write(&dir, "resource.yaml", resource);
    Dp::against(zone, proxy_type, &token_file, &resource_file, env)
}

/// A global CP with [`MESH`] and zones `zone-1` and `zone-2` federated to it.
pub fn global_and_two_zones() -> (Cp, Cp, Cp) {
    let global = Cp::global();
    global.apply(MESH);
    let zone1 = Cp::federated(&global, "zone-1", &[]);
    let zone2 = Cp::federated(&global, "zone-2", &[]);
    zone1.wait_federated();
    zone2.wait_federated();
    (global, zone1, zone2)
}

/// A zone ingress on 127.0.0.1:`port`, advertised there to the other zones.
pub fn start_ingress(global: &Cp, zone: &Cp, zone_name: &str, port: u16) -> Dp {
    let token = zone_token(global, zone_name, &["ingress", "egress"]);
    let resource = format!(
        "type: ZoneIngress\nname: ingress-01\nnetworking:\n  address: 127.0.0.1\n  port: {port}\n  \
         advertisedAddress: 127.0.0.1\n  advertisedPort: {port}\n"
    );
    let dp = start_dp(zone, "ingress", &token, &resource, &[]);
    dp.wait_ready();
    dp
}

/// The Dataplane of a sidecar on 127.0.0.1 for `app` serving `service`, with `outbounds`
/// (port, service).
pub fn sidecar_resource(name: &str, service: &str, app: &Backend, outbounds: &[(u16, &str)]) -> String {
    let mut outbound = String::new();
    if !outbounds.is_empty() {
        outbound.push_str("  outbound:\n");
        for (port, svc) in outbounds {
            outbound.push_str(&format!("  - port: {port}\n    tags:\n      kuma.io/service: {svc}\n"));
        }
    }
    format!(
        "type: Dataplane\nmesh: default\nname: {name}\nnetworking:\n  address: 127.0.0.1\n  inbound:\n  \
         - port: {}\n    servicePort: {}\n    tags:\n      kuma.io/service: {service}\n{outbound}",
        free_port(),
        app.addr.port()
    )
}

/// A sidecar for `app` serving `service`, with `outbounds` (port, service).
pub fn start_sidecar(
    zone: &Cp,
    name: &str,
    service: &str,
    app: &Backend,
    outbounds: &[(u16, &str)],
    env: &[(&str, &str)],
) -> Dp {
    let resource = sidecar_resource(name, service, app, outbounds);
    let token = dataplane_token(zone, name);
    // `.mesh` DNS only where the test asks for it (its port would clash between sidecars).
    let mut all =
        vec![("KUMA_DNS_ENABLED", if env.iter().any(|(k, _)| k.starts_with("KUMA_DNS")) { "true" } else { "false" })];
    all.extend_from_slice(env);
    let dp = start_dp(zone, "dataplane", &token, &resource, &all);
    dp.wait_ready();
    dp
}

/// One request: connect, say hello, read the name of the app that answered.
pub async fn request(addr: SocketAddr) -> Result<String, String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"hello\n").await.map_err(|e| format!("write: {e}"))?;
        read_line(&mut s).await.ok_or_else(|| "closed without an answer".to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt).await.unwrap_or_else(|_| Err("no answer within 10s".into()))
}

/// Waits until a request to `addr` is answered by `app`; on failure the logs of `proxies`
/// say why.
pub async fn wait_answered_by(addr: SocketAddr, app: &str, proxies: &[&Dp]) {
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        let got = request(addr).await;
        if got.as_deref() == Ok(app) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = proxies.iter().map(|p| p.logs.lines().join("\n")).collect();
            panic!(
                "no request to {addr} reached {app} within {SYNC:?}; last: {got:?}; logs:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Requests sent one after the other to a client's outbound in the background, each
/// outcome recorded: what a user's traffic sees while the test breaks things.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Result<String, String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    pub fn start(addr: SocketAddr) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (s, o) = (stop.clone(), outcomes.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                let r = request(addr).await;
                o.lock().unwrap().push(r);
                // Pacing, not synchronisation: a steady trickle of new connections.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Traffic { stop, outcomes, task }
    }

    pub fn count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Waits for `n` more requests (so that some ran during whatever just happened).
    pub async fn wait_more(&self, n: usize) {
        let target = self.count() + n;
        let deadline = tokio::time::Instant::now() + SYNC;
        while self.count() < target {
            assert!(tokio::time::Instant::now() < deadline, "requests stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops and returns every outcome.
    pub async fn finish(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

pub fn assert_no_failures(outcomes: &[Result<String, String>], expected: &[&str]) {
    assert!(outcomes.len() >= 20, "too few requests: {}", outcomes.len());
    let failed: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(5)]
    );
    for o in outcomes.iter().flatten() {
        assert!(expected.contains(&o.as_str()), "a request reached {o:?}");
    }
}

/// `dig @127.0.0.1 -p <port> +short <name> A`.
pub fn dig(port: u16, name: &str) -> String {
    let out = std::process::Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+time=5", "+tries=1", name, "A"])
        .output()
        .expect("dig (scripts/setup.sh installs dnsutils)");
    assert!(out.status.success(), "dig {name}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One HTTP/1.1 GET on a new connection, failures reported (connection refused, reset, no
/// answer within 5 s) instead of panicking: for polling a path that is still being set up.
pub async fn try_get(addr: SocketAddr, host: &str, path: &str) -> Result<crate::http::Got, String> {
    use http_body_util::{BodyExt, Full};
    let attempt = async {
        let s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri(path)
            .header("host", host)
            .body(Full::new(bytes::Bytes::new()))
            .map_err(|e| e.to_string())?;
        let res = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = res.status().as_u16();
        let headers =
            res.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string())).collect();
        let body = res.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok(crate::http::Got { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.map_err(|_| "no answer within 5s".to_string())?
}

/// `ctl inspect zones` against `cp`: zone -> STATUS.
pub fn zone_status(cp: &Cp) -> Vec<(String, String)> {
    cp.ctl(&["inspect", "zones"])
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(2).map(String::from).collect::<Vec<_>>())
        .map(|v| (v[0].clone(), v[1].clone()))
        .collect()
}

/// Waits until `ctl inspect zones` shows `zone` with `status`.
pub fn wait_zone_status(cp: &Cp, zone: &str, status: &str) {
    wait_within(SYNC, &format!("{zone} to show {status}"), || {
        zone_status(cp).iter().any(|(z, s)| z == zone && s == status).then_some(())
    });
}
