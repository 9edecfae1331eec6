//! Changes to `--xds-file`, as they happen: inotify on the file's directory (so a file
//! replaced by rename is seen as well as one rewritten in place). Polling stays as the
//! fallback where inotify is unavailable, and as a slow safety net where it is.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tokio::io::unix::AsyncFd;

/// Wakes when something in a directory is written, created, moved in or removed.
pub struct DirEvents {
    fd: AsyncFd<OwnedFd>,
}

impl DirEvents {
    /// Watches `dir`; `None` when inotify cannot be used here (the caller polls).
    pub fn new(dir: &Path) -> Option<DirEvents> {
        // SAFETY: inotify_init1 has no pointer arguments.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mask = libc::IN_CLOSE_WRITE
            | libc::IN_MODIFY
            | libc::IN_MOVED_TO
            | libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_ATTRIB;
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
            return None;
        }
        // SAFETY: an `OwnedFd` always returns the descriptor it owns, and keeps it open
        // until the `AsyncFd` drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()?;
        Some(DirEvents { fd })
    }

    /// Resolves once something changed since the last call (the events themselves are
    /// read and dropped: the caller looks at the file).
    pub async fn changed(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer we own, of the length we pass.
            let n = unsafe { libc::read(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    return Ok(());
                }
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_and_a_rename_in_the_directory_wake_the_watcher() {
        let dir = std::env::temp_dir().join(format!("dp-file-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let events = DirEvents::new(&dir).expect("inotify");
        std::fs::write(dir.join("a.yaml"), "x").unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), events.changed()).await.unwrap().unwrap();
        std::fs::write(dir.join("b.tmp"), "y").unwrap();
        std::fs::rename(dir.join("b.tmp"), dir.join("a.yaml")).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), events.changed()).await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
