//! Sidecars fed by our `cp`, `dp` or real Envoy (bootstrapped from `POST /bootstrap` as
//! kuma-dp would start it), in front of line-answering [`Backend`] applications.

use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::envoy::{Envoy, bootstrap};
use crate::http::HttpBackend;
use crate::mesh::{SYNC, dataplane_token, free_port, request, write};
use crate::{Backend, Cp, Dp, temp_dir};

/// The Dataplane of a sidecar for `app` (service `service`) with outbounds (port,
/// service), and a Prometheus metrics port of its own.
pub fn dataplane(name: &str, service: &str, app: &Backend, outbounds: &[(u16, &str)]) -> Value {
    dataplane_of(name, service, app.addr.port(), outbounds)
}

/// The same for an HTTP application: its inbound is tagged `kuma.io/protocol: http`.
pub fn http_dataplane(name: &str, service: &str, app: &HttpBackend, outbounds: &[(u16, &str)]) -> Value {
    let mut res = dataplane_of(name, service, app.addr.port(), outbounds);
    res["networking"]["inbound"][0]["tags"]["kuma.io/protocol"] = "http".into();
    res
}

fn dataplane_of(name: &str, service: &str, app_port: u16, outbounds: &[(u16, &str)]) -> Value {
    let outbound: Vec<Value> =
        outbounds.iter().map(|(p, s)| json!({"port": p, "tags": {"kuma.io/service": s}})).collect();
    json!({"type": "Dataplane", "mesh": "default", "name": name, "networking": {"address": "127.0.0.1",
        "inbound": [{"port": free_port(), "servicePort": app_port, "tags": {"kuma.io/service": service}}],
        "outbound": outbound}, "metrics": {"type": "prometheus", "conf": {"port": free_port()}}})
}

/// The address of a Dataplane's first inbound.
pub fn inbound(resource: &Value) -> SocketAddr {
    let port = resource["networking"]["inbound"][0]["port"].as_u64().unwrap();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// A sidecar: `dp` or Envoy.
pub enum Sidecar {
    Dp(Dp),
    Envoy(Envoy),
}

/// Starts a sidecar (Envoy when `envoy`) for the Dataplane `resource` against `zone`.
pub async fn start(zone: &Cp, envoy: bool, resource: Value) -> Sidecar {
    let name = resource["name"].as_str().unwrap().to_string();
    let tok = dataplane_token(zone, &name);
    if envoy {
        return Sidecar::Envoy(Envoy::start(bootstrap(zone, "dataplane", &tok, &resource).await));
    }
    let dir = temp_dir("sidecar-dp");
    let (t, r) = (write(&dir, "token", &tok), write(&dir, "dp.json", &resource.to_string()));
    let dp = Dp::against(zone, "dataplane", &t, &r, &[("KUMA_DNS_ENABLED", "false")]);
    dp.wait_ready();
    Sidecar::Dp(dp)
}

/// Polls `addr` until a request gives `want` (`Ok(name)` or any `Err`), within [`SYNC`].
pub async fn until_answer(addr: SocketAddr, want: Result<&str, ()>, what: &str) {
    crate::poll_within(SYNC, what, async || {
        let got = request(addr).await;
        match (&got, want) {
            (Ok(g), Ok(w)) if g == w => Ok(()),
            (Err(_), Err(())) => Ok(()),
            _ => Err(format!("{got:?}, wanted {want:?}")),
        }
    })
    .await
}

/// A server sidecar in front of its application.
pub struct Server {
    pub service: String,
    pub app: Backend,
    /// The Dataplane's inbound address.
    pub inbound: SocketAddr,
    pub side: Sidecar,
}

/// A client sidecar with an outbound to every server: (its address, the server's service).
pub struct Client {
    pub name: String,
    pub outbounds: Vec<(SocketAddr, String)>,
    pub side: Sidecar,
}

/// Servers `srv-dp` and `srv-envoy`, then clients `client-dp` and `client-envoy` with an
/// outbound to each server; `client_tags` (client, tag, value) adds tags to a client's inbound.
pub async fn dp_and_envoy(zone: &Cp, client_tags: &[(&str, &str, &str)]) -> (Vec<Server>, Vec<Client>) {
    let mut servers = vec![];
    for (kind, envoy) in [("dp", false), ("envoy", true)] {
        let service = format!("srv-{kind}");
        let app = Backend::start(&service).await;
        let res = dataplane(&service, &service, &app, &[]);
        let inbound = inbound(&res);
        servers.push(Server { service, app, inbound, side: start(zone, envoy, res).await });
    }
    let mut clients = vec![];
    for (kind, envoy) in [("dp", false), ("envoy", true)] {
        let name = format!("client-{kind}");
        let outbounds: Vec<(SocketAddr, String)> = servers
            .iter()
            .map(|s| (format!("127.0.0.1:{}", free_port()).parse().unwrap(), s.service.clone()))
            .collect();
        let refs: Vec<(u16, &str)> = outbounds.iter().map(|(a, s)| (a.port(), s.as_str())).collect();
        let web = Backend::start("web").await;
        let mut res = dataplane(&name, &name, &web, &refs);
        for (_, k, v) in client_tags.iter().filter(|(c, ..)| *c == name) {
            res["networking"]["inbound"][0]["tags"][*k] = (*v).into();
        }
        clients.push(Client { name, outbounds, side: start(zone, envoy, res).await });
    }
    (servers, clients)
}
