//! Idle HTTP/1 connections hold no HTTP state.
//!
//! hyper gives every HTTP/1 connection an 8 KiB read buffer and an 8 KiB write buffer and
//! keeps them, with its dispatcher, for the connection's whole life: 16 of the ~21 KiB an
//! idle kept-alive connection cost dp. Here a connection with no request in flight for
//! [`PARK_AFTER`] is *parked*: hyper is shut down gracefully without closing the socket
//! (`poll_without_shutdown`, `into_parts`), whatever it had read of a next request is kept,
//! and only the socket waits for the next byte; then a new hyper connection takes over
//! from that byte. A request hyper had already parsed when the park began is answered
//! with `connection: close` (the client reconnects); nothing is lost.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::tls::prefixed::Prefixed;

/// How long a kept-alive HTTP/1 connection waits with no request in flight before it is
/// parked. Short, so that many idle connections cost little; a connection that carries
/// requests back to back is never parked.
pub const PARK_AFTER: Duration = Duration::from_millis(10);

/// Requests of one connection: how many started and how many are still in flight (until
/// their response body is written or dropped).
#[derive(Default, Debug)]
pub struct Activity {
    started: AtomicU64,
    in_flight: AtomicUsize,
}

/// One request in flight: dropped when its response body is (hyper drops it once
/// written), or with the request if no response was made.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn begin(activity: &Arc<Activity>) -> InFlight {
        activity.started.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its request's [`InFlight`].
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Tracked { body, _in_flight: in_flight }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Serves HTTP/1 on `io` (after `prefix`, bytes already read from it) until the client
/// closes, parking the connection whenever it is idle; `builder` is configured by the
/// caller, `idle_timeout` closes a parked connection as hyper would close an idle one,
/// `on_park` counts.
pub async fn serve_http1<IO, S, B>(
    builder: hyper::server::conn::http1::Builder,
    mut io: IO,
    mut prefix: Bytes,
    mut service: S,
    activity: Arc<Activity>,
    idle_timeout: Option<Duration>,
    on_park: impl Fn(),
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = Tracked<B>> + Unpin,
    S::Future: Unpin,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        // One hyper connection, until the client closes (`None`) or it has been idle for
        // PARK_AFTER and hyper stopped. A block of its own: nothing of it (the boxed
        // connection, the timer) outlives it into the parked wait.
        let parts = {
            // Bytes left from before hyper stopped are the start of a request: this hyper serves
            // at least that one before it may be parked again (so a client that sends its headers
            // slowly meets the header timeout of one connection, not a fresh one every PARK_AFTER).
            let mut may_park = prefix.is_empty();
            let began = activity.started.load(Ordering::Relaxed);
            // Boxed: a task's size is that of its largest state, and this is the largest.
            let mut conn = Box::new(builder.serve_connection(TokioIo::new(Prefixed::new(prefix, io)), service));
            let mut parking = false;
            let mut timer = Box::pin(tokio::time::sleep(PARK_AFTER));
            let mut armed_for = None;
            std::future::poll_fn(|cx| {
                loop {
                    if let Poll::Ready(r) = conn.poll_without_shutdown(cx) {
                        return Poll::Ready(r);
                    }
                    let started = activity.started.load(Ordering::Relaxed);
                    may_park |= started != began;
                    if parking || !may_park || activity.in_flight.load(Ordering::Relaxed) > 0 {
                        return Poll::Pending;
                    }
                    // Idle: (re)arm the timer when a request started since it was armed.
                    if armed_for != Some(started) {
                        armed_for = Some(started);
                        timer.as_mut().reset(tokio::time::Instant::now() + PARK_AFTER);
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    // Quiet for PARK_AFTER: ask hyper to stop, and poll it to the end.
                    parking = true;
                    Pin::new(&mut *conn).graceful_shutdown();
                }
            })
            .await?;
            parking.then(|| (*conn).into_parts())
        };
        let Some(parts) = parts else {
            return Ok(()); // the client closed, or asked to
        };
        let (unread, inner) = parts.io.into_inner().into_inner();
        service = parts.service;
        io = inner;
        prefix = join(unread, parts.read_buf);
        if !prefix.is_empty() {
            continue; // a next request had begun: serve it at once, unparked
        }
        on_park();
        // Parked: only the socket waits, for the next request's first byte.
        let mut first = [0u8; 1];
        let read = io.read(&mut first);
        let n = match idle_timeout {
            Some(t) => match tokio::time::timeout(t, read).await {
                Ok(r) => r,
                Err(_) => return Ok(()), // idle too long: closed, as hyper would
            },
            None => read.await,
        };
        match n {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => prefix = Bytes::copy_from_slice(&first),
        }
    }
}

/// The leftovers, in a buffer of their own: `read_buf` is a slice of hyper's 8 KiB read
/// buffer, and even an empty slice of it would keep that buffer alive while parked.
fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() && b.is_empty() {
        return Bytes::new();
    }
    let mut all = BytesMut::with_capacity(a.len() + b.len());
    all.extend_from_slice(&a);
    all.extend_from_slice(&b);
    all.freeze()
}
