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
    /// Address of the global CP's KDS (grpcs://host:5685 or grpc://host:5685); set = a
    /// federated zone that syncs with that global.
    #[arg(long = "global-address", env = "KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS")]
    pub global_address: Option<String>,
    /// CA certificate (PEM) the zone trusts for global's KDS server (global's kuma-cp.crt).
    #[arg(long = "kds-root-ca-file", env = "KUMA_MULTIZONE_ZONE_KDS_ROOT_CA_FILE")]
    pub kds_root_ca_file: Option<PathBuf>,
    /// Accept any KDS server certificate (testing only).
    #[arg(long = "kds-tls-skip-verify", env = "KUMA_MULTIZONE_ZONE_KDS_TLS_SKIP_VERIFY", default_value_t = false, action = clap::ArgAction::Set)]
    pub kds_tls_skip_verify: bool,
    /// Global: KDS gRPC port (TLS). 0 = any free port.
    #[arg(long = "kds-port", env = "KUMA_MULTIZONE_GLOBAL_KDS_GRPC_PORT", default_value_t = 5685)]
    pub kds_port: u16,
    /// Global: KDS server certificate (PEM chain) instead of the generated one.
    #[arg(long = "kds-tls-cert-file", env = "KUMA_MULTIZONE_GLOBAL_KDS_TLS_CERT_FILE")]
    pub kds_tls_cert_file: Option<PathBuf>,
    /// Global: private key (PEM) for --kds-tls-cert-file.
    #[arg(long = "kds-tls-key-file", env = "KUMA_MULTIZONE_GLOBAL_KDS_TLS_KEY_FILE")]
    pub kds_tls_key_file: Option<PathBuf>,
    /// Largest KDS message, both ways (Kuma: 10 MiB).
    #[arg(long = "kds-max-msg-size", env = "KUMA_MULTIZONE_GLOBAL_KDS_MAX_MSG_SIZE", default_value_t = 10 * 1024 * 1024)]
    pub kds_max_msg_size: usize,
    /// Global: a zone whose KDS streams stay silent this long shows Offline.
    #[arg(long = "zone-idle-timeout", env = "KUMA_METRICS_ZONE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub zone_idle_timeout: Duration,
    /// First delay before a zone dials global again after a failure (doubles, with jitter).
    #[arg(long = "kds-base-backoff", env = "KUMA_GENERAL_RESILIENT_COMPONENT_BASE_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub kds_base_backoff: Duration,
    /// Longest delay between two dials of global.
    #[arg(long = "kds-max-backoff", env = "KUMA_GENERAL_RESILIENT_COMPONENT_MAX_BACKOFF", default_value = "15s", value_parser = parse_duration)]
    pub kds_max_backoff: Duration,
    /// Range the `.mesh` VIPs are allocated from. A range in 127.0.0.0/8 lets proxies
    /// without transparent proxying bind every VIP (`<vip>:<service VIP port>`).
    #[arg(long = "dns-cidr", env = "KUMA_DNS_SERVER_CIDR", default_value = "240.0.0.0/4")]
    pub dns_cidr: crate::vips::Cidr,
    /// Port of the VIP outbounds (`<service>.mesh:<port>`).
    #[arg(long = "dns-service-vip-port", env = "KUMA_DNS_SERVER_SERVICE_VIP_PORT", default_value_t = 80)]
    pub service_vip_port: u32,
    /// Do not create the `default` Mesh at start-up (global and standalone zones create it).
    #[arg(long = "skip-mesh-creation", env = "KUMA_DEFAULTS_SKIP_MESH_CREATION", default_value_t = false, action = clap::ArgAction::Set)]
    pub skip_mesh_creation: bool,
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
    /// Least time between two rewrites of the zone ingresses' `availableServices` (Kuma's
    /// `multizone.zone.ingressUpdateInterval`): a burst of changes is one rewrite a second.
    #[arg(long = "ingress-update-interval", env = "KUMA_MULTIZONE_ZONE_INGRESS_UPDATE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub ingress_update_interval: Duration,
    /// Least time between two recomputations of the ServiceInsights (Kuma's
    /// `metrics.mesh.minResyncInterval`).
    #[arg(long = "insights-min-resync-interval", env = "KUMA_METRICS_MESH_MIN_RESYNC_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub insights_min_resync_interval: Duration,
    /// Least time between two passes of the `.mesh` VIP allocation (Kuma's
    /// `runtime.universal.vipRefreshInterval`).
    #[arg(long = "vip-refresh-interval", env = "KUMA_RUNTIME_UNIVERSAL_VIP_REFRESH_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub vip_refresh_interval: Duration,
    /// Write {"dp_server": "...", "api": "...", "kds": "...", "ca_cert_file": "..."} here once the servers are bound.
    #[arg(long = "address-file")]
    pub address_file: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreConfig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StoreType {
    /// In memory: one instance, state lost on restart (the default).
    Memory,
    /// PostgreSQL: state survives restarts, several instances share it.
    Postgres,
}

/// Where resources are kept (`KUMA_STORE_*`).
#[derive(Clone, Debug, Args)]
pub struct StoreConfig {
    /// Resource store: memory or postgres.
    #[arg(long = "store-type", env = "KUMA_STORE_TYPE", value_enum, default_value = "memory")]
    pub store_type: StoreType,
    #[command(flatten)]
    pub postgres: PostgresConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { store_type: StoreType::Memory, postgres: PostgresConfig::default() }
    }
}

/// Kuma's `KUMA_STORE_POSTGRES_TLS_MODE` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PgTlsMode {
    /// Plain TCP.
    #[value(name = "disable")]
    Disable,
    /// TLS, any server certificate (libpq's `require`).
    #[value(name = "verifyNone")]
    VerifyNone,
    /// TLS, the server certificate must chain to KUMA_STORE_POSTGRES_TLS_CA_PATH (`verify-ca`).
    #[value(name = "verifyCa")]
    VerifyCa,
    /// As verifyCa, and the certificate must name KUMA_STORE_POSTGRES_HOST (`verify-full`).
    #[value(name = "verifyFull")]
    VerifyFull,
}

/// Connection to PostgreSQL, with Kuma's variables and defaults.
#[derive(Clone, Args)]
pub struct PostgresConfig {
    /// PostgreSQL host.
    #[arg(long = "store-postgres-host", env = "KUMA_STORE_POSTGRES_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// PostgreSQL port.
    #[arg(long = "store-postgres-port", env = "KUMA_STORE_POSTGRES_PORT", default_value_t = 15432)]
    pub port: u16,
    /// PostgreSQL user.
    #[arg(long = "store-postgres-user", env = "KUMA_STORE_POSTGRES_USER", default_value = "kuma")]
    pub user: String,
    /// PostgreSQL password.
    #[arg(
        long = "store-postgres-password",
        env = "KUMA_STORE_POSTGRES_PASSWORD",
        default_value = "kuma",
        hide_default_value = true,
        hide_env_values = true
    )]
    pub password: String,
    /// Database name.
    #[arg(long = "store-postgres-db-name", env = "KUMA_STORE_POSTGRES_DB_NAME", default_value = "kuma")]
    pub db_name: String,
    /// TLS: disable, verifyNone, verifyCa or verifyFull.
    #[arg(
        long = "store-postgres-tls-mode",
        env = "KUMA_STORE_POSTGRES_TLS_MODE",
        value_enum,
        default_value = "disable"
    )]
    pub tls_mode: PgTlsMode,
    /// CA certificate (PEM) the server certificate must chain to (verifyCa, verifyFull).
    #[arg(long = "store-postgres-tls-ca-path", env = "KUMA_STORE_POSTGRES_TLS_CA_PATH")]
    pub tls_ca_path: Option<PathBuf>,
    /// Client certificate (PEM), when the server asks for one.
    #[arg(long = "store-postgres-tls-cert-path", env = "KUMA_STORE_POSTGRES_TLS_CERT_PATH")]
    pub tls_cert_path: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long = "store-postgres-tls-key-path", env = "KUMA_STORE_POSTGRES_TLS_KEY_PATH")]
    pub tls_key_path: Option<PathBuf>,
    /// Largest number of connections this instance opens (besides its change listener); 0 = no limit.
    #[arg(
        long = "store-postgres-max-open-connections",
        env = "KUMA_STORE_POSTGRES_MAX_OPEN_CONNECTIONS",
        default_value_t = 50
    )]
    pub max_open_connections: usize,
    /// Seconds to wait for a connection (and for any one statement).
    #[arg(
        long = "store-postgres-connection-timeout",
        env = "KUMA_STORE_POSTGRES_CONNECTION_TIMEOUT",
        default_value_t = 5
    )]
    pub connection_timeout: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            host: "127.0.0.1".into(),
            port: 15432,
            user: "kuma".into(),
            password: "kuma".into(),
            db_name: "kuma".into(),
            tls_mode: PgTlsMode::Disable,
            tls_ca_path: None,
            tls_cert_path: None,
            tls_key_path: None,
            max_open_connections: 50,
            connection_timeout: 5,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("db_name", &self.db_name)
            .field("tls_mode", &self.tls_mode)
            .field("tls_ca_path", &self.tls_ca_path)
            .field("tls_cert_path", &self.tls_cert_path)
            .field("tls_key_path", &self.tls_key_path)
            .field("max_open_connections", &self.max_open_connections)
            .field("connection_timeout", &self.connection_timeout)
            .finish()
    }
}

impl PostgresConfig {
    /// `host:port/db` for messages (no credentials).
    pub fn describe(&self) -> String {
        format!("PostgreSQL at {}:{}/{}", self.host, self.port, self.db_name)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.connection_timeout.max(1))
    }
}

impl RunConfig {
    /// Defaults as `cp run` with no flags and no environment, but bound to 127.0.0.1 on any
    /// free ports with `work_dir` as work directory (for tests).
    pub fn for_tests(work_dir: PathBuf) -> Self {
        RunConfig {
            mode: Mode::Zone,
            zone_name: "zone-1".into(),
            global_address: None,
            kds_root_ca_file: None,
            kds_tls_skip_verify: false,
            kds_port: 0,
            kds_tls_cert_file: None,
            kds_tls_key_file: None,
            kds_max_msg_size: 10 * 1024 * 1024,
            zone_idle_timeout: Duration::from_secs(300),
            kds_base_backoff: Duration::from_millis(200),
            kds_max_backoff: Duration::from_secs(2),
            skip_mesh_creation: true,
            dns_cidr: crate::vips::Cidr::default(),
            service_vip_port: 80,
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
            ingress_update_interval: Duration::from_secs(1),
            insights_min_resync_interval: Duration::from_secs(1),
            vip_refresh_interval: Duration::from_millis(500),
            address_file: None,
            store: StoreConfig::default(),
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

    /// A zone that syncs with a global control plane (`KUMA_MULTIZONE_ZONE_GLOBAL_ADDRESS` set).
    pub fn is_federated_zone(&self) -> bool {
        !self.is_global() && self.global_address.as_deref().is_some_and(|a| !a.trim().is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreConfig,
    }

    #[test]
    fn the_store_is_memory_unless_told_and_takes_kumas_postgres_settings() {
        let d = Cli::try_parse_from(["cp"]).unwrap().store;
        assert_eq!(d.store_type, StoreType::Memory);
        assert_eq!(
            (d.postgres.host.as_str(), d.postgres.port, d.postgres.db_name.as_str()),
            ("127.0.0.1", 15432, "kuma")
        );
        assert_eq!((d.postgres.max_open_connections, d.postgres.connection_timeout), (50, 5));
        let c = Cli::try_parse_from([
            "cp",
            "--store-type",
            "postgres",
            "--store-postgres-tls-mode",
            "verifyFull",
            "--store-postgres-tls-ca-path",
            "/ca.pem",
            "--store-postgres-password",
            "secret",
        ])
        .unwrap()
        .store;
        assert_eq!(c.store_type, StoreType::Postgres);
        assert_eq!(c.postgres.tls_mode, PgTlsMode::VerifyFull);
        assert!(!format!("{:?}", c.postgres).contains("secret"), "the password must not be printed");
        assert!(Cli::try_parse_from(["cp", "--store-postgres-tls-mode", "require"]).is_err());
    }
}
