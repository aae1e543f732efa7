//! consumer-svc streams against the real broker: every update in order, sequence numbers and
//! resume, agent metrics coalesced per interval, every Subscribe channel and its filters, a
//! stalled subscriber not delaying a fast one, real-time events switched off, and streams
//! ending on graceful shutdown.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use omnibus_client::generate::{EventGenerator, Kind, Topics, isoformat};
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::subscribe_response::Update;
use omnibus_tests::consumer::{
    PrivateBroker, TestProducer, client, create_topics, start_consumer, unique_prefix, wait_status,
};
use omnibus_tests::{ServiceProcess, kafka_brokers};
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(60);

/// Produces `n` actions (to one partition, so their order is defined); returns their ids.
fn produce_actions(
    p: &TestProducer,
    topics: &Topics,
    g: &mut EventGenerator,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let e = g.next_of(Kind::AgentAction, Utc::now());
        let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
        p.send(topics.name(Kind::AgentAction), &e.key, &e.payload)
            .unwrap();
    }
    p.flush().unwrap();
    ids
}

#[tokio::test]
async fn stream_actions_delivers_every_action_in_order() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let mut all = client(&svc)
        .stream_actions(pb::StreamActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut errors_only = client(&svc)
        .stream_actions(pb::StreamActionsRequest {
            action_type: Some("error".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The pushes are assembled from shared encodings in front of the generated server; they
    // are compressed as the generated server's responses are (--compression, default on).
    let compressed = client(&svc)
        .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
        .stream_actions(pb::StreamActionsRequest::default())
        .await
        .unwrap();
    assert_eq!(
        compressed
            .metadata()
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("zstd")
    );
    let mut compressed = compressed.into_inner();
    let p = TestProducer::new(&brokers).unwrap();
    let mut g = EventGenerator::new(4, 3);
    let ids = produce_actions(&p, &topics, &mut g, 500);

    let mut got = Vec::new();
    let mut types = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < ids.len() {
        let msg = tokio::time::timeout_at(deadline.into(), all.next())
            .await
            .expect("all actions within the deadline")
            .expect("stream open")
            .unwrap();
        assert_eq!(msg.lagged, 0);
        for a in msg.actions {
            types.push(a.action_type.clone());
            got.push(a.id);
        }
    }
    assert_eq!(got, ids, "every action, in order");
    let mut got_compressed = Vec::new();
    while got_compressed.len() < ids.len() {
        let msg = tokio::time::timeout_at(deadline.into(), compressed.next())
            .await
            .expect("all compressed pushes within the deadline")
            .expect("stream open")
            .unwrap();
        got_compressed.extend(msg.actions.into_iter().map(|a| a.id));
    }
    assert_eq!(got_compressed, ids, "the same actions, compressed");
    let want_errors = types.iter().filter(|t| *t == "error").count();
    let mut errors = 0;
    while errors < want_errors {
        let msg = tokio::time::timeout(WAIT, errors_only.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(msg.actions.iter().all(|a| a.action_type == "error"));
        errors += msg.actions.len();
    }
    assert_eq!(errors, want_errors);

    // Agent metrics: the first push holds every agent, then changed agents follow.
    let mut metrics = client(&svc)
        .stream_agent_metrics(pb::StreamAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = metrics.next().await.unwrap().unwrap();
    assert!(!first.agents.is_empty());
    let before: u64 = first.agents.iter().map(|a| a.total_actions).sum();
    assert_eq!(before, 500);
    produce_actions(&p, &topics, &mut g, 10);
    // The pushes alone (the latest figures of each agent they carried) reach the new total,
    // and then equal what the unary read reports.
    let mut pushed: std::collections::BTreeMap<String, pb::AgentMetrics> = first
        .agents
        .into_iter()
        .map(|a| (a.agent.clone(), a))
        .collect();
    while pushed.values().map(|a| a.total_actions).sum::<u64>() < 510 {
        let push = tokio::time::timeout(WAIT, metrics.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // Changed agents only.
        assert!(!push.agents.is_empty());
        assert!(push.agents.len() <= 10, "{} agents", push.agents.len());
        for a in push.agents {
            pushed.insert(a.agent.clone(), a);
        }
    }
    let totals: std::collections::BTreeMap<String, pb::AgentMetrics> = client(&svc)
        .get_agent_metrics(pb::GetAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .map(|a| (a.agent.clone(), a))
        .collect();
    assert_eq!(pushed, totals);
}

/// `--batch-writes true`: the frames of many streams on one HTTP/2 connection share socket
/// writes (svc_kit::write_batching); every stream still gets every action, in order, and
/// unary calls on the same connection keep working.
#[tokio::test]
async fn batched_writes_deliver_every_action_to_every_stream_of_a_connection() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &["--batch-writes", "true"])
        .await
        .unwrap();
    // One connection, shared by every stream below.
    let shared = client(&svc);
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(
            shared
                .clone()
                .stream_actions(pb::StreamActionsRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let p = TestProducer::new(&brokers).unwrap();
    let mut g = EventGenerator::new(4, 3);
    let ids = produce_actions(&p, &topics, &mut g, 400);

    let deadline = Instant::now() + WAIT;
    for (i, stream) in streams.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < ids.len() {
            let msg = tokio::time::timeout_at(deadline.into(), stream.next())
                .await
                .unwrap_or_else(|_| panic!("stream {i}: every action within the deadline"))
                .expect("stream open")
                .unwrap();
            assert_eq!(msg.lagged, 0, "stream {i}");
            got.extend(msg.actions.into_iter().map(|a| a.id));
        }
        assert_eq!(got, ids, "stream {i}: every action, in order");
    }
    let recent = shared
        .clone()
        .list_recent_actions(pb::ListRecentActionsRequest {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let produced: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        recent.actions.len(),
        10,
        "a unary read on the same connection"
    );
    assert!(recent.actions.iter().all(|a| produced.contains(&a.id)));
}

#[tokio::test]
async fn subscribe_sequences_snapshot_and_resume_without_gaps() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let mut g = EventGenerator::new(3, 9);
    let early = produce_actions(&p, &topics, &mut g, 20);
    wait_status(&svc, WAIT, "early actions", |s| s.events_processed == 20)
        .await
        .unwrap();

    let mut sub = client(&svc)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Actions as i32],
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = sub.next().await.unwrap().unwrap();
    let Some(Update::Snapshot(snap)) = first.update else {
        panic!("snapshot first, got {first:?}");
    };
    let snap_ids: HashSet<String> = snap.actions.iter().map(|a| a.id.clone()).collect();
    assert_eq!(snap_ids, early.iter().cloned().collect());
    assert!(
        snap.agents.is_empty()
            && snap.performance_metrics.is_empty()
            && snap.performance_stats.is_none()
            && snap.status.is_none(),
        "the snapshot holds only the channels asked for: {snap:?}"
    );
    assert_eq!(first.sequence, snap.sequence);

    let batch1 = produce_actions(&p, &topics, &mut g, 30);
    let mut got = Vec::new();
    let mut last_seq = first.sequence;
    while got.len() < 10 {
        let m = sub.next().await.unwrap().unwrap();
        assert!(m.sequence > last_seq, "sequence increases");
        last_seq = m.sequence;
        match m.update {
            Some(Update::Action(a)) => got.push(a.id),
            other => panic!("only actions were asked for: {other:?}"),
        }
    }
    // Disconnect after 10, produce more, resume after the last sequence seen.
    drop(sub);
    let batch2 = produce_actions(&p, &topics, &mut g, 30);
    wait_status(&svc, WAIT, "all actions", |s| s.events_processed == 80)
        .await
        .unwrap();
    let mut resumed = client(&svc)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Actions as i32],
            resume_after_sequence: Some(last_seq),
            include_snapshot: true, // only sent when the gap cannot be filled
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while got.len() < 60 {
        let m = tokio::time::timeout(WAIT, resumed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(m.sequence > last_seq);
        last_seq = m.sequence;
        match m.update {
            Some(Update::Action(a)) => got.push(a.id),
            other => panic!("no snapshot or lag notice expected: {other:?}"),
        }
    }
    let want: Vec<String> = batch1.into_iter().chain(batch2).collect();
    assert_eq!(got, want, "resumed without gaps or duplicates");

    // A resume point from the future (e.g. another server's sequence) is OUT_OF_RANGE.
    let err = client(&svc)
        .subscribe(pb::SubscribeRequest {
            resume_after_sequence: Some(u64::MAX / 2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
}

#[tokio::test]
async fn a_stalled_subscriber_does_not_delay_a_fast_one_and_is_told_it_lagged() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    // A tiny queue so the stalled subscriber overflows quickly.
    let svc = start_consumer(
        &brokers,
        &prefix,
        &["--subscriber-queue", "8", "--resume-buffer", "100"],
    )
    .await
    .unwrap();
    // Stalled: subscribed, never read; a small HTTP/2 window so it fills quickly, then the
    // server-side queue overflows.
    let small_window = tonic::transport::Endpoint::from_shared(svc.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect_lazy();
    let mut stalled = pb::consumer_service_client::ConsumerServiceClient::new(small_window)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut fast = client(&svc)
        .stream_actions(pb::StreamActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let p = TestProducer::new(&brokers).unwrap();
    let mut g = EventGenerator::new(5, 1);
    let mut want = Vec::new();
    // Several rounds, so ingest publishes many batches.
    for _ in 0..40 {
        want.extend(produce_actions(&p, &topics, &mut g, 50));
    }
    let mut got = Vec::new();
    while got.len() < want.len() {
        let m = tokio::time::timeout(Duration::from_secs(30), fast.next())
            .await
            .expect("the fast subscriber keeps receiving")
            .unwrap()
            .unwrap();
        assert_eq!(m.lagged, 0, "the fast subscriber never lags");
        got.extend(m.actions.into_iter().map(|a| a.id));
    }
    assert_eq!(got, want);

    // The stalled one, when it finally reads, finds a lag notice among its messages before
    // it reaches the newest update.
    let newest = omnibus_tests::consumer::status(&svc)
        .await
        .unwrap()
        .last_sequence;
    let mut lagged = 0;
    let mut last_seq = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), stalled.next()).await {
        let m = m.unwrap();
        assert!(m.sequence >= last_seq);
        last_seq = m.sequence;
        if let Some(Update::Lagged(l)) = m.update {
            lagged += l.missed;
        }
        if last_seq >= newest {
            break;
        }
    }
    assert!(lagged > 0, "a lag notice with the number of missed updates");
}

#[tokio::test]
async fn real_time_events_can_be_switched_off() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &["--enable-real-time-events", "false"])
        .await
        .unwrap();
    let err = client(&svc)
        .stream_actions(pb::StreamActionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = client(&svc)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = client(&svc)
        .stream_agent_metrics(pb::StreamAgentMetricsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    // Unary reads keep working.
    let p = TestProducer::new(&brokers).unwrap();
    let mut g = EventGenerator::new(2, 2);
    produce_actions(&p, &topics, &mut g, 5);
    let s = wait_status(&svc, WAIT, "events", |s| s.events_processed == 5)
        .await
        .unwrap();
    assert!(!s.real_time_events_enabled);
    let actions = client(&svc)
        .list_recent_actions(pb::ListRecentActionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .actions;
    assert_eq!(actions.len(), 5);
}

#[tokio::test]
async fn streams_end_promptly_with_unavailable_on_sigterm() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    create_topics(&brokers, &prefix, 1).await.unwrap();
    // A long grace period: the streams must end on their own, not be cut at its end.
    let mut svc = start_consumer(&brokers, &prefix, &["--shutdown-grace", "30s"])
        .await
        .unwrap();
    let mut actions = client(&svc)
        .stream_actions(pb::StreamActionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut sub = client(&svc)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    svc.terminate().unwrap();
    let started = Instant::now();
    // Each ends with UNAVAILABLE (retried by clients and meshes, on another replica), not
    // OK (which reads as "finished").
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        let mut last = Vec::new();
        let mut ending = None;
        while let Some(m) = actions.next().await {
            ending = m.err();
        }
        last.push(ending.take());
        while let Some(m) = sub.next().await {
            ending = m.err();
        }
        last.push(ending);
        last
    })
    .await;
    let last = end.expect("streams still open after SIGTERM");
    for status in last {
        let status = status.expect("the stream ended with an error status, not OK");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shutting down"), "{status:?}");
    }
    let status = svc.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", svc.logs());
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The protobuf timestamp consumer-svc reports for an event time sent as `isoformat(t)`
/// (microsecond precision).
fn proto_time(t: chrono::DateTime<Utc>) -> prost_types::Timestamp {
    let micros = t.timestamp_micros();
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn action_json(id: &str, agent: &str, action_type: &str, correlation_id: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!({
        "id": id,
        "agent_name": agent,
        "action_type": action_type,
        "timestamp": isoformat(Utc::now()),
    });
    if let Some(c) = correlation_id {
        v["correlation_id"] = c.into();
    }
    serde_json::to_vec(&v).unwrap()
}

fn decision_json(
    id: &str,
    agent: &str,
    confidence: Option<f64>,
    routing_time_ms: f64,
    correlation_id: Option<&str>,
) -> Vec<u8> {
    let mut v = serde_json::json!({
        "id": id,
        "selected_agent": agent,
        "routing_time_ms": routing_time_ms,
        "timestamp": isoformat(Utc::now()),
    });
    if let Some(c) = confidence {
        v["confidence_score"] = c.into();
    }
    if let Some(c) = correlation_id {
        v["correlation_id"] = c.into();
    }
    serde_json::to_vec(&v).unwrap()
}

async fn agent_metrics_of(svc: &ServiceProcess, agent: &str) -> pb::AgentMetrics {
    let mut agents = client(svc)
        .get_agent_metrics(pb::GetAgentMetricsRequest {
            agent: Some(agent.into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1, "{agent}: {agents:?}");
    agents.remove(0)
}

/// The pushes of a StreamAgentMetrics stream with the time each was received.
struct MetricPushes {
    rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, pb::StreamAgentMetricsResponse)>,
    got: Vec<(Instant, pb::StreamAgentMetricsResponse)>,
}

impl MetricPushes {
    async fn open(svc: &ServiceProcess) -> Self {
        let mut stream = client(svc)
            .stream_agent_metrics(pb::StreamAgentMetricsRequest::default())
            .await
            .unwrap()
            .into_inner();
        // Read on a task of its own, so a push's receive time does not depend on when the
        // test gets to it.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(push) = stream.next().await {
                if tx.send((Instant::now(), push.unwrap())).is_err() {
                    break;
                }
            }
        });
        Self {
            rx,
            got: Vec::new(),
        }
    }

    /// The next push.
    async fn next(&mut self) -> &pb::StreamAgentMetricsResponse {
        let push = tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a push within the deadline")
            .expect("stream open");
        self.got.push(push);
        &self.got.last().unwrap().1
    }

    /// Reads pushes until one holds an entry for which `done` holds; returns that entry.
    async fn until(
        &mut self,
        what: &str,
        done: impl Fn(&pb::AgentMetrics) -> bool,
    ) -> pb::AgentMetrics {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(
                Instant::now() < deadline,
                "{what}: not pushed; pushes so far: {:?}",
                self.got
            );
            if let Some(m) = self.next().await.agents.iter().find(|m| done(m)) {
                return m.clone();
            }
        }
    }

    /// The agents of the pushes `from..to`, one list per push.
    fn agents(&self, range: std::ops::Range<usize>) -> Vec<Vec<&str>> {
        self.got[range]
            .iter()
            .map(|(_, p)| p.agents.iter().map(|m| m.agent.as_str()).collect())
            .collect()
    }
}

/// `--agent-metrics-interval`: after the first push (every agent), a push holds only the
/// agents that changed since the previous one, each once, a burst of changes to one agent is
/// pushed at most once per interval, and the last values pushed equal GetAgentMetrics. (The
/// publisher's spacing itself is `api::tests::live_metrics_are_published_at_most_once_per_interval`
/// in consumer-svc.)
// Multi-threaded: the pushes' receive times come from a reader task that must keep running
// while the test thread blocks in a producer's flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_agent_metrics_pushes_only_changed_agents_at_most_once_per_interval() {
    const INTERVAL: Duration = Duration::from_secs(2);
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &["--agent-metrics-interval", "2s"])
        .await
        .unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let (aa, rd) = (
        topics.name(Kind::AgentAction),
        topics.name(Kind::RoutingDecision),
    );

    // agent-c changes before the stream opens, never after. Once its change was published
    // (seen on Subscribe), it is no longer pending.
    p.send(aa, "c", &action_json("c-1", "agent-c", "success", None))
        .unwrap();
    p.send(
        rd,
        "c",
        &decision_json("c-2", "agent-c", Some(0.5), 5.0, None),
    )
    .unwrap();
    p.flush().unwrap();
    let mut sub = client(&svc)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Metrics as i32],
            resume_after_sequence: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    loop {
        let m = tokio::time::timeout(WAIT, sub.next())
            .await
            .expect("agent-c's metrics published")
            .unwrap()
            .unwrap();
        if let Some(Update::AgentMetrics(m)) = m.update
            && m.agent == "agent-c"
            && (m.total_actions, m.total_requests) == (1, 1)
        {
            break;
        }
    }
    drop(sub);

    let mut pushes = MetricPushes::open(&svc).await;
    let first = pushes.next().await.clone();
    let c = agent_metrics_of(&svc, "agent-c").await;
    assert_eq!(first.agents, vec![c.clone()], "the first push: every agent");

    // A burst for agent-a only.
    let a_sent = Instant::now();
    let n = 60;
    for i in 0..n {
        let action_type = ["success", "error", "tool_call"][i % 3];
        p.send(
            aa,
            "a",
            &action_json(&format!("a-{i}"), "agent-a", action_type, None),
        )
        .unwrap();
        let confidence = 0.5 + (i % 5) as f64 / 10.0;
        p.send(
            rd,
            "a",
            &decision_json(
                &format!("ad-{i}"),
                "agent-a",
                Some(confidence),
                i as f64,
                None,
            ),
        )
        .unwrap();
    }
    p.flush().unwrap();
    let a_pushed = pushes
        .until("agent-a's burst", |m| {
            m.agent == "agent-a" && m.total_actions == n as u64 && m.total_requests == n as u64
        })
        .await;
    assert_eq!((a_pushed.successes, a_pushed.errors), (20, 20));
    assert_eq!(a_pushed, agent_metrics_of(&svc, "agent-a").await);
    let a_end = pushes.got.len();
    // A marker agent: once its push is seen, nothing of agent-a is pending any more (a last
    // agent-a batch applied while that push was being prepared is published with it, or
    // before it).
    p.send(aa, "m", &action_json("m-1", "agent-m", "tool_call", None))
        .unwrap();
    p.flush().unwrap();
    pushes.until("the marker", |m| m.agent == "agent-m").await;
    let m_end = pushes.got.len();

    // A burst for agent-b only.
    let b_sent = Instant::now();
    for i in 0..40 {
        let action_type = ["success", "tool_call"][i % 2];
        p.send(
            aa,
            "b",
            &action_json(&format!("b-{i}"), "agent-b", action_type, None),
        )
        .unwrap();
        p.send(
            rd,
            "b",
            &decision_json(&format!("bd-{i}"), "agent-b", Some(0.25), 3.0, None),
        )
        .unwrap();
    }
    p.flush().unwrap();
    let b_pushed = pushes
        .until("agent-b's burst", |m| {
            m.agent == "agent-b" && m.total_actions == 40 && m.total_requests == 40
        })
        .await;
    assert_eq!(b_pushed.success_rate, Some(1.0));
    // Anything else pushed later would show here: every push is read for two more intervals.
    let quiet_until = Instant::now() + INTERVAL * 2 + INTERVAL / 2;
    while let Ok(Some(push)) = tokio::time::timeout_at(quiet_until.into(), pushes.rx.recv()).await {
        pushes.got.push(push);
    }

    let all = pushes.agents(0..pushes.got.len());
    for (i, agents) in all.iter().enumerate() {
        let distinct: HashSet<&&str> = agents.iter().collect();
        assert_eq!(
            distinct.len(),
            agents.len(),
            "push {i} holds an agent twice: {all:?}"
        );
        assert_eq!(pushes.got[i].1.lagged, 0, "push {i}");
    }
    for (i, agents) in pushes.agents(1..a_end).iter().enumerate() {
        assert_eq!(
            agents,
            &["agent-a"],
            "push {}: only agent-a changed: {all:?}",
            i + 1
        );
    }
    for agents in pushes.agents(a_end..m_end) {
        assert!(
            agents.iter().all(|a| ["agent-a", "agent-m"].contains(a)),
            "only agent-a and agent-m changed: {all:?}"
        );
    }
    let after_b = pushes.agents(m_end..pushes.got.len());
    assert!(!after_b.is_empty());
    for agents in &after_b {
        assert_eq!(agents, &["agent-b"], "after the agent-b burst: {all:?}");
    }
    // The last values pushed are the current ones.
    for agent in ["agent-a", "agent-b", "agent-m"] {
        let last_pushed = pushes
            .got
            .iter()
            .flat_map(|(_, p)| &p.agents)
            .rfind(|m| m.agent == agent)
            .unwrap();
        assert_eq!(last_pushed, &agent_metrics_of(&svc, agent).await, "{agent}");
    }
    assert_eq!(
        agent_metrics_of(&svc, "agent-c").await,
        c,
        "agent-c unchanged"
    );
    // Coalescing, counted per burst: the pushes naming an agent come from distinct ticks of
    // the publisher (each tick publishes an agent once), and the ticks are the interval apart
    // (less tokio's 5 ms tolerance). All of them fall between the burst's first send and the
    // receipt of the last push naming the agent, so at most one per interval of that span,
    // plus one. A late push only lengthens the span; it can never make this fail.
    for (agent, sent) in [("agent-a", a_sent), ("agent-b", b_sent)] {
        let naming: Vec<Instant> = pushes
            .got
            .iter()
            .filter(|(_, p)| p.agents.iter().any(|m| m.agent == agent))
            .map(|(at, _)| *at)
            .collect();
        let span = naming.last().unwrap().duration_since(sent);
        let most = span.as_micros() / (INTERVAL - Duration::from_millis(10)).as_micros() + 1;
        assert!(
            (1..=most).contains(&(naming.len() as u128)),
            "{agent}: {} pushes in the {span:?} from its burst to its last push \
             ({INTERVAL:?} interval, at most {most}): {all:?}",
            naming.len()
        );
    }
}

/// What a Subscribe stream delivered, in order; checks that sequence numbers strictly
/// increase.
struct Received {
    stream: tonic::Streaming<pb::SubscribeResponse>,
    got: Vec<pb::SubscribeResponse>,
}

impl Received {
    async fn open(svc: &ServiceProcess, request: pb::SubscribeRequest) -> Self {
        let stream = client(svc).subscribe(request).await.unwrap().into_inner();
        Self {
            stream,
            got: Vec::new(),
        }
    }

    /// Reads until `done` holds for everything received so far.
    async fn until(&mut self, what: &str, done: impl Fn(&[pb::SubscribeResponse]) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done(&self.got) {
            let m = tokio::time::timeout_at(deadline.into(), self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("{what}: not received; got {:#?}", self.got))
                .expect("stream open")
                .unwrap();
            if let Some(last) = self.got.last() {
                assert!(
                    m.sequence > last.sequence,
                    "sequence {} after {}: {m:?}",
                    m.sequence,
                    last.sequence
                );
            }
            self.got.push(m);
        }
    }

    fn updates(&self) -> impl Iterator<Item = (u64, &Update)> {
        self.got
            .iter()
            .map(|m| (m.sequence, m.update.as_ref().expect("an update")))
    }

    fn statuses(&self) -> Vec<&pb::ConsumerStatus> {
        self.updates()
            .filter_map(|(_, u)| match u {
                Update::ConsumerStatus(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}

fn has_transformation(got: &[pb::SubscribeResponse], id: &str) -> bool {
    got.iter()
        .any(|m| matches!(&m.update, Some(Update::Transformation(t)) if t.id == id))
}

fn has_performance_metric(got: &[pb::SubscribeResponse], id: &str) -> bool {
    got.iter()
        .any(|m| matches!(&m.update, Some(Update::PerformanceMetric(p)) if p.id == id))
}

/// Subscribe end to end for transformations, performance metrics, agent metrics and consumer
/// status (broker down and back, on a private broker), on one stream with every channel and
/// on one with two channels only.
#[tokio::test]
async fn subscribe_delivers_transformations_performance_agent_metrics_and_status() {
    let mut broker = PrivateBroker::start().await.unwrap();
    let prefix = unique_prefix();
    let topics = create_topics(&broker.addr(), &prefix, 1).await.unwrap();
    let svc = start_consumer(&broker.addr(), &prefix, &[]).await.unwrap();
    // From the first update: the status published on start-up included.
    let mut all = Received::open(
        &svc,
        pb::SubscribeRequest {
            resume_after_sequence: Some(0),
            ..Default::default()
        },
    )
    .await;
    let mut two = Received::open(
        &svc,
        pb::SubscribeRequest {
            channels: vec![
                pb::Channel::Transformations as i32,
                pb::Channel::Performance as i32,
            ],
            ..Default::default()
        },
    )
    .await;

    let t = Utc::now() - chrono::Duration::seconds(1);
    let ts = isoformat(t);
    {
        let p = TestProducer::new(&broker.addr()).unwrap();
        p.send(topics.name(Kind::Transformation), "c-t", format!(
            r#"{{"id":"t1","correlation_id":"c-t","source_agent":"agent-x","target_agent":"agent-y","transformation_reason":"needs tests","confidence_score":0.7,"transformation_duration_ms":12.5,"success":false,"timestamp":"{ts}"}}"#
        ).as_bytes()).unwrap();
        p.send(topics.name(Kind::PerformanceMetric), "c-p", format!(
            r#"{{"id":"p1","correlation_id":"c-p","query_text":"find the bug","routing_duration_ms":8,"cache_hit":true,"candidates_evaluated":3,"trigger_match_strategy":"exact","confidence_components":{{"k":1}},"timestamp":"{ts}"}}"#
        ).as_bytes()).unwrap();
        p.send(
            topics.name(Kind::AgentAction),
            "c-a",
            format!(
                r#"{{"id":"a1","agent_name":"agent-x","action_type":"success","timestamp":"{ts}"}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        p.send(topics.name(Kind::RoutingDecision), "c-d", format!(
            r#"{{"id":"d1","selected_agent":"agent-x","confidence_score":0.9,"routing_time_ms":4,"timestamp":"{ts}"}}"#
        ).as_bytes()).unwrap();
        p.flush().unwrap();
    }
    let x_done = |got: &[pb::SubscribeResponse]| {
        got.iter().any(|m| {
            matches!(&m.update, Some(Update::AgentMetrics(a))
                if a.agent == "agent-x" && (a.total_actions, a.total_requests) == (1, 1))
        })
    };
    all.until("every event and agent-x's metrics", |got| {
        has_transformation(got, "t1")
            && has_performance_metric(got, "p1")
            && x_done(got)
            && got
                .iter()
                .any(|m| matches!(&m.update, Some(Update::Action(a)) if a.id == "a1"))
            && got
                .iter()
                .any(|m| matches!(&m.update, Some(Update::RoutingDecision(d)) if d.id == "d1"))
    })
    .await;
    let mut t1 = None;
    let mut p1 = None;
    let mut x = None;
    for (_, u) in all.updates() {
        match u {
            Update::Transformation(t) => {
                assert!(t1.is_none(), "one transformation");
                t1 = Some(t.clone());
            }
            Update::PerformanceMetric(p) => {
                assert!(p1.is_none(), "one performance metric");
                p1 = Some(p.clone());
            }
            Update::AgentMetrics(m) => {
                assert_eq!(m.agent, "agent-x", "only agent-x has metrics");
                x = Some(m.clone());
            }
            Update::Action(a) => assert_eq!(a.id, "a1"),
            Update::RoutingDecision(d) => assert_eq!(d.id, "d1"),
            Update::ConsumerStatus(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        t1.unwrap(),
        pb::Transformation {
            id: "t1".into(),
            correlation_id: Some("c-t".into()),
            source_agent: "agent-x".into(),
            target_agent: "agent-y".into(),
            transformation_reason: Some("needs tests".into()),
            confidence_score: Some(0.7),
            transformation_duration_ms: Some(12.5),
            success: false,
            timestamp: Some(proto_time(t)),
        }
    );
    assert_eq!(
        p1.unwrap(),
        pb::PerformanceMetric {
            id: "p1".into(),
            correlation_id: Some("c-p".into()),
            query_text: Some("find the bug".into()),
            routing_duration_ms: Some(8.0),
            cache_hit: true,
            candidates_evaluated: Some(3),
            trigger_match_strategy: "exact".into(),
            confidence_components_json: Some(r#"{"k":1}"#.into()),
            timestamp: Some(proto_time(t)),
        }
    );
    let x = x.unwrap();
    assert_eq!(
        (x.total_requests, x.total_actions, x.successes, x.errors),
        (1, 1, 1, 0)
    );
    assert_eq!(
        (x.avg_confidence, x.avg_routing_time_ms, x.success_rate),
        (Some(0.9), Some(4.0), Some(1.0))
    );
    assert_eq!(x.last_seen, Some(proto_time(t)));
    assert_eq!(x, agent_metrics_of(&svc, "agent-x").await);

    // Consumer status: published on start-up and on every connection change.
    let is_status = |m: &pb::SubscribeResponse, connected: bool| matches!(&m.update, Some(Update::ConsumerStatus(s)) if s.connected == connected);
    let before = all.got.len();
    broker.stop();
    all.until("the broker down", |got| {
        got[before..].iter().any(|m| is_status(m, false))
    })
    .await;
    broker.restart().await.unwrap();
    all.until("the broker back", |got| {
        got[before..]
            .iter()
            .skip_while(|m| !is_status(m, false))
            .any(|m| is_status(m, true))
    })
    .await;
    let statuses = all.statuses();
    let flags: Vec<bool> = statuses.iter().map(|s| s.connected).collect();
    // A start-up status may come first while the first probe was still out.
    let after_start = flags.strip_prefix(&[false]).unwrap_or(&flags);
    assert_eq!(
        after_start,
        [true, false, true],
        "a status on start-up and on each change, no repeats"
    );
    let down = statuses.iter().rfind(|s| !s.connected).unwrap();
    assert_eq!(down.events_processed, 4);
    assert!(down.real_time_events_enabled);
    assert_eq!(down.retention_seconds, 24 * 3600);
    assert_eq!(down.agents, 1);
    let names: Vec<&str> = down.topics.iter().map(|t| t.topic.as_str()).collect();
    assert_eq!(
        names,
        topics.0.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(down.topics.iter().all(|t| t.events_consumed == 1));

    // The broker came back empty: once the topics exist again, events flow on.
    let topics = create_topics(&broker.addr(), &prefix, 1).await.unwrap();
    {
        let p = TestProducer::new(&broker.addr()).unwrap();
        let ts = isoformat(Utc::now());
        p.send(
            topics.name(Kind::PerformanceMetric),
            "c-p2",
            format!(r#"{{"id":"p2","timestamp":"{ts}"}}"#).as_bytes(),
        )
        .unwrap();
        p.flush().unwrap();
    }
    all.until("p2", |got| has_performance_metric(got, "p2"))
        .await;

    // Two channels: the same transformation and metrics, with the same sequence numbers, and
    // nothing else (no actions, decisions, agent metrics or status).
    two.until("t1, p1 and p2", |got| {
        has_transformation(got, "t1")
            && has_performance_metric(got, "p1")
            && has_performance_metric(got, "p2")
    })
    .await;
    let on_all: Vec<(u64, &Update)> = all
        .updates()
        .filter(|(_, u)| matches!(u, Update::Transformation(_) | Update::PerformanceMetric(_)))
        .collect();
    let on_two: Vec<(u64, &Update)> = two.updates().collect();
    assert_eq!(on_two, on_all, "only the channels asked for");
}

/// Subscribe's `min_confidence` (routing decisions with a confidence at least that) and
/// `correlation_id` (only actions, decisions and performance metrics carrying it, in the
/// snapshot as live) filters, and an agent filter that could never match refused.
#[tokio::test]
async fn subscribe_filters_by_min_confidence_and_correlation_id() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let svc = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let err = client(&svc)
        .subscribe(pb::SubscribeRequest {
            min_confidence: Some(1.5),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Text filters longer than 1,024 bytes are refused, naming the field, in streams and
    // reads alike (a stream would keep its filter for as long as it lives).
    let long = "a".repeat(1025);
    let named = |err: tonic::Status, field: &str| {
        use tonic_types::StatusExt;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        let fields: Vec<String> = err
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        assert_eq!(fields, [field], "{err:?}");
    };
    let err = client(&svc)
        .subscribe(pb::SubscribeRequest {
            agent: Some(long.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    named(err, "agent");
    let err = client(&svc)
        .stream_actions(pb::StreamActionsRequest {
            correlation_id: Some(long.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    named(err, "correlation_id");
    let err = client(&svc)
        .list_recent_actions(pb::ListRecentActionsRequest {
            action_type: Some(long.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    named(err, "action_type");
    let at_the_limit = client(&svc)
        .list_recent_actions(pb::ListRecentActionsRequest {
            agent: Some(long[1..].to_string()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(at_the_limit.actions.is_empty());

    let mut confident = Received::open(
        &svc,
        pb::SubscribeRequest {
            channels: vec![pb::Channel::Routing as i32],
            min_confidence: Some(0.5),
            ..Default::default()
        },
    )
    .await;
    let mut correlated = Received::open(
        &svc,
        pb::SubscribeRequest {
            channels: vec![pb::Channel::Actions as i32, pb::Channel::Routing as i32],
            correlation_id: Some("keep".into()),
            ..Default::default()
        },
    )
    .await;
    let p = TestProducer::new(&brokers).unwrap();
    let (aa, rd) = (
        topics.name(Kind::AgentAction),
        topics.name(Kind::RoutingDecision),
    );
    // One partition per topic: each topic's events arrive in this order.
    for (id, confidence, correlation) in [
        ("d-low", Some(0.2), Some("keep")),
        ("d-none", None, None),
        ("d-edge", Some(0.5), None),
        ("d-high", Some(0.9), Some("other")),
        ("d-below", Some(0.49), None),
        ("d-last", Some(0.95), Some("keep")),
    ] {
        p.send(
            rd,
            id,
            &decision_json(id, "agent-r", confidence, 1.0, correlation),
        )
        .unwrap();
    }
    for (id, correlation) in [
        ("a-keep-1", Some("keep")),
        ("a-other", Some("other")),
        ("a-none", None),
        ("a-keep-2", Some("keep")),
        ("a-keep-prefix", Some("keep-not")),
        ("a-last", Some("keep")),
    ] {
        p.send(
            aa,
            id,
            &action_json(id, "agent-r", "tool_call", correlation),
        )
        .unwrap();
    }
    p.flush().unwrap();

    let ids = |r: &Received| -> Vec<String> {
        r.updates()
            .map(|(_, u)| match u {
                Update::RoutingDecision(d) => d.id.clone(),
                Update::Action(a) => a.id.clone(),
                other => panic!("only the channels asked for: {other:?}"),
            })
            .collect()
    };
    confident
        .until("d-last", |got| {
            got.iter()
                .any(|m| matches!(&m.update, Some(Update::RoutingDecision(d)) if d.id == "d-last"))
        })
        .await;
    assert_eq!(ids(&confident), ["d-edge", "d-high", "d-last"]);

    correlated
        .until("a-last and d-last", |got| {
            let has = |id: &str| {
                got.iter().any(|m| match &m.update {
                    Some(Update::Action(a)) => a.id == id,
                    Some(Update::RoutingDecision(d)) => d.id == id,
                    _ => false,
                })
            };
            has("a-last") && has("d-last")
        })
        .await;
    let got = ids(&correlated);
    let actions: Vec<&String> = got.iter().filter(|id| id.starts_with("a-")).collect();
    let decisions: Vec<&String> = got.iter().filter(|id| id.starts_with("d-")).collect();
    assert_eq!(actions, ["a-keep-1", "a-keep-2", "a-last"]);
    assert_eq!(decisions, ["d-low", "d-last"]);

    // Performance metrics: the correlation id filters the snapshot as it filters live pushes.
    let pm = topics.name(Kind::PerformanceMetric);
    for (id, correlation) in [
        ("p-keep", Some("keep")),
        ("p-other", Some("other")),
        ("p-none", None),
    ] {
        let mut m = serde_json::json!({"id": id, "query_text": "q", "routing_duration_ms": 3.0});
        if let Some(c) = correlation {
            m["correlation_id"] = c.into();
        }
        p.send(pm, id, &serde_json::to_vec(&m).unwrap()).unwrap();
    }
    p.flush().unwrap();
    wait_status(
        &svc,
        Duration::from_secs(30),
        "3 performance metrics",
        |st| {
            st.topics
                .iter()
                .any(|t| t.topic == pm && t.events_consumed >= 3)
        },
    )
    .await
    .unwrap();
    let mut perf = client(&svc)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Performance as i32],
            correlation_id: Some("keep".into()),
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = perf.next().await.unwrap().unwrap();
    let Some(Update::Snapshot(snap)) = first.update else {
        panic!("a snapshot first: {first:?}");
    };
    let ids: Vec<&str> = snap
        .performance_metrics
        .iter()
        .map(|m| m.id.as_str())
        .collect();
    assert_eq!(ids, ["p-keep"]);
    assert!(snap.performance_stats.is_some(), "{snap:?}");
    // With an agent filter, performance data (which has no agent) is left out of the
    // snapshot as it is of the live updates: the metrics and their stats.
    let first = client(&svc)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Performance as i32, pb::Channel::Actions as i32],
            agent: Some("agent-r".into()),
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    let Some(Update::Snapshot(snap)) = first.update else {
        panic!("a snapshot first: {first:?}");
    };
    assert!(
        snap.performance_metrics.is_empty() && snap.performance_stats.is_none(),
        "{snap:?}"
    );

    // An agent filter with performance metrics alone could never deliver anything.
    let err = client(&svc)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Performance as i32],
            agent: Some("agent-r".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    use tonic_types::StatusExt;
    let details = err.get_error_details();
    assert_eq!(
        details.bad_request().expect("BadRequest").field_violations[0].field,
        "agent"
    );
}

/// A client that resumes after consumer-svc restarted must not land inside the new run's
/// numbers and silently skip its first updates: sequences continue from the run's start time,
/// so the old resume point is refused (OUT_OF_RANGE, start over), even though the restarted
/// service replayed more updates than the point's number.
#[tokio::test]
async fn resuming_across_a_restart_is_refused_not_silently_gapped() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let mut g = EventGenerator::new(3, 11);
    produce_actions(&p, &topics, &mut g, 30);
    let first = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    wait_status(&first, WAIT, "30 actions", |s| s.events_processed == 30)
        .await
        .unwrap();
    let old_point = first_sequence_seen(&first).await;
    drop(first);

    let second = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    wait_status(&second, WAIT, "30 actions replayed", |s| {
        s.events_processed == 30
    })
    .await
    .unwrap();
    let status = omnibus_tests::consumer::status(&second).await.unwrap();
    assert!(
        status.last_sequence > old_point,
        "the new run's numbers start above the old run's: {} vs {old_point}",
        status.last_sequence
    );
    let err = client(&second)
        .subscribe(pb::SubscribeRequest {
            resume_after_sequence: Some(old_point),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().contains("earlier run"), "{err:?}");
    // 0 still means "everything buffered from this run's start".
    let mut all = client(&second)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Actions as i32],
            resume_after_sequence: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut actions = 0;
    while actions < 30 {
        let m = tokio::time::timeout(WAIT, all.next())
            .await
            .expect("buffered actions")
            .unwrap()
            .unwrap();
        if let Some(Update::Action(_)) = m.update {
            actions += 1;
        }
    }
}

/// The sequence of the first update a new subscriber is told about (its snapshot).
async fn first_sequence_seen(svc: &ServiceProcess) -> u64 {
    let mut sub = client(svc)
        .subscribe(pb::SubscribeRequest {
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = sub.next().await.unwrap().unwrap();
    let Some(Update::Snapshot(snap)) = &first.update else {
        panic!("a snapshot first: {first:?}");
    };
    // Every channel, CHANNEL_SYSTEM included: the status, read with the snapshot.
    let status = snap.status.as_ref().expect("the consumer status");
    assert_eq!(status.last_sequence, first.sequence);
    first.sequence
}
