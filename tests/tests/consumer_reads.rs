//! consumer-svc unary reads against the real broker: the agent filters of ListTransformations
//! (source or target) and ListRoutingDecisions (selected agent, plausible minimum confidence),
//! a redelivered decision listed once, and buffer sizes set by flags (the N newest events by
//! event time, newest first).

use std::time::Duration;

use chrono::{DateTime, Utc};
use omnibus_client::generate::{Kind, isoformat};
use omnibus_proto::consumer::v1 as pb;
use omnibus_tests::consumer::{
    TestProducer, client, create_topics, start_consumer, unique_prefix, wait_status,
};
use omnibus_tests::kafka_brokers;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// `i` seconds after a minute ago: distinct, ordered event times inside the window.
fn at(i: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(60) + chrono::Duration::seconds(i)
}

#[tokio::test]
async fn list_transformations_and_routing_decisions_filter_by_agent() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 2).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let base = at(0);
    let time = |i: i64| isoformat(base + chrono::Duration::seconds(i));
    // Two partitions per topic: the order of the lists comes from the event times alone.
    let transformations = [
        ("t1", "agent-a", "agent-b"),
        ("t2", "agent-b", "agent-c"),
        ("t3", "agent-c", "agent-a"),
        ("t4", "agent-d", "agent-d"),
        ("t5", "agent-b", "agent-a"),
    ];
    for (i, (id, from, to)) in transformations.iter().enumerate() {
        let v = json!({"id": id, "source_agent": from, "target_agent": to, "timestamp": time(i as i64)});
        p.send(
            topics.name(Kind::Transformation),
            id,
            &serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
    }
    // Decisions: the alternatives name other agents, which the filter must not match. d6's
    // confidence is a percentage; d1 is delivered twice (a producer's retry).
    let decisions = [
        ("d1", "agent-a", 0.9, "agent-b"),
        ("d2", "agent-b", 0.8, "agent-a"),
        ("d3", "agent-a", 0.3, "agent-c"),
        ("d4", "agent-c", 0.7, "agent-a"),
        ("d5", "agent-a", 0.6, "agent-b"),
        ("d6", "agent-a", 95.0, "agent-b"),
    ];
    let redelivered = std::iter::once((0, &decisions[0]));
    for (i, (id, agent, confidence, alternative)) in decisions.iter().enumerate().chain(redelivered)
    {
        let v = json!({
            "id": id,
            "selected_agent": agent,
            "confidence_score": confidence,
            "alternatives": [{"agent": alternative, "confidence": 0.1}],
            "timestamp": time(i as i64),
        });
        p.send(
            topics.name(Kind::RoutingDecision),
            id,
            &serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
    }
    p.flush().unwrap();
    wait_status(&svc, WAIT, "all events", |s| s.events_processed == 12)
        .await
        .unwrap();
    let mut c = client(&svc);

    let mut list_t = async |agent: Option<&str>, limit: u32| -> Vec<String> {
        c.list_transformations(pb::ListTransformationsRequest {
            limit,
            agent: agent.map(Into::into),
        })
        .await
        .unwrap()
        .into_inner()
        .transformations
        .into_iter()
        .map(|t| t.id)
        .collect()
    };
    assert_eq!(list_t(None, 0).await, ["t5", "t4", "t3", "t2", "t1"]);
    // From or to the agent.
    assert_eq!(list_t(Some("agent-a"), 0).await, ["t5", "t3", "t1"]);
    assert_eq!(list_t(Some("agent-b"), 0).await, ["t5", "t2", "t1"]);
    assert_eq!(list_t(Some("agent-c"), 0).await, ["t3", "t2"]);
    assert_eq!(
        list_t(Some("agent-d"), 0).await,
        ["t4"],
        "from and to the same agent: once"
    );
    assert_eq!(list_t(Some("agent-a"), 2).await, ["t5", "t3"]);
    assert!(list_t(Some("agent-z"), 0).await.is_empty());
    assert!(
        list_t(Some("agent"), 0).await.is_empty(),
        "whole names only"
    );

    let mut c = client(&svc);
    let mut list_d = async |agent: Option<&str>, min_confidence: Option<f64>| -> Vec<String> {
        c.list_routing_decisions(pb::ListRoutingDecisionsRequest {
            agent: agent.map(Into::into),
            min_confidence,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .decisions
        .into_iter()
        .map(|d| d.id)
        .collect()
    };
    // d1 once, though delivered twice.
    assert_eq!(
        list_d(None, None).await,
        ["d6", "d5", "d4", "d3", "d2", "d1"]
    );
    // Only decisions that selected the agent, not those that merely considered it.
    assert_eq!(
        list_d(Some("agent-a"), None).await,
        ["d6", "d5", "d3", "d1"]
    );
    assert_eq!(list_d(Some("agent-b"), None).await, ["d2"]);
    assert_eq!(list_d(Some("agent-c"), None).await, ["d4"]);
    assert!(list_d(Some("agent-z"), None).await.is_empty());
    // Both filters at once; a confidence outside [0, 1] passes no minimum.
    assert_eq!(list_d(Some("agent-a"), Some(0.6)).await, ["d5", "d1"]);
    assert_eq!(list_d(None, Some(0.9)).await, ["d1"]);
    // The metrics count every delivery, and average the plausible confidences.
    let metrics = client(&svc)
        .get_agent_metrics(pb::GetAgentMetricsRequest {
            agent: Some("agent-a".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(metrics[0].total_requests, 5);
    let avg = metrics[0].avg_confidence.unwrap();
    assert!((avg - (0.9 + 0.9 + 0.3 + 0.6) / 4.0).abs() < 1e-9, "{avg}");
}

/// `--max-actions`, `--max-routing-decisions`, `--max-transformations` and
/// `--max-performance-metrics`: each buffer keeps that many of the newest events by event
/// time, whatever order they arrived in; the aggregates still count every event.
#[tokio::test]
async fn buffer_sizes_are_set_by_flags_and_keep_the_newest_events() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(
        &brokers,
        &prefix,
        &[
            "--max-actions",
            "7",
            "--max-routing-decisions",
            "5",
            "--max-transformations",
            "4",
            "--max-performance-metrics",
            "3",
        ],
    )
    .await
    .unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let n: i64 = 12;
    let base = at(0);
    // Event i happens i seconds after `base`; they are produced in a scrambled order
    // (5 and 12 are coprime: a permutation).
    for j in 0..n {
        let i = j * 5 % n;
        let ts = isoformat(base + chrono::Duration::seconds(i));
        let payloads = [
            (
                Kind::AgentAction,
                json!({"id": format!("a{i:02}"), "agent_name": "agent-a", "action_type": "success", "timestamp": ts}),
            ),
            (
                Kind::RoutingDecision,
                json!({"id": format!("d{i:02}"), "selected_agent": "agent-a", "timestamp": ts}),
            ),
            (
                Kind::Transformation,
                json!({"id": format!("t{i:02}"), "source_agent": "agent-a", "target_agent": "agent-b", "timestamp": ts}),
            ),
            (
                Kind::PerformanceMetric,
                json!({"id": format!("p{i:02}"), "routing_duration_ms": 1, "timestamp": ts}),
            ),
        ];
        for (kind, v) in payloads {
            p.send(topics.name(kind), "k", &serde_json::to_vec(&v).unwrap())
                .unwrap();
        }
    }
    p.flush().unwrap();
    wait_status(&svc, WAIT, "all events", |s| {
        s.events_processed == 4 * n as u64
    })
    .await
    .unwrap();
    // The `keep` newest ids of a kind, newest first.
    let newest = |tag: char, keep: i64| -> Vec<String> {
        (n - keep..n)
            .rev()
            .map(|i| format!("{tag}{i:02}"))
            .collect()
    };
    let mut c = client(&svc);

    for limit in [0, 1000] {
        let actions: Vec<String> = c
            .list_recent_actions(pb::ListRecentActionsRequest {
                limit,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .actions
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(actions, newest('a', 7), "limit {limit}");
    }
    let decisions: Vec<String> = c
        .list_routing_decisions(pb::ListRoutingDecisionsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .decisions
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(decisions, newest('d', 5));
    let transformations: Vec<String> = c
        .list_transformations(pb::ListTransformationsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .transformations
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(transformations, newest('t', 4));
    let perf = c
        .list_performance_metrics(pb::ListPerformanceMetricsRequest { limit: 1000 })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<String> = perf.metrics.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, newest('p', 3));
    // The snapshot holds the same buffers.
    let snap = c
        .get_snapshot(pb::GetSnapshotRequest {})
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(
        (
            snap.actions.len(),
            snap.routing_decisions.len(),
            snap.transformations.len(),
            snap.performance_metrics.len()
        ),
        (7, 5, 4, 3)
    );

    // The aggregates are not limited by the buffers.
    assert_eq!(perf.stats.unwrap().total_queries, n as u64);
    let metrics = c
        .get_agent_metrics(pb::GetAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(metrics.len(), 1);
    assert_eq!(
        (metrics[0].total_actions, metrics[0].total_requests),
        (n as u64, n as u64)
    );
}

/// `--max-agents`: past the limit, a new agent's events are counted (events_processed, the
/// recent buffers) but get no agent metrics, and the status says how many; an agent name over
/// 256 bytes likewise.
#[tokio::test]
async fn agents_beyond_max_agents_are_counted_not_tracked() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(
        &brokers,
        &prefix,
        &["--max-agents", "2", "--agent-metrics-interval", "50ms"],
    )
    .await
    .unwrap();
    let mut pushes = client(&svc)
        .stream_agent_metrics(pb::StreamAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let p = TestProducer::new(&brokers).unwrap();
    let long = "n".repeat(257);
    let agents = ["agent-a", "agent-b", "agent-c", "agent-a", long.as_str()];
    for (i, agent) in agents.iter().enumerate() {
        let v = json!({
            "id": format!("a{i}"),
            "agent_name": agent,
            "action_type": "success",
            "timestamp": isoformat(at(i as i64)),
        });
        p.send(
            topics.name(Kind::AgentAction),
            "k",
            &serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
    }
    p.flush().unwrap();
    let status = wait_status(&svc, WAIT, "all events", |s| s.events_processed == 5)
        .await
        .unwrap();
    assert_eq!(status.agent_events_untracked, 2, "{status:?}");
    assert_eq!(status.agents, 2, "{status:?}");
    let mut c = client(&svc);
    let metrics = c
        .get_agent_metrics(pb::GetAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let names: Vec<(&str, u64)> = metrics
        .iter()
        .map(|m| (m.agent.as_str(), m.total_actions))
        .collect();
    assert_eq!(names, [("agent-a", 2), ("agent-b", 1)]);
    let actions = c
        .list_recent_actions(pb::ListRecentActionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(actions.len(), 5, "every action is kept in the buffer");

    // Metric pushes name the tracked agents only: read them until both have come, then for
    // several more intervals.
    let mut pushed = std::collections::BTreeSet::new();
    let mut quiet_until = None;
    loop {
        let wait = match quiet_until {
            Some(t) => t - tokio::time::Instant::now(),
            None => WAIT,
        };
        match tokio::time::timeout(wait, pushes.message()).await {
            Ok(push) => {
                let push = push.unwrap().expect("the stream stays open");
                pushed.extend(push.agents.into_iter().map(|m| m.agent));
            }
            Err(_) if quiet_until.is_some() => break,
            Err(_) => panic!("no metric pushes for agent-a and agent-b: {pushed:?}"),
        }
        if quiet_until.is_none() && pushed.contains("agent-a") && pushed.contains("agent-b") {
            quiet_until = Some(tokio::time::Instant::now() + Duration::from_millis(500));
        }
    }
    assert_eq!(
        pushed.into_iter().collect::<Vec<_>>(),
        ["agent-a", "agent-b"]
    );
}
