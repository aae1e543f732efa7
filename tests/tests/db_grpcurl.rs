//! Every DatabaseService RPC from grpcurl with a JSON body, exactly as the README's
//! "db-svc API" section shows them (no proto files: reflection only).

use omnibus_tests::db::DbSvc;
use omnibus_tests::grpcurl;
use serde_json::{Value as Json, json};

const CORRELATION: &str = "5f0c6f1e-8a4b-4d7e-9c2a-1b3d5e7f9a0b";

/// Calls `method` with `body`; returns the JSON messages printed (one per streamed message).
async fn call(s: &DbSvc, method: &str, body: &str) -> Vec<Json> {
    let addr = s.svc.addr.to_string();
    let full = format!("omnibus.db.v1.DatabaseService/{method}");
    let out = grpcurl(&["-plaintext", "-d", body, &addr, &full])
        .await
        .unwrap();
    assert!(out.success, "{method} {body}: {out:?}");
    serde_json::Deserializer::from_str(&out.stdout)
        .into_iter::<Json>()
        .map(|m| m.expect("grpcurl prints JSON"))
        .collect()
}

#[tokio::test]
async fn every_rpc_from_grpcurl_with_json_bodies() {
    let s = DbSvc::start(&[]).await;

    let insert = format!(
        r#"{{"table": "agent_actions", "request_id": "demo-insert-1", "rows": [
            {{"correlation_id": "{CORRELATION}", "agent_name": "coder", "action_type": "tool_call",
              "action_name": "read_file", "action_details": {{"path": "src/main.rs"}}, "duration_ms": 12}}]}}"#
    );
    let reply = call(&s, "Insert", &insert).await.remove(0);
    assert_eq!(
        reply["affected"],
        json!("1"),
        "uint64 prints as a string: {reply}"
    );
    assert_eq!(reply["rows"][0]["agent_name"], json!("coder"));
    assert_eq!(
        reply["rows"][0]["action_details"],
        json!({"path": "src/main.rs"})
    );
    let again = call(&s, "Insert", &insert).await.remove(0);
    assert_eq!(again["replayed"], json!(true));
    assert_eq!(again["rows"], reply["rows"]);

    let reply = call(
        &s,
        "Query",
        r#"{"table": "agent_actions", "columns": ["id", "agent_name", "duration_ms", "created_at"],
            "where": {"agent_name": "coder"},
            "filter": {"condition": {"column": "duration_ms", "op": "OPERATOR_GTE", "value": 10}},
            "order_by": [{"column": "created_at", "direction": "DIRECTION_DESC", "nulls": "NULLS_LAST"}],
            "limit": 10, "include_total": true}"#,
    )
    .await
    .remove(0);
    assert_eq!(reply["total"], json!("1"), "{reply}");
    assert_eq!(reply["rows"][0]["duration_ms"], json!(12));
    assert!(
        reply["rows"][0]["created_at"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    let reply = call(
        &s,
        "Query",
        r#"{"table": "agent_actions", "filter": {"any": {"filters": [
            {"condition": {"column": "agent_name", "op": "OPERATOR_IN", "value": ["coder", "tester"]}},
            {"negate": {"condition": {"column": "action_details", "op": "OPERATOR_CONTAINS",
                                      "value": {"path": "src/main.rs"}}}}]}}}"#,
    )
    .await
    .remove(0);
    assert_eq!(reply["rows"].as_array().unwrap().len(), 1, "{reply}");

    let upsert = format!(
        r#"{{"table": "agent_actions", "rows": [
            {{"id": "0b8f6f0e-3c1d-4e2a-8b7c-9d0e1f2a3b4c", "correlation_id": "{CORRELATION}",
              "agent_name": "tester", "action_type": "tool_call", "action_name": "write_file"}}]}}"#
    );
    let reply = call(&s, "Upsert", &upsert).await.remove(0);
    assert_eq!(reply["affected"], json!("1"), "{reply}");

    let reply = call(
        &s,
        "Update",
        r#"{"table": "agent_actions", "where": {"agent_name": "coder"},
            "set": {"duration_ms": 15}, "max_affected": 10}"#,
    )
    .await
    .remove(0);
    assert_eq!(reply["rows"][0]["duration_ms"], json!(15), "{reply}");

    let reply = call(
        &s,
        "Count",
        r#"{"table": "agent_actions",
            "filter": {"condition": {"column": "agent_name", "op": "OPERATOR_ILIKE", "value": "CO%"}}}"#,
    )
    .await
    .remove(0);
    assert_eq!(reply["count"], json!("1"), "{reply}");

    let batches = call(
        &s,
        "StreamQuery",
        r#"{"query": {"table": "agent_actions", "order_by": [{"column": "agent_name"}]}, "batch_size": 1}"#,
    )
    .await;
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(batches[1]["rows"][0]["agent_name"], json!("tester"));

    let reply = call(
        &s,
        "ExecuteRaw",
        r#"{"sql": "SELECT agent_name, count(*) AS n, avg(duration_ms) AS avg_ms FROM agent_actions WHERE created_at > $1 GROUP BY agent_name ORDER BY agent_name",
            "params": ["2020-01-01T00:00:00Z"]}"#,
    )
    .await
    .remove(0);
    assert_eq!(
        reply["rows"],
        json!([{"agent_name": "coder", "n": 1, "avg_ms": 15},
               {"agent_name": "tester", "n": 1, "avg_ms": null}]),
        "{reply}"
    );

    let reply = call(&s, "ListTables", "{}").await.remove(0);
    assert_eq!(reply["tables"].as_array().unwrap().len(), 7);
    let reply = call(&s, "DescribeTable", r#"{"table": "agent_actions"}"#)
        .await
        .remove(0);
    assert_eq!(reply["table"]["primaryKey"], json!(["id"]), "{reply}");

    let reply = call(
        &s,
        "Delete",
        r#"{"table": "agent_actions", "where": {"agent_name": "coder"}, "count_only": true}"#,
    )
    .await
    .remove(0);
    assert_eq!(reply["affected"], json!("1"), "{reply}");

    // An error: the status code, message and details, as grpcurl prints them (the details'
    // types come from the server's reflection, so they print as JSON, not raw bytes).
    let addr = s.svc.addr.to_string();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"table": "agent_actions", "where": {"agentname": "coder"}}"#,
        &addr,
        "omnibus.db.v1.DatabaseService/Delete",
    ])
    .await
    .unwrap();
    assert!(!out.success);
    assert!(
        out.stderr.contains("Code: InvalidArgument") && out.stderr.contains("where.agentname"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(r#""@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"where.agentname""#)
            && out.stderr.contains(r#""reason":"VALIDATION_ERROR""#)
            && !out.stderr.contains("not recognized"),
        "{out:?}"
    );
}
