//! `.mesh` DNS in `dp`: a UDP listener with Envoy's `dns_filter` (as Kuma 2.14 sends
//! it to sidecars), queried with `dig` over UDP and TCP.

use e2e::{Dp, temp_dir};
use serde_json::json;
use std::net::SocketAddr;
use std::process::Command;

const SVC: &str = "echo-server_echo-example_svc_1010.mesh";
const DOTTED: &str = "echo-server.echo-example.svc.1010.mesh";

/// A fake upstream resolver: answers every A query with 192.0.2.7 (over UDP).
fn fake_upstream() -> SocketAddr {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            if n < 12 {
                continue;
            }
            let mut r = buf[..n].to_vec();
            r[2] |= 0x80; // QR
            r[3] = 0x80; // RA, NOERROR
            r[6..8].copy_from_slice(&[0, 1]); // one answer
            r[8..12].copy_from_slice(&[0, 0, 0, 0]);
            // Question ends at the first zero label + 4 bytes.
            let qend = 12 + r[12..].iter().position(|&b| b == 0).unwrap() + 5;
            r.truncate(qend);
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
            let _ = sock.send_to(&r, peer);
        }
    });
    addr
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let port = server.port().to_string();
    let at = format!("@{}", server.ip());
    let out =
        Command::new("dig").args([at.as_str(), "-p", &port, "+time=5", "+tries=1"]).args(args).output().unwrap_or_else(
            |e| panic!("cannot run `dig` ({e}): install it with `apt-get install dnsutils` (scripts/setup.sh does)"),
        );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dig_gets_mesh_names_and_forwards_the_rest() {
    let upstream = fake_upstream();
    let many: Vec<String> = (1..=100).map(|i| format!("240.0.1.{i}")).collect();
    let file = temp_dir("dns").join("dns.json");
    let doc = json!({"version_info": "1", "resources": [{
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "kuma:dns",
        "address": {"socketAddress": {"protocol": "UDP", "address": "127.0.0.1", "portValue": 0}},
        "listenerFilters": [{"name": "envoy.filters.udp.dns_filter", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
            "statPrefix": "kuma_dns",
            "serverConfig": {"inlineDnsTable": {"virtualDomains": [
                {"name": SVC, "endpoint": {"addressList": {"address": ["240.0.0.1"]}}, "answerTtl": "30s"},
                {"name": "many.mesh", "endpoint": {"addressList": {"address": many}}, "answerTtl": "30s"}
            ]}},
            "clientConfig": {"dnsResolutionConfig": {"resolvers": [
                {"socketAddress": {"address": "127.0.0.1", "portValue": upstream.port()}}]}}
        }}]
    }]});
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let dp = Dp::start(&file, &["--proxy-type", "dataplane"]);
    let server = dp.listener("kuma:dns");

    for name in [SVC, DOTTED, "Echo-Server.ECHO-example.svc.1010.MESH"] {
        let out = dig(server, &[name, "A", "+short"]);
        assert_eq!(out.trim(), "240.0.0.1", "{name}");
    }
    let aaaa = dig(server, &[SVC, "AAAA"]);
    assert!(aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"), "AAAA NODATA: {aaaa}");
    let unknown = dig(server, &["nobody.mesh", "A"]);
    assert!(unknown.contains("status: NXDOMAIN"), "{unknown}");
    // 100 records do not fit 512 bytes: TC over UDP, the whole answer over TCP.
    let udp = dig(server, &["many.mesh", "A", "+ignore", "+noedns"]);
    assert!(udp.contains(" tc") || udp.contains("tc "), "TC over UDP: {udp}");
    let tcp = dig(server, &["many.mesh", "A", "+tcp", "+short"]);
    assert_eq!(tcp.lines().count(), 100, "{tcp}");
    // Anything else goes to the configured upstream.
    assert_eq!(dig(server, &["example.org", "A", "+short"]).trim(), "192.0.2.7");
}

/// Kuma's dynamic-config listener (`_kuma:dynamicconfig`: HCM on a pipe, the records as
/// the `/dns` route's body), as a control plane sends it to a proxy that has
/// `feature-embedded-dns`.
fn dynconf(version: &str, body: &str) -> serde_json::Value {
    let route = |headers: serde_json::Value, action: serde_json::Value| json!({"match": {"path": "/dns", "headers": headers}, "directResponse": action});
    json!({"version_info": version, "resources": [{
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "_kuma:dynamicconfig",
        "address": {"pipe": {"path": "/tmp/kuma-mesh-metric-config.sock"}},
        "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "statPrefix": "_kuma_dynamicconfig",
            "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            "routeConfig": {"virtualHosts": [{"name": "_kuma:dynamicconfig", "domains": ["*"], "routes": [
                route(json!([{"name": "If-None-Match", "stringMatch": {"exact": "0"}}]), json!({"status": 304})),
                route(json!([]), json!({"status": 200, "body": {"inlineString": body}}))
            ]}]}
        }}]}]
    }]})
}

#[test]
fn the_dns_proxy_serves_the_records_of_the_dynamic_config_listener() {
    let file = temp_dir("dns-proxy").join("dynconf.json");
    let records = |ip: &str| {
        json!({"records": [{"name": SVC, "ips": [ip, "::ffff:f000:1"]}], "ttl": 30, "extraLabels": {"mesh": "default"}})
            .to_string()
    };
    std::fs::write(&file, dynconf("1", &records("240.0.0.1")).to_string()).unwrap();
    // The DNS proxy binds UDP and TCP on this port.
    let port = e2e::mesh::free_port();
    let dp = Dp::start(&file, &["--proxy-type", "dataplane", "--dns-proxy-port", &port.to_string()]);
    let server = SocketAddr::from(([127, 0, 0, 1], port));
    for name in [SVC, DOTTED] {
        assert_eq!(dig(server, &[name, "A", "+short"]).trim(), "240.0.0.1", "{name}");
    }
    assert_eq!(dig(server, &[SVC, "AAAA", "+short", "+tcp"]).trim(), "::ffff:240.0.0.1");

    // A body that is not the DNS config is refused with the reason; the records stay.
    std::fs::write(&file, dynconf("2", "{\"records\": 7}").to_string()).unwrap();
    let line = dp.logs.wait_for(&["configuration rejected"]);
    assert!(line.contains("_kuma:dynamicconfig") && line.contains("/dns body"), "{line}");
    assert_eq!(dig(server, &[SVC, "A", "+short"]).trim(), "240.0.0.1");

    // New records apply with the next version.
    std::fs::write(&file, dynconf("3", &records("240.0.0.9")).to_string()).unwrap();
    dp.wait_version("3");
    assert_eq!(dig(server, &[SVC, "A", "+short"]).trim(), "240.0.0.9");
}
