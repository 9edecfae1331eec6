//! `cp`: a lightweight control plane speaking Kuma 2.14's protocols, and the library behind
//! the `cp` and `ctl` binaries.
//!
//! * [`components`]: what each mode runs: a zone ([`components::zone`]: DP server with
//!   bootstrap and ADS for its proxies) or global ([`components::global`]: the KDS server
//!   zones dial); both serve the REST API ([`api`]).
//! * [`model`] and [`store`]: Kuma resources, one descriptor per type, and their storage
//!   with typed change events (in memory, or in PostgreSQL shared by several instances,
//!   of which [`leader`] elects the one that runs the reconcilers).
//! * [`kds`]: the multi-zone sync, both sides. [`xds`]: the ADS server and generation.
//! * [`reconcile`]: derived state (availableServices, VIPs, CAs, insights).

pub mod api;
pub mod bootstrap;
pub mod ca;
pub mod components;
pub mod config;
pub mod context;
pub mod dataplanes;
pub mod dpserver;
pub mod gui;
pub mod kds;
pub mod leader;
pub mod lifecycle;
pub mod model;
pub mod reconcile;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod transparent_proxy;
pub mod vips;
pub mod xds;

/// Install the aws-lc-rs rustls provider (idempotent). Call first thing in `main`.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
