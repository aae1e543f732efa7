//! Deadlines and signals on a running server: `--request-timeout` answers DEADLINE_EXCEEDED
//! and becomes db-svc's statement timeout, the wait for a connection's call slot counts
//! against the deadline, and a second SIGTERM ends a draining process at once.

use std::time::{Duration, Instant};

use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use omnibus_tests::db::{DbSvc, TableLock};
use omnibus_tests::{ServiceSpec, TestDatabase};
use tonic::Code;

/// db-svc (no bus) on a fresh database with `args`.
async fn db_svc(args: &[&str]) -> DbSvc {
    let db = TestDatabase::create().await.expect("test database");
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(["--bus", "false"])
        .args(args.iter().copied())
        .spawn()
        .expect("spawn db-svc");
    svc.wait_serving().await.expect("db-svc SERVING");
    let client = DatabaseServiceClient::new(svc.channel());
    DbSvc { db, svc, client }
}

fn count() -> pb::CountRequest {
    pb::CountRequest {
        table: "agent_actions".into(),
        ..Default::default()
    }
}

/// A call without a deadline of its own, held by a lock past `--request-timeout`: db-svc
/// answers DEADLINE_EXCEEDED (tonic's timeout answered CANCELLED, the code of a caller that
/// went away) and PostgreSQL stops working on it (the request timeout is the statement's
/// limit too; before, the statement waited out db-svc's 30 s statement timeout).
#[tokio::test]
async fn the_request_timeout_is_deadline_exceeded_and_ends_the_statement() {
    let s = db_svc(&["--request-timeout", "2s"]).await;
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let mut client = s.client.clone();
    let started = Instant::now();
    let held = tokio::spawn(async move { client.count(count()).await });
    lock.wait_blocked(&s, 1).await;
    let status = held
        .await
        .unwrap()
        .expect_err("held past the request timeout");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(5), lock.wait_blocked(&s, 0))
        .await
        .expect("the statement no longer waits in PostgreSQL");
}

/// `--request-timeout` bounds a stream's start, not its statement: a `StreamQuery` held by a
/// lock past it still completes once the lock goes (the request timeout had become every
/// stream's statement timeout).
#[tokio::test]
async fn a_stream_query_outlives_the_request_timeout() {
    let s = db_svc(&["--request-timeout", "2s"]).await;
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let mut client = s.client.clone();
    let stream = tokio::spawn(async move {
        let mut batches = client
            .stream_query(pb::StreamQueryRequest {
                query: Some(pb::QueryRequest {
                    table: "agent_actions".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut rows = 0;
        while let Some(batch) = batches.message().await? {
            rows += batch.rows.len();
        }
        Ok::<_, tonic::Status>(rows)
    });
    lock.wait_blocked(&s, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(lock);
    let rows = stream.await.unwrap().expect("the stream completes");
    assert_eq!(rows, 0);
}

/// With one call slot per connection, a second call on the same connection waits for it with
/// its deadline already running: behind a call that holds the slot for up to 30 s, a call
/// with a 1 s deadline ends DEADLINE_EXCEEDED while it still waits for the slot, within
/// seconds of its arrival (tonic's limit started the timer only once the call had a slot: it
/// waited the held call's 30 s out first). A call on another connection is served meanwhile
/// (the limit is really per connection).
#[tokio::test]
async fn the_wait_for_a_call_slot_counts_against_the_deadline() {
    const COUNT: &str = "/omnibus.db.v1.DatabaseService/Count";
    let s = db_svc(&[
        "--request-timeout",
        "30s",
        "--concurrency-per-connection",
        "1",
    ])
    .await;
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    // Both calls on one connection of the test's own (see `h2c`).
    let mut connection = h2c::Connection::open(s.svc.addr).await;
    let held = connection.call(COUNT, &[], &count()).await;
    lock.wait_blocked(&s, 1).await;

    let mut other = DatabaseServiceClient::new(s.svc.channel());
    let tables = other
        .list_tables(pb::ListTablesRequest {})
        .await
        .expect("another connection is served");
    assert!(!tables.into_inner().tables.is_empty());

    // Waits for the held call's slot, and its deadline passes there.
    let started = Instant::now();
    let waiting = connection
        .call(COUNT, &[("grpc-timeout", "1S")], &count())
        .await;
    let status = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the waiting call is answered")
        .expect("its task");
    let took = started.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status
            .message()
            .contains("while the call waited for one of its connection's slots"),
        "{status:?}"
    );
    assert!(
        took < Duration::from_secs(15),
        "1 s from its arrival, not after the held call's 30 s: {took:?}"
    );
    assert!(!held.is_finished(), "the held call still has the slot");
    drop(lock);
    let status = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("the held call is answered once the lock goes")
        .expect("its task");
    assert_eq!(status.code(), tonic::Code::Ok, "{status:?}");
}

/// SIGTERM starts a drain that a call still running holds for the grace period (120 s here);
/// a second SIGTERM ends the process at once with status 143 (128 + SIGTERM).
#[tokio::test]
async fn a_second_sigterm_stops_a_draining_process_at_once() {
    let mut s = db_svc(&["--shutdown-grace", "120s"]).await;
    let (lock, held) = TableLock::held_count(&s).await;

    s.svc.terminate().unwrap();
    assert!(
        s.svc.wait_exit(Duration::from_secs(2)).await.is_err(),
        "still draining after the first signal"
    );
    let started = Instant::now();
    s.svc.terminate().unwrap();
    let status = s
        .svc
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after the second signal");
    assert_eq!(status.code(), Some(143), "log:\n{}", s.svc.logs());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        held.await.unwrap().is_err(),
        "the held call did not complete"
    );
    drop(lock);
}

/// `--shutdown-delay`: after SIGTERM, health reports NOT_SERVING while new connections and
/// calls are still served, for the delay; then the drain, and exit 0. (A 10 s delay: the
/// checks below take a fraction of it, even on a busy machine.)
#[tokio::test]
async fn the_shutdown_delay_serves_not_serving_before_the_drain() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    const DELAY: Duration = Duration::from_secs(10);
    let mut s = db_svc(&["--shutdown-delay", "10s"]).await;
    let mut health = HealthClient::new(s.svc.channel());
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("the connection is up");
    // Before the signal: the delay cannot have started earlier.
    let started = Instant::now();
    s.svc.terminate().unwrap();
    loop {
        let status = health
            .check(HealthCheckRequest::default())
            .await
            .expect("health answers during the delay")
            .into_inner()
            .status();
        if status == ServingStatus::NotServing {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(8), "still SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A watch opened during the delay sees NOT_SERVING and stays open until the drain.
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch during the delay")
        .into_inner();
    let first = watch.message().await.expect("a status").expect("a status");
    assert_eq!(first.status(), ServingStatus::NotServing);
    // A new connection is still accepted and served.
    let counted = DatabaseServiceClient::new(s.svc.channel())
        .count(count())
        .await
        .expect("served during the delay");
    assert_eq!(counted.into_inner().count, 0);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the checks ran within the delay: {:?}",
        started.elapsed()
    );
    let open = tokio::time::timeout(Duration::from_millis(300), watch.message()).await;
    assert!(open.is_err(), "the watch is still open: {open:?}");
    let ended = tokio::time::timeout(Duration::from_secs(60), watch.message())
        .await
        .expect("the watch ends at the drain");
    assert!(matches!(ended, Ok(None)), "{ended:?}");
    assert!(
        started.elapsed() >= DELAY,
        "the drain began only after the delay: {:?}",
        started.elapsed()
    );
    let status = s
        .svc
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits after the delay");
    assert_eq!(status.code(), Some(0), "log:\n{}", s.svc.logs());
    assert!(started.elapsed() >= DELAY, "{:?}", started.elapsed());
}

/// A bare HTTP/2 connection (h2c, prior knowledge; the `h2` crate that tonic itself runs on)
/// for gRPC calls whose `grpc-timeout` the client must not enforce itself: tonic's channel
/// fails a call with CANCELLED ("Timeout expired") the moment its `grpc-timeout` runs out,
/// always a little before the server's own answer (whose clock starts at the call's arrival)
/// can reach it. This one sends the header and waits for the server's status.
mod h2c {
    use std::net::SocketAddr;

    use bytes::{BufMut, Bytes, BytesMut};
    use prost::Message;
    use tokio::task::JoinHandle;

    pub struct Connection {
        send: h2::client::SendRequest<Bytes>,
        addr: SocketAddr,
    }

    impl Connection {
        pub async fn open(addr: SocketAddr) -> Self {
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .expect("connect to the server");
            let (send, connection) = h2::client::handshake(tcp)
                .await
                .expect("an HTTP/2 handshake");
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Self { send, addr }
        }

        /// Starts a unary call of `path` (with `extra` request headers); the task ends with
        /// the call's status, whether in the response headers (trailers-only) or trailers.
        pub async fn call(
            &mut self,
            path: &str,
            extra: &[(&str, &str)],
            message: &impl Message,
        ) -> JoinHandle<tonic::Status> {
            let mut request = http::Request::post(format!("http://{}{path}", self.addr))
                .header("content-type", "application/grpc")
                .header("te", "trailers");
            for (name, value) in extra {
                request = request.header(*name, *value);
            }
            let request = request.body(()).expect("a valid request");
            let mut send = self
                .send
                .clone()
                .ready()
                .await
                .expect("the connection takes a call");
            let (response, mut body) = send
                .send_request(request, false)
                .expect("the request is sent");
            let encoded = message.encode_to_vec();
            let mut frame = BytesMut::with_capacity(5 + encoded.len());
            frame.put_u8(0);
            frame.put_u32(u32::try_from(encoded.len()).expect("a small message"));
            frame.put_slice(&encoded);
            body.send_data(frame.freeze(), true)
                .expect("the message is sent");
            tokio::spawn(async move {
                let response = response.await.expect("response headers");
                if let Some(status) = tonic::Status::from_header_map(response.headers()) {
                    return status;
                }
                let mut body = response.into_body();
                while let Some(data) = body.data().await {
                    let data = data.expect("the response body");
                    let _ = body.flow_control().release_capacity(data.len());
                }
                let trailers = body.trailers().await.expect("the trailers");
                tonic::Status::from_header_map(&trailers.unwrap_or_default())
                    .expect("a grpc-status in the trailers")
            })
        }
    }
}
