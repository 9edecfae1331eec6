//! Kuma's hash-suffixed names (`kumahq/kuma:pkg/kds/hash/hash.go`): a resource synced
//! between control planes is renamed `<name>-<hash(mesh, name, zone, namespace)>`, so that
//! the same display name from two zones never collides, and the same resource keeps the
//! same name on global and in every zone.

/// k8s `rand.SafeEncodeString`'s alphabet (no vowels, no look-alikes).
const ALPHABET: &[u8; 27] = b"bcdfghjklmnpqrstvwxz2456789";
/// Kubernetes' name limit (253) minus the 17 characters of `-<16 hash chars>`.
const MAX_PREFIX: usize = 236;

fn fnv1a64(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// `HashedName(mesh, name, extras...)`: `extras` are the values of `kuma.io/zone` and then
/// `k8s.kuma.io/namespace`, each only when the label is present.
pub fn hashed_name(mesh: &str, name: &str, extras: &[&str]) -> String {
    let mut parts = vec![mesh, name];
    parts.extend_from_slice(extras);
    let hex = format!("{:016x}", fnv1a64(&parts));
    let suffix: String = hex.bytes().map(|c| ALPHABET[usize::from(c) % ALPHABET.len()] as char).collect();
    let mut prefix = name;
    if prefix.len() > MAX_PREFIX {
        // Names are ASCII (RFC 1123), so a byte cut is a character cut.
        prefix = &name[..MAX_PREFIX];
    }
    format!("{prefix}-{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of `shared/reference/kuma-kds.md` section 2.4 (the first three are
    /// asserted in Kuma's own tests).
    #[test]
    fn kumas_test_vectors() {
        assert_eq!(hashed_name("default", "redis-zone-1", &["zone-1"]), "redis-zone-1-2v6wfvvcvbc9f55d");
        assert_eq!(hashed_name("", "foo", &[]), "foo-zxw6c95d42zfz9cc");
        assert_eq!(hashed_name("", "foo", &["zone-1", "custom-ns"]), "foo-696vzv497z4cv4f4");
        assert_eq!(hashed_name("", "ingress", &["zone-1"]), "ingress-b5cdx6b4b7wxzc4d");
        assert_eq!(hashed_name("default", "tr-update", &[]), "tr-update-7c4bxx6842b298dv");
    }

    #[test]
    fn long_names_are_cut_to_fit_253() {
        let long = "a".repeat(300);
        let h = hashed_name("", &long, &[]);
        assert_eq!(h.len(), 253);
    }
}
