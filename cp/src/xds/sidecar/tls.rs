//! Kuma's mesh mTLS contexts: the server side of inbounds and the client side of
//! outbounds (identity and CA from SDS, SPIFFE SAN matching, the tag SNI).

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::core::v3::{ConfigSource, TransportSocket, transport_socket};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
    UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use super::KUMA_ALPN;
use crate::ca::{identity_secret_name, mesh_ca_secret_name};
use crate::xds::generate::ads_config_source;
use crate::xds::meshtls::MeshTls;
use crate::xds::sni::sni_from_tags;

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig { name: name.to_string(), sds_config: Some(ConfigSource { ..ads_config_source() }) }
}

fn uri_san(m: string_matcher::MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher { match_pattern: Some(m), ignore_case: false }),
        oid: String::new(),
    }
}

/// `CommonTlsContext` of Kuma's mesh mTLS: identity from SDS, validation = mesh CA from SDS
/// combined with a URI SAN matcher.
fn common_tls(mesh: &str, san: string_matcher::MatchPattern, alpn: &[&str]) -> CommonTlsContext {
    CommonTlsContext {
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        tls_certificate_sds_secret_configs: vec![sds(&identity_secret_name(mesh))],
        validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: vec![uri_san(san)],
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(&mesh_ca_secret_name(mesh))),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

pub(crate) fn tls_socket<T: prost::Message + prost::Name>(ctx: T) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(pack_any(ctx))),
    }
}

/// Server side (inbound): client certificate required, peer SAN URI prefix `spiffe://<mesh>/`.
pub fn downstream_tls(mesh: &str) -> DownstreamTlsContext {
    DownstreamTlsContext {
        common_tls_context: Some(common_tls(
            mesh,
            string_matcher::MatchPattern::Prefix(format!("spiffe://{mesh}/")),
            &[],
        )),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    }
}

/// Client side (outbound): SNI from tags, ALPN `kuma`, peer SAN URI exactly `spiffe://<mesh>/<service>`.
pub fn upstream_tls(mesh: &str, service: &str) -> UpstreamTlsContext {
    upstream_tls_via(mesh, service, service)
}

/// Client side to `service` through a proxy that presents `peer`'s identity: the SNI
/// names the service, the certificate must be `peer`'s (a ZoneEgress terminating the
/// mTLS of an ExternalService presents `zone-egress`).
pub fn upstream_tls_via(mesh: &str, service: &str, peer: &str) -> UpstreamTlsContext {
    upstream_tls_subset(mesh, service, peer, &BTreeMap::new())
}

/// Client side to the endpoints of `service` that carry `subset`'s tags: Kuma's tag SNI
/// names them (`backend{mesh=default,version=v2}`).
pub(super) fn upstream_tls_subset(
    mesh: &str,
    service: &str,
    peer: &str,
    subset: &BTreeMap<String, String>,
) -> UpstreamTlsContext {
    let mut tags = subset.clone();
    tags.insert("mesh".to_string(), mesh.to_string());
    let tag_sni = sni_from_tags(service, &tags);
    UpstreamTlsContext {
        common_tls_context: Some(common_tls(
            mesh,
            string_matcher::MatchPattern::Exact(format!("spiffe://{mesh}/{peer}")),
            &[KUMA_ALPN],
        )),
        sni: tag_sni,
        ..Default::default()
    }
}

/// MeshTLS's versions and ciphers on a mesh mTLS context, server or client side.
pub(super) fn with_params(ctx: &mut Option<CommonTlsContext>, tls: &MeshTls) {
    if let (Some(ctx), Some(p)) = (ctx.as_mut(), &tls.params) {
        ctx.tls_params = Some(p.clone());
    }
}
