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
use prost::{Message, Name};
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
    work_dir: &std::path::Path,
    inputs: CpInputs,
    applier: Applier,
) -> anyhow::Result<(tokio::sync::watch::Receiver<xds_client::Status>, Vec<crate::metrics_socket::App>)> {
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
        workdir: work_dir.display().to_string(),
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
    let apps = boot.apps;
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
    crate::app::spawn_config_thread("dp-xds", async move {
        let Err(e) = xds_client::run(config, AdsHandler::new(applier), tx).await;
        tracing::error!("the xDS client stopped: {e}");
    })?;
    Ok((rx, apps))
}

struct AdsHandler {
    applier: Applier,
    /// name -> version of every resource, by type, of the last state built; `None`
    /// before the first build.
    built: Option<Fingerprint>,
    /// Each type's highest resource version in force (what [`version_of`] reports), kept
    /// up to date by in-place updates without a walk over every resource.
    highest: BTreeMap<String, String>,
}

type Fingerprint = BTreeMap<String, BTreeMap<String, String>>;

impl AdsHandler {
    fn new(applier: Applier) -> Self {
        AdsHandler { applier, built: None, highest: BTreeMap::new() }
    }
}

/// name -> version of each resource of every type in `state`.
fn fingerprint(state: &xds_client::State) -> Fingerprint {
    let mut out: Fingerprint = state
        .resources
        .iter()
        .map(|(t, items)| (t.clone(), items.iter().map(|(n, r)| (n.clone(), r.version.clone())).collect()))
        .collect();
    out.retain(|_, v| !v.is_empty());
    out
}

/// The highest version of some resources ("" for none).
fn highest(items: &BTreeMap<String, xds_client::Resource>) -> String {
    items.values().map(|x| x.version.as_str()).max().unwrap_or("").to_string()
}

/// Each type's highest resource version in `state`.
fn highest_versions(state: &xds_client::State) -> BTreeMap<String, String> {
    state.resources.iter().map(|(t, items)| (t.clone(), highest(items))).collect()
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
        if changed == ClusterLoadAssignment::type_url() && self.endpoints_in_place(state)? {
            return Ok(());
        }
        let print = fingerprint(state);
        if self.built.as_ref() == Some(&print) {
            tracing::debug!(changed, "same resources as in force: accepted without building");
            return Ok(());
        }
        let mut r = Resources::default();
        for (name, res) in state.resources.values().flatten() {
            r.push_any(&res.any).map_err(|e| format!("{name}: {e}"))?;
        }
        // In a pass of their own (see `Resources::raw`), with where each assignment is.
        for (type_url, items) in &state.resources {
            for (name, res) in items {
                if *type_url == ClusterLoadAssignment::type_url() {
                    r.raw_endpoint_slots.insert(name.clone(), r.raw.len());
                }
                r.raw.push(res.any.clone());
            }
        }
        let highest = highest_versions(state);
        r.version = version_of(&highest);
        let names = snapshot::dns_names(&r);
        // Blocking is fine here: this runs on the xDS thread, not on the data path.
        let dns = if names.is_empty() { DnsAnswers::new() } else { resolve_blocking(&names) };
        self.applier.apply(r, &dns)?;
        self.built = Some(print);
        self.highest = highest;
        Ok(())
    }
}

impl AdsHandler {
    /// An update that changed only the versions of assignments already held (the usual
    /// endpoint churn) is applied in place: only those are decoded, and only their
    /// clusters' hosts change. A Delta response names what it changed, so nothing else is
    /// looked at. `Ok(false)`: not such an update, build it whole.
    fn endpoints_in_place(&mut self, state: &xds_client::State) -> Result<bool, String> {
        let cla = ClusterLoadAssignment::type_url();
        let Some(built) = self.built.as_mut() else { return Ok(false) };
        let (empty, empty_held) = (BTreeMap::new(), BTreeMap::new());
        let now = state.resources.get(&cla).unwrap_or(&empty);
        let held = built.get(&cla).unwrap_or(&empty_held);
        let Some(changed) = changed_assignments(state.delta.as_ref(), now, held) else { return Ok(false) };
        if changed.is_empty() {
            tracing::debug!("same assignments as in force: accepted without building");
            return Ok(true);
        }
        let mut updates = Vec::with_capacity(changed.len());
        for (name, res) in &changed {
            let a = ClusterLoadAssignment::decode(res.any.value.as_slice()).map_err(|e| format!("{name}: {e}"))?;
            updates.push(((*name).clone(), res.any.clone(), a));
        }
        // The highest version after the update: a walk over every assignment only when the
        // highest one was replaced by a lower one.
        let mut top = self.highest.get(&cla).cloned().unwrap_or_default();
        let mut lowered = false;
        for (name, res) in &changed {
            if res.version > top {
                top = res.version.clone();
            } else if held.get(*name).is_some_and(|old| *old == top) {
                lowered = true;
            }
        }
        if lowered {
            top = highest(now);
        }
        let mut versions = self.highest.clone();
        versions.insert(cla.clone(), top);
        if !self.applier.apply_endpoints(updates, version_of(&versions))? {
            return Ok(false);
        }
        let entries = built.entry(cla).or_default();
        for (name, res) in changed {
            entries.insert(name.clone(), res.version.clone());
        }
        self.highest = versions;
        Ok(true)
    }
}

/// The assignments whose version changed, when the update changed nothing but versions of
/// assignments `held` has; `None` otherwise. `delta`: the names a Delta response changed
/// (only those are looked at); `None` (State of the World): every one is compared.
fn changed_assignments<'a>(
    delta: Option<&'a xds_client::DeltaChange>,
    now: &'a BTreeMap<String, xds_client::Resource>,
    held: &BTreeMap<String, String>,
) -> Option<Vec<(&'a String, &'a xds_client::Resource)>> {
    let mut changed = vec![];
    match delta {
        Some(d) => {
            if !d.removed.is_empty() {
                return None;
            }
            for name in &d.upserted {
                let (name, res) = now.get_key_value(name)?;
                if *held.get(name)? != res.version {
                    changed.push((name, res));
                }
            }
        }
        None => {
            if held.len() != now.len() {
                return None;
            }
            for ((old_name, old_version), (name, res)) in held.iter().zip(now) {
                if old_name != name {
                    return None;
                }
                if *old_version != res.version {
                    changed.push((name, res));
                }
            }
        }
    }
    Some(changed)
}

/// The version a state is reported as: each type's highest resource version.
fn version_of(highest: &BTreeMap<String, String>) -> String {
    let short = |t: &str| t.rsplit('.').next().unwrap_or(t).to_string();
    highest.iter().map(|(t, v)| format!("{}:{v}", short(t))).collect::<Vec<_>>().join(",")
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

    mod in_place {
        use super::super::*;
        use crate::conn::Ctx;
        use crate::snapshot::Snapshot;
        use envoy_types::pb::google::protobuf::Any;
        use serde_json::json;
        use std::sync::Arc;

        /// `name` as an xDS resource, from its proto3 JSON.
        fn any(v: serde_json::Value) -> Any {
            let doc = json!({"resources": [v]});
            let r = Resources::from_file_bytes(&serde_json::to_vec(&doc).unwrap(), "1").unwrap();
            r.encode().items.get(0).unwrap().as_ref().clone()
        }

        fn eds_cluster(name: &str) -> Any {
            any(json!({"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": name,
                "type": "EDS", "connectTimeout": "1s", "edsClusterConfig": {"edsConfig": {"ads": {}}},
                "lbSubsetConfig": {"subsetSelectors": [{"keys": ["version"]}], "fallbackPolicy": "NO_FALLBACK"}}))
        }

        fn assignment(name: &str, ports: &[u16]) -> Any {
            let eps: Vec<_> = ports
                .iter()
                .map(|p| {
                    json!({"endpoint": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": p}}},
                    "metadata": {"filterMetadata": {"envoy.lb": {"version": "v1"}}}})
                })
                .collect();
            any(json!({"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "clusterName": name, "endpoints": [{"lbEndpoints": eps}]}))
        }

        /// A listener whose one chain sends to `a`'s `version: v1` subset.
        fn listener() -> Any {
            any(json!({"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l",
                "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
                "filterChains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "cluster": "a", "statPrefix": "a",
                    "metadataMatch": {"filterMetadata": {"envoy.lb": {"version": "v1"}}}}}]}]}))
        }

        fn put(s: &mut xds_client::State, type_url: String, name: &str, version: &str, any: Any) {
            s.resources
                .entry(type_url)
                .or_default()
                .insert(name.into(), xds_client::Resource { version: version.into(), any });
        }

        fn ports(set: &crate::snapshot::cluster::HostSet) -> Vec<u16> {
            set.hosts.iter().map(|h| h.addr.port()).collect()
        }

        fn target_hosts(snap: &Snapshot) -> Vec<u16> {
            let chain = &snap.listeners["l"].chains[0];
            let crate::snapshot::Action::TcpProxy(tp) = &chain.action else { panic!("a tcp_proxy chain") };
            ports(&tp.targets[0].hosts())
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
        async fn an_endpoint_update_swaps_one_clusters_hosts_and_keeps_every_other_object() {
            let ctx = Ctx::new(Default::default(), crate::drain::Drain::new());
            let mut h = AdsHandler::new(crate::app::Applier::for_test(ctx.clone()));
            let mut s = xds_client::State::default();
            for c in ["a", "b"] {
                put(&mut s, Cluster::type_url(), c, "1", eds_cluster(c));
                put(&mut s, ClusterLoadAssignment::type_url(), c, "1", assignment(c, &[1001, 1002]));
            }
            put(&mut s, Listener::type_url(), "l", "1", listener());
            xds_client::Handler::apply(&mut h, &s, &Listener::type_url()).unwrap();
            let before = ctx.routes.load_full();
            assert_eq!(target_hosts(&before), [1001, 1002]);
            let (a_host, b_hosts) = (before.clusters["a"].hosts().hosts[0].clone(), before.clusters["b"].hosts());
            a_host.active.store(7, std::sync::atomic::Ordering::Relaxed);

            // One endpoint more for `a`, in a Delta response that names it.
            put(&mut s, ClusterLoadAssignment::type_url(), "a", "2", assignment("a", &[1001, 1002, 1003]));
            s.delta = Some(xds_client::DeltaChange { upserted: vec!["a".into()], removed: vec![] });
            xds_client::Handler::apply(&mut h, &s, &ClusterLoadAssignment::type_url()).unwrap();
            s.delta = None;
            let after = ctx.routes.load_full();
            assert!(!Arc::ptr_eq(&before, &after), "a new snapshot is published (its version changed)");
            assert!(after.version.contains("ClusterLoadAssignment:2"), "{}", after.version);
            assert!(Arc::ptr_eq(&before.listeners["l"], &after.listeners["l"]), "the listener was rebuilt");
            for c in ["a", "b"] {
                assert!(Arc::ptr_eq(&before.clusters[c], &after.clusters[c]), "cluster {c} was rebuilt");
            }
            assert!(Arc::ptr_eq(&b_hosts, &after.clusters["b"].hosts()), "b's hosts were replaced");
            assert_eq!(ports(&after.clusters["a"].hosts()), [1001, 1002, 1003]);
            // The route's subset follows, through the listener built before the update.
            assert_eq!(target_hosts(&after), [1001, 1002, 1003]);
            assert_eq!(target_hosts(&before), [1001, 1002, 1003]);
            // The unchanged endpoint is the same host, with its count of active requests.
            assert!(Arc::ptr_eq(&a_host, &after.clusters["a"].hosts().hosts[0]));
            // `/config_dump` shows the new assignment.
            let dumped = after.resources.decode().unwrap();
            let a = dumped.endpoints.iter().find(|e| e.cluster_name == "a").unwrap();
            assert_eq!(a.endpoints[0].lb_endpoints.len(), 3);

            // A change of a cluster rebuilds it whole, and its hosts' state survives that too.
            put(&mut s, Cluster::type_url(), "a", "2", eds_cluster("a"));
            xds_client::Handler::apply(&mut h, &s, &Cluster::type_url()).unwrap();
            let rebuilt = ctx.routes.load_full();
            assert!(!Arc::ptr_eq(&after.clusters["a"], &rebuilt.clusters["a"]));
            let kept = rebuilt.clusters["a"].hosts().hosts[0].clone();
            assert!(Arc::ptr_eq(&a_host, &kept), "the host's state was lost in the rebuild");
            assert_eq!(kept.active.load(std::sync::atomic::Ordering::Relaxed), 7);
            assert_eq!(target_hosts(&rebuilt), [1001, 1002, 1003]);
        }

        /// ADS applies configuration from a thread and runtime of its own: what it starts
        /// must live on the data-path runtime. Here the applying runtime is gone before the
        /// first connection, and the listener must still accept and route it.
        #[test]
        fn listeners_started_from_the_xds_thread_live_on_the_data_runtime() {
            let data = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let backend = data.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            let backend_port = backend.local_addr().unwrap().port();
            let ctx = Ctx::new(Default::default(), crate::drain::Drain::new());
            let applier = data.block_on(async { crate::app::Applier::for_test(ctx.clone()) });
            let mut s = xds_client::State::default();
            put(&mut s, Cluster::type_url(), "a", "1", eds_cluster("a"));
            put(&mut s, ClusterLoadAssignment::type_url(), "a", "1", assignment("a", &[backend_port]));
            put(&mut s, Listener::type_url(), "l", "1", listener());
            let applier = std::thread::spawn(move || {
                let xds = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                let mut h = AdsHandler::new(applier);
                xds.block_on(async { xds_client::Handler::apply(&mut h, &s, &Listener::type_url()) }).unwrap();
                drop(xds);
                h.applier
            })
            .join()
            .unwrap();
            let addr = applier.bound_for_test("l");
            data.block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let routed = async {
                    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
                    client.write_all(b"ping").await.unwrap();
                    let (mut up, _) = backend.accept().await.unwrap();
                    let mut got = [0u8; 4];
                    up.read_exact(&mut got).await.unwrap();
                    got
                };
                // A deadline only so that a listener left on the dead runtime fails the
                // test instead of hanging it.
                let got = tokio::time::timeout(std::time::Duration::from_secs(10), routed)
                    .await
                    .expect("no connection reached the backend: the listener died with the xDS runtime");
                assert_eq!(&got, b"ping");
            });
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
        async fn a_refused_endpoint_update_changes_nothing() {
            let ctx = Ctx::new(Default::default(), crate::drain::Drain::new());
            let mut h = AdsHandler::new(crate::app::Applier::for_test(ctx.clone()));
            let mut s = xds_client::State::default();
            put(&mut s, Cluster::type_url(), "a", "1", eds_cluster("a"));
            put(&mut s, ClusterLoadAssignment::type_url(), "a", "1", assignment("a", &[1001]));
            put(&mut s, Listener::type_url(), "l", "1", listener());
            xds_client::Handler::apply(&mut h, &s, &Listener::type_url()).unwrap();
            let before = ctx.routes.load_full();
            let bad = any(json!({"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "clusterName": "a", "endpoints": [{"lbEndpoints": [{"endpoint": {"address": {"socketAddress":
                    {"address": "not-an-ip", "portValue": 1}}}}]}]}));
            put(&mut s, ClusterLoadAssignment::type_url(), "a", "2", bad);
            let e = xds_client::Handler::apply(&mut h, &s, &ClusterLoadAssignment::type_url()).unwrap_err();
            assert!(e.contains("cluster `a`") && e.contains("not-an-ip"), "{e}");
            assert!(Arc::ptr_eq(&before, &ctx.routes.load_full()));
            assert_eq!(ports(&before.clusters["a"].hosts()), [1001]);
        }
    }

    #[test]
    fn changed_assignments_are_the_named_ones_whose_version_moved() {
        let now = state(&[("eds", &[("a", "2"), ("b", "1"), ("c", "1")])]).resources.remove("eds").unwrap();
        // c differs too, but a Delta response that does not name it did not change it.
        let held: BTreeMap<String, String> =
            [("a", "1"), ("b", "1"), ("c", "0")].iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        let names = |c: Option<Vec<(&String, &xds_client::Resource)>>| {
            c.map(|v| v.iter().map(|(n, r)| format!("{n}:{}", r.version)).collect::<Vec<_>>())
        };
        let delta = |up: &[&str], rm: &[&str]| xds_client::DeltaChange {
            upserted: up.iter().map(|s| s.to_string()).collect(),
            removed: rm.iter().map(|s| s.to_string()).collect(),
        };
        // Delta: only the names it upserted are looked at (c's stored version is not).
        assert_eq!(names(changed_assignments(Some(&delta(&["a", "b"], &[])), &now, &held)), Some(vec!["a:2".into()]));
        // A removal, or an assignment not held before: built whole.
        assert_eq!(names(changed_assignments(Some(&delta(&["a"], &["d"])), &now, &held)), None);
        let mut fewer = held.clone();
        fewer.remove("b");
        assert_eq!(names(changed_assignments(Some(&delta(&["b"], &[])), &now, &fewer)), None);
        // State of the World: every one compared, by position.
        assert_eq!(names(changed_assignments(None, &now, &held)), Some(vec!["a:2".into(), "c:1".into()]));
        assert_eq!(names(changed_assignments(None, &now, &fewer)), None);
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
