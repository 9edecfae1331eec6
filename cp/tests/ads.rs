//! ADS (SotW and Delta) for a zone ingress: authentication, generation, updates.

mod common;

use std::time::Duration;

use common::*;
use cp::model::ResourceType;
use cp::xds::generate::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, unpack};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const STEP: Duration = Duration::from_secs(5);

fn endpoints(cla: &ClusterLoadAssignment) -> Vec<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => match ep.address.as_ref()?.address.as_ref()? {
                address::Address::SocketAddress(sa) => match sa.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => Some(format!("{}:{p}", sa.address)),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn server_names(l: &Listener) -> Vec<String> {
    l.filter_chains.iter().filter_map(|c| c.filter_chain_match.as_ref()).flat_map(|m| m.server_names.clone()).collect()
}

struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Sotw {
    async fn open(cp: &TestCp, token: &str, name: &str) -> Result<Sotw, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let node = ingress_node(name, &ingress_json(name), false);
        tx.send(DiscoveryRequest { node: Some(node), type_url: CLUSTER_TYPE.into(), ..Default::default() })
            .await
            .unwrap();
        let mut client = cp.ads().await;
        let rx = client.stream_aggregated_resources(authorized(ReceiverStream::new(rx), token)).await?.into_inner();
        Ok(Sotw { tx, rx })
    }

    async fn next(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(STEP, self.rx.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => panic!("stream closed"),
            Ok(Err(s)) => Err(s),
            Err(_) => panic!("no response within {STEP:?}"),
        }
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.tx
            .send(DiscoveryRequest {
                version_info: r.version_info.clone(),
                response_nonce: r.nonce.clone(),
                type_url: r.type_url.clone(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn request(&self, type_url: &str, names: &[&str]) {
        self.tx
            .send(DiscoveryRequest {
                type_url: type_url.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

async fn setup_mesh_and_backend(cp: &TestCp) {
    assert_eq!(cp.put("/meshes/default", MESH_YAML).await.0, 201);
    let (s, e) =
        cp.put("/meshes/default/dataplanes/backend-1", &dataplane_json("backend-1", "127.0.0.1", 18080, "v1")).await;
    assert_eq!(s, 201, "{e}");
}

#[tokio::test]
async fn sotw_ingress_gets_listener_and_endpoints_and_follows_changes() {
    let cp = TestCp::start("sotw").await;
    setup_mesh_and_backend(&cp).await;
    let token = cp.zone_token("zone-1", &["ingress", "egress"]).await;
    let mut s = Sotw::open(&cp, &token, "ingress-1").await.expect("stream opens");

    let r = s.next().await.expect("CDS");
    assert_eq!(r.type_url, CLUSTER_TYPE);
    let c: Cluster = unpack(&r.resources[0]).unwrap();
    assert_eq!(c.name, "default:backend");
    s.ack(&r, &[]).await;

    s.request(LISTENER_TYPE, &[]).await;
    let r = s.next().await.expect("LDS");
    assert_eq!(r.type_url, LISTENER_TYPE);
    let l: Listener = unpack(&r.resources[0]).unwrap();
    assert_eq!(l.name, "inbound:127.0.0.1:10001");
    let names = server_names(&l);
    assert!(names.contains(&"backend{mesh=default}".to_string()), "{names:?}");
    assert!(names.contains(&"backend{mesh=default,version=v1}".to_string()), "{names:?}");
    s.ack(&r, &[]).await;

    s.request(ENDPOINT_TYPE, &["default:backend"]).await;
    let r = s.next().await.expect("EDS");
    assert_eq!(r.type_url, ENDPOINT_TYPE);
    let cla: ClusterLoadAssignment = unpack(&r.resources[0]).unwrap();
    assert_eq!(cla.cluster_name, "default:backend");
    assert_eq!(endpoints(&cla), vec!["127.0.0.1:18080"]);
    s.ack(&r, &["default:backend"]).await;

    // The ingress registered itself, and its availableServices reflect the Dataplane.
    let ok = cp
        .wait_store(STEP, || async {
            let (_, zi) = cp.get("/zoneingresses/ingress-1").await;
            zi["availableServices"][0]["tags"]["kuma.io/service"] == "backend"
                && zi["availableServices"][0]["instances"] == 1
        })
        .await;
    assert!(ok, "availableServices not computed: {}", cp.get("/zoneingresses/ingress-1").await.1);
    assert_eq!(cp.get("/zoneingresses/ingress-1").await.1["zone"], "zone-1");

    // A second instance appears in EDS.
    cp.put("/meshes/default/dataplanes/backend-2", &dataplane_json("backend-2", "127.0.0.2", 18080, "v2")).await;
    loop {
        let r = s.next().await.unwrap();
        s.ack(&r, if r.type_url == ENDPOINT_TYPE { &["default:backend"] } else { &[] }).await;
        if r.type_url == ENDPOINT_TYPE {
            let cla: ClusterLoadAssignment = unpack(&r.resources[0]).unwrap();
            if endpoints(&cla).len() == 2 {
                break;
            }
        }
    }

    // Deleting Dataplanes removes their endpoints within a second.
    cp.delete("/meshes/default/dataplanes/backend-2").await;
    let started = tokio::time::Instant::now();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(1).saturating_sub(started.elapsed()), s.rx.message())
            .await
            .expect("endpoint removal within 1s")
            .unwrap()
            .unwrap();
        s.ack(&r, if r.type_url == ENDPOINT_TYPE { &["default:backend"] } else { &[] }).await;
        if r.type_url == ENDPOINT_TYPE {
            let cla: ClusterLoadAssignment = unpack(&r.resources[0]).unwrap();
            if endpoints(&cla) == vec!["127.0.0.1:18080"] {
                break;
            }
        }
    }
    // Removing the last one turns the listener into the direct_response chain.
    cp.delete("/meshes/default/dataplanes/backend-1").await;
    loop {
        let r = s.next().await.unwrap();
        s.ack(&r, &[]).await;
        if r.type_url == LISTENER_TYPE {
            let l: Listener = unpack(&r.resources[0]).unwrap();
            if l.filter_chains[0].filters[0].name == "envoy.filters.network.direct_response" {
                assert!(server_names(&l).is_empty());
                break;
            }
        }
    }
}

#[tokio::test]
async fn sotw_unchanged_config_is_not_resent() {
    let cp = TestCp::start("sotw-nopush").await;
    setup_mesh_and_backend(&cp).await;
    let token = cp.zone_token("zone-1", &["ingress"]).await;
    let mut s = Sotw::open(&cp, &token, "ingress-1").await.unwrap();
    let r = s.next().await.unwrap();
    s.ack(&r, &[]).await;
    // An unrelated change (a Zone resource) must not produce a CDS push; a relevant one must,
    // and it must be the next message.
    cp.put("/zones/zone-9", r#"{"type":"Zone","name":"zone-9"}"#).await;
    cp.put("/meshes/default/dataplanes/web", &dataplane_json("web", "127.0.0.3", 8080, "v1").replace("backend", "web"))
        .await;
    let r = s.next().await.unwrap();
    assert_eq!(r.type_url, CLUSTER_TYPE);
    let names: Vec<String> = r.resources.iter().map(|a| unpack::<Cluster>(a).unwrap().name).collect();
    assert_eq!(names, vec!["default:backend", "default:web"]);
}

#[tokio::test]
async fn wrong_tokens_are_unauthenticated_with_reason() {
    let cp = TestCp::start("auth").await;
    setup_mesh_and_backend(&cp).await;
    let cases = [
        (cp.zone_token("zone-1", &["egress"]).await, "zone token scope does not include ingress"),
        (cp.zone_token("zone-2", &["ingress"]).await, "token is for zone zone-2, this is zone-1"),
        ("not-a-jwt".to_string(), "token is not a valid JWT"),
        (String::new(), "token is missing"),
    ];
    for (token, reason) in cases {
        let err = match Sotw::open(&cp, &token, "ingress-x").await {
            Err(s) => s,
            Ok(mut s) => s.next().await.expect_err("refused"),
        };
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(err.message().contains(reason), "{:?} should contain {reason:?}", err.message());
    }
    // A good token whose signature was swapped.
    let good = cp.zone_token("zone-1", &["ingress"]).await;
    let other = cp.zone_token("zone-1", &["ingress", "egress"]).await;
    let mut parts: Vec<&str> = good.split('.').collect();
    parts[2] = other.split('.').nth(2).unwrap();
    let err = match Sotw::open(&cp, &parts.join("."), "ingress-x").await {
        Err(s) => s,
        Ok(mut s) => s.next().await.expect_err("refused"),
    };
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("token signature invalid"), "{}", err.message());
    // Refused proxies are not registered.
    assert!(cp.running.cp.store.get(ResourceType::ZoneIngress, "", "ingress-x").await.unwrap().is_none());
}

struct DeltaClient {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaClient {
    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(STEP, self.rx.message()).await.expect("delta response in time").unwrap().unwrap()
    }
    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn delta_ingress_gets_the_same_and_removals() {
    let cp = TestCp::start("delta").await;
    setup_mesh_and_backend(&cp).await;
    let token = cp.zone_token("zone-1", &["ingress"]).await;
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(ingress_node("ingress-d", &ingress_json("ingress-d"), true)),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut client = cp.ads().await;
    let rx = client.delta_aggregated_resources(authorized(ReceiverStream::new(rx), &token)).await.unwrap().into_inner();
    let mut d = DeltaClient { tx, rx };

    let r = d.next().await;
    assert_eq!(r.type_url, CLUSTER_TYPE);
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "default:backend");
    assert!(!r.resources[0].version.is_empty());
    d.ack(&r).await;

    d.tx.send(DeltaDiscoveryRequest { type_url: LISTENER_TYPE.into(), ..Default::default() }).await.unwrap();
    let r = d.next().await;
    assert_eq!(r.type_url, LISTENER_TYPE);
    let l: Listener = unpack(r.resources[0].resource.as_ref().unwrap()).unwrap();
    assert!(server_names(&l).contains(&"backend{mesh=default}".to_string()));
    d.ack(&r).await;

    d.tx.send(DeltaDiscoveryRequest {
        type_url: ENDPOINT_TYPE.into(),
        resource_names_subscribe: vec!["default:backend".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = d.next().await;
    assert_eq!(r.type_url, ENDPOINT_TYPE);
    let cla: ClusterLoadAssignment = unpack(r.resources[0].resource.as_ref().unwrap()).unwrap();
    assert_eq!(endpoints(&cla), vec!["127.0.0.1:18080"]);
    d.ack(&r).await;

    // Only changed resources are sent: a new service adds a cluster without resending the old one.
    cp.put("/meshes/default/dataplanes/web", &dataplane_json("web", "127.0.0.3", 8080, "v1").replace("backend", "web"))
        .await;
    let r = d.next().await;
    assert_eq!(r.type_url, CLUSTER_TYPE);
    let names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, vec!["default:web"]);
    d.ack(&r).await;

    // Deleting the backend removes its cluster (and the listener changes).
    cp.delete("/meshes/default/dataplanes/backend-1").await;
    let started = tokio::time::Instant::now();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(1).saturating_sub(started.elapsed()), d.rx.message())
            .await
            .expect("removal within 1s")
            .unwrap()
            .unwrap();
        d.ack(&r).await;
        if r.type_url == CLUSTER_TYPE {
            assert_eq!(r.removed_resources, vec!["default:backend".to_string()]);
            break;
        }
    }
}

#[tokio::test]
async fn stream_registered_ingress_is_removed_after_the_deregistration_delay() {
    let cp = TestCp::start_with("dereg", |c| c.deregistration_delay = Duration::from_millis(200)).await;
    let token = cp.zone_token("zone-1", &["ingress"]).await;
    let mut s = Sotw::open(&cp, &token, "ingress-gone").await.unwrap();
    let r = s.next().await.unwrap();
    assert_eq!(r.type_url, CLUSTER_TYPE);
    assert!(cp.running.cp.store.get(ResourceType::ZoneIngress, "", "ingress-gone").await.unwrap().is_some());
    drop(s);
    let gone = cp
        .wait_store(STEP, || async {
            cp.running.cp.store.get(ResourceType::ZoneIngress, "", "ingress-gone").await.unwrap().is_none()
        })
        .await;
    assert!(gone, "ZoneIngress still registered after its stream closed");
}
