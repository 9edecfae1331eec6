//! kuma-dp's metrics socket (its "metrics hijacker"), `<workdir>/kuma-mh-<name>-<mesh>.sock`.
//!
//! The Prometheus listener a kuma-cp generates for a sidecar (`/metrics`, port 5670 by
//! default, from the Mesh's metrics backend or a MeshMetric) routes to a cluster on this
//! socket, and kuma-dp answers there with Envoy's stats in Prometheus' text format. dp is
//! both processes, so it answers with its own stats: without this socket, a scrape through
//! that listener fails (there is nothing to connect to).

use crate::admin::{Resp, text};
use crate::stats::Registry;
use hyper::StatusCode;
use hyper::header::CONTENT_TYPE;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;

/// Kuma's `MetricsHijackerSocketName`: the joined path cut to 98 bytes (so that it fits a
/// socket address on every platform), then `.sock`. The control plane computes the same
/// path from the node's `workdir`, name and mesh.
pub fn socket_path(workdir: &Path, name: &str, mesh: &str) -> PathBuf {
    let joined = workdir.join(format!("kuma-mh-{name}-{mesh}"));
    let mut bytes = joined.as_os_str().as_bytes().to_vec();
    bytes.truncate(98);
    bytes.extend_from_slice(b".sock");
    PathBuf::from(OsString::from_vec(bytes))
}

/// Binds the socket. A file left there by a process that is gone is replaced; a socket
/// another process still answers on is not taken over (kuma-dp refuses that too).
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    let p = path.display();
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("the metrics socket {p} is in use by another process (another dp or kuma-dp?)"));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale metrics socket {p}: {e}"))?;
    }
    UnixListener::bind(path).map_err(|e| format!("cannot bind the metrics socket {p}: {e}"))
}

/// The answer to any request: every stat, in Prometheus' text format (what kuma-dp relays
/// from Envoy's `/stats?format=prometheus`).
pub fn respond(stats: &Registry) -> Resp {
    let mut r = text(StatusCode::OK, stats.prometheus());
    r.headers_mut().insert(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8".parse().expect("valid header"));
    r
}

/// Serves the socket until the process exits.
pub async fn serve(listener: UnixListener, stats: Arc<Registry>) {
    crate::admin::serve(listener, move |_req| respond(&stats)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_is_kumas_cut_to_98_bytes_before_the_suffix() {
        assert_eq!(
            socket_path(Path::new("/tmp/w"), "backend-1", "default"),
            PathBuf::from("/tmp/w/kuma-mh-backend-1-default.sock")
        );
        let long = "n".repeat(200);
        let p = socket_path(Path::new("/tmp/w"), &long, "default");
        let s = p.to_str().unwrap();
        assert_eq!(s.len(), 98 + ".sock".len());
        assert!(s.starts_with("/tmp/w/kuma-mh-nnn") && s.ends_with("n.sock"), "{s}");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
        let dir = crate::work_dir::WorkDir::resolve(None).unwrap();
        let path = socket_path(dir.path(), "web", "default");
        let first = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert!(err.contains("in use by another process"), "{err}");
        drop(first);
        // The file is still there; nothing answers on it.
        assert!(path.exists());
        let _again = bind(&path).unwrap();
    }
}
