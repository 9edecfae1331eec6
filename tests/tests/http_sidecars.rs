//! HTTP services (`kuma.io/protocol: http`) from our `cp`, on dp and real Envoy sidecars
//! alike: the outbounds route requests (MeshHTTPRoute, MeshRetry, MeshTimeout), and the
//! inbounds tell the application who called in `x-forwarded-client-cert`, as Envoy does.

use std::net::SocketAddr;

use e2e::Cp;
use e2e::http::HttpBackend;
use e2e::mesh::{MESH, SYNC, free_port};
use e2e::sidecars::{Sidecar, http_dataplane, start};

/// One answer through `addr`: (status, body), or why there was none.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    get_with_headers(addr, path).await.map(|(s, _, b)| (s, b))
}

/// The same with the response's headers.
async fn get_with_headers(addr: SocketAddr, path: &str) -> Result<(u16, hyper::HeaderMap, String), String> {
    use http_body_util::BodyExt;
    let s = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(path)
        .header("host", "backend")
        // A header a caller could forge: the inbound replaces it.
        .header("x-forwarded-client-cert", "URI=spiffe://default/admin")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    let body = res.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls until a request for `path` through `addr` is answered `(status, body)`.
async fn until(addr: SocketAddr, path: &str, want: (u16, &str), what: &str) {
    e2e::poll_within(SYNC, what, async || match get(addr, path).await {
        Ok((s, b)) if s == want.0 && b == want.1 => Ok(()),
        other => Err(format!("{other:?}, wanted {want:?}")),
    })
    .await
}

/// A server sidecar (`envoy` or dp) of `service` in front of a new HTTP application `app`,
/// with extra inbound tags.
async fn server(zone: &Cp, envoy: bool, app: &str, service: &str, tags: &[(&str, &str)]) -> (HttpBackend, Sidecar) {
    let backend = HttpBackend::start(app).await;
    let mut res = http_dataplane(app, service, &backend, &[]);
    for (k, v) in tags {
        res["networking"]["inbound"][0]["tags"][*k] = (*v).into();
    }
    (backend, start(zone, envoy, res).await)
}

/// Client sidecars `client-dp` and `client-envoy`, each with an outbound to every service
/// of `services`: (name, outbound addresses in that order, sidecar).
async fn clients(zone: &Cp, services: &[&str]) -> Vec<(String, Vec<SocketAddr>, Sidecar)> {
    let mut out = vec![];
    for (kind, envoy) in [("dp", false), ("envoy", true)] {
        let name = format!("client-{kind}");
        let addrs: Vec<SocketAddr> =
            services.iter().map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap()).collect();
        let refs: Vec<(u16, &str)> = addrs.iter().zip(services).map(|(a, s)| (a.port(), *s)).collect();
        let web = HttpBackend::start("web").await;
        let side = start(zone, envoy, http_dataplane(&name, &name, &web, &refs)).await;
        out.push((name, addrs, side));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_services_answer_between_dp_and_envoy_and_learn_their_callers_identity() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let (srv_dp, _s1) = server(&zone, false, "srv-dp", "srv-dp", &[]).await;
    let (srv_envoy, _s2) = server(&zone, true, "srv-envoy", "srv-envoy", &[]).await;
    let clients = clients(&zone, &["srv-dp", "srv-envoy"]).await;
    for (client, addrs, _) in &clients {
        let mut seen = vec![];
        for (addr, app) in addrs.iter().zip([&srv_dp, &srv_envoy]) {
            let what = format!("{client} -> {}", app.name);
            until(*addr, "/hello", (200, &app.name), &what).await;
            let last = app.last();
            assert_eq!(last.path, "/hello", "{what}");
            let xfcc = last.headers.get("x-forwarded-client-cert").cloned().unwrap_or_default();
            // The server's own identities, the client certificate's hash, the client's URIs.
            // (`By` once per URI SAN of the server's certificate: its SPIFFE ID, then its tags.)
            assert!(xfcc.starts_with(&format!("By=spiffe://default/{};", app.name)), "{what}: {xfcc}");
            assert!(xfcc.contains(&format!(";By=kuma://kuma.io/service/{};Hash=", app.name)), "{what}: {xfcc}");
            assert!(xfcc.contains(&format!(";URI=spiffe://default/{client};")), "{what}: {xfcc}");
            assert!(!xfcc.contains("admin"), "{what}: the forged header was kept: {xfcc}");
            seen.push(xfcc.replace(&app.name, "SERVER"));
        }
        // dp writes the header exactly as Envoy does (same client certificate, same hash).
        assert_eq!(seen[0], seen[1], "{client}: dp's and Envoy's x-forwarded-client-cert");
    }
}

/// Polls until `/v2/items` through `addr` is answered by `v2`, which saw the header the
/// route sets (round robin reaches v2 now and then without the route: the header says the
/// route did).
async fn until_routed_to_v2(addr: SocketAddr, v2: &HttpBackend, client: &str) {
    e2e::poll_within(SYNC, &format!("{client} -> /v2 on v2 with the header"), async || {
        let got = get(addr, "/v2/items").await;
        let last = v2.last();
        match (&got, last.path.as_str(), last.headers.get("x-route").map(String::as_str)) {
            (Ok((200, b)), "/v2/items", Some("to-v2")) if b == "backend-v2" => Ok(()),
            (_, path, header) => Err(format!("{got:?}; v2 last saw {path} with x-route {header:?}")),
        }
    })
    .await;
}

const ROUTE: &str = "type: MeshHTTPRoute\nname: backend-route\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  \
                     to:\n  - targetRef:\n      kind: MeshService\n      name: backend\n    rules:\n    \
                     - matches:\n      - path:\n          type: PathPrefix\n          value: /v2\n      default:\n        \
                     filters:\n        - type: RequestHeaderModifier\n          requestHeaderModifier:\n            \
                     set:\n            - name: x-route\n              value: to-v2\n        \
                     backendRefs:\n        - kind: MeshServiceSubset\n          name: backend\n          tags:\n            \
                     version: v2\n    - matches:\n      - path:\n          type: PathPrefix\n          value: /\n      \
                     default:\n        backendRefs:\n        - kind: MeshServiceSubset\n          name: backend\n          \
                     tags:\n            version: v1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshhttproute_sends_a_path_to_a_subset_with_a_header_and_the_rest_to_another() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    // backend v1 behind dp, v2 behind Envoy.
    let (_v1, _s1) = server(&zone, false, "backend-v1", "backend", &[("version", "v1")]).await;
    let (v2, _s2) = server(&zone, true, "backend-v2", "backend", &[("version", "v2")]).await;
    let clients = clients(&zone, &["backend"]).await;
    for (client, addrs, _) in &clients {
        // No route yet: both versions answer.
        until(addrs[0], "/", (200, "backend-v1"), &format!("{client} -> backend")).await;
        until(addrs[0], "/", (200, "backend-v2"), &format!("{client} -> backend")).await;
    }
    zone.apply(ROUTE);
    for (client, addrs, _) in &clients {
        until_routed_to_v2(addrs[0], &v2, client).await;
        // `/v2` itself is the prefix's other route; `/v2x` is not under it.
        assert_eq!(get(addrs[0], "/v2").await, Ok((200, "backend-v2".into())), "{client}: /v2");
        // Everything else goes to v1 only: 20 in a row, which round robin never gives.
        for path in ["/", "/v2x", "/other"] {
            for i in 0..20 {
                assert_eq!(get(addrs[0], path).await, Ok((200, "backend-v1".into())), "{client}: {path} #{i}");
            }
        }
    }
}

/// The mesh, a `backend` application behind a dp sidecar, and the dp and Envoy clients
/// once each has had an answer from it.
async fn backend_with_clients(zone: &Cp) -> (HttpBackend, Sidecar, Vec<(String, Vec<SocketAddr>, Sidecar)>) {
    zone.apply(MESH);
    let (app, srv) = server(zone, false, "backend", "backend", &[]).await;
    let clients = clients(zone, &["backend"]).await;
    for (client, addrs, _) in &clients {
        until(addrs[0], "/", (200, "backend"), &format!("{client} -> backend")).await;
    }
    (app, srv, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshretry_retries_and_meshtimeout_cuts_an_http_outbound() {
    use e2e::http::Mode;
    let zone = Cp::start("zone-1");
    let (app, _srv, clients) = backend_with_clients(&zone).await;
    zone.apply(
        "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  - targetRef:\n      \
         kind: Mesh\n    default:\n      http:\n        numRetries: 2\n        retryOn:\n        - \"503\"\n",
    );
    zone.apply(
        "type: MeshTimeout\nname: timeout\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  - targetRef:\n      \
         kind: Mesh\n    default:\n      http:\n        requestTimeout: 1s\n",
    );
    for (client, addrs, _) in &clients {
        // A 503 is tried three times in all, then given to the client.
        e2e::poll_within(SYNC, &format!("{client}: 503 retried twice"), async || {
            let before = app.requests();
            let got = get(addrs[0], "/status/503").await;
            let tries = app.requests() - before;
            if got == Ok((503, "backend".into())) && tries == 3 {
                Ok(())
            } else {
                Err(format!("{got:?} after {tries} tries"))
            }
        })
        .await;
    }
    app.set_mode(Mode::Slow(std::time::Duration::from_secs(20)));
    for (client, addrs, _) in &clients {
        // Cut after 1s: the gateway timeout, not the application's answer 20s later.
        e2e::poll_within(SYNC, &format!("{client}: request timeout"), async || match get(addrs[0], "/").await {
            Ok((504, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshtimeout_on_a_meshhttproute_cuts_only_that_routes_requests() {
    use e2e::http::Mode;
    let zone = Cp::start("zone-1");
    let (app, _srv, clients) = backend_with_clients(&zone).await;
    zone.apply(
        "type: MeshHTTPRoute\nname: slow-route\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  \
         - targetRef:\n      kind: MeshService\n      name: backend\n    rules:\n    - matches:\n      - path:\n          \
         type: PathPrefix\n          value: /slow\n      default:\n        backendRefs:\n        \
         - kind: MeshService\n          name: backend\n",
    );
    zone.apply(
        "type: MeshTimeout\nname: route-timeout\nmesh: default\nspec:\n  targetRef:\n    kind: MeshHTTPRoute\n    \
         name: slow-route\n  to:\n  - targetRef:\n      kind: Mesh\n    default:\n      http:\n        requestTimeout: 1s\n",
    );
    // Every answer takes 3s: over the route's 1s, under the default 15s.
    app.set_mode(Mode::Slow(std::time::Duration::from_secs(3)));
    for (client, addrs, _) in &clients {
        e2e::poll_within(SYNC, &format!("{client}: /slow cut by the route's timeout"), async || {
            match get(addrs[0], "/slow/x").await {
                Ok((504, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        assert_eq!(
            get(addrs[0], "/other").await,
            Ok((200, "backend".into())),
            "{client}: a request off the route keeps the default timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshfaultinjection_and_meshratelimit_act_on_dp_and_envoy_http_inbounds() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let (srv_dp, _s1) = server(&zone, false, "srv-dp", "srv-dp", &[]).await;
    let (srv_envoy, _s2) = server(&zone, true, "srv-envoy", "srv-envoy", &[]).await;
    let clients = clients(&zone, &["srv-dp", "srv-envoy"]).await;
    let (_, addrs, _) = &clients[0];
    let servers = [&srv_dp, &srv_envoy];
    for (addr, app) in addrs.iter().zip(servers) {
        until(*addr, "/", (200, &app.name), &format!("client-dp -> {}", app.name)).await;
    }
    // Every request on the servers' inbounds: at most two per hour, then 429 and a header.
    zone.apply(
        "type: MeshRateLimit\nname: rl\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  rules:\n  - default:\n      \
         local:\n        http:\n          requestRate:\n            num: 2\n            interval: 1h\n          \
         onRateLimit:\n            status: 429\n            headers:\n              set:\n              \
         - name: x-limited\n                value: \"yes\"\n",
    );
    for (addr, app) in addrs.iter().zip(servers) {
        let what = format!("client-dp -> {}: rate limited", app.name);
        e2e::poll_within(SYNC, &what, async || match get_with_headers(*addr, "/").await {
            Ok((429, h, _)) if h.get("x-limited").is_some_and(|v| v == "yes") => Ok(()),
            other => Err(format!("{other:?}")),
        })
        .await;
        let before = app.requests();
        assert_eq!(get(*addr, "/").await.map(|(s, _)| s), Ok(429), "{what}: the bucket stays empty");
        assert_eq!(app.requests(), before, "{what}: a limited request reached the application");
    }
    // An abort on every request: 418, and the application never sees it. (It comes before
    // the rate limit, as in Kuma's filter order.)
    zone.apply(
        "type: MeshFaultInjection\nname: fi\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  from:\n  \
         - targetRef:\n      kind: Mesh\n    default:\n      http:\n      - abort:\n          httpStatus: 418\n          \
         percentage: 100\n",
    );
    for (client, addrs, _) in &clients {
        for (addr, app) in addrs.iter().zip(servers) {
            let what = format!("{client} -> {}: aborted", app.name);
            e2e::poll_within(SYNC, &what, async || match get(*addr, "/").await {
                Ok((418, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            })
            .await;
        }
    }
}

/// Across zones: `backend` v2 runs only in zone-2, behind its dp zone ingress; a
/// MeshHTTPRoute applied on global sends `/v2` there, with a header, and the rest to
/// zone-1's v1. The subset's cluster dials the ingress with the subset's SNI
/// (`backend{mesh=default,version=v2}`), which only the chain the ingress made for the
/// route's subset takes; the sidecars' HTTP/2 goes through it undecrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshhttproute_reaches_a_subset_in_another_zone_through_its_ingress() {
    let (global, zone1, zone2) = e2e::mesh::global_and_two_zones();
    let _ingress = e2e::mesh::start_ingress(&global, &zone2, "zone-2", free_port());
    let (_v1, _s1) = server(&zone1, false, "backend-v1", "backend", &[("version", "v1")]).await;
    let (v2, _s2) = server(&zone2, true, "backend-v2", "backend", &[("version", "v2")]).await;
    let clients = clients(&zone1, &["backend"]).await;
    for (client, addrs, _) in &clients {
        until(addrs[0], "/", (200, "backend-v2"), &format!("{client} -> backend in zone-2")).await;
    }
    global.apply(ROUTE);
    for (client, addrs, _) in &clients {
        until_routed_to_v2(addrs[0], &v2, client).await;
        for i in 0..20 {
            assert_eq!(get(addrs[0], "/other").await, Ok((200, "backend-v1".into())), "{client}: /other #{i}");
        }
    }
}

/// MeshHealthCheck's HTTP check on an HTTP service: once `backend-b`'s application stops
/// answering, the clients' checks through its sidecar time out and every request goes to
/// `backend-a`. (A TCP check would pass: b's sidecar still accepts connections.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_meshhealthcheck_keeps_requests_off_an_instance_whose_application_hangs() {
    use e2e::http::Mode;
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let (_a, _sa) = server(&zone, false, "backend-a", "backend", &[]).await;
    let (b, _sb) = server(&zone, true, "backend-b", "backend", &[]).await;
    let clients = clients(&zone, &["backend"]).await;
    for (client, addrs, _) in &clients {
        until(addrs[0], "/", (200, "backend-a"), &format!("{client} -> backend")).await;
        until(addrs[0], "/", (200, "backend-b"), &format!("{client} -> backend")).await;
    }
    b.set_mode(Mode::Slow(std::time::Duration::from_secs(3600)));
    zone.apply(
        "type: MeshHealthCheck\nname: hc\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  - targetRef:\n      \
         kind: Mesh\n    default:\n      interval: 1s\n      timeout: 1s\n      unhealthyThreshold: 1\n      \
         healthyThreshold: 1\n      http:\n        path: /health\n        expectedStatuses: [200]\n",
    );
    for (client, addrs, _) in &clients {
        e2e::poll_within(SYNC, &format!("{client}: only backend-a after the check"), async || {
            for i in 0..20 {
                // A request that lands on b before its check fails is cut by the route's
                // timeout (15s): poll on, quickly.
                match tokio::time::timeout(std::time::Duration::from_secs(2), get(addrs[0], "/")).await {
                    Ok(Ok((200, body))) if body == "backend-a" => {}
                    other => return Err(format!("request {i}: {other:?}")),
                }
            }
            Ok(())
        })
        .await;
    }
}

#[test]
fn a_meshhttproute_with_a_relative_path_is_refused_naming_the_field() {
    let zone = Cp::start("zone-1");
    let out = zone.apply_refused(&ROUTE.replacen("value: /v2", "value: v2", 1));
    assert!(out.contains("spec.to[0].rules[0].matches[0].path.value: must be an absolute path"), "{out}");
    assert!(zone.names("/meshes/default/meshhttproutes").is_empty());
}

/// A fault for one calling service only: client-envoy's requests are aborted, on dp and
/// Envoy servers alike, while client-dp's go through. The servers tell the callers apart
/// by the `x-kuma-tags` header the clients' outbounds send once the mesh has a
/// MeshFaultInjection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshfaultinjection_from_one_service_aborts_only_its_requests() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let (srv_dp, _s1) = server(&zone, false, "srv-dp", "srv-dp", &[]).await;
    let (srv_envoy, _s2) = server(&zone, true, "srv-envoy", "srv-envoy", &[]).await;
    let clients = clients(&zone, &["srv-dp", "srv-envoy"]).await;
    let servers = [&srv_dp, &srv_envoy];
    zone.apply(
        "type: MeshFaultInjection\nname: fi\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  from:\n  \
         - targetRef:\n      kind: MeshService\n      name: client-envoy\n    default:\n      http:\n      \
         - abort:\n          httpStatus: 418\n          percentage: 100\n",
    );
    let (envoy_client, dp_client) = (&clients[1].1, &clients[0].1);
    for (i, app) in servers.iter().enumerate() {
        let what = format!("client-envoy -> {}: aborted", app.name);
        e2e::poll_within(SYNC, &what, async || match get(envoy_client[i], "/").await {
            Ok((418, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        })
        .await;
        for n in 0..5 {
            let got = get(dp_client[i], "/").await;
            assert_eq!(got, Ok((200, app.name.clone())), "client-dp -> {} #{n}: not its fault", app.name);
        }
    }
}

/// MeshHTTPRoute's RequestRedirect and RequestMirror: `/old/...` is answered with a
/// redirect by the client sidecar itself, and every other request is also copied to the
/// `mirror` service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshhttproute_redirects_one_path_and_mirrors_the_rest() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let (_backend, _s1) = server(&zone, false, "backend", "backend", &[]).await;
    let (mirror, _s2) = server(&zone, true, "mirror", "mirror", &[]).await;
    let clients = clients(&zone, &["backend"]).await;
    for (client, addrs, _) in &clients {
        until(addrs[0], "/", (200, "backend"), &format!("{client} -> backend")).await;
    }
    zone.apply(
        "type: MeshHTTPRoute\nname: backend-route\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  \
         - targetRef:\n      kind: MeshService\n      name: backend\n    rules:\n    - matches:\n      - path:\n          \
         type: PathPrefix\n          value: /old\n      default:\n        filters:\n        - type: RequestRedirect\n          \
         requestRedirect:\n            hostname: example.org\n            statusCode: 301\n            path:\n              \
         type: ReplaceFullPath\n              replaceFullPath: /new\n    - matches:\n      - path:\n          \
         type: PathPrefix\n          value: /\n      default:\n        filters:\n        - type: RequestMirror\n          \
         requestMirror:\n            backendRef:\n              kind: MeshService\n              name: mirror\n",
    );
    for (client, addrs, _) in &clients {
        e2e::poll_within(SYNC, &format!("{client}: /old/x redirected"), async || {
            match get_with_headers(addrs[0], "/old/x").await {
                Ok((301, h, _)) if h.get("location").is_some_and(|l| l == "http://example.org/new") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        let path = format!("/copy-of-{client}");
        assert_eq!(get(addrs[0], &path).await, Ok((200, "backend".into())), "{client}: the answer is backend's");
        e2e::poll_within(SYNC, &format!("{client}: {path} mirrored"), async || {
            let seen = mirror.seen.lock().unwrap().iter().any(|s| s.path == path);
            if seen { Ok(()) } else { Err("not yet".to_string()) }
        })
        .await;
    }
}

/// `http2` and `grpc` services: the inbound speaks HTTP/2 to the application (and gRPC's
/// connection managers carry Kuma's `grpc_stats` filter, which dp and Envoy accept), while
/// the client application speaks HTTP/1.1 to its outbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_services_reach_their_applications_over_http2() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let (h2, _s1) = server(&zone, false, "srv-h2", "srv-h2", &[("kuma.io/protocol", "http2")]).await;
    let (grpc, _s2) = server(&zone, true, "srv-grpc", "srv-grpc", &[("kuma.io/protocol", "grpc")]).await;
    let clients = clients(&zone, &["srv-h2", "srv-grpc"]).await;
    for (client, addrs, _) in &clients {
        for (addr, app) in addrs.iter().zip([&h2, &grpc]) {
            let what = format!("{client} -> {}", app.name);
            until(*addr, "/", (200, &app.name), &what).await;
            assert_eq!(app.last().version, "HTTP/2.0", "{what}");
        }
    }
}

/// An ExternalService tagged `kuma.io/protocol: http`, reached straight from the client
/// sidecars (no zone egress): its outbound is HTTP too, so MeshRetry's HTTP policy applies
/// (a 503 is tried three times, as the external application counts), and the external
/// host's own name goes upstream as the Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_external_service_gets_http_outbounds() {
    let zone = Cp::start("zone-1");
    zone.apply(MESH);
    let ext = HttpBackend::start("ext").await;
    zone.apply(&format!(
        "type: ExternalService\nmesh: default\nname: ext-http\ntags:\n  kuma.io/service: ext-http\n  \
         kuma.io/protocol: http\nnetworking:\n  address: localhost:{}\n",
        ext.addr.port()
    ));
    let clients = clients(&zone, &["ext-http"]).await;
    for (client, addrs, _) in &clients {
        until(addrs[0], "/", (200, "ext"), &format!("{client} -> ext-http")).await;
        let host = ext.last().headers.get("host").cloned().unwrap_or_default();
        assert!(host.starts_with("localhost"), "{client}: Host {host:?}, not the external host's name");
    }
    zone.apply(
        "type: MeshRetry\nname: retry\nmesh: default\nspec:\n  targetRef:\n    kind: Mesh\n  to:\n  - targetRef:\n      \
         kind: Mesh\n    default:\n      http:\n        numRetries: 2\n        retryOn:\n        - \"503\"\n",
    );
    for (client, addrs, _) in &clients {
        e2e::poll_within(SYNC, &format!("{client}: 503 from ext-http retried twice"), async || {
            let before = ext.requests();
            let got = get(addrs[0], "/status/503").await;
            let tries = ext.requests() - before;
            if got == Ok((503, "ext".into())) && tries == 3 {
                Ok(())
            } else {
                Err(format!("{got:?} after {tries} tries"))
            }
        })
        .await;
    }
}
