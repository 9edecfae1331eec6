//! `dp run` against a control plane: bootstrap, then ADS; every accepted xDS state is
//! turned into a snapshot, and a state the snapshot builder refuses is NACKed with
//! its reason while the previous snapshot keeps serving.

use crate::app::Applier;
use crate::bootstrap::{self, Request};
use crate::cli::RunArgs;
use crate::cp_inputs::CpInputs;
use crate::resources::Resources;
use crate::snapshot::{self, DnsAnswers};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use prost::Name;
use std::collections::BTreeMap;
use std::net::ToSocketAddrs;
use tracing::info;

/// The types `dp` subscribes to, in the order Envoy asks for them.
pub fn type_urls() -> Vec<String> {
    vec![Cluster::type_url(), ClusterLoadAssignment::type_url(), Listener::type_url(), Secret::type_url()]
}

/// Validates the inputs, bootstraps, and starts the ADS client. Returns once the
/// client runs; readiness is set by the caller when the first state is applied.
pub async fn start(
    args: &RunArgs,
    inputs: CpInputs,
    applier: Applier,
) -> anyhow::Result<tokio::sync::watch::Receiver<xds_client::Status>> {
    let ca_pem = match &inputs.trust {
        bootstrap::Trust::Ca(pem) => String::from_utf8_lossy(pem).into_owned(),
        _ => String::new(),
    };
    let request = Request {
        mesh: inputs.mesh.clone(),
        name: inputs.name.clone(),
        proxy_type: args.proxy(),
        token: inputs.token.clone(),
        token_path: inputs.token_path.clone(),
        resource: inputs.resource.as_ref().map(|r| r.json.clone()).unwrap_or_default(),
        ca_pem,
        readiness_port: args.readiness_port,
        workdir: args.work_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        delta: inputs.delta,
        dns_port: args.dns_enabled.then_some(args.dns_envoy_port),
        embedded_dns: args.embedded_dns(),
        bind_outbounds: args.bind_outbounds,
        transparent_proxy: args.transparent_proxy,
    };
    info!(control_plane = %inputs.cp.url(), proxy_type = %args.proxy_type, name = %inputs.name, "bootstrapping");
    let boot = bootstrap::fetch(&inputs.cp, &inputs.trust, &request, args.retry_backoff, args.retry_max_duration)
        .await
        .map_err(anyhow::Error::msg)?;
    info!(node = %boot.node.id, delta = boot.delta, "bootstrap received; connecting ADS");
    let config = xds_client::Config {
        endpoint: inputs.cp.url(),
        ca_pem: match &inputs.trust {
            bootstrap::Trust::Ca(pem) => Some(pem.clone()),
            _ => None,
        },
        skip_verify: matches!(inputs.trust, bootstrap::Trust::SkipVerify),
        tls_server_name: None,
        node: boot.node,
        token: Some(inputs.token).filter(|t| !t.is_empty()),
        variant: if boot.delta || inputs.delta { xds_client::Variant::Delta } else { xds_client::Variant::Sotw },
        type_urls: type_urls(),
        backoff: Default::default(),
    };
    let (tx, rx) = tokio::sync::watch::channel(xds_client::Status::default());
    tokio::spawn(async move {
        let Err(e) = xds_client::run(config, AdsHandler { applier, built: None }, tx).await;
        tracing::error!("the xDS client stopped: {e}");
    });
    Ok(rx)
}

struct AdsHandler {
    applier: Applier,
    /// (name, version) of every resource, by type, of the last state built; `None`
    /// before the first build.
    built: Option<BTreeMap<String, Vec<(String, String)>>>,
}

/// (name, version) of each resource of every type in `state`.
fn fingerprint(state: &xds_client::State) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = state
        .resources
        .iter()
        .map(|(t, items)| (t.clone(), items.iter().map(|(n, r)| (n.clone(), r.version.clone())).collect()))
        .collect();
    out.retain(|_, v| !v.is_empty());
    out
}

impl xds_client::Handler for AdsHandler {
    /// Builds the whole snapshot from the state, except when that cannot change what
    /// is served: before the first listeners arrive (clusters alone serve nothing; this
    /// spares the builds of the CDS and EDS responses at startup), and when the state
    /// holds the same resources as the last build (an empty SDS response, a resend).
    fn apply(&mut self, state: &xds_client::State, changed: &str) -> Result<(), String> {
        let listeners = Listener::type_url();
        if self.built.is_none() && !state.resources.contains_key(&listeners) {
            tracing::debug!(changed, "no listeners yet: accepted without building");
            return Ok(());
        }
        let print = fingerprint(state);
        if self.built.as_ref() == Some(&print) {
            tracing::debug!(changed, "same resources as in force: accepted without building");
            return Ok(());
        }
        let mut r = Resources::default();
        let mut versions = vec![];
        for (type_url, items) in &state.resources {
            for (name, res) in items {
                r.push_any(&res.any).map_err(|e| format!("{name}: {e}"))?;
            }
            let short = type_url.rsplit('.').next().unwrap_or(type_url);
            let v = items.values().map(|x| x.version.as_str()).max().unwrap_or("");
            versions.push(format!("{short}:{v}"));
        }
        r.version = versions.join(",");
        r.raw = state.resources.values().flat_map(|items| items.values().map(|x| x.any.clone())).collect();
        let names = snapshot::dns_names(&r);
        let dns =
            if names.is_empty() { DnsAnswers::new() } else { tokio::task::block_in_place(|| resolve_blocking(&names)) };
        self.applier.apply(r, &dns)?;
        self.built = Some(print);
        Ok(())
    }
}

fn resolve_blocking(names: &[(String, u16)]) -> DnsAnswers {
    names
        .iter()
        .map(|(h, p)| {
            let mut v: Vec<_> = (h.as_str(), *p).to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
            v.sort();
            ((h.clone(), *p), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    fn state(types: &[(&str, &[(&str, &str)])]) -> xds_client::State {
        let mut s = xds_client::State::default();
        for (t, items) in types {
            let m = items
                .iter()
                .map(|(n, v)| (n.to_string(), xds_client::Resource { version: v.to_string(), any: Any::default() }))
                .collect();
            s.resources.insert(t.to_string(), m);
        }
        s
    }

    #[test]
    fn an_empty_type_does_not_change_the_fingerprint_but_a_new_version_does() {
        let before = state(&[("cds", &[("a", "1")]), ("lds", &[("l", "1")])]);
        let empty_sds = state(&[("cds", &[("a", "1")]), ("lds", &[("l", "1")]), ("sds", &[])]);
        let new_version = state(&[("cds", &[("a", "2")]), ("lds", &[("l", "1")])]);
        assert_eq!(fingerprint(&before), fingerprint(&empty_sds));
        assert_ne!(fingerprint(&before), fingerprint(&new_version));
    }
}
