//! The name table: immutable, built once per config version, O(1) case-insensitive lookup.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::time::Duration;

/// Longest name in dotted form without the trailing dot (255 wire octets).
pub(crate) const MAX_NAME: usize = 253;

/// Names this server answers for, and their addresses. Built once per config version.
///
/// Keys are stored lowercased, without a trailing dot. Besides the names given, the
/// table holds the *empty non-terminals* between a name and its served domain (and the
/// domain apex itself), so that `svc.1010.mesh` gets NODATA rather than an NXDOMAIN that
/// an RFC 8020 resolver would take as "nothing below this name exists".
#[derive(Debug, Clone)]
pub struct Table {
    nodes: HashMap<Box<[u8]>, Node, FxBuild>,
    domains: Vec<Box<[u8]>>,
    ttl: u32,
    records: usize,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Node {
    /// IPv4 addresses first, then IPv6, each in first-seen order, without duplicates.
    addrs: Box<[IpAddr]>,
    n4: usize,
    /// false for an empty non-terminal or a domain apex that has no record.
    terminal: bool,
}

impl Node {
    pub(crate) fn v4(&self) -> &[IpAddr] {
        &self.addrs[..self.n4]
    }
    pub(crate) fn v6(&self) -> &[IpAddr] {
        &self.addrs[self.n4..]
    }
    pub(crate) fn all(&self) -> &[IpAddr] {
        &self.addrs
    }
}

impl Table {
    /// `domains`: the zones served authoritatively (e.g. `["mesh"]`); a name under them
    /// that is not in `records` gets NXDOMAIN. `records`: fully qualified names (a trailing
    /// dot is allowed, not needed; any case) -> addresses (v4 and/or v6; duplicates are
    /// removed, repeated names are merged). A name containing `_` also answers under its
    /// RFC 1123 alias with `_` replaced by `.`
    /// (`echo-server_echo-example_svc_1010.mesh` -> `echo-server.echo-example.svc.1010.mesh`);
    /// a name given explicitly wins over an alias that spells the same name.
    ///
    /// Names in `records` need not be under `domains`: they are answered anyway, and other
    /// names next to them are forwarded upstream. Invalid names (empty, an empty label, a
    /// label over 63 octets, over 253 octets) are skipped with a warning. `ttl` is rounded
    /// down to whole seconds and capped at 2^31-1.
    pub fn new(domains: &[String], records: impl IntoIterator<Item = (String, Vec<IpAddr>)>, ttl: Duration) -> Table {
        let ttl = ttl.as_secs().min(i32::MAX as u64) as u32;
        let mut domain_keys: Vec<Box<[u8]>> = Vec::new();
        for d in domains {
            match normalize(d) {
                Some(k) if !domain_keys.contains(&k) => domain_keys.push(k),
                Some(_) => {}
                None => tracing::warn!(domain = %d, "dns: ignoring invalid served domain"),
            }
        }
        let records = records.into_iter();
        let hint = records.size_hint().0;
        // Sized up front: rehashing 100,000 names was a sixth of the build.
        let mut explicit: HashMap<Box<[u8]>, Vec<IpAddr>, FxBuild> =
            HashMap::with_capacity_and_hasher(hint, FxBuild::default());
        let mut aliases: HashMap<Box<[u8]>, Vec<IpAddr>, FxBuild> =
            HashMap::with_capacity_and_hasher(hint, FxBuild::default());
        for (name, ips) in records {
            let Some(key) = normalize(&name) else {
                tracing::warn!(name = %name, "dns: ignoring record with an invalid name");
                continue;
            };
            if key.contains(&b'_') {
                let alias: Box<[u8]> = key.iter().map(|&b| if b == b'_' { b'.' } else { b }).collect();
                if valid(&alias) {
                    aliases.entry(alias).or_default().extend_from_slice(&ips);
                }
            }
            explicit.entry(key).or_default().extend(ips);
        }
        for (alias, ips) in aliases {
            explicit.entry(alias).or_insert(ips);
        }
        let nodes = HashMap::with_capacity_and_hasher(explicit.len() * 2, FxBuild::default());
        let mut table = Table { nodes, domains: domain_keys, ttl, records: explicit.len() };
        for (key, ips) in explicit {
            let mut v4: Vec<IpAddr> = Vec::new();
            let mut v6: Vec<IpAddr> = Vec::new();
            for ip in ips {
                let family = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
                if !family.contains(&ip) {
                    family.push(ip);
                }
            }
            let n4 = v4.len();
            v4.extend(v6);
            table.nodes.insert(key, Node { addrs: v4.into_boxed_slice(), n4, terminal: true });
        }
        // Empty non-terminals and apexes: every served ancestor of a name, down to its
        // domain. Collected as borrowed, distinct slices first, so that each is allocated
        // once (100,000 names share a few hundred ancestors).
        let mut ents: std::collections::HashSet<&[u8], FxBuild> = Default::default();
        for key in table.nodes.keys() {
            let mut rest: &[u8] = key;
            while let Some(dot) = rest.iter().position(|&b| b == b'.') {
                rest = &rest[dot + 1..];
                if table.is_served(rest) && !table.nodes.contains_key(rest) && !ents.insert(rest) {
                    break; // this ancestor, and so all of its own, are in already
                }
            }
        }
        // The apexes last: an early stop at one would skip the ancestors it has below
        // another, higher served domain.
        ents.extend(table.domains.iter().map(|d| &d[..]));
        let ents: Vec<Box<[u8]>> = ents.into_iter().map(Box::from).collect();
        for ent in ents {
            table.nodes.entry(ent).or_default();
        }
        table
    }

    /// The addresses of `name` (any case, trailing dot optional), IPv4 first; `None` when
    /// the table has no record for it. A hash lookup on a lowercased stack copy of `name`.
    pub fn lookup(&self, name: &str) -> Option<&[IpAddr]> {
        let name = name.as_bytes();
        let name = name.strip_suffix(b".").unwrap_or(name);
        if name.len() > MAX_NAME {
            return None;
        }
        let mut buf = [0u8; MAX_NAME];
        let key = &mut buf[..name.len()];
        for (k, b) in key.iter_mut().zip(name) {
            *k = b.to_ascii_lowercase();
        }
        self.node(key).filter(|n| n.terminal).map(|n| n.all())
    }

    /// Number of names with records (aliases included, empty non-terminals not).
    pub fn len(&self) -> usize {
        self.records
    }

    /// True when the table has no records.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// TTL of every answer, in seconds.
    pub fn ttl(&self) -> u32 {
        self.ttl
    }

    /// `key` must already be lowercase, without a trailing dot.
    pub(crate) fn node(&self, key: &[u8]) -> Option<&Node> {
        self.nodes.get(key)
    }

    /// Is the lowercase `key` equal to or below one of the served domains?
    pub(crate) fn is_served(&self, key: &[u8]) -> bool {
        self.domains.iter().any(|d| {
            key.len() >= d.len() && key.ends_with(d) && (key.len() == d.len() || key[key.len() - d.len() - 1] == b'.')
        })
    }
}

/// Lowercase, strip one trailing dot, validate.
fn normalize(name: &str) -> Option<Box<[u8]>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let key: Box<[u8]> = name.bytes().map(|b| b.to_ascii_lowercase()).collect();
    valid(&key).then_some(key)
}

fn valid(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_NAME && key.split(|&b| b == b'.').all(|l| !l.is_empty() && l.len() <= 63)
}

/// A small non-keyed multiplicative hasher (the Fx scheme). The keys come from the
/// control plane, not from the network, so there is no flooding risk; lookups with
/// hostile names only cost one hash of at most 253 bytes.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, mut bytes: &[u8]) {
        while bytes.len() >= 8 {
            let (w, rest) = bytes.split_at(8);
            self.add(u64::from_le_bytes(w.try_into().unwrap_or_default()));
            bytes = rest;
        }
        if !bytes.is_empty() {
            let mut w = [0u8; 8];
            w[..bytes.len()].copy_from_slice(bytes);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table() -> Table {
        Table::new(
            &["mesh".into()],
            [
                ("echo-server_echo-example_svc_1010.mesh".to_string(), vec![ip("240.0.0.1")]),
                ("Web.Mesh.".to_string(), vec![ip("240.0.0.2"), ip("::ffff:f000:2"), ip("240.0.0.2"), ip("240.0.0.3")]),
                ("web.mesh".to_string(), vec![ip("240.0.0.4")]),
                ("backend.svc.mesh.local".to_string(), vec![ip("241.0.0.1")]),
                ("bad..name.mesh".to_string(), vec![ip("1.1.1.1")]),
                (format!("{}.mesh", "a".repeat(64)), vec![ip("1.1.1.1")]),
            ],
            Duration::from_millis(30_999),
        )
    }

    #[test]
    fn lookup_is_case_insensitive_and_ignores_trailing_dot() {
        let t = table();
        let want = [ip("240.0.0.2"), ip("240.0.0.3"), ip("240.0.0.4"), ip("::ffff:f000:2")];
        assert_eq!(t.lookup("web.mesh"), Some(&want[..]));
        assert_eq!(t.lookup("WEB.MESH."), Some(&want[..]));
        assert_eq!(t.lookup("web.mesh.."), None);
        assert_eq!(t.lookup("nope.mesh"), None);
        assert_eq!(t.lookup(&"a".repeat(300)), None);
        assert_eq!(t.lookup("backend.svc.mesh.local"), Some(&[ip("241.0.0.1")][..]));
        assert_eq!(t.ttl(), 30);
    }

    #[test]
    fn underscore_names_also_answer_under_their_dotted_alias() {
        let t = table();
        let want = Some(&[ip("240.0.0.1")][..]);
        assert_eq!(t.lookup("echo-server_echo-example_svc_1010.mesh"), want);
        assert_eq!(t.lookup("echo-server.echo-example.svc.1010.mesh"), want);
        assert_eq!(t.lookup("Echo-Server.Echo-Example.SVC.1010.mesh"), want);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn explicit_name_wins_over_alias() {
        let t = Table::new(
            &[],
            [("a_b".to_string(), vec![ip("1.1.1.1")]), ("a.b".to_string(), vec![ip("2.2.2.2")])],
            Duration::ZERO,
        );
        assert_eq!(t.lookup("a.b"), Some(&[ip("2.2.2.2")][..]));
        assert_eq!(t.lookup("a_b"), Some(&[ip("1.1.1.1")][..]));
    }

    #[test]
    fn invalid_names_are_skipped_and_ents_are_not_records() {
        let t = table();
        assert_eq!(t.lookup("bad..name.mesh"), None);
        assert_eq!(t.lookup(&format!("{}.mesh", "a".repeat(64))), None);
        // Empty non-terminals and the apex exist as nodes but are not records.
        for ent in ["mesh", "1010.mesh", "svc.1010.mesh", "echo-example.svc.1010.mesh"] {
            assert!(t.node(ent.as_bytes()).is_some_and(|n| !n.terminal && n.addrs.is_empty()), "{ent}");
            assert_eq!(t.lookup(ent), None);
        }
        // Not under a served domain: no empty non-terminals.
        assert!(t.node(b"svc.mesh.local").is_none());
    }

    #[test]
    fn ents_between_nested_domains_and_shared_by_many_names() {
        let names = (0..50).map(|i| (format!("s{i}.x.a.b.mesh"), vec![ip("240.0.0.1")]));
        let t = Table::new(&["mesh".into(), "a.b.mesh".into()], names, Duration::ZERO);
        for ent in ["x.a.b.mesh", "a.b.mesh", "b.mesh", "mesh"] {
            assert!(t.node(ent.as_bytes()).is_some_and(|n| !n.terminal), "{ent}");
        }
        assert_eq!(t.len(), 50);
    }

    #[test]
    fn served_domains() {
        let t = Table::new(&["Mesh.".into(), "mesh.local".into()], [], Duration::ZERO);
        assert!(t.is_served(b"mesh"));
        assert!(t.is_served(b"a.mesh"));
        assert!(t.is_served(b"b.mesh.local"));
        assert!(!t.is_served(b"amesh"));
        assert!(!t.is_served(b"mesh.org"));
        assert!(!t.is_served(b"local"));
        assert!(!t.is_served(b""));
        assert!(t.is_empty());
    }
}
