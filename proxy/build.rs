//! Extracts the part of envoy-types' descriptor set that `dp` reads from files.
//!
//! envoy-types ships a FileDescriptorSet of the whole Envoy API (3.3 MB; decoded it
//! costs ~50 MB of RSS) but does not export it. Proto3 JSON/YAML decoding only needs
//! the files reachable from the resource and extension types we accept, so we keep
//! that closure (a few hundred KB) and embed it.

use prost::Message;
use prost_types::FileDescriptorSet;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

/// The envoy-types version pinned in the workspace; its source holds the descriptor.
const ENVOY_TYPES: &str = "envoy-types-0.7.7";

/// Files whose messages may appear in a resource or as an `Any` inside one.
const ROOTS: &[&str] = &[
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/network/direct_response/v3/config.proto",
    "envoy/extensions/filters/network/rbac/v3/rbac.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/udp/dns_filter/v3/dns_filter.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/access_loggers/stream/v3/stream.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/upstreams/tcp/v3/tcp_protocol_options.proto",
];

fn descriptor_path() -> PathBuf {
    if let Ok(p) = std::env::var("ENVOY_TYPES_DESCRIPTOR") {
        return PathBuf::from(p);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let mut candidates = vec![];
    if let Ok(dirs) = std::fs::read_dir(cargo_home.join("registry/src")) {
        for d in dirs.flatten() {
            candidates.push(d.path().join(ENVOY_TYPES).join("src/generated/types.bin"));
        }
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    candidates.push(manifest.join("../vendor").join(ENVOY_TYPES).join("src/generated/types.bin"));
    candidates.into_iter().find(|p| p.exists()).unwrap_or_else(|| {
        panic!(
            "cannot find {ENVOY_TYPES}/src/generated/types.bin in the cargo registry; \
             run `cargo fetch` or set ENVOY_TYPES_DESCRIPTOR to its path"
        )
    })
}

fn main() {
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_DESCRIPTOR");
    println!("cargo:rerun-if-changed=build.rs");
    let path = descriptor_path();
    let bytes = std::fs::read(&path).expect("read envoy-types descriptor");
    let set = FileDescriptorSet::decode(bytes.as_slice()).expect("decode envoy-types descriptor");
    let by_name: HashMap<&str, &prost_types::FileDescriptorProto> = set.file.iter().map(|f| (f.name(), f)).collect();
    let mut keep = BTreeSet::new();
    let mut stack: Vec<&str> = ROOTS.to_vec();
    while let Some(name) = stack.pop() {
        if !keep.insert(name.to_string()) {
            continue;
        }
        let file = by_name.get(name).unwrap_or_else(|| panic!("{name} is not in {}", path.display()));
        stack.extend(file.dependency.iter().map(String::as_str));
    }
    // Keep the original order: dependencies come before their dependents.
    let subset = FileDescriptorSet { file: set.file.iter().filter(|f| keep.contains(f.name())).cloned().collect() };
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("envoy_subset.bin");
    std::fs::write(out, subset.encode_to_vec()).expect("write descriptor subset");
}
