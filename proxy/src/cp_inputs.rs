//! The inputs of `dp run` against a control plane, checked before anything is sent:
//! the token, the CA file and the Dataplane / ZoneIngress / ZoneEgress template.
//! Every error is one sentence naming the input, as kuma-dp's are.

use kuma_model::resource::{ProxyResource, parse_resource};
use kuma_model::template::{parse_vars, render};
use kuma_model::token::check_token;
use std::path::Path;

/// Largest token, CA or dataplane file read.
const MAX_INPUT_BYTES: u64 = 1 << 20;

fn read_bounded(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if meta.len() > MAX_INPUT_BYTES {
        return Err(format!("{what} {}: larger than {MAX_INPUT_BYTES} bytes", path.display()));
    }
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

pub fn read_token_file(path: &Path) -> Result<String, String> {
    let bytes = read_bounded(path, "--dataplane-token-file")?;
    let text = String::from_utf8(bytes).map_err(|_| format!("--dataplane-token-file {}: not text", path.display()))?;
    check_token(&text).map_err(|e| format!("--dataplane-token-file {}: {e}", path.display()))
}

/// Reads a PEM CA bundle: at least one certificate, nothing else unreadable.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bytes = read_bounded(path, "--ca-cert-file")?;
    let certs: Result<Vec<CertificateDer<'_>>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(bytes),
        Ok(_) => Err(format!("--ca-cert-file {}: no PEM certificate in the file", path.display())),
        Err(e) => Err(format!("--ca-cert-file {}: not a PEM certificate: {e:?}", path.display())),
    }
}

/// Everything `dp run` needs to talk to a control plane, checked up front.
#[derive(Debug, Clone)]
pub struct CpInputs {
    pub cp: crate::bootstrap::CpAddress,
    pub trust: crate::bootstrap::Trust,
    pub token: String,
    pub token_path: String,
    pub resource: Option<ProxyResource>,
    pub mesh: String,
    pub name: String,
    pub delta: bool,
}

impl CpInputs {
    pub fn from_args(a: &crate::cli::RunArgs) -> Result<Self, String> {
        use crate::bootstrap::{CpAddress, Trust};
        let cp = CpAddress::parse(&a.cp_address)?;
        let trust = if a.skip_verify {
            Trust::SkipVerify
        } else if let Some(pem) = &a.ca_cert {
            Trust::Ca(pem.clone().into_bytes())
        } else if let Some(f) = &a.ca_cert_file {
            Trust::Ca(read_ca_file(f)?)
        } else {
            Trust::System
        };
        let (token, token_path) = match (&a.dataplane_token, &a.dataplane_token_file) {
            (Some(t), _) => (check_token(t).map_err(|e| format!("--dataplane-token: {e}"))?, String::new()),
            (None, Some(f)) => (read_token_file(f)?, f.display().to_string()),
            (None, None) => (String::new(), String::new()),
        };
        let vars = parse_vars(&a.dataplane_var)?;
        let template = match (&a.dataplane_file, &a.dataplane) {
            (Some(f), _) if f.as_os_str() == "-" => {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| format!("--dataplane-file -: cannot read standard input: {e}"))?;
                Some((s, "--dataplane-file -".to_string()))
            }
            (Some(f), _) => {
                let bytes = read_bounded(f, "--dataplane-file")?;
                let text =
                    String::from_utf8(bytes).map_err(|_| format!("--dataplane-file {}: not text", f.display()))?;
                Some((text, format!("--dataplane-file {}", f.display())))
            }
            (None, Some(inline)) => Some((inline.clone(), "--dataplane".to_string())),
            (None, None) => None,
        };
        let resource = match template {
            Some((text, source)) => {
                if a.name.is_some() || a.mesh.is_some() {
                    return Err(format!(
                        "--name and --mesh must not be set with {source}: they are read from the resource"
                    ));
                }
                let rendered = render(&text, &vars).map_err(|e| format!("{source}: {e}"))?;
                Some(parse_resource(&rendered, a.proxy(), &source)?)
            }
            None => None,
        };
        let (mesh, name) = match &resource {
            Some(r) => (r.mesh.clone(), r.name.clone()),
            None => {
                let name = a.name.clone().ok_or("--name is required when no --dataplane-file is given")?;
                let mesh = a.mesh.clone().unwrap_or_default();
                if a.proxy() == kuma_model::proxy::ProxyType::Dataplane && mesh.is_empty() {
                    return Err("--mesh is required when no --dataplane-file is given".into());
                }
                (mesh, name)
            }
        };
        Ok(CpInputs { cp, trust, token, token_path, resource, mesh, name, delta: a.xds_variant == "DELTA_GRPC" })
    }
}
