//! A scriptable fake ADS server (SotW + Delta) for tests (feature `testing`).
//!
//! * [`FakeAds::set_resources`] replaces the server's resources of one type; connected streams
//!   get them pushed (SotW: the whole set; Delta: what changed for that stream, plus removals).
//!   A stream subscribing later receives the current set (Delta: the diff against its
//!   `initial_resource_versions`, sent even when empty, as go-control-plane does).
//! * [`FakeAds::send_sotw`] / [`FakeAds::send_delta`] push a raw response to every open stream.
//! * Every request is recorded with its stream id and `authorization` metadata:
//!   [`FakeAds::next_request`] returns them in arrival order. [`FakeAds::sent`] lists the
//!   responses sent (to compare nonces).
//! * [`FakeAds::stop`] ends every stream and closes the port; [`FakeAds::restart`] listens on the
//!   same port again. [`FakeAds::reject_streams`] makes new streams fail with a status
//!   (e.g. `Unauthenticated`), [`FakeAds::close_streams`] ends the open ones.
//!
//! Nothing here sleeps: waiting is on channels, bounded by [`WAIT`] so a broken test fails
//! instead of hanging.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource as DeltaResource,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// How long [`FakeAds::next_request`] waits before failing the test.
pub const WAIT: Duration = Duration::from_secs(10);

type RespStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send + 'static>>;

/// One request received by the fake server.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Stream id, counting from 1 over the server's whole life (restarts included).
    pub stream: u64,
    /// The `authorization` metadata of the stream.
    pub authorization: Option<String>,
    pub request: RecordedRequest,
}

#[derive(Debug, Clone)]
pub enum RecordedRequest {
    Sotw(DiscoveryRequest),
    Delta(DeltaDiscoveryRequest),
}

impl Recorded {
    /// The SotW request; panics on a Delta one.
    pub fn sotw(&self) -> &DiscoveryRequest {
        match &self.request {
            RecordedRequest::Sotw(r) => r,
            RecordedRequest::Delta(r) => panic!("expected a SotW request, got Delta {r:?}"),
        }
    }

    /// The Delta request; panics on a SotW one.
    pub fn delta(&self) -> &DeltaDiscoveryRequest {
        match &self.request {
            RecordedRequest::Delta(r) => r,
            RecordedRequest::Sotw(r) => panic!("expected a Delta request, got SotW {r:?}"),
        }
    }
}

/// One response sent by the fake server.
#[derive(Debug, Clone)]
pub enum Sent {
    Sotw { stream: u64, response: DiscoveryResponse },
    Delta { stream: u64, response: DeltaDiscoveryResponse },
}

impl Sent {
    pub fn nonce(&self) -> &str {
        match self {
            Sent::Sotw { response, .. } => &response.nonce,
            Sent::Delta { response, .. } => &response.nonce,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct TypeSnapshot {
    version: String,
    /// name -> (resource version, resource)
    resources: BTreeMap<String, (String, Any)>,
}

#[derive(Debug, Clone)]
enum Event {
    Changed(String),
    RawSotw(DiscoveryResponse),
    RawDelta(DeltaDiscoveryResponse),
    Close(Option<tonic::Status>),
}

struct Shared {
    snapshot: Mutex<BTreeMap<String, TypeSnapshot>>,
    events: broadcast::Sender<Event>,
    requests_tx: mpsc::UnboundedSender<Recorded>,
    requests_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Recorded>>,
    sent: Mutex<Vec<Sent>>,
    reject: Mutex<Option<tonic::Status>>,
    stopped: watch::Sender<bool>,
    nonces: AtomicU64,
    streams: AtomicU64,
}

async fn wait_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn nonce(&self) -> String {
        format!("nonce-{}", self.nonces.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// The fake server. Dropping it stops it (without waiting).
pub struct FakeAds {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: Option<(String, String)>,
    running: Option<Running>,
}

impl FakeAds {
    /// Plain-text server on an ephemeral loopback port.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// TLS server (certificate chain PEM, private key PEM) on an ephemeral loopback port.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        // tonic's server TLS uses the process-level provider; make sure it is aws-lc-rs even if
        // feature unification compiled another provider into rustls.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        Self::start_with(Some((cert_pem.to_string(), key_pem.to_string()))).await
    }

    async fn start_with(tls: Option<(String, String)>) -> Self {
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            snapshot: Mutex::default(),
            events: broadcast::channel(1024).0,
            requests_tx,
            requests_rx: tokio::sync::Mutex::new(requests_rx),
            sent: Mutex::default(),
            reject: Mutex::default(),
            stopped: watch::channel(false).0,
            nonces: AtomicU64::new(0),
            streams: AtomicU64::new(0),
        });
        let mut fake = Self { shared, addr: SocketAddr::from(([127, 0, 0, 1], 0)), tls, running: None };
        fake.listen().await;
        fake
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind the fake ADS server");
        self.addr = listener.local_addr().expect("local address");
        self.shared.stopped.send_replace(false);
        let mut builder = Server::builder();
        if let Some((cert, key)) = &self.tls {
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
                .expect("server TLS config");
        }
        let service = AggregatedDiscoveryServiceServer::new(Service { shared: self.shared.clone() })
            .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::MAX_MESSAGE_BYTES);
        let router = builder.add_service(service);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        self.running = Some(Running { stop, task });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>` or `https://...`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Ends every stream, stops accepting and releases the port.
    pub async fn stop(&mut self) {
        self.shared.stopped.send_replace(true);
        if let Some(Running { stop, mut task }) = self.running.take() {
            let _ = stop.send(());
            if tokio::time::timeout(WAIT, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }

    /// Listens again on the same port (after [`FakeAds::stop`]); resources are kept.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.listen().await;
    }

    /// Replaces the resources of `type_url` (version `version`) and pushes them to open streams.
    /// A resource keeps its previous per-resource version if its bytes did not change, else it
    /// gets `version` (what Delta streams see).
    pub fn set_resources(&self, type_url: &str, version: &str, resources: Vec<(String, Any)>) {
        {
            let mut snapshot = lock(&self.shared.snapshot);
            let old = snapshot.remove(type_url).unwrap_or_default();
            let mut next = TypeSnapshot { version: version.to_string(), resources: BTreeMap::new() };
            for (name, any) in resources {
                let resource_version = match old.resources.get(&name) {
                    Some((v, old_any)) if *old_any == any => v.clone(),
                    _ => version.to_string(),
                };
                next.resources.insert(name, (resource_version, any));
            }
            snapshot.insert(type_url.to_string(), next);
        }
        let _ = self.shared.events.send(Event::Changed(type_url.to_string()));
    }

    /// Sends `response` to every open SotW stream (a nonce is generated if empty).
    pub fn send_sotw(&self, response: DiscoveryResponse) {
        let _ = self.shared.events.send(Event::RawSotw(response));
    }

    /// Sends `response` to every open Delta stream (a nonce is generated if empty).
    pub fn send_delta(&self, response: DeltaDiscoveryResponse) {
        let _ = self.shared.events.send(Event::RawDelta(response));
    }

    /// New streams fail at once with `status` (None: accept again).
    pub fn reject_streams(&self, status: Option<tonic::Status>) {
        *lock(&self.shared.reject) = status;
    }

    /// Ends open streams: with `status` as an error, or cleanly (OK) when None.
    pub fn close_streams(&self, status: Option<tonic::Status>) {
        let _ = self.shared.events.send(Event::Close(status));
    }

    /// The next request received (in arrival order); panics after [`WAIT`].
    pub async fn next_request(&self) -> Recorded {
        let mut rx = self.shared.requests_rx.lock().await;
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => unreachable!("the fake server holds a sender"),
            Err(_) => panic!("the fake ADS server received no request within {WAIT:?}"),
        }
    }

    /// Requests received and not yet returned by [`FakeAds::next_request`].
    pub async fn pending_requests(&self) -> Vec<Recorded> {
        let mut rx = self.shared.requests_rx.lock().await;
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r);
        }
        out
    }

    /// Every response sent so far.
    pub fn sent(&self) -> Vec<Sent> {
        lock(&self.shared.sent).clone()
    }

    /// The last response sent on `stream`.
    pub fn last_sent(&self, stream: u64) -> Option<Sent> {
        lock(&self.shared.sent)
            .iter()
            .rev()
            .find(|s| match s {
                Sent::Sotw { stream: id, .. } | Sent::Delta { stream: id, .. } => *id == stream,
            })
            .cloned()
    }
}

impl Drop for FakeAds {
    fn drop(&mut self) {
        self.shared.stopped.send_replace(true);
        if let Some(running) = self.running.take() {
            let _ = running.stop.send(());
        }
    }
}

struct Service {
    shared: Arc<Shared>,
}

impl Service {
    /// Common stream admission: rejection, stop, recording metadata.
    fn open<T>(&self, request: &tonic::Request<T>) -> Result<(u64, Option<String>), tonic::Status> {
        if let Some(status) = lock(&self.shared.reject).clone() {
            return Err(status);
        }
        if *self.shared.stopped.borrow() {
            return Err(tonic::Status::unavailable("the fake ADS server is stopping"));
        }
        let authorization = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
        Ok((self.shared.streams.fetch_add(1, Ordering::Relaxed) + 1, authorization))
    }
}

struct StreamCtx<R> {
    shared: Arc<Shared>,
    id: u64,
    tx: mpsc::Sender<Result<R, tonic::Status>>,
}

impl StreamCtx<DiscoveryResponse> {
    async fn send(&self, mut response: DiscoveryResponse) -> bool {
        if response.nonce.is_empty() {
            response.nonce = self.shared.nonce();
        }
        lock(&self.shared.sent).push(Sent::Sotw { stream: self.id, response: response.clone() });
        self.tx.send(Ok(response)).await.is_ok()
    }

    async fn send_snapshot(&self, type_url: &str, last_sent: &mut HashMap<String, String>) -> bool {
        let Some(snap) = lock(&self.shared.snapshot).get(type_url).cloned() else { return true };
        if last_sent.get(type_url) == Some(&snap.version) {
            return true;
        }
        last_sent.insert(type_url.to_string(), snap.version.clone());
        self.send(DiscoveryResponse {
            version_info: snap.version,
            type_url: type_url.to_string(),
            resources: snap.resources.into_values().map(|(_, any)| any).collect(),
            ..Default::default()
        })
        .await
    }
}

impl StreamCtx<DeltaDiscoveryResponse> {
    async fn send(&self, mut response: DeltaDiscoveryResponse) -> bool {
        if response.nonce.is_empty() {
            response.nonce = self.shared.nonce();
        }
        lock(&self.shared.sent).push(Sent::Delta { stream: self.id, response: response.clone() });
        self.tx.send(Ok(response)).await.is_ok()
    }

    /// Sends what changed for this stream since `known`, and updates `known`. Like
    /// go-control-plane, the answer to the first (wildcard) request of a type is sent even when
    /// nothing changed, so the client learns the type is in sync.
    async fn send_diff(&self, type_url: &str, known: &mut BTreeMap<String, String>, first: bool) -> bool {
        let Some(snap) = lock(&self.shared.snapshot).get(type_url).cloned() else { return true };
        let mut response = DeltaDiscoveryResponse {
            system_version_info: snap.version.clone(),
            type_url: type_url.to_string(),
            ..Default::default()
        };
        for (name, (version, any)) in &snap.resources {
            if known.get(name) != Some(version) {
                response.resources.push(DeltaResource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any.clone()),
                    ..Default::default()
                });
            }
        }
        response.removed_resources = known.keys().filter(|n| !snap.resources.contains_key(*n)).cloned().collect();
        *known = snap.resources.iter().map(|(n, (v, _))| (n.clone(), v.clone())).collect();
        if !first && response.resources.is_empty() && response.removed_resources.is_empty() {
            return true;
        }
        self.send(response).await
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = RespStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = RespStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (id, authorization) = self.open(&request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let ctx = StreamCtx { shared: self.shared.clone(), id, tx };
        let mut events = self.shared.events.subscribe();
        let mut stopped = self.shared.stopped.subscribe();
        tokio::spawn(async move {
            let mut subscribed = BTreeSet::new();
            let mut last_sent = HashMap::new();
            loop {
                let ok = tokio::select! {
                    request = inbound.next() => match request {
                        Some(Ok(request)) => {
                            let _ = ctx.shared.requests_tx.send(Recorded {
                                stream: id,
                                authorization: authorization.clone(),
                                request: RecordedRequest::Sotw(request.clone()),
                            });
                            if request.response_nonce.is_empty() && subscribed.insert(request.type_url.clone()) {
                                ctx.send_snapshot(&request.type_url, &mut last_sent).await
                            } else {
                                true
                            }
                        }
                        _ => false,
                    },
                    event = events.recv() => match event {
                        Ok(Event::Changed(t)) if subscribed.contains(&t) => ctx.send_snapshot(&t, &mut last_sent).await,
                        Ok(Event::RawSotw(response)) => ctx.send(response).await,
                        Ok(Event::Close(status)) => {
                            if let Some(status) = status {
                                let _ = ctx.tx.send(Err(status)).await;
                            }
                            false
                        }
                        Ok(_) => true,
                        Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => false,
                    },
                    _ = wait_stopped(&mut stopped) => false,
                };
                if !ok {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (id, authorization) = self.open(&request)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let ctx = StreamCtx { shared: self.shared.clone(), id, tx };
        let mut events = self.shared.events.subscribe();
        let mut stopped = self.shared.stopped.subscribe();
        tokio::spawn(async move {
            // type -> name -> version this stream holds (as far as the server knows)
            let mut known: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            loop {
                let ok = tokio::select! {
                    request = inbound.next() => match request {
                        Some(Ok(request)) => {
                            let _ = ctx.shared.requests_tx.send(Recorded {
                                stream: id,
                                authorization: authorization.clone(),
                                request: RecordedRequest::Delta(request.clone()),
                            });
                            if known.contains_key(&request.type_url) {
                                true // ACK / NACK
                            } else {
                                let held = known.entry(request.type_url.clone()).or_default();
                                held.extend(request.initial_resource_versions.clone());
                                ctx.send_diff(&request.type_url, held, true).await
                            }
                        }
                        _ => false,
                    },
                    event = events.recv() => match event {
                        Ok(Event::Changed(t)) => match known.get_mut(&t) {
                            Some(held) => ctx.send_diff(&t, held, false).await,
                            None => true,
                        },
                        Ok(Event::RawDelta(response)) => ctx.send(response).await,
                        Ok(Event::Close(status)) => {
                            if let Some(status) = status {
                                let _ = ctx.tx.send(Err(status)).await;
                            }
                            false
                        }
                        Ok(_) => true,
                        Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => false,
                    },
                    _ = wait_stopped(&mut stopped) => false,
                };
                if !ok {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
