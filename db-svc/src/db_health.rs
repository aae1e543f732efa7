//! Database reachability drives the health status: `SELECT 1` on a short interval.

use std::time::Duration;

use sqlx::PgPool;
use svc_kit::{Health, Shutdown};

const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Probes PostgreSQL until shutdown and reports the result as the service's health.
pub async fn watch_database(pool: PgPool, health: Health, shutdown: Shutdown) {
    let mut last_error: Option<String> = None;
    loop {
        let result =
            tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&pool)).await;
        let error = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        if error.is_some() && error != last_error {
            tracing::warn!(
                error = error.as_deref().unwrap_or_default(),
                "PostgreSQL is not reachable"
            );
        }
        if !shutdown.is_triggered() {
            health
                .set_serving(error.is_none(), "PostgreSQL unreachable")
                .await;
        }
        last_error = error;
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}
