//! `cp`: a lightweight control plane speaking Kuma 2.14's protocols (REST API, zone and
//! dataplane tokens, `POST /bootstrap`, SotW and Delta ADS) for zone ingresses, and the
//! library behind the `cp` and `ctl` binaries.

pub mod api;
pub mod bootstrap;
pub mod ca;
pub mod config;
pub mod context;
pub mod dpserver;
pub mod model;
pub mod server;
pub mod store;
pub mod tls;
pub mod tokens;
pub mod vips;
pub mod xds;

/// Install the aws-lc-rs rustls provider (idempotent). Call first thing in `main`.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
