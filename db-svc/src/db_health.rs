//! Database reachability drives the health status: `SELECT 1` on a short interval, over a
//! connection of the probe's own (through the pool, a pool busy with long statements would
//! pass for an unreachable database). The first time PostgreSQL answers, the schema is
//! prepared (migrations, catalog); the service reports SERVING only once that has succeeded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection, PgPool};
use svc_kit::{Health, Shutdown};

/// Whether PostgreSQL answered the last probe (false until the first answer). Requests read it
/// to tell an outage from a busy pool when their deadline passes waiting for a connection.
#[derive(Clone, Debug, Default)]
pub struct Reachability(Arc<AtomicBool>);

impl Reachability {
    pub fn is_reachable(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, reachable: bool) {
        self.0.store(reachable, Ordering::Relaxed);
    }
}

/// `SELECT 1` over `conn`, kept between probes. When it fails, or there is none, over a fresh
/// connection (kept if it answers): a session killed while idle (a DBA's job, a proxy) is not
/// an outage.
async fn probe(pool: &PgPool, conn: &mut Option<PgConnection>) -> Result<(), sqlx::Error> {
    if let Some(mut open) = conn.take()
        && sqlx::query("SELECT 1").execute(&mut open).await.is_ok()
    {
        *conn = Some(open);
        return Ok(());
    }
    let mut open = PgConnection::connect_with(&pool.connect_options()).await?;
    sqlx::query("SELECT 1").execute(&mut open).await?;
    *conn = Some(open);
    Ok(())
}

const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// While not ready, probe faster so start-up is quick.
const STARTING_INTERVAL: Duration = Duration::from_millis(250);
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(3600);

/// Probes PostgreSQL until shutdown and reports the result as the service's health.
/// `prepare` runs (again, until it succeeds) whenever PostgreSQL answers and it has not yet
/// succeeded; `housekeeping` runs about hourly once ready.
pub async fn watch_database<P, PF, H, HF>(
    pool: PgPool,
    health: Health,
    reachability: Reachability,
    shutdown: Shutdown,
    prepare: P,
    housekeeping: H,
) where
    P: Fn() -> PF,
    PF: Future<Output = Result<(), String>>,
    H: Fn() -> HF,
    HF: Future<Output = ()>,
{
    let mut last_error: Option<String> = None;
    let mut ready = false;
    let mut last_housekeeping: Option<Instant> = None;
    let mut conn: Option<PgConnection> = None;
    loop {
        let result = tokio::time::timeout(PROBE_TIMEOUT, probe(&pool, &mut conn)).await;
        let mut error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
        };
        let reachable = error.is_none();
        reachability.set(reachable);
        if reachable && !ready {
            match prepare().await {
                Ok(()) => ready = true,
                Err(e) => error = Some(format!("preparing the schema failed: {e}")),
            }
        }
        if error.is_some() && error != last_error {
            let error = error.as_deref().unwrap_or_default();
            if reachable {
                tracing::warn!(error, "PostgreSQL is reachable but the schema is not ready");
            } else {
                tracing::warn!(error, "PostgreSQL is not reachable");
            }
        }
        if !shutdown.is_triggered() {
            health
                .set_serving(error.is_none(), "PostgreSQL unreachable")
                .await;
        }
        if ready
            && error.is_none()
            && last_housekeeping.is_none_or(|t| t.elapsed() >= HOUSEKEEPING_INTERVAL)
        {
            housekeeping().await;
            last_housekeeping = Some(Instant::now());
        }
        last_error = error;
        let interval = if ready {
            PROBE_INTERVAL
        } else {
            STARTING_INTERVAL
        };
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
