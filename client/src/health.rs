//! Health checks against either service (`grpc.health.v1`).

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::connect::ConnectOptions;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{addr} is not reachable - is the service running? ({source})")]
    Unreachable {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("{addr} did not answer the health check: {}", describe(status))]
    Call { addr: String, status: tonic::Status },
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
}

/// `status` as one readable phrase (its Display is a Debug-style dump with the source chain).
fn describe(status: &tonic::Status) -> String {
    match (status.code(), status.message()) {
        (tonic::Code::Unknown, "transport error") => {
            "no gRPC answer (transport error) - is that the right address?".into()
        }
        // What a peer that reads the HTTP/2 preface and hangs up gives, depending on timing.
        (tonic::Code::Cancelled, "operation was canceled") => {
            "the connection closed without a gRPC answer - is that the right address?".into()
        }
        (code, "") => code.description().to_string(),
        (code, message) => format!("{}: {message}", code.description()),
    }
}

/// Asks `addr` for the status of `service` (`""` = whole server).
pub async fn check(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus, HealthError> {
    check_with(addr, service, timeout, &ConnectOptions::default()).await
}

/// [`check`] over TLS when `options` say so (health needs no token, but it is sent if set).
pub async fn check_with(
    addr: &str,
    service: &str,
    timeout: Duration,
    options: &ConnectOptions,
) -> Result<ServingStatus, HealthError> {
    // The call's own timeout (`options`' request timeout, which may equal `timeout`) is
    // pushed past the deadline below, so that one answers, with one message.
    let endpoint = options
        .endpoint(addr, timeout)?
        .timeout(timeout.saturating_mul(2));
    // One deadline for connecting and asking together, not one for each.
    let answer = tokio::time::timeout(timeout, async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| HealthError::Unreachable {
                addr: addr.to_string(),
                source,
            })?;
        HealthClient::new(options.authenticate(channel))
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|status| HealthError::Call {
                addr: addr.to_string(),
                status,
            })
    })
    .await
    .map_err(|_| HealthError::Call {
        addr: addr.to_string(),
        status: tonic::Status::deadline_exceeded(format!(
            "no answer within {}s",
            timeout.as_secs_f64()
        )),
    })??;
    Ok(answer.into_inner().status())
}
