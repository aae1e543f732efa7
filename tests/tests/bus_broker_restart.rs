//! The db-svc bus worker across a broker that restarts empty (tansu `memory://`): the topics
//! come back with new ids, the consumer group and its committed offsets are gone. Requests
//! sent after the restart are still answered, and db-svc keeps running. Uses a private
//! broker, never the shared one.

use std::time::Duration;

use omnibus_client::bus::BusPublisher;
use omnibus_proto::db::v1 as pb;
use omnibus_tests::bus::{
    BusTopics, Tap, expect_drain_cut_by_grace, omniclaude_envelope, produce_on, start_db_svc,
    start_db_svc_with_short_grace,
};
use omnibus_tests::consumer::PrivateBroker;
use omnibus_tests::db::TableLock;
use omnibus_tests::{ServiceProcess, TestDatabase};
use serde_json::json;

/// An OmniClaude INSERT of one agent_actions row tagged `agent`.
fn insert_envelope(cid: &str, agent: &str) -> serde_json::Value {
    omniclaude_envelope(
        cid,
        "INSERT",
        Some("agent_actions"),
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
         VALUES ($1, $2, 'x', 'y')",
        json!([uuid::Uuid::new_v4().to_string(), agent]),
    )
}

/// Sends one OmniClaude INSERT over the bus and returns the reply's event type (an error when
/// none came in `timeout`).
async fn insert_over_bus(
    topics: &BusTopics,
    agent: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let cid = uuid::Uuid::new_v4().to_string();
    let envelope = insert_envelope(&cid, agent);
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

/// `calls` `Count`s of agent_actions over `bus`, each answered over the bus with `expected`.
async fn counted_over_the_bus(s: &Setup, bus: &BusPublisher, calls: usize, expected: u64) {
    let count = pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    };
    for i in 0..calls {
        let cid = uuid::Uuid::new_v4().to_string();
        let answer = bus.call(&count, &cid, None).await;
        assert_eq!(
            answer.as_ref().map(|c| c.count).ok(),
            Some(expected),
            "call {i}: {answer:?}; db-svc log:\n{}",
            s.svc.logs()
        );
    }
}

/// The Rust publisher reads every reply after the broker restarted empty. Its reply consumer
/// held positions in the old logs; a new log that grew to such a position before the consumer
/// fetched it again raised no out-of-range error, and the replies below it were skipped (on a
/// loaded machine, most runs: a call timed out). After an outage the publisher now reads the
/// reply partitions again from shortly before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_reads_every_reply_after_the_broker_restarts_empty() {
    let mut s = setup(&[]).await;
    let bus = BusPublisher::connect(s.topics.client_config(Duration::from_secs(30)))
        .await
        .unwrap();
    // Positions past 0 in the reply partitions.
    counted_over_the_bus(&s, &bus, 12, 0).await;
    restart_empty(&mut s).await;
    // db-svc's worker answers again (its group formed anew), filling the new logs.
    for _ in 0..3 {
        answered(&mut s, "after", Duration::from_secs(90)).await;
    }
    counted_over_the_bus(&s, &bus, 12, 3).await;
}

/// The Rust publisher reads reply partitions that appear after it connected. The broker
/// restarts empty, the topics come back with 12 partitions instead of 3, and a new db-svc
/// (whose producer learns of the 12) sends each reply to the partition its correlation id
/// hashes to: most land in partitions the publisher did not know when it connected. Every
/// call is still answered over the bus: before, those timed out (a client fell back to gRPC
/// for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_reads_reply_partitions_added_after_it_connected() {
    let mut s = setup(&[]).await;
    let bus = BusPublisher::connect(s.topics.client_config(Duration::from_secs(30)))
        .await
        .unwrap();
    counted_over_the_bus(&s, &bus, 1, 0).await;

    s.broker.restart().await.unwrap();
    s.topics.recreate_with(12).await.unwrap();
    s.svc.terminate().unwrap();
    s.svc.wait_exit(Duration::from_secs(30)).await.unwrap();
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    s.svc = start_db_svc(&s.db, &s.topics, &group, &[]).await.unwrap();
    answered(&mut s, "after", Duration::from_secs(90)).await;
    counted_over_the_bus(&s, &bus, 12, 1).await;
}

/// SIGTERM while a bus write runs and every broker is gone: the write is let go on during the
/// drain, its reply has nowhere to go, and the drain still ends at `--shutdown-grace` (1 s
/// here), leaving the request uncommitted, to be redelivered and answered from its request id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_drain_is_bounded_by_the_grace_with_the_broker_gone() {
    let mut broker = PrivateBroker::start().await.unwrap();
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create_on(&broker.addr()).await.unwrap();
    let group = format!("g-{}", uuid::Uuid::new_v4().simple());
    let mut svc = start_db_svc_with_short_grace(&db, &topics, &group)
        .await
        .unwrap();
    let lock = TableLock::take_in(&db, "agent_actions", "SHARE").await;
    let cid = uuid::Uuid::new_v4().to_string();
    let envelope = insert_envelope(&cid, "drained");
    produce_on(
        &topics.brokers,
        &topics.topics.request,
        Some(&cid),
        &serde_json::to_vec(&envelope).unwrap(),
        "none",
    )
    .await
    .unwrap();
    lock.wait_blocked_in(&db, 1).await;
    broker.stop();
    let started = std::time::Instant::now();
    svc.terminate().unwrap();
    // The write goes through during the drain; its reply has no broker to go to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    lock.release().await;
    expect_drain_cut_by_grace(&mut svc, started).await;
}
