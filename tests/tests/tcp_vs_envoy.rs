//! dp's TCP path against real Envoy 1.40 on the same static configuration (e2e::pair):
//! the cluster settings and network filters Kuma's policies write for TCP services.

use e2e::pair::Pair;
use serde_json::{Value, json};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn socket(addr: SocketAddr) -> Value {
    json!({"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}})
}

fn static_cluster(name: &str, addr: SocketAddr, extra: Value) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connectTimeout": "5s",
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": [{"endpoint": {"address": socket(addr)}}]}]}
    });
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

fn listener(name: &str, filters: Vec<Value>) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name, "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
        "filterChains": [{"filters": filters}]
    })
}

fn tcp_proxy(cluster: &str) -> Value {
    json!({"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "cluster": cluster, "statPrefix": cluster}})
}

/// A server that writes the client's address and closes.
async fn who_am_i() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = l.accept().await {
            let _ = s.write_all(format!("{}\n", peer.ip()).as_bytes()).await;
        }
    });
    addr
}

async fn answer(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(e2e::WAIT, s.read_to_string(&mut out)).await.expect("an answer").unwrap();
    out
}

/// Kuma's inbound clusters under transparent proxying come from 127.0.0.6
/// (`upstream_bind_config`), which its iptables rules let through; the application sees
/// that address.
#[tokio::test(flavor = "multi_thread")]
async fn connections_come_from_the_clusters_bind_address_as_envoys_do() {
    let server = who_am_i().await;
    let bind = json!({"upstreamBindConfig": {"sourceAddress": {"address": "127.0.0.6", "portValue": 0}}});
    let pair = Pair::start(vec![
        static_cluster("bound", server, bind),
        static_cluster("plain", server, json!({})),
        listener("bound", vec![tcp_proxy("bound")]),
        listener("plain", vec![tcp_proxy("plain")]),
    ]);
    let (dp_bound, envoy_bound) = pair.listener("bound");
    let (dp_plain, envoy_plain) = pair.listener("plain");
    assert_eq!(answer(envoy_bound).await, "127.0.0.6\n");
    assert_eq!(answer(dp_bound).await, "127.0.0.6\n");
    assert_eq!(answer(envoy_plain).await, "127.0.0.1\n");
    assert_eq!(answer(dp_plain).await, "127.0.0.1\n");
}

/// MeshRateLimit for a TCP service: a network `local_ratelimit` in front of the
/// tcp_proxy. Each connection takes a token; without one it is closed unanswered and
/// counted, under the stat name Envoy gives it.
#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_token_bucket_are_closed_as_envoy_closes_them() {
    let server = who_am_i().await;
    let rate_limit = json!({"name": "envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.local_ratelimit.v3.LocalRateLimit",
        "statPrefix": "tcp_rate_limit",
        "tokenBucket": {"maxTokens": 2, "tokensPerFill": 2, "fillInterval": "3600s"}}});
    let pair = Pair::start(vec![
        static_cluster("app", server, json!({})),
        listener("limited", vec![rate_limit, tcp_proxy("app")]),
    ]);
    let (dp, envoy) = pair.listener("limited");
    for addr in [dp, envoy] {
        let answers = [answer(addr).await, answer(addr).await, answer(addr).await];
        assert_eq!(answers, ["127.0.0.1\n", "127.0.0.1\n", ""], "{addr}");
    }
    let stat = |admin: SocketAddr| {
        let (_, body) = e2e::http_get(admin, "/stats?filter=rate_limit").expect("GET /stats");
        body
    };
    assert!(
        stat(pair.envoy.admin).contains("local_rate_limit.tcp_rate_limit.rate_limited: 1"),
        "{}",
        stat(pair.envoy.admin)
    );
    assert!(stat(pair.dp.admin).contains("local_rate_limit.tcp_rate_limit.rate_limited: 1"), "{}", stat(pair.dp.admin));
}

/// MeshExternalService with `tls.verification.mode: SkipAll`: an UpstreamTlsContext
/// without a validation context. Envoy originates TLS and does not check the server's
/// certificate; so does dp (and says so once when the config loads).
#[tokio::test(flavor = "multi_thread")]
async fn tls_without_a_validation_context_reaches_a_self_signed_server_as_envoy_does() {
    use tokio::io::AsyncBufReadExt;
    let (cfg, _) = e2e::tls::self_signed("external.example");
    let server = e2e::tls::serve(cfg, "external").await;
    let tls = json!({"transportSocket": {"name": "envoy.transport_sockets.tls", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "external.example"}}});
    let pair = Pair::start(vec![static_cluster("external", server, tls), listener("out", vec![tcp_proxy("external")])]);
    let (dp, envoy) = pair.listener("out");
    for addr in [dp, envoy] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hello\n").await.unwrap();
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(s);
        tokio::time::timeout(e2e::WAIT, r.read_line(&mut line)).await.expect("an answer").unwrap();
        assert_eq!(line, "external: hello\n", "{addr}");
    }
    pair.dp.logs.wait_for(&["the server's certificate is not verified"]);
}

/// A filter chain without filters (MeshProxyPatch can leave one): Envoy takes the config
/// and closes every connection the chain gets; so does dp.
#[tokio::test(flavor = "multi_thread")]
async fn a_chain_without_filters_closes_its_connections_as_envoys_does() {
    let pair = Pair::start(vec![listener("empty", vec![])]);
    let (dp, envoy) = pair.listener("empty");
    for addr in [dp, envoy] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"hello\n").await;
        assert!(e2e::closed_without_data(&mut s).await, "{addr}");
    }
}

/// A gRPC health server on HTTP/2 (h2c) answering every check with `status`
/// (1 SERVING, 2 NOT_SERVING), as a gRPC application's health service does.
async fn grpc_health_server(status: u8) -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                // One frame: uncompressed, 2 bytes, HealthCheckResponse { status }.
                let frame = bytes::Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
                let body =
                    Full::new(frame).with_trailers(async move { Some(Ok::<_, std::convert::Infallible>(trailers)) });
                let mut res = hyper::Response::new(body);
                res.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/grpc"));
                Ok::<_, std::convert::Infallible>(res)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// MeshHealthCheck's gRPC check: the host whose health service answers NOT_SERVING is
/// failed, the SERVING one healthy, in dp's `/clusters` as in Envoy's.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_health_checks_fail_the_host_that_is_not_serving_as_envoys_do() {
    let (serving, not_serving) = (grpc_health_server(1).await, grpc_health_server(2).await);
    let endpoints: Vec<Value> =
        [serving, not_serving].iter().map(|a| json!({"endpoint": {"address": socket(*a)}})).collect();
    let cluster = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "grpc-app", "type": "STATIC", "connectTimeout": "5s",
        "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicitHttpConfig": {"http2ProtocolOptions": {}}}},
        "healthChecks": [{"timeout": "2s", "interval": "1s", "unhealthyThreshold": 1, "healthyThreshold": 1,
            "grpcHealthCheck": {"serviceName": "orders"}}],
        "loadAssignment": {"clusterName": "grpc-app", "endpoints": [{"lbEndpoints": endpoints}]}
    });
    let pair = Pair::start(vec![cluster, listener("front", vec![tcp_proxy("grpc-app")])]);
    let flags = |admin: SocketAddr| {
        let (_, body) = e2e::http_get(admin, "/clusters").expect("GET /clusters");
        let of = |a: SocketAddr| {
            body.lines().find_map(|l| l.strip_prefix(&format!("grpc-app::{a}::health_flags::")).map(str::to_owned))
        };
        (of(serving), of(not_serving))
    };
    for (who, admin) in [("Envoy", pair.envoy.admin), ("dp", pair.dp.admin)] {
        let got = e2e::wait_until(&format!("{who}'s checks to settle"), || {
            let f = flags(admin);
            (f.1.as_deref() == Some("/failed_active_hc") && f.0.as_deref() == Some("healthy")).then_some(f)
        });
        assert_eq!(got, (Some("healthy".into()), Some("/failed_active_hc".into())), "{who}");
    }
}

/// MeshCircuitBreaker's `splitExternalAndLocalErrors`: with the split, failed connects
/// count towards `consecutive_local_origin_failure` (here 2, while `consecutive_5xx` is
/// 100): after two refused connections the dead host is ejected, in dp's `/clusters` as
/// in Envoy's, and every later connection reaches the live one.
#[tokio::test(flavor = "multi_thread")]
async fn local_origin_failures_eject_a_host_when_split_as_envoys_do() {
    let live = who_am_i().await;
    // A port nothing listens on: connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let endpoints: Vec<Value> = [dead, live].iter().map(|a| json!({"endpoint": {"address": socket(*a)}})).collect();
    let cluster = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "split", "type": "STATIC", "connectTimeout": "1s",
        "outlierDetection": {"splitExternalLocalOriginErrors": true, "consecutiveLocalOriginFailure": 2,
            "consecutive5xx": 100, "baseEjectionTime": "300s", "maxEjectionPercent": 50, "interval": "1s"},
        "loadAssignment": {"clusterName": "split", "endpoints": [{"lbEndpoints": endpoints}]}
    });
    let proxy = json!({"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "cluster": "split", "statPrefix": "split", "maxConnectAttempts": 3}});
    let pair = Pair::start(vec![cluster, listener("front", vec![proxy])]);
    let (dp_front, envoy_front) = pair.listener("front");
    for (who, front, admin) in [("Envoy", envoy_front, pair.envoy.admin), ("dp", dp_front, pair.dp.admin)] {
        // Round robin over both hosts, retrying a refused connect on the other: every
        // connection is answered, and the dead host collects its failures.
        for _ in 0..6 {
            assert_eq!(answer(front).await, "127.0.0.1\n", "{who}");
        }
        // The ejection is recorded off the connection's path: read until it shows.
        e2e::wait_until(&format!("{who} to eject {dead}"), || {
            let (_, body) = e2e::http_get(admin, "/clusters").ok()?;
            let ejected = body.contains(&format!("split::{dead}::health_flags::/failed_outlier_check"));
            (ejected && body.contains(&format!("split::{live}::health_flags::healthy"))).then_some(())
        });
    }
}

/// Health checks reach a host as its traffic does, through the cluster's transport
/// socket: a TCP check's payload goes over TLS to a server that only speaks TLS (as a
/// mesh sidecar's inbound does), and the host is healthy, in dp's `/clusters` as in
/// Envoy's.
#[tokio::test(flavor = "multi_thread")]
async fn health_checks_go_through_the_clusters_tls_as_envoys_do() {
    let (cfg, pem) = e2e::tls::self_signed("app.example");
    let server = e2e::tls::serve(cfg, "app").await;
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let cluster = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "tls-app", "type": "STATIC", "connectTimeout": "5s",
        "transportSocket": {"name": "envoy.transport_sockets.tls", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": "app.example",
            "commonTlsContext": {"validationContext": {"trustedCa": {"inlineString": pem},
                "matchTypedSubjectAltNames": [{"sanType": "DNS", "matcher": {"exact": "app.example"}}]}}}},
        "healthChecks": [{"timeout": "2s", "interval": "1s", "unhealthyThreshold": 1, "healthyThreshold": 1,
            "tcpHealthCheck": {"send": {"text": hex("ping\n")}, "receive": [{"text": hex("app: ping")}]}}],
        "loadAssignment": {"clusterName": "tls-app", "endpoints": [{"lbEndpoints": [{"endpoint": {"address": socket(server)}}]}]}
    });
    let pair = Pair::start(vec![cluster, listener("front", vec![tcp_proxy("tls-app")])]);
    for (who, admin) in [("Envoy", pair.envoy.admin), ("dp", pair.dp.admin)] {
        e2e::wait_until(&format!("{who}'s check over TLS to pass"), || {
            let (_, body) = e2e::http_get(admin, "/clusters").ok()?;
            body.contains(&format!("tls-app::{server}::health_flags::healthy")).then_some(())
        });
    }
    let (_, stats) = e2e::http_get(pair.dp.admin, "/stats?filter=tls-app.health_check").unwrap();
    assert!(stats.contains("cluster.tls-app.health_check.success: "), "{stats}");
    assert!(!stats.contains("cluster.tls-app.health_check.success: 0"), "{stats}");
}

/// MeshMetric's OpenTelemetry backend gives a listener on a Unix socket (where kuma-dp's
/// exporter would send metrics). dp has no exporter: it takes the update, says the
/// listener is not served, and every other listener of the update serves, as in Envoy.
#[tokio::test(flavor = "multi_thread")]
async fn a_listener_on_a_unix_socket_does_not_hold_back_the_update() {
    let server = who_am_i().await;
    let dir = e2e::temp_dir("otel-pipe");
    let otel = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "_kuma:metrics:opentelemetry:collector",
        "address": {"pipe": {"path": dir.join("kuma-otel-collector.sock").to_str().unwrap()}},
        "filterChains": [{"filters": [tcp_proxy("app")]}]
    });
    let pair =
        Pair::start(vec![static_cluster("app", server, json!({})), otel, listener("front", vec![tcp_proxy("app")])]);
    let (dp, envoy) = pair.listener("front");
    assert_eq!(answer(envoy).await, "127.0.0.1\n");
    assert_eq!(answer(dp).await, "127.0.0.1\n");
    pair.dp.logs.wait_for(&["_kuma:metrics:opentelemetry:collector", "is not served"]);
}
