//! db-svc refuses what the original adapter let through, with the right status and details:
//! bad input, runaway updates/deletes, constraint violations, injection attempts, deadlines,
//! an unreachable database.

use std::time::{Duration, Instant};

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{
    DbSvc, TableLock, action, error_details, error_metadata, rows_json, streamed_rows, to_struct,
    to_value,
};
use omnibus_tests::{ServiceSpec, free_port};
use serde_json::{Value as Json, json};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn cond(column: &str, op: pb::Operator, value: Json) -> pb::Filter {
    pb::Filter {
        kind: Some(pb::filter::Kind::Condition(pb::Condition {
            column: column.into(),
            op: op as i32,
            value: Some(to_value(value)),
        })),
    }
}

fn insert_req(table: &str, rows: Vec<Json>) -> pb::InsertRequest {
    pb::InsertRequest {
        table: table.into(),
        rows: rows.into_iter().map(to_struct).collect(),
        ..Default::default()
    }
}

fn assert_invalid(status: &tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let (reason, fields) = error_details(status);
    assert_eq!(reason, "VALIDATION_ERROR", "{status:?}");
    assert!(
        fields.iter().any(|f| f == field),
        "want field {field}, got {fields:?} ({})",
        status.message()
    );
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let mut s = DbSvc::start(&["--query-max-limit", "500"]).await;

    let err = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actionz".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "table");

    let err = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_nmae": "x"}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "where.agent_nmae");

    let err = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            columns: vec!["id".into(), "nope".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "columns[1]");

    let err = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            order_by: vec![pb::OrderBy {
                column: "nope".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "order_by[0].column");

    let err = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            limit: Some(501),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "limit");

    let mut bogus = action("a");
    bogus["bogus"] = json!(1);
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![action("ok"), bogus]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[1].bogus");

    let mut wrong = action("a");
    wrong["duration_ms"] = json!("slow");
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![wrong]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].duration_ms");

    // PostgreSQL text and jsonb cannot hold U+0000: refused up front, naming the field.
    let mut nul = action("a");
    nul["action_name"] = json!("read\u{0}file");
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![action("ok"), nul]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[1].action_name");
    let mut nul = action("a");
    nul["action_details"] = json!({"path": ["a", "b\u{0}"]});
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![nul]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].action_details");

    let mut too_big = action("a");
    too_big["duration_ms"] = json!(3_000_000_000i64);
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![too_big]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].duration_ms");

    let mut fractional = action("a");
    fractional["duration_ms"] = json!(1.5);
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![fractional]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].duration_ms");

    let mut bad_uuid = action("a");
    bad_uuid["correlation_id"] = json!("abc123");
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![bad_uuid]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].correlation_id");

    let mut bad_time = action("a");
    bad_time["created_at"] = json!("yesterday at noon");
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![bad_time]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].created_at");

    let mut wrong_bool = action("a");
    wrong_bool["debug_mode"] = json!("yes");
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![wrong_bool]))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].debug_mode");

    let err = s
        .client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            filter: Some(cond(
                "correlation_id",
                pb::Operator::Eq,
                json!("not-a-uuid"),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "filter.condition.value");

    let err = s
        .client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            filter: Some(cond("duration_ms", pb::Operator::Like, json!("1%"))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "filter.condition.op");

    // NOT NULL violations name the row and the column: PostgreSQL names only the column, the
    // request tells which row left it out or null.
    let err = s
        .client
        .insert(insert_req(
            "agent_actions",
            vec![json!({"correlation_id": uuid::Uuid::new_v4().to_string(), "agent_name": "a", "action_type": "t"})],
        ))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].action_name");
    let err = s
        .client
        .insert(insert_req(
            "agent_actions",
            vec![action("a"), action("b"), {
                let mut row = action("c");
                row["action_name"] = Json::Null;
                row
            }],
        ))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[2].action_name");
    // A row that leaves out a column with a default (severity: 'error') gets the default: the
    // row that sends null is named, in inserts and upserts alike.
    let rows = || {
        vec![
            json!({"id": uuid::Uuid::new_v4().to_string(), "error_type": "a", "error_message": "m"}),
            json!({"id": uuid::Uuid::new_v4().to_string(), "error_type": "b", "error_message": "m",
                   "severity": null}),
        ]
    };
    let err = s
        .client
        .insert(insert_req("error_events", rows()))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[1].severity");
    let err = s
        .client
        .upsert(pb::UpsertRequest {
            table: "error_events".into(),
            rows: rows().into_iter().map(to_struct).collect(),
            // (Rows that update on conflict must all give the same columns.)
            ignore_duplicates: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[1].severity");
    assert_eq!(s.count_all("error_events").await, 0);

    // Out of range for numeric(5,4).
    let err = s
        .client
        .insert(insert_req(
            "agent_routing_decisions",
            vec![json!({"correlation_id": uuid::Uuid::new_v4().to_string(), "selected_agent": "a", "confidence_score": 12.5})],
        ))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].confidence_score");
    assert!(err.message().contains("numeric(5,4)"), "{err:?}");

    // Longer than varchar(n): PostgreSQL's error names neither row nor column; db-svc's does.
    let node = |name: String| {
        json!({"id": uuid::Uuid::new_v4().to_string(), "pattern_id": "p",
               "pattern_name": name, "pattern_type": "t", "pattern_version": uuid::Uuid::new_v4().to_string(),
               "lineage_id": uuid::Uuid::new_v4().to_string(), "generation": 1,
               "pattern_data": {}, "correlation_id": uuid::Uuid::new_v4().to_string()})
    };
    let err = s
        .client
        .insert(insert_req(
            "pattern_lineage_nodes",
            vec![
                node("short".into()),
                node("x".repeat(256)),
                node("y".into()),
            ],
        ))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[1].pattern_name");
    assert!(
        err.message()
            .contains("character varying(255): 256 characters"),
        "{err:?}"
    );
    assert_eq!(s.count_all("pattern_lineage_nodes").await, 0);

    assert_eq!(s.count_all("agent_actions").await, 0, "nothing was written");

    // An update that would null a NOT NULL column names `set.<column>`; the row is unchanged.
    s.seed_actions(vec![action("kept")]).await;
    let err = s
        .client
        .update(pb::UpdateRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "kept"}))),
            set: Some(to_struct(json!({"action_name": null}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "set.action_name");
    let reply = s
        .client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(
                json!({"agent_name": "kept", "action_name": "read_file"}),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // (`action_name` is NOT NULL, so counting nulls could never fail: count the kept value.)
    assert_eq!(reply.count, 1, "the row keeps its action_name");
}

/// A column whose type has no mapping (interval, an enum) is not writable, not even as null:
/// refused up front naming the field, as a value is, instead of PostgreSQL's type error
/// (which names no field and made db-svc read the catalog again and retry for nothing).
#[tokio::test]
async fn unsupported_columns_are_refused_in_writes_even_as_null() {
    let mut s = DbSvc::start_with(
        "CREATE TYPE mood AS ENUM ('ok', 'sad'); \
         CREATE TABLE waits (id int PRIMARY KEY, d interval, m mood); \
         INSERT INTO waits VALUES (1, '1 day', 'ok')",
        "waits",
    )
    .await;
    for (column, value) in [("d", Json::Null), ("m", Json::Null), ("m", json!("sad"))] {
        let err = s
            .client
            .insert(insert_req(
                "waits",
                vec![json!({"id": 2}), json!({"id": 3, column: value})],
            ))
            .await
            .unwrap_err();
        assert_invalid(&err, &format!("rows[1].{column}"));
        let err = s
            .client
            .upsert(pb::UpsertRequest {
                table: "waits".into(),
                rows: vec![to_struct(json!({"id": 1, column: value}))],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_invalid(&err, &format!("rows[0].{column}"));
        let err = s
            .client
            .update(pb::UpdateRequest {
                table: "waits".into(),
                r#where: Some(to_struct(json!({"id": 1}))),
                set: Some(to_struct(json!({column: value}))),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_invalid(&err, &format!("set.{column}"));
    }
    let rows = s
        .client
        .query(pb::QueryRequest {
            table: "waits".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    assert_eq!(
        rows_json(&rows),
        vec![json!({"id": 1.0, "d": "1 day", "m": "ok"})],
        "nothing written"
    );
}

#[tokio::test]
async fn updates_and_deletes_cannot_run_away() {
    let mut s = DbSvc::start(&[]).await;
    s.client
        .insert(insert_req(
            "agent_actions",
            vec![action("a"), action("a"), action("a"), action("b")],
        ))
        .await
        .unwrap();

    // No filter at all, an empty where, an empty filter tree: FAILED_PRECONDITION.
    for (r#where, filter) in [
        (None, None),
        (Some(to_struct(json!({}))), None),
        (
            None,
            Some(pb::Filter {
                kind: Some(pb::filter::Kind::All(pb::FilterList { filters: vec![] })),
            }),
        ),
    ] {
        let err = s
            .client
            .delete(pb::DeleteRequest {
                table: "agent_actions".into(),
                r#where: r#where.clone(),
                filter: filter.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(error_details(&err).0, "FILTER_REQUIRED");
        let err = s
            .client
            .update(pb::UpdateRequest {
                table: "agent_actions".into(),
                r#where,
                filter,
                set: Some(to_struct(json!({"agent_name": "z"}))),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    }

    // A typo in a filter key is an error, never a silently dropped condition.
    let err = s
        .client
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agentname": "a"}))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "where.agentname");

    // max_affected: more rows would change -> rolled back, FAILED_PRECONDITION.
    let err = s
        .client
        .update(pb::UpdateRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "a"}))),
            set: Some(to_struct(json!({"agent_name": "c"}))),
            max_affected: Some(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(error_details(&err).0, "TOO_MANY_ROWS");
    assert_eq!(error_metadata(&err, "would_affect").as_deref(), Some("3"));
    let err = s
        .client
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "a"}))),
            max_affected: Some(1),
            count_only: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_details(&err).0, "TOO_MANY_ROWS");
    assert_eq!(s.count_all("agent_actions").await, 4, "nothing deleted");
    let reply = s
        .client
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "a"}))),
            max_affected: Some(3),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 3);
    assert_eq!(s.count_all("agent_actions").await, 1);
}

/// A trigger's own refusal (`RAISE EXCEPTION`) is the database's rule, not a server bug:
/// FAILED_PRECONDITION with its message, and nothing written.
#[tokio::test]
async fn exceptions_raised_by_triggers_are_failed_preconditions() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);
         CREATE FUNCTION refuse_shouting() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.body = upper(NEW.body) THEN
             RAISE EXCEPTION 'no shouting: %', NEW.body;
           END IF;
           RETURN NEW;
         END $$;
         CREATE TRIGGER notes_no_shouting BEFORE INSERT OR UPDATE ON notes
           FOR EACH ROW EXECUTE FUNCTION refuse_shouting();",
        "notes",
    )
    .await;
    s.client
        .insert(insert_req("notes", vec![json!({"body": "quiet"})]))
        .await
        .unwrap();
    let err = s
        .client
        .insert(insert_req(
            "notes",
            vec![json!({"body": "fine"}), json!({"body": "LOUD"})],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(error_details(&err).0, "RAISED_EXCEPTION");
    assert!(err.message().contains("no shouting: LOUD"), "{err:?}");
    assert_eq!(
        s.count_all("notes").await,
        1,
        "the statement was rolled back"
    );
}

#[tokio::test]
async fn constraint_violations_name_the_constraint() {
    let mut s = DbSvc::start(&[]).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut row = action("a");
    row["id"] = json!(id);
    s.client
        .insert(insert_req("agent_actions", vec![row.clone()]))
        .await
        .unwrap();
    let err = s
        .client
        .insert(insert_req("agent_actions", vec![action("b"), row]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(error_details(&err).0, "CONFLICT");
    assert_eq!(
        error_metadata(&err, "constraint").as_deref(),
        Some("agent_actions_pkey")
    );
    assert_eq!(
        s.count_all("agent_actions").await,
        1,
        "one statement, one transaction"
    );

    let err = s
        .client
        .insert(insert_req(
            "pattern_lineage_edges",
            vec![json!({
                "source_node_id": uuid::Uuid::new_v4().to_string(),
                "target_node_id": uuid::Uuid::new_v4().to_string(),
                "edge_type": "derived",
            })],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(error_details(&err).0, "CONSTRAINT_VIOLATION");
    assert_eq!(
        error_metadata(&err, "constraint").as_deref(),
        Some("pattern_lineage_edges_source_node_id_fkey")
    );

    let err = s
        .client
        .insert(insert_req(
            "error_events",
            vec![json!({"error_type": "X", "error_message": "m", "severity": "apocalyptic"})],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        error_metadata(&err, "constraint").as_deref(),
        Some("error_events_severity_check")
    );
}

#[tokio::test]
async fn injection_attempts_change_nothing() {
    let mut s = DbSvc::start(&[]).await;
    let evil = "x'); DROP TABLE agent_actions; --";
    let quoted = "a\"b'c\\d";
    let mut row = action(evil);
    row["action_name"] = json!(quoted);
    row["action_details"] = json!({"sql": "'; DELETE FROM agent_actions; --"});
    s.client
        .insert(insert_req("agent_actions", vec![row, action("innocent")]))
        .await
        .unwrap();

    // Values are bound: they match themselves, literally.
    let reply = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(
                json!({"agent_name": evil, "action_name": quoted}),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rows = rows_json(&reply.rows);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["agent_name"], json!(evil));
    assert_eq!(rows[0]["action_name"], json!(quoted));
    let reply = s
        .client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            filter: Some(cond("agent_name", pb::Operator::Eq, json!("x' OR '1'='1"))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.count, 0);

    // Identifiers come only from the catalog.
    let err = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions\"; DROP TABLE agent_actions; --".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "table");
    for column in [
        "agent_name\" = 'x' OR 1=1 --",
        "agent_name; DROP TABLE agent_actions",
        "(SELECT 1)",
        "*",
    ] {
        let err = s
            .client
            .delete(pb::DeleteRequest {
                table: "agent_actions".into(),
                filter: Some(cond(column, pb::Operator::Eq, json!("x"))),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_invalid(&err, "filter.condition.column");
        let err = s
            .client
            .query(pb::QueryRequest {
                table: "agent_actions".into(),
                order_by: vec![pb::OrderBy {
                    column: column.into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_invalid(&err, "order_by[0].column");
        let mut row = action("a");
        row[column] = json!(1);
        let err = s
            .client
            .insert(insert_req("agent_actions", vec![row]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
    assert_eq!(s.count_all("agent_actions").await, 2);
}

#[tokio::test]
async fn deadline_becomes_the_statement_timeout() {
    // A default far beyond the test, so only the deadline can end the statement.
    let mut s = DbSvc::start(&["--statement-timeout", "120s"]).await;
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;

    let mut request = tonic::Request::new(pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    });
    // Long enough that db-svc's margin (a tenth, here 250 ms) covers a busy machine's reply.
    request.set_timeout(Duration::from_millis(2500));
    let started = Instant::now();
    let err = s.client.count(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        error_details(&err).0,
        "TIMEOUT",
        "PostgreSQL's statement timeout fired"
    );
    // The TIMEOUT reason says the deadline ended it; this only bounds the wait far below the
    // 120 s statement timeout.
    assert!(started.elapsed() < Duration::from_secs(30));

    // PostgreSQL itself gave up on the statement (no waiting query left behind), long before
    // the 120 s default would have.
    lock.wait_blocked(&s, 0).await;
    lock.release().await;

    // Without a deadline the same call works.
    assert_eq!(s.count_all("agent_actions").await, 0);
}

#[tokio::test]
async fn unreachable_database_is_unavailable() {
    let port = free_port();
    let mut svc = ServiceSpec::new("db-svc")
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/nowhere"),
        )
        .args(["--db-acquire-timeout", "1s", "--shutdown-grace", "1s"])
        .spawn()
        .unwrap();
    svc.wait_health("", ServingStatus::NotServing, Duration::from_secs(30))
        .await
        .unwrap();
    let mut client =
        omnibus_proto::db::v1::database_service_client::DatabaseServiceClient::new(svc.channel());
    let err = client
        .insert(insert_req("agent_actions", vec![action("a")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(error_details(&err).0, "DATABASE_UNAVAILABLE");
    let err = client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // A deadline shorter than the pool's acquire timeout cuts the connection attempts short:
    // still UNAVAILABLE (the database is down), not DEADLINE_EXCEEDED.
    let deadline = Duration::from_millis(700);
    let err = client
        .insert(with_deadline(
            insert_req("agent_actions", vec![action("a")]),
            deadline,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(error_details(&err).0, "DATABASE_UNAVAILABLE");
    let err = client
        .count(with_deadline(
            pb::CountRequest {
                table: "agent_actions".into(),
                ..Default::default()
            },
            deadline,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

/// A call with `timeout` set as its gRPC deadline.
/// A `StreamQuery` of every `agent_actions` row, `batch_size` rows per message.
fn every_action(batch_size: u32) -> pb::StreamQueryRequest {
    pb::StreamQueryRequest {
        query: Some(pb::QueryRequest {
            table: "agent_actions".into(),
            ..Default::default()
        }),
        batch_size,
    }
}

fn with_deadline<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// The call failed because PostgreSQL's statement timeout, lowered to its deadline, fired
/// (the TIMEOUT reason); the time only bounds it far below the 120 s statement timeout.
fn assert_timed_out<T: std::fmt::Debug>(result: Result<T, tonic::Status>, started: Instant) {
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(error_details(&err).0, "TIMEOUT", "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// The deadline bounds writes and ExecuteRaw as it does Count: statements waiting on a lock
/// time out within it (DEADLINE_EXCEEDED / TIMEOUT), write nothing and record no request id.
#[tokio::test]
async fn deadline_bounds_writes_and_raw_statements() {
    let mut s = DbSvc::start(&["--statement-timeout", "120s", "--raw-sql-writes", "true"]).await;
    s.seed_actions(vec![action("a"), action("a")]).await;
    let deadline = Duration::from_millis(500);
    let update = pb::UpdateRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({"agent_name": "a"}))),
        set: Some(to_struct(json!({"agent_name": "updated"}))),
        request_id: "slow-update".into(),
        ..Default::default()
    };

    // SHARE blocks writes.
    let lock = TableLock::take(&s, "SHARE").await;
    let started = Instant::now();
    let result = s
        .client
        .update(with_deadline(update.clone(), deadline))
        .await;
    assert_timed_out(result, started);
    let started = Instant::now();
    let result = s
        .client
        .delete(with_deadline(
            pb::DeleteRequest {
                table: "agent_actions".into(),
                r#where: Some(to_struct(json!({"agent_name": "a"}))),
                count_only: true,
                ..Default::default()
            },
            deadline,
        ))
        .await;
    assert_timed_out(result, started);
    let started = Instant::now();
    let result = s
        .client
        .execute_raw(with_deadline(
            pb::ExecuteRawRequest {
                sql: "UPDATE agent_actions SET agent_name = $1".into(),
                params: vec![to_value(json!("raw"))],
                request_id: "slow-raw".into(),
            },
            deadline,
        ))
        .await;
    assert_timed_out(result, started);
    // PostgreSQL gave up on each (none is left waiting for the lock).
    lock.wait_blocked(&s, 0).await;
    lock.release().await;

    // ACCESS EXCLUSIVE blocks reads too: a raw query times out the same way.
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let started = Instant::now();
    let result = s
        .client
        .execute_raw(with_deadline(
            pb::ExecuteRawRequest {
                sql: "SELECT agent_name, count(*) AS n FROM agent_actions GROUP BY agent_name"
                    .into(),
                ..Default::default()
            },
            deadline,
        ))
        .await;
    assert_timed_out(result, started);
    lock.wait_blocked(&s, 0).await;
    lock.release().await;

    // Nothing was written, no request id recorded.
    let mut conn = s.sql().await;
    let agents: Vec<String> =
        sqlx::query_scalar("SELECT agent_name FROM agent_actions ORDER BY agent_name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(agents, vec!["a", "a"]);
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM omnibus_request_log")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(recorded, 0);

    // Unblocked, the same calls work (the request id was free) and the raw read answers.
    let reply = s.client.update(update).await.unwrap().into_inner();
    assert_eq!((reply.affected, reply.replayed), (2, false));
    let reply = s
        .client
        .execute_raw(with_deadline(
            pb::ExecuteRawRequest {
                sql: "SELECT agent_name, count(*) AS n FROM agent_actions GROUP BY agent_name"
                    .into(),
                ..Default::default()
            },
            Duration::from_secs(10),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&reply.rows),
        vec![json!({"agent_name": "updated", "n": 2.0})]
    );
}

/// Input that is legal protobuf but that no statement can carry is refused up front, naming
/// the field, instead of failing inside PostgreSQL or the driver: NaN and infinite numbers, more
/// values than one statement can bind, results larger than a response may hold, and values
/// beyond PostgreSQL's program limits.
#[tokio::test]
async fn oversized_and_non_finite_input_is_refused_by_field() {
    let mut s = DbSvc::start(&["--query-max-limit", "10"]).await;
    // NaN and infinities: protobuf numbers can carry them, JSON and most columns cannot.
    let mut row = to_struct(action("a"));
    row.fields.insert(
        "duration_ms".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::NumberValue(f64::NAN)),
        },
    );
    let err = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![row],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "rows[0].duration_ms");
    let err = s
        .client
        .execute_raw(pb::ExecuteRawRequest {
            sql: "SELECT $1::float8 AS x".into(),
            params: vec![prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(f64::INFINITY)),
            }],
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "params[0]");

    // 65,536 values in an IN list: one more than a statement can bind.
    let many: Vec<Json> = (0..65_536).map(|i| json!(format!("agent-{i}"))).collect();
    let err = s
        .client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            filter: Some(cond("agent_name", pb::Operator::In, Json::Array(many))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "filter");
    assert!(err.message().contains("65535"), "{err:?}");
    // Rows x columns past the limit in one insert.
    let rows: Vec<Json> = (0..16_400).map(|i| action(&format!("bulk-{i}"))).collect();
    let err = s
        .client
        .insert(insert_req("agent_actions", rows))
        .await
        .unwrap_err();
    assert_invalid(&err, "rows");
    assert_eq!(s.count_all("agent_actions").await, 0, "nothing was written");

    // A raw statement returning more rows than --query-max-limit fails before they fill memory.
    let raw = |sql: &str| pb::ExecuteRawRequest {
        sql: sql.into(),
        params: vec![],
        request_id: String::new(),
    };
    let ok = s
        .client
        .execute_raw(raw("SELECT generate_series(1, 10) AS g"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.rows.len(), 10);
    let err = s
        .client
        .execute_raw(raw("SELECT generate_series(1, 300000000) AS g"))
        .await
        .unwrap_err();
    assert_invalid(&err, "sql");
    assert!(err.message().contains("more than 10 rows"), "{err:?}");

    // PostgreSQL's program limits (SQLSTATE class 54) are the caller's input, not INTERNAL.
    let err = s
        .client
        .execute_raw(raw("SELECT repeat('x', 1073741824) AS huge"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// A StreamQuery whose reader stops reading is ended once it has taken no batch for the
/// statement timeout: its pooled connection and transaction are freed, and a reader that comes
/// back sees an error after the rows it was sent, never a silently truncated success.
#[tokio::test]
async fn a_stalled_stream_reader_frees_its_connection() {
    let s = DbSvc::start(&["--statement-timeout", "1s"]).await;
    let mut conn = s.sql().await;
    // ~6 MB of rows: far more than the HTTP/2 windows and the stream's two batches hold.
    omnibus_tests::db::insert_padded_actions(&mut conn, "stall", 200, 20000).await;
    let mut client = s.client.clone();
    let mut stream = client
        .stream_query(every_action(100))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first batch");
    assert_eq!(first.rows.len(), 100);
    // Stop reading. Within a few seconds no backend of this database is left in a transaction.
    let database = s.db.name.clone();
    let in_transaction = || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND pid <> pg_backend_pid() \
             AND (state LIKE 'idle in transaction%' OR state = 'active')",
        )
        .bind(database.clone())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = in_transaction().fetch_one(&mut conn).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stalled stream still holds {n} connection(s)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The reader comes back: the batches already sent, then DEADLINE_EXCEEDED.
    let mut received = 100;
    let end = loop {
        match stream.message().await {
            Ok(Some(batch)) => received += batch.rows.len(),
            Ok(None) => panic!("the stream ended as a success after {received} of 20000 rows"),
            Err(status) => break status,
        }
    };
    assert!(received < 20_000, "{received}");
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert!(end.message().contains("took no batch"), "{end:?}");
}

/// A request's deadline counts from its arrival: time spent waiting for a pooled connection
/// is taken from it, and db-svc answers DEADLINE_EXCEEDED with its own TIMEOUT reason just
/// before the caller's deadline, instead of the wait running past it - also after the pool
/// has been busy for longer than a health probe waits (a busy pool is not an outage).
#[tokio::test]
async fn waiting_for_a_connection_counts_against_the_deadline() {
    // Waits for a connection and statements that only the deadline can cut short.
    let s = DbSvc::start(&[
        "--db-max-connections",
        "1",
        "--db-acquire-timeout",
        "120s",
        "--statement-timeout",
        "120s",
    ])
    .await;
    // The pool's one connection runs a count that waits on a table lock.
    let lock = omnibus_tests::db::TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let mut busy = s.client.clone();
    let holder = tokio::spawn(async move {
        busy.count(pb::CountRequest {
            table: "agent_actions".into(),
            ..Default::default()
        })
        .await
    });
    lock.wait_blocked(&s, 1).await;
    let mut request = tonic::Request::new(pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(1));
    let started = Instant::now();
    let err = s.client.clone().count(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        error_details(&err).0,
        "TIMEOUT",
        "db-svc's own answer: {err:?}"
    );
    // Far below the 120 s acquire timeout.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );

    // Long enough for several health probes (3 s timeout, every 2 s): a pool busy with a long
    // statement is not an outage. The probe has a connection of its own, so db-svc stays
    // SERVING and a short deadline is still DEADLINE_EXCEEDED, not UNAVAILABLE.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let status = s
        .svc
        .health(omnibus_proto::service_names::DATABASE)
        .await
        .unwrap();
    assert_eq!(status, ServingStatus::Serving);
    let mut request = tonic::Request::new(pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(1));
    let err = s.client.clone().count(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    lock.release().await;
    assert_eq!(holder.await.unwrap().unwrap().into_inner().count, 0);
}

/// `--max-connection-age` sends a GOAWAY at the age: an idle connection then closes, so the
/// next call opens a new one and is not cut when the old connection's grace ends; a call in
/// flight on a connection keeps it until age + grace, and is cut then.
#[tokio::test]
async fn connection_age_sends_goaway_and_ends_connections_after_the_grace() {
    const AGE: Duration = Duration::from_secs(2);
    const GRACE: Duration = Duration::from_secs(4);
    let s = DbSvc::start(&[
        "--max-connection-age",
        "2s",
        "--max-connection-age-grace",
        "4s",
    ])
    .await;
    let lock = omnibus_tests::db::TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    // A count, and when it ended.
    let count = |channel: tonic::transport::Channel| {
        let mut client = pb::database_service_client::DatabaseServiceClient::new(channel);
        tokio::spawn(async move {
            let result = client
                .count(pb::CountRequest {
                    table: "agent_actions".into(),
                    ..Default::default()
                })
                .await;
            (result, Instant::now())
        })
    };
    // Two connections: one busy from the start, one idle until after the age. A connection's
    // age starts between the Instant before its first call and the one after it returned.
    let up = |channel: tonic::transport::Channel| async move {
        let before = Instant::now();
        pb::database_service_client::DatabaseServiceClient::new(channel)
            .list_tables(pb::ListTablesRequest {})
            .await
            .expect("the connection is up");
        (before, Instant::now())
    };
    let (busy, idle) = (s.svc.channel(), s.svc.channel());
    let (busy_opening, busy_open) = up(busy.clone()).await;
    let (_, idle_open) = up(idle.clone()).await;
    let early = count(busy);
    lock.wait_blocked(&s, 1).await;
    // Well after the GOAWAY at the idle connection's age, its channel's next call needs a new
    // connection.
    tokio::time::sleep_until((idle_open + AGE + Duration::from_millis(1500)).into()).await;
    let late = count(idle);
    lock.wait_blocked(&s, 2).await;
    // The lock is held until the early call has ended: only the cut can end it.
    let (early, ended) = tokio::time::timeout(Duration::from_secs(30), early)
        .await
        .expect("the busy connection is cut at age + grace")
        .unwrap();
    assert!(early.is_err(), "cut at age + grace: {early:?}");
    // Not before age + grace of the earliest the connection can have opened (timers may fire
    // a little early), and not long after that of the latest.
    let (at_least, at_most) = (
        ended.duration_since(busy_opening),
        ended.duration_since(busy_open),
    );
    assert!(
        at_least >= AGE + GRACE - Duration::from_millis(200)
            && at_most < AGE + GRACE + Duration::from_secs(10),
        "cut {at_least:?} after the connection's first call started, {at_most:?} after it returned"
    );
    lock.release().await;
    let (late, _) = late.await.unwrap();
    assert_eq!(
        late.unwrap().into_inner().count,
        0,
        "the call made after the age outlives the old connection's grace"
    );
}

/// SIGTERM with a statement still running (a count held by a table lock): db-svc drains for
/// its grace, stops waiting for the busy connection shortly after, and exits 0, well within
/// an orchestrator's stop timeout, rather than waiting for the statement.
#[tokio::test]
async fn sigterm_does_not_wait_for_a_statement_still_running() {
    let mut s = DbSvc::start(&[]).await;
    let (lock, held) = omnibus_tests::db::TableLock::held_count(&s).await;
    let started = Instant::now();
    s.svc.terminate().unwrap();
    let status = s.svc.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exited after {:?}",
        started.elapsed()
    );
    assert!(
        held.await.unwrap().is_err(),
        "the held call did not complete"
    );
    drop(lock);
}

/// A client watching health (`grpc.health.v1.Health/Watch`) sees NOT_SERVING on SIGTERM, then
/// its stream ends, so it does not hold the drain for the whole grace period.
#[tokio::test]
async fn health_watchers_see_not_serving_and_do_not_hold_shutdown() {
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(["--shutdown-grace", "30s", "--bus", "false"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(svc.channel());
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let started = Instant::now();
    svc.terminate().unwrap();
    let mut seen = Vec::new();
    while let Ok(Some(update)) = watch.message().await {
        seen.push(update.status());
    }
    assert_eq!(seen.last(), Some(&ServingStatus::NotServing), "{seen:?}");
    let status = svc.wait_exit(Duration::from_secs(25)).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exited after {:?} (grace 30 s)",
        started.elapsed()
    );
}

/// A `StreamQuery` cut short by SIGTERM ends with UNAVAILABLE, never with OK: its messages
/// carry no end marker, so an OK status would pass the rows received off as the whole result.
#[tokio::test]
async fn a_stream_query_cut_by_shutdown_ends_with_an_error_not_ok() {
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(["--shutdown-grace", "10s", "--bus", "false"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    {
        let mut conn = db.connect().await;
        omnibus_tests::db::insert_padded_actions(&mut conn, "many", 500, 20_000).await;
    }
    let mut client = pb::database_service_client::DatabaseServiceClient::new(svc.channel());
    let mut stream = client
        .stream_query(every_action(10))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first batch");
    assert_eq!(first.rows.len(), 10);
    svc.terminate().unwrap();
    let mut rows = first.rows.len();
    let end = loop {
        match stream.message().await {
            Ok(Some(batch)) => rows += batch.rows.len(),
            other => break other,
        }
    };
    let err = end.expect_err("a stream cut short must not end OK");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{err:?}");
    assert!(rows < 20_000, "the stream was cut ({rows} rows)");
    let status = svc.wait_exit(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "{status:?}");
}

/// A write on a database that takes none (a hot standby after a failover, or
/// `default_transaction_read_only`) is UNAVAILABLE, for a retry against the new primary, not
/// PERMISSION_DENIED (which the bus and clients treat as final).
#[tokio::test]
async fn a_write_to_a_read_only_database_is_unavailable() {
    let s = DbSvc::start(&[]).await;
    let mut conn = s.sql().await;
    sqlx::query(&format!(
        "ALTER DATABASE \"{}\" SET default_transaction_read_only = on",
        s.db.name
    ))
    .execute(&mut conn)
    .await
    .unwrap();
    // db-svc's sessions started before the setting: end them, so that new ones take it.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&s.db.name)
    .execute(&mut conn)
    .await
    .unwrap();
    let mut client = s.client.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        let err = client
            .insert(insert_req("agent_actions", vec![action("ro")]))
            .await
            .unwrap_err();
        // A call may first meet a session that was just ended; that is UNAVAILABLE too, but
        // not the answer under test.
        if err.message().contains("accepts no writes") {
            break err;
        }
        assert!(Instant::now() < deadline, "{err:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(error_details(&err).0, "DATABASE_UNAVAILABLE");
    // Reads still work.
    let reply = client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.count, 0);
}

/// Pooled connections in steady use are not pinged before use (`--db-ping-after-idle`, here
/// so long that only a loss triggers a ping). When the server ends db-svc's sessions, the
/// next read meets a broken connection: it is retried, on a connection checked first, so no
/// read fails, although every pooled connection is broken.
#[tokio::test]
async fn reads_survive_sessions_ended_by_the_server() {
    let s = DbSvc::start(&["--db-ping-after-idle", "1h"]).await;
    let client = s.client.clone();
    let rows = (0..5).map(|i| action(&format!("alive-{i}"))).collect();
    client
        .clone()
        .insert(insert_req("agent_actions", rows))
        .await
        .unwrap();
    let query = pb::QueryRequest {
        table: "agent_actions".into(),
        ..Default::default()
    };
    // Several connections in the pool: concurrent queries with deadlines run alone, each in
    // a transaction on a connection of its own.
    let opened = (0..6).map(|_| {
        let mut c = client.clone();
        let q = query.clone();
        async move { c.query(with_deadline(q, Duration::from_secs(30))).await }
    });
    for reply in futures::future::join_all(opened).await {
        assert_eq!(reply.unwrap().into_inner().rows.len(), 5);
    }
    let ended = end_pool_sessions(&s).await;
    assert!(ended >= 1, "db-svc's pool held {ended} sessions");
    assert_eq!(retries(&s, READ_RETRIED), 0, "no connection was lost yet");
    // One read alone (shared-statement path), then several at once, then a count.
    let reply = client.clone().query(query.clone()).await.unwrap();
    assert_eq!(reply.into_inner().rows.len(), 5);
    assert_eq!(
        retries(&s, READ_RETRIED),
        1,
        "the read met an ended session and ran once more:\n{}",
        s.svc.logs()
    );
    let again = (0..6).map(|_| {
        let mut c = client.clone();
        let q = query.clone();
        async move { c.query(q).await }
    });
    for reply in futures::future::join_all(again).await {
        assert_eq!(reply.unwrap().into_inner().rows.len(), 5);
    }
    assert_eq!(s.count_all("agent_actions").await, 5);
}

/// db-svc's log line for a read that met a broken connection and runs once more.
const READ_RETRIED: &str = "connection lost; retrying the read";
/// db-svc's log line for a transaction whose BEGIN met a broken connection and starts again.
const BEGIN_RETRIED: &str = "connection lost at BEGIN; starting again";

/// How often db-svc logged `line` so far.
fn retries(s: &DbSvc, line: &str) -> usize {
    s.svc.logs().matches(line).count()
}

/// Ends every session of db-svc's pools: the test database's sessions but the caller's and
/// that of db-svc's health probe (which runs `SELECT 1` and nothing else, on a connection of
/// its own); returns how many.
async fn end_pool_sessions(s: &DbSvc) -> usize {
    const SESSIONS: &str = "SELECT pid FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'";
    let mut conn = s.sql().await;
    let probe: Vec<i32> = sqlx::query_scalar(&format!("{SESSIONS} AND query = 'SELECT 1'"))
        .bind(&s.db.name)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(probe.len(), 1, "one health-probe session: {probe:?}");
    let ended: Vec<bool> = sqlx::query_scalar(&format!(
        "SELECT pg_terminate_backend(pid) FROM ({SESSIONS} AND pid <> $2) s"
    ))
    .bind(&s.db.name)
    .bind(probe[0])
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert!(ended.iter().all(|&e| e), "{ended:?}");
    // The ended sessions are gone once their backends have exited; the probe's is left.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<i32> = sqlx::query_scalar(SESSIONS)
            .bind(&s.db.name)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        if left == probe {
            break;
        }
        assert!(Instant::now() < deadline, "{left:?} left, not {probe:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ended.len()
}

/// A transaction (a write with a deadline, a `StreamQuery`) that gets a broken pooled
/// connection meets it at BEGIN, before anything of the request ran, and starts again.
#[tokio::test]
async fn transactions_start_again_when_begin_meets_an_ended_session() {
    // One pooled connection, so that each request below is sure to get the ended one: sqlx
    // opens a new connection, rather than taking the next idle one, when the first it takes
    // fails its check (db-svc checks those idle since before a loss it noticed).
    let s = DbSvc::start(&["--db-ping-after-idle", "1h", "--db-max-connections", "1"]).await;
    let mut client = s.client.clone();
    client
        .insert(with_deadline(
            insert_req("agent_actions", vec![action("first")]),
            Duration::from_secs(30),
        ))
        .await
        .unwrap();
    assert!(end_pool_sessions(&s).await >= 1);
    assert_eq!(retries(&s, BEGIN_RETRIED), 0, "no connection was lost yet");
    let reply = client
        .insert(with_deadline(
            insert_req("agent_actions", vec![action("second")]),
            Duration::from_secs(30),
        ))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().rows.len(), 1);
    assert_eq!(
        retries(&s, BEGIN_RETRIED),
        1,
        "the insert's BEGIN met an ended session:\n{}",
        s.svc.logs()
    );

    assert!(end_pool_sessions(&s).await >= 1);
    let mut stream = client
        .stream_query(every_action(10))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        streamed_rows(&mut stream).await.len(),
        2,
        "both inserts, each once"
    );
    assert_eq!(
        retries(&s, BEGIN_RETRIED),
        2,
        "the stream's BEGIN met an ended session:\n{}",
        s.svc.logs()
    );
}

/// An `Upsert` whose conflict columns match no unique index: PostgreSQL's refusal (SQLSTATE
/// 42P10) names no field; db-svc names `conflict_columns`, and nothing is written.
#[tokio::test]
async fn upsert_conflict_columns_without_a_unique_index_name_the_field() {
    let s = DbSvc::start(&[]).await;
    let err = s
        .client
        .clone()
        .upsert(pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(action("no-unique"))],
            conflict_columns: vec!["agent_name".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(&err, "conflict_columns");
    assert!(err.message().contains("unique"), "{err:?}");
    assert_eq!(s.count_all("agent_actions").await, 0);
}
