//! Benchmarks for `dp`: criterion micro-benches (in `benches/`) and the side-by-side
//! harness (`loadgen suite`, driven by `scripts/bench.sh`) comparing dp with Envoy,
//! HAProxy, nginx and a direct connection on the same TLS backends and load; and the
//! client side of the sidecar mTLS benchmark (`mtls`, driven by `scripts/bench-mtls.sh`).

pub mod backend;
pub mod copyproxy;
pub mod hello;
pub mod http_bench;
pub mod load;
pub mod mtls;
pub mod procstat;
pub mod suite;
pub mod targets;
pub mod tls;
