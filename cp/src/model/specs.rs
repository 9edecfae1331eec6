//! Typed views of the specs `cp` interprets (Dataplane and zone proxy networking, Mesh
//! mTLS). Fields not listed are ignored here and kept in the stored JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Resource, parse_duration};

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSpec {
    #[serde(default)]
    pub networking: Option<DataplaneNetworking>,
    /// The proxy's own metrics backend, over the mesh's.
    #[serde(default)]
    pub metrics: Option<MetricsBackend>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneNetworking {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub advertised_address: String,
    #[serde(default)]
    pub inbound: Vec<Inbound>,
    #[serde(default)]
    pub outbound: Vec<Outbound>,
    #[serde(default)]
    pub gateway: Option<Value>,
    #[serde(default)]
    pub admin: Option<AdminPort>,
    #[serde(default)]
    pub transparent_proxying: Option<TransparentProxying>,
}

/// `networking.outbound[]` (legacy tag form; `backendRef` outbounds are kept but not served).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Outbound {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub port: i64,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub backend_ref: Option<Value>,
}

/// `networking.transparentProxying`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TransparentProxying {
    #[serde(default)]
    pub redirect_port_inbound: u32,
    #[serde(default)]
    pub redirect_port_outbound: u32,
    #[serde(default)]
    pub ip_family_mode: Option<String>,
}

impl TransparentProxying {
    /// Kuma's `tp.Enabled()`: inbound or outbound redirection is on.
    pub fn enabled(&self) -> bool {
        self.redirect_port_inbound != 0 || self.redirect_port_outbound != 0
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    /// The inbound's name, which a policy's `sectionName` may give (or its port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub port: i64,
    #[serde(default)]
    pub service_port: Option<i64>,
    #[serde(default)]
    pub service_address: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub health: Option<Health>,
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Health {
    #[serde(default)]
    pub ready: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct AdminPort {
    #[serde(default)]
    pub port: i64,
}

impl Inbound {
    /// Kuma counts an inbound as serving when it has no health or is ready, and its state
    /// is not NotReady/Ignored.
    pub fn is_healthy(&self) -> bool {
        let health_ok = self.health.as_ref().is_none_or(|h| h.ready);
        let state_ok = !matches!(self.state.as_deref(), Some("NotReady") | Some("Ignored"));
        health_ok && state_ok
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ZoneIngressSpec {
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub networking: ZoneIngressNetworking,
    #[serde(default)]
    pub available_services: Vec<AvailableService>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ZoneIngressNetworking {
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub advertised_address: String,
    #[serde(default)]
    pub port: i64,
    #[serde(default)]
    pub advertised_port: i64,
    #[serde(default)]
    pub admin: Option<AdminPort>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct AvailableService {
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub instances: u32,
    #[serde(default)]
    pub mesh: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external_service: bool,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ZoneEgressSpec {
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub networking: ZoneIngressNetworking,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshSpec {
    #[serde(default)]
    pub mtls: Option<MeshMtls>,
    #[serde(default)]
    pub metrics: Option<MeshMetrics>,
    #[serde(default)]
    pub routing: Option<MeshRouting>,
}

/// `routing` of a Mesh.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshRouting {
    /// Cross-zone and external traffic leaves through the zone's ZoneEgresses.
    #[serde(default)]
    pub zone_egress: bool,
    /// Endpoints in other zones get priority 1: used only when the local zone has none
    /// healthy (Kuma 2.14's legacy locality awareness).
    #[serde(default)]
    pub locality_aware_load_balancing: bool,
}

/// An ExternalService: a service outside the mesh, reached by its tags.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalServiceSpec {
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub networking: ExternalNetworking,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalNetworking {
    /// `host:port`.
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub tls: Option<ExternalTls>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalTls {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub ca_cert: Option<DataSource>,
    #[serde(default)]
    pub client_cert: Option<DataSource>,
    #[serde(default)]
    pub client_key: Option<DataSource>,
    #[serde(default)]
    pub allow_renegotiation: bool,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub sni: Option<String>,
    #[serde(default)]
    pub skip_hostname_verification: bool,
}

/// Kuma's `DataSource` (one of `inline` base64 bytes, `inlineString`, `secret`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataSource {
    #[serde(default)]
    pub inline: Option<String>,
    #[serde(default)]
    pub inline_string: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
}

impl ExternalServiceSpec {
    /// `(host, port)` of `networking.address`.
    pub fn host_port(&self) -> Option<(String, u32)> {
        let (h, p) = self.networking.address.rsplit_once(':')?;
        let h = h.trim_start_matches('[').trim_end_matches(']');
        Some((h.to_string(), p.parse().ok().filter(|p| *p > 0 && *p <= 65535)?))
    }
}

/// A legacy TrafficPermission: which sources may reach which destinations.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPermissionSpec {
    #[serde(default)]
    pub sources: Vec<Selector>,
    #[serde(default)]
    pub destinations: Vec<Selector>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Selector {
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, String>,
}

impl Selector {
    /// Whether these tags are selected (`*` matches any value).
    pub fn selects(&self, tags: &BTreeMap<String, String>) -> bool {
        self.matches.iter().all(|(k, v)| v == "*" || tags.get(k) == Some(v))
    }
}

/// `metrics` of a Mesh: Kuma's Prometheus backends (a proxy exposes its stats on
/// `conf.port` `conf.path`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshMetrics {
    #[serde(default)]
    pub enabled_backend: String,
    #[serde(default)]
    pub backends: Vec<MetricsBackend>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetricsBackend {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub backend_type: String,
    #[serde(default)]
    pub conf: Option<PrometheusConf>,
}

/// A Prometheus backend's `conf` (its `tags` are not interpreted).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusConf {
    #[serde(default)]
    pub port: Option<u32>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default, rename = "skipMTLS")]
    pub skip_mtls: Option<bool>,
    /// Applications whose metrics the proxy serves beside its own.
    #[serde(default)]
    pub aggregate: Vec<AggregateConf>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AggregateConf {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub path: Option<String>,
    /// Unset: enabled.
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub address: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshMtls {
    #[serde(default)]
    pub enabled_backend: String,
    #[serde(default)]
    pub backends: Vec<MtlsBackend>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MtlsBackend {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "type")]
    pub backend_type: String,
    #[serde(default)]
    pub dp_cert: Option<DpCert>,
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub conf: Option<Value>,
}

/// `mtls.backends[].dpCert`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DpCert {
    #[serde(default)]
    pub rotation: Option<DpCertRotation>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DpCertRotation {
    #[serde(default)]
    pub expiration: String,
}

/// Kuma's default data plane certificate lifetime (`DefaultWorkloadCertValidityPeriod`).
pub const DEFAULT_DP_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl MtlsBackend {
    /// `dpCert.rotation.expiration`, default 24h.
    pub fn dp_cert_lifetime(&self) -> std::time::Duration {
        self.dp_cert
            .as_ref()
            .and_then(|d| d.rotation.as_ref())
            .filter(|r| !r.expiration.is_empty())
            .and_then(|r| parse_duration(&r.expiration).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_DP_CERT_LIFETIME)
    }
}

impl MeshSpec {
    /// `mtls.enabledBackend` is set (and, after validation, names an existing backend).
    pub fn mtls_enabled(&self) -> bool {
        self.mtls.as_ref().is_some_and(|m| !m.enabled_backend.is_empty())
    }

    /// `routing.zoneEgress`.
    pub fn zone_egress(&self) -> bool {
        self.routing.as_ref().is_some_and(|r| r.zone_egress)
    }

    /// `routing.localityAwareLoadBalancing`.
    pub fn locality_aware(&self) -> bool {
        self.routing.as_ref().is_some_and(|r| r.locality_aware_load_balancing)
    }

    /// The enabled backend, when mTLS is on.
    pub fn enabled_backend(&self) -> Option<&MtlsBackend> {
        let m = self.mtls.as_ref()?;
        if m.enabled_backend.is_empty() {
            return None;
        }
        m.backends.iter().find(|b| b.name == m.enabled_backend)
    }

    /// "type/name" of the enabled backend, e.g. `builtin/ca-1`.
    pub fn mtls_description(&self) -> String {
        match &self.mtls {
            Some(m) if !m.enabled_backend.is_empty() => {
                let t = m
                    .backends
                    .iter()
                    .find(|b| b.name == m.enabled_backend)
                    .map(|b| b.backend_type.as_str())
                    .unwrap_or("?");
                format!("{t}/{}", m.enabled_backend)
            }
            _ => "off".into(),
        }
    }
}

/// Whether a Mesh resource enables mTLS (a resource that cannot be read counts as off).
pub fn mesh_mtls_enabled(mesh: &Resource) -> bool {
    mesh.typed::<MeshSpec>().is_ok_and(|m| m.mtls_enabled())
}
