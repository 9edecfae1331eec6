//! The inputs of `dp run` against a control plane, checked before anything is sent:
//! the token, the CA file and the Dataplane / ZoneIngress / ZoneEgress template.
//! Every error is one sentence naming the input, as kuma-dp's are.

use serde_json::Value;
use std::collections::BTreeMap;
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

/// A token as kuma-dp accepts it: one line, a JWT (three base64url parts) whose header
/// names an `alg`. The signature is the control plane's to check.
pub fn check_token(raw: &str) -> Result<String, String> {
    let t = raw.trim();
    if t.is_empty() {
        return Err("the token is empty".into());
    }
    if t.contains(['\n', '\r', '\0']) {
        return Err("the token must be a single line".into());
    }
    let parts: Vec<&str> = t.split('.').collect();
    if parts.len() != 3 || parts.iter().take(2).any(|p| p.is_empty()) {
        return Err("the token is not a JWT (expected three dot-separated parts)".into());
    }
    let header = b64url(parts[0]).ok_or("the token's header is not base64url")?;
    let header: Value = serde_json::from_slice(&header).map_err(|_| "the token's header is not JSON".to_string())?;
    if !header.get("alg").is_some_and(Value::is_string) {
        return Err("the token's header has no `alg`".into());
    }
    b64url(parts[1]).ok_or("the token's payload is not base64url")?;
    Ok(t.to_string())
}

pub fn read_token_file(path: &Path) -> Result<String, String> {
    let bytes = read_bounded(path, "--dataplane-token-file")?;
    let text = String::from_utf8(bytes).map_err(|_| format!("--dataplane-token-file {}: not text", path.display()))?;
    check_token(&text).map_err(|e| format!("--dataplane-token-file {}: {e}", path.display()))
}

fn b64url(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
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

/// The resource type each `--proxy-type` runs as.
pub fn resource_type(proxy_type: &str) -> &'static str {
    match proxy_type {
        "ingress" => "ZoneIngress",
        "egress" => "ZoneEgress",
        _ => "Dataplane",
    }
}

/// A rendered and checked Dataplane / ZoneIngress / ZoneEgress.
#[derive(Debug, Clone)]
pub struct ProxyResource {
    pub kind: String,
    pub mesh: String,
    pub name: String,
    /// The resource as JSON (Universal flat form), as sent to the control plane.
    pub json: Value,
}

/// Renders kuma-dp's mustache template: `{{ key }}` (HTML-escaped), `{{{ key }}}` and
/// `{{& key }}` (raw); a missing variable renders as nothing.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let (raw, body, close) =
            if let Some(b) = after.strip_prefix('{') { (true, b, "}}}") } else { (false, after, "}}") };
        let end = body.find(close).ok_or("the template has an unclosed `{{`")?;
        let mut key = body[..end].trim();
        let mut raw = raw;
        if let Some(k) = key.strip_prefix('&') {
            key = k.trim();
            raw = true;
        }
        if key.starts_with(['#', '^', '/', '>', '!', '=']) {
            return Err(format!("template tag `{{{{{key}}}}}` is not supported (only variables)"));
        }
        let value = vars.get(key).map(String::as_str).unwrap_or("");
        if raw {
            out.push_str(value);
        } else {
            for c in value.chars() {
                match c {
                    '&' => out.push_str("&amp;"),
                    '<' => out.push_str("&lt;"),
                    '>' => out.push_str("&gt;"),
                    '"' => out.push_str("&#34;"),
                    '\'' => out.push_str("&#39;"),
                    c => out.push(c),
                }
            }
        }
        rest = &body[end + close.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `--dataplane-var k=v` pairs.
pub fn parse_vars(pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(format!("--dataplane-var {p:?} is not key=value")),
        })
        .collect()
}

fn rfc1123_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// Parses the rendered resource and checks it the way kuma-dp does before bootstrap.
pub fn parse_resource(text: &str, proxy_type: &str, source: &str) -> Result<ProxyResource, String> {
    let json: Value = serde_json::from_str(text)
        .or_else(|_| serde_saphyr::from_str::<Value>(text))
        .map_err(|e| format!("{source}: not valid YAML or JSON: {}", e.to_string().lines().next().unwrap_or("")))?;
    let Some(obj) = json.as_object() else {
        return Err(format!("{source}: the resource must be a mapping with `type` and `name`"));
    };
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let want = resource_type(proxy_type);
    if kind != want {
        return Err(format!(
            "{source}: resource type {kind:?} does not match --proxy-type={proxy_type} (expected type: {want})"
        ));
    }
    let name = obj.get("name").and_then(Value::as_str).unwrap_or("");
    if !rfc1123_name(name) {
        return Err(format!(
            "{source}: name {name:?} must be a lower-case RFC 1123 name (letters, digits, '-' and '.', at most 253)"
        ));
    }
    let mesh = obj.get("mesh").and_then(Value::as_str).unwrap_or("");
    if kind == "Dataplane" && mesh.is_empty() {
        return Err(format!("{source}: a Dataplane needs a `mesh`"));
    }
    if !mesh.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-_.".contains(&c)) {
        return Err(format!("{source}: mesh {mesh:?} may contain only lower-case letters, digits, '-', '_' and '.'"));
    }
    Ok(ProxyResource { kind: kind.to_string(), mesh: mesh.to_string(), name: name.to_string(), json })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEiLCJ0eXAiOiJKV1QifQ.eyJab25lIjoiem9uZS0xIn0.c2ln";

    #[test]
    fn tokens() {
        assert_eq!(check_token(&format!("{TOKEN}\n")).unwrap(), TOKEN);
        for (bad, why) in [
            ("", "empty"),
            ("abc", "not a JWT"),
            ("a.b", "not a JWT"),
            ("e30.e30.x", "no `alg`"),
            ("!!!.e30.x", "not base64url"),
            (&format!("{TOKEN}\n{TOKEN}"), "single line"),
        ] {
            let e = check_token(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn templates() {
        let vars = parse_vars(&["name=dp-1".into(), "address=10.0.0.1".into(), "x=<a&b>".into()]).unwrap();
        let out =
            render("name: {{ name }}\naddr: {{address}}\nraw: {{{x}}} {{& x}}\nesc: {{x}}\nnone: [{{missing}}]", &vars)
                .unwrap();
        assert_eq!(out, "name: dp-1\naddr: 10.0.0.1\nraw: <a&b> <a&b>\nesc: &lt;a&amp;b&gt;\nnone: []");
        assert!(render("{{#list}}", &vars).unwrap_err().contains("not supported"));
        assert!(render("{{ open", &vars).unwrap_err().contains("unclosed"));
        assert!(parse_vars(&["novalue".into()]).is_err());
    }

    #[test]
    fn resources() {
        let zi = "type: ZoneIngress\nname: ingress-01\nnetworking: {address: 127.0.0.1, port: 10000}";
        let r = parse_resource(zi, "ingress", "f").unwrap();
        assert_eq!((r.kind.as_str(), r.name.as_str(), r.mesh.as_str()), ("ZoneIngress", "ingress-01", ""));
        let e = parse_resource(zi, "egress", "f").unwrap_err();
        assert!(e.contains("does not match --proxy-type=egress"), "{e}");
        let e = parse_resource("type: Dataplane\nname: Web", "dataplane", "f").unwrap_err();
        assert!(e.contains("RFC 1123"), "{e}");
        let e = parse_resource("type: Dataplane\nname: web", "dataplane", "f").unwrap_err();
        assert!(e.contains("needs a `mesh`"), "{e}");
        assert!(parse_resource("[1", "dataplane", "f").unwrap_err().contains("not valid YAML"));
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
                Some(parse_resource(&rendered, &a.proxy_type, &source)?)
            }
            None => None,
        };
        let (mesh, name) = match &resource {
            Some(r) => (r.mesh.clone(), r.name.clone()),
            None => {
                let name = a.name.clone().ok_or("--name is required when no --dataplane-file is given")?;
                let mesh = a.mesh.clone().unwrap_or_default();
                if a.proxy_type == "dataplane" && mesh.is_empty() {
                    return Err("--mesh is required when no --dataplane-file is given".into());
                }
                (mesh, name)
            }
        };
        Ok(CpInputs { cp, trust, token, token_path, resource, mesh, name, delta: a.xds_variant == "DELTA_GRPC" })
    }
}
