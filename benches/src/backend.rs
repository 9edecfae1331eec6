//! The backend every target forwards to. One port serves both kinds of connection:
//!
//! * a real TLS ClientHello: the connection is handed to rustls; after the handshake
//!   the server echoes what it reads (the handshake test sends one byte and waits for
//!   it back);
//! * a synthetic hello ([`crate::hello`]): the record is consumed, then one command
//!   byte selects `E` echo, `D` download (write until the client closes) or `U`
//!   upload (read and discard until end of stream).

use crate::hello;
use rustls::ServerConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Upper bound on one download, whatever the client does.
const MAX_DOWNLOAD: Duration = Duration::from_secs(120);
/// Write size of the download mode.
pub const CHUNK: usize = 64 * 1024;

pub const ECHO: u8 = b'E';
pub const DOWNLOAD: u8 = b'D';
pub const UPLOAD: u8 = b'U';

/// Serves connections from `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(handle(s, acceptor.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn handle(mut s: TcpStream, acceptor: TlsAcceptor) {
    let _ = s.set_nodelay(true);
    let need = hello::MAGIC_OFFSET + hello::MAGIC.len();
    let mut head = [0u8; 64];
    // Wait (bounded) until the start of the first record is here, without consuming it.
    let mut seen = 0;
    for _ in 0..5000 {
        match s.peek(&mut head).await {
            Ok(0) | Err(_) => return,
            Ok(n) if n >= need => {
                seen = n;
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    if seen < need {
        return;
    }
    if hello::is_synthetic(&head) {
        let mut rec = vec![0u8; hello::record_len(&head)];
        if s.read_exact(&mut rec).await.is_err() {
            return;
        }
        let mut cmd = [0u8; 1];
        if s.read_exact(&mut cmd).await.is_err() {
            return;
        }
        match cmd[0] {
            ECHO => echo(&mut s).await,
            DOWNLOAD => download(&mut s).await,
            UPLOAD => {
                let _ = sink(&mut s).await;
            }
            _ => {}
        }
    } else if let Ok(mut tls) = acceptor.accept(s).await {
        echo(&mut tls).await;
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

async fn download(s: &mut TcpStream) {
    let buf = vec![0x5au8; CHUNK];
    let deadline = tokio::time::Instant::now() + MAX_DOWNLOAD;
    while tokio::time::Instant::now() < deadline {
        if s.write_all(&buf).await.is_err() {
            break;
        }
    }
}

/// Reads and discards until end of stream; returns the byte count.
pub async fn sink<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}
