//! One bus request → one reply. The structured form runs through the very same gRPC handler
//! (`DatabaseApi`) as a direct call; the OmniClaude SQL form runs through the same executor
//! and raw-SQL guard as `ExecuteRaw`. Errors get the same codes on both paths.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_protocol::{
    BusRequest, CompletedPayload, FailedPayload, Reply, RequestBody, SqlOperation, SqlRequest,
    StructuredOperation, codes,
};
use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_server::DatabaseService;
use serde_json::{Map, Value};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::api::DatabaseApi;
use crate::error::DbError;
use crate::executor::{ExecContext, Executor};
use crate::ops::{OpOutput, Operation, RawPage, RawSpec};
use crate::raw_sql::{self, RawKind, RawWrites};

/// What executes bus requests.
#[derive(Clone)]
pub struct Handler {
    /// The gRPC service implementation, called in-process for the structured form's reads.
    pub api: Arc<DatabaseApi>,
    /// The same over an executor whose `max_response_bytes` is what a bus reply can carry of
    /// a structured write's rows ([`super::structured_write_reply_bytes`]), for the
    /// structured form's writes: one returning more rows than that is refused and rolled
    /// back before it commits, and leaves no result under its request id. Once committed, a
    /// reply too large for the bus could only be a REPLY_TOO_LARGE stand-in, and a caller
    /// that took that FAILED reply at its word (any but the Rust client, which asks again
    /// over gRPC with the same request id) would write again.
    pub write_api: Arc<DatabaseApi>,
    /// An executor whose raw-SQL policy is the bus's (writes allowed unless switched off).
    pub sql_executor: Executor,
    /// The same for SQL-form writes, with `max_response_bytes` set to what a bus reply can
    /// carry ([`super::sql_write_reply_bytes`]), for the same reason as `write_api`: the SQL
    /// form's caller (OmniClaude) has no request id to get a recorded result with, and would
    /// write again directly.
    pub sql_write_executor: Executor,
    /// Whether the SQL form may write (`--bus-sql-writes`).
    pub sql_writes: bool,
}

/// The outcome of one attempt: a reply, or "the database is unavailable, try again".
pub enum Attempt {
    Done(Reply),
    Retry(String),
}

impl Handler {
    /// Whether the write `request` asks for was already committed under its idempotency key
    /// (the request's own `request_id`, in either spelling proto3 JSON accepts, else its
    /// correlation id): then it is answered from the request log, whatever its deadline. An
    /// error means the request log could not be read: unknown, not "no".
    pub async fn already_applied(&self, request: &BusRequest) -> Result<bool, DbError> {
        let own = match &request.body {
            RequestBody::Structured(s) => ["request_id", "requestId"]
                .iter()
                .find_map(|name| s.request.get(*name).and_then(Value::as_str)),
            RequestBody::Sql(_) => None,
        };
        let id = own
            .filter(|id| !id.is_empty())
            .unwrap_or(&request.correlation_id);
        if id.is_empty() {
            return Ok(false);
        }
        self.sql_executor.is_recorded(id).await
    }

    /// Whether `request` may write, and so may have been applied under its idempotency key by
    /// another delivery of it (a query or count is never recorded).
    pub fn may_write(request: &BusRequest) -> bool {
        match &request.body {
            RequestBody::Structured(s) => !matches!(
                s.operation,
                StructuredOperation::Query | StructuredOperation::Count
            ),
            RequestBody::Sql(sql) => sql.operation_type != SqlOperation::Query,
        }
    }

    /// Runs `request` once. `remaining` is the time left before its deadline, if it has one.
    pub async fn attempt(&self, request: &BusRequest, remaining: Option<Duration>) -> Attempt {
        let started = Instant::now();
        let result = match &request.body {
            RequestBody::Structured(s) => {
                self.structured(s.operation, &s.request, &request.correlation_id, remaining)
                    .await
            }
            RequestBody::Sql(sql) => self.sql(sql, &request.correlation_id, remaining).await,
        };
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Ok(mut done) => {
                done.execution_time_ms = elapsed_ms;
                Attempt::Done(Reply::Completed(done))
            }
            Err(status) if is_transient(&status) => Attempt::Retry(status.message().to_string()),
            Err(status) => Attempt::Done(Reply::Failed(failed_from_status(&status))),
        }
    }

    async fn structured(
        &self,
        op: StructuredOperation,
        json: &Value,
        correlation_id: &str,
        remaining: Option<Duration>,
    ) -> Result<CompletedPayload, Status> {
        // The correlation id is the idempotency key unless the request names its own.
        let cid = correlation_id.to_string();
        let id = move |current: &mut String| {
            if current.is_empty() {
                *current = cid;
            }
        };
        let written = |rows: &[prost_types::Struct], affected: u64, replayed: bool| {
            (rows_json(rows), affected, replayed)
        };
        match op {
            StructuredOperation::Insert => {
                self.run(
                    op,
                    json,
                    remaining,
                    |r: &mut pb::InsertRequest| id(&mut r.request_id),
                    |api, r| async move { api.insert(r).await },
                    |x| written(&x.rows, x.affected, x.replayed),
                )
                .await
            }
            StructuredOperation::Update => {
                self.run(
                    op,
                    json,
                    remaining,
                    |r: &mut pb::UpdateRequest| id(&mut r.request_id),
                    |api, r| async move { api.update(r).await },
                    |x| written(&x.rows, x.affected, x.replayed),
                )
                .await
            }
            StructuredOperation::Delete => {
                self.run(
                    op,
                    json,
                    remaining,
                    |r: &mut pb::DeleteRequest| id(&mut r.request_id),
                    |api, r| async move { api.delete(r).await },
                    |x| written(&x.rows, x.affected, x.replayed),
                )
                .await
            }
            StructuredOperation::Upsert => {
                self.run(
                    op,
                    json,
                    remaining,
                    |r: &mut pb::UpsertRequest| id(&mut r.request_id),
                    |api, r| async move { api.upsert(r).await },
                    |x| written(&x.rows, x.affected, x.replayed),
                )
                .await
            }
            StructuredOperation::ExecuteRaw => {
                self.run(
                    op,
                    json,
                    remaining,
                    |r: &mut pb::ExecuteRawRequest| id(&mut r.request_id),
                    |api, r| async move { api.execute_raw(r).await },
                    |x| written(&x.rows, x.affected, x.replayed),
                )
                .await
            }
            StructuredOperation::Query => {
                self.run(
                    op,
                    json,
                    remaining,
                    |_: &mut pb::QueryRequest| {},
                    |api, r| async move { api.query(r).await },
                    |x| {
                        let rows = rows_json(&x.rows);
                        let n = rows.len() as u64;
                        (rows, n, false)
                    },
                )
                .await
            }
            StructuredOperation::Count => {
                self.run(
                    op,
                    json,
                    remaining,
                    |_: &mut pb::CountRequest| {},
                    |api, r| async move { api.count(r).await },
                    |x| (Vec::new(), x.count, false),
                )
                .await
            }
        }
    }

    /// The gRPC handler that runs a structured request: `write_api` for writes
    /// ([`structured_writes`]), whose rows must fit a reply before they commit, `api` for
    /// reads (a read too large for the bus has nothing to hide: REPLY_TOO_LARGE tells its
    /// caller to ask for fewer rows).
    fn api_for(&self, op: StructuredOperation, json: &Value) -> &Arc<DatabaseApi> {
        if structured_writes(op, json, self.sql_executor.catalog().served()) {
            &self.write_api
        } else {
            &self.api
        }
    }

    /// Parses the request JSON, calls the gRPC handler in-process ([`Handler::api_for`]),
    /// renders the response.
    async fn run<Req, Resp, Call, Fut>(
        &self,
        op: StructuredOperation,
        json: &Value,
        remaining: Option<Duration>,
        set_id: impl FnOnce(&mut Req),
        call: Call,
        summary: impl FnOnce(&Resp) -> (Vec<Map<String, Value>>, u64, bool),
    ) -> Result<CompletedPayload, Status>
    where
        Req: prost::Message + Default,
        Resp: prost::Message,
        Call: FnOnce(Arc<DatabaseApi>, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut request: Req = omnibus_proto::json::from_json(op.request_message(), json)
            .map_err(|e| Status::from(DbError::field("payload.request", e.to_string())))?;
        set_id(&mut request);
        let response = call(
            self.api_for(op, json).clone(),
            grpc_request(request, remaining),
        )
        .await?
        .into_inner();
        let response_json = omnibus_proto::json::to_json(op.response_message(), &response, true)
            .map_err(|e| Status::internal(e.to_string()))?;
        let (rows, rows_affected, replayed) = summary(&response);
        Ok(CompletedPayload {
            row_count: rows.len() as u64,
            rows,
            rows_affected,
            execution_time_ms: 0.0,
            operation: op.as_str().to_string(),
            replayed,
            response: Some(response_json),
        })
    }

    async fn sql(
        &self,
        sql: &SqlRequest,
        correlation_id: &str,
        remaining: Option<Duration>,
    ) -> Result<CompletedPayload, Status> {
        let writes = if self.sql_writes {
            RawWrites::Allowed
        } else {
            RawWrites::Refused(
                "SQL-form writes are disabled on this db-svc's bus (--bus-sql-writes / \
                 DB_BUS_SQL_WRITES); send a structured INSERT / UPDATE / DELETE / UPSERT",
            )
        };
        let checked = raw_sql::check_with(&sql.query, self.sql_executor.catalog().served(), writes)
            .map_err(Status::from)?;
        if !kind_matches(sql.operation_type, checked.kind) {
            return Err(coded(
                Code::InvalidArgument,
                codes::OPERATION_MISMATCH,
                format!(
                    "operation_type {} does not match the statement, which is a {:?}",
                    sql.operation_type.as_str(),
                    checked.kind
                ),
            ));
        }
        if let Some(entity) = &sql.entity_type
            && !checked.tables.iter().any(|t| t == entity)
        {
            return Err(Status::from(DbError::field(
                "payload.entity_type",
                format!(
                    "entity_type '{entity}' is not a table the statement names ({})",
                    checked.tables.join(", ")
                ),
            )));
        }
        let ctx = ExecContext::within(
            remaining,
            checked.kind.is_write().then(|| correlation_id.to_string()),
        );
        // Reads are bounded by what a reply could carry (`read_guard_bytes`): refused while
        // their rows are read when far too large, else REPLY_TOO_LARGE once the reply is made
        // (a read commits nothing either way).
        let executor = if checked.kind.is_write() {
            &self.sql_write_executor
        } else {
            &self.sql_executor
        };
        let out: OpOutput = executor
            .execute(
                Operation::Raw(RawSpec {
                    sql: sql.query.clone(),
                    params: sql.params.clone(),
                    // The SQL is authoritative; limit/offset, when given, page its result.
                    page: if sql.operation_type == SqlOperation::Query {
                        RawPage {
                            offset: sql.offset.unwrap_or(0),
                            limit: sql.limit,
                        }
                    } else {
                        RawPage::default()
                    },
                }),
                &ctx,
            )
            .await
            .map_err(Status::from)?;
        let rows = out.rows;
        Ok(CompletedPayload {
            row_count: rows.len() as u64,
            rows_affected: if sql.operation_type == SqlOperation::Query {
                rows.len() as u64
            } else {
                out.affected
            },
            rows: rows_json(&rows),
            execution_time_ms: 0.0,
            operation: sql.operation_type.as_str().to_string(),
            replayed: out.replayed,
            response: None,
        })
    }
}

/// A gRPC request as the server would receive it, with the bus deadline as `grpc-timeout`
/// (it becomes the statement timeout, exactly as on the direct path).
fn grpc_request<T>(message: T, remaining: Option<Duration>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(left) = remaining {
        let millis = left.as_millis().clamp(1, 99_999_999);
        if let Ok(value) = format!("{millis}m").parse() {
            request.metadata_mut().insert("grpc-timeout", value);
        }
    }
    request
}

fn rows_json(rows: &[prost_types::Struct]) -> Vec<Map<String, Value>> {
    rows.iter().map(crate::values::struct_to_json).collect()
}

/// Whether the structured request `json` of `op` writes: INSERT, UPDATE, DELETE and UPSERT
/// do, an EXECUTE_RAW does when the raw-SQL guard (over the `served` tables) reads its `sql`
/// as a write. One the guard refuses counts as a read: it is refused the same way either way.
fn structured_writes(op: StructuredOperation, json: &Value, served: &[String]) -> bool {
    match op {
        StructuredOperation::Insert
        | StructuredOperation::Update
        | StructuredOperation::Delete
        | StructuredOperation::Upsert => true,
        StructuredOperation::ExecuteRaw => json
            .get("sql")
            .and_then(Value::as_str)
            .and_then(|sql| raw_sql::check(sql, served, true).ok())
            .is_some_and(|checked| checked.kind.is_write()),
        StructuredOperation::Query | StructuredOperation::Count => false,
    }
}

/// UPSERT is an INSERT … ON CONFLICT statement.
pub fn kind_matches(op: SqlOperation, kind: RawKind) -> bool {
    matches!(
        (op, kind),
        (SqlOperation::Query, RawKind::Query)
            | (SqlOperation::Insert | SqlOperation::Upsert, RawKind::Insert)
            | (SqlOperation::Update, RawKind::Update)
            | (SqlOperation::Delete, RawKind::Delete)
    )
}

/// Failures worth waiting out: the database is down or the transaction was aborted.
pub fn is_transient(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Aborted)
}

fn coded(code: Code, reason: &str, message: String) -> Status {
    let mut details = tonic_types::ErrorDetails::new();
    details.set_error_info(
        reason,
        crate::error::ERROR_DOMAIN,
        std::collections::HashMap::new(),
    );
    Status::with_error_details(code, message, details)
}

/// A FAILED payload with `error_code` `code`. Its `grpc_code` and `retryable` follow from the
/// code alone ([`grpc_code_of`]), so a code means the same whichever part of db-svc answers
/// with it: the executor (through [`failed_from_status`]) or the worker itself (a request it
/// cannot parse, one past its deadline, a panic, a reply too large for the bus).
pub fn failed(code: &str, message: impl Into<String>) -> FailedPayload {
    let mut failed = FailedPayload::new(code, message);
    if let Some(grpc) = grpc_code_of(code) {
        failed.grpc_code = grpc_code_name(grpc).to_string();
        failed.retryable = retryable(grpc);
    }
    failed
}

/// The gRPC code each `error_code` of a FAILED reply has on the direct path (the one
/// `DbError::grpc_code` gives the same failure; for `WRITE_REPLY_TOO_LARGE`, rows more than a
/// gRPC response carries, refused as INVALID_ARGUMENT). None for `REPLY_TOO_LARGE`, which has
/// no direct-path counterpart, and for a code db-svc does not give.
pub fn grpc_code_of(error_code: &str) -> Option<Code> {
    Some(match error_code {
        codes::VALIDATION_ERROR | codes::OPERATION_MISMATCH | codes::WRITE_REPLY_TOO_LARGE => {
            Code::InvalidArgument
        }
        "NOT_FOUND" => Code::NotFound,
        "CONFLICT" => Code::AlreadyExists,
        "FILTER_REQUIRED"
        | "TOO_MANY_ROWS"
        | "CONSTRAINT_VIOLATION"
        | "RAISED_EXCEPTION"
        | "REQUEST_ID_REUSED"
        | "UNREPRESENTABLE_VALUE"
        | "PRECONDITION_FAILED" => Code::FailedPrecondition,
        codes::WRITE_NOT_ALLOWED | "PERMISSION_DENIED" => Code::PermissionDenied,
        codes::TIMEOUT => Code::DeadlineExceeded,
        "RETRYABLE" => Code::Aborted,
        "DATABASE_UNAVAILABLE" => Code::Unavailable,
        "RESOURCE_EXHAUSTED" => Code::ResourceExhausted,
        "DATABASE_OPERATION_FAILED" | codes::INTERNAL_ERROR => Code::Internal,
        _ => return None,
    })
}

/// Whether sending the same request again may succeed: the database was unavailable, the
/// transaction was aborted, or the deadline passed.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
    )
}

/// The FAILED payload for a gRPC status: `error_code` is the status's `ErrorInfo.reason` (the
/// stable code db-svc puts on every error), else derived from the gRPC code; `grpc_code` and
/// `retryable` are those of the error code ([`failed`]), or of the status for a code
/// [`grpc_code_of`] does not know.
pub fn failed_from_status(status: &Status) -> FailedPayload {
    let details = status.get_error_details();
    let code = details
        .error_info()
        .map(|i| i.reason.clone())
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| code_for(status.code()).to_string());
    let mut failed = failed(&code, status.message());
    if grpc_code_of(&code).is_none() {
        failed.grpc_code = grpc_code_name(status.code()).to_string();
        failed.retryable = retryable(status.code());
    }
    if let Some(bad) = details.bad_request() {
        let violations: Vec<Value> = bad
            .field_violations
            .iter()
            .map(|v| serde_json::json!({"field": v.field, "description": v.description}))
            .collect();
        failed.details = serde_json::json!({ "field_violations": violations });
    }
    failed
}

fn code_for(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument | Code::OutOfRange => codes::VALIDATION_ERROR,
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "CONFLICT",
        Code::FailedPrecondition => "PRECONDITION_FAILED",
        Code::PermissionDenied => codes::WRITE_NOT_ALLOWED,
        Code::DeadlineExceeded => codes::TIMEOUT,
        Code::Aborted => "RETRYABLE",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Unavailable => "DATABASE_UNAVAILABLE",
        _ => codes::INTERNAL_ERROR,
    }
}

/// The canonical name of a gRPC code (as in `google.rpc.Code`).
pub fn grpc_code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statement_kinds_must_match_the_operation_type() {
        assert!(kind_matches(SqlOperation::Query, RawKind::Query));
        assert!(kind_matches(SqlOperation::Upsert, RawKind::Insert));
        assert!(!kind_matches(SqlOperation::Query, RawKind::Delete));
        assert!(!kind_matches(SqlOperation::Insert, RawKind::Update));
        assert!(!kind_matches(SqlOperation::Delete, RawKind::Query));
    }

    #[test]
    fn failures_carry_the_same_code_as_the_grpc_path() {
        let status: Status = DbError::field("rows[0].x", "unknown column").into();
        let failed = failed_from_status(&status);
        assert_eq!(failed.error_code, "VALIDATION_ERROR");
        assert_eq!(failed.grpc_code, "INVALID_ARGUMENT");
        assert_eq!(failed.details["field_violations"][0]["field"], "rows[0].x");
        assert!(!failed.retryable);

        let status: Status = DbError::Conflict {
            constraint: "pk".into(),
            message: "dup".into(),
        }
        .into();
        let failed = failed_from_status(&status);
        assert_eq!(
            (failed.error_code.as_str(), failed.grpc_code.as_str()),
            ("CONFLICT", "ALREADY_EXISTS")
        );

        let failed = failed_from_status(&Status::not_found("gone"));
        assert_eq!(failed.error_code, "NOT_FOUND");
        assert!(is_transient(&Status::from(DbError::Unavailable(
            "down".into()
        ))));
        assert!(!is_transient(&Status::invalid_argument("x")));
    }

    #[test]
    fn every_error_code_has_the_grpc_code_the_direct_path_gives_it() {
        let violations = vec![tonic_types::FieldViolation::new("f", "bad")];
        let all = [
            DbError::Validation(violations),
            DbError::NotNull {
                column: "c".into(),
                message: "m".into(),
            },
            DbError::FilterRequired {
                operation: "delete",
            },
            DbError::TooManyRows {
                operation: "update",
                would_affect: 2,
                max: 1,
            },
            DbError::Conflict {
                constraint: "pk".into(),
                message: "m".into(),
            },
            DbError::Constraint {
                constraint: "fk".into(),
                message: "m".into(),
            },
            DbError::RequestIdReused {
                request_id: "r".into(),
                recorded: "insert on t".into(),
                same_operation: true,
            },
            DbError::WriteNotAllowed("m".into()),
            DbError::PermissionDenied("m".into()),
            DbError::Timeout("m".into()),
            DbError::Retryable("m".into()),
            DbError::Unavailable("m".into()),
            DbError::ConnectionLost("m".into()),
            DbError::InvalidColumnReference("m".into()),
            DbError::ResourceExhausted("m".into()),
            DbError::Unrepresentable {
                column: "c".into(),
                message: "m".into(),
            },
            DbError::SchemaChanged("m".into()),
            DbError::WriteRowsTooLarge {
                field: "count_only",
                message: "m".into(),
            },
            DbError::Raised("m".into()),
            DbError::Database("m".into()),
        ];
        for e in all {
            // A new variant is to be added to `all` (and to `grpc_code_of`).
            match &e {
                DbError::Validation(_)
                | DbError::NotNull { .. }
                | DbError::FilterRequired { .. }
                | DbError::TooManyRows { .. }
                | DbError::Conflict { .. }
                | DbError::Constraint { .. }
                | DbError::RequestIdReused { .. }
                | DbError::WriteNotAllowed(_)
                | DbError::PermissionDenied(_)
                | DbError::Timeout(_)
                | DbError::Retryable(_)
                | DbError::Unavailable(_)
                | DbError::ConnectionLost(_)
                | DbError::InvalidColumnReference(_)
                | DbError::ResourceExhausted(_)
                | DbError::Unrepresentable { .. }
                | DbError::SchemaChanged(_)
                | DbError::WriteRowsTooLarge { .. }
                | DbError::Raised(_)
                | DbError::Database(_) => {}
            }
            assert_eq!(grpc_code_of(e.code()), Some(e.grpc_code()), "{}", e.code());
            let from_executor = failed_from_status(&Status::from(e.clone()));
            let built = failed(e.code(), "x");
            assert_eq!(
                (from_executor.grpc_code.as_str(), from_executor.retryable),
                (built.grpc_code.as_str(), built.retryable),
                "{}",
                e.code()
            );
        }
        // Statuses without a db-svc code get one whose gRPC code is always the same.
        for code in [
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ] {
            let f = failed_from_status(&Status::new(code, "x"));
            let same = failed(&f.error_code, "x");
            assert!(!f.grpc_code.is_empty(), "{code:?}");
            assert_eq!(
                (f.grpc_code.as_str(), f.retryable),
                (same.grpc_code.as_str(), same.retryable),
                "{code:?} -> {}",
                f.error_code
            );
        }
        let timeout = failed(codes::TIMEOUT, "x");
        assert_eq!(
            (timeout.grpc_code.as_str(), timeout.retryable),
            ("DEADLINE_EXCEEDED", true)
        );
        let too_large = failed(codes::REPLY_TOO_LARGE, "x");
        assert_eq!(
            (too_large.grpc_code.as_str(), too_large.retryable),
            ("", false)
        );
        // The same request again is refused again.
        let write_too_large = failed(codes::WRITE_REPLY_TOO_LARGE, "x");
        assert_eq!(
            (
                write_too_large.grpc_code.as_str(),
                write_too_large.retryable
            ),
            ("INVALID_ARGUMENT", false)
        );
    }

    /// A write refused because its rows would not fit a bus reply (structured form on
    /// `count_only`, SQL form and EXECUTE_RAW on `sql`) is answered WRITE_REPLY_TOO_LARGE,
    /// with its message and field violation; a raw read refused for its rows' size and any
    /// other validation error on those fields keep VALIDATION_ERROR.
    #[test]
    fn a_write_refused_for_its_rows_size_gets_a_code_of_its_own() {
        use crate::bus::{
            SQL_WRITE_REPLY_LIMIT as SQL, STRUCTURED_WRITE_REPLY_LIMIT as STRUCTURED,
        };
        use crate::executor::Limits;
        let limits = |response_limit: &'static str| Limits::for_responses(1, response_limit);
        let mut pad = Map::new();
        pad.insert("pad".into(), "x".repeat(10).into());
        let rows = vec![crate::values::json_to_struct(&pad)];
        let written = |limit| Status::from(limits(limit).check_written_rows(&rows).unwrap_err());
        let raw = |limit, is_write| Status::from(limits(limit).raw_rows_too_large(is_write));

        for (status, field) in [
            (written(STRUCTURED), "count_only"),
            (raw(STRUCTURED, true), "sql"),
            (raw(SQL, true), "sql"),
        ] {
            let message = status.message().to_string();
            let f = failed_from_status(&status);
            assert_eq!(f.error_code, codes::WRITE_REPLY_TOO_LARGE, "{f:?}");
            assert_eq!(
                (f.grpc_code.as_str(), f.retryable),
                ("INVALID_ARGUMENT", false)
            );
            assert_eq!(f.error, message, "the message is kept");
            assert!(f.error.contains("nothing was written"), "{f:?}");
            assert_eq!(f.details["field_violations"][0]["field"], field, "{f:?}");
        }

        let validation = |status: Status| {
            let f = failed_from_status(&status);
            assert_eq!(f.error_code, codes::VALIDATION_ERROR, "{f:?}");
        };
        // A read wrote nothing to refuse.
        validation(raw(SQL, false));
        // Other validation errors on the same fields.
        validation(Status::from(DbError::field(
            "count_only",
            "expected a boolean",
        )));
        validation(Status::from(DbError::field("sql", "not allowed")));
    }

    #[test]
    fn only_queries_and_counts_never_write() {
        let request = |payload: Value| {
            let envelope = serde_json::json!({
                "event_type": "DATABASE_QUERY_REQUESTED",
                "correlation_id": "c",
                "payload": payload,
            });
            bus_protocol::parse_request(&serde_json::to_vec(&envelope).unwrap(), None).unwrap()
        };
        for (payload, writes) in [
            (
                serde_json::json!({"operation": "QUERY", "request": {}}),
                false,
            ),
            (
                serde_json::json!({"operation": "COUNT", "request": {}}),
                false,
            ),
            (
                serde_json::json!({"operation": "INSERT", "request": {}}),
                true,
            ),
            (
                serde_json::json!({"operation": "EXECUTE_RAW", "request": {}}),
                true,
            ),
            (
                serde_json::json!({"operation_type": "QUERY", "query": "SELECT 1"}),
                false,
            ),
            (
                serde_json::json!({"operation_type": "DELETE", "query": "DELETE FROM t"}),
                true,
            ),
        ] {
            assert_eq!(
                Handler::may_write(&request(payload.clone())),
                writes,
                "{payload}"
            );
        }
    }

    #[test]
    fn structured_writes_and_only_they_go_through_the_write_handler() {
        use serde_json::json;
        let served = vec!["agent_actions".to_string()];
        let writes = |op, json: Value| structured_writes(op, &json, &served);
        for op in [
            StructuredOperation::Insert,
            StructuredOperation::Update,
            StructuredOperation::Delete,
            StructuredOperation::Upsert,
        ] {
            assert!(writes(op, json!({"table": "agent_actions"})), "{op:?}");
        }
        assert!(!writes(StructuredOperation::Query, json!({})));
        assert!(!writes(StructuredOperation::Count, json!({})));
        let raw = |sql: &str| writes(StructuredOperation::ExecuteRaw, json!({ "sql": sql }));
        assert!(raw(
            "UPDATE agent_actions SET action_name = 'x' RETURNING action_details"
        ));
        assert!(raw("DELETE FROM agent_actions"));
        assert!(!raw("SELECT action_details FROM agent_actions"));
        // Refused by the guard (either handler refuses it the same way), or no SQL at all.
        assert!(!raw("DELETE FROM pg_authid"));
        assert!(!raw("not sql"));
        assert!(!writes(StructuredOperation::ExecuteRaw, json!({})));
    }

    #[test]
    fn deadlines_travel_as_grpc_timeout() {
        let r = grpc_request((), Some(Duration::from_millis(1500)));
        assert_eq!(
            crate::api::grpc_timeout(r.metadata()),
            Some(Duration::from_millis(1500))
        );
        assert!(
            grpc_request((), None)
                .metadata()
                .get("grpc-timeout")
                .is_none()
        );
    }
}
