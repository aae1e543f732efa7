//! Broker reachability: a metadata request on a short interval drives the health status.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use svc_kit::{Health, Shutdown};

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

/// Probes the broker until shutdown, updating `status` and `health`.
pub async fn watch_broker(
    brokers: String,
    status: Arc<BrokerStatus>,
    health: Health,
    shutdown: Shutdown,
) {
    // A fresh client after every failed probe: librdkafka's metadata cache can crash when a
    // restarted broker recreates topics under new ids (see ingest.rs, replace_client).
    let make_client = || -> Option<Arc<BaseConsumer>> {
        match svc_kit::kafka::apply(&mut ClientConfig::new())
            .set("bootstrap.servers", &brokers)
            .set("client.id", "consumer-svc-probe")
            .create()
        {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::error!("cannot create the Kafka client: {e}");
                None
            }
        }
    };
    let Some(mut client) = make_client() else {
        return;
    };
    loop {
        let probe = client.clone();
        let ok =
            tokio::task::spawn_blocking(move || probe.fetch_metadata(None, PROBE_TIMEOUT).is_ok())
                .await
                .unwrap_or(false);
        if !ok && let Some(fresh) = make_client() {
            client = fresh;
        }
        if ok != status.connected.swap(ok, Ordering::Relaxed) && !ok {
            tracing::warn!(%brokers, "Kafka broker is not reachable");
        }
        if !shutdown.is_triggered() {
            health.set_serving(ok, "Kafka broker unreachable").await;
        }
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
