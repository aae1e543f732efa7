//! `omnibus db ...`: the db-svc subcommands.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use futures::StreamExt;
use omnibus_client::bus::{BusConfig, BusPublisher};
use omnibus_client::connect::AuthChannel;
use omnibus_client::db::{DbClient, Routed, Via, WriteMode, with_request_id};
use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use tonic::transport::Channel;

use super::filter::{self, ColumnTypes, Condition, Raw};
use super::output::{self, Format};
use super::{Cli, Fail, Result, Svc, call_error, connect_channel, connect_options, parse_duration};

const DB_AFTER_HELP: &str = "\
Filters (--where, repeatable, all must hold):
  agent_name=coder   'duration_ms>100'   'duration_ms<=5'   agent_name!=coder
  'agent_name~cod%'  (LIKE)   'agent_name~*COD%'  (ILIKE)   'action_details@>{\"k\":1}'  (jsonb contains)
  'agent_name in (coder,tester)'   'agent_name not in (x)'   'project_name is null'   'project_name is not null'
Values are typed by the column (agent_name=123 is the text \"123\"); quote to force text: \"x='true'\".
Order: --order created_at:desc  (col[:asc|desc][:nulls_first|nulls_last], commas or repeat)

Examples:
  omnibus db tables
  omnibus db describe agent_actions
  omnibus db query agent_actions --where agent_name=coder --where 'duration_ms>100' --order created_at:desc --limit 5
  omnibus db count agent_actions --where action_type=error
  omnibus db insert agent_actions agent_name=coder action_type=tool_call action_name=read_file correlation_id=$(uuidgen)
  omnibus db update agent_actions --where agent_name=coder --set duration_ms=15 --max-affected 10
  omnibus db delete agent_actions --where agent_name=coder
  omnibus db raw 'SELECT agent_name, count(*) AS n FROM agent_actions GROUP BY 1'
  omnibus db insert agent_actions --row '{\"agent_name\": \"coder\", ...}' --via bus";

/// `omnibus db`: rows and tables through db-svc.
#[derive(Subcommand, Debug)]
#[command(after_help = DB_AFTER_HELP)]
pub enum DbCommand {
    /// Read rows of a table (aligned table on a terminal, JSON lines when piped).
    #[command(after_help = DB_AFTER_HELP)]
    Query(QueryArgs),
    /// Insert one row from COLUMN=VALUE pairs, or rows given as JSON with --row.
    #[command(after_help = DB_AFTER_HELP)]
    Insert(InsertArgs),
    /// Change the rows matching --where (required) to the --set values.
    #[command(after_help = DB_AFTER_HELP)]
    Update(UpdateArgs),
    /// Delete the rows matching --where (required).
    #[command(after_help = DB_AFTER_HELP)]
    Delete(DeleteArgs),
    /// Insert rows, updating (or with --ignore-duplicates keeping) those that conflict.
    #[command(after_help = DB_AFTER_HELP)]
    Upsert(UpsertArgs),
    /// Count the rows matching --where.
    #[command(after_help = DB_AFTER_HELP)]
    Count(CountArgs),
    /// Run one SQL statement with $1..$n parameters (read-only unless db-svc allows writes).
    #[command(after_help = "\
Example:
  omnibus db raw 'SELECT agent_name, count(*) AS n FROM agent_actions WHERE created_at > $1 GROUP BY 1' 2024-01-01T00:00:00Z
Parameters are typed by PostgreSQL (add a cast like $1::text where it cannot tell); quote one
to force text: \"'42'\".")]
    Raw(RawArgs),
    /// List the tables db-svc serves.
    Tables,
    /// Show a table's columns, types, defaults and primary key.
    Describe(DescribeArgs),
}

/// A `--where` condition (clap value parser).
fn parse_where(raw: &str) -> std::result::Result<Condition, String> {
    filter::parse_condition(raw).map_err(|e| e.to_string())
}

/// `--order` terms.
#[derive(Clone, Debug)]
pub struct OrderTerms(pub Vec<pb::OrderBy>);

fn parse_order(raw: &str) -> std::result::Result<OrderTerms, String> {
    filter::parse_order(raw)
        .map(OrderTerms)
        .map_err(|e| e.to_string())
}

fn parse_assign(raw: &str) -> std::result::Result<(String, Raw), String> {
    filter::parse_assignment(raw).map_err(|e| e.to_string())
}

#[derive(Args, Debug)]
pub struct FilterArgs {
    /// A condition (repeatable; all must hold): agent_name=coder, 'duration_ms>100', ...
    #[arg(long = "where", short = 'w', value_name = "COND", value_parser = parse_where)]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ViaArg {
    /// Direct gRPC to db-svc.
    Direct,
    /// Over the Kafka event bus, falling back to gRPC (same request id) if no reply comes.
    Bus,
}

#[derive(Args, Debug)]
pub struct WriteArgs {
    /// How writes travel (default: bus when USE_EVENT_BUS_FOR_WRITES=true, else direct).
    #[arg(long, value_enum)]
    pub via: Option<ViaArg>,
    /// Idempotency key: repeating a write with the same id does not write again.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Print only the number of rows written.
    #[arg(long)]
    pub count_only: bool,
    /// How long to wait for a bus reply before falling back to gRPC.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub bus_timeout: Duration,
    /// Bus request topic.
    #[arg(
        long,
        env = "DB_BUS_REQUEST_TOPIC",
        default_value = "dev.omninode-bridge.database.query-requested.v1"
    )]
    pub request_topic: String,
    /// Bus completed-reply topic.
    #[arg(
        long,
        env = "DB_BUS_COMPLETED_TOPIC",
        default_value = "dev.omninode-bridge.database.query-completed.v1"
    )]
    pub completed_topic: String,
    /// Bus failed-reply topic.
    #[arg(
        long,
        env = "DB_BUS_FAILED_TOPIC",
        default_value = "dev.omninode-bridge.database.query-failed.v1"
    )]
    pub failed_topic: String,
    /// Do not cut long cells in tables.
    #[arg(long)]
    pub wide: bool,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    /// A served table (see `omnibus db tables`).
    pub table: String,
    #[command(flatten)]
    pub filters: FilterArgs,
    /// Ordering: created_at:desc, agent_name:asc:nulls_last (repeatable or comma-separated).
    #[arg(long, short = 'o', value_name = "COL[:DIR]", value_parser = parse_order)]
    pub order: Vec<OrderTerms>,
    /// Rows to return (db-svc's default is 100).
    #[arg(long, short = 'n')]
    pub limit: Option<u32>,
    /// Rows to skip.
    #[arg(long)]
    pub offset: Option<u64>,
    /// Only these columns, in this order (comma-separated).
    #[arg(long, short = 'c', value_delimiter = ',')]
    pub columns: Vec<String>,
    /// Every matching row, streamed (no limit unless --limit).
    #[arg(long, conflicts_with = "total")]
    pub all: bool,
    /// Also print the total number of matching rows.
    #[arg(long)]
    pub total: bool,
    /// Do not cut long cells in tables.
    #[arg(long)]
    pub wide: bool,
}

#[derive(Args, Debug)]
pub struct InsertArgs {
    /// A served table.
    pub table: String,
    /// COLUMN=VALUE pairs of one row (values typed by the column).
    #[arg(value_name = "COLUMN=VALUE", value_parser = parse_assign)]
    pub values: Vec<(String, Raw)>,
    /// A row as a JSON object (repeatable, for several rows).
    #[arg(long, value_name = "JSON")]
    pub row: Vec<String>,
    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// A served table.
    pub table: String,
    /// Which rows (required, repeatable; all must hold).
    #[arg(long = "where", short = 'w', value_name = "COND", value_parser = parse_where, required = true)]
    pub conditions: Vec<Condition>,
    /// New values: --set duration_ms=15 (repeatable).
    #[arg(long, value_name = "COLUMN=VALUE", value_parser = parse_assign, required = true)]
    pub set: Vec<(String, Raw)>,
    /// Change nothing (and fail) if more rows than this would change.
    #[arg(long)]
    pub max_affected: Option<u64>,
    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// A served table.
    pub table: String,
    /// Which rows (required, repeatable; all must hold).
    #[arg(long = "where", short = 'w', value_name = "COND", value_parser = parse_where, required = true)]
    pub conditions: Vec<Condition>,
    /// Delete nothing (and fail) if more rows than this would go.
    #[arg(long)]
    pub max_affected: Option<u64>,
    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
pub struct UpsertArgs {
    /// A served table.
    pub table: String,
    /// COLUMN=VALUE pairs of one row.
    #[arg(value_name = "COLUMN=VALUE", value_parser = parse_assign)]
    pub values: Vec<(String, Raw)>,
    /// A row as a JSON object (repeatable).
    #[arg(long, value_name = "JSON")]
    pub row: Vec<String>,
    /// Conflict columns (default: the primary key).
    #[arg(long, value_delimiter = ',')]
    pub conflict: Vec<String>,
    /// Columns to overwrite on conflict (default: every given non-conflict column).
    #[arg(long = "update", value_delimiter = ',')]
    pub update_columns: Vec<String>,
    /// Keep existing rows on conflict (ON CONFLICT DO NOTHING).
    #[arg(long)]
    pub ignore_duplicates: bool,
    #[command(flatten)]
    pub write: WriteArgs,
}

#[derive(Args, Debug)]
pub struct CountArgs {
    /// A served table.
    pub table: String,
    #[command(flatten)]
    pub filters: FilterArgs,
}

#[derive(Args, Debug)]
pub struct RawArgs {
    /// One SQL statement with $1..$n placeholders.
    pub sql: String,
    /// Values of $1..$n.
    pub params: Vec<String>,
    /// Idempotency key for writes.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Do not cut long cells in tables.
    #[arg(long)]
    pub wide: bool,
}

#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// A served table.
    pub table: String,
}

/// A connected db-svc client and what the messages need.
struct Db {
    grpc: DatabaseServiceClient<AuthChannel>,
    channel: Channel,
    addr: String,
}

impl Db {
    fn err(&self, status: tonic::Status) -> Fail {
        call_error(Svc::Db, &self.addr, &status)
    }

    async fn describe(&self, table: &str) -> Result<pb::TableDescription> {
        let reply = self
            .grpc
            .clone()
            .describe_table(pb::DescribeTableRequest {
                table: table.to_string(),
            })
            .await
            .map_err(|s| self.err(s))?;
        reply
            .into_inner()
            .table
            .ok_or_else(|| Fail("db-svc sent an empty table description".into()))
    }
}

fn types_of(desc: &pb::TableDescription) -> (ColumnTypes, Vec<String>) {
    let types = desc
        .columns
        .iter()
        .map(|c| {
            // numeric is exact in db-svc only from decimal text: the CLI must not round a
            // literal through a double on the way (see `filter::typed_value`).
            let ty = if c.sql_type.starts_with("numeric") {
                filter::DECIMAL.to_string()
            } else {
                c.json_type.clone()
            };
            (c.name.clone(), ty)
        })
        .collect();
    let order = desc.columns.iter().map(|c| c.name.clone()).collect();
    (types, order)
}

pub async fn run(cli: &Cli, cmd: &DbCommand, format: Format) -> Result<ExitCode> {
    let channel = connect_channel(Svc::Db, &cli.db_addr).await?;
    let db = Db {
        grpc: DatabaseServiceClient::new(connect_options().authenticate(channel.clone())),
        channel,
        addr: cli.db_addr.clone(),
    };
    let mut out = std::io::stdout().lock();
    match cmd {
        DbCommand::Tables => {
            let tables = db
                .grpc
                .clone()
                .list_tables(pb::ListTablesRequest {})
                .await
                .map_err(|s| db.err(s))?
                .into_inner()
                .tables;
            for t in tables {
                match format {
                    Format::Table => writeln!(out, "{t}")?,
                    Format::Json => writeln!(out, "{}", serde_json::json!({ "table": t }))?,
                }
            }
        }
        DbCommand::Describe(a) => {
            let desc = db.describe(&a.table).await?;
            match format {
                Format::Json => {
                    let json =
                        // Every field, so a NOT NULL column shows `"nullable": false`.
                        omnibus_proto::json::to_json_with_defaults(
                            "omnibus.db.v1.TableDescription",
                            &desc,
                            true,
                        )
                            .map_err(|e| Fail(e.to_string()))?;
                    writeln!(out, "{json}")?;
                }
                Format::Table => {
                    let rows: Vec<Map<String, Value>> = desc
                        .columns
                        .iter()
                        .map(|c| {
                            let mut m = Map::new();
                            m.insert("column".into(), c.name.clone().into());
                            m.insert("type".into(), c.sql_type.clone().into());
                            m.insert("json".into(), c.json_type.clone().into());
                            m.insert("null".into(), if c.nullable { "yes" } else { "no" }.into());
                            m.insert(
                                "default".into(),
                                c.default_value.clone().map_or(Value::Null, Value::String),
                            );
                            m.insert(
                                "key".into(),
                                if desc.primary_key.contains(&c.name) {
                                    "PK"
                                } else {
                                    ""
                                }
                                .into(),
                            );
                            m
                        })
                        .collect();
                    let cols: Vec<String> = ["column", "type", "json", "null", "default", "key"]
                        .map(String::from)
                        .to_vec();
                    writeln!(out, "{}", desc.name)?;
                    writeln!(out, "{}", output::table(&rows, &cols, true))?;
                }
            }
        }
        DbCommand::Query(a) => query(&db, a, format, &mut out).await?,
        DbCommand::Count(a) => {
            let desc = db.describe(&a.table).await?;
            let (types, _) = types_of(&desc);
            let filter = filter::to_filter(&a.filters.conditions, &types).map_err(Fail)?;
            let count = db
                .grpc
                .clone()
                .count(pb::CountRequest {
                    table: a.table.clone(),
                    r#where: None,
                    filter,
                })
                .await
                .map_err(|s| db.err(s))?
                .into_inner()
                .count;
            match format {
                Format::Table => writeln!(out, "{count}")?,
                Format::Json => writeln!(out, "{}", serde_json::json!({ "count": count }))?,
            }
        }
        DbCommand::Raw(a) => {
            let params = a
                .params
                .iter()
                .map(|p| {
                    let raw = filter::parse_assignment(&format!("p={p}"))
                        .map(|(_, r)| r)
                        .map_err(|e| Fail(e.to_string()))?;
                    filter::typed_value(&raw, None)
                        .map(|v| filter::json_to_value(&v))
                        .map_err(Fail)
                })
                .collect::<Result<Vec<_>>>()?;
            // A write gets a request id, as the other write commands do, so that one whose
            // answer was lost can be retried without writing twice (db-svc ignores it on reads).
            let writes = is_write_statement(&a.sql);
            let request_id = match &a.request_id {
                Some(id) => id.clone(),
                None if writes => uuid::Uuid::new_v4().to_string(),
                None => String::new(),
            };
            let reply = db
                .grpc
                .clone()
                .execute_raw(pb::ExecuteRawRequest {
                    sql: a.sql.clone(),
                    params,
                    request_id: request_id.clone(),
                })
                .await
                .map_err(|s| db.err(with_request_id(s, &request_id)))?
                .into_inner();
            let rows = to_maps(&reply.rows);
            print_rows(&mut out, &rows, &[], format, a.wide)?;
            let mut line = format!("({})", output::plural(reply.affected, "row"));
            if writes {
                line.push_str(&format!(", request id {request_id}"));
            }
            if reply.replayed {
                line.push_str(" (replayed: an earlier request with this id already did it)");
            }
            summary(&mut out, format, &line)?;
        }
        DbCommand::Insert(a) => {
            let desc = db.describe(&a.table).await?;
            let (types, order) = types_of(&desc);
            let rows = rows_of(&a.values, &a.row, &types)?;
            let client = write_client(cli, &db, &a.write).await;
            let r = client
                .insert(pb::InsertRequest {
                    table: a.table.clone(),
                    rows,
                    count_only: a.write.count_only,
                    request_id: a.write.request_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| db.err(s))?;
            let (rows, affected, replayed) =
                (&r.response.rows, r.response.affected, r.response.replayed);
            written(
                &mut out, format, &a.write, "inserted", rows, affected, replayed, &r, &order,
            )?;
        }
        DbCommand::Upsert(a) => {
            let desc = db.describe(&a.table).await?;
            let (types, order) = types_of(&desc);
            let rows = rows_of(&a.values, &a.row, &types)?;
            let client = write_client(cli, &db, &a.write).await;
            let r = client
                .upsert(pb::UpsertRequest {
                    table: a.table.clone(),
                    rows,
                    conflict_columns: a.conflict.clone(),
                    update_columns: a.update_columns.clone(),
                    ignore_duplicates: a.ignore_duplicates,
                    count_only: a.write.count_only,
                    request_id: a.write.request_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| db.err(s))?;
            let (rows, affected, replayed) =
                (&r.response.rows, r.response.affected, r.response.replayed);
            written(
                &mut out, format, &a.write, "upserted", rows, affected, replayed, &r, &order,
            )?;
        }
        DbCommand::Update(a) => {
            let desc = db.describe(&a.table).await?;
            let (types, order) = types_of(&desc);
            let filter = filter::to_filter(&a.conditions, &types).map_err(Fail)?;
            let set = assignments(&a.set, &types)?;
            let client = write_client(cli, &db, &a.write).await;
            let r = client
                .update(pb::UpdateRequest {
                    table: a.table.clone(),
                    r#where: None,
                    filter,
                    set: Some(set),
                    max_affected: a.max_affected,
                    count_only: a.write.count_only,
                    request_id: a.write.request_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| db.err(s))?;
            let (rows, affected, replayed) =
                (&r.response.rows, r.response.affected, r.response.replayed);
            written(
                &mut out, format, &a.write, "updated", rows, affected, replayed, &r, &order,
            )?;
        }
        DbCommand::Delete(a) => {
            let desc = db.describe(&a.table).await?;
            let (types, order) = types_of(&desc);
            let filter = filter::to_filter(&a.conditions, &types).map_err(Fail)?;
            let client = write_client(cli, &db, &a.write).await;
            let r = client
                .delete(pb::DeleteRequest {
                    table: a.table.clone(),
                    r#where: None,
                    filter,
                    max_affected: a.max_affected,
                    count_only: a.write.count_only,
                    request_id: a.write.request_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| db.err(s))?;
            let (rows, affected, replayed) =
                (&r.response.rows, r.response.affected, r.response.replayed);
            written(
                &mut out, format, &a.write, "deleted", rows, affected, replayed, &r, &order,
            )?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

async fn query(db: &Db, a: &QueryArgs, format: Format, out: &mut impl Write) -> Result<()> {
    let desc = db.describe(&a.table).await?;
    let (types, table_order) = types_of(&desc);
    let filter = filter::to_filter(&a.filters.conditions, &types).map_err(Fail)?;
    let request = pb::QueryRequest {
        table: a.table.clone(),
        columns: a.columns.clone(),
        r#where: None,
        filter,
        order_by: a.order.iter().flat_map(|o| o.0.clone()).collect(),
        limit: a.limit,
        offset: a.offset.unwrap_or(0),
        include_total: a.total,
    };
    let preferred = if a.columns.is_empty() {
        table_order
    } else {
        a.columns.clone()
    };
    if a.all {
        // Streamed: JSON lines go out batch by batch; a table needs every row for its widths.
        let mut stream = db
            .grpc
            .clone()
            .stream_query(pb::StreamQueryRequest {
                query: Some(request),
                batch_size: 500,
            })
            .await
            .map_err(|s| db.err(s))?
            .into_inner();
        let mut all = Vec::new();
        let mut n = 0u64;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|s| db.err(s))?;
            let rows = to_maps(&batch.rows);
            n += rows.len() as u64;
            match format {
                Format::Json => print_rows(out, &rows, &preferred, format, a.wide)?,
                Format::Table => all.extend(rows),
            }
        }
        if format == Format::Table {
            print_rows(out, &all, &preferred, format, a.wide)?;
        }
        summary(out, format, &format!("({})", output::plural(n, "row")))?;
        return Ok(());
    }
    let reply = db
        .grpc
        .clone()
        .query(request)
        .await
        .map_err(|s| db.err(s))?
        .into_inner();
    let rows = to_maps(&reply.rows);
    print_rows(out, &rows, &preferred, format, a.wide)?;
    let mut line = format!("({}", output::plural(rows.len() as u64, "row"));
    if let Some(total) = reply.total {
        line.push_str(&format!(" of {total}"));
    }
    line.push(')');
    summary(out, format, &line)
}

fn to_maps(rows: &[prost_types::Struct]) -> Vec<Map<String, Value>> {
    rows.iter().map(filter::struct_to_json).collect()
}

fn print_rows(
    out: &mut impl Write,
    rows: &[Map<String, Value>],
    preferred: &[String],
    format: Format,
    wide: bool,
) -> Result<()> {
    match format {
        Format::Json => {
            for r in rows {
                writeln!(out, "{}", Value::Object(r.clone()))?;
            }
        }
        Format::Table => {
            if !rows.is_empty() {
                let cols = output::columns(rows, preferred);
                writeln!(out, "{}", output::table(rows, &cols, wide))?;
            }
        }
    }
    Ok(())
}

/// Whether `sql` is an INSERT, UPDATE, DELETE or MERGE (after leading blanks, comments and
/// parentheses): for the request id and the summary only; db-svc's guard decides what runs.
fn is_write_statement(sql: &str) -> bool {
    let mut rest = sql;
    loop {
        let trimmed = rest.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
        if let Some(comment) = trimmed.strip_prefix("--") {
            rest = comment.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(comment) = trimmed.strip_prefix("/*") {
            rest = comment.split_once("*/").map_or("", |(_, after)| after);
        } else {
            rest = trimmed;
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(char::is_ascii_alphabetic)
        .collect::<String>()
        .to_ascii_lowercase();
    matches!(word.as_str(), "insert" | "update" | "delete" | "merge")
}

/// The closing line: on stdout under a table, on stderr with JSON (stdout stays pure rows).
fn summary(out: &mut impl Write, format: Format, line: &str) -> Result<()> {
    match format {
        Format::Table => writeln!(out, "{line}")?,
        Format::Json => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
    Ok(())
}

fn rows_of(
    values: &[(String, Raw)],
    json_rows: &[String],
    types: &ColumnTypes,
) -> Result<Vec<prost_types::Struct>> {
    let mut rows = Vec::new();
    if !values.is_empty() {
        rows.push(assignments(values, types)?);
    }
    for (i, text) in json_rows.iter().enumerate() {
        let o = json_row(text, types).map_err(|e| Fail(format!("--row {}: {e}", i + 1)))?;
        rows.push(filter::json_to_struct(&o));
    }
    if rows.is_empty() {
        return Err(Fail(
            "nothing to write: give COLUMN=VALUE pairs or --row '{...}'".into(),
        ));
    }
    Ok(rows)
}

/// One `--row` (a JSON object) as the row to send, its values typed for the columns `types`.
fn json_row(text: &str, types: &ColumnTypes) -> std::result::Result<Map<String, Value>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON ({e})"))?;
    let Value::Object(mut o) = v else {
        return Err("expected a JSON object".into());
    };
    // A number a double does not carry exactly (an integer beyond ±(2^53 - 1), a decimal with
    // more digits than a double keeps), for an integer or numeric column, goes as its decimal
    // text (db-svc reads it exactly there), not rounded through a double. serde_json has
    // already made a double of it (an integer beyond 64 bits too: `arbitrary_precision` would
    // change `Value` for the whole workspace), so the digits come from the text as written.
    // Other columns keep the number (jsonb keeps a number; a float column takes only
    // numbers).
    let literals = member_texts(text);
    for (column, value) in o.iter_mut() {
        let exact_column = matches!(
            types.get(column).map(String::as_str),
            Some("integer" | filter::DECIMAL)
        );
        if exact_column
            && value.is_number()
            && let Some(literal) = literals.get(column.as_str())
        {
            *value = filter::guess(literal);
        }
    }
    Ok(o)
}

/// The text of each top-level member's value in `text` (a JSON object), by member name (the
/// last one for a repeated name, as serde_json keeps it); empty if `text` is not an object.
fn member_texts(text: &str) -> HashMap<String, &str> {
    serde_json::from_str::<HashMap<String, &RawValue>>(text)
        .map(|members| {
            members
                .into_iter()
                .map(|(name, raw)| (name, raw.get()))
                .collect()
        })
        .unwrap_or_default()
}

fn assignments(values: &[(String, Raw)], types: &ColumnTypes) -> Result<prost_types::Struct> {
    let mut map = Map::new();
    for (col, raw) in values {
        let v = filter::typed_value(raw, types.get(col).map(String::as_str))
            .map_err(|e| Fail(format!("{col}: {e}")))?;
        map.insert(col.clone(), v);
    }
    Ok(filter::json_to_struct(&map))
}

/// The client for writes: bus-first when asked (or USE_EVENT_BUS_FOR_WRITES), else direct.
async fn write_client(cli: &Cli, db: &Db, w: &WriteArgs) -> DbClient {
    let bearer = connect_options().bearer.clone();
    let mode = match w.via {
        Some(ViaArg::Bus) => WriteMode::BusFirst,
        Some(ViaArg::Direct) => WriteMode::DirectOnly,
        None => WriteMode::from_env(),
    };
    if mode == WriteMode::DirectOnly {
        return DbClient::direct(db.channel.clone()).with_bearer(bearer);
    }
    let mut config = BusConfig::new(cli.brokers.clone());
    config.timeout = w.bus_timeout;
    config.topics.request = w.request_topic.clone();
    config.topics.completed = w.completed_topic.clone();
    config.topics.failed = w.failed_topic.clone();
    config.service = "omnibus-cli".into();
    config.kafka_settings = cli.kafka_settings();
    let client = match BusPublisher::connect(config).await {
        Ok(bus) => DbClient::with_bus(db.channel.clone(), Arc::new(bus), WriteMode::BusFirst),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "omnibus: the event bus at {} is not usable ({e}); writing directly over gRPC",
                cli.brokers
            );
            DbClient::direct(db.channel.clone())
        }
    };
    client.with_bearer(bearer)
}

#[allow(clippy::too_many_arguments)]
fn written<T>(
    out: &mut impl Write,
    format: Format,
    w: &WriteArgs,
    verb: &str,
    rows: &[prost_types::Struct],
    affected: u64,
    replayed: bool,
    routed: &Routed<T>,
    order: &[String],
) -> Result<()> {
    let rows = to_maps(rows);
    if !w.count_only {
        print_rows(out, &rows, order, format, w.wide)?;
    }
    let via = match &routed.via {
        Via::Bus => "over the event bus".to_string(),
        Via::Direct => "over gRPC".to_string(),
        Via::Fallback(reason) => format!("over gRPC after the bus failed: {reason}"),
    };
    if w.count_only && format == Format::Json {
        // No rows to print: the count is the result, as a line a script can read.
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "affected": affected,
                "request_id": routed.request_id,
                "replayed": replayed,
            })
        )?;
    }
    let mut line = format!(
        "{verb} {} {via}, request id {}",
        output::plural(affected, "row"),
        routed.request_id
    );
    if replayed {
        line.push_str(" (replayed: an earlier request with this id already did it)");
    }
    summary(out, format, &line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn raw_writes_are_told_from_reads_by_their_first_word() {
        for sql in [
            "INSERT INTO t VALUES (1)",
            "  update t SET a = 1",
            "-- note\nDELETE FROM t",
            "/* a */ /* b */\n Delete FROM t",
        ] {
            assert!(is_write_statement(sql), "{sql}");
        }
        for sql in [
            "SELECT 1",
            "(SELECT 1)",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "-- INSERT\nSELECT 1",
            "inserted",
            "",
        ] {
            assert!(!is_write_statement(sql), "{sql}");
        }
    }

    fn types() -> ColumnTypes {
        [
            ("big", "integer"),
            ("amount", filter::DECIMAL),
            ("score", "number"),
            ("details", "json"),
            ("name", "string"),
        ]
        .into_iter()
        .map(|(c, t)| (c.to_string(), t.to_string()))
        .collect()
    }

    /// The README's promise: for an integer or numeric column, an integer beyond
    /// ±(2^53 - 1) is sent as its decimal text, never rounded - beyond 64 bits too, where
    /// serde_json reads the literal as a double.
    #[test]
    fn row_integers_beyond_a_double_are_sent_exactly() {
        let row = json_row(
            r#"{"big": 123456789012345678901, "amount": -123456789012345678901234567890}"#,
            &types(),
        )
        .unwrap();
        assert_eq!(row["big"], json!("123456789012345678901"));
        assert_eq!(row["amount"], json!("-123456789012345678901234567890"));
        // Within 64 bits, as before.
        let row = json_row(
            r#"{"big": 9007199254740993, "amount": 18446744073709551615}"#,
            &types(),
        )
        .unwrap();
        assert_eq!(row["big"], json!("9007199254740993"));
        assert_eq!(row["amount"], json!("18446744073709551615"));
        // A numeric column's decimal with more digits than a double keeps stays exact too.
        let row = json_row(r#"{"amount": 12345678901234567.89}"#, &types()).unwrap();
        assert_eq!(row["amount"], json!("12345678901234567.89"));
    }

    /// What a double carries exactly stays a JSON number, and only the top-level values of
    /// integer and numeric columns are touched.
    #[test]
    fn row_numbers_a_double_carries_stay_numbers() {
        let row = json_row(
            r#"{"big": 12, "amount": 0.5, "score": 123456789012345678901,
                "details": {"big": 123456789012345678901}, "name": "x", "other": -1.5e3}"#,
            &types(),
        )
        .unwrap();
        assert_eq!(row["big"], json!(12));
        assert_eq!(row["amount"], json!(0.5));
        assert!(row["score"].is_f64(), "a float column takes numbers");
        assert!(row["details"]["big"].is_number(), "jsonb keeps a number");
        assert_eq!(row["name"], json!("x"));
        assert_eq!(row["other"], json!(-1500.0));
    }

    /// The literal is found by member name however the JSON is written: escaped names,
    /// strings that look like JSON, nested values, repeated names (the last one counts, as
    /// serde_json keeps it).
    #[test]
    fn row_literals_are_matched_to_their_member() {
        let text = r#" { "n\"ote": "{\"big\": 1, \"amount\": 2}, [", "nested": [{"big": 3}, 4],
            "\u0062ig" : 123456789012345678901 ,"amount":1,"amount":98765432109876543210987} "#;
        let row = json_row(text, &types()).unwrap();
        assert_eq!(row["big"], json!("123456789012345678901"));
        assert_eq!(row["amount"], json!("98765432109876543210987"));
        let row = json_row(r#"{"big": 123456789012345678901, "big": 7}"#, &types()).unwrap();
        assert_eq!(row["big"], json!(7));
        let row = json_row(r#"{"big": 123456789012345678901, "big": "7"}"#, &types()).unwrap();
        assert_eq!(row["big"], json!("7"));
        let row = json_row(r#"{"名前": "値", "big": 123456789012345678901}"#, &types()).unwrap();
        assert_eq!(row["big"], json!("123456789012345678901"));
    }

    #[test]
    fn rows_that_are_not_json_objects_are_refused() {
        let e = json_row("{bad", &types()).unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
        let e = json_row("[1]", &types()).unwrap_err();
        assert!(e.contains("expected a JSON object"), "{e}");
    }
}
