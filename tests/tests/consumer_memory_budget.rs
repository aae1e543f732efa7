//! consumer-svc's byte budgets against the real broker: with large events (200 actions of
//! ~400 KB, 80 MB in all) and small budgets, the recent buffer lists only the newest actions
//! that fit `--max-buffer-bytes` (newest first), a resume from the run's start is told what the
//! resume buffer let go (`--resume-buffer-bytes`), a stalled stream subscriber gets a lag notice
//! once it is `--subscriber-queue-bytes` behind (long before `--subscriber-queue` batches), and
//! the process's resident memory stays far below what was produced.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use omnibus_client::generate::{Kind, isoformat};
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::subscribe_response::Update;
use omnibus_tests::consumer::{TestProducer, client, create_topics, unique_prefix, wait_status};
use omnibus_tests::{ServiceProcess, ServiceSpec, kafka_brokers};
use serde_json::json;
use tokio_stream::StreamExt;

const WAIT: Duration = Duration::from_secs(120);
const ACTIONS: usize = 200;
const DETAILS_BYTES: usize = 400_000;
const BUFFER_BYTES: usize = 4 << 20;

/// `i` seconds after five minutes ago: distinct, ordered event times inside the window.
fn at(i: usize) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::seconds(300) + chrono::Duration::seconds(i as i64)
}

/// The resident memory of `svc`'s process, in bytes (`VmRSS` in `/proc/<pid>/status`).
fn rss_of(svc: &ServiceProcess) -> u64 {
    let path = format!("/proc/{}/status", svc.pid());
    let status = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{} ({path}): {e}; log:\n{}", svc.name, svc.logs()));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {path}:\n{status}"));
    kb * 1024
}

/// The lowest RSS seen over `period` (the allocators return freed memory over a few seconds).
async fn settled_rss(svc: &ServiceProcess, period: Duration) -> u64 {
    let end = Instant::now() + period;
    let mut low = rss_of(svc);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(250)).await;
        low = low.min(rss_of(svc));
    }
    low
}

/// Sends `n` actions of agent `agent-big`, each with `bytes` of `action_details`, at
/// distinct event times in order, flushed as it goes (the broker and the consumer see a steady
/// stream); returns their ids, oldest first.
fn send_big_actions(
    p: &TestProducer,
    topics: &omnibus_client::generate::Topics,
    n: usize,
    bytes: usize,
) -> Vec<String> {
    let details = "x".repeat(bytes);
    let ids: Vec<String> = (0..n).map(|i| format!("big-{i:03}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let v = json!({
            "id": id,
            "agent_name": "agent-big",
            "action_type": "tool_call",
            "action_details": {"blob": details},
            "timestamp": isoformat(at(i)),
        });
        let payload = serde_json::to_vec(&v).unwrap();
        p.send(topics.name(Kind::AgentAction), "k", &payload)
            .unwrap();
        if i % 20 == 19 {
            p.flush().unwrap();
        }
    }
    p.flush().unwrap();
    ids
}

#[tokio::test]
async fn large_events_stay_within_the_byte_budgets() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let buffer_bytes = BUFFER_BYTES.to_string();
    let mut svc = ServiceSpec::new("consumer-svc")
        .args(["--kafka-brokers", &brokers, "--topic-prefix", &prefix])
        .args([
            "--agent-metrics-interval",
            "100ms",
            "--shutdown-grace",
            "5s",
        ])
        .args(["--max-buffer-bytes", &buffer_bytes])
        .args(["--resume-buffer-bytes", &buffer_bytes])
        .args(["--subscriber-queue-bytes", "2MiB"])
        // Freed memory goes back to the system at once (jemalloc, which consumer-svc uses, and
        // glibc malloc, which librdkafka uses), so the RSS shows what is held, not what the
        // allocators keep for later.
        .env("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")
        .env("MALLOC_MMAP_THRESHOLD_", "131072")
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    let baseline = settled_rss(&svc, Duration::from_secs(1)).await;

    // Stalled: subscribed, never read, behind a small HTTP/2 window, so the server-side queue
    // fills after a push or two.
    let small_window = tonic::transport::Endpoint::from_shared(svc.endpoint())
        .unwrap()
        .initial_stream_window_size(Some(16 * 1024))
        .initial_connection_window_size(Some(16 * 1024))
        .connect_lazy();
    let mut stalled = pb::consumer_service_client::ConsumerServiceClient::new(small_window)
        .max_decoding_message_size(64 << 20)
        .stream_actions(pb::StreamActionsRequest::default())
        .await
        .unwrap()
        .into_inner();

    let p = TestProducer::new(&brokers).unwrap();
    let ids = send_big_actions(&p, &topics, ACTIONS, DETAILS_BYTES);
    wait_status(&svc, WAIT, "all actions", |s| {
        s.events_processed == ACTIONS as u64
    })
    .await
    .unwrap();

    // The recent buffer: the newest that fit the budget, newest first. An action counts twice
    // its text (its stream encoding) plus ~300 bytes: ~800 KB, so 5 fit 4 MiB.
    let listed: Vec<String> = client(&svc)
        .max_decoding_message_size(64 << 20)
        .list_recent_actions(pb::ListRecentActionsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .actions
        .into_iter()
        .map(|a| a.id)
        .collect();
    let per_action = 2 * (DETAILS_BYTES + 40);
    let fit = BUFFER_BYTES / per_action;
    assert_eq!(fit, 5);
    let newest: Vec<String> = ids.iter().rev().take(fit).cloned().collect();
    assert_eq!(listed, newest, "the newest actions that fit, newest first");

    // Resuming from the run's start: what the resume buffer let go is reported, then the
    // newest updates it kept (the same ~800 KB each: at most 5 actions).
    let mut resumed = client(&svc)
        .max_decoding_message_size(64 << 20)
        .subscribe(pb::SubscribeRequest {
            channels: vec![pb::Channel::Actions as i32],
            resume_after_sequence: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(WAIT, resumed.next())
        .await
        .expect("a first message")
        .unwrap()
        .unwrap();
    let Some(Update::Lagged(gap)) = first.update else {
        panic!("expected the gap first, got {first:?}");
    };
    let mut replayed = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), resumed.next()).await {
        if let Some(Update::Action(a)) = m.unwrap().update {
            replayed.push(a.id);
        }
    }
    assert!(
        (1..=fit).contains(&replayed.len()),
        "{} replayed",
        replayed.len()
    );
    assert!(
        gap.missed as usize >= ACTIONS - fit,
        "{} missed",
        gap.missed
    );
    assert_eq!(replayed.last(), ids.last(), "up to the newest");
    drop(resumed);

    // The process holds the budgets' worth, not the 80 MB produced (before this change the
    // buffer and the resume ring each held every action: ~80 MB of text, plus the encodings
    // made for the stream).
    let produced = (ACTIONS * DETAILS_BYTES) as u64;
    let (before, after) = (baseline, settled_rss(&svc, Duration::from_secs(5)).await);
    let grown = after.saturating_sub(before);
    eprintln!(
        "consumer-svc RSS: {} MiB at start, {} MiB after {} MiB produced",
        before >> 20,
        after >> 20,
        produced >> 20
    );
    assert!(
        grown < produced / 2,
        "RSS grew by {} MiB for {} MiB produced",
        grown >> 20,
        produced >> 20
    );

    // The stalled subscriber, reading at last, is told it lagged: its queue held 2 MiB, not
    // the 1024 batches (here every update) of --subscriber-queue.
    let mut got = Vec::new();
    let mut lagged = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), stalled.next()).await {
        let m = m.unwrap();
        lagged += m.lagged;
        got.extend(m.actions.into_iter().map(|a| a.id));
        if got.last() == ids.last() {
            break;
        }
    }
    assert!(lagged > 0, "a lag notice; got {} actions", got.len());
    assert!(
        got.len() + lagged as usize >= ACTIONS,
        "{} + {lagged} missed",
        got.len()
    );
    assert_eq!(got.last(), ids.last(), "it goes on to the newest");
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, without repeats"
    );
}

/// The buffers may together hold more than one response carries (`--max-send-message-size`):
/// a snapshot then keeps each list's newest events, says it was truncated, and still
/// arrives, for `GetSnapshot` and for `Subscribe` (whose filtered snapshot is whole when what
/// it asked for fits). Sent whole, it would fail with OUT_OF_RANGE while those events stay.
#[tokio::test]
async fn snapshots_larger_than_a_response_keep_the_newest_events() {
    const BIG: usize = 30;
    const MAX_RESPONSE: usize = 1 << 20;
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let mut svc = ServiceSpec::new("consumer-svc")
        .args(["--kafka-brokers", &brokers, "--topic-prefix", &prefix])
        .args(["--max-send-message-size", "1MiB", "--shutdown-grace", "5s"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();

    let p = TestProducer::new(&brokers).unwrap();
    let ids = send_big_actions(&p, &topics, BIG, 100_000);
    for i in 0..5 {
        let v = json!({"id": format!("d{i}"), "selected_agent": "agent-small",
                       "timestamp": isoformat(at(i))});
        let payload = serde_json::to_vec(&v).unwrap();
        p.send(topics.name(Kind::RoutingDecision), "k", &payload)
            .unwrap();
    }
    p.flush().unwrap();
    wait_status(&svc, WAIT, "all events", |s| {
        s.events_processed == BIG as u64 + 5
    })
    .await
    .unwrap();

    let newest_first = |actions: &[pb::AgentAction]| {
        let got: Vec<&str> = actions.iter().map(|a| a.id.as_str()).collect();
        let want: Vec<&str> = ids
            .iter()
            .rev()
            .take(got.len())
            .map(String::as_str)
            .collect();
        assert_eq!(got, want, "the newest actions, newest first, without gaps");
        got.len()
    };
    let snapshot = client(&svc)
        .get_snapshot(pb::GetSnapshotRequest {})
        .await
        .expect("a snapshot, not OUT_OF_RANGE")
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snapshot.truncated);
    let kept = newest_first(&snapshot.actions);
    assert!(
        (5..BIG).contains(&kept),
        "{kept} actions of ~100 KB in 1 MiB"
    );
    assert_eq!(
        snapshot.routing_decisions.len(),
        5,
        "the small list is whole"
    );
    assert!(prost::Message::encoded_len(&snapshot) <= MAX_RESPONSE);

    let first = |request: pb::SubscribeRequest| {
        let svc = &svc;
        async move {
            let mut stream = client(svc).subscribe(request).await.unwrap().into_inner();
            let message = tokio::time::timeout(WAIT, stream.next())
                .await
                .expect("a first message")
                .expect("a message")
                .expect("a snapshot, not OUT_OF_RANGE");
            match message.update {
                Some(Update::Snapshot(s)) => s,
                other => panic!("expected the snapshot first, got {other:?}"),
            }
        }
    };
    let big = first(pb::SubscribeRequest {
        include_snapshot: true,
        agent: Some("agent-big".into()),
        ..Default::default()
    })
    .await;
    assert!(big.truncated);
    assert!(newest_first(&big.actions) >= 5);
    assert!(big.routing_decisions.is_empty(), "another agent's");
    let small = first(pb::SubscribeRequest {
        include_snapshot: true,
        agent: Some("agent-small".into()),
        ..Default::default()
    })
    .await;
    assert!(!small.truncated, "what it asked for fits");
    assert!(small.actions.is_empty());
    assert_eq!(small.routing_decisions.len(), 5);
}
