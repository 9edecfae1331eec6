//! `cp run` configuration: Kuma's environment variables, plus flags for tests.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Zone,
    Global,
    /// Deprecated alias of `zone` (Kuma 2.x).
    Standalone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ZoneProxyAuth {
    #[value(name = "zoneToken")]
    ZoneToken,
    #[value(name = "none")]
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DpProxyAuth {
    #[value(name = "dpToken")]
    DpToken,
    #[value(name = "none")]
    None,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::model::parse_duration(s)
}

/// Options of `cp run`. Every flag also reads the Kuma environment variable named in its help;
/// a set environment variable wins over the default, a flag wins over both.
#[derive(Clone, Debug, Args)]
pub struct RunConfig {
    /// Control plane mode: zone or global (standalone = zone).
    #[arg(long, env = "KUMA_MODE", value_enum, default_value = "zone")]
    pub mode: Mode,
    /// Name of this zone (Kuma's default is `default`).
    #[arg(long = "zone", env = "KUMA_MULTIZONE_ZONE_NAME", default_value = "default")]
    pub zone_name: String,
    /// Address of the global CP's KDS (grpcs://host:5685). Accepted; zone<->global sync is not implemented yet.
    #[arg(long = "global-address", env = "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS")]
    pub global_address: Option<String>,
    /// Interface both servers bind to.
    #[arg(long = "bind-address", env = "KUMA_CP_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// DP server port (TLS: POST /bootstrap and gRPC ADS). 0 = any free port.
    #[arg(long = "dp-server-port", env = "KUMA_DP_SERVER_PORT", default_value_t = 5678)]
    pub dp_server_port: u16,
    /// REST API port (plain HTTP). 0 = any free port.
    #[arg(long = "api-port", env = "KUMA_API_SERVER_HTTP_PORT", default_value_t = 5681)]
    pub api_port: u16,
    /// Interface of the REST API (defaults to --bind-address).
    #[arg(long = "api-interface", env = "KUMA_API_SERVER_HTTP_INTERFACE")]
    pub api_interface: Option<IpAddr>,
    /// Work directory: the DP-server CA (`kuma-cp.crt`), its keys. Default ~/.kuma.
    #[arg(long = "work-dir", env = "KUMA_GENERAL_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// DP-server certificate (PEM chain) instead of the generated one.
    #[arg(long = "tls-cert-file", env = "KUMA_GENERAL_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// DP-server private key (PEM) for --tls-cert-file.
    #[arg(long = "tls-key-file", env = "KUMA_GENERAL_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Extra SANs (host names or IPs) of the generated DP-server certificate, comma separated.
    #[arg(long = "tls-san", env = "KUMA_GENERAL_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,
    /// How long a Dataplane/ZoneIngress registered by its stream stays after the stream closes.
    #[arg(long = "deregistration-delay", env = "KUMA_XDS_DATAPLANE_DEREGISTRATION_DELAY", default_value = "10s", value_parser = parse_duration)]
    pub deregistration_delay: Duration,
    /// Authentication of zone proxies (ZoneIngress/ZoneEgress): zoneToken or none.
    #[arg(
        long = "zone-proxy-auth",
        env = "KUMA_DP_SERVER_AUTHN_ZONE_PROXY_TYPE",
        value_enum,
        default_value = "zoneToken"
    )]
    pub zone_proxy_auth: ZoneProxyAuth,
    /// Authentication of data plane proxies: dpToken or none.
    #[arg(long = "dp-proxy-auth", env = "KUMA_DP_SERVER_AUTHN_DP_PROXY_TYPE", value_enum, default_value = "dpToken")]
    pub dp_proxy_auth: DpProxyAuth,
    /// Host the bootstrap tells the proxy to use for ADS (default: the host it used for /bootstrap).
    #[arg(long = "xds-host", env = "KUMA_BOOTSTRAP_SERVER_PARAMS_XDS_HOST")]
    pub xds_host: Option<String>,
    /// Port the bootstrap tells the proxy to use for ADS (default: the DP server port).
    #[arg(long = "xds-port", env = "KUMA_BOOTSTRAP_SERVER_PARAMS_XDS_PORT")]
    pub xds_port: Option<u16>,
    /// Envoy admin port written into bootstraps when the resource does not set one.
    #[arg(long = "admin-port", env = "KUMA_BOOTSTRAP_SERVER_PARAMS_ADMIN_PORT", default_value_t = 9901)]
    pub admin_port: u16,
    /// Debounce of xDS regeneration after a store change.
    #[arg(long = "xds-debounce", env = "KUMA_XDS_DEBOUNCE", default_value = "100ms", value_parser = parse_duration)]
    pub xds_debounce: Duration,
    /// Write {"dp_server": "...", "api": "...", "ca_cert_file": "..."} here once both servers are bound.
    #[arg(long = "address-file")]
    pub address_file: Option<PathBuf>,
}

impl RunConfig {
    /// Defaults as `cp run` with no flags and no environment, but bound to 127.0.0.1 on any
    /// free ports with `work_dir` as work directory (for tests).
    pub fn for_tests(work_dir: PathBuf) -> Self {
        RunConfig {
            mode: Mode::Zone,
            zone_name: "zone-1".into(),
            global_address: None,
            bind_address: IpAddr::from([127, 0, 0, 1]),
            dp_server_port: 0,
            api_port: 0,
            api_interface: None,
            work_dir: Some(work_dir),
            tls_cert_file: None,
            tls_key_file: None,
            tls_sans: Vec::new(),
            deregistration_delay: Duration::from_secs(10),
            zone_proxy_auth: ZoneProxyAuth::ZoneToken,
            dp_proxy_auth: DpProxyAuth::DpToken,
            xds_host: None,
            xds_port: None,
            admin_port: 9901,
            xds_debounce: Duration::from_millis(100),
            address_file: None,
        }
    }

    pub fn work_dir(&self) -> PathBuf {
        self.work_dir.clone().unwrap_or_else(|| {
            std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".kuma")
        })
    }

    pub fn is_global(&self) -> bool {
        self.mode == Mode::Global
    }
}
