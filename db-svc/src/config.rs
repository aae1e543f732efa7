//! All db-svc settings: flags with environment fallbacks.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use sqlx::postgres::PgConnectOptions;
use svc_kit::server::parse_duration;
use svc_kit::{ServerArgs, telemetry::LogArgs};

/// db-svc: safe, typed CRUD over the platform's PostgreSQL tables, over gRPC and the event bus.
#[derive(Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "DB_SVC_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,

    /// PostgreSQL connection URL (postgres://user:password@host:port/database). When absent,
    /// the POSTGRES_* settings are used.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// PostgreSQL host (used when DATABASE_URL is not set).
    #[arg(long, env = "POSTGRES_HOST")]
    pub postgres_host: Option<String>,

    /// PostgreSQL port (also in the `tcp://host:port` form Kubernetes service links and
    /// Docker links set POSTGRES_PORT to, for a service or container named `postgres`).
    #[arg(long, env = "POSTGRES_PORT", value_parser = parse_postgres_port, default_value = "5432")]
    pub postgres_port: u16,

    /// PostgreSQL database name.
    #[arg(long, env = "POSTGRES_DATABASE", default_value = "omnibus")]
    pub postgres_database: String,

    /// PostgreSQL user.
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres")]
    pub postgres_user: String,

    /// PostgreSQL password (never logged).
    #[arg(long, env = "POSTGRES_PASSWORD", hide_env_values = true)]
    pub postgres_password: Option<String>,

    /// Maximum connections in the PostgreSQL pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub db_max_connections: u32,

    /// How long a request waits for a pooled connection before failing UNAVAILABLE.
    #[arg(long, env = "DB_ACQUIRE_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub db_acquire_timeout: Duration,

    /// A pooled connection idle for at least this long is checked with a round trip before
    /// it is handed out; one in steady use is not (0s: check on every acquire).
    #[arg(long, env = "DB_PING_AFTER_IDLE", value_parser = parse_duration, default_value = "1s")]
    pub db_ping_after_idle: Duration,

    /// Tables db-svc serves (comma-separated); their columns are read from PostgreSQL.
    #[arg(
        long,
        env = "DB_SVC_TABLES",
        value_delimiter = ',',
        default_value = "agent_routing_decisions,agent_actions,agent_manifest_injections,agent_transformation_events,error_events,pattern_lineage_nodes,pattern_lineage_edges"
    )]
    pub tables: Vec<String>,

    /// Apply the embedded schema migrations once PostgreSQL is reachable, before SERVING.
    #[arg(long, env = "DB_SVC_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,

    /// Largest `limit` a Query may ask for (StreamQuery is not capped).
    #[arg(long, env = "DB_QUERY_MAX_LIMIT", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub query_max_limit: u64,

    /// Statement timeout of every request (0 = none); a shorter gRPC deadline lowers it.
    #[arg(long, env = "DB_STATEMENT_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    pub statement_timeout: Duration,

    /// Let ExecuteRaw run INSERT / UPDATE / DELETE (default: read-only queries only).
    #[arg(long, env = "DB_RAW_SQL_WRITES", default_value_t = false, action = clap::ArgAction::Set)]
    pub raw_sql_writes: bool,

    /// Run ExecuteRaw statements as this PostgreSQL role (`SET LOCAL ROLE`), so that
    /// PostgreSQL's own grants bound what raw SQL can read or write, behind the parsed guard.
    /// db-svc's user must be a member of it; checked when the schema is prepared.
    #[arg(long, env = "DB_RAW_SQL_ROLE", value_parser = parse_role)]
    pub raw_sql_role: Option<String>,

    /// Group commit for inserts: INSERT statements per table and column list that run at once
    /// before further inserts (without request id or deadline of their own) wait and share one
    /// statement, each still getting its own rows and errors. 0 = every insert alone.
    #[arg(long, env = "DB_COALESCE_INSERTS", default_value_t = 2)]
    pub coalesce_inserts: usize,

    /// Statements per query shape (same SQL, different filter values) running at once before
    /// further plain queries of that shape wait and share one statement, each still getting
    /// its own rows. 0 = every query alone.
    #[arg(long, env = "DB_COALESCE_QUERIES", default_value_t = 2)]
    pub coalesce_queries: usize,

    /// How long idempotency records (request ids and their results) are kept.
    #[arg(long, env = "DB_REQUEST_LOG_RETENTION", value_parser = parse_duration, default_value = "7d")]
    pub request_log_retention: Duration,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub log: LogArgs,

    #[command(flatten)]
    pub bus: crate::bus::BusArgs,
}

// Hand-written so that no password can reach a log line through `{:?}`.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field(
                "database_url",
                &self
                    .database_url
                    .as_deref()
                    .map(svc_kit::config::redact_url),
            )
            .field("postgres_host", &self.postgres_host)
            .field("postgres_port", &self.postgres_port)
            .field("postgres_database", &self.postgres_database)
            .field("postgres_user", &self.postgres_user)
            .field(
                "postgres_password",
                &self.postgres_password.as_ref().map(|_| "***"),
            )
            .finish_non_exhaustive()
    }
}

/// Settings after validation. Not `Debug`: the connection options hold the password.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub database: PgConnectOptions,
    /// Where the database is, without credentials, for logs.
    pub database_display: String,
    pub db_max_connections: u32,
    pub db_acquire_timeout: Duration,
    pub db_ping_after_idle: Duration,
    pub tables: Vec<String>,
    pub migrate: bool,
    pub query_max_limit: u64,
    pub statement_timeout: Duration,
    pub raw_sql_writes: bool,
    pub raw_sql_role: Option<String>,
    pub coalesce_inserts: usize,
    pub coalesce_queries: usize,
    pub request_log_retention: Duration,
    pub server: ServerArgs,
    pub log: LogArgs,
    /// The event-bus worker's settings; None when it is off or no broker is configured.
    pub bus: Option<crate::bus::BusSettings>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("database", &self.database_display)
            .field("db_max_connections", &self.db_max_connections)
            .field("tables", &self.tables)
            .field("migrate", &self.migrate)
            .finish_non_exhaustive()
    }
}

/// A PostgreSQL identifier db-svc accepts in its configuration.
fn is_plain_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

impl Config {
    /// Checks the settings clap cannot check alone; the error names the setting and never
    /// repeats a password.
    pub fn validate(self) -> Result<Settings, String> {
        let database = match (&self.database_url, &self.postgres_host) {
            (Some(url), _) => {
                let parsed = url::Url::parse(url)
                    .map_err(|e| format!("DATABASE_URL is not a valid URL: {e}"))?;
                if !matches!(parsed.scheme(), "postgres" | "postgresql") {
                    return Err(format!(
                        "DATABASE_URL must start with postgres:// or postgresql:// (got {}://)",
                        parsed.scheme()
                    ));
                }
                PgConnectOptions::from_str(url).map_err(|_| {
                    "DATABASE_URL is not a valid PostgreSQL connection URL".to_string()
                })?
            }
            (None, Some(host)) => {
                let mut opts = PgConnectOptions::new()
                    .host(host)
                    .port(self.postgres_port)
                    .database(&self.postgres_database)
                    .username(&self.postgres_user);
                if let Some(password) = &self.postgres_password {
                    opts = opts.password(password);
                }
                opts
            }
            (None, None) => {
                return Err(
                    "missing setting DATABASE_URL (or POSTGRES_HOST with POSTGRES_PORT, \
                            POSTGRES_DATABASE, POSTGRES_USER, POSTGRES_PASSWORD)"
                        .into(),
                );
            }
        };
        let database_display = format!(
            "postgres://{}@{}:{}/{}",
            database.get_username(),
            database.get_host(),
            database.get_port(),
            database.get_database().unwrap_or("")
        );
        let tables: Vec<String> = self
            .tables
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if tables.is_empty() {
            return Err("DB_SVC_TABLES is empty".into());
        }
        if let Some(bad) = tables.iter().find(|t| !is_plain_identifier(t)) {
            return Err(format!(
                "DB_SVC_TABLES: '{bad}' is not a table name (letters, digits, _)"
            ));
        }
        Ok(Settings {
            listen: self.listen,
            database,
            database_display,
            db_max_connections: self.db_max_connections,
            db_acquire_timeout: self.db_acquire_timeout,
            db_ping_after_idle: self.db_ping_after_idle,
            tables,
            migrate: self.migrate,
            query_max_limit: self.query_max_limit,
            statement_timeout: self.statement_timeout,
            raw_sql_writes: self.raw_sql_writes,
            raw_sql_role: self.raw_sql_role,
            coalesce_inserts: self.coalesce_inserts,
            coalesce_queries: self.coalesce_queries,
            request_log_retention: self.request_log_retention,
            server: self.server,
            log: self.log,
            bus: self.bus.validate()?,
        })
    }
}

/// A role name as written in `CREATE ROLE` (it is quoted when used, so any text but an empty
/// one or one with a NUL byte is a name PostgreSQL accepts).
fn parse_role(raw: &str) -> Result<String, String> {
    if raw.is_empty() || raw.contains('\0') || raw.len() > 63 {
        return Err(format!("'{raw}' is not a role name (1-63 bytes, no NUL)"));
    }
    Ok(raw.to_string())
}

/// A port, or the port of a `tcp://host:port` link address: a Kubernetes service named
/// `postgres` gives every pod of its namespace `POSTGRES_PORT=tcp://10.0.0.5:5432` (Docker's
/// links do the same), which must not stop db-svc from starting.
fn parse_postgres_port(value: &str) -> Result<u16, String> {
    let port = value
        .strip_prefix("tcp://")
        .and_then(|addr| addr.rsplit_once(':'))
        .map_or(value, |(_, port)| port);
    port.parse()
        .map_err(|_| format!("'{value}' is not a port (1-65535, or tcp://host:port)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_port_takes_the_link_form_kubernetes_and_docker_set() {
        assert_eq!(parse_postgres_port("5433"), Ok(5433));
        assert_eq!(parse_postgres_port("tcp://10.0.0.5:5432"), Ok(5432));
        assert_eq!(parse_postgres_port("tcp://[fd00::5]:6432"), Ok(6432));
        for bad in ["", "tcp://10.0.0.5", "udp://h:5432", "70000", "tcp://h:x"] {
            assert!(parse_postgres_port(bad).is_err(), "{bad}");
        }
        let settings = parse(&[
            "--postgres-host",
            "db.internal",
            "--postgres-port",
            "tcp://10.0.0.5:5432",
        ])
        .unwrap();
        assert!(
            settings.database_display.contains("db.internal:5432"),
            "{}",
            settings.database_display
        );
    }

    fn parse(args: &[&str]) -> Result<Settings, String> {
        svc_kit::config::parse_args_ignoring_env::<Config>(
            std::iter::once("db-svc").chain(args.iter().copied()),
        )
        .map_err(|e| e.to_string())?
        .validate()
    }

    #[test]
    fn database_is_required() {
        let err = parse(&[]).unwrap_err();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn bad_urls_name_the_setting_and_hide_the_password() {
        let err = parse(&["--database-url", "mysql://u:hunter2@h/db"]).unwrap_err();
        assert!(
            err.contains("DATABASE_URL") && !err.contains("hunter2"),
            "{err}"
        );
        let err = parse(&["--database-url", "postgres://u:hunter2@h:notaport/db"]).unwrap_err();
        assert!(
            err.contains("DATABASE_URL") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn tables_default_to_the_seven_and_are_checked() {
        let s = parse(&["--database-url", "postgres://u@h/db"]).unwrap();
        assert_eq!(s.tables.len(), 7);
        assert!(s.tables.contains(&"error_events".to_string()));
        assert!(s.migrate && !s.raw_sql_writes);
        let s = parse(&["--database-url", "postgres://u@h/db", "--tables", "a, b_2"]).unwrap();
        assert_eq!(s.tables, vec!["a", "b_2"]);
        let err =
            parse(&["--database-url", "postgres://u@h/db", "--tables", "a;drop"]).unwrap_err();
        assert!(err.contains("DB_SVC_TABLES"), "{err}");
    }

    #[test]
    fn the_raw_sql_role_is_optional_and_any_nonempty_name() {
        let s = parse(&["--database-url", "postgres://u@h/db"]).unwrap();
        assert_eq!(s.raw_sql_role, None);
        let url = ["--database-url", "postgres://u@h/db"];
        let s = parse(&[&url[..], &["--raw-sql-role", "Raw \"reader\""]].concat()).unwrap();
        assert_eq!(s.raw_sql_role.as_deref(), Some("Raw \"reader\""));
        assert!(parse(&[&url[..], &["--raw-sql-role", ""]].concat()).is_err());
        assert!(parse(&[&url[..], &["--raw-sql-role", &"r".repeat(64)]].concat()).is_err());
    }

    #[test]
    fn display_and_debug_never_show_the_password() {
        let s = parse(&["--database-url", "postgres://u:hunter2@h:5433/db"]).unwrap();
        assert_eq!(s.database_display, "postgres://u@h:5433/db");
        let c = svc_kit::config::parse_args_ignoring_env::<Config>([
            "db-svc",
            "--postgres-host",
            "h",
            "--postgres-password",
            "hunter2",
        ])
        .unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        let s = c.validate().unwrap();
        assert_eq!(s.database_display, "postgres://postgres@h:5432/omnibus");
    }
}
