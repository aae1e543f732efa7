//! db-svc: safe, typed CRUD over the platform's PostgreSQL tables, served over gRPC.

pub mod api;
pub mod config;
pub mod db_health;

use omnibus_proto::db::v1::database_service_server::DatabaseServiceServer;
use omnibus_proto::service_names;
use sqlx::postgres::PgPoolOptions;
use svc_kit::{Health, Shutdown};

use crate::config::Settings;

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    run_until(settings, Shutdown::on_signals()).await
}

/// Runs the service until `shutdown` fires.
pub async fn run_until(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    tracing::info!(database = %settings.database_display, "db-svc starting");
    let (health, health_service) = Health::new(service_names::DATABASE).await;

    // Lazy: db-svc starts (NOT_SERVING) even while PostgreSQL is down, and recovers by itself.
    let pool = PgPoolOptions::new()
        .max_connections(settings.db_max_connections)
        .acquire_timeout(settings.db_acquire_timeout)
        .connect_lazy_with(settings.database.clone());

    let watcher = tokio::spawn(db_health::watch_database(
        pool.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let api = api::DatabaseApi::new(pool.clone());
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(DatabaseServiceServer::new(api));
    let router = svc_kit::server::add_reflection(
        router,
        service_names::DATABASE,
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
    let _ = watcher.await;
    pool.close().await;
    tracing::info!("db-svc stopped");
    Ok(())
}
