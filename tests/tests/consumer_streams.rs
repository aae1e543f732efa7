//! consumer-svc streams against the real broker: every update in order, sequence numbers and
//! resume, a stalled subscriber not delaying a fast one, real-time events switched off, and
//! streams ending on graceful shutdown.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use omnibus_client::generate::{EventGenerator, Kind, Topics};
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::subscribe_response::Update;
use omnibus_tests::consumer::{
    TestProducer, client, create_topics, start_consumer, unique_prefix, wait_status,
};
use omnibus_tests::kafka_brokers;
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
    let mut seen = 0;
    while seen < 510 {
        let push = tokio::time::timeout(WAIT, metrics.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        // Changed agents only; their totals grow to the full count.
        let totals = client(&svc)
            .get_agent_metrics(pb::GetAgentMetricsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .agents;
        seen = totals.iter().map(|a| a.total_actions).sum();
        assert!(!push.agents.is_empty());
    }
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
        snap.agents.is_empty() && snap.performance_metrics.is_empty(),
        "the snapshot holds only the channels asked for"
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

    // The stalled one, when it finally reads, finds a lag notice among its messages.
    let mut lagged = 0;
    let mut last_seq = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), stalled.next()).await {
        let m = m.unwrap();
        assert!(m.sequence >= last_seq);
        last_seq = m.sequence;
        if let Some(Update::Lagged(l)) = m.update {
            lagged += l.missed;
        }
        if last_seq >= 2000 {
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
async fn streams_end_promptly_on_sigterm() {
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
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = actions.next().await {
            m.unwrap();
        }
        while let Some(m) = sub.next().await {
            m.unwrap();
        }
    })
    .await;
    assert!(end.is_ok(), "streams still open after SIGTERM");
    let status = svc.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", svc.logs());
    assert!(started.elapsed() < Duration::from_secs(10));
}
