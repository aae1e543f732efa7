//! Every db-svc failure, and the one place that maps it to a gRPC status (with
//! `google.rpc.BadRequest` / `ErrorInfo` details) and to the stable error code string the
//! event-bus replies carry.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

/// The `ErrorInfo.domain` of every db-svc error.
pub const ERROR_DOMAIN: &str = "omnibus.db.v1";

#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// Bad input: unknown table or column, wrong value type, malformed uuid/timestamp, ...
    #[error("invalid request: {}", describe(.0))]
    Validation(Vec<FieldViolation>),
    /// PostgreSQL's NOT NULL check refused a row; it names the column, not the row
    /// ([`crate::ops::locate_not_null`] finds that from the request).
    #[error("invalid request: {column}: {message}")]
    NotNull { column: String, message: String },
    /// SQLSTATE 42P10, which in the statements db-svc builds means an `Upsert` whose conflict
    /// columns match no unique index or constraint ([`crate::ops::locate_not_null`] names
    /// `conflict_columns`; elsewhere, raw SQL, it names no field).
    #[error("invalid request: {0}")]
    InvalidColumnReference(String),
    /// A write whose returned rows come to more than a response carries (a bus reply's share,
    /// or `--max-send-message-size`): refused and rolled back before it committed, with
    /// nothing recorded under its request id, so the same write asking for fewer rows (or
    /// sent where larger responses fit) writes once. Its own code, unlike a validation
    /// error's, tells a client it may do exactly that.
    #[error("invalid request: {field}: {message}")]
    WriteRowsTooLarge {
        field: &'static str,
        message: String,
    },
    /// An update or delete without any condition.
    #[error("{operation} needs a non-empty filter (where or filter)")]
    FilterRequired { operation: &'static str },
    /// More rows would change than the caller allowed; nothing was changed.
    #[error(
        "{operation} would affect {would_affect} rows, more than max_affected {max}; rolled back"
    )]
    TooManyRows {
        operation: &'static str,
        would_affect: u64,
        max: u64,
    },
    /// A unique constraint rejected the write.
    #[error("unique constraint {constraint} violated: {message}")]
    Conflict { constraint: String, message: String },
    /// A foreign-key, check or exclusion constraint rejected the write.
    #[error("constraint {constraint} violated: {message}")]
    Constraint { constraint: String, message: String },
    /// The request id was first used for a different write: another operation or table, or
    /// (`same_operation`) the same operation on the same table with other values.
    #[error(
        "request_id {request_id} was already used for {}{recorded}{}",
        if *same_operation { "a different " } else { "" },
        if *same_operation { " (same operation and table, other values); nothing was written" } else { "" }
    )]
    RequestIdReused {
        request_id: String,
        /// What it was first used for: `insert on agent_actions`.
        recorded: String,
        same_operation: bool,
    },
    /// A raw statement that writes, while raw writes are disabled.
    #[error("{0}")]
    WriteNotAllowed(String),
    /// PostgreSQL's grants refused the statement (e.g. under `--raw-sql-role`).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The statement timeout (from the gRPC deadline or the default) cancelled the statement.
    #[error("statement timed out: {0}")]
    Timeout(String),
    /// A serialization failure or deadlock; the transaction was rolled back and may be retried.
    #[error("transaction aborted, retry: {0}")]
    Retryable(String),
    /// PostgreSQL cannot be reached (or no pooled connection became free in time).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The connection a statement ran on broke or was ended by the server (a restart, an
    /// administrator, a proxy): UNAVAILABLE like [`DbError::Unavailable`], but a read that
    /// meets it is worth one more try on another connection.
    #[error("database connection lost: {0}")]
    ConnectionLost(String),
    /// PostgreSQL ran out of something the statement needs (memory, disk, its temp file
    /// limit): trying the same statement again at once would fail again.
    #[error("database resources exhausted: {0}")]
    ResourceExhausted(String),
    /// A stored value the API cannot carry (JSON nested deeper than the transcoder's
    /// limit): the request is valid, the data is not servable as is.
    #[error("column {column}: {message}")]
    Unrepresentable { column: String, message: String },
    /// PostgreSQL does not know a column, table or type as the statement names it: for a
    /// structured operation, the table changed after db-svc read its catalog (a column
    /// dropped, renamed or retyped), and the executor reads it again and retries once; for raw
    /// SQL, the author's mistake. Either way the caller sees INVALID_ARGUMENT.
    #[error("invalid request: {0}")]
    SchemaChanged(String),
    /// A trigger or function refused the statement with an exception of its own (PL/pgSQL
    /// `RAISE EXCEPTION`, `ASSERT`: SQLSTATE class P0), a rule of the database's.
    #[error("refused by the database: {0}")]
    Raised(String),
    /// Anything else the database reported.
    #[error("database operation failed: {0}")]
    Database(String),
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| {
            if v.field.is_empty() {
                v.description.clone()
            } else {
                format!("{}: {}", v.field, v.description)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl DbError {
    /// A single field error.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::Validation(vec![FieldViolation::new(field, description)])
    }

    /// The stable error code (also the `ErrorInfo.reason` and the bus reply's `error_code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Validation(_)
            | Self::NotNull { .. }
            | Self::InvalidColumnReference(_)
            | Self::SchemaChanged(_) => "VALIDATION_ERROR",
            Self::WriteRowsTooLarge { .. } => bus_protocol::codes::WRITE_REPLY_TOO_LARGE,
            Self::FilterRequired { .. } => "FILTER_REQUIRED",
            Self::TooManyRows { .. } => "TOO_MANY_ROWS",
            Self::Conflict { .. } => "CONFLICT",
            Self::Constraint { .. } => "CONSTRAINT_VIOLATION",
            Self::Raised(_) => "RAISED_EXCEPTION",
            Self::RequestIdReused { .. } => "REQUEST_ID_REUSED",
            Self::WriteNotAllowed(_) => "WRITE_NOT_ALLOWED",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::Timeout(_) => "TIMEOUT",
            Self::Retryable(_) => "RETRYABLE",
            Self::Unavailable(_) | Self::ConnectionLost(_) => "DATABASE_UNAVAILABLE",
            Self::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Self::Unrepresentable { .. } => "UNREPRESENTABLE_VALUE",
            Self::Database(_) => "DATABASE_OPERATION_FAILED",
        }
    }

    pub fn grpc_code(&self) -> Code {
        match self {
            Self::Validation(_)
            | Self::NotNull { .. }
            | Self::InvalidColumnReference(_)
            | Self::SchemaChanged(_)
            | Self::WriteRowsTooLarge { .. } => Code::InvalidArgument,
            Self::FilterRequired { .. }
            | Self::TooManyRows { .. }
            | Self::Constraint { .. }
            | Self::Raised(_)
            | Self::RequestIdReused { .. }
            | Self::Unrepresentable { .. } => Code::FailedPrecondition,
            Self::Conflict { .. } => Code::AlreadyExists,
            Self::WriteNotAllowed(_) | Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Timeout(_) => Code::DeadlineExceeded,
            Self::Retryable(_) => Code::Aborted,
            Self::Unavailable(_) | Self::ConnectionLost(_) => Code::Unavailable,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Database(_) => Code::Internal,
        }
    }

    /// Field violations (for BadRequest details), empty for non-validation errors.
    pub fn violations(&self) -> Vec<FieldViolation> {
        match self {
            Self::Validation(v) => v.clone(),
            Self::NotNull { column, message } => vec![FieldViolation::new(column, message)],
            Self::SchemaChanged(message) | Self::InvalidColumnReference(message) => {
                vec![FieldViolation::new("", message)]
            }
            Self::WriteRowsTooLarge { field, message } => {
                vec![FieldViolation::new(*field, message)]
            }
            _ => Vec::new(),
        }
    }

    /// Extra facts for `ErrorInfo.metadata` (constraint names, limits).
    pub fn metadata(&self) -> Vec<(String, String)> {
        match self {
            Self::Conflict { constraint, .. } | Self::Constraint { constraint, .. } => {
                vec![("constraint".into(), constraint.clone())]
            }
            Self::TooManyRows {
                would_affect, max, ..
            } => vec![
                ("would_affect".into(), would_affect.to_string()),
                ("max_affected".into(), max.to_string()),
            ],
            Self::RequestIdReused {
                recorded,
                same_operation,
                ..
            } => vec![
                ("recorded_operation".into(), recorded.clone()),
                (
                    "mismatch".into(),
                    if *same_operation {
                        "values"
                    } else {
                        "operation"
                    }
                    .into(),
                ),
            ],
            Self::Unrepresentable { column, .. } => vec![("column".into(), column.clone())],
            _ => Vec::new(),
        }
    }

    /// Prefixes every field path (e.g. `rows[2].` before a column name).
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Self::Validation(violations) => Self::Validation(
                violations
                    .into_iter()
                    .map(|v| {
                        let field = if v.field.is_empty() {
                            prefix.trim_end_matches('.').to_string()
                        } else {
                            format!("{prefix}{}", v.field)
                        };
                        FieldViolation::new(field, v.description)
                    })
                    .collect(),
            ),
            other => other,
        }
    }
}

impl From<DbError> for Status {
    fn from(err: DbError) -> Self {
        let mut details = ErrorDetails::new();
        let metadata: std::collections::HashMap<String, String> =
            err.metadata().into_iter().collect();
        details.set_error_info(err.code(), ERROR_DOMAIN, metadata);
        if !err.violations().is_empty() {
            details.set_bad_request(err.violations());
        }
        Status::with_error_details(err.grpc_code(), err.to_string(), details)
    }
}

/// An error of a raw read, which runs in a READ ONLY transaction of db-svc's own: PostgreSQL
/// refusing a write there (SQLSTATE 25006: `SELECT ... FOR UPDATE`, a function that writes)
/// is the statement's fault, not the server's state.
pub fn raw_read_error(err: sqlx::Error) -> DbError {
    let read_only = err
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "25006");
    match err {
        sqlx::Error::Database(db) if read_only => {
            DbError::WriteNotAllowed(format!("read-only statement required: {}", db.message()))
        }
        other => DbError::from(other),
    }
}

impl From<sqlx::Error> for DbError {
    fn from(err: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match err {
            E::Database(db) => from_database_error(db.as_ref()),
            E::Io(e) => Self::ConnectionLost(e.to_string()),
            E::Tls(e) => Self::Unavailable(e.to_string()),
            E::PoolTimedOut => {
                Self::Unavailable("no database connection became available in time".into())
            }
            E::PoolClosed => Self::Unavailable("the connection pool is closed".into()),
            E::WorkerCrashed => Self::Unavailable("the database connection worker crashed".into()),
            E::Protocol(e) => Self::Unavailable(format!("protocol error: {e}")),
            other => Self::Database(other.to_string()),
        }
    }
}

/// PostgreSQL's refusal of a statement prepared before its table's column types changed
/// (SQLSTATE 0A000, which it shares with other unsupported features: told by the message).
pub fn is_stale_plan(message: &str) -> bool {
    message.contains("cached plan must not change result type")
}

fn from_database_error(db: &dyn sqlx::error::DatabaseError) -> DbError {
    let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
    let message = db.message().to_string();
    let constraint = db.constraint().unwrap_or("").to_string();
    let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
    match code.as_str() {
        "23505" => DbError::Conflict {
            constraint,
            message,
        },
        "23503" | "23514" | "23P01" => DbError::Constraint {
            constraint,
            message,
        },
        "23502" => {
            let column = pg.and_then(|e| e.column()).unwrap_or("").to_string();
            DbError::NotNull { column, message }
        }
        "57014" => DbError::Timeout(message),
        "42P10" => DbError::InvalidColumnReference(message),
        c if c.starts_with("P0") => DbError::Raised(message),
        // A malformed protocol message is no outage: sending it again fails again.
        "08P01" => DbError::Database(message),
        // A lock not granted (NOWAIT, lock_timeout): a conflict with another transaction.
        "40001" | "40P01" | "55P03" => DbError::Retryable(message),
        "42501" => DbError::PermissionDenied(message),
        // A write on a server that takes none (a hot standby after a failover, or
        // default_transaction_read_only): transient, for a retry against the new primary.
        // (A raw read's own READ ONLY transaction refusing a write is WRITE_NOT_ALLOWED:
        // `raw_read_error`.)
        "25006" => DbError::Unavailable(format!("the database accepts no writes: {message}")),
        // Undefined column or table, a value (or operator) of another type than the column's,
        // a statement prepared before its table's column types changed.
        "42703" | "42P01" | "42804" | "42883" => DbError::SchemaChanged(message),
        "0A000" if is_stale_plan(&message) => DbError::SchemaChanged(message),
        // Too many connections is PostgreSQL being busy; the rest of class 53 (out of memory,
        // disk full, a configured limit such as temp_file_limit) is this statement's size.
        // The session was ended (administrator command, shutdown) or its connection failed.
        "57P01" | "57P02" | "08000" | "08003" | "08006" => DbError::ConnectionLost(message),
        c if c.starts_with("08") || c == "53300" || c.starts_with("57P") => {
            DbError::Unavailable(message)
        }
        c if c.starts_with("53") => DbError::ResourceExhausted(message),
        // Data exceptions (out-of-range numbers, bad text), cardinality violations (an upsert
        // touching one row twice), program limits (a value or statement too large),
        // unsupported features and, for raw SQL, syntax / undefined objects: the caller's
        // input.
        c if c.starts_with("22")
            || c.starts_with("21")
            || c.starts_with("42")
            || c.starts_with("54")
            || c == "0A000" =>
        {
            DbError::field("", message)
        }
        _ => DbError::Database(message),
    }
}

/// Runs `work` (a task of its own, e.g. a streamed query) and turns a panic inside it - a
/// bug - into an INTERNAL error for its caller, logged with `what`. Without it the task would
/// end silently and its reader see a clean end of stream: a truncated result as a whole one.
pub async fn contain_panic<T>(
    what: &str,
    work: impl Future<Output = Result<T, DbError>>,
) -> Result<T, DbError> {
    match svc_kit::panic::catch_panic(work).await {
        Ok(result) => result,
        Err(panic) => {
            tracing::error!(%panic, "{what} panicked; its caller gets INTERNAL");
            Err(DbError::Database(format!(
                "{what} failed inside db-svc (an internal error, logged on the server); \
                 anything sent before this error is not the whole result"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_internal_error_not_a_clean_end() {
        let ok = contain_panic("work", async { Ok::<_, DbError>(7) }).await;
        assert_eq!(ok.unwrap(), 7);
        let failed = contain_panic("StreamQuery", async {
            if true {
                panic!("a bug");
            }
            Ok::<u8, DbError>(0)
        })
        .await
        .unwrap_err();
        assert!(matches!(failed, DbError::Database(_)), "{failed:?}");
        assert_eq!(Status::from(failed.clone()).code(), Code::Internal);
        assert!(failed.to_string().contains("StreamQuery"), "{failed}");
        assert!(!failed.to_string().contains("a bug"), "{failed}");
    }

    #[test]
    fn status_carries_code_and_field_details() {
        let status: Status = DbError::field("rows[0].agent_name", "expected a string").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "VALIDATION_ERROR");
        assert_eq!(info.domain, ERROR_DOMAIN);
        let bad = details.bad_request().expect("bad request");
        assert_eq!(bad.field_violations[0].field, "rows[0].agent_name");
    }

    #[test]
    fn within_prefixes_paths() {
        let e = DbError::field("x", "bad").within("rows[1].");
        assert_eq!(e.violations()[0].field, "rows[1].x");
        let e = DbError::field("", "bad").within("rows[1].");
        assert_eq!(e.violations()[0].field, "rows[1]");
    }

    #[test]
    fn codes_are_stable() {
        let e = DbError::Conflict {
            constraint: "c".into(),
            message: "m".into(),
        };
        assert_eq!(e.code(), "CONFLICT");
        assert_eq!(e.grpc_code(), Code::AlreadyExists);
        let status: Status = e.into();
        let info = status.get_error_details().error_info().unwrap().clone();
        assert_eq!(
            info.metadata.get("constraint").map(String::as_str),
            Some("c")
        );
        assert_eq!(
            DbError::FilterRequired {
                operation: "delete"
            }
            .grpc_code(),
            Code::FailedPrecondition
        );
    }
}
