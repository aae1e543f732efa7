//! The db-svc bus worker across a broker that restarts empty (tansu `memory://`): the topics
//! come back with new ids, the consumer group and its committed offsets are gone. Requests
//! sent after the restart are still answered, and db-svc keeps running. Uses a private
//! broker, never the shared one.

use std::time::Duration;

use omnibus_tests::TestDatabase;
use omnibus_tests::bus::{BusTopics, Tap, omniclaude_envelope, produce_on, start_db_svc};
use omnibus_tests::consumer::PrivateBroker;
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

#[tokio::test]
async fn bus_worker_answers_after_the_broker_restarts_empty() {
    let mut broker = PrivateBroker::start().await.unwrap();
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create_on(&broker.addr()).await.unwrap();
    let mut svc = start_db_svc(
        &db,
        &topics,
        &format!("g-{}", uuid::Uuid::new_v4().simple()),
        &[],
    )
    .await
    .unwrap();
    let reply = insert_over_bus(&topics, "before", Duration::from_secs(30)).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some("DATABASE_QUERY_COMPLETED"),
        "{reply:?}; db-svc log:\n{}",
        svc.logs()
    );

    broker.restart().await.unwrap();
    topics.recreate().await.unwrap();
    // The group must be formed again on the empty broker: allow it time, then expect every
    // request to be answered.
    let reply = insert_over_bus(&topics, "after", Duration::from_secs(90)).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some("DATABASE_QUERY_COMPLETED"),
        "{reply:?}; db-svc log:\n{}",
        svc.logs()
    );
    for _ in 0..3 {
        let reply = insert_over_bus(&topics, "after", Duration::from_secs(30)).await;
        assert_eq!(
            reply.as_deref().ok(),
            Some("DATABASE_QUERY_COMPLETED"),
            "{reply:?}; db-svc log:\n{}",
            svc.logs()
        );
    }
    assert!(svc.is_running(), "db-svc exited:\n{}", svc.logs());

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
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
    let mut broker = PrivateBroker::start().await.unwrap();
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create_on(&broker.addr()).await.unwrap();
    let mut svc = start_db_svc(
        &db,
        &topics,
        &format!("g-{}", uuid::Uuid::new_v4().simple()),
        &["--bus-replace-interval", "15s"],
    )
    .await
    .unwrap();
    let reply = insert_over_bus(&topics, "first", Duration::from_secs(30)).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some("DATABASE_QUERY_COMPLETED"),
        "{reply:?}"
    );

    broker.restart().await.unwrap();
    topics.recreate().await.unwrap();
    let reply = insert_over_bus(&topics, "second", Duration::from_secs(90)).await;
    assert_eq!(
        reply.as_deref().ok(),
        Some("DATABASE_QUERY_COMPLETED"),
        "{reply:?}; db-svc log:\n{}",
        svc.logs()
    );
    // At once: the consumer that answered is the one that replaced the first outage's.
    broker.restart().await.unwrap();
    topics.recreate().await.unwrap();
    for _ in 0..2 {
        let reply = insert_over_bus(&topics, "third", Duration::from_secs(90)).await;
        assert_eq!(
            reply.as_deref().ok(),
            Some("DATABASE_QUERY_COMPLETED"),
            "{reply:?}; db-svc log:\n{}",
            svc.logs()
        );
    }
    assert!(svc.is_running(), "db-svc exited:\n{}", svc.logs());
}
