//! Changes to `--xds-file`, as they happen: inotify on the file's directory (so a file
//! replaced by rename is seen as well as one rewritten in place). Polling stays as the
//! fallback where inotify is unavailable, and as a slow safety net where it is.
//!
//! Other files in the directory are written too (dp's own log, when a user puts it
//! beside its config): a write to another file wakes nobody; only the file's own events
//! and structural changes (names created, moved in or removed, as Kubernetes' atomic
//! ConfigMap update swaps its `..data` link) do.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tokio::io::unix::AsyncFd;

/// Wakes when the file `name` in a directory is written, or when a name in the directory
/// is created, moved in or removed.
pub struct DirEvents {
    fd: AsyncFd<OwnedFd>,
    name: OsString,
}

/// The fixed part of a `struct inotify_event`: wd, mask, cookie, len (then `len` bytes
/// of NUL-padded name).
const EVENT_HEADER: usize = 16;

/// Whether the events in `buf` (as read from an inotify descriptor) concern `name`.
fn concerns(buf: &[u8], name: &[u8]) -> bool {
    let mut rest = buf;
    let mut any = false;
    while rest.len() >= EVENT_HEADER {
        let word = |i: usize| u32::from_ne_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let (mask, len) = (word(4), word(12) as usize);
        let Some(raw) = rest.get(EVENT_HEADER..EVENT_HEADER + len) else { return true };
        let event_name = raw.split(|b| *b == 0).next().unwrap_or(&[]);
        let structural = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_DELETE | libc::IN_Q_OVERFLOW | libc::IN_IGNORED;
        any |= mask & structural != 0 || event_name == name;
        rest = &rest[EVENT_HEADER + len..];
    }
    any
}

impl DirEvents {
    /// Watches `dir` for the file `name`; `None` when inotify cannot be used here (the
    /// caller polls).
    pub fn new(dir: &Path, name: &OsStr) -> Option<DirEvents> {
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
        Some(DirEvents { fd, name: name.to_owned() })
    }

    /// Resolves once the file may have changed since the last call (the events are read
    /// and dropped: the caller looks at the file).
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let relevant = self.pending()?;
            guard.clear_ready();
            if relevant {
                return Ok(());
            }
        }
    }

    /// Reads every queued event; whether one of them concerns the file.
    fn pending(&self) -> io::Result<bool> {
        let mut buf = [0u8; 4096];
        let mut relevant = false;
        loop {
            // SAFETY: reading into a buffer we own, of the length we pass.
            let n = unsafe { libc::read(self.fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock { Ok(relevant) } else { Err(e) };
            }
            relevant |= concerns(&buf[..n as usize], self.name.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_and_a_rename_wake_the_watcher_and_writes_to_other_files_do_not() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("dp-file-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = std::fs::File::create(dir.join("dp.log")).unwrap();
        let events = DirEvents::new(&dir, OsStr::new("a.yaml")).expect("inotify");
        let wait = || tokio::time::timeout(std::time::Duration::from_secs(5), events.changed());
        std::fs::write(dir.join("a.yaml"), "x").unwrap();
        wait().await.unwrap().unwrap();
        std::fs::write(dir.join("b.tmp"), "y").unwrap();
        std::fs::rename(dir.join("b.tmp"), dir.join("a.yaml")).unwrap();
        wait().await.unwrap().unwrap();
        // Appends to another file are not a change (inotify queues an event within the
        // write(2) itself, so they are all there to read); a write to ours is.
        for _ in 0..100 {
            writeln!(log, "a log line").unwrap();
        }
        assert!(!events.pending().unwrap(), "a write to dp.log concerned the watched file");
        std::fs::write(dir.join("a.yaml"), "z").unwrap();
        assert!(events.pending().unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn events_concern_the_file_or_the_directory_structure() {
        let event = |mask: u32, name: &[u8]| {
            let len = name.len().div_ceil(16) * 16;
            let mut e = vec![];
            for w in [1u32, mask, 0, len as u32] {
                e.extend_from_slice(&w.to_ne_bytes());
            }
            e.extend_from_slice(name);
            e.resize(EVENT_HEADER + len, 0);
            e
        };
        let name = b"a.yaml";
        assert!(concerns(&event(libc::IN_MODIFY, b"a.yaml"), name));
        assert!(!concerns(&event(libc::IN_MODIFY, b"dp.log"), name));
        assert!(!concerns(&[event(libc::IN_MODIFY, b"dp.log"), event(libc::IN_CLOSE_WRITE, b"x")].concat(), name));
        assert!(concerns(&[event(libc::IN_MODIFY, b"dp.log"), event(libc::IN_CLOSE_WRITE, b"a.yaml")].concat(), name));
        // Kubernetes swaps `..data`; a rename over the file arrives as MOVED_TO.
        assert!(concerns(&event(libc::IN_MOVED_TO, b"..data"), name));
        assert!(concerns(&event(libc::IN_CREATE, b"tmp"), name));
        assert!(concerns(&event(libc::IN_Q_OVERFLOW, b""), name));
        assert!(!concerns(&event(libc::IN_MODIFY, b"a.yaml.bak"), name));
    }
}
