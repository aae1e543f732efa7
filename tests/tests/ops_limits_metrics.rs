//! Operations: message-size limit (RESOURCE_EXHAUSTED), gzip/zstd accepted, the Prometheus
//! endpoint's content after traffic, /livez and /readyz (also while NOT_SERVING).

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use omnibus_tests::db::{DbSvc, TableLock, action, to_struct};
use omnibus_tests::ops::{http_get, parse_prometheus, sample, wait_http_status};
use omnibus_tests::proxy::Proxy;
use omnibus_tests::{ServiceSpec, free_port};
use serde_json::json;
use tonic::Code;
use tonic::codec::CompressionEncoding;
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICE: &str = "omnibus.db.v1.DatabaseService";

fn insert_with_details(agent: &str, details_len: usize) -> pb::InsertRequest {
    let mut row = action(agent);
    row["action_details"] = json!({ "blob": "x".repeat(details_len) });
    pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![to_struct(row)],
        ..Default::default()
    }
}

#[tokio::test]
async fn limits_compression_and_metrics_on_db_svc() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let svc = DbSvc::start(&[
        "--max-recv-message-size",
        "64KiB",
        "--metrics-listen",
        &metrics_addr,
    ])
    .await;
    let mut client = svc.client.clone();

    // Over the limit: RESOURCE_EXHAUSTED, nothing written; under it: fine.
    let err = client
        .insert(insert_with_details("ops-big", 100 * 1024))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("exceeds"), "{err:?}");
    client
        .insert(insert_with_details("ops-small", 1024))
        .await
        .expect("a message under the limit");

    // Compressed requests and responses, both algorithms.
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Zstd] {
        let mut compressed = DatabaseServiceClient::new(svc.svc.channel())
            .send_compressed(encoding)
            .accept_compressed(encoding);
        compressed
            .insert(insert_with_details("ops-compressed", 1024))
            .await
            .unwrap_or_else(|e| panic!("{encoding:?} insert: {e:?}"));
        let rows = compressed
            .query(pb::QueryRequest {
                table: "agent_actions".into(),
                r#where: Some(to_struct(json!({ "agent_name": "ops-compressed" }))),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{encoding:?} query: {e:?}"))
            .into_inner()
            .rows;
        assert!(!rows.is_empty());
    }
    // A compressed message that inflates past the limit is refused too.
    let err = DatabaseServiceClient::new(svc.svc.channel())
        .send_compressed(CompressionEncoding::Gzip)
        .insert(insert_with_details("ops-bomb", 200 * 1024))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    // Some reads, one of them failing.
    for _ in 0..5 {
        client
            .count(pb::CountRequest {
                table: "agent_actions".into(),
                ..Default::default()
            })
            .await
            .expect("count");
    }
    let err = client
        .query(pb::QueryRequest {
            table: "no_such_table".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The metrics endpoint tells all of it.
    let reply = http_get(&metrics_addr, "/metrics").await.unwrap();
    assert_eq!(reply.status, 200);
    let samples = parse_prometheus(&reply.body);
    let handled = |method: &str, code: &str| {
        sample(
            &samples,
            "grpc_server_handled_total",
            &[
                ("grpc_service", SERVICE),
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(
        handled("Insert", "ResourceExhausted"),
        Some(2.0),
        "{}",
        reply.body
    );
    assert_eq!(handled("Insert", "OK"), Some(3.0), "{}", reply.body);
    assert_eq!(handled("Count", "OK"), Some(5.0), "{}", reply.body);
    assert_eq!(
        handled("Query", "InvalidArgument"),
        Some(1.0),
        "{}",
        reply.body
    );
    assert!(
        sample(
            &samples,
            "grpc_server_started_total",
            &[("grpc_service", SERVICE), ("grpc_method", "Count")],
        ) >= Some(5.0),
        "{}",
        reply.body
    );
    // A histogram (buckets, sum, count), by service, method and code.
    let labels = [
        ("grpc_service", SERVICE),
        ("grpc_method", "Count"),
        ("grpc_code", "OK"),
    ];
    assert_eq!(
        sample(&samples, "grpc_server_handling_seconds_count", &labels),
        Some(5.0),
        "{}",
        reply.body
    );
    let mut with_le = labels.to_vec();
    with_le.push(("le", "+Inf"));
    assert_eq!(
        sample(&samples, "grpc_server_handling_seconds_bucket", &with_le),
        Some(5.0),
        "{}",
        reply.body
    );
    assert!(
        reply
            .body
            .contains("# TYPE grpc_server_handling_seconds histogram")
    );
    // Health checks are measured too.
    assert!(
        reply.body.contains("grpc_method=\"Check\""),
        "{}",
        reply.body
    );

    assert_eq!(http_get(&metrics_addr, "/livez").await.unwrap().status, 200);
    let ready = http_get(&metrics_addr, "/readyz").await.unwrap();
    assert_eq!((ready.status, ready.body.trim()), (200, "SERVING"));
    assert_eq!(http_get(&metrics_addr, "/nope").await.unwrap().status, 404);
}

/// Through the shutdown's delay and drain the endpoint still answers: `/livez` 200 (the
/// process runs; a liveness probe must not fail it mid-drain), `/readyz` 503, `/metrics`
/// (a last scrape). A call held by a table lock keeps the drain going until the lock goes.
#[tokio::test]
async fn the_endpoint_answers_through_the_shutdown_delay() {
    const DELAY: Duration = Duration::from_secs(10);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(["--bus", "false", "--metrics-listen", &metrics_addr])
        .args(["--shutdown-delay", "10s", "--shutdown-grace", "120s"])
        // Only the lock's release ends the held call.
        .args(["--request-timeout", "120s", "--statement-timeout", "120s"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    wait_http_status(&metrics_addr, "/readyz", 200, Duration::from_secs(30))
        .await
        .unwrap();
    let s = DbSvc {
        client: DatabaseServiceClient::new(svc.channel()),
        db,
        svc,
    };
    let (lock, held) = TableLock::held_count(&s).await;
    let DbSvc {
        db: _db, mut svc, ..
    } = s;
    // The gRPC listener takes connections during the delay and closes at the drain.
    let listening = || tokio::net::TcpStream::connect(svc.addr);

    // The delay: NOT_SERVING, the endpoint answers.
    let started = Instant::now();
    svc.terminate().unwrap();
    let ready = wait_http_status(&metrics_addr, "/readyz", 503, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", svc.logs()));
    assert_eq!(ready.body.trim(), "NOT_SERVING");
    assert_eq!(http_get(&metrics_addr, "/livez").await.unwrap().status, 200);
    assert_eq!(
        http_get(&metrics_addr, "/metrics").await.unwrap().status,
        200
    );
    assert!(
        listening().await.is_ok(),
        "the checks above ran within the delay ({:?} after the signal)",
        started.elapsed()
    );

    // The drain: the listener is closed, the held call keeps the process running.
    let deadline = Instant::now() + Duration::from_secs(60);
    while listening().await.is_ok() {
        assert!(Instant::now() < deadline, "the drain never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(started.elapsed() >= DELAY, "{:?}", started.elapsed());
    assert_eq!(http_get(&metrics_addr, "/livez").await.unwrap().status, 200);
    let ready = http_get(&metrics_addr, "/readyz").await.unwrap();
    assert_eq!((ready.status, ready.body.trim()), (503, "NOT_SERVING"));
    let scrape = http_get(&metrics_addr, "/metrics").await.unwrap();
    assert_eq!(scrape.status, 200);
    assert!(
        scrape.body.contains("grpc_server_started_total"),
        "{}",
        scrape.body
    );
    assert!(!held.is_finished(), "the held call is still draining");
    assert!(svc.is_running(), "{}", svc.logs());

    // The lock goes: the held call completes, the process exits 0.
    drop(lock);
    let counted = held.await.unwrap().expect("the drain lets the call finish");
    assert_eq!(counted.into_inner().count, 0);
    let status = svc.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.code(), Some(0), "log:\n{}", svc.logs());
}

/// PostgreSQL going away while db-svc runs turns it NOT_SERVING (gRPC health, `/readyz`
/// 503), calls UNAVAILABLE, without a crash; when PostgreSQL is back it turns SERVING again
/// by itself and calls work (README "Health"). The database is cut with a proxy between the
/// two, so the machine's PostgreSQL stays up for the other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_going_away_and_coming_back() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    let pg: std::net::SocketAddr = omnibus_tests::postgres_addr()
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap();
    let proxy = Proxy::start(pg).await.unwrap();
    let mut via_proxy = url::Url::parse(&db.url).unwrap();
    via_proxy.set_port(Some(proxy.addr.port())).unwrap();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", via_proxy.as_str())
        .args(["--bus", "false", "--metrics-listen", &metrics_addr])
        .args(["--db-acquire-timeout", "1s", "--shutdown-grace", "1s"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    let ready = wait_http_status(&metrics_addr, "/readyz", 200, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(ready.body.trim(), "SERVING");
    let mut client = DatabaseServiceClient::new(svc.channel());
    let count = pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    };
    assert_eq!(
        client
            .count(count.clone())
            .await
            .unwrap()
            .into_inner()
            .count,
        0
    );

    proxy.down();
    svc.wait_health("", ServingStatus::NotServing, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        svc.health(SERVICE).await.unwrap(),
        ServingStatus::NotServing
    );
    let ready = wait_http_status(&metrics_addr, "/readyz", 503, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", svc.logs()));
    assert_eq!(ready.body.trim(), "NOT_SERVING");
    assert_eq!(http_get(&metrics_addr, "/livez").await.unwrap().status, 200);
    let err = client.count(count.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        svc.logs().contains("PostgreSQL is not reachable"),
        "{}",
        svc.logs()
    );
    assert!(svc.is_running(), "{}", svc.logs());

    proxy.up();
    svc.wait_serving().await.unwrap();
    assert_eq!(svc.health(SERVICE).await.unwrap(), ServingStatus::Serving);
    let ready = wait_http_status(&metrics_addr, "/readyz", 200, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", svc.logs()));
    assert_eq!(ready.body.trim(), "SERVING");
    assert_eq!(client.count(count).await.unwrap().into_inner().count, 0);
}

#[tokio::test]
async fn readyz_is_503_while_the_database_is_unreachable() {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    // Nothing listens on this port: db-svc starts NOT_SERVING and stays so.
    let url = format!("postgres://postgres@127.0.0.1:{}/omnibus", free_port());
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", url)
        .args(["--metrics-listen", &metrics_addr])
        .spawn()
        .unwrap();
    wait_http_status(&metrics_addr, "/livez", 200, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", svc.logs()));
    let ready = http_get(&metrics_addr, "/readyz").await.unwrap();
    assert_eq!((ready.status, ready.body.trim()), (503, "NOT_SERVING"));
    // The gRPC view of the same: overall NOT_SERVING, `liveness` SERVING (for liveness probes).
    assert_eq!(svc.health("").await.unwrap(), ServingStatus::NotServing);
    assert_eq!(
        svc.health("liveness").await.unwrap(),
        ServingStatus::Serving
    );
    assert!(svc.is_running());
}

/// A connection that is opened and left silent (no HTTP/2 preface) is closed by the server
/// within its opening time (10 s) instead of holding a descriptor for ever; a client that
/// speaks is unaffected.
#[tokio::test]
async fn a_silent_connection_is_closed_without_a_preface() {
    use tokio::io::AsyncReadExt;
    let svc = DbSvc::start(&[]).await;
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(svc.svc.addr).await.unwrap();
    let mut buf = [0u8; 1024];
    // The server may write its SETTINGS first; read until it closes.
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after 30 s");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "closed after {:?}, before the opening time",
        started.elapsed()
    );
    let mut client = svc.client.clone();
    client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            ..Default::default()
        })
        .await
        .expect("a client that speaks");
}
