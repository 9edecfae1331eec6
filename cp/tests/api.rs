//! REST API, tokens and /bootstrap against an in-process control plane.

mod common;

use base64::Engine;
use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn rest_round_trips_and_lists() {
    let cp = TestCp::start("rest").await;
    let (s, _) = cp.put("/meshes/default", MESH_YAML).await;
    assert_eq!(s, 201, "create");
    let (s, _) = cp.put("/meshes/default", MESH_YAML).await;
    assert_eq!(s, 200, "update");
    let (s, m) = cp.get("/meshes/default").await;
    assert_eq!(s, 200);
    assert_eq!(m["type"], "Mesh");
    assert_eq!(m["mtls"]["enabledBackend"], "ca-1");
    assert!(m["creationTime"].as_str().unwrap().ends_with('Z'));

    let (s, _) = cp.put("/meshes/other", r#"{"type":"Mesh","name":"other"}"#).await;
    assert_eq!(s, 201);
    let (_, l) = cp.get("/meshes").await;
    assert_eq!(l["total"], 2);
    assert_eq!(l["items"].as_array().unwrap().len(), 2);
    assert_eq!(l["next"], Value::Null);
    let (_, page) = cp.get("/meshes?size=1").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], "/meshes?offset=1&size=1");

    let (s, _) =
        cp.put("/meshes/default/dataplanes/backend-1", &dataplane_json("backend-1", "127.0.0.1", 18080, "v1")).await;
    assert_eq!(s, 201);
    let (_, l) = cp.get("/meshes/default/dataplanes").await;
    assert_eq!(l["total"], 1);
    assert_eq!(l["items"][0]["networking"]["inbound"][0]["tags"]["kuma.io/service"], "backend");
    let (_, l) = cp.get("/meshes/other/dataplanes").await;
    assert_eq!(l["total"], 0);

    let (s, _) = cp.put("/zones/zone-2", r#"{"type":"Zone","name":"zone-2","enabled":false}"#).await;
    assert_eq!(s, 201);
    let (_, z) = cp.get("/zones/zone-2").await;
    assert_eq!(z["enabled"], false);

    let (s, _) = cp.delete("/meshes/default/dataplanes/backend-1").await;
    assert_eq!(s, 200);
    let (s, e) = cp.get("/meshes/default/dataplanes/backend-1").await;
    assert_eq!(s, 404);
    assert_eq!(e["title"], "Could not retrieve a resource");
    let (s, _) = cp.delete("/zones/zone-2").await;
    assert_eq!(s, 200);
    let (s, _) = cp.delete("/zones/zone-2").await;
    assert_eq!(s, 404);

    // Deleting a mesh deletes its Dataplanes.
    cp.put(
        "/meshes/other/dataplanes/web",
        &dataplane_json("web", "127.0.0.1", 1, "v1").replace("\"default\"", "\"other\""),
    )
    .await;
    let (_, l) = cp.get("/meshes/other/dataplanes").await;
    assert_eq!(l["total"], 1);
    cp.delete("/meshes/other").await;
    let (_, l) = cp.get("/dataplanes").await;
    assert_eq!(l["total"], 0);
}

fn fields(v: &Value) -> Vec<String> {
    v["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn validation_errors_are_422_with_field_paths() {
    let cp = TestCp::start("validation").await;
    cp.put("/meshes/default", MESH_YAML).await;
    let bad = json!({"type":"Dataplane","mesh":"default","name":"dp-1",
        "networking":{"address":"","inbound":[{"port":0,"tags":{"version":"v1"}}]}});
    let (s, e) = cp.put("/meshes/default/dataplanes/dp-1", &bad.to_string()).await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["title"], "Could not process a resource");
    assert_eq!(e["details"], "Resource is not valid");
    let f = fields(&e);
    assert!(f.contains(&"networking.address".to_string()), "{f:?}");
    assert!(f.contains(&"networking.inbound[0].port".to_string()), "{f:?}");
    assert!(f.contains(&"networking.inbound[0].tags[\"kuma.io/service\"]".to_string()), "{f:?}");

    let (s, e) = cp
        .put(
            "/zoneingresses/zi",
            r#"{"type":"ZoneIngress","name":"zi","networking":{"port":70000,"advertisedAddress":"1.2.3.4"}}"#,
        )
        .await;
    assert_eq!(s, 422);
    let f = fields(&e);
    assert!(
        f.contains(&"networking.port".to_string()) && f.contains(&"networking.advertisedPort".to_string()),
        "{f:?}"
    );

    let (s, e) = cp
        .put("/meshes/default", r#"{"type":"Mesh","name":"default","mtls":{"enabledBackend":"nope","backends":[]}}"#)
        .await;
    assert_eq!(s, 422);
    assert_eq!(fields(&e), vec!["mtls.enabledBackend"]);

    // Missing mesh.
    let (s, e) = cp
        .put(
            "/meshes/nomesh/dataplanes/dp",
            &dataplane_json("dp", "1.1.1.1", 80, "v1").replace("\"default\"", "\"nomesh\""),
        )
        .await;
    assert_eq!(s, 422);
    assert_eq!(fields(&e), vec!["mesh"]);

    // URL and body disagree.
    let (s, e) = cp.put("/meshes/default/dataplanes/other-name", &dataplane_json("dp", "1.1.1.1", 80, "v1")).await;
    assert_eq!(s, 400);
    assert_eq!(fields(&e), vec!["name"]);

    // Unparseable and oversized bodies.
    let (s, _) = cp.put("/meshes/x", "{not json").await;
    assert_eq!(s, 400);
    let big = format!(r#"{{"type":"Mesh","name":"x","pad":"{}"}}"#, "a".repeat(2 * 1024 * 1024));
    let (s, _) = cp.put("/meshes/x", &big).await;
    assert_eq!(s, 413);
}

#[tokio::test]
async fn zone_tokens_issue_and_validate() {
    let cp = TestCp::start("tokens").await;
    let tok = cp.zone_token("zone-1", &["ingress"]).await;
    let header = jsonwebtoken::decode_header(&tok).unwrap();
    assert_eq!(header.kid.as_deref(), Some("1"));
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tok.split('.').nth(1).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(payload["Zone"], "zone-1");
    assert_eq!(payload["Scope"], json!(["ingress"]));
    assert!(payload["exp"].is_u64() && payload["iat"].is_u64() && payload["jti"].is_string());

    let tokens = &cp.running.cp.tokens;
    tokens.validate_zone(&tok, "ingress", "zone-1").await.expect("good token");
    let e = tokens.validate_zone(&tok, "egress", "zone-1").await.unwrap_err();
    assert_eq!(e.to_string(), "zone token scope does not include egress");
    let e = tokens.validate_zone(&tok, "ingress", "zone-9").await.unwrap_err();
    assert_eq!(e.to_string(), "token is for zone zone-1, this is zone-9");
    let mut parts: Vec<&str> = tok.split('.').collect();
    let other = cp.zone_token("zone-1", &["ingress", "egress"]).await;
    let other_sig = other.split('.').nth(2).unwrap().to_string();
    parts[2] = &other_sig;
    let e = tokens.validate_zone(&parts.join("."), "ingress", "zone-1").await.unwrap_err();
    assert_eq!(e.to_string(), "token signature invalid");
    let now = cp::model::now_unix();
    let expired = tokens.issue_zone_with_times("zone-1", &["ingress".into()], now - 100, now - 10).await.unwrap();
    assert_eq!(tokens.validate_zone(&expired, "ingress", "zone-1").await.unwrap_err().to_string(), "token expired");
    assert!(
        tokens
            .validate_zone("garbage", "ingress", "zone-1")
            .await
            .unwrap_err()
            .to_string()
            .starts_with("token is not a valid JWT")
    );

    // REST validation of the request.
    let (s, e) =
        http(&format!("{}/tokens/zone", cp.api()), "POST", r#"{"zone":"zone-1","scope":["ingress","bogus"]}"#).await;
    assert_eq!(s, 422);
    assert_eq!(e["causes"][0]["field"], "scope");
    let (s, e) = http(
        &format!("{}/tokens/zone", cp.api()),
        "POST",
        r#"{"zone":"zone-1","scope":["ingress"],"validFor":"soon"}"#,
    )
    .await;
    assert_eq!(s, 422);
    assert_eq!(e["causes"][0]["field"], "validFor");

    // Dataplane token: claims and mesh binding.
    cp.put("/meshes/default", MESH_YAML).await;
    let (s, dpt) = http_text(
        &format!("{}/tokens/dataplane", cp.api()),
        "POST",
        r#"{"name":"backend-1","mesh":"default","validFor":"24h"}"#,
    )
    .await;
    assert_eq!(s, 200, "{dpt}");
    let claims = tokens.validate_dataplane(&dpt, "default", "backend-1", &Default::default()).await.unwrap();
    assert_eq!(claims.name, "backend-1");
    let e = tokens.validate_dataplane(&dpt, "default", "backend-2", &Default::default()).await.unwrap_err();
    assert!(e.to_string().contains("name"), "{e}");
}

fn bootstrap_request(token: &str, features: &[&str]) -> String {
    json!({
        "mesh": "", "name": "ingress-1", "proxyType": "ingress",
        "dataplaneToken": token,
        "dataplaneResource": ingress_json("ingress-1"),
        "version": {"kumaDp": {"version": "2.14.3"}, "envoy": {"version": "1.40.0", "kumaDpCompatible": true}},
        "caCert": "", "dynamicMetadata": null, "operatingSystem": "linux",
        "features": features, "workdir": "/tmp/kuma-dp-1", "readinessPort": 9902,
    })
    .to_string()
}

#[tokio::test]
async fn bootstrap_returns_a_decodable_envoy_bootstrap() {
    let cp = TestCp::start("bootstrap").await;
    let ca = cp.ca_pem();
    let token = cp.zone_token("zone-1", &["ingress", "egress"]).await;
    let (s, body) = https_post(cp.dp(), &ca, "localhost", "/bootstrap", &bootstrap_request(&token, &[]), true).await;
    assert_eq!(s, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["kumaSidecarConfiguration"]["networking"]["address"], "127.0.0.1");
    let yaml = base64::engine::general_purpose::STANDARD.decode(resp["bootstrap"].as_str().unwrap()).unwrap();
    let b: Value = serde_saphyr::from_str(std::str::from_utf8(&yaml).unwrap()).unwrap();
    assert_eq!(b["node"]["id"], ".ingress-1");
    assert_eq!(b["node"]["cluster"], "ingress");
    assert_eq!(b["node"]["metadata"]["dataplane.proxyType"], "ingress");
    assert_eq!(b["node"]["metadata"]["dataplane.admin.port"], "9901");
    let res: Value = serde_json::from_str(b["node"]["metadata"]["dataplane.resource"].as_str().unwrap()).unwrap();
    assert_eq!(res["type"], "ZoneIngress");
    let ads = &b["dynamic_resources"]["ads_config"];
    assert_eq!(ads["api_type"], "GRPC");
    assert_eq!(ads["grpc_services"][0]["envoy_grpc"]["cluster_name"], "ads_cluster");
    assert_eq!(ads["grpc_services"][0]["initial_metadata"][0]["key"], "authorization");
    assert_eq!(ads["grpc_services"][0]["initial_metadata"][0]["value"], token.as_str());
    let cluster = &b["static_resources"]["clusters"][0];
    assert_eq!(cluster["name"], "ads_cluster");
    assert_eq!(cluster["type"], "STRICT_DNS");
    let sa = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
    assert_eq!(sa["address"], "localhost");
    assert_eq!(sa["port_value"], cp.dp().port());
    let secret = &b["static_resources"]["secrets"][0]["validation_context"];
    let ca_back = base64::engine::general_purpose::STANDARD
        .decode(secret["trusted_ca"]["inline_bytes"].as_str().unwrap())
        .unwrap();
    assert_eq!(String::from_utf8(ca_back).unwrap(), ca);
    assert_eq!(secret["match_typed_subject_alt_names"][0]["matcher"]["exact"], "localhost");
    assert_eq!(b["admin"]["address"]["socket_address"]["port_value"], 9901);

    // Delta when kuma-dp asks for it; an IP host gives a STATIC cluster and an IP SAN matcher.
    let (s, body) =
        https_post(cp.dp(), &ca, "127.0.0.1", "/bootstrap", &bootstrap_request(&token, &["feature-delta-grpc"]), true)
            .await;
    assert_eq!(s, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).unwrap();
    let yaml = base64::engine::general_purpose::STANDARD.decode(resp["bootstrap"].as_str().unwrap()).unwrap();
    let b: Value = serde_saphyr::from_str(std::str::from_utf8(&yaml).unwrap()).unwrap();
    assert_eq!(b["dynamic_resources"]["ads_config"]["api_type"], "DELTA_GRPC");
    assert_eq!(b["static_resources"]["clusters"][0]["type"], "STATIC");
    assert_eq!(
        b["static_resources"]["secrets"][0]["validation_context"]["match_typed_subject_alt_names"][0]["san_type"],
        "IP_ADDRESS"
    );

    // Without accept: application/json, the raw YAML (legacy).
    let (s, body) = https_post(cp.dp(), &ca, "localhost", "/bootstrap", &bootstrap_request(&token, &[]), false).await;
    assert_eq!(s, 200);
    assert!(body.contains("ads_cluster"));

    // Token missing: 422 with a message naming the flag.
    let (s, body) = https_post(cp.dp(), &ca, "localhost", "/bootstrap", &bootstrap_request("", &[]), true).await;
    assert_eq!(s, 422);
    assert!(body.contains("--dataplane-token-file"), "{body}");

    // Unparseable request: 400.
    let (s, _) = https_post(cp.dp(), &ca, "localhost", "/bootstrap", "{", true).await;
    assert_eq!(s, 400);
}
