//! Builtin mesh CA (Kuma's `builtin` mTLS backend) and data plane identity certificates.
//!
//! * The CA (RSA 2048, self-signed, `O=Kuma, OU=Mesh, CN=<mesh>`, URI SAN `spiffe://<mesh>`,
//!   10 years) is created once per mesh and backend and stored as Kuma's secrets
//!   `<mesh>.ca-builtin-cert-<backend>` / `<mesh>.ca-builtin-key-<backend>` (base64 PEM in
//!   `data`). It is also written to `<work dir>/mesh-ca/` so that it survives a restart of
//!   the in-memory store: re-applying the Mesh brings the same CA back.
//! * Only where the Mesh is created (global, or a standalone zone): a federated zone signs
//!   with the CA secrets global sends it, and never makes one of its own.
//! * Identity certificates (RSA 2048, empty subject, URI SANs `spiffe://<mesh>/<service>`
//!   and `kuma://<tag>/<value>`, server+client auth) are issued on demand, kept in memory
//!   only (as Kuma does), and re-issued after 4/5 of their lifetime, or when the proxy's
//!   tags or the mesh CA change.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

use crate::model::{Resource, ResourceType};
use crate::store::{Store, StoreError, WriteOp};

/// Kuma's clock skew allowance for `NotBefore`.
const CLOCK_SKEW: Duration = Duration::from_secs(10);
/// Kuma's default CA validity: 10 years.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Name of the SDS secret with a proxy's identity certificate (`GetSecretName`).
pub fn identity_secret_name(mesh: &str) -> String {
    format!("identity_cert:secret:{mesh}")
}

/// Name of the SDS secret with the mesh CA (validation context).
pub fn mesh_ca_secret_name(mesh: &str) -> String {
    format!("mesh_ca:secret:{mesh}")
}

pub fn ca_cert_secret_name(mesh: &str, backend: &str) -> String {
    format!("{mesh}.ca-builtin-cert-{backend}")
}

pub fn ca_key_secret_name(mesh: &str, backend: &str) -> String {
    format!("{mesh}.ca-builtin-key-{backend}")
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("mesh CA: {0}")]
    Store(String),
    #[error("mesh CA: cannot generate a certificate: {0}")]
    Crypto(String),
    #[error("mesh CA: {0}")]
    Io(String),
}

/// A mesh CA: certificate and key, PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// An issued identity certificate.
#[derive(Clone, Debug)]
pub struct IdentityCert {
    pub cert_pem: String,
    pub key_pem: String,
    /// When it was issued (wall clock).
    pub issued: SystemTime,
    pub lifetime: Duration,
    /// What it was issued for: a change re-issues.
    fingerprint: String,
}

impl IdentityCert {
    /// Kuma re-issues after 4/5 of the lifetime.
    pub fn rotate_at(&self) -> SystemTime {
        self.issued + self.lifetime.mul_f64(0.8)
    }
}

/// CA and identity certificate manager (one per control plane).
pub struct CaManager {
    work_dir: PathBuf,
    /// False on a federated zone: the CA comes from global.
    may_create: bool,
    /// Serialises CA creation (two streams must not create two CAs).
    create: tokio::sync::Mutex<()>,
    /// (mesh, dataplane) -> current certificate.
    certs: Mutex<HashMap<(String, String), IdentityCert>>,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

fn secret_pem(r: &Resource) -> Option<String> {
    let data = r.spec.get("data")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(data).ok()?;
    String::from_utf8(bytes).ok()
}

fn crypto(e: impl std::fmt::Display) -> CaError {
    CaError::Crypto(e.to_string())
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // non-zero, no leading zero byte
    SerialNumber::from_slice(&b)
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Generate a mesh CA as Kuma's builtin CA plugin does.
pub fn generate_ca(mesh: &str) -> Result<MeshCa, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(crypto)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Kuma");
    dn.push(DnType::OrganizationalUnitName, "Mesh");
    dn.push(DnType::CommonName, mesh);
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{mesh}").try_into().map_err(crypto)?)];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.serial_number = Some(random_serial());
    let now = SystemTime::now();
    p.not_before = offset(now - CLOCK_SKEW);
    p.not_after = offset(now + CA_VALIDITY);
    let cert = p.self_signed(&key).map_err(crypto)?;
    Ok(MeshCa { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issue an identity certificate for a proxy of `mesh` with the given inbound tags
/// (tag -> values): URI SANs `spiffe://<mesh>/<service>` for every `kuma.io/service` value,
/// then `kuma://<tag>/<value>` for every tag value (tags and values sorted).
pub fn issue_identity(
    ca: &MeshCa,
    mesh: &str,
    tags: &BTreeMap<String, BTreeSet<String>>,
    lifetime: Duration,
) -> Result<(String, String, SystemTime), CaError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(crypto)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(crypto)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).map_err(crypto)?;
    let mut p = CertificateParams::default();
    // Subject deliberately empty (Kuma); rcgen then marks the SAN extension critical.
    p.distinguished_name = DistinguishedName::new();
    let mut sans = Vec::new();
    for svc in tags.get(crate::model::SERVICE_TAG).into_iter().flatten() {
        sans.push(SanType::URI(format!("spiffe://{mesh}/{svc}").try_into().map_err(crypto)?));
    }
    for (k, values) in tags {
        for v in values {
            sans.push(SanType::URI(format!("kuma://{k}/{v}").try_into().map_err(crypto)?));
        }
    }
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages =
        vec![KeyUsagePurpose::KeyEncipherment, KeyUsagePurpose::KeyAgreement, KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.serial_number = Some(random_serial());
    let now = SystemTime::now();
    p.not_before = offset(now - CLOCK_SKEW);
    p.not_after = offset(now + lifetime);
    let cert = p.signed_by(&key, &issuer).map_err(crypto)?;
    Ok((cert.pem(), key.serialize_pem(), now))
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?
    };
    #[cfg(not(unix))]
    let mut f = std::fs::File::create(path)?;
    f.write_all(data.as_bytes())
}

impl CaManager {
    pub fn new(work_dir: PathBuf, may_create: bool) -> Self {
        CaManager { work_dir, may_create, create: tokio::sync::Mutex::new(()), certs: Mutex::new(HashMap::new()) }
    }

    fn files(&self, mesh: &str, backend: &str) -> (PathBuf, PathBuf) {
        let dir = self.work_dir.join("mesh-ca");
        (
            dir.join(format!("{}.pem", ca_cert_secret_name(mesh, backend))),
            dir.join(format!("{}.pem", ca_key_secret_name(mesh, backend))),
        )
    }

    async fn load(store: &dyn Store, mesh: &str, backend: &str) -> Result<Option<MeshCa>, CaError> {
        let get = |name: String| async move {
            store.get(ResourceType::Secret, mesh, &name).await.map_err(|e| CaError::Store(e.to_string()))
        };
        let cert = get(ca_cert_secret_name(mesh, backend)).await?;
        let key = get(ca_key_secret_name(mesh, backend)).await?;
        Ok(match (cert.as_ref().and_then(secret_pem), key.as_ref().and_then(secret_pem)) {
            (Some(cert_pem), Some(key_pem)) => Some(MeshCa { cert_pem, key_pem }),
            _ => None,
        })
    }

    /// The CA of `mesh`'s builtin backend `backend`: from the store, else from the work
    /// directory, else newly generated; stored (and written to the work dir) when new.
    pub async fn ensure_ca(&self, store: &Arc<dyn Store>, mesh: &str, backend: &str) -> Result<MeshCa, CaError> {
        if let Some(ca) = Self::load(store.as_ref(), mesh, backend).await? {
            return Ok(ca);
        }
        if !self.may_create {
            return Err(CaError::Store(format!(
                "the CA of mesh {mesh:?} (backend {backend:?}) has not arrived from the global control plane yet"
            )));
        }
        let _guard = self.create.lock().await;
        if let Some(ca) = Self::load(store.as_ref(), mesh, backend).await? {
            return Ok(ca);
        }
        // The work-directory copy lets the memory store bring the same CA back after a
        // restart; a durable store keeps it itself.
        let durable = store.durable();
        let (cert_file, key_file) = self.files(mesh, backend);
        let from_disk = match (std::fs::read_to_string(&cert_file), std::fs::read_to_string(&key_file)) {
            (Ok(cert_pem), Ok(key_pem)) if !durable && KeyPair::from_pem(&key_pem).is_ok() => {
                Some(MeshCa { cert_pem, key_pem })
            }
            _ => None,
        };
        let ca = match from_disk {
            Some(ca) => {
                tracing::info!(mesh, backend, path = %cert_file.display(), "mesh CA restored from the work directory");
                ca
            }
            None => {
                let m = mesh.to_string();
                let ca = tokio::task::spawn_blocking(move || generate_ca(&m))
                    .await
                    .map_err(|e| CaError::Crypto(e.to_string()))??;
                if !durable {
                    if let Some(dir) = cert_file.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| CaError::Io(format!("{}: {e}", dir.display())))?;
                    }
                    write_private(&key_file, &ca.key_pem)
                        .map_err(|e| CaError::Io(format!("{}: {e}", key_file.display())))?;
                    std::fs::write(&cert_file, &ca.cert_pem)
                        .map_err(|e| CaError::Io(format!("{}: {e}", cert_file.display())))?;
                }
                ca
            }
        };
        // Both secrets in one write that fails if either exists: of two instances creating
        // the CA at once, one wins entirely and the other takes its CA.
        let mut changes = store.subscribe();
        let ops =
            [(ca_cert_secret_name(mesh, backend), &ca.cert_pem), (ca_key_secret_name(mesh, backend), &ca.key_pem)]
                .into_iter()
                .map(|(name, pem)| {
                    let mut r = Resource::new(ResourceType::Secret, mesh, &name);
                    r.spec.insert("data".into(), b64(pem).into());
                    WriteOp::Create(r)
                })
                .collect();
        match store.apply(ops).await {
            Ok(()) => {
                tracing::info!(mesh, backend, "mesh CA generated (builtin backend)");
                Ok(ca)
            }
            Err(StoreError::Conflict { .. }) => {
                // Another instance created it first: wait until its write is in our copy.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    if let Some(theirs) = Self::load(store.as_ref(), mesh, backend).await? {
                        return Ok(theirs);
                    }
                    if tokio::time::timeout_at(deadline, changes.changed()).await.map_or(true, |r| r.is_err()) {
                        return Err(CaError::Store(format!(
                            "the CA of mesh {mesh:?} was created elsewhere but has not reached this instance"
                        )));
                    }
                }
            }
            Err(e) => Err(CaError::Store(e.to_string())),
        }
    }

    /// The identity certificate of a proxy: the cached one unless it must rotate (4/5 of
    /// its lifetime passed) or was issued for other tags, CA or lifetime.
    pub async fn identity(
        &self,
        ca: &MeshCa,
        mesh: &str,
        proxy: &str,
        tags: &BTreeMap<String, BTreeSet<String>>,
        lifetime: Duration,
    ) -> Result<IdentityCert, CaError> {
        let fingerprint = format!("{tags:?}|{lifetime:?}|{}", ca.cert_pem);
        let key = (mesh.to_string(), proxy.to_string());
        if let Ok(m) = self.certs.lock()
            && let Some(c) = m.get(&key)
            && c.fingerprint == fingerprint
            && SystemTime::now() < c.rotate_at()
        {
            return Ok(c.clone());
        }
        let (ca2, mesh2, tags2) = (ca.clone(), mesh.to_string(), tags.clone());
        let (cert_pem, key_pem, issued) =
            tokio::task::spawn_blocking(move || issue_identity(&ca2, &mesh2, &tags2, lifetime))
                .await
                .map_err(|e| CaError::Crypto(e.to_string()))??;
        let cert = IdentityCert { cert_pem, key_pem, issued, lifetime, fingerprint };
        tracing::debug!(mesh, proxy, lifetime = ?lifetime, "identity certificate issued");
        if let Ok(mut m) = self.certs.lock() {
            // Another stream of the same proxy may have issued one meanwhile: keep the newest.
            m.insert(key, cert.clone());
        }
        Ok(cert)
    }

    /// Forget the certificate of a proxy (e.g. when it is deleted).
    pub fn forget(&self, mesh: &str, proxy: &str) {
        if let Ok(mut m) = self.certs.lock() {
            m.remove(&(mesh.to_string(), proxy.to_string()));
        }
    }
}
