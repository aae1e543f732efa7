//! The standard `grpc.health.v1` service with one status per gRPC service plus the overall
//! server status (`""`), kept equal: a service is only as healthy as its dependencies.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

const UNKNOWN: u8 = 0;
const SERVING: u8 = 1;
const NOT_SERVING: u8 = 2;

/// A health "service" that is SERVING as long as the process answers at all, whatever its
/// dependencies: for liveness probes (`grpc: {service: liveness}`), which must not restart a
/// pod just because PostgreSQL or Kafka is down.
pub const LIVENESS: &str = "liveness";

/// Reports the health of one gRPC service and of the server as a whole.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
    current: Arc<AtomicU8>,
}

impl Health {
    /// Creates the reporter and the health gRPC service to mount. Starts NOT_SERVING: the
    /// service reports SERVING only once its dependencies have answered.
    pub async fn new(
        service: &'static str,
    ) -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let health = Self {
            reporter,
            service,
            current: Arc::new(AtomicU8::new(UNKNOWN)),
        };
        health.set_serving(false, "starting").await;
        health
            .reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        (health, server)
    }

    /// Sets both the service's and the overall status; logs transitions only.
    pub async fn set_serving(&self, serving: bool, reason: &str) {
        let (code, status) = if serving {
            (SERVING, ServingStatus::Serving)
        } else {
            (NOT_SERVING, ServingStatus::NotServing)
        };
        let previous = self.current.swap(code, Ordering::SeqCst);
        if previous != code {
            if serving {
                tracing::info!(service = self.service, "health: SERVING");
            } else if previous != UNKNOWN {
                tracing::warn!(service = self.service, reason, "health: NOT_SERVING");
            }
        }
        self.reporter.set_service_status(self.service, status).await;
        self.reporter.set_service_status("", status).await;
    }

    pub fn is_serving(&self) -> bool {
        self.current.load(Ordering::SeqCst) == SERVING
    }
}
