//! The hard end of a connection's life: `--max-connection-age` plus its grace, and the time a
//! new connection has to start speaking.
//!
//! tonic 0.14 has the age and the grace, but given a grace it never sends the GOAWAY at the
//! age: it waits out age + grace and then drops the connection with calls in flight, so
//! clients never learn to reconnect early (`connection_timeout_future` in
//! `tonic/src/transport/server/mod.rs`). The servers therefore give tonic only the age (a
//! GOAWAY then, after which the connection's open calls may finish), and [`Aged`] enforces
//! the grace underneath: once a connection is age + grace old, its reads and writes fail, and
//! hyper closes it.

use std::future::Future as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// Bytes a client must have sent within its [`Aged::with_opening`] time: the length of the
/// HTTP/2 client preface (a TLS ClientHello is longer).
pub const OPENING_BYTES: usize = 24;

/// An I/O object that fails every read and write after a deadline (none: it never does), and
/// optionally every read when the peer has not sent its opening bytes in time.
#[derive(Debug)]
pub struct Aged<T> {
    inner: T,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Until the peer has sent [`OPENING_BYTES`]: when that must have happened, and how many
    /// are still missing. A connection that is opened and left silent (or trickles) would
    /// otherwise hold its descriptor and task for ever: hyper's HTTP/2 server waits for the
    /// preface without a timeout, and keepalive pings start only after it.
    opening: Option<(Pin<Box<Sleep>>, usize)>,
}

impl<T> Aged<T> {
    /// `inner`, usable for `life` from now (`None`: for ever).
    pub fn new(inner: T, life: Option<Duration>) -> Self {
        Self {
            inner,
            deadline: life.map(|l| Box::pin(tokio::time::sleep(l))),
            opening: None,
        }
    }

    /// Reads fail unless the peer has sent [`OPENING_BYTES`] within `within` from now.
    pub fn with_opening(mut self, within: Duration) -> Self {
        self.opening = Some((Box::pin(tokio::time::sleep(within)), OPENING_BYTES));
        self
    }
}

impl<T: Unpin> Aged<T> {
    /// An error once the opening time has passed without the opening bytes; otherwise its
    /// timer is registered with `cx`, so a silent connection is woken to be closed.
    fn check_opening(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let expired = self
            .opening
            .as_mut()
            .is_some_and(|(d, _)| d.as_mut().poll(cx).is_ready());
        if expired {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection closed: the client sent no HTTP/2 preface (or TLS hello) in time",
            ));
        }
        Ok(())
    }

    /// An error once the deadline has passed; otherwise the deadline's timer is registered
    /// with `cx`, so a connection waiting for a read is woken to be closed.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready());
        if expired {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection closed: older than --max-connection-age plus its grace",
            ));
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Aged<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        this.check_opening(cx)?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some((_, missing)) = &mut this.opening {
            *missing = missing.saturating_sub(buf.filled().len() - before);
            if *missing == 0 {
                this.opening = None;
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Aged<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Aged<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_and_writes_work_until_the_deadline_then_fail() {
        let (a, mut peer) = tokio::io::duplex(64);
        // Deadlines here are long enough that the steps before them finish first even on a
        // loaded machine (they take microseconds), and short enough to keep the test quick.
        let mut aged = Aged::new(a, Some(Duration::from_secs(2)));
        aged.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        // A read waiting for data (none comes) is woken at the deadline and fails.
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(Duration::from_secs(30), aged.read(&mut buf))
            .await
            .expect("woken at the deadline")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(aged.write_all(b"late").await.is_err());
    }

    /// A peer that connects and stays silent, or sends less than a preface, is closed at the
    /// opening deadline; one that sent its opening lives on past it.
    #[tokio::test]
    async fn a_connection_must_send_its_opening_bytes_in_time() {
        let opening = Duration::from_millis(1500);
        let mut buf = [0u8; 64];
        for sent in [&b""[..], &[b'P'; OPENING_BYTES - 1][..]] {
            let (a, mut peer) = tokio::io::duplex(64);
            let mut aged = Aged::new(a, None).with_opening(opening);
            peer.write_all(sent).await.unwrap();
            if !sent.is_empty() {
                assert_eq!(aged.read(&mut buf).await.unwrap(), sent.len());
            }
            let err = tokio::time::timeout(Duration::from_secs(30), aged.read(&mut buf))
                .await
                .expect("woken at the opening deadline")
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{} bytes", sent.len());
        }
        let (a, mut peer) = tokio::io::duplex(64);
        let mut aged = Aged::new(a, None).with_opening(opening);
        peer.write_all(&[b'P'; OPENING_BYTES]).await.unwrap();
        let mut got = 0;
        while got < OPENING_BYTES {
            got += aged.read(&mut buf).await.unwrap();
        }
        tokio::time::sleep(opening * 2).await;
        peer.write_all(b"later").await.unwrap();
        assert_eq!(aged.read(&mut buf).await.unwrap(), 5);
    }

    #[tokio::test]
    async fn without_a_deadline_it_only_passes_through() {
        let (a, mut peer) = tokio::io::duplex(64);
        let mut aged = Aged::new(a, None);
        aged.write_all(b"ok").await.unwrap();
        let mut got = [0u8; 2];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ok");
        peer.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        aged.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
