//! SNI names of mesh mTLS: Kuma 2.x tag SNI (`backend{mesh=default,version=v1}`).

use std::collections::BTreeMap;

use crate::model::SERVICE_TAG;

/// Tag SNI as Kuma 2.x builds it: `<service>{k1=v1,k2=v2}` over the tags without
/// `kuma.io/service`, keys byte-sorted, no escaping (`kuma-dp.md` 4.1).
pub fn sni_from_tags(service: &str, tags: &BTreeMap<String, String>) -> String {
    let inner: Vec<String> =
        tags.iter().filter(|(k, _)| k.as_str() != SERVICE_TAG).map(|(k, v)| format!("{k}={v}")).collect();
    format!("{service}{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_keys_sorted_service_excluded() {
        let mut t = BTreeMap::new();
        t.insert("kuma.io/service".to_string(), "backend".to_string());
        t.insert("version".to_string(), "v1".to_string());
        t.insert("mesh".to_string(), "default".to_string());
        t.insert("kuma.io/zone".to_string(), "zone-1".to_string());
        assert_eq!(sni_from_tags("backend", &t), "backend{kuma.io/zone=zone-1,mesh=default,version=v1}");
    }
}
