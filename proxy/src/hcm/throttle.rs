//! The fault filter's `response_rate_limit`: a response body let through at `limit_kbps`
//! KiB per second, in sixteen pieces a second as Envoy's fault filter releases it
//! (MeshFaultInjection's `responseBandwidth`).

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::time::Sleep;

/// One release every sixteenth of a second.
const TICK: Duration = Duration::from_micros(62_500);

pub struct Throttled<B> {
    inner: B,
    /// Bytes let through per tick.
    chunk: usize,
    pending: Bytes,
    /// When the next piece may go.
    next: Option<tokio::time::Instant>,
    wait: Option<Pin<Box<Sleep>>>,
}

impl<B> Throttled<B> {
    pub fn new(inner: B, kbps: u64) -> Self {
        let chunk = usize::try_from(kbps.saturating_mul(1024) / 16).unwrap_or(usize::MAX).max(1);
        Throttled { inner, chunk, pending: Bytes::new(), next: None, wait: None }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Throttled<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                if let Some(at) = this.next.filter(|at| tokio::time::Instant::now() < *at) {
                    let wait = this.wait.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    ready!(wait.as_mut().poll(cx));
                }
                this.wait = None;
                let n = this.pending.len().min(this.chunk);
                let piece = this.pending.split_to(n);
                this.next = Some(tokio::time::Instant::now() + TICK);
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.inner.size_hint();
        let more = self.pending.len() as u64;
        h.set_lower(h.lower() + more);
        if let Some(u) = h.upper() {
            h.set_upper(u + more);
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test(start_paused = true)]
    async fn a_body_comes_in_sixteenth_of_a_second_pieces_of_the_rate() {
        // 1 KiB/s: 64-byte pieces; 256 bytes take four pieces, three ticks apart.
        let body = Full::new(Bytes::from(vec![7u8; 256]));
        let mut t = Throttled::new(body, 1);
        let start = tokio::time::Instant::now();
        let mut sizes = vec![];
        while let Some(f) = t.frame().await {
            sizes.push(f.unwrap().into_data().unwrap().len());
        }
        assert_eq!(sizes, [64, 64, 64, 64]);
        // Three ticks between the four (the timer counts whole milliseconds).
        let took = start.elapsed();
        assert!(took >= TICK * 3 && took < TICK * 4, "{took:?}");
    }
}
