//! The db-svc bus worker across a broker that restarts empty (tansu `memory://`): the topics
//! come back with new ids, the consumer group and its committed offsets are gone. Requests
//! sent after the restart are still answered, and db-svc keeps running. Uses a private
//! broker, never the shared one.

use std::time::Duration;

use omnibus_client::bus::BusPublisher;
use omnibus_proto::db::v1 as pb;
use omnibus_tests::bus::{BusTopics, Tap, omniclaude_envelope, produce_on, start_db_svc};
use omnibus_tests::consumer::PrivateBroker;
use omnibus_tests::{ServiceProcess, TestDatabase};
use serde_json::json;

/// Sends one OmniClaude INSERT over the bus and returns the reply's event type (an error when
/// none came in `timeout`).
async fn insert_over_bus(
    topics: &BusTopics,
    agent: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let cid = uuid::Uuid::new_v4().to_string();
    let envelope = omniclaude_envelope(
        &cid,
        "INSERT",
        Some("agent_actions"),
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         VALUES ($1, $2, 'x', 'y')",
        json!([uuid::Uuid::new_v4().to_string(), agent]),
    );
    let t = &topics.topics;
    let mut tap = Tap::new_on(&topics.brokers, &[&t.completed, &t.failed]).unwrap();
    produce_on(
        &topics.brokers,
        &t.request,
        Some(&cid),
        &serde_json::to_vec(&envelope).unwrap(),
        "none",
    )
    .await
    .unwrap();
    let reply = tap.reply_for(&cid, timeout)?;
    Ok(reply.json["event_type"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// A private broker, a database, the bus topics and db-svc on them (with `extra` flags).
struct Setup {
    broker: PrivateBroker,
    db: TestDatabase,
    topics: BusTopics,
    svc: ServiceProcess,
}

async fn setup(extra: &[&str]) -> Setup {
    let broker = PrivateBroker::start().await.unwrap();
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create_on(&broker.addr()).await.unwrap();
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    let svc = start_db_svc(&db, &topics, &group, extra).await.unwrap();
    Setup {
        broker,
        db,
        topics,
        svc,
    }
}

/// Sends one insert over the bus (tagged `agent`) and expects it answered COMPLETED within
/// `timeout`.
async fn answered(s: &mut Setup, agent: &str, timeout: Duration) {
    let reply = insert_over_bus(&s.topics, agent, timeout).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some("DATABASE_QUERY_COMPLETED"),
        "{reply:?}; db-svc log:\n{}",
        s.svc.logs()
    );
}

/// Restarts the broker empty and creates the topics again.
async fn restart_empty(s: &mut Setup) {
    s.broker.restart().await.unwrap();
    s.topics.recreate().await.unwrap();
}

#[tokio::test]
async fn bus_worker_answers_after_the_broker_restarts_empty() {
    let mut s = setup(&[]).await;
    answered(&mut s, "before", Duration::from_secs(30)).await;

    restart_empty(&mut s).await;
    // The group must be formed again on the empty broker: allow it time, then expect every
    // request to be answered.
    answered(&mut s, "after", Duration::from_secs(90)).await;
    for _ in 0..3 {
        answered(&mut s, "after", Duration::from_secs(30)).await;
    }
    assert!(s.svc.is_running(), "db-svc exited:\n{}", s.svc.logs());

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&s.db.url)
        .await
        .unwrap();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT agent_name, count(*) FROM agent_actions GROUP BY agent_name ORDER BY agent_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![("after".to_string(), 4), ("before".to_string(), 1)]
    );
}

/// Two restarts in quick succession: the second outage comes while the consumer that
/// replaced the first one's is new, so its own replacement has to wait
/// (`--bus-replace-interval`, 15 s here so that it surely does). Meanwhile it leaves its
/// group, so that it cannot join the restarted broker beside its successor (tansu then kept
/// the one that left as the group's leader, and requests went unanswered for good:
/// `scripts/stress-broker-restarts db`). Every request after the restarts is answered.
#[tokio::test]
async fn bus_worker_answers_after_two_quick_restarts() {
    let mut s = setup(&["--bus-replace-interval", "15s"]).await;
    answered(&mut s, "first", Duration::from_secs(30)).await;
    restart_empty(&mut s).await;
    answered(&mut s, "second", Duration::from_secs(90)).await;
    // At once: the consumer that answered is the one that replaced the first outage's.
    restart_empty(&mut s).await;
    for _ in 0..2 {
        answered(&mut s, "third", Duration::from_secs(90)).await;
    }
    assert!(s.svc.is_running(), "db-svc exited:\n{}", s.svc.logs());
}

/// The Rust publisher reads reply partitions that appear after it connected. The broker
/// restarts empty and the topics come back with 12 partitions instead of 3; db-svc sends each
/// reply to the partition its correlation id hashes to, so most of the replies below land in
/// partitions the publisher did not know when it connected. Every call is still answered
/// over the bus: before, those timed out (and a client fell back to gRPC for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_reads_reply_partitions_added_after_it_connected() {
    let mut s = setup(&[]).await;
    let bus = BusPublisher::connect(s.topics.client_config(Duration::from_secs(30)))
        .await
        .unwrap();
    let count = pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    };
    let cid = || uuid::Uuid::new_v4().to_string();
    assert_eq!(bus.call(&count, &cid(), None).await.unwrap().count, 0);

    s.broker.restart().await.unwrap();
    s.topics.recreate_with(12).await.unwrap();
    // db-svc's worker answers again (its group formed anew on the empty broker).
    answered(&mut s, "after", Duration::from_secs(90)).await;
    for i in 0..12 {
        let answer = bus.call(&count, &cid(), None).await;
        assert_eq!(
            answer.as_ref().map(|c| c.count).ok(),
            Some(1),
            "call {i}: {answer:?}; db-svc log:\n{}",
            s.svc.logs()
        );
    }
}

/// SIGTERM while a bus write runs and every broker is gone: the write is let go on during the
/// drain, its reply has nowhere to go, and the drain still ends at `--shutdown-grace` (1 s
/// here), leaving the request uncommitted, to be redelivered and answered from its request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_drain_is_bounded_by_the_grace_with_the_broker_gone() {
    use sqlx::Connection;
    let mut broker = PrivateBroker::start().await.unwrap();
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create_on(&broker.addr()).await.unwrap();
    let mut args = topics.db_svc_args(&format!("g-{}", uuid::Uuid::new_v4().simple()));
    let at = args
        .iter()
        .position(|a| a == "--shutdown-grace")
        .expect("the test topics' db-svc sets --shutdown-grace");
    args[at + 1] = "1s".into();
    let mut svc = omnibus_tests::ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(args)
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();

    let mut lock = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::query("LOCK TABLE agent_actions IN SHARE MODE")
        .execute(&mut lock)
        .await
        .unwrap();
    let cid = uuid::Uuid::new_v4().to_string();
    let envelope = omniclaude_envelope(
        &cid,
        "INSERT",
        Some("agent_actions"),
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         VALUES ($1, 'drained', 'x', 'y')",
        json!([uuid::Uuid::new_v4().to_string()]),
    );
    produce_on(
        &topics.brokers,
        &topics.topics.request,
        Some(&cid),
        &serde_json::to_vec(&envelope).unwrap(),
        "none",
    )
    .await
    .unwrap();
    // The write waits on the lock.
    let mut probe = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut probe)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.stop();
    let started = std::time::Instant::now();
    svc.terminate().unwrap();
    // The write goes through during the drain; its reply has no broker to go to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::query("COMMIT").execute(&mut lock).await.unwrap();
    let status = svc.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "{status:?}: {}", svc.logs());
    // 1 s of grace and at most 2 s for busy database connections, with slack for a loaded
    // machine; a drain waiting for the broker would last until the process is killed.
    assert!(
        started.elapsed() < Duration::from_millis(8500),
        "exited after {:?}: {}",
        started.elapsed(),
        svc.logs()
    );
    assert!(
        svc.logs()
            .contains("bus requests still running after 1s (--shutdown-grace)"),
        "{}",
        svc.logs()
    );
}
