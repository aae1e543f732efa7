//! Readiness: a metadata request on a short interval checks that the broker answers; the
//! service is SERVING while it does and the start-up replay is over.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use svc_kit::{Health, Shutdown};

use crate::ingest::IngestStatus;

/// Whether the broker answered the latest probe.
#[derive(Debug, Default)]
pub struct BrokerStatus {
    connected: AtomicBool,
}

impl BrokerStatus {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes the broker until shutdown, updating `status` and `health` (which also waits for
/// the end of the replay `ingest` reports).
pub async fn watch_broker(
    brokers: String,
    status: Arc<BrokerStatus>,
    ingest: Arc<IngestStatus>,
    health: Health,
    shutdown: Shutdown,
) {
    // A fresh client for every probe: a long-lived one keeps a metadata cache of topics that
    // a restarted broker may have recreated under new ids (see ingest.rs, replace_client).
    let mut first = true;
    loop {
        let brokers_for_probe = brokers.clone();
        let ok = tokio::task::spawn_blocking(move || {
            let client: Result<BaseConsumer, _> = svc_kit::kafka::apply(&mut ClientConfig::new())
                .set("bootstrap.servers", &brokers_for_probe)
                .set("client.id", "consumer-svc-probe")
                .create();
            match client {
                Ok(c) => c.fetch_metadata(None, PROBE_TIMEOUT).is_ok(),
                Err(e) => {
                    tracing::error!(
                        "cannot create the Kafka client: {}",
                        svc_kit::kafka::describe_error(&e)
                    );
                    false
                }
            }
        })
        .await
        .unwrap_or(false);
        // Said when the broker goes away, and when it is not there to begin with (the
        // status starts disconnected, so that first failure is no change of it).
        let was = status.connected.swap(ok, Ordering::Relaxed);
        if !ok && (was || first) {
            tracing::warn!(%brokers, "Kafka broker is not reachable");
        }
        first = false;
        if !shutdown.is_triggered() {
            let replaying = ingest.replaying();
            let reason = if !ok {
                "Kafka broker unreachable"
            } else {
                "replaying the retention window"
            };
            health.set_serving(ok && !replaying, reason).await;
        }
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            // When the replay ends, probe again at once rather than after the interval.
            _ = ingest.replay_over.notified(), if ingest.replaying() => {}
        }
    }
}
