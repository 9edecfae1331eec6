//! Subject alternative names of an X.509 certificate, read from its DER by a small walker
//! (BoringSSL's API has no otherName) and admitted only where BoringSSL decodes the
//! extension too, and Envoy's `match_typed_subject_alt_names` over them. The chain is
//! verified by BoringSSL before any of this runs. Fuzzed with BoringSSL as the oracle.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::matcher::StringMatch;

/// One SAN entry, as Envoy compares it: text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San<'a> {
    Email(&'a str),
    Dns(&'a str),
    Uri(&'a str),
    /// An IP address in its usual text form (`10.0.0.1`, `2001:db8::1`).
    Ip(String),
    /// `otherName`: the type id as a dotted OID and the value when it is a string.
    OtherName {
        oid: String,
        value: &'a str,
    },
}

impl San<'_> {
    /// The value as text.
    pub fn value(&self) -> &str {
        match self {
            San::Email(v) | San::Dns(v) | San::Uri(v) | San::OtherName { value: v, .. } => v,
            San::Ip(v) => v,
        }
    }
}

/// A DER TLV: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// OID 2.5.29.17 (subjectAltName), DER-encoded.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// A DER OID in dotted form.
fn dotted_oid(der: &[u8]) -> Option<String> {
    let (&first, rest) = der.split_first()?;
    let mut parts = vec![u64::from(first / 40).min(2), 0];
    parts[1] = u64::from(first) - parts[0] * 40;
    let mut acc: u64 = 0;
    for &b in rest {
        acc = acc.checked_mul(128)? | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            parts.push(acc);
            acc = 0;
        }
    }
    if der.last().is_some_and(|b| b & 0x80 != 0) {
        return None; // truncated arc
    }
    Some(parts.iter().map(u64::to_string).collect::<Vec<_>>().join("."))
}

/// The string value of an `otherName` (`[0] EXPLICIT` around UTF8String, IA5String,
/// PrintableString or VisibleString). `None`: malformed; `Some(None)`: a well-formed value
/// of another type, which Envoy cannot match either.
fn other_name(body: &[u8]) -> Option<Option<San<'_>>> {
    let (0x06, oid, rest) = tlv(body)? else { return None };
    let (0xa0, explicit, &[]) = tlv(rest)? else { return None };
    let (tag, value, &[]) = tlv(explicit)? else { return None };
    if !matches!(tag, 0x0c | 0x16 | 0x13 | 0x1a) {
        return Some(None);
    }
    let oid = dotted_oid(oid)?;
    match std::str::from_utf8(value) {
        Ok(value) => Some(Some(San::OtherName { oid, value })),
        // BoringSSL refuses a UTF8String that is not UTF-8, and lets other strings pass.
        Err(_) if tag == 0x0c => None,
        Err(_) => Some(None),
    }
}

/// The SANs of a DER certificate, as Envoy sees them: `None` when the DER is malformed or
/// BoringSSL cannot decode the SAN extension (Envoy reads names through BoringSSL, so such
/// a certificate has none to match). Names of kinds Envoy cannot match (directoryName, ...)
/// and strings that are not UTF-8 (BoringSSL passes any bytes in an IA5String) are
/// skipped: no matcher can be meant for them.
pub fn sans(cert_der: &[u8]) -> Option<Vec<San<'_>>> {
    judged(walk(cert_der)?, || boring::x509::X509::from_der(cert_der).ok())
}

/// [`sans`] of a certificate BoringSSL has parsed already (`cert`, whose encoding is
/// `cert_der`): the same answer without parsing it again, as a handshake's peer
/// certificate is at hand parsed (a second parse cost about 5 % of a handshake's CPU).
pub fn sans_of<'a>(cert: &boring::x509::X509Ref, cert_der: &'a [u8]) -> Option<Vec<San<'a>>> {
    judged(walk(cert_der)?, || Some(cert))
}

/// The walker is stricter than DER in places and laxer in others (the inside of an
/// otherName's ANY); BoringSSL is the judge of whether the extension decodes at all.
fn judged<'a, C: std::ops::Deref<Target = boring::x509::X509Ref>>(
    names: Vec<San<'a>>,
    parsed: impl FnOnce() -> Option<C>,
) -> Option<Vec<San<'a>>> {
    if !names.is_empty() && parsed()?.subject_alt_names().is_none() {
        return None;
    }
    Some(names)
}

/// Our own reading of the SAN extension (BoringSSL's API does not expose otherName).
fn walk(cert_der: &[u8]) -> Option<Vec<San<'_>>> {
    let (0x30, cert, _) = tlv(cert_der)? else { return None };
    let (0x30, tbs, _) = tlv(cert)? else { return None };
    // Walk the TBSCertificate fields to the [3] extensions.
    let mut rest = tbs;
    while !rest.is_empty() {
        let (tag, body, next) = tlv(rest)?;
        rest = next;
        if tag != 0xa3 {
            continue;
        }
        let (0x30, mut exts, _) = tlv(body)? else { return None };
        while !exts.is_empty() {
            let (0x30, ext, next) = tlv(exts)? else { return None };
            exts = next;
            let (0x06, oid, mut fields) = tlv(ext)? else { return None };
            if oid != SAN_OID {
                continue;
            }
            // Optional `critical` BOOLEAN, then the OCTET STRING holding GeneralNames.
            if let Some((0x01, _, after)) = tlv(fields) {
                fields = after;
            }
            let (0x04, octets, &[]) = tlv(fields)? else { return None };
            let (0x30, mut names, &[]) = tlv(octets)? else { return None };
            let mut out = vec![];
            while !names.is_empty() {
                let (tag, value, next) = tlv(names)?;
                names = next;
                let text = || std::str::from_utf8(value).ok();
                match tag {
                    0xa0 => out.extend(other_name(value)?),
                    0x81 => out.extend(text().map(San::Email)),
                    0x82 => out.extend(text().map(San::Dns)),
                    0x86 => out.extend(text().map(San::Uri)),
                    0x87 => match value.len() {
                        4 => out.push(San::Ip(Ipv4Addr::new(value[0], value[1], value[2], value[3]).to_string())),
                        16 => {
                            let octets: [u8; 16] = value.try_into().ok()?;
                            out.push(San::Ip(Ipv6Addr::from(octets).to_string()));
                        }
                        _ => {}
                    },
                    // x400Address, directoryName, ediPartyName, registeredID.
                    0xa3 | 0xa4 | 0xa5 | 0x88 => {}
                    _ => return None, // not a GeneralName: BoringSSL refuses the extension
                }
            }
            return Some(out);
        }
        return Some(vec![]);
    }
    Some(vec![])
}

/// Envoy's `SubjectAltNameMatcher.SanType`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SanType {
    Email,
    Dns,
    Uri,
    Ip,
    /// `OTHER_NAME` with its `oid` (dotted).
    OtherName(String),
}

impl SanType {
    /// From the proto's `san_type` and `oid`.
    pub fn from_proto(san_type: i32, oid: &str) -> Result<SanType, String> {
        Ok(match san_type {
            1 => SanType::Email,
            2 => SanType::Dns,
            3 => SanType::Uri,
            4 => SanType::Ip,
            5 if !oid.is_empty() => SanType::OtherName(oid.to_string()),
            5 => return Err("san_type OTHER_NAME needs an oid".into()),
            t => return Err(format!("san_type {t} is not a SAN type")),
        })
    }
}

/// One `match_typed_subject_alt_names` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMatcher {
    pub san_type: SanType,
    pub matcher: StringMatch,
}

impl SanMatcher {
    fn matches(&self, san: &San<'_>) -> bool {
        let same_type = match (&self.san_type, san) {
            (SanType::Email, San::Email(_))
            | (SanType::Dns, San::Dns(_))
            | (SanType::Uri, San::Uri(_))
            | (SanType::Ip, San::Ip(_)) => true,
            (SanType::OtherName(want), San::OtherName { oid, .. }) => want == oid,
            _ => false,
        };
        same_type && self.matcher.matches(san.value())
    }
}

/// Envoy's rule: with matchers configured, at least one SAN must match one matcher.
pub fn accepted(matchers: &[SanMatcher], cert_der: &[u8]) -> Result<(), String> {
    if matchers.is_empty() {
        return Ok(());
    }
    matched(matchers, sans(cert_der).as_deref())
}

/// [`accepted`] on the certificate's SANs (`None`: they could not be read).
pub fn matched(matchers: &[SanMatcher], sans: Option<&[San<'_>]>) -> Result<(), String> {
    if matchers.is_empty() {
        return Ok(());
    }
    let sans = sans.ok_or("the peer certificate is not valid DER")?;
    if sans.iter().any(|s| matchers.iter().any(|m| m.matches(s))) {
        Ok(())
    } else {
        let names: Vec<&str> = sans.iter().map(San::value).collect();
        Err(format!("the peer certificate's SANs {names:?} match none of {matchers:?}"))
    }
}

/// The SPIFFE ID of a certificate: its first URI SAN starting with `spiffe://`.
pub fn spiffe_id(cert_der: &[u8]) -> Option<&str> {
    spiffe_id_in(&sans(cert_der)?)
}

/// [`spiffe_id`] among SANs already read.
pub fn spiffe_id_in<'a>(sans: &[San<'a>]) -> Option<&'a str> {
    sans.iter().find_map(|s| match s {
        San::Uri(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    })
}

/// The trust domain of a SPIFFE ID (`spiffe://<trust domain>/<path>`).
pub fn trust_domain(spiffe_id: &str) -> Option<&str> {
    let rest = spiffe_id.strip_prefix("spiffe://")?;
    let td = rest.split('/').next()?;
    (!td.is_empty()).then_some(td)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::Pattern;

    fn cert(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_every_kind_envoy_matches() {
        let der = cert(vec![
            rcgen::SanType::URI("spiffe://default/backend".try_into().unwrap()),
            rcgen::SanType::DnsName("backend.mesh".try_into().unwrap()),
            rcgen::SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
            rcgen::SanType::IpAddress("10.0.0.7".parse().unwrap()),
            rcgen::SanType::IpAddress("2001:db8::1".parse().unwrap()),
            rcgen::SanType::OtherName((vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3], "upn@example.com".into())),
        ]);
        assert_eq!(
            sans(&der).unwrap(),
            [
                San::Uri("spiffe://default/backend"),
                San::Dns("backend.mesh"),
                San::Email("ops@example.com"),
                San::Ip("10.0.0.7".into()),
                San::Ip("2001:db8::1".into()),
                San::OtherName { oid: "1.3.6.1.4.1.311.20.2.3".into(), value: "upn@example.com" },
            ]
        );
        assert_eq!(sans(&cert(vec![])).unwrap(), []);
        for i in 0..der.len() {
            let _ = sans(&der[..i]); // never panics on truncation
        }
        assert_eq!(spiffe_id(&der), Some("spiffe://default/backend"));
        assert_eq!(trust_domain("spiffe://default/backend"), Some("default"));
        assert_eq!(trust_domain("spiffe:///x"), None);
    }

    #[test]
    fn matchers_follow_envoy() {
        let der = cert(vec![
            rcgen::SanType::URI("spiffe://default/backend".try_into().unwrap()),
            rcgen::SanType::IpAddress("10.0.0.7".parse().unwrap()),
        ]);
        let m = |t, pattern| vec![SanMatcher { san_type: t, matcher: StringMatch::new(pattern, false) }];
        assert!(accepted(&m(SanType::Uri, Pattern::Prefix("spiffe://default/".into())), &der).is_ok());
        assert!(accepted(&m(SanType::Uri, Pattern::Exact("spiffe://default/backend".into())), &der).is_ok());
        assert!(accepted(&m(SanType::Uri, Pattern::Exact("spiffe://default/web".into())), &der).is_err());
        assert!(
            accepted(&m(SanType::Dns, Pattern::Prefix("spiffe://".into())), &der).is_err(),
            "a DNS matcher ignores URIs"
        );
        assert!(accepted(&m(SanType::Ip, Pattern::Exact("10.0.0.7".into())), &der).is_ok());
        assert!(
            accepted(&m(SanType::Uri, Pattern::Prefix("spiffe://other/".into())), &der)
                .unwrap_err()
                .contains("spiffe://default/backend")
        );
        assert!(accepted(&[], &der).is_ok());
        assert!(SanType::from_proto(5, "").is_err() && SanType::from_proto(9, "").is_err());
    }

    #[test]
    fn oids_in_dotted_form() {
        assert_eq!(dotted_oid(&[0x55, 0x1d, 0x11]).as_deref(), Some("2.5.29.17"));
        assert_eq!(dotted_oid(&[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37]).as_deref(), Some("1.3.6.1.4.1.311"));
        assert_eq!(dotted_oid(&[0x2b, 0x86]), None);
    }
}
