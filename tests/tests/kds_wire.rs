//! KDS as another implementation would speak it: a zone written here by hand with the
//! generated `kuma-proto` client (not `cp`'s own zone code) against the real global `cp`,
//! checking the wire contract: what global refuses it NACKs with the reason and applies
//! the rest, a zone cannot speak for another zone, and global's policies reach a zone
//! renamed and labelled as Kuma does.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::{Cp, wait_until};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::Any;
use kuma_proto::kuma::mesh::v1alpha1::dataplane::Networking;
use kuma_proto::kuma::mesh::v1alpha1::dataplane::networking::Inbound;
use kuma_proto::kuma::mesh::v1alpha1::kds_sync_service_client::KdsSyncServiceClient;
use kuma_proto::kuma::mesh::v1alpha1::kuma_resource::Meta;
use kuma_proto::kuma::mesh::v1alpha1::{Dataplane, KumaResource};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const ZONE: &str = "zone-x";

async fn channel(global: &Cp) -> Channel {
    let ca = std::fs::read(&global.ca_file).unwrap();
    let url = format!("https://localhost:{}", global.kds.unwrap().port());
    let trust = xds_client::Trust { ca_pem: Some(ca), ..Default::default() };
    xds_client::endpoint(&url, &trust).unwrap().connect().await.expect("connect to global's KDS")
}

fn with_zone<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert("client-id", ZONE.parse().unwrap());
    r.metadata_mut().append("features", "hash-suffix".parse().unwrap());
    r
}

fn dataplane(name: &str, address: &str, labels: &[(&str, &str)], inbound_tags: &[(&str, &str)]) -> Resource {
    let tags: BTreeMap<String, String> = inbound_tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let spec = Dataplane {
        networking: Some(Networking {
            address: address.into(),
            inbound: vec![Inbound { port: 8080, tags, ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let kr = KumaResource {
        meta: Some(Meta {
            name: name.into(),
            mesh: "default".into(),
            version: String::new(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }),
        spec: Some(Any {
            type_url: "type.googleapis.com/kuma.mesh.v1alpha1.Dataplane".into(),
            value: spec.encode_to_vec(),
        }),
        status: None,
    };
    Resource {
        name: format!("{name}.default"),
        version: "1".into(),
        resource: Some(Any {
            type_url: "type.googleapis.com/kuma.mesh.v1alpha1.KumaResource".into(),
            value: kr.encode_to_vec(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_nacks_what_it_refuses_applies_the_rest_and_pins_the_zone() {
    let global = Cp::global();
    let mut client = KdsSyncServiceClient::new(channel(&global).await);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryResponse>(8);
    let mut requests = client.zone_to_global_sync(with_zone(ReceiverStream::new(rx))).await.unwrap().into_inner();

    // Global subscribes to what zones provide, one wildcard request per type, naming the zone.
    let mut subscribed = Vec::new();
    while !subscribed.contains(&"Dataplane".to_string()) {
        let r = tokio::time::timeout(Duration::from_secs(20), requests.message()).await.unwrap().unwrap().unwrap();
        assert_eq!(r.node.as_ref().map(|n| n.id.as_str()), Some(ZONE));
        assert_eq!(r.resource_names_subscribe, vec!["*"]);
        subscribed.push(r.type_url);
    }

    let zone_labels = [("kuma.io/origin", "zone"), ("kuma.io/zone", ZONE)];
    let svc = [("kuma.io/service", "web")];
    let resp = DeltaDiscoveryResponse {
        type_url: "Dataplane".into(),
        nonce: "7".into(),
        resources: vec![
            dataplane("web-abc", "10.0.0.1", &zone_labels, &svc),
            // No address: refused by validation.
            dataplane("broken", "", &zone_labels, &svc),
            // Claims to be zone-9's, in its labels and in its inbound tags.
            dataplane(
                "spoof",
                "10.0.0.2",
                &[("kuma.io/origin", "zone"), ("kuma.io/zone", "zone-9")],
                &[("kuma.io/service", "web"), ("kuma.io/zone", "zone-9")],
            ),
        ],
        ..Default::default()
    };
    tx.send(resp).await.unwrap();
    let reply: DeltaDiscoveryRequest = loop {
        let r = tokio::time::timeout(Duration::from_secs(20), requests.message()).await.unwrap().unwrap().unwrap();
        if r.response_nonce == "7" {
            break r;
        }
    };
    let nack = reply.error_detail.expect("a NACK").message;
    assert!(nack.contains("broken.default") && nack.contains("networking.address"), "{nack}");
    assert!(!nack.contains("web-abc") && !nack.contains("spoof"), "{nack}");

    // The rest of the batch is applied, under the stream's zone whatever the resource says.
    let dps = wait_until("the zone's Dataplanes on global", || {
        let v = global.get_json("/meshes/default/dataplanes");
        (v["total"] == 2).then_some(v)
    });
    let items = dps["items"].as_array().unwrap();
    let names: Vec<&str> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["spoof", "web-abc"]);
    let spoof = &items[0];
    assert_eq!(spoof["labels"]["kuma.io/zone"], ZONE);
    assert_eq!(spoof["networking"]["inbound"][0]["tags"]["kuma.io/zone"], ZONE);
    global.logs.wait_for(&["a zone named another zone", "zone-9"]);
    // The zone now exists on global (created by its first stream), and owns what it sent.
    assert_eq!(global.names("/zones"), vec![ZONE]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_sends_its_policies_to_a_zone_renamed_and_labelled() {
    let global = Cp::global();
    global.apply("type: TrafficPermission\nmesh: default\nname: tr-update\nsources:\n- match:\n    kuma.io/service: '*'\ndestinations:\n- match:\n    kuma.io/service: '*'\n");
    let mut client = KdsSyncServiceClient::new(channel(&global).await);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(8);
    let node = Node { id: ZONE.into(), ..Default::default() };
    for t in ["Mesh", "TrafficPermission"] {
        let r = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: t.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        };
        tx.send(r).await.unwrap();
    }
    let mut responses = client.global_to_zone_sync(with_zone(ReceiverStream::new(rx))).await.unwrap().into_inner();
    let mut got = BTreeMap::new();
    while got.len() < 2 {
        let r = tokio::time::timeout(Duration::from_secs(20), responses.message()).await.unwrap().unwrap().unwrap();
        got.insert(r.type_url.clone(), r);
    }
    let tp = &got["TrafficPermission"].resources[0];
    // Kuma's HashedName("default", "tr-update"), so a Kuma zone would find the same name.
    assert_eq!(tp.name, "tr-update-7c4bxx6842b298dv.default");
    let any = tp.resource.as_ref().unwrap();
    assert_eq!(any.type_url, "type.googleapis.com/kuma.mesh.v1alpha1.KumaResource");
    let kr = KumaResource::decode(any.value.as_slice()).unwrap();
    let meta = kr.meta.unwrap();
    assert_eq!(meta.labels.get("kuma.io/origin").map(String::as_str), Some("global"));
    assert_eq!(meta.labels.get("kuma.io/display-name").map(String::as_str), Some("tr-update"));
    assert_eq!(meta.version, "");
    assert_eq!(kr.spec.unwrap().type_url, "type.googleapis.com/kuma.mesh.v1alpha1.TrafficPermission");
    // The Mesh keeps its name (Kuma's SkipKDSHash).
    assert_eq!(got["Mesh"].resources[0].name, "default.");
}
