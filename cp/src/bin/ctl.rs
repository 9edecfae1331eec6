//! `ctl`: a small kumactl for the `cp` REST API.
//!
//! The API address comes from `--api-address` or `CTL_API_ADDRESS`
//! (default `http://localhost:5681`).

use std::io::Read;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use cp::model::{MeshSpec, Resource, ResourceType, parse_documents};

#[derive(Parser)]
#[command(name = "ctl", version, about = "CLI for the cp control plane (a small kumactl)")]
struct Cli {
    /// REST API of the control plane.
    #[arg(long = "api-address", env = "CTL_API_ADDRESS", default_value = "http://localhost:5681", global = true)]
    api_address: String,
    /// Mesh for mesh-scoped commands.
    #[arg(short = 'm', long = "mesh", default_value = "default", global = true)]
    mesh: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create or update resources from a YAML/JSON file (`-` = stdin; several documents separated by ---).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// List or show resources: meshes, dataplanes, zone-ingresses, zone-egresses, zones (singular + NAME shows one).
    Get {
        kind: String,
        name: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Delete a resource: mesh, dataplane, zone, zone-ingress, zone-egress.
    Delete { kind: String, name: String },
    /// Generate tokens.
    #[command(subcommand)]
    Generate(Generate),
    /// Inspect computed state.
    #[command(subcommand)]
    Inspect(Inspect),
    /// Install host components (transparent proxying's iptables rules).
    #[command(subcommand)]
    Install(Install),
    /// Remove what `install` added.
    #[command(subcommand)]
    Uninstall(Uninstall),
}

#[derive(Subcommand)]
enum Install {
    /// Redirect this host's (or network namespace's) TCP traffic, and DNS, through dp.
    TransparentProxy(TproxyArgs),
}

#[derive(Subcommand)]
enum Uninstall {
    /// Remove the transparent-proxy rules.
    TransparentProxy {
        #[arg(long = "ip-family-mode", default_value = "dualstack", value_parser = ["ipv4", "dualstack"])]
        ip_family_mode: String,
    },
}

#[derive(clap::Args)]
struct TproxyArgs {
    /// The user dp runs as (name or uid): its traffic is never redirected.
    #[arg(long = "kuma-dp-user", default_value = "kuma-dp")]
    kuma_dp_user: String,
    /// The uid dp runs as (wins over --kuma-dp-user).
    #[arg(long = "kuma-dp-uid")]
    kuma_dp_uid: Option<u32>,
    #[arg(long = "redirect-inbound-port", default_value_t = 15006)]
    redirect_inbound_port: u16,
    #[arg(long = "redirect-outbound-port", default_value_t = 15001)]
    redirect_outbound_port: u16,
    /// Send DNS queries (port 53) to dp's DNS proxy.
    #[arg(long = "redirect-dns")]
    redirect_dns: bool,
    #[arg(long = "redirect-dns-port", default_value_t = 15053)]
    redirect_dns_port: u16,
    /// Inbound ports not redirected (comma-separated).
    #[arg(long = "exclude-inbound-ports", value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound ports not redirected (comma-separated).
    #[arg(long = "exclude-outbound-ports", value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    #[arg(long = "ip-family-mode", default_value = "dualstack", value_parser = ["ipv4", "dualstack"])]
    ip_family_mode: String,
    /// Print the iptables commands instead of running them.
    #[arg(long = "dry-run")]
    dry_run: bool,
}

fn ip_family(mode: &str) -> cp::transparent_proxy::IpFamily {
    if mode == "ipv4" { cp::transparent_proxy::IpFamily::Ipv4 } else { cp::transparent_proxy::IpFamily::DualStack }
}

/// `install transparent-proxy` / `uninstall transparent-proxy`: local, no control plane.
fn tproxy(cmd: &Cmd) -> Option<anyhow::Result<()>> {
    use cp::transparent_proxy as tp;
    match cmd {
        Cmd::Install(Install::TransparentProxy(a)) => Some((|| {
            let uid = match a.kuma_dp_uid {
                Some(u) => u,
                None => tp::resolve_user(&a.kuma_dp_user).map_err(anyhow::Error::msg)?,
            };
            let cfg = tp::Config {
                uid,
                inbound_port: a.redirect_inbound_port,
                outbound_port: a.redirect_outbound_port,
                redirect_dns: a.redirect_dns,
                dns_port: a.redirect_dns_port,
                exclude_inbound_ports: a.exclude_inbound_ports.clone(),
                exclude_outbound_ports: a.exclude_outbound_ports.clone(),
                ip_family: ip_family(&a.ip_family_mode),
            };
            if a.dry_run {
                print!("{}", tp::script(&cfg));
                return Ok(());
            }
            tp::install(&cfg).map_err(anyhow::Error::msg)?;
            println!(
                "transparent proxy set up (dp user uid {uid}; inbound -> {}, outbound -> {}{})",
                cfg.inbound_port,
                cfg.outbound_port,
                if cfg.redirect_dns { format!(", DNS -> {}", cfg.dns_port) } else { String::new() }
            );
            Ok(())
        })()),
        Cmd::Uninstall(Uninstall::TransparentProxy { ip_family_mode }) => {
            tp::uninstall(ip_family(ip_family_mode));
            println!("transparent proxy rules removed");
            Some(Ok(()))
        }
        _ => None,
    }
}

#[derive(Subcommand)]
enum Generate {
    /// Token for zone proxies (ZoneIngress/ZoneEgress).
    ZoneToken {
        #[arg(long)]
        zone: String,
        /// ingress and/or egress (repeatable; default both).
        #[arg(long = "scope")]
        scope: Vec<String>,
        /// Lifetime, e.g. 24h, 720h (default 10 years, as Kuma).
        #[arg(long = "valid-for", default_value = "")]
        valid_for: String,
    },
    /// Token for a data plane proxy.
    DataplaneToken {
        #[arg(long)]
        name: Option<String>,
        /// Tag the token is bound to, k=v1,v2 (repeatable).
        #[arg(long = "tag")]
        tag: Vec<String>,
        #[arg(long = "proxy-type", default_value = "")]
        proxy_type: String,
        #[arg(long = "valid-for", default_value = "")]
        valid_for: String,
    },
}

#[derive(Subcommand)]
enum Inspect {
    /// Services of a mesh with their Dataplane counts.
    Services,
    /// Zones with their KDS connection status (ask the global control plane).
    Zones {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Zone ingresses with their connection status.
    #[command(name = "zone-ingresses", alias = "zoneingresses")]
    ZoneIngresses {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Zone egresses with their connection status.
    #[command(name = "zone-egresses", alias = "zoneegresses")]
    ZoneEgresses {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
    /// Data plane proxies of a mesh with their connection status.
    Dataplanes {
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: Output,
    },
}

struct Api {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Api {
    fn new(base: &str) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            bail!("--api-address {base:?} must start with http:// (the REST API is plain HTTP on port 5681)");
        }
        Ok(Api { base, client: Client::builder(TokioExecutor::new()).build_http() })
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        ctype: &str,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let uri = format!("{}{path}", self.base);
        let req = hyper::Request::builder()
            .method(method)
            .uri(&uri)
            .header("content-type", ctype)
            .header("accept", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .with_context(|| format!("invalid request URL {uri}"))?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(60), self.client.request(req))
            .await
            .map_err(|_| anyhow!("the control plane at {} did not answer within 60s", self.base))?
            .map_err(|e| anyhow!("cannot reach the control plane at {} ({e}); is `cp run` running? (set --api-address or CTL_API_ADDRESS)", self.base))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.context("reading the response")?.to_bytes().to_vec();
        Ok((status, body))
    }

    /// Call and turn non-2xx into the API's message.
    async fn ok(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<Vec<u8>> {
        let (status, body) = self.call(method, path, body, "application/json").await?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        Err(anyhow!(api_error(status, &body)))
    }

    async fn json(&self, path: &str) -> anyhow::Result<Value> {
        let b = self.ok("GET", path, None).await?;
        serde_json::from_slice(&b).context("the control plane answered with invalid JSON")
    }
}

fn api_error(status: u16, body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        let title = v["title"].as_str().unwrap_or("request failed");
        let detail = v["detail"].as_str().or(v["details"].as_str()).unwrap_or("");
        let causes: Vec<String> = v["causes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| format!("{}: {}", c["field"].as_str().unwrap_or(""), c["message"].as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let mut s = format!("{title} ({status})");
        if !detail.is_empty() {
            s.push_str(&format!(": {detail}"));
        }
        if !causes.is_empty() {
            s.push_str(&format!(" [{}]", causes.join("; ")));
        }
        return s;
    }
    let text = String::from_utf8_lossy(body);
    format!("the control plane refused the request ({status}): {}", text.trim())
}

fn resource_path(rtype: ResourceType, mesh: &str, name: &str) -> String {
    if rtype.is_mesh_scoped() {
        format!("/meshes/{mesh}/{}/{name}", rtype.plural())
    } else {
        format!("/{}/{name}", rtype.plural())
    }
}

/// A kind as kumactl spells it: the REST plural (`zoneingresses`, `zone-ingresses`,
/// `traffic-permissions`) lists, the singular (`zone-ingress`, `meshtimeout`) names one.
fn kind_of(kind: &str) -> anyhow::Result<(ResourceType, bool)> {
    if let Some(t) = ResourceType::from_plural(kind) {
        return Ok((t, true));
    }
    let flat = kind.replace('-', "");
    if let Some(t) = ResourceType::ALL.iter().find(|t| t.name().to_lowercase() == flat) {
        return Ok((*t, false));
    }
    bail!(
        "unknown resource kind {kind:?}: use meshes, dataplanes, zone-ingresses, zone-egresses, zones, secrets, \
         traffic-permissions, meshtrafficpermissions, ... (or the singular with a name)"
    )
}

/// Time since an RFC 3339 time, as kubectl prints it (`42s`, `5m`, `2h`, `3d`); `-` when unset.
fn age(creation: &str) -> String {
    ago(creation).unwrap_or_else(|| "-".into())
}

fn ago(time: &str) -> Option<String> {
    let t = cp::model::parse_rfc3339(time)?;
    let s = cp::model::now_unix().saturating_sub(t);
    Some(match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    })
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", s.join("   ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn table_row(rtype: ResourceType, v: &Value) -> Vec<String> {
    let r = Resource::from_json(v).unwrap_or_else(|_| Resource::new(rtype, "", ""));
    let created = v["creationTime"].as_str().unwrap_or("");
    match rtype {
        ResourceType::Mesh => {
            let spec: MeshSpec = r.typed().unwrap_or_default();
            vec![r.name.clone(), spec.mtls_description(), age(created)]
        }
        ResourceType::Dataplane => {
            let tags: Vec<String> = v["networking"]["inbound"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| {
                            i["tags"]
                                .as_object()
                                .map(|t| {
                                    t.iter()
                                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                })
                                .unwrap_or_default()
                        })
                        .collect()
                })
                .unwrap_or_default();
            let zone = r.labels.get("kuma.io/zone").cloned().unwrap_or_default();
            vec![r.mesh.clone(), r.name.clone(), zone, tags.join(" | "), age(created)]
        }
        ResourceType::ZoneIngress | ResourceType::ZoneEgress => {
            let n = &v["networking"];
            let addr = format!("{}:{}", n["address"].as_str().unwrap_or(""), n["port"]);
            let adv = match (n["advertisedAddress"].as_str(), n["advertisedPort"].as_u64()) {
                (Some(a), Some(p)) => format!("{a}:{p}"),
                _ => "-".into(),
            };
            let services = v["availableServices"].as_array().map_or(0, Vec::len);
            if rtype == ResourceType::ZoneIngress {
                vec![
                    r.name.clone(),
                    v["zone"].as_str().unwrap_or("").into(),
                    addr,
                    adv,
                    services.to_string(),
                    age(created),
                ]
            } else {
                vec![r.name.clone(), v["zone"].as_str().unwrap_or("").into(), addr, age(created)]
            }
        }
        ResourceType::Zone => {
            let enabled = v["enabled"].as_bool().unwrap_or(true);
            vec![r.name.clone(), if enabled { "Enabled" } else { "Disabled" }.into(), age(created)]
        }
        _ => vec![r.name.clone(), age(created)],
    }
}

fn header_of(rtype: ResourceType) -> Vec<&'static str> {
    match rtype {
        ResourceType::Mesh => vec!["NAME", "mTLS", "AGE"],
        ResourceType::Dataplane => vec!["MESH", "NAME", "ZONE", "TAGS", "AGE"],
        ResourceType::ZoneIngress => vec!["NAME", "ZONE", "ADDRESS", "ADVERTISED", "SERVICES", "AGE"],
        ResourceType::ZoneEgress => vec!["NAME", "ZONE", "ADDRESS", "AGE"],
        ResourceType::Zone => vec!["NAME", "STATUS", "AGE"],
        _ => vec!["NAME", "AGE"],
    }
}

fn print_value(v: &Value, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        _ => print!("{}", serde_saphyr::to_string(v).map_err(|e| anyhow!("cannot render YAML: {e}"))?),
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(done) = tproxy(&cli.cmd) {
        return done;
    }
    let api = Api::new(&cli.api_address)?;
    match cli.cmd {
        Cmd::Install(_) | Cmd::Uninstall(_) => unreachable!("handled above"),
        Cmd::Apply { file } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin().take(8 * 1024 * 1024).read_to_string(&mut s).context("cannot read stdin")?;
                s
            } else {
                let meta = std::fs::metadata(&file).with_context(|| format!("cannot read {file}"))?;
                if meta.len() > 8 * 1024 * 1024 {
                    bail!("{file} is larger than 8 MiB");
                }
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {file}"))?
            };
            let docs = parse_documents(&text).map_err(|e| anyhow!("{file}: {e}"))?;
            if docs.is_empty() {
                bail!("{file} holds no resource");
            }
            for doc in docs {
                let r = Resource::from_json(&doc).map_err(|e| anyhow!("{file}: {e}"))?;
                let mesh =
                    if doc.get("mesh").and_then(Value::as_str).is_some() { r.mesh.clone() } else { cli.mesh.clone() };
                let path = resource_path(r.rtype, &mesh, &r.name);
                let mut body = doc.clone();
                if r.rtype.is_mesh_scoped() {
                    body["mesh"] = json!(mesh);
                }
                api.ok("PUT", &path, Some(serde_json::to_vec(&body)?))
                    .await
                    .map_err(|e| anyhow!("{} {:?}: {e}", r.rtype.name(), r.name))?;
            }
        }
        Cmd::Get { kind, name, output } => {
            let (rtype, plural) = kind_of(&kind)?;
            match (plural, name) {
                (true, None) => {
                    let path = if rtype.is_mesh_scoped() {
                        format!("/meshes/{}/{}", cli.mesh, rtype.plural())
                    } else {
                        format!("/{}", rtype.plural())
                    };
                    let v = api.json(&format!("{path}?size=1000")).await?;
                    let items = v["items"].as_array().cloned().unwrap_or_default();
                    if output == Output::Table {
                        let rows: Vec<Vec<String>> = items.iter().map(|i| table_row(rtype, i)).collect();
                        print_table(&header_of(rtype), &rows);
                    } else {
                        print_value(&v, output)?;
                    }
                }
                (false, Some(n)) | (true, Some(n)) => {
                    let v = api.json(&resource_path(rtype, &cli.mesh, &n)).await?;
                    if output == Output::Table {
                        print_table(&header_of(rtype), &[table_row(rtype, &v)]);
                    } else {
                        print_value(&v, output)?;
                    }
                }
                (false, None) => bail!("`ctl get {kind}` needs a NAME (or use the plural to list)"),
            }
        }
        Cmd::Delete { kind, name } => {
            let (rtype, _) = kind_of(&kind)?;
            api.ok("DELETE", &resource_path(rtype, &cli.mesh, &name), None).await?;
            println!("deleted {} {name:?}", rtype.name());
        }
        Cmd::Generate(Generate::ZoneToken { zone, scope, valid_for }) => {
            let scope = if scope.is_empty() { vec!["ingress".to_string(), "egress".to_string()] } else { scope };
            let body = json!({"zone": zone, "scope": scope, "validFor": valid_for});
            let tok = api.ok("POST", "/tokens/zone", Some(serde_json::to_vec(&body)?)).await?;
            println!("{}", String::from_utf8_lossy(&tok).trim());
        }
        Cmd::Generate(Generate::DataplaneToken { name, tag, proxy_type, valid_for }) => {
            let mut tags = serde_json::Map::new();
            for t in tag {
                let (k, v) = t.split_once('=').ok_or_else(|| anyhow!("--tag {t:?} must be key=value[,value...]"))?;
                tags.insert(k.into(), json!(v.split(',').collect::<Vec<_>>()));
            }
            let body = json!({"name": name.unwrap_or_default(), "mesh": cli.mesh, "tags": tags,
                              "type": proxy_type, "validFor": valid_for});
            let tok = api.ok("POST", "/tokens/dataplane", Some(serde_json::to_vec(&body)?)).await?;
            println!("{}", String::from_utf8_lossy(&tok).trim());
        }
        Cmd::Inspect(Inspect::Services) => {
            let v = api.json(&format!("/meshes/{}/service-insights", cli.mesh)).await?;
            let rows: Vec<Vec<String>> = v["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    let status = match i["status"].as_str().unwrap_or("") {
                        "online" => "Online",
                        "offline" => "Offline",
                        "partially_degraded" => "Partially degraded",
                        other => other,
                    };
                    vec![
                        i["name"].as_str().unwrap_or("").to_string(),
                        status.to_string(),
                        format!("{}/{}", i["dataplanes"]["online"], i["dataplanes"]["total"]),
                    ]
                })
                .collect();
            print_table(&["SERVICE", "STATUS", "DATAPLANES"], &rows);
        }
        Cmd::Inspect(Inspect::Zones { output }) => {
            inspect(&api, "/zones/_overview", output, zone_row, &ZONE_COLUMNS).await?
        }
        Cmd::Inspect(Inspect::ZoneIngresses { output }) => {
            inspect(&api, "/zoneingresses/_overview", output, |i| proxy_row(i, "zoneIngressInsight"), &PROXY_COLUMNS)
                .await?
        }
        Cmd::Inspect(Inspect::ZoneEgresses { output }) => {
            inspect(&api, "/zoneegresses/_overview", output, |i| proxy_row(i, "zoneEgressInsight"), &PROXY_COLUMNS)
                .await?
        }
        Cmd::Inspect(Inspect::Dataplanes { output }) => {
            let path = format!("/meshes/{}/dataplanes/_overview", cli.mesh);
            inspect(&api, &path, output, |i| proxy_row(i, "dataplaneInsight"), &PROXY_COLUMNS).await?
        }
    }
    Ok(())
}

/// `kumactl inspect zones`' columns (`app/kumactl/cmd/inspect/inspect_zones.go`).
const ZONE_COLUMNS: [&str; 8] = [
    "NAME",
    "STATUS",
    "LAST CONNECTED AGO",
    "LAST UPDATED AGO",
    "TOTAL UPDATES",
    "TOTAL ERRORS",
    "ZONE-CP VERSION",
    "BACKEND",
];
/// `kumactl inspect zone-ingresses` / `dataplanes` columns.
const PROXY_COLUMNS: [&str; 8] = [
    "NAME",
    "STATUS",
    "LAST CONNECTED AGO",
    "LAST UPDATED AGO",
    "TOTAL UPDATES",
    "TOTAL ERRORS",
    "KUMA-DP VERSION",
    "ENVOY VERSION",
];

async fn inspect(
    api: &Api,
    path: &str,
    output: Output,
    row: impl Fn(&Value) -> Vec<String>,
    columns: &[&str],
) -> anyhow::Result<()> {
    let v = api.json(&format!("{path}?size=1000")).await?;
    if output != Output::Table {
        return print_value(&v, output);
    }
    let rows: Vec<Vec<String>> = v["items"].as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default();
    print_table(columns, &rows);
    Ok(())
}

/// Kuma's `IsOnline`: a subscription connected and not disconnected.
fn online(insight: &Value) -> bool {
    insight["subscriptions"].as_array().is_some_and(|s| {
        s.iter().any(|s| s.get("connectTime").is_some() && s.get("disconnectTime").is_none_or(Value::is_null))
    })
}

/// A protojson uint64 (a string) or a number.
fn counter(v: &Value) -> u64 {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

fn sum(insight: &Value, key: &str) -> u64 {
    insight["subscriptions"].as_array().map_or(0, |s| s.iter().map(|s| counter(&s["status"]["total"][key])).sum())
}

fn last_subscription(insight: &Value) -> Value {
    insight["subscriptions"].as_array().and_then(|s| s.last()).cloned().unwrap_or(Value::Null)
}

fn zone_row(item: &Value) -> Vec<String> {
    let insight = &item["zoneInsight"];
    let enabled = item["zone"]["enabled"].as_bool().unwrap_or(true);
    let last = last_subscription(insight);
    // Online only when connected and enabled: a disabled zone shows Offline (as Kuma).
    let status = if online(insight) && enabled { "Online" } else { "Offline" };
    let backend = last["config"]
        .as_str()
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .and_then(|c| c["store"]["type"].as_str().map(String::from))
        .unwrap_or_default();
    vec![
        item["name"].as_str().unwrap_or("").to_string(),
        status.to_string(),
        last["connectTime"].as_str().and_then(ago).unwrap_or_else(|| "never".into()),
        last["status"]["lastUpdateTime"].as_str().and_then(ago).unwrap_or_else(|| "never".into()),
        sum(insight, "responsesSent").to_string(),
        sum(insight, "responsesRejected").to_string(),
        last["version"]["kumaCp"]["version"].as_str().unwrap_or("").to_string(),
        backend,
    ]
}

fn proxy_row(item: &Value, insight_key: &str) -> Vec<String> {
    let insight = &item[insight_key];
    let last = last_subscription(insight);
    vec![
        item["name"].as_str().unwrap_or("").to_string(),
        if online(insight) { "Online" } else { "Offline" }.to_string(),
        last["connectTime"].as_str().and_then(ago).unwrap_or_else(|| "never".into()),
        last["status"]["lastUpdateTime"].as_str().and_then(ago).unwrap_or_else(|| "never".into()),
        sum(insight, "responsesSent").to_string(),
        sum(insight, "responsesRejected").to_string(),
        last["version"]["kumaDp"]["version"].as_str().unwrap_or("").to_string(),
        last["version"]["envoy"]["version"].as_str().unwrap_or("").to_string(),
    ]
}

fn main() -> std::process::ExitCode {
    cp::install_crypto_provider();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
