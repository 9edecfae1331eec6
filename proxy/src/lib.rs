//! The `dp` data plane: configuration (xDS resources -> routing snapshot), listeners,
//! TLS-passthrough routing by SNI, the admin API and drain. `main.rs` is a thin CLI.

pub mod accept;
pub mod access_log;
pub mod admin;
pub mod app;
pub mod bootstrap;
pub mod cli;
pub mod conn;
pub mod control;
pub mod copy;
pub mod cp_inputs;
pub mod descriptors;
pub mod dns_proxy;
pub mod drain;
pub mod file_watch;
pub mod filter_state;
pub mod hcm;
pub mod health;
pub mod inspect;
pub mod json_wire;
pub mod listeners;
pub mod match_api;
pub mod matcher;
pub mod metrics_socket;
pub mod outlier;
pub mod reaper;
pub mod resources;
pub mod snapshot;
pub mod splice;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod token_bucket;
pub mod tproxy;
pub mod upstream;
pub mod work_dir;
