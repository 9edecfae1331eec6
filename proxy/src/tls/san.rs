//! Subject alternative names of an X.509 certificate, read straight from its DER
//! without a general X.509 parser: `dp` only needs URI (SPIFFE) and DNS SANs to apply
//! Envoy's `match_typed_subject_alt_names`.

use crate::matcher::StringMatch;

/// One SAN entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum San<'a> {
    Dns(&'a str),
    Uri(&'a str),
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

/// The SANs of a DER certificate; `None` when the DER is malformed.
pub fn sans(cert_der: &[u8]) -> Option<Vec<San<'_>>> {
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
            let (0x04, octets, _) = tlv(fields)? else { return None };
            let (0x30, mut names, _) = tlv(octets)? else { return None };
            let mut out = vec![];
            while !names.is_empty() {
                let (tag, value, next) = tlv(names)?;
                names = next;
                let text = || std::str::from_utf8(value).ok();
                match tag {
                    0x82 => out.push(San::Dns(text()?)),
                    0x86 => out.push(San::Uri(text()?)),
                    _ => {}
                }
            }
            return Some(out);
        }
        return Some(vec![]);
    }
    Some(vec![])
}

/// One `match_typed_subject_alt_names` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanMatcher {
    pub uri: bool,
    pub matcher: StringMatch,
}

impl SanMatcher {
    fn matches(&self, san: &San<'_>) -> bool {
        match (san, self.uri) {
            (San::Uri(v), true) | (San::Dns(v), false) => self.matcher.matches(v),
            _ => false,
        }
    }
}

/// Envoy's rule: with matchers configured, at least one SAN must match one matcher.
pub fn accepted(matchers: &[SanMatcher], cert_der: &[u8]) -> Result<(), String> {
    if matchers.is_empty() {
        return Ok(());
    }
    let sans = sans(cert_der).ok_or("the peer certificate is not valid DER")?;
    if sans.iter().any(|s| matchers.iter().any(|m| m.matches(s))) {
        Ok(())
    } else {
        let uris: Vec<&str> = sans
            .iter()
            .map(|s| match s {
                San::Dns(v) | San::Uri(v) => *v,
            })
            .collect();
        Err(format!("the peer certificate's SANs {uris:?} match none of {matchers:?}"))
    }
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
    fn reads_uri_and_dns_sans() {
        let der = cert(vec![
            rcgen::SanType::URI("spiffe://default/backend".try_into().unwrap()),
            rcgen::SanType::DnsName("backend.mesh".try_into().unwrap()),
            rcgen::SanType::URI("kuma://version/v1".try_into().unwrap()),
        ]);
        assert_eq!(
            sans(&der).unwrap(),
            [San::Uri("spiffe://default/backend"), San::Dns("backend.mesh"), San::Uri("kuma://version/v1")]
        );
        assert_eq!(sans(&cert(vec![])).unwrap(), []);
        for i in 0..der.len() {
            let _ = sans(&der[..i]); // never panics on truncation
        }
    }

    #[test]
    fn matchers_follow_envoy() {
        let der = cert(vec![rcgen::SanType::URI("spiffe://default/backend".try_into().unwrap())]);
        let m = |uri, pattern| vec![SanMatcher { uri, matcher: StringMatch::new(pattern, false) }];
        assert!(accepted(&m(true, Pattern::Prefix("spiffe://default/".into())), &der).is_ok());
        assert!(accepted(&m(true, Pattern::Exact("spiffe://default/backend".into())), &der).is_ok());
        assert!(accepted(&m(true, Pattern::Exact("spiffe://default/web".into())), &der).is_err());
        assert!(accepted(&m(false, Pattern::Prefix("spiffe://".into())), &der).is_err(), "a DNS matcher ignores URIs");
        assert!(
            accepted(&m(true, Pattern::Prefix("spiffe://other/".into())), &der)
                .unwrap_err()
                .contains("spiffe://default/backend")
        );
        assert!(accepted(&[], &der).is_ok());
    }
}
