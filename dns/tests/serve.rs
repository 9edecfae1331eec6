//! `dns::serve` on 127.0.0.1:0 with UDP and TCP clients and a fake upstream.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn limits() -> dns::Limits {
    dns::Limits::default()
}

#[tokio::test]
async fn udp_and_tcp_answers_from_the_table() {
    let s = start_server(vec![], limits()).await;
    let m = udp_exchange(s.addr, &query(1, "Echo-Server.Echo-Example.SVC.1010.mesh.", RecordType::A, None)).await;
    assert_eq!(m.metadata.id, 1);
    assert_eq!(ipv4s(&m), vec![Ipv4Addr::new(240, 0, 0, 1)]);
    assert_eq!(m.answers[0].name.to_ascii(), "Echo-Server.Echo-Example.SVC.1010.mesh.");
    let m = tcp_exchange(s.addr, &query(2, "echo-server_echo-example_svc_1010.mesh.", RecordType::A, None)).await;
    assert_eq!((m.metadata.id, ipv4s(&m)), (2, vec![Ipv4Addr::new(240, 0, 0, 1)]));
    let m = udp_exchange(s.addr, &query(3, "dual.mesh.", RecordType::AAAA, None)).await;
    assert_eq!(m.answers.len(), 1);
    let m = udp_exchange(s.addr, &query(4, "nope.mesh.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn hundred_records_truncate_over_udp_and_arrive_over_tcp() {
    let s = start_server(vec![], limits()).await;
    let m = udp_exchange(s.addr, &query(5, "many.mesh.", RecordType::A, None)).await;
    assert!(m.metadata.truncation && m.answers.is_empty());
    let m = udp_exchange(s.addr, &query(5, "many.mesh.", RecordType::A, Some(4096))).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    let m = tcp_exchange(s.addr, &query(6, "many.mesh.", RecordType::A, None)).await;
    assert!(!m.metadata.truncation);
    assert_eq!(ipv4s(&m).len(), 100);
}

#[tokio::test]
async fn table_is_swapped_through_the_watch() {
    let s = start_server(vec![], limits()).await;
    let m = udp_exchange(s.addr, &query(1, "new.mesh.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let t = dns::Table::new(
        &["mesh".into()],
        [("new.mesh".to_string(), vec![IpAddr::V4(Ipv4Addr::new(240, 0, 0, 9))])],
        Duration::from_secs(5),
    );
    s.table.send(Arc::new(t)).unwrap();
    let m = udp_exchange(s.addr, &query(1, "new.mesh.", RecordType::A, None)).await;
    assert_eq!(ipv4s(&m), vec![Ipv4Addr::new(240, 0, 0, 9)]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = tcp_exchange(s.addr, &query(1, "dual.mesh.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

#[tokio::test]
async fn other_names_are_forwarded_with_the_original_id() {
    let up = FakeUpstream::start(Duration::ZERO).await;
    let s = start_server(vec![up.addr], limits()).await;
    let m = udp_exchange(s.addr, &query(0xbeef, "example.org.", RecordType::A, None)).await;
    assert_eq!(m.metadata.id, 0xbeef);
    assert_eq!(ipv4s(&m), vec![EXAMPLE_IP]);
    let m = udp_exchange(s.addr, &query(0xbef0, "unknown.example.", RecordType::A, None)).await;
    assert_eq!((m.metadata.id, m.metadata.response_code), (0xbef0, ResponseCode::NXDomain));
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 2);
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 0);
    // A TCP client is forwarded over TCP.
    let m = tcp_exchange(s.addr, &query(0xcafe, "example.org.", RecordType::A, None)).await;
    assert_eq!((m.metadata.id, ipv4s(&m)), (0xcafe, vec![EXAMPLE_IP]));
    assert_eq!(up.tcp_queries.load(Ordering::SeqCst), 1);
    assert_eq!(up.udp_queries.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn truncated_upstream_reply_is_retried_over_tcp() {
    let up = FakeUpstream::start(Duration::ZERO).await;
    let s = start_server(vec![up.addr], limits()).await;
    // The fake truncates big.example.org over UDP when EDNS allows less than 1024 bytes;
    // the full reply is 844 bytes.
    let m = udp_exchange(s.addr, &query(9, "big.example.org.", RecordType::A, Some(900))).await;
    assert!(!m.metadata.truncation);
    assert_eq!((m.metadata.id, m.answers.len()), (9, BIG as usize));
    assert_eq!((up.udp_queries.load(Ordering::SeqCst), up.tcp_queries.load(Ordering::SeqCst)), (1, 1));
    // Full reply larger than the client's limit: the client gets the truncated reply.
    let m = udp_exchange(s.addr, &query(10, "big.example.org.", RecordType::A, None)).await;
    assert!(m.metadata.truncation && m.answers.is_empty());
    assert_eq!((up.udp_queries.load(Ordering::SeqCst), up.tcp_queries.load(Ordering::SeqCst)), (2, 2));
    // Then over TCP, as a client would retry: the full answer.
    let m = tcp_exchange(s.addr, &query(11, "big.example.org.", RecordType::A, None)).await;
    assert_eq!(m.answers.len(), BIG as usize);
}

#[tokio::test]
async fn servfail_when_all_upstreams_fail() {
    // Two upstreams that never answer (bound, never read) and one that refuses TCP.
    let silent1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let silent2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let servers = vec![silent1.local_addr().unwrap(), silent2.local_addr().unwrap()];
    let s = start_server(servers.clone(), limits()).await;
    let start = Instant::now();
    let m = udp_exchange(s.addr, &query(0x1234, "example.org.", RecordType::A, Some(1232))).await;
    let took = start.elapsed();
    assert_eq!((m.metadata.id, m.metadata.response_code), (0x1234, ResponseCode::ServFail));
    assert!(m.edns.is_some());
    assert!(took >= Duration::from_millis(550), "both upstreams (300 ms each) were tried: {took:?}");
    let m = tcp_exchange(s.addr, &query(0x1235, "example.org.", RecordType::A, None)).await;
    assert_eq!((m.metadata.id, m.metadata.response_code), (0x1235, ResponseCode::ServFail));
    // No upstream at all: SERVFAIL at once.
    let s = start_server(vec![], limits()).await;
    let m = udp_exchange(s.addr, &query(7, "example.org.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

#[tokio::test]
async fn own_address_is_not_used_as_upstream() {
    let (udp, tcp) = bind_pair().await;
    let addr = udp.local_addr().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(table()));
    let upstream = dns::Upstream { servers: vec![addr], timeout: Duration::from_secs(3) };
    let task = tokio::spawn(dns::serve(udp, Some(tcp), rx, upstream));
    let start = Instant::now();
    let m = udp_exchange(addr, &query(7, "example.org.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(start.elapsed() < Duration::from_secs(2), "no forwarding loop, no 3 s timeout");
    task.abort();
}

#[tokio::test]
async fn slow_upstream_does_not_block_local_answers() {
    let up = FakeUpstream::start(Duration::from_millis(800)).await;
    let s = start_server(vec![up.addr], dns::Limits { ..limits() }).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let start = Instant::now();
    client.send_to(&query(1, "example.org.", RecordType::A, None), s.addr).await.unwrap();
    client.send_to(&query(2, "dual.mesh.", RecordType::A, None), s.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = client.recv(&mut buf).await.unwrap();
    let first = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(first.metadata.id, 2, "the local answer comes first");
    assert!(start.elapsed() < Duration::from_millis(800), "before the upstream's delay");
    // Upstream timeout in these tests is 300 ms < 800 ms delay: SERVFAIL follows.
    let n = client.recv(&mut buf).await.unwrap();
    let second = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((second.metadata.id, second.metadata.response_code), (1, ResponseCode::ServFail));
}

#[tokio::test]
async fn forwards_in_flight_are_bounded() {
    let up = FakeUpstream::start(Duration::from_millis(200)).await;
    let s = start_server(vec![up.addr], dns::Limits { max_forwards: 1, ..limits() }).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&query(1, "example.org.", RecordType::A, None), s.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.send_to(&query(2, "example.org.", RecordType::A, None), s.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = client.recv(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((m.metadata.id, m.metadata.response_code), (2, ResponseCode::ServFail), "over the limit");
    let n = client.recv(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((m.metadata.id, ipv4s(&m)), (1, vec![EXAMPLE_IP]));
    // The permit is released: the next forward works.
    let m = udp_exchange(s.addr, &query(3, "example.org.", RecordType::A, None)).await;
    assert_eq!(ipv4s(&m), vec![EXAMPLE_IP]);
}

#[tokio::test]
async fn tcp_pipelined_and_partial_queries() {
    // The forward completes only when the test opens the gate: local answers must not
    // wait for it (no race with a timer).
    let (open, gate) = tokio::sync::watch::channel(false);
    let up = FakeUpstream::start_gated(Duration::ZERO, gate).await;
    let s = start_server_with_timeout(vec![up.addr], limits(), Duration::from_secs(20)).await;
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    // Three queries in one write: a forward (slow) and two local ones.
    let mut batch = Vec::new();
    for q in [
        query(1, "example.org.", RecordType::A, None),
        query(2, "dual.mesh.", RecordType::A, None),
        query(3, "many.mesh.", RecordType::A, None),
    ] {
        batch.extend_from_slice(&(q.len() as u16).to_be_bytes());
        batch.extend_from_slice(&q);
    }
    // A fourth one byte by byte.
    let q4 = query(4, "nope.mesh.", RecordType::A, None);
    let mut slow = (q4.len() as u16).to_be_bytes().to_vec();
    slow.extend_from_slice(&q4);
    c.write_all(&batch).await.unwrap();
    for b in slow {
        c.write_all(&[b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut seen = Vec::new();
    for i in 0..4 {
        if i == 3 {
            // The three local answers came while the forward was held: now let it finish.
            open.send_replace(true);
        }
        let r = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut c)).await.unwrap().unwrap();
        let m = Message::from_vec(&r).unwrap();
        match m.metadata.id {
            1 => assert_eq!(ipv4s(&m), vec![EXAMPLE_IP]),
            2 => assert_eq!(ipv4s(&m), vec![Ipv4Addr::new(240, 0, 0, 2)]),
            3 => assert_eq!(m.answers.len(), 100),
            4 => assert_eq!(m.metadata.response_code, ResponseCode::NXDomain),
            id => panic!("unexpected id {id}"),
        }
        seen.push(m.metadata.id);
    }
    assert_eq!(seen.last(), Some(&1), "the slow forward does not hold back local answers: {seen:?}");
    seen.sort();
    assert_eq!(seen, [1, 2, 3, 4]);
}

#[tokio::test]
async fn tcp_idle_connections_are_closed() {
    let s = start_server(vec![], dns::Limits { tcp_idle_timeout: Duration::from_millis(200), ..limits() }).await;
    // Idle after one query.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    write_frame(&mut c, &query(1, "dual.mesh.", RecordType::A, None)).await.unwrap();
    read_frame(&mut c).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await.expect("not closed").unwrap_or(0);
    assert_eq!(n, 0);
    assert!(start.elapsed() >= Duration::from_millis(150));
    // Stalled in the middle of a message.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(&[0, 40, 1, 2, 3]).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf)).await.expect("not closed").unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn tcp_connections_are_bounded() {
    let s = start_server(vec![], dns::Limits { max_tcp_connections: 1, ..limits() }).await;
    let mut first = TcpStream::connect(s.addr).await.unwrap();
    write_frame(&mut first, &query(1, "dual.mesh.", RecordType::A, None)).await.unwrap();
    read_frame(&mut first).await.unwrap();
    let mut second = TcpStream::connect(s.addr).await.unwrap();
    let _ = write_frame(&mut second, &query(2, "dual.mesh.", RecordType::A, None)).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(3), second.read(&mut buf)).await.expect("not closed").unwrap_or(0);
    assert_eq!(n, 0, "the second connection is closed");
    // The first still works; once it is gone a new connection is served.
    write_frame(&mut first, &query(3, "dual.mesh.", RecordType::A, None)).await.unwrap();
    assert_eq!(Message::from_vec(&read_frame(&mut first).await.unwrap()).unwrap().metadata.id, 3);
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = tcp_exchange(s.addr, &query(4, "dual.mesh.", RecordType::A, None)).await;
    assert_eq!(m.metadata.id, 4);
}

#[tokio::test]
async fn malformed_udp_gets_formerr_or_nothing() {
    let s = start_server(vec![], limits()).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&[0xab, 0xcd, 1, 0, 0, 1], s.addr).await.unwrap(); // short: dropped
    client.send_to(&[0xab, 0xce, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 63, b'x'], s.addr).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(3), client.recv(&mut buf)).await.unwrap().unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((m.metadata.id, m.metadata.response_code), (0xabce, ResponseCode::FormErr));
    // Nothing else arrives (the short datagram got no reply).
    assert!(tokio::time::timeout(Duration::from_millis(200), client.recv(&mut buf)).await.is_err());
}
