//! The systems under test: their configurations (the same routes for each) and their
//! processes, pinned to one core.

use crate::tls;
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Dp,
    Envoy,
    Haproxy,
    Nginx,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Dp => "dp",
            Kind::Envoy => "envoy",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }
}

/// Paths of the programs, from the command line.
#[derive(Debug, Clone)]
pub struct Programs {
    pub dp: PathBuf,
    pub envoy: Option<PathBuf>,
    pub haproxy: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    pub nginx_stream_module: Option<PathBuf>,
    /// CPU the proxies are pinned to.
    pub cpu: usize,
}

/// The routes: `names` chains, each with one server name `n<i>.svc.bench`, routed to
/// cluster `c<i mod clusters>`; every cluster has the one backend endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Routes {
    pub names: usize,
    pub clusters: usize,
    pub backend: SocketAddr,
}

impl Routes {
    pub fn new(names: usize, backend: SocketAddr) -> Routes {
        Routes { names, clusters: names.clamp(1, 1000), backend }
    }

    /// `n` services in Kuma's shape: one chain and one cluster each.
    pub fn services(n: usize, backend: SocketAddr) -> Routes {
        Routes { names: n, clusters: n.max(1), backend }
    }

    fn cluster_of(&self, i: usize) -> usize {
        i % self.clusters
    }

    /// Envoy v3 Listener, in Kuma's zone-ingress shape.
    fn listener(&self, port: u16) -> Value {
        let chains: Vec<Value> = (0..self.names)
            .map(|i| {
                let c = format!("c{}", self.cluster_of(i));
                json!({
                    "filter_chain_match": {"server_names": [tls::name(i)], "transport_protocol": "tls"},
                    "filters": [{
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            "stat_prefix": c,
                            "cluster": c,
                        }
                    }]
                })
            })
            .collect();
        json!({
            "name": "ingress",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "listener_filters": [{
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}
            }],
            "filter_chains": chains,
        })
    }

    fn clusters(&self) -> Vec<Value> {
        (0..self.clusters)
            .map(|i| {
                let name = format!("c{i}");
                json!({
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "load_assignment": {
                        "cluster_name": name,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                            "address": self.backend.ip().to_string(),
                            "port_value": self.backend.port(),
                        }}}}]}]
                    }
                })
            })
            .collect()
    }

    /// `dp --xds-file`: `{version_info, resources: [{"@type": ...}]}`.
    pub fn dp_file(&self) -> Value {
        let mut resources = vec![];
        for mut c in self.clusters() {
            c["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            resources.push(c);
        }
        let mut l = self.listener(0);
        l["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
        resources.push(l);
        json!({"version_info": format!("bench-{}", self.names), "resources": resources})
    }

    /// Envoy bootstrap with the same listener and clusters as static resources.
    pub fn envoy_bootstrap(&self, port: u16) -> Value {
        json!({
            "node": {"id": "bench-ingress", "cluster": "bench"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {"listeners": [self.listener(port)], "clusters": self.clusters()},
        })
    }

    /// HAProxy in tcp mode: wait for the ClientHello, route `req.ssl_sni` through a map.
    pub fn haproxy(&self, port: u16, map: &Path) -> String {
        let mut s = format!(
            "global\n  nbthread 1\n  maxconn 9000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
             timeout client 1h\n  timeout server 1h\n\nfrontend ingress\n  bind 127.0.0.1:{port}\n  \
             maxconn 9000\n  tcp-request inspect-delay 15s\n  \
             tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  \
             use_backend %[req.ssl_sni,lower,map({})]\n",
            map.display()
        );
        for c in 0..self.clusters {
            let _ = write!(s, "\nbackend c{c}\n  server s0 {}\n", self.backend);
        }
        s
    }

    pub fn haproxy_map(&self) -> String {
        let mut s = String::new();
        for i in 0..self.names {
            let _ = writeln!(s, "{} c{}", tls::name(i), self.cluster_of(i));
        }
        s
    }

    /// nginx stream with `ssl_preread`, a map from the server name to an upstream.
    pub fn nginx(&self, port: u16, dir: &Path, module: Option<&Path>) -> String {
        let mut s = String::new();
        if let Some(m) = module {
            let _ = writeln!(s, "load_module {};", m.display());
        }
        let _ = write!(
            s,
            "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
             pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n\
             events {{ worker_connections 9000; }}\nstream {{\n  map_hash_max_size 262144;\n  \
             map_hash_bucket_size 64;\n  map $ssl_preread_server_name $up {{\n",
            dir = dir.display()
        );
        for i in 0..self.names {
            let _ = writeln!(s, "    {} c{};", tls::name(i), self.cluster_of(i));
        }
        s.push_str("  }\n");
        for c in 0..self.clusters {
            let _ = writeln!(s, "  upstream c{c} {{ server {}; }}", self.backend);
        }
        let _ = write!(
            s,
            "  server {{\n    listen 127.0.0.1:{port};\n    ssl_preread on;\n    proxy_pass $up;\n  }}\n}}\n"
        );
        s
    }
}

/// A free loopback port (bound then released; the small race is acceptable here).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A running target.
pub struct Target {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Option<Child>,
    pub dir: PathBuf,
    pub startup: Duration,
}

impl Target {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn direct(backend: SocketAddr) -> Target {
        Target { kind: Kind::Direct, addr: backend, child: None, dir: PathBuf::new(), startup: Duration::ZERO }
    }

    /// Writes the configuration for `kind` into `dir`, starts it pinned and waits until
    /// it accepts connections.
    pub fn start(kind: Kind, p: &Programs, routes: &Routes, dir: &Path, wait: Duration) -> anyhow::Result<Target> {
        std::fs::create_dir_all(dir)?;
        let started = Instant::now();
        let deadline = started + wait;
        let log = std::fs::File::create(dir.join("log"))?;
        let pin = |bin: &Path| {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(p.cpu.to_string()).arg(bin);
            c.stdin(Stdio::null()).stdout(Stdio::null());
            c
        };
        let (child, addr) = match kind {
            Kind::Direct => return Ok(Target::direct(routes.backend)),
            Kind::Dp => {
                let file = dir.join("xds.json");
                std::fs::write(&file, serde_json::to_vec(&routes.dp_file())?)?;
                let admin_path = dir.join("admin-address");
                let mut c = pin(&p.dp);
                c.args(["run", "--proxy-type=ingress", "--xds-file"])
                    .arg(&file)
                    .args(["--admin-address", "127.0.0.1:0", "--admin-address-path"])
                    .arg(&admin_path)
                    .args(["--readiness-port", "0", "--concurrency", "1"])
                    .stderr(log);
                let mut child = c.spawn().context("starting dp")?;
                let admin: SocketAddr = wait_for(&mut child, deadline, "dp admin address", || {
                    std::fs::read_to_string(&admin_path).ok()?.trim().parse().ok()
                })?;
                wait_for(&mut child, deadline, "dp /ready", || {
                    (http_get(admin, "/ready").ok()?.0 == 200).then_some(())
                })?;
                let addr = wait_for(&mut child, deadline, "dp listener address", || dp_listener(admin))?;
                (child, addr)
            }
            Kind::Envoy => {
                let bin = p.envoy.as_ref().context("no envoy binary")?;
                let port = free_port()?;
                let file = dir.join("envoy.json");
                std::fs::write(&file, serde_json::to_vec(&routes.envoy_bootstrap(port))?)?;
                let admin_path = dir.join("admin-address");
                let mut c = pin(bin);
                c.arg("-c")
                    .arg(&file)
                    .args([
                        "--concurrency",
                        "1",
                        "--disable-hot-restart",
                        "--log-level",
                        "warn",
                        "--admin-address-path",
                    ])
                    .arg(&admin_path)
                    .stderr(log);
                let mut child = c.spawn().context("starting envoy")?;
                let admin: SocketAddr = wait_for(&mut child, deadline, "envoy admin address", || {
                    std::fs::read_to_string(&admin_path).ok()?.trim().parse().ok()
                })?;
                wait_for(&mut child, deadline, "envoy /ready", || {
                    (http_get(admin, "/ready").ok()?.0 == 200).then_some(())
                })?;
                (child, SocketAddr::from(([127, 0, 0, 1], port)))
            }
            Kind::Haproxy => {
                let bin = p.haproxy.as_ref().context("no haproxy binary")?;
                let port = free_port()?;
                let map = dir.join("sni.map");
                std::fs::write(&map, routes.haproxy_map())?;
                let file = dir.join("haproxy.cfg");
                std::fs::write(&file, routes.haproxy(port, &map))?;
                let mut c = pin(bin);
                c.arg("-db").arg("-f").arg(&file).stderr(log);
                let mut child = c.spawn().context("starting haproxy")?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                wait_for(&mut child, deadline, "haproxy to listen", || connects(addr))?;
                (child, addr)
            }
            Kind::Nginx => {
                let bin = p.nginx.as_ref().context("no nginx binary")?;
                let port = free_port()?;
                let file = dir.join("nginx.conf");
                std::fs::write(&file, routes.nginx(port, dir, p.nginx_stream_module.as_deref()))?;
                let mut c = pin(bin);
                c.arg("-p").arg(dir).arg("-e").arg(dir.join("error.log")).arg("-c").arg(&file).stderr(log);
                let mut child = c.spawn().context("starting nginx")?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                wait_for(&mut child, deadline, "nginx to listen", || connects(addr))?;
                (child, addr)
            }
        };
        Ok(Target { kind, addr, child: Some(child), dir: dir.to_path_buf(), startup: started.elapsed() })
    }

    /// The tail of the target's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_tail(dir: &Path) -> String {
    let mut s = String::new();
    for f in ["log", "error.log"] {
        if let Ok(mut file) = std::fs::File::open(dir.join(f)) {
            let mut all = String::new();
            let _ = file.read_to_string(&mut all);
            let lines: Vec<&str> = all.lines().collect();
            s.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
        }
    }
    s
}

fn wait_for<T>(
    child: &mut Child,
    deadline: Instant,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if let Some(status) = child.try_wait()? {
            bail!("waiting for {what}: the process exited ({status})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn connects(addr: SocketAddr) -> Option<()> {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok().map(|_| ())
}

fn dp_listener(admin: SocketAddr) -> Option<SocketAddr> {
    let (_, body) = http_get(admin, "/listeners?format=json").ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    let l = v["listener_statuses"].as_array()?.iter().find(|l| l["name"] == "ingress")?;
    let sa = &l["local_address"]["socket_address"];
    format!("{}:{}", sa["address"].as_str()?, sa["port_value"]).parse().ok()
}

/// A tiny blocking HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
