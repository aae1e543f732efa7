//! Operations: bearer-token authentication (no token, bad token, read token on a write, write
//! token; health and reflection open; failures logged without the token; trace id in the
//! log line), tokens-file errors at start-up, TLS with a generated certificate, mutual TLS
//! (client certificates), and Kafka over TLS.

use std::time::{Duration, Instant};

use omnibus_proto::consumer::v1 as cpb;
use omnibus_proto::consumer::v1::consumer_service_client::ConsumerServiceClient;
use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use omnibus_proto::service_names::DATABASE;
use omnibus_tests::consumer::{
    PrivateBroker, create_topics, create_topics_with, start_consumer, unique_prefix, wait_status,
};
use omnibus_tests::db::{DbSvc, action, to_struct};
use omnibus_tests::ops::{Bearer, TestCert, new_token};
use omnibus_tests::proxy::TlsProxy;
use omnibus_tests::{ServiceProcess, ServiceSpec, TestDatabase, kafka_brokers, run_to_exit};
use rdkafka::ClientConfig;
use serde_json::json;
use tonic::Code;
use tonic::codegen::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

type AuthedDb = DatabaseServiceClient<InterceptedService<Channel, Bearer>>;

fn db_client(channel: Channel, token: Option<&str>) -> AuthedDb {
    DatabaseServiceClient::with_interceptor(
        channel,
        token.map_or_else(Bearer::none, |t| Bearer::new(t).expect("a valid token")),
    )
}

fn query() -> pb::QueryRequest {
    pb::QueryRequest {
        table: "agent_actions".into(),
        ..Default::default()
    }
}

fn insert(agent: &str) -> pb::InsertRequest {
    pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![to_struct(action(agent))],
        ..Default::default()
    }
}

async fn count(client: &mut AuthedDb, agent: &str) -> u64 {
    client
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({ "agent_name": agent }))),
            ..Default::default()
        })
        .await
        .expect("count with a read token")
        .into_inner()
        .count
}

#[tokio::test]
async fn tokens_gate_reads_and_writes_on_db_svc() {
    let read = new_token("read");
    let write = new_token("write");
    let bad = new_token("bogus");
    // Health (wait_serving) works without a token.
    let svc = DbSvc::start(&["--auth-read-tokens", &read, "--auth-write-tokens", &write]).await;
    let channel = svc.svc.channel();

    // No token / a bad token / a malformed header: UNAUTHENTICATED.
    let err = db_client(channel.clone(), None)
        .query(query())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut with_trace = tonic::Request::new(query());
    with_trace.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let err = db_client(channel.clone(), Some(&bad))
        .query(with_trace)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut basic = tonic::Request::new(query());
    basic
        .metadata_mut()
        .insert("authorization", format!("Basic {read}").parse().unwrap());
    let err = DatabaseServiceClient::new(channel.clone())
        .query(basic)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A read token reads, and cannot write (nothing is written).
    let mut reader = db_client(channel.clone(), Some(&read));
    reader
        .query(query())
        .await
        .expect("query with a read token");
    let err = reader.insert(insert("ops-reader")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = reader
        .execute_raw(pb::ExecuteRawRequest {
            sql: "SELECT 1 AS one".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = reader
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({ "agent_name": "x" }))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(count(&mut reader, "ops-reader").await, 0);

    // A write token writes and reads.
    let mut writer = db_client(channel.clone(), Some(&write));
    let done = writer
        .insert(insert("ops-writer"))
        .await
        .expect("insert with a write token")
        .into_inner();
    assert_eq!(done.affected, 1);
    assert_eq!(count(&mut writer, "ops-writer").await, 1);

    // Health and reflection need no token.
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: DATABASE.into(),
        })
        .await
        .expect("health without a token")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::Serving);
    let out = omnibus_tests::grpcurl(&["-plaintext", &svc.svc.addr.to_string(), "list"])
        .await
        .expect("grpcurl (OMNIBUS_GRPCURL, installed by scripts/dev-services)");
    assert!(out.success && out.stdout.contains(DATABASE), "{out:?}");

    // Rejections are logged (method, code, trace id) without any token.
    let logs = svc.svc.logs();
    let rejected: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("request rejected"))
        .collect();
    assert!(rejected.len() >= 6, "{logs}");
    assert!(
        rejected.iter().any(
            |l| l.contains("4bf92f3577b34da6a3ce929d0e0e4736") && l.contains("Unauthenticated")
        ),
        "trace id in the rejection line: {rejected:#?}"
    );
    assert!(
        rejected
            .iter()
            .any(|l| l.contains("/omnibus.db.v1.DatabaseService/Insert")
                && l.contains("PermissionDenied")),
        "{rejected:#?}"
    );
    for token in [&read, &write, &bad] {
        assert!(
            !logs.contains(token.as_str()),
            "a token leaked into the log"
        );
    }
}

#[tokio::test]
async fn consumer_svc_accepts_read_tokens_from_a_file_for_every_rpc() {
    let read = new_token("read");
    let cert_dir = TestCert::generate().unwrap(); // only for its private directory
    let file = cert_dir.dir.join("tokens");
    std::fs::write(&file, format!("# dashboards\nread {read}\n")).unwrap();
    let prefix = unique_prefix();
    create_topics(&kafka_brokers(), &prefix, 1).await.unwrap();
    let svc = start_consumer(
        &kafka_brokers(),
        &prefix,
        &["--auth-tokens-file", file.to_str().unwrap()],
    )
    .await
    .unwrap();

    // Every RPC: refused without the token, answered with it.
    let mut plain = ConsumerServiceClient::new(svc.channel());
    for (rpc, result) in every_consumer_rpc(&mut plain, None).await {
        let err = result.expect_err(rpc);
        assert_eq!(err.code(), Code::Unauthenticated, "{rpc}: {err:?}");
    }
    let answered = every_consumer_rpc(&mut plain, Some(&read)).await;
    assert_eq!(answered.len(), 11);
    for (rpc, result) in answered {
        result.unwrap_or_else(|e| panic!("{rpc} with a read token: {e:?}"));
    }

    let mut client = ConsumerServiceClient::with_interceptor(
        svc.channel(),
        Bearer::new(&read).expect("a valid token"),
    );
    // A stream with a read token opens (the first message is its snapshot).
    let mut stream = client
        .subscribe(cpb::SubscribeRequest {
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .expect("subscribe with a read token")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("first stream message in time")
        .expect("stream ok");
    assert!(first.is_some());
}

/// Calls every ConsumerService RPC once (streams: opened), with `token` as the bearer token
/// if given; the outcome of each, by name.
async fn every_consumer_rpc(
    client: &mut ConsumerServiceClient<Channel>,
    token: Option<&str>,
) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    fn req<M>(message: M, token: Option<&str>) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().expect("ASCII token");
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
    // (name, method, request message) -> (name, outcome)
    macro_rules! call {
        ($name:literal, $method:ident, $message:expr) => {
            (
                $name,
                client.$method(req($message, token)).await.map(|_| ()),
            )
        };
    }
    vec![
        call!("GetAgentMetrics", get_agent_metrics, Default::default()),
        call!("ListRecentActions", list_recent_actions, Default::default()),
        call!(
            "ListRoutingDecisions",
            list_routing_decisions,
            Default::default()
        ),
        call!(
            "ListTransformations",
            list_transformations,
            Default::default()
        ),
        call!(
            "ListPerformanceMetrics",
            list_performance_metrics,
            Default::default()
        ),
        call!(
            "GetPerformanceStats",
            get_performance_stats,
            Default::default()
        ),
        call!("GetSnapshot", get_snapshot, cpb::GetSnapshotRequest {}),
        call!(
            "GetConsumerStatus",
            get_consumer_status,
            cpb::GetConsumerStatusRequest {}
        ),
        call!("StreamActions", stream_actions, Default::default()),
        call!(
            "StreamAgentMetrics",
            stream_agent_metrics,
            Default::default()
        ),
        call!("Subscribe", subscribe, cpb::SubscribeRequest::default()),
    ]
}

/// `--help` lists each setting's environment variable, but never the value of one that may
/// hold a secret: the database URL and password, the tokens, the OTLP endpoint (which may carry
/// an API key), librdkafka's settings (SASL passwords).
#[test]
fn help_never_shows_the_value_of_a_secret_setting() {
    let env = [
        ("DATABASE_URL", "postgres://u:secret-db-url@db/x"),
        ("POSTGRES_PASSWORD", "secret-pg-password"),
        ("AUTH_READ_TOKENS", "secret-read-token-123456789"),
        ("AUTH_WRITE_TOKENS", "secret-write-token-123456789"),
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://key:secret-otlp@collector:4317",
        ),
        ("KAFKA_CONFIG", "sasl.password=secret-sasl"),
    ];
    for bin in ["db-svc", "consumer-svc"] {
        let (status, out) = run_to_exit(bin, &["--help"], &env).unwrap();
        assert_eq!(status.code(), Some(0), "{out}");
        assert!(out.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{out}");
        assert!(!out.contains("secret"), "{bin}: {out}");
    }
}

#[test]
fn bad_token_settings_fail_at_start_up_without_echoing_the_token() {
    let dir = std::env::temp_dir().join(format!("omnibus-ops-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, "admin supersecretvalue-123456789\n").unwrap();
    let (status, out) = run_to_exit(
        "db-svc",
        &[
            "--database-url",
            "postgres://u@127.0.0.1:1/db",
            "--auth-tokens-file",
            file.to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(status.code(), Some(78), "{out}");
    assert!(
        out.contains("tokens file") && out.contains("line 1"),
        "{out}"
    );
    assert!(!out.contains("supersecretvalue"), "{out}");

    let (status, out) = run_to_exit(
        "db-svc",
        &[
            "--database-url",
            "postgres://u@127.0.0.1:1/db",
            "--tls-cert",
            "/nonexistent/cert.pem",
            "--tls-key",
            file.to_str().unwrap(),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(status.code(), Some(78), "{out}");
    assert!(out.contains("/nonexistent/cert.pem"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);

    // PEM files that only tonic finds unusable (the certificate given as the key): still a
    // configuration error, with the reason rather than tonic's bare "transport error".
    let cert = TestCert::generate().unwrap();
    let cert_path = cert.cert_path.to_str().unwrap();
    let (status, out) = run_to_exit(
        "db-svc",
        &[
            "--database-url",
            "postgres://u@127.0.0.1:1/db",
            "--tls-cert",
            cert_path,
            "--tls-key",
            cert_path,
        ],
        &[],
    )
    .unwrap();
    assert_eq!(status.code(), Some(78), "{out}");
    assert!(out.contains("TLS: "), "{out}");
    assert!(!out.contains("TLS: transport error"), "{out}");
}

async fn tls_channel(port: u16, ca_pem: &str) -> Channel {
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca_pem))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// The overall health over `channel`.
async fn health(
    channel: Channel,
) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
}

/// Polls health over `channel` (`what`: how it connects) until `svc` reports SERVING.
async fn wait_serving_over(channel: &Channel, svc: &mut ServiceProcess, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(svc.is_running(), "db-svc exited: {}", svc.logs());
        match health(channel.clone()).await {
            Ok(r) if r.get_ref().status() == ServingStatus::Serving => return,
            other => assert!(
                Instant::now() < deadline,
                "no SERVING over {what}: {other:?}\n{}",
                svc.logs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tls_listener_serves_a_verified_handshake_and_refuses_plaintext() {
    let cert = TestCert::generate().unwrap();
    let (_db, mut svc) = cert.spawn_db_svc(&[]).await;
    let channel = tls_channel(svc.addr.port(), &cert.cert_pem).await;

    wait_serving_over(&channel, &mut svc, "TLS").await;
    let mut client = DatabaseServiceClient::new(channel);
    let done = client
        .insert(insert("ops-tls"))
        .await
        .expect("insert over TLS")
        .into_inner();
    assert_eq!(done.affected, 1);

    // A plaintext client gets no answer from the TLS listener.
    let plaintext = svc.health("").await;
    assert!(plaintext.is_err(), "plaintext must fail: {plaintext:?}");

    // A client that does not trust the certificate fails the handshake.
    let other = TestCert::generate().unwrap();
    let untrusted = HealthClient::new(tls_channel(svc.addr.port(), &other.cert_pem).await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(
        untrusted.is_err(),
        "untrusted certificate must fail: {untrusted:?}"
    );
}

/// A certificate authority for client certificates, and one client certificate it signed.
struct ClientCa {
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
}

impl ClientCa {
    fn generate(name: &str) -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.distinguished_name
            .push(DnType::CommonName, format!("{name} client CA"));
        let ca = ca.self_signed(&ca_key).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client = CertificateParams::new(vec![format!("{name}-client")]).unwrap();
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client
            .distinguished_name
            .push(DnType::CommonName, format!("{name} client"));
        let client = client.signed_by(&client_key, &ca, &ca_key).unwrap();
        Self {
            ca_pem: ca.pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }
}

/// A TLS channel to `port` trusting `server_ca_pem`, presenting `identity` (certificate and
/// key PEM) if given.
fn mtls_channel(port: u16, server_ca_pem: &str, identity: Option<(&str, &str)>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// `--tls-client-ca` (mutual TLS): a client without a certificate, and one whose certificate
/// another CA signed, are refused; one signed by the given CA is served.
#[tokio::test]
async fn mutual_tls_serves_only_clients_with_a_certificate_from_the_given_ca() {
    let server = TestCert::generate().unwrap();
    let trusted = ClientCa::generate("trusted");
    let other = ClientCa::generate("other");
    let ca_path = server.dir.join("client-ca.pem");
    std::fs::write(&ca_path, &trusted.ca_pem).unwrap();
    let (_db, mut svc) = server
        .spawn_db_svc(&["--tls-client-ca", ca_path.to_str().unwrap()])
        .await;
    let port = svc.addr.port();

    // The trusted client: health polled until SERVING, then a write.
    let good = mtls_channel(
        port,
        &server.cert_pem,
        Some((&trusted.client_cert_pem, &trusted.client_key_pem)),
    );
    wait_serving_over(&good, &mut svc, "mutual TLS").await;
    assert!(
        svc.logs().contains("mutual=true"),
        "TLS on, mutual: {}",
        svc.logs()
    );
    let done = DatabaseServiceClient::new(good.clone())
        .insert(insert("ops-mtls"))
        .await
        .expect("insert with a trusted client certificate")
        .into_inner();
    assert_eq!(done.affected, 1);

    // Refused: no certificate, and one from another CA (new connections each).
    let refused = [
        (
            "no client certificate",
            mtls_channel(port, &server.cert_pem, None),
        ),
        (
            "a certificate from another CA",
            mtls_channel(
                port,
                &server.cert_pem,
                Some((&other.client_cert_pem, &other.client_key_pem)),
            ),
        ),
    ];
    for (what, channel) in refused {
        let reply = health(channel.clone()).await;
        assert!(reply.is_err(), "{what}: served: {reply:?}");
        let err = DatabaseServiceClient::new(channel)
            .insert(insert("ops-mtls-refused"))
            .await;
        assert!(err.is_err(), "{what}: insert served: {err:?}");
    }
    // Nothing of theirs was written; the trusted client is still served.
    let count = DatabaseServiceClient::new(good)
        .count(pb::CountRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({ "agent_name": "ops-mtls-refused" }))),
            ..Default::default()
        })
        .await
        .expect("count with a trusted client certificate")
        .into_inner()
        .count;
    assert_eq!(count, 0);
}

#[tokio::test]
async fn db_svc_reaches_postgresql_over_tls_with_sslmode_in_the_url() {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&omnibus_tests::admin_database_url())
        .await
        .unwrap();
    let (ssl,): (String,) = sqlx::query_as("SHOW ssl")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "this test needs a PostgreSQL server with ssl = on (Debian's default)"
    );

    let db = TestDatabase::create().await.unwrap();
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", db.url);
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", url)
        .args(["--shutdown-grace", "2s"])
        .spawn()
        .unwrap();
    svc.wait_serving().await.unwrap();
    let done = DatabaseServiceClient::new(svc.channel())
        .insert(insert("ops-pg-tls"))
        .await
        .expect("insert through a TLS connection pool")
        .into_inner();
    assert_eq!(done.affected, 1);

    // Every connection db-svc holds to its database is encrypted.
    let (total, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
    )
    .bind(&db.name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        total > 0 && encrypted == total,
        "{encrypted} of {total} connections use TLS"
    );
}

#[test]
fn kafka_client_settings_are_passed_through_to_librdkafka() {
    // An unknown property named by --kafka-config is librdkafka's error: it got there.
    let (status, out) = run_to_exit(
        "consumer-svc",
        &[
            "--kafka-brokers",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
            "--kafka-config",
            "no.such.property=1",
        ],
        &[],
    )
    .unwrap();
    assert!(!status.success(), "{out}");
    assert!(out.contains("no.such.property"), "{out}");
    // KAFKA_SECURITY_PROTOCOL and KAFKA_SSL_* reach librdkafka too: a CA file that does not
    // exist is its error at start-up.
    let (status, out) = run_to_exit(
        "consumer-svc",
        &["--kafka-brokers", "127.0.0.1:1", "--listen", "127.0.0.1:0"],
        &[
            ("KAFKA_SECURITY_PROTOCOL", "SSL"),
            ("KAFKA_SSL_CA_LOCATION", "/nonexistent/omnibus-ca.pem"),
        ],
    )
    .unwrap();
    assert!(!status.success(), "{out}");
    assert!(out.contains("ssl.ca.location"), "{out}");
}

/// consumer-svc consumes from a broker that speaks only TLS, trusting its certificate through
/// `ssl.ca.location` (librdkafka verifies the chain and the host name). The broker is a
/// private tansu behind a TLS front (rustls) whose address it advertises, so every connection
/// of every client goes through TLS.
#[tokio::test]
async fn consumer_svc_consumes_from_a_broker_over_tls() {
    let cert = TestCert::generate().unwrap();
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tls_addr = front.local_addr().unwrap().to_string();
    let broker = PrivateBroker::start_advertising(Some(tls_addr.clone()))
        .await
        .unwrap();
    let _front = TlsProxy::start(front, &cert, broker.addr().parse().unwrap()).unwrap();
    let ca = cert.cert_path.to_str().unwrap();
    let mut tls = ClientConfig::new();
    tls.set("bootstrap.servers", &tls_addr)
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", ca);
    let prefix = unique_prefix();
    create_topics_with(&tls, &prefix, 1).await.unwrap();
    // The events come from `omnibus generate`, over TLS too: its settings from the environment
    // (as the services read them) and from --kafka-config.
    let ca_setting = format!("ssl.ca.location={ca}");
    let n = 40;
    let out = omnibus_tests::cli::omnibus_with_env(
        &[
            "--brokers",
            &tls_addr,
            "--kafka-config",
            &ca_setting,
            "generate",
            "--count",
            "40",
            "--topic-prefix",
            &prefix,
            "--quiet",
        ],
        &[("KAFKA_SECURITY_PROTOCOL", "SSL")],
    )
    .await
    .unwrap();
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);

    let svc = start_consumer(
        &tls_addr,
        &prefix,
        &[
            "--kafka-config",
            "security.protocol=ssl",
            "--kafka-config",
            &ca_setting,
        ],
    )
    .await
    .unwrap();
    let s = wait_status(&svc, Duration::from_secs(30), "events over TLS", |s| {
        s.events_processed == n
    })
    .await
    .unwrap();
    assert!(s.connected, "{s:?}");

    // Without the CA the certificate is not trusted: no connection, no events (and the
    // service does not report SERVING, so it is not waited for).
    let untrusting = ServiceSpec::new("consumer-svc")
        .args([
            "--kafka-brokers",
            &tls_addr,
            "--topic-prefix",
            &prefix,
            "--kafka-config",
            "security.protocol=ssl",
        ])
        .spawn()
        .unwrap();
    // Wait until it has tried the broker (its log reports the refused certificate) and
    // answers reads, rather than for a fixed time.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let s = loop {
        let tried = untrusting
            .logs()
            .to_ascii_lowercase()
            .contains("certificate verify failed");
        if tried && let Ok(s) = omnibus_tests::consumer::status(&untrusting).await {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no certificate failure reported:\n{}",
            untrusting.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!s.connected && s.events_processed == 0, "{s:?}");
}

/// `omnibus status` succeeds only when its reads work, not merely when health (which needs no
/// token) says SERVING; and `omnibus tail` gives up at once on a refused token instead of
/// retrying forever.
#[tokio::test]
async fn cli_status_and_tail_fail_on_a_refused_token() {
    let read = new_token("read");
    let bad = new_token("bogus");
    let db = DbSvc::start(&["--auth-read-tokens", &read]).await;
    let prefix = unique_prefix();
    create_topics(&kafka_brokers(), &prefix, 1).await.unwrap();
    let consumer = start_consumer(&kafka_brokers(), &prefix, &["--auth-read-tokens", &read])
        .await
        .unwrap();
    let (c_addr, d_addr) = (consumer.addr.to_string(), db.svc.addr.to_string());
    let status = |token: &str| {
        let args = [
            "--consumer-addr".to_string(),
            c_addr.clone(),
            "--db-addr".to_string(),
            d_addr.clone(),
            "--token".to_string(),
            token.to_string(),
            "status".to_string(),
        ];
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            omnibus_tests::cli::omnibus(&refs).await.unwrap()
        }
    };
    let good = status(&read).await;
    assert!(good.ok(), "{}{}", good.stdout, good.stderr);
    let refused = status(&bad).await;
    assert_eq!(
        refused.code,
        Some(1),
        "{}{}",
        refused.stdout,
        refused.stderr
    );
    assert!(!refused.stdout.contains(bad.as_str()) && !refused.stderr.contains(bad.as_str()));

    let tail = tokio::time::timeout(
        Duration::from_secs(30),
        omnibus_tests::cli::omnibus(&[
            "--consumer-addr",
            &c_addr,
            "--token",
            &bad,
            "tail",
            "-n",
            "1",
        ]),
    )
    .await
    .expect("tail gives up instead of retrying")
    .unwrap();
    assert!(!tail.ok(), "{}{}", tail.stdout, tail.stderr);
    assert!(
        tail.stderr.contains("nauthenticated") || tail.stderr.contains("token"),
        "{}",
        tail.stderr
    );
}
