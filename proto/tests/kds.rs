//! KumaResource on the wire, and the generated tonic clients and servers of both KDS
//! services, exercised over a real (loopback) gRPC connection.

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use envoy_types::pb::google::protobuf::{Any, Duration};
use kuma_proto::kuma::mesh::v1alpha1::{
    self as mesh, KumaResource, ZoneHealthCheckRequest, ZoneHealthCheckResponse, global_kds_service_client,
    global_kds_service_server, kds_sync_service_client, kds_sync_service_server, kuma_resource,
};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

const KUMA_RESOURCE_URL: &str = "type.googleapis.com/kuma.mesh.v1alpha1.KumaResource";

fn mesh_resource() -> KumaResource {
    let spec = mesh::Mesh {
        mtls: Some(mesh::mesh::Mtls { enabled_backend: "ca-1".into(), ..Default::default() }),
        ..Default::default()
    };
    KumaResource {
        meta: Some(kuma_resource::Meta {
            name: "default".into(),
            mesh: String::new(),
            version: String::new(),
            labels: [("kuma.io/origin".to_string(), "global".to_string()), ("team".to_string(), "a".to_string())]
                .into(),
        }),
        spec: Some(Any { type_url: "type.googleapis.com/kuma.mesh.v1alpha1.Mesh".into(), value: spec.encode_to_vec() }),
        status: None,
    }
}

#[test]
fn kuma_resource_round_trips_with_labels_and_any() {
    let resource = mesh_resource();
    let bytes = resource.encode_to_vec();
    let back = KumaResource::decode(bytes.as_slice()).unwrap();
    assert_eq!(back, resource);
    let meta = back.meta.unwrap();
    assert_eq!(meta.name, "default");
    assert_eq!(meta.labels["kuma.io/origin"], "global");
    assert_eq!(meta.labels["team"], "a");
    let spec = back.spec.unwrap();
    assert_eq!(spec.type_url, "type.googleapis.com/kuma.mesh.v1alpha1.Mesh");
    assert_eq!(mesh::Mesh::decode(spec.value.as_slice()).unwrap().mtls.unwrap().enabled_backend, "ca-1");
}

#[test]
fn kuma_resource_labels_encode_sorted_by_key() {
    // Kuma hashes Go's deterministic encoding (map entries sorted by key) into the delta
    // resource version; BTreeMap gives prost the same order whatever the insertion order.
    let mut a = mesh_resource();
    let mut b = mesh_resource();
    a.meta.as_mut().unwrap().labels =
        [("z", "1"), ("a", "2"), ("m", "3")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    b.meta.as_mut().unwrap().labels =
        [("m", "3"), ("z", "1"), ("a", "2")].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let bytes = a.encode_to_vec();
    assert_eq!(bytes, b.encode_to_vec());
    // Each entry is a LabelsEntry{key = 1, value = 2}: 0a 01 <key> 12 01 <value>.
    let at = |k: u8, v: u8| bytes.windows(6).position(|w| w == [0x0a, 1, k, 0x12, 1, v]).unwrap();
    assert!(at(b'a', b'2') < at(b'm', b'3') && at(b'm', b'3') < at(b'z', b'1'));
}

struct Global;

#[tonic::async_trait]
impl global_kds_service_server::GlobalKdsService for Global {
    type StreamXDSConfigsStream = BoxStream<mesh::XdsConfigRequest>;
    type StreamStatsStream = BoxStream<mesh::StatsRequest>;
    type StreamClustersStream = BoxStream<mesh::ClustersRequest>;

    async fn stream_xds_configs(
        &self,
        _: Request<Streaming<mesh::XdsConfigResponse>>,
    ) -> Result<Response<Self::StreamXDSConfigsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn stream_stats(
        &self,
        _: Request<Streaming<mesh::StatsResponse>>,
    ) -> Result<Response<Self::StreamStatsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn stream_clusters(
        &self,
        _: Request<Streaming<mesh::ClustersResponse>>,
    ) -> Result<Response<Self::StreamClustersStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn health_check(
        &self,
        _: Request<ZoneHealthCheckRequest>,
    ) -> Result<Response<ZoneHealthCheckResponse>, Status> {
        Ok(Response::new(ZoneHealthCheckResponse { interval: Some(Duration { seconds: 5, nanos: 0 }) }))
    }
}

#[tonic::async_trait]
impl kds_sync_service_server::KdsSyncService for Global {
    type GlobalToZoneSyncStream = BoxStream<DeltaDiscoveryResponse>;
    type ZoneToGlobalSyncStream = BoxStream<DeltaDiscoveryRequest>;

    /// Answers each subscription with one Mesh wrapped as Kuma does.
    async fn global_to_zone_sync(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::GlobalToZoneSyncStream>, Status> {
        let responses = request.into_inner().map(|req| {
            let req = req?;
            Ok(DeltaDiscoveryResponse {
                type_url: req.type_url,
                nonce: "1".into(),
                resources: vec![Resource {
                    name: "default.".into(),
                    resource: Some(Any { type_url: KUMA_RESOURCE_URL.into(), value: mesh_resource().encode_to_vec() }),
                    ..Default::default()
                }],
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn zone_to_global_sync(
        &self,
        _: Request<Streaming<DeltaDiscoveryResponse>>,
    ) -> Result<Response<Self::ZoneToGlobalSyncStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

#[tokio::test]
async fn generated_clients_and_servers_talk_grpc() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(global_kds_service_server::GlobalKdsServiceServer::new(Global))
        .add_service(kds_sync_service_server::KdsSyncServiceServer::new(Global))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();

    let mut global = global_kds_service_client::GlobalKdsServiceClient::new(channel.clone());
    let health = global.health_check(ZoneHealthCheckRequest {}).await.unwrap().into_inner();
    assert_eq!(health.interval.unwrap().seconds, 5);
    let err = global.stream_stats(tokio_stream::empty()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    let mut sync = kds_sync_service_client::KdsSyncServiceClient::new(channel);
    let first = DeltaDiscoveryRequest {
        type_url: "Mesh".into(),
        resource_names_subscribe: vec!["*".into()],
        ..Default::default()
    };
    let mut responses = sync.global_to_zone_sync(tokio_stream::iter([first])).await.unwrap().into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert_eq!(response.type_url, "Mesh");
    let any = response.resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, KUMA_RESOURCE_URL);
    assert_eq!(KumaResource::decode(any.value.as_slice()).unwrap(), mesh_resource());
    assert!(responses.next().await.is_none());

    server.abort();
}
