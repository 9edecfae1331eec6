//! dp and real Envoy on the same static configuration, side by side, for tests that
//! check dp behaves as Envoy does.

use crate::envoy::Envoy;
use crate::{Dp, temp_dir, wait_until};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;

/// dp on an xDS file and Envoy on a bootstrap with the same resources.
pub struct Pair {
    pub dp: Dp,
    pub envoy: Envoy,
    _dir: PathBuf,
}

impl Pair {
    /// Starts both on `resources` (Listeners, Clusters and Secrets, with `@type`).
    pub fn start(resources: Vec<Value>) -> Pair {
        let dir = temp_dir("pair");
        let file = dir.join("xds.json");
        let doc = json!({"version_info": "1", "resources": resources});
        std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
        let dp = Dp::start(&file, &[]);
        let (mut listeners, mut clusters, mut secrets) = (vec![], vec![], vec![]);
        for mut r in resources {
            let t = r.as_object_mut().unwrap().remove("@type").unwrap();
            match t.as_str().unwrap().rsplit('.').next().unwrap() {
                "Listener" => listeners.push(r),
                "Cluster" => clusters.push(r),
                "Secret" => secrets.push(r),
                other => panic!("no static bootstrap place for {other}"),
            }
        }
        let envoy = Envoy::start(json!({
            "node": {"id": "pair", "cluster": "pair"},
            "staticResources": {"listeners": listeners, "clusters": clusters, "secrets": secrets}
        }));
        Pair { dp, envoy, _dir: dir }
    }

    /// The bound address of listener `name` in (dp, Envoy).
    pub fn listener(&self, name: &str) -> (SocketAddr, SocketAddr) {
        let envoy = wait_until(&format!("Envoy's listener {name}"), || {
            let (_, body) = crate::http_get(self.envoy.admin, "/listeners?format=json").ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            let l = v["listener_statuses"].as_array()?.iter().find(|l| l["name"] == name)?.clone();
            let sa = &l["local_address"]["socket_address"];
            let port = sa["port_value"].as_u64().filter(|p| *p != 0)?;
            format!("{}:{port}", sa["address"].as_str()?).parse().ok()
        });
        (self.dp.listener(name), envoy)
    }
}

/// A plain-TCP listener on an ephemeral loopback port whose one chain proxies to
/// `cluster`.
pub fn tcp_listener(name: &str, cluster: &str) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}},
        "filterChains": [{"filters": [{"name": "envoy.filters.network.tcp_proxy", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "cluster": cluster, "statPrefix": name}}]}]
    })
}
