//! The one request model: an [`Operation`] is what the gRPC handlers (and, later, the bus
//! worker) convert their input into, and what the executor runs. Planning an operation into
//! SQL is pure: identifiers come only from the catalog's [`TableInfo`] and are quoted; every
//! value becomes a bind parameter.

use std::fmt::Write as _;

use serde_json::{Map, Value as Json};

use crate::catalog::{ColType, TableInfo};
use crate::error::DbError;
use crate::values::{Param, to_param, to_stored_param};

pub type JsonRow = Map<String, Json>;

/// A comparison operator of a filter condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Gt,
    Gte,
    Lt,
    Lte,
    In,
    NotIn,
    Like,
    ILike,
    IsNull,
    IsNotNull,
    Contains,
}

/// A filter tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    Condition { column: String, op: Op, value: Json },
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
}

impl Filter {
    /// How many conditions the tree holds (update/delete need at least one).
    pub fn conditions(&self) -> usize {
        match self {
            Filter::Condition { .. } => 1,
            Filter::All(v) | Filter::Any(v) => v.iter().map(Filter::conditions).sum(),
            Filter::Not(f) => f.conditions(),
        }
    }
}

/// Which rows an operation touches: the guide's equality shorthand (`{column: value}`, null
/// meaning IS NULL) AND a filter tree. Empty = every row.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Criteria {
    pub equals: JsonRow,
    pub filter: Option<Filter>,
}

impl Criteria {
    /// How many conditions it holds (update/delete need at least one).
    pub fn conditions(&self) -> usize {
        self.equals.len() + self.filter.as_ref().map(Filter::conditions).unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Direction {
    #[default]
    Asc,
    Desc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Nulls {
    #[default]
    Default,
    First,
    Last,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OrderBy {
    pub column: String,
    pub direction: Direction,
    pub nulls: Nulls,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct QuerySpec {
    pub table: String,
    pub columns: Vec<String>,
    pub criteria: Criteria,
    pub order_by: Vec<OrderBy>,
    /// None = the default limit (unary) or no limit (streaming).
    pub limit: Option<u64>,
    pub offset: u64,
    pub include_total: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct InsertSpec {
    pub table: String,
    pub rows: Vec<JsonRow>,
    pub count_only: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct UpdateSpec {
    pub table: String,
    pub criteria: Criteria,
    pub set: JsonRow,
    pub max_affected: Option<u64>,
    pub count_only: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct DeleteSpec {
    pub table: String,
    pub criteria: Criteria,
    pub max_affected: Option<u64>,
    pub count_only: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct UpsertSpec {
    pub table: String,
    pub rows: Vec<JsonRow>,
    pub conflict_columns: Vec<String>,
    pub update_columns: Vec<String>,
    pub ignore_duplicates: bool,
    pub count_only: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct CountSpec {
    pub table: String,
    pub criteria: Criteria,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct RawSpec {
    pub sql: String,
    pub params: Vec<Json>,
    /// For a query: the part of its result wanted (the bus protocol's `offset` / `limit`).
    /// Rows before it are skipped undecoded and reading stops after it, so a large result
    /// paged this way neither fills memory nor trips `--query-max-limit`.
    pub page: RawPage,
}

/// Rows `offset..offset + limit` of a raw query's result (default: all of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawPage {
    pub offset: u64,
    pub limit: Option<u64>,
}

/// Every db operation, whatever the transport.
#[derive(Clone, Debug, PartialEq)]
pub enum Operation {
    Query(QuerySpec),
    Count(CountSpec),
    Insert(InsertSpec),
    Update(UpdateSpec),
    Delete(DeleteSpec),
    Upsert(UpsertSpec),
    Raw(RawSpec),
}

impl Operation {
    /// Lower-case name, recorded with idempotent writes and used in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Query(_) => "query",
            Operation::Count(_) => "count",
            Operation::Insert(_) => "insert",
            Operation::Update(_) => "update",
            Operation::Delete(_) => "delete",
            Operation::Upsert(_) => "upsert",
            Operation::Raw(_) => "raw",
        }
    }

    /// The table named by a structured operation ("" for raw SQL).
    pub fn table(&self) -> &str {
        match self {
            Operation::Query(s) => &s.table,
            Operation::Count(s) => &s.table,
            Operation::Insert(s) => &s.table,
            Operation::Update(s) => &s.table,
            Operation::Delete(s) => &s.table,
            Operation::Upsert(s) => &s.table,
            Operation::Raw(_) => "",
        }
    }
}

/// What an operation returns (the same on every transport). Rows are decoded from PostgreSQL
/// straight into `google.protobuf.Struct`, the form gRPC sends; the bus and the request log
/// convert them to JSON.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct OpOutput {
    pub rows: Vec<prost_types::Struct>,
    /// Rows affected (writes), counted (count) or returned (queries).
    pub affected: u64,
    /// Exact number of matching rows, for queries that asked for it.
    pub total: Option<u64>,
    /// The recorded result of an earlier request with the same request id.
    pub replayed: bool,
}

/// [`OpOutput`] as recorded in the request log (JSON rows).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RecordedOutput {
    pub rows: Vec<JsonRow>,
    pub affected: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(default)]
    pub replayed: bool,
}

impl From<&OpOutput> for RecordedOutput {
    fn from(out: &OpOutput) -> Self {
        Self {
            rows: out.rows.iter().map(crate::values::struct_to_json).collect(),
            affected: out.affected,
            total: out.total,
            replayed: out.replayed,
        }
    }
}

impl From<RecordedOutput> for OpOutput {
    fn from(r: RecordedOutput) -> Self {
        Self {
            rows: r
                .rows
                .into_iter()
                .map(crate::values::recorded_into_struct)
                .collect(),
            affected: r.affected,
            total: r.total,
            replayed: r.replayed,
        }
    }
}

/// SQL text plus its parameters, `$1..$n` in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub sql: String,
    pub params: Vec<Param>,
    /// Where in `sql` each placeholder `$1..$n` was written, in order (empty for raw SQL,
    /// which is never rewritten). Lets a plan be spliced into a larger statement without
    /// searching its text.
    pub placeholders: Vec<std::ops::Range<usize>>,
}

/// Double-quotes an identifier (doubling embedded quotes). Only catalog names reach it.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

struct Builder {
    sql: String,
    params: Vec<Param>,
    placeholders: Vec<std::ops::Range<usize>>,
}

impl Builder {
    fn new() -> Self {
        Self {
            sql: String::with_capacity(256),
            params: Vec::new(),
            placeholders: Vec::new(),
        }
    }
    fn push(&mut self, s: &str) {
        self.sql.push_str(s);
    }
    fn ident(&mut self, name: &str) {
        self.sql.push_str(&quote_ident(name));
    }
    fn bind(&mut self, p: Param) {
        self.params.push(p);
        let start = self.sql.len();
        let _ = write!(self.sql, "${}", self.params.len());
        self.placeholders.push(start..self.sql.len());
    }
    fn finish(self) -> Plan {
        Plan {
            sql: self.sql,
            params: self.params,
            placeholders: self.placeholders,
        }
    }

    /// The plan, if PostgreSQL can bind its parameters: at most [`MAX_BIND_PARAMS`] per
    /// statement (beyond that the driver fails the statement as a protocol error, which would
    /// read as an outage). `field` names what grew too large.
    fn finish_within_limit(self, field: &str) -> Result<Plan, DbError> {
        check_bind_limit(self.params.len(), field)?;
        Ok(self.finish())
    }
}

/// PostgreSQL's limit on bind parameters per statement (a 16-bit count in the protocol).
pub const MAX_BIND_PARAMS: usize = u16::MAX as usize;

/// A field error when `count` values would not fit in one statement.
pub fn check_bind_limit(count: usize, field: &str) -> Result<(), DbError> {
    if count > MAX_BIND_PARAMS {
        return Err(DbError::field(
            field,
            format!(
                "{count} values to bind; PostgreSQL takes at most {MAX_BIND_PARAMS} per \
                 statement (send fewer rows per request, or shorter IN lists)"
            ),
        ));
    }
    Ok(())
}

fn unknown_column(table: &TableInfo, field: &str, column: &str) -> DbError {
    DbError::field(
        field,
        format!("unknown column '{column}' in table {}", table.name),
    )
}

/// The catalog column `name`, or a field error naming `field`.
pub fn column<'t>(
    table: &'t TableInfo,
    field: &str,
    name: &str,
) -> Result<&'t crate::catalog::ColumnInfo, DbError> {
    table
        .column(name)
        .ok_or_else(|| unknown_column(table, field, name))
}

/// Every column name a spec mentions, for the executor's catalog refresh on an unknown one.
pub fn mentioned_columns(op: &Operation) -> Vec<&str> {
    let mut out = Vec::new();
    match op {
        Operation::Query(s) => return query_columns(s),
        Operation::Count(s) => criteria_columns(&s.criteria, &mut out),
        Operation::Insert(s) => s
            .rows
            .iter()
            .for_each(|r| out.extend(r.keys().map(String::as_str))),
        Operation::Update(s) => {
            out.extend(s.set.keys().map(String::as_str));
            criteria_columns(&s.criteria, &mut out);
        }
        Operation::Delete(s) => criteria_columns(&s.criteria, &mut out),
        Operation::Upsert(s) => {
            s.rows
                .iter()
                .for_each(|r| out.extend(r.keys().map(String::as_str)));
            out.extend(s.conflict_columns.iter().map(String::as_str));
            out.extend(s.update_columns.iter().map(String::as_str));
        }
        Operation::Raw(_) => {}
    }
    out
}

/// Every column name a query mentions (projection, ordering, criteria).
pub fn query_columns(spec: &QuerySpec) -> Vec<&str> {
    let mut out: Vec<&str> = spec.columns.iter().map(String::as_str).collect();
    out.extend(spec.order_by.iter().map(|o| o.column.as_str()));
    criteria_columns(&spec.criteria, &mut out);
    out
}

fn criteria_columns<'a>(criteria: &'a Criteria, out: &mut Vec<&'a str>) {
    fn filter_cols<'a>(f: &'a Filter, out: &mut Vec<&'a str>) {
        match f {
            Filter::Condition { column, .. } => out.push(column),
            Filter::All(v) | Filter::Any(v) => v.iter().for_each(|f| filter_cols(f, out)),
            Filter::Not(f) => filter_cols(f, out),
        }
    }
    out.extend(criteria.equals.keys().map(String::as_str));
    if let Some(f) = &criteria.filter {
        filter_cols(f, out);
    }
}

/// Writes a column for a SELECT / RETURNING list: types without a mapping are read as text.
fn select_column(b: &mut Builder, c: &crate::catalog::ColumnInfo) {
    b.ident(&c.name);
    if c.ty == ColType::Other {
        b.push("::text AS ");
        b.ident(&c.name);
    }
}

fn select_list(b: &mut Builder, table: &TableInfo, columns: &[String]) -> Result<(), DbError> {
    if columns.is_empty() {
        for (i, c) in table.columns.iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            select_column(b, c);
        }
        return Ok(());
    }
    for (i, name) in columns.iter().enumerate() {
        let c = column(table, &format!("columns[{i}]"), name)?;
        if i > 0 {
            b.push(", ");
        }
        select_column(b, c);
    }
    Ok(())
}

fn returning(b: &mut Builder, table: &TableInfo, count_only: bool) {
    if !count_only {
        b.push(" RETURNING ");
        // Cannot fail: no explicit column list.
        let _ = select_list(b, table, &[]);
    }
}

/// Writes `filter` as a boolean SQL expression. `path` names the filter in field errors.
fn write_filter(
    b: &mut Builder,
    table: &TableInfo,
    filter: &Filter,
    path: &str,
) -> Result<(), DbError> {
    match filter {
        Filter::All(list) | Filter::Any(list) => {
            let (joiner, empty, key) = match filter {
                Filter::All(_) => (" AND ", "TRUE", "all"),
                _ => (" OR ", "FALSE", "any"),
            };
            if list.is_empty() {
                b.push(empty);
                return Ok(());
            }
            b.push("(");
            for (i, f) in list.iter().enumerate() {
                if i > 0 {
                    b.push(joiner);
                }
                write_filter(b, table, f, &format!("{path}.{key}.filters[{i}]"))?;
            }
            b.push(")");
        }
        Filter::Not(inner) => {
            b.push("NOT (");
            write_filter(b, table, inner, &format!("{path}.negate"))?;
            b.push(")");
        }
        Filter::Condition {
            column: name,
            op,
            value,
        } => {
            let field = format!("{path}.condition");
            let col = column(table, &format!("{field}.column"), name)?;
            let value_field = format!("{field}.value");
            let scalar = |v: &Json| -> Result<Param, DbError> {
                if v.is_null() {
                    return Err(DbError::field(
                        &value_field,
                        "null is not comparable; use OPERATOR_IS_NULL / OPERATOR_IS_NOT_NULL",
                    ));
                }
                to_param(col.ty, v).map_err(|e| e.within(&format!("{value_field}.")))
            };
            match op {
                Op::Eq | Op::Neq | Op::Gt | Op::Gte | Op::Lt | Op::Lte => {
                    let sym = match op {
                        Op::Eq => " = ",
                        Op::Neq => " <> ",
                        Op::Gt => " > ",
                        Op::Gte => " >= ",
                        Op::Lt => " < ",
                        _ => " <= ",
                    };
                    let p = scalar(value)?;
                    compared_column(b, col);
                    b.push(sym);
                    b.bind(p);
                }
                Op::In | Op::NotIn => {
                    let Json::Array(items) = value else {
                        return Err(DbError::field(&value_field, "expected a list of values"));
                    };
                    if items.is_empty() {
                        // `x IN ()` is not SQL. These keep the list forms' three-valued logic:
                        // false (or, negated, true) for a value, unknown for NULL, so that a
                        // NULL column matches neither an empty IN nor an empty NOT IN, as it
                        // matches neither with a non-empty list.
                        b.push("(");
                        b.ident(&col.name);
                        b.push(if *op == Op::In {
                            " IS NULL AND NULL)"
                        } else {
                            " IS NOT NULL OR NULL)"
                        });
                        return Ok(());
                    }
                    let params = items
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            if v.is_null() {
                                return Err(DbError::field(
                                    format!("{value_field}[{i}]"),
                                    "null never matches in a list; use OPERATOR_IS_NULL",
                                ));
                            }
                            to_param(col.ty, v)
                                .map_err(|e| e.within(&format!("{value_field}[{i}]")))
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    compared_column(b, col);
                    b.push(if *op == Op::In { " IN (" } else { " NOT IN (" });
                    for (i, p) in params.into_iter().enumerate() {
                        if i > 0 {
                            b.push(", ");
                        }
                        b.bind(p);
                    }
                    b.push(")");
                }
                Op::Like | Op::ILike => {
                    if !col.ty.is_text() {
                        return Err(DbError::field(
                            format!("{field}.op"),
                            format!(
                                "LIKE / ILIKE need a text column; {} is {}",
                                col.name, col.sql_type
                            ),
                        ));
                    }
                    if let Json::String(pattern) = value
                        && ends_with_escape(pattern)
                    {
                        // PostgreSQL refuses it with an error that names no field.
                        return Err(DbError::field(
                            &value_field,
                            "a LIKE / ILIKE pattern cannot end with the escape character \\ \
                             (write \\\\ for a literal backslash)",
                        ));
                    }
                    let p = scalar(value)?;
                    b.ident(&col.name);
                    if col.is_blank_padded() {
                        // char(n) LIKE counts the padding, which reads drop: match as read.
                        b.push("::text");
                    }
                    b.push(if *op == Op::Like { " LIKE " } else { " ILIKE " });
                    b.bind(p);
                }
                Op::IsNull | Op::IsNotNull => {
                    if !value.is_null() {
                        return Err(DbError::field(
                            &value_field,
                            "IS NULL / IS NOT NULL take no value",
                        ));
                    }
                    b.ident(&col.name);
                    b.push(if *op == Op::IsNull {
                        " IS NULL"
                    } else {
                        " IS NOT NULL"
                    });
                }
                Op::Contains => {
                    if col.ty != ColType::Jsonb {
                        return Err(DbError::field(
                            format!("{field}.op"),
                            format!(
                                "CONTAINS needs a jsonb column; {} is {}",
                                col.name, col.sql_type
                            ),
                        ));
                    }
                    let p = scalar(value)?;
                    b.ident(&col.name);
                    b.push(" @> ");
                    b.bind(p);
                }
            }
        }
    }
    Ok(())
}

/// A column as a comparison or an ordering uses it: `json` has neither equality nor an order
/// in PostgreSQL, so it is compared as `jsonb` (values are bound as jsonb anyway).
fn compared_column(b: &mut Builder, col: &crate::catalog::ColumnInfo) {
    b.ident(&col.name);
    if col.ty == ColType::Json {
        b.push("::jsonb");
    }
}

/// A column as an ORDER BY key. One read as text is qualified: a bare name would be the
/// select list's `::text` of it (ORDER BY prefers output columns), which orders intervals,
/// inets or arrays as strings.
fn order_key(b: &mut Builder, table: &TableInfo, col: &crate::catalog::ColumnInfo) {
    if col.ty == ColType::Other {
        b.ident(&table.name);
        b.push(".");
    }
    compared_column(b, col);
}

/// ` WHERE <equals...> AND <filter>`, nothing when the criteria are empty. Shorthand
/// conditions are reported as `where.<column>` in field errors.
fn where_clause(b: &mut Builder, table: &TableInfo, criteria: &Criteria) -> Result<(), DbError> {
    let mut first = true;
    for (name, value) in &criteria.equals {
        let field = format!("where.{name}");
        let col = column(table, &field, name)?;
        b.push(if first { " WHERE " } else { " AND " });
        first = false;
        compared_column(b, col);
        if value.is_null() {
            b.push(" IS NULL");
        } else {
            let p = to_param(col.ty, value).map_err(|e| e.within(&field))?;
            b.push(" = ");
            b.bind(p);
        }
    }
    if let Some(f) = &criteria.filter {
        // Lists come parenthesised, NOT binds tighter than AND: no extra parentheses.
        b.push(if first { " WHERE " } else { " AND " });
        write_filter(b, table, f, "filter")?;
    }
    Ok(())
}

/// Plans a filter alone (for tests and the proptest): the boolean expression and its params.
pub fn plan_filter(table: &TableInfo, filter: &Filter) -> Result<Plan, DbError> {
    let mut b = Builder::new();
    write_filter(&mut b, table, filter, "filter")?;
    Ok(b.finish())
}

/// How many of a query plan's parameters are its paging (LIMIT, OFFSET): always its last
/// ones, after every filter value.
pub fn paging_params(spec: &QuerySpec, limit: Option<u64>) -> usize {
    usize::from(limit.is_some()) + usize::from(spec.offset > 0)
}

/// SELECT for a query. `limit` is the effective limit (None = unlimited). LIMIT and OFFSET
/// are bound last ([`paging_params`]).
pub fn plan_query(
    table: &TableInfo,
    spec: &QuerySpec,
    limit: Option<u64>,
) -> Result<Plan, DbError> {
    let mut b = Builder::new();
    b.push("SELECT ");
    select_list(&mut b, table, &spec.columns)?;
    b.push(" FROM ");
    b.ident(&table.name);
    where_clause(&mut b, table, &spec.criteria)?;
    for (i, o) in spec.order_by.iter().enumerate() {
        let c = column(table, &format!("order_by[{i}].column"), &o.column)?;
        b.push(if i == 0 { " ORDER BY " } else { ", " });
        order_key(&mut b, table, c);
        b.push(match o.direction {
            Direction::Asc => " ASC",
            Direction::Desc => " DESC",
        });
        b.push(match o.nulls {
            Nulls::Default => "",
            Nulls::First => " NULLS FIRST",
            Nulls::Last => " NULLS LAST",
        });
    }
    // Ties are broken by the primary key: PostgreSQL's sort is not stable, so rows that
    // compare equal (every row of one insert shares its created_at) could otherwise repeat or
    // go missing across OFFSET pages, or come in another order in a shared statement.
    if !spec.order_by.is_empty() {
        for pk in &table.primary_key {
            if !spec.order_by.iter().any(|o| o.column == *pk) {
                b.push(", ");
                match table.column(pk) {
                    Some(c) => order_key(&mut b, table, c),
                    None => b.ident(pk),
                }
                b.push(" ASC");
            }
        }
    }
    if let Some(limit) = limit {
        b.push(" LIMIT ");
        b.bind(Param::Int8(clamp_i64(limit)));
    }
    if spec.offset > 0 {
        b.push(" OFFSET ");
        b.bind(Param::Int8(clamp_i64(spec.offset)));
    }
    b.finish_within_limit("filter")
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// SELECT count(*) for a count (or a query's total).
pub fn plan_count(table: &TableInfo, criteria: &Criteria) -> Result<Plan, DbError> {
    let mut b = Builder::new();
    b.push("SELECT count(*) FROM ");
    b.ident(&table.name);
    where_clause(&mut b, table, criteria)?;
    b.finish_within_limit("filter")
}

/// Set to now() by updates (and upserts that update) when the table has it as a timestamp
/// and the caller did not give it.
const UPDATED_AT: &str = "updated_at";
/// Columns filled with now() by inserts when the table has them and the caller did not give
/// them.
const AUTO_TIMESTAMPS: [&str; 2] = ["created_at", UPDATED_AT];

/// Whether inserts fill `c` with now() when a row leaves it out.
fn is_auto_timestamp(c: &crate::catalog::ColumnInfo) -> bool {
    AUTO_TIMESTAMPS.contains(&c.name.as_str()) && c.ty.is_timestamp()
}

/// Whether `table` has an `updated_at` timestamp that db-svc moves on every update.
fn has_auto_updated_at(table: &TableInfo) -> bool {
    table
        .column(UPDATED_AT)
        .is_some_and(|c| c.ty.is_timestamp())
}

#[derive(Clone)]
enum Cell {
    Value(Param),
    Default,
    Now,
}

/// The columns and cells of a multi-row VALUES, and which columns were filled with now().
struct ValuesMatrix {
    columns: Vec<String>,
    rows: Vec<Vec<Cell>>,
    auto: Vec<String>,
}

/// The column list and cells of a multi-row VALUES: the union of the rows' columns in table
/// order (absent cells take the column default), plus created_at / updated_at as now().
fn values_matrix(table: &TableInfo, rows: &[JsonRow]) -> Result<ValuesMatrix, DbError> {
    if rows.is_empty() {
        return Err(DbError::field("rows", "at least one row is required"));
    }
    for (i, row) in rows.iter().enumerate() {
        for key in row.keys() {
            column(table, &format!("rows[{i}].{key}"), key)?;
        }
    }
    let mut columns = Vec::new();
    let mut auto = Vec::new();
    for c in &table.columns {
        let given = rows.iter().any(|r| r.contains_key(&c.name));
        if given {
            columns.push(c.name.clone());
        } else if is_auto_timestamp(c) {
            columns.push(c.name.clone());
            auto.push(c.name.clone());
        }
    }
    let mut matrix = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let mut cells = Vec::with_capacity(columns.len());
        for name in &columns {
            // Present in the catalog: checked above or taken from it.
            let Some(c) = table.column(name) else {
                return Err(unknown_column(table, &format!("rows[{i}]"), name));
            };
            let cell = match row.get(name) {
                Some(v) => Cell::Value(
                    to_stored_param(c.ty, &c.sql_type, v)
                        .map_err(|e| e.within(&format!("rows[{i}].{name}")))?,
                ),
                None if is_auto_timestamp(c) => Cell::Now,
                None => Cell::Default,
            };
            cells.push(cell);
        }
        matrix.push(cells);
    }
    one_default_row(&columns, matrix.len())?;
    Ok(ValuesMatrix {
        columns,
        rows: matrix,
        auto,
    })
}

/// PostgreSQL names the column of a NOT NULL violation but not the row; the request does:
/// the first row that sends the column as null, else the first that leaves it out if that
/// leaves it null (`table`, the catalog entry, shows no default and db-svc fills in nothing;
/// unknown counts as null), or the `set` that nulls it. An `Upsert` refused for conflict
/// columns that match no unique index names `conflict_columns`. Any other error is returned
/// as it is.
pub fn locate_not_null(err: DbError, op: &Operation, table: Option<&TableInfo>) -> DbError {
    let (column, message) = match err {
        DbError::NotNull { column, message } => (column, message),
        DbError::InvalidColumnReference(message) if matches!(op, Operation::Upsert(_)) => {
            return DbError::field(
                "conflict_columns",
                format!("{message} (name the columns of a unique index or constraint)"),
            );
        }
        other => return other,
    };
    // A left-out cell is DEFAULT (or now()), not null: a row that sends null is the culprit.
    let left_out_is_null = table
        .and_then(|t| t.column(&column))
        .is_none_or(|c| c.default.is_none() && !is_auto_timestamp(c));
    let path = match op {
        Operation::Insert(InsertSpec { rows, .. }) | Operation::Upsert(UpsertSpec { rows, .. }) => {
            let sent_null = |r: &JsonRow| r.get(&column).is_some_and(Json::is_null);
            let left_out = |r: &JsonRow| left_out_is_null && !r.contains_key(&column);
            rows.iter()
                .position(sent_null)
                .or_else(|| rows.iter().position(left_out))
                .map(|i| format!("rows[{i}].{column}"))
        }
        Operation::Update(spec) if spec.set.get(&column).is_some_and(Json::is_null) => {
            Some(format!("set.{column}"))
        }
        _ => None,
    };
    DbError::field(path.unwrap_or(column), message)
}

/// Whether a LIKE pattern ends with its escape character (a backslash) escaping nothing: an odd
/// run of trailing backslashes.
fn ends_with_escape(pattern: &str) -> bool {
    pattern.bytes().rev().take_while(|&c| c == b'\\').count() % 2 == 1
}

/// `INSERT ... DEFAULT VALUES` writes exactly one row.
fn one_default_row(columns: &[String], rows: usize) -> Result<(), DbError> {
    if columns.is_empty() && rows > 1 {
        return Err(DbError::field(
            "rows",
            "rows without any column can only be inserted one at a time",
        ));
    }
    Ok(())
}

fn write_values(
    b: &mut Builder,
    table: &TableInfo,
    rows: &[JsonRow],
) -> Result<Vec<String>, DbError> {
    let ValuesMatrix {
        columns,
        rows: matrix,
        auto,
    } = values_matrix(table, rows)?;
    push_insert(b, table, &columns, matrix);
    Ok(auto)
}

/// `INSERT INTO table (columns) VALUES (...), ...` (or `DEFAULT VALUES` without columns).
fn push_insert(
    b: &mut Builder,
    table: &TableInfo,
    columns: &[String],
    rows: impl IntoIterator<Item = Vec<Cell>>,
) {
    b.push("INSERT INTO ");
    b.ident(&table.name);
    if columns.is_empty() {
        b.push(" DEFAULT VALUES");
        return;
    }
    b.push(" (");
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            b.push(", ");
        }
        b.ident(c);
    }
    b.push(") VALUES ");
    for (r, cells) in rows.into_iter().enumerate() {
        b.push(if r == 0 { "(" } else { ", (" });
        for (i, cell) in cells.into_iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            match cell {
                Cell::Value(p) => b.bind(p),
                Cell::Default => b.push("DEFAULT"),
                Cell::Now => b.push("now()"),
            }
        }
        b.push(")");
    }
}

/// Multi-row INSERT ... RETURNING.
pub fn plan_insert(table: &TableInfo, spec: &InsertSpec) -> Result<Plan, DbError> {
    plan_shared_insert(table, [InsertValues::new(table, spec)?], spec.count_only)
}

/// An insert's rows, validated and converted, before they become SQL. Inserts into the same
/// table with the same [`InsertValues::columns`] can share one statement
/// ([`plan_shared_insert`]).
#[derive(Clone)]
pub struct InsertValues {
    columns: Vec<String>,
    rows: Vec<Vec<Cell>>,
    params: usize,
}

impl InsertValues {
    /// Checks and converts `spec`'s rows (the field errors of [`plan_insert`]).
    pub fn new(table: &TableInfo, spec: &InsertSpec) -> Result<Self, DbError> {
        let ValuesMatrix { columns, rows, .. } = values_matrix(table, &spec.rows)?;
        let params = rows
            .iter()
            .flatten()
            .filter(|c| matches!(c, Cell::Value(_)))
            .count();
        Ok(Self {
            columns,
            rows,
            params,
        })
    }

    /// The column list of the VALUES (empty for `DEFAULT VALUES`).
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    pub fn row_count(&self) -> usize {
        self.rows.len()
    }

    /// How many parameters the rows bind.
    pub fn param_count(&self) -> usize {
        self.params
    }
}

/// One INSERT of several inserts' rows, in order, all with the same columns; RETURNING every
/// column unless `count_only`. PostgreSQL returns the rows of `INSERT ... VALUES` in VALUES
/// order (Django's `bulk_create` relies on the same), which is what lets the caller hand each
/// insert its own rows back.
pub fn plan_shared_insert(
    table: &TableInfo,
    parts: impl IntoIterator<Item = InsertValues>,
    count_only: bool,
) -> Result<Plan, DbError> {
    let (columns, rows) = shared_rows(parts)?;
    let mut b = Builder::new();
    push_insert(&mut b, table, &columns, rows);
    returning(&mut b, table, count_only);
    b.finish_within_limit("rows")
}

/// [`plan_shared_insert`] for inserts that really share it: a statement that fails itself
/// unless it inserts one row per row given. The INSERT is a data-modifying CTE whose rows are
/// selected only when its count matches; otherwise the cast of a message to boolean fails the
/// statement, which, being one statement, then writes nothing (a rule or a trigger that skips
/// rows would leave rows that cannot be matched to their inserts). The cast depends on
/// count(*), so it is not folded at plan time; the CTE scan keeps RETURNING's order.
pub fn plan_checked_shared_insert(
    table: &TableInfo,
    parts: impl IntoIterator<Item = InsertValues>,
    count_only: bool,
) -> Result<Plan, DbError> {
    let (columns, rows) = shared_rows(parts)?;
    let n = rows.len();
    let mut b = Builder::new();
    b.push("WITH omnibus_shared_insert AS (");
    push_insert(&mut b, table, &columns, rows);
    if count_only {
        b.push(" RETURNING 1) SELECT 1 FROM omnibus_shared_insert");
    } else {
        returning(&mut b, table, false);
        b.push(") SELECT omnibus_shared_insert.* FROM omnibus_shared_insert");
    }
    b.push(&format!(
        " WHERE (SELECT CASE WHEN count(*) = {n} THEN true ELSE \
         ('{SHARED_INSERT_MISMATCH} of {n} rows would insert ' || count(*))::boolean END \
         FROM omnibus_shared_insert)"
    ));
    b.finish_within_limit("rows")
}

/// The columns and rows of inserts that share a statement (all with the same columns).
fn shared_rows(
    parts: impl IntoIterator<Item = InsertValues>,
) -> Result<(Vec<String>, Vec<Vec<Cell>>), DbError> {
    let mut parts = parts.into_iter().peekable();
    let columns = match parts.peek() {
        Some(first) => first.columns.clone(),
        None => return Err(DbError::field("rows", "at least one row is required")),
    };
    let mut rows = Vec::new();
    for part in parts {
        if part.columns != columns {
            return Err(DbError::Database(
                "internal: inserts with different columns cannot share a statement".into(),
            ));
        }
        rows.extend(part.rows);
    }
    one_default_row(&columns, rows.len())?;
    Ok((columns, rows))
}

/// The start of the message of a shared insert that refused itself ([`plan_checked_shared_insert`]).
const SHARED_INSERT_MISMATCH: &str = "omnibus: a shared insert";

/// Whether `e` is a shared insert refusing itself: it would have inserted fewer rows than it
/// was given (a rule or a trigger that skips rows).
pub fn is_shared_insert_mismatch(e: &DbError) -> bool {
    let message = e.to_string();
    // A rule created since the table was read: PostgreSQL refuses rules on an INSERT in WITH
    // (a DO ALSO rule), or RETURNING from a table with a DO INSTEAD rule.
    message.contains(SHARED_INSERT_MISMATCH)
        || message.contains("rules are not supported for data-modifying statements in WITH")
        || message.contains("cannot perform INSERT RETURNING on relation")
}

/// UPDATE ... SET ... WHERE ... RETURNING. The filter must hold at least one condition.
pub fn plan_update(table: &TableInfo, spec: &UpdateSpec) -> Result<Plan, DbError> {
    require_filter("update", &spec.criteria)?;
    if spec.set.is_empty() {
        return Err(DbError::field(
            "set",
            "at least one column to set is required",
        ));
    }
    let mut b = Builder::new();
    b.push("UPDATE ");
    b.ident(&table.name);
    b.push(" SET ");
    let mut first = true;
    // Table order, so the statement text (and the prepared-statement cache) is stable.
    for key in spec.set.keys() {
        column(table, &format!("set.{key}"), key)?;
    }
    for c in &table.columns {
        let Some(v) = spec.set.get(&c.name) else {
            continue;
        };
        let p = to_stored_param(c.ty, &c.sql_type, v)
            .map_err(|e| e.within(&format!("set.{}.", c.name)))?;
        if !first {
            b.push(", ");
        }
        first = false;
        b.ident(&c.name);
        b.push(" = ");
        b.bind(p);
    }
    if has_auto_updated_at(table) && !spec.set.contains_key(UPDATED_AT) {
        b.push(", ");
        b.ident(UPDATED_AT);
        b.push(" = now()");
    }
    where_clause(&mut b, table, &spec.criteria)?;
    returning(&mut b, table, spec.count_only);
    b.finish_within_limit("filter")
}

/// DELETE ... WHERE ... RETURNING. The filter must hold at least one condition.
pub fn plan_delete(table: &TableInfo, spec: &DeleteSpec) -> Result<Plan, DbError> {
    require_filter("delete", &spec.criteria)?;
    let mut b = Builder::new();
    b.push("DELETE FROM ");
    b.ident(&table.name);
    where_clause(&mut b, table, &spec.criteria)?;
    returning(&mut b, table, spec.count_only);
    b.finish_within_limit("filter")
}

fn require_filter(operation: &'static str, criteria: &Criteria) -> Result<(), DbError> {
    if criteria.conditions() == 0 {
        return Err(DbError::FilterRequired { operation });
    }
    Ok(())
}

/// An upsert that updates on conflict sets each update column from the row's own value; a
/// row that does not give a column would set it to its default (`EXCLUDED` holds the default
/// for it) and silently overwrite the stored value. So every row must give the same columns,
/// and every explicit update column must be among them (an auto-filled `updated_at` aside).
fn check_upsert_columns(table: &TableInfo, spec: &UpsertSpec) -> Result<(), DbError> {
    let Some(first) = spec.rows.first() else {
        return Ok(());
    };
    for (i, row) in spec.rows.iter().enumerate().skip(1) {
        let differs = row.len() != first.len() || row.keys().any(|k| !first.contains_key(k));
        if differs {
            let names = |r: &JsonRow| r.keys().cloned().collect::<Vec<_>>().join(", ");
            return Err(DbError::field(
                format!("rows[{i}]"),
                format!(
                    "every row of an upsert that updates on conflict must give the same columns \
                     (rows[0]: {}; rows[{i}]: {}): a column a row leaves out would be reset to \
                     its default on conflict",
                    names(first),
                    names(row)
                ),
            ));
        }
    }
    for (i, c) in spec.update_columns.iter().enumerate() {
        let auto_filled = c == UPDATED_AT && has_auto_updated_at(table);
        if !first.contains_key(c) && !auto_filled {
            return Err(DbError::field(
                format!("update_columns[{i}]"),
                format!("the rows do not give {c}: updating it would reset it to its default"),
            ));
        }
    }
    Ok(())
}

/// INSERT ... ON CONFLICT (...) DO UPDATE SET c = EXCLUDED.c ... | DO NOTHING, RETURNING.
pub fn plan_upsert(table: &TableInfo, spec: &UpsertSpec) -> Result<Plan, DbError> {
    let conflict: Vec<String> = if spec.conflict_columns.is_empty() {
        if table.primary_key.is_empty() {
            return Err(DbError::field(
                "conflict_columns",
                format!(
                    "table {} has no primary key; name the conflict columns",
                    table.name
                ),
            ));
        }
        table.primary_key.clone()
    } else {
        for (i, c) in spec.conflict_columns.iter().enumerate() {
            column(table, &format!("conflict_columns[{i}]"), c)?;
        }
        spec.conflict_columns.clone()
    };
    for (i, c) in spec.update_columns.iter().enumerate() {
        column(table, &format!("update_columns[{i}]"), c)?;
    }
    if !spec.ignore_duplicates {
        check_upsert_columns(table, spec)?;
    }
    let mut b = Builder::new();
    let auto = write_values(&mut b, table, &spec.rows)?;
    b.push(" ON CONFLICT (");
    for (i, c) in conflict.iter().enumerate() {
        if i > 0 {
            b.push(", ");
        }
        b.ident(c);
    }
    b.push(")");
    if spec.ignore_duplicates {
        b.push(" DO NOTHING");
    } else {
        // By default every column the rows give, except the conflict columns, the primary
        // key and created_at: an existing row keeps its identity and its creation time.
        let mut update: Vec<String> = if spec.update_columns.is_empty() {
            table
                .columns
                .iter()
                .filter(|c| spec.rows.iter().any(|r| r.contains_key(&c.name)))
                .map(|c| c.name.clone())
                .filter(|c| {
                    !conflict.contains(c) && !table.primary_key.contains(c) && c != "created_at"
                })
                .collect()
        } else {
            spec.update_columns.clone()
        };
        // An auto-filled updated_at moves on update; an auto-filled created_at keeps the
        // original row's value.
        if auto.iter().any(|c| c == UPDATED_AT) && !update.iter().any(|c| c == UPDATED_AT) {
            update.push(UPDATED_AT.into());
        }
        if update.is_empty() {
            // Nothing to change, but DO UPDATE (unlike DO NOTHING) still returns the row.
            update.push(conflict[0].clone());
        }
        b.push(" DO UPDATE SET ");
        for (i, c) in update.iter().enumerate() {
            if i > 0 {
                b.push(", ");
            }
            b.ident(c);
            b.push(" = EXCLUDED.");
            b.ident(c);
        }
        // updated_at moves on every update, as Update sets it unless `set` names it: also
        // when the rows give it but `update_columns` leave it out.
        if has_auto_updated_at(table) && !update.iter().any(|c| c == UPDATED_AT) {
            b.push(", ");
            b.ident(UPDATED_AT);
            b.push(" = now()");
        }
    }
    returning(&mut b, table, spec.count_only);
    b.finish_within_limit("rows")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::catalog::ColumnInfo;
    use serde_json::json;

    pub fn actions() -> TableInfo {
        let col = |name: &str, ty: ColType, sql: &str| ColumnInfo {
            name: name.into(),
            ty,
            sql_type: sql.into(),
            nullable: true,
            default: None,
        };
        TableInfo {
            name: "agent_actions".into(),
            columns: vec![
                col("id", ColType::Uuid, "uuid"),
                col("agent_name", ColType::Text, "text"),
                col("duration_ms", ColType::Int4, "integer"),
                col("action_details", ColType::Jsonb, "jsonb"),
                col("score", ColType::Numeric, "numeric(5,4)"),
                col(
                    "created_at",
                    ColType::Timestamp,
                    "timestamp without time zone",
                ),
                col(
                    "updated_at",
                    ColType::Timestamptz,
                    "timestamp with time zone",
                ),
            ],
            primary_key: vec!["id".into()],
            insert_may_skip_rows: false,
        }
    }

    fn cond(column: &str, op: Op, value: Json) -> Filter {
        Filter::Condition {
            column: column.into(),
            op,
            value,
        }
    }

    fn row(v: Json) -> JsonRow {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn query_with_filter_order_limit() {
        let spec = QuerySpec {
            table: "agent_actions".into(),
            columns: vec!["id".into(), "agent_name".into()],
            criteria: Criteria {
                equals: row(json!({"agent_name": "a"})),
                filter: Some(Filter::All(vec![
                    Filter::Any(vec![
                        cond("duration_ms", Op::Gt, json!(5)),
                        Filter::Not(Box::new(cond("duration_ms", Op::IsNull, Json::Null))),
                    ]),
                    cond("duration_ms", Op::In, json!([1, 2])),
                ])),
            },
            order_by: vec![
                OrderBy {
                    column: "created_at".into(),
                    direction: Direction::Desc,
                    nulls: Nulls::Last,
                },
                OrderBy {
                    column: "id".into(),
                    direction: Direction::Asc,
                    nulls: Nulls::Default,
                },
            ],
            limit: None,
            offset: 10,
            include_total: false,
        };
        let plan = plan_query(&actions(), &spec, Some(100)).unwrap();
        assert_eq!(
            plan.sql,
            "SELECT \"id\", \"agent_name\" FROM \"agent_actions\" WHERE \"agent_name\" = $1 AND \
             ((\"duration_ms\" > $2 OR NOT (\"duration_ms\" IS NULL)) AND \"duration_ms\" IN ($3, $4)) \
             ORDER BY \"created_at\" DESC NULLS LAST, \"id\" ASC LIMIT $5 OFFSET $6"
        );
        assert_eq!(
            plan.params,
            vec![
                Param::Text("a".into()),
                Param::Int4(5),
                Param::Int4(1),
                Param::Int4(2),
                Param::Int8(100),
                Param::Int8(10)
            ]
        );
    }

    #[test]
    fn not_null_violations_are_located_in_the_request() {
        let not_null = || DbError::NotNull {
            column: "action_name".into(),
            message: "null value".into(),
        };
        let rows: Vec<JsonRow> = [
            json!({"action_name": "x"}),
            json!({"agent_name": "b"}),
            json!({"action_name": null}),
        ]
        .into_iter()
        .map(|v| v.as_object().cloned().unwrap())
        .collect();
        let insert = Operation::Insert(InsertSpec {
            table: "t".into(),
            rows: rows.clone(),
            count_only: false,
        });
        let field = |e: DbError| e.violations()[0].field.clone();
        // The row that sends null, not the one before it that leaves the column out.
        assert_eq!(
            field(locate_not_null(not_null(), &insert, None)),
            "rows[2].action_name"
        );
        let upsert = Operation::Upsert(UpsertSpec {
            rows: rows[..2].to_vec(),
            ..Default::default()
        });
        // No row sends null: one that leaves out a column without a default (or without a
        // catalog entry to tell).
        assert_eq!(
            field(locate_not_null(not_null(), &upsert, None)),
            "rows[1].action_name"
        );
        let mut table = actions();
        table.columns.push(ColumnInfo {
            name: "action_name".into(),
            ty: ColType::Text,
            sql_type: "text".into(),
            nullable: false,
            default: None,
        });
        assert_eq!(
            field(locate_not_null(not_null(), &upsert, Some(&table))),
            "rows[1].action_name"
        );
        // With a default, leaving it out gives a value: no row is to blame.
        table.columns.last_mut().unwrap().default = Some("'x'::text".into());
        assert_eq!(
            field(locate_not_null(not_null(), &upsert, Some(&table))),
            "action_name"
        );
        assert_eq!(
            field(locate_not_null(not_null(), &insert, Some(&table))),
            "rows[2].action_name"
        );
        // Nor does leaving out a timestamp db-svc fills with now().
        let created = || DbError::NotNull {
            column: "created_at".into(),
            message: "null value".into(),
        };
        assert_eq!(
            field(locate_not_null(created(), &insert, Some(&actions()))),
            "created_at"
        );
        let update = Operation::Update(UpdateSpec {
            set: json!({"action_name": null}).as_object().cloned().unwrap(),
            ..Default::default()
        });
        assert_eq!(
            field(locate_not_null(not_null(), &update, None)),
            "set.action_name"
        );
        // Nothing in the request leaves it null (a trigger did): the column alone.
        let update = Operation::Update(UpdateSpec::default());
        assert_eq!(
            field(locate_not_null(not_null(), &update, None)),
            "action_name"
        );
        // Other errors pass through.
        let other = locate_not_null(DbError::field("where.x", "bad"), &insert, None);
        assert_eq!(field(other), "where.x");
        // No unique index for the conflict columns: an Upsert's field; elsewhere none.
        let no_target = || DbError::InvalidColumnReference("no unique constraint".into());
        assert_eq!(
            field(locate_not_null(no_target(), &upsert, None)),
            "conflict_columns"
        );
        assert!(matches!(
            locate_not_null(no_target(), &insert, None),
            DbError::InvalidColumnReference(_)
        ));
    }

    #[test]
    fn unknown_columns_are_field_errors() {
        let spec = QuerySpec {
            table: "agent_actions".into(),
            criteria: Criteria {
                filter: Some(Filter::All(vec![cond("agent_nmae", Op::Eq, json!("x"))])),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = plan_query(&actions(), &spec, None).unwrap_err();
        assert_eq!(
            err.violations()[0].field,
            "filter.all.filters[0].condition.column"
        );
        let err = plan_insert(
            &actions(),
            &InsertSpec {
                table: "agent_actions".into(),
                rows: vec![row(json!({"agent_name": "a"})), row(json!({"bogus": 1}))],
                count_only: false,
            },
        )
        .unwrap_err();
        assert_eq!(err.violations()[0].field, "rows[1].bogus");
    }

    #[test]
    fn insert_fills_timestamps_and_defaults() {
        let plan = plan_insert(
            &actions(),
            &InsertSpec {
                table: "agent_actions".into(),
                rows: vec![
                    row(json!({"agent_name": "a", "duration_ms": 3})),
                    row(json!({"agent_name": "b"})),
                ],
                count_only: true,
            },
        )
        .unwrap();
        assert_eq!(
            plan.sql,
            "INSERT INTO \"agent_actions\" (\"agent_name\", \"duration_ms\", \"created_at\", \"updated_at\") \
             VALUES ($1, $2, now(), now()), ($3, DEFAULT, now(), now())"
        );
        assert_eq!(plan.params.len(), 3);
    }

    /// Inserts that really share a statement get one that fails itself unless it inserts a
    /// row per row given; values stay bound.
    #[test]
    fn a_checked_shared_insert_counts_its_rows() {
        let spec = |agent: &str, count_only| InsertSpec {
            table: "agent_actions".into(),
            rows: vec![row(json!({"agent_name": agent}))],
            count_only,
        };
        let parts = |count_only| {
            ["a", "b", "c"].map(|a| InsertValues::new(&actions(), &spec(a, count_only)).unwrap())
        };
        let plan = plan_checked_shared_insert(&actions(), parts(true), true).unwrap();
        assert_eq!(
            plan.sql,
            "WITH omnibus_shared_insert AS (INSERT INTO \"agent_actions\" \
             (\"agent_name\", \"created_at\", \"updated_at\") \
             VALUES ($1, now(), now()), ($2, now(), now()), ($3, now(), now()) RETURNING 1) \
             SELECT 1 FROM omnibus_shared_insert WHERE (SELECT CASE WHEN count(*) = 3 THEN true \
             ELSE ('omnibus: a shared insert of 3 rows would insert ' || count(*))::boolean END \
             FROM omnibus_shared_insert)"
        );
        assert_eq!(plan.params.len(), 3);
        let plan = plan_checked_shared_insert(&actions(), parts(false), false).unwrap();
        let plain = plan_shared_insert(&actions(), parts(false), false).unwrap();
        assert!(
            plan.sql
                .starts_with(&format!("WITH omnibus_shared_insert AS ({})", plain.sql))
        );
        assert!(
            plan.sql
                .contains(") SELECT omnibus_shared_insert.* FROM omnibus_shared_insert")
        );
        assert!(is_shared_insert_mismatch(&DbError::field(
            "",
            "invalid input syntax for type boolean: \"omnibus: a shared insert of 3 rows would \
             insert 2\""
        )));
        assert!(!is_shared_insert_mismatch(&DbError::field(
            "rows[0].x",
            "too long"
        )));
    }

    #[test]
    fn wrong_types_name_the_cell() {
        let err = plan_insert(
            &actions(),
            &InsertSpec {
                table: "agent_actions".into(),
                rows: vec![row(json!({"duration_ms": "slow"}))],
                count_only: false,
            },
        )
        .unwrap_err();
        assert_eq!(err.violations()[0].field, "rows[0].duration_ms");
    }

    #[test]
    fn update_and_delete_need_a_condition() {
        let spec = UpdateSpec {
            table: "agent_actions".into(),
            criteria: Criteria {
                filter: Some(Filter::All(vec![])),
                ..Default::default()
            },
            set: row(json!({"agent_name": "x"})),
            ..Default::default()
        };
        assert!(matches!(
            plan_update(&actions(), &spec),
            Err(DbError::FilterRequired { .. })
        ));
        let spec = DeleteSpec {
            table: "agent_actions".into(),
            ..Default::default()
        };
        assert!(matches!(
            plan_delete(&actions(), &spec),
            Err(DbError::FilterRequired { .. })
        ));
        let spec = UpdateSpec {
            table: "agent_actions".into(),
            criteria: Criteria {
                filter: Some(cond("id", Op::Eq, json!(uuid::Uuid::nil().to_string()))),
                ..Default::default()
            },
            set: row(json!({"agent_name": "x"})),
            count_only: true,
            ..Default::default()
        };
        assert_eq!(
            plan_update(&actions(), &spec).unwrap().sql,
            "UPDATE \"agent_actions\" SET \"agent_name\" = $1, \"updated_at\" = now() WHERE \"id\" = $2"
        );
    }

    #[test]
    fn upsert_defaults_to_primary_key() {
        let plan = plan_upsert(
            &actions(),
            &UpsertSpec {
                table: "agent_actions".into(),
                rows: vec![row(
                    json!({"id": uuid::Uuid::nil().to_string(), "agent_name": "a"}),
                )],
                count_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            plan.sql.ends_with(
                "ON CONFLICT (\"id\") DO UPDATE SET \"agent_name\" = EXCLUDED.\"agent_name\", \
                 \"updated_at\" = EXCLUDED.\"updated_at\""
            ),
            "{}",
            plan.sql
        );
        let plan = plan_upsert(
            &actions(),
            &UpsertSpec {
                table: "agent_actions".into(),
                rows: vec![row(json!({"id": uuid::Uuid::nil().to_string()}))],
                ignore_duplicates: true,
                count_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            plan.sql.ends_with("ON CONFLICT (\"id\") DO NOTHING"),
            "{}",
            plan.sql
        );
        // Rows that give updated_at, with update_columns leaving it out: it still moves.
        let plan = plan_upsert(
            &actions(),
            &UpsertSpec {
                table: "agent_actions".into(),
                rows: vec![row(json!({
                    "id": uuid::Uuid::nil().to_string(),
                    "agent_name": "b",
                    "updated_at": "2024-01-01T00:00:00Z"
                }))],
                update_columns: vec!["agent_name".into()],
                count_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            plan.sql.ends_with(
                "DO UPDATE SET \"agent_name\" = EXCLUDED.\"agent_name\", \"updated_at\" = now()"
            ),
            "{}",
            plan.sql
        );
        // An updated_at that is no timestamp (epoch milliseconds, say) is the caller's.
        let mut epoch = actions();
        if let Some(c) = epoch.columns.iter_mut().find(|c| c.name == UPDATED_AT) {
            c.ty = ColType::Int8;
            c.sql_type = "bigint".into();
        }
        let plan = plan_upsert(
            &epoch,
            &UpsertSpec {
                table: "agent_actions".into(),
                rows: vec![row(
                    json!({"id": uuid::Uuid::nil().to_string(), "agent_name": "b"}),
                )],
                count_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            plan.sql
                .ends_with("DO UPDATE SET \"agent_name\" = EXCLUDED.\"agent_name\""),
            "{}",
            plan.sql
        );
    }

    #[test]
    fn a_like_pattern_ending_with_its_escape_character_is_a_field_error() {
        let t = actions();
        for pattern in ["abc\\", "\\", "a\\\\\\"] {
            match plan_filter(&t, &cond("agent_name", Op::Like, json!(pattern))) {
                Err(DbError::Validation(v)) => {
                    assert!(v[0].field.ends_with("value"), "{pattern}: {v:?}")
                }
                other => panic!("{pattern}: {other:?}"),
            }
        }
        for pattern in ["abc\\\\", "a\\%b", "%", ""] {
            assert!(
                plan_filter(&t, &cond("agent_name", Op::ILike, json!(pattern))).is_ok(),
                "{pattern}"
            );
        }
    }

    #[test]
    fn operator_column_checks() {
        let t = actions();
        assert!(plan_filter(&t, &cond("duration_ms", Op::Like, json!("1%"))).is_err());
        assert!(plan_filter(&t, &cond("agent_name", Op::Contains, json!({}))).is_err());
        assert!(plan_filter(&t, &cond("agent_name", Op::Eq, Json::Null)).is_err());
        assert!(plan_filter(&t, &cond("agent_name", Op::In, json!("a"))).is_err());
        assert_eq!(
            plan_filter(&t, &cond("agent_name", Op::NotIn, json!([])))
                .unwrap()
                .sql,
            "(\"agent_name\" IS NOT NULL OR NULL)"
        );
        assert_eq!(
            plan_filter(&t, &cond("agent_name", Op::In, json!([])))
                .unwrap()
                .sql,
            "(\"agent_name\" IS NULL AND NULL)"
        );
        assert_eq!(
            plan_filter(&t, &cond("action_details", Op::Contains, json!({"k": 1})))
                .unwrap()
                .sql,
            "\"action_details\" @> $1"
        );
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
