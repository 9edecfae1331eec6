//! The vocabulary `dp` and `cp` speak to each other, in one place so that both sides agree
//! byte for byte: proxy types, the `feature-*` strings a proxy announces, and the body of
//! `POST /bootstrap` (`kumahq/kuma:pkg/xds/bootstrap/types/bootstrap_request.go`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a proxy runs as (`--proxy-type`, the bootstrap's `proxyType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ProxyType {
    /// A sidecar (`Dataplane`); Kuma's default when none is given.
    #[default]
    Dataplane,
    /// A zone ingress (`ZoneIngress`).
    Ingress,
    /// A zone egress (`ZoneEgress`).
    Egress,
}

impl ProxyType {
    pub const ALL: [ProxyType; 3] = [ProxyType::Dataplane, ProxyType::Ingress, ProxyType::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyType::Dataplane => "dataplane",
            ProxyType::Ingress => "ingress",
            ProxyType::Egress => "egress",
        }
    }

    /// The Kuma resource type such a proxy runs as.
    pub fn resource_type(self) -> &'static str {
        match self {
            ProxyType::Dataplane => "Dataplane",
            ProxyType::Ingress => "ZoneIngress",
            ProxyType::Egress => "ZoneEgress",
        }
    }

    /// The proxy type of a resource type (`Dataplane`, `ZoneIngress`, `ZoneEgress`).
    pub fn of_resource_type(name: &str) -> Option<ProxyType> {
        Self::ALL.into_iter().find(|p| p.resource_type() == name)
    }

    /// A zone proxy (authenticated with a zone token).
    pub fn is_zone_proxy(self) -> bool {
        self != ProxyType::Dataplane
    }
}

impl FromStr for ProxyType {
    type Err = String;
    /// `dataplane`, `ingress` or `egress`; empty means `dataplane` (Kuma's default).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "dataplane" => Ok(ProxyType::Dataplane),
            "ingress" => Ok(ProxyType::Ingress),
            "egress" => Ok(ProxyType::Egress),
            other => Err(format!("proxy type {other:?} is not one of dataplane, ingress, egress")),
        }
    }
}

impl fmt::Display for ProxyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `features` a proxy announces in its bootstrap request (kuma-dp 2.14's names).
pub mod features {
    /// Delta xDS instead of State of the World.
    pub const DELTA_GRPC: &str = "feature-delta-grpc";
    /// The proxy runs Kuma's embedded DNS proxy and reads `/dns` from the dynamic-config listener.
    pub const EMBEDDED_DNS: &str = "feature-embedded-dns";
    /// Outbounds bound on this host (127.0.0.0/8) instead of transparent proxying.
    pub const BIND_OUTBOUNDS: &str = "feature-bind-outbounds";
    /// Listeners may set `enable_reuse_port`.
    pub const REUSE_PORT: &str = "feature-reuse-port";
    /// The transparent-proxy config travels in the bootstrap request (`dataplaneConfig`).
    pub const TRANSPARENT_PROXY_IN_METADATA: &str = "feature-transparent-proxy-in-dataplane-metadata";
}

/// The JSON body of `POST /bootstrap` (fields Kuma 2.14 defines; absent ones default).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BootstrapRequest {
    pub mesh: String,
    pub name: String,
    /// `dataplane`, `ingress` or `egress` (see [`ProxyType`]); a string on the wire.
    pub proxy_type: String,
    pub dataplane_token: String,
    pub dataplane_token_path: String,
    /// The proxy's resource as JSON text (Universal `--dataplane-file`).
    pub dataplane_resource: String,
    /// `{kumaDp: {...}, envoy: {...}}`.
    pub version: Value,
    pub ca_cert: String,
    pub dynamic_metadata: Option<BTreeMap<String, String>>,
    /// Where the control plane should put the `.mesh` DNS listener; 0: no DNS.
    pub dns_port: u32,
    pub readiness_port: u32,
    pub app_probe_proxy_disabled: bool,
    pub operating_system: String,
    pub features: Vec<String>,
    pub resources: Value,
    pub workdir: String,
    pub metrics_resources: Value,
    pub system_ca_path: String,
    pub dataplane_config: Value,
    pub ipv6_enabled: Option<bool>,
}

impl BootstrapRequest {
    /// The request's proxy type.
    pub fn proxy_type(&self) -> Result<ProxyType, String> {
        self.proxy_type.parse()
    }

    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_types_round_trip_and_map_to_resources() {
        for p in ProxyType::ALL {
            assert_eq!(p.as_str().parse::<ProxyType>(), Ok(p));
            assert_eq!(ProxyType::of_resource_type(p.resource_type()), Some(p));
        }
        assert_eq!("".parse::<ProxyType>(), Ok(ProxyType::Dataplane));
        assert!("gateway".parse::<ProxyType>().unwrap_err().contains("not one of"));
    }

    #[test]
    fn the_bootstrap_request_uses_kumas_field_names() {
        let r = BootstrapRequest {
            proxy_type: "ingress".into(),
            dns_port: 15054,
            features: vec![features::DELTA_GRPC.into()],
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["proxyType"], "ingress");
        assert_eq!(v["dnsPort"], 15054);
        assert_eq!(v["dataplaneTokenPath"], "");
        let back: BootstrapRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        assert!(back.has_feature(features::DELTA_GRPC));
        // What an older or newer kuma-dp leaves out defaults; what it adds is ignored.
        let sparse: BootstrapRequest = serde_json::from_str(r#"{"name":"x","somethingNew":1}"#).unwrap();
        assert_eq!(sparse.proxy_type(), Ok(ProxyType::Dataplane));
    }
}
