//! End-to-end tests of the ADS client against the fake server of `xds_client::testing`, over
//! loopback with ephemeral ports. Waiting is on channels (bounded by timeouts), never on sleeps.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use envoy_types::util::pack_any;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use xds_client::testing::{FakeAds, Sent, WAIT};
use xds_client::type_urls::{CLUSTER, LISTENER, SECRET};
use xds_client::{Backoff, Config, ConfigError, Handler, State, Status, Variant};

fn node() -> Node {
    let mut fields = HashMap::new();
    fields.insert("dataplane.proxyType".to_string(), Value { kind: Some(Kind::StringValue("dataplane".into())) });
    Node { id: "default.dp-1".into(), metadata: Some(Struct { fields }), ..Default::default() }
}

fn cluster(name: &str) -> (String, Any) {
    (name.to_string(), pack_any(Cluster { name: name.into(), ..Default::default() }))
}

fn listener(name: &str) -> (String, Any) {
    (name.to_string(), pack_any(Listener { name: name.into(), ..Default::default() }))
}

fn config(endpoint: String, variant: Variant, types: &[&str]) -> Config {
    let mut c = Config::new(endpoint, node(), variant, types.iter().map(|t| t.to_string()).collect());
    c.backoff = Backoff { initial: Duration::from_millis(5), max: Duration::from_millis(50) };
    c
}

/// What the handler was offered.
#[derive(Debug)]
struct Offer {
    state: State,
    changed: String,
    accepted: bool,
}

impl Offer {
    fn names(&self, type_url: &str) -> Vec<&str> {
        self.state.resources.get(type_url).map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default()
    }
    fn versions(&self, type_url: &str) -> Vec<(&str, &str)> {
        self.state.resources[type_url].iter().map(|(n, r)| (n.as_str(), r.version.as_str())).collect()
    }
}

/// Refuses states with a resource named `bad*`; reports every offer.
struct TestHandler(mpsc::UnboundedSender<Offer>);

impl Handler for TestHandler {
    fn apply(&mut self, state: &State, changed_type: &str) -> Result<(), String> {
        let bad = state.resources.values().flat_map(|m| m.keys()).find(|n| n.starts_with("bad")).cloned();
        let _ = self.0.send(Offer { state: state.clone(), changed: changed_type.into(), accepted: bad.is_none() });
        match bad {
            Some(name) => Err(format!("resource {name} is unacceptable")),
            None => Ok(()),
        }
    }
}

/// A running client; aborted when dropped.
struct Client {
    task: JoinHandle<Result<std::convert::Infallible, ConfigError>>,
    status: watch::Receiver<Status>,
    offers: mpsc::UnboundedReceiver<Offer>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    fn start(config: Config) -> Self {
        let (tx, offers) = mpsc::unbounded_channel();
        let (events, status) = watch::channel(Status::default());
        let task = tokio::spawn(xds_client::run(config, TestHandler(tx), events));
        Self { task, status, offers }
    }

    async fn offer(&mut self) -> Offer {
        tokio::time::timeout(WAIT, self.offers.recv()).await.expect("no handler call in time").expect("client alive")
    }

    async fn wait_status(&mut self, what: &str, f: impl FnMut(&Status) -> bool) -> Status {
        let result = match tokio::time::timeout(WAIT, self.status.wait_for(f)).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        result.unwrap_or_else(|| panic!("status never became {what}; last: {:?}", *self.status.borrow()))
    }
}

fn sent_nonce(fake: &FakeAds, stream: u64) -> String {
    fake.last_sent(stream).expect("a response was sent").nonce().to_string()
}

#[tokio::test]
async fn sotw_subscribes_with_node_and_token_then_acks() {
    let fake = FakeAds::start().await;
    fake.set_resources(CLUSTER, "v1", vec![cluster("a"), cluster("b")]);
    let mut cfg = config(fake.endpoint(), Variant::Sotw, &[CLUSTER, LISTENER]);
    cfg.token = Some("header.payload.sig\n".into());
    let mut client = Client::start(cfg);

    let first = fake.next_request().await;
    let r = first.sotw();
    assert_eq!(r.type_url, CLUSTER);
    assert_eq!((r.version_info.as_str(), r.response_nonce.as_str()), ("", ""));
    assert!(r.resource_names.is_empty(), "wildcard");
    assert_eq!(r.node.as_ref(), Some(&node()), "node with metadata on the first request");
    assert_eq!(first.authorization.as_deref(), Some("header.payload.sig"), "raw JWT, trimmed, no Bearer");

    let second = fake.next_request().await;
    assert_eq!(second.stream, first.stream);
    assert_eq!(second.sotw().type_url, LISTENER);
    assert!(second.sotw().node.is_none(), "node only on the first message of the stream");
    assert_eq!(second.authorization.as_deref(), Some("header.payload.sig"));

    let offer = client.offer().await;
    assert_eq!((offer.changed.as_str(), offer.names(CLUSTER)), (CLUSTER, vec!["a", "b"]));
    let ack = fake.next_request().await;
    assert_eq!(ack.sotw().type_url, CLUSTER);
    assert_eq!(ack.sotw().version_info, "v1");
    assert_eq!(ack.sotw().response_nonce, sent_nonce(&fake, first.stream));
    assert!(ack.sotw().error_detail.is_none() && ack.sotw().node.is_none());
    let status = client.wait_status("Cluster acked", |s| s.acked_types.contains(CLUSTER)).await;
    assert!(status.connected && status.last_error.is_none() && status.last_nack.is_none());

    // A new version replaces the whole set.
    fake.set_resources(CLUSTER, "v2", vec![cluster("a")]);
    assert_eq!(client.offer().await.names(CLUSTER), ["a"]);
    let ack = fake.next_request().await;
    assert_eq!(ack.sotw().version_info, "v2");
    assert_eq!(ack.sotw().response_nonce, sent_nonce(&fake, first.stream));

    fake.set_resources(LISTENER, "l1", vec![listener("in")]);
    let offer = client.offer().await;
    assert_eq!(
        (offer.changed.as_str(), offer.names(LISTENER), offer.names(CLUSTER)),
        (LISTENER, vec!["in"], vec!["a"])
    );
    assert_eq!(fake.next_request().await.sotw().version_info, "l1");
    let status = client.wait_status("both acked", |s| s.acked_types.len() == 2).await;
    assert_eq!(status.acked_types.iter().map(String::as_str).collect::<Vec<_>>(), [CLUSTER, LISTENER]);
}

#[tokio::test]
async fn sotw_nack_keeps_the_accepted_version_and_state() {
    let fake = FakeAds::start().await;
    fake.set_resources(CLUSTER, "v1", vec![cluster("a")]);
    let mut client = Client::start(config(fake.endpoint(), Variant::Sotw, &[CLUSTER]));
    let stream = fake.next_request().await.stream;
    assert!(client.offer().await.accepted);
    assert_eq!(fake.next_request().await.sotw().version_info, "v1");

    fake.set_resources(CLUSTER, "v2", vec![cluster("a"), cluster("bad-1")]);
    assert!(!client.offer().await.accepted);
    let nack = fake.next_request().await;
    let r = nack.sotw();
    assert_eq!(r.version_info, "v1", "a NACK repeats the last accepted version");
    assert_eq!(r.response_nonce, sent_nonce(&fake, stream));
    let detail = r.error_detail.as_ref().expect("error_detail");
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    assert_eq!(detail.message, "resource bad-1 is unacceptable");
    let status = client.wait_status("nacked", |s| s.last_nack.is_some()).await;
    assert_eq!(status.last_nack.as_deref(), Some(format!("{CLUSTER}: resource bad-1 is unacceptable").as_str()));

    // The refused set was not kept: the next offer starts from v1's state.
    fake.set_resources(CLUSTER, "v3", vec![cluster("a"), cluster("c")]);
    let offer = client.offer().await;
    assert_eq!(offer.versions(CLUSTER), [("a", "v3"), ("c", "v3")]);
    assert_eq!(fake.next_request().await.sotw().version_info, "v3");
    client.wait_status("nack cleared", |s| s.last_nack.is_none()).await;

    // Reasons the client finds itself; the handler is not asked.
    fake.send_sotw(DiscoveryResponse {
        version_info: "v4".into(),
        type_url: CLUSTER.into(),
        resources: vec![listener("x").1],
        ..Default::default()
    });
    let nack = fake.next_request().await;
    assert_eq!(nack.sotw().version_info, "v3");
    let message = &nack.sotw().error_detail.as_ref().unwrap().message;
    assert!(message.contains("does not match the response type"), "{message}");

    fake.send_sotw(DiscoveryResponse { version_info: "s1".into(), type_url: SECRET.into(), ..Default::default() });
    let nack = fake.next_request().await;
    assert_eq!((nack.sotw().type_url.as_str(), nack.sotw().version_info.as_str()), (SECRET, ""));
    assert!(nack.sotw().error_detail.as_ref().unwrap().message.contains("not subscribed"));
    assert!(client.offers.try_recv().is_err(), "handler not called for client-side NACKs");
}

#[tokio::test]
async fn delta_applies_upserts_and_removals_and_nacks() {
    let fake = FakeAds::start().await;
    fake.set_resources(CLUSTER, "1", vec![cluster("a"), cluster("b")]);
    let mut client = Client::start(config(fake.endpoint(), Variant::Delta, &[CLUSTER, LISTENER]));

    let first = fake.next_request().await;
    let r = first.delta();
    assert_eq!(r.type_url, CLUSTER);
    assert!(r.resource_names_subscribe.is_empty() && r.resource_names_unsubscribe.is_empty(), "legacy wildcard");
    assert!(r.initial_resource_versions.is_empty() && r.response_nonce.is_empty());
    assert_eq!(r.node.as_ref(), Some(&node()));
    let second = fake.next_request().await;
    assert_eq!(second.delta().type_url, LISTENER);
    assert!(second.delta().node.is_none());

    assert_eq!(client.offer().await.versions(CLUSTER), [("a", "1"), ("b", "1")]);
    let ack = fake.next_request().await;
    assert_eq!(ack.delta().response_nonce, sent_nonce(&fake, first.stream));
    assert!(ack.delta().error_detail.is_none());

    // a unchanged, b removed, c added.
    fake.set_resources(CLUSTER, "2", vec![cluster("a"), cluster("c")]);
    assert_eq!(client.offer().await.versions(CLUSTER), [("a", "1"), ("c", "2")]);
    match fake.last_sent(first.stream) {
        Some(Sent::Delta { response, .. }) => {
            assert_eq!(response.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["c"]);
            assert_eq!(response.removed_resources, ["b"]);
        }
        other => panic!("expected a delta response, got {other:?}"),
    }
    let ack = fake.next_request().await;
    assert_eq!(ack.delta().response_nonce, sent_nonce(&fake, first.stream));
    assert!(ack.delta().error_detail.is_none());

    fake.set_resources(CLUSTER, "3", vec![cluster("a"), cluster("bad"), cluster("c")]);
    assert!(!client.offer().await.accepted);
    let nack = fake.next_request().await;
    assert_eq!(nack.delta().response_nonce, sent_nonce(&fake, first.stream));
    let detail = nack.delta().error_detail.as_ref().expect("error_detail");
    assert_eq!((detail.code, detail.message.as_str()), (3, "resource bad is unacceptable"));
    client.wait_status("nacked", |s| s.last_nack.is_some()).await;

    // Only the removal of "bad" comes next; the state it applies to is the accepted one.
    fake.set_resources(CLUSTER, "4", vec![cluster("a"), cluster("c")]);
    let offer = client.offer().await;
    assert!(offer.accepted);
    assert_eq!(offer.versions(CLUSTER), [("a", "1"), ("c", "2")]);
}

#[tokio::test]
async fn sotw_resubscribes_after_restart_and_close() {
    let mut fake = FakeAds::start().await;
    fake.set_resources(CLUSTER, "v1", vec![cluster("a")]);
    let mut client = Client::start(config(fake.endpoint(), Variant::Sotw, &[CLUSTER]));
    let first = fake.next_request().await;
    client.offer().await;
    assert_eq!(fake.next_request().await.sotw().version_info, "v1");
    client.wait_status("acked", |s| s.acked_types.contains(CLUSTER)).await;

    fake.stop().await;
    let status = client.wait_status("disconnected", |s| !s.connected).await;
    assert!(status.last_error.is_some());
    assert!(status.acked_types.contains(CLUSTER), "readiness survives a disconnect");
    fake.set_resources(CLUSTER, "v2", vec![cluster("a"), cluster("b")]);
    fake.restart().await;

    let again = fake.next_request().await;
    assert!(again.stream > first.stream, "a new stream");
    let r = again.sotw();
    assert_eq!((r.type_url.as_str(), r.version_info.as_str(), r.response_nonce.as_str()), (CLUSTER, "", ""));
    assert_eq!(r.node.as_ref(), Some(&node()), "node again on the first request of the new stream");
    assert_eq!(client.offer().await.names(CLUSTER), ["a", "b"]);
    assert_eq!(fake.next_request().await.sotw().version_info, "v2");
    client.wait_status("reconnected", |s| s.connected && s.last_error.is_none()).await;

    // A clean server-side close also leads to a new stream.
    fake.close_streams(None);
    let third = fake.next_request().await;
    assert!(third.stream > again.stream);
    assert_eq!(third.sotw().version_info, "");
}

#[tokio::test]
async fn delta_resumes_with_initial_resource_versions() {
    let mut fake = FakeAds::start().await;
    fake.set_resources(CLUSTER, "1", vec![cluster("a"), cluster("b")]);
    let mut client = Client::start(config(fake.endpoint(), Variant::Delta, &[CLUSTER]));
    let first = fake.next_request().await;
    assert!(client.offer().await.accepted);
    assert!(fake.next_request().await.delta().error_detail.is_none());
    // A refused resource must not be claimed on resume.
    fake.set_resources(CLUSTER, "2", vec![cluster("a"), cluster("b"), cluster("bad")]);
    assert!(!client.offer().await.accepted);
    assert!(fake.next_request().await.delta().error_detail.is_some());

    fake.stop().await;
    client.wait_status("disconnected", |s| !s.connected).await;
    fake.set_resources(CLUSTER, "3", vec![cluster("a"), cluster("c")]);
    fake.restart().await;

    let again = fake.next_request().await;
    assert!(again.stream > first.stream);
    let r = again.delta();
    let expected: HashMap<String, String> =
        [("a", "1"), ("b", "1")].iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    assert_eq!(r.initial_resource_versions, expected);
    assert!(r.resource_names_subscribe.is_empty());
    assert_eq!(r.node.as_ref(), Some(&node()));
    assert_eq!(client.offer().await.versions(CLUSTER), [("a", "1"), ("c", "3")]);
    match fake.last_sent(again.stream) {
        Some(Sent::Delta { response, .. }) => {
            assert_eq!(response.resources.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["c"], "only changes");
            assert_eq!(response.removed_resources, ["b"]);
        }
        other => panic!("expected a delta response, got {other:?}"),
    }
    let ack = fake.next_request().await;
    assert_eq!(ack.delta().response_nonce, sent_nonce(&fake, again.stream));
    assert!(ack.delta().error_detail.is_none());

    // Nothing changed while away: an empty answer, and the held state is what stays in force.
    fake.restart().await;
    let third = fake.next_request().await;
    assert!(third.stream > again.stream);
    assert_eq!(third.delta().initial_resource_versions.len(), 2);
    let offer = client.offer().await;
    assert_eq!(offer.versions(CLUSTER), [("a", "1"), ("c", "3")]);
    assert!(offer.accepted);
    match fake.last_sent(third.stream) {
        Some(Sent::Delta { response, .. }) => {
            assert!(response.resources.is_empty() && response.removed_resources.is_empty())
        }
        other => panic!("expected an empty delta response, got {other:?}"),
    }
    assert!(fake.next_request().await.delta().error_detail.is_none());
}

#[tokio::test]
async fn refused_token_is_reported_and_retried() {
    let fake = FakeAds::start().await;
    fake.set_resources(CLUSTER, "v1", vec![cluster("a")]);
    fake.reject_streams(Some(tonic::Status::unauthenticated("invalid token: signature mismatch")));
    let mut cfg = config(fake.endpoint(), Variant::Sotw, &[CLUSTER]);
    cfg.token = Some("bad.token.sig".into());
    let mut client = Client::start(cfg);
    let status = client.wait_status("refused", |s| s.last_error.is_some()).await;
    let error = status.last_error.unwrap();
    assert!(error.contains("refused the data plane's credentials"), "{error}");
    assert!(error.contains("Unauthenticated") && error.contains("invalid token: signature mismatch"), "{error}");
    assert!(!status.connected);

    // Still retrying: once the server accepts, the client gets in.
    fake.reject_streams(None);
    let request = fake.next_request().await;
    assert_eq!(request.authorization.as_deref(), Some("bad.token.sig"));
    client.wait_status("acked", |s| s.acked_types.contains(CLUSTER) && s.last_error.is_none()).await;
}

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn pki(ca_name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["cp.mesh".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf = params.signed_by(&key, &issuer).unwrap();
    Pki { ca_pem: ca_cert.pem(), cert_pem: leaf.pem(), key_pem: key.serialize_pem() }
}

#[tokio::test]
async fn tls_with_the_right_ca_works_by_ip_and_by_name() {
    let pki = pki("control plane CA");
    let fake = FakeAds::start_tls(&pki.cert_pem, &pki.key_pem).await;
    fake.set_resources(CLUSTER, "v1", vec![cluster("a")]);
    assert!(fake.endpoint().starts_with("https://127.0.0.1:"));

    let mut cfg = config(fake.endpoint(), Variant::Sotw, &[CLUSTER]);
    cfg.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    let mut by_ip = Client::start(cfg.clone());
    by_ip.wait_status("acked over TLS", |s| s.acked_types.contains(CLUSTER)).await;

    cfg.tls_server_name = Some("cp.mesh".into());
    cfg.variant = Variant::Delta;
    let mut by_name = Client::start(cfg);
    by_name.wait_status("acked over TLS (delta, SNI cp.mesh)", |s| s.acked_types.contains(CLUSTER)).await;
}

#[tokio::test]
async fn tls_with_a_wrong_ca_is_refused_clearly_and_skip_verify_accepts() {
    let (pki, other) = (pki("control plane CA"), pki("some other CA"));
    let fake = FakeAds::start_tls(&pki.cert_pem, &pki.key_pem).await;
    fake.set_resources(CLUSTER, "v1", vec![cluster("a")]);

    let mut cfg = config(fake.endpoint(), Variant::Sotw, &[CLUSTER]);
    cfg.ca_pem = Some(other.ca_pem.into_bytes());
    let mut wrong = Client::start(cfg.clone());
    let status = wrong.wait_status("TLS error", |s| s.last_error.is_some()).await;
    let error = status.last_error.unwrap();
    assert!(error.starts_with(&format!("cannot connect to the control plane at {}", fake.endpoint())), "{error}");
    assert!(error.contains("invalid peer certificate: UnknownIssuer"), "{error}");
    assert!(error.contains("check that the configured CA certificate signed"), "{error}");
    assert!(!status.connected && status.acked_types.is_empty());
    drop(wrong);
    assert!(fake.pending_requests().await.is_empty(), "no request got through");

    cfg.skip_verify = true;
    let mut skip = Client::start(cfg);
    skip.wait_status("acked with skip_verify", |s| s.acked_types.contains(CLUSTER)).await;
}

#[tokio::test]
async fn unusable_configs_are_returned_at_once() {
    async fn err(cfg: Config) -> String {
        let (events, _rx) = watch::channel(Status::default());
        let (tx, _offers) = mpsc::unbounded_channel();
        match tokio::time::timeout(WAIT, xds_client::run(cfg, TestHandler(tx), events)).await {
            Ok(Err(e)) => e.to_string(),
            Ok(Ok(never)) => match never {},
            Err(_) => panic!("run() did not return for an unusable config"),
        }
    }
    let base = config("https://127.0.0.1:5678".into(), Variant::Sotw, &[CLUSTER]);

    let mut c = base.clone();
    c.endpoint = "grpc://127.0.0.1:5678".into();
    assert!(err(c).await.contains("must be http or https"));
    let mut c = base.clone();
    c.type_urls.clear();
    assert!(err(c).await.contains("no xDS resource type"));
    let mut c = base.clone();
    c.ca_pem = Some(b"not a certificate".to_vec());
    assert!(err(c).await.contains("CA certificate is not valid PEM"));
    let mut c = base.clone();
    c.token = Some("two\nlines".into());
    assert!(err(c).await.contains("token"));
    let debug = format!("{:?}", Config { token: Some("secret-jwt".into()), ..base });
    assert!(!debug.contains("secret-jwt") && debug.contains("<redacted>"));
}
