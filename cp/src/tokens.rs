//! Zone and dataplane tokens: RS256 JWTs with a `kid` header and Kuma's claim names,
//! signed by keys kept in the store as Kuma's signing-key secrets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::context::random_uuid;
use crate::model::{Resource, ResourceType, now_unix};
use crate::store::Store;

pub const ZONE_SCOPES: [&str; 2] = ["ingress", "egress"];
/// Kuma's default token lifetime when `validFor` is empty: 10 years.
pub const DEFAULT_VALID_FOR: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const KID: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is missing: pass it with --dataplane-token-file (gRPC metadata `authorization`)")]
    Missing,
    #[error("token is not a valid JWT: {0}")]
    Malformed(String),
    #[error("token signature invalid")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has no kid header")]
    NoKid,
    #[error("token was signed with an unknown signing key (kid {0:?})")]
    UnknownKey(String),
    #[error("zone token scope does not include {0}")]
    Scope(String),
    #[error("token is for zone {token_zone}, this is {cp_zone}")]
    WrongZone { token_zone: String, cp_zone: String },
    #[error("token is for {what} {token:?} but the proxy is {actual:?}")]
    Mismatch { what: &'static str, token: String, actual: String },
    #[error("{0}")]
    Invalid(String),
    /// This control plane cannot issue that token (a federated zone for zone tokens, or a
    /// key global has not sent yet).
    #[error("{0}")]
    NotIssuer(String),
    #[error("signing key failure: {0}")]
    Internal(String),
}

/// Claims of a zone token (`kumahq/kuma:pkg/tokens/builtin/zone/token.go`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ZoneClaims {
    #[serde(rename = "Zone", default)]
    pub zone: String,
    #[serde(rename = "Scope", default)]
    pub scope: Vec<String>,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub jti: String,
}

/// Claims of a dataplane token (`kumahq/kuma:pkg/tokens/builtin/issuer/token.go`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct DataplaneClaims {
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "Mesh", default)]
    pub mesh: String,
    #[serde(rename = "Tags", default)]
    pub tags: BTreeMap<String, Vec<String>>,
    #[serde(rename = "Type", default)]
    pub proxy_type: String,
    #[serde(rename = "Workload", default)]
    pub workload: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default)]
    pub nbf: u64,
    #[serde(default)]
    pub jti: String,
}

/// Token issuer and validator backed by the store.
#[derive(Clone)]
pub struct Tokens {
    store: Arc<dyn Store>,
    /// A federated zone verifies zone tokens with the public keys global sends and mints
    /// none; its dataplane-token keys come from global too.
    federated: bool,
}

use crate::kds::mapper::{ZONE_TOKEN_KEY_PREFIX, ZONE_TOKEN_PUBLIC_KEY_PREFIX};

/// The public half of an RSA private key (PEM), as Kuma sends zone-token keys to zones:
/// PKCS#1 `RSA PUBLIC KEY` PEM.
pub fn rsa_public_key_pem(private_pem: &str) -> Option<String> {
    let key = rcgen::KeyPair::from_pem(private_pem).ok()?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let pkcs1 = spki_rsa_key(&spki)?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs1);
    let mut out = String::from("-----BEGIN RSA PUBLIC KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).ok()?);
        out.push('\n');
    }
    out.push_str("-----END RSA PUBLIC KEY-----\n");
    Some(out)
}

/// The `RSAPublicKey` inside a SubjectPublicKeyInfo (DER): `SEQUENCE { algorithm,
/// BIT STRING { 0 unused bits, RSAPublicKey } }`.
fn spki_rsa_key(spki: &[u8]) -> Option<&[u8]> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = b.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            (rest[..n].iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)), &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }
    let (0x30, body, _) = tlv(spki)? else { return None };
    let (0x30, _, rest) = tlv(body)? else { return None };
    let (0x03, bits, _) = tlv(rest)? else { return None };
    let (&0, key) = bits.split_first()? else { return None };
    Some(key)
}

fn zone_key_name() -> String {
    format!("zone-token-signing-key-{KID}")
}

fn dataplane_key_name(mesh: &str) -> String {
    format!("dataplane-token-signing-key-{mesh}-{KID}")
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> TokenError {
    match e.kind() {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAlgorithm => TokenError::Malformed("the algorithm must be RS256".into()),
        ErrorKind::MissingRequiredClaim(c) => TokenError::Malformed(format!("claim {c:?} is missing")),
        _ => TokenError::Malformed(e.to_string()),
    }
}

impl Tokens {
    pub fn new(store: Arc<dyn Store>, federated: bool) -> Self {
        Tokens { store, federated }
    }

    /// PEM of the private signing key stored under (type, mesh, name), created when absent.
    async fn signing_key(
        &self,
        rtype: ResourceType,
        mesh: &str,
        name: &str,
        create: bool,
    ) -> Result<Option<String>, TokenError> {
        let internal = |e: crate::store::StoreError| TokenError::Internal(e.to_string());
        if let Some(r) = self.store.get(rtype, mesh, name).await.map_err(internal)? {
            let data = r.spec.get("data").and_then(|v| v.as_str()).unwrap_or_default();
            let pem = base64::engine::general_purpose::STANDARD
                .decode(data)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| TokenError::Internal(format!("secret {name} does not hold a base64 PEM key")))?;
            return Ok(Some(pem));
        }
        if !create {
            return Ok(None);
        }
        let key =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(|e| TokenError::Internal(e.to_string()))?;
        let pem = key.serialize_pem();
        let mut r = Resource::new(rtype, mesh, name);
        r.spec.insert("data".into(), base64::engine::general_purpose::STANDARD.encode(pem.as_bytes()).into());
        // expected_version 0: if another task created the key first, use theirs.
        match self.store.upsert(r, Some(0)).await {
            Ok(_) => Ok(Some(pem)),
            Err(crate::store::StoreError::Conflict { .. }) => {
                Box::pin(self.signing_key(rtype, mesh, name, false)).await
            }
            Err(e) => Err(internal(e)),
        }
    }

    /// Loads the zone-token signing key from `file` into the store, or writes the
    /// store's key there, so zone tokens survive a restart of an in-memory `cp`.
    pub async fn persist_zone_signing_key(&self, file: &std::path::Path) -> Result<(), TokenError> {
        let internal = |e: String| TokenError::Internal(format!("{}: {e}", file.display()));
        if let Ok(pem) = std::fs::read_to_string(file) {
            let mut r = Resource::new(ResourceType::GlobalSecret, "", &zone_key_name());
            r.spec.insert("data".into(), base64::engine::general_purpose::STANDARD.encode(pem.as_bytes()).into());
            self.store.upsert(r, None).await.map_err(|e| internal(e.to_string()))?;
            return Ok(());
        }
        let pem = self
            .signing_key(ResourceType::GlobalSecret, "", &zone_key_name(), true)
            .await?
            .ok_or_else(|| internal("no zone signing key".into()))?;
        write_private(file, &pem).map_err(|e| internal(e.to_string()))
    }

    /// Create the zone-token signing key if it does not exist yet (done at start-up).
    pub async fn ensure_zone_signing_key(&self) -> Result<(), TokenError> {
        self.signing_key(ResourceType::GlobalSecret, "", &zone_key_name(), true).await.map(|_| ())
    }

    /// Create the dataplane-token signing key of `mesh` if it does not exist yet (global
    /// and standalone zones, for every Mesh; global sends it to the zones).
    pub async fn ensure_dataplane_signing_key(&self, mesh: &str) -> Result<(), TokenError> {
        self.signing_key(ResourceType::Secret, mesh, &dataplane_key_name(mesh), true).await.map(|_| ())
    }

    fn sign<T: Serialize>(pem: &str, claims: &T) -> Result<String, TokenError> {
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| TokenError::Internal(e.to_string()))?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(KID.into());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &key).map_err(|e| TokenError::Internal(e.to_string()))
    }

    /// Issue a zone token. Scopes must be a non-empty subset of `ingress`, `egress`.
    pub async fn issue_zone(&self, zone: &str, scopes: &[String], valid_for: Duration) -> Result<String, TokenError> {
        let now = now_unix();
        self.issue_zone_with_times(zone, scopes, now.saturating_sub(5), now + valid_for.as_secs()).await
    }

    /// Issue a zone token with explicit `nbf`/`exp` (tests use this for expired tokens).
    pub async fn issue_zone_with_times(
        &self,
        zone: &str,
        scopes: &[String],
        nbf: u64,
        exp: u64,
    ) -> Result<String, TokenError> {
        if self.federated {
            return Err(TokenError::NotIssuer(
                "zone tokens are issued by the global control plane: run `ctl generate zone-token` against global's \
                 API (this zone control plane only verifies them)"
                    .into(),
            ));
        }
        if zone.is_empty() {
            return Err(TokenError::Invalid("zone: must not be empty".into()));
        }
        if scopes.is_empty() {
            return Err(TokenError::Invalid("scope: must contain at least one of ingress, egress".into()));
        }
        if let Some(bad) = scopes.iter().find(|s| !ZONE_SCOPES.contains(&s.as_str())) {
            return Err(TokenError::Invalid(format!("scope: {bad:?} is not one of ingress, egress")));
        }
        let pem = self
            .signing_key(ResourceType::GlobalSecret, "", &zone_key_name(), true)
            .await?
            .ok_or_else(|| TokenError::Internal("no zone signing key".into()))?;
        let claims =
            ZoneClaims { zone: zone.into(), scope: scopes.to_vec(), exp, iat: nbf + 5, nbf, jti: random_uuid() };
        Self::sign(&pem, &claims)
    }

    /// Issue a dataplane token for a mesh (the mesh's signing key is created on first use).
    pub async fn issue_dataplane(
        &self,
        mut claims: DataplaneClaims,
        valid_for: Duration,
    ) -> Result<String, TokenError> {
        if claims.mesh.is_empty() {
            return Err(TokenError::Invalid("mesh: must not be empty".into()));
        }
        if claims.proxy_type.parse::<kuma_model::proxy::ProxyType>().is_err() {
            return Err(TokenError::Invalid("type: must be one of dataplane, ingress, egress".into()));
        }
        let pem = self
            .signing_key(ResourceType::Secret, &claims.mesh, &dataplane_key_name(&claims.mesh), !self.federated)
            .await?
            .ok_or_else(|| {
                TokenError::NotIssuer(format!(
                    "the dataplane token signing key of mesh {:?} has not arrived from the global control plane yet",
                    claims.mesh
                ))
            })?;
        let now = now_unix();
        claims.nbf = now.saturating_sub(5);
        claims.iat = now;
        claims.exp = now + valid_for.as_secs();
        claims.jti = random_uuid();
        Self::sign(&pem, &claims)
    }

    async fn verify<T: for<'de> Deserialize<'de>>(
        &self,
        token: &str,
        rtype: ResourceType,
        mesh: &str,
        key_prefix: &str,
    ) -> Result<T, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        let kid = header.kid.ok_or(TokenError::NoKid)?;
        if !kid.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') || kid.len() > 32 {
            return Err(TokenError::UnknownKey(kid));
        }
        let pem = self
            .signing_key(rtype, mesh, &format!("{key_prefix}{kid}"), false)
            .await?
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        // A private key (where tokens are minted) or the public key global sent (a federated zone).
        let public = if pem.contains("PUBLIC KEY") {
            pem
        } else {
            rcgen::KeyPair::from_pem(&pem).map_err(|e| TokenError::Internal(e.to_string()))?.public_key_pem()
        };
        let key = DecodingKey::from_rsa_pem(public.as_bytes()).map_err(|e| TokenError::Internal(e.to_string()))?;
        let mut v = Validation::new(Algorithm::RS256);
        v.leeway = 0;
        v.validate_nbf = true;
        v.validate_aud = false;
        jsonwebtoken::decode::<T>(token, &key, &v).map(|d| d.claims).map_err(map_jwt_error)
    }

    /// Validate a zone token for a zone proxy of `scope` (`ingress`/`egress`) on the CP of `cp_zone`.
    pub async fn validate_zone(&self, token: &str, scope: &str, cp_zone: &str) -> Result<ZoneClaims, TokenError> {
        let prefix = if self.federated { ZONE_TOKEN_PUBLIC_KEY_PREFIX } else { ZONE_TOKEN_KEY_PREFIX };
        let claims: ZoneClaims = self.verify(token, ResourceType::GlobalSecret, "", prefix).await?;
        if !claims.scope.iter().any(|s| s == scope) {
            return Err(TokenError::Scope(scope.into()));
        }
        if !claims.zone.is_empty() && claims.zone != cp_zone {
            return Err(TokenError::WrongZone { token_zone: claims.zone, cp_zone: cp_zone.into() });
        }
        Ok(claims)
    }

    /// Validate a dataplane token for the Dataplane `mesh`/`name` with inbound `tags`.
    pub async fn validate_dataplane(
        &self,
        token: &str,
        mesh: &str,
        name: &str,
        tags: &BTreeMap<String, Vec<String>>,
    ) -> Result<DataplaneClaims, TokenError> {
        let prefix = format!("dataplane-token-signing-key-{mesh}-");
        let claims: DataplaneClaims = self.verify(token, ResourceType::Secret, mesh, &prefix).await?;
        if !claims.mesh.is_empty() && claims.mesh != mesh {
            return Err(TokenError::Mismatch { what: "mesh", token: claims.mesh, actual: mesh.into() });
        }
        if !claims.name.is_empty() && claims.name != name {
            return Err(TokenError::Mismatch { what: "name", token: claims.name, actual: name.into() });
        }
        for (k, allowed) in &claims.tags {
            let Some(values) = tags.get(k) else {
                return Err(TokenError::Mismatch { what: "tag", token: k.clone(), actual: "absent".into() });
            };
            if let Some(v) = values.iter().find(|v| !allowed.contains(v)) {
                return Err(TokenError::Mismatch {
                    what: "tag value",
                    token: format!("{k}={allowed:?}"),
                    actual: v.clone(),
                });
            }
        }
        Ok(claims)
    }
}

/// Writes a private key readable by the owner only.
fn write_private(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(pem.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn zone_token_round_trip_and_refusals() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let t = Tokens::new(Arc::new(MemoryStore::new()), false);
        let tok = t.issue_zone("zone-1", &["ingress".into()], Duration::from_secs(60)).await.unwrap();
        let h = jsonwebtoken::decode_header(&tok).unwrap();
        assert_eq!(h.kid.as_deref(), Some("1"));
        assert_eq!(h.alg, Algorithm::RS256);
        let c = t.validate_zone(&tok, "ingress", "zone-1").await.unwrap();
        assert_eq!(c.zone, "zone-1");
        assert!(matches!(t.validate_zone(&tok, "egress", "zone-1").await, Err(TokenError::Scope(_))));
        let e = t.validate_zone(&tok, "ingress", "zone-2").await.unwrap_err();
        assert_eq!(e.to_string(), "token is for zone zone-1, this is zone-2");
        // Tampered payload.
        let mut parts: Vec<String> = tok.split('.').map(String::from).collect();
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"Zone":"zone-1","Scope":["ingress","egress"],"exp":9999999999}"#);
        let forged = parts.join(".");
        assert!(matches!(t.validate_zone(&forged, "egress", "zone-1").await, Err(TokenError::BadSignature)));
        let now = now_unix();
        let old = t.issue_zone_with_times("zone-1", &["ingress".into()], now - 100, now - 10).await.unwrap();
        assert!(matches!(t.validate_zone(&old, "ingress", "zone-1").await, Err(TokenError::Expired)));
    }

    #[tokio::test]
    async fn a_federated_zone_verifies_with_the_public_key_and_mints_nothing() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let global = Tokens::new(Arc::new(MemoryStore::new()), false);
        let tok = global.issue_zone("zone-1", &["ingress".into()], Duration::from_secs(60)).await.unwrap();
        let private =
            global.signing_key(ResourceType::GlobalSecret, "", &zone_key_name(), false).await.unwrap().unwrap();
        let public = rsa_public_key_pem(&private).unwrap();
        assert!(public.starts_with("-----BEGIN RSA PUBLIC KEY-----\n"), "{public}");
        let zone_store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut r = Resource::new(ResourceType::GlobalSecret, "", "zone-token-signing-public-key-1");
        r.spec.insert("data".into(), base64::engine::general_purpose::STANDARD.encode(public).into());
        zone_store.upsert(r, None).await.unwrap();
        let zone = Tokens::new(zone_store, true);
        assert_eq!(zone.validate_zone(&tok, "ingress", "zone-1").await.unwrap().zone, "zone-1");
        assert!(matches!(
            zone.issue_zone("zone-1", &["ingress".into()], Duration::from_secs(60)).await,
            Err(TokenError::NotIssuer(_))
        ));
    }
}
