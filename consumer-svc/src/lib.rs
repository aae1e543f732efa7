//! consumer-svc: consumes agent events from Kafka, keeps a live in-memory 24 h view and serves
//! it over gRPC.

pub mod api;
pub mod broker;
pub mod config;
pub mod convert;
pub mod events;
pub mod hub;
pub mod ingest;
pub mod replay_progress;
pub mod snapshot;
pub mod state;
pub mod timestamp;
pub mod wire;

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use omnibus_proto::service_names;
use svc_kit::{Health, Shutdown};

use crate::config::Settings;

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    run_until(settings, Shutdown::on_signals()).await
}

/// Runs the service until `shutdown` fires.
pub async fn run_until(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    tracing::info!(brokers = %settings.brokers, "consumer-svc starting");
    settings.server.install_process_globals();
    let (health, health_service) = Health::new(service_names::CONSUMER, &shutdown).await;
    let status = Arc::new(broker::BrokerStatus::default());

    let state = Arc::new(RwLock::new(state::State::new(state::StateConfig {
        retention: settings.retention.as_micros() as i64,
        max_actions: settings.max_actions,
        max_decisions: settings.max_routing_decisions,
        max_transformations: settings.max_transformations,
        max_performance: settings.max_performance_metrics,
        max_buffer_bytes: settings.max_buffer_bytes,
        max_agents: settings.max_agents,
    })));
    let hub = Arc::new(hub::Hub::with_limits(
        hub::Limits {
            ring: if settings.real_time_events {
                settings.resume_buffer
            } else {
                0
            },
            ring_bytes: settings.resume_buffer_bytes,
            queue: settings.subscriber_queue,
            queue_bytes: settings.subscriber_queue_bytes,
        },
        // Sequences continue from this start time (µs): never backwards across restarts.
        u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or(0),
    ));
    let ingest_status = Arc::new(ingest::IngestStatus::new(settings.topics.clone()));
    let probe = tokio::spawn(svc_kit::shutdown::stop_on_panic(
        shutdown.clone(),
        broker::watch_broker(
            settings.brokers.clone(),
            status.clone(),
            ingest_status.clone(),
            health.clone(),
            shutdown.clone(),
        ),
    ));
    let dirty_agents = Arc::new(Mutex::new(HashSet::new()));
    tracing::info!(topics = ?settings.topics, retention = ?settings.retention, "consuming");
    svc_kit::metrics::spawn_sampler(std::time::Duration::from_secs(1), shutdown.clone(), {
        let (status, hub, state) = (ingest_status.clone(), hub.clone(), state.clone());
        move || record_metrics(&status, &hub, &state)
    });

    let ingest = ingest::Ingest::new(
        ingest::IngestConfig {
            brokers: settings.brokers.clone(),
            topics: settings.topics.clone(),
            replay_seek: settings.replay_seek,
            seek_slack: std::time::Duration::from_secs(300),
            publish: settings.real_time_events,
        },
        ingest::Sinks {
            state: state.clone(),
            hub: hub.clone(),
            status: ingest_status.clone(),
            dirty_agents: dirty_agents.clone(),
        },
    )
    .map_err(|e| anyhow::anyhow!("Kafka client: {}", svc_kit::kafka::describe_error(&e)))?;
    // The replay wait is bounded (--replay-timeout), from when the broker first answered: a
    // replica started during a broker outage must not report SERVING with nothing read.
    tokio::spawn({
        let (status, shutdown, timeout) = (
            ingest_status.clone(),
            shutdown.clone(),
            settings.replay_timeout,
        );
        async move {
            let started_then_timed_out = async {
                status.replay_started.notified().await;
                tokio::time::sleep(timeout).await;
            };
            tokio::select! {
                _ = shutdown.triggered() => {}
                _ = started_then_timed_out => status.give_up_replay(),
            }
        }
    });
    let ingest_thread = {
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("ingest".into())
            .spawn(move || {
                // A panic here would leave the service serving frozen aggregates as healthy.
                let _stop = svc_kit::shutdown::TriggerOnPanic(shutdown.clone());
                ingest.run(shutdown)
            })?
    };

    let api = Arc::new(api::ConsumerApi {
        broker: status,
        state,
        hub,
        ingest: ingest_status,
        real_time: settings.real_time_events,
        max_push: settings.max_push,
        max_response_bytes: settings.server.max_send_message_size,
        shutdown: shutdown.clone(),
    });
    let live = settings.real_time_events.then(|| {
        tokio::spawn(svc_kit::shutdown::stop_on_panic(
            shutdown.clone(),
            api::publish_live_updates(api.clone(), dirty_agents, settings.agent_metrics_interval),
        ))
    });
    // Every RPC of ConsumerService is a read.
    let router = svc_kit::server::builder(&settings.server, svc_kit::Scopes::new())?
        .add_service(health_service)
        .add_service(api::routes(api, &settings.server));
    let router = svc_kit::server::add_reflection(
        router,
        service_names::CONSUMER,
        settings.server.reflection,
    )?;
    svc_kit::serve(
        router,
        settings.listen,
        &settings.server,
        health,
        shutdown.clone(),
    )
    .await?;

    shutdown.trigger();
    let probe_result = probe.await;
    let live_result = match live {
        Some(live) => live.await,
        None => Ok(()),
    };
    // The ingest thread notices within one poll interval.
    let ingest_result = tokio::task::spawn_blocking(move || ingest_thread.join()).await;
    tracing::info!("consumer-svc stopped");
    // Exit non-zero after a panic, so that a supervisor restarts the service (which replays).
    svc_kit::shutdown::exit_after(&[
        ("the ingest thread", !matches!(ingest_result, Ok(Ok(())))),
        ("the broker probe", probe_result.is_err()),
        ("the live-update publisher", live_result.is_err()),
    ])
    .map_err(anyhow::Error::msg)
}

/// Copies the ingest counters, partition positions, stream state and what the buffers hold into
/// the metrics registry (Prometheus: rate(consumer_events_consumed_total[1m]) is the consume
/// rate).
fn record_metrics(status: &ingest::IngestStatus, hub: &hub::Hub, state: &RwLock<state::State>) {
    use std::sync::atomic::Ordering::Relaxed;
    use svc_kit::metrics::{counter, gauge};
    for (topic, c) in status.topics.iter().zip(&status.counters) {
        counter!("consumer_events_consumed_total", "topic" => topic.clone())
            .absolute(c.consumed.load(Relaxed));
        counter!("consumer_parse_errors_total", "topic" => topic.clone())
            .absolute(c.parse_errors.load(Relaxed));
        counter!("consumer_events_expired_total", "topic" => topic.clone())
            .absolute(c.expired.load(Relaxed));
    }
    for ((kind, partition), position) in status.partitions.lock().iter() {
        let (topic, partition) = (status.topics[*kind].clone(), partition.to_string());
        if position.next >= 0 {
            gauge!("consumer_partition_offset", "topic" => topic.clone(), "partition" => partition.clone())
                .set(position.next as f64);
        }
        if position.next >= 0 && position.high >= 0 {
            gauge!("consumer_partition_lag", "topic" => topic, "partition" => partition)
                .set((position.high - position.next).max(0) as f64);
        }
    }
    gauge!("consumer_stream_subscribers").set(hub.subscribers() as f64);
    gauge!("consumer_stream_sequence").set(hub.last_seq() as f64);
    // The read lock is held for four copies.
    let buffers = state.read().buffer_usage();
    let ring = ("resume", hub.ring_usage());
    for (buffer, usage) in buffers.into_iter().chain([ring]) {
        gauge!("consumer_buffer_items", "buffer" => buffer).set(usage.items as f64);
        gauge!("consumer_buffer_bytes", "buffer" => buffer).set(usage.bytes as f64);
        counter!("consumer_buffer_evicted_for_bytes_total", "buffer" => buffer)
            .absolute(usage.evicted_for_bytes);
    }
}
