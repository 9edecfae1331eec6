//! Kuma resources in their Universal ("flat") REST shape, and their validation.
//!
//! A resource is kept as its meta fields plus the spec fields as a JSON object, so that
//! fields we do not interpret survive a round trip. The parts we interpret (Dataplane
//! networking, ZoneIngress networking, Mesh mTLS) are read through typed views.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const SERVICE_TAG: &str = "kuma.io/service";

/// The resource types this control plane stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Mesh,
    Dataplane,
    ZoneIngress,
    ZoneEgress,
    Zone,
    /// Mesh-scoped secret (e.g. `dataplane-token-signing-key-<mesh>-1`).
    Secret,
    /// Global secret (e.g. `zone-token-signing-key-1`).
    GlobalSecret,
    /// Internal configuration (Kuma's `system.Config`, e.g. the `kuma-<mesh>-dns-vips` view).
    Config,
}

impl ResourceType {
    pub const ALL: [ResourceType; 8] = [
        ResourceType::Mesh,
        ResourceType::Dataplane,
        ResourceType::ZoneIngress,
        ResourceType::ZoneEgress,
        ResourceType::Zone,
        ResourceType::Secret,
        ResourceType::GlobalSecret,
        ResourceType::Config,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ResourceType::Mesh => "Mesh",
            ResourceType::Dataplane => "Dataplane",
            ResourceType::ZoneIngress => "ZoneIngress",
            ResourceType::ZoneEgress => "ZoneEgress",
            ResourceType::Zone => "Zone",
            ResourceType::Secret => "Secret",
            ResourceType::GlobalSecret => "GlobalSecret",
            ResourceType::Config => "Config",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Path segment of the REST API (`/meshes`, `/meshes/{m}/dataplanes`, `/zoneingresses`, ...).
    pub fn plural(self) -> &'static str {
        match self {
            ResourceType::Mesh => "meshes",
            ResourceType::Dataplane => "dataplanes",
            ResourceType::ZoneIngress => "zoneingresses",
            ResourceType::ZoneEgress => "zoneegresses",
            ResourceType::Zone => "zones",
            ResourceType::Secret => "secrets",
            ResourceType::GlobalSecret => "global-secrets",
            ResourceType::Config => "configs",
        }
    }

    pub fn is_mesh_scoped(self) -> bool {
        matches!(self, ResourceType::Dataplane | ResourceType::Secret)
    }
}

/// One stored resource.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub rtype: ResourceType,
    /// Empty for global-scoped types.
    pub mesh: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339, set by the store.
    pub creation_time: String,
    pub modification_time: String,
    /// Spec fields, flat (Universal format).
    pub spec: Map<String, Value>,
    /// Store version of this resource (monotonic per store), 0 before it is stored.
    pub version: u64,
}

const META_KEYS: [&str; 7] = ["type", "mesh", "name", "labels", "creationTime", "modificationTime", "kri"];

/// A validation problem at a field path, as in Kuma's `causes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cause {
    pub field: String,
    pub message: String,
}

impl Cause {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Cause { field: field.into(), message: message.into() }
    }
}

/// Errors from parsing or validating a resource document.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("the document is not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("resource is not valid: {}", format_causes(.0))]
    Invalid(Vec<Cause>),
}

pub fn format_causes(causes: &[Cause]) -> String {
    causes.iter().map(|c| format!("{}: {}", c.field, c.message)).collect::<Vec<_>>().join("; ")
}

impl Resource {
    pub fn new(rtype: ResourceType, mesh: &str, name: &str) -> Self {
        Resource {
            rtype,
            mesh: if rtype.is_mesh_scoped() { mesh.to_string() } else { String::new() },
            name: name.to_string(),
            labels: BTreeMap::new(),
            creation_time: String::new(),
            modification_time: String::new(),
            spec: Map::new(),
            version: 0,
        }
    }

    /// Flat REST/JSON representation.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(self.rtype.name().into()));
        if self.rtype.is_mesh_scoped() {
            m.insert("mesh".into(), Value::String(self.mesh.clone()));
        }
        m.insert("name".into(), Value::String(self.name.clone()));
        if !self.creation_time.is_empty() {
            m.insert("creationTime".into(), Value::String(self.creation_time.clone()));
            m.insert("modificationTime".into(), Value::String(self.modification_time.clone()));
        }
        if !self.labels.is_empty() {
            m.insert("labels".into(), serde_json::to_value(&self.labels).unwrap_or(Value::Null));
        }
        for (k, v) in &self.spec {
            m.insert(k.clone(), v.clone());
        }
        Value::Object(m)
    }

    /// Parse a flat document (already decoded to JSON). `type` and `name` are required.
    pub fn from_json(v: &Value) -> Result<Self, ResourceError> {
        let Value::Object(obj) = v else {
            return Err(ResourceError::Invalid(vec![Cause::new("", "the document must be an object")]));
        };
        let mut causes = Vec::new();
        let rtype = match obj.get("type") {
            Some(Value::String(t)) => match ResourceType::from_name(t) {
                Some(t) => Some(t),
                None => {
                    causes.push(Cause::new("type", format!("unknown resource type {t:?}")));
                    None
                }
            },
            _ => {
                causes.push(Cause::new("type", "must be a non-empty string"));
                None
            }
        };
        let name = match obj.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => {
                causes.push(Cause::new("name", "must be a non-empty string"));
                String::new()
            }
        };
        let mesh = match obj.get("mesh") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(m)) => m.clone(),
            Some(_) => {
                causes.push(Cause::new("mesh", "must be a string"));
                String::new()
            }
        };
        let mut labels = BTreeMap::new();
        match obj.get("labels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(l)) => {
                for (k, v) in l {
                    match v {
                        Value::String(s) => {
                            labels.insert(k.clone(), s.clone());
                        }
                        _ => causes.push(Cause::new(format!("labels[{k:?}]"), "must be a string")),
                    }
                }
            }
            Some(_) => causes.push(Cause::new("labels", "must be a map of strings")),
        }
        let Some(rtype) = rtype else {
            return Err(ResourceError::Invalid(causes));
        };
        if !causes.is_empty() {
            return Err(ResourceError::Invalid(causes));
        }
        let spec = obj.iter().filter(|(k, _)| !META_KEYS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone()));
        let mut r = Resource::new(rtype, &mesh, &name);
        if rtype.is_mesh_scoped() && mesh.is_empty() {
            r.mesh = "default".into();
        }
        r.labels = labels;
        r.spec = spec.collect();
        Ok(r)
    }

    pub fn spec_value(&self) -> Value {
        Value::Object(self.spec.clone())
    }

    /// Typed view of the spec; fields we do not know are ignored.
    pub fn typed<T: for<'de> Deserialize<'de>>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(self.spec_value())
    }

    pub fn key(&self) -> (ResourceType, String, String) {
        (self.rtype, self.mesh.clone(), self.name.clone())
    }
}

/// Decode a YAML or JSON document (JSON is a subset of YAML, but JSON is tried first for
/// precise error messages). Inputs are bounded by the caller.
pub fn parse_document(text: &str) -> Result<Value, ResourceError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        return serde_json::from_str(text).map_err(|e| ResourceError::Syntax(e.to_string()));
    }
    serde_saphyr::from_str::<Value>(text).map_err(|e| ResourceError::Syntax(first_line(&e.to_string())))
}

/// Decode every document of a multi-document YAML stream (`---` separated).
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ResourceError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return serde_json::from_str(text).map(|v| vec![v]).map_err(|e| ResourceError::Syntax(e.to_string()));
    }
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ResourceError::Syntax(first_line(&e.to_string())))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").to_string()
}

// ---------------------------------------------------------------------------------------
// Typed views
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DataplaneSpec {
    #[serde(default)]
    pub networking: Option<DataplaneNetworking>,
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

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

use kuma_model::resource::rfc1123_name as is_rfc1123_subdomain;

fn is_mesh_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c))
}

fn is_tag_key(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_:/".contains(&c))
}

fn is_tag_value(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || b".-_:".contains(&c))
}

fn check_port(causes: &mut Vec<Cause>, field: &str, port: i64) {
    if !(1..=65535).contains(&port) {
        causes.push(Cause::new(field, "port must be in the range [1, 65535]"));
    }
}

fn typed_or_cause<T: for<'de> Deserialize<'de>>(r: &Resource, causes: &mut Vec<Cause>) -> Option<T> {
    match r.typed::<T>() {
        Ok(t) => Some(t),
        Err(e) => {
            causes.push(Cause::new("", format!("cannot read the {} spec: {e}", r.rtype.name())));
            None
        }
    }
}

/// Validate name/mesh and the spec of a resource. Returns every problem found.
pub fn validate(r: &Resource) -> Result<(), Vec<Cause>> {
    let mut causes = Vec::new();
    if r.name.is_empty() {
        causes.push(Cause::new("name", "must not be empty"));
    } else if r.rtype != ResourceType::Mesh && !is_rfc1123_subdomain(&r.name) {
        causes.push(Cause::new(
            "name",
            "invalid characters: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    } else if r.rtype == ResourceType::Mesh && !is_mesh_name(&r.name) {
        causes.push(Cause::new("name", "invalid characters: allowed are lowercase letters, digits, '-', '_' and '.'"));
    }
    if r.rtype.is_mesh_scoped() && !is_mesh_name(&r.mesh) {
        causes.push(Cause::new("mesh", "invalid mesh name: allowed are lowercase letters, digits, '-', '_' and '.'"));
    }
    match r.rtype {
        ResourceType::Dataplane => validate_dataplane(r, &mut causes),
        ResourceType::ZoneIngress => validate_zone_ingress(r, &mut causes),
        ResourceType::ZoneEgress => validate_zone_egress(r, &mut causes),
        ResourceType::Mesh => validate_mesh(r, &mut causes),
        ResourceType::Zone => {
            if let Some(v) = r.spec.get("enabled")
                && !v.is_boolean()
                && !v.is_null()
            {
                causes.push(Cause::new("enabled", "must be a boolean"));
            }
        }
        ResourceType::Config => {
            if !matches!(r.spec.get("config"), Some(Value::String(_))) {
                causes.push(Cause::new("config", "must be a string"));
            }
        }
        ResourceType::Secret | ResourceType::GlobalSecret => {
            if !matches!(r.spec.get("data"), Some(Value::String(_))) {
                causes.push(Cause::new("data", "must be a base64 string"));
            }
        }
    }
    if causes.is_empty() { Ok(()) } else { Err(causes) }
}

fn validate_ip_or_host(causes: &mut Vec<Cause>, field: &str, addr: &str, required: bool) {
    if addr.is_empty() {
        if required {
            causes.push(Cause::new(field, "address can't be empty"));
        }
        return;
    }
    if let Ok(ip) = addr.parse::<IpAddr>() {
        if ip.is_unspecified() {
            causes.push(Cause::new(field, "must not be 0.0.0.0 or ::"));
        }
    } else if !addr.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.') {
        causes.push(Cause::new(field, "address has to be a valid IP address or domain name"));
    }
}

fn validate_dataplane(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<DataplaneSpec>(r, causes) else { return };
    let Some(net) = spec.networking else {
        causes.push(Cause::new("networking", "must be defined"));
        return;
    };
    validate_ip_or_host(causes, "networking.address", &net.address, true);
    if !net.advertised_address.is_empty() {
        validate_ip_or_host(causes, "networking.advertisedAddress", &net.advertised_address, false);
    }
    if net.inbound.is_empty() && net.gateway.is_none() {
        causes.push(Cause::new("networking", "has to contain at least one inbound interface or gateway"));
    }
    if let Some(admin) = &net.admin {
        check_port(causes, "networking.admin.port", admin.port);
    }
    for (i, ob) in net.outbound.iter().enumerate() {
        let p = format!("networking.outbound[{i}]");
        check_port(causes, &format!("{p}.port"), ob.port);
        if let Some(a) = &ob.address
            && !a.is_empty()
            && a.parse::<IpAddr>().is_err()
        {
            causes.push(Cause::new(format!("{p}.address"), "address has to be valid IP address"));
        }
        match (&ob.backend_ref, ob.tags.is_empty()) {
            (Some(_), false) => {
                causes.push(Cause::new(format!("{p}.tags"), "tags and backendRef cannot be defined at the same time"))
            }
            (None, true) => causes.push(Cause::new(format!("{p}.tags"), "has to contain at least one tag")),
            (None, false) if ob.tags.get(SERVICE_TAG).is_none_or(|s| s.is_empty()) => {
                causes.push(Cause::new(format!("{p}.tags[\"{SERVICE_TAG}\"]"), "tag has to exist"))
            }
            _ => {}
        }
    }
    for (i, inb) in net.inbound.iter().enumerate() {
        let p = format!("networking.inbound[{i}]");
        check_port(causes, &format!("{p}.port"), inb.port);
        if let Some(sp) = inb.service_port {
            check_port(causes, &format!("{p}.servicePort"), sp);
        }
        for (f, v) in [("address", &inb.address), ("serviceAddress", &inb.service_address)] {
            if let Some(a) = v
                && !a.is_empty()
                && a.parse::<IpAddr>().is_err()
            {
                causes.push(Cause::new(format!("{p}.{f}"), "address has to be valid IP address"));
            }
        }
        if inb.tags.is_empty() {
            causes.push(Cause::new(format!("{p}.tags"), "has to contain at least one tag"));
        } else if inb.tags.get(SERVICE_TAG).is_none_or(|s| s.is_empty()) {
            causes.push(Cause::new(format!("{p}.tags[\"{SERVICE_TAG}\"]"), "tag has to exist"));
        }
        for (k, v) in &inb.tags {
            if !is_tag_key(k) {
                causes.push(Cause::new(
                    format!("{p}.tags"),
                    format!(
                        "tag name {k:?} must consist of alphanumeric characters, dots, dashes, slashes and underscores"
                    ),
                ));
            }
            if !is_tag_value(v) {
                causes.push(Cause::new(
                    format!("{p}.tags[\"{k}\"]"),
                    "tag value must be non-empty and consist of alphanumeric characters, dots, dashes and underscores",
                ));
            }
        }
    }
}

fn validate_zone_ingress(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<ZoneIngressSpec>(r, causes) else { return };
    let n = &spec.networking;
    validate_ip_or_host(causes, "networking.address", &n.address, false);
    check_port(causes, "networking.port", n.port);
    if n.advertised_address.is_empty() != (n.advertised_port == 0) {
        let field =
            if n.advertised_address.is_empty() { "networking.advertisedAddress" } else { "networking.advertisedPort" };
        causes.push(Cause::new(field, "advertisedAddress and advertisedPort must be set together"));
    }
    if !n.advertised_address.is_empty() {
        validate_ip_or_host(causes, "networking.advertisedAddress", &n.advertised_address, false);
    }
    if n.advertised_port != 0 {
        check_port(causes, "networking.advertisedPort", n.advertised_port);
    }
    if let Some(admin) = &n.admin {
        check_port(causes, "networking.admin.port", admin.port);
        if admin.port == n.port {
            causes.push(Cause::new("networking.admin.port", "must differ from networking.port"));
        }
    }
}

fn validate_zone_egress(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<ZoneEgressSpec>(r, causes) else { return };
    validate_ip_or_host(causes, "networking.address", &spec.networking.address, false);
    check_port(causes, "networking.port", spec.networking.port);
}

fn validate_mesh(r: &Resource, causes: &mut Vec<Cause>) {
    let Some(spec) = typed_or_cause::<MeshSpec>(r, causes) else { return };
    let Some(mtls) = spec.mtls else { return };
    let mut seen = std::collections::BTreeSet::new();
    for (i, b) in mtls.backends.iter().enumerate() {
        if b.name.is_empty() {
            causes.push(Cause::new(format!("mtls.backends[{i}].name"), "cannot be empty"));
        } else if !seen.insert(b.name.clone()) {
            causes.push(Cause::new(
                format!("mtls.backends[{i}].name"),
                format!("{:?} is already used for another backend", b.name),
            ));
        }
        if !matches!(b.backend_type.as_str(), "builtin" | "provided") {
            causes.push(Cause::new(format!("mtls.backends[{i}].type"), "must be one of: builtin, provided"));
        }
        if let Some(r) = b.dp_cert.as_ref().and_then(|d| d.rotation.as_ref())
            && !r.expiration.is_empty()
            && let Err(e) = parse_duration(&r.expiration)
        {
            causes.push(Cause::new(format!("mtls.backends[{i}].dpCert.rotation.expiration"), e));
        }
        if let Some(m) = &b.mode
            && !matches!(m.as_str(), "STRICT" | "PERMISSIVE")
        {
            causes.push(Cause::new(format!("mtls.backends[{i}].mode"), "must be one of: STRICT, PERMISSIVE"));
        }
    }
    if !mtls.enabled_backend.is_empty() && !seen.contains(&mtls.enabled_backend) {
        causes.push(Cause::new("mtls.enabledBackend", "has to be set to one of the backends in the mesh"));
    }
}

/// Tag SNI as Kuma 2.x builds it: `<service>{k1=v1,k2=v2}` over the tags without
/// `kuma.io/service`, keys byte-sorted, no escaping (`kuma-dp.md` 4.1).
pub fn sni_from_tags(service: &str, tags: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> =
        tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG).map(|(k, v)| format!("{k}={v}")).collect();
    format!("{service}{{{}}}", inner.join(","))
}

/// A DNS-valid alias of a tag SNI, `a<fnv-1a 64 of the tag SNI>.<mesh-free>.sni`.
/// TLS clients that can only send DNS names (rustls, so `dp`) cannot send
/// `backend{mesh=default}`; ingress chains list this alias next to the tag SNI and
/// `dp` sidecars are given it instead, while Envoy keeps Kuma's tag SNI.
pub fn dns_sni_alias(tag_sni: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag_sni.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("a{h:016x}.sni")
}

/// RFC 3339 UTC timestamp with second precision, e.g. `2026-01-02T03:04:05Z`.
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// Inverse of [`rfc3339`] for the format it writes; `None` for anything else.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let days = days_from_civil(y, mo, d);
    u64::try_from(days * 86_400 + h * 3600 + mi * 60 + se).ok()
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub use kuma_model::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_keys_sorted_service_excluded() {
        let mut t = BTreeMap::new();
        t.insert("kuma.io/service".to_string(), "backend".to_string());
        t.insert("version".to_string(), "v1".to_string());
        t.insert("mesh".to_string(), "default".to_string());
        t.insert("kuma.io/zone".to_string(), "zone-1".to_string());
        assert_eq!(sni_from_tags("backend", &t), "backend{kuma.io/zone=zone-1,mesh=default,version=v1}");
    }

    #[test]
    fn time_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(parse_rfc3339("2023-11-14T22:13:20Z"), Some(1_700_000_000));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap().as_secs(), 10);
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("720h").unwrap().as_secs(), 720 * 3600);
        assert_eq!(parse_duration("100ms").unwrap().as_millis(), 100);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn dataplane_validation_paths() {
        let v: Value = serde_json::json!({
            "type": "Dataplane", "mesh": "default", "name": "dp-1",
            "networking": {"address": "", "inbound": [{"port": 70000, "tags": {"version": "v1"}}]}
        });
        let r = Resource::from_json(&v).unwrap();
        let causes = validate(&r).unwrap_err();
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"networking.address"), "{fields:?}");
        assert!(fields.contains(&"networking.inbound[0].port"), "{fields:?}");
        assert!(fields.contains(&"networking.inbound[0].tags[\"kuma.io/service\"]"), "{fields:?}");
    }

    #[test]
    fn flat_round_trip() {
        let v: Value = serde_json::json!({"type": "Mesh", "name": "default", "mtls": {"enabledBackend": "ca-1",
            "backends": [{"name": "ca-1", "type": "builtin"}]}, "extra": 1});
        let r = Resource::from_json(&v).unwrap();
        validate(&r).unwrap();
        assert!(mesh_mtls_enabled(&r));
        let back = r.to_json();
        assert_eq!(back["extra"], 1);
        assert_eq!(back["mtls"]["enabledBackend"], "ca-1");
    }
}
