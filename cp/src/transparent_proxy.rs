//! `ctl install transparent-proxy`: the iptables rules that send a host's TCP traffic
//! through its sidecar, in their own chains of the `nat` table, as kumactl lays them out.
//!
//! * Inbound: PREROUTING → `KUMA_MESH_INBOUND` → (excluded ports return) →
//!   `KUMA_MESH_INBOUND_REDIRECT` → REDIRECT to the inbound port (15006).
//! * Outbound: OUTPUT → `KUMA_MESH_OUTBOUND`: excluded ports and the proxy's own user
//!   return (so dp's upstream connections can never loop back into dp), DNS over TCP goes
//!   to the DNS port, loopback returns, everything else → `KUMA_MESH_OUTBOUND_REDIRECT`
//!   → REDIRECT to the outbound port (15001).
//! * DNS over UDP (`--redirect-dns`): OUTPUT → `KUMA_MESH_OUTBOUND_DNS` → REDIRECT port 53
//!   to the DNS port (15053), except the proxy's own queries.
//!
//! iptables here is Debian's `iptables` package, the nf_tables backend (`iptables-nft`):
//! what Debian installs by default, and what kumactl drives too; the rules are the same
//! either way. Installing removes any earlier install first, so running it twice changes
//! nothing; uninstalling removes exactly the chains and jumps it added.

use std::process::Command;

/// Flags of `ctl install transparent-proxy`, kumactl's names and defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The user dp runs as; its traffic is never redirected.
    pub uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub redirect_dns: bool,
    pub dns_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub ip_family: IpFamily,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamily {
    Ipv4,
    DualStack,
}

const CHAINS: [&str; 5] = [
    "KUMA_MESH_INBOUND",
    "KUMA_MESH_INBOUND_REDIRECT",
    "KUMA_MESH_OUTBOUND",
    "KUMA_MESH_OUTBOUND_REDIRECT",
    "KUMA_MESH_OUTBOUND_DNS",
];

/// The jumps from the built-in chains, as `iptables -t nat` arguments after -A/-D.
fn jumps(cfg: &Config) -> Vec<Vec<String>> {
    let mut v = vec![
        args(&["PREROUTING", "-p", "tcp", "-j", "KUMA_MESH_INBOUND"]),
        args(&["OUTPUT", "-p", "tcp", "-j", "KUMA_MESH_OUTBOUND"]),
    ];
    if cfg.redirect_dns {
        v.push(args(&["OUTPUT", "-p", "udp", "-j", "KUMA_MESH_OUTBOUND_DNS"]));
    }
    v
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// Every `iptables -t nat` command of an install, for one IP family.
pub fn rules(cfg: &Config, v6: bool) -> Vec<Vec<String>> {
    let loopback = if v6 { "::1/128" } else { "127.0.0.1/32" };
    let uid = cfg.uid.to_string();
    let mut r: Vec<Vec<String>> = CHAINS.iter().map(|c| args(&["-N", c])).collect();
    let redirect = |chain: &str, proto: &str, dport: Option<&str>, to: u16| {
        let mut a = args(&["-A", chain, "-p", proto]);
        if let Some(d) = dport {
            a.extend(args(&["--dport", d]));
        }
        a.extend(args(&["-j", "REDIRECT", "--to-ports", &to.to_string()]));
        a
    };
    r.push(redirect("KUMA_MESH_INBOUND_REDIRECT", "tcp", None, cfg.inbound_port));
    r.push(redirect("KUMA_MESH_OUTBOUND_REDIRECT", "tcp", None, cfg.outbound_port));
    for p in &cfg.exclude_inbound_ports {
        r.push(args(&["-A", "KUMA_MESH_INBOUND", "-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"]));
    }
    r.push(args(&["-A", "KUMA_MESH_INBOUND", "-p", "tcp", "-j", "KUMA_MESH_INBOUND_REDIRECT"]));
    for p in &cfg.exclude_outbound_ports {
        r.push(args(&["-A", "KUMA_MESH_OUTBOUND", "-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"]));
    }
    r.push(args(&["-A", "KUMA_MESH_OUTBOUND", "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]));
    if cfg.redirect_dns {
        r.push(redirect("KUMA_MESH_OUTBOUND", "tcp", Some("53"), cfg.dns_port));
        r.push(args(&["-A", "KUMA_MESH_OUTBOUND_DNS", "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]));
        r.push(redirect("KUMA_MESH_OUTBOUND_DNS", "udp", Some("53"), cfg.dns_port));
    }
    r.push(args(&["-A", "KUMA_MESH_OUTBOUND", "-d", loopback, "-j", "RETURN"]));
    r.push(args(&["-A", "KUMA_MESH_OUTBOUND", "-j", "KUMA_MESH_OUTBOUND_REDIRECT"]));
    for j in jumps(cfg) {
        let mut a = vec!["-A".to_string()];
        a.extend(j);
        r.push(a);
    }
    r
}

fn families(cfg: &Config) -> Vec<(bool, &'static str)> {
    match cfg.ip_family {
        IpFamily::Ipv4 => vec![(false, "iptables")],
        IpFamily::DualStack => vec![(false, "iptables"), (true, "ip6tables")],
    }
}

/// The commands as a shell would run them (`--dry-run`).
pub fn script(cfg: &Config) -> String {
    let mut out = String::new();
    for (v6, bin) in families(cfg) {
        for r in rules(cfg, v6) {
            out.push_str(&format!("{bin} -t nat {}\n", r.join(" ")));
        }
    }
    out
}

fn run(bin: &str, a: &[String]) -> Result<(), String> {
    let out = Command::new(bin)
        .args(["-w", "-t", "nat"])
        .args(a)
        .output()
        .map_err(|e| format!("cannot run {bin}: {e} (install Debian's iptables package; ctl must run as root)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{bin} -t nat {}: {}", a.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Installs the rules (removing an earlier install first).
pub fn install(cfg: &Config) -> Result<(), String> {
    uninstall(cfg.ip_family);
    for (v6, bin) in families(cfg) {
        for r in rules(cfg, v6) {
            if let Err(e) = run(bin, &r) {
                uninstall(cfg.ip_family);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Removes every jump and chain an install adds; what is not there is skipped.
pub fn uninstall(family: IpFamily) {
    let cfg = Config {
        uid: 0,
        inbound_port: 0,
        outbound_port: 0,
        redirect_dns: true,
        dns_port: 0,
        exclude_inbound_ports: vec![],
        exclude_outbound_ports: vec![],
        ip_family: family,
    };
    for (_, bin) in families(&cfg) {
        for j in jumps(&cfg) {
            let mut a = vec!["-D".to_string()];
            a.extend(j);
            // A jump added twice by hand is removed twice.
            while run(bin, &a).is_ok() {}
        }
        for c in CHAINS {
            let _ = run(bin, &args(&["-F", c]));
        }
        for c in CHAINS {
            let _ = run(bin, &args(&["-X", c]));
        }
    }
}

/// A user name from /etc/passwd, or a numeric uid.
pub fn resolve_user(user: &str) -> Result<u32, String> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("cannot read /etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(user)).then(|| f.nth(1).and_then(|uid| uid.parse().ok())).flatten()
        })
        .ok_or_else(|| format!("--kuma-dp-user {user}: no such user (give a user name or a uid)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            uid: 5678,
            inbound_port: 15006,
            outbound_port: 15001,
            redirect_dns: true,
            dns_port: 15053,
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            ip_family: IpFamily::Ipv4,
        }
    }

    #[test]
    fn the_proxys_own_traffic_returns_before_any_redirect() {
        let s = script(&cfg());
        let line = |pat: &str| s.lines().position(|l| l.contains(pat)).unwrap_or_else(|| panic!("{pat} in\n{s}"));
        let own = line("KUMA_MESH_OUTBOUND -m owner --uid-owner 5678 -j RETURN");
        assert!(own < line("KUMA_MESH_OUTBOUND -p tcp --dport 53 -j REDIRECT --to-ports 15053"));
        assert!(own < line("KUMA_MESH_OUTBOUND -j KUMA_MESH_OUTBOUND_REDIRECT"));
        assert!(line("--dport 5432 -j RETURN") < own);
        assert!(line("KUMA_MESH_INBOUND -p tcp --dport 22 -j RETURN") < line("-j KUMA_MESH_INBOUND_REDIRECT"));
        assert!(s.contains("iptables -t nat -A KUMA_MESH_OUTBOUND_DNS -p udp --dport 53 -j REDIRECT --to-ports 15053"));
        assert!(s.ends_with("iptables -t nat -A OUTPUT -p udp -j KUMA_MESH_OUTBOUND_DNS\n"), "{s}");
        let dual = script(&Config { ip_family: IpFamily::DualStack, ..cfg() });
        assert!(dual.contains("ip6tables -t nat -A KUMA_MESH_OUTBOUND -d ::1/128 -j RETURN"));
    }

    #[test]
    fn users_resolve_by_name_or_number() {
        assert_eq!(resolve_user("1234"), Ok(1234));
        assert_eq!(resolve_user("root"), Ok(0));
        assert!(resolve_user("no-such-user-here").unwrap_err().contains("no such user"));
    }
}
