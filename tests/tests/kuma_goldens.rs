//! Kuma 2.14's own ingress configs (`../shared/fixtures/kuma-2.14`) load in `dp` and
//! route every server name they list to the endpoints Envoy would pick.
//!
//! Each distinct endpoint of a golden becomes a local backend named after its original
//! `address:port`; listener addresses become 127.0.0.1 with an ephemeral port. The
//! expected endpoints of a chain are computed here from the YAML, independently of
//! `dp`'s code: cluster, EDS assignment, and `metadata_match` with the cluster's
//! subset selectors and fallback policies.

use e2e::{Backend, Dp, fixtures_dir, hello, temp_dir};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a connection with a given SNI must get.
#[derive(Debug)]
enum Expect {
    /// One of these backends (by original address), and over enough tries all of them.
    Backends(BTreeSet<String>),
    /// These bytes, then close (direct_response).
    Bytes(Vec<u8>),
    /// Closed without data.
    Refused,
}

fn golden_files() -> Vec<std::path::PathBuf> {
    let dir = fixtures_dir();
    let mut files: Vec<_> = std::fs::read_dir(dir.join("ingress"))
        .unwrap()
        .chain(std::fs::read_dir(dir.join("zone-proxy-listener")).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            p.parent().unwrap().ends_with("ingress") || name.starts_with("ingress-")
        })
        .collect();
    files.sort();
    files
}

fn lb_md(v: &Value) -> BTreeMap<String, String> {
    v["filterMetadata"]["envoy.lb"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

fn addr_key(ep: &Value) -> String {
    let sa = &ep["endpoint"]["address"]["socketAddress"];
    format!("{}:{}", sa["address"].as_str().unwrap(), sa["portValue"])
}

/// Endpoints (original address, lb metadata) of a cluster.
fn cluster_endpoints(resources: &[Value], cluster: &Value) -> Vec<(String, BTreeMap<String, String>)> {
    let name = cluster["name"].as_str().unwrap();
    let service = cluster["edsClusterConfig"]["serviceName"].as_str().unwrap_or(name);
    let cla = if cluster.get("loadAssignment").is_some() {
        Some(&cluster["loadAssignment"])
    } else {
        resources
            .iter()
            .find(|r| r["@type"].as_str().unwrap().ends_with("ClusterLoadAssignment") && r["clusterName"] == service)
    };
    let mut out = vec![];
    for le in cla.and_then(|c| c["endpoints"].as_array()).into_iter().flatten() {
        for ep in le["lbEndpoints"].as_array().into_iter().flatten() {
            out.push((addr_key(ep), lb_md(&ep["metadata"])));
        }
    }
    out
}

fn expected(resources: &[Value], chain: &Value) -> Expect {
    let filter = &chain["filters"][0]["typedConfig"];
    let kind = filter["@type"].as_str().unwrap();
    if kind.ends_with("direct_response.v3.Config") {
        let b64 = filter["response"]["inlineBytes"].as_str().unwrap();
        return Expect::Bytes(base64_decode(b64));
    }
    assert!(kind.ends_with("TcpProxy"), "unexpected filter {kind}");
    let wanted = lb_md(&filter["metadataMatch"]);
    let name = filter["cluster"].as_str().expect("single cluster");
    let cluster = resources
        .iter()
        .find(|r| r["@type"].as_str().unwrap().ends_with(".Cluster") && r["name"] == name)
        .expect("cluster of the chain");
    let all = cluster_endpoints(resources, cluster);
    let pick = |want: &BTreeMap<String, String>| -> BTreeSet<String> {
        all.iter().filter(|(_, md)| want.iter().all(|(k, v)| md.get(k) == Some(v))).map(|(a, _)| a.clone()).collect()
    };
    let subsets = &cluster["lbSubsetConfig"];
    let set = if wanted.is_empty() || subsets.is_null() {
        all.iter().map(|(a, _)| a.clone()).collect()
    } else {
        let fallback = |policy: &str| match policy {
            "ANY_ENDPOINT" => all.iter().map(|(a, _)| a.clone()).collect(),
            "DEFAULT_SUBSET" => pick(&lb_md(&json!({"filterMetadata": {"envoy.lb": subsets["defaultSubset"]}}))),
            _ => BTreeSet::new(),
        };
        let cluster_fallback = subsets["fallbackPolicy"].as_str().unwrap_or("NO_FALLBACK");
        let keys: BTreeSet<&str> = wanted.keys().map(String::as_str).collect();
        let selector = subsets["subsetSelectors"].as_array().into_iter().flatten().find(|s| {
            s["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect::<BTreeSet<_>>() == keys
        });
        match selector {
            None => fallback(cluster_fallback),
            Some(sel) => {
                let hosts = pick(&wanted);
                if hosts.is_empty() {
                    match sel["fallbackPolicy"].as_str().unwrap_or("NOT_DEFINED") {
                        "NOT_DEFINED" => fallback(cluster_fallback),
                        p => fallback(p),
                    }
                } else {
                    hosts
                }
            }
        }
    };
    if set.is_empty() { Expect::Refused } else { Expect::Backends(set) }
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = vec![];
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | ALPHABET.iter().position(|&a| a == c).expect("base64") as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Rewrites endpoint addresses to backends (started on demand) and listeners to
/// 127.0.0.1:0. Returns the backends by original address.
async fn rewrite(v: &mut Value, backends: &mut BTreeMap<String, Backend>) {
    match v {
        Value::Object(m) => {
            if m.contains_key("endpoint") && m["endpoint"].get("address").is_some() {
                let key = addr_key(&Value::Object(m.clone()));
                if !backends.contains_key(&key) {
                    backends.insert(key.clone(), Backend::start(&key).await);
                }
                let a = backends[&key].addr;
                m["endpoint"]["address"]["socketAddress"] =
                    json!({"address": a.ip().to_string(), "portValue": a.port()});
                return;
            }
            if m.get("@type").and_then(Value::as_str).is_some_and(|t| t.ends_with("listener.v3.Listener")) {
                m.insert("address".into(), json!({"socketAddress": {"address": "127.0.0.1", "portValue": 0}}));
            }
            for (_, child) in m.iter_mut() {
                Box::pin(rewrite(child, backends)).await;
            }
        }
        Value::Array(a) => {
            for child in a {
                Box::pin(rewrite(child, backends)).await;
            }
        }
        _ => {}
    }
}

async fn connect_with(addr: std::net::SocketAddr, sni: &str) -> (Option<String>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&hello::client_hello(Some(sni), &[])).await.unwrap();
    let mut got = vec![];
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(e2e::WAIT, s.read(&mut buf)).await.expect("read timed out") {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if let Some(i) = got.iter().position(|&b| b == b'\n') {
                    return (Some(String::from_utf8_lossy(&got[..i]).into_owned()), got);
                }
            }
        }
    }
    (None, got)
}

async fn check_golden(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap();
    let original: Value = serde_saphyr::from_str(&text).unwrap();
    let originals: Vec<Value> =
        original["resources"].as_array().unwrap().iter().map(|i| i["resource"].clone()).collect();
    let mut doc = original.clone();
    let mut backends = BTreeMap::new();
    rewrite(&mut doc, &mut backends).await;
    let file = temp_dir("golden").join("golden.json");
    std::fs::write(&file, serde_json::to_vec(&doc).unwrap()).unwrap();
    let dp = Dp::start(&file, &["--proxy-type", "ingress"]);
    let mut checked = 0;
    for l in originals.iter().filter(|r| r["@type"].as_str().unwrap().ends_with("listener.v3.Listener")) {
        let addr = dp.listener(l["name"].as_str().unwrap());
        for chain in l["filterChains"].as_array().unwrap() {
            let names: Vec<&str> = chain["filterChainMatch"]["serverNames"]
                .as_array()
                .map(|a| a.iter().map(|n| n.as_str().unwrap()).collect())
                .unwrap_or_default();
            let names = if names.is_empty() { vec!["any.example"] } else { names };
            let want = expected(&originals, chain);
            for sni in names {
                match &want {
                    Expect::Backends(set) => {
                        let mut reached = BTreeSet::new();
                        for _ in 0..set.len() * 2 {
                            let (who, _) = connect_with(addr, sni).await;
                            let who = who.unwrap_or_else(|| panic!("{}: {sni} was refused", path.display()));
                            assert!(set.contains(&who), "{}: {sni} reached {who}, want one of {set:?}", path.display());
                            reached.insert(who);
                        }
                        assert_eq!(&reached, set, "{}: {sni} must reach every endpoint", path.display());
                    }
                    Expect::Bytes(bytes) => {
                        let (_, got) = connect_with(addr, sni).await;
                        assert_eq!(&got, bytes, "{}: direct response for {sni}", path.display());
                    }
                    Expect::Refused => {
                        let (who, got) = connect_with(addr, sni).await;
                        assert!(who.is_none() && got.is_empty(), "{}: {sni} must be refused", path.display());
                    }
                }
                checked += 1;
            }
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kuma_ingress_golden_loads_and_routes() {
    let files = golden_files();
    assert!(files.len() >= 15, "expected the 12 ingress and 3 zone-proxy ingress goldens, found {files:?}");
    let mut names = 0;
    for f in &files {
        names += check_golden(f).await;
    }
    assert!(names >= 30, "only {names} server names were checked");
}
