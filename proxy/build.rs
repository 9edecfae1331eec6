//! Embeds envoy-types' descriptor set, indexed so that `dp` loads only the files a
//! configuration needs.
//!
//! envoy-types ships a FileDescriptorSet of the whole Envoy API (3.3 MB; decoded at once
//! it costs ~50 MB of RSS) but does not export it. Proto3 JSON needs descriptors for the
//! resource types and for every type an `Any` inside them names (a tracing provider, a
//! DNS resolver, ...), which can be any of Envoy's. So the build writes each file's
//! encoded descriptor into one blob, plus an index: file name, its place in the blob and
//! its dependencies, and which file defines each message. At run time the pool is built
//! from the closure of the files a document names, one file at a time.

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::PathBuf;

/// The envoy-types version pinned in the workspace; its source holds the descriptor.
const ENVOY_TYPES: &str = "envoy-types-0.7.7";

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

/// Every message of a file, nested ones included, by full name.
fn messages(prefix: &str, list: &[DescriptorProto], out: &mut Vec<String>) {
    for m in list {
        let name = format!("{prefix}.{}", m.name());
        messages(&name, &m.nested_type, out);
        out.push(name);
    }
}

fn main() {
    link_args();
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_DESCRIPTOR");
    println!("cargo:rerun-if-changed=build.rs");
    let path = descriptor_path();
    let bytes = std::fs::read(&path).expect("read envoy-types descriptor");
    let set = FileDescriptorSet::decode(bytes.as_slice()).expect("decode envoy-types descriptor");
    let index_of: HashMap<&str, usize> = set.file.iter().enumerate().map(|(i, f)| (f.name(), i)).collect();
    // The index holds no pointers (offsets into one string and one array instead of `&str`
    // and `&[u16]`): a table of pointers in a position-independent executable is written by
    // the loader at start, and so is private memory of every dp process; this stays in the
    // file's read-only pages, shared, and read only when a config needs a type.
    let mut blob = Vec::new();
    let mut files = String::from("pub static FILES: &[FileEntry] = &[\n");
    let mut deps_all: Vec<String> = vec![];
    let mut by_message = Vec::new();
    for (i, f) in set.file.iter().enumerate() {
        let start = blob.len();
        f.encode(&mut blob).expect("encode file descriptor");
        let deps_start = deps_all.len();
        for d in &f.dependency {
            // The set is in dependency order: a file's dependencies come before it.
            let j = *index_of.get(d.as_str()).unwrap_or_else(|| panic!("{d} is not in {}", path.display()));
            assert!(j < i, "{} depends on the later {d}", f.name());
            deps_all.push(j.to_string());
        }
        writeln!(
            files,
            "    FileEntry {{ start: {start}, end: {}, deps: {deps_start}..{} }},",
            blob.len(),
            deps_all.len()
        )
        .unwrap();
        let mut names = vec![];
        messages(f.package(), &f.message_type, &mut names);
        by_message.extend(names.into_iter().map(|n| (n, i)));
    }
    files.push_str("];\n");
    by_message.sort();
    let mut index = files;
    writeln!(index, "/// FILES[i].deps index this.\npub static DEPS: &[u16] = &[{}];", deps_all.join(", ")).unwrap();
    let mut names = String::new();
    let mut entries = String::new();
    for (name, i) in &by_message {
        writeln!(entries, "    MessageEntry {{ name: {}..{}, file: {i} }},", names.len(), names.len() + name.len())
            .unwrap();
        names.push_str(name);
    }
    writeln!(index, "/// The full message names, one after another.\npub static NAMES: &str = {names:?};").unwrap();
    index.push_str("/// (a full message name in NAMES, index in FILES), sorted by name.\npub static MESSAGES: &[MessageEntry] = &[\n");
    index.push_str(&entries);
    index.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out.join("envoy_descriptors.bin"), blob).expect("write descriptor blob");
    std::fs::write(out.join("envoy_descriptor_index.rs"), index).expect("write descriptor index");
}

/// `dp` is a position-independent executable: at start the dynamic loader applies one
/// relocation per pointer in its tables (about 35,000, an 820 KiB table it reads whole,
/// so all of it stays resident). Packed relative relocations (DT_RELR; GNU ld 2.38+,
/// glibc 2.36+) store the same in a few KiB.
fn link_args() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
