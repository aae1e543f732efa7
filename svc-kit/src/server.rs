//! Serving a tonic router with health, reflection, graceful shutdown and the operational
//! settings every service shares: authentication, limits, TLS, metrics.
//!
//! On shutdown the health status flips to NOT_SERVING (so load balancers stop routing), the
//! listener stops accepting, in-flight unary calls finish and streams end (their handlers watch
//! the same [`Shutdown`]); whatever is still open after the grace period is dropped.
//!
//! A service builds its server with [`builder`] (limits, TLS, the [`GrpcLayer`]), wraps its
//! generated service with [`grpc_service!`](crate::grpc_service) (message sizes,
//! compression), adds reflection with [`add_reflection`] and runs [`serve`].

use std::convert::Infallible;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Args;
use futures::{StreamExt as _, TryStreamExt};
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
use tonic::codegen::{Body as HttpBody, BoxFuture, StdError, http};
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tower::layer::util::{Identity as NoLayer, Stack};

use crate::auth::{Scopes, Secret, Tokens};
use crate::connection_age::Aged;
use crate::deadline::WithSlots;
use crate::kafka::KafkaSetting;
use crate::layer::{AuthConfig, GrpcLayer};
use crate::write_batching::BatchedWrites;
use crate::{Health, Shutdown};

/// How long a TLS client has to complete its handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to send the HTTP/2 preface (or the start of its TLS hello) after
/// connecting (`connection_age::Aged::with_opening`).
pub const OPENING_TIMEOUT: Duration = Duration::from_secs(10);

/// The server type every service uses: tonic's, with the [`GrpcLayer`] in front.
pub type GrpcServer = Server<Stack<GrpcLayer, NoLayer>>;
/// A router built from a [`GrpcServer`].
pub type Router = tonic::transport::server::Router<Stack<GrpcLayer, NoLayer>>;

/// A compression algorithm for gRPC messages.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    Gzip,
    Zstd,
}

/// The compression algorithms of `--compression`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompressionList(pub Vec<Compression>);

/// Parses `gzip,zstd`; empty or `none` is no compression.
pub fn parse_compression(raw: &str) -> Result<CompressionList, String> {
    let mut out = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match name.to_ascii_lowercase().as_str() {
            "gzip" => out.push(Compression::Gzip),
            "zstd" => out.push(Compression::Zstd),
            "none" => {}
            other => return Err(format!("unknown compression '{other}' (gzip, zstd, none)")),
        }
    }
    out.dedup();
    Ok(CompressionList(out))
}

/// Listener settings common to both services.
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    /// Maximum time to let in-flight calls and streams finish after SIGTERM/SIGINT.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// After SIGTERM/SIGINT, how long to go on serving new calls while health reports
    /// NOT_SERVING, before the drain starts: time for load balancers that poll health (Envoy's
    /// active health checks, Compose setups) to stop routing here (0 = drain at once).
    #[arg(long, env = "SHUTDOWN_DELAY", value_parser = parse_duration, default_value = "0s")]
    pub shutdown_delay: Duration,

    /// Serve gRPC server reflection (v1 and v1alpha), so grpcurl works without proto files.
    #[arg(long, env = "GRPC_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,

    /// Largest request message accepted (e.g. 4MiB); larger ones fail RESOURCE_EXHAUSTED.
    #[arg(long, env = "GRPC_MAX_RECV_MESSAGE_SIZE", value_parser = parse_bytes, default_value = "4MiB")]
    pub max_recv_message_size: usize,

    /// Largest response message sent (e.g. 64MiB); a larger one fails the call.
    #[arg(long, env = "GRPC_MAX_SEND_MESSAGE_SIZE", value_parser = parse_bytes, default_value = "64MiB")]
    pub max_send_message_size: usize,

    /// HTTP/2 streams (concurrent calls, open streams included) per connection (at least 1:
    /// 0 would let no call in).
    #[arg(long, env = "GRPC_MAX_CONCURRENT_STREAMS", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Requests handled at once per connection; more wait for a slot (0 = no limit).
    #[arg(long, env = "GRPC_CONCURRENCY_PER_CONNECTION", default_value_t = 256)]
    pub concurrency_per_connection: usize,

    /// Timeout of a call from its arrival until its response starts (a unary call's answer; a
    /// stream's start, not its messages), answered DEADLINE_EXCEEDED; a shorter client
    /// deadline wins (0 = none).
    #[arg(long, env = "GRPC_REQUEST_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub request_timeout: Duration,

    /// Interval of HTTP/2 keepalive pings to idle clients (0 = off).
    #[arg(long, env = "GRPC_KEEPALIVE_INTERVAL", value_parser = parse_duration, default_value = "30s")]
    pub keepalive_interval: Duration,

    /// How long to wait for a keepalive ping's acknowledgement before closing the connection
    /// (more than 0; pings are switched off with the interval).
    #[arg(long, env = "GRPC_KEEPALIVE_TIMEOUT", value_parser = parse_positive_duration, default_value = "10s")]
    pub keepalive_timeout: Duration,

    /// Gather each connection's small HTTP/2 frames into one write per scheduler round instead
    /// of one write (and one TCP segment) per frame: fewer syscalls when many streams on one
    /// connection get small messages (see svc_kit::write_batching). Off by default: with
    /// large pushes it saved nothing.
    #[arg(long, env = "GRPC_BATCH_WRITES", default_value_t = false, action = clap::ArgAction::Set)]
    pub batch_writes: bool,

    /// Close connections gracefully after this age (GOAWAY), so clients and meshes rebalance
    /// across replicas (0 = never).
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE", value_parser = parse_duration, default_value = "0")]
    pub max_connection_age: Duration,

    /// After --max-connection-age, how long calls and streams on the old connection may
    /// still run before it is closed.
    #[arg(long, env = "GRPC_MAX_CONNECTION_AGE_GRACE", value_parser = parse_duration, default_value = "5m")]
    pub max_connection_age_grace: Duration,

    /// Compression accepted from and offered to clients: gzip, zstd, comma-separated
    /// (empty or `none` = none).
    #[arg(long, env = "GRPC_COMPRESSION", value_parser = parse_compression, default_value = "gzip,zstd")]
    pub compression: CompressionList,

    /// File of bearer tokens, one `read <token>` or `write <token>` per line (# comments).
    /// With any token configured, every RPC but health and reflection needs one.
    #[arg(long, env = "AUTH_TOKENS_FILE", value_parser = crate::auth::parse_tokens_file)]
    pub auth_tokens_file: Option<Tokens>,

    /// Bearer tokens with the read scope (comma-separated).
    #[arg(
        long,
        env = "AUTH_READ_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auth_read_tokens: Vec<Secret>,

    /// Bearer tokens with the write scope (comma-separated); they may read too.
    #[arg(
        long,
        env = "AUTH_WRITE_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auth_write_tokens: Vec<Secret>,

    /// PEM certificate chain: serve gRPC over TLS (with --tls-key).
    #[arg(long, env = "TLS_CERT_FILE", value_parser = parse_pem_file, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TLS_KEY_FILE", value_parser = parse_pem_file, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE", value_parser = parse_pem_file, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Address of the HTTP endpoint serving /metrics (Prometheus), /livez and /readyz,
    /// e.g. 0.0.0.0:9464 (empty = off).
    #[arg(long, env = "METRICS_LISTEN", value_parser = parse_optional_addr, default_value = "")]
    pub metrics_listen: OptionalAddr,

    /// A librdkafka property for every Kafka client, `key=value` (repeatable; a `;` separates
    /// settings, in the flag too), e.g. security.protocol=SASL_SSL. KAFKA_SECURITY_PROTOCOL,
    /// KAFKA_SASL_*, KAFKA_SSL_* variables are passed through whole (put a value holding a `;`
    /// there).
    #[arg(long, env = "KAFKA_CONFIG", value_parser = kafka_settings::SettingParser, value_delimiter = ';', hide_env_values = true)]
    pub kafka_config: Vec<KafkaSetting>,
}

/// Checks at start-up that a TLS file is readable PEM.
pub fn parse_pem_file(raw: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(raw);
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {raw}: {e}"))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(format!("{raw} is not a PEM file"));
    }
    Ok(path)
}

/// An optional socket address (`""` = none).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

/// Parses `host:port`, or the empty string for "off".
pub fn parse_optional_addr(raw: &str) -> Result<OptionalAddr, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(OptionalAddr(None));
    }
    raw.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|_| format!("'{raw}' is not an ip:port address (empty = off)"))
}

impl ServerArgs {
    /// Every configured token (file and environment).
    pub fn tokens(&self) -> Result<Tokens, String> {
        let mut tokens = self.auth_tokens_file.clone().unwrap_or_default();
        for (list, scope, name) in [
            (
                &self.auth_read_tokens,
                crate::auth::Scope::Read,
                "AUTH_READ_TOKENS",
            ),
            (
                &self.auth_write_tokens,
                crate::auth::Scope::Write,
                "AUTH_WRITE_TOKENS",
            ),
        ] {
            let given: Vec<_> = list.iter().filter(|s| !s.0.is_empty()).collect();
            if given.is_empty() && !list.is_empty() {
                // Set but blank (an emptied secret): no token, so it adds no protection; say
                // so louder than the "authentication off" line.
                tracing::warn!("{name} is set but holds no token; it adds none");
            }
            for secret in given {
                tokens
                    .add(&secret.0, scope)
                    .map_err(|e| format!("{name}: {e}"))?;
            }
        }
        Ok(tokens)
    }

    /// The compression encodings to accept and offer.
    pub fn compression_encodings(&self) -> Vec<CompressionEncoding> {
        self.compression
            .0
            .iter()
            .map(|c| match c {
                Compression::Gzip => CompressionEncoding::Gzip,
                Compression::Zstd => CompressionEncoding::Zstd,
            })
            .collect()
    }

    /// The same message-size and compression settings, for a method served by hand.
    pub fn method_codec(&self) -> MethodCodec {
        let (mut accept, mut send) = (
            EnabledCompressionEncodings::default(),
            EnabledCompressionEncodings::default(),
        );
        for encoding in self.compression_encodings() {
            accept.enable(encoding);
            send.enable(encoding);
        }
        MethodCodec {
            accept,
            send,
            max_decoding: self.max_recv_message_size,
            max_encoding: self.max_send_message_size,
        }
    }

    /// Installs what must exist before any work starts: the metrics recorder (when
    /// `--metrics-listen` is set) and the Kafka pass-through settings. Idempotent.
    pub fn install_process_globals(&self) {
        if self.metrics_listen.0.is_some() {
            crate::metrics::install();
        }
        crate::kafka::install(&self.kafka_config);
    }
}

/// Applies the message-size limits and compression of [`ServerArgs`] to a generated tonic
/// server (`XxxServer`), which carries these settings itself:
/// `svc_kit::grpc_service!(DatabaseServiceServer::from_arc(api), &settings.server)`.
#[macro_export]
macro_rules! grpc_service {
    ($server:expr, $args:expr) => {{
        let args: &$crate::ServerArgs = $args;
        let mut server = $server
            .max_decoding_message_size(args.max_recv_message_size)
            .max_encoding_message_size(args.max_send_message_size);
        for encoding in args.compression_encodings() {
            server = server.accept_compressed(encoding).send_compressed(encoding);
        }
        server
    }};
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("authentication: {0}")]
    Auth(String),
}

impl ServeError {
    /// The process exit status for this error: a TLS or token setting that turns out unusable
    /// only when the server is built (a PEM file without a key) is a configuration error like
    /// the ones found at start-up ([`crate::config::EXIT_CONFIG`]); the rest are 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            ServeError::Tls(_) | ServeError::Auth(_) => crate::config::EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// The exit status for a service's fatal error: that of the [`ServeError`] in its chain, if
/// any (see [`ServeError::exit_code`]), else 1.
pub fn exit_code(e: &(dyn std::error::Error + 'static)) -> i32 {
    std::iter::successors(Some(e), |e| e.source())
        .find_map(|e| e.downcast_ref::<ServeError>())
        .map_or(1, ServeError::exit_code)
}

fn read_pem(what: &str, path: &PathBuf) -> Result<Vec<u8>, ServeError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ServeError::Tls(format!("cannot read {what} {}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(ServeError::Tls(format!(
            "{what} {} is not PEM",
            path.display()
        )));
    }
    Ok(bytes)
}

/// A tonic server configured from `args` (limits, keepalive, connection age, TLS) with the
/// [`GrpcLayer`] (tracing, metrics, authentication with `scopes`, request size limit).
pub fn builder(args: &ServerArgs, scopes: Scopes) -> Result<GrpcServer, ServeError> {
    args.install_process_globals();
    let tokens = args.tokens().map_err(ServeError::Auth)?;
    let auth = if tokens.is_empty() {
        tracing::info!("authentication off (no tokens configured)");
        None
    } else {
        tracing::info!(tokens = ?tokens, "bearer-token authentication on");
        Some(AuthConfig { tokens, scopes })
    };

    let mut server = Server::builder()
        .max_concurrent_streams(args.max_concurrent_streams)
        .http2_keepalive_interval(nonzero(args.keepalive_interval))
        .http2_keepalive_timeout(Some(args.keepalive_timeout));
    // `--concurrency-per-connection` and `--request-timeout` are the layer's
    // (`crate::deadline`): tonic's would start a call's timer only once it has a slot.
    if let Some(age) = nonzero(args.max_connection_age) {
        // Only the age: tonic then sends a GOAWAY at it. Given a grace as well, it would send
        // none and drop the connection at age + grace; `serve` enforces the grace instead
        // (`connection_age::Aged`).
        server = server.max_connection_age(age);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let identity = Identity::from_pem(
            read_pem("certificate", cert)?,
            read_pem("private key", key)?,
        );
        // A peer that stalls in the handshake is dropped (tonic's default waits forever).
        let mut tls = ServerTlsConfig::new()
            .identity(identity)
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &args.tls_client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read_pem(
                "client CA",
                ca,
            )?));
        }
        server = server.tls_config(tls).map_err(|e| {
            // tonic's Display is only "transport error": the reason is its source.
            let why =
                std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
            ServeError::Tls(why)
        })?;
        tracing::info!(cert = %cert.display(), mutual = args.tls_client_ca.is_some(), "TLS on");
    }
    Ok(server.layer(GrpcLayer::new(
        auth,
        args.max_recv_message_size,
        nonzero(args.request_timeout),
    )))
}

/// The pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// An accept error that retrying at once cannot fix: out of descriptors or memory (as hyper
/// tells them). Others (a peer that reset during the handshake) pass at once, as in tonic.
fn is_out_of_resources(e: &std::io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// Adds the reflection services (v1 and v1alpha) advertising `service` and the health service.
pub fn add_reflection(
    router: Router,
    service: &'static str,
    enabled: bool,
) -> Result<Router, ServeError> {
    if !enabled {
        return Ok(router);
    }
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(omnibus_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest / ErrorInfo / ...: lets grpcurl print error details as
            // JSON instead of "not recognized" raw bytes.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}

/// Binds `addr` (and the metrics endpoint when configured) and serves `router` until
/// `shutdown` fires, then drains for at most `grace`.
pub async fn serve(
    router: Router,
    addr: SocketAddr,
    args: &ServerArgs,
    health: Health,
    shutdown: Shutdown,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let metrics = match args.metrics_listen.0 {
        Some(metrics_addr) => Some(
            crate::metrics::bind(metrics_addr, health.clone())
                .await
                .map_err(|source| ServeError::Metrics {
                    addr: metrics_addr,
                    source,
                })?,
        ),
        None => None,
    };
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(%local, tls = args.tls_cert.is_some(), "gRPC server listening");
    let batch_writes = args.batch_writes;
    let per_connection = args.concurrency_per_connection;
    let life = nonzero(args.max_connection_age)
        .map(|age| age.saturating_add(args.max_connection_age_grace));
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(move |tcp| {
            WithSlots::new(
                Aged::new(BatchedWrites::with_batching(tcp, batch_writes), life)
                    .with_opening(OPENING_TIMEOUT),
                per_connection,
            )
        })
        .then(|accepted| async move {
            // tonic retries a failed accept at once: out of descriptors (EMFILE), that spins
            // a core and logs nothing above trace. Pause instead, and say so.
            if let Err(e) = &accepted
                && is_out_of_resources(e)
            {
                tracing::warn!(error = %e, "accepting a connection failed; retrying in 100 ms");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
            accepted
        });

    let delay = args.shutdown_delay;
    let drain_signal = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        async move {
            shutdown.triggered().await;
            health.drain().await;
            if !delay.is_zero() {
                tracing::info!(?delay, "NOT_SERVING; still accepting calls until the drain");
                tokio::time::sleep(delay).await;
            }
            shutdown.start_drain();
        }
    };
    let server = router.serve_with_incoming_shutdown(incoming, drain_signal);
    tokio::pin!(server);

    let grace = args.shutdown_grace;
    tokio::select! {
        result = &mut server => result?,
        _ = async {
            shutdown.triggered().await;
            tokio::time::sleep(delay.saturating_add(grace)).await;
        } => {
            tracing::warn!(?grace, "grace period elapsed; closing the remaining connections");
        }
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    tracing::info!("gRPC server stopped");
    crate::telemetry::flush();
    Ok(())
}

/// Parses sizes such as `4MiB`, `512KiB`, `16MB`, `1048576` (bytes).
pub fn parse_bytes(raw: &str) -> Result<usize, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("'{raw}' is not a size (examples: 4MiB, 512KiB, 1048576)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1024,
        "m" | "mb" => 1_000_000,
        "mib" => 1024 * 1024,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1024 * 1024 * 1024,
        other => {
            return Err(format!(
                "unknown size unit '{other}' in '{raw}' (use B, KiB, MiB, GiB)"
            ));
        }
    };
    let bytes = value
        .checked_mul(factor)
        .filter(|b| *b > 0 && *b <= u32::MAX as u64)
        .ok_or_else(|| format!("'{raw}' must be between 1 byte and 4GiB"))?;
    Ok(bytes as usize)
}

/// Parses durations such as `500ms`, `10s`, `5m`, `24h`, `7d` (a bare number is seconds).
/// [`parse_duration`] for a setting where 0 has no meaning.
pub fn parse_positive_duration(raw: &str) -> Result<Duration, String> {
    let d = parse_duration(raw)?;
    if d.is_zero() {
        return Err(format!("'{raw}' must be more than 0"));
    }
    Ok(d)
}

pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{raw}' is not a duration (examples: 500ms, 10s, 5m, 24h, 7d)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "unknown duration unit '{other}' in '{raw}' (use ms, s, m, h or d)"
            ));
        }
    };
    // try_from: a value past Duration's range (about 584 billion years) is an error, not a
    // panic; this parses what clients send.
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("'{raw}' is not a valid duration"))
}

/// `d` in the largest unit [`parse_duration`] reads that states it exactly (`24h`, `90m`,
/// `45s`, `1500ms`): how a duration is shown back to the people who configure it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_string(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// What [`grpc_service!`](crate::grpc_service) configures on a generated server (compression,
/// message size limits), for a method a service answers itself in front of the generated one,
/// e.g. with responses encoded in advance ([`ServerArgs::method_codec`]).
#[derive(Clone, Copy, Debug)]
pub struct MethodCodec {
    accept: EnabledCompressionEncodings,
    send: EnabledCompressionEncodings,
    max_decoding: usize,
    max_encoding: usize,
}

impl MethodCodec {
    /// A tonic method handler over `codec` with these settings.
    pub fn grpc<C: tonic::codec::Codec>(&self, codec: C) -> tonic::server::Grpc<C> {
        tonic::server::Grpc::new(codec)
            .apply_compression_config(self.accept, self.send)
            .apply_max_message_size_config(Some(self.max_decoding), Some(self.max_encoding))
    }
}

/// One method of a generated gRPC service that the service answers itself (e.g. with
/// responses encoded in advance), mounted in front of the generated server with
/// [`WithMethod`]. [`UnaryMethod`] and [`StreamingMethod`] implement it for tonic's method
/// services with prost messages.
pub trait Method: Clone + Send + 'static {
    /// The method's path: `/package.Service/Method`.
    fn path(&self) -> &'static str;

    /// Answers one call of [`Self::path`], with the generated server's codec settings.
    fn call<B>(
        &self,
        codec: &MethodCodec,
        request: http::Request<B>,
    ) -> BoxFuture<GrpcResponse, Infallible>
    where
        B: HttpBody + Send + 'static,
        B::Error: Into<StdError> + Send + 'static;
}

/// A unary method answered by a [`tonic::server::UnaryService`] taking `Req`.
pub struct UnaryMethod<S, Req> {
    path: &'static str,
    service: S,
    request: PhantomData<fn(Req)>,
}

/// A server-streaming method answered by a [`tonic::server::ServerStreamingService`] taking
/// `Req`.
pub struct StreamingMethod<S, Req> {
    path: &'static str,
    service: S,
    request: PhantomData<fn(Req)>,
}

/// `new`, `Clone` and [`Method`] for the two method kinds; `$call` is tonic's handler for
/// the kind, `$extra` its further bounds.
macro_rules! method_kind {
    ($method:ident, $service:ident, $call:ident, { $($extra:tt)* }) => {
        impl<S, Req> $method<S, Req> {
            pub fn new(path: &'static str, service: S) -> Self {
                Self {
                    path,
                    service,
                    request: PhantomData,
                }
            }
        }

        impl<S: Clone, Req> Clone for $method<S, Req> {
            fn clone(&self) -> Self {
                Self::new(self.path, self.service.clone())
            }
        }

        impl<S, Req> Method for $method<S, Req>
        where
            S: tonic::server::$service<Req> + Clone + Send + 'static,
            S::Future: Send + 'static,
            S::Response: prost::Message + Send + 'static,
            Req: prost::Message + Default + Send + 'static,
            $($extra)*
        {
            fn path(&self) -> &'static str {
                self.path
            }

            fn call<B>(
                &self,
                codec: &MethodCodec,
                request: http::Request<B>,
            ) -> BoxFuture<GrpcResponse, Infallible>
            where
                B: HttpBody + Send + 'static,
                B::Error: Into<StdError> + Send + 'static,
            {
                let mut grpc = codec.grpc(tonic_prost::ProstCodec::<S::Response, Req>::default());
                let service = self.service.clone();
                Box::pin(async move { Ok(grpc.$call(service, request).await) })
            }
        }
    };
}

method_kind!(UnaryMethod, UnaryService, unary, {});
method_kind!(StreamingMethod, ServerStreamingService, server_streaming, {
    S::ResponseStream: Send + 'static,
});

type GrpcResponse = http::Response<tonic::body::Body>;

/// A generated service `S` with the method `M` answered by `M` instead; every other path goes
/// to `S`. Served under `S`'s name, with the message size and compression settings of
/// [`grpc_service!`](crate::grpc_service).
#[derive(Clone)]
pub struct WithMethod<S, M> {
    generated: S,
    method: M,
    codec: MethodCodec,
}

impl<S, M> WithMethod<S, M> {
    pub fn new(generated: S, method: M, args: &ServerArgs) -> Self {
        Self {
            generated,
            method,
            codec: args.method_codec(),
        }
    }
}

impl<S: NamedService, M> NamedService for WithMethod<S, M> {
    const NAME: &'static str = S::NAME;
}

impl<S, M, B> tower::Service<http::Request<B>> for WithMethod<S, M>
where
    S: tower::Service<
            http::Request<B>,
            Response = GrpcResponse,
            Error = Infallible,
            Future = BoxFuture<GrpcResponse, Infallible>,
        >,
    M: Method,
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = GrpcResponse;
    type Error = Infallible;
    type Future = BoxFuture<GrpcResponse, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.generated.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == self.method.path() {
            self.method.call(&self.codec, request)
        } else {
            self.generated.call(request)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_shown_as_they_are_written() {
        for (secs, shown) in [
            (86_400, "24h"),
            (7 * 86_400, "168h"),
            (5400, "90m"),
            (45, "45s"),
        ] {
            assert_eq!(format_duration(Duration::from_secs(secs)), shown);
            assert_eq!(parse_duration(shown).unwrap(), Duration::from_secs(secs));
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("10y").is_err());
        // Past Duration's range: an error for the caller, never a panic.
        assert!(parse_duration("6000000000000000h").is_err());
        assert!(parse_duration(&format!("{}d", "9".repeat(400))).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_bytes("512kib").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("5GiB").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn parse(args: &[&str]) -> Result<ServerArgs, clap::Error> {
        crate::config::parse_args_ignoring_env::<Cli>(
            std::iter::once("svc").chain(args.iter().copied()),
        )
        .map(|c| c.server)
    }

    /// Settings where 0 would silently mean something else: no call let in (0 streams), or
    /// tonic's own 20 s (a keepalive timeout of 0) are refused at start-up.
    #[test]
    fn only_running_out_of_resources_pauses_accepting() {
        use std::io::{Error, ErrorKind};
        for errno in [24, 23, 105, 12] {
            assert!(is_out_of_resources(&Error::from_raw_os_error(errno)));
        }
        // ECONNABORTED, ECONNRESET: a peer gone during the handshake.
        for errno in [103, 104] {
            assert!(!is_out_of_resources(&Error::from_raw_os_error(errno)));
        }
        assert!(!is_out_of_resources(&Error::from(ErrorKind::TimedOut)));
    }

    #[test]
    fn zero_is_refused_where_it_has_no_meaning() {
        assert!(parse(&["--max-concurrent-streams", "0"]).is_err());
        assert_eq!(
            parse(&["--max-concurrent-streams", "1"])
                .unwrap()
                .max_concurrent_streams,
            1
        );
        assert!(parse(&["--keepalive-timeout", "0"]).is_err());
        assert!(parse(&["--keepalive-timeout", "0s"]).is_err());
        assert_eq!(
            parse(&["--keepalive-timeout", "500ms"])
                .unwrap()
                .keepalive_timeout,
            Duration::from_millis(500)
        );
        // Where 0 means off, it still does.
        assert!(parse(&["--keepalive-interval", "0"]).is_ok());
        assert!(parse(&["--request-timeout", "0"]).is_ok());
    }

    #[test]
    fn defaults_keep_everything_optional_off() {
        let a = parse(&[]).unwrap();
        assert!(a.tokens().unwrap().is_empty());
        assert!(a.tls_cert.is_none() && a.metrics_listen.0.is_none());
        assert!(!a.batch_writes);
        assert!(parse(&["--batch-writes", "true"]).unwrap().batch_writes);
        assert_eq!(a.max_recv_message_size, 4 << 20);
        assert_eq!(a.compression_encodings().len(), 2);
        assert!(
            parse(&["--compression", ""])
                .unwrap()
                .compression
                .0
                .is_empty()
        );
        assert!(
            parse(&["--compression", "none"])
                .unwrap()
                .compression
                .0
                .is_empty()
        );
        assert_eq!(
            parse(&["--compression", "zstd"]).unwrap().compression.0,
            vec![Compression::Zstd]
        );
        assert!(parse(&["--compression", "brotli"]).is_err());
    }

    #[test]
    fn tokens_and_secrets() {
        let a = parse(&[
            "--auth-read-tokens",
            "aaaaaaaaaaaaaaaaaaaa,bbbbbbbbbbbbbbbbbbbb",
            "--auth-write-tokens",
            "cccccccccccccccccccc",
            "--kafka-config",
            "sasl.password=hunter2",
        ])
        .unwrap();
        let tokens = a.tokens().unwrap();
        assert_eq!(tokens.len(), 3);
        assert_eq!(
            tokens.lookup("cccccccccccccccccccc"),
            Some(crate::auth::Scope::Write)
        );
        let debug = format!("{a:?}");
        for secret in ["aaaaaaaa", "cccccccc", "hunter2"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        let err = parse(&["--auth-read-tokens", "short"])
            .unwrap()
            .tokens()
            .unwrap_err();
        assert!(
            err.contains("AUTH_READ_TOKENS") && !err.contains("short,"),
            "{err}"
        );
        assert!(
            parse(&["--tls-cert", "/x.pem"]).is_err(),
            "cert needs a key"
        );
        assert!(parse(&["--metrics-listen", "nope"]).is_err());
        assert_eq!(
            parse(&["--metrics-listen", "127.0.0.1:9464"])
                .unwrap()
                .metrics_listen
                .0,
            Some("127.0.0.1:9464".parse().unwrap())
        );
    }
}
