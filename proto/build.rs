//! Compiles `api/**/*.proto` with protox (no protoc) and generates prost messages plus
//! tonic clients and servers. Envoy's delta xDS messages, imported by the KDS services,
//! come from the .proto sources the envoy-types crate ships, and the generated code uses
//! envoy-types' Rust types for them and for the google.protobuf well-known types.
//!
//! Also writes `kuma_resources.bin`: the FileDescriptorSet of the resource files (every
//! file under api/ except kds_services.proto) and the google/protobuf files they import,
//! for proto3 JSON <-> binary transcoding with prost-reflect. It holds no Envoy file.

use protox::prost::Message;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The envoy-types version pinned (`=`) in the workspace; its source holds the .proto files.
const ENVOY_TYPES: &str = "envoy-types-0.7.7";

/// Env var naming envoy-types' `proto/` directory, to skip the registry scan.
const ENVOY_PROTO_DIR_VAR: &str = "ENVOY_TYPES_PROTO_DIR";

/// Include roots inside envoy-types' `proto/` that `envoy/service/discovery/v3/discovery.proto`
/// and its imports need.
const ENVOY_INCLUDES: &[&str] = &["data-plane-api", "xds", "googleapis", "protoc-gen-validate"];

/// The only file that imports Envoy; kept out of the resource descriptor set.
const SERVICES_FILE: &str = "api/mesh/v1alpha1/kds_services.proto";

/// envoy-types' `proto/` directory: `$ENVOY_TYPES_PROTO_DIR`, else the cargo registry
/// source of the pinned version, else `../vendor/`.
fn envoy_proto_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(ENVOY_PROTO_DIR_VAR) {
        let dir = PathBuf::from(dir);
        assert!(dir.join("data-plane-api").is_dir(), "{ENVOY_PROTO_DIR_VAR}={} has no data-plane-api/", dir.display());
        return dir;
    }
    let mut candidates = vec![];
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(Ok(dirs)) = cargo_home.map(|h| std::fs::read_dir(h.join("registry/src"))) {
        candidates.extend(dirs.flatten().map(|d| d.path().join(ENVOY_TYPES).join("proto")));
    }
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    candidates.push(manifest.join("../vendor").join(ENVOY_TYPES).join("proto"));
    candidates.into_iter().find(|p| p.join("data-plane-api").is_dir()).unwrap_or_else(|| {
        panic!(
            "cannot find {ENVOY_TYPES}/proto in the cargo registry; \
             run `cargo fetch` or set {ENVOY_PROTO_DIR_VAR} to its path"
        )
    })
}

/// Every `.proto` file under `dir`, sorted, as paths relative to `root`.
fn proto_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(root.join(dir))
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).expect("under root").to_path_buf();
        if path.is_dir() {
            proto_files(root, &rel, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(rel.to_str().expect("UTF-8 path").replace('\\', "/"));
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=api");
    println!("cargo:rerun-if-env-changed={ENVOY_PROTO_DIR_VAR}");

    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let mut files = vec![];
    proto_files(&manifest, Path::new("api"), &mut files);

    let envoy = envoy_proto_dir();
    let mut includes = vec![manifest.clone()];
    includes.extend(ENVOY_INCLUDES.iter().map(|d| envoy.join(d)));

    let fds = protox::Compiler::new(&includes)?
        .include_imports(true)
        .include_source_info(false)
        .open_files(files.iter().map(|f| manifest.join(f)))?
        .file_descriptor_set();

    // The resource descriptor set: the closure of every api/ file but the services.
    let by_name: HashMap<&str, _> = fds.file.iter().map(|f| (f.name(), f)).collect();
    let mut keep = BTreeSet::new();
    let mut stack: Vec<&str> = files.iter().map(String::as_str).filter(|f| *f != SERVICES_FILE).collect();
    while let Some(name) = stack.pop() {
        if keep.insert(name) {
            stack.extend(by_name[name].dependency.iter().map(String::as_str));
        }
    }
    if let Some(bad) = keep.iter().find(|f| !f.starts_with("api/") && !f.starts_with("google/protobuf/")) {
        panic!("{bad} is imported by a resource file; only api/ and google/protobuf/ files may be");
    }
    let resources = tonic_prost_build::FileDescriptorSet {
        file: fds.file.iter().filter(|f| keep.contains(f.name())).cloned().collect(),
    };
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out_dir.join("kuma_resources.bin"), resources.encode_to_vec())?;

    // Generate code for our files only: Envoy's and the well-known types come from envoy-types
    // (extern paths). prost-build still needs the well-known messages to decide derives.
    let ours = tonic_prost_build::FileDescriptorSet {
        file: fds
            .file
            .into_iter()
            .filter(|f| f.name().starts_with("api/") || f.name().starts_with("google/protobuf/"))
            .collect(),
    };
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Maps as BTreeMap: prost then encodes entries sorted by key, like the Go deterministic
        // marshal whose bytes Kuma hashes into KDS resource versions.
        .btree_map(".")
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::envoy_types::pb::google::protobuf")
        .extern_path(".google.rpc", "::envoy_types::pb::google::rpc")
        .extern_path(".envoy", "::envoy_types::pb::envoy")
        .extern_path(".xds", "::envoy_types::pb::xds")
        .extern_path(".udpa", "::envoy_types::pb::udpa")
        .extern_path(".validate", "::envoy_types::pb::validate")
        .compile_fds(ours)?;
    Ok(())
}
