//! A call's deadline and its connection's call slots, both counted from the call's arrival.
//!
//! tonic's own `timeout` and `concurrency_limit_per_connection` sit outside the servers'
//! layer, with the limit outside the timeout: a call waiting for one of its connection's slots
//! had no timer running, got a fresh one once admitted, and a server timeout answered
//! CANCELLED (the code of a caller that went away). [`crate::layer::GrpcLayer`] does both
//! instead, from the moment the call reaches it: the wait for a slot counts against the
//! deadline, a deadline that passes answers DEADLINE_EXCEEDED, and the handler finds the
//! [`Deadline`] in its request's extensions (db-svc turns it into statement timeouts).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// When a call must have its answer (the start of its response, for a stream): from its
/// arrival, the shorter of the caller's `grpc-timeout` and `--request-timeout`. Absent when
/// neither is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// Time left until the deadline (zero once it has passed).
    pub fn time_left(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    /// The deadline of a call that arrived at `arrival` with the `grpc-timeout` header
    /// `header` under a server limit of `server_limit` (none: no limit).
    pub fn of_call(
        arrival: Instant,
        header: Option<&str>,
        server_limit: Option<Duration>,
    ) -> Option<Self> {
        let caller = header.and_then(parse_grpc_timeout);
        let budget = match (caller, server_limit) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        // A budget past what an `Instant` can hold is no deadline.
        arrival.checked_add(budget).map(Self)
    }
}

/// Parses a `grpc-timeout` value (`<digits><H|M|S|m|u|n>`). A value the gRPC spec does not
/// allow (more than 8 digits, a sign, another unit) is no deadline, as tonic treats it.
pub fn parse_grpc_timeout(raw: &str) -> Option<Duration> {
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A connection's call slots (`--concurrency-per-connection`), shared by its calls through
/// the connection's [`SlotsInfo`].
pub type CallSlots = Arc<Semaphore>;

/// A connection that carries its own [`CallSlots`] to its calls (tonic puts a connection's
/// `ConnectInfo` in every request's extensions; nothing else is per connection).
#[derive(Debug)]
pub struct WithSlots<T> {
    inner: T,
    slots: Option<CallSlots>,
}

impl<T> WithSlots<T> {
    /// `per_connection` calls handled at once (0: no limit).
    pub fn new(inner: T, per_connection: usize) -> Self {
        let slots = (per_connection > 0)
            .then(|| Arc::new(Semaphore::new(per_connection.min(Semaphore::MAX_PERMITS))));
        Self { inner, slots }
    }
}

/// The connect information of a [`WithSlots`] connection: the inner one, and the slots.
#[derive(Clone, Debug)]
pub struct SlotsInfo<I> {
    pub inner: I,
    pub slots: Option<CallSlots>,
}

impl<T: Connected> Connected for WithSlots<T> {
    type ConnectInfo = SlotsInfo<T::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        SlotsInfo {
            inner: self.inner.connect_info(),
            slots: self.slots.clone(),
        }
    }
}

/// The TCP connect information of a request, over plain TCP or TLS.
fn tcp_info(extensions: &http::Extensions) -> Option<&SlotsInfo<TcpConnectInfo>> {
    extensions.get::<SlotsInfo<TcpConnectInfo>>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<SlotsInfo<TcpConnectInfo>>>()
            .map(TlsConnectInfo::get_ref)
    })
}

/// The peer's address of a request.
pub fn peer(extensions: &http::Extensions) -> Option<std::net::SocketAddr> {
    tcp_info(extensions).and_then(|i| i.inner.remote_addr())
}

/// The call slots of a request's connection (none: no limit).
pub fn slots(extensions: &http::Extensions) -> Option<CallSlots> {
    tcp_info(extensions).and_then(|i| i.slots.clone())
}

impl<T: AsyncRead + Unpin> AsyncRead for WithSlots<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WithSlots<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        for bad in [
            "",
            "m",
            "S",
            "5s",
            "123456789S",
            "-1S",
            "+1S",
            "1x",
            "1.5S",
            "1 S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_shorter_of_the_callers_and_the_servers_limit_wins() {
        let t0 = Instant::now();
        let at = |d: u64| Some(Deadline(t0 + Duration::from_millis(d)));
        assert_eq!(
            Deadline::of_call(t0, Some("2S"), Some(Duration::from_secs(60))),
            at(2000)
        );
        assert_eq!(
            Deadline::of_call(t0, Some("90S"), Some(Duration::from_secs(60))),
            at(60_000)
        );
        assert_eq!(
            Deadline::of_call(t0, None, Some(Duration::from_secs(1))),
            at(1000)
        );
        assert_eq!(Deadline::of_call(t0, Some("5m"), None), at(5));
        // A malformed header is no deadline of the caller's; the server's limit still holds.
        assert_eq!(
            Deadline::of_call(t0, Some("soon"), Some(Duration::from_secs(1))),
            at(1000)
        );
        assert_eq!(Deadline::of_call(t0, None, None), None);
        assert!(Deadline::of_call(t0, Some("99999999H"), None).is_some());
    }
}
