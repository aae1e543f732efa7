//! Serving a tonic router with health, reflection and graceful shutdown.
//!
//! On shutdown the health status flips to NOT_SERVING (so load balancers stop routing), the
//! listener stops accepting, in-flight unary calls finish and streams end (their handlers watch
//! the same [`Shutdown`]); whatever is still open after the grace period is dropped.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use tonic::transport::server::{Router, TcpIncoming};

use crate::{Health, Shutdown};

/// Listener settings common to both services.
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    /// Maximum time to let in-flight calls and streams finish after SIGTERM/SIGINT.
    #[arg(long, env = "SHUTDOWN_GRACE", value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// Serve gRPC server reflection (v1 and v1alpha), so grpcurl works without proto files.
    #[arg(long, env = "GRPC_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub reflection: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection descriptors are invalid: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
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
            .with_service_name(service)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection")
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}

/// Binds `addr` and serves `router` until `shutdown` fires, then drains for at most `grace`.
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
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(%local, "gRPC server listening");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));

    let drain_signal = {
        let shutdown = shutdown.clone();
        let health = health.clone();
        async move {
            shutdown.triggered().await;
            health.set_serving(false, "shutting down").await;
        }
    };
    let server = router.serve_with_incoming_shutdown(incoming, drain_signal);
    tokio::pin!(server);

    let grace = args.shutdown_grace;
    tokio::select! {
        result = &mut server => result?,
        _ = async { shutdown.triggered().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "grace period elapsed; closing the remaining connections");
        }
    }
    tracing::info!("gRPC server stopped");
    Ok(())
}

/// Parses durations such as `500ms`, `10s`, `5m`, `24h`, `7d` (a bare number is seconds).
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
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("'{raw}' is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

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
    }
}
