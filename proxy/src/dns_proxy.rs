//! The embedded DNS proxy: kuma-dp's `KUMA_DNS_PROXY_PORT` mode (Kuma 2.14 with
//! `feature-embedded-dns`, the only mode in Kuma 3). dp serves it itself, with the
//! records the control plane puts in the dynamic-config listener's `/dns` route.
//!
//! Until the first records arrive every query is forwarded to the host's resolver, as
//! kuma-dp does with its empty map; readiness waits for them (see `app::ready_when`).

use crate::listeners;
use anyhow::Context;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::info;

pub struct DnsProxy {
    table: watch::Sender<Arc<dns::Table>>,
    configured: watch::Sender<bool>,
    pub address: SocketAddr,
}

impl DnsProxy {
    /// Binds UDP and TCP on `0.0.0.0:<port>` (kuma-dp's bind without transparent
    /// proxying), or on `127.0.0.1:<port>` with it (the DNS redirect brings the host's
    /// queries there), and starts serving.
    pub fn start(port: u16, transparent_proxy: bool) -> anyhow::Result<DnsProxy> {
        let ip = if transparent_proxy { Ipv4Addr::LOCALHOST } else { Ipv4Addr::UNSPECIFIED };
        let addr = SocketAddr::from((ip, port));
        let (udp, tcp) = listeners::bind_dns(addr)
            .with_context(|| format!("cannot bind the DNS proxy (--dns-proxy-port, KUMA_DNS_PROXY_PORT) on {addr}"))?;
        let address = udp.local_addr()?;
        let udp = tokio::net::UdpSocket::from_std(udp)?;
        let (table, rx) = watch::channel(Arc::new(dns::Table::new(&[], [], Duration::ZERO)));
        tokio::spawn(dns::serve(udp, Some(tcp), rx, listeners::host_resolvers()));
        info!(%address, "DNS proxy listening (UDP and TCP); forwarding everything until the control plane sends records");
        Ok(DnsProxy { table, configured: watch::channel(false).0, address })
    }

    /// Replaces the records; the next query sees them.
    pub fn update(&self, table: Arc<dns::Table>) {
        let names = table.len();
        self.table.send_replace(table);
        if !self.configured.send_replace(true) {
            info!(names, "DNS proxy: first records received");
        }
    }

    /// Becomes true with the first records.
    pub fn configured(&self) -> watch::Receiver<bool> {
        self.configured.subscribe()
    }
}
