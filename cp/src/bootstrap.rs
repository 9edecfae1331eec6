//! `POST /bootstrap`: kuma-dp 2.14's request, and an Envoy v3 bootstrap in the response.

use std::sync::Arc;

use base64::Engine;
use serde::Serialize;
use serde_json::{Value, json};

use crate::components::zone::ZoneCp;
use crate::config::{DpProxyAuth, ZoneProxyAuth};
use crate::model::{DataplaneSpec, Resource, ResourceType, ZoneIngressSpec};

pub use kuma_model::proxy::BootstrapRequest;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapResponse {
    /// Base64 of the Envoy bootstrap YAML (Go `[]byte` in JSON).
    pub bootstrap: String,
    pub kuma_sidecar_configuration: Value,
}

/// Error with the HTTP status kuma-dp expects.
#[derive(Debug)]
pub struct BootstrapError {
    pub status: u16,
    pub message: String,
}

fn err(status: u16, message: impl Into<String>) -> BootstrapError {
    BootstrapError { status, message: message.into() }
}

/// Handle a bootstrap request. `host` is the hostname the client used (Host header).
pub async fn handle(cp: &Arc<ZoneCp>, req: BootstrapRequest, host: &str) -> Result<(String, Value), BootstrapError> {
    let proxy_type = req.proxy_type().map_err(|e| err(422, e))?;
    let rtype = crate::model::proxy_resource_type(proxy_type);
    let token_required = match rtype {
        ResourceType::ZoneIngress | ResourceType::ZoneEgress => cp.cfg.zone_proxy_auth == ZoneProxyAuth::ZoneToken,
        _ => cp.cfg.dp_proxy_auth == DpProxyAuth::DpToken,
    };
    if token_required && req.dataplane_token.trim().is_empty() && req.dataplane_token_path.is_empty() {
        let msg = if rtype == ResourceType::Dataplane {
            "Dataplane Token is required. Generate token using 'ctl generate dataplane-token > file' and provide it via \
             --dataplane-token-file=file argument to kuma-dp"
        } else {
            "Zone Token is required. Generate token using 'ctl generate zone-token --zone <zone> --scope ingress \
             --scope egress > file' and provide it via --dataplane-token-file=file argument to kuma-dp"
        };
        return Err(err(422, msg));
    }

    // The proxy's resource: inline (Universal) or from the store.
    let resource = if req.dataplane_resource.is_empty() {
        let mesh = if rtype.is_mesh_scoped() { req.mesh.as_str() } else { "" };
        match cp.store.get(rtype, mesh, &req.name).await.map_err(|e| err(500, e.to_string()))? {
            Some(r) => r,
            None => return Err(err(404, "")),
        }
    } else {
        if req.dataplane_resource.len() > 1024 * 1024 {
            return Err(err(422, "dataplaneResource is larger than 1 MiB"));
        }
        let v: Value = serde_json::from_str(&req.dataplane_resource)
            .map_err(|e| err(422, format!("dataplaneResource is not JSON: {e}")))?;
        let r = Resource::from_json(&v).map_err(|e| err(422, format!("dataplaneResource: {e}")))?;
        if r.rtype != rtype {
            return Err(err(422, format!("resource type {} does not match proxy type {proxy_type}", r.rtype.name())));
        }
        crate::model::validate(&r)
            .map_err(|c| err(422, format!("dataplaneResource: {}", crate::model::format_causes(&c))))?;
        r
    };
    // A sidecar's mesh must exist; its Prometheus backend says which applications' metrics
    // the proxy serves beside its own.
    let mut aggregate = vec![];
    if rtype == ResourceType::Dataplane {
        let mesh = cp.store.get(ResourceType::Mesh, "", &resource.mesh).await.map_err(|e| err(500, e.to_string()))?;
        let Some(mesh) = mesh else {
            return Err(err(422, format!("mesh {:?} does not exist", resource.mesh)));
        };
        let (mesh, dp) = (mesh.typed().unwrap_or_default(), resource.typed().unwrap_or_default());
        aggregate = crate::xds::prometheus::aggregate(&mesh, &dp);
    }

    // ADS endpoint the proxy must use, and its TLS validation.
    let xds_host = cp.cfg.xds_host.clone().unwrap_or_else(|| host.to_string());
    if cp.cfg.xds_host.is_none() && !cp.tls_sans.is_empty() && !crate::tls::host_matches_sans(&xds_host, &cp.tls_sans) {
        return Err(err(
            400,
            format!(
                "A data plane proxy is trying to connect to the control plane using {xds_host:?}, but the control \
                 plane certificate only has the SANs {:?}. Use one of those in --cp-address, or restart cp with \
                 --tls-san {xds_host} (KUMA_GENERAL_TLS_SANS) or KUMA_BOOTSTRAP_SERVER_PARAMS_XDS_HOST",
                cp.tls_sans
            ),
        ));
    }
    let xds_port = cp.cfg.xds_port.unwrap_or_else(|| cp.dp_port.load(std::sync::atomic::Ordering::Relaxed));
    let ca_pem = if req.ca_cert.trim().is_empty() { cp.ca_pem.clone() } else { req.ca_cert.clone() };

    let (address, admin_port) = match rtype {
        ResourceType::Dataplane => {
            let spec: DataplaneSpec = resource.typed().unwrap_or_default();
            let net = spec.networking.unwrap_or_default();
            let admin = net.admin.map(|a| a.port).filter(|p| *p > 0);
            (net.address, admin)
        }
        _ => {
            let spec: ZoneIngressSpec = resource.typed().unwrap_or_default();
            let admin = spec.networking.admin.map(|a| a.port).filter(|p| *p > 0);
            (spec.networking.address, admin)
        }
    };
    let admin_port = admin_port.and_then(|p| u16::try_from(p).ok()).unwrap_or(cp.cfg.admin_port);
    let cluster = match rtype {
        ResourceType::ZoneIngress => "ingress".to_string(),
        ResourceType::ZoneEgress => "egress".to_string(),
        _ => resource
            .typed::<DataplaneSpec>()
            .ok()
            .and_then(|s| s.networking)
            .and_then(|n| n.inbound.first().and_then(|i| i.tags.get(crate::model::SERVICE_TAG).cloned()))
            .unwrap_or_else(|| "unknown".into()),
    };
    let node_id = format!("{}.{}", resource.mesh, resource.name);
    let token = req.dataplane_token.trim().to_string();
    let delta = req.has_feature(kuma_model::proxy::features::DELTA_GRPC);

    let mut metadata = serde_json::Map::new();
    metadata.insert("version".into(), req.version.clone());
    metadata.insert("features".into(), json!(req.features));
    metadata.insert("workdir".into(), json!(req.workdir));
    metadata.insert("dataplane.admin.port".into(), json!(admin_port.to_string()));
    metadata.insert("dataplane.admin.address".into(), json!("127.0.0.1"));
    metadata.insert(
        "dataplane.readinessReporter.port".into(),
        json!(if req.readiness_port > 0 { req.readiness_port } else { 9902 }.to_string()),
    );
    if req.dns_port > 0 {
        metadata.insert("dataplane.dns.port".into(), json!(req.dns_port.to_string()));
    }
    if req.app_probe_proxy_disabled {
        metadata.insert("dataplane.appProbeProxy.enabled".into(), json!("true"));
    }
    metadata.insert("dataplane.proxyType".into(), json!(proxy_type.as_str()));
    metadata.insert("dataplane.resource".into(), json!(resource.to_json().to_string()));
    if let Some(dm) = &req.dynamic_metadata {
        metadata.insert("dynamicMetadata".into(), json!(dm));
    }
    if let Some(v6) = req.ipv6_enabled {
        metadata.insert("ipv6Enabled".into(), json!(v6));
    }
    if !req.system_ca_path.is_empty() {
        metadata.insert("systemCaPath".into(), json!(req.system_ca_path));
    }
    // kuma-dp --transparent-proxy: the redirect ports travel with the proxy, not in the
    // Dataplane (feature-transparent-proxy-in-dataplane-metadata).
    if !req.dataplane_config.is_null() {
        metadata.insert("transparentProxy".into(), req.dataplane_config.clone());
    }

    let host_is_ip = xds_host.parse::<std::net::IpAddr>().is_ok();
    let san_type = if host_is_ip { "IP_ADDRESS" } else { "DNS" };
    let mut ads_cluster = json!({
        "name": "ads_cluster",
        "type": if host_is_ip { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "upstream_connection_options": {
            "tcp_keepalive": {"keepalive_probes": 3, "keepalive_time": 10, "keepalive_interval": 10}
        },
        "load_assignment": {
            "cluster_name": "ads_cluster",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": xds_host, "port_value": xds_port}}}}]}]
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": xds_host,
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                    "validation_context_sds_secret_config": {"name": "cp_validation_ctx"}
                }
            }
        }
    });
    if !host_is_ip {
        ads_cluster["dns_lookup_family"] = json!("V4_PREFERRED");
    }
    let mut grpc_service = json!({"envoy_grpc": {"cluster_name": "ads_cluster"}});
    if !token.is_empty() {
        grpc_service["initial_metadata"] = json!([{"key": "authorization", "value": token}]);
    }
    let ads_source = json!({"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"});
    let bootstrap = json!({
        "node": {"id": node_id, "cluster": cluster, "metadata": Value::Object(metadata)},
        "dynamic_resources": {
            "lds_config": ads_source,
            "cds_config": ads_source,
            "ads_config": {
                "api_type": if delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [grpc_service]
            }
        },
        "static_resources": {
            "secrets": [{
                "name": "cp_validation_ctx",
                "validation_context": {
                    "trusted_ca": {"inline_bytes": base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes())},
                    "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": xds_host}}]
                }
            }],
            "clusters": [ads_cluster]
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}},
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": "/dev/null"
                }
            }]
        },
        "layered_runtime": {"layers": [{"name": "kuma", "static_layer": {
            "re2.max_program_size.error_level": 4294967295u64,
            "re2.max_program_size.warn_level": 1000
        }}]}
    });
    let yaml =
        serde_saphyr::to_string(&bootstrap).map_err(|e| err(500, format!("cannot render the bootstrap: {e}")))?;
    let sidecar = json!({
        "networking": {"address": address, "corefileTemplate": null},
        "metrics": {"aggregate": aggregate}
    });
    Ok((yaml, sidecar))
}
