//! Reaching a service that runs with TLS or bearer-token authentication (README, Operations):
//! the endpoint for an address with an optional private CA, and an interceptor that puts the
//! token on every call. Shared by the typed clients and the `omnibus` tool.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// A channel whose calls carry the caller's bearer token (if any).
pub type AuthChannel = InterceptedService<Channel, Bearer>;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(
        "'{0}' is not a valid address (expected host:port, http://host:port or https://host:port)"
    )]
    BadAddress(String),
    #[error("{0} is a plaintext address, but a CA certificate was given: use https://")]
    PlaintextWithCa(String),
    #[error("the token is not usable as an HTTP header value (printable ASCII, no line breaks)")]
    BadToken,
    #[error("TLS settings for {addr}: {}", reason(.source))]
    Tls {
        addr: String,
        source: tonic::transport::Error,
    },
}

/// What went wrong in a tonic transport error: its Display is only "transport error", the
/// reason (a CA file without a certificate, say) is its source.
fn reason(e: &tonic::transport::Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), ToString::to_string)
}

/// Adds `authorization: Bearer <token>` to every request; does nothing without a token.
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

/// Never the token: `ConnectOptions` and the channels that carry a `Bearer` are printed with
/// `{:?}` in logs.
impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(_) => f.write_str("Bearer(***)"),
            None => f.write_str("Bearer(none)"),
        }
    }
}

impl Bearer {
    /// No token (the service runs without authentication).
    pub fn none() -> Self {
        Self(None)
    }

    pub fn new(token: &str) -> Result<Self, ConnectError> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ConnectError::BadToken)?;
        // Kept out of HPACK's dynamic table and out of tonic's own Debug output.
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The largest HTTP/2 DATA frame the client accepts (SETTINGS_MAX_FRAME_SIZE). The protocol's
/// default, 16 KiB, splits a busy stream's pushes (~140 KB with 1,000 subscribers at 5,000
/// events/s) into nine frames each; 1 MiB lets the server send each in one, which took a
/// third off the receiving side's CPU per delivery in the fan-out benchmark (BENCHMARKS.md).
pub const MAX_FRAME_SIZE: u32 = 1 << 20;

/// HTTP/2 ping interval on open calls, and how long a ping may go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the services: TLS trust and the token.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// PEM CA certificate(s) to verify the server with; setting it turns TLS on, as does an
    /// `https://` address (then verified against this CA only).
    pub ca_pem: Option<Vec<u8>>,
    /// The name the certificate must carry, when it is not the address's host.
    pub tls_domain: Option<String>,
    pub bearer: Bearer,
    /// Deadline of each call until its response starts (a unary call's answer, a stream's
    /// opening; not the stream's length). `None`: no deadline of its own.
    pub request_timeout: Option<Duration>,
}

impl ConnectOptions {
    /// The endpoint for `addr` (`host:port` or a URI), with TLS when asked for.
    pub fn endpoint(
        &self,
        addr: &str,
        connect_timeout: Duration,
    ) -> Result<Endpoint, ConnectError> {
        // Schemes are case-insensitive; tonic speaks TLS only for `https`, so with a CA any
        // other scheme would send the token in clear.
        let scheme = addr.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        let tls = self.ca_pem.is_some() || scheme.as_deref() == Some("https");
        if tls && scheme.as_deref().is_some_and(|s| s != "https") {
            return Err(ConnectError::PlaintextWithCa(addr.to_string()));
        }
        let uri = match addr.split_once("://") {
            Some(_) => addr.to_string(),
            None if tls => format!("https://{addr}"),
            None => format!("http://{addr}"),
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|_| ConnectError::BadAddress(addr.to_string()))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .max_frame_size(MAX_FRAME_SIZE)
            // A stream from a host that vanished (no FIN, no RST) would otherwise wait
            // forever: HTTP/2 pings notice it within half a minute. "While idle" too: hyper
            // counts a connection whose only call is a response stream as idle, and never
            // pinged a silent `tail` (tested by freezing the server).
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if let Some(timeout) = self.request_timeout {
            // A peer that accepts the connection but never answers HTTP/2 (a wrong port)
            // would otherwise keep a call waiting forever.
            endpoint = endpoint.timeout(timeout);
        }
        if tls {
            let mut config = ClientTlsConfig::new();
            if let Some(pem) = &self.ca_pem {
                config = config.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some(domain) = &self.tls_domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|source| ConnectError::Tls {
                    addr: addr.to_string(),
                    source,
                })?;
        }
        Ok(endpoint)
    }

    /// `channel` with the token on every call.
    pub fn authenticate(&self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self.bearer.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_on_every_call_and_only_when_set() {
        let mut bearer = Bearer::new(" s3cret-token-0123456789 ").unwrap();
        let request = bearer.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret-token-0123456789"
        );
        let request = Bearer::none().call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        assert!(matches!(
            Bearer::new("two\nlines"),
            Err(ConnectError::BadToken)
        ));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let bearer = Bearer::new("s3cret-token-0123456789").unwrap();
        let options = ConnectOptions {
            bearer: bearer.clone(),
            ..Default::default()
        };
        for shown in [format!("{bearer:?}"), format!("{options:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("Bearer(***)"), "{shown}");
        }
        let mut with_token = bearer;
        let request = with_token.call(tonic::Request::new(())).unwrap();
        let sent = format!("{:?}", request.metadata());
        assert!(!sent.contains("s3cret"), "{sent}");
        assert_eq!(format!("{:?}", Bearer::none()), "Bearer(none)");
    }

    #[test]
    fn tls_follows_the_ca_or_the_scheme() {
        let plain = ConnectOptions::default();
        let timeout = Duration::from_secs(1);
        assert_eq!(
            plain.endpoint("127.0.0.1:50052", timeout).unwrap().uri(),
            "http://127.0.0.1:50052/"
        );
        assert_eq!(
            plain.endpoint("https://db:50052", timeout).unwrap().uri(),
            "https://db:50052/"
        );
        assert!(matches!(
            plain.endpoint("not an address", timeout),
            Err(ConnectError::BadAddress(_))
        ));
        let with_ca = ConnectOptions {
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            ..Default::default()
        };
        // The CA is parsed up front: a broken file is an error before any connection.
        assert!(matches!(
            with_ca.endpoint("localhost:50052", timeout),
            Err(ConnectError::Tls { .. })
        ));
        // Any scheme but https, in any case, would be plaintext: refused with a CA.
        for addr in [
            "http://localhost:50052",
            "HTTP://localhost:50052",
            "grpc://localhost:50052",
        ] {
            assert!(
                matches!(
                    with_ca.endpoint(addr, timeout),
                    Err(ConnectError::PlaintextWithCa(_))
                ),
                "{addr}"
            );
        }
    }
}
