//! Service-specific metrics on the Prometheus endpoint: consumer-svc (events consumed and parse
//! errors per topic, partition lag, stream subscribers) and db-svc (operation latency by
//! outcome, pool usage, bus requests by outcome).

use std::time::Duration;

use chrono::Utc;
use omnibus_client::generate::{EventGenerator, Kind};
use omnibus_proto::consumer::v1 as cpb;
use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use omnibus_tests::bus::{BusTopics, Tap, omniclaude_envelope, produce, start_db_svc};
use omnibus_tests::consumer::{
    TestProducer, client, create_topics, start_consumer, unique_prefix, wait_status,
};
use omnibus_tests::db::{DbSvc, action, to_struct};
use omnibus_tests::ops::{http_get, parse_prometheus, sample, wait_metrics};
use omnibus_tests::{TestDatabase, free_port, kafka_brokers};
use serde_json::json;

#[tokio::test]
async fn consumer_svc_exports_ingest_and_stream_metrics() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 2).await.unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let svc = start_consumer(&brokers, &prefix, &["--metrics-listen", &metrics])
        .await
        .unwrap();

    let producer = TestProducer::new(&brokers).unwrap();
    let mut generator = EventGenerator::new(2, 11);
    let actions = topics.name(Kind::AgentAction).to_string();
    for _ in 0..5 {
        let e = generator.next_of(Kind::AgentAction, Utc::now());
        producer.send(&actions, &e.key, &e.payload).unwrap();
    }
    producer.send(&actions, "bad", b"{not json").unwrap();
    producer.flush().unwrap();
    wait_status(&svc, Duration::from_secs(30), "6 actions read", |s| {
        s.topics
            .iter()
            .any(|t| t.topic == actions && t.events_consumed + t.parse_errors >= 6)
    })
    .await
    .unwrap();

    // One open stream.
    let stream = client(&svc)
        .subscribe(cpb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();

    let lag_prefix = "consumer_partition_lag{partition=";
    let body = wait_metrics(&metrics, "ingest counters, lag and one subscriber", |m| {
        // Lag per partition of the actions topic: known and caught up.
        let lags: Vec<f64> = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with(lag_prefix) && k.contains(&format!("topic=\"{actions}\""))
            })
            .map(|(_, v)| *v)
            .collect();
        sample(m, "consumer_events_consumed_total", &[("topic", &actions)]) == Some(5.0)
            && sample(m, "consumer_parse_errors_total", &[("topic", &actions)]) == Some(1.0)
            && sample(m, "consumer_stream_subscribers", &[]) == Some(1.0)
            && !lags.is_empty()
            && lags.iter().all(|l| *l == 0.0)
    })
    .await;
    assert!(body.contains("consumer_partition_offset"), "{body}");
    drop(stream);
}

#[tokio::test]
async fn db_svc_exports_operation_pool_and_bus_metrics() {
    let db = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let svc = start_db_svc(
        &db,
        &topics,
        &format!("g-{}", uuid::Uuid::new_v4().simple()),
        &["--metrics-listen", &metrics],
    )
    .await
    .unwrap();

    let mut client = DatabaseServiceClient::new(svc.channel());
    client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(action("metrics-agent"))],
            ..Default::default()
        })
        .await
        .unwrap();
    let err = client
        .query(pb::QueryRequest {
            table: "no_such_table".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // One bus request that completes, one that fails.
    let mut tap = Tap::new(&[&topics.topics.completed, &topics.topics.failed]).unwrap();
    for (cid, sql) in [
        (
            uuid::Uuid::new_v4().to_string(),
            "SELECT count(*) AS n FROM agent_actions",
        ),
        (
            uuid::Uuid::new_v4().to_string(),
            "SELECT nope FROM agent_actions",
        ),
    ] {
        let envelope = omniclaude_envelope(&cid, "QUERY", Some("agent_actions"), sql, json!([]));
        produce(
            &topics.topics.request,
            Some(&cid),
            envelope.to_string().as_bytes(),
            "none",
        )
        .await
        .unwrap();
        tap.reply_for(&cid, Duration::from_secs(30)).unwrap();
    }

    let body = wait_metrics(&metrics, "operations, pool and bus outcomes", |m| {
        sample(
            m,
            "db_operation_seconds_count",
            &[("operation", "insert"), ("outcome", "ok")],
        ) == Some(1.0)
            && sample(
                m,
                "db_operation_seconds_count",
                &[("operation", "query"), ("outcome", "VALIDATION_ERROR")],
            ) == Some(1.0)
            && sample(m, "db_bus_requests_total", &[("outcome", "completed")]) == Some(1.0)
            && sample(m, "db_bus_requests_total", &[("outcome", "failed")]) == Some(1.0)
            && sample(m, "db_pool_max_connections", &[]).is_some_and(|v| v > 0.0)
    })
    .await;
    let samples = parse_prometheus(&body);
    let idle = sample(&samples, "db_pool_connections", &[("state", "idle")]).unwrap();
    let busy = sample(&samples, "db_pool_connections", &[("state", "in_use")]).unwrap();
    assert!(idle + busy >= 1.0, "{body}");
    assert!(
        body.contains("db_bus_request_seconds_bucket"),
        "round-trip histogram: {body}"
    );
}

/// Requests naming a column that does not exist re-read the catalog (the column may have just
/// been added), but a burst of them shares the reads instead of making one each.
#[tokio::test]
async fn a_burst_of_unknown_columns_shares_catalog_reads() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let s = DbSvc::start(&["--metrics-listen", &metrics]).await;
    let client = s.client.clone();
    let reads = |m: &std::collections::BTreeMap<String, f64>| {
        sample(m, "db_catalog_reads_total", &[]).unwrap_or(0.0)
    };
    let before = reads(&parse_prometheus(
        &http_get(&metrics, "/metrics").await.unwrap().body,
    ));
    const BURST: usize = 50;
    let calls = (0..BURST).map(|_| {
        let mut client = client.clone();
        async move {
            client
                .query(pb::QueryRequest {
                    table: "agent_actions".into(),
                    columns: vec!["no_such_column".into()],
                    ..Default::default()
                })
                .await
                .unwrap_err()
        }
    });
    for err in futures::future::join_all(calls).await {
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    let body = wait_metrics(&metrics, "catalog reads", |m| reads(m) > before).await;
    let burst_reads = reads(&parse_prometheus(&body)) - before;
    assert!(
        burst_reads <= (BURST / 5) as f64,
        "{burst_reads} catalog reads for {BURST} concurrent misses"
    );
}
