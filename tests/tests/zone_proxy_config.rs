//! The whole configuration a real kuma-cp 2.14 sends a zone ingress loads in `dp` and
//! routes: besides the ingress listener, the `system_trust_bundle` secret (a SPIFFE
//! validator config), the CP-generated admin listener and a metrics listener
//! (`http_connection_manager`, routing to clusters on Unix sockets), clusters on Unix sockets
//! (`pipe`, abstract too), a tracing provider, a DNS listener with Envoy's current
//! `typed_dns_resolver_config`, TCP health checks and `transport_socket_matches`. It is
//! given as a file in proto3 JSON, so every type an `Any` names must decode.

use e2e::http::HttpBackend;
use e2e::{Backend, Dp, read_line, temp_dir, wait_until, who};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

const TAG_SNI: &str = "backend{mesh=default}";
const KRI_SNI: &str = "sni.msvc.default.zone-1.web.8080";
const PIPE_SNI: &str = "pipe{mesh=default}";
const ABSTRACT_SNI: &str = "abstract{mesh=default}";
const CHECKED_SNI: &str = "checked{mesh=default}";
const MATCHED_SNI: &str = "matched{mesh=default}";

const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// A Unix-socket backend that greets with its name, then echoes.
fn unix_backend(listen: &Path, name: &'static str) {
    let l = UnixListener::bind(listen).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 16384];
                if matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                    let _ = s.write_all(format!("{name}\n").as_bytes()).await;
                }
            });
        }
    });
}

fn socket(addr: SocketAddr) -> Value {
    json!({"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}})
}

fn cluster(name: &str, endpoints: Vec<Value>, extra: Value) -> Value {
    let mut c = json!({
        "@type": CLUSTER, "name": name, "type": "STATIC", "connectTimeout": "1s",
        "altStatName": name.replace(':', "_"),
        "circuitBreakers": {"thresholds": [{"trackRemaining": true}]},
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": endpoints}]}
    });
    if let (Value::Object(c), Value::Object(extra)) = (&mut c, extra) {
        c.extend(extra);
    }
    c
}

fn endpoint(address: Value) -> Value {
    json!({"endpoint": {"address": address}})
}

fn chain(names: &[&str], cluster: &str) -> Value {
    json!({
        "filterChainMatch": {"serverNames": names, "transportProtocol": "tls"},
        "filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "cluster": cluster, "statPrefix": cluster.replace(':', "_")}}]
    })
}

/// An HTTP chain as kuma-cp writes them: routes to clusters, router filter.
fn hcm_chain(routes: Value, extra: Value) -> Value {
    let mut hcm = json!({
        "@type": HCM, "statPrefix": "kuma_envoy_admin",
        "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "routeConfig": {"validateClusters": false, "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": routes}]}
    });
    if let (Value::Object(h), Value::Object(extra)) = (&mut hcm, extra) {
        h.extend(extra);
    }
    json!({"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": hcm}]})
}

fn route(prefix: &str, cluster: &str) -> Value {
    json!({"match": {"prefix": prefix}, "route": {"cluster": cluster, "prefixRewrite": prefix}})
}

struct Setup {
    dp: Dp,
    ingress: SocketAddr,
    hijacker: HttpBackend,
    readiness: HttpBackend,
    backend: Backend,
    checked: Backend,
    dead: SocketAddr,
    /// The dead port, bound and not listening, until a test revives it.
    dead_socket: Option<tokio::net::TcpSocket>,
    _dir: PathBuf,
}

async fn setup() -> Setup {
    let dir = temp_dir("zone-proxy-config");
    let mesh_ca = e2e::tls::MeshCa::new("default");
    let ca = mesh_ca.pem.clone();
    // The admin listener's own certificate, inline as kuma-cp sends it.
    let admin_id = mesh_ca.identity("spiffe://default/zone-ingress");
    let backend = Backend::start("backend").await;
    let web = Backend::start("web").await;
    let checked = Backend::start("checked").await;
    let matched = Backend::start("matched").await;
    // A port nothing listens on: the health check must keep traffic away from it. It stays
    // bound: a port only reserved and let go is back in the ephemeral range, and the kernel
    // once gave it to another socket before the test could revive it.
    let dead_socket = tokio::net::TcpSocket::new_v4().unwrap();
    dead_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = dead_socket.local_addr().unwrap();
    let pipe = dir.join("kuma-pipe.sock");
    unix_backend(&pipe, "pipe");
    // kuma-dp's metrics hijacker and the readiness reporter, as HTTP servers.
    let hijacker_sock = dir.join("kuma-mh-ingress-default.sock");
    let hijacker = HttpBackend::start_unix("metrics-hijacker", &hijacker_sock).await;
    let readiness = HttpBackend::start("readiness").await;
    let abstract_name = format!("dp-e2e-{}-{}", std::process::id(), e2e::next_id());
    unix_backend(Path::new(&format!("\0{abstract_name}")), "abstract");

    let sds = json!({"ads": {}, "resourceApiVersion": "V3"});
    // The admin listener's TLS chain, for the control plane's own client certificate.
    let mut admin_tls =
        hcm_chain(json!([route("/ready", "kuma:readiness"), route("/", "kuma:envoy:admin")]), json!({}));
    admin_tls["filterChainMatch"] = json!({"transportProtocol": "tls"});
    admin_tls["transportSocket"] = json!({"name": "envoy.transport_sockets.tls", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "requireClientCertificate": true,
        "commonTlsContext": {
            "tlsCertificates": [{"certificateChain": {"inlineString": admin_id.cert_pem},
                "privateKey": {"inlineString": admin_id.key_pem}}],
            "validationContext": {
                "matchTypedSubjectAltNames": [{"sanType": "DNS", "matcher": {"exact": "kuma-cp"}}],
                "trustedCa": {"inlineString": ca}}}}});
    let resources = vec![
        cluster("backend", vec![endpoint(socket(backend.addr))], json!({})),
        cluster("kri_msvc_default_zone-1__web_8080", vec![endpoint(socket(web.addr))], json!({})),
        cluster("pipe", vec![endpoint(json!({"pipe": {"path": pipe.to_str().unwrap()}}))], json!({})),
        cluster("abstract", vec![endpoint(json!({"pipe": {"path": format!("@{abstract_name}")}}))], json!({})),
        cluster(
            "checked",
            vec![endpoint(socket(dead)), endpoint(socket(checked.addr))],
            json!({"healthChecks": [{"timeout": "1s", "interval": "1s", "unhealthyThreshold": 1,
                    "healthyThreshold": 1, "tcpHealthCheck": {}}]}),
        ),
        // The cluster's own socket is TLS waiting for a secret that never comes; the
        // endpoint's metadata picks the plain socket of the match instead.
        cluster(
            "matched",
            vec![json!({"endpoint": {"address": socket(matched.addr)},
                "metadata": {"filterMetadata": {"envoy.transport_socket_match": {"plain": "yes"}}}})],
            json!({
                "transportSocket": {"name": "envoy.transport_sockets.tls", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": "matched", "commonTlsContext": {"validationContextSdsSecretConfig": {"name": "never", "sdsConfig": sds}}}},
                "transportSocketMatches": [{"name": "plain", "match": {"plain": "yes"}, "transportSocket": {
                    "name": "envoy.transport_sockets.raw_buffer", "typedConfig": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}}]
            }),
        ),
        // What kuma-cp adds to every zone proxy.
        cluster(
            "kuma:envoy:admin",
            vec![endpoint(json!({"pipe": {"path": dir.join("kuma-envoy-admin.sock").to_str().unwrap(), "mode": 384}}))],
            json!({}),
        ),
        cluster("kuma:readiness", vec![endpoint(socket(readiness.addr))], json!({})),
        cluster(
            "kuma:metrics:hijacker",
            vec![endpoint(json!({"pipe": {"path": hijacker_sock.to_str().unwrap()}}))],
            json!({}),
        ),
        cluster(
            "meshtrace:datadog",
            vec![endpoint(json!({"socketAddress": {"address": "localhost", "portValue": 8126}}))],
            json!({"type": "STRICT_DNS"}),
        ),
        json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "system_trust_bundle",
            "validationContext": {"customValidatorConfig": {"name": "envoy.tls.cert_validator.spiffe", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig",
                "trustDomains": [{"name": "default.zone-1.mesh.local", "trustBundle": {"inlineString": ca}}]}}}
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "self_zoneingress_dp_zone-ingress",
            "address": socket("127.0.0.1:0".parse().unwrap()),
            "enableReusePort": true, "statPrefix": "ingress", "trafficDirection": "INBOUND",
            "listenerFilters": [{"name": "envoy.filters.listener.tls_inspector", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
            "filterChains": [
                chain(&[TAG_SNI], "backend"),
                chain(&[KRI_SNI], "kri_msvc_default_zone-1__web_8080"),
                chain(&[PIPE_SNI], "pipe"),
                chain(&[ABSTRACT_SNI], "abstract"),
                chain(&[CHECKED_SNI], "checked"),
                chain(&[MATCHED_SNI], "matched"),
            ]
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "kuma:envoy:admin",
            "address": socket("127.0.0.1:0".parse().unwrap()),
            "enableReusePort": true, "trafficDirection": "INBOUND",
            "listenerFilters": [{"name": "envoy.filters.listener.tls_inspector", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}],
            "filterChains": [
                hcm_chain(json!([route("/ready", "kuma:readiness")]), json!({
                    "internalAddressConfig": {"cidrRanges": [{"addressPrefix": "127.0.0.1", "prefixLen": 32}]}})),
                admin_tls,
            ]
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "kuma:metrics:prometheus",
            "address": socket("127.0.0.1:0".parse().unwrap()),
            "trafficDirection": "INBOUND",
            "filterChains": [hcm_chain(json!([route("/metrics", "kuma:metrics:hijacker")]), json!({
                "tracing": {"provider": {"name": "envoy.tracers.datadog", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.config.trace.v3.DatadogConfig",
                    "collectorCluster": "meshtrace:datadog", "serviceName": "zone-ingress"}}}}))]
        }),
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": "kuma:dns",
            "address": {"socketAddress": {"protocol": "UDP", "address": "127.0.0.1", "portValue": 0}},
            "listenerFilters": [{"name": "envoy.filters.udp.dns_filter", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
                "statPrefix": "kuma_dns",
                "serverConfig": {"inlineDnsTable": {"virtualDomains": [{"name": "backend.mesh",
                    "endpoint": {"addressList": {"address": ["240.0.0.1"]}}}]}},
                "clientConfig": {"typedDnsResolverConfig": {"name": "envoy.network.dns_resolver.cares", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
                    "resolvers": [{"socketAddress": {"address": "127.0.0.1", "portValue": 53}}],
                    "dnsResolverOptions": {"useTcpForDnsLookups": false}}}}}}]
        }),
    ];
    let file = dir.join("zone-ingress.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&json!({"version_info": "kuma", "resources": resources})).unwrap())
        .unwrap();
    let dp = Dp::start(&file, &["--proxy-type", "ingress"]);
    let ingress = dp.listener("self_zoneingress_dp_zone-ingress");
    Setup { dp, ingress, hijacker, readiness, backend, checked, dead, dead_socket: Some(dead_socket), _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_kuma_zone_ingress_config_loads_and_every_server_name_routes() {
    let s = setup().await;
    // The CP's admin listener answers /ready from the readiness cluster; the metrics
    // listener serves /metrics from the hijacker on its Unix socket.
    let got = e2e::http::get(s.dp.listener("kuma:envoy:admin"), "dp", "/ready", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "readiness"));
    assert_eq!(s.readiness.last().path, "/ready");
    let got = e2e::http::get(s.dp.listener("kuma:metrics:prometheus"), "dp", "/metrics", &[]).await;
    assert_eq!((got.status, got.body.as_str()), (200, "metrics-hijacker"));
    assert_eq!(s.hijacker.last().path, "/metrics");
    // The health check finds the dead endpoint before the name is tried.
    wait_until("the health check marks the dead endpoint", || {
        let (_, clusters) = s.dp.get("/clusters");
        (clusters.contains(&format!("checked::{}::health_flags::/failed_active_hc", s.dead))
            && clusters.contains(&format!("checked::{}::health_flags::healthy", s.checked.addr)))
        .then_some(())
    });
    for (sni, who_answers) in [
        (TAG_SNI, "backend"),
        (KRI_SNI, "web"),
        (PIPE_SNI, "pipe"),
        (ABSTRACT_SNI, "abstract"),
        (MATCHED_SNI, "matched"),
    ] {
        assert_eq!(who(s.ingress, Some(sni)).await.as_deref(), Some(who_answers), "{sni}");
    }
    // Round robin over two endpoints, one of them dead: every connection reaches the live one.
    for i in 0..6 {
        assert_eq!(who(s.ingress, Some(CHECKED_SNI)).await.as_deref(), Some("checked"), "connection {i}");
    }
    assert!(s.checked.connections() >= 6);
    assert!(s.dp.stat("envoy_cluster_health_check_failure{envoy_cluster_name=\"checked\"}") >= 1);
    assert_eq!(s.dp.stat("envoy_cluster_upstream_cx_connect_fail{envoy_cluster_name=\"checked\"}"), 0);
    assert_eq!(s.backend.connections(), 1);
    // The admin API shows every resource, the tracing provider decoded by type.
    let (_, dump) = s.dp.get("/config_dump");
    assert!(
        dump.contains("\"collectorCluster\": \"meshtrace:datadog\"")
            || dump.contains("\"collectorCluster\":\"meshtrace:datadog\""),
        "config_dump lacks the tracing config"
    );
    assert!(dump.contains("SPIFFECertValidatorConfig"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_failing_its_checks_loses_traffic_and_wins_it_back() {
    let mut s = setup().await;
    wait_until("the live endpoint passes its check", || {
        let (_, clusters) = s.dp.get("/clusters");
        clusters.contains(&format!("checked::{}::health_flags::healthy", s.checked.addr)).then_some(())
    });
    // The dead port comes alive: one passing check (healthy_threshold 1) brings it in.
    let revived = s.dead_socket.take().unwrap().listen(1024).expect("the dead port listens");
    wait_until("the revived endpoint passes its check", || {
        let (_, clusters) = s.dp.get("/clusters");
        clusters.contains(&format!("checked::{}::health_flags::healthy", s.dead)).then_some(())
    });
    let mut got_revived = 0;
    let accept = tokio::spawn(async move {
        let mut n = 0;
        loop {
            let Ok((mut c, _)) = revived.accept().await else { return n };
            let mut b = [0u8; 16384];
            if matches!(c.read(&mut b).await, Ok(k) if k > 0) {
                n += 1;
                let _ = c.write_all(b"revived\n").await;
            }
            if n == 2 {
                return n;
            }
        }
    });
    for _ in 0..4 {
        let mut c = tokio::net::TcpStream::connect(s.ingress).await.unwrap();
        c.write_all(&e2e::hello::client_hello(Some(CHECKED_SNI), &[])).await.unwrap();
        if read_line(&mut c).await.as_deref() == Some("revived") {
            got_revived += 1;
        }
    }
    assert_eq!(got_revived, 2, "round robin gives the revived host its share");
    assert_eq!(accept.await.unwrap(), 2);
}
