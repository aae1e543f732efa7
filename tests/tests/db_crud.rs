//! db-svc CRUD end to end, against the real PostgreSQL: every operation, every filter operator,
//! the type mapping both ways, the catalog (ListTables / DescribeTable / a column added at run
//! time), timestamps filled automatically.

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{
    DbSvc, action, error_details, error_metadata, from_struct, rows_json, streamed_rows, to_struct,
    to_value,
};
use serde_json::{Value as Json, json};

fn cond(column: &str, op: pb::Operator, value: Option<Json>) -> pb::Filter {
    pb::Filter {
        kind: Some(pb::filter::Kind::Condition(pb::Condition {
            column: column.into(),
            op: op as i32,
            value: value.map(to_value),
        })),
    }
}

fn all(filters: Vec<pb::Filter>) -> pb::Filter {
    pb::Filter {
        kind: Some(pb::filter::Kind::All(pb::FilterList { filters })),
    }
}

fn any(filters: Vec<pb::Filter>) -> pb::Filter {
    pb::Filter {
        kind: Some(pb::filter::Kind::Any(pb::FilterList { filters })),
    }
}

fn negate(filter: pb::Filter) -> pb::Filter {
    pb::Filter {
        kind: Some(pb::filter::Kind::Negate(Box::new(filter))),
    }
}

/// The rows of `query` as `Query`, `StreamQuery` (in batches of 2) and `ExecuteRaw` (`sql`,
/// which selects the same) return them: the three read paths, each decoding on its own.
async fn read_every_way(s: &DbSvc, query: pb::QueryRequest, sql: &str) -> [Vec<Json>; 3] {
    let mut client = s.client.clone();
    let rows = client.query(query.clone()).await.unwrap().into_inner().rows;
    let mut stream = client
        .stream_query(pb::StreamQueryRequest {
            query: Some(query),
            batch_size: 2,
        })
        .await
        .unwrap()
        .into_inner();
    let streamed = rows_json(&streamed_rows(&mut stream).await);
    let raw = client
        .execute_raw(pb::ExecuteRawRequest {
            sql: sql.into(),
            params: vec![],
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    [rows_json(&rows), streamed, rows_json(&raw.rows)]
}

async fn insert(s: &mut DbSvc, table: &str, rows: Vec<Json>) -> Vec<Json> {
    let reply = s
        .client
        .insert(pb::InsertRequest {
            table: table.into(),
            rows: rows.into_iter().map(to_struct).collect(),
            ..Default::default()
        })
        .await
        .expect("insert")
        .into_inner();
    rows_json(&reply.rows)
}

/// Names of agent_actions rows matching `filter`, sorted.
async fn names_matching(s: &mut DbSvc, filter: pb::Filter) -> Vec<String> {
    let reply = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            filter: Some(filter),
            order_by: vec![pb::OrderBy {
                column: "agent_name".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    rows_json(&reply.rows)
        .iter()
        .map(|r| r["agent_name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn insert_query_update_delete_count_round_trip() {
    let mut s = DbSvc::start(&[]).await;

    // One row: defaults filled, created_at set, the row returned typed.
    let inserted = insert(&mut s, "agent_actions", vec![action("alpha")]).await;
    assert_eq!(inserted.len(), 1);
    let row = &inserted[0];
    assert!(uuid::Uuid::parse_str(row["id"].as_str().unwrap()).is_ok());
    assert_eq!(row["debug_mode"], json!(true));
    assert_eq!(row["action_details"], json!({}));
    assert_eq!(row["duration_ms"], Json::Null);
    let created = row["created_at"].as_str().unwrap();
    let created = chrono::DateTime::parse_from_rfc3339(created).expect("RFC 3339 created_at");
    assert!((chrono::Utc::now() - created.to_utc()).num_seconds().abs() < 60);

    // Many rows in one statement, count_only.
    let reply = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: ["beta", "gamma", "delta"]
                .iter()
                .map(|n| to_struct(action(n)))
                .collect(),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 3);
    assert!(reply.rows.is_empty());

    // Query with the where shorthand, projection, ordering, limit/offset and total.
    let reply = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            columns: vec!["agent_name".into()],
            order_by: vec![pb::OrderBy {
                column: "agent_name".into(),
                direction: pb::Direction::Desc as i32,
                nulls: pb::Nulls::Last as i32,
            }],
            limit: Some(2),
            offset: 1,
            include_total: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&reply.rows),
        vec![
            json!({"agent_name": "delta"}),
            json!({"agent_name": "beta"})
        ]
    );
    assert_eq!(reply.total, Some(4));
    let reply = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "alpha"}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rows_json(&reply.rows), inserted);
    assert_eq!(reply.total, None);

    // Update: set + updated rows returned.
    let reply = s
        .client
        .update(pb::UpdateRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "beta"}))),
            set: Some(to_struct(
                json!({"duration_ms": 42, "action_details": {"k": [1, "x"]}}),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 1);
    let updated = from_struct(&reply.rows[0]);
    assert_eq!(updated["duration_ms"], json!(42.0));
    assert_eq!(updated["action_details"], json!({"k": [1.0, "x"]}));

    // Count with a filter.
    let count = s
        .client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            filter: Some(cond("duration_ms", pb::Operator::IsNotNull, None)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 1);

    // Delete returns the deleted rows.
    let reply = s
        .client
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            filter: Some(cond(
                "agent_name",
                pb::Operator::In,
                Some(json!(["gamma", "delta"])),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 2);
    assert_eq!(reply.rows.len(), 2);
    let left = s.count_all("agent_actions").await;
    assert_eq!(left, 2);
}

#[tokio::test]
async fn every_filter_operator() {
    let mut s = DbSvc::start(&[]).await;
    let mut rows = Vec::new();
    for (name, duration, details) in [
        ("a1", Some(10), json!({"tool": "read", "tags": ["x", "y"]})),
        ("a2", Some(20), json!({"tool": "write"})),
        ("B3", Some(30), json!({"tool": "read"})),
        ("b4", None, json!({})),
    ] {
        let mut r = action(name);
        r["duration_ms"] = json!(duration);
        r["action_details"] = details;
        rows.push(r);
    }
    insert(&mut s, "agent_actions", rows).await;
    use pb::Operator as O;
    let cases: Vec<(pb::Filter, Vec<&str>)> = vec![
        (cond("agent_name", O::Eq, Some(json!("a1"))), vec!["a1"]),
        (
            cond("agent_name", O::Neq, Some(json!("a1"))),
            vec!["B3", "a2", "b4"],
        ),
        (cond("duration_ms", O::Gt, Some(json!(20))), vec!["B3"]),
        (
            cond("duration_ms", O::Gte, Some(json!(20))),
            vec!["B3", "a2"],
        ),
        (cond("duration_ms", O::Lt, Some(json!(20))), vec!["a1"]),
        (
            cond("duration_ms", O::Lte, Some(json!(20))),
            vec!["a1", "a2"],
        ),
        (
            cond("duration_ms", O::In, Some(json!([10, 30, 99]))),
            vec!["B3", "a1"],
        ),
        (
            cond("duration_ms", O::NotIn, Some(json!([10, 30]))),
            vec!["a2"],
        ),
        (cond("agent_name", O::In, Some(json!([]))), vec![]),
        // Empty lists keep the NULL rule of the others: a NULL column matches neither.
        (
            cond("duration_ms", O::NotIn, Some(json!([]))),
            vec!["B3", "a1", "a2"],
        ),
        (
            negate(cond("duration_ms", O::In, Some(json!([])))),
            vec!["B3", "a1", "a2"],
        ),
        (
            cond("agent_name", O::Like, Some(json!("a%"))),
            vec!["a1", "a2"],
        ),
        (
            cond("agent_name", O::Ilike, Some(json!("b%"))),
            vec!["B3", "b4"],
        ),
        (cond("duration_ms", O::IsNull, None), vec!["b4"]),
        (
            cond("duration_ms", O::IsNotNull, None),
            vec!["B3", "a1", "a2"],
        ),
        (
            cond("action_details", O::Contains, Some(json!({"tool": "read"}))),
            vec!["B3", "a1"],
        ),
        (
            cond("action_details", O::Contains, Some(json!({"tags": ["y"]}))),
            vec!["a1"],
        ),
        (
            all(vec![
                cond("agent_name", O::Like, Some(json!("a%"))),
                cond("duration_ms", O::Gt, Some(json!(15))),
            ]),
            vec!["a2"],
        ),
        (
            any(vec![
                cond("agent_name", O::Eq, Some(json!("a1"))),
                cond("duration_ms", O::IsNull, None),
            ]),
            vec!["a1", "b4"],
        ),
        (
            negate(any(vec![
                cond("agent_name", O::Eq, Some(json!("a1"))),
                cond("duration_ms", O::IsNull, None),
            ])),
            vec!["B3", "a2"],
        ),
        (any(vec![]), vec![]),
        (all(vec![]), vec!["B3", "a1", "a2", "b4"]),
    ];
    for (filter, want) in cases {
        let got = names_matching(&mut s, filter.clone()).await;
        assert_eq!(got, want, "filter {filter:?}");
    }
}

#[tokio::test]
async fn type_mapping_both_ways() {
    let mut s = DbSvc::start(&[]).await;
    let correlation = uuid::Uuid::new_v4().to_string();
    let node_id = uuid::Uuid::new_v4().to_string();
    // timestamptz: an offset is converted; numeric keeps its decimal value; jsonb nests.
    let node = json!({
        "id": node_id,
        "pattern_id": "p-1",
        "pattern_name": "retry",
        "pattern_type": "code",
        "pattern_version": "1.0.0",
        "lineage_id": uuid::Uuid::new_v4().to_string(),
        "generation": 3,
        // A 17-digit double (as Python's repr writes it) comes back exactly, not 1 ULP off.
        "pattern_data": {"a": {"b": [1, 2.5, null, true, "s", 21.489705265908874]}},
        "metadata": null,
        "correlation_id": correlation,
        "created_at": "2024-01-31T12:00:00.123456+02:00",
        "language": "rust",
    });
    let back = insert(&mut s, "pattern_lineage_nodes", vec![node.clone()]).await;
    let inserted_node = back[0].clone();
    let back = &back[0];
    assert_eq!(back["id"], json!(node_id));
    assert_eq!(back["generation"], json!(3.0));
    let pattern_data = json!({"a": {"b": [1.0, 2.5, null, true, "s", 21.489705265908874]}});
    // (Query's own row encoding gives it back the same: the whole row is compared below.)
    assert_eq!(back["pattern_data"], pattern_data);
    assert_eq!(back["metadata"], Json::Null);
    assert_eq!(back["created_at"], json!("2024-01-31T10:00:00.123456Z"));

    let decision = json!({
        "correlation_id": correlation,
        "selected_agent": "coder",
        "confidence_score": 0.9512,
        "trigger_confidence": "0.25",
        "alternatives": [{"agent": "x", "score": 0.1}],
        "routing_time_ms": 12,
        "cache_hit": true,
        "created_at": "2024-02-01T00:00:00Z",
    });
    let back = insert(&mut s, "agent_routing_decisions", vec![decision]).await;
    let back = &back[0];
    assert_eq!(back["confidence_score"], json!(0.9512));
    assert_eq!(back["trigger_confidence"], json!(0.25));
    assert_eq!(back["alternatives"], json!([{"agent": "x", "score": 0.1}]));
    assert_eq!(back["cache_hit"], json!(true));
    assert_eq!(back["selection_validated"], json!(false));
    // timestamp without time zone: UTC, printed RFC 3339 with Z.
    assert_eq!(back["created_at"], json!("2024-02-01T00:00:00Z"));

    // Filters compare typed values: timestamps and numerics.
    let count = s
        .client
        .count(pb::CountRequest {
            table: "agent_routing_decisions".into(),
            filter: Some(all(vec![
                cond(
                    "created_at",
                    pb::Operator::Gte,
                    Some(json!("2024-01-31T23:00:00-02:00")),
                ),
                cond("confidence_score", pb::Operator::Gt, Some(json!(0.95))),
            ])),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 0, "2024-02-01T01:00Z is after the row's created_at");
    let count = s
        .client
        .count(pb::CountRequest {
            table: "agent_routing_decisions".into(),
            r#where: Some(to_struct(json!({"correlation_id": correlation}))),
            filter: Some(cond(
                "created_at",
                pb::Operator::Lt,
                Some(json!("2024-02-01T00:00:01Z")),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, 1);

    // What the database holds is what was sent.
    let mut conn = s.sql().await;
    let (score, ts): (String, String) = sqlx::query_as(
        "SELECT confidence_score::text, to_char(created_at, 'YYYY-MM-DD HH24:MI:SS') \
         FROM agent_routing_decisions",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(score, "0.9512");
    assert_eq!(ts, "2024-02-01 00:00:00");

    // Query encodes rows straight into the response bytes; StreamQuery and Insert build
    // `Struct`s. All three must give the very same rows, for every type above.
    for table in ["pattern_lineage_nodes", "agent_routing_decisions"] {
        let query = pb::QueryRequest {
            table: table.into(),
            r#where: Some(to_struct(json!({"correlation_id": correlation}))),
            include_total: true,
            ..Default::default()
        };
        let queried = s.client.query(query.clone()).await.unwrap().into_inner();
        assert_eq!(queried.total, Some(1), "{table}");
        let mut stream = s
            .client
            .stream_query(pb::StreamQueryRequest {
                query: Some(pb::QueryRequest {
                    include_total: false,
                    ..query
                }),
                batch_size: 10,
            })
            .await
            .unwrap()
            .into_inner();
        let streamed = streamed_rows(&mut stream).await;
        assert_eq!(queried.rows.len(), 1, "{table}");
        assert_eq!(
            queried.rows, streamed,
            "{table}: Query and StreamQuery rows differ"
        );
    }
    let node_rows = s
        .client
        .query(pb::QueryRequest {
            table: "pattern_lineage_nodes".into(),
            r#where: Some(to_struct(json!({"id": node_id}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows_json(&node_rows)[0], inserted_node);
}

#[tokio::test]
async fn upsert_by_primary_key_by_unique_columns_and_ignoring_duplicates() {
    let mut s = DbSvc::start(&[]).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut row = action("first");
    row["id"] = json!(id);
    let reply = s
        .client
        .upsert(pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(row.clone())],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 1);
    row["agent_name"] = json!("second");
    let reply = s
        .client
        .upsert(pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(row.clone())],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_struct(&reply.rows[0])["agent_name"], json!("second"));
    // ignore_duplicates keeps the stored row and returns nothing for it.
    row["agent_name"] = json!("third");
    let reply = s
        .client
        .upsert(pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(row.clone())],
            ignore_duplicates: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 0);
    // update_columns limits what changes.
    row["agent_name"] = json!("fourth");
    row["action_type"] = json!("changed");
    let reply = s
        .client
        .upsert(pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(row.clone())],
            update_columns: vec!["action_type".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let stored = from_struct(&reply.rows[0]);
    assert_eq!(stored["agent_name"], json!("second"));
    assert_eq!(stored["action_type"], json!("changed"));

    // Conflict on a unique constraint other than the primary key.
    let node = |version: &str, name: &str| {
        json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "pattern_id": "p", "pattern_name": name, "pattern_type": "t",
            "pattern_version": version, "lineage_id": uuid::Uuid::new_v4().to_string(),
            "generation": 1, "pattern_data": {}, "correlation_id": uuid::Uuid::new_v4().to_string(),
        })
    };
    for name in ["one", "two"] {
        s.client
            .upsert(pb::UpsertRequest {
                table: "pattern_lineage_nodes".into(),
                rows: vec![to_struct(node("1", name))],
                conflict_columns: vec!["pattern_id".into(), "pattern_version".into()],
                update_columns: vec!["pattern_name".into()],
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let reply = s
        .client
        .query(pb::QueryRequest {
            table: "pattern_lineage_nodes".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.rows.len(), 1);
    assert_eq!(from_struct(&reply.rows[0])["pattern_name"], json!("two"));
}

#[tokio::test]
async fn catalog_lists_describes_and_learns_new_columns() {
    let mut s = DbSvc::start(&[]).await;
    let tables = s
        .client
        .list_tables(pb::ListTablesRequest {})
        .await
        .unwrap()
        .into_inner()
        .tables;
    assert_eq!(
        tables,
        vec![
            "agent_actions",
            "agent_manifest_injections",
            "agent_routing_decisions",
            "agent_transformation_events",
            "error_events",
            "pattern_lineage_edges",
            "pattern_lineage_nodes",
        ]
    );
    let table = s
        .client
        .describe_table(pb::DescribeTableRequest {
            table: "agent_routing_decisions".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    assert_eq!(table.primary_key, vec!["id"]);
    let col = |name: &str| {
        table
            .columns
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .clone()
    };
    assert_eq!(col("confidence_score").sql_type, "numeric(5,4)");
    assert_eq!(col("confidence_score").json_type, "number");
    assert!(!col("confidence_score").nullable);
    assert_eq!(
        col("id").default_value.as_deref(),
        Some("gen_random_uuid()")
    );
    assert_eq!(col("cache_hit").json_type, "boolean");
    assert_eq!(col("correlation_id").json_type, "string");
    assert_eq!(col("context_snapshot").json_type, "json");
    assert_eq!(table.columns[0].name, "id", "table order");

    // A column added behind db-svc's back works without a restart.
    let mut conn = s.sql().await;
    sqlx::query("ALTER TABLE error_events ADD COLUMN ticket_number integer")
        .execute(&mut conn)
        .await
        .unwrap();
    let back = insert(
        &mut s,
        "error_events",
        vec![json!({"error_type": "Timeout", "error_message": "slow", "ticket_number": 7})],
    )
    .await;
    assert_eq!(back[0]["ticket_number"], json!(7.0));
    assert_eq!(back[0]["severity"], json!("error"));
}

#[tokio::test]
async fn updated_at_is_maintained_on_a_configured_table() {
    // The served set is configuration: an extra table with updated_at.
    let mut s = DbSvc::start_with(
        "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL, \
             created_at timestamptz, updated_at timestamptz)",
        "notes,agent_actions",
    )
    .await;
    let row = insert(&mut s, "notes", vec![json!({"body": "x"})])
        .await
        .remove(0);
    assert!(row["created_at"].is_string(), "{row}");
    assert!(row["updated_at"].is_string(), "{row}");
    let mut conn = s.sql().await;
    // Age the row so the update's now() is visibly later.
    sqlx::query("UPDATE notes SET updated_at = updated_at - interval '1 hour'")
        .execute(&mut conn)
        .await
        .unwrap();
    let reply = s
        .client
        .update(pb::UpdateRequest {
            table: "notes".into(),
            r#where: Some(to_struct(json!({"id": row["id"]}))),
            set: Some(to_struct(json!({"body": "y"}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let updated = from_struct(&reply.rows[0]);
    assert_eq!(updated["created_at"], row["created_at"]);
    let parse = |v: &Json| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    assert!(parse(&updated["updated_at"]) >= parse(&row["updated_at"]));
    let tables = s
        .client
        .list_tables(pb::ListTablesRequest {})
        .await
        .unwrap()
        .into_inner()
        .tables;
    assert_eq!(tables, vec!["agent_actions", "notes"]);
}

#[tokio::test]
async fn stream_query_sends_every_row_in_batches() {
    let mut s = DbSvc::start(&[]).await;
    let mut conn = s.sql().await;
    sqlx::query(
        "INSERT INTO error_events (error_type, error_message, error_details) \
         SELECT 'E' || (g % 3), 'message ' || g, jsonb_build_object('n', g) \
         FROM generate_series(1, 2500) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let mut stream = s
        .client
        .stream_query(pb::StreamQueryRequest {
            query: Some(pb::QueryRequest {
                table: "error_events".into(),
                columns: vec!["error_details".into()],
                r#where: Some(to_struct(json!({"error_type": "E1"}))),
                ..Default::default()
            }),
            batch_size: 300,
        })
        .await
        .unwrap()
        .into_inner();
    let mut batches = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(batch) = stream.message().await.unwrap() {
        batches.push(batch.rows.len());
        for row in &batch.rows {
            seen.insert(from_struct(row)["error_details"]["n"].as_f64().unwrap() as i64);
        }
    }
    let want: std::collections::BTreeSet<i64> = (1..=2500).filter(|g| g % 3 == 1).collect();
    assert_eq!(seen, want);
    assert!(batches.iter().all(|b| *b <= 300), "{batches:?}");
    assert_eq!(batches.len(), want.len().div_ceil(300));

    // A limit applies to streams too; validation errors come back as the call's status.
    let mut stream = s
        .client
        .stream_query(pb::StreamQueryRequest {
            query: Some(pb::QueryRequest {
                table: "error_events".into(),
                limit: Some(10),
                ..Default::default()
            }),
            batch_size: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(streamed_rows(&mut stream).await.len(), 10);
    let err = s
        .client
        .stream_query(pb::StreamQueryRequest {
            query: Some(pb::QueryRequest {
                table: "error_events".into(),
                columns: vec!["nope".into()],
                ..Default::default()
            }),
            batch_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Field paths start at the request: the query is its `query` field.
    assert_eq!(error_details(&err).1, vec!["query.columns[0]"], "{err:?}");
}

/// The Rust client's typed rows (`DbClient::query_rows` + `decode_rows`) read the same values
/// the generic `Struct` rows carry, and a row that does not fit the type names row and column.
#[tokio::test]
async fn typed_rows_read_into_the_callers_struct() {
    #[derive(Debug, serde::Deserialize)]
    struct Action {
        id: uuid::Uuid,
        correlation_id: uuid::Uuid,
        agent_name: String,
        action_details: Option<Json>,
        debug_mode: Option<bool>,
        duration_ms: Option<i32>,
        created_at: chrono::DateTime<chrono::Utc>,
    }
    let mut s = DbSvc::start(&[]).await;
    let mut detailed = action("typed-b");
    detailed["action_details"] = json!({"file": "a.rs", "lines": [1, 2.5], "ok": true});
    detailed["debug_mode"] = json!(false);
    detailed["duration_ms"] = json!(-7);
    insert(
        &mut s,
        "agent_actions",
        vec![action("typed-a"), detailed, action("typed-c")],
    )
    .await;
    let request = pb::QueryRequest {
        table: "agent_actions".into(),
        order_by: vec![pb::OrderBy {
            column: "agent_name".into(),
            ..Default::default()
        }],
        include_total: true,
        ..Default::default()
    };
    let generic = rows_json(
        &s.client
            .query(request.clone())
            .await
            .expect("query")
            .into_inner()
            .rows,
    );
    let client = omnibus_client::db::DbClient::direct(s.svc.channel());
    let response = client.query_rows(request).await.expect("typed query");
    assert_eq!(response.total, Some(3));
    let typed: Vec<Action> = response.decode_rows().expect("rows fit Action");
    assert_eq!(typed.len(), 3);
    for (t, g) in typed.iter().zip(&generic) {
        assert_eq!(t.id.to_string(), g["id"]);
        assert_eq!(t.correlation_id.to_string(), g["correlation_id"]);
        assert_eq!(t.agent_name, g["agent_name"]);
        // (The generic helper reads every number as a float; jsonb is compared below.)
        assert_eq!(t.action_details.is_none(), g["action_details"].is_null());
        assert_eq!(
            t.debug_mode.map(Json::from).unwrap_or(Json::Null),
            g["debug_mode"]
        );
        assert_eq!(
            t.duration_ms
                .map(|n| json!(f64::from(n)))
                .unwrap_or(Json::Null),
            g["duration_ms"]
        );
        let generic_time: chrono::DateTime<chrono::Utc> =
            g["created_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(t.created_at, generic_time);
    }
    assert_eq!(typed[1].duration_ms, Some(-7));
    assert_eq!(typed[1].debug_mode, Some(false));
    assert_eq!(
        typed[1].action_details,
        Some(json!({"file": "a.rs", "lines": [1, 2.5], "ok": true}))
    );

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // only the error is looked at
    struct Wrong {
        agent_name: i64,
    }
    let err = response.decode_rows::<Wrong>().unwrap_err().to_string();
    assert!(
        err.starts_with("row 0: agent_name: invalid type: string \"typed-a\""),
        "{err}"
    );
}

/// A bigint outside ±(2^53 - 1) (where a double rounds, or is the rounding of another
/// integer) goes out as its decimal text, exactly, in generic rows and typed rows alike; it
/// comes back in, and filters, as that text. So does a numeric with more digits than a
/// double keeps.
#[tokio::test]
async fn bigints_beyond_doubles_round_trip_exactly() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE counters (id bigint PRIMARY KEY, n bigint, amount numeric(30,10))",
        "counters",
    )
    .await;
    let big = "9007199254740993"; // 2^53 + 1: a double would read 9007199254740992
    let back = insert(
        &mut s,
        "counters",
        vec![
            json!({"id": 1, "n": big, "amount": "1234567890123456789.012345678"}),
            json!({"id": 2, "n": 9_007_199_254_740_991i64 as f64, "amount": 0.5}),
            json!({"id": "-9223372036854775808", "n": null}),
        ],
    )
    .await;
    // As PostgreSQL prints it: the column's scale is 10.
    let exact_amount = "1234567890123456789.0123456780";
    assert_eq!(
        back[0],
        json!({"id": 1.0, "n": big, "amount": exact_amount})
    );
    assert_eq!(
        back[1],
        json!({"id": 2.0, "n": 9_007_199_254_740_991.0, "amount": 0.5})
    );
    assert_eq!(
        back[2],
        json!({"id": "-9223372036854775808", "n": null, "amount": null})
    );

    // What the database holds is the exact value.
    let mut conn = s.sql().await;
    let held: i64 = sqlx::query_scalar("SELECT n FROM counters WHERE id = 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(held, 9_007_199_254_740_993);

    // Query (rows encoded on the wire path) says the same; a filter takes the text.
    let request = pb::QueryRequest {
        table: "counters".into(),
        r#where: Some(to_struct(json!({"n": big}))),
        ..Default::default()
    };
    let rows = s
        .client
        .query(request.clone())
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(
        rows_json(&rows),
        vec![json!({"id": 1.0, "n": big, "amount": exact_amount})]
    );

    // Typed rows read both forms into i64.
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Counter {
        id: i64,
        n: Option<i64>,
        // Read as a double by choice: the text form rounds to it.
        amount: Option<f64>,
    }
    let client = omnibus_client::db::DbClient::direct(s.svc.channel());
    let typed: Vec<Counter> = client
        .query_rows(pb::QueryRequest {
            table: "counters".into(),
            order_by: vec![pb::OrderBy {
                column: "id".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .decode_rows()
        .unwrap();
    assert_eq!(
        typed,
        vec![
            Counter {
                id: i64::MIN,
                n: None,
                amount: None,
            },
            Counter {
                id: 1,
                n: Some(9_007_199_254_740_993),
                amount: Some(1_234_567_890_123_456_789.012_345_678),
            },
            Counter {
                id: 2,
                n: Some(9_007_199_254_740_991),
                amount: Some(0.5),
            },
        ]
    );

    // A double that may not be the integer meant is refused, naming the field: 2^53 is
    // what 9007199254740993 sent as a JSON number (grpcurl, any proto3 JSON client) becomes.
    for n in [1e17, 9_007_199_254_740_992.0] {
        let err = s
            .client
            .insert(pb::InsertRequest {
                table: "counters".into(),
                rows: vec![to_struct(json!({"id": 3, "n": n}))],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{n}: {err:?}");
        assert!(err.message().contains("decimal string"), "{err:?}");
        assert!(err.message().contains("n"), "{err:?}");
    }
    // A numeric with more digits than db-svc carries exactly is refused, not rounded.
    let err = s
        .client
        .insert(pb::InsertRequest {
            table: "counters".into(),
            rows: vec![to_struct(
                json!({"id": 3, "amount": "12345678901234567890.0123456789"}),
            )],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("significant digits"), "{err:?}");
}

/// Every value a `numeric` column holds reads back exactly: as a number when a double carries
/// it, else as PostgreSQL's own text (beyond 28 digits, NaN and infinities included).
#[tokio::test]
async fn numerics_read_back_exactly_whatever_their_size() {
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    {
        let mut conn = db.connect().await;
        sqlx::query("CREATE TABLE amounts (id int PRIMARY KEY, v numeric)")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO amounts SELECT g, CASE g \
               WHEN 1 THEN 'NaN' WHEN 2 THEN 'Infinity' WHEN 3 THEN '-Infinity' \
               WHEN 4 THEN 1e40 WHEN 5 THEN -0.000000000000000000000000000001 \
               WHEN 6 THEN 0.1000 WHEN 7 THEN 12345678901234567890.0123456789 \
               WHEN 8 THEN 0 WHEN 9 THEN NULL \
               ELSE round(((random() - 0.5)::numeric * 1e15 + random()::numeric) \
                          * 10::numeric ^ (g % 40 - 20), (g * 7) % 30) END \
             FROM generate_series(1, 300) g",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let mut s = DbSvc::start_on(db, &["--tables", "amounts"]).await;
    let mut conn = s.sql().await;
    let expected: Vec<(i32, Option<String>)> =
        sqlx::query_as("SELECT id, v::text FROM amounts ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let rows = rows_json(
        &s.client
            .query(pb::QueryRequest {
                table: "amounts".into(),
                order_by: vec![pb::OrderBy {
                    column: "id".into(),
                    ..Default::default()
                }],
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows,
    );
    assert_eq!(rows.len(), expected.len());
    let mut as_text = 0;
    for (row, (id, text)) in rows.iter().zip(&expected) {
        let got = &row["v"];
        match (got, text) {
            (Json::Null, None) => {}
            (Json::String(s), Some(text)) => {
                assert_eq!(s, text, "id {id}");
                as_text += 1;
            }
            (Json::Number(n), Some(text)) => {
                // A number only where the double is the decimal: same value, same digits.
                let f = n.as_f64().unwrap();
                assert_eq!(f, text.parse::<f64>().unwrap(), "id {id}");
                let trimmed = if text.contains('.') {
                    text.trim_end_matches('0').trim_end_matches('.')
                } else {
                    text
                };
                assert_eq!(
                    f.to_string(),
                    trimmed,
                    "id {id}: {text} is not exact as {f}"
                );
            }
            other => panic!("id {id}: {other:?}"),
        }
    }
    for (id, want) in [
        (1, json!("NaN")),
        (2, json!("Infinity")),
        (3, json!("-Infinity")),
        // These doubles print as 1e40 and -1e-30: the numbers are the decimals' exact text.
        (4, json!(1e40)),
        (5, json!(-1e-30)),
        (6, json!(0.1)),
        (7, json!("12345678901234567890.0123456789")),
        (8, json!(0.0)),
    ] {
        assert_eq!(rows[id - 1]["v"], want, "id {id}");
    }
    assert!(
        as_text > 8,
        "the random values include ones a double cannot carry"
    );
}

/// `order_by` places NULLs where it is told, in both directions, on a column that holds them;
/// unspecified keeps PostgreSQL's default (last ascending, first descending).
#[tokio::test]
async fn order_by_nulls_first_and_last_in_both_directions() {
    let mut s = DbSvc::start(&[]).await;
    let mut rows = Vec::new();
    for (name, duration) in [
        ("a", Some(10)),
        ("b", None),
        ("c", Some(30)),
        ("d", None),
        ("e", Some(20)),
    ] {
        let mut r = action(name);
        r["duration_ms"] = json!(duration);
        rows.push(r);
    }
    insert(&mut s, "agent_actions", rows).await;
    use pb::{Direction as D, Nulls as N};
    for (direction, nulls, want) in [
        (D::Asc, N::First, ["b", "d", "a", "e", "c"]),
        (D::Asc, N::Last, ["a", "e", "c", "b", "d"]),
        (D::Desc, N::First, ["b", "d", "c", "e", "a"]),
        (D::Desc, N::Last, ["c", "e", "a", "b", "d"]),
        (D::Unspecified, N::First, ["b", "d", "a", "e", "c"]),
        (D::Asc, N::Unspecified, ["a", "e", "c", "b", "d"]),
        (D::Desc, N::Unspecified, ["b", "d", "c", "e", "a"]),
    ] {
        let reply = s
            .client
            .query(pb::QueryRequest {
                table: "agent_actions".into(),
                columns: vec!["agent_name".into(), "duration_ms".into()],
                order_by: vec![
                    pb::OrderBy {
                        column: "duration_ms".into(),
                        direction: direction as i32,
                        nulls: nulls as i32,
                    },
                    // The NULLs tie: the second term fixes their order.
                    pb::OrderBy {
                        column: "agent_name".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<String> = rows_json(&reply.rows)
            .iter()
            .map(|r| r["agent_name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "{direction:?} {nulls:?}");
    }
}

/// A Query without a limit returns the default 100 rows (the total says how many match); a
/// limit above `--query-max-limit` is refused naming `limit`; StreamQuery is not capped; a
/// maximum below 100 lowers the default.
#[tokio::test]
async fn query_limit_defaults_to_100_and_is_capped_by_the_maximum() {
    let mut s = DbSvc::start(&["--query-max-limit", "120"]).await;
    let mut conn = s.sql().await;
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         SELECT gen_random_uuid(), 'agent-' || lpad(g::text, 3, '0'), 't', 'n' \
         FROM generate_series(1, 150) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let query = |limit: Option<u32>| pb::QueryRequest {
        table: "agent_actions".into(),
        columns: vec!["agent_name".into()],
        order_by: vec![pb::OrderBy {
            column: "agent_name".into(),
            ..Default::default()
        }],
        limit,
        ..Default::default()
    };

    let reply = s
        .client
        .query(pb::QueryRequest {
            include_total: true,
            ..query(None)
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.rows.len(), 100);
    assert_eq!(reply.total, Some(150));
    let names = rows_json(&reply.rows);
    assert_eq!(names[0]["agent_name"], "agent-001");
    assert_eq!(names[99]["agent_name"], "agent-100");
    // Without include_total (the shared-read path) the default is the same.
    let reply = s.client.query(query(None)).await.unwrap().into_inner();
    assert_eq!(reply.rows.len(), 100);

    // Up to the maximum is fine; beyond it is INVALID_ARGUMENT naming `limit`.
    let reply = s.client.query(query(Some(120))).await.unwrap().into_inner();
    assert_eq!(reply.rows.len(), 120);
    let err = s.client.query(query(Some(121))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(
        error_details(&err),
        ("VALIDATION_ERROR".to_string(), vec!["limit".to_string()])
    );

    // StreamQuery is not capped, with or without a limit.
    for (limit, want) in [(None, 150), (Some(130), 130)] {
        let mut stream = s
            .client
            .stream_query(pb::StreamQueryRequest {
                query: Some(query(limit)),
                batch_size: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let n = streamed_rows(&mut stream).await.len();
        assert_eq!(n, want, "stream limit {limit:?}");
    }
    drop(conn);

    // A maximum below 100 is also the default.
    let mut small = DbSvc::start(&["--query-max-limit", "40"]).await;
    let mut conn = small.sql().await;
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         SELECT gen_random_uuid(), 'a' || g, 't', 'n' FROM generate_series(1, 60) g",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let reply = small.client.query(query(None)).await.unwrap().into_inner();
    assert_eq!(reply.rows.len(), 40);
    let err = small.client.query(query(Some(41))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(error_details(&err).1, vec!["limit"]);
}

/// The type mapping for types the platform tables do not use (smallint, real, double
/// precision, date, json), against a table of the test's own: values round-trip through
/// Insert and Query, filters take them, and wrong values are INVALID_ARGUMENT naming the field.
#[tokio::test]
async fn type_mapping_of_smallint_real_double_date_and_json() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE measurements (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
             small smallint, ratio real, precise double precision, day date, doc json)",
        "measurements",
    )
    .await;

    let described = s
        .client
        .describe_table(pb::DescribeTableRequest {
            table: "measurements".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    let types: Vec<(String, String, String)> = described
        .columns
        .iter()
        .map(|c| (c.name.clone(), c.sql_type.clone(), c.json_type.clone()))
        .collect();
    let want: Vec<(String, String, String)> = [
        ("id", "uuid", "string"),
        ("small", "smallint", "integer"),
        ("ratio", "real", "number"),
        ("precise", "double precision", "number"),
        ("day", "date", "string"),
        ("doc", "json", "json"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(types, want);

    let (id1, id2, id3) = (
        "00000000-0000-4000-8000-000000000001",
        "00000000-0000-4000-8000-000000000002",
        "00000000-0000-4000-8000-000000000003",
    );
    let sent = vec![
        json!({"id": id1, "small": 32767, "ratio": 1.5, "precise": 0.1,
               "day": "2024-02-29", "doc": {"a": [1, "x", null, true], "b": {"c": 2.5}}}),
        json!({"id": id2, "small": -32768, "ratio": -0.25, "precise": -1.25e300,
               "day": "0001-01-01", "doc": "just a string"}),
        json!({"id": id3, "small": null, "ratio": null, "precise": null, "day": null, "doc": null}),
    ];
    // As the wire has them: every number a double.
    let want = vec![
        json!({"id": id1, "small": 32767.0, "ratio": 1.5, "precise": 0.1,
               "day": "2024-02-29", "doc": {"a": [1.0, "x", null, true], "b": {"c": 2.5}}}),
        json!({"id": id2, "small": -32768.0, "ratio": -0.25, "precise": -1.25e300,
               "day": "0001-01-01", "doc": "just a string"}),
        json!({"id": id3, "small": null, "ratio": null, "precise": null, "day": null, "doc": null}),
    ];
    let inserted = insert(&mut s, "measurements", sent).await;
    assert_eq!(inserted, want);
    let queried = rows_json(
        &s.client
            .query(pb::QueryRequest {
                table: "measurements".into(),
                order_by: vec![pb::OrderBy {
                    column: "id".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows,
    );
    assert_eq!(queried, want, "Query reads back what Insert returned");

    // What PostgreSQL holds is what was sent.
    let mut conn = s.sql().await;
    let held: (String, String, String, String, String) = sqlx::query_as(
        "SELECT small::text, ratio::text, precise::text, day::text, doc::text \
         FROM measurements WHERE id = $1::uuid",
    )
    .bind(id1)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(held.0, "32767");
    assert_eq!(held.1, "1.5");
    assert_eq!(held.2, "0.1");
    assert_eq!(held.3, "2024-02-29");
    let doc: Json = serde_json::from_str(&held.4).unwrap();
    assert_eq!(doc, json!({"a": [1, "x", null, true], "b": {"c": 2.5}}));

    // Filters take the same typed values.
    for (filter, want) in [
        (cond("small", pb::Operator::Lt, Some(json!(0))), 1),
        (cond("ratio", pb::Operator::Gt, Some(json!(1.25))), 1),
        (cond("precise", pb::Operator::Eq, Some(json!(0.1))), 1),
        (cond("day", pb::Operator::Gte, Some(json!("2024-02-29"))), 1),
        (cond("day", pb::Operator::Lt, Some(json!("2024-02-29"))), 1),
        (cond("doc", pb::Operator::IsNull, None), 1),
    ] {
        let count = s
            .client
            .count(pb::CountRequest {
                table: "measurements".into(),
                filter: Some(filter.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .count;
        assert_eq!(count, want, "{filter:?}");
    }

    // Wrong values: INVALID_ARGUMENT naming rows[i].<column>, nothing written.
    for (column, value) in [
        ("small", json!(1.5)),
        ("small", json!(32768)),
        ("small", json!(-32769)),
        ("small", json!("12")),
        ("ratio", json!("1.5")),
        ("ratio", json!(true)),
        ("precise", json!("0.1")),
        ("day", json!("2024-02-30")),
        ("day", json!("31/01/2024")),
        ("day", json!("2024-01-31T00:00:00Z")),
        ("day", json!(20240131)),
    ] {
        let mut row = json!({"small": 1});
        row[column] = value.clone();
        let err = s
            .client
            .insert(pb::InsertRequest {
                table: "measurements".into(),
                rows: vec![to_struct(json!({"small": 2})), to_struct(row)],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{column} = {value}: {err:?}"
        );
        assert_eq!(
            error_details(&err),
            (
                "VALIDATION_ERROR".to_string(),
                vec![format!("rows[1].{column}")]
            ),
            "{column} = {value}: {}",
            err.message()
        );
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM measurements")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 3, "no failed insert wrote a row");
}

/// The schema db-svc's migrations create is the reference's (ecosystem-facts §3): every
/// column of the six platform tables with its type, NOT NULL and default, `id` the primary key
/// (`gen_random_uuid()` unless noted), `created_at` defaulting to `now()`, and the indexes the
/// reference lists.
#[tokio::test]
async fn migrated_schema_matches_the_reference() {
    let s = DbSvc::start(&[]).await;
    let mut conn = s.sql().await;
    /// (column, type as format_type prints it, NOT NULL, default)
    type Column = (&'static str, &'static str, bool, Option<&'static str>);
    const UUID_PK: Column = ("id", "uuid", true, Some("gen_random_uuid()"));
    const CREATED_AT: Column = (
        "created_at",
        "timestamp without time zone",
        false,
        Some("now()"),
    );
    let num = "numeric(5,4)";
    // Each table's columns in table order, as the reference lists them.
    let reference: Vec<(&str, Vec<Column>)> = vec![
        (
            "agent_routing_decisions",
            vec![
                UUID_PK,
                ("correlation_id", "uuid", true, None),
                ("session_id", "text", false, None),
                ("user_request", "text", false, None),
                ("user_request_hash", "text", false, None),
                ("context_snapshot", "jsonb", false, None),
                ("selected_agent", "text", true, None),
                ("confidence_score", num, true, None),
                ("routing_strategy", "text", false, None),
                ("trigger_confidence", num, false, None),
                ("context_confidence", num, false, None),
                ("capability_confidence", num, false, None),
                ("historical_confidence", num, false, None),
                ("alternatives", "jsonb", false, None),
                ("reasoning", "text", false, None),
                ("routing_time_ms", "integer", false, None),
                ("cache_hit", "boolean", false, Some("false")),
                ("selection_validated", "boolean", false, Some("false")),
                ("actual_success", "boolean", false, None),
                ("execution_succeeded", "boolean", false, None),
                ("actual_quality_score", num, false, None),
                CREATED_AT,
            ],
        ),
        (
            "agent_actions",
            vec![
                UUID_PK,
                ("correlation_id", "uuid", true, None),
                ("agent_name", "text", true, None),
                ("action_type", "text", true, None),
                ("action_name", "text", true, None),
                ("action_details", "jsonb", false, Some("'{}'::jsonb")),
                ("debug_mode", "boolean", false, Some("true")),
                ("duration_ms", "integer", false, None),
                CREATED_AT,
            ],
        ),
        (
            "agent_transformation_events",
            vec![
                UUID_PK,
                ("source_agent", "text", true, None),
                ("target_agent", "text", true, None),
                ("transformation_reason", "text", false, None),
                ("confidence_score", num, false, None),
                ("transformation_duration_ms", "integer", false, None),
                ("success", "boolean", false, Some("true")),
                CREATED_AT,
                ("project_path", "text", false, None),
                ("project_name", "text", false, None),
                ("claude_session_id", "text", false, None),
            ],
        ),
        (
            "agent_manifest_injections",
            vec![
                UUID_PK,
                ("correlation_id", "uuid", true, None),
                ("routing_decision_id", "uuid", false, None),
                ("agent_name", "text", true, None),
                ("manifest_version", "text", true, None),
                ("generation_source", "text", true, None),
                ("is_fallback", "boolean", false, Some("false")),
                ("patterns_count", "integer", false, Some("0")),
                ("infrastructure_services", "integer", false, Some("0")),
                ("debug_intelligence_successes", "integer", false, Some("0")),
                ("debug_intelligence_failures", "integer", false, Some("0")),
                ("query_times", "jsonb", true, None),
                ("total_query_time_ms", "integer", true, None),
                ("full_manifest_snapshot", "jsonb", true, None),
                ("agent_execution_success", "boolean", false, None),
                ("agent_execution_time_ms", "integer", false, None),
                ("agent_quality_score", num, false, None),
                CREATED_AT,
            ],
        ),
        (
            "pattern_lineage_nodes",
            vec![
                // "id uuid primary key (no default)".
                ("id", "uuid", true, None),
                ("pattern_id", "character varying(255)", true, None),
                ("pattern_name", "character varying(255)", true, None),
                ("pattern_type", "character varying(100)", true, None),
                ("pattern_version", "character varying(50)", true, None),
                ("lineage_id", "uuid", true, None),
                ("generation", "integer", true, None),
                ("pattern_data", "jsonb", true, None),
                ("metadata", "jsonb", false, None),
                ("correlation_id", "uuid", true, None),
                (
                    "created_at",
                    "timestamp with time zone",
                    false,
                    Some("now()"),
                ),
                ("language", "character varying(50)", false, None),
            ],
        ),
        (
            "pattern_lineage_edges",
            vec![
                UUID_PK,
                ("source_node_id", "uuid", true, None),
                ("target_node_id", "uuid", true, None),
                ("edge_type", "text", true, None),
                ("edge_weight", "numeric(10,6)", false, None),
                ("transformation_type", "text", false, None),
                ("metadata", "jsonb", false, None),
                ("correlation_id", "uuid", false, None),
                CREATED_AT,
                ("created_by", "text", false, None),
            ],
        ),
    ];
    for (table, columns) in &reference {
        let got: Vec<(String, String, bool, Option<String>)> = sqlx::query_as(
            "SELECT c.column_name::text, format_type(a.atttypid, a.atttypmod), \
                    c.is_nullable = 'NO', c.column_default::text \
             FROM information_schema.columns c \
             JOIN pg_attribute a ON a.attrelid = format('%I.%I', c.table_schema, c.table_name)::regclass \
                                AND a.attname = c.column_name \
             WHERE c.table_schema = current_schema() AND c.table_name = $1 \
             ORDER BY c.ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let want: Vec<(String, String, bool, Option<String>)> = columns
            .iter()
            .map(|(n, t, nn, d)| (n.to_string(), t.to_string(), *nn, d.map(str::to_string)))
            .collect();
        assert_eq!(got, want, "columns of {table}");

        let key: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
             WHERE i.indrelid = $1::regclass AND i.indisprimary",
        )
        .bind(table)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        assert_eq!(key, vec!["id"], "primary key of {table}");
    }

    // The indexes the reference lists: a plain btree index on each column.
    for (table, columns) in [
        (
            "agent_routing_decisions",
            ["selected_agent", "created_at", "correlation_id"],
        ),
        (
            "agent_actions",
            ["agent_name", "created_at", "correlation_id"],
        ),
    ] {
        let defs: Vec<String> =
            sqlx::query_scalar("SELECT indexdef FROM pg_indexes WHERE tablename = $1")
                .bind(table)
                .fetch_all(&mut conn)
                .await
                .unwrap();
        for column in columns {
            let suffix = format!(" USING btree ({column})");
            assert!(
                defs.iter()
                    .any(|d| d.starts_with("CREATE INDEX") && d.ends_with(&suffix)),
                "no index on {table}.{column}: {defs:#?}"
            );
        }
    }

    // The defaults work as the reference means them: a row given none gets a fresh uuid and
    // the current time.
    let (id, age): (uuid::Uuid, f64) = sqlx::query_as(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         VALUES (gen_random_uuid(), 'a', 't', 'n') \
         RETURNING id, abs(extract(epoch FROM now()::timestamp - created_at))::float8",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(id.get_version_num(), 4);
    assert!(age < 1.0, "created_at is now(): {age}");
}

/// A number a `real` cannot hold is refused, as PostgreSQL itself refuses `'1e300'::real`
/// ("out of range"), rather than stored as Infinity or 0.
#[tokio::test]
async fn a_real_out_of_range_is_refused_not_stored_as_infinity() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE readings (id serial PRIMARY KEY, ratio real)",
        "readings",
    )
    .await;
    let mut stored = Vec::new();
    for value in [1e300, -1e300, 1e-50] {
        match s
            .client
            .insert(pb::InsertRequest {
                table: "readings".into(),
                rows: vec![to_struct(json!({"ratio": value}))],
                ..Default::default()
            })
            .await
        {
            Ok(reply) => stored.push((
                value,
                rows_json(&reply.into_inner().rows)[0]["ratio"].clone(),
            )),
            Err(err) => {
                assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
                assert_eq!(error_details(&err).1, vec!["rows[0].ratio"]);
            }
        }
    }
    assert!(stored.is_empty(), "stored as other values: {stored:?}");
    // In range, a real reads back as the decimal written (as PostgreSQL prints it), not as
    // the float's exact binary value (0.10000000149011612).
    let reply = s
        .client
        .insert(pb::InsertRequest {
            table: "readings".into(),
            rows: vec![to_struct(json!({"ratio": 0.1}))],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows_json(&reply.into_inner().rows)[0]["ratio"], json!(0.1));
}

/// PostgreSQL's infinite timestamps and dates are values a table may hold: every read path
/// returns them as PostgreSQL writes them (`"infinity"`, `"-infinity"`), next to ordinary
/// times, instead of failing (sqlx's own decoders panic on them).
#[tokio::test]
async fn infinite_timestamps_read_back_as_postgresql_writes_them() {
    let s = DbSvc::start(&[]).await;
    let mut conn = s.sql().await;
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name, created_at) \
         VALUES (gen_random_uuid(), 'inf', 'tool_call', 'a', 'infinity'), \
                (gen_random_uuid(), 'inf', 'tool_call', 'b', '-infinity'), \
                (gen_random_uuid(), 'inf', 'tool_call', 'c', '2024-01-31T10:00:00Z')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let by_name = |rows: Vec<Json>| -> Vec<(String, Json)> {
        let mut v: Vec<(String, Json)> = rows
            .into_iter()
            .map(|r| {
                (
                    r["action_name"].as_str().unwrap().to_string(),
                    r["created_at"].clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let want = vec![
        ("a".to_string(), json!("infinity")),
        ("b".to_string(), json!("-infinity")),
        ("c".to_string(), json!("2024-01-31T10:00:00Z")),
    ];
    let query = pb::QueryRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({"agent_name": "inf"}))),
        ..Default::default()
    };
    let sql = "SELECT action_name, created_at FROM agent_actions WHERE agent_name = 'inf'";
    for (rows, path) in
        read_every_way(&s, query, sql)
            .await
            .into_iter()
            .zip(["Query", "StreamQuery", "ExecuteRaw"])
    {
        assert_eq!(by_name(rows), want, "{path}");
    }
}

/// PostgreSQL's dates and timestamps reach further than the API's times (year 262143):
/// reading one beyond is FAILED_PRECONDITION naming the column, not INTERNAL, and the column
/// still reads as text through ExecuteRaw.
#[tokio::test]
async fn dates_beyond_the_apis_range_are_a_precondition_error_naming_the_column() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE far (id int PRIMARY KEY, d date, t timestamp); \
         INSERT INTO far VALUES (1, '270000-01-01', NULL), (2, NULL, '270000-01-01 00:00'), \
         (3, '2026-12-02', '2026-12-02 10:00')",
        "far",
    )
    .await;
    for (id, column) in [(1, "d"), (2, "t")] {
        let err = s
            .client
            .query(pb::QueryRequest {
                table: "far".into(),
                r#where: Some(to_struct(json!({ "id": id }))),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert_eq!(error_details(&err).0, "UNREPRESENTABLE_VALUE");
        assert_eq!(error_metadata(&err, "column").as_deref(), Some(column));
    }
    let rows = s
        .client
        .query(pb::QueryRequest {
            table: "far".into(),
            r#where: Some(to_struct(json!({ "id": 3 }))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(
        rows_json(&rows),
        vec![json!({"id": 3.0, "d": "2026-12-02", "t": "2026-12-02T10:00:00Z"})]
    );
    let raw = s
        .client
        .execute_raw(pb::ExecuteRawRequest {
            sql: "SELECT d::text AS d FROM far WHERE id = 1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rows_json(&raw.rows), vec![json!({"d": "270000-01-01"})]);
}

/// An Upsert whose returned row cannot be read back (its stored jsonb holds a number beyond a
/// double, written by another tool) fails without writing: the rows are decoded before the
/// commit, so the caller is never told "failed" about a change that stayed.
#[tokio::test]
async fn an_upsert_that_cannot_return_its_row_changes_nothing() {
    let mut s = DbSvc::start(&[]).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut conn = s.sql().await;
    // 10^400 + 0.5: no integer (those read back as their decimal text), beyond any double.
    let beyond = format!("{{\"big\": 1{}.5}}", "0".repeat(400));
    sqlx::query(
        "INSERT INTO agent_actions (id, correlation_id, agent_name, action_type, action_name, \
         action_details) VALUES ($1::uuid, gen_random_uuid(), 'before', 'x', 'y', $2::jsonb)",
    )
    .bind(&id)
    .bind(&beyond)
    .execute(&mut conn)
    .await
    .unwrap();
    let err = s
        .client
        .upsert(pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(json!({
                "id": id, "correlation_id": uuid::Uuid::new_v4().to_string(),
                "agent_name": "after", "action_type": "x", "action_name": "y"
            }))],
            update_columns: vec!["agent_name".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(error_details(&err).0, "UNREPRESENTABLE_VALUE");
    let name: String =
        sqlx::query_scalar("SELECT agent_name FROM agent_actions WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(name, "before", "rolled back");
}

/// jsonb keeps integers of any size (another writer's, e.g. a Python producer's): each reads
/// back exactly, as its decimal text, on every read path - never as a rounded double.
#[tokio::test]
async fn jsonb_integers_beyond_64_bits_read_back_as_their_exact_text() {
    let s = DbSvc::start(&[]).await;
    let mut conn = s.sql().await;
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name, \
         action_details) VALUES (gen_random_uuid(), 'wide', 'x', 'y', \
         '{\"n\": 123456789012345678901234567890, \"neg\": [-9223372036854775809], \
           \"e\": 1e25, \"ok\": 42, \"s\": \"123456789012345678901234567890\"}')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let expected = vec![json!({"action_details": {
        "n": "123456789012345678901234567890",
        "neg": ["-9223372036854775809"],
        "e": "10000000000000000000000000",
        "ok": 42.0,
        "s": "123456789012345678901234567890",
    }})];
    let query = pb::QueryRequest {
        table: "agent_actions".into(),
        columns: vec!["action_details".into()],
        r#where: Some(to_struct(json!({ "agent_name": "wide" }))),
        ..Default::default()
    };
    let sql = "SELECT action_details FROM agent_actions WHERE agent_name = 'wide'";
    for (rows, path) in
        read_every_way(&s, query, sql)
            .await
            .into_iter()
            .zip(["Query", "StreamQuery", "ExecuteRaw"])
    {
        assert_eq!(rows, expected, "{path}");
    }
}

/// PostgreSQL stores JSON nested deeper than db-svc returns (96 protobuf messages: 48 levels
/// of lists). Reading such a cell is FAILED_PRECONDITION naming the column, on every read
/// path, and the other rows and a projection without the column still read normally.
#[tokio::test]
async fn json_nested_too_deeply_is_a_precondition_error_naming_the_column() {
    let s = DbSvc::start(&[]).await;
    let mut conn = s.sql().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name, action_details) \
         VALUES (gen_random_uuid(), 'deep', 'tool_call', 'deep', $1::jsonb), \
                (gen_random_uuid(), 'shallow', 'tool_call', 'ok', '{\"a\": [1, {\"b\": \"]\"}]}')",
    )
    .bind(&deep)
    .execute(&mut conn)
    .await
    .unwrap();
    let mut client = s.client.clone();
    let query = |agent: &str, columns: Vec<String>| pb::QueryRequest {
        table: "agent_actions".into(),
        columns,
        r#where: Some(to_struct(json!({ "agent_name": agent }))),
        ..Default::default()
    };
    let check = |err: tonic::Status, path: &str| {
        assert_eq!(
            err.code(),
            tonic::Code::FailedPrecondition,
            "{path}: {err:?}"
        );
        assert_eq!(error_details(&err).0, "UNREPRESENTABLE_VALUE", "{path}");
        assert_eq!(
            error_metadata(&err, "column").as_deref(),
            Some("action_details"),
            "{path}"
        );
        assert!(
            err.message().contains("200 levels"),
            "{path}: {}",
            err.message()
        );
    };
    let err = client.query(query("deep", vec![])).await.unwrap_err();
    check(err, "Query");
    let mut stream = client
        .stream_query(pb::StreamQueryRequest {
            query: Some(query("deep", vec![])),
            batch_size: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let err = omnibus_tests::db::stream_error(&mut stream).await;
    check(err, "StreamQuery");
    let err = client
        .execute_raw(pb::ExecuteRawRequest {
            sql: "SELECT action_details FROM agent_actions WHERE agent_name = $1".into(),
            params: vec![to_value(json!("deep"))],
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    check(err, "ExecuteRaw");
    // Without the column, and for other rows (a bracket inside a string is not nesting).
    let rows = client
        .query(query("deep", vec!["action_name".into()]))
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows_json(&rows), vec![json!({"action_name": "deep"})]);
    let rows = client
        .query(query("shallow", vec!["action_details".into()]))
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(
        rows_json(&rows),
        vec![json!({"action_details": {"a": [1.0, {"b": "]"}]}})]
    );
}

/// An upsert that updates on conflict never resets what a row did not give: rows with
/// different columns, and update columns no row gives, are field errors; by default the
/// primary key and created_at of an existing row are kept (a conflict on another unique key
/// does not re-key the row).
#[tokio::test]
async fn upsert_never_resets_columns_a_row_did_not_give() {
    let s = DbSvc::start(&[]).await;
    let mut client = s.client.clone();
    let mut a = action("kept");
    a["id"] = json!(uuid::Uuid::new_v4().to_string());
    a["duration_ms"] = json!(5);
    let mut b = action("other");
    b["id"] = json!(uuid::Uuid::new_v4().to_string());
    let upsert = |rows: Vec<Json>, update_columns: Vec<&str>| pb::UpsertRequest {
        table: "agent_actions".into(),
        rows: rows.into_iter().map(to_struct).collect(),
        update_columns: update_columns.into_iter().map(String::from).collect(),
        ..Default::default()
    };
    let err = client
        .upsert(upsert(vec![a.clone(), b.clone()], vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(error_details(&err).1, vec!["rows[1]"]);
    let err = client
        .upsert(upsert(vec![b.clone()], vec!["duration_ms"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(error_details(&err).1, vec!["update_columns[0]"]);
    // With ignore_duplicates nothing is updated, so differing rows are fine.
    let reply = client
        .upsert(pb::UpsertRequest {
            ignore_duplicates: true,
            ..upsert(vec![a.clone(), b.clone()], vec![])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 2);

    // A conflict on (pattern_id, pattern_version) with the default update list: the stored
    // node keeps its id and created_at, and takes the new name.
    let node = |name: &str, created_at: &str| {
        json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "pattern_id": "p", "pattern_name": name, "pattern_type": "t",
            "pattern_version": "1", "lineage_id": uuid::Uuid::new_v4().to_string(),
            "generation": 1, "pattern_data": {}, "correlation_id": uuid::Uuid::new_v4().to_string(),
            "created_at": created_at,
        })
    };
    let upsert_node = |row: Json| pb::UpsertRequest {
        table: "pattern_lineage_nodes".into(),
        rows: vec![to_struct(row)],
        conflict_columns: vec!["pattern_id".into(), "pattern_version".into()],
        ..Default::default()
    };
    let first = client
        .upsert(upsert_node(node("one", "2026-01-01T00:00:00Z")))
        .await
        .unwrap()
        .into_inner();
    let second = client
        .upsert(upsert_node(node("two", "2026-06-01T00:00:00Z")))
        .await
        .unwrap()
        .into_inner();
    let (first, second) = (from_struct(&first.rows[0]), from_struct(&second.rows[0]));
    assert_eq!(second["pattern_name"], json!("two"));
    assert_eq!(
        second["id"], first["id"],
        "the existing row keeps its primary key"
    );
    assert_eq!(second["created_at"], json!("2026-01-01T00:00:00Z"));
}

/// Rows that tie on every ordering term (one insert gives them the same created_at) come in
/// primary-key order, so offset pages neither repeat nor skip rows.
#[tokio::test]
async fn offset_pages_over_tied_rows_are_stable() {
    let mut s = DbSvc::start(&[]).await;
    let rows: Vec<Json> = (0..30).map(|_| action("tied")).collect();
    insert(&mut s, "agent_actions", rows).await;
    let page = |offset: u64| pb::QueryRequest {
        table: "agent_actions".into(),
        columns: vec!["id".into()],
        order_by: vec![pb::OrderBy {
            column: "created_at".into(),
            direction: pb::Direction::Desc as i32,
            ..Default::default()
        }],
        limit: Some(7),
        offset,
        ..Default::default()
    };
    let mut client = s.client.clone();
    let mut seen = Vec::new();
    for offset in (0..30).step_by(7) {
        let rows = client.query(page(offset)).await.unwrap().into_inner().rows;
        seen.extend(
            rows_json(&rows)
                .into_iter()
                .map(|r| r["id"].as_str().unwrap().to_string()),
        );
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "ties in primary-key order");
    sorted.dedup();
    assert_eq!(sorted.len(), 30, "every row once");
}

/// Update and Delete return their rows only up to `--query-max-limit`: a write that would
/// return more is INVALID_ARGUMENT on `count_only` and rolled back (never committed with a
/// response too large to send); with `count_only` it runs.
#[tokio::test]
async fn update_and_delete_returning_too_many_rows_roll_back() {
    let mut s = DbSvc::start(&["--query-max-limit", "5"]).await;
    insert(
        &mut s,
        "agent_actions",
        (0..8).map(|_| action("many")).collect(),
    )
    .await;
    let filter = || Some(to_struct(json!({"agent_name": "many"})));
    let mut client = s.client.clone();
    let err = client
        .update(pb::UpdateRequest {
            table: "agent_actions".into(),
            r#where: filter(),
            set: Some(to_struct(json!({"action_type": "changed"}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(error_details(&err).1, vec!["count_only"]);
    let err = client
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: filter(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // With a max_affected below the rows it would touch, that is the answer (it says why,
    // and how many), not the response size.
    let err = client
        .update(pb::UpdateRequest {
            table: "agent_actions".into(),
            r#where: filter(),
            set: Some(to_struct(json!({"action_type": "changed"}))),
            max_affected: Some(3),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(error_details(&err).0, "TOO_MANY_ROWS");
    assert_eq!(error_metadata(&err, "would_affect").as_deref(), Some("8"));
    // Nothing changed.
    let count = |action_type: &str| pb::CountRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(
            json!({"agent_name": "many", "action_type": action_type}),
        )),
        ..Default::default()
    };
    assert_eq!(
        client
            .count(count("tool_call"))
            .await
            .unwrap()
            .into_inner()
            .count,
        8
    );
    // Within the limit, or with count_only, the writes run.
    let updated = client
        .update(pb::UpdateRequest {
            table: "agent_actions".into(),
            r#where: filter(),
            set: Some(to_struct(json!({"action_type": "changed"}))),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.affected, 8);
    let deleted = client
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: filter(),
            max_affected: Some(8),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.affected, 8);
    assert_eq!(
        client
            .count(count("changed"))
            .await
            .unwrap()
            .into_inner()
            .count,
        0
    );
}

/// A column of a type outside the mapping is read as its text, but ordered as its type:
/// intervals by length, not as strings ("10 days" < "2 days"), with or without a projection.
#[tokio::test]
async fn columns_read_as_text_are_ordered_by_their_own_type() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE waits (id int PRIMARY KEY, d interval); \
         INSERT INTO waits VALUES (1, '10 days'), (2, '2 days'), (3, '1 day'), (4, NULL)",
        "waits",
    )
    .await;
    for columns in [vec![], vec!["d".to_string()]] {
        let rows = s
            .client
            .query(pb::QueryRequest {
                table: "waits".into(),
                columns: columns.clone(),
                order_by: vec![pb::OrderBy {
                    column: "d".into(),
                    direction: pb::Direction::Desc as i32,
                    nulls: pb::Nulls::Last as i32,
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows;
        let d: Vec<Json> = rows_json(&rows).iter().map(|r| r["d"].clone()).collect();
        assert_eq!(
            d,
            vec![
                json!("10 days"),
                json!("2 days"),
                json!("1 day"),
                Json::Null
            ],
            "{columns:?}"
        );
    }
}

/// Ordering by a column whose type has no ordering operator (xml) is the request's own error,
/// INVALID_ARGUMENT; db-svc reads the table again to be sure it did not change, finds it the
/// same, and keeps its pooled connections (retiring them on every such request would let any
/// client make db-svc reconnect to PostgreSQL at will).
#[tokio::test]
async fn ordering_by_a_type_without_an_ordering_operator_keeps_the_connections() {
    let mut s = DbSvc::start_with_args(
        "CREATE TABLE docs (id int PRIMARY KEY, body xml); \
         INSERT INTO docs VALUES (1, '<a/>'), (2, '<b/>')",
        &["--tables", "docs", "--db-max-connections", "2"],
    )
    .await;
    // Projected, the column is read as text and ORDER BY takes that output column; here it is
    // not, so PostgreSQL orders by the xml itself.
    let query = |column: &str| pb::QueryRequest {
        table: "docs".into(),
        columns: vec!["id".into()],
        order_by: vec![pb::OrderBy {
            column: column.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ids = |rows: &[prost_types::Struct]| -> Vec<Json> {
        rows_json(rows).iter().map(|r| r["id"].clone()).collect()
    };
    let rows = s.client.query(query("id")).await.unwrap().into_inner().rows;
    assert_eq!(ids(&rows), vec![json!(1.0), json!(2.0)]);
    let mut conn = s.sql().await;
    async fn backends(conn: &mut sqlx::PgConnection) -> Vec<i32> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() ORDER BY pid",
        )
        .fetch_all(conn)
        .await
        .unwrap()
    }
    let before = backends(&mut conn).await;
    assert!(!before.is_empty());
    for _ in 0..3 {
        let err = s.client.query(query("body")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("xml"), "{err:?}");
    }
    for _ in 0..4 {
        let rows = s.client.query(query("id")).await.unwrap().into_inner().rows;
        assert_eq!(ids(&rows), vec![json!(1.0), json!(2.0)]);
    }
    let after = backends(&mut conn).await;
    assert!(
        before.iter().all(|pid| after.contains(pid)),
        "db-svc's connections were replaced: {before:?} -> {after:?}"
    );
}

/// A column dropped, renamed or retyped while db-svc runs: the next request that trips on the
/// old catalog makes db-svc read the table again and runs once more on what the table is now
/// (on a connection without statements prepared for the old table), with no restart; a
/// request naming the old column then gets a field error.
#[tokio::test]
async fn a_changed_table_is_read_again_when_a_statement_trips_on_it() {
    // One pooled connection: the statements it prepared are met again after every change.
    let mut s = DbSvc::start_with_args(
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text, extra text)",
        &["--tables", "notes", "--db-max-connections", "1"],
    )
    .await;
    let back = insert(
        &mut s,
        "notes",
        vec![json!({"id": 1, "body": "a", "extra": "x"})],
    )
    .await;
    assert_eq!(back, vec![json!({"id": 1.0, "body": "a", "extra": "x"})]);
    let query_all = |s: &mut DbSvc| {
        let mut client = s.client.clone();
        async move {
            client
                .query(pb::QueryRequest {
                    table: "notes".into(),
                    order_by: vec![pb::OrderBy {
                        column: "id".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await
                .map(|r| rows_json(&r.into_inner().rows))
        }
    };
    let mut conn = s.sql().await;
    sqlx::query("ALTER TABLE notes DROP COLUMN extra")
        .execute(&mut conn)
        .await
        .unwrap();
    // Every column of the old catalog would be selected: the first try fails, the second runs.
    assert_eq!(
        query_all(&mut s).await.unwrap(),
        vec![json!({"id": 1.0, "body": "a"})]
    );
    // Inserts return their rows the same way.
    assert_eq!(
        insert(&mut s, "notes", vec![json!({"id": 2, "body": "b"})]).await,
        vec![json!({"id": 2.0, "body": "b"})]
    );

    sqlx::query("ALTER TABLE notes RENAME COLUMN body TO text_body")
        .execute(&mut conn)
        .await
        .unwrap();
    // Counting on the old name: read again, the column is gone, and the field is named.
    let err = s
        .client
        .count(pb::CountRequest {
            table: "notes".into(),
            r#where: Some(to_struct(json!({"body": "a"}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(error_details(&err).1, vec!["where.body"], "{err:?}");
    let renamed = vec![
        json!({"id": 1.0, "text_body": "a"}),
        json!({"id": 2.0, "text_body": "b"}),
    ];
    assert_eq!(query_all(&mut s).await.unwrap(), renamed);

    // Retyped: the same SQL, prepared for bigint on the one connection ("cached plan must not
    // change result type"), now runs on a fresh connection.
    sqlx::query("ALTER TABLE notes ALTER COLUMN id TYPE int")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(query_all(&mut s).await.unwrap(), renamed);

    // StreamQuery cannot retry (rows may be out already): the stream that trips fails, and the
    // next one runs on the table as it is.
    sqlx::query("ALTER TABLE notes DROP COLUMN text_body")
        .execute(&mut conn)
        .await
        .unwrap();
    let stream_all = |s: &mut DbSvc| {
        let mut client = s.client.clone();
        async move {
            let mut stream = client
                .stream_query(pb::StreamQueryRequest {
                    query: Some(pb::QueryRequest {
                        table: "notes".into(),
                        ..Default::default()
                    }),
                    batch_size: 10,
                })
                .await?
                .into_inner();
            let mut rows = Vec::new();
            while let Some(batch) = stream.message().await? {
                rows.extend(rows_json(&batch.rows));
            }
            Ok::<_, tonic::Status>(rows)
        }
    };
    let err = stream_all(&mut s).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let mut rows = stream_all(&mut s).await.unwrap();
    rows.sort_by(|a, b| a["id"].as_f64().partial_cmp(&b["id"].as_f64()).unwrap());
    assert_eq!(rows, vec![json!({"id": 1.0}), json!({"id": 2.0})]);
}

/// A request that trips on a table changed by a DDL that committed while it waited gets a
/// catalog read that started after it failed: one that started after the request arrived
/// but before the DDL committed (a DescribeTable in between) still shows the old table, and
/// sharing it would run the retry on that stale catalog.
#[tokio::test]
async fn a_retry_after_a_schema_change_never_reuses_a_read_that_predates_the_change() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE notes (id bigint PRIMARY KEY, body text, extra text)",
        "notes",
    )
    .await;
    insert(
        &mut s,
        "notes",
        vec![json!({"id": 1, "body": "a", "extra": "x"})],
    )
    .await;
    // The DDL holds its lock, uncommitted: the query below waits for it.
    let mut ddl = s.sql().await;
    for sql in ["BEGIN", "ALTER TABLE notes DROP COLUMN extra"] {
        sqlx::query(sql).execute(&mut ddl).await.unwrap();
    }
    let mut client = s.client.clone();
    let query = tokio::spawn(async move {
        client
            .query(pb::QueryRequest {
                table: "notes".into(),
                ..Default::default()
            })
            .await
            .map(|r| rows_json(&r.into_inner().rows))
    });
    let mut probe = s.sql().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = 'notes' AND NOT l.granted \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut probe)
        .await
        .unwrap();
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the query never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A catalog read after the query arrived, before the DROP commits: the old table.
    let described = s
        .client
        .describe_table(pb::DescribeTableRequest {
            table: "notes".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .table
        .unwrap();
    assert!(described.columns.iter().any(|c| c.name == "extra"));
    sqlx::query("COMMIT").execute(&mut ddl).await.unwrap();
    assert_eq!(
        query
            .await
            .unwrap()
            .expect("the retry runs on the table as it is"),
        vec![json!({"id": 1.0, "body": "a"})]
    );
}

/// A `json` column (not `jsonb`) filters and orders like a `jsonb` one: PostgreSQL has no
/// equality or order for `json` itself, so it is compared as `jsonb`.
#[tokio::test]
async fn json_columns_filter_and_order_as_jsonb() {
    let mut s =
        DbSvc::start_with("CREATE TABLE docs (id int PRIMARY KEY, body json)", "docs").await;
    insert(
        &mut s,
        "docs",
        vec![
            json!({"id": 1, "body": {"a": 2}}),
            json!({"id": 2, "body": {"a": 1}}),
            json!({"id": 3, "body": [1, 2]}),
        ],
    )
    .await;
    let ids = |request: pb::QueryRequest| {
        let mut client = s.client.clone();
        async move {
            let rows = client.query(request).await.unwrap().into_inner().rows;
            rows_json(&rows)
                .iter()
                .map(|r| r["id"].as_f64().unwrap())
                .collect::<Vec<f64>>()
        }
    };
    let docs = |filter: Option<pb::Filter>, r#where: Option<Json>| pb::QueryRequest {
        table: "docs".into(),
        filter,
        r#where: r#where.map(to_struct),
        ..Default::default()
    };
    let eq = cond("body", pb::Operator::Eq, Some(json!({"a": 1})));
    assert_eq!(ids(docs(Some(eq), None)).await, vec![2.0]);
    assert_eq!(
        ids(docs(None, Some(json!({"body": [1, 2]})))).await,
        vec![3.0]
    );
    let one_of = cond("body", pb::Operator::In, Some(json!([{"a": 2}, {"a": 1}])));
    let ordered = pb::QueryRequest {
        order_by: vec![pb::OrderBy {
            column: "body".into(),
            ..Default::default()
        }],
        ..docs(Some(one_of), None)
    };
    assert_eq!(ids(ordered).await, vec![2.0, 1.0]);
}

/// The one-byte `"char"` type (not `char(n)`) has no mapping: it reads as its text and is
/// not writable, rather than being written through a text parameter that PostgreSQL would
/// cut to its first byte.
#[tokio::test]
async fn the_one_byte_char_type_reads_as_text_and_is_not_written() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE flags (id int PRIMARY KEY, flag \"char\")",
        "flags",
    )
    .await;
    let err = s
        .client
        .insert(pb::InsertRequest {
            table: "flags".into(),
            rows: vec![to_struct(json!({"id": 1, "flag": "abc"}))],
            ..Default::default()
        })
        .await
        .expect_err("not writable");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(s.count_all("flags").await, 0);
    let back = insert(&mut s, "flags", vec![json!({"id": 1})]).await;
    assert_eq!(back, vec![json!({"id": 1.0, "flag": null})]);
    let mut conn = s.sql().await;
    sqlx::query("UPDATE flags SET flag = 'z'")
        .execute(&mut conn)
        .await
        .unwrap();
    let rows = s
        .client
        .query(pb::QueryRequest {
            table: "flags".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(rows_json(&rows), vec![json!({"id": 1.0, "flag": "z"})]);
}

/// `char(n)` reads back without its blank padding, as PostgreSQL's own `::text` gives it, so
/// the string a client reads is one it can filter, update and delete by.
#[tokio::test]
async fn char_n_values_read_back_as_they_filter() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE codes (id int PRIMARY KEY, code char(5), label varchar(10))",
        "codes",
    )
    .await;
    let back = insert(
        &mut s,
        "codes",
        vec![json!({"id": 1, "code": "ab", "label": "x  "})],
    )
    .await;
    // varchar keeps what was written, spaces included; char(n) drops its padding.
    assert_eq!(back, vec![json!({"id": 1.0, "code": "ab", "label": "x  "})]);
    let rows = s
        .client
        .query(pb::QueryRequest {
            table: "codes".into(),
            r#where: Some(to_struct(json!({"code": back[0]["code"]}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(
        rows_json(&rows),
        vec![json!({"id": 1.0, "code": "ab", "label": "x  "})]
    );
    // LIKE matches the value as read too (PostgreSQL's own char(n) LIKE counts the padding).
    for (op, pattern) in [(pb::Operator::Like, "ab"), (pb::Operator::Ilike, "AB")] {
        let rows = s
            .client
            .query(pb::QueryRequest {
                table: "codes".into(),
                filter: Some(cond("code", op, Some(json!(pattern)))),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .rows;
        assert_eq!(rows.len(), 1, "{op:?} {pattern}");
    }
    let updated = s
        .client
        .update(pb::UpdateRequest {
            table: "codes".into(),
            r#where: Some(to_struct(json!({"code": "ab"}))),
            set: Some(to_struct(json!({"label": "y"}))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.affected, 1);
    // What the column holds is still the padded value.
    let mut conn = s.sql().await;
    let bytes: i32 = sqlx::query_scalar("SELECT octet_length(code) FROM codes")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(bytes, 5);
}
