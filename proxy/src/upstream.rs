//! Opening connections to upstream hosts: TCP, or Unix sockets as Envoy's `pipe`
//! addresses name them (a leading `@` is Linux's abstract namespace), with TLS when the
//! host's transport socket originates it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream, UnixStream};

/// Where a host listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostAddr {
    Ip(SocketAddr),
    /// A Unix socket path as Envoy's `pipe.path` gives it (`@name`: abstract).
    Pipe(PathBuf),
}

impl HostAddr {
    /// The port of an IP host; 0 for a pipe.
    pub fn port(&self) -> u16 {
        match self {
            HostAddr::Ip(a) => a.port(),
            HostAddr::Pipe(_) => 0,
        }
    }

    /// Opens a connection (no timeout: the caller bounds it).
    pub async fn connect(&self) -> io::Result<Stream> {
        self.connect_from(&Source::default()).await
    }

    /// Opens a connection from the cluster's source address for the host's family, when
    /// it has one (`upstream_bind_config`).
    pub async fn connect_from(&self, source: &Source) -> io::Result<Stream> {
        match self {
            HostAddr::Ip(a) => {
                let from = if a.is_ipv4() { source.v4 } else { source.v6 };
                let s = match from {
                    None => TcpStream::connect(a).await?,
                    Some(from) => {
                        let socket = if a.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                        socket.bind(from)?;
                        socket.connect(*a).await?
                    }
                };
                let _ = s.set_nodelay(true);
                Ok(Stream::Tcp(s))
            }
            HostAddr::Pipe(p) => {
                // tokio reads a leading NUL as the abstract namespace; Envoy writes `@`.
                let path = match p.to_str().and_then(|s| s.strip_prefix('@')) {
                    Some(name) => PathBuf::from(format!("\0{name}")),
                    None => p.clone(),
                };
                Ok(Stream::Unix(UnixStream::connect(path).await?))
            }
        }
    }
}

/// A cluster's `upstream_bind_config`: the source address per family (port 0: any).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Source {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
}

impl From<SocketAddr> for HostAddr {
    fn from(a: SocketAddr) -> Self {
        HostAddr::Ip(a)
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostAddr::Ip(a) => a.fmt(f),
            HostAddr::Pipe(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A plain upstream connection.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// The TCP socket, for splice(2) when both sides are plain TCP.
    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connects_to_path_and_abstract_unix_sockets() {
        let dir = std::env::temp_dir().join(format!("dp-upstream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let abstract_name = format!("dp-upstream-test-{}", std::process::id());
        for (listen, addr) in [
            (path.clone(), HostAddr::Pipe(path.clone())),
            (PathBuf::from(format!("\0{abstract_name}")), HostAddr::Pipe(PathBuf::from(format!("@{abstract_name}")))),
        ] {
            let l = tokio::net::UnixListener::bind(&listen).unwrap();
            let server = tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await.unwrap();
                s.write_all(&b).await.unwrap();
            });
            let mut c = addr.connect().await.unwrap();
            assert!(c.as_tcp().is_none());
            c.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"ping");
            server.await.unwrap();
        }
        assert_eq!(HostAddr::Pipe(path.clone()).to_string(), format!("unix:{}", path.display()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
