//! Shared helpers: a fake upstream resolver, a server on 127.0.0.1:0 and DNS clients.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub const EXAMPLE_IP: Ipv4Addr = Ipv4Addr::new(93, 184, 216, 34);
/// Records of big.example.org (50 A records: too big for 512 bytes).
pub const BIG: u8 = 50;

pub fn table() -> dns::Table {
    let many: Vec<IpAddr> = (0..100u8).map(|i| IpAddr::V4(Ipv4Addr::new(240, 0, 1, i))).collect();
    dns::Table::new(
        &["mesh".into()],
        [
            ("echo-server_echo-example_svc_1010.mesh".to_string(), vec!["240.0.0.1".parse().unwrap()]),
            ("dual.mesh".to_string(), vec!["240.0.0.2".parse().unwrap(), "::ffff:f000:2".parse().unwrap()]),
            ("many.mesh".to_string(), many),
        ],
        Duration::from_secs(30),
    )
}

/// A resolver on 127.0.0.1 (UDP and TCP, same port): example.org A, big.example.org
/// (truncated over UDP unless EDNS allows 1024+), NXDOMAIN otherwise; every reply delayed by `delay`.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub udp_queries: Arc<AtomicUsize>,
    pub tcp_queries: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn upstream_reply(query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    let question = q.queries.first()?.clone();
    let name = question.name.to_ascii().to_ascii_lowercase();
    r.add_query(question.clone());
    let limit = q.edns.as_ref().map_or(512, |e| e.max_payload()).max(512);
    match name.as_str() {
        "example.org." => {
            r.add_answer(Record::from_rdata(question.name.clone(), 60, RData::A(A(EXAMPLE_IP))));
        }
        "big.example.org." if tcp || limit >= 1024 => {
            for i in 0..BIG {
                r.add_answer(Record::from_rdata(question.name.clone(), 60, RData::A(A(Ipv4Addr::new(10, 0, 0, i)))));
            }
        }
        "big.example.org." => r.metadata.truncation = true,
        _ => r.metadata.response_code = ResponseCode::NXDomain,
    }
    if q.edns.is_some() {
        r.set_edns(Edns::new());
    }
    r.to_vec().ok()
}

impl FakeUpstream {
    pub async fn start(delay: Duration) -> FakeUpstream {
        FakeUpstream::start_gated(delay, watch::channel(true).1).await
    }

    /// Answers only once `gate` is true (and `delay` later): a test decides when a
    /// forward completes instead of racing a timer.
    pub async fn start_gated(delay: Duration, gate: watch::Receiver<bool>) -> FakeUpstream {
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().unwrap();
        let udp_queries = Arc::new(AtomicUsize::new(0));
        let tcp_queries = Arc::new(AtomicUsize::new(0));
        let udp = Arc::new(udp);
        let counter = udp_queries.clone();
        let tcp_gate = gate.clone();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                let query = buf[..n].to_vec();
                let (udp, mut gate) = (udp.clone(), gate.clone());
                tokio::spawn(async move {
                    let _ = gate.wait_for(|open| *open).await;
                    tokio::time::sleep(delay).await;
                    if let Some(r) = upstream_reply(&query, false) {
                        let _ = udp.send_to(&r, peer).await;
                    }
                });
            }
        });
        let counter = tcp_queries.clone();
        let tcp_task = tokio::spawn(async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                let (counter, mut gate) = (counter.clone(), tcp_gate.clone());
                tokio::spawn(async move {
                    while let Ok(q) = read_frame(&mut s).await {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = gate.wait_for(|open| *open).await;
                        tokio::time::sleep(delay).await;
                        let Some(r) = upstream_reply(&q, true) else { return };
                        if write_frame(&mut s, &r).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeUpstream { addr, udp_queries, tcp_queries, tasks: vec![udp_task, tcp_task] }
    }
}

/// A UDP socket and a TCP listener on the same 127.0.0.1 port.
pub async fn bind_pair() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
            return (udp, tcp);
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

pub struct Server {
    pub addr: SocketAddr,
    pub table: watch::Sender<Arc<dns::Table>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_server(servers: Vec<SocketAddr>, limits: dns::Limits) -> Server {
    start_server_with_timeout(servers, limits, Duration::from_millis(300)).await
}

/// [`start_server`] with this upstream timeout.
pub async fn start_server_with_timeout(servers: Vec<SocketAddr>, limits: dns::Limits, timeout: Duration) -> Server {
    let _ = tracing_subscriber::fmt().with_env_filter("dns=debug").with_test_writer().try_init();
    let (udp, tcp) = bind_pair().await;
    let addr = udp.local_addr().unwrap();
    let (tx, rx) = watch::channel(Arc::new(table()));
    let upstream = dns::Upstream { servers, timeout };
    let task = tokio::spawn(dns::serve_with(udp, Some(tcp), rx, upstream, limits));
    Server { addr, table: tx, task }
}

pub fn query(id: u16, name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

pub async fn udp_exchange(server: SocketAddr, query: &[u8]) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(query, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("no UDP reply within 5 s")
        .unwrap();
    Message::from_vec(&buf[..n]).unwrap()
}

pub async fn tcp_exchange(server: SocketAddr, query: &[u8]) -> Message {
    let mut s = TcpStream::connect(server).await.unwrap();
    write_frame(&mut s, query).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s)).await.expect("no TCP reply").unwrap();
    Message::from_vec(&r).unwrap()
}

pub async fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

pub async fn write_frame(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    s.write_all(&framed).await
}

pub fn ipv4s(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}
