//! The TLS stream dp relays: BoringSSL over a read-ahead buffer over the socket.
//!
//! A relay reads until a read would block, so after each record it asks once more, and
//! then there is nothing: the socket said so (tokio marks it drained after a short read).
//! Through `tokio-boring` that ask is still an `SSL_read`, which resets BoringSSL's error
//! queue, finds no record, builds an error and unwinds through the BIO: 7 % of a sidecar's
//! user-space instructions per request on kept connections (benches/relay_instructions.py).
//! So a read first looks at what could feed BoringSSL: with no plaintext BoringSSL holds,
//! no bytes read ahead and a socket that is not readable, it waits for the socket instead.
//! Any byte or end of stream on the socket makes it readable again; a partial record
//! BoringSSL holds needs the socket's next bytes anyway.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use boring::ssl::SslRef;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::prefixed::Prefixed;

/// A TLS stream over `S` (either side), after its handshake.
pub struct TlsStream<S>(tokio_boring::SslStream<BufReader<S>>);

impl<S> TlsStream<S> {
    pub(super) fn new(s: tokio_boring::SslStream<BufReader<S>>) -> Self {
        TlsStream(s)
    }

    pub fn ssl(&self) -> &SslRef {
        self.0.ssl()
    }
}

/// A transport that can tell, without reading, that it has nothing to read now.
pub trait ReadReady {
    /// `Some(Pending)` (the task woken when that changes) when a read would block;
    /// `None` when the transport cannot tell, and a read is tried.
    fn read_ready(&self, _cx: &mut Context<'_>) -> Option<Poll<()>> {
        None
    }
}

impl ReadReady for TcpStream {
    fn read_ready(&self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        Some(self.poll_read_ready(cx).map(drop))
    }
}

impl ReadReady for UnixStream {
    fn read_ready(&self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        Some(self.poll_read_ready(cx).map(drop))
    }
}

impl<S: ReadReady> ReadReady for Prefixed<S> {
    fn read_ready(&self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        if self.has_prefix() { Some(Poll::Ready(())) } else { self.inner().read_ready(cx) }
    }
}

impl ReadReady for crate::upstream::Stream {
    fn read_ready(&self, cx: &mut Context<'_>) -> Option<Poll<()>> {
        match self {
            crate::upstream::Stream::Tcp(s) => s.read_ready(cx),
            crate::upstream::Stream::Unix(s) => s.read_ready(cx),
        }
    }
}

#[cfg(test)]
impl ReadReady for tokio::io::DuplexStream {}

impl<S: AsyncRead + AsyncWrite + Unpin + ReadReady> AsyncRead for TlsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let ahead = this.0.get_ref();
        if this.0.ssl().pending() == 0
            && ahead.buffer().is_empty()
            && ahead.get_ref().read_ready(cx) == Some(Poll::Pending)
        {
            return Poll::Pending;
        }
        Pin::new(&mut this.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
