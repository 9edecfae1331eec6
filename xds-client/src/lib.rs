//! ADS client for the `dp` data plane: consumes xDS from a Kuma 2.14-compatible control plane
//! (our `cp` or a real `kuma-cp`) over gRPC, State-of-the-World (`StreamAggregatedResources`,
//! kuma-dp 2.14's default) or Delta (`DeltaAggregatedResources`, when kuma-dp sends
//! `feature-delta-grpc`). It knows nothing about routing: resources are handed over as `Any`s.
//!
//! ```no_run
//! # async fn demo(node: envoy_types::pb::envoy::config::core::v3::Node) {
//! use xds_client::{Config, Handler, State, Status, Variant, type_urls};
//! struct Print;
//! impl Handler for Print {
//!     fn apply(&mut self, state: &State, changed_type: &str) -> Result<(), String> {
//!         println!("{changed_type}: {} resources", state.resources[changed_type].len());
//!         Ok(()) // Err(reason) would NACK and keep the previous state
//!     }
//! }
//! let mut config = Config::new("https://127.0.0.1:5678", node, Variant::Sotw, type_urls::KUMA.map(String::from).to_vec());
//! config.ca_pem = Some(std::fs::read("ca.pem").unwrap());
//! config.token = Some("eyJhbGciOi...".into());
//! let (tx, mut rx) = tokio::sync::watch::channel(Status::default());
//! tokio::spawn(xds_client::run(config, Print, tx));
//! rx.wait_for(|s| s.acked_types.len() == 4).await.unwrap(); // ready
//! # }
//! ```
//!
//! # Protocol
//! * **Stream start.** Every stream (first connection and each reconnect) sends one request per
//!   entry of [`Config::type_urls`], in order. The first request of the stream carries
//!   [`Config::node`]; later requests do not (Envoy's `set_node_on_first_message_only`, which
//!   Kuma's bootstrap sets). The token goes in gRPC metadata `authorization: <raw JWT>`.
//! * **Wildcard.** All types are subscribed as wildcard by sending *no* resource names on the
//!   first request of each type: `resource_names: []` (SotW) and `resource_names_subscribe: []`
//!   (Delta), the "legacy wildcard" of the xDS protocol. Why not an explicit `"*"` in Delta:
//!   go-control-plane (which kuma-cp 2.14 runs) treats an empty first request as wildcard in every
//!   version, and legacy wildcard is active for all types unless a server opts out with
//!   `DeactivateLegacyWildcard*` (Kuma does not); go-control-plane releases before the explicit
//!   `"*"` support took `"*"` for a resource literally named `*` and sent nothing. Envoy itself
//!   sends the empty list for a wildcard-only subscription. A server must therefore treat an
//!   empty first subscription as wildcard for *every* type (including ClusterLoadAssignment and
//!   Secret, which Envoy requests by name).
//! * **SotW.** The first request per type on a stream has empty `version_info` and
//!   `response_nonce`, even after a reconnect: the server always answers with its full state, so a
//!   restarted control plane whose version counter restarted cannot leave us on stale resources.
//!   Each response replaces the whole set of its type. ACK = `version_info` + `response_nonce` of
//!   the response; NACK = the last accepted `version_info` of that type (empty if none) + the
//!   response's nonce + `error_detail {code: 3 INVALID_ARGUMENT, message: reason}`.
//! * **Delta.** The first request per type of a stream carries `initial_resource_versions`
//!   (name -> version of every resource we hold), so the server sends only what changed and
//!   `removed_resources` for what disappeared. `resources` are upserts, `removed_resources`
//!   removals. ACK = `response_nonce`; NACK = `response_nonce` + `error_detail`.
//! * **NACK reasons generated here** (the handler is not called): a response type that was not
//!   subscribed, an `Any` whose `type_url` differs from the response's, duplicate names, a name
//!   both updated and removed, a Delta resource without body that we do not hold, a SotW resource
//!   whose name (field 1 of every xDS resource type) cannot be read. Whether the bytes decode as
//!   the type is the [`Handler`]'s concern.
//! * **State.** The last accepted [`State`] is kept across reconnects; versions of rejected
//!   resources are never recorded (so they are not claimed in `initial_resource_versions`).
//! * **Reconnect** on any connect error, stream error or server close, after a delay with full
//!   jitter ([`Backoff`]); the backoff restarts after a stream that delivered a response.
//!   `Unauthenticated`/`PermissionDenied` (e.g. a refused token) are logged at error level with
//!   the server's message and retried like everything else (as kuma-dp does);
//!   [`Status::last_error`] says what happened.
//!
//! # TLS
//! `https://` endpoints use rustls (aws-lc-rs) through tonic, ALPN `h2`: [`Config::ca_pem`] =
//! trust only that CA; [`Config::skip_verify`] = accept any certificate (handshake signatures
//! still checked); neither = the system trust store (kuma-dp 2.14 behaviour). The server name
//! checked is [`Config::tls_server_name`] or the endpoint's host (an IP host is checked against
//! IP SANs).
//!
//! Logs: everything runs in `info_span!("xds", variant)`; each applied update is logged at info
//! (type, version, resource count), each NACK at warn with the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

mod apply;
mod backoff;
mod client;
mod transport;

#[cfg(feature = "testing")]
pub mod testing;

pub use backoff::{Backoff, Retry};
pub use transport::{Trust, accept_any_server, check_ca_pem, endpoint, error_chain};

/// Largest response accepted (tonic's default is 4 MiB, too small for big meshes).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Type URLs of the resources Kuma sends to data planes.
pub mod type_urls {
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const CLUSTER_LOAD_ASSIGNMENT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    pub const ROUTE_CONFIGURATION: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// What `dp` subscribes to, in Envoy's order (clusters and endpoints before listeners).
    pub const KUMA: [&str; 4] = [CLUSTER, CLUSTER_LOAD_ASSIGNMENT, LISTENER, SECRET];
}

/// Which ADS RPC to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// State of the World: `StreamAggregatedResources` (kuma-dp 2.14 default, `api_type: GRPC`).
    Sotw,
    /// Incremental: `DeltaAggregatedResources` (`api_type: DELTA_GRPC`, `feature-delta-grpc`).
    Delta,
}

/// How to reach the control plane and what to ask for.
#[derive(Clone)]
pub struct Config {
    /// `https://host:port` or `http://host:port` (e.g. `https://127.0.0.1:5678`).
    pub endpoint: String,
    /// Trust only this CA (PEM, one or more certificates) when set.
    pub ca_pem: Option<Vec<u8>>,
    /// Accept any server certificate (kuma-dp `--skip-verify`).
    pub skip_verify: bool,
    /// Name the server certificate must match; defaults to the endpoint's host.
    pub tls_server_name: Option<String>,
    /// Sent on the first request of each stream. Kuma: id `<mesh>.<name>`, metadata struct.
    pub node: Node,
    /// Sent as gRPC metadata `authorization: <raw JWT>` (no `Bearer `), surrounding whitespace trimmed.
    pub token: Option<String>,
    pub variant: Variant,
    /// Subscribed types, all wildcard, requested in this order.
    pub type_urls: Vec<String>,
    pub backoff: Backoff,
}

impl Config {
    /// A config with no TLS settings, no token and the default backoff.
    pub fn new(endpoint: impl Into<String>, node: Node, variant: Variant, type_urls: Vec<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            ca_pem: None,
            skip_verify: false,
            tls_server_name: None,
            node,
            token: None,
            variant,
            type_urls,
            backoff: Backoff::default(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("endpoint", &self.endpoint)
            .field("ca_pem", &self.ca_pem.as_ref().map(|p| format!("<{} bytes>", p.len())))
            .field("skip_verify", &self.skip_verify)
            .field("tls_server_name", &self.tls_server_name)
            .field("node", &self.node)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("variant", &self.variant)
            .field("type_urls", &self.type_urls)
            .field("backoff", &self.backoff)
            .finish()
    }
}

/// Everything currently known, per type URL: resource name -> [`Resource`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// type URL -> name -> resource. A type is present once a response of it was accepted
    /// (possibly with no resources).
    pub resources: BTreeMap<String, BTreeMap<String, Resource>>,
    /// What the response being offered changed in its type, when it is a Delta response
    /// (`None` for State of the World, which replaces the type whole): a handler can then
    /// look at those resources only.
    pub delta: Option<DeltaChange>,
}

/// The names a Delta response upserted and the names it removed (of those held).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeltaChange {
    pub upserted: Vec<String>,
    pub removed: Vec<String>,
}

/// One resource as received.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// SotW: the response's `version_info`. Delta: the resource's own `version`.
    pub version: String,
    /// The resource, still encoded. Its `type_url` equals the type it is filed under.
    pub any: Any,
}

/// The user of the client: validates and installs configuration.
pub trait Handler: Send + 'static {
    /// Called after each response with the whole state as it would be if accepted.
    /// `Ok` => ACK; `Err(reason)` => NACK with that reason, and the previous state is kept.
    /// Runs on the client's task: keep it quick (build and swap a snapshot, no I/O).
    fn apply(&mut self, state: &State, changed_type: &str) -> Result<(), String>;
}

/// What the client is doing, published on the `watch` channel given to [`run`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// An ADS stream is open (set when the stream is established, cleared when it ends).
    pub connected: bool,
    /// Types with at least one accepted response since start (kept across reconnects):
    /// "ready" = every subscribed type is in here.
    pub acked_types: BTreeSet<String>,
    /// Why the last connection attempt or stream ended, in one sentence; cleared when a stream
    /// delivers a response.
    pub last_error: Option<String>,
    /// `<type_url>: <reason>` of the latest NACK; cleared when a later response of that type is accepted.
    pub last_nack: Option<String>,
}

/// A [`Config`] that cannot work; returned by [`run`] at once.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("xDS endpoint {endpoint:?} is invalid: {reason}; expected https://host:port or http://host:port")]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("the control plane CA certificate is not valid PEM: {0}")]
    InvalidCa(String),
    #[error("TLS setup for the xDS connection failed: {0}")]
    Tls(String),
    #[error("the data plane token contains characters not allowed in a gRPC header (it must be a single-line JWT)")]
    InvalidToken,
    #[error("no xDS resource type to subscribe to")]
    NoTypes,
}

/// Runs the ADS client forever: connects, subscribes, hands every response to `handler`,
/// ACKs/NACKs, publishes [`Status`] on `events`, and reconnects with backoff. Returns only when
/// the configuration is unusable (hence `Result<Infallible, _>`: `let Err(e) = run(..).await;`).
pub async fn run(
    config: Config,
    handler: impl Handler,
    events: watch::Sender<Status>,
) -> Result<Infallible, ConfigError> {
    let transport = transport::Transport::new(&config)?;
    client::Client::new(config, transport, handler, events).run().await
}
