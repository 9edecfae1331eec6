//! Zero-copy forwarding for plain TCP on both sides (the zone ingress passthrough
//! case): socket -> pipe -> socket with splice(2), so the bytes never enter user
//! space. Measured against the buffered copy in `benches/` (issue 2): at 16
//! connections 1.8x the throughput for 0.35x the CPU per byte.
#![allow(unsafe_code)]

use crate::copy::{End, Transferred};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most bytes moved per splice call: Linux's default pipe capacity.
const PIPE_SIZE: usize = 64 * 1024;
/// Idle pipes kept per worker thread for the next connections.
const POOL: usize = 64;

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

thread_local! {
    static IDLE: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pipe {
    /// An empty pipe: a pooled one, or a new one. Reusing pipes saves four syscalls
    /// (pipe2 and two closes per pipe) on every connection.
    fn take() -> io::Result<Pipe> {
        if let Some(p) = IDLE.with(|idle| idle.borrow_mut().pop()) {
            return Ok(p);
        }
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { r, w })
    }

    /// Returns a drained pipe to this thread's pool (a pipe that may still hold bytes
    /// is closed instead, so no connection ever sees another's data).
    fn give_back(self) {
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            if idle.len() < POOL {
                idle.push(self);
            }
        });
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two open descriptors; no user memory is involved.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// One direction; on end of stream, half-closes the writer. A pipe is held only while
/// bytes are in flight: an idle connection holds none (two descriptors and a pipe
/// buffer less per direction, which matters at tens of thousands of idle connections).
async fn one_way(r: &TcpStream, w: &TcpStream, count: &AtomicU64) -> io::Result<()> {
    let mut fallback: Vec<u8> = Vec::new();
    loop {
        r.readable().await?;
        let pipe = match Pipe::take() {
            Ok(p) => p,
            // Out of descriptors: this chunk goes through user space, so the connections
            // dp holds keep moving while it cannot open anything new.
            Err(_) => {
                if fallback.is_empty() {
                    fallback.resize(16 * 1024, 0);
                }
                match copy_chunk(r, w, &mut fallback).await? {
                    0 => {
                        // SAFETY: shutdown(2) on a socket the caller keeps open.
                        unsafe { libc::shutdown(w.as_raw_fd(), libc::SHUT_WR) };
                        return Ok(());
                    }
                    n => {
                        count.fetch_add(n as u64, Ordering::Relaxed);
                        continue;
                    }
                }
            }
        };
        let n = match r.try_io(Interest::READABLE, || splice(r.as_raw_fd(), pipe.w.as_raw_fd(), PIPE_SIZE)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing was read: the pipe is still empty.
                pipe.give_back();
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            // SAFETY: shutdown(2) on a socket the caller keeps open.
            unsafe { libc::shutdown(w.as_raw_fd(), libc::SHUT_WR) };
            pipe.give_back();
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            w.writable().await?;
            match w.try_io(Interest::WRITABLE, || splice(pipe.r.as_raw_fd(), w.as_raw_fd(), left)) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        // Every byte read into the pipe was written out: it is empty again.
        pipe.give_back();
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One read into `buf` and its write out, for when no pipe can be had; 0 at end of
/// stream. A read that would block moves nothing and returns after the next readiness.
async fn copy_chunk(r: &TcpStream, w: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let n = loop {
        match r.try_read(buf) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => r.readable().await?,
            Err(e) => return Err(e),
        }
    };
    let mut done = 0;
    while done < n {
        w.writable().await?;
        match w.try_write(&buf[done..n]) {
            Ok(m) => done += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Forwards both ways until both have ended, or until nothing moved for `idle`.
/// Same contract as `copy::bidirectional`, without the prefix (write it first).
pub async fn bidirectional(
    down: &TcpStream,
    up: &TcpStream,
    idle: Option<Duration>,
) -> (Transferred, End, Option<io::Error>) {
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = crate::copy::both_ways(one_way(down, up, &sent), one_way(up, down, &received));
    let (end, err) =
        crate::copy::with_idle_timeout(both, idle, || sent.load(Ordering::Relaxed) + received.load(Ordering::Relaxed))
            .await;
    (Transferred { sent: sent.load(Ordering::Relaxed), received: received.load(Ordering::Relaxed) }, end, err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn drained_pipes_are_reused_without_leaking_bytes() {
        for round in 0..3u8 {
            let (mut client, down) = pair().await;
            let (up, mut server) = pair().await;
            let proxy = async { bidirectional(&down, &up, None).await };
            let traffic = async {
                client.write_all(&[round; 1000]).await.unwrap();
                client.shutdown().await.unwrap();
                let mut got = vec![];
                server.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, vec![round; 1000], "round {round} sees only its own bytes");
                server.shutdown().await.unwrap();
            };
            let ((_, end, err), ()) = tokio::join!(proxy, traffic);
            assert_eq!(end, End::Closed);
            assert!(err.is_none());
            // Both directions ended cleanly: the pipes they used are back in this thread's
            // pool (one or two: a pipe is held only while bytes are in flight).
            assert!((1..=2).contains(&IDLE.with(|i| i.borrow().len())));
        }
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_pipe() {
        // Fill this thread's pool with a pipe or two.
        let (mut client, down) = pair().await;
        let (up, mut server) = pair().await;
        let warm = async {
            client.write_all(b"x").await.unwrap();
            client.shutdown().await.unwrap();
            server.read_to_end(&mut vec![]).await.unwrap();
            server.shutdown().await.unwrap();
        };
        let _ = tokio::join!(bidirectional(&down, &up, None), warm);
        let pooled = IDLE.with(|i| i.borrow().len());
        assert!(pooled >= 1);
        // A connection with nothing to move waits for readiness without a pipe.
        let (_client, down) = pair().await;
        let (up, _server) = pair().await;
        let idle = bidirectional(&down, &up, None);
        tokio::pin!(idle);
        for _ in 0..10 {
            assert!(futures_poll_once(idle.as_mut()).await.is_none());
        }
        assert_eq!(IDLE.with(|i| i.borrow().len()), pooled, "an idle connection took a pipe");
    }

    /// Polls a future once; `None` when it is still pending.
    async fn futures_poll_once<F: std::future::Future + Unpin>(f: F) -> Option<F::Output> {
        let mut f = f;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut f).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }

    #[tokio::test]
    async fn forwards_both_ways_with_half_close() {
        let (mut client, down) = pair().await;
        let (up, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&down, &up, None).await });
        let big = vec![7u8; 1 << 20];
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = vec![];
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = vec![];
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        let (t, end, err) = proxy.await.unwrap();
        assert_eq!((t.sent, t.received, end), (1 << 20, 5, End::Closed));
        assert!(err.is_none());
    }
}
