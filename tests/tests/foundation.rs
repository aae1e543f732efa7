//! Foundation smoke tests: both binaries start against the real broker and PostgreSQL, report
//! health, expose reflection, shut down cleanly, and fail clearly on bad settings.

use std::time::Duration;

use omnibus_proto::service_names::{CONSUMER, DATABASE};
use omnibus_tests::{
    ServiceProcess, ServiceSpec, TestDatabase, free_port, kafka_brokers, run_to_exit,
};
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1alpha;

/// consumer-svc on topics of its own (empty ones: the shared broker's default topics may hold
/// whatever a demo left there, and replaying them is not what these tests are about).
async fn start_consumer() -> ServiceProcess {
    let prefix = omnibus_tests::consumer::unique_prefix();
    omnibus_tests::consumer::create_topics(&kafka_brokers(), &prefix, 1)
        .await
        .expect("create the test's topics");
    let mut svc = ServiceSpec::new("consumer-svc")
        .args([
            "--kafka-brokers",
            &kafka_brokers(),
            "--topic-prefix",
            &prefix,
            "--shutdown-grace",
            "30s",
        ])
        .spawn()
        .expect("spawn consumer-svc");
    svc.wait_serving().await.expect("consumer-svc SERVING");
    svc
}

async fn start_db(db: &TestDatabase) -> ServiceProcess {
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(["--shutdown-grace", "30s"])
        .spawn()
        .expect("spawn db-svc");
    svc.wait_serving().await.expect("db-svc SERVING");
    svc
}

/// Service names listed by reflection v1.
async fn list_services_v1(svc: &ServiceProcess) -> Vec<String> {
    let mut client = ServerReflectionClient::new(svc.channel());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection v1 call")
        .into_inner();
    let reply = replies.next().await.expect("one reply").expect("reply ok");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply: {other:?}"),
    }
}

/// Service names listed by reflection v1alpha (what older grpcurl versions use).
async fn list_services_v1alpha(svc: &ServiceProcess) -> Vec<String> {
    use v1alpha::server_reflection_client::ServerReflectionClient;
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(svc.channel());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection v1alpha call")
        .into_inner();
    let reply = replies.next().await.expect("one reply").expect("reply ok");
    match reply.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply: {other:?}"),
    }
}

#[tokio::test]
async fn consumer_svc_is_serving_with_reflection() {
    let svc = start_consumer().await;
    assert_eq!(svc.health(CONSUMER).await.unwrap(), ServingStatus::Serving);
    assert_eq!(svc.health("").await.unwrap(), ServingStatus::Serving);

    for services in [
        list_services_v1(&svc).await,
        list_services_v1alpha(&svc).await,
    ] {
        assert!(services.contains(&CONSUMER.to_string()), "{services:?}");
        assert!(
            services.contains(&"grpc.health.v1.Health".to_string()),
            "{services:?}"
        );
        assert!(
            services.contains(&"grpc.reflection.v1.ServerReflection".to_string()),
            "{services:?}"
        );
        assert!(
            !services.contains(&DATABASE.to_string()),
            "only its own service: {services:?}"
        );
    }
}

#[tokio::test]
async fn db_svc_is_serving_with_reflection() {
    let db = TestDatabase::create().await.unwrap();
    let svc = start_db(&db).await;
    assert_eq!(svc.health(DATABASE).await.unwrap(), ServingStatus::Serving);
    for services in [
        list_services_v1(&svc).await,
        list_services_v1alpha(&svc).await,
    ] {
        assert!(services.contains(&DATABASE.to_string()), "{services:?}");
        assert!(
            services.contains(&"grpc.health.v1.Health".to_string()),
            "{services:?}"
        );
        assert!(
            !services.contains(&CONSUMER.to_string()),
            "only its own service: {services:?}"
        );
    }
}

#[tokio::test]
async fn unknown_service_health_is_not_found() {
    let db = TestDatabase::create().await.unwrap();
    let svc = start_db(&db).await;
    let err = svc.health("no.such.Service").await.unwrap_err();
    let status = err.downcast_ref::<tonic::Status>().expect("a gRPC status");
    assert_eq!(status.code(), tonic::Code::NotFound);
}

/// SIGTERM: a watcher sees NOT_SERVING, its open stream ends, the process exits 0 long before
/// its grace period (nothing is in flight).
async fn assert_graceful_sigterm(mut svc: ServiceProcess, service: &str) {
    let mut health = HealthClient::new(svc.channel());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("watch health")
        .into_inner();
    let first = watch.next().await.expect("first status").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);

    svc.terminate().unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a status change after SIGTERM")
        .expect("stream item")
        .expect("ok");
    assert_eq!(next.status(), ServingStatus::NotServing);
    // The open stream ends by itself rather than holding the drain for its grace period.
    let end = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the Watch stream ends after SIGTERM");
    assert!(end.is_none(), "{end:?}");

    // The grace is 30 s: nothing holds the drain, so the process exits well within it.
    let status = svc.wait_exit(Duration::from_secs(15)).await.expect("exits");
    assert_eq!(status.code(), Some(0), "exit status; log:\n{}", svc.logs());
}

#[tokio::test]
async fn consumer_svc_sigterm_drains_and_exits_zero() {
    let svc = start_consumer().await;
    assert_graceful_sigterm(svc, CONSUMER).await;
}

#[tokio::test]
async fn db_svc_sigterm_drains_and_exits_zero() {
    let db = TestDatabase::create().await.unwrap();
    let svc = start_db(&db).await;
    assert_graceful_sigterm(svc, DATABASE).await;
}

#[tokio::test]
async fn db_svc_not_serving_while_postgres_unreachable_and_password_never_logged() {
    let secret = "pw-s3cret-do-not-log";
    let url = format!(
        "postgres://omnibus:{secret}@127.0.0.1:{}/nowhere",
        free_port()
    );
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", url)
        .spawn()
        .unwrap();
    svc.wait_health(DATABASE, ServingStatus::NotServing, Duration::from_secs(30))
        .await
        .unwrap();
    // Still NOT_SERVING (not crashed) after a few probe rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        svc.is_running(),
        "db-svc must keep running; log:\n{}",
        svc.logs()
    );
    assert_eq!(svc.health("").await.unwrap(), ServingStatus::NotServing);
    let logs = svc.logs();
    assert!(logs.contains("PostgreSQL is not reachable"), "{logs}");
    assert!(
        !logs.contains(secret),
        "password leaked into the log:\n{logs}"
    );
}

/// A broker that is not there: the probe finds it unreachable and says so (NOT_SERVING alone
/// proves nothing, it is also the start-up state), and the service keeps running, NOT_SERVING.
#[tokio::test]
async fn consumer_svc_not_serving_while_broker_unreachable() {
    let mut svc = ServiceSpec::new("consumer-svc")
        .args(["--kafka-brokers", &format!("127.0.0.1:{}", free_port())])
        .spawn()
        .unwrap();
    svc.wait_health(CONSUMER, ServingStatus::NotServing, Duration::from_secs(30))
        .await
        .unwrap();
    // The probe's verdict (consumer-svc/src/broker.rs), not ingest's "broker unreachable (...)".
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !svc.logs().contains("Kafka broker is not reachable") {
        assert!(
            svc.is_running() && std::time::Instant::now() < deadline,
            "the broker probe never reported the broker unreachable; log:\n{}",
            svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        svc.is_running(),
        "consumer-svc must keep running; log:\n{}",
        svc.logs()
    );
    assert_eq!(
        svc.health(CONSUMER).await.unwrap(),
        ServingStatus::NotServing
    );
}

/// Exits 78 with exactly one non-empty output line that contains `needle`.
fn assert_config_error(bin: &str, args: &[&str], env: &[(&str, &str)], needle: &str) -> String {
    let (status, output) = run_to_exit(bin, args, env).unwrap();
    assert_eq!(status.code(), Some(78), "{bin} {args:?}: {output}");
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one clear line expected, got:\n{output}");
    assert!(
        lines[0].contains(needle),
        "line should name {needle}: {}",
        lines[0]
    );
    output
}

#[test]
fn bad_or_missing_settings_fail_with_one_clear_line() {
    assert_config_error("consumer-svc", &[], &[], "KAFKA_BROKERS");
    assert_config_error(
        "consumer-svc",
        &[],
        &[("KAFKA_BROKERS", "no-port")],
        "KAFKA_BROKERS",
    );
    assert_config_error(
        "consumer-svc",
        &[],
        &[("KAFKA_BOOTSTRAP_SERVERS", "h:x")],
        "KAFKA_BOOTSTRAP_SERVERS",
    );
    assert_config_error(
        "consumer-svc",
        &["--kafka-brokers", "h:1", "--listen", "nonsense"],
        &[],
        "--listen",
    );
    assert_config_error(
        "consumer-svc",
        &["--kafka-brokers", "h:1", "--shutdown-grace", "forever"],
        &[],
        "--shutdown-grace",
    );
    assert_config_error("db-svc", &[], &[], "DATABASE_URL");
    let out = assert_config_error(
        "db-svc",
        &[],
        &[("DATABASE_URL", "mysql://u:topsecret@h/db")],
        "DATABASE_URL",
    );
    assert!(!out.contains("topsecret"), "{out}");
    let out = assert_config_error(
        "db-svc",
        &[],
        &[("DATABASE_URL", "postgres://u:topsecret@h:99999/db")],
        "DATABASE_URL",
    );
    assert!(!out.contains("topsecret"), "{out}");
    assert_config_error(
        "db-svc",
        &[],
        &[
            ("DATABASE_URL", "postgres://h/db"),
            ("DB_MAX_CONNECTIONS", "0"),
        ],
        "--db-max-connections",
    );
}

#[test]
fn compose_file_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(&root)
        .output()
        .expect("docker-compose must be installed (scripts/test installs Debian's package)");
    assert!(
        out.status.success(),
        "docker-compose config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The issue's "done when": grpcurl (no proto files) lists, describes and health-checks both.
#[tokio::test]
async fn grpcurl_lists_describes_and_checks_health() {
    use omnibus_tests::grpcurl;
    let db = TestDatabase::create().await.unwrap();
    let consumer = start_consumer().await;
    let dbsvc = start_db(&db).await;
    for (svc, name) in [(&consumer, CONSUMER), (&dbsvc, DATABASE)] {
        let addr = svc.addr.to_string();
        let list = grpcurl(&["-plaintext", &addr, "list"]).await.unwrap();
        assert!(list.success, "{list:?}");
        let services: Vec<&str> = list.stdout.lines().collect();
        assert!(services.contains(&name), "{list:?}");
        assert!(services.contains(&"grpc.health.v1.Health"), "{list:?}");

        let describe = grpcurl(&["-plaintext", &addr, "describe", name])
            .await
            .unwrap();
        assert!(
            describe.success && describe.stdout.contains("is a service"),
            "{describe:?}"
        );

        let body = format!(r#"{{"service":"{name}"}}"#);
        let check = grpcurl(&[
            "-plaintext",
            "-d",
            &body,
            &addr,
            "grpc.health.v1.Health/Check",
        ])
        .await
        .unwrap();
        assert!(check.success, "{check:?}");
        let reply: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
        assert_eq!(reply["status"], "SERVING", "{check:?}");
    }
}
