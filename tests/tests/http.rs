//! dp's HTTP data path (`http_connection_manager`) from a file config, with real clients
//! (curl, h2load, hyper) against real backends: routing by host, path, header and regex,
//! weighted clusters, rewrites, direct responses, retries, timeouts, HTTP/2 both sides,
//! and bad input answered as Envoy does.

use e2e::http::{Client, HttpBackend, Mode, get};
use e2e::{Dp, run, temp_dir, wait_until, wait_within};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

fn cluster(name: &str, eps: &[SocketAddr], h2: bool) -> Value {
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connectTimeout": "1s",
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": eps.iter().map(|a| json!(
            {"endpoint": {"address": {"socketAddress": {"address": a.ip().to_string(), "portValue": a.port()}}}})).collect::<Vec<_>>()}]}
    });
    if h2 {
        c["typedExtensionProtocolOptions"] = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicitHttpConfig": {"http2ProtocolOptions": {}}}});
    }
    c
}

fn route(m: Value, action: Value) -> Value {
    let mut r = json!({"match": m});
    let obj = r.as_object_mut().unwrap();
    for (k, v) in action.as_object().unwrap() {
        obj.insert(k.clone(), v.clone());
    }
    r
}

fn hcm_listener(name: &str, vhosts: Value, extra: Value) -> Value {
    let mut hcm = json!({
        "@type": HCM, "statPrefix": name,
        "httpFilters": [{"name": "envoy.filters.http.router", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        "routeConfig": {"name": name, "virtualHosts": vhosts}
    });
    for (k, v) in extra.as_object().unwrap() {
        hcm[k] = v.clone();
    }
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
        "filterChains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": hcm}]}]
    })
}

struct Setup {
    dp: Dp,
    web: SocketAddr,
    strict: SocketAddr,
    a: HttpBackend,
    b: HttpBackend,
    h2: HttpBackend,
    flaky: HttpBackend,
    good: HttpBackend,
    slow: HttpBackend,
}

async fn setup() -> Setup {
    let (a, b, h2, flaky, good, slow) = (
        HttpBackend::start("a").await,
        HttpBackend::start("b").await,
        HttpBackend::start("h2").await,
        HttpBackend::start("flaky").await,
        HttpBackend::start("good").await,
        HttpBackend::start("slow").await,
    );
    flaky.set_mode(Mode::Reset);
    slow.set_mode(Mode::Slow(Duration::from_secs(30)));
    let api = json!({"name": "api", "domains": ["api.example"], "routes": [
        route(json!({"prefix": "/v2", "headers": [{"name": "x-version", "stringMatch": {"exact": "2"}}]}), json!({"route": {"cluster": "b"}})),
        route(json!({"safeRegex": {"regex": "/items/[0-9]+"}}), json!({"route": {"cluster": "b"}})),
        route(json!({"prefix": "/old/"}), json!({"route": {"cluster": "a", "prefixRewrite": "/new/", "hostRewriteLiteral": "rewritten.example"}})),
        route(json!({"prefix": "/re/"}), json!({"route": {"cluster": "a",
            "regexRewrite": {"pattern": {"regex": "^/re/(\\w+)/(\\w+)$"}, "substitution": "/\\2/\\1"}}})),
        route(json!({"prefix": "/weighted"}), json!({"route": {"weightedClusters": {"clusters": [
            {"name": "a", "weight": 20}, {"name": "b", "weight": 80}]}}})),
        route(json!({"path": "/direct"}), json!({"directResponse": {"status": 201, "body": {"inlineString": "made by dp"}}})),
        route(json!({"prefix": "/retry"}), json!({"route": {"cluster": "flaky-or-good",
            "retryPolicy": {"retryOn": "reset,connect-failure", "numRetries": 2}}})),
        route(json!({"prefix": "/noretry"}), json!({"route": {"cluster": "flaky-or-good"}})),
        route(json!({"prefix": "/slow"}), json!({"route": {"cluster": "slow", "timeout": "0.5s"}})),
        route(json!({"prefix": "/h2"}), json!({"route": {"cluster": "h2"}})),
        // MeshHTTPRoute's method match: a `:method` header matcher.
        route(json!({"prefix": "/m", "headers": [{"name": ":method", "stringMatch": {"exact": "POST"}}]}), json!({"route": {"cluster": "b"}})),
        route(json!({"prefix": "/"}), json!({"route": {"cluster": "a"},
            "responseHeadersToAdd": [{"header": {"key": "x-route", "value": "api-default"}}]})),
    ]});
    let any = json!({"name": "any", "domains": ["*"], "routes": [route(json!({"prefix": "/"}), json!({"route": {"cluster": "b"}}))]});
    let resources = vec![
        cluster("a", &[a.addr], false),
        cluster("b", &[b.addr], false),
        cluster("h2", &[h2.addr], true),
        cluster("flaky-or-good", &[flaky.addr, good.addr], false),
        cluster("slow", &[slow.addr], false),
        hcm_listener("web", json!([api, any]), json!({})),
        hcm_listener(
            "strict",
            json!([{"name": "all", "domains": ["*"], "routes": [route(json!({"prefix": "/"}), json!({"route": {"cluster": "a"}}))]}]),
            json!({"requestHeadersTimeout": "1s", "maxRequestHeadersKb": 8}),
        ),
    ];
    let file = temp_dir("http").join("http.json");
    std::fs::write(&file, serde_json::to_vec(&json!({"version_info": "1", "resources": resources})).unwrap()).unwrap();
    let dp = Dp::start(&file, &[]);
    let (web, strict) = (dp.listener("web"), dp.listener("strict"));
    Setup { dp, web, strict, a, b, h2, flaky, good, slow }
}

fn curl(args: &[&str]) -> (String, String) {
    let (status, out) = run(Path::new("curl"), args, &[]);
    assert!(status.success(), "curl {args:?}: {out}");
    let (body, rest) = out.split_once("\n@@").unwrap_or((&out, ""));
    (body.to_string(), rest.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_path_header_and_regex_and_rewrites() {
    let s = setup().await;
    let g = get(s.web, "api.example", "/v2/x", &[("x-version", "2")]).await;
    assert_eq!((g.status, g.body.as_str()), (200, "b"));
    assert_eq!(get(s.web, "api.example", "/v2/x", &[("x-version", "3")]).await.body, "a");
    assert_eq!(get(s.web, "api.example", "/items/17", &[]).await.body, "b");
    assert_eq!(get(s.web, "api.example", "/items/17x", &[]).await.body, "a", "a regex matches the whole path");
    assert_eq!(get(s.web, "other.example", "/anything", &[]).await.body, "b", "the `*` virtual host");
    let g = get(s.web, "api.example", "/old/a/b?q=1", &[]).await;
    assert_eq!(g.body, "a");
    let seen = s.a.last();
    assert_eq!(seen.path, "/new/a/b?q=1");
    assert_eq!(seen.headers["host"], "rewritten.example");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert!(seen.headers.contains_key("x-request-id"));
    assert_eq!(seen.headers["x-envoy-expected-rq-timeout-ms"], "15000");
    get(s.web, "api.example", "/re/one/two", &[]).await;
    assert_eq!(s.a.last().path, "/two/one");
    let g = get(s.web, "api.example", "/direct", &[]).await;
    assert_eq!((g.status, g.body.as_str()), (201, "made by dp"));
    let g = get(s.web, "api.example", "/", &[]).await;
    assert_eq!(g.headers["x-route"], "api-default");
    assert_eq!(g.headers["server"], "envoy");
    assert!(s.dp.stat("envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix=\"web\"}") >= 9);
    assert!(s.dp.stat("envoy_cluster_upstream_rq{envoy_response_code=\"200\",envoy_cluster_name=\"a\"}") >= 3);
    let (_, prom) = s.dp.get("/stats/prometheus");
    assert!(prom.contains("envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"a\",le=\"+Inf\"}"), "{prom}");
    // Envoy's `/stats`, as Kuma's GUI and `kumactl inspect dataplane --type=stats` read it.
    let (status, text) = s.dp.get("/stats?filter=%5Ecluster%5C.a%5C.upstream_rq_(200%7C2xx%7Ctime)%24");
    assert_eq!(status, 200, "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for (line, name) in lines.iter().zip(["cluster.a.upstream_rq_200", "cluster.a.upstream_rq_2xx"]) {
        let n: u64 = line.strip_prefix(&format!("{name}: ")).and_then(|v| v.parse().ok()).expect(&text);
        assert!(n >= 3, "{text}");
    }
    assert!(lines[2].starts_with("cluster.a.upstream_rq_time: P0(nan,") && lines[2].contains(" P99(nan,"), "{text}");
    let (status, used) = s.dp.get("/stats?usedonly&type=Counters&format=json");
    let used: serde_json::Value = serde_json::from_str(&used).expect(&used);
    assert_eq!(status, 200);
    let names: Vec<&str> = used["stats"].as_array().unwrap().iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(names.contains(&"http.web.downstream_rq_total") && names.contains(&"http.web.downstream_rq_2xx"), "{used}");
    assert!(used["stats"].as_array().unwrap().iter().all(|s| s["value"].as_u64() > Some(0)), "{used}");
    // `:method` is matched like a header: POST goes to b, GET falls through to a.
    let (posted, _) = curl(&[
        "-s",
        "-X",
        "POST",
        "-H",
        "host: api.example",
        &format!("http://{}/m", s.web),
        "-w",
        "\n@@%{http_code}",
    ]);
    assert_eq!(posted, "b");
    assert_eq!(get(s.web, "api.example", "/m", &[]).await.body, "a");
    let (status, bad) = s.dp.get("/stats?filter=(");
    assert_eq!((status, bad.lines().count()), (400, 1), "{bad}");
    s.dp.logs.wait_for(&["method=GET", "authority=api.example", "path=/direct", "status=201"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_clusters_hold_their_weights_over_a_thousand_requests() {
    let s = setup().await;
    let mut c = Client::connect(s.web).await;
    let mut to_a = 0;
    for _ in 0..1000 {
        let g = c.get("api.example", "/weighted").await;
        assert_eq!(g.status, 200);
        if g.body == "a" {
            to_a += 1;
        }
    }
    assert!((150..=250).contains(&to_a), "20 % of 1,000 is 200 (within 5 %): got {to_a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_h2load_over_http1_and_h2_to_http1_and_h2_backends() {
    let s = setup().await;
    let url = format!("http://{}/h2/x", s.web);
    let (body, meta) = curl(&["-sS", "-H", "host: api.example", "-w", "\n@@%{http_version}", &url]);
    assert_eq!((body.as_str(), meta.as_str()), ("h2", "1.1"));
    assert_eq!(s.h2.last().version, "HTTP/2.0", "the backend was reached over h2");
    let (body, meta) =
        curl(&["-sS", "--http2-prior-knowledge", "-H", "host: api.example", "-w", "\n@@%{http_version}", &url]);
    assert_eq!((body.as_str(), meta.as_str()), ("h2", "2"));
    let (body, _) =
        curl(&["-sS", "--http2-prior-knowledge", "-H", "host: api.example", &format!("http://{}/v", s.web)]);
    assert_eq!(body, "a", "h2 downstream to an HTTP/1.1 backend");
    assert_eq!(s.a.last().version, "HTTP/1.1");
    let before = s.b.requests();
    let (status, out) =
        run(Path::new("h2load"), &["-n", "400", "-c", "4", "-m", "8", &format!("http://{}/anything", s.web)], &[]);
    assert!(status.success(), "{out}");
    assert!(out.contains("400 succeeded, 0 failed"), "{out}");
    assert!(out.contains("400 2xx"), "{out}");
    assert_eq!(s.b.requests() - before, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_moves_a_request_off_a_backend_that_resets() {
    let s = setup().await;
    for i in 0..10 {
        let g = get(s.web, "api.example", "/retry", &[]).await;
        assert_eq!((g.status, g.body.as_str()), (200, "good"), "request {i}");
    }
    assert!(s.flaky.requests() >= 1, "round robin sent some first attempts to the flaky backend");
    assert!(s.dp.stat("envoy_cluster_upstream_rq_retry{envoy_cluster_name=\"flaky-or-good\"}") >= 1);
    // Without a retry policy the reset reaches the client as a 503.
    let mut statuses = vec![];
    for _ in 0..4 {
        statuses.push(get(s.web, "api.example", "/noretry", &[]).await.status);
    }
    assert!(statuses.contains(&503) && statuses.contains(&200), "{statuses:?}");
    assert_eq!(s.good.last().path, "/noretry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_answers_504_and_cancels_the_upstream_request() {
    let s = setup().await;
    let g = get(s.web, "api.example", "/slow", &[]).await;
    assert_eq!((g.status, g.body.as_str()), (504, "upstream request timeout"));
    wait_until("the slow backend sees its request cancelled", || {
        (s.slow.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    });
    assert_eq!(s.dp.stat("envoy_cluster_upstream_rq_timeout{envoy_cluster_name=\"slow\"}"), 1);
    s.dp.logs.wait_for(&["path=/slow", "status=504", "flag=\"UT\""]);
}

/// Writes raw bytes and reads the whole answer until the server closes.
async fn raw(addr: SocketAddr, send: &[u8], wait: bool) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(send).await.unwrap();
    if !wait {
        let _ = s.shutdown().await;
    }
    let mut out = vec![];
    let _ =
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.expect("dp closed the connection");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_431_and_408_and_nothing_goes_upstream() {
    let s = setup().await;
    let before = s.a.requests();
    let answer = raw(s.strict, b"GARBAGE / NOT-HTTP\r\n\r\n", true).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let big = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(20_000));
    let answer = raw(s.strict, big.as_bytes(), true).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let answer = raw(s.strict, b"GET / HTTP/1.1\r\nhost: x\r\n", true).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(s.a.requests(), before, "no bad request reached the backend");
    // A good request on the same listener still works.
    assert_eq!(get(s.strict, "x", "/", &[]).await.body, "a");
}

/// Reads one HTTP/1.1 response (headers and a `content-length` body) from a kept-alive
/// connection.
async fn one_response(s: &mut tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await.expect("an answer").unwrap();
        assert!(n > 0, "dp closed the connection; got {text:?}");
        got.extend_from_slice(&b[..n]);
    }
}

/// An idle kept-alive HTTP/1 connection is parked (hyper's buffers released) and serves
/// its next requests as if nothing happened: a whole request, one that arrives in two
/// pieces with a pause between them, and two pipelined at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_parked_and_serves_its_next_requests() {
    let s = setup().await;
    let parked = "envoy_http_downstream_cx_http1_parked{envoy_http_conn_manager_prefix=\"web\"}";
    let before = s.dp.stat(parked);
    let req = b"GET /direct HTTP/1.1\r\nhost: api.example\r\n\r\n";
    let mut c = tokio::net::TcpStream::connect(s.web).await.unwrap();
    c.write_all(req).await.unwrap();
    assert!(one_response(&mut c).await.ends_with("made by dp"));
    wait_within(Duration::from_secs(10), "the idle connection to be parked", || {
        (s.dp.stat(parked) > before).then_some(())
    });
    // A whole request on the parked connection.
    c.write_all(req).await.unwrap();
    let r = one_response(&mut c).await;
    assert!(r.starts_with("HTTP/1.1 201") && r.ends_with("made by dp") && !r.contains("connection: close"), "{r}");
    wait_within(Duration::from_secs(10), "parked again", || (s.dp.stat(parked) > before + 1).then_some(()));
    // Half a request, a pause longer than dp waits before parking, then the rest.
    c.write_all(&req[..20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(&req[20..]).await.unwrap();
    assert!(one_response(&mut c).await.ends_with("made by dp"));
    // Two requests in one write: two answers, in order.
    let mut two = req.to_vec();
    two.extend_from_slice(b"GET /items/7 HTTP/1.1\r\nhost: api.example\r\n\r\n");
    c.write_all(&two).await.unwrap();
    assert!(one_response(&mut c).await.ends_with("made by dp"));
    let r = one_response(&mut c).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.contains("x-backend: b"), "{r}");
}
