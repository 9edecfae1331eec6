//! Kuma's multi-zone sync protocol (KDS) and the Kuma resource messages it carries,
//! generated at build time from our own .proto files under `api/` (Kuma 2.14's packages,
//! message names, field names and numbers, so the bytes match a real Kuma's).
//!
//! * [`kuma::mesh::v1alpha1`]: `KumaResource`, the KDS services `GlobalKDSService` and
//!   `KDSSyncService` (tonic clients and servers), and the `kuma.mesh.v1alpha1` resource
//!   specs (Mesh, Dataplane, ZoneIngress, ...).
//! * [`kuma::system::v1alpha1`]: Secret, Zone, ZoneInsight, Config, DataSource, ...
//! * [`FILE_DESCRIPTOR_SET`]: the descriptors of the resource messages, for proto3 JSON
//!   transcoding with prost-reflect.
//!
//! Envoy messages and google.protobuf well-known types are envoy-types' own types. Proto
//! maps are `BTreeMap`s, so prost encodes their entries sorted by key as Go's deterministic
//! marshal does (Kuma hashes those bytes into KDS resource versions); unlike Go, prost leaves
//! a default key or value (`""`, `0`) out of a map entry.

/// Generated code for the `kuma.*` proto packages. (No lint is allowed here: today the
/// generated code trips none of the workspace's rustc and clippy lints.)
pub mod kuma {
    /// The `kuma.mesh.*` packages.
    pub mod mesh {
        /// Proto package `kuma.mesh.v1alpha1`.
        pub mod v1alpha1 {
            tonic::include_proto!("kuma.mesh.v1alpha1");
        }
    }
    /// The `kuma.system.*` packages.
    pub mod system {
        /// Proto package `kuma.system.v1alpha1`.
        pub mod v1alpha1 {
            tonic::include_proto!("kuma.system.v1alpha1");
        }
    }
}

/// Encoded `google.protobuf.FileDescriptorSet` of every `api/` file except the KDS services
/// (`api/mesh/v1alpha1/kds_services.proto`), plus the `google/protobuf/*.proto` files they
/// import; no Envoy file. Decode with `prost_reflect::DescriptorPool::decode`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kuma_resources.bin"));
