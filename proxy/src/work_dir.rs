//! kuma-dp's work directory: `--work-dir` (`KUMA_DATAPLANE_RUNTIME_WORK_DIR`), or, as
//! kuma-dp does when none is given, a fresh `kuma-dp-*` directory (mode 0711) under the
//! system's temporary directory, removed on exit. Its path goes to the control plane as the
//! node's `workdir`, which places the proxy's Unix sockets (the metrics socket, the dynamic
//! configuration one) in it; a relative or empty path would put them wherever dp's current
//! directory happens to be.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub struct WorkDir {
    path: PathBuf,
    /// Made by dp, so removed by dp.
    owned: bool,
}

impl WorkDir {
    /// The given directory, or a new temporary one.
    pub fn resolve(given: Option<&Path>) -> anyhow::Result<WorkDir> {
        if let Some(p) = given {
            return Ok(WorkDir { path: p.to_path_buf(), owned: false });
        }
        let base = std::env::temp_dir();
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        // The pid and the clock make the name unique on this host; `create` (not
        // `create_all`) refuses an existing directory rather than sharing it.
        let path = base.join(format!("kuma-dp-{}-{:x}", std::process::id(), stamp & 0xffff_ffff));
        std::fs::DirBuilder::new().mode(0o711).create(&path).map_err(|e| {
            anyhow::anyhow!(
                "cannot create a work directory in {}: {e}; pass --work-dir (KUMA_DATAPLANE_RUNTIME_WORK_DIR)",
                base.display()
            )
        })?;
        Ok(WorkDir { path, owned: true })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Kuma's socket names in the work dir (`kuma-mh-…`, `kuma-al-…`): the joined path cut to
/// 98 bytes (so that it fits a socket address on every platform), then `.sock`. The
/// control plane computes the same path from the node's `workdir`, name and mesh.
pub fn socket_path(workdir: &Path, kind: &str, name: &str, mesh: &str) -> PathBuf {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let joined = workdir.join(format!("{kind}-{name}-{mesh}"));
    let mut bytes = joined.as_os_str().as_bytes().to_vec();
    bytes.truncate(98);
    bytes.extend_from_slice(b".sock");
    PathBuf::from(OsString::from_vec(bytes))
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.owned {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_made_work_dir_is_private_to_others_and_removed_a_given_one_is_kept() {
        use std::os::unix::fs::PermissionsExt;
        let made = WorkDir::resolve(None).unwrap();
        let path = made.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o711);
        std::fs::write(path.join("f"), "x").unwrap();
        drop(made);
        assert!(!path.exists(), "{} should be gone", path.display());

        let given = WorkDir::resolve(None).unwrap();
        let kept = WorkDir::resolve(Some(given.path())).unwrap();
        drop(kept);
        assert!(given.path().exists());
    }
}
