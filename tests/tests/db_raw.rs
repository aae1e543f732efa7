//! ExecuteRaw: parameters really bound, read-only by default (parsed guard plus a READ ONLY
//! transaction), writes only behind the operator's flag.

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{DbSvc, action, error_details, rows_json, to_value};
use serde_json::{Value as Json, json};
use tonic::Code;

fn raw(sql: &str, params: Vec<Json>) -> pb::ExecuteRawRequest {
    pb::ExecuteRawRequest {
        sql: sql.into(),
        params: params.into_iter().map(to_value).collect(),
        request_id: String::new(),
    }
}

async fn seed(s: &mut DbSvc) -> String {
    let correlation = uuid::Uuid::new_v4().to_string();
    let rows = (0..5)
        .map(|i| {
            let mut r = action(&format!("agent-{i}"));
            r["duration_ms"] = json!(i * 10);
            r["correlation_id"] = json!(correlation);
            r
        })
        .collect();
    s.seed_actions(rows).await;
    correlation
}

#[tokio::test]
async fn reads_with_bound_parameters() {
    let mut s = DbSvc::start(&[]).await;
    let correlation = seed(&mut s).await;
    let reply = s
        .client
        .execute_raw(raw(
            "SELECT agent_name, duration_ms, created_at > now() - interval '1 hour' AS recent \
             FROM agent_actions WHERE duration_ms >= $1 AND correlation_id = $2 ORDER BY agent_name",
            vec![json!(25), json!(correlation)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&reply.rows),
        vec![
            json!({"agent_name": "agent-3", "duration_ms": 30.0, "recent": true}),
            json!({"agent_name": "agent-4", "duration_ms": 40.0, "recent": true}),
        ]
    );
    assert_eq!(reply.affected, 2);

    // An aggregate and a WITH query over two served tables.
    let reply = s
        .client
        .execute_raw(raw(
            "WITH a AS (SELECT * FROM agent_actions WHERE agent_name LIKE $1) \
             SELECT count(*) AS n, sum(duration_ms) AS total, \
             (SELECT count(*) FROM error_events) AS errors FROM a",
            vec![json!("agent-%")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&reply.rows),
        vec![json!({"n": 5.0, "total": 100.0, "errors": 0.0})]
    );

    // A parameter is a value, never SQL.
    let reply = s
        .client
        .execute_raw(raw(
            "SELECT count(*) AS n FROM agent_actions WHERE agent_name = $1",
            vec![json!("x' OR '1'='1")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rows_json(&reply.rows), vec![json!({"n": 0.0})]);

    // Parameters are typed by what PostgreSQL infers: a malformed uuid is a field error.
    let err = s
        .client
        .execute_raw(raw(
            "SELECT id FROM agent_actions WHERE correlation_id = $1",
            vec![json!("nope")],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(error_details(&err).1, vec!["params[0]"]);
    let err = s
        .client
        .execute_raw(raw(
            "SELECT id FROM agent_actions WHERE duration_ms = $1 AND agent_name = $2",
            vec![json!(1)],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(error_details(&err).1, vec!["params"]);

    // Rows are keyed by column name: two result columns of one name would lose a value, so
    // the statement is refused (even when it would return no row) and names the column.
    for sql in [
        "SELECT count(*), count(DISTINCT agent_name) FROM agent_actions",
        "SELECT a.id, b.id FROM agent_actions a JOIN agent_actions b ON a.id = b.id WHERE false",
    ] {
        let err = s.client.execute_raw(raw(sql, vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}");
        assert_eq!(error_details(&err).1, vec!["sql"], "{sql}");
        assert!(
            err.message().contains("more than one column named"),
            "{err:?}"
        );
    }
    let reply = s
        .client
        .execute_raw(raw(
            "SELECT count(*) AS n, count(DISTINCT agent_name) AS agents FROM agent_actions \
             WHERE correlation_id = $1",
            vec![json!(correlation)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&reply.rows),
        vec![json!({"n": 5.0, "agents": 5.0})]
    );
}

#[tokio::test]
async fn everything_but_a_single_read_of_served_tables_is_refused() {
    let mut s = DbSvc::start(&[]).await;
    seed(&mut s).await;
    for sql in [
        "SELECT 1; DELETE FROM agent_actions",
        "DROP TABLE agent_actions",
        "TRUNCATE agent_actions",
        "SELECT * FROM pg_catalog.pg_authid",
        "SELECT * FROM omnibus_request_log",
        "SELECT pg_sleep(30)",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT * FROM agent_actions WHERE agent_name IN (SELECT usename FROM pg_user)",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "COPY agent_actions TO STDOUT",
        "not sql at all",
        // A CTE of a sub-query does not hide the outer query's table from the guard.
        "SELECT * FROM omnibus_request_log WHERE EXISTS \
         (WITH omnibus_request_log AS (SELECT 1) SELECT 1 FROM omnibus_request_log)",
        "WITH \"PG_AUTHID\" AS (SELECT 1) SELECT * FROM pg_authid",
        // Functions that run SQL given as text, or sit in FROM.
        "SELECT * FROM ts_stat('SELECT to_tsvector(key) FROM omnibus_request_log')",
        "SELECT a.id FROM agent_actions a, LATERAL pg_read_file('/etc/passwd') f",
        // Read differently by the SQL parser and by PostgreSQL (for it, the second line is
        // SQL reading pg_authid; for the parser, a string), or ONLY, which the parser reads
        // as a function: each was a way to every table.
        "SELECT 'x' AS a WHERE 2 >-- '\n1 UNION ALL SELECT rolname::text FROM pg_authid --'",
        "SELECT rolname::text AS r FROM ONLY (pg_authid)",
        "WITH \"only\" AS (SELECT 1) SELECT * FROM ONLY pg_authid",
        "SELECT to_regclass('pg_authid')::text",
        "SELECT 'x' AS a WHERE '{}'::jsonb ?'' UNION ALL SELECT rolname::text FROM pg_authid --'",
        "SELECT regclass('pg_authid')::text",
        // A NUL ends the text in PostgreSQL's protocol: refused here, not sent cut short.
        "SELECT 1 AS x -- \0",
        "SELECT 'a\0b' AS x",
        // Other tables' columns, by their row types; whether a table exists; raw pages.
        "SELECT json_populate_record(NULL::omnibus_request_log, '{}')::text AS r",
        "SELECT has_table_privilege('omnibus_request_log', 'SELECT') AS h",
        "SELECT get_raw_page('omnibus_request_log', 0) AS p",
    ] {
        let err = s.client.execute_raw(raw(sql, vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert_eq!(error_details(&err).1, vec!["sql"], "{sql}");
    }
    for sql in [
        "DELETE FROM agent_actions",
        "UPDATE agent_actions SET agent_name = 'x'",
        "INSERT INTO agent_actions (agent_name) VALUES ('x')",
    ] {
        let err = s.client.execute_raw(raw(sql, vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{sql}: {err:?}");
        assert_eq!(error_details(&err).0, "WRITE_NOT_ALLOWED");
    }
    // A write hidden in a query: the guard finds it.
    let err = s
        .client
        .execute_raw(raw(
            "WITH gone AS (DELETE FROM agent_actions RETURNING id) SELECT count(*) FROM gone",
            vec![],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("inside a query"), "{err:?}");
    // What the guard lets through as a read still runs READ ONLY: PostgreSQL refuses to take
    // row locks there.
    let err = s
        .client
        .execute_raw(raw("SELECT id FROM agent_actions FOR UPDATE", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(error_details(&err).0, "WRITE_NOT_ALLOWED");
    let n = s.count_all("agent_actions").await;
    assert_eq!(n, 5);
}

/// A raw result is bounded by bytes as well as rows: one that would not fit in a response
/// fails while it is read, instead of filling memory first. Result problems name `sql`.
#[tokio::test]
async fn a_raw_result_larger_than_a_response_fails_naming_sql() {
    let mut s = DbSvc::start(&["--max-send-message-size", "1MiB"]).await;
    let err = s
        .client
        .execute_raw(raw(
            "SELECT repeat('x', 400000) AS a FROM generate_series(1, 3)",
            vec![],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_details(&err).1, vec!["sql"]);
    assert!(err.message().contains("--max-send-message-size"), "{err:?}");
    // Within the bound, the same statement answers.
    let reply = s
        .client
        .execute_raw(raw(
            "SELECT repeat('x', 400000) AS a FROM generate_series(1, 2)",
            vec![],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.rows.len(), 2);
    // A result column of a type without a mapping is the statement's: named on `sql`.
    let err = s
        .client
        .execute_raw(raw("SELECT interval '1 hour' AS age", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_details(&err).1, vec!["sql"], "{err:?}");
    assert!(
        err.message().contains("column age has unsupported type"),
        "{err:?}"
    );
}

#[tokio::test]
async fn writes_when_the_operator_enables_them_idempotently() {
    let mut s = DbSvc::start(&["--raw-sql-writes", "true"]).await;
    seed(&mut s).await;
    let mut request = raw(
        "UPDATE agent_actions SET duration_ms = duration_ms + $1 WHERE agent_name = $2 \
         RETURNING agent_name, duration_ms",
        vec![json!(5), json!("agent-1")],
    );
    request.request_id = "raw-1".into();
    let first = s
        .client
        .execute_raw(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&first.rows),
        vec![json!({"agent_name": "agent-1", "duration_ms": 15.0})]
    );
    assert_eq!(first.affected, 1);
    let again = s.client.execute_raw(request).await.unwrap().into_inner();
    assert!(again.replayed);
    assert_eq!(rows_json(&again.rows), rows_json(&first.rows));
    let reply = s
        .client
        .execute_raw(raw(
            "SELECT duration_ms FROM agent_actions WHERE agent_name = $1",
            vec![json!("agent-1")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&reply.rows),
        vec![json!({"duration_ms": 15.0})],
        "applied once"
    );
    let reply = s
        .client
        .execute_raw(raw(
            "DELETE FROM agent_actions WHERE duration_ms < $1",
            vec![json!(20)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 2);
    // DDL and unserved tables stay refused.
    let err = s
        .client
        .execute_raw(raw("DROP TABLE agent_actions", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = s
        .client
        .execute_raw(raw("DELETE FROM omnibus_request_log", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A write inside a query is refused as such, with the flag on too, and changes nothing
    // (a CTE named like an unserved table must not pass it off as the CTE).
    for sql in [
        "WITH d AS (DELETE FROM agent_actions RETURNING *) SELECT count(*) FROM d",
        "WITH omnibus_request_log AS (SELECT 1) DELETE FROM omnibus_request_log",
    ] {
        let err = s.client.execute_raw(raw(sql, vec![])).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(err.message().contains("inside a query"), "{err:?}");
    }
    let left = s.count_all("agent_actions").await;
    assert_eq!(left, 3, "five seeded, two deleted above");
}

/// With `--raw-sql-role`, PostgreSQL's grants bound raw SQL behind the guard: a served table
/// the role was not granted is PERMISSION_DENIED, and a role db-svc cannot switch to keeps the
/// service NOT_SERVING (a start-up error, not a failure of every call).
#[tokio::test]
async fn a_raw_sql_role_bounds_raw_statements_by_its_grants() {
    use omnibus_tests::{ServiceSpec, TestDatabase};
    use sqlx::Connection;
    use std::time::Duration;
    use tonic_health::pb::health_check_response::ServingStatus;

    let role = format!(
        "omnibus_raw_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = sqlx::PgConnection::connect(&omnibus_tests::admin_database_url())
        .await
        .unwrap();
    // Not a member (the test user is a superuser, a member of every role that exists).
    let missing_db = TestDatabase::create().await.unwrap();
    let mut missing = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &missing_db.url)
        .args(["--raw-sql-role", &role])
        .spawn()
        .unwrap();
    // NOT_SERVING is where every db-svc starts: first the start-up error itself, then the
    // status over several probes (every 250 ms while not ready) after it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let refusal = format!("--raw-sql-role {role}");
    while !missing.logs().contains(&refusal) {
        assert!(missing.is_running(), "{}", missing.logs());
        assert!(
            std::time::Instant::now() < deadline,
            "no start-up error about the role:\n{}",
            missing.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        assert_eq!(
            missing.health("").await.unwrap(),
            ServingStatus::NotServing,
            "a role that does not exist keeps db-svc from serving"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(missing.is_running(), "{}", missing.logs());
    drop(missing);

    sqlx::query(&format!("CREATE ROLE {role} NOLOGIN"))
        .execute(&mut admin)
        .await
        .unwrap();
    let mut s = DbSvc::start(&["--raw-sql-role", &role]).await;
    seed(&mut s).await;
    let mut conn = s.sql().await;
    sqlx::query(&format!("GRANT SELECT ON agent_actions TO {role}"))
        .execute(&mut conn)
        .await
        .unwrap();

    let reply = s
        .client
        .execute_raw(raw(
            "SELECT count(*) AS n, current_user AS who FROM agent_actions WHERE agent_name LIKE $1",
            vec![json!("agent-%")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rows_json(&reply.rows),
        vec![json!({"n": 5.0, "who": role})],
        "runs as the role"
    );
    // error_events is served, and the guard accepts the statement; the role's grants do not.
    let err = s
        .client
        .execute_raw(raw("SELECT count(*) AS n FROM error_events", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(error_details(&err).0, "PERMISSION_DENIED");
    // The structured RPCs keep db-svc's own user.
    let n = s.count_all("error_events").await;
    assert_eq!(n, 0);

    sqlx::query(&format!("DROP OWNED BY {role}"))
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    drop(s);
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&mut admin)
        .await
        .unwrap();
}

/// Database errors that are the statement's own get the status that says so: a feature
/// PostgreSQL does not support is the author's input (INVALID_ARGUMENT), and a statement
/// that exceeds a resource limit (here `temp_file_limit`) is RESOURCE_EXHAUSTED - not
/// UNAVAILABLE, which would have clients (and the bus worker) retry it as it is.
#[tokio::test]
async fn a_statement_over_a_resource_limit_is_resource_exhausted_not_unavailable() {
    let mut s = DbSvc::start_with_args(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET temp_file_limit = %L', \
         current_database(), '64kB'); END $$",
        &[],
    )
    .await;
    let err = s
        .client
        .execute_raw(raw(
            "SELECT count(*) FROM (SELECT * FROM generate_series(1, 1000000) g \
             ORDER BY g DESC) s",
            vec![],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(error_details(&err).0, "RESOURCE_EXHAUSTED");
    assert!(err.message().contains("temp_file_limit"), "{err:?}");

    let err = s
        .client
        .execute_raw(raw(
            "SELECT CASE WHEN true THEN generate_series(1, 2) END",
            vec![],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Small statements still run.
    let ok = s
        .client
        .execute_raw(raw(
            "SELECT count(*) AS n FROM generate_series(1, 10)",
            vec![],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rows_json(&ok.rows), vec![json!({"n": 10.0})]);
}
