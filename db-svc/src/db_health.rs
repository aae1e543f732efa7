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
/// succeeded; `housekeeping` runs about hourly once ready, beside the probes (a long cleanup
/// must not freeze the health status). Neither holds up the shutdown.
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
    let mut cleaning: Option<std::pin::Pin<Box<HF>>> = None;
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
            let prepared = tokio::select! {
                prepared = prepare() => prepared,
                _ = shutdown.triggered() => return,
            };
            match prepared {
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
            && cleaning.is_none()
            && last_housekeeping.is_none_or(|t| t.elapsed() >= HOUSEKEEPING_INTERVAL)
        {
            cleaning = Some(Box::pin(housekeeping()));
            last_housekeeping = Some(Instant::now());
        }
        last_error = error;
        let interval = if ready {
            PROBE_INTERVAL
        } else {
            STARTING_INTERVAL
        };
        let sleep = tokio::time::sleep(interval);
        tokio::pin!(sleep);
        loop {
            let cleaned = tokio::select! {
                _ = shutdown.triggered() => return,
                _ = &mut sleep => break,
                _ = async { cleaning.as_mut().expect("guarded").await }, if cleaning.is_some() => true,
            };
            if cleaned {
                cleaning = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PostgreSQL of the machine (the tests' `DATABASE_URL`, else the default local one).
    fn pool() -> PgPool {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy(&url)
            .expect("a PostgreSQL URL")
    }

    /// A preparation or a cleanup that does not finish (a network partition mid-statement
    /// waits for TCP's timeout, minutes) neither freezes the health status nor holds up the
    /// shutdown.
    #[tokio::test]
    async fn a_hung_preparation_or_cleanup_does_not_hold_the_shutdown_or_the_probes() {
        for hang_in_prepare in [true, false] {
            let shutdown = Shutdown::new();
            let (health, _) = Health::new("omnibus.db.v1.DatabaseService", &shutdown).await;
            let reachability = Reachability::default();
            let cleanups = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let started = cleanups.clone();
            let watcher = tokio::spawn(watch_database(
                pool(),
                health.clone(),
                reachability.clone(),
                shutdown.clone(),
                move || async move {
                    if hang_in_prepare {
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                },
                move || {
                    started.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>()
                },
            ));
            let deadline = Instant::now() + Duration::from_secs(20);
            if hang_in_prepare {
                while !reachability.is_reachable() {
                    assert!(Instant::now() < deadline, "PostgreSQL never answered");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            } else {
                // Ready, the cleanup started and hangs, and the probes go on: health stays
                // SERVING through more than one probe interval.
                while !(health.is_serving() && cleanups.load(Ordering::SeqCst) == 1) {
                    assert!(Instant::now() < deadline, "never ready");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The next probe says so again: at most an interval away, and answered within
                // its timeout; one more round of both for a busy machine.
                reachability.set(false);
                let deadline = Instant::now() + 2 * PROBE_INTERVAL + PROBE_TIMEOUT;
                while !reachability.is_reachable() {
                    assert!(
                        Instant::now() < deadline,
                        "the probes go on beside the cleanup"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert_eq!(
                    cleanups.load(Ordering::SeqCst),
                    1,
                    "the cleanup still hangs"
                );
            }
            shutdown.trigger();
            tokio::time::timeout(Duration::from_secs(5), watcher)
                .await
                .expect("the watcher stops at the shutdown")
                .unwrap();
        }
    }
}
