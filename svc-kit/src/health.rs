//! The standard `grpc.health.v1` service with one status per gRPC service plus the overall
//! server status (`""`), kept equal: a service is only as healthy as its dependencies.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health as HealthApi, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::Shutdown;

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
    /// Held for each whole update (the status and both reporter entries), so that updates
    /// land in order; true once the server drains, after which nothing sets SERVING again (a
    /// probe that read "not shutting down" just before would otherwise undo the drain's
    /// NOT_SERVING).
    draining: Arc<tokio::sync::Mutex<bool>>,
}

impl Health {
    /// Creates the reporter and the health gRPC service to mount. Starts NOT_SERVING: the
    /// service reports SERVING only once its dependencies have answered. `Watch` streams end
    /// when `shutdown` starts (after the NOT_SERVING it causes), so that they do not hold the
    /// drain for its whole grace period.
    pub async fn new(
        service: &'static str,
        shutdown: &Shutdown,
    ) -> (Self, HealthServer<WatchesEnd>) {
        let reporter = HealthReporter::new();
        let server = HealthServer::new(WatchesEnd {
            inner: HealthService::from_health_reporter(reporter.clone()),
            shutdown: shutdown.clone(),
        });
        let health = Self {
            reporter,
            service,
            current: Arc::new(AtomicU8::new(UNKNOWN)),
            draining: Arc::default(),
        };
        health.set_serving(false, "starting").await;
        health
            .reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        (health, server)
    }

    /// Sets both the service's and the overall status; logs transitions only. Once the
    /// server drains ([`Health::drain`]) the status stays NOT_SERVING.
    pub async fn set_serving(&self, serving: bool, reason: &str) {
        let draining = self.draining.lock().await;
        self.update(serving && !*draining, reason).await;
    }

    /// The server stops taking work: NOT_SERVING from now on, whatever the probes find.
    pub async fn drain(&self) {
        let mut draining = self.draining.lock().await;
        *draining = true;
        self.update(false, "shutting down").await;
    }

    async fn update(&self, serving: bool, reason: &str) {
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

/// tonic-health's service, except that `Watch` streams end once shutdown has started: its own
/// streams end only when the reporter is dropped, which never happens before the process
/// exits, so one watching client kept every shutdown waiting for the whole grace period.
pub struct WatchesEnd {
    inner: HealthService,
    shutdown: Shutdown,
}

/// Time for the NOT_SERVING that shutdown sets to reach the watchers before their streams end.
const LAST_WATCH_UPDATE: Duration = Duration::from_millis(200);

#[tonic::async_trait]
impl HealthApi for WatchesEnd {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream =
        Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let updates = self.inner.watch(request).await?.into_inner();
        let shutdown = self.shutdown.clone();
        let ended = async move {
            // At the drain, not the signal: with `--shutdown-delay`, watchers are to see
            // NOT_SERVING for the delay, not reconnect in a loop to streams that end at once.
            shutdown.draining().await;
            tokio::time::sleep(LAST_WATCH_UPDATE).await;
        };
        Ok(Response::new(Box::pin(updates.take_until(ended))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a `Check` of `service` answers.
    async fn checked(health: &Health, service: &str) -> i32 {
        let api = HealthService::from_health_reporter(health.reporter.clone());
        let request = Request::new(HealthCheckRequest {
            service: service.into(),
        });
        match api.check(request).await {
            Ok(response) => response.into_inner().status,
            Err(status) => panic!("{status:?}"),
        }
    }

    #[tokio::test]
    async fn once_draining_no_probe_sets_serving_again() {
        let shutdown = Shutdown::new();
        let (health, _server) = Health::new("test.Service", &shutdown).await;
        health.set_serving(true, "").await;
        assert!(health.is_serving());
        assert_eq!(checked(&health, "").await, ServingStatus::Serving as i32);
        health.drain().await;
        // A probe that found its dependency up, a moment too late.
        health.set_serving(true, "").await;
        assert!(!health.is_serving());
        for service in ["", "test.Service"] {
            assert_eq!(
                checked(&health, service).await,
                ServingStatus::NotServing as i32
            );
        }
        assert_eq!(
            checked(&health, LIVENESS).await,
            ServingStatus::Serving as i32
        );
    }
}
