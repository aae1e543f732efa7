//! Helpers for the db-svc end-to-end tests: start db-svc on its own database, a client, JSON
//! <-> protobuf Struct conversions, and reading the error details of a status.

use std::time::{Duration, Instant};

use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use serde_json::{Value as Json, json};
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::{ServiceProcess, ServiceSpec, TestDatabase};

/// A db-svc on its own fresh database (migrated), plus a client.
pub struct DbSvc {
    pub db: TestDatabase,
    pub svc: ServiceProcess,
    pub client: DatabaseServiceClient<Channel>,
}

impl DbSvc {
    /// db-svc on a fresh database where `ddl` (one or more statements) created its own
    /// tables, serving `tables` (comma-separated).
    pub async fn start_with(ddl: &str, tables: &str) -> Self {
        Self::start_with_args(ddl, &["--tables", tables]).await
    }

    /// [`DbSvc::start_with`] with db-svc's arguments given whole.
    pub async fn start_with_args(ddl: &str, args: &[&str]) -> Self {
        let db = TestDatabase::create().await.expect("test database");
        let mut conn = db.connect().await;
        sqlx::raw_sql(ddl)
            .execute(&mut conn)
            .await
            .expect("create the test tables");
        drop(conn);
        Self::start_on(db, args).await
    }

    /// Starts db-svc with `args` and waits until it is SERVING.
    pub async fn start(args: &[&str]) -> Self {
        let db = TestDatabase::create().await.expect("create test database");
        Self::start_on(db, args).await
    }

    /// Starts db-svc on an existing test database.
    pub async fn start_on(db: TestDatabase, args: &[&str]) -> Self {
        let mut svc = ServiceSpec::new("db-svc")
            .env("DATABASE_URL", &db.url)
            .args(["--shutdown-grace", "2s"])
            .args(args.iter().copied())
            .spawn()
            .expect("spawn db-svc");
        svc.wait_serving().await.expect("db-svc SERVING");
        let client = DatabaseServiceClient::new(svc.channel());
        Self { db, svc, client }
    }

    /// Inserts agent_actions rows through db-svc (a test's seed data).
    pub async fn seed_actions(&mut self, rows: Vec<Json>) {
        let rows = rows.into_iter().map(to_struct).collect();
        self.client
            .insert(omnibus_proto::db::v1::InsertRequest {
                table: "agent_actions".into(),
                rows,
                count_only: true,
                ..Default::default()
            })
            .await
            .expect("seed agent_actions");
    }

    /// Rows in `table`, counted by db-svc (`Count` without a filter).
    pub async fn count_all(&self, table: &str) -> u64 {
        self.client
            .clone()
            .count(omnibus_proto::db::v1::CountRequest {
                table: table.into(),
                ..Default::default()
            })
            .await
            .expect("count")
            .into_inner()
            .count
    }

    /// A direct connection to the test database (for checks behind db-svc's back).
    pub async fn sql(&self) -> sqlx::PgConnection {
        self.db.connect().await
    }
}

/// Inserts `n` agent_actions rows of agent `agent` directly, each with `pad` bytes of
/// `action_details`: bulk data for tests of large results.
pub async fn insert_padded_actions(conn: &mut sqlx::PgConnection, agent: &str, pad: i32, n: i32) {
    sqlx::query(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name, \
         action_details) SELECT gen_random_uuid(), $1, 'tool_call', 'read_file', \
         jsonb_build_object('pad', repeat('x', $2)) FROM generate_series(1, $3)",
    )
    .bind(agent)
    .bind(pad)
    .bind(n)
    .execute(conn)
    .await
    .expect("insert padded agent_actions rows");
}

/// A JSON object as a protobuf Struct.
pub fn to_struct(value: Json) -> prost_types::Struct {
    match value {
        Json::Object(map) => prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        },
        other => panic!("not a JSON object: {other}"),
    }
}

/// A JSON value as a protobuf Value.
pub fn to_value(value: Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().expect("finite number")),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Json::Object(_) => Kind::StructValue(to_struct(value)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A protobuf Value as JSON (numbers stay doubles, as the wire has them).
pub fn from_value(value: &prost_types::Value) -> Json {
    use prost_types::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::ListValue(l)) => Json::Array(l.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => from_struct(s),
    }
}

/// A protobuf Struct as a JSON object.
pub fn from_struct(s: &prost_types::Struct) -> Json {
    Json::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), from_value(v)))
            .collect(),
    )
}

/// Rows as JSON objects.
pub fn rows_json(rows: &[prost_types::Struct]) -> Vec<Json> {
    rows.iter().map(from_struct).collect()
}

/// The error code (`ErrorInfo.reason`) and the BadRequest field paths of a status.
pub fn error_details(status: &tonic::Status) -> (String, Vec<String>) {
    let details = status.get_error_details();
    let reason = details
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    let fields = details
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    (reason, fields)
}

/// The `ErrorInfo.metadata` value under `key`.
pub fn error_metadata(status: &tonic::Status, key: &str) -> Option<String> {
    status
        .get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get(key).cloned())
}

/// A valid agent_actions row.
pub fn action(agent: &str) -> Json {
    json!({
        "correlation_id": uuid::Uuid::new_v4().to_string(),
        "agent_name": agent,
        "action_type": "tool_call",
        "action_name": "read_file",
    })
}

/// Holds statements on a table (agent_actions unless [`TableLock::take_on`]) back inside
/// PostgreSQL: an open transaction holding a table lock until `release`. `SHARE` blocks
/// writes, `ACCESS EXCLUSIVE` reads as well.
pub struct TableLock(sqlx::PgConnection, String);

impl TableLock {
    pub async fn take(s: &DbSvc, mode: &str) -> Self {
        Self::take_on(s, "agent_actions", mode).await
    }

    /// Locks `table` (a plain lower-case name) in `mode`.
    pub async fn take_on(s: &DbSvc, table: &str, mode: &str) -> Self {
        Self::take_in(&s.db, table, mode).await
    }

    /// [`TableLock::take_on`] in `db`, served by a db-svc of the test's own making.
    pub async fn take_in(db: &TestDatabase, table: &str, mode: &str) -> Self {
        let mut conn = db.connect().await;
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query(&format!("LOCK TABLE \"{table}\" IN {mode} MODE"))
            .execute(&mut conn)
            .await
            .unwrap();
        Self(conn, table.to_string())
    }

    /// Waits until exactly `n` statements queue for the lock (0: none is left waiting).
    pub async fn wait_blocked(&self, s: &DbSvc, n: i64) {
        self.wait_blocked_in(&s.db, n).await
    }

    /// [`TableLock::wait_blocked`] in `db`, served by a db-svc of the test's own making.
    pub async fn wait_blocked_in(&self, db: &TestDatabase, n: i64) {
        let mut probe = db.connect().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let blocked: i64 = sqlx::query_scalar(
                // Of this database only (a database copied from a template has the same
                // table oids as the other tests' copies).
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = $1 AND NOT l.granted \
                   AND l.database = (SELECT oid FROM pg_database \
                                     WHERE datname = current_database())",
            )
            .bind(&self.1)
            .fetch_one(&mut probe)
            .await
            .unwrap();
            if blocked == n {
                return;
            }
            assert!(Instant::now() < deadline, "{blocked} blocked, never {n}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A `Count` of agent_actions held back by an `ACCESS EXCLUSIVE` lock on it: returned once
    /// it waits for the lock, with the lock (drop or release it to let the call finish).
    pub async fn held_count(
        s: &DbSvc,
    ) -> (
        Self,
        tokio::task::JoinHandle<
            Result<tonic::Response<omnibus_proto::db::v1::CountResponse>, tonic::Status>,
        >,
    ) {
        let lock = Self::take(s, "ACCESS EXCLUSIVE").await;
        let mut client = s.client.clone();
        let held = tokio::spawn(async move {
            client
                .count(omnibus_proto::db::v1::CountRequest {
                    table: "agent_actions".into(),
                    ..Default::default()
                })
                .await
        });
        lock.wait_blocked(s, 1).await;
        (lock, held)
    }

    pub async fn release(mut self) {
        sqlx::query("COMMIT").execute(&mut self.0).await.unwrap();
    }
}

/// Every row a `StreamQuery` stream sends, in order, until it ends (an error fails the test).
pub async fn streamed_rows(
    stream: &mut tonic::Streaming<omnibus_proto::db::v1::StreamQueryResponse>,
) -> Vec<prost_types::Struct> {
    let mut rows = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        rows.extend(batch.rows);
    }
    rows
}

/// The error a stream ends with, its messages before it skipped (a stream that ends without
/// one fails the test).
pub async fn stream_error<T>(stream: &mut tonic::Streaming<T>) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => return e,
        }
    }
}
