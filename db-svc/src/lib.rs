//! db-svc: safe, typed CRUD over the platform's PostgreSQL tables, served over gRPC.
//!
//! Layers: `api` (tonic edge) converts requests into `ops::Operation`s; `executor` resolves
//! tables in the `catalog`, plans SQL with `ops` (pure, bound parameters only) and runs it;
//! `values` is the JSON <-> PostgreSQL type mapping; `raw_sql` guards ExecuteRaw; `error` maps
//! every failure to a gRPC status and a stable code.

pub mod api;
pub mod bus;
pub mod catalog;
pub mod coalescing;
pub mod config;
pub mod db_health;
pub mod error;
pub mod executor;
pub mod fingerprint;
pub mod insert_coalescing;
pub mod liveness;
pub mod marks;
pub mod ops;
pub mod pg_numeric;
pub mod query_coalescing;
pub mod raw_sql;
pub mod stale_plans;
pub mod values;
pub mod wide_json_integers;
pub mod wire;

use omnibus_proto::service_names;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use svc_kit::{Health, Shutdown};

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::executor::{Executor, Limits};

/// The schema migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// RPCs that need a token with the write scope when authentication is on.
pub const WRITE_METHODS: &[&str] = &["Insert", "Update", "Delete", "Upsert", "ExecuteRaw"];

/// Rows a Query returns when it names no limit.
pub const DEFAULT_QUERY_LIMIT: u64 = 100;

/// How long shutdown waits for busy database connections to be returned.
const POOL_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    run_until(settings, Shutdown::on_signals()).await
}

/// The connection pool db-svc uses: lazy, UTC session time zone (so `timestamp` columns
/// filled by now() hold UTC), the default statement timeout as a connection setting.
pub fn pool(settings: &Settings) -> PgPool {
    let timeout_ms = executor::statement_timeout_ms(settings.statement_timeout).to_string();
    let options = settings.database.clone().options([
        ("TimeZone", "UTC"),
        ("statement_timeout", timeout_ms.as_str()),
    ]);
    pool_of(
        options,
        settings.db_max_connections,
        settings.db_acquire_timeout,
        settings.db_ping_after_idle,
    )
}

/// `ExecuteRaw`'s connections, apart from the others: the same settings, a quarter as many
/// (at least one), each keeping at most one prepared statement. Every distinct raw SQL text
/// is a prepared statement on the connection it ran on; in the main pool up to 100 of them
/// would stay planned on each connection (a long text of many expressions plans into a
/// gigabyte), and raw SQL would push the service's own statements out of the cache.
pub fn raw_pool(pool: &PgPool) -> PgPool {
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        .statement_cache_capacity(1);
    let pool_options = pool.options();
    pool_of(
        options,
        (pool_options.get_max_connections() / 4).max(1),
        pool_options.get_acquire_timeout(),
        // Raw SQL is not the hot path: its connections are checked on every acquire.
        std::time::Duration::ZERO,
    )
}

fn pool_of(
    options: sqlx::postgres::PgConnectOptions,
    max: u32,
    acquire_timeout: std::time::Duration,
    ping_after_idle: std::time::Duration,
) -> PgPool {
    // Connections whose prepared statements predate a schema change are retired (see
    // `stale_plans`); one atomic load per acquire and release otherwise.
    // Liveness: a connection is pinged before use only when `liveness` says so.
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            Box::pin(async move {
                if stale_plans::predates_change(meta.age) {
                    return Ok(false);
                }
                // A connection that fails its ping is closed; the pool hands out another.
                if liveness::needs_ping(meta.idle_for, ping_after_idle)
                    && let Err(e) = sqlx::Connection::ping(conn).await
                {
                    tracing::debug!(error = %e, "pooled connection failed its ping");
                    return Ok(false);
                }
                Ok(true)
            })
        })
        .after_release(|_, meta| {
            Box::pin(async move { Ok(!stale_plans::predates_change(meta.age)) })
        })
        .connect_lazy_with(options)
}

/// Migrations (when enabled), the raw-SQL role (when set), then the catalog.
async fn prepare(
    pool: &PgPool,
    catalog: &Catalog,
    migrate: bool,
    raw_role: Option<&str>,
) -> Result<(), String> {
    if migrate {
        MIGRATOR
            .run(pool)
            .await
            .map_err(|e| format!("migrations: {e}"))?;
    }
    if let Some(role) = raw_role {
        // Checked here so that a typo is a start-up error, not a failure of every ExecuteRaw.
        let member: bool = sqlx::query_scalar("SELECT pg_has_role(current_user, $1, 'MEMBER')")
            .bind(role)
            .fetch_one(pool)
            .await
            .map_err(|e| format!("--raw-sql-role {role}: {e}"))?;
        if !member {
            return Err(format!(
                "--raw-sql-role {role}: db-svc's database user is not a member of that role \
                 (GRANT {role} TO <db-svc's user>)"
            ));
        }
    }
    catalog
        .refresh(pool)
        .await
        .map_err(|e| format!("catalog: {e}"))
}

async fn purge_request_log(pool: &PgPool, retention: std::time::Duration) {
    let result = sqlx::query(
        "DELETE FROM omnibus_request_log WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await;
    match result {
        Ok(done) if done.rows_affected() > 0 => {
            tracing::info!(
                removed = done.rows_affected(),
                "expired idempotency records removed"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot purge omnibus_request_log"),
    }
}

/// Starts the event-bus worker when it is configured. It runs the gRPC handler's code
/// (structured form) and the executor (SQL form) with limits of their own: reads stop
/// building rows no reply could carry, writes' returned rows must fit a reply before they
/// commit, and the raw-SQL write policy is the bus's. A worker that fails (its
/// Kafka clients cannot be created) stops the process, which then exits non-zero: db-svc
/// must not go on reporting SERVING with nobody answering the bus.
fn start_bus_worker(
    settings: &Settings,
    executor: &Executor,
    shutdown: &Shutdown,
) -> Option<tokio::task::JoinHandle<Result<(), String>>> {
    let Some(bus) = settings.bus.clone() else {
        tracing::warn!("event-bus worker off (no KAFKA_BROKERS, or --bus=false): gRPC only");
        return None;
    };
    // Reads stop building rows no reply could carry (`bus::read_guard_bytes`).
    let read_limits = Limits {
        max_response_bytes: bus::read_guard_bytes(&bus).min(executor.limits().max_response_bytes),
        response_limit: bus::READ_REPLY_LIMIT,
        ..executor.limits().clone()
    };
    let api = std::sync::Arc::new(api::DatabaseApi::new(
        executor.with_limits(read_limits.clone()),
        shutdown.clone(),
    ));
    // The SQL form runs raw statements only: no insert lanes of its own.
    let limits = Limits {
        raw_writes: bus.sql_writes,
        coalesce_inserts: 0,
        coalesce_queries: 0,
        ..read_limits
    };
    // SQL-form writes may return only as many rows as a reply carries: refused before commit.
    let write_limits = Limits {
        max_response_bytes: bus::sql_write_reply_bytes(&bus).min(limits.max_response_bytes),
        response_limit: bus::SQL_WRITE_REPLY_LIMIT,
        ..limits.clone()
    };
    // Structured-form writes likewise (their reply carries the rows twice); the gRPC
    // handler's other limits, and no shared statements (bus writes always carry a request
    // id, so never share one).
    let structured_write_limits = Limits {
        max_response_bytes: bus::structured_write_reply_bytes(&bus)
            .min(executor.limits().max_response_bytes),
        response_limit: bus::STRUCTURED_WRITE_REPLY_LIMIT,
        coalesce_inserts: 0,
        coalesce_queries: 0,
        ..executor.limits().clone()
    };
    let write_api = std::sync::Arc::new(api::DatabaseApi::new(
        executor.with_limits(structured_write_limits),
        shutdown.clone(),
    ));
    let handler = bus::Handler {
        api,
        write_api,
        sql_executor: executor.with_limits(limits),
        sql_write_executor: executor.with_limits(write_limits),
        sql_writes: bus.sql_writes,
    };
    let shutdown = shutdown.clone();
    let drain = settings.server.shutdown_grace;
    Some(tokio::spawn(svc_kit::shutdown::stop_on_panic(
        shutdown.clone(),
        async move {
            let result = bus::run(bus, handler, shutdown.clone(), drain).await;
            if let Err(e) = &result {
                tracing::error!("event-bus worker failed: {e}; shutting down");
                shutdown.trigger();
            }
            result
        },
    )))
}

/// Runs the service until `shutdown` fires.
pub async fn run_until(settings: Settings, shutdown: Shutdown) -> anyhow::Result<()> {
    tracing::info!(database = %settings.database_display, tables = ?settings.tables, "db-svc starting");
    settings.server.install_process_globals();
    let (health, health_service) = Health::new(service_names::DATABASE, &shutdown).await;

    // Lazy: db-svc starts (NOT_SERVING) even while PostgreSQL is down, and recovers by itself.
    let pool = pool(&settings);
    let catalog = Catalog::new(settings.tables.clone());
    let reachability = db_health::Reachability::default();

    let watcher = {
        let (probe_pool, pool, catalog) = (pool.clone(), pool.clone(), catalog.clone());
        let purge_pool = pool.clone();
        let migrate = settings.migrate;
        let raw_role = settings.raw_sql_role.clone();
        let retention = settings.request_log_retention;
        tokio::spawn(svc_kit::shutdown::stop_on_panic(
            shutdown.clone(),
            db_health::watch_database(
                probe_pool,
                health.clone(),
                reachability.clone(),
                shutdown.clone(),
                move || {
                    let (pool, catalog, raw_role) =
                        (pool.clone(), catalog.clone(), raw_role.clone());
                    async move { prepare(&pool, &catalog, migrate, raw_role.as_deref()).await }
                },
                move || {
                    let pool = purge_pool.clone();
                    async move { purge_request_log(&pool, retention).await }
                },
            ),
        ))
    };

    let executor = Executor::new(
        pool.clone(),
        catalog,
        Limits {
            default_limit: DEFAULT_QUERY_LIMIT.min(settings.query_max_limit),
            max_limit: settings.query_max_limit,
            statement_timeout: settings.statement_timeout,
            raw_writes: settings.raw_sql_writes,
            raw_role: settings.raw_sql_role.as_deref().map(std::sync::Arc::from),
            coalesce_inserts: settings.coalesce_inserts,
            coalesce_queries: settings.coalesce_queries,
            max_response_bytes: settings.server.max_send_message_size,
            response_limit: executor::GRPC_RESPONSE_LIMIT,
        },
        reachability,
    );
    let api = std::sync::Arc::new(api::DatabaseApi::new(executor.clone(), shutdown.clone()));
    svc_kit::metrics::spawn_sampler(std::time::Duration::from_secs(1), shutdown.clone(), {
        let (pool, max) = (pool.clone(), settings.db_max_connections);
        move || {
            use svc_kit::metrics::gauge;
            let (size, idle) = (pool.size() as f64, pool.num_idle() as f64);
            gauge!("db_pool_connections", "state" => "idle").set(idle);
            gauge!("db_pool_connections", "state" => "in_use").set((size - idle).max(0.0));
            gauge!("db_pool_max_connections").set(f64::from(max));
        }
    });
    let bus_worker = start_bus_worker(&settings, &executor, &shutdown);
    let scopes = svc_kit::Scopes::new().writes(service_names::DATABASE, WRITE_METHODS);
    let router = svc_kit::server::builder(&settings.server, scopes)?
        .add_service(health_service)
        .add_service(api::routes(api, &settings.server));
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
    let worker_result = match bus_worker {
        Some(worker) => worker.await,
        None => Ok(Ok(())),
    };
    let watcher_result = watcher.await;
    // close() waits for every checked-out connection; a statement still running after the
    // server's grace (its caller already gone) must not hold the exit past the orchestrator's
    // stop timeout. Dropping the pool then closes the connections; PostgreSQL ends the
    // statement when it notices (at once for a running query, when its wait ends for one
    // blocked on a lock, or with the server's client_connection_check_interval).
    let closing = futures::future::join(pool.close(), executor.raw_pool().close());
    if tokio::time::timeout(POOL_CLOSE_WAIT, closing)
        .await
        .is_err()
    {
        tracing::warn!(
            ?POOL_CLOSE_WAIT,
            "database connections still busy; closing them anyway"
        );
    }
    tracing::info!("db-svc stopped");
    // Exit non-zero after a panic, so that a supervisor restarts the service.
    svc_kit::shutdown::exit_after(&[
        ("the event-bus worker", worker_result.is_err()),
        ("the database watcher", watcher_result.is_err()),
    ])
    .map_err(anyhow::Error::msg)?;
    if let Ok(Err(e)) = worker_result {
        anyhow::bail!("the event-bus worker failed: {e}");
    }
    Ok(())
}
