//! The DNS wire format this server needs: parse one query (header, one question, the
//! EDNS0 OPT record) and build replies. Bounded, allocation-free until the reply buffer.

use std::fmt;
use std::net::IpAddr;

use crate::table::{MAX_NAME, Table};

/// How the query arrived; decides the reply size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Limit: 512, or the client's EDNS0 UDP payload size (at least 512, at most 4096).
    Udp,
    /// Limit: 65535 (the TCP length prefix).
    Tcp,
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Send this reply (already within the transport's size limit).
    Local(Vec<u8>),
    /// The name is not ours: send the query, unchanged, upstream.
    Forward,
    /// Not worth a reply: shorter than a header, or a response rather than a query.
    Drop,
}

/// The most an EDNS0 client may make us send over UDP.
pub const MAX_UDP: usize = 4096;
/// Without EDNS0.
pub const MIN_UDP: usize = 512;
const MAX_TCP: usize = 65535;

const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;
const CLASS_ANY: u16 = 255;

pub(crate) const NOERROR: u8 = 0;
pub(crate) const FORMERR: u8 = 1;
pub(crate) const SERVFAIL: u8 = 2;
pub(crate) const NXDOMAIN: u8 = 3;
pub(crate) const NOTIMP: u8 = 4;
pub(crate) const REFUSED: u8 = 5;
/// Extended RCODE 16 (BADVERS): upper 8 bits (1) in the OPT TTL, lower 4 bits (0) in the header.
const BADVERS_HIGH: u8 = 1;

const OPT_LEN: usize = 11;
/// The UDP payload size we advertise in our OPT record.
const OUR_UDP_SIZE: u16 = MAX_UDP as u16;

/// Answers a query message from the table. Pure; for a table hit the only allocation is
/// the reply buffer, sized exactly.
///
/// * Drop: shorter than 12 bytes, or the QR bit is set.
/// * NOTIMP: opcode other than QUERY. FORMERR: anything else malformed (question count
///   other than 1, compression or extended labels in the question, names over 255
///   octets, records running past the end, a second OPT or a non-root OPT owner).
/// * BADVERS: EDNS version other than 0.
/// * A name in the table: A / AAAA / ANY answers (NODATA when the family is missing),
///   NOERROR and no answers for other types, REFUSED for classes other than IN / ANY.
/// * Not in the table but under a served domain: NODATA for the apex and empty
///   non-terminals, NXDOMAIN otherwise.
/// * Everything else: [`Reply::Forward`].
///
/// Local replies set QR, AA, RA, echo id, opcode, RD, CD, the question (in its original
/// case; answers point at it) and, if the query had one, an OPT record (our size 4096,
/// DO copied). If the answers do not fit the limit, the reply has TC set and no answers.
pub fn answer(table: &Table, query: &[u8], transport: Transport) -> Reply {
    match decide(table, query, transport) {
        Decision::Local(reply) => Reply::Local(reply),
        Decision::Forward(_) => Reply::Forward,
        Decision::Drop => Reply::Drop,
    }
}

pub(crate) enum Decision {
    Local(Vec<u8>),
    Forward(Parsed),
    Drop,
}

/// What the server needs to remember about a forwarded query.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parsed {
    id: u16,
    /// Header byte 2 (QR, opcode, AA, TC, RD) and byte 3 (RA, Z, AD, CD, RCODE) of the query.
    flags: [u8; 2],
    /// End of the question section (it starts at offset 12).
    qend: usize,
    qtype: u16,
    qclass: u16,
    edns: Option<Edns>,
    /// The reply size limit for the query's transport.
    pub(crate) limit: usize,
}

#[derive(Debug, Clone, Copy)]
struct Edns {
    udp_size: u16,
    version: u8,
    dnssec_ok: bool,
}

pub(crate) fn decide(table: &Table, query: &[u8], transport: Transport) -> Decision {
    let Some(header) = query.get(..HEADER) else { return Decision::Drop };
    if header[2] & 0x80 != 0 {
        return Decision::Drop;
    }
    let opcode = (header[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Decision::Local(header_only(header, NOTIMP));
    }
    let mut key = [0u8; MAX_NAME + 3];
    let Ok((parsed, keylen, clean)) = parse(query, transport, &mut key) else {
        return Decision::Local(header_only(header, FORMERR));
    };
    if parsed.edns.is_some_and(|e| e.version != 0) {
        return Decision::Local(build(query, &parsed, NOERROR, BADVERS_HIGH, &[], 0));
    }
    let key = &key[..keylen];
    let node = if clean { table.node(key) } else { None };
    if node.is_none() && !table.is_served(key) {
        return Decision::Forward(parsed);
    }
    if parsed.qclass != CLASS_IN && parsed.qclass != CLASS_ANY {
        return Decision::Local(build(query, &parsed, REFUSED, 0, &[], 0));
    }
    let reply = match node {
        None => build(query, &parsed, NXDOMAIN, 0, &[], 0),
        Some(node) => {
            let answers = match parsed.qtype {
                TYPE_A => node.v4(),
                TYPE_AAAA => node.v6(),
                TYPE_ANY => node.all(),
                _ => &[],
            };
            build(query, &parsed, NOERROR, 0, answers, table.ttl())
        }
    };
    Decision::Local(reply)
}

/// Parses header, question and the remaining records; writes the question name,
/// lowercased and dotted, into `key`. Returns (parsed, key length, key is unambiguous).
fn parse(msg: &[u8], transport: Transport, key: &mut [u8; MAX_NAME + 3]) -> Result<(Parsed, usize, bool), ()> {
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    if count(4) != 1 {
        return Err(());
    }
    let (ancount, nscount, arcount) = (count(6), count(8), count(10));
    // Question name: plain labels only, no compression.
    let mut pos = HEADER;
    let mut keylen = 0;
    let mut clean = true;
    loop {
        let len = *msg.get(pos).ok_or(())? as usize;
        if len & 0xc0 != 0 {
            return Err(());
        }
        if pos + 1 + len - HEADER > 255 {
            return Err(());
        }
        if len == 0 {
            pos += 1;
            break;
        }
        let label = msg.get(pos + 1..pos + 1 + len).ok_or(())?;
        if keylen > 0 {
            key[keylen] = b'.';
            keylen += 1;
        }
        for &b in label {
            // A '.' inside a label must not read as a label boundary: it becomes NUL,
            // and such a name never matches a record.
            let dot = b == b'.';
            clean &= !dot;
            key[keylen] = if dot { 0 } else { b.to_ascii_lowercase() };
            keylen += 1;
        }
        pos += 1 + len;
    }
    let qtype = read_u16(msg, pos)?;
    let qclass = read_u16(msg, pos + 2)?;
    pos += 4;
    let qend = pos;
    for _ in 0..u32::from(ancount) + u32::from(nscount) {
        pos = skip_record(msg, pos)?.0;
    }
    let mut edns = None;
    for _ in 0..arcount {
        let (next, rtype, owner_root) = skip_record(msg, pos)?;
        if rtype == TYPE_OPT {
            if edns.is_some() || !owner_root {
                return Err(());
            }
            // owner (1) type (2) class = UDP size (2) TTL = ext-rcode, version, flags (4)
            let udp_size = read_u16(msg, pos + 3)?;
            let version = msg[pos + 6];
            let dnssec_ok = msg[pos + 7] & 0x80 != 0;
            edns = Some(Edns { udp_size, version, dnssec_ok });
        }
        pos = next;
    }
    let limit = match (transport, edns) {
        (Transport::Tcp, _) => MAX_TCP,
        (Transport::Udp, None) => MIN_UDP,
        (Transport::Udp, Some(e)) => usize::from(e.udp_size).clamp(MIN_UDP, MAX_UDP),
    };
    let parsed = Parsed { id: count(0), flags: [msg[2], msg[3]], qend, qtype, qclass, edns, limit };
    Ok((parsed, keylen, clean))
}

fn read_u16(msg: &[u8], at: usize) -> Result<u16, ()> {
    let b = msg.get(at..at + 2).ok_or(())?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

/// Skips one resource record; returns (next offset, type, owner is the root name).
fn skip_record(msg: &[u8], mut pos: usize) -> Result<(usize, u16, bool), ()> {
    let start = pos;
    loop {
        let len = *msg.get(pos).ok_or(())? as usize;
        match len & 0xc0 {
            0x00 if len == 0 => {
                pos += 1;
                break;
            }
            0x00 => pos += 1 + len,
            0xc0 => {
                pos += 2;
                break;
            }
            _ => return Err(()),
        }
        if pos - start > 255 {
            return Err(());
        }
    }
    let owner_root = pos == start + 1;
    let rtype = read_u16(msg, pos)?;
    let rdlen = read_u16(msg, pos + 8)? as usize;
    let end = pos + 10 + rdlen;
    if end > msg.len() {
        return Err(());
    }
    Ok((end, rtype, owner_root))
}

/// A reply with the query's header fields and nothing else (no question, no OPT).
fn header_only(query_header: &[u8], rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER);
    out.extend_from_slice(&query_header[..2]);
    out.push(0x80 | (query_header[2] & 0x79)); // QR, opcode, RD
    out.push(0x80 | (query_header[3] & 0x10) | rcode); // RA, CD
    out.extend_from_slice(&[0; 8]);
    out
}

/// Builds a reply to a parsed query: header, the question copied from the query, the
/// answers (if they fit `p.limit`, else TC and none) and an OPT if the query had one.
fn build(query: &[u8], p: &Parsed, rcode: u8, ext_rcode: u8, answers: &[IpAddr], ttl: u32) -> Vec<u8> {
    let question = &query[HEADER..p.qend];
    let opt_len = if p.edns.is_some() { OPT_LEN } else { 0 };
    let fixed = HEADER + question.len() + opt_len;
    let answers_len: usize = answers.iter().map(|ip| if ip.is_ipv4() { 16 } else { 28 }).sum();
    let fits = fixed + answers_len <= p.limit;
    let (answers, tc) = if fits { (answers, 0) } else { (&[][..], 0x02) };
    let mut out = Vec::with_capacity(if fits { fixed + answers_len } else { fixed });
    out.extend_from_slice(&p.id.to_be_bytes());
    out.push(0x80 | (p.flags[0] & 0x79) | 0x04 | tc); // QR, opcode, AA, TC, RD
    out.push(0x80 | (p.flags[1] & 0x10) | rcode); // RA, CD
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&(u16::from(p.edns.is_some())).to_be_bytes());
    out.extend_from_slice(question);
    for ip in answers {
        out.extend_from_slice(&[0xc0, HEADER as u8]); // pointer to the question name
        match ip {
            IpAddr::V4(v4) => {
                out.extend_from_slice(&TYPE_A.to_be_bytes());
                out.extend_from_slice(&CLASS_IN.to_be_bytes());
                out.extend_from_slice(&ttl.to_be_bytes());
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                out.extend_from_slice(&TYPE_AAAA.to_be_bytes());
                out.extend_from_slice(&CLASS_IN.to_be_bytes());
                out.extend_from_slice(&ttl.to_be_bytes());
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&v6.octets());
            }
        }
    }
    if let Some(e) = p.edns {
        out.push(0); // root owner
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&OUR_UDP_SIZE.to_be_bytes());
        out.extend_from_slice(&[ext_rcode, 0, if e.dnssec_ok { 0x80 } else { 0 }, 0]);
        out.extend_from_slice(&0u16.to_be_bytes());
    }
    out
}

/// SERVFAIL for a query that could not be forwarded.
pub(crate) fn servfail(query: &[u8], p: &Parsed) -> Vec<u8> {
    let mut r = build(query, p, SERVFAIL, 0, &[], 0);
    r[2] &= !0x04; // not authoritative
    r
}

/// An empty TC reply, for an upstream answer that does not fit the client's UDP limit.
pub(crate) fn truncated(query: &[u8], p: &Parsed) -> Vec<u8> {
    let mut r = build(query, p, NOERROR, 0, &[], 0);
    r[2] = (r[2] & !0x04) | 0x02;
    r
}

/// Is `reply` a plausible answer to `query`: same id, QR set, and (if it has a
/// question) the same question, compared case-insensitively.
pub(crate) fn matches(query: &[u8], p: &Parsed, reply: &[u8]) -> bool {
    if reply.len() < HEADER || reply[..2] != p.id.to_be_bytes() || reply[2] & 0x80 == 0 {
        return false;
    }
    let qdcount = u16::from_be_bytes([reply[4], reply[5]]);
    qdcount == 0 || reply.get(HEADER..p.qend).is_some_and(|q| q.eq_ignore_ascii_case(&query[HEADER..p.qend]))
}

pub(crate) fn is_truncated(reply: &[u8]) -> bool {
    reply.len() >= HEADER && reply[2] & 0x02 != 0
}

/// Lazily formats a message's question ("name/TYPE") for debug events.
pub(crate) struct Question<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Question<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = self.0;
        if msg.len() < HEADER || u16::from_be_bytes([msg[4], msg[5]]) == 0 {
            return f.write_str("-");
        }
        let mut pos = HEADER;
        let mut any = false;
        while let Some(&len) = msg.get(pos) {
            let len = len as usize;
            if len == 0 || len & 0xc0 != 0 || pos - HEADER > 255 {
                break;
            }
            let Some(label) = msg.get(pos + 1..pos + 1 + len) else { return f.write_str("?") };
            for &b in label {
                if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                    write!(f, "{}", b as char)?;
                } else {
                    write!(f, "\\{b:03}")?;
                }
            }
            f.write_str(".")?;
            any = true;
            pos += 1 + len;
        }
        if !any {
            f.write_str(".")?;
        }
        match read_u16(msg, pos + 1) {
            Ok(TYPE_A) => f.write_str("/A"),
            Ok(TYPE_AAAA) => f.write_str("/AAAA"),
            Ok(t) => write!(f, "/{t}"),
            Err(()) => f.write_str("/?"),
        }
    }
}

/// RCODE and answer count of a reply, for debug events.
pub(crate) fn summary(reply: &[u8]) -> (u8, u16) {
    if reply.len() < HEADER {
        return (0, 0);
    }
    (reply[3] & 0x0f, u16::from_be_bytes([reply[6], reply[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns as HEdns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    fn table() -> Table {
        let many: Vec<IpAddr> = (0..100u8).map(|i| IpAddr::V4(Ipv4Addr::new(240, 0, 1, i))).collect();
        Table::new(
            &["mesh".into()],
            [
                ("echo-server_echo-example_svc_1010.mesh".to_string(), vec!["240.0.0.1".parse().unwrap()]),
                ("dual.mesh".to_string(), vec!["240.0.0.2".parse().unwrap(), "::ffff:f000:2".parse().unwrap()]),
                ("v6only.mesh".to_string(), vec!["fd00::1".parse().unwrap()]),
                ("many.mesh".to_string(), many),
                ("backend.svc.mesh.local".to_string(), vec!["241.0.0.1".parse().unwrap()]),
            ],
            Duration::from_secs(30),
        )
    }

    fn query_msg(id: u16, name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(size) = edns {
            let mut e = HEdns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m
    }

    fn query(id: u16, name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        query_msg(id, name, rtype, edns).to_vec().unwrap()
    }

    fn local(reply: Reply) -> Vec<u8> {
        match reply {
            Reply::Local(r) => r,
            other => panic!("expected a local reply, got {other:?}"),
        }
    }

    fn ask(name: &str, rtype: RecordType) -> Message {
        Message::from_vec(&local(answer(&table(), &query(7, name, rtype, None), Transport::Udp))).unwrap()
    }

    fn ips(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("unexpected rdata {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_hit_echoes_id_question_case_and_sets_flags() {
        let name = "Echo-Server_Echo-Example_SVC_1010.Mesh.";
        let m = ask(name, RecordType::A);
        assert_eq!(m.metadata.id, 7);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired && m.metadata.recursion_available);
        assert!(!m.metadata.truncation);
        assert_eq!(m.queries.len(), 1);
        assert_eq!(m.queries[0].name.to_ascii(), name);
        assert_eq!(ips(&m), vec!["240.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(m.answers[0].name.to_ascii(), name, "answer owner echoes the question's case");
        assert_eq!(m.answers[0].ttl, 30);
        assert_eq!(m.answers[0].dns_class, DNSClass::IN);
        assert!(m.edns.is_none());
    }

    #[test]
    fn dotted_alias_and_names_outside_served_domains_answer() {
        assert_eq!(ips(&ask("echo-server.echo-example.svc.1010.mesh.", RecordType::A)).len(), 1);
        assert_eq!(ips(&ask("BACKEND.svc.mesh.local.", RecordType::A)), vec!["241.0.0.1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn aaaa_and_nodata() {
        let m = ask("dual.mesh.", RecordType::AAAA);
        assert_eq!(ips(&m), vec![IpAddr::V6("::ffff:f000:2".parse::<Ipv6Addr>().unwrap())]);
        let m = ask("echo-server.echo-example.svc.1010.mesh.", RecordType::AAAA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty() && m.metadata.authoritative);
        let m = ask("v6only.mesh.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        assert_eq!(ips(&ask("v6only.mesh.", RecordType::AAAA)).len(), 1);
        assert_eq!(ips(&ask("dual.mesh.", RecordType::ANY)).len(), 2);
    }

    #[test]
    fn nxdomain_under_served_domain_but_nodata_for_apex_and_empty_non_terminals() {
        let m = ask("nope.mesh.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty() && m.metadata.authoritative);
        assert_eq!(ask("x.dual.mesh.", RecordType::A).metadata.response_code, ResponseCode::NXDomain);
        for ent in ["mesh.", "1010.mesh.", "svc.1010.MESH."] {
            let m = ask(ent, RecordType::A);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{ent}");
            assert!(m.answers.is_empty());
        }
    }

    #[test]
    fn other_types_for_served_names_are_empty_noerror() {
        for t in [RecordType::TXT, RecordType::SRV, RecordType::MX, RecordType::SOA] {
            let m = ask("dual.mesh.", t);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{t:?}");
            assert!(m.answers.is_empty());
        }
    }

    #[test]
    fn other_classes_are_refused() {
        let mut m = query_msg(1, "dual.mesh.", RecordType::A, None);
        m.queries[0].set_query_class(DNSClass::CH);
        let r = Message::from_vec(&local(answer(&table(), &m.to_vec().unwrap(), Transport::Udp))).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn other_names_are_forwarded() {
        let t = table();
        for name in ["example.org.", "mesh.org.", "amesh.", ".", "svc.mesh.local."] {
            assert_eq!(answer(&t, &query(1, name, RecordType::A, None), Transport::Udp), Reply::Forward, "{name}");
        }
        assert_eq!(answer(&t, &query(1, "example.org.", RecordType::TXT, Some(1232)), Transport::Tcp), Reply::Forward);
    }

    #[test]
    fn edns_size_is_honoured_and_opt_echoed() {
        let t = table();
        // 100 A records: 12 + 15 + 100 * 16 + 11 = 1638 bytes.
        for (size, fits) in
            [(None, false), (Some(512), false), (Some(1232), false), (Some(1638), true), (Some(4096), true)]
        {
            let r = local(answer(&t, &query(9, "many.mesh.", RecordType::A, size), Transport::Udp));
            let m = Message::from_vec(&r).unwrap();
            assert_eq!(m.metadata.truncation, !fits, "{size:?}");
            assert_eq!(m.answers.len(), if fits { 100 } else { 0 }, "{size:?}");
            assert!(r.len() <= size.map_or(512, usize::from));
            assert_eq!(m.edns.is_some(), size.is_some());
            if let Some(e) = &m.edns {
                assert_eq!(e.max_payload(), 4096);
                assert_eq!(e.version(), 0);
            }
        }
        // Over 4096 is capped, under 512 is raised to 512.
        let many_v4 = |n| format!("m{n}.mesh");
        let big: Vec<IpAddr> = (0..300u16).map(|i| IpAddr::V4(Ipv4Addr::from(0xf000_0000 + u32::from(i)))).collect();
        let t = Table::new(&["mesh".into()], [(many_v4(1), big)], Duration::from_secs(1));
        let r = local(answer(&t, &query(9, "m1.mesh.", RecordType::A, Some(65000)), Transport::Udp));
        assert!(Message::from_vec(&r).unwrap().metadata.truncation, "4800 bytes do not fit 4096");
        let r = local(answer(&table(), &query(9, "dual.mesh.", RecordType::ANY, Some(100)), Transport::Udp));
        assert_eq!(Message::from_vec(&r).unwrap().answers.len(), 2);
    }

    #[test]
    fn dnssec_ok_is_copied() {
        let mut m = query_msg(3, "dual.mesh.", RecordType::A, Some(1232));
        m.edns.as_mut().unwrap().set_dnssec_ok(true);
        let r = Message::from_vec(&local(answer(&table(), &m.to_vec().unwrap(), Transport::Udp))).unwrap();
        assert!(r.edns.unwrap().flags().dnssec_ok);
    }

    #[test]
    fn truncation_over_udp_full_answer_over_tcp() {
        let t = table();
        let r = local(answer(&t, &query(5, "many.mesh.", RecordType::A, None), Transport::Udp));
        let m = Message::from_vec(&r).unwrap();
        assert!(m.metadata.truncation && m.answers.is_empty() && r.len() <= 512);
        assert_eq!(m.queries.len(), 1);
        let r = local(answer(&t, &query(5, "many.mesh.", RecordType::A, None), Transport::Tcp));
        let m = Message::from_vec(&r).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(ips(&m).len(), 100);
        assert_eq!(ips(&m)[99], IpAddr::V4(Ipv4Addr::new(240, 0, 1, 99)));
    }

    #[test]
    fn badvers_for_edns_version_other_than_0() {
        let mut m = query_msg(3, "dual.mesh.", RecordType::A, Some(1232));
        m.edns.as_mut().unwrap().set_version(1);
        let r = Message::from_vec(&local(answer(&table(), &m.to_vec().unwrap(), Transport::Udp))).unwrap();
        // BADVERS and BADSIG share the value 16; hickory decodes it as BADSIG.
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert_eq!(r.edns.unwrap().rcode_high(), 1);
        assert!(r.answers.is_empty());
    }

    #[test]
    fn opcodes_other_than_query_are_notimp() {
        for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
            let mut m = query_msg(11, "dual.mesh.", RecordType::A, None);
            m.metadata.op_code = op;
            let r = local(answer(&table(), &m.to_vec().unwrap(), Transport::Udp));
            let r = Message::from_vec(&r).unwrap();
            assert_eq!(r.metadata.response_code, ResponseCode::NotImp, "{op:?}");
            assert_eq!(r.metadata.op_code, op);
            assert_eq!(r.metadata.id, 11);
        }
    }

    fn rcode(reply: Reply) -> u8 {
        let r = local(reply);
        assert!(r.len() >= 12 && r[2] & 0x80 != 0);
        r[3] & 0x0f
    }

    #[test]
    fn malformed_queries() {
        let t = table();
        let good = query(0x4242, "dual.mesh.", RecordType::A, Some(1232));
        // Too short for a header, or a response: dropped.
        assert_eq!(answer(&t, &good[..11], Transport::Udp), Reply::Drop);
        assert_eq!(answer(&t, &[], Transport::Udp), Reply::Drop);
        let mut resp = good.clone();
        resp[2] |= 0x80;
        assert_eq!(answer(&t, &resp, Transport::Udp), Reply::Drop);
        // Every other prefix: FORMERR with the id (the OPT record is what is cut).
        for n in 12..good.len() {
            let r = local(answer(&t, &good[..n], Transport::Udp));
            assert_eq!(&r[..2], &[0x42, 0x42]);
            assert_eq!(r[3] & 0x0f, FORMERR, "prefix {n}");
        }
        // Question count 0 and 2.
        for qd in [0u8, 2] {
            let mut q = good.clone();
            q[5] = qd;
            assert_eq!(rcode(answer(&t, &q, Transport::Udp)), FORMERR);
        }
        // Compression pointer and extended label type in the question.
        let mut q = good[..12].to_vec();
        q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        q[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(rcode(answer(&t, &q, Transport::Udp)), FORMERR);
        q[12] = 0x41;
        assert_eq!(rcode(answer(&t, &q, Transport::Udp)), FORMERR);
        // Two OPT records; OPT with a non-root owner.
        let mut q = good.clone();
        q[11] = 2;
        q.extend_from_slice(&good[good.len() - 11..]);
        assert_eq!(rcode(answer(&t, &q, Transport::Udp)), FORMERR);
        let mut q = query(1, "dual.mesh.", RecordType::A, None);
        q[11] = 1;
        q.extend_from_slice(&[0xc0, 0x0c, 0, 41, 16, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(rcode(answer(&t, &q, Transport::Udp)), FORMERR);
    }

    fn raw_query(labels: &[&[u8]]) -> Vec<u8> {
        let mut q = vec![0, 1, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in labels {
            q.push(l.len() as u8);
            q.extend_from_slice(l);
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    }

    #[test]
    fn name_length_limit_is_255_octets() {
        let t = Table::new(&["mesh".into()], [], Duration::ZERO);
        let l63 = [b'a'; 63];
        // 3 * (1 + 63) + (1 + 57) + (1 + 4) + 1 (root) = 256 octets: one too many.
        let l56 = [b'b'; 56];
        let ok = raw_query(&[&l63, &l63, &l63, &l56, b"mesh"]);
        assert_eq!(ok.len() - 12 - 4, 255);
        assert_eq!(rcode(answer(&t, &ok, Transport::Udp)), NXDOMAIN);
        let l57 = [b'b'; 57];
        let long = raw_query(&[&l63, &l63, &l63, &l57, b"mesh"]);
        assert_eq!(rcode(answer(&t, &long, Transport::Udp)), FORMERR);
    }

    #[test]
    fn a_label_with_a_dot_never_matches_a_record() {
        // "dual.mesh" as one label under "mesh": not the name dual.mesh.
        let q = raw_query(&[b"dual.mesh"]);
        assert_eq!(answer(&table(), &q, Transport::Udp), Reply::Forward);
        let q = raw_query(&[b"dual.mesh", b"mesh"]);
        assert_eq!(rcode(answer(&table(), &q, Transport::Udp)), NXDOMAIN);
    }

    #[test]
    fn records_in_answer_and_authority_sections_are_skipped() {
        // A query carrying a (compressed) answer record, as some clients send.
        let mut q = query(1, "dual.mesh.", RecordType::A, Some(1232));
        let opt = q.split_off(q.len() - 11);
        q[7] = 1; // ancount
        q.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4]);
        q.extend_from_slice(&opt);
        let m = Message::from_vec(&local(answer(&table(), &q, Transport::Udp))).unwrap();
        assert_eq!(m.answers.len(), 1);
        assert!(m.edns.is_some());
    }

    #[test]
    fn reply_buffer_is_allocated_once_with_exact_size() {
        let t = table();
        for (name, rtype, edns, transport) in [
            ("dual.mesh.", RecordType::A, None, Transport::Udp),
            ("dual.mesh.", RecordType::ANY, Some(1232), Transport::Udp),
            ("many.mesh.", RecordType::A, None, Transport::Udp),
            ("many.mesh.", RecordType::A, Some(4096), Transport::Tcp),
            ("nope.mesh.", RecordType::A, Some(4096), Transport::Udp),
        ] {
            let r = local(answer(&t, &query(1, name, rtype, edns), transport));
            assert_eq!(r.capacity(), r.len(), "{name} {rtype:?}");
        }
    }

    #[test]
    fn servfail_and_truncated_replies() {
        let q = query(77, "example.org.", RecordType::A, Some(1232));
        let Decision::Forward(p) = decide(&table(), &q, Transport::Udp) else { panic!("not forwarded") };
        assert_eq!(p.limit, 1232);
        let m = Message::from_vec(&servfail(&q, &p)).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code), (77, ResponseCode::ServFail));
        assert!(!m.metadata.authoritative && m.edns.is_some());
        let m = Message::from_vec(&truncated(&q, &p)).unwrap();
        assert!(m.metadata.truncation && m.metadata.response_code == ResponseCode::NoError);
        let mut reply = servfail(&q, &p);
        assert!(matches(&q, &p, &reply));
        reply[12 + 1] = b'E'; // case differs: still the same question
        assert!(matches(&q, &p, &reply));
        reply[12 + 1] = b'x';
        assert!(!matches(&q, &p, &reply));
        assert!(!matches(&q, &p, &q), "a query is not a reply");
    }

    #[test]
    fn question_display() {
        let q = query(1, "Dual.mesh.", RecordType::AAAA, None);
        assert_eq!(Question(&q).to_string(), "Dual.mesh./AAAA");
        assert_eq!(Question(&raw_query(&[b"a.b"])).to_string(), "a\\046b./A");
        assert_eq!(Question(&q[..14]).to_string(), "?");
    }

    /// Timing, not an assertion: `cargo test -p dns --release -- --ignored --nocapture answer_hit_timing`.
    #[test]
    #[ignore]
    fn answer_hit_timing() {
        let t = table();
        let cases = [
            ("A hit, 1 record", query(1, "echo-server.echo-example.svc.1010.mesh.", RecordType::A, None)),
            ("A hit, EDNS", query(1, "Dual.Mesh.", RecordType::A, Some(1232))),
            ("NXDOMAIN", query(1, "nope.mesh.", RecordType::A, None)),
            ("forward decision", query(1, "www.example.org.", RecordType::A, None)),
        ];
        for (what, q) in &cases {
            let n = 2_000_000u32;
            let start = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(answer(&t, std::hint::black_box(q), Transport::Udp));
            }
            println!("{what}: {:.1} ns/answer", start.elapsed().as_nanos() as f64 / f64::from(n));
        }
    }
}
