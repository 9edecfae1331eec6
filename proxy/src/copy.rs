//! Bidirectional byte copy between the downstream and upstream sockets, with
//! half-close propagation and an idle timeout.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of each direction's buffer: one full TLS record.
pub const BUF_SIZE: usize = 16 * 1024;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from downstream and written upstream.
    pub sent: u64,
    /// Bytes read from upstream and written downstream.
    pub received: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions reached end of stream.
    Closed,
    IdleTimeout,
}

/// Copies until both directions have ended, or until nothing moved for `idle`.
/// `first` is the downstream's buffer, already holding `pending` bytes (the ClientHello
/// read for routing) to write upstream before anything else.
pub async fn bidirectional<D, U>(
    down: &mut D,
    up: &mut U,
    mut first: Vec<u8>,
    pending: usize,
    idle: Option<Duration>,
) -> (Transferred, End, Option<io::Error>)
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    // The ClientHello buffer is small; copies move BUF_SIZE at a time.
    if first.len() < BUF_SIZE {
        first.resize(BUF_SIZE, 0);
    }
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let (mut dr, mut dw) = tokio::io::split(down);
    let (mut ur, mut uw) = tokio::io::split(up);
    let up_dir = async {
        if pending > 0 {
            uw.write_all(&first[..pending]).await?;
            sent.fetch_add(pending as u64, Ordering::Relaxed);
        }
        pipe(&mut dr, &mut uw, &mut first, &sent).await
    };
    let down_dir = async {
        let mut buf = vec![0u8; BUF_SIZE];
        pipe(&mut ur, &mut dw, &mut buf, &received).await
    };
    let both = both_ways(up_dir, down_dir);
    let progress = || sent.load(Ordering::Relaxed) + received.load(Ordering::Relaxed);
    let (end, err) = with_idle_timeout(both, idle, progress).await;
    let t = Transferred { sent: sent.load(Ordering::Relaxed), received: received.load(Ordering::Relaxed) };
    (t, end, err)
}

/// Runs the two directions of a connection: a half-close (`Ok`) of one leaves the other
/// running; an error of either (a reset) ends both at once, so the caller closes the
/// other side too instead of leaving its peer waiting (Envoy closes a connection whose
/// upstream resets).
///
/// Both directions are polled on every wake of the task, each with the task's own waker.
/// Polling the direction that has nothing to do is cheap: a plain socket read returns
/// `Pending` from tokio's readiness, and a TLS read looks at BoringSSL's buffers and the
/// socket's readiness before it calls `SSL_read` (`tls::stream`). Until that check
/// existed, each direction had a waker of its own that marked it woken and then woke the
/// task; that chain (two more objects and a lock touched per wake, after the peer sidecar
/// had just run on the same CPU) cost more time per hop than the polls it saved
/// (benches/relay_sched.py, benches/mtls_analysis.md).
pub async fn both_ways<A, B>(a: A, b: B) -> Option<io::Error>
where
    A: Future<Output = io::Result<()>>,
    B: Future<Output = io::Result<()>>,
{
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    let (mut a_done, mut b_done) = (false, false);
    std::future::poll_fn(|cx| {
        if !a_done {
            match a.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => a_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(e)),
                Poll::Pending => {}
            }
        }
        if !b_done {
            match b.as_mut().poll(cx) {
                Poll::Ready(Ok(())) => b_done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Some(e)),
                Poll::Pending => {}
            }
        }
        if a_done && b_done { Poll::Ready(None) } else { Poll::Pending }
    })
    .await
}

/// Runs `both` (the two directions) until it ends, or until `progress` (bytes moved so
/// far) has not changed for a whole `idle` period.
pub async fn with_idle_timeout<F>(
    both: F,
    idle: Option<Duration>,
    progress: impl Fn() -> u64,
) -> (End, Option<io::Error>)
where
    F: std::future::Future<Output = Option<io::Error>>,
{
    let Some(idle) = idle else {
        return (End::Closed, both.await);
    };
    tokio::pin!(both);
    let mut last = 0;
    loop {
        tokio::select! {
            err = &mut both => return (End::Closed, err),
            _ = tokio::time::sleep(idle) => {
                let now = progress();
                if now == last {
                    return (End::IdleTimeout, None);
                }
                last = now;
            }
        }
    }
}

/// One direction: on end of stream, shut down the writer (half-close) and return.
async fn pipe<R, W>(r: &mut R, w: &mut W, buf: &mut [u8], count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let n = r.read(buf).await?;
        if n == 0 {
            // The peer may already be gone; a failed shutdown is not an error of the copy.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn copies_prefix_then_both_ways_with_half_close() {
        let (mut client, mut down) = duplex(64);
        let (mut up, mut server) = duplex(64);
        let mut first = vec![0u8; BUF_SIZE];
        first[..5].copy_from_slice(b"hello");
        let proxy = tokio::spawn(async move { bidirectional(&mut down, &mut up, first, 5, None).await });
        client.write_all(b" world").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = String::new();
        server.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
        // The other direction still works after the client's half-close.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = String::new();
        client.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, "reply");
        let (t, end, err) = proxy.await.unwrap();
        assert_eq!((t.sent, t.received, end), (11, 5, End::Closed));
        assert!(err.is_none());
    }

    #[tokio::test]
    async fn an_error_one_way_ends_both_ways() {
        let pending = std::future::pending::<io::Result<()>>();
        let failed = async { Err(io::Error::from(io::ErrorKind::ConnectionReset)) };
        let err = both_ways(pending, failed).await;
        assert_eq!(err.map(|e| e.kind()), Some(io::ErrorKind::ConnectionReset));
        // A half-close keeps the other direction going.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let half = async { Ok(()) };
        let later = async move {
            let _ = rx.await;
            Ok(())
        };
        let both = tokio::spawn(both_ways(half, later));
        tokio::task::yield_now().await;
        assert!(!both.is_finished());
        tx.send(()).unwrap();
        assert!(both.await.unwrap().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_silent_connection() {
        let (_client, mut down) = duplex(64);
        let (mut up, _server) = duplex(64);
        let (t, end, _) = bidirectional(&mut down, &mut up, vec![0; BUF_SIZE], 0, Some(Duration::from_secs(10))).await;
        assert_eq!((t.sent, end), (0, End::IdleTimeout));
    }
}
