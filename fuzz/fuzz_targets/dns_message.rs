//! `dns::answer` on arbitrary bytes, for UDP and TCP: no panic; a local reply is a DNS
//! message (parsed by hickory-proto, independently of the crate) with the query's id,
//! QR set, within the transport's size limit; Drop only for short messages or responses.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

use dns::{Reply, Table, Transport, answer};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let many: Vec<IpAddr> = (0..100u8).map(|i| IpAddr::V4(Ipv4Addr::new(240, 0, 1, i))).collect();
        Table::new(
            &["mesh".into()],
            [
                ("echo-server_echo-example_svc_1010.mesh".to_string(), vec!["240.0.0.1".parse().unwrap()]),
                ("dual.mesh".to_string(), vec!["240.0.0.2".parse().unwrap(), "::ffff:f000:2".parse().unwrap()]),
                ("many.mesh".to_string(), many),
                ("a".to_string(), vec!["fd00::1".parse().unwrap()]),
            ],
            Duration::from_secs(30),
        )
    })
}

/// The query's EDNS0 UDP size, found by walking the additional section the way a
/// conforming parser would; None when hickory cannot parse the query.
fn edns_size(query: &[u8]) -> Option<Option<u16>> {
    let m = Message::from_vec(query).ok()?;
    Some(m.edns.as_ref().map(|e| e.max_payload()))
}

fuzz_target!(|data: &[u8]| {
    for transport in [Transport::Udp, Transport::Tcp] {
        match answer(table(), data, transport) {
            Reply::Drop => assert!(data.len() < 12 || data[2] & 0x80 != 0, "dropped a parsable query"),
            Reply::Forward => assert!(data.len() >= 12 && data[2] & 0x80 == 0),
            Reply::Local(r) => {
                assert!(r.len() >= 12);
                assert_eq!(r[..2], data[..2], "id");
                assert!(r[2] & 0x80 != 0, "QR");
                let m = Message::from_vec(&r).unwrap_or_else(|e| panic!("reply does not parse: {e}: {r:?}"));
                assert_eq!(m.metadata.id, u16::from_be_bytes([data[0], data[1]]));
                let limit = match transport {
                    Transport::Tcp => 65535,
                    Transport::Udp => match edns_size(data) {
                        Some(Some(size)) => usize::from(size).clamp(512, 4096),
                        Some(None) => 512,
                        None => 4096,
                    },
                };
                assert!(r.len() <= limit, "{} bytes over the {transport:?} limit {limit}", r.len());
                if m.edns.is_none() && transport == Transport::Udp {
                    assert!(r.len() <= 512, "no OPT in the reply but {} bytes", r.len());
                }
            }
        }
    }
});
