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
use omnibus_tests::db::{DbSvc, TableLock, action, to_struct};
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
/// been added), but a burst of them shares the reads instead of making one each. Requests
/// share a read that starts after they arrived: with one read held up inside PostgreSQL (a
/// lock on `pg_attrdef`, which the catalog query reads) while the burst arrives, the whole
/// burst shares the one read after it.
#[tokio::test]
async fn a_burst_of_unknown_columns_shares_catalog_reads() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let s = DbSvc::start(&["--metrics-listen", &metrics]).await;
    let scrape = async || parse_prometheus(&http_get(&metrics, "/metrics").await.unwrap().body);
    let reads = |m: &std::collections::BTreeMap<String, f64>| {
        sample(m, "db_catalog_reads_total", &[]).unwrap_or(0.0)
    };
    let queries = |m: &std::collections::BTreeMap<String, f64>| {
        sample(
            m,
            "grpc_server_started_total",
            &[
                ("grpc_service", "omnibus.db.v1.DatabaseService"),
                ("grpc_method", "Query"),
            ],
        )
        .unwrap_or(0.0)
    };
    let unknown_column = |client: &DatabaseServiceClient<tonic::transport::Channel>| {
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
    };
    let before = scrape().await;

    // The first miss starts a read, which waits for the lock.
    let lock = TableLock::take_on(&s, "pg_attrdef", "ACCESS EXCLUSIVE").await;
    let first = tokio::spawn(unknown_column(&s.client));
    lock.wait_blocked(&s, 1).await;
    const BURST: usize = 50;
    let burst = tokio::spawn(futures::future::join_all(
        (0..BURST).map(|_| unknown_column(&s.client)),
    ));
    // Every call of the burst has arrived (then each goes straight to the catalog, where it
    // waits for the held read), and none made a read of its own meanwhile.
    let arrived = wait_metrics(&metrics, "the burst's arrival", |m| {
        queries(m) >= queries(&before) + 1.0 + BURST as f64
    })
    .await;
    assert_eq!(
        reads(&parse_prometheus(&arrived)) - reads(&before),
        1.0,
        "{arrived}"
    );
    lock.wait_blocked(&s, 1).await;
    lock.release().await;

    let err = first.await.unwrap();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    for err in burst.await.unwrap() {
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }
    // The held read, then one for the whole burst: a read that started before a call arrived
    // may predate a column it names, so the burst could not share the held one. A call of
    // the burst that reached the catalog only after that second read began (its task not
    // run for that long on a busy machine) makes one more.
    let after = scrape().await;
    let burst_reads = reads(&after) - reads(&before);
    assert!(
        (2.0..=3.0).contains(&burst_reads),
        "{burst_reads} catalog reads for 1 + {BURST} concurrent misses"
    );
}
