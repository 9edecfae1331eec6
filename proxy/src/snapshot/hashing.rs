//! Consistent hashing over a priority level's hosts: Envoy's RING_HASH (ketama) and
//! MAGLEV, built the way Envoy builds them, so that a request hashed by dp and by an Envoy
//! sidecar with the same config and endpoints lands on the same host. That is what keeps
//! sessions sticky while a mesh moves one proxy at a time.
//!
//! Facts from Envoy's load balancers (`ring_hash_lb.cc`, `maglev_lb.cc`,
//! `thread_aware_lb_impl.cc`):
//! * a host's key is its `envoy.lb` `hash_key` metadata, else its hostname when
//!   `use_hostname_for_hashing`, else its address as `ip:port` (`[v6]:port`);
//! * weights are normalised over the level's hosts (healthy ones, or all in panic);
//! * the ring gives each host `scale * weight` entries hashed from `<key>_<i>` (xxHash64,
//!   or libstdc++'s 64-bit MurmurHash2), sorted; a hash takes the first entry at or
//!   above it, wrapping; a retry moves `attempt` entries on;
//! * Maglev fills a prime-sized table by each host's permutation (offset `xxh64(key)`,
//!   skip `xxh64(key, seed 1)`), hosts in key order, turns by weight; a retry looks up
//!   `hash ^ (2^64 - attempt)`.

use super::cluster::Host;
use std::sync::Arc;

/// Envoy's defaults.
pub const DEFAULT_MIN_RING: u64 = 1024;
pub const DEFAULT_MAX_RING: u64 = 8 * 1024 * 1024;
pub const DEFAULT_MAGLEV_TABLE: u64 = 65537;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ring { min: u64, max: u64, murmur: bool },
    Maglev { table_size: u64 },
}

/// A cluster's consistent-hashing settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hashing {
    pub kind: Kind,
    pub use_hostname: bool,
}

impl Hashing {
    /// Checks what Envoy refuses when it builds the load balancer.
    pub fn validate(&self) -> Result<(), String> {
        match self.kind {
            Kind::Ring { min, max, .. } if min > max => {
                Err(format!("ring hash: minimum_ring_size ({min}) > maximum_ring_size ({max})"))
            }
            Kind::Ring { max, .. } if max > DEFAULT_MAX_RING => {
                Err(format!("ring hash: maximum_ring_size ({max}) is over {DEFAULT_MAX_RING}"))
            }
            Kind::Maglev { table_size } if !is_prime(table_size) => {
                Err(format!("maglev: table_size {table_size} is not a prime number"))
            }
            Kind::Maglev { table_size } if table_size > 5_000_011 => {
                Err(format!("maglev: table_size {table_size} is over 5000011"))
            }
            _ => Ok(()),
        }
    }
}

/// One level's lookup structure; values are indexes into the level's hosts.
#[derive(Debug)]
pub enum Table {
    /// (hash, host) sorted by hash.
    Ring(Vec<(u64, u32)>),
    Maglev(Packed),
}

impl Table {
    pub fn build(h: &Hashing, hosts: &[Arc<Host>]) -> Table {
        let weights = normalized(hosts);
        match h.kind {
            Kind::Ring { min, max, murmur } => Table::Ring(ring(hosts, &weights, h.use_hostname, min, max, murmur)),
            Kind::Maglev { table_size } => Table::Maglev(maglev(hosts, &weights, h.use_hostname, table_size)),
        }
    }

    /// The host (index) for `hash`; `attempt` > 0 on retries.
    pub fn pick(&self, hash: u64, attempt: u32) -> Option<usize> {
        match self {
            Table::Ring(ring) => {
                if ring.is_empty() {
                    return None;
                }
                // The first entry at or above the hash; past the last, the first.
                let mut i = ring.partition_point(|&(h, _)| h < hash);
                if i == ring.len() {
                    i = 0;
                }
                if attempt > 0 {
                    i = (i + attempt as usize) % ring.len();
                }
                Some(ring[i].1 as usize)
            }
            Table::Maglev(t) => {
                if t.len == 0 {
                    return None;
                }
                let hash = if attempt > 0 { hash ^ 0u64.wrapping_sub(u64::from(attempt)) } else { hash };
                Some(t.get((hash % t.len) as usize))
            }
        }
    }
}

/// Host weights over their sum, as Envoy's doubles.
fn normalized(hosts: &[Arc<Host>]) -> Vec<f64> {
    let sum: u64 = hosts.iter().map(|h| u64::from(h.weight)).sum();
    hosts.iter().map(|h| f64::from(h.weight) * 1.0 / sum as f64).collect()
}

/// What a host is hashed by.
fn key(host: &Host, use_hostname: bool) -> String {
    if let Some(k) = host.lb_metadata.get("hash_key").filter(|k| !k.is_empty()) {
        return k.clone();
    }
    if use_hostname && let Some(name) = host.hostname.as_ref().filter(|n| !n.is_empty()) {
        return name.clone();
    }
    match &host.addr {
        crate::upstream::HostAddr::Ip(a) => a.to_string(),
        crate::upstream::HostAddr::Pipe(p) => p.display().to_string(),
    }
}

fn ring(hosts: &[Arc<Host>], weights: &[f64], use_hostname: bool, min: u64, max: u64, murmur: bool) -> Vec<(u64, u32)> {
    if hosts.is_empty() {
        return vec![];
    }
    let min_weight = weights.iter().copied().fold(1.0f64, f64::min);
    // Enough entries that the lightest host gets a whole number of them, at most `max`.
    let scale = ((min_weight * min as f64).ceil() / min_weight).min(max as f64);
    let mut ring = Vec::with_capacity(scale.ceil() as usize);
    let (mut current, mut target) = (0.0f64, 0.0f64);
    for (i, (host, w)) in hosts.iter().zip(weights).enumerate() {
        let k = key(host, use_hostname);
        target += scale * w;
        let mut n = 0u64;
        while current < target {
            let entry = format!("{k}_{n}");
            let hash = if murmur { murmur2_64(entry.as_bytes(), MURMUR_STD_SEED) } else { xxh64(entry.as_bytes(), 0) };
            ring.push((hash, i as u32));
            n += 1;
            current += 1.0;
        }
    }
    ring.sort_by_key(|&(h, _)| h);
    ring
}

fn maglev(hosts: &[Arc<Host>], weights: &[f64], use_hostname: bool, size: u64) -> Packed {
    let mut table = Packed::new(hosts.len(), size);
    if hosts.is_empty() {
        table.len = 0;
        return table;
    }
    struct Entry {
        host: u32,
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    let mut keyed: Vec<(String, u32, f64)> =
        hosts.iter().zip(weights).enumerate().map(|(i, (h, &w))| (key(h, use_hostname), i as u32, w)).collect();
    // A stable order: the table is filled in it.
    keyed.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let max_weight = weights.iter().copied().fold(0.0f64, f64::max);
    let mut entries: Vec<Entry> = keyed
        .into_iter()
        .map(|(k, host, weight)| Entry {
            host,
            offset: xxh64(k.as_bytes(), 0) % size,
            skip: xxh64(k.as_bytes(), 1) % (size - 1) + 1,
            weight,
            target: 0.0,
            next: 0,
        })
        .collect();
    let mut taken = vec![false; size as usize];
    let mut filled = 0u64;
    let mut iteration = 1u64;
    while filled < size {
        for e in entries.iter_mut() {
            if filled == size {
                break;
            }
            // A host of the heaviest weight takes a slot every turn, one of a third of
            // it every third turn.
            if (iteration as f64) * e.weight < e.target {
                continue;
            }
            e.target += max_weight;
            let mut c = (e.offset + e.skip * e.next) % size;
            while taken[c as usize] {
                e.next += 1;
                c = (e.offset + e.skip * e.next) % size;
            }
            taken[c as usize] = true;
            table.set(c as usize, e.host as usize);
            e.next += 1;
            filled += 1;
        }
        iteration += 1;
    }
    table
}

/// A Maglev table of host indexes, each in as few bits as the host count needs (65,537
/// slots over 3 hosts take 16 KiB, not 256).
#[derive(Debug)]
pub struct Packed {
    words: Vec<u64>,
    bits: u32,
    len: u64,
}

impl Packed {
    fn new(hosts: usize, len: u64) -> Packed {
        let bits = (usize::BITS - hosts.saturating_sub(1).leading_zeros()).max(1);
        let words = (len * u64::from(bits)).div_ceil(64) as usize;
        Packed { words: vec![0; words], bits, len }
    }

    fn set(&mut self, i: usize, v: usize) {
        let bit = i * self.bits as usize;
        let (w, off) = (bit / 64, bit % 64);
        let mask = (1u64 << self.bits) - 1;
        let v = v as u64 & mask;
        self.words[w] = (self.words[w] & !(mask << off)) | (v << off);
        if off + self.bits as usize > 64 {
            let spill = 64 - off;
            self.words[w + 1] = (self.words[w + 1] & !(mask >> spill)) | (v >> spill);
        }
    }

    fn get(&self, i: usize) -> usize {
        let bit = i * self.bits as usize;
        let (w, off) = (bit / 64, bit % 64);
        let mask = (1u64 << self.bits) - 1;
        let mut v = self.words[w] >> off;
        if off + self.bits as usize > 64 {
            v |= self.words[w + 1] << (64 - off);
        }
        (v & mask) as usize
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// libstdc++'s `std::hash<std::string>` seed, which Envoy's MurmurHash2 ring uses.
pub const MURMUR_STD_SEED: u64 = 0xc70f_6907;

/// 64-bit MurmurHash2 as libstdc++'s `_Hash_bytes` computes it (little-endian loads).
pub fn murmur2_64(data: &[u8], seed: u64) -> u64 {
    const MUL: u64 = 0xc6a4_a793_5bd1_e995;
    let shift_mix = |v: u64| v ^ (v >> 47);
    let mut hash = seed ^ (data.len() as u64).wrapping_mul(MUL);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        hash ^= shift_mix(v.wrapping_mul(MUL)).wrapping_mul(MUL);
        hash = hash.wrapping_mul(MUL);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let v = rest.iter().rev().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        hash ^= v;
        hash = hash.wrapping_mul(MUL);
    }
    shift_mix(shift_mix(hash).wrapping_mul(MUL))
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// XXH64, the hash Envoy uses for request values and ring entries.
pub fn xxh64(data: &[u8], seed: u64) -> u64 {
    let round = |acc: u64, lane: u64| acc.wrapping_add(lane.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1);
    let merge = |acc: u64, v: u64| (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4);
    let u64_at = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v = [seed.wrapping_add(P1).wrapping_add(P2), seed.wrapping_add(P2), seed, seed.wrapping_sub(P1)];
        while rest.len() >= 32 {
            for (i, acc) in v.iter_mut().enumerate() {
                *acc = round(*acc, u64_at(&rest[i * 8..]));
            }
            rest = &rest[32..];
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for acc in v {
            h = merge(h, acc);
        }
        h
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(data.len() as u64);
    while rest.len() >= 8 {
        h ^= round(0, u64_at(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        let v = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
        h ^= u64::from(v).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// Envoy's hash of several values (a repeated header): each value's XXH64 seeds the next.
pub fn xxh64_chain<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    values.into_iter().fold(0, |seed, v| xxh64(v, seed))
}

/// Envoy's combination of a policy list's hashes: the running value rotated left by one,
/// then XORed with the next (so two equal policies do not cancel out).
pub fn combine(acc: Option<u64>, next: u64) -> u64 {
    acc.map_or(0, |h| h.rotate_left(1)) ^ next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xxh64_matches_the_reference_vectors() {
        assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        // From Python's xxhash: the 8- and 4-byte tails, 32-byte stripes and a seed.
        assert_eq!(xxh64(b"127.0.0.1:8080_0", 0), 0xf673_a43b_9624_fa24);
        assert_eq!(xxh64(b"127.0.0.1:8080_0", 1), 0xb435_c554_178c_1df2);
        assert_eq!(xxh64(b"0123456789abcdef0123456789abcdef0123456789", 0), 0xa761_90c3_acf0_8a1c);
        assert_eq!(xxh64(&[b'x'; 100], 1), 0xa27a_ec10_3fa2_bdae);
        assert_eq!(xxh64(b"", 1), 0xd5af_ba13_36a3_be4b);
    }

    #[test]
    fn murmur2_is_libstdcxx_string_hash() {
        // `std::hash<std::string>` of g++ 14 on x86-64.
        for (s, h) in [
            ("", 0x553e_9390_1e46_2a6e),
            ("a", 0x454d_dee4_88c1_ed6b),
            ("hello", 0x2655_3298_fdbe_39c8),
            ("exactly8", 0xbc76_9552_f763_5847),
            ("127.0.0.1:8080_17", 0x31d6_f52c_97ed_a37b),
            ("0123456789abcdefXYZ", 0x36c7_5353_3da7_78af),
        ] {
            assert_eq!(murmur2_64(s.as_bytes(), MURMUR_STD_SEED), h, "{s:?}");
        }
    }

    #[test]
    fn packed_tables_keep_every_value() {
        for hosts in [1usize, 2, 3, 5, 7, 8, 9, 200, 70_000] {
            let mut t = Packed::new(hosts, 1009);
            for i in 0..1009 {
                t.set(i, (i * 31) % hosts);
            }
            for i in 0..1009 {
                assert_eq!(t.get(i), (i * 31) % hosts, "{hosts} hosts, slot {i}");
            }
        }
    }

    fn hosts(weights: &[u32]) -> Vec<Arc<Host>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let mut h = Host::at(std::net::SocketAddr::from(([10, 0, 0, 1 + i as u8], 80)));
                h.weight = w;
                Arc::new(h)
            })
            .collect()
    }

    /// How many of 20,000 hashes each host takes.
    fn shares(t: &Table, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for k in 0..20_000u64 {
            c[t.pick(xxh64(&k.to_le_bytes(), 0), 0).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn tables_follow_the_weights() {
        let ring =
            Hashing { kind: Kind::Ring { min: 1024, max: DEFAULT_MAX_RING, murmur: false }, use_hostname: false };
        let maglev = Hashing { kind: Kind::Maglev { table_size: DEFAULT_MAGLEV_TABLE }, use_hostname: false };
        for h in [ring, maglev] {
            let t = Table::build(&h, &hosts(&[1, 1, 2]));
            let c = shares(&t, 3);
            // About a quarter, a quarter and a half (the ring is coarser than Maglev).
            assert!((3_500..6_500).contains(&c[0]) && (3_500..6_500).contains(&c[1]), "{h:?}: {c:?}");
            assert!((8_500..11_500).contains(&c[2]), "{h:?}: {c:?}");
        }
        // A 1024-entry ring over 4 equal hosts gives each 256 entries.
        let Table::Ring(r) = Table::build(&ring, &hosts(&[1, 1, 1, 1])) else { unreachable!() };
        assert_eq!(r.len(), 1024);
        assert!(r.windows(2).all(|w| w[0].0 <= w[1].0), "sorted");
    }

    #[test]
    fn losing_a_host_moves_few_of_the_others_keys() {
        let maglev = Hashing { kind: Kind::Maglev { table_size: 65537 }, use_hostname: false };
        let ring = Hashing { kind: Kind::Ring { min: 1024, max: DEFAULT_MAX_RING, murmur: true }, use_hostname: false };
        // Maglev moves a few percent of the others' keys. The ring is rebuilt to 1024
        // entries over 4 hosts (256 each, not 205): the new entries take about a tenth.
        for (h, most) in [(maglev, 600), (ring, 1_500)] {
            let all = hosts(&[1, 1, 1, 1, 1]);
            let before = Table::build(&h, &all);
            let after = Table::build(&h, &all[..4]);
            let mut moved = 0;
            for k in 0..10_000u64 {
                let key = xxh64(&k.to_le_bytes(), 0);
                let (b, a) = (before.pick(key, 0).unwrap(), after.pick(key, 0).unwrap());
                if b != 4 && b != a {
                    moved += 1;
                }
            }
            assert!(moved < most, "{h:?}: {moved} keys of the remaining hosts moved");
        }
    }

    #[test]
    fn retries_move_along_the_table() {
        let ring = Hashing { kind: Kind::Ring { min: 8, max: 8, murmur: false }, use_hostname: false };
        let t = Table::build(&ring, &hosts(&[1, 1]));
        let Table::Ring(r) = &t else { unreachable!() };
        // A hash just above the last entry wraps to the first.
        assert_eq!(t.pick(r[r.len() - 1].0 + 1, 0), Some(r[0].1 as usize));
        assert_eq!(t.pick(r[2].0, 0), Some(r[2].1 as usize));
        assert_eq!(t.pick(r[2].0, 1), Some(r[3].1 as usize));
        let maglev =
            Table::build(&Hashing { kind: Kind::Maglev { table_size: 7 }, use_hostname: false }, &hosts(&[1, 1]));
        let Table::Maglev(m) = &maglev else { unreachable!() };
        // Retry 1 looks up hash ^ (2^64 - 1).
        assert_eq!(maglev.pick(3, 1), Some(m.get(((3u64 ^ u64::MAX) % 7) as usize)));
    }

    #[test]
    fn envoys_limits_are_checked() {
        let ring = |min, max| Hashing { kind: Kind::Ring { min, max, murmur: false }, use_hostname: false };
        assert!(ring(1024, 100).validate().unwrap_err().contains("minimum_ring_size (1024) > maximum_ring_size (100)"));
        assert!(ring(100, 1000).validate().is_ok());
        let maglev = |table_size| Hashing { kind: Kind::Maglev { table_size }, use_hostname: false };
        assert!(maglev(65536).validate().unwrap_err().contains("not a prime"));
        assert!(maglev(65537).validate().is_ok());
        assert!(maglev(251).validate().is_ok());
    }
}
