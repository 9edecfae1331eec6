//! `.mesh` DNS server for `dp`: a name table with RFC 1123 aliases, A/AAAA answers,
//! forwarding of every other name to the upstream resolvers, over UDP and TCP.
//! Knows nothing about xDS: the caller builds a [`Table`] per config version and
//! publishes it through a `tokio::sync::watch` channel.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};
//! let table = dns::Table::new(
//!     &["mesh".to_string()],
//!     [("backend_kuma-demo_svc_8080.mesh".to_string(), vec!["240.0.0.3".parse::<IpAddr>().unwrap()])],
//!     Duration::from_secs(30),
//! );
//! let (tx, rx) = tokio::sync::watch::channel(Arc::new(table));
//! let udp = tokio::net::UdpSocket::bind("127.0.0.1:15053").await?;
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:15053").await?;
//! let upstream = dns::Upstream::from_resolv_conf(Path::new("/etc/resolv.conf"))?;
//! let server = tokio::spawn(dns::serve(udp, Some(tcp), rx, upstream));
//! // later: tx.send(Arc::new(new_table)); to stop: server.abort();
//! # drop((tx, server)); Ok(()) }
//! ```
//!
//! The wire format is handled in this crate (one question, A/AAAA/OPT): [`answer`]
//! allocates only its reply buffer for a table hit. See [`answer`] for the exact
//! behaviour per query.

mod server;
mod table;
mod wire;

pub use server::{DEFAULT_UPSTREAM_TIMEOUT, Limits, Upstream, serve, serve_with};
pub use table::Table;
pub use wire::{MAX_UDP, MIN_UDP, Reply, Transport, answer};
