//! db-svc CRUD end to end, against the real PostgreSQL: every operation, every filter operator,
//! the type mapping both ways, the catalog (ListTables / DescribeTable / a column added at run
//! time), timestamps filled automatically.

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{DbSvc, action, from_struct, rows_json, to_struct, to_value};
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
    let left = s
        .client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count;
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
        "pattern_data": {"a": {"b": [1, 2.5, null, true, "s"]}},
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
    assert_eq!(
        back["pattern_data"],
        json!({"a": {"b": [1.0, 2.5, null, true, "s"]}})
    );
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
        let mut streamed = Vec::new();
        while let Some(batch) = stream.message().await.unwrap() {
            streamed.extend(batch.rows);
        }
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
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query(
            "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL, \
             created_at timestamptz, updated_at timestamptz)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let mut s = DbSvc::start_on(db, &["--tables", "notes,agent_actions"]).await;
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
    let mut n = 0;
    while let Some(batch) = stream.message().await.unwrap() {
        n += batch.rows.len();
    }
    assert_eq!(n, 10);
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

/// A bigint beyond ±2^53 (where a double rounds) goes out as its decimal text, exactly, in
/// generic rows and typed rows alike; it comes back in, and filters, as that text. So does a
/// numeric with more digits than a double keeps.
#[tokio::test]
async fn bigints_beyond_doubles_round_trip_exactly() {
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query(
            "CREATE TABLE counters (id bigint PRIMARY KEY, n bigint, amount numeric(30,10))",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let mut s = DbSvc::start_on(db, &["--tables", "counters"]).await;
    let big = "9007199254740993"; // 2^53 + 1: a double would read 9007199254740992
    let back = insert(
        &mut s,
        "counters",
        vec![
            json!({"id": 1, "n": big, "amount": "1234567890123456789.012345678"}),
            json!({"id": 2, "n": 9_007_199_254_740_992i64 as f64, "amount": 0.5}),
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
        json!({"id": 2.0, "n": 9_007_199_254_740_992.0, "amount": 0.5})
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
                n: Some(9_007_199_254_740_992),
                amount: Some(0.5),
            },
        ]
    );

    // A double that cannot be the integer meant is refused, naming the field.
    let err = s
        .client
        .insert(pb::InsertRequest {
            table: "counters".into(),
            rows: vec![to_struct(json!({"id": 3, "n": 1e17}))],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("decimal string"), "{err:?}");
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
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
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
