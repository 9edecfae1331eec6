//! Filter chain selection with Envoy's precedence: destination port, then destination
//! address (the longest `prefix_ranges` entry that holds it, then catch-all), then server
//! name (exact, then the longest `*.suffix` wildcard, then catch-all), then transport
//! protocol, then application protocol, then the client's address (the longest
//! `source_prefix_ranges` entry that holds it, then catch-all) and port. Like Envoy, a
//! more specific level that matches is never abandoned for a less specific one when a
//! later level fails.
//!
//! Every level but the last is a hash lookup, so selection costs O(labels in the SNI)
//! whatever the number of chains. Chains told apart only by the client (Kuma's metrics
//! listener: plain text for the proxy's own address, mTLS for everyone else) share one
//! slot, which holds a small group scanned in order.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// The match criteria of one chain, normalised (names lower-cased).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Criteria {
    pub port: Option<u32>,
    /// Empty: any name. `*.example.com` entries are wildcards.
    pub server_names: Vec<String>,
    pub transport_protocol: Option<String>,
    pub application_protocols: Vec<String>,
    /// `prefix_ranges` (the destination address): (network, prefix length); empty: any.
    pub destinations: Vec<(IpAddr, u8)>,
    pub sources: Sources,
}

/// `source_prefix_ranges` and `source_ports` of a chain; empty: any client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Sources {
    /// (network address, prefix length), the address already masked.
    pub ranges: Vec<(IpAddr, u8)>,
    pub ports: Vec<u32>,
}

impl Sources {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.ports.is_empty()
    }

    /// The length of the longest range that holds `ip`; `None` when none does.
    fn longest(&self, ip: IpAddr) -> Option<u8> {
        self.ranges.iter().filter(|(net, len)| masked(ip, *len) == Some(*net)).map(|(_, len)| *len).max()
    }
}

/// `ip` with all but its first `len` bits cleared; `None` when the families differ from
/// the range's (the caller compares) or `len` is too long.
pub fn masked(ip: IpAddr, len: u8) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(a) if len <= 32 => {
            let bits = u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Some(IpAddr::V4(bits.into()))
        }
        IpAddr::V6(a) if len <= 128 => {
            let bits = u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            Some(IpAddr::V6(bits.into()))
        }
        _ => None,
    }
}

/// What a connection offers to be matched against.
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub port: u16,
    pub server_name: Option<&'a str>,
    pub transport_protocol: &'a str,
    pub alpn: &'a [&'a [u8]],
    /// The client's address.
    pub source: SocketAddr,
    /// The address the connection was made to (its original destination when it was
    /// redirected); looked at only when [`ChainMatcher::uses_destinations`].
    pub destination: IpAddr,
}

/// An [`Offer`] kept for the life of a connection, to select its chain again in a newer
/// configuration.
#[derive(Debug, Clone)]
pub struct OwnedOffer {
    port: u16,
    server_name: Option<String>,
    transport_protocol: String,
    alpn: Vec<Vec<u8>>,
    source: SocketAddr,
    destination: IpAddr,
}

impl OwnedOffer {
    pub fn of(o: &Offer<'_>) -> OwnedOffer {
        OwnedOffer {
            port: o.port,
            server_name: o.server_name.map(str::to_owned),
            transport_protocol: o.transport_protocol.to_string(),
            alpn: o.alpn.iter().map(|p| p.to_vec()).collect(),
            source: o.source,
            destination: o.destination,
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&Offer<'_>) -> R) -> R {
        let alpn: Vec<&[u8]> = self.alpn.iter().map(Vec::as_slice).collect();
        f(&Offer {
            port: self.port,
            server_name: self.server_name.as_deref(),
            transport_protocol: &self.transport_protocol,
            alpn: &alpn,
            source: self.source,
            destination: self.destination,
        })
    }
}

#[derive(Debug, Default)]
pub struct ChainMatcher {
    by_port: HashMap<u32, AddressLevel>,
    any_port: Option<AddressLevel>,
    groups: Groups,
    destinations: bool,
}

/// The chains of one destination port, by destination range (Kuma sets none but on
/// MeshPassthrough's listener; a short list).
#[derive(Debug, Default)]
struct AddressLevel {
    ranges: Vec<(IpAddr, u8, NameLevel)>,
    any: Option<NameLevel>,
}

impl AddressLevel {
    fn names(&mut self, range: Option<(IpAddr, u8)>) -> &mut NameLevel {
        let Some((net, len)) = range else { return self.any.get_or_insert_with(Default::default) };
        match self.ranges.iter().position(|(n, l, _)| *n == net && *l == len) {
            Some(i) => &mut self.ranges[i].2,
            None => {
                self.ranges.push((net, len, NameLevel::default()));
                &mut self.ranges.last_mut().expect("just pushed").2
            }
        }
    }

    /// The longest range holding `ip`, else the chains for any address.
    fn lookup(&self, ip: IpAddr) -> Option<&NameLevel> {
        let best =
            self.ranges.iter().filter(|(net, len, _)| masked(ip, *len) == Some(*net)).max_by_key(|(_, len, _)| *len);
        best.map(|(_, _, names)| names).or(self.any.as_ref())
    }
}

/// A slot's value is a chain's index, or, with this bit set, the index of a group of
/// chains that differ only in their sources.
const GROUP: usize = 1 << (usize::BITS - 1);

#[derive(Debug, Default)]
struct Groups {
    groups: Vec<Vec<(Sources, usize)>>,
    /// The sources of the chains that have some.
    sources: HashMap<usize, Sources>,
}

impl Groups {
    /// Chain `index` (with `new`) arrives at a slot that holds `*slot`: they are grouped
    /// when their sources differ, and refused as duplicates when not.
    fn merge(&mut self, slot: &mut usize, index: usize, new: &Sources) -> Result<(), String> {
        let dup = |other: usize| Err(format!("filter chains #{other} and #{index} have the same match criteria"));
        if *slot & GROUP != 0 {
            let group = &mut self.groups[*slot & !GROUP];
            if let Some((_, other)) = group.iter().find(|(s, _)| s == new) {
                return dup(*other);
            }
            group.push((new.clone(), index));
            return Ok(());
        }
        let other = *slot;
        let theirs = self.sources.get(&other).cloned().unwrap_or_default();
        if theirs == *new {
            return dup(other);
        }
        self.groups.push(vec![(theirs, other), (new.clone(), index)]);
        *slot = GROUP | (self.groups.len() - 1);
        Ok(())
    }

    /// Envoy's last two levels: the most specific range holding the client's address
    /// (or the chains with none), then its port (or the chains with none).
    fn pick(&self, slot: usize, source: SocketAddr) -> Option<usize> {
        if slot & GROUP == 0 {
            // A chain alone in its slot still holds to its own sources (most listeners
            // have none: no lookup then).
            if self.sources.is_empty() {
                return Some(slot);
            }
            let Some(s) = self.sources.get(&slot) else { return Some(slot) };
            let ip_ok = s.ranges.is_empty() || s.longest(source.ip()).is_some();
            let port_ok = s.ports.is_empty() || s.ports.contains(&u32::from(source.port()));
            return (ip_ok && port_ok).then_some(slot);
        }
        let group = &self.groups[slot & !GROUP];
        let best = group.iter().filter_map(|(s, _)| s.longest(source.ip())).max();
        let at_best = |s: &Sources| match best {
            Some(len) => s.longest(source.ip()) == Some(len),
            None => s.ranges.is_empty(),
        };
        let port = u32::from(source.port());
        let candidates = || group.iter().filter(|(s, _)| at_best(s));
        candidates()
            .find(|(s, _)| s.ports.contains(&port))
            .or_else(|| candidates().find(|(s, _)| s.ports.is_empty()))
            .map(|(_, i)| *i)
    }
}

#[derive(Debug, Default)]
struct NameLevel {
    /// `None` only while the first chain of a name is being inserted.
    exact: HashMap<Box<str>, Option<ProtoLevel>>,
    /// Keyed by the suffix after `*`, e.g. `.example.com`.
    wildcard: HashMap<Box<str>, Option<ProtoLevel>>,
    any: Option<ProtoLevel>,
}

/// The chains of one server name (or of any name), by transport protocol, then ALPN.
///
/// Kuma gives every server name exactly one chain, with one transport protocol and no
/// ALPN; that case is kept inline (no allocation: 32 bytes a name, which matters at
/// 100,000 names), the general one in a table.
#[derive(Debug)]
enum ProtoLevel {
    One { transport: Option<Transport>, index: usize },
    Many(Box<ProtoTable>),
}

/// A transport protocol name; Envoy's two are not allocated.
type Transport = Cow<'static, str>;

#[derive(Debug, Default)]
struct ProtoTable {
    by_transport: Vec<(Transport, AlpnLevel)>,
    any: Option<AlpnLevel>,
}

#[derive(Debug, Default)]
struct AlpnLevel {
    by_alpn: Vec<(Box<[u8]>, usize)>,
    any: Option<usize>,
}

impl ChainMatcher {
    /// Adds chain `index`. Fails when another chain has exactly the same criteria
    /// (Envoy refuses such listeners too).
    pub fn insert(&mut self, c: &Criteria, index: usize) -> Result<(), String> {
        let ChainMatcher { by_port, any_port, groups, destinations } = self;
        if !c.sources.is_empty() {
            groups.sources.insert(index, c.sources.clone());
        }
        *destinations |= !c.destinations.is_empty();
        let addresses = match c.port {
            Some(p) => by_port.entry(p).or_default(),
            None => any_port.get_or_insert_with(Default::default),
        };
        let ranges: Vec<Option<(IpAddr, u8)>> =
            if c.destinations.is_empty() { vec![None] } else { c.destinations.iter().copied().map(Some).collect() };
        for range in ranges {
            let names = addresses.names(range);
            if c.server_names.is_empty() {
                ProtoLevel::insert(&mut names.any, c, index, groups)?;
                continue;
            }
            for name in &c.server_names {
                let level = match name.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => names.wildcard.entry(suffix.into()).or_insert(None),
                    _ => names.exact.entry(name.as_str().into()).or_insert(None),
                };
                ProtoLevel::insert(level, c, index, groups)?;
            }
        }
        Ok(())
    }

    /// Whether any chain matches on the destination address.
    pub fn uses_destinations(&self) -> bool {
        self.destinations
    }

    /// Whether any chain matches on the destination port.
    pub fn uses_ports(&self) -> bool {
        !self.by_port.is_empty()
    }

    pub fn find(&self, offer: &Offer<'_>) -> Option<usize> {
        self.find_slot(offer).and_then(|slot| self.groups.pick(slot, offer.source))
    }

    fn find_slot(&self, offer: &Offer<'_>) -> Option<usize> {
        let addresses = self.by_port.get(&u32::from(offer.port)).or(self.any_port.as_ref())?;
        let names = addresses.lookup(offer.destination)?;
        let proto = match offer.server_name {
            Some(sni) => names.lookup(sni),
            None => names.any.as_ref(),
        }?;
        let table = match proto {
            ProtoLevel::One { transport: Some(t), .. } if t != offer.transport_protocol => return None,
            ProtoLevel::One { index, .. } => return Some(*index),
            ProtoLevel::Many(table) => table,
        };
        let alpn = table
            .by_transport
            .iter()
            .find(|(t, _)| t == offer.transport_protocol)
            .map(|(_, a)| a)
            .or(table.any.as_ref())?;
        offer.alpn.iter().find_map(|p| alpn.by_alpn.iter().find(|(a, _)| &**a == *p).map(|(_, i)| *i)).or(alpn.any)
    }
}

impl NameLevel {
    fn lookup(&self, sni: &str) -> Option<&ProtoLevel> {
        let mut buf = [0u8; clienthello::MAX_SERVER_NAME_LEN];
        let lower = lowercase(sni, &mut buf);
        if let Some(Some(p)) = self.exact.get(lower) {
            return Some(p);
        }
        if !self.wildcard.is_empty() {
            // "a.b.example.com" tries ".b.example.com", ".example.com", ".com".
            let mut rest = lower;
            while let Some(dot) = rest.find('.') {
                let suffix = &rest[dot..];
                if let Some(Some(p)) = self.wildcard.get(suffix) {
                    return Some(p);
                }
                rest = &rest[dot + 1..];
            }
        }
        self.any.as_ref()
    }
}

/// Lower-cases ASCII into `buf` without allocating; names longer than the buffer
/// (impossible for a parsed SNI) are returned unchanged.
fn lowercase<'a>(s: &'a str, buf: &'a mut [u8]) -> &'a str {
    if !s.bytes().any(|b| b.is_ascii_uppercase()) || s.len() > buf.len() {
        return s;
    }
    let out = &mut buf[..s.len()];
    out.copy_from_slice(s.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).unwrap_or(s)
}

fn transport(t: &str) -> Transport {
    match t {
        "tls" => Cow::Borrowed("tls"),
        "raw_buffer" => Cow::Borrowed("raw_buffer"),
        other => Cow::Owned(other.to_string()),
    }
}

impl ProtoLevel {
    /// Adds chain `index` with `c`'s transport protocol and ALPN to the level in `slot`.
    fn insert(slot: &mut Option<ProtoLevel>, c: &Criteria, index: usize, groups: &mut Groups) -> Result<(), String> {
        let t = c.transport_protocol.as_deref();
        if slot.is_none() && c.application_protocols.is_empty() {
            *slot = Some(ProtoLevel::One { transport: t.map(transport), index });
            return Ok(());
        }
        let mut table = match slot.take() {
            None => Box::default(),
            Some(ProtoLevel::One { transport, index: first }) => {
                let mut table = Box::<ProtoTable>::default();
                table.insert(transport.as_deref(), &[], first, groups).expect("an empty table has no duplicates");
                table
            }
            Some(ProtoLevel::Many(table)) => table,
        };
        let inserted = table.insert(t, &c.application_protocols, index, groups);
        *slot = Some(ProtoLevel::Many(table));
        inserted
    }
}

impl ProtoTable {
    fn insert(&mut self, t: Option<&str>, alpns: &[String], index: usize, groups: &mut Groups) -> Result<(), String> {
        let alpn = match t {
            Some(t) => match self.by_transport.iter().position(|(x, _)| x == t) {
                Some(i) => &mut self.by_transport[i].1,
                None => {
                    self.by_transport.push((transport(t), AlpnLevel::default()));
                    &mut self.by_transport.last_mut().expect("just pushed").1
                }
            },
            None => self.any.get_or_insert_with(Default::default),
        };
        let sources = groups.sources.get(&index).cloned().unwrap_or_default();
        if alpns.is_empty() {
            match &mut alpn.any {
                Some(slot) => groups.merge(slot, index, &sources)?,
                None => alpn.any = Some(index),
            }
        } else {
            for p in alpns {
                match alpn.by_alpn.iter_mut().find(|(a, _)| **a == *p.as_bytes()) {
                    Some((_, slot)) => groups.merge(slot, index, &sources)?,
                    None => alpn.by_alpn.push((p.as_bytes().into(), index)),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crit(port: Option<u32>, names: &[&str], tp: Option<&str>, alpn: &[&str]) -> Criteria {
        Criteria {
            port,
            server_names: names.iter().map(|s| s.to_string()).collect(),
            transport_protocol: tp.map(str::to_string),
            application_protocols: alpn.iter().map(|s| s.to_string()).collect(),
            destinations: vec![],
            sources: Sources::default(),
        }
    }

    fn offer<'a>(port: u16, sni: Option<&'a str>, tp: &'a str, alpn: &'a [&'a [u8]]) -> Offer<'a> {
        let (source, destination) = ("192.0.2.1:40000".parse().unwrap(), [192, 0, 2, 9].into());
        Offer { port, server_name: sni, transport_protocol: tp, alpn, source, destination }
    }

    fn from(ranges: &[(&str, u8)], ports: &[u32]) -> Sources {
        let ranges = ranges.iter().map(|(a, l)| (masked(a.parse().unwrap(), *l).unwrap(), *l)).collect();
        Sources { ranges, ports: ports.to_vec() }
    }

    #[test]
    fn chains_that_differ_only_by_the_client_are_told_apart_by_its_address_then_port() {
        let mut m = ChainMatcher::default();
        let plain = |sources| Criteria { sources, ..crit(None, &[], None, &[]) };
        // Kuma's metrics listener: its own address in plain text, everyone else over mTLS.
        m.insert(&plain(from(&[("127.0.0.1", 32)], &[])), 0).unwrap();
        m.insert(&plain(Sources::default()), 1).unwrap();
        m.insert(&plain(from(&[("10.0.0.0", 8)], &[])), 2).unwrap();
        m.insert(&plain(from(&[("10.1.0.0", 16)], &[9999])), 3).unwrap();
        m.insert(&Criteria { sources: from(&[("127.0.0.1", 32)], &[]), ..crit(None, &["n"], Some("tls"), &[]) }, 4)
            .unwrap();
        let at = |source: &str, sni: Option<&'static str>| {
            let tp = if sni.is_some() { "tls" } else { "raw_buffer" };
            m.find(&Offer { source: source.parse().unwrap(), ..offer(1, sni, tp, &[]) })
        };
        assert_eq!(at("127.0.0.1:5000", None), Some(0));
        assert_eq!(at("127.0.0.2:5000", None), Some(1));
        assert_eq!(at("10.2.0.1:5000", None), Some(2));
        // 10.1/16 is more specific than 10/8 and is not abandoned when its port differs.
        assert_eq!(at("10.1.0.1:9999", None), Some(3));
        assert_eq!(at("10.1.0.1:5000", None), None);
        assert_eq!(at("[::1]:5000", None), Some(1));
        // A name with only a sourced chain matches no one else.
        assert_eq!(at("127.0.0.1:5000", Some("n")), Some(4));
        assert_eq!(at("127.0.0.2:5000", Some("n")), None);
        // The same sources twice is still a duplicate.
        let e = m.insert(&plain(from(&[("10.0.0.0", 8)], &[])), 5).unwrap_err();
        assert!(e.contains("#2 and #5"), "{e}");
    }

    #[test]
    fn precedence_table() {
        let mut m = ChainMatcher::default();
        m.insert(&crit(None, &["backend{mesh=default}"], Some("tls"), &[]), 0).unwrap();
        m.insert(&crit(None, &["*.example.com"], Some("tls"), &[]), 1).unwrap();
        m.insert(&crit(None, &["*.b.example.com"], Some("tls"), &[]), 2).unwrap();
        m.insert(&crit(None, &[], Some("tls"), &[]), 3).unwrap();
        m.insert(&crit(None, &[], None, &[]), 4).unwrap();
        m.insert(&crit(Some(9000), &[], None, &[]), 5).unwrap();
        m.insert(&crit(None, &["alpn.test"], None, &["h2"]), 6).unwrap();
        m.insert(&crit(None, &["alpn.test"], None, &["kuma"]), 7).unwrap();
        m.insert(&crit(None, &["only-tls.test"], Some("tls"), &[]), 8).unwrap();
        let cases: &[(Offer<'_>, Option<usize>)] = &[
            (offer(1, Some("backend{mesh=default}"), "tls", &[]), Some(0)),
            (offer(1, Some("BACKEND{mesh=default}"), "tls", &[]), Some(0)),
            (offer(1, Some("x.example.com"), "tls", &[]), Some(1)),
            (offer(1, Some("x.b.example.com"), "tls", &[]), Some(2)),
            (offer(1, Some("a.x.b.example.com"), "tls", &[]), Some(2)),
            (offer(1, Some("example.com"), "tls", &[]), Some(3)),
            (offer(1, Some("other"), "tls", &[]), Some(3)),
            (offer(1, None, "tls", &[]), Some(3)),
            (offer(1, None, "raw_buffer", &[]), Some(4)),
            (offer(9000, Some("backend{mesh=default}"), "tls", &[]), Some(5)),
            (offer(1, Some("alpn.test"), "tls", &[b"x", b"kuma", b"h2"]), Some(7)),
            (offer(1, Some("alpn.test"), "tls", &[b"h2"]), Some(6)),
            // A matching name is never abandoned for the catch-all.
            (offer(1, Some("alpn.test"), "tls", &[b"http/1.1"]), None),
            (offer(1, Some("only-tls.test"), "raw_buffer", &[]), None),
        ];
        for (o, want) in cases {
            assert_eq!(m.find(o), *want, "{o:?}");
        }
    }

    #[test]
    fn the_destination_address_comes_after_the_port_and_before_the_name() {
        let mut m = ChainMatcher::default();
        let to = |ranges: &[(&str, u8)], names: &[&str]| Criteria {
            destinations: ranges.iter().map(|(a, l)| (masked(a.parse().unwrap(), *l).unwrap(), *l)).collect(),
            ..crit(None, names, None, &[])
        };
        // MeshPassthrough's shape: a CIDR, a host in it, a name, and the rest.
        m.insert(&to(&[("10.0.0.0", 8)], &[]), 0).unwrap();
        m.insert(&to(&[("10.1.2.3", 32)], &[]), 1).unwrap();
        m.insert(&to(&[], &["api.example.com"]), 2).unwrap();
        m.insert(&to(&[], &[]), 3).unwrap();
        m.insert(&to(&[("10.9.0.0", 16), ("fd00::", 8)], &["only.test"]), 4).unwrap();
        assert!(m.uses_destinations());
        let at = |dest: &str, sni: Option<&'static str>| {
            let tp = if sni.is_some() { "tls" } else { "raw_buffer" };
            m.find(&Offer { destination: dest.parse().unwrap(), ..offer(1, sni, tp, &[]) })
        };
        assert_eq!(at("10.200.0.1", None), Some(0));
        assert_eq!(at("10.1.2.3", None), Some(1));
        assert_eq!(at("192.0.2.1", Some("api.example.com")), Some(2));
        assert_eq!(at("192.0.2.1", None), Some(3));
        assert_eq!(at("fd00::1", Some("only.test")), Some(4));
        // A matching range is not abandoned when its names do not match.
        assert_eq!(at("10.9.1.1", Some("api.example.com")), None);
        assert_eq!(at("10.9.1.1", Some("only.test")), Some(4));
    }

    #[test]
    fn a_name_with_one_chain_takes_32_bytes() {
        assert!(std::mem::size_of::<Option<ProtoLevel>>() <= 32);
    }

    #[test]
    fn duplicates_are_refused() {
        let mut m = ChainMatcher::default();
        m.insert(&crit(None, &["a", "b"], Some("tls"), &[]), 0).unwrap();
        let e = m.insert(&crit(None, &["b"], Some("tls"), &[]), 1).unwrap_err();
        assert!(e.contains("#0 and #1"), "{e}");
        m.insert(&crit(None, &["b"], Some("raw_buffer"), &[]), 2).unwrap();
    }
}
