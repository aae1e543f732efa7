//! consumer-svc against the real broker: parsing of every topic (camelCase, aliases, nulls,
//! malformed input), aggregates equal to a reference computation, and a restarted replica
//! rebuilding the same aggregates from the bus alone (with either replay strategy).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use omnibus_client::generate::{EventGenerator, Kind};
use omnibus_proto::consumer::v1 as pb;
use omnibus_tests::consumer::{
    TestProducer, TxnActions, assert_stays, client, create_topics, start_consumer, topic_status,
    unique_prefix, wait_status,
};
use omnibus_tests::kafka_brokers;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn parses_every_topic_and_counts_bad_input_per_topic() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 2).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let ts = "2026-01-01T00:00:00.000000+00:00";
    let now_ts = omnibus_client::generate::isoformat(Utc::now());
    let rd = topics.name(Kind::RoutingDecision);
    let aa = topics.name(Kind::AgentAction);
    let tr = topics.name(Kind::Transformation);
    let pm = topics.name(Kind::PerformanceMetric);

    // Routing decisions: snake_case, camelCase with the `confidence` alias, zero values.
    p.send(rd, "c1", format!(r#"{{"id":"rd-snake","correlation_id":"c1","selected_agent":"agent-a","confidence_score":0.8,"routing_time_ms":10,"routing_strategy":"fuzzy","alternatives":[{{"agent":"agent-b","confidence":0.4}}],"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(rd, "c2", format!(r#"{{"id":"rd-camel","correlationId":"c2","selectedAgent":"agent-a","confidence":0.4,"routingTimeMs":30,"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(rd, "c3", format!(r#"{{"id":"rd-zero","selected_agent":"agent-z","confidence_score":0,"routing_time_ms":0,"reasoning":"","context":null,"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    // Bad routing decisions: no selected_agent, wrong type, not JSON.
    p.send(rd, "x", br#"{"confidence_score":0.5}"#).unwrap();
    p.send(
        rd,
        "x",
        br#"{"selected_agent":"a","confidence_score":"high"}"#,
    )
    .unwrap();
    p.send(rd, "x", b"{not json").unwrap();

    // Actions: snake, camel, explicit nulls, success false.
    p.send(aa, "c1", format!(r#"{{"id":"a-snake","correlation_id":"c1","agent_name":"agent-a","action_type":"success","action_name":"Read","action_details":{{"f":1}},"duration_ms":0,"debug_mode":false,"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(aa, "c2", format!(r#"{{"id":"a-camel","correlationId":"c2","agentName":"agent-a","actionType":"error","actionName":"Bash","actionDetails":null,"success":false,"projectName":"","timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(aa, "c4", format!(r#"{{"id":"a-only","agent_name":"agent-only-actions","action_type":"tool_call","duration_ms":null,"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(aa, "x", br#"{"agent_name":"a"}"#).unwrap();
    p.send(aa, "x", b"").unwrap();

    // Transformations: success defaults to true, explicit false kept.
    p.send(tr, "c1", format!(r#"{{"id":"t1","source_agent":"agent-a","target_agent":"agent-b","timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(tr, "c2", format!(r#"{{"id":"t2","sourceAgent":"agent-b","targetAgent":"agent-c","success":false,"confidenceScore":0,"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    // A field under two spellings keeps its first non-null value.
    p.send(tr, "c3", format!(r#"{{"id":"t3","source_agent":"agent-c","sourceAgent":"agent-x","targetAgent":"agent-d","confidence_score":null,"confidence":0.5,"confidenceScore":0.7,"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(tr, "x", br#"{"source_agent":"a"}"#).unwrap();

    // Performance metrics: defaults, the latency_ms alias, camelCase, a wrong type.
    p.send(pm, "c1", format!(r#"{{"id":"p1","routing_duration_ms":20,"cache_hit":true,"trigger_match_strategy":"exact","timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(
        pm,
        "c2",
        format!(r#"{{"id":"p2","latency_ms":40,"timestamp":"{now_ts}"}}"#).as_bytes(),
    )
    .unwrap();
    p.send(pm, "c3", format!(r#"{{"id":"p3","routingDurationMs":0,"cacheHit":false,"triggerMatchStrategy":"","candidatesEvaluated":0,"timestamp":"{now_ts}"}}"#).as_bytes()).unwrap();
    p.send(pm, "x", br#"{"cache_hit":"yes"}"#).unwrap();
    // A JSON array is not an event, though serde's derive reads a struct from one (its
    // fields in order): one per topic, each an error.
    p.send(pm, "x", b"[]").unwrap();
    p.send(rd, "x", br#"[null,null,null,"x"]"#).unwrap();
    p.send(aa, "x", br#"["i","c","a","success"]"#).unwrap();
    p.send(tr, "x", br#"["i","c","a","b"]"#).unwrap();
    // An event from outside the retention window is skipped, not counted as an error.
    p.send(aa, "old", format!(r#"{{"id":"a-old","agent_name":"agent-old","action_type":"success","timestamp":"{ts}"}}"#).as_bytes()).unwrap();
    p.flush().unwrap();

    let s = wait_status(&svc, WAIT, "all events, positions refreshed", |s| {
        s.events_processed == 12
            && s.parse_errors == 11
            && s.partitions.iter().map(|p| p.high_watermark).sum::<i64>() == 24
    })
    .await
    .unwrap();
    assert_eq!(topic_status(&s, Kind::RoutingDecision).events_consumed, 3);
    assert_eq!(topic_status(&s, Kind::RoutingDecision).parse_errors, 4);
    assert_eq!(topic_status(&s, Kind::AgentAction).events_consumed, 3);
    assert_eq!(topic_status(&s, Kind::AgentAction).parse_errors, 3);
    assert_eq!(topic_status(&s, Kind::AgentAction).skipped_expired, 1);
    assert_eq!(topic_status(&s, Kind::Transformation).events_consumed, 3);
    assert_eq!(topic_status(&s, Kind::Transformation).parse_errors, 2);
    assert_eq!(topic_status(&s, Kind::PerformanceMetric).events_consumed, 3);
    assert_eq!(topic_status(&s, Kind::PerformanceMetric).parse_errors, 2);
    assert!(s.connected);
    assert_eq!(
        s.partitions.len(),
        8,
        "2 partitions x 4 topics: {:?}",
        s.partitions
    );
    assert!(
        s.partitions.iter().all(|p| p.lag == 0),
        "{:?}",
        s.partitions
    );
    // The service keeps running after bad input: still serving reads.
    let mut c = client(&svc);

    let metrics = c
        .get_agent_metrics(pb::GetAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let by_name: BTreeMap<_, _> = metrics.iter().map(|m| (m.agent.as_str(), m)).collect();
    let a = by_name["agent-a"];
    assert_eq!(a.total_requests, 2);
    assert!((a.avg_confidence.unwrap() - 0.6).abs() < 1e-9);
    assert!((a.avg_routing_time_ms.unwrap() - 20.0).abs() < 1e-9);
    assert_eq!((a.successes, a.errors, a.total_actions), (1, 1, 2));
    assert_eq!(a.success_rate, Some(0.5));
    let z = by_name["agent-z"];
    assert_eq!(z.avg_confidence, Some(0.0), "a real 0 is a value");
    assert_eq!(z.avg_routing_time_ms, Some(0.0));
    let only = by_name["agent-only-actions"];
    assert_eq!(only.total_requests, 0);
    assert_eq!(
        only.success_rate, None,
        "no success/error actions: no rate, no NaN"
    );
    assert_eq!(only.avg_confidence, None);
    assert!(!by_name.contains_key("agent-old"));
    assert!(
        !by_name.contains_key("x") && !by_name.contains_key("a"),
        "{by_name:?}"
    );

    let actions = c
        .list_recent_actions(pb::ListRecentActionsRequest {
            agent: Some("agent-a".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(actions.len(), 2);
    let camel = actions.iter().find(|a| a.id == "a-camel").unwrap();
    assert_eq!(camel.success, Some(false));
    assert_eq!(camel.project_name.as_deref(), Some(""));
    assert_eq!(camel.action_details_json, None);
    assert_eq!(camel.correlation_id.as_deref(), Some("c2"));
    let snake = actions.iter().find(|a| a.id == "a-snake").unwrap();
    assert_eq!(snake.duration_ms, Some(0.0));
    assert_eq!(snake.debug_mode, Some(false));
    assert_eq!(snake.action_details_json.as_deref(), Some(r#"{"f":1}"#));
    let by_corr = c
        .list_recent_actions(pb::ListRecentActionsRequest {
            correlation_id: Some("c1".into()),
            action_type: Some("success".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(
        by_corr.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        ["a-snake"]
    );

    let decisions = c
        .list_routing_decisions(pb::ListRoutingDecisionsRequest {
            min_confidence: Some(0.5),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .decisions;
    assert_eq!(
        decisions.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["rd-snake"]
    );
    assert_eq!(decisions[0].alternatives[0].agent, "agent-b");

    let transformations = c
        .list_transformations(pb::ListTransformationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .transformations;
    assert_eq!(transformations.len(), 3);
    let t1 = transformations.iter().find(|t| t.id == "t1").unwrap();
    assert!(t1.success, "success defaults to true");
    let t3 = transformations.iter().find(|t| t.id == "t3").unwrap();
    assert_eq!(
        (t3.source_agent.as_str(), t3.target_agent.as_str()),
        ("agent-c", "agent-d")
    );
    assert_eq!(t3.confidence_score, Some(0.5));
    let t2 = transformations.iter().find(|t| t.id == "t2").unwrap();
    assert!(!t2.success);
    assert_eq!(t2.confidence_score, Some(0.0));

    let perf = c
        .list_performance_metrics(pb::ListPerformanceMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let p2 = perf.metrics.iter().find(|m| m.id == "p2").unwrap();
    assert_eq!(p2.routing_duration_ms, Some(40.0), "latency_ms alias");
    assert!(!p2.cache_hit);
    assert_eq!(p2.trigger_match_strategy, "unknown");
    let p3 = perf.metrics.iter().find(|m| m.id == "p3").unwrap();
    assert_eq!(p3.trigger_match_strategy, "", "a real empty string is kept");
    assert_eq!(p3.candidates_evaluated, Some(0));
    let stats = perf.stats.unwrap();
    assert_eq!(stats.total_queries, 3);
    assert_eq!(stats.cache_hits, 1);
    assert!((stats.avg_routing_duration_ms.unwrap() - 20.0).abs() < 1e-9);

    // Bad windows are INVALID_ARGUMENT with a field violation.
    let err = c
        .get_agent_metrics(pb::GetAgentMetricsRequest {
            window: "7d".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("window 7d is longer than the retention window (24h)"),
        "{}",
        err.message()
    );
    // Windows past any clock's range are errors too, never a panic or a wrapped number.
    for huge in ["1000000000000h", "6000000000000000h"] {
        let err = c
            .list_recent_actions(pb::ListRecentActionsRequest {
                window: huge.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{huge}");
    }
    let err = c
        .get_performance_stats(pb::GetPerformanceStatsRequest {
            window: "soon".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    use tonic_types::StatusExt;
    let details = err.get_error_details();
    let violation = &details.bad_request().expect("BadRequest").field_violations[0];
    assert_eq!(violation.field, "window");
}

/// A routing decision with an unusable alternative (no agent, null, a bare string) is kept
/// without it, counted in `total_requests` and listed (it was a parse error, lost); an empty
/// `timestamp` gives way to `createdAt`.
#[tokio::test]
async fn unusable_alternatives_and_an_empty_timestamp_do_not_lose_the_event() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let now = Utc::now() - chrono::Duration::minutes(5);
    let now_ts = omnibus_client::generate::isoformat(now);
    let rd = topics.name(Kind::RoutingDecision);
    let aa = topics.name(Kind::AgentAction);
    for (id, alternatives) in [
        ("no-agent", r#"[{"confidence":0.4,"reasoning":"x"}]"#),
        ("strings", r#"["b","c"]"#),
        ("null", r#"[null,{"agent":"d","confidence":0.2}]"#),
    ] {
        let json = format!(
            r#"{{"id":"{id}","selected_agent":"alt-agent","alternatives":{alternatives},"timestamp":"{now_ts}"}}"#
        );
        p.send(rd, id, json.as_bytes()).unwrap();
    }
    let action = format!(
        r#"{{"id":"empty-ts","agent_name":"alt-agent","action_type":"success","timestamp":"","createdAt":"{now_ts}"}}"#
    );
    p.send(aa, "a", action.as_bytes()).unwrap();
    p.flush().unwrap();

    let s = wait_status(&svc, WAIT, "all four read", |s| {
        s.events_processed + s.parse_errors == 4
    })
    .await
    .unwrap();
    assert_eq!(s.parse_errors, 0, "{s:?}");
    let mut c = client(&svc);
    let metrics = c
        .get_agent_metrics(pb::GetAgentMetricsRequest {
            agent: Some("alt-agent".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(metrics[0].total_requests, 3);
    assert_eq!(metrics[0].successes, 1);
    let decisions = c
        .list_routing_decisions(pb::ListRoutingDecisionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .decisions;
    let mut alternatives: Vec<_> = decisions
        .iter()
        .map(|d| {
            let agents: Vec<_> = d.alternatives.iter().map(|a| a.agent.as_str()).collect();
            (d.id.as_str(), agents)
        })
        .collect();
    alternatives.sort();
    assert_eq!(
        alternatives,
        [
            ("no-agent", vec![]),
            ("null", vec!["d"]),
            ("strings", vec![])
        ]
    );
    let actions = c
        .list_recent_actions(pb::ListRecentActionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(actions.len(), 1);
    let t = actions[0].timestamp.unwrap();
    assert_eq!(t.seconds, now.timestamp(), "the createdAt time");
}

/// Expected metrics computed in the test from the produced JSON.
#[derive(Debug, Default)]
struct Expected {
    requests: u64,
    routing_sum: f64,
    routing_n: u64,
    conf_sum: f64,
    conf_n: u64,
    successes: u64,
    errors: u64,
    actions: u64,
}

fn reference(events: &[(Kind, Value)]) -> BTreeMap<String, Expected> {
    let mut m: BTreeMap<String, Expected> = BTreeMap::new();
    for (kind, v) in events {
        match kind {
            Kind::RoutingDecision => {
                let e = m
                    .entry(v["selected_agent"].as_str().unwrap().into())
                    .or_default();
                e.requests += 1;
                if let Some(x) = v["routing_time_ms"].as_f64() {
                    e.routing_sum += x;
                    e.routing_n += 1;
                }
                if let Some(x) = v["confidence_score"].as_f64() {
                    e.conf_sum += x;
                    e.conf_n += 1;
                }
            }
            Kind::AgentAction => {
                let e = m
                    .entry(v["agent_name"].as_str().unwrap().into())
                    .or_default();
                e.actions += 1;
                match v["action_type"].as_str().unwrap() {
                    "success" => e.successes += 1,
                    "error" => e.errors += 1,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    m
}

async fn agent_metrics(svc: &omnibus_tests::ServiceProcess) -> Vec<pb::AgentMetrics> {
    client(svc)
        .get_agent_metrics(pb::GetAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
}

#[tokio::test]
async fn aggregates_match_a_reference_and_a_restart_rebuilds_them() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 3).await.unwrap();
    let first = start_consumer(&brokers, &prefix, &[]).await.unwrap();

    let p = TestProducer::new(&brokers).unwrap();
    let mut generator = EventGenerator::new(12, 42);
    let mut produced = Vec::new();
    // Events spread over the last 3 hours (event time), produced now.
    let n = 3000;
    for i in 0..n {
        let t = Utc::now() - chrono::Duration::seconds(3 * 3600 * (n - i) / n);
        let e = generator.next_event(t);
        p.send(topics.name(e.kind), &e.key, &e.payload).unwrap();
        produced.push((e.kind, serde_json::from_slice::<Value>(&e.payload).unwrap()));
    }
    // Actions without an id (twice the same bytes: two events), and one stamped ten minutes
    // ahead: a restarted replica must give them the same ids and times as this one.
    let ahead = (Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    for payload in [
        json!({"agent_name": "idless", "action_type": "success"}),
        json!({"agent_name": "idless", "action_type": "success"}),
        json!({"agent_name": "idless", "action_type": "error", "timestamp": ahead}),
    ] {
        let bytes = serde_json::to_vec(&payload).unwrap();
        p.send(topics.name(Kind::AgentAction), "idless", &bytes)
            .unwrap();
        produced.push((Kind::AgentAction, payload));
    }
    p.flush().unwrap();
    let total = produced.len() as u64;
    wait_status(&first, WAIT, "all events", |s| s.events_processed == total)
        .await
        .unwrap();
    // Several position checks later, still nothing read twice.
    assert_stays(&first, Duration::from_secs(5), "exactly once", |s| {
        s.events_processed == total
    })
    .await
    .unwrap();

    let want = reference(&produced);
    let got = agent_metrics(&first).await;
    assert_eq!(got.len(), want.len());
    for m in &got {
        let w = &want[&m.agent];
        assert_eq!(m.total_requests, w.requests, "{}", m.agent);
        assert_eq!(m.total_actions, w.actions);
        assert_eq!((m.successes, m.errors), (w.successes, w.errors));
        let close = |a: Option<f64>, s: f64, n: u64| {
            let b = (n > 0).then(|| s / n as f64);
            match (a, b) {
                (Some(a), Some(b)) => (a - b).abs() < 1e-6,
                (None, None) => true,
                _ => false,
            }
        };
        assert!(
            close(m.avg_routing_time_ms, w.routing_sum, w.routing_n),
            "{m:?} {w:?}"
        );
        assert!(close(m.avg_confidence, w.conf_sum, w.conf_n), "{m:?} {w:?}");
        let decided = w.successes + w.errors;
        assert_eq!(
            m.success_rate,
            (decided > 0).then(|| w.successes as f64 / decided as f64)
        );
    }
    // A 1 h window holds fewer requests than the whole window.
    let hour: u64 = client(&first)
        .get_agent_metrics(pb::GetAgentMetricsRequest {
            window: "1h".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agents
        .iter()
        .map(|m| m.total_requests)
        .sum();
    let all: u64 = got.iter().map(|m| m.total_requests).sum();
    assert!(hour > 0 && hour < all, "1h {hour} vs all {all}");

    // The actions without an id: three events with three ids, the one stamped ahead no later
    // than it was sent.
    let idless = client(&first)
        .list_recent_actions(pb::ListRecentActionsRequest {
            agent: Some("idless".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(idless.len(), 3);
    let ids: std::collections::BTreeSet<&str> = idless.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "{idless:?}");
    let latest = idless
        .iter()
        .filter_map(|a| a.timestamp)
        .map(|t| t.seconds)
        .max();
    assert!(
        latest.is_some_and(|t| t <= Utc::now().timestamp()),
        "{idless:?}"
    );

    let snapshot_of = |s: pb::GetSnapshotResponse| {
        let s = s.snapshot.unwrap();
        (
            s.agents,
            // Ids and event times: the same on a replica that replays the window later.
            s.actions
                .into_iter()
                .map(|a| (a.id, a.timestamp))
                .collect::<Vec<_>>(),
            s.routing_decisions
                .into_iter()
                .map(|a| a.id)
                .collect::<Vec<_>>(),
            s.transformations
                .into_iter()
                .map(|a| a.id)
                .collect::<Vec<_>>(),
            s.performance_metrics
                .into_iter()
                .map(|a| a.id)
                .collect::<Vec<_>>(),
            s.performance_stats,
        )
    };
    let before = snapshot_of(
        client(&first)
            .get_snapshot(pb::GetSnapshotRequest {})
            .await
            .unwrap()
            .into_inner(),
    );

    // Restart: the new process rebuilds the same view from the bus alone, with either
    // replay strategy.
    drop(first);
    for seek in ["timestamp", "earliest"] {
        let again = start_consumer(&brokers, &prefix, &["--replay-seek", seek])
            .await
            .unwrap();
        // SERVING only once the replay is over: the view is complete from the first read.
        let s = omnibus_tests::consumer::status(&again).await.unwrap();
        assert_eq!(
            s.events_processed, total,
            "at SERVING, --replay-seek {seek}"
        );
        assert_eq!(s.replaying, Some(false));
        let after = snapshot_of(
            client(&again)
                .get_snapshot(pb::GetSnapshotRequest {})
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(before, after, "replay with --replay-seek {seek}");
    }
}

/// A replica reports SERVING only after its start-up replay: a load balancer never sends a
/// dashboard to one whose view is still being rebuilt.
#[tokio::test]
async fn a_replica_is_not_serving_until_its_replay_is_over() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 3).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let mut generator = EventGenerator::new(50, 11);
    // Enough that reading them takes a while after the broker first answers.
    let total = 60_000u64;
    for _ in 0..total {
        let e = generator.next_event(Utc::now());
        p.send(topics.name(e.kind), &e.key, &e.payload).unwrap();
    }
    p.flush().unwrap();

    let mut svc = omnibus_tests::consumer::spawn_consumer(&brokers, &prefix, &[]).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen_replaying = false;
    loop {
        assert!(svc.is_running(), "{}", svc.logs());
        assert!(std::time::Instant::now() < deadline, "{}", svc.logs());
        let Ok(health) = svc.health("").await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue; // not listening yet
        };
        let s = omnibus_tests::consumer::status(&svc).await.unwrap();
        if health == ServingStatus::Serving {
            // The status was read after SERVING was seen: the replay is over and complete.
            assert_eq!(s.replaying, Some(false), "{s:?}");
            assert_eq!(s.events_processed, total, "{s:?}");
            break;
        }
        seen_replaying |= s.replaying == Some(true);
        if s.events_processed < total {
            assert_eq!(
                s.replaying,
                Some(true),
                "replay not over, yet not reported: {s:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(seen_replaying, "the replay was never reported in progress");
    // The command-line status names it.
    let addr = svc.addr.to_string();
    let out =
        omnibus_tests::cli::omnibus(&["--consumer-addr", &addr, "status", "--output", "table"])
            .await
            .unwrap();
    assert!(out.stdout.contains("replay  over"), "{}", out.stdout);
}

/// The number in `field=<n>` on `line`, if any.
fn logged_number(line: &str, field: &str) -> Option<u64> {
    let at = line.find(&format!(" {field}="))? + field.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// How many old events (`old_n`, at offsets 0 up to it) a timestamp-seek replay of `topic`
/// skips, by its log: all of them unless it jumped, from the offset it had read to (`from`),
/// to one message before the broker's cutoff (`to`, verified to be old); then `from` before
/// the jump, and those from `to` on.
fn skipped_by_timestamp_seek(log: &str, topic: &str, old_n: u64) -> u64 {
    let seek = log
        .lines()
        .find(|l| l.contains("seeking to the cutoff time") && l.contains(topic));
    let unverified = log.contains("was not verified") || log.contains("cannot be verified");
    match seek {
        None => old_n,
        Some(_) if unverified => old_n,
        Some(line) => {
            let (from, to) = (logged_number(line, "from"), logged_number(line, "to"));
            let (Some(from), Some(to)) = (from, to) else {
                panic!("no from/to in {line}");
            };
            assert!(
                from < to && to < old_n,
                "a verified jump among old events: {line}"
            );
            from + (old_n - to)
        }
    }
}

/// Old events carry old Kafka timestamps (as if produced then) and old event times: a replay
/// skips each of them (counted as expired) and keeps every recent one, once, with either seek
/// strategy. `earliest` reads every record; `timestamp` reads every record too against tansu,
/// whose `offsets_for_times` answer is the start of the log (no jump), and a broker that
/// answers otherwise is read from the log, so the count of skipped events is exact either way.
/// (A cutoff misplaced after recent events, which tansu cannot be made to answer, is
/// consumer-svc's `ingest::tests::a_cutoff_answer_placed_after_recent_events_loses_none_of_them`.)
#[tokio::test]
async fn replay_skips_every_event_older_than_the_window_and_keeps_every_recent_one() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let mut generator = EventGenerator::new(5, 7);
    // A 2 h retention keeps the old events well inside any broker retention (tansu may drop
    // records older than a day by itself).
    let old = Utc::now() - chrono::Duration::hours(4);
    let mut old_n = 0u64;
    for _ in 0..300 {
        let e = generator.next_of(Kind::AgentAction, old);
        p.send_at(
            topics.name(e.kind),
            &e.key,
            &e.payload,
            Some(old.timestamp_millis()),
        )
        .unwrap();
        old_n += 1;
    }
    // A generator of its own: one request's events share its time, and actions left over
    // from the last old request would carry the old time.
    let mut generator = EventGenerator::new(5, 8);
    let mut recent_n = 0u64;
    for i in 0..200 {
        let t = Utc::now() - chrono::Duration::seconds(30 * (200 - i));
        let e = generator.next_of(Kind::AgentAction, t);
        p.send_at(
            topics.name(e.kind),
            &e.key,
            &e.payload,
            Some(t.timestamp_millis()),
        )
        .unwrap();
        recent_n += 1;
    }
    p.flush().unwrap();

    for seek in ["timestamp", "earliest"] {
        let svc = start_consumer(
            &brokers,
            &prefix,
            &["--replay-seek", seek, "--retention", "2h"],
        )
        .await
        .unwrap();
        let s = wait_status(&svc, WAIT, "recent events", |s| {
            s.events_processed == recent_n && s.partitions.iter().all(|p| p.lag == 0)
        })
        .await
        .unwrap();
        let skipped = topic_status(&s, Kind::AgentAction).skipped_expired;
        // `earliest`: every old record is read (from offset 0, not the broker's
        // earliest-offset answer) and skipped by its event time.
        let want = if seek == "earliest" {
            old_n
        } else {
            skipped_by_timestamp_seek(&svc.logs(), topics.name(Kind::AgentAction), old_n)
        };
        assert_eq!(skipped, want, "{seek}: old events skipped\n{}", svc.logs());
        // Nothing more arrives later, nor is anything read again: over a few of ingest's
        // rounds of partition discovery (every 2 s).
        assert_stays(&svc, Duration::from_secs(5), seek, |s| {
            s.events_processed == recent_n
                && topic_status(s, Kind::AgentAction).skipped_expired == want
                && s.partitions.iter().all(|p| p.lag == 0)
        })
        .await
        .unwrap();
    }
}

/// An event without `timestamp` or `createdAt` takes its Kafka record's timestamp as its event
/// time (not the time it is read), so a replica that replays it later places it where one
/// that read it live did; one whose record is older than the window is skipped as expired.
#[tokio::test]
async fn an_event_without_a_time_takes_its_record_timestamp() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let aa = topics.name(Kind::AgentAction);
    let two_hours_ago = Utc::now().timestamp_millis() - 2 * 3600 * 1000;
    let two_days_ago = Utc::now().timestamp_millis() - 48 * 3600 * 1000;
    let event =
        |id: &str| format!(r#"{{"id":"{id}","agent_name":"untimed","action_type":"success"}}"#);
    p.send_at(aa, "k", event("recent").as_bytes(), Some(two_hours_ago))
        .unwrap();
    p.send_at(aa, "k", event("ancient").as_bytes(), Some(two_days_ago))
        .unwrap();
    p.flush().unwrap();
    let svc = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let s = wait_status(&svc, WAIT, "both read", |s| {
        topic_status(s, Kind::AgentAction).events_consumed
            + topic_status(s, Kind::AgentAction).skipped_expired
            == 2
    })
    .await
    .unwrap();
    assert_eq!(topic_status(&s, Kind::AgentAction).skipped_expired, 1);
    let mut c = client(&svc);
    let actions = c
        .list_recent_actions(pb::ListRecentActionsRequest {
            agent: Some("untimed".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0].id, "recent");
    let t = actions[0].timestamp.unwrap();
    let ms = t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
    assert_eq!(ms, two_hours_ago, "the record's timestamp");
    let last_hour = c
        .get_agent_metrics(pb::GetAgentMetricsRequest {
            agent: Some("untimed".into()),
            window: "1h".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(last_hour.is_empty(), "not in the last hour: {last_hour:?}");
}

/// Lag of the one partition of `topic`.
fn lags(s: &pb::ConsumerStatus, topic: &str) -> Vec<i64> {
    s.partitions
        .iter()
        .filter(|p| p.topic == topic)
        .map(|p| p.lag)
        .collect()
}

/// A transactional producer ends each transaction with a commit marker, an offset no consumer
/// ever receives: a log ending with one must count as read (else SERVING would wait for
/// `--replay-timeout`) and show lag 0. (Aborted transactions are left out: tansu hands their
/// events to read_committed consumers, which Kafka and Redpanda do not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_ending_with_a_transaction_marker_is_replayed_at_once() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let actions = topics.name(Kind::AgentAction).to_string();
    let mut p = TxnActions::new(&brokers, &actions, &format!("{prefix}txn")).unwrap();
    for n in [25, 40] {
        p.begin().unwrap();
        p.send(n).unwrap();
        p.commit().unwrap();
    }

    // Default --replay-timeout (10 min): SERVING must come from the replay itself.
    let mut svc = omnibus_tests::consumer::spawn_consumer(&brokers, &prefix, &[]).unwrap();
    svc.wait_health("", ServingStatus::Serving, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", svc.logs()));
    let s = omnibus_tests::consumer::status(&svc).await.unwrap();
    assert_eq!(s.replaying, Some(false), "{s:?}");
    let t = topic_status(&s, Kind::AgentAction);
    assert_eq!(t.events_consumed, 65, "{s:?}");
    assert_eq!(lags(&s, &actions), vec![0], "{s:?}");
}

/// A transaction still open when a replica starts (a producer in the middle of one): its
/// events cannot be read until it ends (read_committed), so they are not part of the replay;
/// the replica serves the committed events at once and takes the rest when it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_transaction_does_not_hold_the_replay() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let actions = topics.name(Kind::AgentAction).to_string();
    let mut p = TxnActions::new(&brokers, &actions, &format!("{prefix}txn")).unwrap();
    p.begin().unwrap();
    p.send(30).unwrap();
    p.commit().unwrap();
    p.begin().unwrap();
    p.send(20).unwrap(); // on the broker, not committed

    let mut svc = omnibus_tests::consumer::spawn_consumer(&brokers, &prefix, &[]).unwrap();
    svc.wait_health("", ServingStatus::Serving, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", svc.logs()));
    let s = omnibus_tests::consumer::status(&svc).await.unwrap();
    assert_eq!(
        topic_status(&s, Kind::AgentAction).events_consumed,
        30,
        "{s:?}"
    );
    p.commit().unwrap();
    let s = wait_status(&svc, WAIT, "the committed transaction read", |s| {
        topic_status(s, Kind::AgentAction).events_consumed == 50 && lags(s, &actions) == vec![0]
    })
    .await
    .unwrap();
    assert_eq!(lags(&s, &actions), vec![0], "{s:?}");
}

/// A transactional producer's partition that goes quiet ends with a commit marker, while
/// another topic keeps receiving events (here ~100 a second). The marker must count as read
/// all the same: it was noticed only after a poll that came back empty, which a steady stream
/// elsewhere never lets happen, so the replay waited for `--replay-timeout` (10 min) and the
/// quiet partition showed lag 1 for as long as the stream went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_transactional_partition_is_replayed_while_others_keep_delivering() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let actions = topics.name(Kind::AgentAction).to_string();
    let metrics = topics.name(Kind::PerformanceMetric).to_string();
    let mut p = TxnActions::new(&brokers, &actions, &format!("{prefix}txn")).unwrap();
    p.begin().unwrap();
    p.send(30).unwrap();
    p.commit().unwrap();

    // The steady stream, from before the replica starts until the test is done.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let stream = {
        let (stop, sent, brokers) = (stop.clone(), sent.clone(), brokers.clone());
        std::thread::spawn(move || {
            let producer = TestProducer::new(&brokers).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                let event = format!(r#"{{"id":"m{n}","routing_duration_ms":1}}"#);
                producer.send(&metrics, "k", event.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            producer.flush().unwrap();
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Default --replay-timeout (10 min): SERVING must come from the replay itself, and soon
    // (the statistics that fix the replay's targets come every second).
    let mut svc = omnibus_tests::consumer::spawn_consumer(&brokers, &prefix, &[]).unwrap();
    let serving = svc
        .wait_health("", ServingStatus::Serving, Duration::from_secs(30))
        .await;
    let s = omnibus_tests::consumer::status(&svc).await;
    let streaming = !stream.is_finished();
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    serving.unwrap_or_else(|e| panic!("{e}: {s:?}\n{}", svc.logs()));
    assert!(streaming, "the stream stopped early");
    let s = s.unwrap();
    assert_eq!(s.replaying, Some(false), "{s:?}");
    assert_eq!(
        topic_status(&s, Kind::AgentAction).events_consumed,
        30,
        "{s:?}"
    );
    assert_eq!(lags(&s, &actions), vec![0], "{s:?}");
    // Everything streamed is read too.
    let total = sent.load(Ordering::Relaxed);
    wait_status(&svc, WAIT, "the whole stream read", |s| {
        topic_status(s, Kind::PerformanceMetric).events_consumed == total
            && s.partitions.iter().all(|p| p.lag == 0)
    })
    .await
    .unwrap();
}
