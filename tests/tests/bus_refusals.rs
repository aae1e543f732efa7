//! The bus worker's refusals, end to end against the real broker and PostgreSQL: replies the
//! broker refuses for good, writes (SQL and structured form) whose rows no reply can carry,
//! writes with too little time left, reads past their deadline while PostgreSQL is down, and a
//! worker that cannot start.

use std::time::Duration;

use omnibus_tests::bus::{
    BusTopics, Received, Tap, committed_total, count_rows, fresh_group, omniclaude_envelope,
    produce, start_bus_worker,
};
use omnibus_tests::{ServiceSpec, TestDatabase};
use serde_json::{Value, json};

/// The first request may wait for the worker's consumer-group join.
const FIRST_REPLY: Duration = Duration::from_secs(40);
const REPLY: Duration = Duration::from_secs(20);

fn rfc3339(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

async fn send(topic: &str, envelope: &Value) {
    produce(topic, None, &serde_json::to_vec(envelope).unwrap(), "none")
        .await
        .unwrap();
}

/// Sends an OmniClaude request on `agent_actions` and waits for its reply.
async fn ask(
    tap: &mut Tap,
    request_topic: &str,
    operation: &str,
    sql: &str,
    params: Value,
) -> Received {
    let c = uuid::Uuid::new_v4().to_string();
    send(
        request_topic,
        &omniclaude_envelope(&c, operation, Some("agent_actions"), sql, params),
    )
    .await;
    tap.reply_for(&c, REPLY).unwrap()
}

/// Sends a query and waits for its reply: the worker has joined its group.
async fn warm_up(tap: &mut Tap, topic: &str) {
    let c = uuid::Uuid::new_v4().to_string();
    send(
        topic,
        &omniclaude_envelope(&c, "QUERY", None, "SELECT 1 AS one", json!([])),
    )
    .await;
    tap.reply_for(&c, FIRST_REPLY).unwrap();
}

/// A bus worker on a fresh database holding `n` actions of agent `agent` with `pad` bytes of
/// `action_details` each, a tap on its reply topics, and the worker seen answering.
async fn padded_bus_worker(
    agent: &str,
    pad: i32,
    n: i32,
) -> (TestDatabase, BusTopics, omnibus_tests::ServiceProcess, Tap) {
    let (db, topics, svc) = start_bus_worker().await.unwrap();
    let t = &topics.topics;
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    let mut conn = db.connect().await;
    omnibus_tests::db::insert_padded_actions(&mut conn, agent, pad, n).await;
    warm_up(&mut tap, &t.request).await;
    (db, topics, svc, tap)
}

/// db-svc on `topics` with some of its topic flags pointing elsewhere (`(flag, topic)`), and
/// topics neither created by a reply nor waited for: found missing within a second.
async fn db_svc_with_topics(
    db: &TestDatabase,
    topics: &BusTopics,
    group: &str,
    replaced: &[(&str, String)],
) -> omnibus_tests::ServiceProcess {
    let mut args = topics.db_svc_args(group);
    for (flag, topic) in replaced {
        let at = args.iter().position(|a| a == flag).expect("a topic flag");
        args[at + 1] = topic.clone();
    }
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(args)
        .args([
            "--kafka-config",
            "allow.auto.create.topics=false",
            "--kafka-config",
            "topic.metadata.propagation.max.ms=1000",
        ])
        .spawn()
        .expect("spawn db-svc");
    svc.wait_serving().await.expect("db-svc SERVING");
    svc
}

/// A failed-reply topic and a dead-letter topic that do not exist (and are not created on
/// demand): the replies and dead letters the broker refuses for good are given up, logged and
/// the requests committed, instead of being retried forever with the partition's later
/// commits held back behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_the_broker_refuses_for_good_are_committed_not_retried_forever() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = fresh_group();
    let t = topics.topics.clone();
    let missing = format!("omnibus-missing-{}", uuid::Uuid::new_v4().simple());
    let svc = db_svc_with_topics(
        &db,
        &topics,
        &group,
        &[
            ("--failed-topic", format!("{missing}.failed")),
            ("--dead-letter-topic", format!("{missing}.dlq")),
        ],
    )
    .await;
    let mut tap = Tap::new(&[&t.completed]).unwrap();
    warm_up(&mut tap, &t.request).await;

    // A FAILED reply (to the missing topic), a dead letter (no correlation id: to the missing
    // topic), then a request answered on the completed topic.
    let bad = uuid::Uuid::new_v4().to_string();
    send(
        &t.request,
        &omniclaude_envelope(
            &bad,
            "QUERY",
            None,
            "SELECT * FROM no_such_table",
            json!([]),
        ),
    )
    .await;
    send(
        &t.request,
        &json!({"event_type": "DATABASE_QUERY_REQUESTED", "payload": {}}),
    )
    .await;
    let good = uuid::Uuid::new_v4().to_string();
    send(
        &t.request,
        &omniclaude_envelope(&good, "QUERY", None, "SELECT 1 AS one", json!([])),
    )
    .await;
    tap.reply_for(&good, REPLY).unwrap();

    // All four requests are committed, the two unanswerable ones included.
    let committed = committed_total(&group, &t.request, 4, REPLY);
    assert_eq!(committed, 4, "{}", svc.logs());
    assert!(
        svc.logs().contains("the bus refuses it"),
        "the refusal is logged:\n{}",
        svc.logs()
    );
}

/// An SQL-form write whose returned rows are more than a bus reply carries is refused and
/// rolled back before it commits, answered WRITE_REPLY_TOO_LARGE (on `sql`): OmniClaude, with
/// no request id to fetch a recorded result with, would otherwise be told REPLY_TOO_LARGE for
/// a write that happened, and write again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sql_write_returning_more_than_a_reply_carries_is_refused_before_it_commits() {
    // ~2 MB of action_details, returned by the update below.
    let (db, topics, _svc, mut tap) = padded_bus_worker("big-write", 2000, 1000).await;
    let t = topics.topics.clone();

    let reply = ask(
        &mut tap,
        &t.request,
        "UPDATE",
        "UPDATE agent_actions SET action_name = 'updated' WHERE agent_name = $1 \
         RETURNING action_details",
        json!(["big-write"]),
    )
    .await;
    assert_eq!(reply.topic, t.failed, "{reply:?}");
    let payload = &reply.json["payload"];
    assert_eq!(payload["error_code"], "WRITE_REPLY_TOO_LARGE", "{reply:?}");
    assert_eq!(payload["grpc_code"], "INVALID_ARGUMENT", "{reply:?}");
    assert_eq!(payload["retryable"], json!(false), "{reply:?}");
    assert_eq!(
        payload["details"]["field_violations"][0]["field"], "sql",
        "{reply:?}"
    );
    let error = payload["error"].as_str().unwrap();
    assert!(
        error.contains("bus reply") && error.contains("nothing was written"),
        "{error}"
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE action_name = 'updated'"
        )
        .await,
        0,
        "rolled back"
    );

    // A write returning little, and a read of more than the write limit, still go through.
    let reply = ask(
        &mut tap,
        &t.request,
        "UPDATE",
        "UPDATE agent_actions SET action_name = 'updated' WHERE agent_name = $1 RETURNING id",
        json!(["big-write"]),
    )
    .await;
    assert_eq!(reply.topic, t.completed, "{reply:?}");
    assert_eq!(reply.json["payload"]["rows_affected"], json!(1000));
    let reply = ask(
        &mut tap,
        &t.request,
        "QUERY",
        "SELECT action_details FROM agent_actions WHERE agent_name = $1 LIMIT 300",
        json!(["big-write"]),
    )
    .await;
    assert_eq!(reply.topic, t.completed, "~600 KB of rows: {reply:?}");
    assert_eq!(reply.json["payload"]["row_count"], json!(300));
}

/// A structured-form request envelope (`operation` + the gRPC request as proto3 JSON).
fn structured_envelope(correlation_id: &str, operation: &str, request: Value) -> Value {
    json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": "DATABASE_QUERY_REQUESTED",
        "correlation_id": correlation_id,
        "timestamp": rfc3339(chrono::Utc::now()),
        "service": "bus-refusals-test",
        "payload": { "operation": operation, "request": request },
    })
}

/// Asserts that `reply` is the refusal of a structured write whose rows no reply can carry:
/// FAILED, WRITE_REPLY_TOO_LARGE (INVALID_ARGUMENT on the direct path) with a field violation
/// on `count_only`, saying nothing was written.
fn assert_refused_before_commit(reply: &omnibus_tests::bus::Received, failed_topic: &str) {
    assert_eq!(reply.topic, failed_topic, "{reply:?}");
    let payload = &reply.json["payload"];
    assert_eq!(payload["error_code"], "WRITE_REPLY_TOO_LARGE", "{reply:?}");
    assert_eq!(payload["grpc_code"], "INVALID_ARGUMENT", "{reply:?}");
    assert_eq!(payload["retryable"], json!(false), "{reply:?}");
    assert_eq!(
        payload["details"]["field_violations"][0]["field"], "count_only",
        "{reply:?}"
    );
    let error = payload["error"].as_str().unwrap();
    assert!(
        error.contains("bus reply")
            && error.contains("nothing was written")
            && error.contains("count_only"),
        "{error}"
    );
}

/// A structured-form write (INSERT, UPDATE) whose returned rows are more than a bus reply
/// carries is refused and rolled back before it commits, answered WRITE_REPLY_TOO_LARGE (on
/// `count_only`), as an SQL-form one is: committed, it was answered REPLY_TOO_LARGE, and a
/// caller without the Rust client's gRPC retry took that for a failed write and wrote again.
/// Nothing is recorded under its request id: the same write asking for the count alone
/// (`count_only`) with the same request id then goes through, once. A read too large for a
/// reply is still REPLY_TOO_LARGE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_write_returning_more_than_a_reply_carries_is_refused_before_it_commits() {
    // ~1 MB of action_details, returned by the update below.
    let (db, topics, svc, mut tap) = padded_bus_worker("big-update", 1000, 1000).await;
    let t = topics.topics.clone();

    // INSERT: ~0.6 MB of request (under the bus's 1 MB), its rows returned with their defaults
    // in `rows` and again in `response`.
    let request_id = uuid::Uuid::new_v4().to_string();
    let insert = |count_only: bool| {
        let rows: Vec<Value> = (0..600)
            .map(|_| {
                let mut row = omnibus_tests::db::action("big-insert");
                row["action_details"] = json!({ "pad": "x".repeat(1000) });
                row
            })
            .collect();
        json!({
            "table": "agent_actions",
            "rows": rows,
            "request_id": request_id,
            "count_only": count_only,
        })
    };
    let inserted = "SELECT count(*) FROM agent_actions WHERE agent_name = 'big-insert'";
    let c = uuid::Uuid::new_v4().to_string();
    send(
        &t.request,
        &structured_envelope(&c, "INSERT", insert(false)),
    )
    .await;
    let reply = tap
        .reply_for(&c, REPLY)
        .unwrap_or_else(|e| panic!("{e}: {}", svc.logs()));
    assert_refused_before_commit(&reply, &t.failed);
    assert_eq!(count_rows(&db, inserted).await, 0, "rolled back");
    // The same write, count only, under the same request id: written once, not replayed.
    let c = uuid::Uuid::new_v4().to_string();
    send(&t.request, &structured_envelope(&c, "INSERT", insert(true))).await;
    let reply = tap.reply_for(&c, REPLY).unwrap();
    assert_eq!(reply.topic, t.completed, "{reply:?}");
    let payload = &reply.json["payload"];
    assert_eq!(payload["rows_affected"], json!(600), "{reply:?}");
    assert_eq!(payload["row_count"], json!(0), "{reply:?}");
    assert_eq!(payload["replayed"], json!(false), "{reply:?}");
    assert_eq!(count_rows(&db, inserted).await, 600);

    // UPDATE: ~1 MB of rows returned.
    let update = |count_only: bool| {
        json!({
            "table": "agent_actions",
            "where": { "agent_name": "big-update" },
            "set": { "action_name": "updated" },
            "count_only": count_only,
        })
    };
    let updated = "SELECT count(*) FROM agent_actions WHERE action_name = 'updated'";
    let c = uuid::Uuid::new_v4().to_string();
    send(
        &t.request,
        &structured_envelope(&c, "UPDATE", update(false)),
    )
    .await;
    let reply = tap.reply_for(&c, REPLY).unwrap();
    assert_refused_before_commit(&reply, &t.failed);
    assert_eq!(count_rows(&db, updated).await, 0, "rolled back");
    let c = uuid::Uuid::new_v4().to_string();
    send(&t.request, &structured_envelope(&c, "UPDATE", update(true))).await;
    let reply = tap.reply_for(&c, REPLY).unwrap();
    assert_eq!(reply.topic, t.completed, "{reply:?}");
    assert_eq!(reply.json["payload"]["rows_affected"], json!(1000));
    assert_eq!(count_rows(&db, updated).await, 1000);

    // A read of the same rows changes nothing: REPLY_TOO_LARGE, as before.
    let c = uuid::Uuid::new_v4().to_string();
    let query = json!({
        "table": "agent_actions",
        "where": { "agent_name": "big-update" },
        "limit": 1000,
    });
    send(&t.request, &structured_envelope(&c, "QUERY", query)).await;
    let reply = tap.reply_for(&c, REPLY).unwrap();
    assert_eq!(reply.topic, t.failed, "{reply:?}");
    assert_eq!(reply.json["payload"]["error_code"], "REPLY_TOO_LARGE");
}

/// A read whose rows come to far more than any reply could carry (here ~10 MB, against a
/// 1 MB bus) is refused while its rows are read, in both forms, rather than built whole and
/// copied into JSON several times before REPLY_TOO_LARGE: such reads (10,000 rows of large
/// jsonb) could otherwise run db-svc out of memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_far_larger_than_a_reply_is_refused_while_its_rows_are_read() {
    let (_db, topics, svc, mut tap) = padded_bus_worker("huge", 100_000, 100).await;
    let t = topics.topics.clone();
    let check = |reply: &omnibus_tests::bus::Received, field: &str| {
        assert_eq!(reply.topic, t.failed, "{reply:?}");
        let payload = &reply.json["payload"];
        assert_eq!(payload["error_code"], "VALIDATION_ERROR", "{reply:?}");
        assert_eq!(
            payload["details"]["field_violations"][0]["field"], field,
            "{reply:?}"
        );
        let error = payload["error"].as_str().unwrap();
        assert!(error.contains("bus reply could carry"), "{error}");
    };
    let c = uuid::Uuid::new_v4().to_string();
    let query = json!({"table": "agent_actions", "where": {"agent_name": "huge"}, "limit": 100});
    send(&t.request, &structured_envelope(&c, "QUERY", query)).await;
    let reply = tap
        .reply_for(&c, REPLY)
        .unwrap_or_else(|e| panic!("{e}: {}", svc.logs()));
    check(&reply, "limit");
    let c = uuid::Uuid::new_v4().to_string();
    send(
        &t.request,
        &omniclaude_envelope(
            &c,
            "QUERY",
            Some("agent_actions"),
            "SELECT * FROM agent_actions WHERE agent_name = $1",
            json!(["huge"]),
        ),
    )
    .await;
    check(&tap.reply_for(&c, REPLY).unwrap(), "sql");
    // A read that fits is answered as ever.
    let c = uuid::Uuid::new_v4().to_string();
    let query = json!({"table": "agent_actions", "where": {"agent_name": "huge"}, "limit": 3});
    send(&t.request, &structured_envelope(&c, "QUERY", query)).await;
    let reply = tap.reply_for(&c, REPLY).unwrap();
    assert_eq!(reply.topic, t.completed, "{reply:?}");
}

/// A write picked up with less time left than its reply needs (a tenth of its timeout, at
/// least 500 ms, at most 5 s) is answered TIMEOUT without writing: executed, its reply would
/// reach the caller after it gave up and wrote directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_with_too_little_time_left_is_not_started() {
    let (db, topics, _svc) = start_bus_worker().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    warm_up(&mut tap, &t.request).await;

    // A 60 s timeout (a 5 s margin), sent `ago` before now; its deadline.
    let insert = |agent: &str, ago: chrono::Duration| {
        let c = uuid::Uuid::new_v4().to_string();
        let mut env = omniclaude_envelope(
            &c,
            "INSERT",
            None,
            "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
             VALUES ($1, $2, 'x', 'y')",
            json!([uuid::Uuid::new_v4().to_string(), agent]),
        );
        let sent = chrono::Utc::now() - ago;
        env["timestamp"] = json!(rfc3339(sent));
        env["payload"]["timeout_ms"] = json!(60_000);
        (c, env, sent + chrono::Duration::seconds(60))
    };
    // About 4.5 s left: ample to insert a row, but less than the margin. The refusal proves
    // the margin rule only when it came before the deadline (else the deadline itself explains
    // it): a reply seen later, after a pickup slower than 4.5 s, is sent again.
    let mut refused_in_time = false;
    for _ in 0..3 {
        let (late, env, deadline) = insert("too-late", chrono::Duration::milliseconds(55_500));
        send(&t.request, &env).await;
        let reply = tap.reply_for(&late, REPLY).unwrap();
        let seen = chrono::Utc::now();
        assert_eq!(reply.topic, t.failed, "{reply:?}");
        assert_eq!(reply.json["payload"]["error_code"], "TIMEOUT", "{reply:?}");
        let error = reply.json["payload"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("was less than 5000 ms away")
                && error.contains("too close for a write and its reply"),
            "{reply:?}"
        );
        if seen < deadline {
            refused_in_time = true;
            break;
        }
    }
    assert!(
        refused_in_time,
        "every refusal came after its deadline: the margin rule was never shown"
    );
    // With the whole timeout left, the same write goes through.
    let (in_time, env, _) = insert("in-time", chrono::Duration::zero());
    send(&t.request, &env).await;
    let reply = tap.reply_for(&in_time, REPLY).unwrap();
    assert_eq!(reply.topic, t.completed, "{reply:?}");
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'too-late'"
        )
        .await,
        0
    );
    let written = count_rows(
        &db,
        "SELECT count(*) FROM agent_actions WHERE agent_name = 'in-time'",
    )
    .await;
    assert_eq!(written, 1);
}

/// A read past its deadline is answered TIMEOUT at once, also while PostgreSQL is
/// unreachable: it cannot have written anything, so there is no request log to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_past_its_deadline_is_answered_at_once_while_the_database_is_down() {
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
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    warm_up(&mut tap, &t.request).await;

    proxy.down();
    let c = uuid::Uuid::new_v4().to_string();
    let mut env = omniclaude_envelope(&c, "QUERY", None, "SELECT 1 AS one", json!([]));
    env["payload"]["deadline"] = json!("2020-01-01T00:00:00Z");
    let sent = std::time::Instant::now();
    send(&t.request, &env).await;
    let reply = tap.reply_for(&c, Duration::from_secs(10));
    let took = sent.elapsed();
    proxy.up();
    let reply = reply.unwrap_or_else(|e| panic!("{e}: {}", svc.logs()));
    assert_eq!(reply.json["payload"]["error_code"], "TIMEOUT", "{reply:?}");
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

/// A bus worker that cannot start (librdkafka refuses its settings) stops db-svc, which exits
/// non-zero, instead of serving gRPC as healthy with nobody answering the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_worker_that_cannot_start_stops_db_svc_with_an_error() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(topics.db_svc_args(&fresh_group()))
        .args(["--kafka-config", "no.such.property=1"])
        .spawn()
        .unwrap();
    let status = svc
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", svc.logs()));
    assert!(!status.success(), "{status:?}: {}", svc.logs());
    let logs = svc.logs();
    assert!(
        logs.contains("event-bus worker failed") && logs.contains("no.such.property"),
        "{logs}"
    );
}

/// A COMPLETED reply the bus refuses (its topic missing, not created on demand) is retried,
/// not given up: its request may have written, and OmniClaude, left without the reply, would
/// write again directly. Once the topic exists the reply goes out and the request is
/// committed; the write was applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_reply_the_bus_refuses_is_retried_until_its_topic_exists() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = fresh_group();
    let t = topics.topics.clone();
    let prefix = format!("omnibus-late-{}.", uuid::Uuid::new_v4().simple());
    let completed = format!("{prefix}db.completed");
    let svc = db_svc_with_topics(
        &db,
        &topics,
        &group,
        &[("--completed-topic", completed.clone())],
    )
    .await;

    let c = uuid::Uuid::new_v4().to_string();
    send(
        &t.request,
        &omniclaude_envelope(
            &c,
            "INSERT",
            Some("agent_actions"),
            "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
             VALUES ($1, 'late-reply', 'success', 'x')",
            json!([c]),
        ),
    )
    .await;
    let written = "SELECT count(*) FROM agent_actions WHERE agent_name = 'late-reply'";
    let deadline = std::time::Instant::now() + REPLY;
    while !svc.logs().contains("refuses a completed reply") {
        assert!(
            std::time::Instant::now() < deadline,
            "the refusal is logged:\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count_rows(&db, written).await, 1, "the write was applied");
    assert!(
        !svc.logs().contains("the bus refuses it"),
        "not given up:\n{}",
        svc.logs()
    );

    // The topic appears: the same reply goes out, and the request is committed.
    omnibus_tests::TestTopics::create_on(
        &omnibus_tests::kafka_brokers(),
        &prefix,
        &["db.completed"],
        1,
    )
    .await
    .unwrap();
    let mut tap = Tap::new(&[&completed]).unwrap();
    let reply = tap.reply_for(&c, REPLY).unwrap();
    assert_eq!(reply.topic, completed, "{reply:?}");
    let committed = committed_total(&group, &t.request, 1, REPLY);
    assert_eq!(committed, 1, "{}", svc.logs());
    assert_eq!(count_rows(&db, written).await, 1, "written once");
}

/// `DB_BUS_SQL_WRITES=false` (the README's way to narrow "the bus is a second door") makes the
/// SQL form read-only: its INSERT, UPDATE and DELETE are refused WRITE_NOT_ALLOWED, naming the
/// setting, and change nothing, while its reads and the structured writes still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bus_sql_writes_the_sql_form_is_read_only() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .env("DB_BUS_SQL_WRITES", "false")
        .args(topics.db_svc_args(&fresh_group()))
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    let t = topics.topics.clone();
    let mut tap = Tap::new(&[&t.completed, &t.failed]).unwrap();
    let mut conn = db.connect().await;
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         VALUES (gen_random_uuid(), 'kept', 'x', 'before')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    warm_up(&mut tap, &t.request).await;

    // A read in the SQL form is answered.
    let reply = ask(
        &mut tap,
        &t.request,
        "QUERY",
        "SELECT action_name FROM agent_actions WHERE agent_name = $1",
        json!(["kept"]),
    )
    .await;
    assert_eq!(reply.topic, t.completed, "{reply:?}");
    assert_eq!(
        reply.json["payload"]["rows"][0]["action_name"], "before",
        "{reply:?}"
    );

    // Its writes are refused.
    let writes = [
        (
            "INSERT",
            "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
             VALUES ($1, 'sql-write', 'x', 'y')",
            json!([uuid::Uuid::new_v4().to_string()]),
        ),
        (
            "UPDATE",
            "UPDATE agent_actions SET action_name = 'after' WHERE agent_name = $1",
            json!(["kept"]),
        ),
        (
            "DELETE",
            "DELETE FROM agent_actions WHERE agent_name = $1",
            json!(["kept"]),
        ),
    ];
    for (operation, sql, params) in writes {
        let reply = ask(&mut tap, &t.request, operation, sql, params).await;
        assert_eq!(reply.topic, t.failed, "{operation}: {reply:?}");
        let payload = &reply.json["payload"];
        assert_eq!(
            payload["error_code"], "WRITE_NOT_ALLOWED",
            "{operation}: {reply:?}"
        );
        assert_eq!(
            payload["grpc_code"], "PERMISSION_DENIED",
            "{operation}: {reply:?}"
        );
        let error = payload["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("DB_BUS_SQL_WRITES") && !error.contains("--raw-sql-writes"),
            "{operation}: the refusal names the setting that allows it: {reply:?}"
        );
    }
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'sql-write'"
        )
        .await,
        0
    );
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'kept' \
             AND action_name = 'before'"
        )
        .await,
        1,
        "neither updated nor deleted"
    );

    // A structured write still goes through.
    let c = uuid::Uuid::new_v4().to_string();
    let row = json!({
        "correlation_id": uuid::Uuid::new_v4().to_string(),
        "agent_name": "structured",
        "action_type": "x",
        "action_name": "y",
    });
    let insert = json!({"table": "agent_actions", "rows": [row]});
    send(&t.request, &structured_envelope(&c, "INSERT", insert)).await;
    tap.reply_for(&c, REPLY)
        .unwrap()
        .assert_write_completed(&t.completed, 1, false);
    assert_eq!(
        count_rows(
            &db,
            "SELECT count(*) FROM agent_actions WHERE agent_name = 'structured'"
        )
        .await,
        1
    );
}
