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
    let mut deps_all: Vec<String> = vec![];
    let mut deps_of: Vec<std::ops::Range<usize>> = vec![];
    let mut by_message = Vec::new();
    for (i, f) in set.file.iter().enumerate() {
        let deps_start = deps_all.len();
        for d in &f.dependency {
            // The set is in dependency order: a file's dependencies come before it.
            let j = *index_of.get(d.as_str()).unwrap_or_else(|| panic!("{d} is not in {}", path.display()));
            assert!(j < i, "{} depends on the later {d}", f.name());
            deps_all.push(j.to_string());
        }
        deps_of.push(deps_start..deps_all.len());
        let mut names = vec![];
        messages(f.package(), &f.message_type, &mut names);
        by_message.extend(names.into_iter().map(|n| (n, i)));
    }
    // Where each file goes in the blob: the files every proxy's configuration needs first,
    // then those of HTTP routing, then the rest, so that the pages a start reads are
    // together (a sidecar's resources need about 1 of the 3.3 MB, spread over 2.5 MB in the
    // set's own order, and the kernel maps the 64 KiB around each page read).
    let file_of = |message: &str| -> usize {
        by_message.iter().find(|(n, _)| n == message).map(|(_, i)| *i).unwrap_or_else(|| panic!("no message {message}"))
    };
    let mut placed = vec![false; set.file.len()];
    let mut order = Vec::with_capacity(set.file.len());
    for tier in HOT_MESSAGES {
        let mut closure = vec![];
        for m in *tier {
            dependency_closure(file_of(m), &set, &index_of, &mut placed, &mut closure);
        }
        closure.sort();
        order.extend(closure);
    }
    order.extend((0..set.file.len()).filter(|&i| !placed[i]));
    let mut blob = Vec::new();
    let mut span = vec![0..0; set.file.len()];
    for &i in &order {
        let start = blob.len();
        set.file[i].encode(&mut blob).expect("encode file descriptor");
        span[i] = start..blob.len();
    }
    let mut files = String::from("pub static FILES: &[FileEntry] = &[\n");
    for (s, d) in span.iter().zip(&deps_of) {
        writeln!(files, "    FileEntry {{ start: {}, end: {}, deps: {}..{} }},", s.start, s.end, d.start, d.end)
            .unwrap();
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

/// The messages whose files (with their dependencies) open the blob, tier by tier: what
/// every proxy's resources name (listeners, clusters, endpoints, secrets, TLS and TCP
/// proxying), then HTTP routing.
const HOT_MESSAGES: &[&[&str]] = &[
    &[
        "envoy.config.listener.v3.Listener",
        "envoy.config.cluster.v3.Cluster",
        "envoy.config.endpoint.v3.ClusterLoadAssignment",
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    ],
    &[
        "envoy.config.route.v3.RouteConfiguration",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "envoy.extensions.filters.http.router.v3.Router",
    ],
];

/// Adds file `i` and the files it depends on, transitively, that are not `placed` yet.
fn dependency_closure(
    i: usize,
    set: &FileDescriptorSet,
    index_of: &HashMap<&str, usize>,
    placed: &mut [bool],
    out: &mut Vec<usize>,
) {
    if std::mem::replace(&mut placed[i], true) {
        return;
    }
    for d in &set.file[i].dependency {
        dependency_closure(index_of[d.as_str()], set, index_of, placed, out);
    }
    out.push(i);
}

/// `dp` is a position-independent executable: at start the dynamic loader applies one
/// relocation per pointer in its tables (about 35,000, an 820 KiB table it reads whole,
/// so all of it stays resident). Packed relative relocations (DT_RELR; GNU ld 2.38+,
/// glibc 2.36+) store the same in a few KiB.
fn link_args() {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    // A release dp built by scripts/build-dp.sh links the functions it runs at start and
    // on its data path first and together: the kernel maps code by the 64 KiB around each
    // page touched, and scattered over all of dp's code these functions kept most of it
    // resident. The script names the order file (this build's symbol names for the
    // functions proxy/symbol-order.txt lists) in DP_SYMBOL_ORDER_FILE; rustc links with
    // lld on x86_64 Linux, the linker here that takes it.
    println!("cargo:rerun-if-env-changed=DP_SYMBOL_ORDER_FILE");
    let lld = var("CARGO_CFG_TARGET_ARCH") == "x86_64" && var("CARGO_CFG_TARGET_OS") == "linux";
    let order = var("DP_SYMBOL_ORDER_FILE");
    if lld && var("PROFILE") == "release" && !order.is_empty() {
        println!("cargo:rerun-if-changed={order}");
        println!("cargo:rustc-link-arg-bin=dp=-Wl,--symbol-ordering-file={order}");
        // A listed function this build inlined or dropped is no error.
        println!("cargo:rustc-link-arg-bin=dp=-Wl,--no-warn-symbol-ordering");
    }
}
