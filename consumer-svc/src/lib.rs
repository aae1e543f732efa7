//! consumer-svc: consumes agent events from Kafka, keeps a live in-memory 24 h view and serves
//! it over gRPC.

pub mod api;
pub mod broker;
pub mod config;
pub mod events;
pub mod state;

use std::sync::Arc;

use omnibus_proto::consumer::v1::consumer_service_server::ConsumerServiceServer;
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
    let (health, health_service) = Health::new(service_names::CONSUMER).await;
    let status = Arc::new(broker::BrokerStatus::default());

    let probe = tokio::spawn(broker::watch_broker(
        settings.brokers.clone(),
        status.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let api = api::ConsumerApi::new(status);
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(ConsumerServiceServer::new(api));
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
    let _ = probe.await;
    tracing::info!("consumer-svc stopped");
    Ok(())
}
