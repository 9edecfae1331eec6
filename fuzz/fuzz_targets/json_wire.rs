//! proto3 JSON to protobuf wire bytes (`proxy::json_wire`, how dp reads `--xds-file`),
//! with prost-reflect's JSON deserializer as the oracle. The first byte picks the message
//! type, the rest is the JSON text. Where the text is JSON:
//! * ours accepts exactly what prost-reflect accepts, except a field given twice (under
//!   its JSON and its proto name), which ours refuses by design;
//! * where both accept, the two encodings decode to the same message (compared as their
//!   proto3 JSON, so field order and the order inside an `Any`'s bytes do not count);
//! * reading the text as a stream gives the same message as reading it as a value, or
//!   refuses a text that gives some key twice: a value keeps only the last, while the stream
//!   reads (and may refuse) the first before it can know a second follows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::descriptors::Descriptors;
use proxy::json_wire::transcode;

const TYPES: &[&str] = &[
    "envoy.config.listener.v3.Listener",
    "envoy.config.cluster.v3.Cluster",
    "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "envoy.extensions.transport_sockets.tls.v3.Secret",
    "envoy.config.route.v3.RouteConfiguration",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
    "google.protobuf.Any",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, text)) = data.split_first() else { return };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(text) else { return };
    let name = TYPES[pick as usize % TYPES.len()];
    let mut d = Descriptors::new();
    let desc = d.message(name).expect("an Envoy type");
    let reference = d.from_json(name, &value);
    let ours = transcode(&desc, &mut |n: &str| d.message(n), &value).map_err(|e| e.to_string());
    let streamed = {
        let mut de = serde_json::Deserializer::from_slice(text);
        transcode(&desc, &mut |n: &str| d.message(n), &mut de).and_then(|b| de.end().map(|()| b))
    };
    let mut json = |bytes: &[u8]| d.to_json(name, bytes).expect("our encoding decodes");
    match (&reference, &ours) {
        (Ok(r), Ok(o)) => assert_eq!(json(o), json(&prost::Message::encode_to_vec(r)), "ours differs from prost-reflect"),
        (Err(_), Err(_)) => {}
        (Ok(_), Err(e)) => assert!(e.contains("given twice"), "ours refused what prost-reflect accepts: {e}"),
        (Err(e), Ok(_)) => panic!("ours accepted what prost-reflect refuses: {e}"),
    }
    match (&ours, &streamed) {
        (Ok(o), Ok(s)) => assert_eq!(json(s), json(o), "the stream differs from the value"),
        (Ok(_), Err(e)) => assert!(has_duplicate_key(text), "the stream refused what the value accepts: {e}"),
        (Err(_), _) => {}
    }
});

/// Whether some JSON object in `text` (which parses) gives a key twice.
fn has_duplicate_key(text: &[u8]) -> bool {
    serde_json::from_slice::<UniqueKeys>(text).is_err()
}

/// Deserializes any JSON and fails on an object with a repeated key.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(serde::de::Error::custom("a key given twice"));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(self)
    }
}
