//! The hard end of a connection's life: `--max-connection-age` plus its grace.
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

/// An I/O object that fails every read and write after a deadline (none: it never does).
#[derive(Debug)]
pub struct Aged<T> {
    inner: T,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> Aged<T> {
    /// `inner`, usable for `life` from now (`None`: for ever).
    pub fn new(inner: T, life: Option<Duration>) -> Self {
        Self {
            inner,
            deadline: life.map(|l| Box::pin(tokio::time::sleep(l))),
        }
    }
}

impl<T: Unpin> Aged<T> {
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
        Pin::new(&mut this.inner).poll_read(cx, buf)
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
        let mut aged = Aged::new(a, Some(Duration::from_millis(300)));
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
