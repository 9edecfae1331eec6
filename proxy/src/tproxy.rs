//! Transparent proxying: where a connection that iptables redirected to dp was headed.
//!
//! `REDIRECT` rewrites the destination to dp's capture port and keeps the original in
//! conntrack, which `getsockopt(SO_ORIGINAL_DST)` reads back (Envoy's `original_dst`
//! listener filter does the same).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h) share the number.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of a redirected connection; `None` when it was not
/// redirected (or the kernel cannot say).
pub fn original_dst(stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    let fd = stream.as_raw_fd();
    let dst = if local.is_ipv4() { v4(fd) } else { v6(fd) }?;
    // Not redirected: conntrack answers with the address the connection already has.
    (dst != local).then_some(dst)
}

#[allow(unsafe_code)]
fn v4(fd: libc::c_int) -> Option<SocketAddr> {
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size we pass.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_IP, SO_ORIGINAL_DST, (&raw mut sa).cast(), &mut len) };
    (rc == 0)
        .then(|| SocketAddr::new(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)).into(), u16::from_be(sa.sin_port)))
}

#[allow(unsafe_code)]
fn v6(fd: libc::c_int) -> Option<SocketAddr> {
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size we pass.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_IPV6, SO_ORIGINAL_DST, (&raw mut sa).cast(), &mut len) };
    (rc == 0).then(|| SocketAddr::new(Ipv6Addr::from(sa.sin6_addr.s6_addr).into(), u16::from_be(sa.sin6_port)))
}
