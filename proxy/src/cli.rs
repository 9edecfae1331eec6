//! `dp` command line: kuma-dp 2.14's `run` flags and `KUMA_*` variables (a set
//! variable overrides the flag, as in kuma-dp), plus `--xds-file` and the admin flags.

use clap::{ArgAction, Args, Parser, Subcommand};
use kuma_model::duration::parse_duration;
use kuma_model::proxy::ProxyType;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "dp",
    version,
    about = "Data plane for multi-zone service meshes: zone ingress, zone egress and sidecars"
)]
pub struct Cli {
    /// Log level: trace, debug, info, warn, error or off.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Print the version.
    Version,
}

#[derive(Debug, Clone, Args)]
#[command(args_override_self = true)] // a repeated flag: the last one wins, as with kuma-dp
pub struct RunArgs {
    /// dataplane, ingress or egress [env: KUMA_DATAPLANE_PROXY_TYPE]
    #[arg(long, default_value = "dataplane")]
    pub proxy_type: String,
    /// Control plane URL, http(s)://host:5678 [env: KUMA_CONTROL_PLANE_URL]
    #[arg(long, default_value = "https://localhost:5678")]
    pub cp_address: String,
    /// PEM file of the CA that signed the control plane's certificate [env: KUMA_CONTROL_PLANE_CA_CERT_FILE]
    #[arg(long)]
    pub ca_cert_file: Option<PathBuf>,
    /// Do not verify the control plane's certificate [env: KUMA_CONTROL_PLANE_TLS_SKIP_VERIFY]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    pub skip_verify: bool,
    /// Name of the data plane proxy [env: KUMA_DATAPLANE_NAME]
    #[arg(long)]
    pub name: Option<String>,
    /// Mesh of the data plane proxy [env: KUMA_DATAPLANE_MESH]
    #[arg(long)]
    pub mesh: Option<String>,
    /// How long live connections may take to finish after SIGTERM [env: KUMA_DATAPLANE_DRAIN_TIME]
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_time: Duration,
    /// File with the data plane (or zone) token [env: KUMA_DATAPLANE_RUNTIME_TOKEN_PATH]
    #[arg(long)]
    pub dataplane_token_file: Option<PathBuf>,
    /// The token itself [env: KUMA_DATAPLANE_RUNTIME_TOKEN]
    #[arg(long)]
    pub dataplane_token: Option<String>,
    /// Dataplane / ZoneIngress / ZoneEgress resource, YAML or JSON template [env: KUMA_DATAPLANE_RUNTIME_RESOURCE]
    #[arg(long)]
    pub dataplane: Option<String>,
    /// File with that resource; `-` reads standard input [env: KUMA_DATAPLANE_RUNTIME_RESOURCE_PATH]
    #[arg(long, short = 'd')]
    pub dataplane_file: Option<PathBuf>,
    /// Template variable `key=value` for the resource (repeatable)
    #[arg(long, short = 'v')]
    pub dataplane_var: Vec<String>,
    /// Serve `.mesh` DNS [env: KUMA_DNS_ENABLED]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "true")]
    pub dns_enabled: bool,
    /// Port of the `.mesh` DNS listener the control plane configures (Kuma 2.14's
    /// Envoy DNS port) [env: KUMA_DNS_ENVOY_DNS_PORT]
    #[arg(long, default_value_t = 15054)]
    pub dns_envoy_port: u16,
    /// Port of the embedded DNS proxy (kuma-dp's, on 0.0.0.0, UDP and TCP), fed by the
    /// control plane's dynamic-config listener; 0 leaves `.mesh` DNS to the `dns_filter`
    /// listener on --dns-envoy-port [env: KUMA_DNS_PROXY_PORT]
    #[arg(long, default_value_t = 0)]
    pub dns_proxy_port: u16,
    /// Worker threads; 0 uses every core [env: KUMA_DATAPLANE_RUNTIME_CONCURRENCY]
    #[arg(long, default_value_t = 0)]
    pub concurrency: usize,
    /// Working directory [env: KUMA_DATAPLANE_RUNTIME_WORK_DIR]
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Accepted for kuma-dp compatibility; dp runs no Envoy [env: KUMA_DATAPLANE_RUNTIME_BINARY_PATH]
    #[arg(long, hide = true)]
    pub binary_path: Option<String>,
    /// Serve the Envoy resources in this YAML/JSON file instead of asking a control
    /// plane; the file is re-applied when it changes.
    #[arg(long)]
    pub xds_file: Option<PathBuf>,
    /// Address of the admin API.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_address: SocketAddr,
    /// Write the admin API's bound address to this file (useful with port 0).
    #[arg(long)]
    pub admin_address_path: Option<PathBuf>,
    /// Port of the readiness reporter (`GET /ready`) on the admin address's IP;
    /// 0 picks a free port [env: KUMA_READINESS_PORT]
    #[arg(long, default_value_t = 9902)]
    pub readiness_port: u16,
    /// Inline PEM of the control plane's CA; wins over --ca-cert-file [env: KUMA_CONTROL_PLANE_CA_CERT]
    #[arg(long, hide = true)]
    pub ca_cert: Option<String>,
    /// Wait between bootstrap attempts [env: KUMA_CONTROL_PLANE_RETRY_BACKOFF]
    #[arg(long, hide = true, default_value = "3s", value_parser = parse_duration)]
    pub retry_backoff: Duration,
    /// Give up bootstrapping after this long [env: KUMA_CONTROL_PLANE_RETRY_MAX_DURATION]
    #[arg(long, hide = true, default_value = "5m", value_parser = parse_duration)]
    pub retry_max_duration: Duration,
    /// xDS variant: GRPC (state of the world) or DELTA_GRPC
    /// [env: KUMA_DATAPLANE_RUNTIME_ENVOY_XDS_TRANSPORT_PROTOCOL_VARIANT]
    #[arg(long, hide = true, default_value = "GRPC")]
    pub xds_variant: String,
    /// Bind the outbounds of every `.mesh` VIP on this host (the control plane's VIP range
    /// must be in 127.0.0.0/8), so apps reach `<service>.mesh` without transparent
    /// proxying [env: KUMA_DATAPLANE_RUNTIME_BIND_OUTBOUNDS]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    pub bind_outbounds: bool,
    /// Most downstream connections at once over every listener; the ones above are closed
    /// and counted as `downstream_global_cx_overflow` (Envoy's overload manager
    /// `global_downstream_max_connections`). 0: no limit
    /// [env: KUMA_DATAPLANE_RUNTIME_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS]
    #[arg(long, default_value_t = 0)]
    pub global_downstream_max_connections: u64,
    /// Transparent proxying is set up on this host (`ctl install transparent-proxy`): tell
    /// the control plane (it generates the capture listeners) and bind the DNS proxy on
    /// 127.0.0.1, where the DNS redirect sends the host's queries
    #[arg(long)]
    pub transparent_proxy: bool,
}

impl RunArgs {
    /// Applies the `KUMA_*` environment variables over the flags, as kuma-dp does.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let bad = |var: &str, v: &str, what: &str| format!("environment variable {var}={v:?} is not {what}");
        macro_rules! string {
            ($field:expr, $var:literal) => {
                if let Some(v) = get($var) {
                    $field = v.into();
                }
            };
        }
        macro_rules! opt {
            ($field:expr, $var:literal) => {
                if let Some(v) = get($var).filter(|v| !v.is_empty()) {
                    $field = Some(v.into());
                }
            };
        }
        macro_rules! parsed {
            ($field:expr, $var:literal, $parse:expr, $what:literal) => {
                if let Some(v) = get($var) {
                    $field = $parse(&v).map_err(|_| bad($var, &v, $what))?;
                }
            };
        }
        string!(self.proxy_type, "KUMA_DATAPLANE_PROXY_TYPE");
        string!(self.cp_address, "KUMA_CONTROL_PLANE_URL");
        opt!(self.ca_cert_file, "KUMA_CONTROL_PLANE_CA_CERT_FILE");
        parsed!(self.skip_verify, "KUMA_CONTROL_PLANE_TLS_SKIP_VERIFY", parse_bool, "true or false");
        opt!(self.name, "KUMA_DATAPLANE_NAME");
        opt!(self.mesh, "KUMA_DATAPLANE_MESH");
        parsed!(self.drain_time, "KUMA_DATAPLANE_DRAIN_TIME", parse_duration, "a duration like 30s");
        opt!(self.dataplane_token_file, "KUMA_DATAPLANE_RUNTIME_TOKEN_PATH");
        opt!(self.dataplane_token, "KUMA_DATAPLANE_RUNTIME_TOKEN");
        opt!(self.dataplane, "KUMA_DATAPLANE_RUNTIME_RESOURCE");
        opt!(self.dataplane_file, "KUMA_DATAPLANE_RUNTIME_RESOURCE_PATH");
        parsed!(self.dns_enabled, "KUMA_DNS_ENABLED", parse_bool, "true or false");
        parsed!(self.dns_envoy_port, "KUMA_DNS_ENVOY_DNS_PORT", str::parse::<u16>, "a port number");
        parsed!(self.dns_proxy_port, "KUMA_DNS_PROXY_PORT", str::parse::<u16>, "a port number");
        parsed!(self.concurrency, "KUMA_DATAPLANE_RUNTIME_CONCURRENCY", str::parse::<usize>, "a number");
        opt!(self.work_dir, "KUMA_DATAPLANE_RUNTIME_WORK_DIR");
        opt!(self.binary_path, "KUMA_DATAPLANE_RUNTIME_BINARY_PATH");
        parsed!(self.readiness_port, "KUMA_READINESS_PORT", str::parse::<u16>, "a port number");
        opt!(self.ca_cert, "KUMA_CONTROL_PLANE_CA_CERT");
        parsed!(self.retry_backoff, "KUMA_CONTROL_PLANE_RETRY_BACKOFF", parse_duration, "a duration like 3s");
        parsed!(self.retry_max_duration, "KUMA_CONTROL_PLANE_RETRY_MAX_DURATION", parse_duration, "a duration like 5m");
        string!(self.xds_variant, "KUMA_DATAPLANE_RUNTIME_ENVOY_XDS_TRANSPORT_PROTOCOL_VARIANT");
        parsed!(self.bind_outbounds, "KUMA_DATAPLANE_RUNTIME_BIND_OUTBOUNDS", parse_bool, "true or false");
        parsed!(
            self.global_downstream_max_connections,
            "KUMA_DATAPLANE_RUNTIME_GLOBAL_DOWNSTREAM_MAX_CONNECTIONS",
            str::parse::<u64>,
            "a number"
        );
        Ok(())
    }

    /// The embedded DNS proxy runs: DNS on, a port given, and a sidecar (kuma-dp runs no
    /// DNS server for zone proxies).
    pub fn embedded_dns(&self) -> bool {
        self.dns_enabled && self.dns_proxy_port != 0 && self.proxy() == ProxyType::Dataplane
    }

    /// `--proxy-type`, once [`RunArgs::validate`] accepted it.
    pub fn proxy(&self) -> ProxyType {
        self.proxy_type.parse().unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.proxy_type.is_empty() || self.proxy_type.parse::<ProxyType>().is_err() {
            return Err(format!("--proxy-type {:?} is not valid; use dataplane, ingress or egress", self.proxy_type));
        }
        if !["", "GRPC", "DELTA_GRPC"].contains(&self.xds_variant.as_str()) {
            return Err(format!(
                "KUMA_DATAPLANE_RUNTIME_ENVOY_XDS_TRANSPORT_PROTOCOL_VARIANT {:?} is not valid; use GRPC or DELTA_GRPC",
                self.xds_variant
            ));
        }
        if self.drain_time.is_zero() {
            return Err("--drain-time must be greater than 0".into());
        }
        Ok(())
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" | "1" | "TRUE" | "True" | "t" | "T" => Ok(true),
        "false" | "0" | "FALSE" | "False" | "f" | "F" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_overrides_flags() {
        let cli = Cli::parse_from(["dp", "run", "--proxy-type", "ingress", "--drain-time", "5s"]);
        let Command::Run(mut args) = cli.command else { panic!() };
        let env = |k: &str| match k {
            "KUMA_DATAPLANE_PROXY_TYPE" => Some("egress".to_string()),
            "KUMA_READINESS_PORT" => Some("0".to_string()),
            _ => None,
        };
        args.apply_env(env).unwrap();
        assert_eq!((args.proxy_type.as_str(), args.readiness_port), ("egress", 0));
        assert_eq!(args.drain_time, Duration::from_secs(5));
        let e = args.apply_env(|k| (k == "KUMA_DATAPLANE_DRAIN_TIME").then(|| "soon".into())).unwrap_err();
        assert!(e.contains("KUMA_DATAPLANE_DRAIN_TIME"), "{e}");
    }
}
