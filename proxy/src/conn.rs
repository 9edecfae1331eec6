//! One downstream connection: read the ClientHello (without terminating TLS), pick the
//! filter chain, then answer directly or proxy to an upstream host.

use crate::copy::{self, End, Transferred};
use crate::drain::{ConnGuard, Drain};
use crate::filter_state::{Facts, FilterState};
use crate::hcm::server::ConnInfo;
use crate::inspect::{self, Found};
use crate::outlier::Outcome;
use crate::snapshot::chains::{Offer, OwnedOffer};
use crate::snapshot::cluster::{ClusterCfg, Host};
use crate::snapshot::rbac::Subject;
use crate::snapshot::{Action, Chain, Snapshot, TcpProxyCfg, Tls};
use crate::stats::{Counter, Registry};
use crate::tls::prefixed::Prefixed;
use crate::tls::san;
use crate::upstream::{HostAddr, Stream};
use arc_swap::ArcSwap;
use bytes::Bytes;
use clienthello::{ClientHello, MAX_ALPN};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info};

/// What every connection task shares.
#[derive(Debug)]
pub struct Ctx {
    pub routes: ArcSwap<Snapshot>,
    pub stats: Arc<Registry>,
    pub drain: Arc<Drain>,
    /// Most downstream connections at once over every listener (0: no limit), Envoy's
    /// `global_downstream_max_connections`.
    pub max_connections: AtomicU64,
    next_id: AtomicU64,
}

impl Ctx {
    pub fn new(stats: Arc<Registry>, drain: Arc<Drain>) -> Arc<Self> {
        Arc::new(Ctx {
            routes: ArcSwap::from_pointee(Snapshot::default()),
            stats,
            drain,
            max_connections: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
        })
    }
}

/// Why a connection ended, as a short flag for the access log (Envoy's response flags
/// where one exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flag {
    Done,
    /// No filter chain matched (Envoy: NR).
    NoRoute,
    /// The listener filters' bytes (a ClientHello, a request line) did not come in time,
    /// or the ClientHello was too large.
    Detect,
    /// The cluster is unknown (Envoy: NC).
    NoCluster,
    /// No healthy host (Envoy: UH).
    NoHealthy,
    /// Circuit breaker open (Envoy: UO).
    Overflow,
    /// Upstream connect failed on every attempt (Envoy: UF).
    ConnectFail,
    IdleTimeout,
    /// The downstream TLS handshake failed, or the client's certificate was refused.
    DownstreamTls,
    /// A TLS context waits for an SDS secret that has not arrived.
    TlsPending,
    /// The chain's RBAC filter refused the connection.
    RbacDenied,
    /// The chain's `connection_limit` is reached.
    Limited,
    /// The chain's network `local_ratelimit` had no token (Envoy: RL).
    RateLimited,
    /// Cut when the drain time ran out.
    DrainTimeout,
    /// Ended by a bug (a panic in its task).
    Internal,
}

/// Longest a TLS handshake may take, either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::Done => "-",
            Flag::NoRoute => "NR",
            Flag::Detect => "DETECT",
            Flag::NoCluster => "NC",
            Flag::NoHealthy => "UH",
            Flag::Overflow => "UO",
            Flag::ConnectFail => "UF",
            Flag::IdleTimeout => "IDLE",
            Flag::DownstreamTls => "DTLS",
            Flag::TlsPending => "TLS_PENDING",
            Flag::RbacDenied => "RBAC",
            Flag::Limited => "LIMIT",
            Flag::RateLimited => "RL",
            Flag::DrainTimeout => "DRAIN",
            Flag::Internal => "INTERNAL",
        }
    }
}

/// Decrements a gauge when dropped.
struct Active<'a>(&'a Counter);

impl<'a> Active<'a> {
    fn new(c: &'a Counter) -> Self {
        c.inc();
        Active(c)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How an HTTP connection finds its chain's current configuration: the same offer
/// selected again in the listener as it is now. The answer is kept until the listeners
/// change (snapshots that differ only in endpoints share them), so a request normally costs
/// a load and a pointer comparison, not a lookup and a chain match.
fn refresh(ctx: &Arc<Ctx>, listener: &Arc<str>, offer: &Offer<'_>) -> crate::hcm::server::Refresh {
    type Listeners = std::collections::HashMap<String, Arc<crate::snapshot::ListenerCfg>>;
    let (ctx, listener, offer) = (ctx.clone(), listener.clone(), OwnedOffer::of(offer));
    // (the listeners the answer came from, the answer). The weak reference keeps their
    // allocation, so no later map can take its address and pass for it.
    let kept: std::sync::Mutex<(std::sync::Weak<Listeners>, Option<Arc<crate::hcm::HttpCfg>>)> =
        std::sync::Mutex::new((std::sync::Weak::new(), None));
    crate::hcm::server::Refresh(Box::new(move || {
        let snap = ctx.routes.load();
        let mut kept = kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if std::sync::Weak::as_ptr(&kept.0) != Arc::as_ptr(&snap.listeners) {
            let now =
                snap.listeners.get(&*listener).and_then(|lst| match &offer.with(|o| lst.select(o).cloned())?.action {
                    Action::Http(cfg) => Some(cfg.clone()),
                    _ => None,
                });
            *kept = (Arc::downgrade(&snap.listeners), now);
        }
        kept.1.clone()
    }))
}

/// Serves one downstream connection on `listener`. `original`: where it was headed
/// before transparent proxying redirected it (it stands for the local address).
pub async fn serve(
    ctx: Arc<Ctx>,
    listener: Arc<str>,
    mut down: TcpStream,
    peer: SocketAddr,
    original: Option<SocketAddr>,
    _guard: ConnGuard,
) {
    let started = Instant::now();
    let snap = ctx.routes.load_full();
    let Some(lst) = snap.listeners.get(&*listener).cloned() else {
        debug!(%listener, %peer, "the listener was removed before the connection was served; closing it");
        return;
    };
    let id = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    lst.stats.downstream_cx_total.inc();
    let _active = Active::new(&lst.stats.downstream_cx_active);
    let _ = down.set_nodelay(true);
    // getsockname(2) only when some chain (or a listener filter's `filter_disabled`)
    // matches on the destination port or address.
    let destination = match original {
        Some(o) => Some(o),
        None if lst.needs_destination => down.local_addr().ok(),
        None => None,
    };
    let port = destination.map_or(0, |a| a.port());

    // Room for a typical ClientHello (a post-quantum key share makes it ~1.8 KiB); it
    // grows up to the listener's bound only for a larger one, so a connection that waits
    // for its hello (a slow or hostile client) costs little memory.
    let inspects = lst.tls_inspector.is_some() || lst.http_inspector.is_some();
    let mut buf = vec![0u8; if inspects { inspect::FIRST_READ.min(lst.max_client_hello) } else { 0 }];
    let (found, flag) = if inspects {
        match inspect::inspect(&ctx.stats.global, &lst, port, &mut down, &mut buf).await {
            Ok(f) => (f, Flag::Done),
            Err(inspect::Stop::Detect) => (Found::default(), Flag::Detect),
        }
    } else {
        (Found::default(), Flag::Done)
    };
    let (hello, pending) = (found.hello, found.read);
    let sni = hello.as_ref().and_then(ClientHello::server_name);
    if let Some(sni) = sni {
        tracing::Span::current().record("sni", sni);
    }
    // From here on the record counts the connection's end and writes its access-log line
    // exactly once, whichever way it ends (a panic, or being cut at drain timeout, too).
    let mut log = AccessLog {
        id,
        listener: &lst.name,
        peer,
        sni,
        cluster: "",
        upstream: None,
        peer_identity: None,
        peer_uri_sans: None,
        local: destination,
        logs: None,
        started,
        ended: None,
        destroy: &lst.stats.downstream_cx_destroy,
        drain: &ctx.drain,
    };
    if flag != Flag::Done {
        lst.stats.downstream_listener_filter_error.inc();
        return log.finish(flag, Transferred::default());
    }
    let mut alpn: [&[u8]; MAX_ALPN] = [&[]; MAX_ALPN];
    let mut n_alpn = 0;
    // The ClientHello's ALPN, or the protocol http_inspector found.
    for (slot, p) in alpn.iter_mut().zip(hello.iter().flat_map(ClientHello::alpn).chain(found.http)) {
        *slot = p;
        n_alpn += 1;
    }
    let offer = Offer {
        port,
        server_name: sni,
        transport_protocol: if hello.is_some() { "tls" } else { "raw_buffer" },
        alpn: &alpn[..n_alpn],
        source: peer,
        destination: destination.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip()),
    };
    let Some(chain) = lst.select(&offer) else {
        lst.stats.no_filter_chain_match.inc();
        return log.finish(Flag::NoRoute, Transferred::default());
    };
    let _permit = match chain.limit.as_ref().map(|l| l.admit()) {
        Some(None) => return log.finish(Flag::Limited, Transferred::default()),
        Some(Some(p)) => Some(p),
        None => None,
    };
    if chain.rate_limit.as_ref().is_some_and(|r| !r.admit()) {
        return log.finish(Flag::RateLimited, Transferred::default());
    }
    let http = matches!(chain.action, Action::Http(_));
    // The local address only when an RBAC filter (or HTTP) may look at it.
    let local = if chain.rbac.is_some() || http { original.or_else(|| down.local_addr().ok()) } else { None };
    match &chain.action {
        Action::DirectResponse(body) => {
            let _ = down.write_all(body).await;
            let _ = down.shutdown().await;
            log.finish(Flag::Done, Transferred { sent: 0, received: body.len() as u64 });
        }
        Action::TcpProxy(_) | Action::Http(_) => match &chain.tls {
            Tls::Off if !rbac_allows(chain, peer, local, sni, None) => {
                log.finish(Flag::RbacDenied, Transferred::default())
            }
            Tls::Off => match &chain.action {
                Action::Http(cfg) => {
                    let facts = Facts { peer: Some(peer), local, sni, ..Default::default() };
                    let info = ConnInfo {
                        listener: listener.clone(),
                        peer: Some(peer),
                        local,
                        sni: sni.map(str::to_owned),
                        filter_state: filter_state(chain, &facts, false),
                        refresh: Some(refresh(&ctx, &listener, &offer)),
                        ..Default::default()
                    };
                    // The bytes read while looking for a ClientHello are the request's.
                    let io = Prefixed::new(Bytes::copy_from_slice(&buf[..pending]), down);
                    drop(buf);
                    // Each branch's future boxed: a connection's task is the size of its
                    // largest state, and an idle HTTP connection should not carry the
                    // TLS and TCP proxy branches' (see hcm::park).
                    Box::pin(crate::hcm::server::serve(cfg.clone(), io, Arc::new(info))).await;
                    log.finish(Flag::Done, Transferred::default());
                }
                Action::TcpProxy(tp) => Box::pin(proxy(tp, id, &mut down, buf, pending, original, &mut log)).await,
                Action::DirectResponse(_) => unreachable!("matched above"),
            },
            Tls::Pending(secret) => {
                debug!(id, secret = %secret, "TLS context waits for a secret; refusing");
                log.finish(Flag::TlsPending, Transferred::default());
            }
            Tls::Ready(st) => {
                // The ClientHello was read for routing: replay it into the handshake.
                let hello = Bytes::copy_from_slice(&buf[..pending]);
                // The client's chain and SANs are checked inside the handshake.
                let accept = st.accept(Prefixed::new(hello, down), lst.stats.ssl());
                let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, Box::pin(accept)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(id, error = %e, "downstream TLS handshake failed");
                        return log.finish(Flag::DownstreamTls, Transferred::default());
                    }
                    Err(_) => return log.finish(Flag::DownstreamTls, Transferred::default()),
                };
                let peer_cert = crate::tls::peer_certificate(tls.ssl());
                let sans = peer_cert.as_ref().and_then(|(c, der)| san::sans_of(c, der)).unwrap_or_default();
                log.peer_identity = sans.iter().find_map(|n| match n {
                    san::San::Uri(u) => Some(u.to_string()),
                    _ => None,
                });
                // Every URI SAN, for a configured access log's %DOWNSTREAM_PEER_URI_SAN%.
                if matches!(&chain.action, Action::TcpProxy(tp) if !tp.access_log.is_empty()) {
                    let uris: Vec<&str> = sans
                        .iter()
                        .filter_map(|n| match n {
                            san::San::Uri(u) => Some(*u),
                            _ => None,
                        })
                        .collect();
                    log.peer_uri_sans = Some(uris.join(",")).filter(|s| !s.is_empty());
                }
                // The certificate's names are read once, here, for RBAC, HTTP and the log.
                let presented = peer_cert.as_ref().map(|_| sans.as_slice());
                if !rbac_allows(chain, peer, local, sni, presented) {
                    debug!(id, peer_identity = ?log.peer_identity, "refused by the chain's RBAC filter");
                    close_notify(&mut tls).await;
                    return log.finish(Flag::RbacDenied, Transferred::default());
                }
                match &chain.action {
                    Action::Http(cfg) => {
                        let pick = |uri: bool| -> Vec<String> {
                            sans.iter()
                                .filter_map(|s| match (s, uri) {
                                    (san::San::Uri(v), true) | (san::San::Dns(v), false) => Some(v.to_string()),
                                    _ => None,
                                })
                                .collect()
                        };
                        let (uri_sans, dns_sans) = (pick(true), pick(false));
                        let facts = Facts { peer: Some(peer), local, sni, uri_sans: &uri_sans, dns_sans: &dns_sans };
                        let filter_state = filter_state(chain, &facts, true);
                        let xfcc = match &peer_cert {
                            Some((_, der)) if cfg.xfcc.sets() => Some(cfg.xfcc.current(&crate::hcm::xfcc::Certs {
                                local_uris: crate::tls::local_uri_sans(tls.ssl()),
                                peer_der: der,
                                peer_chain_pem: crate::tls::peer_chain_pem(tls.ssl()),
                                peer_uris: &uri_sans,
                                peer_dns: &dns_sans,
                            })),
                            _ => None,
                        };
                        let info = ConnInfo {
                            listener: listener.clone(),
                            peer: Some(peer),
                            local,
                            sni: sni.map(str::to_owned),
                            tls: true,
                            authenticated: peer_cert.is_some(),
                            uri_sans,
                            dns_sans,
                            alpn_h2: tls.ssl().selected_alpn_protocol() == Some(b"h2"),
                            filter_state,
                            xfcc,
                            refresh: Some(refresh(&ctx, &listener, &offer)),
                        };
                        drop(sans);
                        Box::pin(crate::hcm::server::serve(cfg.clone(), tls, Arc::new(info))).await;
                        log.finish(Flag::Done, Transferred::default());
                    }
                    Action::TcpProxy(tp) => {
                        Box::pin(proxy(tp, id, &mut tls, buf, 0, original, &mut log)).await;
                        // Refused or cut before the relay closed it (no upstream, idle timeout).
                        if !matches!(log.ended, Some((Flag::Done, _))) {
                            close_notify(&mut tls).await;
                        }
                    }
                    Action::DirectResponse(_) => unreachable!("matched above"),
                }
            }
        },
    }
}

/// The values the chain's `set_filter_state` filter sets (only HTTP routes read them):
/// when the connection opens, then after the TLS handshake when it terminated TLS.
fn filter_state(chain: &Chain, facts: &Facts<'_>, handshaken: bool) -> FilterState {
    let mut state = FilterState::new();
    if let Some(set) = &chain.set_state {
        set.on_new_connection(facts, &mut state);
        if handshaken {
            set.on_tls_handshake(facts, &mut state);
        }
    }
    state
}

/// Closes a terminated TLS connection as Envoy does: a close_notify alert, if the socket
/// takes it now (never waiting on the peer). It also carries what BoringSSL still holds
/// for the client, such as TLS 1.3 session tickets, which it sends only with the server's
/// first write: a client refused before any answer could otherwise not resume its session
/// on its next connection.
async fn close_notify<S: tokio::io::AsyncWrite + Unpin>(tls: &mut S) {
    use tokio::io::AsyncWriteExt;
    // A zero timeout polls the shutdown once.
    let _ = tokio::time::timeout(Duration::ZERO, tls.shutdown()).await;
}

/// The chain's RBAC decision (true without a filter). `sans`: the names of the verified
/// client certificate of a TLS-terminating chain (`None`: no certificate).
fn rbac_allows(
    chain: &Chain,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    sni: Option<&str>,
    sans: Option<&[san::San<'_>]>,
) -> bool {
    let Some(rbac) = &chain.rbac else { return true };
    let pick = |uri: bool| -> Vec<&str> {
        sans.unwrap_or_default()
            .iter()
            .filter_map(|s| match (s, uri) {
                (san::San::Uri(v), true) | (san::San::Dns(v), false) => Some(*v),
                _ => None,
            })
            .collect()
    };
    let (uri_sans, dns_sans) = (pick(true), pick(false));
    rbac.allows(&Subject {
        headers: None,
        path: None,
        remote_ip: Some(peer.ip()),
        local_ip: local.map(|a| a.ip()),
        local_port: local.map_or(0, |a| a.port()),
        server_name: sni,
        authenticated: sans.is_some(),
        uri_sans: &uri_sans,
        dns_sans: &dns_sans,
        pseudo: Default::default(),
    })
}

/// A downstream stream: plain TCP can be spliced, TLS-terminated streams are copied.
trait Downstream: AsyncRead + AsyncWrite + Unpin {
    fn as_tcp(&self) -> Option<&TcpStream>;
}

impl Downstream for TcpStream {
    fn as_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + crate::tls::ReadReady> Downstream for crate::tls::TlsStream<S> {
    fn as_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

async fn proxy<'a, D: Downstream>(
    tp: &'a TcpProxyCfg,
    id: u64,
    down: &mut D,
    buf: Vec<u8>,
    pending: usize,
    original: Option<SocketAddr>,
    log: &mut AccessLog<'a>,
) {
    tp.stats.downstream_cx_total.inc();
    let Some(target) = tp.pick_target(id) else {
        tp.stats.downstream_cx_no_route.inc();
        return log.finish(Flag::NoCluster, Transferred::default());
    };
    log.cluster = &target.cluster_name;
    if !tp.access_log.is_empty() {
        log.logs = Some(&tp.access_log);
        if log.local.is_none() {
            log.local = original.or_else(|| down.as_tcp().and_then(|s| s.local_addr().ok()));
        }
    }
    tracing::Span::current().record("cluster", log.cluster);
    let Some(cluster) = &target.cluster else {
        tp.stats.downstream_cx_no_route.inc();
        return log.finish(Flag::NoCluster, Transferred::default());
    };
    let cs = &cluster.stats;
    // ORIGINAL_DST: the one host is where the connection was headed.
    let (passthrough, current);
    let hosts = match (cluster.original_dst, original) {
        (false, _) => {
            current = target.hosts();
            &current
        }
        (true, Some(dst)) => {
            passthrough = crate::snapshot::cluster::HostSet::default().with_hosts(vec![Arc::new(Host::at(dst))]);
            &passthrough
        }
        (true, None) => {
            debug!(id, cluster = %cluster.name, "an ORIGINAL_DST cluster for a connection that was not redirected");
            return log.finish(Flag::NoHealthy, Transferred::default());
        }
    };
    if hosts.is_empty() {
        cs.upstream_cx_none_healthy.inc();
        return log.finish(Flag::NoHealthy, Transferred::default());
    }
    if cs.upstream_cx_active.get() >= cluster.max_connections {
        cs.upstream_cx_overflow.inc();
        return log.finish(Flag::Overflow, Transferred::default());
    }
    let _cluster_active = Active::new(&cs.upstream_cx_active);
    let hash = (tp.hash_source_ip && cluster.hashes())
        .then(|| crate::snapshot::hashing::xxh64(log.peer.ip().to_string().as_bytes(), 0));
    let (up, host) = match connect(cluster, hosts, tp.max_connect_attempts, hash).await {
        Ok(c) => c,
        Err(flag) => return log.finish(flag, Transferred::default()),
    };
    tracing::Span::current().record("upstream", tracing::field::display(&host.addr));
    log.upstream = Some(host.addr.clone());
    host.active.fetch_add(1, Ordering::Relaxed);
    let (t, end, err) = match up {
        // Plain TCP on both sides (the ingress passthrough): zero-copy splice.
        Upstream::Plain(Stream::Tcp(mut s)) if down.as_tcp().is_some() => {
            let mut first = Transferred::default();
            if pending > 0 {
                if let Err(e) = s.write_all(&buf[..pending]).await {
                    debug!(id, error = %e, "writing the ClientHello upstream failed");
                }
                first.sent = pending as u64;
            }
            drop(buf);
            let tcp = down.as_tcp().expect("checked by the guard");
            let (t, end, err) = crate::splice::bidirectional(tcp, &s, tp.idle_timeout).await;
            (Transferred { sent: t.sent + first.sent, received: t.received }, end, err)
        }
        Upstream::Plain(mut s) => copy::bidirectional(down, &mut s, buf, pending, tp.idle_timeout).await,
        Upstream::Tls(mut s) => copy::bidirectional(down, &mut *s, buf, pending, tp.idle_timeout).await,
    };
    host.active.fetch_sub(1, Ordering::Relaxed);
    cs.upstream_cx_tx_bytes_total.add(t.sent);
    cs.upstream_cx_rx_bytes_total.add(t.received);
    cs.upstream_cx_destroy.inc();
    tp.stats.downstream_cx_rx_bytes_total.add(t.sent);
    tp.stats.downstream_cx_tx_bytes_total.add(t.received);
    if let Some(e) = err {
        debug!(id, error = %e, "connection ended with an I/O error");
    }
    let flag = if end == End::IdleTimeout {
        tp.stats.idle_timeout.inc();
        Flag::IdleTimeout
    } else {
        Flag::Done
    };
    log.finish(flag, t);
}

/// An upstream connection, with TLS when the host's transport socket originates it.
enum Upstream {
    Plain(Stream),
    Tls(Box<crate::tls::TlsStream<Stream>>),
}

/// Connects (and handshakes, for TLS hosts) to a host of the set, moving on to another
/// host after a failure, up to `attempts` tries. `hash`: the connection's, for a
/// consistent-hashing cluster.
async fn connect(
    cluster: &ClusterCfg,
    hosts: &crate::snapshot::cluster::HostSet,
    attempts: u32,
    hash: Option<u64>,
) -> Result<(Upstream, Arc<Host>), Flag> {
    let cs = &cluster.stats;
    let mut flag = Flag::NoHealthy;
    for attempt in 0..attempts {
        let Some(host) = hosts.pick(cluster.lb, attempt, hash) else {
            // Every host fails its health checks.
            if flag == Flag::NoHealthy {
                cs.upstream_cx_none_healthy.inc();
            }
            return Err(flag);
        };
        let tls = match cluster.tls_for(&host) {
            Tls::Off => None,
            Tls::Ready(ct) => Some(ct),
            Tls::Pending(secret) => {
                debug!(upstream = %host.addr, secret = %secret, "upstream TLS context waits for a secret; refusing");
                return Err(Flag::TlsPending);
            }
        };
        flag = Flag::ConnectFail;
        cs.upstream_cx_total.inc();
        host.total.fetch_add(1, Ordering::Relaxed);
        let outcome = match tokio::time::timeout(cluster.connect_timeout, host.addr.connect_from(&cluster.source)).await
        {
            Ok(Ok(s)) => {
                let Some(ct) = tls else {
                    host.record(Outcome::Connected);
                    return Ok((Upstream::Plain(s), host));
                };
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, ct.connect(s, cs.ssl())).await {
                    Ok(Ok(tls)) => {
                        host.record(Outcome::Connected);
                        return Ok((Upstream::Tls(Box::new(tls)), host));
                    }
                    Ok(Err(e)) => debug!(upstream = %host.addr, error = %e, attempt, "upstream TLS handshake failed"),
                    Err(_) => debug!(upstream = %host.addr, attempt, "upstream TLS handshake timed out"),
                }
                Outcome::ConnectFailed
            }
            Ok(Err(e)) => {
                debug!(upstream = %host.addr, error = %e, attempt, "upstream connect failed");
                Outcome::ConnectFailed
            }
            Err(_) => {
                cs.upstream_cx_connect_timeout.inc();
                debug!(upstream = %host.addr, attempt, "upstream connect timed out");
                Outcome::ConnectTimeout
            }
        };
        host.record(outcome);
        cs.upstream_cx_connect_fail.inc();
        host.connect_fail.fetch_add(1, Ordering::Relaxed);
    }
    Err(flag)
}

/// The one access-log line a connection writes, and the count of its end: written
/// when the record drops, so every exit path writes exactly one.
struct AccessLog<'a> {
    id: u64,
    listener: &'a str,
    peer: SocketAddr,
    sni: Option<&'a str>,
    cluster: &'a str,
    upstream: Option<HostAddr>,
    /// The client certificate's first URI SAN (its SPIFFE ID) when TLS was terminated.
    peer_identity: Option<String>,
    /// Every URI SAN of the client certificate, joined (only for configured access logs).
    peer_uri_sans: Option<String>,
    /// Where the connection was headed, when known.
    local: Option<SocketAddr>,
    /// The tcp_proxy's configured access logs.
    logs: Option<&'a crate::access_log::AccessLogs>,
    started: Instant,
    /// How the connection ended, once it has.
    ended: Option<(Flag, Transferred)>,
    /// The listener's `downstream_cx_destroy`.
    destroy: &'a Counter,
    drain: &'a Drain,
}

impl AccessLog<'_> {
    /// Records how the connection ended; the line is written when the record drops.
    fn finish(&mut self, flag: Flag, t: Transferred) {
        self.ended = Some((flag, t));
    }
}

impl Drop for AccessLog<'_> {
    fn drop(&mut self) {
        self.destroy.inc();
        let (flag, t) = match self.ended.take() {
            Some(e) => e,
            // Dropped before it ended: cut when the drain time ran out, or a panic.
            None if self.drain.cut_off() => (Flag::DrainTimeout, Transferred::default()),
            None => (Flag::Internal, Transferred::default()),
        };
        if let Some(logs) = self.logs {
            let duration = self.started.elapsed();
            logs.log(&crate::access_log::Record {
                start: std::time::SystemTime::now().checked_sub(duration),
                duration,
                bytes_received: t.sent,
                bytes_sent: t.received,
                flags: flag.as_str(),
                cluster: Some(self.cluster),
                upstream_host: self.upstream.as_ref().map(ToString::to_string),
                remote: Some(self.peer),
                direct_remote: Some(self.peer),
                local: self.local,
                peer_uri_san: self.peer_uri_sans.as_deref(),
                sni: self.sni,
                connection_id: self.id,
                ..Default::default()
            });
        }
        info!(
            target: "access",
            id = self.id,
            listener = self.listener,
            peer = %self.peer,
            sni = self.sni.unwrap_or("-"),
            cluster = if self.cluster.is_empty() { "-" } else { self.cluster },
            upstream = %OrDash(self.upstream.as_ref()),
            peer_identity = self.peer_identity.as_deref().unwrap_or("-"),
            sent = t.sent,
            received = t.received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            flag = flag.as_str(),
        );
    }
}

/// Displays the value, or `-` when there is none (access-log convention).
struct OrDash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}
