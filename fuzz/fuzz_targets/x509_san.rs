//! SAN extraction from arbitrary "certificate" bytes: never a panic, every SAN returned
//! lies inside the input, and BoringSSL is the oracle: where it decodes the SAN extension
//! we find the same e-mail, DNS, URI and IP names in the same order, and where it cannot,
//! we find none (Envoy reads names through BoringSSL). `sans_of`, which the handshake uses
//! on the certificate BoringSSL parsed, answers as `sans` does.
#![no_main]

use boring::x509::X509;
use libfuzzer_sys::fuzz_target;
use proxy::tls::san::{San, sans, sans_of, spiffe_id, trust_domain};

fn ours(list: &[San<'_>]) -> Vec<String> {
    list.iter()
        .filter_map(|s| match s {
            San::Email(v) => Some(format!("email:{v}")),
            San::Dns(v) => Some(format!("dns:{v}")),
            San::Uri(v) => Some(format!("uri:{v}")),
            San::Ip(v) => Some(format!("ip:{v}")),
            San::OtherName { .. } => None,
        })
        .collect()
}

fn boringssl(cert: &X509) -> Vec<String> {
    let Some(names) = cert.subject_alt_names() else { return vec![] };
    names
        .iter()
        .filter_map(|n| {
            let utf8 = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
            if let Some(v) = n.email() {
                return utf8(v.as_bytes()).map(|v| format!("email:{v}"));
            }
            if let Some(v) = n.dnsname() {
                return utf8(v.as_bytes()).map(|v| format!("dns:{v}"));
            }
            if let Some(v) = n.uri() {
                return utf8(v.as_bytes()).map(|v| format!("uri:{v}"));
            }
            let ip = n.ipaddress()?;
            match ip.len() {
                4 => Some(format!("ip:{}", std::net::Ipv4Addr::from(<[u8; 4]>::try_from(ip).ok()?))),
                16 => Some(format!("ip:{}", std::net::Ipv6Addr::from(<[u8; 16]>::try_from(ip).ok()?))),
                _ => None,
            }
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let found = sans(data);
    for s in found.iter().flatten() {
        assert!(s.value().len() <= data.len());
    }
    if let Some(id) = spiffe_id(data) {
        assert!(id.starts_with("spiffe://"));
        let _ = trust_domain(id);
    }
    let Ok(cert) = X509::from_der(data) else { return };
    // The handshake's path (the peer certificate already parsed) answers as the DER path.
    assert_eq!(sans_of(&cert, data), found);
    if cert.subject_alt_names().is_some() {
        assert_eq!(ours(&found.expect("BoringSSL decoded SANs our walker called malformed")), boringssl(&cert));
    } else {
        // Absent or undecodable: no names, as Envoy.
        assert!(found.as_ref().is_none_or(|l| l.is_empty()), "names BoringSSL cannot decode: {found:?}");
    }
});
