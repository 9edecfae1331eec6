//! Envoy resources as `dp` holds them, and their proto3 JSON/YAML file form.
//!
//! The file form is the one of Envoy's file-based xDS (`{version_info, resources:
//! [{"@type": ..., ...}]}`) or of Kuma's golden files (`resources: [{name, resource}]`).
//! JSON is transcoded to protobuf ([`crate::json_wire`]) with a descriptor pool loaded on demand
//! ([`crate::descriptors`]) and decoded into envoy-types' prost structs, so the rest of `dp` sees the
//! same typed values whether they came from a file or from an ADS stream.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

use crate::descriptors::Descriptors;
use crate::json_wire;

mod listener;
pub use listener::ListenerResource;

/// The type URL prefix every Envoy resource carries.
const TYPE_PREFIX: &str = "type.googleapis.com/";

/// Largest configuration file `dp` reads; a bound against a runaway or hostile file.
pub const MAX_FILE_BYTES: usize = 256 << 20;

/// All resources of one configuration version. Equality compares the decoded
/// resources, not `raw` (whose order follows the source).
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub version: String,
    /// Their filter chains still encoded (see [`ListenerResource`]).
    pub listeners: Vec<ListenerResource>,
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
    pub secrets: Vec<Secret>,
    /// Route configurations for `http_connection_manager`s that name them (`rds`).
    pub routes: Vec<RouteConfiguration>,
    /// The resources as they came, encoded (the xDS `Any`s), when the caller has them:
    /// kept for `/config_dump` instead of encoding the decoded structs again. Filled in
    /// one pass after decoding, so that these long-lived buffers sit together on the heap
    /// instead of between the decoder's garbage (which then could not be returned).
    pub raw: Vec<Any>,
    /// Where each ClusterLoadAssignment is in `raw`, by name, when the caller knows: an
    /// update of assignments alone replaces them there ([`Encoded::with_endpoints`]).
    pub raw_endpoint_slots: HashMap<String, usize>,
}

impl PartialEq for Resources {
    fn eq(&self, o: &Self) -> bool {
        (&self.version, &self.listeners, &self.clusters, &self.endpoints, &self.secrets, &self.routes)
            == (&o.version, &o.listeners, &o.clusters, &o.endpoints, &o.secrets, &o.routes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("{0}")]
    Shape(String),
    #[error("resource #{index} ({name}): {reason}")]
    Resource { index: usize, name: String, reason: String },
}

impl Resources {
    pub fn len(&self) -> usize {
        self.listeners.len() + self.clusters.len() + self.endpoints.len() + self.secrets.len() + self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds one protobuf-encoded resource (an `Any`, as xDS carries it).
    pub fn push_any(&mut self, any: &Any) -> Result<(), String> {
        let bytes = any.value.as_slice();
        let err = |e: prost::DecodeError| format!("cannot decode {}: {e}", any.type_url);
        match any.type_url.as_str() {
            u if u == Listener::type_url() => self.listeners.push(ListenerResource::decode(bytes).map_err(err)?),
            u if u == Cluster::type_url() => self.clusters.push(Cluster::decode(bytes).map_err(err)?),
            u if u == ClusterLoadAssignment::type_url() => {
                self.endpoints.push(ClusterLoadAssignment::decode(bytes).map_err(err)?)
            }
            u if u == Secret::type_url() => self.secrets.push(Secret::decode(bytes).map_err(err)?),
            u if u == RouteConfiguration::type_url() => {
                self.routes.push(RouteConfiguration::decode(bytes).map_err(err)?)
            }
            other => return Err(format!("unsupported resource type {other}")),
        }
        Ok(())
    }

    /// Decodes a configuration file (YAML or JSON). `fallback_version` is used when the
    /// document carries no `version_info`.
    pub fn from_file_bytes(bytes: &[u8], fallback_version: &str) -> Result<Self, DecodeError> {
        let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::Syntax(format!("not UTF-8: {e}")))?;
        if text.trim_start().starts_with('{')
            && let Ok(r) = stream::from_json(text, fallback_version)
        {
            return Ok(r);
        }
        // YAML, or JSON the streaming reader refused: the document as one value, whose
        // errors name the resource and the field.
        let doc: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => serde_saphyr::from_str(text).map_err(|e| DecodeError::Syntax(first_line(&e.to_string())))?,
        };
        let Value::Object(mut top) = doc else {
            return Err(DecodeError::Shape("the document must be a mapping with a `resources` list".into()));
        };
        let version = match top.remove("version_info").or_else(|| top.remove("versionInfo")) {
            Some(Value::String(v)) => v,
            Some(Value::Number(n)) => n.to_string(),
            None | Some(Value::Null) => fallback_version.to_string(),
            Some(_) => return Err(DecodeError::Shape("`version_info` must be a string".into())),
        };
        let items = match top.remove("resources") {
            Some(Value::Array(items)) => items,
            None | Some(Value::Null) => vec![],
            Some(_) => return Err(DecodeError::Shape("`resources` must be a list".into())),
        };
        if let Some(k) = top.keys().next() {
            return Err(DecodeError::Shape(format!(
                "unknown top-level key `{k}` (expected `version_info` and `resources`)"
            )));
        }
        let mut pool = Descriptors::new();
        let mut out = Resources { version, ..Default::default() };
        for (index, item) in items.into_iter().enumerate() {
            let (name, any) =
                to_any(&mut pool, item).map_err(|(name, reason)| DecodeError::Resource { index, name, reason })?;
            out.push_any(&any).map_err(|reason| DecodeError::Resource { index, name, reason })?;
        }
        Ok(out)
    }

    /// The encoded form for the snapshot, taken from `raw` when it holds every resource
    /// (encoding 10,000 services again was a third of the cost of a one-endpoint update).
    pub fn take_encoded(&mut self) -> Encoded {
        if self.raw.len() == self.len() {
            Encoded {
                version: self.version.clone(),
                items: Items::from_vec(std::mem::take(&mut self.raw).into_iter().map(Arc::new).collect()),
                endpoint_slots: Arc::new(std::mem::take(&mut self.raw_endpoint_slots)),
            }
        } else {
            self.encode()
        }
    }

    /// The resources protobuf-encoded, as kept for the admin API: about a tenth of the
    /// memory of the decoded structs at 100,000 filter chains.
    pub fn encode(&self) -> Encoded {
        // Encoded in place, not through `pack_any(r.clone())`: a transient copy of every
        // resource would fragment the heap the snapshot lives in.
        fn any<M: Message + Name>(r: &M) -> Arc<Any> {
            Arc::new(Any { type_url: M::type_url(), value: r.encode_to_vec() })
        }
        let mut items = Vec::with_capacity(self.len());
        let listener_url = Listener::type_url();
        items.extend(
            self.listeners.iter().map(|l| Arc::new(Any { type_url: listener_url.clone(), value: l.encode_to_vec() })),
        );
        items.extend(self.clusters.iter().map(any));
        items.extend(self.endpoints.iter().map(any));
        items.extend(self.secrets.iter().map(any));
        items.extend(self.routes.iter().map(any));
        Encoded { version: self.version.clone(), items: Items::from_vec(items), endpoint_slots: Default::default() }
    }

    /// Proto3 JSON of every resource, in the file form `dp run --xds-file` reads.
    pub fn to_json(&self) -> Value {
        self.encode().to_json()
    }
}

/// Encoded resources in chunks shared between versions: a copy with a few items replaced
/// copies only the chunks that hold them. (A flat list cost one pointer copy per item, and
/// as much again to drop the old one: at 20,000 resources that was most of dp's CPU for a
/// one-endpoint update.)
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Items {
    chunks: Vec<Arc<Vec<Arc<Any>>>>,
}

/// Items per chunk.
const CHUNK: usize = 256;

impl Items {
    pub fn from_vec(items: Vec<Arc<Any>>) -> Items {
        Items { chunks: items.chunks(CHUNK).map(|c| Arc::new(c.to_vec())).collect() }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Any>> {
        self.chunks.iter().flat_map(|c| c.iter())
    }

    pub fn get(&self, i: usize) -> Option<&Arc<Any>> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    /// Replaces item `i` (copying its chunk if another version shares it); `None` when
    /// there is no such item.
    pub fn set(&mut self, i: usize, any: Arc<Any>) -> Option<()> {
        let chunk = self.chunks.get_mut(i / CHUNK).filter(|c| i % CHUNK < c.len())?;
        Arc::make_mut(chunk)[i % CHUNK] = any;
        Some(())
    }
}

/// Resources kept protobuf-encoded (see [`Resources::encode`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub version: String,
    pub items: Items,
    /// Where each ClusterLoadAssignment is in `items`, by name (empty when not known).
    pub endpoint_slots: Arc<HashMap<String, usize>>,
}

impl Encoded {
    /// A copy with these assignments replaced, or `None` when one of them has no slot.
    pub fn with_endpoints(&self, version: String, updates: impl IntoIterator<Item = (String, Any)>) -> Option<Encoded> {
        let mut items = self.items.clone();
        for (name, any) in updates {
            items.set(*self.endpoint_slots.get(&name)?, Arc::new(any))?;
        }
        Some(Encoded { version, items, endpoint_slots: self.endpoint_slots.clone() })
    }

    pub fn decode(&self) -> Result<Resources, String> {
        let mut r = Resources { version: self.version.clone(), ..Default::default() };
        for any in self.items.iter() {
            r.push_any(any)?;
        }
        Ok(r)
    }

    /// Proto3 JSON of every resource, private keys redacted.
    pub fn to_json(&self) -> Value {
        let mut pool = Descriptors::new();
        let items: Vec<Value> = self
            .items
            .iter()
            .map(|any| {
                let type_name = any.type_url.strip_prefix(TYPE_PREFIX).unwrap_or(&any.type_url);
                let bytes = if any.type_url == Secret::type_url() {
                    match Secret::decode(any.value.as_slice()) {
                        Ok(mut s) => {
                            redact_secret(&mut s);
                            s.encode_to_vec()
                        }
                        Err(_) => vec![],
                    }
                } else {
                    any.value.clone()
                };
                match pool.to_json(type_name, &bytes) {
                    Ok(mut v) => {
                        if let Value::Object(m) = &mut v {
                            m.insert("@type".into(), Value::String(any.type_url.clone()));
                        }
                        v
                    }
                    Err(e) => Value::String(format!("undecodable {type_name}: {e}")),
                }
            })
            .collect();
        serde_json::json!({ "version_info": self.version, "resources": items })
    }
}

fn redact_secret(s: &mut Secret) {
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    if let Some(Type::TlsCertificate(c)) = &mut s.r#type
        && c.private_key.is_some()
    {
        c.private_key =
            Some(DataSource { specifier: Some(Specifier::InlineString("[redacted]".into())), ..Default::default() });
    }
}

/// Turns one list item into an `Any`, returning the resource's name (or a placeholder)
/// with the reason on failure.
fn to_any(pool: &mut Descriptors, item: Value) -> Result<(String, Any), (String, String)> {
    let Value::Object(mut obj) = item else {
        return Err(("?".into(), "each resource must be a mapping".into()));
    };
    // Kuma's golden files wrap each resource as {name, resource}.
    let obj = if !obj.contains_key("@type") && obj.contains_key("resource") {
        match obj.remove("resource") {
            Some(Value::Object(inner)) => inner,
            _ => return Err(("?".into(), "`resource` must be a mapping".into())),
        }
    } else {
        obj
    };
    let mut obj = obj;
    let name = ["name", "clusterName", "cluster_name"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .unwrap_or("<unnamed>")
        .to_string();
    let type_url = match obj.remove("@type") {
        Some(Value::String(t)) => t,
        _ => return Err((name, "missing `@type`".into())),
    };
    let type_name = type_url.strip_prefix(TYPE_PREFIX).unwrap_or(&type_url);
    let Some(desc) = pool.message(type_name) else {
        return Err((name, format!("unsupported resource type {type_url}")));
    };
    let value = json_wire::transcode(&desc, &mut |n: &str| pool.message(n), &Value::Object(obj))
        .map_err(|e| (name.clone(), e.to_string()))?;
    let any = Any { type_url: format!("{TYPE_PREFIX}{type_name}"), value };
    Ok((name, any))
}

/// JSON documents read as a stream: each resource is transcoded to protobuf as its text
/// is parsed, so no tree of the whole document is ever built (a 100,000-name ingress
/// config was hundreds of MiB as a `serde_json::Value`). Anything unusual (an item whose
/// first key is not `@type`, such as Kuma's `{name, resource}` form) is read into a
/// `Value` for that item alone. Any error makes the caller read the document again the
/// slow way, which names the resource in its message.
mod stream {
    use super::*;
    use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    pub fn from_json(text: &str, fallback_version: &str) -> Result<Resources, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let mut doc = Doc { pool: Descriptors::new(), out: Resources::default(), version: None };
        (&mut de).deserialize_map(&mut doc)?;
        de.end()?;
        let mut out = doc.out;
        out.version = doc.version.unwrap_or_else(|| fallback_version.to_string());
        Ok(out)
    }

    struct Doc {
        pool: Descriptors,
        out: Resources,
        version: Option<String>,
    }

    impl<'de> Visitor<'de> for &mut Doc {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a mapping with a `resources` list")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                match key.as_str() {
                    "version_info" | "versionInfo" => {
                        self.version = match map.next_value::<Value>()? {
                            Value::String(v) => Some(v),
                            Value::Number(n) => Some(n.to_string()),
                            Value::Null => None,
                            _ => return Err(A::Error::custom("`version_info` must be a string")),
                        }
                    }
                    "resources" => map.next_value_seed(Items(self))?,
                    _ => return Err(A::Error::custom("unknown top-level key")),
                }
            }
            Ok(())
        }
    }

    struct Items<'a>(&'a mut Doc);

    impl<'de> DeserializeSeed<'de> for Items<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
            de.deserialize_seq(self)
        }
    }

    impl<'de> Visitor<'de> for Items<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a list of resources")
        }

        fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
            while let Some(any) = seq.next_element_seed(Item(&mut self.0.pool))? {
                self.0.out.push_any(&any).map_err(S::Error::custom)?;
            }
            Ok(())
        }
    }

    /// One resource: `{"@type": ..., fields...}` streamed, anything else buffered.
    struct Item<'a>(&'a mut Descriptors);

    impl<'de> DeserializeSeed<'de> for Item<'_> {
        type Value = Any;

        fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Any, D::Error> {
            de.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Item<'_> {
        type Value = Any;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a resource mapping")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Any, A::Error> {
            let pool = self.0;
            let Some(first) = map.next_key::<String>()? else {
                return Err(A::Error::custom("an empty resource"));
            };
            if first != "@type" {
                let mut obj = serde_json::Map::new();
                obj.insert(first, map.next_value()?);
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    obj.insert(k, v);
                }
                return to_any(pool, Value::Object(obj)).map(|(_, any)| any).map_err(|(_, e)| A::Error::custom(e));
            }
            let type_url: String = map.next_value()?;
            let type_name = type_url.strip_prefix(TYPE_PREFIX).unwrap_or(&type_url).to_string();
            let desc = pool.message(&type_name).ok_or_else(|| A::Error::custom("unsupported resource type"))?;
            let value = json_wire::transcode_fields(&desc, &mut |n: &str| pool.message(n), &mut map)?;
            Ok(Any { type_url: format!("{TYPE_PREFIX}{type_name}"), value })
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
version_info: "7"
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: backend
  type: STATIC
  connectTimeout: 1.5s
  loadAssignment:
    clusterName: backend
    endpoints:
    - lbEndpoints:
      - endpoint: {address: {socketAddress: {address: 127.0.0.1, portValue: 8080}}}
- name: l1
  resource:
    "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l1
    address: {socketAddress: {address: 127.0.0.1, portValue: 0}}
    filterChains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typedConfig:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          cluster: backend
          statPrefix: x
"#;

    #[test]
    fn decodes_both_item_forms() {
        let r = Resources::from_file_bytes(FILE.as_bytes(), "fallback").unwrap();
        assert_eq!(r.version, "7");
        assert_eq!(r.clusters[0].name, "backend");
        assert_eq!(r.clusters[0].connect_timeout.unwrap().nanos, 500_000_000);
        assert_eq!(r.listeners[0].name, "l1");
        let l = r.listeners[0].to_listener().unwrap();
        let tc = l.filter_chains[0].filters[0].config_type.as_ref().unwrap();
        let envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any) = tc else { panic!() };
        assert!(any.type_url.ends_with("TcpProxy"));
    }

    #[test]
    fn json_round_trip() {
        let r = Resources::from_file_bytes(FILE.as_bytes(), "x").unwrap();
        let json = serde_json::to_string(&r.to_json()).unwrap();
        let back = Resources::from_file_bytes(json.as_bytes(), "y").unwrap();
        assert_eq!(r, back);
    }

    #[test]
    fn json_is_streamed_with_the_same_result_and_errors() {
        let yaml = Resources::from_file_bytes(FILE.as_bytes(), "x").unwrap();
        let doc: Value = serde_saphyr::from_str(FILE).unwrap();
        let json = serde_json::to_string(&doc).unwrap();
        assert!(json.contains(r#""resource":{"#), "the {{name, resource}} form is in the document");
        let streamed = stream::from_json(&json, "x").unwrap();
        assert_eq!(streamed, yaml);
        // A wrong field: the stream refuses; the document read whole names it.
        let bad = json.replace("connectTimeout", "connectTimeoutz");
        assert!(stream::from_json(&bad, "x").is_err());
        let e = Resources::from_file_bytes(bad.as_bytes(), "x").unwrap_err().to_string();
        assert!(e.contains("resource #0 (backend)") && e.contains("connectTimeoutz"), "{e}");
        let e = Resources::from_file_bytes(br#"{"resourcez": []}"#, "x").unwrap_err().to_string();
        assert!(e.contains("resourcez"), "{e}");
    }

    #[test]
    fn items_replaced_in_a_copy_share_every_other_chunk() {
        let any = |i: usize| Arc::new(Any { type_url: "t".into(), value: i.to_le_bytes().to_vec() });
        let n = 2 * CHUNK + 10;
        let first = Items::from_vec((0..n).map(any).collect());
        let mut second = first.clone();
        second.set(CHUNK + 3, any(9999)).unwrap();
        assert!(second.set(n, any(0)).is_none(), "no such item");
        // The copy has the new item, the original still the old one, in the same order.
        assert_eq!(second.get(CHUNK + 3).unwrap().value, 9999usize.to_le_bytes());
        assert_eq!(first.get(CHUNK + 3).unwrap().value, (CHUNK + 3).to_le_bytes());
        let values = |items: &Items| items.iter().map(|a| a.value.clone()).collect::<Vec<_>>();
        assert_eq!(values(&first), (0..n).map(|i| i.to_le_bytes().to_vec()).collect::<Vec<_>>());
        assert_eq!(values(&second).len(), n);
        // Only the chunk that holds it was copied.
        for c in [0, 2] {
            assert!(Arc::ptr_eq(&first.chunks[c], &second.chunks[c]), "chunk {c} copied");
        }
        assert!(!Arc::ptr_eq(&first.chunks[1], &second.chunks[1]));
    }

    #[test]
    fn errors_name_the_resource_and_field() {
        let bad = FILE.replace("connectTimeout", "connectTimeoutz");
        let e = Resources::from_file_bytes(bad.as_bytes(), "x").unwrap_err().to_string();
        assert!(e.contains("resource #0 (backend)") && e.contains("connectTimeoutz"), "{e}");
        let bad = FILE.replace("v3.TcpProxy", "v3.Nope");
        let e = Resources::from_file_bytes(bad.as_bytes(), "x").unwrap_err().to_string();
        assert!(e.contains("resource #1 (l1)") && e.contains("v3.Nope"), "{e}");
        let e = Resources::from_file_bytes(b"resources: [1", "x").unwrap_err().to_string();
        assert!(e.starts_with("not valid YAML"), "{e}");
        let e = Resources::from_file_bytes(b"resourcez: []", "x").unwrap_err().to_string();
        assert!(e.contains("resourcez"), "{e}");
    }
}
