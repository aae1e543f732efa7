//! db-svc start-up: migrations run once PostgreSQL becomes reachable and before SERVING;
//! a flag disables them.

use std::time::Duration;

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{DbSvc, action, error_details, rows_json, to_struct};
use omnibus_tests::{ServiceSpec, TestDatabase, free_port};
use tonic_health::pb::health_check_response::ServingStatus;

/// Forwards every connection on `port` to `target` (PostgreSQL appearing late).
async fn forward(port: u16, target: String) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the forwarding port");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test]
async fn migrates_when_postgres_appears_then_serves() {
    let db = TestDatabase::create().await.unwrap();
    let real = url::Url::parse(&db.url).unwrap();
    let target = format!(
        "{}:{}",
        real.host_str().unwrap(),
        real.port().unwrap_or(5432)
    );
    let port = free_port();
    let mut via_proxy = real.clone();
    via_proxy.set_port(Some(port)).unwrap();

    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", via_proxy.as_str())
        .args(["--shutdown-grace", "1s"])
        .spawn()
        .unwrap();
    svc.wait_health("", ServingStatus::NotServing, Duration::from_secs(30))
        .await
        .unwrap();
    // Nothing there yet: no tables were created.
    {
        let mut conn = db.connect().await;
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'agent_actions'")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(n, 0);
    }

    let proxy = forward(port, target).await;
    svc.wait_serving().await.unwrap();
    // SERVING means migrated and catalogued: the first request works.
    let mut client =
        omnibus_proto::db::v1::database_service_client::DatabaseServiceClient::new(svc.channel());
    let reply = client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(action("late"))],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 1);
    proxy.abort();
}

#[tokio::test]
async fn migrations_can_be_disabled() {
    let mut s = DbSvc::start(&["--migrate", "false"]).await;
    let mut conn = s.sql().await;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename IN ('agent_actions', '_sqlx_migrations')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(n, 0, "no migration ran");
    // The configured tables are still listed; using a missing one is a clear field error.
    let tables = s
        .client
        .list_tables(pb::ListTablesRequest {})
        .await
        .unwrap()
        .into_inner()
        .tables;
    assert_eq!(tables.len(), 7);
    let err = s
        .client
        .query(pb::QueryRequest {
            table: "agent_actions".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(error_details(&err).1, vec!["table"]);
    // Created later (by whoever owns the schema), it is picked up without a restart.
    sqlx::query("CREATE TABLE agent_actions (id serial PRIMARY KEY, agent_name text)")
        .execute(&mut conn)
        .await
        .unwrap();
    let reply = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(serde_json::json!({"agent_name": "x"}))],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.affected, 1);
}

/// The health probe keeps a connection of its own; a session killed while idle (a DBA's job,
/// a proxy) is not an outage: the probe opens a fresh one and db-svc stays SERVING.
#[tokio::test]
async fn a_killed_probe_session_is_not_an_outage() {
    let s = DbSvc::start(&[]).await;
    let mut conn = s.sql().await;
    async fn probe_pid(conn: &mut sqlx::PgConnection) -> Option<i32> {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND query = 'SELECT 1'",
        )
        .fetch_optional(conn)
        .await
        .unwrap()
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let pid = loop {
        if let Some(pid) = probe_pid(&mut conn).await {
            break pid;
        }
        assert!(std::time::Instant::now() < deadline, "no probe session");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(killed);
    // Three probe rounds (every 2 s), watched closely: never NOT_SERVING.
    let watched = std::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(6) {
        let status = s
            .svc
            .health(omnibus_proto::service_names::DATABASE)
            .await
            .unwrap();
        assert_eq!(
            status,
            ServingStatus::Serving,
            "after {:?}",
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The probe is back on a session of its own.
    let again = probe_pid(&mut conn).await;
    assert!(again.is_some_and(|p| p != pid), "{again:?}");
}

/// `--request-log-retention`: once ready, db-svc removes the idempotency records older than
/// the retention and keeps the others; a record kept still answers its request's retry with
/// the recorded result. (The purge runs after start-up and then hourly: the old records are
/// put in place before a restart with a 10-minute retention.)
#[tokio::test]
async fn expired_idempotency_records_are_purged_and_the_others_kept() {
    let first = DbSvc::start(&[]).await;
    let request = pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![to_struct(action("kept"))],
        request_id: "live".into(),
        ..Default::default()
    };
    let written = first
        .client
        .clone()
        .insert(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!written.replayed);
    // Copies of its record under other ids, back-dated: two past the retention, one inside.
    let mut conn = first.sql().await;
    for (id, age) in [
        ("a-day-old", "1 day"),
        ("twenty-minutes-old", "20 minutes"),
        ("five-minutes-old", "5 minutes"),
    ] {
        sqlx::query(
            "INSERT INTO omnibus_request_log \
             (request_id, operation, table_name, result, fingerprint, created_at) \
             SELECT $1, operation, table_name, result, fingerprint, now() - $2::interval \
             FROM omnibus_request_log WHERE request_id = 'live'",
        )
        .bind(id)
        .bind(age)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let records = async |conn: &mut sqlx::PgConnection| -> Vec<String> {
        sqlx::query_scalar("SELECT request_id FROM omnibus_request_log ORDER BY request_id")
            .fetch_all(conn)
            .await
            .unwrap()
    };
    assert_eq!(records(&mut conn).await.len(), 4);

    let DbSvc { db, svc, .. } = first;
    drop(svc);
    let mut s = DbSvc::start_on(db, &["--request-log-retention", "10m"]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = records(&mut conn).await;
        if left == ["five-minutes-old", "live"] {
            break;
        }
        assert!(
            left.iter().any(|id| id == "live") && left.iter().any(|id| id == "five-minutes-old"),
            "a record inside the retention was removed: {left:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "expired records left: {left:?}\n{}",
            s.svc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = s.svc.logs();
    let purged = logs
        .lines()
        .find(|l| l.contains("expired idempotency records removed"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(purged.contains("removed=2"), "{purged}");

    // The kept record still answers the retry: the recorded result, nothing written again.
    let replayed = s.client.insert(request).await.unwrap().into_inner();
    assert!(replayed.replayed);
    assert_eq!(replayed.affected, 1);
    assert_eq!(rows_json(&replayed.rows), rows_json(&written.rows));
    assert_eq!(s.count_all("agent_actions").await, 1);
}
