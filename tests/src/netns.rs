//! A network namespace joined to this host by a veth pair: a separate "host" for tests
//! that install iptables rules (transparent proxying) without touching the real one.
//! Needs root and iproute2.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;

/// `ip netns add` + a veth pair: `host_ip` on this side, `ns_ip` inside, the namespace's
/// default route through this side. Removed on drop.
pub struct NetNs {
    pub name: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    host_if: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2 (ip)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NetNs {
    /// Panics with the reason when the test cannot make namespaces (not root).
    pub fn new() -> NetNs {
        #[allow(unsafe_code)]
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(root, "this test makes network namespaces and iptables rules: run it as root");
        let id = crate::next_id();
        let n = std::process::id() % 250;
        let name = format!("dp-e2e-{}-{id}", std::process::id());
        let host_if = format!("dpv{}h{id}", std::process::id() % 100000);
        let ns_if = format!("dpv{}n{id}", std::process::id() % 100000);
        let (host_ip, ns_ip) = (
            Ipv4Addr::new(10, 200 + (id % 50) as u8, n as u8, 1),
            Ipv4Addr::new(10, 200 + (id % 50) as u8, n as u8, 2),
        );
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        in_ns(&["link", "set", &ns_if, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        in_ns(&["route", "add", "default", "via", &host_ip.to_string()]);
        // `ip netns exec` bind-mounts this over /etc/resolv.conf for what it runs.
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
        NetNs { name, host_ip, ns_ip, host_if }
    }

    /// The command prefix that runs a program inside.
    pub fn exec(&self) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.name.clone()]
    }

    /// Runs `program args` inside; (success, stdout + stderr).
    pub fn run(&self, program: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip").args(["netns", "exec", &self.name, program]).args(args).output().unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// A TCP listener inside the namespace (bound by a thread that joined it; a socket
    /// stays in the namespace it was made in).
    pub fn listen(&self, addr: SocketAddr) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            #[allow(unsafe_code)]
            // SAFETY: setns on a valid namespace fd; it changes only this thread, which
            // ends right after.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .join()
        .unwrap()
    }
}

impl Default for NetNs {
    fn default() -> Self {
        NetNs::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}
