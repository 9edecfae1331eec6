//! The UDP + TCP server loop and upstream forwarding.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::table::Table;
use crate::wire::{self, Decision, Parsed, Question, Transport};

/// Where names outside the served domains are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Tried in order; the next one on error or timeout.
    pub servers: Vec<SocketAddr>,
    /// Per server and attempt (UDP exchange, then TCP exchange when it is needed).
    pub timeout: Duration,
}

/// Per-server timeout when resolv.conf has no `options timeout:N`.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

impl Upstream {
    /// Reads `nameserver` lines (IPv4 or IPv6, port 53; an IPv6 `%zone` suffix is
    /// dropped) and `options timeout:N` (seconds, default 2) from a resolv.conf file.
    /// Error: the file cannot be read, or has no usable `nameserver` line.
    pub fn from_resolv_conf(path: &Path) -> io::Result<Upstream> {
        let text = std::fs::read_to_string(path)?;
        let upstream = Upstream::parse_resolv_conf(&text);
        if upstream.servers.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} has no usable `nameserver` line; add one or pass the upstream servers explicitly",
                    path.display()
                ),
            ));
        }
        Ok(upstream)
    }

    /// The parsing half of [`Upstream::from_resolv_conf`]; unparsable lines are ignored.
    pub fn parse_resolv_conf(text: &str) -> Upstream {
        let mut servers = Vec::new();
        let mut timeout = DEFAULT_UPSTREAM_TIMEOUT;
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    let Some(addr) = words.next() else { continue };
                    let addr = addr.split('%').next().unwrap_or(addr);
                    if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
                        servers.push(SocketAddr::new(ip, 53));
                    }
                }
                Some("options") => {
                    for opt in words {
                        if let Some(secs) = opt.strip_prefix("timeout:").and_then(|s| s.parse::<u64>().ok()) {
                            timeout = Duration::from_secs(secs.clamp(1, 30));
                        }
                    }
                }
                _ => {}
            }
        }
        Upstream { servers, timeout }
    }
}

/// Resource bounds of [`serve_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Forwards in flight (UDP and TCP clients together); beyond it, SERVFAIL at once.
    pub max_forwards: usize,
    /// Open TCP client connections; beyond it, new ones are accepted and closed.
    pub max_tcp_connections: usize,
    /// A TCP connection is closed when no complete query arrives for this long (also the
    /// bound for writing one reply to a client that does not read).
    pub tcp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_forwards: 256, max_tcp_connections: 64, tcp_idle_timeout: Duration::from_secs(10) }
    }
}

/// Serves UDP and TCP until dropped/aborted; the table is swapped through the watch
/// (each query reads the current one). Uses [`Limits::default`].
pub async fn serve(udp: UdpSocket, tcp: Option<TcpListener>, table: watch::Receiver<Arc<Table>>, upstream: Upstream) {
    serve_with(udp, tcp, table, upstream, Limits::default()).await
}

/// [`serve`] with explicit resource limits. Dropping the future stops everything,
/// including forwards and TCP connections in progress.
pub async fn serve_with(
    udp: UdpSocket,
    tcp: Option<TcpListener>,
    table: watch::Receiver<Arc<Table>>,
    mut upstream: Upstream,
    limits: Limits,
) {
    let udp_addr = udp.local_addr().ok();
    let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    // Forwarding to ourselves would loop until the forward limit is reached.
    upstream.servers.retain(|s| {
        let own = [udp_addr, tcp_addr].into_iter().flatten().any(|l| is_self(l, *s));
        if own {
            warn!(upstream = %s, "dns: ignoring upstream server that is this server's own address");
        }
        !own
    });
    info!(udp = ?udp_addr, tcp = ?tcp_addr, upstream = ?upstream.servers, "dns: listening");
    let shared = Arc::new(Shared { upstream, forwards: Arc::new(Semaphore::new(limits.max_forwards)), limits });
    let udp_loop = udp_loop(Arc::new(udp), table.clone(), shared.clone());
    let tcp_loop = async move {
        match tcp {
            Some(listener) => tcp_loop(listener, table, shared).await,
            None => std::future::pending().await,
        }
    };
    tokio::join!(udp_loop, tcp_loop);
}

fn is_self(local: SocketAddr, server: SocketAddr) -> bool {
    local.port() == server.port()
        && (local.ip() == server.ip() || (local.ip().is_unspecified() && server.ip().is_loopback()))
}

struct Shared {
    upstream: Upstream,
    forwards: Arc<Semaphore>,
    limits: Limits,
}

fn current(table: &watch::Receiver<Arc<Table>>) -> Arc<Table> {
    table.borrow().clone()
}

async fn udp_loop(udp: Arc<UdpSocket>, table: watch::Receiver<Arc<Table>>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; 65535];
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (n, peer) = match udp.recv_from(&mut buf).await {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "dns: udp receive failed");
                continue;
            }
        };
        let query = &buf[..n];
        match wire::decide(&current(&table), query, Transport::Udp) {
            Decision::Local(reply) => {
                log_local(query, &reply, peer, "udp");
                if let Err(e) = udp.send_to(&reply, peer).await {
                    debug!(%peer, error = %e, "dns: udp send failed");
                }
            }
            Decision::Drop => debug!(%peer, len = n, "dns: dropped udp datagram"),
            Decision::Forward(p) => match shared.forwards.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (query, udp, shared) = (query.to_vec(), udp.clone(), shared.clone());
                    tasks.spawn(async move {
                        let reply = forward(&shared, &query, &p, Transport::Udp, permit).await;
                        log_forwarded(&query, &reply, peer, "udp");
                        if let Err(e) = udp.send_to(&reply, peer).await {
                            debug!(%peer, error = %e, "dns: udp send failed");
                        }
                    });
                }
                Err(_) => {
                    debug!(%peer, question = %Question(query), "dns: forward limit reached, SERVFAIL");
                    let _ = udp.send_to(&wire::servfail(query, &p), peer).await;
                }
            },
        }
    }
}

async fn tcp_loop(listener: TcpListener, table: watch::Receiver<Arc<Table>>, shared: Arc<Shared>) {
    let connections = Arc::new(Semaphore::new(shared.limits.max_tcp_connections));
    let mut tasks = JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // EMFILE and friends: do not spin.
                warn!(error = %e, "dns: tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%peer, "dns: tcp connection limit reached, closing");
            continue;
        };
        tasks.spawn(tcp_connection(stream, peer, table.clone(), shared.clone(), permit));
    }
}

/// One client connection: queries are read (length-prefixed, possibly pipelined or split
/// across segments) and answered as they complete; forwards run concurrently, so replies
/// may come out of order (RFC 7766 allows it; clients match by id).
async fn tcp_connection(
    stream: TcpStream,
    peer: SocketAddr,
    table: watch::Receiver<Arc<Table>>,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
) {
    let idle = shared.limits.tcp_idle_timeout;
    let (rd, wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let writer = async move {
        let mut wr = BufWriter::new(wr);
        while let Some(msg) = rx.recv().await {
            let len = (msg.len().min(65535) as u16).to_be_bytes();
            let write = async {
                wr.write_all(&len).await?;
                wr.write_all(&msg[..msg.len().min(65535)]).await?;
                if rx.is_empty() {
                    wr.flush().await?;
                }
                io::Result::Ok(())
            };
            match timeout(idle, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "dns: tcp write failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "dns: tcp write timed out");
                    return;
                }
            }
        }
        let _ = wr.shutdown().await;
    };
    let reader = async move {
        let mut rd = BufReader::new(rd);
        let mut forwards = JoinSet::new();
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 2];
            match timeout(idle, rd.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => break, // EOF or reset
                Err(_) => {
                    debug!(%peer, "dns: tcp connection idle, closing");
                    break;
                }
            }
            buf.resize(usize::from(u16::from_be_bytes(len)), 0);
            match timeout(idle, rd.read_exact(&mut buf)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    debug!(%peer, "dns: tcp query incomplete, closing");
                    break;
                }
            }
            let query = &buf[..];
            match wire::decide(&current(&table), query, Transport::Tcp) {
                Decision::Local(reply) => {
                    log_local(query, &reply, peer, "tcp");
                    if tx.send(reply).await.is_err() {
                        break;
                    }
                }
                Decision::Drop => debug!(%peer, len = buf.len(), "dns: dropped tcp message"),
                Decision::Forward(p) => match shared.forwards.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (query, tx, shared) = (query.to_vec(), tx.clone(), shared.clone());
                        forwards.spawn(async move {
                            let reply = forward(&shared, &query, &p, Transport::Tcp, permit).await;
                            log_forwarded(&query, &reply, peer, "tcp");
                            let _ = tx.send(reply).await;
                        });
                    }
                    Err(_) => {
                        debug!(%peer, question = %Question(query), "dns: forward limit reached, SERVFAIL");
                        if tx.send(wire::servfail(query, &p)).await.is_err() {
                            break;
                        }
                    }
                },
            }
            while forwards.try_join_next().is_some() {}
        }
        // Let forwards in flight deliver their replies, then close.
        while forwards.join_next().await.is_some() {}
    };
    tokio::join!(reader, writer);
}

fn log_local(query: &[u8], reply: &[u8], peer: SocketAddr, transport: &'static str) {
    let (rcode, answers) = wire::summary(reply);
    let tc = wire::is_truncated(reply);
    debug!(%peer, transport, id = id(query), question = %Question(query), rcode, answers, tc, "dns: local answer");
}

fn log_forwarded(query: &[u8], reply: &[u8], peer: SocketAddr, transport: &'static str) {
    let (rcode, answers) = wire::summary(reply);
    debug!(%peer, transport, id = id(query), question = %Question(query), rcode, answers, "dns: forwarded");
}

fn id(msg: &[u8]) -> u16 {
    u16::from_be_bytes([msg[0], msg[1]])
}

/// Sends the query to each upstream server in turn; the first plausible reply wins.
/// UDP clients: UDP, then TCP to the same server if the reply is truncated (used only if
/// the full reply fits the client's limit). TCP clients: TCP. SERVFAIL if all fail.
async fn forward(
    shared: &Shared,
    query: &[u8],
    p: &Parsed,
    client: Transport,
    _permit: OwnedSemaphorePermit,
) -> Vec<u8> {
    let wait = shared.upstream.timeout;
    for &server in &shared.upstream.servers {
        let result = match client {
            Transport::Udp => match udp_exchange(server, query, p, wait).await {
                Ok(reply) if wire::is_truncated(&reply) => match tcp_exchange(server, query, p, wait).await {
                    Ok(full) if full.len() <= p.limit => Ok(full),
                    Ok(_) => Ok(reply),
                    Err(e) => {
                        debug!(%server, error = %e, "dns: upstream tcp retry failed, passing on the truncated reply");
                        Ok(reply)
                    }
                },
                other => other,
            },
            Transport::Tcp => tcp_exchange(server, query, p, wait).await,
        };
        match result {
            Ok(reply) if reply.len() > p.limit => return wire::truncated(query, p),
            Ok(reply) => return reply,
            Err(e) => debug!(%server, question = %Question(query), error = %e, "dns: upstream failed"),
        }
    }
    wire::servfail(query, p)
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "upstream did not answer in time")
}

async fn udp_exchange(server: SocketAddr, query: &[u8], p: &Parsed, wait: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + wait;
    let local: SocketAddr =
        if server.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = timeout_at(deadline, sock.recv(&mut buf)).await.map_err(|_| timed_out())??;
        if wire::matches(query, p, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
        debug!(%server, "dns: ignoring upstream datagram that does not match the query");
    }
}

async fn tcp_exchange(server: SocketAddr, query: &[u8], p: &Parsed, wait: Duration) -> io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect(server).await?;
        stream.set_nodelay(true)?;
        let mut framed = Vec::with_capacity(query.len() + 2);
        framed.extend_from_slice(&(query.len() as u16).to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        loop {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut reply).await?;
            if wire::matches(query, p, &reply) {
                return Ok(reply);
            }
        }
    };
    timeout(wait, exchange).await.map_err(|_| timed_out())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.1\nnameserver fe80::1%eth0 # x\n\
                    nameserver bogus\nnameserver\noptions ndots:2 timeout:3 attempts:2\n";
        let u = Upstream::parse_resolv_conf(text);
        assert_eq!(u.servers, vec!["10.0.0.1:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]);
        assert_eq!(u.timeout, Duration::from_secs(3));
        assert_eq!(Upstream::parse_resolv_conf("").timeout, DEFAULT_UPSTREAM_TIMEOUT);
    }

    #[test]
    fn resolv_conf_without_nameserver_is_an_error() {
        let dir = std::env::temp_dir().join(format!("dns-resolv-{}", std::process::id()));
        std::fs::write(&dir, "search x\n").unwrap();
        let err = Upstream::from_resolv_conf(&dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("nameserver"), "{err}");
        assert!(Upstream::from_resolv_conf(Path::new("/nonexistent/resolv.conf")).is_err());
    }

    #[test]
    fn self_detection() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_self(a("127.0.0.1:53"), a("127.0.0.1:53")));
        assert!(is_self(a("0.0.0.0:53"), a("127.0.0.1:53")));
        assert!(!is_self(a("0.0.0.0:15053"), a("127.0.0.1:53")));
        assert!(!is_self(a("127.0.0.1:53"), a("10.0.0.1:53")));
    }
}
