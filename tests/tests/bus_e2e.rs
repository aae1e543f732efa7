//! The event-bus write path end to end: db-svc's bus worker and the client publisher against
//! the real broker and PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use omnibus_client::bus::{BusError, BusPublisher};
use omnibus_client::db::{DbClient, Via, WriteMode};
use omnibus_proto::db::v1 as pb;
use omnibus_tests::bus::{
    BusTopics, Tap, committed_total, count_rows, expect_drain_cut_by_grace, fresh_group,
    omniclaude_envelope, produce, start_bus_worker, start_db_svc, start_db_svc_with_short_grace,
};
use omnibus_tests::db::{TableLock, to_struct};
use omnibus_tests::{ServiceSpec, TestDatabase};
use serde_json::{Value, json};

/// The first request may wait for the worker's consumer-group join (about half the 6 s
/// session timeout on tansu).
const FIRST_REPLY: Duration = Duration::from_secs(40);
const REPLY: Duration = Duration::from_secs(20);

fn action(agent: &str) -> prost_types::Struct {
    to_struct(json!({
        "correlation_id": uuid::Uuid::new_v4().to_string(),
        "agent_name": agent,
        "action_type": "tool_call",
        "action_name": "read_file",
        "duration_ms": 12
    }))
}

/// Every message of `topics` (all their partitions) up to the high watermarks they have now,
/// as JSON: unlike a [`Tap`] waiting for one reply, it has read whatever was there before.
fn read_to_end(topics: &[&str]) -> Vec<Value> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", omnibus_tests::kafka_brokers())
        .set("group.id", format!("end-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("a reader");
    // (topic, partition) -> the offset the next message must reach.
    let mut left = std::collections::HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("the topic's metadata");
        for p in metadata.topics()[0].partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("the partition's watermarks");
            if high > 0 {
                left.insert((topic.to_string(), p.id()), high);
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .unwrap();
            }
        }
    }
    let mut out = Vec::new();
    if left.is_empty() {
        return out;
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = std::time::Instant::now() + REPLY;
    while !left.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "could not read {topics:?} to their ends; still to read: {left:?}"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let m = m.expect("a message");
            out.push(
                m.payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or(Value::Null),
            );
            let key = (m.topic().to_string(), m.partition());
            if left.get(&key).is_some_and(|high| m.offset() + 1 >= *high) {
                left.remove(&key);
            }
        }
    }
    out
}

/// db-svc serving gRPC only: nobody answers the bus.
async fn grpc_only_db_svc(db: &TestDatabase) -> omnibus_tests::ServiceProcess {
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(["--bus", "false"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    svc
}

/// A test database, db-svc with its bus worker, and a client that writes over the bus first
/// (waiting `reply_timeout` for each reply).
async fn bus_first(
    reply_timeout: Duration,
) -> (TestDatabase, omnibus_tests::ServiceProcess, DbClient) {
    let (db, topics, svc) = start_bus_worker().await.unwrap();
    let bus = Arc::new(
        BusPublisher::connect(topics.client_config(reply_timeout))
            .await
            .unwrap(),
    );
    let client = DbClient::with_bus(svc.channel(), bus, WriteMode::BusFirst);
    (db, svc, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_operations_round_trip_over_the_bus() {
    let (db, topics, _svc) = start_bus_worker().await.unwrap();
    let bus = BusPublisher::connect(topics.client_config(REPLY))
        .await
        .unwrap();

    let insert = pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![action("bus-a"), action("bus-a"), action("bus-b")],
        request_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let inserted = bus
        .call(&insert, &insert.request_id, Some(FIRST_REPLY))
        .await
        .unwrap();
    assert_eq!(inserted.affected, 3);
    assert_eq!(inserted.rows.len(), 3);
    assert!(!inserted.replayed);

    let query = pb::QueryRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({"agent_name": "bus-a"}))),
        ..Default::default()
    };
    let found = bus
        .call(&query, &uuid::Uuid::new_v4().to_string(), None)
        .await
        .unwrap();
    assert_eq!(found.rows.len(), 2);

    let count = pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    };
    assert_eq!(
        bus.call(&count, &uuid::Uuid::new_v4().to_string(), None)
            .await
            .unwrap()
            .count,
        3
    );

    let update = pb::UpdateRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({"agent_name": "bus-b"}))),
        set: Some(to_struct(json!({"action_name": "write_file"}))),
        ..Default::default()
    };
    let updated = bus
        .call(&update, &uuid::Uuid::new_v4().to_string(), None)
        .await
        .unwrap();
    assert_eq!(updated.affected, 1);

    let id = inserted.rows[0].fields["id"].clone();
    let mut row = action("bus-c");
    row.fields.insert("id".into(), id.clone());
    let upsert = pb::UpsertRequest {
        table: "agent_actions".into(),
        rows: vec![row],
        ..Default::default()
    };
    let upserted = bus
        .call(&upsert, &uuid::Uuid::new_v4().to_string(), None)
        .await
        .unwrap();
    assert_eq!(upserted.affected, 1);

    let raw = pb::ExecuteRawRequest {
        sql: "SELECT agent_name FROM agent_actions WHERE action_name = $1".into(),
        params: vec![omnibus_tests::db::to_value(json!("write_file"))],
        ..Default::default()
    };
    let raw_rows = bus
        .call(&raw, &uuid::Uuid::new_v4().to_string(), None)
        .await
        .unwrap();
    assert_eq!(raw_rows.rows.len(), 1);

    let delete = pb::DeleteRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({"agent_name": "bus-a"}))),
        ..Default::default()
    };
    let deleted = bus
        .call(&delete, &uuid::Uuid::new_v4().to_string(), None)
        .await
        .unwrap();
    assert_eq!(deleted.affected, 1, "one bus-a row was upserted into bus-c");

    let names = count_rows(
        &db,
        "SELECT count(*) FROM agent_actions WHERE agent_name IN ('bus-b','bus-c')",
    )
    .await;
    assert_eq!(names, 2);
    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM agent_actions").await,
        2
    );

    // A structured error comes back as FAILED with the gRPC path's code and field details.
    let bad = pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![to_struct(json!({"agent_name": "x", "no_such_column": 1}))],
        ..Default::default()
    };
    match bus
        .call(&bad, &uuid::Uuid::new_v4().to_string(), None)
        .await
    {
        Err(BusError::Failed(f)) => {
            assert_eq!(f.error_code, "VALIDATION_ERROR", "{f:?}");
            assert_eq!(f.grpc_code, "INVALID_ARGUMENT");
            assert!(
                f.details["field_violations"]
                    .to_string()
                    .contains("no_such_column"),
                "{f:?}"
            );
        }
        other => panic!("expected a FAILED reply, got {other:?}"),
    }
}

/// OmniClaude pages a QUERY with `limit` / `offset` beside its SQL: the page is cut while the
/// result is read, so a result larger than --query-max-limit still answers a small page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_omniclaude_query_page_is_cut_while_reading() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let _svc = start_db_svc(&db, &topics, &fresh_group(), &["--query-max-limit", "5"])
        .await
        .unwrap();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         SELECT gen_random_uuid(), 'agent-' || lpad(n::text, 2, '0'), 'x', 'y' \
         FROM generate_series(1, 20) n",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    let sql = "SELECT agent_name FROM agent_actions WHERE action_type = $1 ORDER BY agent_name";
    let query = |limit: Value, offset: Value| {
        let mut env = omniclaude_envelope(
            &uuid::Uuid::new_v4().to_string(),
            "QUERY",
            Some("agent_actions"),
            sql,
            json!(["x"]),
        );
        env["payload"]["limit"] = limit;
        env["payload"]["offset"] = offset;
        env
    };
    let ask = |env: Value| {
        let topic = t.request.clone();
        async move {
            let cid = env["correlation_id"].as_str().unwrap().to_string();
            produce(&topic, None, &serde_json::to_vec(&env).unwrap(), "gzip")
                .await
                .unwrap();
            cid
        }
    };
    let cid = ask(query(json!(3), json!(4))).await;
    let reply = tap.reply_for(&cid, FIRST_REPLY).unwrap();
    assert_eq!(
        reply.json["payload"]["rows"],
        json!([{"agent_name": "agent-05"}, {"agent_name": "agent-06"}, {"agent_name": "agent-07"}]),
        "{reply:?}"
    );
    assert_eq!(reply.json["payload"]["row_count"], 3);
    // The last rows, past the first --query-max-limit of them.
    let cid = ask(query(json!(5), json!(18))).await;
    let reply = tap.reply_for(&cid, REPLY).unwrap();
    assert_eq!(
        reply.json["payload"]["rows"],
        json!([{"agent_name": "agent-19"}, {"agent_name": "agent-20"}]),
        "{reply:?}"
    );
    // Unpaged, the whole result is more than one reply may carry.
    let cid = ask(query(Value::Null, Value::Null)).await;
    let reply = tap.reply_for(&cid, REPLY).unwrap();
    assert_eq!(
        reply.json["event_type"], "DATABASE_QUERY_FAILED",
        "{reply:?}"
    );
    assert_eq!(reply.json["payload"]["error_code"], "VALIDATION_ERROR");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omniclaude_envelopes_get_the_replies_that_client_expects() {
    let (db, topics, _svc) = start_bus_worker().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();

    // Exactly as DatabaseEventClient sends it: JSON value, no key, gzip.
    let send = |cid: &str, op: &str, entity: Option<&str>, sql: &str, params: Value| {
        let body = serde_json::to_vec(&omniclaude_envelope(cid, op, entity, sql, params)).unwrap();
        let topic = t.request.clone();
        async move { produce(&topic, None, &body, "gzip").await.unwrap() }
    };
    let cid = uuid::Uuid::new_v4().to_string();
    let correlation = uuid::Uuid::new_v4().to_string();
    send(
        &cid,
        "INSERT",
        Some("agent_actions"),
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) VALUES ($1, $2, $3, $4) RETURNING id, agent_name",
        json!([correlation, "omniclaude-agent", "success", "generate_code"]),
    )
    .await;
    let reply = tap.reply_for(&cid, FIRST_REPLY).unwrap();
    assert_eq!(reply.topic, t.completed);
    assert_eq!(
        reply.key.as_deref(),
        Some(cid.as_str()),
        "replies are keyed by correlation id"
    );
    let env = &reply.json;
    assert_eq!(env["event_type"], "DATABASE_QUERY_COMPLETED");
    for field in ["event_id", "timestamp", "service"] {
        assert!(env[field].is_string(), "{field} missing: {env}");
    }
    assert_eq!(env["payload"]["row_count"], 1);
    assert_eq!(env["payload"]["rows_affected"], 1);
    assert!(env["payload"]["execution_time_ms"].is_number());
    assert_eq!(env["payload"]["rows"][0]["agent_name"], "omniclaude-agent");

    // QUERY returns payload.rows, as the client reads them.
    let q = uuid::Uuid::new_v4().to_string();
    send(
        &q,
        "QUERY",
        Some("agent_actions"),
        "SELECT agent_name, action_type FROM agent_actions WHERE correlation_id = $1",
        json!([correlation]),
    )
    .await;
    let reply = tap.reply_for(&q, REPLY).unwrap();
    assert_eq!(
        reply.json["payload"]["rows"],
        json!([{"agent_name": "omniclaude-agent", "action_type": "success"}])
    );

    // UPDATE, UPSERT (INSERT … ON CONFLICT … DO UPDATE SET c = EXCLUDED.c) and DELETE.
    let u = uuid::Uuid::new_v4().to_string();
    send(
        &u,
        "UPDATE",
        Some("agent_actions"),
        "UPDATE agent_actions SET duration_ms = $1 WHERE correlation_id = $2",
        json!([250, correlation]),
    )
    .await;
    assert_eq!(
        tap.reply_for(&u, REPLY).unwrap().json["payload"]["rows_affected"],
        1
    );

    let id = uuid::Uuid::new_v4().to_string();
    let up = uuid::Uuid::new_v4().to_string();
    send(
        &up,
        "UPSERT",
        Some("agent_actions"),
        "INSERT INTO agent_actions (id, correlation_id, agent_name, action_type, action_name) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET agent_name = EXCLUDED.agent_name",
        json!([id, correlation, "upserted", "decision", "route"]),
    )
    .await;
    assert_eq!(
        tap.reply_for(&up, REPLY).unwrap().json["event_type"],
        "DATABASE_QUERY_COMPLETED"
    );

    let d = uuid::Uuid::new_v4().to_string();
    send(
        &d,
        "DELETE",
        Some("agent_actions"),
        "DELETE FROM agent_actions WHERE agent_name = $1",
        json!(["upserted"]),
    )
    .await;
    assert_eq!(
        tap.reply_for(&d, REPLY).unwrap().json["payload"]["rows_affected"],
        1
    );
    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM agent_actions").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_failed_replies_or_dead_letters() {
    let (db, topics, _svc) = start_bus_worker().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed, &t.dead_letter]).unwrap();

    let failed_code = |tap: &mut Tap, cid: &str, wait: Duration| -> String {
        let r = tap.reply_for(cid, wait).unwrap();
        assert_eq!(r.topic, t.failed, "{r:?}");
        assert_eq!(r.json["event_type"], "DATABASE_QUERY_FAILED");
        let p = &r.json["payload"];
        assert!(p["error"].as_str().is_some_and(|e| !e.is_empty()), "{r:?}");
        assert_eq!(p["error"], p["error_message"]);
        // Every error_code has one gRPC code and retryability, whether the worker answers
        // (unparsable request, deadline passed) or the executor does (SQL guard).
        let code = p["error_code"].as_str().unwrap().to_string();
        let (grpc_code, retryable) = match code.as_str() {
            "VALIDATION_ERROR" | "OPERATION_MISMATCH" => ("INVALID_ARGUMENT", false),
            "TIMEOUT" => ("DEADLINE_EXCEEDED", true),
            other => panic!("unexpected error_code {other}: {r:?}"),
        };
        assert_eq!(p["grpc_code"], grpc_code, "{r:?}");
        assert_eq!(p["retryable"], retryable, "{r:?}");
        code
    };

    // A warm-up that also checks an unknown table: VALIDATION_ERROR.
    let c = uuid::Uuid::new_v4().to_string();
    let env = omniclaude_envelope(&c, "QUERY", None, "SELECT * FROM pg_shadow", json!([]));
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "gzip")
        .await
        .unwrap();
    assert_eq!(failed_code(&mut tap, &c, FIRST_REPLY), "VALIDATION_ERROR");

    // Two statements, and DDL: refused by the SQL guard.
    for sql in [
        "SELECT 1 FROM agent_actions; DELETE FROM agent_actions",
        "DROP TABLE agent_actions",
    ] {
        let c = uuid::Uuid::new_v4().to_string();
        let env = omniclaude_envelope(&c, "QUERY", None, sql, json!([]));
        produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
            .await
            .unwrap();
        let code = failed_code(&mut tap, &c, REPLY);
        assert_eq!(code, "VALIDATION_ERROR", "{sql}");
    }

    // Statement kind must match operation_type.
    let c = uuid::Uuid::new_v4().to_string();
    let env = omniclaude_envelope(
        &c,
        "QUERY",
        None,
        "DELETE FROM agent_actions WHERE agent_name = $1",
        json!(["x"]),
    );
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    assert_eq!(failed_code(&mut tap, &c, REPLY), "OPERATION_MISMATCH");

    // Malformed envelope with a correlation id: FAILED, never silence.
    let c = uuid::Uuid::new_v4().to_string();
    let env = json!({"event_type": "DATABASE_QUERY_REQUESTED", "correlation_id": c, "payload": {"operation_type": "MERGE"}});
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    assert_eq!(failed_code(&mut tap, &c, REPLY), "VALIDATION_ERROR");

    // Not even JSON, but keyed by the correlation id (our publisher's convention): FAILED.
    let c = uuid::Uuid::new_v4().to_string();
    produce(&t.request, Some(&c), b"{this is not json", "none")
        .await
        .unwrap();
    assert_eq!(failed_code(&mut tap, &c, REPLY), "VALIDATION_ERROR");

    // A deadline already passed: TIMEOUT, and nothing is written.
    let c = uuid::Uuid::new_v4().to_string();
    let mut env = omniclaude_envelope(
        &c,
        "INSERT",
        None,
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) VALUES ($1, 'late', 'x', 'y')",
        json!([uuid::Uuid::new_v4().to_string()]),
    );
    env["payload"]["deadline"] = json!("2020-01-01T00:00:00Z");
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    assert_eq!(failed_code(&mut tap, &c, REPLY), "TIMEOUT");
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'late'"
        )
        .await,
        0
    );

    // No deadline of its own (as OmniClaude sends it), but sent longer ago than
    // --bus-default-timeout (10 min in these tests, OmniClaude's 5 s by default): its sender
    // has given up and written directly, so executing it now would write twice.
    let c = uuid::Uuid::new_v4().to_string();
    let mut env = omniclaude_envelope(
        &c,
        "INSERT",
        None,
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) VALUES ($1, 'given-up', 'x', 'y')",
        json!([uuid::Uuid::new_v4().to_string()]),
    );
    let sent = chrono::Utc::now() - chrono::Duration::minutes(20);
    env["timestamp"] = json!(sent.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string());
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    assert_eq!(failed_code(&mut tap, &c, REPLY), "TIMEOUT");
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'given-up'"
        )
        .await,
        0
    );

    // No correlation id anywhere: dead-letter topic, with the reason.
    let marker = uuid::Uuid::new_v4().to_string();
    let env = json!({"event_type": "DATABASE_QUERY_REQUESTED", "payload": {"marker": marker}});
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    tap.wait_until(REPLY, "a dead letter", |seen| {
        seen.iter().any(|r| {
            r.topic == t.dead_letter
                && r.json["payload"]
                    .as_str()
                    .is_some_and(|p| p.contains(&marker))
        })
    })
    .unwrap();
    let dead = tap.seen.iter().find(|r| r.topic == t.dead_letter).unwrap();
    assert!(
        dead.json["reason"]
            .as_str()
            .unwrap()
            .contains("correlation_id"),
        "{dead:?}"
    );
    assert_eq!(dead.json["source_topic"], t.request);
}

/// The same message delivered twice (what a redelivery looks like) writes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_request_is_applied_once() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = fresh_group();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    let cid = uuid::Uuid::new_v4().to_string();
    let env = omniclaude_envelope(
        &cid,
        "INSERT",
        Some("agent_actions"),
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) VALUES ($1, 'once', 'x', 'y')",
        json!([uuid::Uuid::new_v4().to_string()]),
    );
    let body = serde_json::to_vec(&env).unwrap();

    // 1. db-svc crashes after the write, before replying and committing (fail point).
    let mut crashing = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .env("OMNIBUS_FAILPOINT", "bus-after-execute")
        .args(topics.db_svc_args(&group))
        .spawn()
        .unwrap();
    crashing.wait_serving().await.unwrap();
    produce(&t.request, None, &body, "gzip").await.unwrap();
    let status = crashing
        .wait_exit(FIRST_REPLY)
        .await
        .expect("db-svc aborts at the fail point");
    assert!(!status.success());
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'once'"
        )
        .await,
        1,
        "the write committed"
    );
    tap.poll_for(Duration::from_millis(500));
    assert!(
        tap.replies_by_correlation().is_empty(),
        "no reply before the crash"
    );

    // 2. A new db-svc in the same group gets the request again: it replays the recorded result.
    let _svc = start_db_svc(&db, &topics, &group, &[]).await.unwrap();
    let reply = tap.reply_for(&cid, FIRST_REPLY).unwrap();
    assert_eq!(
        reply.json["event_type"], "DATABASE_QUERY_COMPLETED",
        "{reply:?}"
    );
    assert_eq!(reply.json["payload"]["replayed"], true, "{reply:?}");
    assert_eq!(reply.json["payload"]["rows_affected"], 1);

    // 3. And a plain duplicate of the message is replayed too.
    produce(&t.request, None, &body, "gzip").await.unwrap();
    tap.wait_until(REPLY, "a second reply", |seen| {
        seen.iter()
            .filter(|r| r.json["correlation_id"] == cid.as_str())
            .count()
            >= 2
    })
    .unwrap();
    let replies = tap.replies_by_correlation();
    let second = replies[cid.as_str()][1];
    assert_eq!(
        second.json["event_type"], "DATABASE_QUERY_COMPLETED",
        "{second:?}"
    );
    assert_eq!(second.json["payload"]["replayed"], true, "{second:?}");
    assert_eq!(second.json["payload"]["rows_affected"], 1, "{second:?}");
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'once'"
        )
        .await,
        1
    );
}

/// Bus down (no worker) -> the client falls back to direct gRPC with the same request id; when
/// a worker later processes the bus request, nothing is written twice.
///
/// The client's bus timeout is both how long it waits and the deadline its request carries,
/// so a worker that comes up after the fallback finds that request past its deadline: having
/// been applied under its id (by the fallback), it is replayed from the request log, not
/// answered TIMEOUT (which a different id would get). A request whose deadline is still ahead
/// when the worker comes up (the `late-bus` one below) goes through a whole attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_to_direct_grpc_never_writes_twice() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let t = topics.topics.clone();
    let mut requests = Tap::new(&[&t.request]).unwrap();
    let mut replies = Tap::new(&[&t.completed, &t.failed]).unwrap();
    let direct_only = grpc_only_db_svc(&db).await;

    let bus = Arc::new(
        BusPublisher::connect(topics.client_config(Duration::from_millis(1500)))
            .await
            .unwrap(),
    );
    let client = DbClient::with_bus(direct_only.channel(), bus.clone(), WriteMode::BusFirst);
    let written = client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![action("fallback")],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(matches!(written.via, Via::Fallback(_)), "{:?}", written.via);
    assert_eq!(written.response.affected, 1);
    assert!(!written.response.replayed);
    // The bus request the client gave up on, with the request id the fallback used.
    let carries_the_id =
        |m: &omnibus_tests::bus::Received| m.json.to_string().contains(&written.request_id);
    requests
        .wait_until(REPLY, "the fallback's bus request", |seen| {
            seen.iter().any(carries_the_id)
        })
        .unwrap();
    let given_up: Vec<_> = requests.seen.iter().filter(|m| carries_the_id(m)).collect();
    assert_eq!(given_up.len(), 1, "{given_up:#?}");
    let given_up_cid = given_up[0].json["correlation_id"]
        .as_str()
        .expect("a correlation id")
        .to_string();

    // A bus request with a long deadline whose direct fallback already won (same request id).
    let request_id = uuid::Uuid::new_v4().to_string();
    let late = pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![action("late-bus")],
        request_id: request_id.clone(),
        ..Default::default()
    };
    let json = omnibus_proto::json::to_json("omnibus.db.v1.InsertRequest", &late, true).unwrap();
    let payload = json!({"operation": "INSERT", "request": json, "timeout_ms": 120000});
    let pending = {
        let bus = bus.clone();
        let request_id = request_id.clone();
        tokio::spawn(async move {
            bus.request(payload, &request_id, Some(Duration::from_secs(60)))
                .await
        })
    };
    let direct = DbClient::direct(direct_only.channel());
    let first = direct.insert(late.clone()).await.unwrap();
    assert_eq!(first.response.affected, 1);
    assert!(!first.response.replayed);

    // Now the bus worker comes up and processes both queued requests.
    let _worker = start_db_svc(&db, &topics, &fresh_group(), &[])
        .await
        .unwrap();
    match pending.await.unwrap().unwrap() {
        bus_protocol::Reply::Completed(done) => assert!(done.replayed, "{done:?}"),
        other => panic!("expected COMPLETED (replayed), got {other:?}"),
    }
    // The request the client gave up on is answered too, with the fallback's result.
    let reply = replies.reply_for(&given_up_cid, FIRST_REPLY).unwrap();
    reply.assert_write_completed(&t.completed, 1, true);
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'late-bus'"
        )
        .await,
        1
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'fallback'"
        )
        .await,
        1
    );
}

/// PostgreSQL becomes unreachable mid-stream: requests wait and are retried; none is lost and
/// none applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_mid_stream_loses_and_duplicates_nothing() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let pg: std::net::SocketAddr = {
        let url = url::Url::parse(&db.url).unwrap();
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
            .parse()
            .unwrap()
    };
    let proxy = omnibus_tests::proxy::Proxy::start(pg).await.unwrap();
    let mut via_proxy = url::Url::parse(&db.url).unwrap();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", via_proxy.as_str())
        .args(topics.db_svc_args(&fresh_group()))
        .args(["--db-acquire-timeout", "1s"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    let bus = Arc::new(
        BusPublisher::connect(topics.client_config(Duration::from_secs(60)))
            .await
            .unwrap(),
    );

    // Warm up (group join), then cut PostgreSQL while a stream of writes is in flight.
    let warm = pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![action("warm")],
        ..Default::default()
    };
    bus.call(&warm, &uuid::Uuid::new_v4().to_string(), Some(FIRST_REPLY))
        .await
        .unwrap();

    let n = 30;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..n {
        let bus = bus.clone();
        calls.spawn(async move {
            let req = pb::InsertRequest {
                table: "agent_actions".into(),
                rows: vec![action("outage")],
                ..Default::default()
            };
            bus.call(&req, &uuid::Uuid::new_v4().to_string(), None)
                .await
        });
        if i == n / 3 {
            proxy.down();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.up();
    let mut ok = 0;
    while let Some(result) = calls.join_next().await {
        let response = result
            .unwrap()
            .expect("every request answered after the outage");
        assert_eq!(response.affected, 1);
        ok += 1;
    }
    assert_eq!(ok, n);
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'outage'"
        )
        .await,
        n as i64
    );
    assert!(
        svc.logs().contains("database unavailable"),
        "the outage was noticed:\n{}",
        svc.logs()
    );
}

/// Two replicas share the request topic through one consumer group: each request is answered
/// exactly once, and both replicas take part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_answer_every_request_exactly_once() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = fresh_group();
    let _a = start_db_svc(&db, &topics, &group, &["--bus-service-name", "replica-a"])
        .await
        .unwrap();
    let _b = start_db_svc(&db, &topics, &group, &["--bus-service-name", "replica-b"])
        .await
        .unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    let bus = Arc::new(
        BusPublisher::connect(topics.client_config(FIRST_REPLY))
            .await
            .unwrap(),
    );

    // Wait until the group has settled with both members: requests are answered by both.
    let mut warmups = 0;
    loop {
        let req = pb::CountRequest {
            table: "agent_actions".into(),
            ..Default::default()
        };
        bus.call(&req, &uuid::Uuid::new_v4().to_string(), None)
            .await
            .unwrap();
        warmups += 1;
        tap.poll_for(Duration::from_millis(100));
        let services: std::collections::HashSet<_> = tap
            .seen
            .iter()
            .filter_map(|r| r.json["service"].as_str())
            .collect();
        if services.len() == 2 {
            break;
        }
        assert!(warmups < 200, "the second replica never got a partition");
    }
    let settled = tap.seen.len();

    let n = 60;
    let mut calls = tokio::task::JoinSet::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let cid = uuid::Uuid::new_v4().to_string();
        ids.push(cid.clone());
        let bus = bus.clone();
        calls.spawn(async move {
            let req = pb::InsertRequest {
                table: "agent_actions".into(),
                rows: vec![action("replicas")],
                ..Default::default()
            };
            bus.call(&req, &cid, None).await
        });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap().unwrap();
    }
    tap.poll_for(Duration::from_secs(2)); // give duplicates, if any, time to show up
    let by_cid = tap.replies_by_correlation();
    for cid in &ids {
        assert_eq!(
            by_cid.get(cid).map(Vec::len),
            Some(1),
            "request {cid} must be answered exactly once"
        );
    }
    let answered_by: std::collections::HashSet<_> = tap.seen[settled..]
        .iter()
        .filter_map(|r| r.json["service"].as_str())
        .collect();
    assert_eq!(
        answered_by.len(),
        2,
        "both replicas answered: {answered_by:?}"
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'replicas'"
        )
        .await,
        n as i64
    );
}

/// A client's W3C trace id travels with the request over the bus (envelope and Kafka header),
/// db-svc handles it in a span of that trace, and the reply carries it back (a new span).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_id_travels_from_the_client_through_the_bus_to_the_reply() {
    let (_db, topics, svc) = start_bus_worker().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.request, &t.completed]).unwrap();
    let bus = BusPublisher::connect(topics.client_config(FIRST_REPLY))
        .await
        .unwrap();

    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let insert = pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![action("traced")],
        ..Default::default()
    };
    let json = omnibus_proto::json::to_json("omnibus.db.v1.InsertRequest", &insert, true).unwrap();
    let cid = uuid::Uuid::new_v4().to_string();
    let reply = bus
        .request_traced(
            json!({"operation": "INSERT", "request": json}),
            &cid,
            None,
            Some(&traceparent),
        )
        .await
        .unwrap();
    assert!(
        matches!(reply, bus_protocol::Reply::Completed(_)),
        "{reply:?}"
    );

    tap.wait_until(REPLY, "request and reply", |seen| {
        seen.iter()
            .filter(|r| r.json["correlation_id"] == cid.as_str())
            .count()
            == 2
    })
    .unwrap();
    let request = tap
        .seen
        .iter()
        .find(|r| r.topic == t.request && r.json["correlation_id"] == cid.as_str())
        .unwrap();
    assert_eq!(request.json["traceparent"], traceparent.as_str());
    let answer = tap
        .seen
        .iter()
        .find(|r| r.topic == t.completed && r.json["correlation_id"] == cid.as_str())
        .unwrap();
    let back = answer.json["traceparent"]
        .as_str()
        .expect("the reply carries a traceparent");
    let parts: Vec<&str> = back.split('-').collect();
    assert_eq!(parts.len(), 4, "{back}");
    assert_eq!(parts[1], trace_id, "same trace id on the reply");
    assert_ne!(parts[2], caller_span, "the reply is a new span");

    drop(svc);
}

/// A reply larger than the bus accepts (librdkafka's default `message.max.bytes`, 1 MB) is a
/// FAILED reply `REPLY_TOO_LARGE` rather than a publish retried forever, and the worker goes
/// on answering the requests after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_too_large_for_the_bus_fails_and_the_worker_goes_on() {
    let (db, topics, _svc) = start_bus_worker().await.unwrap();
    let mut conn = db.connect().await;
    // ~2.5 MB of rows, carried twice in a reply (rows and response).
    omnibus_tests::db::insert_padded_actions(&mut conn, "big", 300, 5000).await;
    let bus = BusPublisher::connect(topics.client_config(REPLY))
        .await
        .unwrap();
    let query = pb::QueryRequest {
        table: "agent_actions".into(),
        limit: Some(5000),
        ..Default::default()
    };
    match bus
        .call(&query, &uuid::Uuid::new_v4().to_string(), Some(FIRST_REPLY))
        .await
    {
        Err(BusError::Failed(f)) => {
            assert_eq!(f.error_code, "REPLY_TOO_LARGE", "{f:?}");
            assert!(f.error.contains("StreamQuery"), "{f:?}");
        }
        other => panic!("expected REPLY_TOO_LARGE, got {other:?}"),
    }
    let count = pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    };
    let counted = bus
        .call(&count, &uuid::Uuid::new_v4().to_string(), None)
        .await
        .unwrap();
    assert_eq!(counted.count, 5000);
}

/// A bus write whose returned rows are more than a bus reply carries is refused before it
/// commits (WRITE_REPLY_TOO_LARGE: nothing written, nothing recorded under its request id),
/// and the client falls back to gRPC with the same request id: the write happens once, over
/// gRPC (not a replay), and the caller gets every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_reply_is_too_large_for_the_bus_gets_its_result_over_grpc() {
    let (db, _svc, client) = bus_first(REPLY).await;
    // ~0.7 MB of request, ~2 MB of reply (the rows come back with their defaults, twice).
    let rows: Vec<prost_types::Struct> = (0..3000)
        .map(|_| {
            let mut row = action("too-large");
            row.fields.insert(
                "action_details".into(),
                omnibus_tests::db::to_value(json!({ "pad": "x".repeat(100) })),
            );
            row
        })
        .collect();
    let written = client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows,
            ..Default::default()
        })
        .await
        .unwrap();
    match &written.via {
        Via::Fallback(why) => assert!(
            why.starts_with("WRITE_REPLY_TOO_LARGE: ") && why.contains("nothing was written"),
            "{why}"
        ),
        other => panic!("expected a fallback after WRITE_REPLY_TOO_LARGE, got {other:?}"),
    }
    assert!(
        !written.response.replayed,
        "written over gRPC: the bus refused it without recording anything"
    );
    assert_eq!(written.response.affected, 3000);
    assert_eq!(written.response.rows.len(), 3000);
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'too-large'"
        )
        .await,
        3000
    );
}

/// A bus timeout longer than any deadline gRPC carries (tonic panics encoding one past
/// 99,999,999 hours) is sent as the longest one: the bus write goes through, and the direct
/// fallback after WRITE_REPLY_TOO_LARGE (its rows do not fit a reply) carries it as its
/// deadline instead of panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_timeout_past_what_grpc_carries_is_shortened_not_a_panic() {
    // Nothing here may wait as long as the timeouts it is given.
    let bounded = Duration::from_secs(120);
    let (db, _svc, client) = bus_first(Duration::from_secs(5_000_000 * 86_400)).await;
    let written = tokio::time::timeout(
        bounded,
        client.insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: (0..3000)
                .map(|_| {
                    let mut row = action("long-timeout");
                    row.fields.insert(
                        "action_details".into(),
                        omnibus_tests::db::to_value(json!({ "pad": "x".repeat(100) })),
                    );
                    row
                })
                .collect(),
            ..Default::default()
        }),
    )
    .await
    .expect("bounded")
    .unwrap();
    match &written.via {
        Via::Fallback(why) => assert!(why.starts_with("WRITE_REPLY_TOO_LARGE: "), "{why}"),
        other => panic!("expected a fallback after WRITE_REPLY_TOO_LARGE, got {other:?}"),
    }
    assert!(!written.response.replayed, "written once, over gRPC");
    assert_eq!(written.response.affected, 3000);
    assert_eq!(written.response.rows.len(), 3000);

    // Duration::MAX: its milliseconds do not fit the envelope's timeout_ms.
    let topics = BusTopics::create().await.unwrap();
    let svc = start_db_svc(&db, &topics, &fresh_group(), &[])
        .await
        .unwrap();
    let bus = Arc::new(
        BusPublisher::connect(topics.client_config(Duration::MAX))
            .await
            .unwrap(),
    );
    let client = DbClient::with_bus(svc.channel(), bus, WriteMode::BusFirst);
    let written = tokio::time::timeout(
        bounded,
        client.insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![action("longest-timeout")],
            ..Default::default()
        }),
    )
    .await
    .expect("bounded")
    .unwrap();
    assert_eq!(written.via, Via::Bus);
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name IN ('long-timeout', 'longest-timeout')"
        )
        .await,
        3001
    );
}

/// The direct fallback carries the bus timeout as its gRPC deadline: with the bus silent and
/// the table locked, the write ends with DEADLINE_EXCEEDED after about the timeout instead of
/// waiting for the lock, and the error names the request id to retry with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_fallback_is_bounded_by_the_bus_timeout() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let direct_only = grpc_only_db_svc(&db).await;
    let mut lock = db.connect().await;
    sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query("LOCK TABLE agent_actions IN SHARE MODE")
        .execute(&mut lock)
        .await
        .unwrap();

    let timeout = Duration::from_millis(1500);
    let bus = Arc::new(
        BusPublisher::connect(topics.client_config(timeout))
            .await
            .unwrap(),
    );
    let client = DbClient::with_bus(direct_only.channel(), bus, WriteMode::BusFirst);
    let request_id = uuid::Uuid::new_v4().to_string();
    let started = std::time::Instant::now();
    let err = client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![action("locked-out")],
            request_id: request_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let took = started.elapsed();
    // db-svc's answer (DEADLINE_EXCEEDED, just before the deadline) or, on a loaded machine,
    // the client's own deadline (tonic reports it as CANCELLED "Timeout expired").
    assert!(
        matches!(
            err.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{err:?}"
    );
    assert!(err.message().contains(&request_id), "{err:?}");
    // The bus wait plus the fallback's own deadline, not the lock's lifetime.
    assert!(took < Duration::from_secs(15), "took {took:?}");
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'locked-out'"
        )
        .await,
        0
    );
}

/// A request whose correlation id alone makes every reply too large for the bus (echoed in
/// the reply's key and body) is left unanswered and committed: it does not hold its
/// partition's offsets back forever, and later requests are committed past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_no_reply_can_carry_is_committed_not_retried_forever() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = fresh_group();
    let svc = start_db_svc(&db, &topics, &group, &[]).await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed, &t.dead_letter]).unwrap();
    // ~600 KB of id: the request fits the bus, a reply carrying it twice does not.
    let huge = "c".repeat(600_000);
    let env = omniclaude_envelope(&huge, "QUERY", None, "SELECT 1", json!([]));
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    let c = uuid::Uuid::new_v4().to_string();
    let env = omniclaude_envelope(&c, "QUERY", None, "SELECT 1", json!([]));
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    tap.reply_for(&c, FIRST_REPLY).unwrap();

    // Both requests are committed (the group's committed offsets add up to 2).
    let committed = committed_total(&group, &t.request, 2, REPLY);
    assert_eq!(committed, 2, "{}", svc.logs());
    assert!(
        svc.logs().contains("left unanswered and committed"),
        "{}",
        svc.logs()
    );
}

/// A write delivered after its deadline: if its id already committed (a redelivery after the
/// reply, or after a crash between commit and reply), the reply is the recorded result,
/// replayed; only a write never applied is refused as TIMEOUT, with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_redelivery_of_an_applied_write_is_replayed_not_timed_out() {
    let (db, topics, svc) = start_bus_worker().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed, &t.dead_letter]).unwrap();
    // `request_id` differs from the correlation id and is spelled as protobuf's JSON writes it
    // by default (`requestId`, as Python's MessageToJson does).
    let late_envelope = |id: &str, agent: &str| {
        let insert = pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![action(agent)],
            request_id: format!("req-{id}"),
            ..Default::default()
        };
        let json =
            omnibus_proto::json::to_json("omnibus.db.v1.InsertRequest", &insert, false).unwrap();
        assert!(json.get("requestId").is_some(), "{json}");
        // Sent a minute ago with a 1 s deadline: long past.
        let sent = chrono::Utc::now() - chrono::Duration::seconds(60);
        (
            insert,
            json!({
                "event_type": "DATABASE_QUERY_REQUESTED",
                "correlation_id": id,
                "timestamp": sent.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
                "payload": {"operation": "INSERT", "request": json, "timeout_ms": 1000},
            }),
        )
    };

    // Applied over gRPC first, then its late bus copy arrives.
    let applied = uuid::Uuid::new_v4().to_string();
    let (insert, env) = late_envelope(&applied, "late-applied");
    let first = DbClient::direct(svc.channel())
        .insert(insert)
        .await
        .unwrap();
    assert!(!first.response.replayed);
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    let reply = tap.reply_for(&applied, FIRST_REPLY).unwrap();
    assert_eq!(reply.topic, t.completed, "{reply:?}");
    assert_eq!(reply.json["payload"]["replayed"], json!(true), "{reply:?}");

    // Never applied: TIMEOUT, and nothing written.
    let never = uuid::Uuid::new_v4().to_string();
    let (_, env) = late_envelope(&never, "late-never");
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    let reply = tap.reply_for(&never, REPLY).unwrap();
    assert_eq!(reply.topic, t.failed, "{reply:?}");
    assert_eq!(reply.json["payload"]["error_code"], "TIMEOUT", "{reply:?}");
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name LIKE 'late-%'"
        )
        .await,
        1
    );
}

/// A write whose deadline passes during its attempt - here while its request-log claim waits
/// on the row of its request id, held by another transaction - although that id had already
/// committed is answered with the recorded result, like a late redelivery, not TIMEOUT
/// "nothing was done".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_write_whose_deadline_passes_during_its_attempt_is_replayed() {
    let (db, topics, svc) = start_bus_worker().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    // Warm-up: the worker has joined its group, so the request below starts at once.
    let warm = uuid::Uuid::new_v4().to_string();
    let env = omniclaude_envelope(&warm, "QUERY", None, "SELECT 1 AS one", json!([]));
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();
    tap.reply_for(&warm, FIRST_REPLY).unwrap();

    // Applied over gRPC.
    let request_id = format!("req-{}", uuid::Uuid::new_v4());
    let insert = pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![action("applied-during")],
        request_id: request_id.clone(),
        ..Default::default()
    };
    let first = DbClient::direct(svc.channel())
        .insert(insert.clone())
        .await
        .unwrap();
    assert!(!first.response.replayed);

    // A transaction updates the id's request-log row and keeps it: the bus copy's claim waits.
    let mut holder = db.connect().await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("UPDATE omnibus_request_log SET result = result WHERE request_id = $1")
        .bind(&request_id)
        .execute(&mut holder)
        .await
        .unwrap();

    let cid = uuid::Uuid::new_v4().to_string();
    let json = omnibus_proto::json::to_json("omnibus.db.v1.InsertRequest", &insert, false).unwrap();
    // 20 s: time for a loaded machine to fetch the request and reach the row. A write's
    // attempt ends its reply margin (a tenth of that: 2 s) before the deadline.
    let now = chrono::Utc::now();
    let deadline = now + chrono::Duration::seconds(20);
    let margin = chrono::Duration::seconds(2);
    let rfc3339 =
        |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string();
    let env = json!({
        "event_type": "DATABASE_QUERY_REQUESTED",
        "correlation_id": cid,
        "timestamp": rfc3339(now),
        "payload": {"operation": "INSERT", "request": json, "deadline": rfc3339(deadline)},
    });
    produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
        .await
        .unwrap();

    // The attempt started before the deadline: its claim waits on the held row.
    let mut probe = db.connect().await;
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%omnibus_request_log%'",
        )
        .fetch_one(&mut probe)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        // An attempt starts only with more than the margin left, so past that it never will.
        assert!(
            chrono::Utc::now() < deadline - margin,
            "the bus request did not reach the request log before its deadline: {}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Held past the deadline (the statement timeout ends that attempt), then released.
    let past = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(past + Duration::from_millis(1500)).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();

    let reply = tap.reply_for(&cid, REPLY).unwrap();
    reply.assert_write_completed(&t.completed, 1, true);
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'applied-during'"
        )
        .await,
        1
    );
}

/// SIGTERM with a bus request still running (held by a table lock): the worker drains for
/// `--shutdown-grace`, not a fixed 10 s, so db-svc exits within its documented bound and the
/// request stays uncommitted, to be redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_drain_is_bounded_by_the_shutdown_grace() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = fresh_group();
    let mut svc = start_db_svc_with_short_grace(&db, &topics, &group)
        .await
        .unwrap();
    let lock = TableLock::take_in(&db, "agent_actions", "ACCESS EXCLUSIVE").await;
    let c = uuid::Uuid::new_v4().to_string();
    let env = omniclaude_envelope(
        &c,
        "QUERY",
        None,
        "SELECT count(*) FROM agent_actions",
        json!([]),
    );
    produce(
        &topics.topics.request,
        None,
        &serde_json::to_vec(&env).unwrap(),
        "none",
    )
    .await
    .unwrap();
    lock.wait_blocked_in(&db, 1).await;
    let started = std::time::Instant::now();
    svc.terminate().unwrap();
    expect_drain_cut_by_grace(&mut svc, started).await;
    // The request cut short was not committed: the group redelivers it.
    assert_eq!(committed_total(&group, &topics.topics.request, 0, REPLY), 0);
    drop(lock);
}

/// Two calls that share a request id but not their rows each get their own answer over the
/// bus: the write that won gets its own row back, the other REQUEST_ID_REUSED. Each call has
/// a correlation id of its own, so neither can take the other's reply (the two replies come
/// on different topics, in either order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sharing_a_request_id_each_get_their_own_reply() {
    let (db, _svc, client) = bus_first(FIRST_REPLY).await;
    for round in 0..4 {
        let request_id = uuid::Uuid::new_v4().to_string();
        let calls: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let client = client.clone();
                let request = pb::InsertRequest {
                    table: "agent_actions".into(),
                    rows: vec![action(&format!("{name}-{round}"))],
                    request_id: request_id.clone(),
                    ..Default::default()
                };
                (
                    name,
                    tokio::spawn(async move { client.insert(request).await }),
                )
            })
            .collect();
        let mut written = 0;
        for (name, call) in calls {
            match call.await.unwrap() {
                Ok(w) => {
                    written += 1;
                    assert!(matches!(w.via, Via::Bus), "{:?}", w.via);
                    let row = omnibus_tests::db::from_struct(&w.response.rows[0]);
                    assert_eq!(row["agent_name"], format!("{name}-{round}"), "{row}");
                }
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{name}: {e:?}");
                    assert!(e.message().contains("REQUEST_ID_REUSED"), "{name}: {e:?}");
                }
            }
        }
        assert_eq!(written, 1, "round {round}");
    }
    assert_eq!(
        count_rows(&db, "SELECT count(*) FROM agent_actions").await,
        4
    );
}

/// A request whose execution panics (a bug; here a fail point) is answered INTERNAL_ERROR and
/// committed like any other; one whose task panics after the execution (no reply to give) is
/// committed unanswered. The worker goes on serving, and neither holds back the commits of
/// the requests after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_panics_is_answered_and_committed() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = fresh_group();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .env("OMNIBUS_FAILPOINT", "bus-panic")
        .args(topics.db_svc_args(&group))
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed, &t.dead_letter]).unwrap();
    let panics = format!("failpoint-panic-execute-{}", uuid::Uuid::new_v4());
    let unanswered = format!("failpoint-panic-reply-{}", uuid::Uuid::new_v4());
    let fine = uuid::Uuid::new_v4().to_string();
    for cid in [&panics, &unanswered, &fine] {
        let env = omniclaude_envelope(cid, "QUERY", None, "SELECT 1 AS one", json!([]));
        produce(&t.request, None, &serde_json::to_vec(&env).unwrap(), "none")
            .await
            .unwrap();
    }

    let reply = tap.reply_for(&panics, FIRST_REPLY).unwrap();
    assert_eq!(
        reply.json["event_type"], "DATABASE_QUERY_FAILED",
        "{reply:?}"
    );
    assert_eq!(reply.json["payload"]["error_code"], "INTERNAL_ERROR");
    assert_eq!(reply.json["payload"]["grpc_code"], "INTERNAL", "{reply:?}");
    assert_eq!(reply.json["payload"]["retryable"], false, "{reply:?}");
    assert!(
        !reply.json.to_string().contains("fail point"),
        "the panic's text stays in the log: {reply:?}"
    );
    let reply = tap.reply_for(&fine, FIRST_REPLY).unwrap();
    assert_eq!(
        reply.json["event_type"], "DATABASE_QUERY_COMPLETED",
        "{reply:?}"
    );
    assert_eq!(
        committed_total(&group, &t.request, 3, REPLY),
        3,
        "{}",
        svc.logs()
    );
    // Everything the worker sent before it committed all three: the two answered requests'
    // replies are there, and none for the one whose reply panicked (whichever partition it
    // would be on).
    let sent = read_to_end(&[&t.completed, &t.failed, &t.dead_letter]);
    // Anywhere in the message: a dead letter carries the request's payload as a string.
    let about = |cid: &str| sent.iter().filter(|m| m.to_string().contains(cid)).count();
    assert_eq!((about(&panics), about(&fine)), (1, 1), "{sent:#?}");
    assert_eq!(
        about(&unanswered),
        0,
        "no reply for the request whose reply panicked: {sent:#?}"
    );
    let logs = svc.logs();
    assert!(logs.contains("bus request panicked;"), "{logs}");
    assert!(
        logs.contains("bus request panicked outside its execution"),
        "{logs}"
    );
}

/// A request topic created after db-svc started (compose starts db-svc before anything has
/// produced to it) is served within seconds: the worker's consumer refreshes its metadata
/// every 5 s, not after librdkafka's default 5 minutes.
#[tokio::test]
async fn a_request_topic_created_after_start_is_served_within_seconds() {
    let db = TestDatabase::create().await.unwrap();
    let mut topics = BusTopics::create().await.unwrap();
    let prefix = omnibus_tests::TestTopics::fresh_prefix();
    topics.topics.request = format!("{prefix}db.requested");
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    let svc = start_db_svc(&db, &topics, &group, &[]).await.unwrap();
    // Long enough for the consumer to have looked the topic up and found it missing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    omnibus_tests::TestTopics::create_on(
        &topics.brokers,
        &prefix,
        &["db.requested"],
        omnibus_tests::bus::PARTITIONS,
    )
    .await
    .unwrap();
    let t = &topics.topics;
    let mut tap = Tap::new_on(&topics.brokers, &[&t.completed, &t.failed]).unwrap();
    let cid = uuid::Uuid::new_v4().to_string();
    let env = omniclaude_envelope(
        &cid,
        "QUERY",
        Some("agent_actions"),
        "SELECT id FROM agent_actions WHERE agent_name = $1",
        json!(["nobody"]),
    );
    produce(
        &t.request,
        Some(&cid),
        &serde_json::to_vec(&env).unwrap(),
        "none",
    )
    .await
    .unwrap();
    // The group join after the topic appears takes a few seconds on tansu; 5 minutes would
    // be the default refresh.
    let reply = tap.reply_for(&cid, Duration::from_secs(40));
    assert!(reply.is_ok(), "{reply:?}; db-svc log:\n{}", svc.logs());
}
