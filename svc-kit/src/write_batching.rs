//! Batched writes for the server's connections.
//!
//! h2 hands every DATA frame of 256 bytes or more to the socket as a write of its own and
//! flushes before it accepts the next frame, so a connection carrying many busy streams (50
//! `StreamActions` subscribers, each getting a push from the same ingest batch) costs one
//! write syscall and one TCP segment per frame, on both ends. (A unary response already
//! leaves in one write.) [`BatchedWrites`] copies writes into a buffer and, when asked to
//! flush, first yields once to the scheduler: the frames other streams queue in that round
//! join the same write. This is how grpc-go's loopy writer behaves (it flushes only when its
//! frame queue is empty). A lone frame waits for one scheduler round, and a full buffer
//! ([`HIGH_WATER`]) is written out at once, so memory and added latency stay bounded. A write
//! of [`WRITE_THROUGH`] bytes or more is not copied: it goes out at once, behind whatever is
//! buffered, in one vectored write (a frame that large already amortizes its syscall, and
//! copying it cost more than it saved in the 1,000-subscriber fan-out). Servers use it with
//! `--batch-writes true`; it is off by default, because with large pushes (1,000 subscribers
//! at 5,000 events/s) the extra scheduler round per flush cost as much as it saved.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Buffered bytes beyond which a write first sends what is buffered.
pub const HIGH_WATER: usize = 256 * 1024;

/// Writes at least this large bypass the buffer.
pub const WRITE_THROUGH: usize = 16 * 1024;

/// Buffer capacity kept between bursts (a larger one is released, so idle connections stay
/// small).
const RETAINED_CAPACITY: usize = 32 * 1024;

/// An I/O object whose writes are gathered until a flush, and whose flushes are deferred by
/// one scheduler round; reads pass through.
#[derive(Debug)]
pub struct BatchedWrites<T> {
    inner: T,
    /// Off: every call goes straight to `inner` (`--batch-writes false`).
    enabled: bool,
    buf: Vec<u8>,
    /// How much of `buf` has been written to `inner`.
    sent: usize,
    /// Whether the pending flush has already yielded once.
    yielded: bool,
}

impl<T> BatchedWrites<T> {
    pub fn new(inner: T) -> Self {
        Self::with_batching(inner, true)
    }

    /// With `enabled` false the wrapper only passes calls through.
    pub fn with_batching(inner: T, enabled: bool) -> Self {
        Self {
            inner,
            enabled,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
        }
    }

    /// Bytes accepted but not yet written to the inner object.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.sent
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncWrite + Unpin> BatchedWrites<T> {
    /// Writes everything buffered to the inner object.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.clear();
        Poll::Ready(Ok(()))
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.sent = 0;
        if self.buf.capacity() > RETAINED_CAPACITY {
            self.buf.shrink_to(RETAINED_CAPACITY);
        }
    }

    /// A write of `total` >= [`WRITE_THROUGH`] bytes: the buffered bytes and `slices` go out
    /// in one vectored write, straight from the caller's memory.
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
        total: usize,
    ) -> Poll<io::Result<usize>> {
        let buffered = self.buffered();
        if buffered == 0 {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, slices);
        }
        let mut iov = Vec::with_capacity(slices.len() + 1);
        iov.push(IoSlice::new(&self.buf[self.sent..]));
        iov.extend_from_slice(slices);
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &iov))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        if n > buffered {
            self.clear();
            return Poll::Ready(Ok(n - buffered));
        }
        // Only buffered bytes went out: take the caller's bytes into the buffer rather than
        // answer "0 written" (which callers read as a closed connection).
        self.sent += n;
        for slice in slices {
            self.buf.extend_from_slice(slice);
        }
        Poll::Ready(Ok(total))
    }

    /// Accepts `slices`: copied into the buffer (after sending a full one), or written
    /// through when large.
    fn poll_batched(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = slices.iter().map(|s| s.len()).sum();
        if total >= WRITE_THROUGH {
            return self.poll_write_through(cx, slices, total);
        }
        if self.buffered() >= HIGH_WATER {
            ready!(self.poll_send(cx))?;
        }
        for slice in slices {
            self.buf.extend_from_slice(slice);
        }
        Poll::Ready(Ok(total))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.enabled {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        this.poll_batched(cx, &[IoSlice::new(data)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.enabled {
            return Pin::new(&mut this.inner).poll_write_vectored(cx, slices);
        }
        this.poll_batched(cx, slices)
    }

    fn is_write_vectored(&self) -> bool {
        self.enabled || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered() > 0 && !this.yielded {
            // Let the tasks that are ready queue their frames first; this task is polled
            // again after them.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_send(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: Connected> Connected for BatchedWrites<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use tokio::io::AsyncWriteExt;

    /// Records each write call; accepts at most `per_call` bytes per call, and answers
    /// `Pending` (waking at once) every other call when `stutter` is set.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        per_call: Option<usize>,
        stutter: bool,
        calls: usize,
        shut: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.calls += 1;
            if self.stutter && self.calls % 2 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = self.per_call.map_or(data.len(), |m| m.min(data.len()));
            self.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            slices: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let joined: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            self.poll_write(cx, &joined)
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Batching over a recorder that takes at most `per_call` bytes per call and answers
    /// every other call `Pending`.
    fn stuttering(per_call: usize) -> BatchedWrites<Recorder> {
        BatchedWrites::new(Recorder {
            per_call: Some(per_call),
            stutter: true,
            ..Recorder::default()
        })
    }

    fn written(io: &BatchedWrites<Recorder>) -> Vec<u8> {
        io.get_ref().writes.concat()
    }

    #[test]
    fn writes_before_a_flush_go_out_in_one_write_after_one_yield() {
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = BatchedWrites::new(Recorder::default());

        for frame in [&b"headers"[..], &[7u8; 1000][..], b"trailers"] {
            let n = Pin::new(&mut io).poll_write(&mut cx, frame);
            assert!(matches!(n, Poll::Ready(Ok(len)) if len == frame.len()));
        }
        assert!(
            io.get_ref().writes.is_empty(),
            "nothing written before a flush"
        );

        // The first flush yields (and wakes the task so it is polled again) ...
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(io.get_ref().writes.is_empty());
        // ... frames queued meanwhile join the batch ...
        let vectored = [IoSlice::new(b"more"), IoSlice::new(b"!")];
        assert!(matches!(
            Pin::new(&mut io).poll_write_vectored(&mut cx, &vectored),
            Poll::Ready(Ok(5))
        ));
        // ... and the next flush sends everything with one write.
        assert!(matches!(
            Pin::new(&mut io).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(io.get_ref().writes.len(), 1);
        let mut expected = b"headers".to_vec();
        expected.extend_from_slice(&[7u8; 1000]);
        expected.extend_from_slice(b"trailersmore!");
        assert_eq!(written(&io), expected);
        assert_eq!(io.get_ref().flushes, 1);
        assert_eq!(io.buffered(), 0);

        // With nothing buffered a flush goes straight through.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert_eq!(io.get_ref().flushes, 2);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn disabled_it_passes_every_call_through() {
        let mut io = BatchedWrites::with_batching(Recorder::default(), false);
        io.write_all(b"one").await.unwrap();
        io.write_all(b"two").await.unwrap();
        assert_eq!(io.get_ref().writes, vec![b"one".to_vec(), b"two".to_vec()]);
        io.flush().await.unwrap();
        assert_eq!(io.get_ref().flushes, 1);
        assert!(io.is_write_vectored(), "as the inner object");
    }

    #[tokio::test]
    async fn partial_and_pending_writes_lose_nothing() {
        let mut io = stuttering(777);
        let mut expected = Vec::new();
        for i in 0..200u32 {
            let frame: Vec<u8> = (0..(i * 37 % 5000)).map(|b| (b ^ i) as u8).collect();
            io.write_all(&frame).await.unwrap();
            expected.extend_from_slice(&frame);
            if i % 17 == 0 {
                io.flush().await.unwrap();
            }
        }
        io.shutdown().await.unwrap();
        assert!(io.get_ref().shut);
        assert_eq!(written(&io), expected);
    }

    #[test]
    fn a_large_write_goes_out_with_the_buffered_bytes_uncopied() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = BatchedWrites::new(Recorder::default());
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"head").is_ready());
        let payload = vec![9u8; WRITE_THROUGH];
        let frame = [IoSlice::new(b"frame"), IoSlice::new(&payload)];
        let n = Pin::new(&mut io).poll_write_vectored(&mut cx, &frame);
        assert!(matches!(n, Poll::Ready(Ok(len)) if len == 5 + WRITE_THROUGH));
        // One write: the buffered bytes first, then the frame; nothing left buffered.
        assert_eq!(io.get_ref().writes.len(), 1);
        assert_eq!(io.buffered(), 0);
        let mut expected = b"headframe".to_vec();
        expected.extend_from_slice(&payload);
        assert_eq!(written(&io), expected);
    }

    #[tokio::test]
    async fn large_writes_keep_their_order_through_partial_writes() {
        // 300 bytes per call: less than two buffered small frames, so a large write can
        // find that only buffered bytes went out and must take its own into the buffer.
        let mut io = stuttering(300);
        let mut expected = Vec::new();
        for i in 0..60u32 {
            // Small frames are buffered, large ones written through, in any mix.
            let len = if i % 3 == 0 { WRITE_THROUGH + 100 } else { 200 };
            let frame: Vec<u8> = (0..len).map(|b| (b as u32 ^ i) as u8).collect();
            io.write_all(&frame).await.unwrap();
            expected.extend_from_slice(&frame);
        }
        io.flush().await.unwrap();
        assert_eq!(written(&io), expected);
    }

    #[tokio::test]
    async fn a_full_buffer_is_sent_without_waiting_for_a_flush() {
        let mut io = BatchedWrites::new(Recorder::default());
        let chunk = vec![1u8; WRITE_THROUGH / 2];
        for _ in 0..(HIGH_WATER / chunk.len()) {
            io.write_all(&chunk).await.unwrap();
        }
        assert!(io.get_ref().writes.is_empty());
        assert_eq!(io.buffered(), HIGH_WATER);
        // The next write finds the buffer at its high-water mark: it is sent first.
        io.write_all(b"x").await.unwrap();
        assert_eq!(io.get_ref().writes.len(), 1);
        assert_eq!(io.get_ref().writes[0].len(), HIGH_WATER);
        assert_eq!(io.buffered(), 1);
        poll_fn(|cx| Pin::new(&mut io).poll_flush(cx))
            .await
            .unwrap();
        assert_eq!(io.buffered(), 0);
        assert_eq!(written(&io).len(), HIGH_WATER + 1);
        assert!(
            io.buf.capacity() <= RETAINED_CAPACITY,
            "the burst's buffer is released"
        );
    }
}
