//! Runs [`Operation`]s against PostgreSQL: resolves the table in the catalog (refreshing it on
//! an unknown name), plans the SQL, and executes it with the deadline as statement timeout,
//! `max_affected` checks and idempotent request ids, in one transaction where any of those
//! needs one. Every transport (gRPC today, the bus later) goes through [`Executor::execute`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde_json::Value as Json;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Either, PgPool, Postgres, Row, Statement as _};
use svc_kit::Shutdown;
use tokio::sync::mpsc;

use crate::catalog::{Catalog, ColType, TableInfo};
use crate::coalescing::BatchLimits;
use crate::db_health::Reachability;
use crate::error::DbError;
use crate::fingerprint;
use crate::insert_coalescing::InsertCoalescer;
use crate::ops::{self, OpOutput, Operation, Plan, QuerySpec, RawPage, RawSpec, RecordedOutput};
use crate::query_coalescing::{FetchedRows, QueryCoalescer};
use crate::raw_sql;
use crate::values::{Param, StructRows, arguments, decode_rows, decode_rows_within, to_param};
use crate::wire::EncodedRows;

/// Limits the executor enforces (from configuration).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Rows a query returns when it names no limit.
    pub default_limit: u64,
    /// The largest limit a (unary) query may ask for.
    pub max_limit: u64,
    /// The statement timeout every connection starts with (zero = none). A shorter gRPC
    /// deadline lowers it for that request.
    pub statement_timeout: Duration,
    /// Whether ExecuteRaw may run INSERT / UPDATE / DELETE.
    pub raw_writes: bool,
    /// The role ExecuteRaw statements run as (`SET LOCAL ROLE`), if the operator set one.
    pub raw_role: Option<Arc<str>>,
    /// INSERT statements per table and column list running at once before further plain
    /// inserts wait and share one statement ([`crate::insert_coalescing`]); 0 turns sharing off.
    pub coalesce_inserts: usize,
    /// The same for plain queries of one shape ([`crate::query_coalescing`]); 0 turns it off.
    pub coalesce_queries: usize,
    /// The largest response the server sends (`--max-send-message-size`): an `ExecuteRaw`
    /// result that grows past it fails while it is read, before it fills memory, and a write
    /// run in a transaction whose returned rows come to more is refused and rolled back
    /// before it commits (sent, its response would fail after the write was done). Counted
    /// as the rows' protobuf size.
    pub max_response_bytes: usize,
    /// What that limit is, for the refusal's message (which adds what to do about it): the
    /// gRPC response's by default ([`GRPC_RESPONSE_LIMIT`]), a bus reply's on the bus.
    pub response_limit: &'static str,
}

/// [`Limits::response_limit`] of gRPC responses.
pub const GRPC_RESPONSE_LIMIT: &str = "a response may carry (--max-send-message-size)";

/// What to do about a read refused for [`Limits::max_response_bytes`].
const READ_TOO_LARGE: &str = "select fewer or smaller values, or read them with StreamQuery";
/// The same for a raw write (rolled back).
const RAW_WRITE_TOO_LARGE: &str = "nothing was written: return fewer or smaller columns \
     (RETURNING; without it only the count comes back), or write fewer rows per request";
/// The same for an Insert, Update, Delete or Upsert (rolled back).
const WRITE_TOO_LARGE: &str = "nothing was written: set count_only to have only the count \
     returned, or write fewer rows per request";

/// What the refusal of an Insert, Update, Delete or Upsert's rows calls them.
const WRITTEN_ROWS: &str = "the rows the write returns";
/// The same for a raw statement's.
const STATEMENT_ROWS: &str = "the statement's rows";
/// The same for a Query's.
const QUERY_ROWS: &str = "the query's rows";

/// The bytes a returned row counts for against [`Limits::max_response_bytes`]: its protobuf
/// size, and a little for its place in the response.
fn response_bytes(row: &prost_types::Struct) -> usize {
    prost::Message::encoded_len(row) + 8
}

impl Limits {
    /// Limits for tests of the response-size refusals: `max_response_bytes` under the name
    /// `response_limit`, raw writes allowed, no shared statements.
    #[cfg(test)]
    pub(crate) fn for_responses(max_response_bytes: usize, response_limit: &'static str) -> Self {
        Self {
            default_limit: 100,
            max_limit: 10_000,
            statement_timeout: Duration::ZERO,
            raw_writes: true,
            raw_role: None,
            coalesce_inserts: 0,
            coalesce_queries: 0,
            max_response_bytes,
            response_limit,
        }
    }

    /// Counts `row` into `bytes`, the size of a response's rows so far (as
    /// [`response_bytes`]); whether they now come to more than `max_response_bytes`.
    fn past_response_limit(&self, bytes: &mut usize, row: &prost_types::Struct) -> bool {
        *bytes = bytes.saturating_add(response_bytes(row));
        *bytes > self.max_response_bytes
    }

    /// What the refusal of rows coming to more than `max_response_bytes` says.
    fn too_large(&self, rows: &str, what_to_do: &str) -> String {
        format!(
            "{rows} come to more than the {} bytes {}; {what_to_do}",
            self.max_response_bytes, self.response_limit
        )
    }

    /// The refusal of a raw statement whose rows come to more than `max_response_bytes`
    /// (rolled back when it writes).
    pub(crate) fn raw_rows_too_large(&self, is_write: bool) -> DbError {
        if is_write {
            DbError::WriteRowsTooLarge {
                field: "sql",
                message: self.too_large(STATEMENT_ROWS, RAW_WRITE_TOO_LARGE),
            }
        } else {
            DbError::field("sql", self.too_large(STATEMENT_ROWS, READ_TOO_LARGE))
        }
    }

    /// The refusal of a write whose returned `rows` do not fit a response, if they do not.
    pub(crate) fn check_written_rows(&self, rows: &[prost_types::Struct]) -> Result<(), DbError> {
        let mut bytes = 0usize;
        for row in rows {
            if self.past_response_limit(&mut bytes, row) {
                return Err(DbError::WriteRowsTooLarge {
                    field: "count_only",
                    message: self.too_large(WRITTEN_ROWS, WRITE_TOO_LARGE),
                });
            }
        }
        Ok(())
    }
}

/// Per-request context from the transport.
#[derive(Clone, Debug, Default)]
pub struct ExecContext {
    /// The caller's deadline. Time spent waiting (for a pooled connection, a catalog read, a
    /// shared statement) counts against it: the statement timeout is what is left.
    pub deadline: Option<Instant>,
    /// Idempotency key of a write.
    pub request_id: Option<String>,
}

impl ExecContext {
    /// A context whose deadline is `timeout` from now (none if that is past what an
    /// `Instant` can hold).
    pub fn within(timeout: Option<Duration>, request_id: Option<String>) -> Self {
        Self {
            deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
            request_id,
        }
    }

    /// Time left until the deadline, if there is one.
    pub fn time_left(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

#[derive(Clone)]
pub struct Executor {
    pool: PgPool,
    /// `ExecuteRaw`'s own connections ([`crate::raw_pool`]).
    raw_pool: PgPool,
    catalog: Catalog,
    limits: Arc<Limits>,
    inserts: Option<Arc<InsertCoalescer>>,
    queries: Option<Arc<QueryCoalescer>>,
    reachability: Reachability,
}

/// A batch of a streamed query, or the error that ended the stream.
pub type RowBatch = Result<Vec<prost_types::Struct>, DbError>;

impl Executor {
    /// `reachability` is set by the database probe (see [`crate::db_health`]).
    pub fn new(pool: PgPool, catalog: Catalog, limits: Limits, reachability: Reachability) -> Self {
        let raw_pool = crate::raw_pool(&pool);
        Self::on(pool, raw_pool, catalog, limits, reachability)
    }

    /// An executor with other `limits` on this one's connections, catalog and probe (the
    /// bus's, for its own raw-SQL policy): no second pool of raw connections.
    pub fn with_limits(&self, limits: Limits) -> Self {
        Self::on(
            self.pool.clone(),
            self.raw_pool.clone(),
            self.catalog.clone(),
            limits,
            self.reachability.clone(),
        )
    }

    fn on(
        pool: PgPool,
        raw_pool: PgPool,
        catalog: Catalog,
        limits: Limits,
        reachability: Reachability,
    ) -> Self {
        let inserts = (limits.coalesce_inserts > 0).then(|| {
            InsertCoalescer::new(
                pool.clone(),
                catalog.clone(),
                BatchLimits::inserts(limits.coalesce_inserts),
            )
        });
        let queries = (limits.coalesce_queries > 0).then(|| {
            QueryCoalescer::new(pool.clone(), BatchLimits::queries(limits.coalesce_queries))
        });
        Self {
            pool,
            raw_pool,
            catalog,
            limits: Arc::new(limits),
            inserts,
            queries,
            reachability,
        }
    }

    pub fn raw_pool(&self) -> &PgPool {
        &self.raw_pool
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The catalog entry of `name`: a field error if it is not served or does not exist. A
    /// catalog read it needs counts against `time_left`, the caller's deadline.
    async fn table(
        &self,
        name: &str,
        columns: &[&str],
        time_left: Option<Duration>,
    ) -> Result<Arc<TableInfo>, DbError> {
        if !self.catalog.is_served(name) {
            return Err(DbError::field(
                "table",
                format!(
                    "unknown table '{name}' (served: {})",
                    self.catalog.served().join(", ")
                ),
            ));
        }
        if let Some(info) = self.catalog.cached(name)
            && columns.iter().all(|c| info.column(c).is_some())
        {
            return Ok(info);
        }
        // A column (or table) the cache does not know: it may have been added since.
        self.fresh_table(name, time_left).await
    }

    /// A served table as the catalog has it now: read by a catalog read that started after
    /// this call (shared with concurrent callers, see `Catalog::refresh_on_miss`), waited for
    /// no longer than `time_left`.
    async fn fresh_table(
        &self,
        name: &str,
        time_left: Option<Duration>,
    ) -> Result<Arc<TableInfo>, DbError> {
        let arrived = std::time::Instant::now();
        let read = self.catalog.refresh_on_miss(&self.pool, name, arrived);
        match self
            .before_the_deadline(time_left, "reading the catalog", read)
            .await??
        {
            Some(info) => Ok(info),
            None => Err(DbError::field(
                "table",
                format!("table '{name}' does not exist in the database"),
            )),
        }
    }

    /// Describes a served table, read fresh from the catalog (within `time_left`, the
    /// caller's deadline; concurrent calls share one read).
    pub async fn describe(
        &self,
        name: &str,
        time_left: Option<Duration>,
    ) -> Result<Arc<TableInfo>, DbError> {
        if !self.catalog.is_served(name) {
            return self.table(name, &[], time_left).await;
        }
        self.fresh_table(name, time_left).await
    }

    /// The statement timeout to set for a request, when its deadline is shorter than the
    /// connection default.
    fn tighter_timeout(&self, timeout: Option<Duration>) -> Option<Duration> {
        // PostgreSQL gives up a little before the caller does, so the caller still receives
        // the answer (DEADLINE_EXCEEDED, code TIMEOUT) rather than its own cancellation.
        let t = before_the_caller(timeout?);
        let default = self.limits.statement_timeout;
        (default.is_zero() || t < default).then_some(t.max(Duration::from_millis(1)))
    }

    /// Starts a transaction with `begin` for a request: the wait for a pooled connection is
    /// bounded by the request's deadline, and the statement timeout is then set from the
    /// time left (when it is shorter than the default).
    async fn begin_within(
        &self,
        ctx: &ExecContext,
        begin: &'static str,
    ) -> Result<sqlx::Transaction<'static, Postgres>, DbError> {
        self.begin_on(&self.pool, ctx, begin).await
    }

    /// [`Executor::begin_within`] on `pool`.
    async fn begin_on(
        &self,
        pool: &PgPool,
        ctx: &ExecContext,
        begin: &'static str,
    ) -> Result<sqlx::Transaction<'static, Postgres>, DbError> {
        let acquire = begin_checked(pool, begin);
        let mut tx = self
            .before_the_deadline(
                ctx.time_left(),
                "waiting for a database connection",
                acquire,
            )
            .await??;
        self.time_left_for_next(&mut tx, ctx).await?;
        Ok(tx)
    }

    /// `wait` (for a connection, a catalog read), bounded by `time_left` of the caller's
    /// deadline when it has one; the deadline passing first is the error of
    /// [`Executor::no_connection_before_the_deadline`].
    async fn before_the_deadline<T>(
        &self,
        time_left: Option<Duration>,
        waiting: &str,
        wait: impl Future<Output = T>,
    ) -> Result<T, DbError> {
        match time_left {
            Some(left) => tokio::time::timeout(before_the_caller(left), wait)
                .await
                .map_err(|_| self.no_connection_before_the_deadline(waiting)),
            None => Ok(wait.await),
        }
    }

    /// The error of a request whose deadline passed while `waiting`. While the database
    /// probe finds PostgreSQL unreachable, that is the reason: UNAVAILABLE, as the same
    /// request without a deadline gets once sqlx stops retrying refused connections at the
    /// pool's acquire timeout, which a short deadline cuts off. Otherwise the connections
    /// were all busy or slow: DEADLINE_EXCEEDED.
    fn no_connection_before_the_deadline(&self, waiting: &str) -> DbError {
        if !self.reachability.is_reachable() {
            DbError::Unavailable(format!(
                "PostgreSQL is not reachable: no answer before the deadline ({waiting})"
            ))
        } else {
            DbError::Timeout(format!("the deadline passed while {waiting}"))
        }
    }

    /// Before a transaction's next statement: the statement timeout becomes what is left of
    /// the caller's deadline, so the statements together (not each) stay within it.
    async fn time_left_for_next(
        &self,
        tx: &mut sqlx::Transaction<'static, Postgres>,
        ctx: &ExecContext,
    ) -> Result<(), DbError> {
        if let Some(t) = self.tighter_timeout(ctx.time_left()) {
            set_statement_timeout(tx, t).await?;
        }
        Ok(())
    }

    /// Runs `attempt`, and once more when it failed
    /// - on a table that changed after its catalog was read (a column dropped, renamed or
    ///   retyped: PostgreSQL no longer knows a name or type the statement took from the
    ///   catalog). The failed attempt changed nothing (its transaction rolled back); the table
    ///   has been read again meanwhile;
    /// - for a read (`is_read`), on a connection that turned out broken or ended by the
    ///   server. Pooled connections in steady use are not pinged before use (see
    ///   [`crate::liveness`]), so after a server restart each of them fails once. A read has
    ///   no effect, so it goes again, on a connection checked first; a write is answered
    ///   UNAVAILABLE (it may have been applied: only the caller's request id can tell).
    async fn once_more_if_worth_it<T, F: Future<Output = Result<T, DbError>>>(
        &self,
        table: &str,
        is_read: bool,
        attempt: impl Fn() -> F,
    ) -> Result<T, DbError> {
        let result = attempt().await;
        match &result {
            Err(DbError::SchemaChanged(message))
                if reread_changed_table(&self.catalog, &self.pool, table, message).await =>
            {
                tracing::info!(table, "table changed since its catalog was read; retrying");
                attempt().await
            }
            Err(DbError::ConnectionLost(message)) => {
                crate::liveness::mark_lost();
                if !is_read {
                    return result;
                }
                tracing::info!(table, error = %message, "connection lost; retrying the read");
                attempt().await
            }
            _ => result,
        }
    }

    async fn table_for(
        &self,
        op: &Operation,
        ctx: &ExecContext,
    ) -> Result<Arc<TableInfo>, DbError> {
        self.table(op.table(), &ops::mentioned_columns(op), ctx.time_left())
            .await
    }

    /// Runs one operation, recording its latency by operation and outcome (`ok` or the code).
    pub async fn execute(&self, op: Operation, ctx: &ExecContext) -> Result<OpOutput, DbError> {
        let (started, name) = (Instant::now(), op.name());
        // Raw SQL names what its author wrote: its errors are the author's, never retried.
        let result = match op {
            Operation::Raw(_) => self.execute_op(&op, ctx).await,
            _ => {
                let is_read = matches!(op, Operation::Query(_) | Operation::Count(_));
                self.once_more_if_worth_it(op.table(), is_read, || self.execute_op(&op, ctx))
                    .await
            }
        };
        let result = result
            .map_err(|e| ops::locate_not_null(e, &op, self.catalog.cached(op.table()).as_deref()));
        record_latency(name, started, &result);
        result
    }

    async fn execute_op(&self, op: &Operation, ctx: &ExecContext) -> Result<OpOutput, DbError> {
        match op {
            Operation::Raw(spec) => self.execute_raw(op, spec, ctx).await,
            Operation::Query(spec) => {
                let table = self.table_for(op, ctx).await?;
                self.query(&table, spec, ctx).await
            }
            Operation::Count(spec) => {
                let table = self.table_for(op, ctx).await?;
                let plan = ops::plan_count(&table, &spec.criteria)?;
                let count = self.count(plan, ctx).await?;
                Ok(OpOutput {
                    affected: count,
                    ..Default::default()
                })
            }
            Operation::Insert(spec) => {
                let table = self.table_for(op, ctx).await?;
                let values = ops::InsertValues::new(&table, spec)?;
                // Inserts that need no transaction of their own may share a statement.
                if let Some(inserts) = &self.inserts
                    && self.write_is_plain(ctx, None)
                    && inserts.can_share(&table, &values)
                {
                    return inserts.insert(table, values, spec.count_only).await;
                }
                let plan = ops::plan_shared_insert(&table, [values], spec.count_only)?;
                self.write(op, plan, spec.count_only, None, ctx).await
            }
            Operation::Update(spec) => {
                let plan = ops::plan_update(&*self.table_for(op, ctx).await?, spec)?;
                self.write(op, plan, spec.count_only, spec.max_affected, ctx)
                    .await
            }
            Operation::Delete(spec) => {
                let plan = ops::plan_delete(&*self.table_for(op, ctx).await?, spec)?;
                self.write(op, plan, spec.count_only, spec.max_affected, ctx)
                    .await
            }
            Operation::Upsert(spec) => {
                let plan = ops::plan_upsert(&*self.table_for(op, ctx).await?, spec)?;
                self.write(op, plan, spec.count_only, None, ctx).await
            }
        }
    }

    /// Whether a write under `request_id` has committed and recorded its result (so a repeat
    /// is answered from the request log, without writing).
    pub async fn is_recorded(&self, request_id: &str) -> Result<bool, DbError> {
        if check_request_id(request_id).is_err() {
            // Refused before any write, so never recorded (and PostgreSQL would refuse a NUL).
            return Ok(false);
        }
        let recorded: Option<bool> = sqlx::query_scalar(
            "SELECT result IS NOT NULL FROM omnibus_request_log WHERE request_id = $1",
        )
        .bind(request_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(recorded.unwrap_or(false))
    }

    fn effective_limit(&self, spec: &QuerySpec) -> Result<u64, DbError> {
        let limit = spec.limit.unwrap_or(self.limits.default_limit);
        if limit > self.limits.max_limit {
            return Err(DbError::field(
                "limit",
                format!(
                    "{limit} is more than the maximum of {} (use StreamQuery for large results)",
                    self.limits.max_limit
                ),
            ));
        }
        Ok(limit)
    }

    /// Runs a query, returning the rows undecoded (each transport encodes them its own way)
    /// and the total when asked for.
    async fn fetch_query(
        &self,
        table: &TableInfo,
        spec: &QuerySpec,
        ctx: &ExecContext,
    ) -> Result<(FetchedRows, Option<u64>), DbError> {
        let limit = self.effective_limit(spec)?;
        let plan = ops::plan_query(table, spec, Some(limit))?;
        let total_plan = if spec.include_total {
            Some(ops::plan_count(table, &spec.criteria)?)
        } else {
            None
        };
        let timeout = self.tighter_timeout(ctx.time_left());
        if timeout.is_none() && total_plan.is_none() {
            let paging = ops::paging_params(spec, Some(limit));
            if let Some(queries) = &self.queries
                && queries.can_share(&plan, paging, limit)
            {
                return Ok((queries.query(plan, paging, limit).await?, None));
            }
            let rows = sqlx::query_with(&plan.sql, arguments(&plan.params)?)
                .fetch_all(&self.pool)
                .await?;
            return Ok((FetchedRows::new(rows, 0), None));
        }
        let args = arguments(&plan.params)?;
        // One transaction, so rows and total come from the same snapshot
        // (REPEATABLE READ) and share the deadline.
        let begin = if total_plan.is_some() {
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        } else {
            "BEGIN"
        };
        let mut tx = self.begin_within(ctx, begin).await?;
        let rows = sqlx::query_with(&plan.sql, args)
            .fetch_all(&mut *tx)
            .await?;
        let total = match &total_plan {
            Some(p) => {
                self.time_left_for_next(&mut tx, ctx).await?;
                Some(count_on(&mut *tx, p).await?)
            }
            None => None,
        };
        tx.commit().await?;
        Ok((FetchedRows::new(rows, 0), total))
    }

    async fn query(
        &self,
        table: &TableInfo,
        spec: &QuerySpec,
        ctx: &ExecContext,
    ) -> Result<OpOutput, DbError> {
        let (fetched, total) = self.fetch_query(table, spec, ctx).await?;
        // Bounded like a raw read: rows past what a response carries stop being decoded (on
        // the bus, a reply's JSON copies of them are never made).
        let mut bytes = 0usize;
        let rows = decode_rows_within(&fetched.rows, fetched.first_column, |row| {
            if self.limits.past_response_limit(&mut bytes, row) {
                return Err(DbError::field(
                    "limit",
                    self.limits.too_large(QUERY_ROWS, READ_TOO_LARGE),
                ));
            }
            Ok(())
        })?;
        Ok(OpOutput {
            affected: rows.len() as u64,
            rows,
            total,
            replayed: false,
        })
    }

    /// A query whose rows are encoded straight into the repeated `Struct` field number
    /// `field` of the response (see [`crate::wire`]); returns them and the total.
    pub async fn query_encoded(
        &self,
        spec: QuerySpec,
        ctx: &ExecContext,
        field: u8,
    ) -> Result<(EncodedRows, Option<u64>), DbError> {
        let started = Instant::now();
        let result = self
            .once_more_if_worth_it(&spec.table, true, || async {
                let table = self
                    .table(&spec.table, &ops::query_columns(&spec), ctx.time_left())
                    .await?;
                let (fetched, total) = self.fetch_query(&table, &spec, ctx).await?;
                let rows = EncodedRows::encode(&fetched.rows, fetched.first_column, field)?;
                Ok((rows, total))
            })
            .await;
        record_latency("query", started, &result);
        result
    }

    async fn count(&self, plan: Plan, ctx: &ExecContext) -> Result<u64, DbError> {
        match self.tighter_timeout(ctx.time_left()) {
            // Counts of one shape share statements like queries do (one row each).
            None => match &self.queries {
                Some(queries) if queries.can_share(&plan, 0, 1) => {
                    let fetched = queries.query(plan, 0, 1).await?;
                    let row = fetched
                        .rows
                        .first()
                        .ok_or_else(|| DbError::Database("count returned no row".into()))?;
                    let n: i64 = row.try_get(fetched.first_column)?;
                    Ok(n.max(0) as u64)
                }
                _ => count_on(&self.pool, &plan).await,
            },
            Some(_) => {
                let mut tx = self.begin_within(ctx, "BEGIN").await?;
                let n = count_on(&mut *tx, &plan).await?;
                tx.commit().await?;
                Ok(n)
            }
        }
    }

    /// Whether a write needs no transaction of its own: no deadline shorter than the default
    /// statement timeout, no request id to record, no `max_affected` to check.
    fn write_is_plain(&self, ctx: &ExecContext, max_affected: Option<u64>) -> bool {
        self.tighter_timeout(ctx.time_left()).is_none()
            && ctx.request_id.as_deref().is_none_or(str::is_empty)
            && max_affected.is_none()
    }

    /// Runs a write: directly on the pool when nothing needs a transaction, otherwise in one
    /// with the statement timeout, the idempotency record, the max_affected check and the
    /// bound on the returned rows' size ([`Limits::max_response_bytes`]; a plain insert
    /// returns the rows it was sent, which came in a request). Writes over the bus always
    /// carry a request id, so they always run in a transaction.
    async fn write(
        &self,
        op: &Operation,
        plan: Plan,
        count_only: bool,
        max_affected: Option<u64>,
        ctx: &ExecContext,
    ) -> Result<OpOutput, DbError> {
        // Updates and deletes may return any number of rows: they run in a transaction so that
        // more than one response may carry is refused and rolled back, not committed and lost.
        let returning_cap = (!count_only
            && matches!(op, Operation::Update(_) | Operation::Delete(_)))
        .then_some(self.limits.max_limit);
        // An upsert's update branch returns stored values, which may not decode (a jsonb
        // number beyond a double, say): its rows are decoded before it commits, so such a
        // failure leaves nothing written that the caller is told failed.
        let decode_before_commit =
            returning_cap.is_some() || (!count_only && matches!(op, Operation::Upsert(_)));
        if !decode_before_commit && self.write_is_plain(ctx, max_affected) {
            return run_write(&self.pool, &plan, count_only, None).await;
        }
        let request_id = ctx.request_id.as_deref().filter(|r| !r.is_empty());
        if let Some(id) = request_id {
            check_request_id(id)?;
        }
        let mut tx = self.begin_within(ctx, "BEGIN").await?;
        if let Some(id) = request_id
            && let Some(recorded) =
                claim_request(&mut tx, id, op.name(), op.table(), fingerprint::of(op)).await?
        {
            tx.rollback().await?;
            return Ok(recorded);
        }
        if request_id.is_some() {
            // The claim may have waited on a concurrent request with the same id.
            self.time_left_for_next(&mut tx, ctx).await?;
        }
        let written = execute_write(&mut *tx, &plan, count_only, returning_cap).await?;
        if let Some(max) = max_affected
            && written.affected() > max
        {
            tx.rollback().await?;
            return Err(DbError::TooManyRows {
                operation: op.name(),
                would_affect: written.affected(),
                max,
            });
        }
        // A failure here drops the transaction: rolled back, with the request log's claim of
        // its id (so a retry asking for fewer rows is a new write, not this one's result).
        let output = written.decode()?;
        self.limits.check_written_rows(&output.rows)?;
        if let Some(id) = request_id {
            self.time_left_for_next(&mut tx, ctx).await?;
            record_result(&mut tx, id, &output).await?;
        }
        tx.commit().await?;
        Ok(output)
    }

    /// ExecuteRaw: guard, type the parameters from PostgreSQL's own inference, run. `spec` is
    /// `op`'s (an idempotent write records the fingerprint of the whole operation).
    async fn execute_raw(
        &self,
        op: &Operation,
        spec: &RawSpec,
        ctx: &ExecContext,
    ) -> Result<OpOutput, DbError> {
        let (sql, params) = (spec.sql.as_str(), spec.params.as_slice());
        let checked = raw_sql::check(sql, self.catalog.served(), self.limits.raw_writes)?;
        let request_id = ctx.request_id.as_deref().filter(|r| !r.is_empty());
        if checked.kind.is_write()
            && let Some(id) = request_id
        {
            check_request_id(id)?;
        }
        let begin = if checked.kind.is_write() {
            "BEGIN"
        } else {
            "BEGIN READ ONLY"
        };
        let mut tx = self.begin_on(&self.raw_pool, ctx, begin).await?;
        let table = checked.tables.first().cloned().unwrap_or_default();
        if checked.kind.is_write()
            && let Some(id) = request_id
            && let Some(recorded) =
                claim_request(&mut tx, id, "raw", &table, fingerprint::of(op)).await?
        {
            tx.rollback().await?;
            return Ok(recorded);
        }
        // After the request-log claim (db-svc's own table, which the role need not reach).
        if let Some(role) = &self.limits.raw_role {
            // SET LOCAL ROLE, with the name bound (as PostgREST switches roles).
            sqlx::query("SELECT set_config('role', $1, true)")
                .bind(&**role)
                .execute(&mut *tx)
                .await?;
        }
        let typed = raw_params(&mut tx, sql, params).await?;
        let plan = Plan {
            sql: sql.to_string(),
            params: typed,
            placeholders: Vec::new(),
        };
        if request_id.is_some() && checked.kind.is_write() {
            // The claim may have waited on a concurrent request with the same id.
            self.time_left_for_next(&mut tx, ctx).await?;
        }
        let mut rows = Vec::new();
        let (mut affected, mut bytes) = (0u64, 0usize);
        let mut decoder = StructRows::default();
        // A write returns all its rows; a query only its page.
        let page = if checked.kind.is_write() {
            RawPage::default()
        } else {
            spec.page
        };
        let (mut skip, take) = (page.offset, page.limit.unwrap_or(u64::MAX));
        {
            #[allow(deprecated)] // fetch_many is the one call that yields rows and counts
            let mut results =
                sqlx::query_with(&plan.sql, arguments(&plan.params)?).fetch_many(&mut *tx);
            let is_write = checked.kind.is_write();
            while let Some(item) = results.try_next().await.map_err(|e| {
                if is_write {
                    DbError::from(e)
                } else {
                    crate::error::raw_read_error(e)
                }
            })? {
                match item {
                    Either::Left(done) => affected += done.rows_affected(),
                    Either::Right(_) if skip > 0 => skip -= 1,
                    // The page is full: the rest is not read (the read-only transaction ends
                    // with the statement unfinished, which changes nothing).
                    Either::Right(_) if rows.len() as u64 >= take => break,
                    // Bounded like a Query: a statement that yields more rows than one response
                    // may carry fails (a write is rolled back) before its rows fill memory.
                    Either::Right(_) if rows.len() as u64 >= self.limits.max_limit => {
                        return Err(DbError::field(
                            "sql",
                            format!(
                                "the statement returns more than {} rows (--query-max-limit); \
                                 add a LIMIT, or read it with StreamQuery",
                                self.limits.max_limit
                            ),
                        ));
                    }
                    Either::Right(row) => {
                        // A result column without a mapping is the statement's doing.
                        let row = decoder.decode(&row).map_err(|e| e.within("sql."))?;
                        // Rows are counted above; their size too (`repeat()` makes any size).
                        if self.limits.past_response_limit(&mut bytes, &row) {
                            return Err(self.limits.raw_rows_too_large(is_write));
                        }
                        rows.push(row);
                    }
                }
            }
        }
        if !checked.kind.is_write() {
            affected = rows.len() as u64;
        }
        let output = OpOutput {
            rows,
            affected,
            total: None,
            replayed: false,
        };
        if checked.kind.is_write()
            && let Some(id) = request_id
        {
            if self.limits.raw_role.is_some() {
                sqlx::query("SELECT set_config('role', 'none', true)")
                    .execute(&mut *tx)
                    .await?;
            }
            self.time_left_for_next(&mut tx, ctx).await?;
            record_result(&mut tx, id, &output).await?;
        }
        tx.commit().await?;
        Ok(output)
    }

    /// Starts a streamed query: validation errors come back at once; rows then arrive in
    /// batches on the channel, which holds at most two batches (bounded memory). The stream
    /// ends at the last row, on error, when the receiver is dropped, or on shutdown.
    pub async fn stream(
        &self,
        spec: QuerySpec,
        batch_size: usize,
        timeout: Option<Duration>,
        shutdown: Shutdown,
    ) -> Result<mpsc::Receiver<RowBatch>, DbError> {
        let table = self
            .table(&spec.table, &ops::query_columns(&spec), timeout)
            .await?;
        if spec.include_total {
            return Err(DbError::field(
                "include_total",
                "not supported by StreamQuery; use Count",
            ));
        }
        let plan = ops::plan_query(&table, &spec, spec.limit)?;
        let args = arguments(&plan.params)?;
        // Two batches in flight, plus a slot kept for the error that ends a stream early: a
        // full channel (a reader that stopped reading) must not keep that error out.
        let (tx, rx) = mpsc::channel::<RowBatch>(3);
        let pool = self.pool.clone();
        let stall = self.stalled_reader_limit();
        let catalog = self.catalog.clone();
        tokio::spawn(async move {
            let Ok(error_slot) = tx.reserve().await else {
                return;
            };
            let result = crate::error::contain_panic(
                "StreamQuery",
                stream_rows(
                    pool.clone(),
                    plan.sql,
                    args,
                    batch_size,
                    timeout,
                    stall,
                    &tx,
                    shutdown,
                ),
            )
            .await;
            if let Err(e) = result {
                // Rows may already have gone out, so this stream is not retried; the table is
                // read again so that the caller's next request runs on what it is now.
                if let DbError::SchemaChanged(message) = &e {
                    reread_changed_table(&catalog, &pool, &spec.table, message).await;
                }
                error_slot.send(Err(e));
            }
        });
        Ok(rx)
    }

    /// How long [`Executor::stream`] waits for its reader to take a batch: the statement
    /// timeout (the operator's bound on any one wait), or a minute when statements have none.
    fn stalled_reader_limit(&self) -> Duration {
        match self.limits.statement_timeout {
            Duration::ZERO => STALLED_READER_FALLBACK,
            t => t,
        }
    }
}

const STALLED_READER_FALLBACK: Duration = Duration::from_secs(60);

/// `pool.begin_with(begin)`, once more when the connection it got turned out broken (a
/// pooled connection in steady use is not pinged first, see [`crate::liveness`]): nothing
/// has run on it yet, so any request may start again, on a connection checked first.
async fn begin_checked(
    pool: &PgPool,
    begin: &'static str,
) -> Result<sqlx::Transaction<'static, Postgres>, DbError> {
    match pool.begin_with(begin).await.map_err(DbError::from) {
        Err(DbError::ConnectionLost(message)) => {
            crate::liveness::mark_lost();
            tracing::info!(error = %message, "connection lost at BEGIN; starting again");
            Ok(pool.begin_with(begin).await?)
        }
        other => other,
    }
}

#[allow(clippy::too_many_arguments)] // one streamed query's whole context, called once
async fn stream_rows(
    pool: PgPool,
    sql: String,
    args: PgArguments,
    batch_size: usize,
    timeout: Option<Duration>,
    stall: Duration,
    out: &mpsc::Sender<RowBatch>,
    shutdown: Shutdown,
) -> Result<(), DbError> {
    // A reader that takes no batch for `stall` ends the stream, so that a client which stops
    // reading (but keeps its connection) cannot hold a pooled connection and a transaction.
    let send = async |batch: Vec<prost_types::Struct>| -> Result<bool, DbError> {
        match tokio::time::timeout(stall, out.send(Ok(batch))).await {
            Ok(sent) => Ok(sent.is_ok()),
            Err(_) => Err(DbError::Timeout(format!(
                "the reader took no batch for {}; the stream was ended to free its database \
                 connection",
                svc_kit::server::format_duration(stall)
            ))),
        }
    };
    // Cut short by shutdown, a stream must not end as if complete: its messages carry no end
    // marker, so only a non-OK status tells the client it lacks rows.
    let cut = || {
        DbError::Unavailable(
            "db-svc is shutting down: the stream ended before its last row; run the query again"
                .into(),
        )
    };
    let started = std::time::Instant::now();
    // A caller that goes away while every pooled connection is busy stops waiting for one.
    let mut tx = tokio::select! {
        _ = shutdown.draining() => return Err(cut()),
        _ = out.closed() => return Ok(()),
        tx = begin_checked(&pool, "BEGIN READ ONLY") => tx?,
    };
    // A stream may legitimately outlast the default statement timeout: it is bounded by the
    // caller's deadline (if any; what is left of it after the wait for a connection), by the
    // caller going away, and by shutdown.
    let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
    // (Under a millisecond is none left: a statement_timeout of 0 would mean no limit.)
    if left.is_some_and(|l| l < Duration::from_millis(1)) {
        return Err(DbError::Timeout(
            "the deadline passed while waiting for a database connection".into(),
        ));
    }
    set_statement_timeout(&mut tx, left.unwrap_or(Duration::ZERO)).await?;
    {
        let mut rows = sqlx::query_with(&sql, args).fetch(&mut *tx);
        let mut batch = Vec::with_capacity(batch_size);
        let mut decoder = StructRows::default();
        loop {
            let next = tokio::select! {
                _ = shutdown.draining() => return Err(cut()),
                _ = out.closed() => return Ok(()),
                next = rows.try_next() => next?,
            };
            match next {
                Some(row) => {
                    batch.push(decoder.decode(&row)?);
                    if batch.len() >= batch_size {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
                        let sent = tokio::select! {
                            _ = shutdown.draining() => return Err(cut()),
                            sent = send(full) => sent?,
                        };
                        if !sent {
                            return Ok(());
                        }
                    }
                }
                None => break,
            }
        }
        if !batch.is_empty() && !send(batch).await? {
            return Ok(());
        }
    }
    tx.commit().await?;
    Ok(())
}

/// `db_operation_seconds` by operation and outcome (`ok` or the error code).
fn record_latency<T>(
    operation: &'static str,
    started: std::time::Instant,
    result: &Result<T, DbError>,
) {
    let outcome = result.as_ref().map_or_else(|e| e.code(), |_| "ok");
    svc_kit::metrics::histogram!("db_operation_seconds", "operation" => operation, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

async fn set_statement_timeout(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    timeout: Duration,
) -> Result<(), DbError> {
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(format!("{}ms", statement_timeout_ms(timeout)))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A little less than `left` (a tenth, at most 250 ms): db-svc gives up first, so the caller
/// still receives its answer (DEADLINE_EXCEEDED, code TIMEOUT) rather than its own
/// cancellation. The margin covers PostgreSQL's error, db-svc's reply and the way back on a
/// busy machine (50 ms did not, on CI's two shared cores).
fn before_the_caller(left: Duration) -> Duration {
    left.saturating_sub((left / 10).min(Duration::from_millis(250)))
}

/// `timeout` in PostgreSQL's terms: whole milliseconds, at most its largest setting (~24.8
/// days, i32::MAX ms) - a longer gRPC deadline must not make the statement fail.
pub fn statement_timeout_ms(timeout: Duration) -> u128 {
    timeout.as_millis().min(i32::MAX as u128)
}

async fn count_on<'e, E>(executor: E, plan: &Plan) -> Result<u64, DbError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let row = sqlx::query_with(&plan.sql, arguments(&plan.params)?)
        .fetch_one(executor)
        .await?;
    let n: i64 = row.try_get(0)?;
    Ok(n.max(0) as u64)
}

/// Runs a write's statement: the count alone with `count_only`, else the returned rows, of which
/// there may be at most `row_cap` (more fails before they fill memory; run it in a transaction
/// so that the failure rolls the write back).
pub(crate) async fn run_write<'e, E>(
    executor: E,
    plan: &Plan,
    count_only: bool,
    row_cap: Option<u64>,
) -> Result<OpOutput, DbError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    execute_write(executor, plan, count_only, row_cap)
        .await?
        .decode()
}

/// What a write statement gave back, before its rows are turned into API values. Kept apart
/// because a failure to decode them comes after the statement ran (and, outside a
/// transaction, committed): running it again would write twice.
pub(crate) enum Written {
    Count(u64),
    Rows(Vec<PgRow>),
    /// More rows than `cap` came back (`total` of them): too many for one response.
    OverCap {
        total: u64,
        cap: u64,
    },
}

impl Written {
    /// Rows the statement wrote.
    pub(crate) fn affected(&self) -> u64 {
        match self {
            Written::Count(n) => *n,
            Written::Rows(rows) => rows.len() as u64,
            Written::OverCap { total, .. } => *total,
        }
    }

    pub(crate) fn decode(self) -> Result<OpOutput, DbError> {
        match self {
            Written::OverCap { cap, .. } => Err(DbError::field(
                "count_only",
                format!(
                    "the write would return more than {cap} rows (--query-max-limit); nothing \
                     was changed: set count_only, or narrow the filter"
                ),
            )),
            Written::Count(affected) => Ok(OpOutput {
                affected,
                ..Default::default()
            }),
            Written::Rows(rows) => {
                let rows = decode_rows(&rows)?;
                Ok(OpOutput {
                    affected: rows.len() as u64,
                    rows,
                    ..Default::default()
                })
            }
        }
    }
}

/// Runs a write statement; its rows (unless `count_only`) stay undecoded.
pub(crate) async fn execute_write<'e, E>(
    executor: E,
    plan: &Plan,
    count_only: bool,
    row_cap: Option<u64>,
) -> Result<Written, DbError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let query = sqlx::query_with(&plan.sql, arguments(&plan.params)?);
    if count_only {
        let done = query.execute(executor).await?;
        return Ok(Written::Count(done.rows_affected()));
    }
    let mut rows = Vec::new();
    let mut total = 0u64;
    let mut stream = query.fetch(executor);
    while let Some(row) = stream.try_next().await? {
        // Past the cap the rows are only counted: the caller's max_affected, when it is
        // lower, is the answer that explains the refusal.
        total += 1;
        if row_cap.is_none_or(|cap| total <= cap) {
            rows.push(row);
        }
    }
    Ok(match row_cap {
        Some(cap) if total > cap => Written::OverCap { total, cap },
        _ => Written::Rows(rows),
    })
}

/// After a statement tripped on what may be a changed table (`error`, PostgreSQL's message):
/// reads the table again (coalesced with other requests that tripped at the same time), and
/// retires the pooled connections whose prepared statements belong to the old table when it
/// did change or PostgreSQL said so (see `stale_plans`); false if it cannot be read.
async fn reread_changed_table(catalog: &Catalog, pool: &PgPool, table: &str, error: &str) -> bool {
    // Now, not when the request arrived: a catalog read that started in between may predate
    // the change the statement tripped on (a DDL that committed after it), so only a read
    // that started after the failure can be shared.
    let failed = Instant::now();
    if crate::error::is_stale_plan(error) {
        // The connection's prepared statement predates a change the catalog need not show
        // (a collation, say): the connections opened until now are retired regardless.
        crate::stale_plans::mark_changed();
    }
    // Otherwise the catalog retires them if the table did change (`refresh_table`).
    catalog.refresh_on_miss(pool, table, failed).await.is_ok()
}

/// The longest `request_id` a write may carry, in bytes: a key far longer would not fit the
/// request log's index (PostgreSQL refuses index entries over ~2.7 KB, SQLSTATE 54000). As
/// long as the `correlation_id` filters consumer-svc takes, since a bus write's correlation id
/// is its request id when it names none.
pub const MAX_REQUEST_ID_BYTES: usize = 1024;

/// A `request_id` the request log can hold, else a field error naming it (checked before the
/// write, so that PostgreSQL's refusal, naming no field, never comes up).
fn check_request_id(id: &str) -> Result<(), DbError> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(DbError::field(
            "request_id",
            format!(
                "{} bytes long; at most {MAX_REQUEST_ID_BYTES} bytes",
                id.len()
            ),
        ));
    }
    if id.contains('\0') {
        return Err(DbError::field(
            "request_id",
            "contains the NUL character (U+0000), which PostgreSQL text cannot store",
        ));
    }
    Ok(())
}

/// Claims `request_id` in the request log for a write (`operation` on `table`, with its
/// [`fingerprint`]). Returns the recorded output if an earlier request with this id already
/// committed the same write; a different write under that id is refused. A concurrent request
/// with the same id waits here (row lock of the primary key) until the first one commits or
/// rolls back.
async fn claim_request(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    request_id: &str,
    operation: &str,
    table: &str,
    fingerprint: [u8; 32],
) -> Result<Option<OpOutput>, DbError> {
    let claimed = sqlx::query(
        "INSERT INTO omnibus_request_log (request_id, operation, table_name, fingerprint) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (request_id) DO NOTHING",
    )
    .bind(request_id)
    .bind(operation)
    .bind(table)
    .bind(&fingerprint[..])
    .execute(&mut **tx)
    .await?;
    if claimed.rows_affected() == 1 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT operation, table_name, fingerprint, result FROM omnibus_request_log \
         WHERE request_id = $1",
    )
    .bind(request_id)
    .fetch_one(&mut **tx)
    .await?;
    let recorded_op: String = row.try_get(0)?;
    let recorded_table: String = row.try_get(1)?;
    // None: recorded before fingerprints were (operation and table still have to match).
    let recorded_fingerprint: Option<Vec<u8>> = row.try_get(2)?;
    let what = |op: &str, table: &str| {
        if table.is_empty() {
            op.to_string()
        } else {
            format!("{op} on {table}")
        }
    };
    let same_operation = recorded_op == operation && recorded_table == table;
    if !same_operation || recorded_fingerprint.is_some_and(|f| f != fingerprint) {
        return Err(DbError::RequestIdReused {
            request_id: request_id.to_string(),
            recorded: what(&recorded_op, &recorded_table),
            same_operation,
        });
    }
    let result: Option<sqlx::types::Json<RecordedOutput>> = row.try_get(3)?;
    let mut output: OpOutput = result
        .map(|j| j.0.into())
        .ok_or_else(|| DbError::Database(format!("request {request_id} has no recorded result")))?;
    output.replayed = true;
    Ok(Some(output))
}

async fn record_result(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    request_id: &str,
    output: &OpOutput,
) -> Result<(), DbError> {
    sqlx::query("UPDATE omnibus_request_log SET result = $2 WHERE request_id = $1")
        .bind(request_id)
        .bind(sqlx::types::Json(RecordedOutput::from(output)))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Types raw parameters by what PostgreSQL infers for `$1..$n` in the statement.
/// Rows cross the API as maps keyed by column name, so two result columns of one name
/// (`SELECT count(*), count(DISTINCT x)`, `SELECT a.id, b.id`) would keep only one value.
/// Such a statement is refused, before it runs, with the name to alias.
fn distinct_result_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), DbError> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(DbError::field(
                "sql",
                format!(
                    "the result has more than one column named '{name}', and rows are keyed by \
                     column name; give them distinct names with AS"
                ),
            ));
        }
    }
    Ok(())
}

async fn raw_params(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    sql: &str,
    params: &[Json],
) -> Result<Vec<Param>, DbError> {
    ops::check_bind_limit(params.len(), "params")?;
    let statement = sqlx::Executor::prepare(&mut **tx, sql).await?;
    distinct_result_names(statement.columns().iter().map(sqlx::Column::name))?;
    let types: Vec<ColType> = match statement.parameters() {
        Some(Either::Left(types)) => types
            .iter()
            .map(|t| ColType::from_pg_name(sqlx::TypeInfo::name(t)))
            .collect(),
        Some(Either::Right(n)) => vec![ColType::Other; n],
        None => Vec::new(),
    };
    if types.len() != params.len() {
        return Err(DbError::field(
            "params",
            format!(
                "the statement has {} placeholders but {} parameters were given",
                types.len(),
                params.len()
            ),
        ));
    }
    types
        .iter()
        .zip(params)
        .enumerate()
        .map(|(i, (ty, value))| {
            if *ty == ColType::Other {
                let name = statement
                    .parameters()
                    .and_then(|p| p.left())
                    .and_then(|t| t.get(i))
                    .map(|t| sqlx::TypeInfo::name(t).to_string())
                    .unwrap_or_default();
                return Err(DbError::field(
                    format!("params[{i}]"),
                    format!(
                        "parameter ${} has unsupported type {name}; cast it (e.g. ${}::text)",
                        i + 1,
                        i + 1
                    ),
                ));
            }
            to_param(*ty, value).map_err(|e| e.within(&format!("params[{i}]")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_whose_rows_do_not_fit_a_response_is_refused_saying_nothing_was_written() {
        let limits = |max: usize| Limits::for_responses(max, "a test reply carries");
        let mut pad = serde_json::Map::new();
        pad.insert("pad".into(), "x".repeat(100).into());
        let row = crate::values::json_to_struct(&pad);
        let rows = vec![row.clone(); 10];
        let all: usize = rows.iter().map(response_bytes).sum();
        assert!(all > 1000, "{all}");
        assert!(limits(all).check_written_rows(&rows).is_ok(), "just fits");
        assert!(limits(all).check_written_rows(&[]).is_ok());
        let refused = limits(all - 1).check_written_rows(&rows).unwrap_err();
        assert_eq!(refused.code(), "WRITE_REPLY_TOO_LARGE");
        let status = tonic::Status::from(refused);
        let message = status.message();
        assert!(
            message.contains(&format!("{} bytes a test reply carries", all - 1))
                && message.contains("nothing was written")
                && message.contains("count_only"),
            "{message}"
        );
        use tonic_types::StatusExt;
        let violations = status.get_error_details().bad_request().cloned().unwrap();
        assert_eq!(violations.field_violations[0].field, "count_only");
    }

    #[test]
    fn db_svc_gives_up_a_tenth_before_the_caller_at_most_250_ms() {
        let ms = Duration::from_millis;
        assert_eq!(before_the_caller(ms(500)), ms(450));
        assert_eq!(before_the_caller(ms(2500)), ms(2250));
        assert_eq!(before_the_caller(Duration::from_secs(60)), ms(59_750));
        assert_eq!(before_the_caller(Duration::ZERO), Duration::ZERO);
    }
}
