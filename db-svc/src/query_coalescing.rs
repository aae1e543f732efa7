//! Shared reads: concurrent queries (and counts) of one shape (the same SQL, differing only in
//! their filter values) share one statement while earlier ones of that shape are still running.
//!
//! The lanes are those of [`crate::coalescing`], keyed by the query's SQL text and its paging
//! values (PostgreSQL does not let LIMIT or OFFSET vary per row of a join). A waiting batch
//! runs as
//!
//! ```sql
//! SELECT k.i, s.* FROM unnest($1, ..., $n) WITH ORDINALITY AS k(p1, ..., pn, i)
//! CROSS JOIN LATERAL (<the query, reading its filter values from k>) AS s
//! ```
//!
//! with each filter parameter bound as one array holding every request's value, and the rows
//! ordered by `k.i`. PostgreSQL runs it as a nested loop, the query once per request, in one
//! round trip with one parse and one plan; each request gets the rows of its ordinal, in the
//! query's own order. (The function scan yields the ordinals in order, so the ORDER BY costs
//! no sort; a test checks the plan.)
//!
//! Each request is answered as soon as its rows are complete, i.e. when the first row of a
//! later ordinal reaches db-svc, not when the whole statement has finished: its reply is
//! encoded and sent while PostgreSQL still runs the requests after it. (PostgreSQL sends rows
//! in chunks of about 8 KiB, so small results, counts among them, still arrive together.)
//! Waiting for the whole batch made the requests move in waves (PostgreSQL busy while the
//! service idled, then the reverse) that left part of the machine idle.
//!
//! No request sees older data than it would alone: a query only joins a batch that has not
//! started, so the statement's snapshot is taken after every request in it arrived. If a
//! shared statement fails with anything but an unreachable database (including the statement
//! timeout, which bounded the whole batch), its queries not answered yet run again one by one,
//! so each gets its own answer (on a newer snapshot; those answered keep the shared one).
//! Queries without filter values are identical within a lane: a waiting batch of them runs
//! the query once and every request gets that result. Queries with a deadline of
//! their own or an exact total (each needs its own transaction), with a value that has no
//! array form here (json, NULL) or asking for more than 1,000 rows run alone.
//!
//! `Count`s share statements the same way (their query is `SELECT count(*) ...`, one row each).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;

use futures::TryStreamExt;
use parking_lot::Mutex;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::{Arguments, PgPool, Row};
use tokio::sync::oneshot;

use crate::coalescing::{self, BatchLimits, Coalescer, Lanes};
use crate::error::DbError;
use crate::ops::Plan;
use crate::values::{Param, arguments};

/// A query's rows as PostgreSQL returned them (shared by identical queries); the result's
/// columns start at `first_column`.
#[derive(Clone, Debug)]
pub struct FetchedRows {
    pub rows: Arc<Vec<PgRow>>,
    pub first_column: usize,
}

impl FetchedRows {
    pub fn new(rows: Vec<PgRow>, first_column: usize) -> Self {
        Self {
            rows: Arc::new(rows),
            first_column,
        }
    }
}

/// Filter values a query may have and still share a statement: each becomes a column of the
/// `unnest` (PostgreSQL allows at most 1,664 in a row), and a long IN list is no dashboard
/// query anyway.
const MAX_SHARED_FILTER_VALUES: usize = 100;

/// What queries must have in common to share a statement.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LaneKey {
    sql: String,
    paging: Vec<i64>,
}

/// A query waiting for a shared statement.
pub struct Waiter {
    plan: Plan,
    reply: oneshot::Sender<Result<FetchedRows, DbError>>,
}

/// See the module documentation.
pub struct QueryCoalescer {
    pool: PgPool,
    max_request_weight: usize,
    lanes: Mutex<Lanes<LaneKey, Waiter>>,
}

impl QueryCoalescer {
    pub fn new(pool: PgPool, limits: BatchLimits) -> Arc<Self> {
        Arc::new(Self {
            pool,
            max_request_weight: limits.max_request_weight,
            lanes: Mutex::new(Lanes::new(limits)),
        })
    }

    /// Whether a query (its plan, whose last `paging` parameters are LIMIT / OFFSET) may share
    /// a statement: its filter values (if any) all have an array form, and it asks for few rows.
    pub fn can_share(&self, plan: &Plan, paging: usize, limit: u64) -> bool {
        let Some(per_request) = plan.params.len().checked_sub(paging) else {
            return false;
        };
        plan.placeholders.len() == plan.params.len()
            && per_request <= MAX_SHARED_FILTER_VALUES
            && limit <= self.max_request_weight as u64
            && plan.params[..per_request].iter().all(has_array_form)
            && plan.params[per_request..]
                .iter()
                .all(|p| matches!(p, Param::Int8(_)))
    }

    /// Runs a query accepted by [`Self::can_share`], alone or in a shared statement.
    pub async fn query(
        self: &Arc<Self>,
        plan: Plan,
        paging: usize,
        limit: u64,
    ) -> Result<FetchedRows, DbError> {
        let per_request = plan.params.len().saturating_sub(paging);
        let key = LaneKey {
            sql: plan.sql.clone(),
            paging: plan.params[per_request..]
                .iter()
                .filter_map(|p| match p {
                    Param::Int8(n) => Some(*n),
                    _ => None,
                })
                .collect(),
        };
        let (reply, receiver) = oneshot::channel();
        let weight = usize::try_from(limit).unwrap_or(usize::MAX);
        match coalescing::admit(self, key, plan, weight, |plan| Waiter { plan, reply }) {
            // Runs on the caller's task; the slot passes on when it ends, or is dropped.
            Some((_slot, plan)) => {
                record_statement(1);
                alone(&self.pool, &plan).await
            }
            // The batch ended without answering: it panicked (logged where it ran). A stopping
            // db-svc answers UNAVAILABLE instead (`abandon`).
            None => receiver.await.unwrap_or_else(|_| {
                Err(DbError::Database(
                    "the shared statement of this query failed inside db-svc (an internal \
                     error, logged on the server)"
                        .into(),
                ))
            }),
        }
    }

    async fn share(&self, batch: Vec<Waiter>, paging: usize) {
        // A caller that went away while it waited needs no rows.
        let batch: Vec<Waiter> = batch.into_iter().filter(|w| !w.reply.is_closed()).collect();
        if batch.is_empty() {
            return;
        }
        record_statement(batch.len());
        if batch.len() == 1 || batch[0].plan.params.len() == paging {
            // One query, or queries without filter values: the same SQL with the same paging,
            // so identical queries. One run answers them all.
            let result = alone(&self.pool, &batch[0].plan).await;
            for waiter in batch {
                let _ = waiter.reply.send(result.clone());
            }
            return;
        }
        let plans: Vec<&Plan> = batch.iter().map(|w| &w.plan).collect();
        let statement = shared_statement(&plans, paging);
        let mut waiting: VecDeque<Waiter> = batch.into();
        let shared = match statement {
            Some((sql, args)) => run_shared(&self.pool, &sql, args, &mut waiting).await,
            // The requests disagree on a parameter's type (the catalog changed between them).
            None => Err(DbError::Database("parameters of different types".into())),
        };
        match shared {
            Ok(()) => {}
            // Every query still waiting would fail alike. (A timeout is not such a failure: the
            // statement timeout bounded the whole batch, while each query alone gets all of it.)
            Err(e @ (DbError::Unavailable(_) | DbError::ConnectionLost(_))) => {
                for waiter in waiting {
                    let _ = waiter.reply.send(Err(e.clone()));
                }
            }
            Err(_) => {
                // Each query not yet answered alone, for its own outcome.
                let reruns = waiting.into_iter().filter(|w| !w.reply.is_closed()).map(
                    |Waiter { plan, reply }| async move {
                        record_statement(1);
                        let _ = reply.send(alone(&self.pool, &plan).await);
                    },
                );
                coalescing::rerun_alone(reruns).await;
            }
        }
    }
}

impl Coalescer for QueryCoalescer {
    type Key = LaneKey;
    type Waiter = Waiter;

    fn lanes(&self) -> &Mutex<Lanes<LaneKey, Waiter>> {
        &self.lanes
    }

    async fn run_batch(&self, key: &LaneKey, batch: Vec<Waiter>) {
        self.share(batch, key.paging.len()).await
    }

    fn abandon(&self, batch: Vec<Waiter>) {
        for waiter in batch {
            let _ = waiter.reply.send(Err(DbError::Unavailable(
                "db-svc is stopping; the query did not run".into(),
            )));
        }
    }

    fn report_waiting(&self, waiting: usize) {
        svc_kit::metrics::gauge!("db_query_requests_waiting").set(waiting as f64);
    }
}

async fn alone(pool: &PgPool, plan: &Plan) -> Result<FetchedRows, DbError> {
    let rows = sqlx::query_with(&plan.sql, arguments(&plan.params)?)
        .fetch_all(pool)
        .await?;
    Ok(FetchedRows::new(rows, 0))
}

/// Runs a shared statement for `waiting` (in ordinal order), answering each request as soon
/// as its rows are complete. On an error, `waiting` holds the requests not answered yet.
async fn run_shared(
    pool: &PgPool,
    sql: &str,
    args: PgArguments,
    waiting: &mut VecDeque<Waiter>,
) -> Result<(), DbError> {
    let answer = |waiting: &mut VecDeque<Waiter>, rows: Vec<PgRow>| {
        if let Some(w) = waiting.pop_front() {
            let _ = w.reply.send(Ok(FetchedRows::new(rows, 1)));
        }
    };
    let mut dealer = Dealer::new(waiting.len());
    let mut rows = sqlx::query_with(sql, args).fetch(pool);
    while let Some(row) = rows.try_next().await? {
        let ordinal = row
            .try_get::<i64, _>(0)
            .map_err(|e| DbError::Database(format!("shared query ordinal: {e}")))?;
        dealer.push(ordinal, row, |rows| answer(waiting, rows))?;
    }
    dealer.finish(|rows| answer(waiting, rows));
    Ok(())
}

/// The shared statement of a batch of plans of one shape, with its arguments: one array per
/// filter parameter, then the paging values. None when the plans disagree on a parameter's
/// type.
fn shared_statement(plans: &[&Plan], paging: usize) -> Option<(String, PgArguments)> {
    let first = plans.first()?;
    let per_request = first.params.len().checked_sub(paging)?;
    let mut args = PgArguments::default();
    for j in 0..per_request {
        let column: Vec<&Param> = plans
            .iter()
            .map(|p| p.params.get(j))
            .collect::<Option<_>>()?;
        add_array(&mut args, &column)?.ok()?;
    }
    for p in &first.params[per_request..] {
        p.add_to(&mut args).ok()?;
    }
    Some((shared_sql(first, per_request), args))
}

/// The statement for a batch of `plan`'s shape: its first `per_request` parameters become
/// columns `p1..pn` of the unnested arrays `$1..$n`; the paging parameters after them keep
/// their numbers.
pub fn shared_sql(plan: &Plan, per_request: usize) -> String {
    let k = key_alias(&plan.sql);
    let mut sql = String::with_capacity(plan.sql.len() + 96 + 12 * per_request);
    let _ = write!(sql, "SELECT {k}.i, s.* FROM unnest(");
    for j in 1..=per_request {
        let sep = if j > 1 { ", " } else { "" };
        let _ = write!(sql, "{sep}${j}");
    }
    let _ = write!(sql, ") WITH ORDINALITY AS {k}(");
    for j in 1..=per_request {
        let _ = write!(sql, "p{j}, ");
    }
    sql.push_str("i) CROSS JOIN LATERAL (");
    let mut copied = 0;
    for (j, span) in plan.placeholders.iter().take(per_request).enumerate() {
        sql.push_str(&plan.sql[copied..span.start]);
        let _ = write!(sql, "{k}.p{}", j + 1);
        copied = span.end;
    }
    sql.push_str(&plan.sql[copied..]);
    let _ = write!(sql, ") AS s ORDER BY {k}.i");
    sql
}

/// The alias of the unnested parameters: `k`, unless the plan names a table (or column) `k`,
/// whose range variable inside the LATERAL subquery would hide it (`k.p1` would then be that
/// table's column `p1`). The plan writes every identifier quoted, so a quoted `"k"` is the
/// only way it can name one.
fn key_alias(plan_sql: &str) -> String {
    let mut alias = String::from("k");
    let mut n = 0u32;
    while plan_sql.contains(&format!("\"{alias}\"")) {
        n += 1;
        alias = format!("k{n}");
    }
    alias
}

/// Hands the rows of a shared statement for `requests` requests to them in request order, as
/// the rows arrive: rows come ordered by their 1-based ordinal, so the first row of a later
/// ordinal completes every request before it. An ordinal out of range, or lower than one
/// already seen (which would mean an answer already given was incomplete), is an error.
#[derive(Debug)]
pub struct Dealer<T> {
    requests: usize,
    /// The 0-based index of the request whose rows are being collected.
    current: usize,
    rows: Vec<T>,
}

impl<T> Dealer<T> {
    pub fn new(requests: usize) -> Self {
        Self {
            requests,
            current: 0,
            rows: Vec::new(),
        }
    }

    /// Takes the next row, of request `ordinal`; `done` gets the rows of each request this
    /// row completes, in request order.
    pub fn push(
        &mut self,
        ordinal: i64,
        row: T,
        mut done: impl FnMut(Vec<T>),
    ) -> Result<(), DbError> {
        let index = usize::try_from(ordinal - 1)
            .ok()
            .filter(|&i| i < self.requests && i >= self.current)
            .ok_or_else(|| {
                DbError::Database(format!(
                    "shared query returned ordinal {ordinal} of {} after {}",
                    self.requests,
                    self.current + 1
                ))
            })?;
        self.complete_before(index, &mut done);
        self.rows.push(row);
        Ok(())
    }

    /// The rows have ended: `done` gets the rows of every request not completed yet.
    pub fn finish(mut self, mut done: impl FnMut(Vec<T>)) {
        self.complete_before(self.requests, &mut done);
    }

    /// Completes every request before index `end`: the one collecting gets its rows, those
    /// after it none.
    fn complete_before(&mut self, end: usize, done: &mut impl FnMut(Vec<T>)) {
        while self.current < end {
            done(std::mem::take(&mut self.rows));
            self.current += 1;
        }
    }
}

fn has_array_form(p: &Param) -> bool {
    !matches!(p, Param::Null(_) | Param::Json(_) | Param::Jsonb(_))
}

/// Binds one parameter position of every request as one array. None when the requests
/// disagree on its type or it has no array form.
fn add_array(
    args: &mut PgArguments,
    column: &[&Param],
) -> Option<Result<(), sqlx::error::BoxDynError>> {
    macro_rules! array {
        ($variant:ident, $v:ident => $e:expr) => {{
            let values = column
                .iter()
                .map(|p| match p {
                    Param::$variant($v) => Some($e),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            args.add(values)
        }};
    }
    Some(match column.first()? {
        Param::Bool(_) => array!(Bool, v => *v),
        Param::Int2(_) => array!(Int2, v => *v),
        Param::Int4(_) => array!(Int4, v => *v),
        Param::Int8(_) => array!(Int8, v => *v),
        Param::Float4(_) => array!(Float4, v => *v),
        Param::Float8(_) => array!(Float8, v => *v),
        Param::Numeric(_) => array!(Numeric, v => *v),
        Param::Text(_) => array!(Text, v => v.as_str()),
        Param::Uuid(_) => array!(Uuid, v => *v),
        Param::Timestamp(_) => array!(Timestamp, v => *v),
        Param::Timestamptz(_) => array!(Timestamptz, v => *v),
        Param::Date(_) => array!(Date, v => *v),
        Param::Null(_) | Param::Json(_) | Param::Jsonb(_) => return None,
    })
}

fn record_statement(requests: usize) {
    svc_kit::metrics::histogram!("db_query_statement_requests").record(requests as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{Criteria, QuerySpec, paging_params, plan_query};

    fn plan(spec: &QuerySpec, limit: u64) -> Plan {
        plan_query(&crate::ops::tests::actions(), spec, Some(limit)).unwrap()
    }

    fn by_agent(agent: &str, offset: u64) -> QuerySpec {
        QuerySpec {
            table: "agent_actions".into(),
            criteria: Criteria {
                equals: serde_json::json!({"agent_name": agent, "duration_ms": 5})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                filter: None,
            },
            offset,
            ..Default::default()
        }
    }

    #[test]
    fn filter_values_come_from_the_arrays_and_paging_keeps_its_numbers() {
        let spec = by_agent("a", 20);
        let p = plan(&spec, 100);
        let paging = paging_params(&spec, Some(100));
        assert_eq!(paging, 2);
        let per_request = p.params.len() - paging;
        let sql = shared_sql(&p, per_request);
        assert!(
            sql.starts_with(
                "SELECT k.i, s.* FROM unnest($1, $2) WITH ORDINALITY AS k(p1, p2, i) \
                 CROSS JOIN LATERAL (SELECT "
            ),
            "{sql}"
        );
        assert!(
            sql.ends_with(" LIMIT $3 OFFSET $4) AS s ORDER BY k.i"),
            "{sql}"
        );
        assert!(sql.contains("\"agent_name\" = k.p") && sql.contains("\"duration_ms\" = k.p"));
        // Every placeholder of the plan was replaced or kept, none invented.
        for n in 1..=4 {
            assert_eq!(sql.matches(&format!("${n}")).count(), 1, "{sql}");
        }
        assert!(!sql.contains("$5"));
    }

    #[test]
    fn the_parameters_alias_differs_from_every_name_the_plan_quotes() {
        assert_eq!(key_alias(r#"SELECT "id" FROM "t" WHERE "p1" = $1"#), "k");
        assert_eq!(key_alias(r#"SELECT "id" FROM "k" WHERE "p1" = $1"#), "k1");
        assert_eq!(
            key_alias(r#"SELECT "k1" FROM "k" WHERE "k2" = $1 AND "kk" = $2"#),
            "k3"
        );
        // Names that merely contain k are no clash.
        assert_eq!(key_alias(r#"SELECT "k p" FROM "ak" WHERE "x" = $1"#), "k");
    }

    #[test]
    fn a_placeholder_like_text_in_an_identifier_is_left_alone() {
        // Spliced by recorded position, not by searching the text.
        let sql = "SELECT \"a$1\" FROM \"t\" WHERE \"a$1\" = $1 LIMIT $2";
        let (one, two) = (sql.find("= $1").unwrap() + 2, sql.find("$2").unwrap());
        let p = Plan {
            sql: sql.into(),
            params: vec![Param::Text("x".into()), Param::Int8(10)],
            placeholders: vec![one..one + 2, two..two + 2],
        };
        assert_eq!(
            shared_sql(&p, 1),
            "SELECT k.i, s.* FROM unnest($1) WITH ORDINALITY AS k(p1, i) CROSS JOIN LATERAL \
             (SELECT \"a$1\" FROM \"t\" WHERE \"a$1\" = k.p1 LIMIT $2) AS s ORDER BY k.i"
        );
    }

    /// Marks the requests [`Dealer::finish`] answers.
    const AT_END: usize = usize::MAX;

    /// Deals `rows` to 3 requests, recording when each request is answered: the index of the
    /// row that completed it, or `AT_END`.
    fn deal(rows: &[(i64, char)]) -> Result<Vec<(usize, Vec<char>)>, DbError> {
        let mut answered = Vec::new();
        let mut dealer = Dealer::new(3);
        for (n, &(ordinal, row)) in rows.iter().enumerate() {
            dealer.push(ordinal, row, |rows| answered.push((n, rows)))?;
        }
        dealer.finish(|rows| answered.push((AT_END, rows)));
        Ok(answered)
    }

    #[test]
    fn each_request_is_answered_as_soon_as_a_later_ordinal_arrives() {
        let answered = deal(&[(1, 'a'), (1, 'b'), (3, 'x'), (3, 'y')]).unwrap();
        assert_eq!(
            answered,
            vec![
                // The first row of ordinal 3 (the third row) completes requests 1 and 2.
                (2, vec!['a', 'b']),
                (2, vec![]),
                // The last request at the end of the rows.
                (AT_END, vec!['x', 'y']),
            ]
        );
        // No rows at all: every request answered empty at the end.
        assert_eq!(deal(&[]).unwrap(), vec![(AT_END, vec![]); 3]);
    }

    #[test]
    fn an_ordinal_out_of_range_or_going_back_is_an_error() {
        for rows in [
            &[(0, 'q')][..],
            &[(4, 'q')],
            &[(-1, 'q')],
            &[(2, 'a'), (1, 'b')],
            &[(1, 'a'), (3, 'b'), (2, 'c')],
        ] {
            let err = deal(rows).unwrap_err();
            assert!(err.to_string().contains("ordinal"), "{rows:?}: {err}");
        }
    }

    #[tokio::test]
    async fn only_queries_with_array_friendly_values_share() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap();
        let c = QueryCoalescer::new(pool, BatchLimits::queries(2));
        let spec = by_agent("a", 0);
        let p = plan(&spec, 100);
        let paging = paging_params(&spec, Some(100));
        assert!(c.can_share(&p, paging, 100));
        assert!(!c.can_share(&p, paging, 5_000), "large results run alone");
        let everything = QuerySpec {
            table: "agent_actions".into(),
            ..Default::default()
        };
        let all = plan(&everything, 100);
        assert!(
            c.can_share(&all, paging_params(&everything, Some(100)), 100),
            "identical queries share one run"
        );
        let json = QuerySpec {
            criteria: Criteria {
                filter: Some(crate::ops::Filter::Condition {
                    column: "action_details".into(),
                    op: crate::ops::Op::Contains,
                    value: serde_json::json!({"k": 1}),
                }),
                ..Default::default()
            },
            ..everything
        };
        let p = plan(&json, 100);
        assert!(!c.can_share(&p, paging_params(&json, Some(100)), 100));
        // An IN list longer than a shared statement's row of arrays takes runs alone.
        let in_list = |n: usize| QuerySpec {
            criteria: Criteria {
                filter: Some(crate::ops::Filter::Condition {
                    column: "agent_name".into(),
                    op: crate::ops::Op::In,
                    value: (0..n).map(|i| format!("agent-{i}")).collect(),
                }),
                ..Default::default()
            },
            ..by_agent("a", 0)
        };
        for (n, shares) in [(MAX_SHARED_FILTER_VALUES - 2, true), (2_000, false)] {
            let spec = in_list(n);
            let p = plan(&spec, 100);
            assert_eq!(
                c.can_share(&p, paging_params(&spec, Some(100)), 100),
                shares,
                "{n} values"
            );
        }
    }

    #[test]
    fn arrays_need_one_type_per_position() {
        let (a, b, n) = (
            Param::Text("a".into()),
            Param::Text("b".into()),
            Param::Int4(1),
        );
        let mut args = PgArguments::default();
        assert!(matches!(add_array(&mut args, &[&a, &b]), Some(Ok(()))));
        assert!(add_array(&mut args, &[&a, &n]).is_none());
        assert!(add_array(&mut args, &[&Param::Jsonb(serde_json::json!(1))]).is_none());
    }
}
