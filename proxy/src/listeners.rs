//! Binds the listeners a snapshot names and runs their accept loops.
//!
//! A listener whose name and address are unchanged keeps its socket across reloads
//! (its connections just see the new snapshot). New listeners are bound before a
//! snapshot is published, so a port in use rejects the whole version and the previous
//! one keeps serving.

use crate::accept::AcceptErrors;
use crate::conn::{self, Ctx};
use crate::snapshot::dns::DnsListenerCfg;
use crate::snapshot::{Snapshot, listener_stat_name};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{Instrument, debug, debug_span, info, warn};

#[derive(Debug)]
struct Running {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A running DNS listener (UDP + TCP on one port): new tables go through `table`.
#[derive(Debug)]
struct RunningDns {
    configured: SocketAddr,
    bound: SocketAddr,
    table: watch::Sender<Arc<dns::Table>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
pub struct Listeners {
    running: HashMap<String, Running>,
    dns: HashMap<String, RunningDns>,
}

/// Sockets bound for a snapshot that is not yet published.
#[derive(Debug)]
pub struct Prepared {
    new: Vec<(String, SocketAddr, TcpListener)>,
    removed: Vec<String>,
    new_dns: Vec<(Arc<DnsListenerCfg>, std::net::UdpSocket, TcpListener)>,
    updated_dns: Vec<Arc<DnsListenerCfg>>,
    removed_dns: Vec<String>,
}

impl Listeners {
    /// Binds what `snap` adds. Nothing changes until `commit`.
    pub fn prepare(&self, snap: &Snapshot) -> Result<Prepared, String> {
        let mut new = vec![];
        for (name, cfg) in snap.listeners.iter() {
            if !cfg.bind || self.running.get(name).is_some_and(|r| r.configured == cfg.address) {
                continue;
            }
            // A listener that moves releases its old address only after commit, so a
            // move onto an address another listener releases in the same version
            // fails; Envoy has the same restriction.
            let std = bind(cfg.address, cfg.ipv4_compat)
                .map_err(|e| format!("listener `{name}`: cannot bind {}: {e}", cfg.address))?;
            new.push((name.clone(), cfg.address, std));
        }
        let removed = self
            .running
            .iter()
            .filter(|(name, r)| snap.listeners.get(*name).is_none_or(|c| !c.bind || c.address != r.configured))
            .map(|(name, _)| name.clone())
            .collect();
        let mut new_dns = vec![];
        let mut updated_dns = vec![];
        for (name, cfg) in &snap.dns {
            if self.dns.get(name).is_some_and(|r| r.configured == cfg.address) {
                updated_dns.push(cfg.clone());
                continue;
            }
            let (udp, tcp) =
                bind_dns(cfg.address).map_err(|e| format!("listener `{name}`: cannot bind {}: {e}", cfg.address))?;
            new_dns.push((cfg.clone(), udp, tcp));
        }
        let removed_dns = self
            .dns
            .iter()
            .filter(|(name, r)| snap.dns.get(*name).is_none_or(|c| c.address != r.configured))
            .map(|(name, _)| name.clone())
            .collect();
        Ok(Prepared { new, removed, new_dns, updated_dns, removed_dns })
    }

    /// Stops removed listeners and starts the new ones; call after the snapshot that
    /// `prepare` saw is published.
    pub fn commit(&mut self, p: Prepared, ctx: &Arc<Ctx>) {
        for name in p.removed {
            if let Some(r) = self.running.remove(&name) {
                let _ = r.stop.send(true);
                info!(listener = %name, address = %r.bound, "listener removed; its live connections continue");
            }
        }
        for (name, configured, listener) in p.new {
            let bound = listener.local_addr().unwrap_or(configured);
            let (stop, stop_rx) = watch::channel(false);
            info!(listener = %name, address = %bound, "listening");
            let task = tokio::spawn(accept_loop(ctx.clone(), Arc::from(name.as_str()), listener, stop_rx));
            self.running.insert(name, Running { configured, bound, stop, task });
        }
        for name in p.removed_dns {
            if let Some(r) = self.dns.remove(&name) {
                r.task.abort();
                info!(listener = %name, address = %r.bound, "DNS listener removed");
            }
        }
        for cfg in p.updated_dns {
            if let Some(r) = self.dns.get(&cfg.name) {
                r.table.send_replace(cfg.table.clone());
            }
        }
        for (cfg, udp, tcp) in p.new_dns {
            let bound = udp.local_addr().unwrap_or(cfg.address);
            let udp = match tokio::net::UdpSocket::from_std(udp) {
                Ok(u) => u,
                Err(e) => {
                    warn!(listener = %cfg.name, error = %e, "cannot start DNS listener");
                    continue;
                }
            };
            let upstream = if cfg.upstreams.is_empty() {
                host_resolvers()
            } else {
                dns::Upstream { servers: cfg.upstreams.clone(), timeout: UPSTREAM_TIMEOUT }
            };
            let (table, rx) = watch::channel(cfg.table.clone());
            info!(listener = %cfg.name, address = %bound, names = cfg.table.len(), "DNS listening (UDP and TCP)");
            let task = tokio::spawn(dns::serve(udp, Some(tcp), rx, upstream));
            self.dns.insert(cfg.name.clone(), RunningDns { configured: cfg.address, bound, table, task });
        }
        ctx.stats.global.listener_manager_total_listeners_active.set((self.running.len() + self.dns.len()) as u64);
    }

    /// (name, bound address) of every running DNS listener.
    pub fn dns_bound(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<_> = self.dns.iter().map(|(n, r)| (n.clone(), r.bound)).collect();
        v.sort();
        v
    }

    /// (name, bound address) of every running listener, for the admin API.
    pub fn bound(&self) -> Vec<(String, SocketAddr)> {
        let mut v: Vec<_> = self.running.iter().map(|(n, r)| (n.clone(), r.bound)).collect();
        v.sort();
        v
    }

    /// Stops every accept loop; await the handles to know the sockets are closed.
    pub fn stop_all(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        for (_, r) in self.dns.drain() {
            r.task.abort();
        }
        self.running
            .drain()
            .map(|(_, r)| {
                let _ = r.stop.send(true);
                r.task
            })
            .collect()
    }
}

/// For a `use_original_dst` listener: the connection's original destination, and the
/// name of the unbound listener it is handed to when there is one.
fn capture(ctx: &Ctx, name: &mut Arc<str>, stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let snap = ctx.routes.load();
    if !snap.listeners.get(&**name).is_some_and(|l| l.use_original_dst) {
        return None;
    }
    let dst = crate::tproxy::original_dst(stream)?;
    if let Some(target) = snap.captured_by(dst) {
        *name = Arc::from(target);
    }
    Some(dst)
}

/// How long a forwarded DNS query waits for the upstream resolver.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// The host's resolvers (/etc/resolv.conf), for names a DNS table does not hold.
pub fn host_resolvers() -> dns::Upstream {
    dns::Upstream::from_resolv_conf(std::path::Path::new("/etc/resolv.conf"))
        .unwrap_or(dns::Upstream { servers: vec![], timeout: UPSTREAM_TIMEOUT })
}

/// UDP and TCP on the same port (with port 0, the port UDP got).
pub fn bind_dns(addr: SocketAddr) -> std::io::Result<(std::net::UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..8 {
        let udp = std::net::UdpSocket::bind(addr)?;
        udp.set_nonblocking(true)?;
        match bind(udp.local_addr()?, false) {
            Ok(tcp) => return Ok((udp, tcp)),
            // Port 0: the TCP side of the port UDP got may be taken; try another.
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free port")))
}

/// Binds `addr`. An IPv6 socket takes IPv6 only, as Envoy's does unless the address says
/// `ipv4_compat` (`dual_stack`): Kuma binds `0.0.0.0:15001` and `[::]:15001` side by side
/// for transparent proxying, and a dual-stack `[::]` would take the IPv4 port too.
fn bind(addr: SocketAddr, dual_stack: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if addr.is_ipv6() {
        socket2::SockRef::from(&socket).set_only_v6(!dual_stack)?;
    }
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(ctx: Arc<Ctx>, name: Arc<str>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut drain = ctx.drain.stopped();
    let addr = listener.local_addr().map(|a| listener_stat_name(&a)).unwrap_or_default();
    // The listener's stats are named by its configured address, as Envoy names them.
    let stats = |ctx: &Ctx| ctx.routes.load().listeners.get(&*name).map(|l| l.stats.clone());
    let mut errors = AcceptErrors::new(format!("listener {name} ({addr})"));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    errors.accepted();
                    let limit = usize::try_from(ctx.max_connections.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
                    let Some(guard) = ctx.drain.try_track(limit) else {
                        // Envoy's global_downstream_max_connections: closed at once, counted.
                        if let Some(s) = stats(&ctx) {
                            s.downstream_global_cx_overflow.inc();
                        }
                        debug!(listener = %name, %peer, limit, "global connection limit reached; closing");
                        continue;
                    };
                    // One span per connection; `conn::serve` records sni, cluster and upstream.
                    let span = debug_span!("conn", listener = %name, %peer, sni = tracing::field::Empty,
                        cluster = tracing::field::Empty, upstream = tracing::field::Empty);
                    let (ctx, mut name) = (ctx.clone(), name.clone());
                    tokio::spawn(async move {
                        let drain = ctx.drain.clone();
                        // A connection captured by transparent proxying goes to the
                        // listener of its original destination, or through this one.
                        let original = capture(&ctx, &mut name, &stream);
                        // Cut at drain timeout: dropping the connection's future writes
                        // its record.
                        drain.unless_cut(conn::serve(ctx, name, stream, peer, original, guard)).await;
                    }.instrument(span));
                }
                Err(e) => {
                    let s = stats(&ctx);
                    errors.failed(&e, s.as_ref().map(|s| &s.downstream_cx_accept_error)).await;
                }
            },
            _ = stop.changed() => break,
            _ = drain.changed() => break,
        }
    }
}
