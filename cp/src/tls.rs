//! DP-server TLS material: a self-signed CA and a server certificate signed by it, created
//! on first start in the work directory, or user-provided files.
//!
//! The CA (not the leaf) is what `--ca-cert-file` must point at: `<work dir>/kuma-cp.crt`.
//! A separate CA keeps rustls clients happy (webpki refuses a CA certificate used as the
//! end-entity certificate) while Envoy and Go clients accept it as well.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Server identity of the DP server.
pub struct DpServerTls {
    /// PEM chain served to clients (leaf first).
    pub cert_chain_pem: String,
    pub key_pem: String,
    /// PEM of the CA that clients must trust; written to `ca_cert_path`.
    pub ca_pem: String,
    pub ca_cert_path: PathBuf,
    /// SANs of the generated certificate (empty when the certificate was provided).
    pub sans: Vec<String>,
}

pub const CA_FILE: &str = "kuma-cp.crt";
const CA_KEY_FILE: &str = "kuma-cp-ca.key";
const SERVER_CERT_FILE: &str = "kuma-cp-server.crt";
const SERVER_KEY_FILE: &str = "kuma-cp-server.key";

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Default SANs: localhost, 127.0.0.1, ::1, the host name, plus `extra`.
pub fn default_sans(extra: &[String]) -> Vec<String> {
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Some(h) = hostname() {
        sans.push(h);
    }
    for e in extra {
        if !e.is_empty() && !sans.contains(e) {
            sans.push(e.clone());
        }
    }
    sans
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)
    }
    .with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(not(unix))]
    let mut f = std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(data.as_bytes()).with_context(|| format!("cannot write {}", path.display()))
}

fn generate(sans: &[String]) -> anyhow::Result<(String, String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "kuma-cp CA");
    ca.distinguished_name.push(DnType::OrganizationName, "mesh cp");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "kuma-cp");
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
        })
        .collect::<Result<Vec<_>, rcgen::Error>>()?;
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let leaf = p.signed_by(&key, &issuer)?;
    Ok((ca_cert.pem(), issuer.key().serialize_pem(), leaf.pem(), key.serialize_pem()))
}

/// Load or create the DP-server TLS material.
///
/// * `cert_file`/`key_file` given: use them; the CA written for clients is the last
///   certificate of the chain file.
/// * otherwise: reuse `<work_dir>/kuma-cp-server.{crt,key}` + `kuma-cp.crt` if present,
///   else generate them.
pub fn load_or_create(
    work_dir: &Path,
    cert_file: Option<&Path>,
    key_file: Option<&Path>,
    extra_sans: &[String],
) -> anyhow::Result<DpServerTls> {
    std::fs::create_dir_all(work_dir).with_context(|| {
        format!("cannot create the work directory {} (set KUMA_GENERAL_WORK_DIR)", work_dir.display())
    })?;
    let ca_cert_path = work_dir.join(CA_FILE);
    match (cert_file, key_file) {
        (Some(c), Some(k)) => {
            let cert_chain_pem = std::fs::read_to_string(c).with_context(|| {
                format!("cannot read the TLS certificate {} (KUMA_GENERAL_TLS_CERT_FILE)", c.display())
            })?;
            let key_pem = std::fs::read_to_string(k)
                .with_context(|| format!("cannot read the TLS key {} (KUMA_GENERAL_TLS_KEY_FILE)", k.display()))?;
            let certs = pem_certs(&cert_chain_pem)?;
            let last = certs.last().context("the TLS certificate file holds no certificate")?;
            let ca_pem = der_to_pem(last);
            std::fs::write(&ca_cert_path, &ca_pem)
                .with_context(|| format!("cannot write {}", ca_cert_path.display()))?;
            Ok(DpServerTls { cert_chain_pem, key_pem, ca_pem, ca_cert_path, sans: Vec::new() })
        }
        (None, None) => {
            let sc = work_dir.join(SERVER_CERT_FILE);
            let sk = work_dir.join(SERVER_KEY_FILE);
            let sans = default_sans(extra_sans);
            if sc.exists() && sk.exists() && ca_cert_path.exists() {
                let leaf = std::fs::read_to_string(&sc)?;
                let key_pem = std::fs::read_to_string(&sk)?;
                let ca_pem = std::fs::read_to_string(&ca_cert_path)?;
                let sans_file = work_dir.join("kuma-cp-server.sans");
                let old_sans = std::fs::read_to_string(&sans_file).unwrap_or_default();
                if old_sans == sans.join(",") {
                    return Ok(DpServerTls {
                        cert_chain_pem: format!("{leaf}{ca_pem}"),
                        key_pem,
                        ca_pem,
                        ca_cert_path,
                        sans,
                    });
                }
                // SANs changed (new host name or --tls-san): re-issue the leaf with the same CA.
                if let Ok(ca_key_pem) = std::fs::read_to_string(work_dir.join(CA_KEY_FILE))
                    && let Ok((leaf, key_pem)) = reissue_leaf(&ca_pem, &ca_key_pem, &sans)
                {
                    std::fs::write(&sc, &leaf)?;
                    write_private(&sk, &key_pem)?;
                    std::fs::write(&sans_file, sans.join(","))?;
                    return Ok(DpServerTls {
                        cert_chain_pem: format!("{leaf}{ca_pem}"),
                        key_pem,
                        ca_pem,
                        ca_cert_path,
                        sans,
                    });
                }
            }
            let (ca_pem, ca_key_pem, leaf, key_pem) = generate(&sans)?;
            write_private(&work_dir.join(CA_KEY_FILE), &ca_key_pem)?;
            write_private(&sk, &key_pem)?;
            std::fs::write(&sc, &leaf).with_context(|| format!("cannot write {}", sc.display()))?;
            std::fs::write(&ca_cert_path, &ca_pem)
                .with_context(|| format!("cannot write {}", ca_cert_path.display()))?;
            std::fs::write(work_dir.join("kuma-cp-server.sans"), sans.join(","))?;
            Ok(DpServerTls { cert_chain_pem: format!("{leaf}{ca_pem}"), key_pem, ca_pem, ca_cert_path, sans })
        }
        _ => bail!("KUMA_GENERAL_TLS_CERT_FILE and KUMA_GENERAL_TLS_KEY_FILE must be set together"),
    }
}

fn reissue_leaf(ca_pem: &str, ca_key_pem: &str, sans: &[String]) -> anyhow::Result<(String, String)> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    // Rebuild the issuer from the stored CA's name (we created it, so we know its subject).
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "kuma-cp CA");
    ca.distinguished_name.push(DnType::OrganizationName, "mesh cp");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let _ = ca_pem;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, "kuma-cp");
    for s in sans {
        p.subject_alt_names.push(match s.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(s.clone().try_into()?),
        });
    }
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let leaf = p.signed_by(&key, &issuer)?;
    Ok((leaf.pem(), key.serialize_pem()))
}

fn pem_certs(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        bail!("no PEM certificate found");
    }
    Ok(certs)
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// rustls server config: TLS 1.2+ (rustls supports nothing older), ALPN h2 + http/1.1.
pub fn server_config(t: &DpServerTls) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = pem_certs(&t.cert_chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(t.key_pem.as_bytes()).context("cannot read the DP server private key")?;
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the DP server certificate and key do not match")?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Does `host` match one of the certificate SANs (exact; DNS names case-insensitive)?
pub fn host_matches_sans(host: &str, sans: &[String]) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    sans.iter().any(|s| s.eq_ignore_ascii_case(host))
}
