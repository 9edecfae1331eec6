//! kuma-dp's access-log pipe: a FIFO at `<workdir>/kuma-al-<name>-<mesh>.sock` that
//! MeshAccessLog's TCP backends log into. The control plane gives such a backend a file
//! logger on this path whose lines are JSON `{"address": "<host:port>", "message": …}`
//! (or `<host:port>;<message>`); dp, as kuma-dp, reads them and sends each message to
//! its address over TCP, keeping one connection per address.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::unix::pipe;
use tracing::{info, warn};

/// Kuma's `AccessLogSocketName`.
pub fn path(workdir: &Path, name: &str, mesh: &str) -> PathBuf {
    crate::work_dir::socket_path(workdir, "kuma-al", name, mesh)
}

/// Makes the FIFO (replacing what is there, as kuma-dp does) and opens it for reading.
/// It is opened read-write so that it never reads end-of-file between writers.
#[allow(unsafe_code)]
pub fn open(path: &Path) -> Result<pipe::Receiver, String> {
    use std::os::unix::ffi::OsStrExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
    }
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| "the path has a NUL byte".to_string())?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o666) } != 0 {
        return Err(format!("cannot make the access-log pipe {}: {}", path.display(), std::io::Error::last_os_error()));
    }
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .map_err(|e| format!("cannot open the access-log pipe {}: {e}", path.display()))
}

/// What one line asks: the message for an address.
#[derive(Debug, PartialEq)]
struct Entry {
    address: String,
    message: Vec<u8>,
}

/// kuma-dp's reading of a line: JSON `address` and `message` (a string as it is, anything
/// else as JSON and a newline), or `address;message`.
fn parse(line: &[u8]) -> Option<Entry> {
    #[derive(serde::Deserialize)]
    struct Wrapped {
        address: String,
        message: serde_json::Value,
    }
    if let Ok(w) = serde_json::from_slice::<Wrapped>(line) {
        let message = match w.message {
            serde_json::Value::String(s) => s.into_bytes(),
            other => {
                let mut m = other.to_string().into_bytes();
                m.push(b'\n');
                m
            }
        };
        return Some(Entry { address: w.address, message });
    }
    let i = line.iter().position(|&b| b == b';')?;
    Some(Entry { address: String::from_utf8_lossy(&line[..i]).into_owned(), message: line[i + 1..].to_vec() })
}

/// The longest line taken from the pipe; a longer one is dropped (anyone on the host may
/// write into the pipe, as into kuma-dp's).
const MAX_LINE: usize = 1 << 20;

/// Reads one line (with its newline) into `line`, at most [`MAX_LINE`] bytes of it:
/// `Ok(false)` at the end of the pipe, `Ok(true)` with `line` empty for a line too long.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, line: &mut Vec<u8>) -> std::io::Result<bool> {
    use tokio::io::AsyncBufReadExt;
    line.clear();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(!line.is_empty() || too_long);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !too_long {
            line.extend_from_slice(&buf[..take]);
            if line.len() > MAX_LINE {
                too_long = true;
                line.clear();
            }
        }
        r.consume(take);
        if done {
            return Ok(true);
        }
    }
}

/// Reads the pipe for as long as dp runs.
pub async fn stream(rx: pipe::Receiver, path: PathBuf) {
    info!(path = %path.display(), "access-log pipe open");
    let mut lines = BufReader::new(rx);
    let mut senders: HashMap<String, TcpStream> = HashMap::new();
    let mut line = Vec::new();
    loop {
        match read_line(&mut lines, &mut line).await {
            Ok(false) => return,
            Ok(true) if line.is_empty() => {
                warn!(max = MAX_LINE, "access-log line too long; dropped");
                continue;
            }
            Ok(true) => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "the access-log pipe failed; TCP access logs stop");
                return;
            }
        }
        let Some(entry) = parse(&line) else {
            warn!("access-log line is neither JSON with an address nor `address;message`; dropped");
            continue;
        };
        if !senders.contains_key(&entry.address) {
            match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&entry.address)).await {
                Ok(Ok(s)) => {
                    info!(address = %entry.address, "connected to a TCP access-log backend");
                    senders.insert(entry.address.clone(), s);
                }
                Ok(Err(e)) => {
                    warn!(address = %entry.address, error = %e, "cannot reach a TCP access-log backend; line dropped");
                    continue;
                }
                Err(_) => {
                    warn!(address = %entry.address, "connecting to a TCP access-log backend timed out; line dropped");
                    continue;
                }
            }
        }
        let s = senders.get_mut(&entry.address).expect("inserted above");
        if let Err(e) = s.write_all(&entry.message).await {
            warn!(address = %entry.address, error = %e, "a TCP access-log backend failed; line dropped");
            senders.remove(&entry.address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_as_kuma_dp_reads_them() {
        assert_eq!(
            parse(b"{\"address\":\"logs:5000\",\"message\":\"[t] flags\\n\"}\n"),
            Some(Entry { address: "logs:5000".into(), message: b"[t] flags\n".to_vec() })
        );
        assert_eq!(
            parse(b"{\"address\":\"logs:5000\",\"message\":{\"a\":1}}\n"),
            Some(Entry { address: "logs:5000".into(), message: b"{\"a\":1}\n".to_vec() })
        );
        assert_eq!(
            parse(b"logs:5000;plain line\n"),
            Some(Entry { address: "logs:5000".into(), message: b"plain line\n".to_vec() })
        );
        assert_eq!(parse(b"no separator\n"), None);
    }

    #[tokio::test]
    async fn lines_longer_than_the_bound_are_dropped_whole() {
        let mut input = vec![b'x'; MAX_LINE + 10];
        input.extend_from_slice(b"\nnext\nlast");
        let mut r = tokio::io::BufReader::with_capacity(4096, &input[..]);
        let mut line = vec![];
        assert!(read_line(&mut r, &mut line).await.unwrap() && line.is_empty(), "the long line, dropped");
        assert!(read_line(&mut r, &mut line).await.unwrap());
        assert_eq!(line, b"next\n");
        assert!(read_line(&mut r, &mut line).await.unwrap());
        assert_eq!(line, b"last", "the last line without its newline");
        assert!(!read_line(&mut r, &mut line).await.unwrap(), "then the end");
    }

    #[tokio::test]
    async fn a_line_written_into_the_pipe_reaches_its_tcp_backend() {
        use tokio::io::AsyncReadExt;
        let dir = std::env::temp_dir().join(format!("dp-al-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = path(&dir, "web", "default");
        let rx = open(&p).unwrap();
        tokio::spawn(stream(rx, p.clone()));
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = backend.local_addr().unwrap();
        // As the access-log writer opens it: write-only, without blocking.
        let mut tx = pipe::OpenOptions::new().open_sender(&p).unwrap();
        tx.write_all(format!("{{\"address\":\"{addr}\",\"message\":\"hello\\n\"}}\n").as_bytes()).await.unwrap();
        let (mut s, _) = backend.accept().await.unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
