//! consumer-svc and a broker that stops and comes back empty (tansu `memory://`): status shows
//! disconnected, then recovers by itself; aggregates are kept; topics are recreated; every
//! event produced after the restart is counted. Uses a private broker, never the shared one.

use std::time::Duration;

use chrono::Utc;
use omnibus_client::generate::{EventGenerator, Kind};
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::service_names::CONSUMER;
use omnibus_tests::consumer::{
    PrivateBroker, TestProducer, client, create_topics, spawn_consumer, start_consumer,
    unique_prefix, wait_status,
};
use tonic_health::pb::health_check_response::ServingStatus;

const WAIT: Duration = Duration::from_secs(60);

fn produce(
    p: &TestProducer,
    topics: &omnibus_client::generate::Topics,
    g: &mut EventGenerator,
    n: usize,
) -> (u64, u64) {
    let (mut total, mut decisions) = (0, 0);
    for _ in 0..n {
        let e = g.next_event(Utc::now());
        if e.kind == Kind::RoutingDecision {
            decisions += 1;
        }
        p.send(topics.name(e.kind), &e.key, &e.payload).unwrap();
        total += 1;
    }
    p.flush().unwrap();
    (total, decisions)
}

/// Waits until the service sees the broker again and reports SERVING.
async fn wait_reconnected(svc: &mut omnibus_tests::ServiceProcess) {
    wait_status(svc, WAIT, "reconnected", |s| s.connected)
        .await
        .unwrap();
    svc.wait_health(CONSUMER, ServingStatus::Serving, WAIT)
        .await
        .unwrap();
}

/// Waits until the service saw the broker gone and, once librdkafka reported every broker
/// down, replaced its Kafka client.
async fn wait_client_replaced(svc: &omnibus_tests::ServiceProcess) {
    wait_status(svc, WAIT, "disconnected", |s| !s.connected)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !svc.logs().contains("replaced the Kafka client") {
        assert!(std::time::Instant::now() < deadline, "{}", svc.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn total_requests(svc: &omnibus_tests::ServiceProcess) -> u64 {
    client(svc)
        .get_agent_metrics(pb::GetAgentMetricsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .iter()
        .map(|a| a.total_requests)
        .sum()
}

#[tokio::test]
async fn broker_restarting_empty_is_survived_and_every_new_event_counted() {
    let mut broker = PrivateBroker::start().await.unwrap();
    let prefix = unique_prefix();
    let topics = create_topics(&broker.addr(), &prefix, 2).await.unwrap();
    let mut svc = start_consumer(&broker.addr(), &prefix, &[]).await.unwrap();
    let mut g = EventGenerator::new(6, 5);

    let (before, decisions_before) = {
        let p = TestProducer::new(&broker.addr()).unwrap();
        produce(&p, &topics, &mut g, 600)
    };
    wait_status(&svc, WAIT, "first events", |s| s.events_processed == before)
        .await
        .unwrap();
    assert_eq!(total_requests(&svc).await, decisions_before);

    // Broker down: disconnected and NOT_SERVING, but running and still answering reads.
    broker.stop();
    wait_status(&svc, WAIT, "disconnected", |s| !s.connected)
        .await
        .unwrap();
    svc.wait_health(CONSUMER, ServingStatus::NotServing, WAIT)
        .await
        .unwrap();
    assert!(svc.is_running());
    assert_eq!(
        total_requests(&svc).await,
        decisions_before,
        "aggregates kept"
    );

    // Back, empty: topics must be recreated; fewer events than before, so offsets went back.
    broker.restart().await.unwrap();
    wait_reconnected(&mut svc).await;
    let topics = create_topics(&broker.addr(), &prefix, 2).await.unwrap();
    let (after, decisions_after) = {
        let p = TestProducer::new(&broker.addr()).unwrap();
        produce(&p, &topics, &mut g, 150)
    };
    let s = wait_status(&svc, WAIT, "events after the restart", |s| {
        s.events_processed == before + after
    })
    .await
    .unwrap();
    assert_eq!(
        total_requests(&svc).await,
        decisions_before + decisions_after
    );
    // Nothing counted twice later either: the positions settle and the count holds.
    wait_status(&svc, WAIT, "positions settled", |s| {
        s.partitions.len() == 8 && s.partitions.iter().all(|p| p.lag == 0)
    })
    .await
    .unwrap();
    omnibus_tests::consumer::assert_stays(&svc, Duration::from_secs(5), "counted once", |x| {
        x.events_processed == s.events_processed
    })
    .await
    .unwrap();
}

/// A broker that comes back empty and whose recreated logs have grown past the old positions
/// before consumer-svc looks again (here it is frozen meanwhile): the logs hold other
/// messages at those offsets, so they are read from the start - none of their first events
/// is skipped, and none counted twice.
#[tokio::test]
async fn a_recreated_log_longer_than_the_old_one_is_read_from_its_start() {
    let mut broker = PrivateBroker::start().await.unwrap();
    let prefix = unique_prefix();
    let topics = create_topics(&broker.addr(), &prefix, 1).await.unwrap();
    let svc = start_consumer(&broker.addr(), &prefix, &[]).await.unwrap();
    let mut g = EventGenerator::new(6, 11);
    let (before, decisions_before) = {
        let p = TestProducer::new(&broker.addr()).unwrap();
        produce(&p, &topics, &mut g, 200)
    };
    wait_status(&svc, WAIT, "first events", |s| s.events_processed == before)
        .await
        .unwrap();

    broker.stop();
    // Once the client was replaced, freeze the service while the broker comes back empty and
    // its logs are written again, longer than before.
    wait_client_replaced(&svc).await;
    svc.pause().unwrap();
    broker.restart().await.unwrap();
    let topics = create_topics(&broker.addr(), &prefix, 1).await.unwrap();
    let (after, decisions_after) = {
        let p = TestProducer::new(&broker.addr()).unwrap();
        produce(&p, &topics, &mut g, 400)
    };
    svc.resume().unwrap();
    let s = wait_status(&svc, WAIT, "every event after the restart", |s| {
        s.events_processed == before + after
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", svc.logs()));
    assert_eq!(
        total_requests(&svc).await,
        decisions_before + decisions_after
    );
    wait_status(&svc, WAIT, "positions settled", |s| {
        s.partitions.len() == 4 && s.partitions.iter().all(|p| p.lag == 0)
    })
    .await
    .unwrap();
    omnibus_tests::consumer::assert_stays(&svc, Duration::from_secs(5), "counted once", |x| {
        x.events_processed == s.events_processed
    })
    .await
    .unwrap();
}

/// A broker that is unreachable for a while but keeps its logs (a network cut, here a proxy
/// that drops every connection): consumer-svc replaces its Kafka client and, when the broker
/// answers again, goes on from its positions - nothing is read twice, though tansu's
/// ListOffsets "latest" answer lags a log whose last batch holds several records.
// The proxy runs on the test's runtime while a producer's flush blocks a thread of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_to_a_broker_that_kept_its_logs_reads_nothing_twice() {
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let via = front.local_addr().unwrap().to_string();
    let broker = PrivateBroker::start_advertising(Some(via.clone()))
        .await
        .unwrap();
    let proxy =
        omnibus_tests::proxy::Proxy::start_on(front, broker.addr().parse().unwrap()).unwrap();
    let prefix = unique_prefix();
    let topics = create_topics(&via, &prefix, 1).await.unwrap();
    let mut svc = start_consumer(&via, &prefix, &[]).await.unwrap();
    let mut g = EventGenerator::new(4, 9);
    // One flush: the records go in few, large batches.
    let (before, _) = {
        let p = TestProducer::new(&via).unwrap();
        produce(&p, &topics, &mut g, 400)
    };
    wait_status(&svc, WAIT, "first events", |s| s.events_processed == before)
        .await
        .unwrap();

    proxy.down();
    wait_client_replaced(&svc).await;
    proxy.up();
    wait_reconnected(&mut svc).await;
    let (after, _) = {
        let p = TestProducer::new(&via).unwrap();
        produce(&p, &topics, &mut g, 50)
    };
    wait_status(&svc, WAIT, "the new events", |s| {
        s.events_processed >= before + after
    })
    .await
    .unwrap();
    omnibus_tests::consumer::assert_stays(&svc, Duration::from_secs(5), "read once", |s| {
        s.events_processed == before + after
    })
    .await
    .unwrap();
    assert!(
        !svc.logs().contains("re-read"),
        "a partition was re-read:\n{}",
        svc.logs()
    );
}

/// A replica started while the broker is down waits for it: `--replay-timeout` counts from
/// the broker's first answer, so the replica neither ends its replay with nothing read nor
/// reports SERVING before it has rebuilt its view.
#[tokio::test]
async fn the_replay_timeout_counts_from_the_brokers_first_answer() {
    let mut broker = PrivateBroker::start().await.unwrap();
    broker.stop();
    let prefix = unique_prefix();
    let mut svc = spawn_consumer(&broker.addr(), &prefix, &["--replay-timeout", "1s"]).unwrap();
    let down = wait_status(&svc, WAIT, "a status", |s| !s.connected)
        .await
        .unwrap();
    assert_eq!(down.replaying, Some(true));
    // Well past the timeout, the broker still down: the replay has not begun, so not ended.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = wait_status(&svc, WAIT, "a status", |_| true).await.unwrap();
    assert_eq!(
        later.replaying,
        Some(true),
        "the replay was given up before the broker ever answered:\n{}",
        svc.logs()
    );
    svc.wait_health(CONSUMER, ServingStatus::NotServing, WAIT)
        .await
        .unwrap();
    broker.restart().await.unwrap();
    wait_status(&svc, WAIT, "replayed", |s| {
        s.connected && s.replaying == Some(false)
    })
    .await
    .unwrap();
    svc.wait_health(CONSUMER, ServingStatus::Serving, WAIT)
        .await
        .unwrap();
    assert!(
        !svc.logs().contains("not over within --replay-timeout"),
        "{}",
        svc.logs()
    );
}
