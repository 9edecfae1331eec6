//! dp's HTTP data path against real Envoy 1.40, with the same configuration in the same
//! test: `dp run --xds-file` on the resources, Envoy on a static bootstrap holding the
//! same listeners, clusters and secrets, both in front of the same backends. The configs
//! have Kuma 2.14's shapes (zone egress goldens, the zone proxies' admin and metrics
//! listeners): HTTP RBAC with `rules` (any/any, deny-all `rules: {}`, principals and
//! paths) and with the matcher API (`uri_san` prefix, `server_name` exact,
//! `on_no_match` DENY), a network RBAC in front of an HCM, a 50 % fault abort inside
//! `ExtensionWithMatcher` + `SkipFilter`, a local rate limit per route through
//! `typed_per_filter_config`, and the admin listener's plaintext and client-certificate
//! chains. Every request goes to both proxies and the answers are compared.
//!
//! The one difference from what kuma-cp sends: the secrets are referenced by name with no
//! `sds_config` (Envoy's static secrets); dp finds them by name either way.

use e2e::http::{CurlIdentity, Got, HttpBackend, curl_tls, get, openssl_get, tls_get};
use e2e::pair::Pair;
use e2e::temp_dir;
use e2e::tls::{Identity, MeshCa, client_with_identity};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const HTTP_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const NET_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const RBAC_ACTION: &str = "type.googleapis.com/envoy.config.rbac.v3.Action";
const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
const LOCAL_RATELIMIT: &str = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// Trust domains of the SPIFFE validator. `EVIL` starts with `A`'s text: a `uri_san`
/// prefix predicate on `spiffe://A` matches it too, as a plain string prefix does.
const TD_A: &str = "mesh-a.zone-1.mesh.local";
const TD_B: &str = "mesh-b.zone-1.mesh.local";
const TD_EVIL: &str = "mesh-a.zone-1.mesh.local.evil";

fn sni(tag: &str) -> String {
    format!("sni.extsvc.mesh-a.zone-1.{tag}.80")
}

// ---- configuration, shared by both proxies ------------------------------------------

fn socket(addr: SocketAddr) -> Value {
    json!({"socketAddress": {"address": addr.ip().to_string(), "portValue": addr.port()}})
}

/// A cluster as kuma-cp writes an external service's (STATIC, explicit HTTP/1.1).
fn cluster(name: &str, address: Value) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connectTimeout": "5s",
        "altStatName": name.replace(':', "_"),
        "circuitBreakers": {"thresholds": [{"trackRemaining": true}]},
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": [{"endpoint": {"address": address}}]}]},
        "typedExtensionProtocolOptions": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "commonHttpProtocolOptions": {"idleTimeout": "3600s", "maxConnectionDuration": "0s", "maxStreamDuration": "0s"},
            "explicitHttpConfig": {"httpProtocolOptions": {}}}}
    })
}

fn router() -> Value {
    json!({"name": "envoy.filters.http.router", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}})
}

fn http_rbac(cfg: Value) -> Value {
    let mut c = json!({"@type": HTTP_RBAC});
    c.as_object_mut().unwrap().extend(cfg.as_object().unwrap().clone());
    json!({"name": "envoy.filters.http.rbac", "typedConfig": c})
}

fn rbac_action(name: &str, deny: bool) -> Value {
    let mut a = json!({"@type": RBAC_ACTION, "name": name});
    if deny {
        a["action"] = json!("DENY");
    }
    json!({"action": {"name": "envoy.filters.rbac.action", "typedConfig": a}})
}

fn uri_san_prefix(prefix: &str) -> Value {
    json!({"singlePredicate": {
        "input": {"name": "envoy.matching.inputs.uri_san", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.ssl.v3.UriSanInput"}},
        "valueMatch": {"prefix": prefix}}})
}

fn server_name_exact(name: &str) -> Value {
    json!({"singlePredicate": {
        "input": {"name": "envoy.matching.inputs.server_name", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.ServerNameInput"}},
        "valueMatch": {"exact": name}}})
}

/// The matcher API as Kuma 2.14 writes it: first matching predicate's action, else DENY.
fn rbac_matcher(list: Vec<(Value, Value)>) -> Value {
    let mut m = json!({"onNoMatch": rbac_action("default", true)});
    if !list.is_empty() {
        m["matcherList"] = json!({"matchers": list.into_iter().map(|(p, on)| json!({"predicate": p, "onMatch": on})).collect::<Vec<_>>()});
    }
    http_rbac(json!({"matcher": m}))
}

/// A TLS-terminating HTTP chain of a zone egress (Kuma 2.14): client certificate
/// required, SPIFFE trust bundle, `network` filters before the HCM, `http` filters before
/// the router, one virtual host `*` whose `routes` go to the `app` cluster.
fn egress_chain(names: &[String], network: Vec<Value>, http: Vec<Value>, routes: Value) -> Value {
    let mut filters = http;
    filters.push(router());
    let mut all = network;
    all.push(json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM, "statPrefix": names[0].replace('.', "_"),
        "httpFilters": filters,
        "internalAddressConfig": {"cidrRanges": [{"addressPrefix": "127.0.0.1", "prefixLen": 32}]},
        "routeConfig": {"name": names[0], "validateClusters": false,
            "virtualHosts": [{"domains": ["*"], "name": names[0], "routes": routes}]}}}));
    json!({
        "name": names[0],
        "filterChainMatch": {"serverNames": names, "transportProtocol": "tls"},
        "filters": all,
        "transportSocket": {"name": "envoy.transport_sockets.tls", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "commonTlsContext": {
                "combinedValidationContext": {"defaultValidationContext": {},
                    "validationContextSdsSecretConfig": {"name": "system_trust_bundle"}},
                "tlsCertificateSdsSecretConfigs": [{"name": "egress_identity"}]},
            "requireClientCertificate": true}}
    })
}

fn to_app() -> Value {
    json!([{"match": {"prefix": "/"}, "route": {"autoHostRewrite": true, "cluster": "app", "timeout": "0s"}}])
}

fn listener(name: &str, chains: Vec<Value>, tls_inspector: bool) -> Value {
    let mut l = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name, "address": socket("127.0.0.1:0".parse().unwrap()),
        "trafficDirection": "INBOUND", "filterChains": chains
    });
    if tls_inspector {
        l["listenerFilters"] = json!([{"name": "envoy.filters.listener.tls_inspector", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]);
    }
    l
}

fn secrets(ca: &MeshCa, server: &Identity) -> Vec<Value> {
    let domains: Vec<Value> =
        [TD_A, TD_B, TD_EVIL].iter().map(|d| json!({"name": d, "trustBundle": {"inlineString": ca.pem}})).collect();
    vec![
        json!({"@type": SECRET, "name": "system_trust_bundle",
            "validationContext": {"customValidatorConfig": {"name": "envoy.tls.cert_validator.spiffe", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig",
                "trustDomains": domains}}}}),
        json!({"@type": SECRET, "name": "egress_identity", "tlsCertificate": {
            "certificateChain": {"inlineString": server.cert_pem}, "privateKey": {"inlineString": server.key_pem}}}),
    ]
}

// ---- both proxies on the same resources (e2e::pair) -------------------------------------

/// What a client got: an HTTP answer (and whether the backend saw the request), or no
/// answer at all (handshake refused, connection closed).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Http { status: u16, body: String, upstream: bool },
    Refused,
}

fn outcome(got: Option<Got>, upstream: bool) -> Outcome {
    match got {
        Some(g) => Outcome::Http { status: g.status, body: g.body, upstream },
        None => Outcome::Refused,
    }
}

fn ok() -> Outcome {
    Outcome::Http { status: 200, body: "app".into(), upstream: true }
}

fn forbidden() -> Outcome {
    Outcome::Http { status: 403, body: "RBAC: access denied".into(), upstream: false }
}

// ---- Acceptance 2: HTTP RBAC in Kuma's shapes -----------------------------------------

struct Client {
    name: &'static str,
    id: Option<CurlIdentity>,
    /// The client presents a certificate of the mesh's CA.
    trusted: bool,
}

/// The outcomes of `paths` on one connection through `addr` (curl), and which of them
/// reached the backend (its log of paths grows by exactly those).
async fn through(addr: SocketAddr, s: &str, c: &Client, app: &HttpBackend, paths: &[&str]) -> Vec<Outcome> {
    let before = app.requests();
    let answers = if s.bytes().any(|b| b.is_ascii_uppercase()) {
        // curl would send this server name lower-cased: openssl sends it as it is.
        let mut all = vec![];
        for p in paths {
            all.push(openssl_get(addr, s, c.id.as_ref(), "external.example", p).await);
        }
        all
    } else {
        curl_tls(addr, s, c.id.as_ref(), "external.example", paths).await
    };
    let reached: Vec<String> = app.seen.lock().unwrap()[before..].iter().map(|r| r.path.clone()).collect();
    answers
        .into_iter()
        .zip(paths)
        .map(|(a, p)| match a {
            Some((status, body, _)) => Outcome::Http { status, body, upstream: reached.iter().any(|r| r == p) },
            None => Outcome::Refused,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rbac_admits_and_refuses_exactly_as_envoy() {
    let ca = MeshCa::new("mesh-a");
    let rogue = MeshCa::new("rogue");
    let server = ca.identity(&format!("spiffe://{TD_A}/zone-egress"));
    let app = HttpBackend::start("app").await;

    let chains = vec![
        // Kuma's MeshTrafficPermission on an external service: any permission, any principal.
        egress_chain(
            &[sni("anyany")],
            vec![],
            vec![http_rbac(json!({"rules": {"policies": {"MeshTrafficPermission": {
                "permissions": [{"any": true}], "principals": [{"any": true}]}}}}))],
            to_app(),
        ),
        // No permission: deny-all.
        egress_chain(&[sni("denyall")], vec![], vec![http_rbac(json!({"rules": {}}))], to_app()),
        // 2.14: the mesh's identities by URI SAN prefix (meshfaultinjection/sni golden).
        egress_chain(
            &[sni("urisan")],
            vec![],
            vec![rbac_matcher(vec![(
                uri_san_prefix(&format!("spiffe://{TD_A}")),
                rbac_action("kri_mtp_mesh-a_zone-1__allow-all_", false),
            )])],
            to_app(),
        ),
        // 2.14: allowed by server name (meshtrafficpermission/sni golden); the chain has a
        // second name, which the predicate does not admit.
        egress_chain(
            &[sni("byname"), sni("byname-alias")],
            vec![],
            vec![rbac_matcher(vec![(server_name_exact(&sni("byname")), rbac_action("kri_mtp_byname", false))])],
            to_app(),
        ),
        // 2.14 with no MeshTrafficPermission (meshratelimit/sni golden): on_no_match DENY alone.
        egress_chain(&[sni("nomatch")], vec![], vec![rbac_matcher(vec![])], to_app()),
        // The two inputs combined: mesh B denied explicitly first, then an AND of a URI SAN
        // prefix and the server name, inside a nested matcher.
        egress_chain(
            &[sni("combo"), sni("combo-alias")],
            vec![],
            vec![rbac_matcher(vec![
                (uri_san_prefix(&format!("spiffe://{TD_B}/")), rbac_action("mesh-b", true)),
                (
                    json!({"andMatcher": {"predicate": [uri_san_prefix("spiffe://mesh-a."), server_name_exact(&sni("combo"))]}}),
                    json!({"matcher": {
                        "matcherList": {"matchers": [{"predicate": {"notMatcher": uri_san_prefix(&format!("spiffe://{TD_A}/blocked"))},
                            "onMatch": rbac_action("combo", false)}]},
                        "onNoMatch": rbac_action("blocked", true)}}),
                ),
            ])],
            to_app(),
        ),
        // The older TrafficPermission shape: one identity by exact URI SAN, and anyone on
        // /public; and a DENY policy on /admin.
        egress_chain(
            &[sni("principal")],
            vec![],
            vec![http_rbac(json!({"rules": {"policies": {
                "tp": {"permissions": [{"any": true}],
                    "principals": [{"authenticated": {"principalName": {"exact": format!("spiffe://{TD_A}/backend")}}}]},
                "public": {"permissions": [{"urlPath": {"path": {"prefix": "/public"}}}], "principals": [{"any": true}]}}}}))],
            to_app(),
        ),
        egress_chain(
            &[sni("deny-admin")],
            vec![],
            vec![http_rbac(json!({"rules": {"action": "DENY", "policies": {"admin": {
                "permissions": [{"urlPath": {"path": {"prefix": "/admin"}}}], "principals": [{"any": true}]}}}}))],
            to_app(),
        ),
        // The egress golden 05 shape: a network RBAC before the HCM (one identity), no HTTP RBAC.
        egress_chain(
            &[sni("netrbac")],
            vec![json!({"name": "envoy.filters.network.rbac", "typedConfig": {"@type": NET_RBAC,
                "statPrefix": "netrbac.", "rules": {"policies": {"allow": {"permissions": [{"any": true}],
                    "principals": [{"authenticated": {"principalName": {"exact": format!("spiffe://{TD_A}/web")}}}]}}}}})],
            vec![],
            to_app(),
        ),
    ];
    let mut resources = vec![cluster("app", socket(app.addr)), listener("egress", chains, true)];
    resources.extend(secrets(&ca, &server));
    let pair = Pair::start(resources);
    let (dp, envoy) = pair.listener("egress");

    let dir = temp_dir("rbac-identities");
    let id = |name: &str, ca: &MeshCa, uri: &str| {
        let i = ca.identity(uri);
        Some(CurlIdentity::write(&dir, name, &i.cert_pem, &i.key_pem))
    };
    let clients = vec![
        Client { name: "web@A", id: id("web-a", &ca, &format!("spiffe://{TD_A}/web")), trusted: true },
        Client { name: "backend@A", id: id("backend-a", &ca, &format!("spiffe://{TD_A}/backend")), trusted: true },
        Client { name: "blocked@A", id: id("blocked-a", &ca, &format!("spiffe://{TD_A}/blocked/web")), trusted: true },
        Client { name: "web@B", id: id("web-b", &ca, &format!("spiffe://{TD_B}/web")), trusted: true },
        Client { name: "web@A.evil", id: id("web-evil", &ca, &format!("spiffe://{TD_EVIL}/web")), trusted: true },
        Client { name: "rogue CA", id: id("rogue", &rogue, &format!("spiffe://{TD_A}/web")), trusted: false },
        Client { name: "no certificate", id: None, trusted: false },
    ];
    let snis: Vec<String> = [
        "anyany",
        "denyall",
        "urisan",
        "byname",
        "byname-alias",
        "nomatch",
        "combo",
        "combo-alias",
        "principal",
        "deny-admin",
        "netrbac",
        "unknown",
    ]
    .iter()
    .map(|t| sni(t))
    .chain(["SNI.EXTSVC.MESH-A.ZONE-1.BYNAME.80".to_string()])
    .collect();
    let paths = ["/", "/public/x?y=1", "/admin"];

    let mut rows = vec![];
    let mut mismatches = vec![];
    for c in &clients {
        for s in &snis {
            let by_dp = through(dp, s, c, &app, &paths).await;
            let by_envoy = through(envoy, s, c, &app, &paths).await;
            for (i, path) in paths.iter().enumerate() {
                let expected = expect(c, s, path);
                if by_dp[i] != by_envoy[i] || by_envoy[i] != expected {
                    mismatches.push(format!(
                        "{} {s} {path}: dp {:?}, Envoy {:?}, expected {expected:?}",
                        c.name, by_dp[i], by_envoy[i]
                    ));
                }
                rows.push(by_dp[i].clone());
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} requests differ:\n{}",
        mismatches.len(),
        rows.len(),
        mismatches.join("\n")
    );
    // The matrix exercises every kind of answer.
    for o in [ok(), forbidden(), Outcome::Refused] {
        assert!(rows.contains(&o), "no request got {o:?}");
    }
    // `/stats`: every stat the traffic moved in dp has the name Envoy gives it, but for
    // dp's own (config updates, dropped log lines, parked HTTP/1 connections).
    let names = |admin: SocketAddr, query: &str| -> BTreeSet<String> {
        let (status, body) = e2e::http_get(admin, &format!("/stats{query}")).expect("GET /stats");
        assert_eq!(status, 200, "{body}");
        body.lines().filter_map(|l| l.split_once(": ")).map(|(name, _)| name.to_string()).collect()
    };
    let dp_own = ["config_update_", "log_lines_dropped", "downstream_cx_http1_parked"];
    let ours: Vec<String> =
        names(pair.dp.admin, "?usedonly").into_iter().filter(|n| !dp_own.iter().any(|own| n.contains(own))).collect();
    let envoys = names(pair.envoy.admin, "");
    let missing: Vec<&String> = ours.iter().filter(|n| !envoys.contains(*n)).collect();
    assert!(missing.is_empty(), "dp stats Envoy does not name so: {missing:?}\nEnvoy's: {envoys:?}");
    for namespace in ["cluster.app.", "http.", "listener.", "netrbac.rbac.", "tls_inspector."] {
        assert!(ours.iter().any(|n| n.starts_with(namespace)), "no {namespace} stat moved: {ours:?}");
    }
    // The listener's `ssl.*` counters: dp counts the same handshakes, refusals by cause
    // (another CA's certificate, none at all), as Envoy does.
    let ssl = |admin: SocketAddr| -> BTreeMap<String, u64> {
        let (_, body) = e2e::http_get(admin, "/stats?filter=%5Elistener%5C..*%5C.ssl%5C.").expect("GET /stats");
        let mut by_stat = BTreeMap::new();
        for (name, value) in body.lines().filter_map(|l| l.split_once(": ")) {
            let stat = name.rsplit_once(".ssl.").map_or(name, |(_, s)| s).to_string();
            *by_stat.entry(stat).or_default() += value.parse::<u64>().unwrap_or(0);
        }
        by_stat
    };
    // A refused client may see the alert a moment before a proxy counts the refusal: the
    // counts are read until they agree (each disagreement is printed, for a failure).
    let ours = e2e::wait_until("dp's ssl.* counts to equal Envoy's", || {
        let (ours, envoys) = (ssl(pair.dp.admin), ssl(pair.envoy.admin));
        let differ: Vec<String> = ours
            .iter()
            .filter(|(stat, n)| envoys.get(*stat) != Some(*n))
            .map(|(stat, n)| format!("ssl.{stat}: dp {n}, Envoy {:?}", envoys.get(stat)))
            .collect();
        if !differ.is_empty() {
            eprintln!("{differ:?}; Envoy's: {envoys:?}");
        }
        differ.is_empty().then_some(ours)
    });
    for stat in ["handshake", "session_reused", "fail_verify_error", "fail_verify_no_cert"] {
        assert!(ours.get(stat).is_some_and(|n| *n > 0), "dp's listener counted no ssl.{stat}: {ours:?}");
    }
}

/// What Envoy answers, from its documented semantics (the test checks Envoy against it too).
fn expect(c: &Client, s: &str, path: &str) -> Outcome {
    // The handshake: a client certificate from a trusted domain is required.
    if !c.trusted {
        return Outcome::Refused;
    }
    // Envoy keeps the requested server name lower-cased (the socket's setter does it): the
    // chain, the `server_name` input and `requested_server_name` all see it so.
    let s = s.to_ascii_lowercase();
    let tag = s.strip_prefix("sni.extsvc.mesh-a.zone-1.").and_then(|t| t.strip_suffix(".80"));
    let Some(tag) = tag else {
        return Outcome::Refused;
    };
    let name = c.name;
    let in_a = matches!(name, "web@A" | "backend@A" | "blocked@A");
    let allowed = match tag {
        "anyany" => true,
        "denyall" | "nomatch" | "byname-alias" | "combo-alias" => false,
        "urisan" => in_a || name == "web@A.evil",
        "byname" => true,
        "combo" => (in_a && name != "blocked@A") || name == "web@A.evil",
        "principal" => name == "backend@A" || path.starts_with("/public"),
        "deny-admin" => !path.starts_with("/admin"),
        "netrbac" => {
            return if name == "web@A" { ok() } else { Outcome::Refused };
        }
        _ => return Outcome::Refused,
    };
    if allowed { ok() } else { forbidden() }
}

// ---- Acceptance 3: fault abort and local rate limit -------------------------------------

fn fault_and_ratelimit_resources(ca: &MeshCa, server: &Identity, app: &HttpBackend) -> Vec<Value> {
    let allow_mesh =
        || rbac_matcher(vec![(uri_san_prefix(&format!("spiffe://{TD_A}")), rbac_action("kri_mtp_allow-all", false))]);
    // meshfaultinjection/sni: abort 503 for 50 % of requests, skipped outside one server name.
    let fault = json!({"name": "kri_mfi_mesh-a_zone-1__mfi_", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "extensionConfig": {"name": "envoy.filters.http.fault", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
            "abort": {"httpStatus": 503, "percentage": {"numerator": 50}}}},
        "xdsMatcher": {"matcherList": {"matchers": [{
            "onMatch": {"action": {"name": "skip", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
            "predicate": {"notMatcher": server_name_exact(&sni("fault"))}}]}}}});
    // meshratelimit/sni: the filter names only its stat prefix; the route brings the bucket.
    let ratelimit = json!({"name": "envoy.filters.http.local_ratelimit", "typedConfig": {
        "@type": LOCAL_RATELIMIT, "statPrefix": "rate_limit"}});
    let limited_routes = json!([
        {"match": {"prefix": "/free"}, "route": {"autoHostRewrite": true, "cluster": "app", "timeout": "0s"}},
        {"match": {"prefix": "/"}, "route": {"autoHostRewrite": true, "cluster": "app", "timeout": "0s"},
         "typedPerFilterConfig": {"envoy.filters.http.local_ratelimit": {
            "@type": LOCAL_RATELIMIT,
            "filterEnabled": {"defaultValue": {"numerator": 100}, "runtimeKey": "local_rate_limit_enabled"},
            "filterEnforced": {"defaultValue": {"numerator": 100}, "runtimeKey": "local_rate_limit_enforced"},
            "statPrefix": "rate_limit", "status": {"code": "TooManyRequests"},
            "tokenBucket": {"fillInterval": "3600s", "maxTokens": 3, "tokensPerFill": 1}}}}
    ]);
    let chains = vec![
        egress_chain(&[sni("fault"), sni("fault-alias")], vec![], vec![allow_mesh(), fault], to_app()),
        egress_chain(&[sni("ratelimit")], vec![], vec![allow_mesh(), ratelimit], limited_routes),
    ];
    let mut resources = vec![cluster("app", socket(app.addr)), listener("egress", chains, true)];
    resources.extend(secrets(ca, server));
    resources
}

/// Sends `n` requests with curl (kept-alive connections): the statuses, and the body
/// and `content-type` of the first answer of each status.
async fn statuses(
    addr: SocketAddr,
    s: &str,
    id: &CurlIdentity,
    path: &str,
    n: usize,
) -> (Vec<u16>, Vec<(u16, String, String)>) {
    let paths = vec![path; n];
    let mut out = vec![];
    let mut firsts: Vec<(u16, String, String)> = vec![];
    for a in curl_tls(addr, s, Some(id), "external.example", &paths).await {
        let a = a.expect("an answer");
        if !firsts.iter().any(|f| f.0 == a.0) {
            firsts.push(a.clone());
        }
        out.push(a.0);
    }
    firsts.sort();
    (out, firsts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_abort_hits_half_and_the_rate_limit_answers_429_as_envoy_does() {
    let ca = MeshCa::new("mesh-a");
    let server = ca.identity(&format!("spiffe://{TD_A}/zone-egress"));
    let app = HttpBackend::start("app").await;
    let pair = Pair::start(fault_and_ratelimit_resources(&ca, &server, &app));
    let (dp, envoy) = pair.listener("egress");
    let web = ca.identity(&format!("spiffe://{TD_A}/web"));
    let web = CurlIdentity::write(&temp_dir("fault-identity"), "web", &web.cert_pem, &web.key_pem);

    // 50 % over 1,000 requests: 500 expected, standard deviation 15.8.
    let mut shapes = vec![];
    for (who, addr) in [("dp", dp), ("Envoy", envoy)] {
        let before = app.requests();
        let (st, firsts) = statuses(addr, &sni("fault"), &web, "/", 1000).await;
        let aborted = st.iter().filter(|s| **s == 503).count();
        let passed = st.iter().filter(|s| **s == 200).count();
        assert_eq!(aborted + passed, 1000, "{who}: only 200 and 503 expected: {firsts:?}");
        assert!((450..=550).contains(&aborted), "{who}: {aborted} of 1,000 requests aborted");
        assert_eq!(app.requests() - before, passed, "{who}: an aborted request never reaches the backend");
        // The other server name of the chain skips the filter.
        let (st, _) = statuses(addr, &sni("fault-alias"), &web, "/", 50).await;
        assert!(st.iter().all(|s| *s == 200), "{who}: the skipped filter aborted: {st:?}");
        shapes.push(firsts);
    }
    assert_eq!(shapes[0], shapes[1], "the answers (status, body, content-type) of dp and Envoy differ");

    // Three tokens an hour on `/`: three requests pass, then 429; `/free` has no bucket.
    let mut seen = vec![];
    for addr in [dp, envoy] {
        let (limited, firsts) = statuses(addr, &sni("ratelimit"), &web, "/", 6).await;
        let (free, _) = statuses(addr, &sni("ratelimit"), &web, "/free", 5).await;
        seen.push((limited, free, firsts));
    }
    assert_eq!(seen[0].0, [200, 200, 200, 429, 429, 429], "dp");
    assert_eq!(seen[0].1, [200; 5], "dp: a route without a bucket is not limited");
    assert_eq!(seen[0], seen[1], "dp and Envoy differ (limited, free, first answers)");
}

// ---- Acceptance 5: the admin and metrics listeners of a zone proxy ----------------------

fn admin_hcm(routes: Value) -> Value {
    json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM, "statPrefix": "kuma_envoy_admin",
        "httpFilters": [router()],
        "internalAddressConfig": {"cidrRanges": [{"addressPrefix": "127.0.0.1", "prefixLen": 32}]},
        "routeConfig": {"validateClusters": false,
            "virtualHosts": [{"domains": ["*"], "name": "kuma:envoy:admin", "routes": routes}]}}})
}

fn rewrite(prefix: &str, cluster: &str, to: &str) -> Value {
    json!({"match": {"prefix": prefix}, "route": {"cluster": cluster, "prefixRewrite": to}})
}

/// Headers a backend saw, without the values that differ from request to request.
/// A generated `x-request-id` differs each time: only its presence is kept, and a
/// client's own value.
fn seen_headers(b: &HttpBackend) -> (String, BTreeMap<String, String>) {
    let s = b.last();
    let mut headers = s.headers;
    if let Some(id) = headers.get_mut("x-request-id")
        && id != "client-chosen"
    {
        *id = "<generated>".into();
    }
    (s.path, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_zone_proxy_admin_and_metrics_listeners_answer_as_through_envoy() {
    let dir = temp_dir("admin-vs-envoy");
    let readiness = HttpBackend::start("READY").await;
    let admin = HttpBackend::start_unix("envoy-admin", &dir.join("kuma-envoy-admin.sock")).await;
    let hijacker_sock = dir.join("kuma-mh-zone-proxy-egress-default.sock");
    let hijacker = HttpBackend::start_unix("# TYPE envoy_up gauge", &hijacker_sock).await;
    let ca = MeshCa::new("kuma-ca");
    let listener_id = ca.dns("zone-egress");
    let pipe = |p: &Path| json!({"pipe": {"path": p.to_str().unwrap()}});

    let mut admin_tls = json!({
        "filterChainMatch": {"transportProtocol": "tls"},
        "filters": [admin_hcm(json!([rewrite("/ready", "kuma:readiness", "/ready"), rewrite("/", "kuma:envoy:admin", "/")]))],
        "transportSocket": {"name": "envoy.transport_sockets.tls", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "commonTlsContext": {
                "tlsCertificates": [{"certificateChain": {"inlineString": listener_id.cert_pem},
                    "privateKey": {"inlineString": listener_id.key_pem}}],
                "validationContext": {"matchTypedSubjectAltNames": [{"matcher": {"exact": "kuma-cp"}, "sanType": "DNS"}],
                    "trustedCa": {"inlineString": ca.pem}}},
            "requireClientCertificate": true}}
    });
    admin_tls["name"] = json!("tls");
    let resources = vec![
        cluster("kuma:envoy:admin", pipe(&dir.join("kuma-envoy-admin.sock"))),
        cluster("kuma:readiness", socket(readiness.addr)),
        cluster("kuma:metrics:hijacker", pipe(&hijacker_sock)),
        listener(
            "kuma:envoy:admin",
            vec![json!({"filters": [admin_hcm(json!([rewrite("/ready", "kuma:readiness", "/ready")]))]}), admin_tls],
            true,
        ),
        listener(
            "kuma:metrics:prometheus",
            vec![json!({"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
                "@type": HCM, "statPrefix": "kuma_metrics_prometheus", "httpFilters": [router()],
                "internalAddressConfig": {"cidrRanges": [{"addressPrefix": "127.0.0.1", "prefixLen": 32}]},
                "routeConfig": {"validateClusters": false, "virtualHosts": [{"domains": ["*"],
                    "name": "kuma:metrics:prometheus", "routes": [rewrite("/metrics", "kuma:metrics:hijacker", "/meshmetric")]}]}}}]})],
            false,
        ),
    ];
    let pair = Pair::start(resources);
    let (dp_admin, envoy_admin) = pair.listener("kuma:envoy:admin");
    let (dp_metrics, envoy_metrics) = pair.listener("kuma:metrics:prometheus");

    // Plain text: /ready only.
    type Seen = Option<(String, BTreeMap<String, String>)>;
    let mut mismatches = vec![];
    let mut compare = |what: String, a: (Outcome, Seen), b: (Outcome, Seen)| {
        if a != b {
            mismatches.push(format!("{what}:\n  dp    {a:?}\n  Envoy {b:?}"));
        }
        a
    };
    // A client that sets the headers a proxy reads or rewrites (Envoy's `x-envoy-*`
    // controls, its own request id and scheme, a path a rewrite would record).
    let steering: &[(&str, &str)] = &[
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-max-retries", "3"),
        ("x-envoy-upstream-rq-timeout-ms", "5"),
        ("x-envoy-original-path", "/forged"),
        ("x-envoy-custom", "1"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "client-chosen"),
        ("x-envoy-internal", "true"),
        ("x-envoy-decorator-operation", "op"),
        ("x-envoy-downstream-service-cluster", "web"),
    ];
    // The same from a trusted hop: one internal address in `x-forwarded-for`.
    let trusted: &[(&str, &str)] = &[
        ("x-forwarded-for", "127.0.0.1"),
        ("x-envoy-retry-on", "5xx"),
        ("x-envoy-max-retries", "0"),
        ("x-envoy-retriable-status-codes", "500"),
        ("x-envoy-upstream-rq-timeout-ms", "12000"),
        ("x-envoy-upstream-rq-per-try-timeout-ms", "11000"),
        ("x-envoy-custom", "1"),
        ("x-envoy-decorator-operation", "op"),
    ];
    // Two hops: not internal.
    let relayed: &[(&str, &str)] = &[("x-forwarded-for", "127.0.0.1, 127.0.0.1"), ("x-envoy-retry-on", "5xx")];
    // (listener, path, the backend it should reach, request headers)
    type Case<'a> = (SocketAddr, &'a str, &'a HttpBackend, &'a [(&'a str, &'a str)]);
    let plain: [Case<'_>; 12] = [
        (dp_admin, "/ready", &readiness, &[]),
        (dp_admin, "/ready?verbose=1", &readiness, &[]),
        (dp_admin, "/readyz", &readiness, &[]),
        (dp_admin, "/stats", &readiness, &[]),
        (dp_admin, "/ready", &readiness, steering),
        (dp_admin, "/ready", &readiness, trusted),
        (dp_admin, "/ready", &readiness, relayed),
        (dp_metrics, "/metrics", &hijacker, &[]),
        (dp_metrics, "/metrics?filter=envoy_cluster", &hijacker, &[]),
        (dp_metrics, "/metrics/extra", &hijacker, &[]),
        (dp_metrics, "/metrics", &hijacker, steering),
        (dp_metrics, "/", &hijacker, &[]),
    ];
    let mut answers = vec![];
    for (dp_addr, path, backend, headers) in plain {
        let envoy_addr = if dp_addr == dp_admin { envoy_admin } else { envoy_metrics };
        let mut both = vec![];
        for addr in [dp_addr, envoy_addr] {
            let before = backend.requests();
            let g = get(addr, "127.0.0.1", path, headers).await;
            let reached = backend.requests() > before;
            let seen = reached.then(|| seen_headers(backend));
            both.push((outcome(Some(g), reached), seen));
        }
        let b = both.pop().unwrap();
        let a = both.pop().unwrap();
        answers.push(compare(format!("plain {path}"), a, b));
    }
    // HTTP/1.0 (no `accept_http_10`): refused with 426 and closed, nothing upstream. The
    // status line's version is left out (hyper answers a 1.0 client in 1.0, Envoy in 1.1).
    let mut old_http = vec![];
    for addr in [dp_admin, envoy_admin] {
        let before = readiness.requests();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ready HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(e2e::WAIT, s.read_to_string(&mut out)).await.expect("the proxy closes").unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head.split_whitespace().nth(1).unwrap_or("").to_string();
        let close = head.to_ascii_lowercase().contains("connection: close");
        old_http.push((status, body.to_string(), close, readiness.requests() - before));
    }
    assert_eq!(old_http[0], old_http[1], "HTTP/1.0: dp, then Envoy");
    assert_eq!(old_http[0].0, "426");

    // TLS: the control plane's certificate (DNS SAN kuma-cp) reaches the admin; others are refused.
    let cp = client_with_identity(Some(&ca.dns("kuma-cp")));
    let stranger = client_with_identity(Some(&ca.dns("not-kuma-cp")));
    let anonymous = client_with_identity(None);
    for (who, cfg) in [("kuma-cp", &cp), ("not-kuma-cp", &stranger), ("no certificate", &anonymous)] {
        for (path, backend) in
            [("/ready", &readiness), ("/config_dump?include_eds", &admin), ("/stats/prometheus", &admin), ("/", &admin)]
        {
            let mut both = vec![];
            for addr in [dp_admin, envoy_admin] {
                let before = backend.requests();
                let g = tls_get(addr, "kuma-admin", cfg.clone(), "127.0.0.1", path).await;
                let reached = backend.requests() > before;
                let seen = reached.then(|| seen_headers(backend));
                both.push((outcome(g, reached), seen));
            }
            let b = both.pop().unwrap();
            let a = both.pop().unwrap();
            answers.push(compare(format!("TLS {who} {path}"), a, b));
        }
    }
    assert!(mismatches.is_empty(), "dp and Envoy differ:\n{}", mismatches.join("\n"));
    let statuses: Vec<String> = answers
        .iter()
        .map(|(o, seen)| match o {
            Outcome::Http { status, .. } => format!("{status} {}", seen.as_ref().map_or("-", |s| s.0.as_str())),
            Outcome::Refused => "refused".into(),
        })
        .collect();
    assert_eq!(
        statuses,
        [
            "200 /ready",
            "200 /ready?verbose=1",
            "200 /readyz",
            "404 -",
            "200 /ready",
            "200 /ready",
            "200 /ready",
            "200 /meshmetric",
            "200 /meshmetric?filter=envoy_cluster",
            "200 /meshmetric/extra",
            "200 /meshmetric",
            "404 -",
            "200 /ready",
            "200 /config_dump?include_eds",
            "200 /stats/prometheus",
            "200 /",
            "refused",
            "refused",
            "refused",
            "refused",
            "refused",
            "refused",
            "refused",
            "refused",
        ]
    );
}

/// A STATIC cluster over `backends` (weights in order) with a consistent-hashing policy.
fn hashing_cluster(name: &str, backends: &[HttpBackend], weights: &[u32], lb: &str, extra: Value) -> Value {
    let endpoints: Vec<Value> = backends
        .iter()
        .zip(weights)
        .map(|(b, w)| json!({"endpoint": {"address": socket(b.addr)}, "loadBalancingWeight": w}))
        .collect();
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name, "type": "STATIC", "connectTimeout": "5s", "lbPolicy": lb,
        "loadAssignment": {"clusterName": name, "endpoints": [{"lbEndpoints": endpoints}]}
    });
    c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    c
}

fn hashed_route(prefix: &str, cluster: &str, policy: Value) -> Value {
    json!({"match": {"prefix": prefix}, "route": {"cluster": cluster, "timeout": "0s", "hashPolicy": policy}})
}

/// MeshLoadBalancingStrategy's shapes (RING_HASH with Kuma's ring sizes and MurmurHash2,
/// MAGLEV, a header, a query parameter then the client's address, a cookie) give every
/// request the host Envoy gives it: the same key goes to the same backend through dp and
/// through Envoy, so sessions stay put while proxies move over one by one.
#[tokio::test(flavor = "multi_thread")]
async fn consistent_hashing_sends_every_key_where_envoy_does() {
    let mut backends = vec![];
    for i in 0..5 {
        backends.push(HttpBackend::start(&format!("b{i}")).await);
    }
    let uniform = [1; 5];
    let resources = vec![
        hashing_cluster("ring", &backends, &uniform, "RING_HASH", json!({})),
        hashing_cluster(
            "ring-murmur",
            &backends,
            &[1, 2, 1, 3, 1],
            "RING_HASH",
            json!({"ringHashLbConfig": {"hashFunction": "MURMUR_HASH_2", "minimumRingSize": "100", "maximumRingSize": "1000"}}),
        ),
        hashing_cluster("maglev", &backends, &[1, 2, 1, 3, 1], "MAGLEV", json!({})),
        hashing_cluster("maglev-small", &backends, &uniform, "MAGLEV", json!({"maglevLbConfig": {"tableSize": "251"}})),
        hashing_cluster("round-robin", &backends, &uniform, "ROUND_ROBIN", json!({})),
        listener(
            "hashing",
            vec![json!({"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
            "@type": HCM, "statPrefix": "hashing", "httpFilters": [router()],
            "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "hashing", "routes": [
                hashed_route("/ring", "ring", json!([{"header": {"headerName": "x-user"}}])),
                hashed_route("/murmur", "ring-murmur", json!([
                    {"queryParameter": {"name": "u"}, "terminal": true},
                    {"connectionProperties": {"sourceIp": true}}])),
                hashed_route("/maglev", "maglev", json!([{"header": {"headerName": "x-user"}}])),
                hashed_route("/small", "maglev-small", json!([{"header": {"headerName": "x-user"}},
                    {"queryParameter": {"name": "u"}}])),
                hashed_route("/cookie", "ring", json!([{"cookie": {"name": "sid", "ttl": "60s", "path": "/"}}])),
                hashed_route("/rr", "round-robin", json!([{"cookie": {"name": "sid", "ttl": "60s", "path": "/"}}])),
            ]}]}}}]})],
            false,
        ),
        // A TCP proxy hashing the client's address.
        listener(
            "hashing-tcp",
            vec![json!({"filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "cluster": "maglev", "statPrefix": "hashing_tcp", "hashPolicy": [{"sourceIp": {}}]}}]})],
            false,
        ),
    ];
    let pair = Pair::start(resources);
    let (dp, envoy) = pair.listener("hashing");
    let (dp_tcp, envoy_tcp) = pair.listener("hashing-tcp");

    let mut mismatches = vec![];
    let mut reached: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for key in 0..40 {
        let user = format!("user-{key}");
        let cookie = format!("a=1; sid=\"{user}\"");
        // (what, path, request headers)
        type Case<'a> = (&'static str, String, Vec<(&'static str, &'a str)>);
        let cases: [Case<'_>; 5] = [
            ("ring", "/ring".into(), vec![("x-user", &user)]),
            ("murmur", format!("/murmur?u={user}"), vec![]),
            ("maglev", "/maglev".into(), vec![("x-user", &user)]),
            ("small", format!("/small?u={key}"), vec![("x-user", &user)]),
            ("cookie", "/cookie".into(), vec![("cookie", &cookie)]),
        ];
        for (what, path, headers) in cases {
            let (a, b) = (get(dp, "svc", &path, &headers).await, get(envoy, "svc", &path, &headers).await);
            assert_eq!((a.status, b.status), (200, 200), "{what} {path}");
            if a.body != b.body {
                mismatches.push(format!("{what} {path} {headers:?}: dp {} Envoy {}", a.body, b.body));
            }
            reached.entry(what).or_default().insert(a.body);
        }
    }
    assert!(mismatches.is_empty(), "dp and Envoy hashed requests to different hosts:\n{}", mismatches.join("\n"));
    // Hashing spreads: each policy reached several backends.
    for (what, hosts) in &reached {
        assert!(hosts.len() >= 3, "{what} reached only {hosts:?}");
    }
    // One key always lands on one backend; without the query parameter the client's
    // address is hashed, the same one for every request here.
    for path in ["/murmur", "/ring"] {
        let mut seen = BTreeSet::new();
        for _ in 0..6 {
            seen.insert(get(dp, "svc", path, &[("x-user", "fixed")]).await.body);
        }
        assert_eq!(seen.len(), 1, "{path}: {seen:?}");
        assert_eq!(get(envoy, "svc", path, &[("x-user", "fixed")]).await.body, *seen.first().unwrap(), "{path}");
    }
    // Every connection from 127.0.0.1 lands on the host Envoy's hash of it gives.
    let envoy_host = get(envoy_tcp, "svc", "/", &[]).await.body;
    for _ in 0..6 {
        assert_eq!(get(dp_tcp, "svc", "/", &[]).await.body, envoy_host, "tcp_proxy source_ip hashing");
    }
    // A cluster that does not hash never asks for the hash: no cookie is made.
    for addr in [dp, envoy] {
        let got = get(addr, "svc", "/rr", &[]).await;
        assert_eq!(got.status, 200);
        assert!(!got.headers.contains_key("set-cookie"), "{addr}: {:?}", got.headers);
    }
    // No cookie: the proxy makes one, sends it back, and hashes its value; the client
    // that sends it again stays on that backend.
    for addr in [dp, envoy] {
        let first = get(addr, "svc", "/cookie", &[]).await;
        let set = first.headers.get("set-cookie").unwrap_or_else(|| panic!("no set-cookie from {addr}"));
        let value = set.strip_prefix("sid=\"").and_then(|s| s.split_once('"')).map(|(v, rest)| (v.to_string(), rest));
        let Some((value, rest)) = value else { panic!("set-cookie {set}") };
        assert_eq!(rest, "; Max-Age=60; Path=/; HttpOnly", "{set}");
        assert!(value.len() == 16 && value.bytes().all(|c| c.is_ascii_hexdigit()), "{set}");
        for _ in 0..3 {
            let again = get(addr, "svc", "/cookie", &[("cookie", &format!("sid=\"{value}\""))]).await;
            assert_eq!(again.body, first.body, "the cookie keeps the backend");
            assert!(!again.headers.contains_key("set-cookie"));
        }
    }
}

/// MeshPassthrough's listener shapes: `tls_inspector` and `http_inspector`, a chain for
/// HTTP (`application_protocols` `http/1.1` and `h2c` over `raw_buffer`) and one for
/// other plain TCP; on a second listener both inspectors are `filter_disabled` on the
/// destination port (a server-first protocol such as MySQL: the client waits for the
/// server's greeting); on a third the predicate does not match, so the inspectors wait
/// for the client and the listener filter timeout closes the connection. dp and Envoy
/// must agree on each.
#[tokio::test(flavor = "multi_thread")]
async fn http_inspector_and_filter_disabled_pick_chains_as_envoy_does() {
    use e2e::http::h2c_get;
    use e2e::{Backend, closed_without_data, read_line};

    let http_app = HttpBackend::start("http-app").await;
    let tcp_app = Backend::start("tcp-app").await;
    // A server that speaks first.
    let greeter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let greeter_addr = greeter.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = greeter.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"GREETING\n").await;
                let mut b = [0u8; 64];
                let _ = s.read(&mut b).await;
            });
        }
    });
    let inspectors = |disabled: Option<Value>| {
        let mut filters = vec![
            json!({"name": "envoy.filters.listener.tls_inspector", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}),
            json!({"name": "envoy.filters.listener.http_inspector", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}),
        ];
        if let Some(d) = disabled {
            for f in &mut filters {
                f["filterDisabled"] = d.clone();
            }
        }
        json!(filters)
    };
    let tcp_chain = |cluster: &str| {
        json!({"filterChainMatch": {"transportProtocol": "raw_buffer"},
            "filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                "cluster": cluster, "statPrefix": cluster}}]})
    };
    let http_chain = json!({
        "filterChainMatch": {"transportProtocol": "raw_buffer", "applicationProtocols": ["http/1.1", "h2c"]},
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
            "@type": HCM, "statPrefix": "passthrough_http", "httpFilters": [router()],
            "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "any", "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "http-app", "timeout": "0s"},
                 "responseHeadersToAdd": [{"header": {"key": "x-chain", "value": "http"}}]}]}]}}}]
    });
    let all_ports = json!({"destinationPortRange": {"start": 1, "end": 65536}});
    let passthrough = |name: &str, chains: Vec<Value>, disabled: Option<Value>| {
        json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": name, "address": socket("127.0.0.1:0".parse().unwrap()),
            "listenerFilters": inspectors(disabled), "listenerFiltersTimeout": "0.3s",
            "filterChains": chains
        })
    };
    let resources = vec![
        cluster("http-app", socket(http_app.addr)),
        cluster("tcp-app", socket(tcp_app.addr)),
        cluster("greeter", socket(greeter_addr)),
        passthrough("passthrough", vec![http_chain.clone(), tcp_chain("tcp-app")], None),
        passthrough(
            "server-first",
            vec![http_chain.clone(), tcp_chain("greeter")],
            Some(json!({"orMatch": {"rules": [{"destinationPortRange": {"start": 1, "end": 2}}, all_ports.clone()]}})),
        ),
        passthrough(
            "server-first-inspected",
            vec![http_chain, tcp_chain("greeter")],
            Some(json!({"notMatch": all_ports})),
        ),
    ];
    let pair = Pair::start(resources);
    let (dp_pass, envoy_pass) = pair.listener("passthrough");
    let (dp_first, envoy_first) = pair.listener("server-first");
    let (dp_inspected, envoy_inspected) = pair.listener("server-first-inspected");

    let mut outcomes = vec![];
    for (pass, first, inspected) in [(dp_pass, dp_first, dp_inspected), (envoy_pass, envoy_first, envoy_inspected)] {
        let mut o = vec![];
        // HTTP/1.1 and h2c take the HTTP chain (the route's response header says so).
        let h1 = get(pass, "svc", "/h1", &[]).await;
        o.push(format!("h1 {} {} {:?}", h1.status, h1.body, h1.headers.get("x-chain")));
        let h2 = h2c_get(pass, "svc", "/h2").await;
        o.push(format!("h2c {} {} {:?}", h2.status, h2.body, h2.headers.get("x-chain")));
        // Anything else takes the TCP chain, its bytes intact.
        let mut s = tokio::net::TcpStream::connect(pass).await.unwrap();
        s.write_all(b"\x00\x01binary hello\n").await.unwrap();
        o.push(format!("tcp {:?}", read_line(&mut s).await));
        // Inspectors disabled on the port: the server's greeting comes unasked.
        let mut s = tokio::net::TcpStream::connect(first).await.unwrap();
        o.push(format!("server-first {:?}", read_line(&mut s).await));
        // Inspectors on: they wait for the client until the timeout, then close.
        let mut s = tokio::net::TcpStream::connect(inspected).await.unwrap();
        o.push(format!("inspected closed-without-data {}", closed_without_data(&mut s).await));
        outcomes.push(o);
    }
    assert_eq!(outcomes[0], outcomes[1], "dp (left) and Envoy (right) differ");
    assert_eq!(
        outcomes[0],
        [
            "h1 200 http-app Some(\"http\")",
            "h2c 200 http-app Some(\"http\")",
            "tcp Some(\"tcp-app\")",
            "server-first Some(\"GREETING\")",
            "inspected closed-without-data true",
        ]
    );
    assert_eq!(tcp_app.received.lock().unwrap()[0], b"\x00\x01binary hello\n");
    let seen: Vec<String> = http_app.seen.lock().unwrap().iter().map(|s| s.version.clone()).collect();
    assert_eq!(seen, ["HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.1"], "requests went through the HCM");
}

/// MeshTimeout's and MeshRateLimit's rules by client identity (Kuma 2.14's
/// `matched_spiffe_precedence` golden): `set_filter_state` writes the client's SPIFFE ID
/// after the TLS handshake, and routes match it exactly, by prefix, or not at all. A
/// plain-text chain has no handshake, so no value: only its catch-all route answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_the_clients_spiffe_id_from_set_filter_state_as_envoy_does() {
    let ca = MeshCa::new("mesh-a");
    let server = ca.identity(&format!("spiffe://{TD_A}/zone-egress"));
    let key = "kuma.mesh_timeout.match.spiffe_id";
    let set_state = json!({"name": "envoy.filters.network.set_filter_state", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config",
        "onDownstreamTlsHandshake": [{"factoryKey": "envoy.string", "objectKey": key, "readOnly": true, "skipIfEmpty": true,
            "formatString": {"textFormatSource": {"inlineString": "%DOWNSTREAM_PEER_URI_SAN%"}}}]}});
    let answer = |body: &str| json!({"status": 200, "body": {"inlineString": body}});
    let routes = json!([
        {"match": {"prefix": "/", "filterState": [{"key": key, "stringMatch": {"exact": format!("spiffe://{TD_A}/client")}}]},
         "directResponse": answer("exact")},
        {"match": {"prefix": "/", "filterState": [{"key": key, "stringMatch": {"prefix": format!("spiffe://{TD_A}/")}}]},
         "directResponse": answer("mesh")},
        {"match": {"prefix": "/"}, "directResponse": answer("any")},
    ]);
    let mut plain = json!({"filterChainMatch": {"transportProtocol": "raw_buffer"}, "filters": [set_state.clone(),
        {"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
            "@type": HCM, "statPrefix": "plain", "httpFilters": [router()],
            "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "plain", "routes": routes.clone()}]}}}]});
    plain["name"] = json!("plain");
    let chains = vec![egress_chain(&[sni("inbound")], vec![set_state], vec![], routes), plain];
    let mut resources = vec![listener("inbound", chains, true)];
    resources.extend(secrets(&ca, &server));
    let pair = Pair::start(resources);
    let (dp, envoy) = pair.listener("inbound");

    let dir = temp_dir("filter-state-identities");
    let id = |name: &str, uri: String| {
        let i = ca.identity(&uri);
        CurlIdentity::write(&dir, name, &i.cert_pem, &i.key_pem)
    };
    let clients = [
        ("client@A", id("client-a", format!("spiffe://{TD_A}/client"))),
        ("other@A", id("other-a", format!("spiffe://{TD_A}/other"))),
        ("client@B", id("client-b", format!("spiffe://{TD_B}/client"))),
    ];
    let mut got = vec![];
    for addr in [dp, envoy] {
        let mut answers = vec![];
        for (name, identity) in &clients {
            let a = curl_tls(addr, &sni("inbound"), Some(identity), "svc", &["/"]).await;
            answers.push(format!("{name}: {:?}", a[0].as_ref().map(|(status, body, _)| (*status, body.clone()))));
        }
        let g = get(addr, "svc", "/", &[]).await;
        answers.push(format!("plain: {:?}", Some((g.status, g.body))));
        got.push(answers);
    }
    assert_eq!(got[0], got[1], "dp (left) and Envoy (right) differ");
    assert_eq!(
        got[0],
        [
            "client@A: Some((200, \"exact\"))",
            "other@A: Some((200, \"mesh\"))",
            "client@B: Some((200, \"any\"))",
            "plain: Some((200, \"any\"))",
        ]
    );
}

/// MeshAccessLog's file backend: the HCM's and the tcp_proxy's `access_log`, in text
/// (Kuma's default line, with a field dp does not know) and JSON formats. dp and Envoy
/// write into the same files; each line starts with the proxy's own listener port, and
/// the lines must be equal but for the time and duration.
#[tokio::test(flavor = "multi_thread")]
async fn access_logs_write_the_lines_envoy_writes() {
    use e2e::{Backend, read_line};
    let app = HttpBackend::start("app").await;
    let tcp_app = Backend::start("tcp-app").await;
    let dir = temp_dir("access-logs");
    let text_path = dir.join("http.log");
    let json_path = dir.join("http.json");
    let tcp_path = dir.join("tcp.log");
    let file_log = |path: &Path, format: Value| {
        json!({"name": "envoy.access_loggers.file", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path.to_str().unwrap(), "logFormat": format}})
    };
    let text = "%DOWNSTREAM_LOCAL_PORT% [%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" \
        %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \"%REQ(X-FORWARDED-FOR)%\" \
        \"%REQ(USER-AGENT):5%\" \"%REQ(:AUTHORITY)%\" %UPSTREAM_CLUSTER% \"%UPSTREAM_HOST%\" %ROUTE_NAME% \
        %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %RESP(X-BACKEND)% %RESP(:STATUS)% 100%%\n";
    let json_format = json!({"port": "%DOWNSTREAM_LOCAL_PORT%", "code": "%RESPONSE_CODE%", "method": "%REQ(:METHOD)%",
        "missing": "%REQ(X-NOPE)%", "line": "%REQ(:METHOD)% %REQ(:PATH)%", "nested": {"host": "%UPSTREAM_HOST%"}});
    let hcm = json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM, "statPrefix": "logged", "httpFilters": [router()],
        "accessLog": [
            file_log(&text_path, json!({"textFormatSource": {"inlineString": text}})),
            file_log(&json_path, json!({"jsonFormat": json_format})),
        ],
        "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "logged", "routes": [
            {"name": "to-app", "match": {"prefix": "/app"}, "route": {"cluster": "app", "timeout": "0s"}}]}]}}});
    let tcp = json!({"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "cluster": "tcp-app", "statPrefix": "logged_tcp",
        "accessLog": [file_log(&tcp_path, json!({"textFormatSource": {"inlineString":
            "%DOWNSTREAM_LOCAL_PORT% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_CLUSTER% %UPSTREAM_HOST% %PROTOCOL%\n"}}))]}});
    let resources = vec![
        cluster("app", socket(app.addr)),
        cluster("tcp-app", socket(tcp_app.addr)),
        listener("logged", vec![json!({"filters": [hcm]})], false),
        listener("logged-tcp", vec![json!({"filters": [tcp]})], false),
    ];
    let pair = Pair::start(resources);
    let (dp, envoy) = pair.listener("logged");
    let (dp_tcp, envoy_tcp) = pair.listener("logged-tcp");
    for addr in [dp, envoy] {
        assert_eq!(
            get(addr, "svc", "/app/x?y=1", &[("user-agent", "curl/8.0"), ("x-forwarded-for", "10.1.2.3")]).await.status,
            200
        );
        assert_eq!(get(addr, "svc", "/nowhere", &[]).await.status, 404);
    }
    for addr in [dp_tcp, envoy_tcp] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"hello\n").await.unwrap();
        assert_eq!(read_line(&mut s).await.as_deref(), Some("tcp-app"));
    }
    // Envoy flushes its logs every second: read until both proxies' lines are there.
    let lines_of = |path: &Path, port: u16, want: usize| -> Option<Vec<String>> {
        let all = std::fs::read_to_string(path).ok()?;
        let mine: Vec<String> = all
            .lines()
            .filter(|l| {
                l.starts_with(&port.to_string())
                    || l.contains(&format!("\"port\":{port}"))
                    || l.contains(&format!("\"port\":\"{port}\""))
            })
            .map(str::to_owned)
            .collect();
        (mine.len() >= want).then_some(mine)
    };
    let both = |path: &Path, (a, b): (SocketAddr, SocketAddr), want: usize| {
        let d = e2e::wait_until(&format!("dp's lines in {}", path.display()), || lines_of(path, a.port(), want));
        let e = e2e::wait_until(&format!("Envoy's lines in {}", path.display()), || lines_of(path, b.port(), want));
        (d, e)
    };
    // Time and duration vary; the ports are each proxy's own. The fields have no spaces
    // up to the duration (the tenth).
    let normal = |l: &str, port: u16| {
        let mut f: Vec<String> = l.replacen(&port.to_string(), "PORT", 1).split(' ').map(str::to_owned).collect();
        let t = f[1].trim_start_matches('[').trim_end_matches(']');
        let shape = t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T' && t.as_bytes()[19] == b'.';
        assert!(shape, "START_TIME `{t}` in {l}");
        assert!(f[9].bytes().all(|c| c.is_ascii_digit()), "DURATION `{}` in {l}", f[9]);
        f[1] = "[T]".into();
        f[9] = "D".into();
        f.join(" ")
    };
    let (d, e) = both(&text_path, (dp, envoy), 2);
    let dn: Vec<String> = d.iter().map(|l| normal(l, dp.port())).collect();
    let en: Vec<String> = e.iter().map(|l| normal(l, envoy.port())).collect();
    assert_eq!(dn, en, "text lines: dp (left), Envoy (right)");
    assert!(dn[0].contains(&format!("\"GET /app/x?y=1 HTTP/1.1\" 200 - 0 3 D \"10.1.2.3\" \"curl/\" \"svc\" app \"{}\" to-app 10.1.2.3 app 200 100%", app.addr)), "{}", dn[0]);
    assert!(
        dn[1].contains("\"GET /nowhere HTTP/1.1\" 404 NR 0 0 D \"-\" \"-\" \"svc\" - \"-\" - 127.0.0.1 - 404 100%"),
        "{}",
        dn[1]
    );

    let (d, e) = both(&json_path, (dp, envoy), 2);
    let strip = |l: &str| {
        let mut v: Value = serde_json::from_str(l).unwrap();
        let port = v.as_object_mut().unwrap().remove("port");
        assert!(port.as_ref().is_some_and(Value::is_u64), "a lone numeric operator is a number: {l}");
        v
    };
    let dj: Vec<Value> = d.iter().map(|l| strip(l)).collect();
    let ej: Vec<Value> = e.iter().map(|l| strip(l)).collect();
    assert_eq!(dj, ej, "JSON lines: dp (left), Envoy (right)");

    let (d, e) = both(&tcp_path, (dp_tcp, envoy_tcp), 1);
    assert_eq!(
        d[0].replacen(&dp_tcp.port().to_string(), "PORT", 1),
        e[0].replacen(&envoy_tcp.port().to_string(), "PORT", 1)
    );
    assert_eq!(
        d[0].replacen(&dp_tcp.port().to_string(), "PORT", 1),
        format!("PORT 0 - 6 8 tcp-app {} -", tcp_app.addr)
    );
}

/// MeshHTTPRoute's RequestMirror filter: every request also goes to the mirror cluster,
/// body included, as `<host>-shadow`; its answer is dropped. A mirror at 0 % sends
/// nothing. dp's mirror sees what Envoy's sees.
#[tokio::test(flavor = "multi_thread")]
async fn requests_are_mirrored_as_envoy_mirrors_them() {
    let app = HttpBackend::start("app").await;
    let shadow = HttpBackend::start("shadow").await;
    let never = HttpBackend::start("never").await;
    let hcm = json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM, "statPrefix": "mirrored", "httpFilters": [router()],
        "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "mirrored", "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s", "requestMirrorPolicies": [
                {"cluster": "shadow"},
                {"cluster": "never", "runtimeFraction": {"defaultValue": {"numerator": 0}}}]}}]}]}}});
    let pair = Pair::start(vec![
        cluster("app", socket(app.addr)),
        cluster("shadow", socket(shadow.addr)),
        cluster("never", socket(never.addr)),
        listener("mirrored", vec![json!({"filters": [hcm]})], false),
    ]);
    let (dp, envoy) = pair.listener("mirrored");
    let mut seen = vec![];
    for addr in [dp, envoy] {
        let before = shadow.requests();
        let got = e2e::http::post(addr, "svc:8080", "/orders?id=7", b"{\"qty\": 2}").await;
        assert_eq!((got.status, got.body.as_str()), (200, "app"), "{addr}");
        let copy = e2e::wait_until("the mirrored request", || {
            let s = shadow.seen.lock().unwrap();
            (s.len() > before).then(|| s[before].clone())
        });
        seen.push((
            copy.method,
            copy.path,
            copy.headers.get("host").cloned(),
            String::from_utf8_lossy(&copy.body).into_owned(),
        ));
    }
    assert_eq!(seen[0], seen[1], "dp's mirror (left) and Envoy's (right)");
    assert_eq!(
        seen[0],
        (
            "POST".to_string(),
            "/orders?id=7".to_string(),
            Some("svc-shadow:8080".to_string()),
            "{\"qty\": 2}".to_string()
        )
    );
    assert_eq!(never.requests(), 0, "a 0 % mirror sends nothing");
}

/// MeshFaultInjection's `responseBandwidth`: the fault filter's `response_rate_limit`
/// lets the answer through at 1 KiB/s, so 512 bytes cannot arrive in much under half a
/// second through either proxy; the body is whole.
#[tokio::test(flavor = "multi_thread")]
async fn the_response_rate_limit_slows_the_body_as_envoys_does() {
    let body = "b".repeat(512);
    let app = HttpBackend::start(&body).await;
    let fault = json!({"name": "envoy.filters.http.fault", "typedConfig": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "responseRateLimit": {"fixedLimit": {"limitKbps": "1"}, "percentage": {"numerator": 100}}}});
    let hcm = json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM, "statPrefix": "slow", "httpFilters": [fault, router()],
        "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "slow", "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}]}]}}});
    let pair =
        Pair::start(vec![cluster("app", socket(app.addr)), listener("slow", vec![json!({"filters": [hcm]})], false)]);
    let (dp, envoy) = pair.listener("slow");
    for addr in [dp, envoy] {
        let started = std::time::Instant::now();
        let got = get(addr, "svc", "/", &[]).await;
        let took = started.elapsed();
        assert_eq!((got.status, got.body.len()), (200, 512), "{addr}");
        // Seven sixteenths of a second at least between the first 64 bytes and the last.
        assert!(took >= std::time::Duration::from_millis(400), "{addr}: the body came in {took:?}");
    }
}

/// Route-targeted MeshAccessLog (Kuma 2.14's `basic_outbound_meshhttproute` golden):
/// Kuma's Lua filter copies a route's `route_kri` metadata into the dynamic metadata, and
/// each logger's `metadata_filter` takes the requests of its route (or of no route). dp
/// recognises that one script; each file gets the lines Envoy writes into it.
#[tokio::test(flavor = "multi_thread")]
async fn route_targeted_access_logs_go_where_envoys_go() {
    let app = HttpBackend::start("app").await;
    let dir = temp_dir("route-access-logs");
    let (other, route2) = (dir.join("other.log"), dir.join("route-2.log"));
    let lua = "function envoy_on_request(handle)\n  local meta = handle:metadata():get(\"route_kri\")\n  \
               if meta ~= nil then\n    handle:streamInfo():dynamicMetadata():set(\"kuma.routes\", \"route_kri\", meta)\n  end\nend\n";
    let logger = |path: &Path, value: Value, if_not_found: bool| {
        json!({"name": "envoy.access_loggers.file",
            "filter": {"metadataFilter": {"matchIfKeyNotFound": if_not_found, "matcher": {
                "filter": "kuma.routes", "path": [{"key": "route_kri"}], "value": value}}},
            "typedConfig": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path.to_str().unwrap(),
                "logFormat": {"textFormatSource": {"inlineString": "%DOWNSTREAM_LOCAL_PORT% %REQ(:PATH)%\n"}}}})
    };
    let hcm = json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM, "statPrefix": "routes",
        "httpFilters": [{"name": "envoy.filters.http.lua", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
            "defaultSourceCode": {"inlineString": lua}}}, router()],
        "accessLog": [
            logger(&other, json!({"nullMatch": {}}), true),
            logger(&route2, json!({"stringMatch": {"exact": "kri_mhttpr_default___route-2_"}}), false),
        ],
        "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "routes", "routes": [
            {"match": {"prefix": "/route-2"}, "name": "kri_mhttpr_default___route-2_",
             "metadata": {"filterMetadata": {"envoy.filters.http.lua": {"route_kri": "kri_mhttpr_default___route-2_"}}},
             "route": {"cluster": "app", "timeout": "0s"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}]}]}}});
    let pair =
        Pair::start(vec![cluster("app", socket(app.addr)), listener("routes", vec![json!({"filters": [hcm]})], false)]);
    let (dp, envoy) = pair.listener("routes");
    for addr in [dp, envoy] {
        for path in ["/route-2/a", "/other", "/route-2/b"] {
            assert_eq!(get(addr, "svc", path, &[]).await.status, 200);
        }
    }
    let lines = |path: &Path, port: u16, want: usize| {
        e2e::wait_until(&format!("{want} lines for port {port} in {}", path.display()), || {
            let all = std::fs::read_to_string(path).ok()?;
            let mine: Vec<String> =
                all.lines().filter_map(|l| l.strip_prefix(&format!("{port} ")).map(str::to_owned)).collect();
            (mine.len() >= want).then_some(mine)
        })
    };
    for (file, want) in [(&other, vec!["/other"]), (&route2, vec!["/route-2/a", "/route-2/b"])] {
        assert_eq!(lines(file, envoy.port(), want.len()), want, "Envoy, {}", file.display());
        assert_eq!(lines(file, dp.port(), want.len()), want, "dp, {}", file.display());
    }
    // Nothing more came into either file from dp (the lines are written in order).
    let count = |path: &Path, port: u16| {
        std::fs::read_to_string(path).unwrap().lines().filter(|l| l.starts_with(&format!("{port} "))).count()
    };
    assert_eq!((count(&other, dp.port()), count(&route2, dp.port())), (1, 2));
}

/// Outlier detection's success-rate detector (on by default in Envoy): among five hosts
/// answering enough requests in an interval, the one whose connections are reset (a
/// success rate far below the others') is ejected, in dp's `/clusters` as in Envoy's.
/// The consecutive-5xx detector is kept out of the way (a threshold of 10,000).
#[tokio::test(flavor = "multi_thread")]
async fn the_success_rate_detector_ejects_the_failing_host_as_envoys_does() {
    let mut backends = vec![];
    for i in 0..5 {
        backends.push(HttpBackend::start(&format!("b{i}")).await);
    }
    backends[4].set_mode(e2e::http::Mode::Reset);
    let endpoints: Vec<Value> = backends.iter().map(|b| json!({"endpoint": {"address": socket(b.addr)}})).collect();
    let mut app = cluster("app", socket(backends[0].addr));
    app["loadAssignment"]["endpoints"] = json!([{"lbEndpoints": endpoints}]);
    app["outlierDetection"] = json!({"interval": "1s", "baseEjectionTime": "300s", "maxEjectionPercent": 50,
        "consecutive5xx": 10000, "consecutiveGatewayFailure": 10000,
        "successRateRequestVolume": 20, "successRateMinimumHosts": 5});
    let hcm = json!({"name": "envoy.filters.network.http_connection_manager", "typedConfig": {
        "@type": HCM, "statPrefix": "sr", "httpFilters": [router()],
        "routeConfig": {"virtualHosts": [{"domains": ["*"], "name": "sr", "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "0s"}}]}]}}});
    let pair = Pair::start(vec![app, listener("sr", vec![json!({"filters": [hcm]})], false)]);
    let (dp, envoy) = pair.listener("sr");
    let bad = backends[4].addr;
    for (who, addr, admin) in [("Envoy", envoy, pair.envoy.admin), ("dp", dp, pair.dp.admin)] {
        let flags = |what: &str| {
            let (_, body) = e2e::http_get(admin, "/clusters").ok()?;
            body.lines().find_map(|l| l.strip_prefix(&format!("app::{what}::health_flags::")).map(str::to_owned))
        };
        // Requests until an interval has seen every host answer 20 or more, and the
        // detector has looked.
        let mut ejected = false;
        for _ in 0..200 {
            for _ in 0..50 {
                let _ = get(addr, "svc", "/", &[]).await;
            }
            if flags(&bad.to_string()).as_deref() == Some("/failed_outlier_check") {
                ejected = true;
                break;
            }
        }
        assert!(ejected, "{who} did not eject {bad}");
        for b in &backends[..4] {
            assert_eq!(flags(&b.addr.to_string()).as_deref(), Some("healthy"), "{who}: {}", b.addr);
        }
    }
    let (_, stats) =
        e2e::http_get(pair.dp.admin, "/stats?filter=outlier_detection.ejections_enforced_success_rate").unwrap();
    assert!(stats.contains("cluster.app.outlier_detection.ejections_enforced_success_rate: 1"), "{stats}");
}
