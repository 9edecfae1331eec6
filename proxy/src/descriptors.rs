//! Envoy's protobuf descriptors, loaded on demand for proto3 JSON.
//!
//! The whole Envoy API is embedded (see `build.rs`) but a pool holds only the files a
//! document needs: the resource's own file and, as deserialization or serialization meets
//! an `Any` naming a type the pool lacks, that type's file, each with its dependencies. A
//! zone proxy's config needs a few dozen of Envoy's ~1,000 files, so any type Envoy
//! knows decodes and idle memory stays where it was with a trimmed set.

use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};
use serde_json::Value;

/// One file of the blob: its encoded `FileDescriptorProto` (`BLOB[start..end]`) and its
/// dependencies (`index::DEPS[deps]`). The index holds offsets, not pointers (`build.rs`).
pub struct FileEntry {
    start: u32,
    end: u32,
    deps: std::ops::Range<u16>,
}

/// A message's full name (`index::NAMES[name]`) and the file that defines it.
pub struct MessageEntry {
    name: std::ops::Range<u32>,
    file: u16,
}

impl MessageEntry {
    fn name(&self) -> &'static str {
        &index::NAMES[self.name.start as usize..self.name.end as usize]
    }
}

mod index {
    use super::{FileEntry, MessageEntry};
    include!(concat!(env!("OUT_DIR"), "/envoy_descriptor_index.rs"));
}

static BLOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// A descriptor pool that grows with what it is asked for.
pub struct Descriptors {
    pool: DescriptorPool,
    loaded: Vec<bool>,
}

impl Default for Descriptors {
    fn default() -> Self {
        Self::new()
    }
}

impl Descriptors {
    pub fn new() -> Self {
        Descriptors { pool: DescriptorPool::new(), loaded: vec![false; index::FILES.len()] }
    }

    /// The descriptor of an Envoy message, loading its file if needed; `None` when Envoy
    /// has no message of that name.
    pub fn message(&mut self, full_name: &str) -> Option<MessageDescriptor> {
        if let Some(m) = self.pool.get_message_by_name(full_name) {
            return Some(m);
        }
        self.load(full_name);
        self.pool.get_message_by_name(full_name)
    }

    /// Loads the file that defines `full_name`; false when there is none or it is loaded.
    fn load(&mut self, full_name: &str) -> bool {
        let Ok(i) = index::MESSAGES.binary_search_by(|m| m.name().cmp(full_name)) else {
            return false;
        };
        self.load_file(usize::from(index::MESSAGES[i].file))
    }

    fn load_file(&mut self, i: usize) -> bool {
        if self.loaded[i] {
            return false;
        }
        self.loaded[i] = true;
        let f = &index::FILES[i];
        for &d in &index::DEPS[usize::from(f.deps.start)..usize::from(f.deps.end)] {
            self.load_file(usize::from(d));
        }
        let bytes = &BLOB[f.start as usize..f.end as usize];
        self.pool.decode_file_descriptor_proto(bytes).expect("embedded descriptors are consistent");
        true
    }

    /// A message of type `full_name` from proto3 JSON.
    pub fn from_json(&mut self, full_name: &str, json: &Value) -> Result<DynamicMessage, String> {
        self.retrying(full_name, |desc| {
            DynamicMessage::deserialize_with_options(desc, json, &DeserializeOptions::new()).map_err(|e| e.to_string())
        })
    }

    /// Proto3 JSON of an encoded message of type `full_name`.
    pub fn to_json(&mut self, full_name: &str, bytes: &[u8]) -> Result<Value, String> {
        self.retrying(full_name, |desc| {
            let msg = DynamicMessage::decode(desc, bytes).map_err(|e| e.to_string())?;
            msg.serialize_with_options(serde_json::value::Serializer, &SerializeOptions::new())
                .map_err(|e| e.to_string())
        })
    }

    /// Runs `f` on the descriptor of `full_name` until it stops failing for a type the
    /// pool lacks. A descriptor sees the pool as it was when taken, so each round takes
    /// it again; each round loads one more file, so this ends.
    fn retrying<T>(
        &mut self,
        full_name: &str,
        f: impl Fn(MessageDescriptor) -> Result<T, String>,
    ) -> Result<T, String> {
        loop {
            let desc = self.message(full_name).ok_or_else(|| format!("unknown message type {full_name}"))?;
            match f(desc) {
                Ok(v) => return Ok(v),
                Err(e) => match missing_message(&e) {
                    Some(name) if self.load(name) => {}
                    _ => return Err(e),
                },
            }
        }
    }
}

/// The type named by prost-reflect's "message 'X' not found" (an `Any` naming a type
/// outside the pool).
fn missing_message(error: &str) -> Option<&str> {
    let rest = &error[error.find("message '")? + "message '".len()..];
    let name = &rest[..rest.find("' not found")?];
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn loads_the_files_an_any_names_on_demand() {
        let mut d = Descriptors::new();
        let hcm = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
        let json = serde_json::json!({
            "statPrefix": "x",
            "tracing": {"provider": {"name": "envoy.tracers.datadog", "typedConfig": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.DatadogConfig",
                "collectorCluster": "meshtrace:datadog", "serviceName": "backend"}}},
        });
        let msg = d.from_json(hcm, &json).unwrap();
        assert!(d.pool.get_message_by_name("envoy.config.trace.v3.DatadogConfig").is_some());
        let back = d.to_json(hcm, &msg.encode_to_vec()).unwrap();
        assert_eq!(back["tracing"]["provider"]["typedConfig"]["collectorCluster"], "meshtrace:datadog");
        // A fresh pool serializing the same bytes finds the inner type by itself too.
        let back = Descriptors::new().to_json(hcm, &msg.encode_to_vec()).unwrap();
        assert_eq!(back["tracing"]["provider"]["typedConfig"]["serviceName"], "backend");
        // A small pool: the HCM's closure, not Envoy's whole API.
        let files = d.loaded.iter().filter(|l| **l).count();
        assert!(files < index::FILES.len() / 4, "{files} of {} files loaded", index::FILES.len());
    }

    #[test]
    fn an_unknown_any_type_is_named() {
        let mut d = Descriptors::new();
        let json = serde_json::json!({"name": "x", "typedConfig": {"@type": "type.googleapis.com/envoy.Nope"}});
        let e = d.from_json("envoy.config.listener.v3.Filter", &json).unwrap_err();
        assert!(e.contains("envoy.Nope"), "{e}");
        assert!(d.message("envoy.Nope").is_none());
    }
}
