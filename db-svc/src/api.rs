//! The `omnibus.db.v1.DatabaseService` gRPC edge: converts each request into an
//! [`Operation`], hands it to the [`Executor`], and converts the output back. No SQL here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_server::{DatabaseService, DatabaseServiceServer};
use svc_kit::Shutdown;
use tokio_stream::StreamExt;
use tonic::codegen::BoxFuture;
use tonic::{Request, Response, Status};

use crate::error::DbError;
use crate::executor::{ExecContext, Executor};
use crate::ops::{
    self, CountSpec, Criteria, DeleteSpec, Filter, InsertSpec, Op, OpOutput, Operation, OrderBy,
    QuerySpec, RawSpec, UpdateSpec, UpsertSpec,
};
use crate::values::{input_json, input_object};
use crate::wire::Encoded;

/// Default and maximum rows per StreamQuery message.
const DEFAULT_BATCH: u32 = 500;
const MAX_BATCH: u32 = 10_000;

pub struct DatabaseApi {
    executor: Executor,
    shutdown: Shutdown,
}

impl DatabaseApi {
    pub fn new(executor: Executor, shutdown: Shutdown) -> Self {
        Self { executor, shutdown }
    }
}

/// The caller's deadline from the `grpc-timeout` header of a request (see
/// [`svc_kit::deadline::parse_grpc_timeout`]).
pub fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    svc_kit::deadline::parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)
}

/// Time left until the request's deadline: the one the server's layer set from the call's
/// arrival (the shorter of `grpc-timeout` and `--request-timeout`), else, for a request that
/// did not come through it (the bus's), its `grpc-timeout`.
pub fn time_left<T>(request: &Request<T>) -> Option<Duration> {
    match request.extensions().get::<svc_kit::deadline::Deadline>() {
        Some(deadline) => Some(deadline.time_left()),
        None => grpc_timeout(request.metadata()),
    }
}

fn context<T>(request: &Request<T>, request_id: &str) -> ExecContext {
    ExecContext::within(
        time_left(request),
        (!request_id.is_empty()).then(|| request_id.to_string()),
    )
}

/// Converts a proto filter tree; `path` names it in field errors.
pub fn filter_from_proto(filter: &pb::Filter, path: &str) -> Result<Filter, DbError> {
    filter_node(filter, path, false)
}

/// A node of a filter tree. An empty filter (no kind) or an empty `all` / `any` list means
/// "no filter" only as the whole tree: nested, it would be a constant (TRUE or FALSE) that
/// turns the tree into something else than it reads - `any: [{}, c]` holds for every row,
/// yet counts as a condition for the Update / Delete guard. So it is refused there.
fn filter_node(filter: &pb::Filter, path: &str, nested: bool) -> Result<Filter, DbError> {
    use pb::filter::Kind;
    let empty_list = matches!(
        &filter.kind,
        Some(Kind::All(l) | Kind::Any(l)) if l.filters.is_empty()
    );
    if nested && (filter.kind.is_none() || empty_list) {
        return Err(DbError::field(
            path,
            "an empty filter (no condition, or an empty all / any list) inside a filter tree \
             is not allowed: it is a constant TRUE or FALSE; leave it out",
        ));
    }
    Ok(match &filter.kind {
        None => Filter::All(Vec::new()),
        Some(Kind::Condition(c)) => {
            let op = match pb::Operator::try_from(c.op).unwrap_or(pb::Operator::Unspecified) {
                pb::Operator::Unspecified => {
                    return Err(DbError::field(
                        format!("{path}.condition.op"),
                        "an operator is required (e.g. OPERATOR_EQ)",
                    ));
                }
                pb::Operator::Eq => Op::Eq,
                pb::Operator::Neq => Op::Neq,
                pb::Operator::Gt => Op::Gt,
                pb::Operator::Gte => Op::Gte,
                pb::Operator::Lt => Op::Lt,
                pb::Operator::Lte => Op::Lte,
                pb::Operator::In => Op::In,
                pb::Operator::NotIn => Op::NotIn,
                pb::Operator::Like => Op::Like,
                pb::Operator::Ilike => Op::ILike,
                pb::Operator::IsNull => Op::IsNull,
                pb::Operator::IsNotNull => Op::IsNotNull,
                pb::Operator::Contains => Op::Contains,
            };
            Filter::Condition {
                column: c.column.clone(),
                op,
                value: match &c.value {
                    Some(v) => input_json(v, &format!("{path}.condition.value"))?,
                    None => serde_json::Value::Null,
                },
            }
        }
        Some(Kind::All(list)) => Filter::All(filter_list(list, &format!("{path}.all"))?),
        Some(Kind::Any(list)) => Filter::Any(filter_list(list, &format!("{path}.any"))?),
        Some(Kind::Negate(inner)) => Filter::Not(Box::new(filter_node(
            inner,
            &format!("{path}.negate"),
            true,
        )?)),
    })
}

fn filter_list(list: &pb::FilterList, path: &str) -> Result<Vec<Filter>, DbError> {
    list.filters
        .iter()
        .enumerate()
        .map(|(i, f)| filter_node(f, &format!("{path}.filters[{i}]"), true))
        .collect()
}

/// The `where` shorthand and the filter tree of a request.
fn criteria(
    r#where: Option<&prost_types::Struct>,
    filter: Option<&pb::Filter>,
) -> Result<Criteria, DbError> {
    Ok(Criteria {
        equals: match r#where {
            Some(w) => input_object(w, "where")?,
            None => Default::default(),
        },
        filter: match filter.filter(|f| f.kind.is_some()) {
            Some(f) => Some(filter_from_proto(f, "filter")?),
            None => None,
        },
    })
}

fn rows_from_proto(rows: &[prost_types::Struct]) -> Result<Vec<ops::JsonRow>, Status> {
    rows.iter()
        .enumerate()
        .map(|(i, r)| input_object(r, &format!("rows[{i}]")).map_err(Status::from))
        .collect()
}

pub fn query_spec(q: &pb::QueryRequest) -> Result<QuerySpec, DbError> {
    let order_by = q
        .order_by
        .iter()
        .map(|o| OrderBy {
            column: o.column.clone(),
            direction: match pb::Direction::try_from(o.direction) {
                Ok(pb::Direction::Desc) => ops::Direction::Desc,
                _ => ops::Direction::Asc,
            },
            nulls: match pb::Nulls::try_from(o.nulls) {
                Ok(pb::Nulls::First) => ops::Nulls::First,
                Ok(pb::Nulls::Last) => ops::Nulls::Last,
                _ => ops::Nulls::Default,
            },
        })
        .collect();
    Ok(QuerySpec {
        table: q.table.clone(),
        columns: q.columns.clone(),
        criteria: criteria(q.r#where.as_ref(), q.filter.as_ref())?,
        order_by,
        limit: q.limit.map(u64::from),
        offset: q.offset,
        include_total: q.include_total,
    })
}

type Rpc<T> = Result<Response<T>, Status>;
type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl DatabaseApi {
    async fn run(&self, op: Operation, ctx: ExecContext) -> Result<OpOutput, Status> {
        self.executor.execute(op, &ctx).await.map_err(Status::from)
    }
}

#[tonic::async_trait]
impl DatabaseService for DatabaseApi {
    async fn query(&self, request: Request<pb::QueryRequest>) -> Rpc<pb::QueryResponse> {
        let ctx = context(&request, "");
        let q = request.into_inner();
        let spec = query_spec(&q).map_err(Status::from)?;
        let out = self
            .executor
            .execute(Operation::Query(spec), &ctx)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::QueryResponse {
            rows: out.rows,
            total: out.total,
        }))
    }

    async fn stream_query(
        &self,
        request: Request<pb::StreamQueryRequest>,
    ) -> Rpc<StreamOf<pb::StreamQueryResponse>> {
        // Only the caller's deadline bounds a stream's statement: `--request-timeout` bounds
        // the start of a stream, not its messages (the layer enforces that part).
        let timeout = grpc_timeout(request.metadata());
        let r = request.into_inner();
        let q = r.query.unwrap_or_default();
        let batch = match r.batch_size {
            0 => DEFAULT_BATCH,
            n if n > MAX_BATCH => {
                return Err(DbError::field(
                    "batch_size",
                    format!("at most {MAX_BATCH} rows per message"),
                )
                .into());
            }
            n => n,
        };
        let spec = query_spec(&q).map_err(|e| Status::from(e.within("query.")))?;
        let rx = self
            .executor
            .stream(spec, batch as usize, timeout, self.shutdown.clone())
            .await
            // The query sits in the request's `query` field: name its fields so.
            .map_err(|e| Status::from(e.within("query.")))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|batch| {
            batch
                .map(|rows| pb::StreamQueryResponse { rows })
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn insert(&self, request: Request<pb::InsertRequest>) -> Rpc<pb::InsertResponse> {
        let ctx = context(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let out = self
            .run(
                Operation::Insert(InsertSpec {
                    table: r.table,
                    rows: rows_from_proto(&r.rows)?,
                    count_only: r.count_only,
                }),
                ctx,
            )
            .await?;
        Ok(Response::new(pb::InsertResponse {
            rows: out.rows,
            affected: out.affected,
            replayed: out.replayed,
        }))
    }

    async fn update(&self, request: Request<pb::UpdateRequest>) -> Rpc<pb::UpdateResponse> {
        let ctx = context(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let criteria = criteria(r.r#where.as_ref(), r.filter.as_ref()).map_err(Status::from)?;
        let op = Operation::Update(UpdateSpec {
            table: r.table.clone(),
            criteria,
            set: match &r.set {
                Some(s) => input_object(s, "set").map_err(Status::from)?,
                None => Default::default(),
            },
            max_affected: r.max_affected,
            count_only: r.count_only,
        });
        let out = self
            .executor
            .execute(op, &ctx)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::UpdateResponse {
            rows: out.rows,
            affected: out.affected,
            replayed: out.replayed,
        }))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Rpc<pb::DeleteResponse> {
        let ctx = context(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let criteria = criteria(r.r#where.as_ref(), r.filter.as_ref()).map_err(Status::from)?;
        let op = Operation::Delete(DeleteSpec {
            table: r.table.clone(),
            criteria,
            max_affected: r.max_affected,
            count_only: r.count_only,
        });
        let out = self
            .executor
            .execute(op, &ctx)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::DeleteResponse {
            rows: out.rows,
            affected: out.affected,
            replayed: out.replayed,
        }))
    }

    async fn upsert(&self, request: Request<pb::UpsertRequest>) -> Rpc<pb::UpsertResponse> {
        let ctx = context(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let out = self
            .run(
                Operation::Upsert(UpsertSpec {
                    table: r.table,
                    rows: rows_from_proto(&r.rows)?,
                    conflict_columns: r.conflict_columns,
                    update_columns: r.update_columns,
                    ignore_duplicates: r.ignore_duplicates,
                    count_only: r.count_only,
                }),
                ctx,
            )
            .await?;
        Ok(Response::new(pb::UpsertResponse {
            rows: out.rows,
            affected: out.affected,
            replayed: out.replayed,
        }))
    }

    async fn count(&self, request: Request<pb::CountRequest>) -> Rpc<pb::CountResponse> {
        let ctx = context(&request, "");
        let r = request.into_inner();
        let criteria = criteria(r.r#where.as_ref(), r.filter.as_ref()).map_err(Status::from)?;
        let out = self
            .executor
            .execute(
                Operation::Count(CountSpec {
                    table: r.table.clone(),
                    criteria,
                }),
                &ctx,
            )
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::CountResponse {
            count: out.affected,
        }))
    }

    async fn execute_raw(
        &self,
        request: Request<pb::ExecuteRawRequest>,
    ) -> Rpc<pb::ExecuteRawResponse> {
        let ctx = context(&request, &request.get_ref().request_id);
        let r = request.into_inner();
        let out = self
            .run(
                Operation::Raw(RawSpec {
                    sql: r.sql,
                    params: r
                        .params
                        .iter()
                        .enumerate()
                        .map(|(i, p)| input_json(p, &format!("params[{i}]")))
                        .collect::<Result<_, _>>()?,
                    page: Default::default(),
                }),
                ctx,
            )
            .await?;
        Ok(Response::new(pb::ExecuteRawResponse {
            rows: out.rows,
            affected: out.affected,
            replayed: out.replayed,
        }))
    }

    async fn list_tables(
        &self,
        _request: Request<pb::ListTablesRequest>,
    ) -> Rpc<pb::ListTablesResponse> {
        Ok(Response::new(pb::ListTablesResponse {
            tables: self.executor.catalog().served().to_vec(),
        }))
    }

    async fn describe_table(
        &self,
        request: Request<pb::DescribeTableRequest>,
    ) -> Rpc<pb::DescribeTableResponse> {
        let time_left = time_left(&request);
        let name = request.into_inner().table;
        let info = self
            .executor
            .describe(&name, time_left)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::DescribeTableResponse {
            table: Some(pb::TableDescription {
                name: info.name.clone(),
                columns: info
                    .columns
                    .iter()
                    .map(|c| pb::ColumnDescription {
                        name: c.name.clone(),
                        sql_type: c.sql_type.clone(),
                        json_type: c.ty.json_type().to_string(),
                        nullable: c.nullable,
                        default_value: c.default.clone(),
                    })
                    .collect(),
                primary_key: info.primary_key.clone(),
            }),
        }))
    }
}

/// Field number of `rows` in `QueryResponse` (checked by a test against the generated type).
const QUERY_ROWS_FIELD: u8 = 1;

impl DatabaseApi {
    /// `Query`, with the rows encoded straight from PostgreSQL into the response bytes
    /// ([`crate::wire`]): what [`DatabaseRoutes`] serves. Same checks, errors and result as
    /// [`DatabaseService::query`], which the bus uses.
    pub async fn query_encoded(&self, request: Request<pb::QueryRequest>) -> Rpc<Encoded> {
        let ctx = context(&request, "");
        let spec = query_spec(request.get_ref()).map_err(Status::from)?;
        let (rows, total) = self
            .executor
            .query_encoded(spec, &ctx, QUERY_ROWS_FIELD)
            .await
            .map_err(Status::from)?;
        let head = pb::QueryResponse {
            rows: Vec::new(),
            total,
        };
        Ok(Response::new(Encoded::with_rows(&head, rows)))
    }
}

/// The `DatabaseService` as served over gRPC: the generated server, except that `Query` is
/// answered by [`DatabaseApi::query_encoded`] (identical bytes on the wire, without building
/// a `Struct` per row).
pub type DatabaseRoutes = svc_kit::server::WithMethod<
    DatabaseServiceServer<DatabaseApi>,
    svc_kit::server::UnaryMethod<QueryEncoded, pb::QueryRequest>,
>;

const QUERY_PATH: &str = "/omnibus.db.v1.DatabaseService/Query";

/// The generated server and the encoded `Query` in front of it.
pub fn routes(api: Arc<DatabaseApi>, args: &svc_kit::ServerArgs) -> DatabaseRoutes {
    svc_kit::server::WithMethod::new(
        svc_kit::grpc_service!(DatabaseServiceServer::from_arc(api.clone()), args),
        svc_kit::server::UnaryMethod::new(QUERY_PATH, QueryEncoded(api)),
        args,
    )
}

#[derive(Clone)]
pub struct QueryEncoded(Arc<DatabaseApi>);

impl tonic::server::UnaryService<pb::QueryRequest> for QueryEncoded {
    type Response = Encoded;
    type Future = BoxFuture<Response<Encoded>, Status>;

    fn call(&mut self, request: Request<pb::QueryRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.query_encoded(request).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layers_deadline_wins_over_the_header() {
        let mut request = Request::new(());
        assert_eq!(time_left(&request), None);
        request
            .metadata_mut()
            .insert("grpc-timeout", "30S".parse().unwrap());
        // A request that did not come through the layer (the bus's): its header.
        assert_eq!(time_left(&request), Some(Duration::from_secs(30)));
        // The layer's deadline counts from the call's arrival, `--request-timeout` included.
        request.extensions_mut().insert(svc_kit::deadline::Deadline(
            std::time::Instant::now() + Duration::from_secs(1),
        ));
        let left = time_left(&request).unwrap();
        assert!(left <= Duration::from_secs(1), "{left:?}");
    }

    #[test]
    fn the_longest_deadline_a_caller_can_send_does_not_overflow() {
        let longest = Duration::from_secs(99_999_999 * 3600);
        let ctx = ExecContext::within(Some(longest), None);
        assert!(
            ctx.time_left()
                .is_some_and(|left| left > Duration::from_secs(3600))
        );
        // Beyond what an Instant can hold: no deadline rather than a panic.
        assert!(
            ExecContext::within(Some(Duration::MAX), None)
                .deadline
                .is_none()
        );
    }

    #[test]
    fn where_and_filter_combine() {
        let w = crate::values::json_to_struct(
            serde_json::json!({"agent_name": "a", "duration_ms": null})
                .as_object()
                .unwrap(),
        );
        let f = pb::Filter {
            kind: Some(pb::filter::Kind::Condition(pb::Condition {
                column: "x".into(),
                op: pb::Operator::Gt as i32,
                value: Some(crate::values::json_to_proto(&serde_json::json!(1))),
            })),
        };
        assert_eq!(criteria(Some(&w), Some(&f)).unwrap().conditions(), 3);
        assert_eq!(
            criteria(None, Some(&pb::Filter::default())).unwrap(),
            Criteria::default()
        );
        let bad = pb::Filter {
            kind: Some(pb::filter::Kind::Condition(pb::Condition::default())),
        };
        let err = criteria(None, Some(&bad)).unwrap_err();
        assert_eq!(err.violations()[0].field, "filter.condition.op");
    }

    #[test]
    fn empty_filters_inside_a_tree_are_refused() {
        use pb::filter::Kind;
        let cond = pb::Filter {
            kind: Some(Kind::Condition(pb::Condition {
                column: "agent_name".into(),
                op: pb::Operator::Eq as i32,
                value: Some(crate::values::json_to_proto(&serde_json::json!("a"))),
            })),
        };
        let list = |filters: Vec<pb::Filter>| pb::FilterList { filters };
        let empty_all = pb::Filter {
            kind: Some(Kind::All(list(vec![]))),
        };
        for (tree, field) in [
            // `any: [{}, c]` would hold for every row.
            (
                Kind::Any(list(vec![pb::Filter::default(), cond.clone()])),
                "filter.any.filters[0]",
            ),
            (
                Kind::Any(list(vec![cond.clone(), empty_all.clone()])),
                "filter.any.filters[1]",
            ),
            (
                Kind::Negate(Box::new(pb::Filter {
                    kind: Some(Kind::Any(list(vec![]))),
                })),
                "filter.negate",
            ),
        ] {
            let err = criteria(None, Some(&pb::Filter { kind: Some(tree) })).unwrap_err();
            assert_eq!(err.violations()[0].field, field, "{err}");
        }
        // As the whole tree, empty still means "no filter".
        assert_eq!(criteria(None, Some(&empty_all)).unwrap().conditions(), 0);
        let nested = pb::Filter {
            kind: Some(Kind::All(list(vec![cond.clone(), cond]))),
        };
        assert_eq!(criteria(None, Some(&nested)).unwrap().conditions(), 2);
    }

    /// A mistyped path would silently leave `Query` to the generated server.
    #[test]
    fn the_encoded_query_is_a_unary_method_of_the_service() {
        assert_eq!(
            omnibus_proto::method_streaming(QUERY_PATH),
            Some((false, false))
        );
    }

    #[test]
    fn query_rows_field_number_matches_the_generated_type() {
        let one_empty_row = pb::QueryResponse {
            rows: vec![prost_types::Struct::default()],
            total: None,
        };
        assert_eq!(
            prost::Message::encode_to_vec(&one_empty_row),
            vec![QUERY_ROWS_FIELD << 3 | 2, 0]
        );
    }
}
