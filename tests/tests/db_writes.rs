//! Idempotent writes by request_id, many clients writing at once, and inserts sharing one
//! statement (group commit).
use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{
    DbSvc, TableLock, action, error_details, error_metadata, from_struct, rows_json, to_struct,
};
use omnibus_tests::free_port;
use omnibus_tests::ops::{sample, wait_metrics};
use serde_json::{Value as Json, json};
use tokio::task::JoinHandle;
use tonic::Code;

async fn count(s: &mut DbSvc, table: &str) -> u64 {
    s.client
        .count(pb::CountRequest {
            table: table.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .count
}

fn insert_with_id(request_id: &str, agent: &str) -> pb::InsertRequest {
    pb::InsertRequest {
        table: "agent_actions".into(),
        rows: vec![to_struct(action(agent))],
        request_id: request_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_repeated_request_id_replays_the_recorded_result() {
    let mut s = DbSvc::start(&[]).await;
    let request = insert_with_id("req-1", "a");
    let first = s.client.insert(request.clone()).await.unwrap().into_inner();
    assert!(!first.replayed);
    // The retry: the recorded result, nothing written again.
    let second = s.client.insert(request).await.unwrap().into_inner();
    assert!(second.replayed);
    assert_eq!(rows_json(&second.rows), rows_json(&first.rows));
    assert_eq!(second.affected, 1);
    assert_eq!(count(&mut s, "agent_actions").await, 1);
    // Another row under the same id (here a new correlation id) is a different write: refused,
    // not answered with the first one's result as if it had been written.
    let err = s
        .client
        .insert(insert_with_id("req-1", "a"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let (reason, _) = error_details(&err);
    assert_eq!(reason, "REQUEST_ID_REUSED");
    assert!(
        err.message()
            .contains("a different insert on agent_actions"),
        "{}",
        err.message()
    );
    assert_eq!(
        error_metadata(&err, "recorded_operation").as_deref(),
        Some("insert on agent_actions")
    );
    assert_eq!(error_metadata(&err, "mismatch").as_deref(), Some("values"));
    assert_eq!(count(&mut s, "agent_actions").await, 1);

    // Updates and deletes too: a replay returns the recorded result even though the data
    // has changed since.
    let update = pb::UpdateRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({"agent_name": "a"}))),
        set: Some(to_struct(json!({"agent_name": "b"}))),
        request_id: "req-2".into(),
        ..Default::default()
    };
    let first = s.client.update(update.clone()).await.unwrap().into_inner();
    assert_eq!((first.affected, first.replayed), (1, false));
    let again = s.client.update(update).await.unwrap().into_inner();
    assert_eq!((again.affected, again.replayed), (1, true));

    // The same id for another operation is refused.
    let err = s
        .client
        .delete(pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "b"}))),
            request_id: "req-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(error_details(&err).0, "REQUEST_ID_REUSED");
    assert_eq!(
        error_metadata(&err, "mismatch").as_deref(),
        Some("operation")
    );
    assert_eq!(count(&mut s, "agent_actions").await, 1);

    // A failed write records nothing: the corrected retry with the same id goes through.
    let mut bad = action("c");
    bad["duration_ms"] = json!("slow");
    let err = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(bad)],
            request_id: "req-3".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let corrected = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(action("c")), to_struct(action("c"))],
            request_id: "req-3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(corrected.affected, 2);
    assert!(!corrected.replayed);
    let mut dup = action("d");
    dup["id"] = json!(uuid::Uuid::new_v4().to_string());
    let err = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(dup.clone()), to_struct(dup.clone())],
            request_id: "req-5".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let ok = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(dup)],
            request_id: "req-5".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ok.replayed);
    assert_eq!(count(&mut s, "agent_actions").await, 4);

    // The record lives in db-svc's table, one row per id.
    let mut conn = s.sql().await;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM omnibus_request_log ORDER BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(ids, vec!["req-1", "req-2", "req-3", "req-5"]);
}

#[tokio::test]
async fn concurrent_requests_with_one_id_write_once() {
    let s = DbSvc::start(&[]).await;
    // One request sent 16 times at once (a client's retries racing its first attempt).
    let request = insert_with_id("same-id", "racer");
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (mut client, request) = (s.client.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            client.insert(request).await.map(|r| r.into_inner())
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap().expect("every racer gets the result"));
    }
    assert_eq!(replies.iter().filter(|r| !r.replayed).count(), 1);
    let first = rows_json(&replies[0].rows);
    assert!(replies.iter().all(|r| rows_json(&r.rows) == first));
    let mut s = s;
    assert_eq!(count(&mut s, "agent_actions").await, 1);
}

#[tokio::test]
async fn many_clients_writing_at_once_lose_nothing() {
    let s = DbSvc::start(&[]).await;
    const CLIENTS: usize = 32;
    const WRITES: usize = 20;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        // Each client its own connection, as separate processes would have.
        let mut client = omnibus_proto::db::v1::database_service_client::DatabaseServiceClient::new(
            s.svc.channel(),
        );
        tasks.push(tokio::spawn(async move {
            for w in 0..WRITES {
                let rows = if w % 5 == 0 {
                    vec![
                        to_struct(action(&format!("c{c}-w{w}-a"))),
                        to_struct(action(&format!("c{c}-w{w}-b"))),
                    ]
                } else {
                    vec![to_struct(action(&format!("c{c}-w{w}")))]
                };
                let n = rows.len() as u64;
                let reply = client
                    .insert(pb::InsertRequest {
                        table: "agent_actions".into(),
                        rows,
                        count_only: w % 2 == 0,
                        request_id: if w % 3 == 0 {
                            format!("c{c}-w{w}")
                        } else {
                            String::new()
                        },
                    })
                    .await
                    .expect("insert");
                assert_eq!(reply.into_inner().affected, n);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let expected = (CLIENTS * (WRITES + WRITES / 5)) as u64;
    let mut s = s;
    assert_eq!(count(&mut s, "agent_actions").await, expected);
    let mut conn = s.sql().await;
    let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT agent_name) FROM agent_actions")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(distinct as u64, expected);
}

type InsertReply = Result<pb::InsertResponse, tonic::Status>;

fn spawn_insert(s: &DbSvc, row: Json) -> JoinHandle<InsertReply> {
    let mut client = s.client.clone();
    tokio::spawn(async move {
        client
            .insert(pb::InsertRequest {
                table: "agent_actions".into(),
                rows: vec![to_struct(row)],
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    })
}

/// A request_id the request log cannot hold (longer than 1,024 bytes - past ~2.7 KB its
/// index refuses it - or with a NUL) is INVALID_ARGUMENT naming `request_id`, for every
/// write and raw writes, and nothing is written; one of 1,024 bytes works and replays.
#[tokio::test]
async fn request_ids_the_request_log_cannot_hold_are_refused_by_field() {
    let mut s = DbSvc::start(&["--raw-sql-writes", "true"]).await;
    let invalid = |err: &tonic::Status| {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            error_details(err),
            (
                "VALIDATION_ERROR".to_string(),
                vec!["request_id".to_string()]
            ),
            "{err:?}"
        );
    };
    for id in ["x".repeat(1025), "x".repeat(3000), "a\0b".to_string()] {
        invalid(&s.client.insert(insert_with_id(&id, "a")).await.unwrap_err());
        let update = pb::UpdateRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "a"}))),
            set: Some(to_struct(json!({"agent_name": "b"}))),
            request_id: id.clone(),
            ..Default::default()
        };
        invalid(&s.client.update(update).await.unwrap_err());
        let delete = pb::DeleteRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({"agent_name": "a"}))),
            request_id: id.clone(),
            ..Default::default()
        };
        invalid(&s.client.delete(delete).await.unwrap_err());
        let upsert = pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(action("a"))],
            request_id: id.clone(),
            ..Default::default()
        };
        invalid(&s.client.upsert(upsert).await.unwrap_err());
        let raw = pb::ExecuteRawRequest {
            sql: "INSERT INTO agent_actions (correlation_id, agent_name, action_type, \
                  action_name) VALUES (gen_random_uuid(), 'raw', 't', 'n')"
                .into(),
            request_id: id.clone(),
            ..Default::default()
        };
        invalid(&s.client.execute_raw(raw).await.unwrap_err());
    }
    assert_eq!(count(&mut s, "agent_actions").await, 0, "nothing written");
    let longest = insert_with_id(&"x".repeat(1024), "a");
    let first = s.client.insert(longest.clone()).await.unwrap().into_inner();
    let again = s.client.insert(longest).await.unwrap().into_inner();
    assert_eq!((first.replayed, again.replayed), (false, true));
    assert_eq!(count(&mut s, "agent_actions").await, 1);
}

/// db-svc with one INSERT statement per table at a time (so the next inserts must wait and
/// share), and the address of its metrics.
async fn one_insert_at_a_time() -> (DbSvc, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let s = DbSvc::start(&["--coalesce-inserts", "1", "--metrics-listen", &metrics]).await;
    (s, metrics)
}

fn requests_per_statement(m: &std::collections::BTreeMap<String, f64>) -> (f64, f64) {
    (
        sample(m, "db_insert_statement_requests_count", &[]).unwrap_or(0.0),
        sample(m, "db_insert_statement_requests_sum", &[]).unwrap_or(0.0),
    )
}

#[tokio::test]
async fn inserts_that_arrive_while_one_runs_share_a_statement_and_get_their_own_rows() {
    let (mut s, metrics) = one_insert_at_a_time().await;
    let lock = TableLock::take(&s, "SHARE").await;
    let first = spawn_insert(&s, action("first"));
    lock.wait_blocked(&s, 1).await;
    // The lane's one statement is stuck: these ten wait in db-svc and then share one.
    let shared: Vec<_> = (0..10)
        .map(|i| spawn_insert(&s, action(&format!("shared-{i}"))))
        .collect();
    wait_metrics(&metrics, "ten inserts waiting", |m| {
        sample(m, "db_insert_requests_waiting", &[]) == Some(10.0)
    })
    .await;
    lock.release().await;

    let first = first.await.unwrap().expect("first insert");
    assert_eq!(from_struct(&first.rows[0])["agent_name"], "first");
    for (i, task) in shared.into_iter().enumerate() {
        let reply = task.await.unwrap().expect("shared insert");
        assert_eq!(reply.affected, 1);
        assert_eq!(reply.rows.len(), 1, "its own row, not the batch's");
        let row = from_struct(&reply.rows[0]);
        assert_eq!(row["agent_name"], format!("shared-{i}"));
        assert!(row["id"].is_string() && row["created_at"].is_string());
    }
    assert_eq!(count(&mut s, "agent_actions").await, 11);
    let body = wait_metrics(&metrics, "two statements", |m| {
        requests_per_statement(m) == (2.0, 11.0)
    })
    .await;
    assert!(body.contains("db_insert_requests_waiting 0"), "{body}");
}

#[tokio::test]
async fn a_bad_insert_in_a_shared_statement_fails_alone() {
    let (mut s, metrics) = one_insert_at_a_time().await;
    // Every row names its id, so all share one lane (one column list).
    let with_id = |agent: &str, id: &str| {
        let mut row = action(agent);
        row["id"] = json!(id);
        row
    };
    let dup = uuid::Uuid::new_v4().to_string();
    let lock = TableLock::take(&s, "SHARE").await;
    let first = spawn_insert(&s, with_id("first", &uuid::Uuid::new_v4().to_string()));
    lock.wait_blocked(&s, 1).await;
    let ok_a = spawn_insert(&s, with_id("ok-a", &uuid::Uuid::new_v4().to_string()));
    let dup_a = spawn_insert(&s, with_id("dup-a", &dup));
    let ok_b = spawn_insert(&s, with_id("ok-b", &uuid::Uuid::new_v4().to_string()));
    let dup_b = spawn_insert(&s, with_id("dup-b", &dup));
    wait_metrics(&metrics, "four inserts waiting", |m| {
        sample(m, "db_insert_requests_waiting", &[]) == Some(4.0)
    })
    .await;
    lock.release().await;

    first.await.unwrap().expect("first");
    for (name, task) in [("ok-a", ok_a), ("ok-b", ok_b)] {
        let reply = task.await.unwrap().expect(name);
        assert_eq!(from_struct(&reply.rows[0])["agent_name"], name);
    }
    // The shared statement failed on the duplicate key; run one by one, the first of the two
    // duplicates is written and only the second fails.
    let (a, b) = (dup_a.await.unwrap(), dup_b.await.unwrap());
    let (written, failed) = match (a, b) {
        (Ok(w), Err(f)) | (Err(f), Ok(w)) => (w, f),
        other => panic!("exactly one duplicate must fail: {other:?}"),
    };
    assert!(
        from_struct(&written.rows[0])["agent_name"]
            .as_str()
            .is_some_and(|n| n.starts_with("dup-"))
    );
    assert_eq!(failed.code(), Code::AlreadyExists, "{failed:?}");
    assert!(
        failed.message().contains("agent_actions_pkey"),
        "{failed:?}"
    );
    assert_eq!(count(&mut s, "agent_actions").await, 4);
    // 1 (first) + 1 shared attempt of 4 + 4 alone.
    wait_metrics(&metrics, "the retry one by one", |m| {
        requests_per_statement(m) == (6.0, 9.0)
    })
    .await;
}

/// A shared insert that PostgreSQL ran but whose returned rows db-svc cannot read (a column
/// retyped behind its back to a type without a mapping) is not run again: each row is written
/// once, and every insert in it gets the error.
#[tokio::test]
async fn a_shared_insert_whose_rows_cannot_be_read_back_is_not_written_twice() {
    let (mut s, metrics) = one_insert_at_a_time().await;
    let mut conn = s.sql().await;
    sqlx::query("ALTER TABLE agent_actions ALTER COLUMN duration_ms TYPE point USING NULL")
        .execute(&mut conn)
        .await
        .unwrap();
    let lock = TableLock::take(&s, "SHARE").await;
    let first = spawn_insert(&s, action("first"));
    lock.wait_blocked(&s, 1).await;
    let shared: Vec<_> = (0..4)
        .map(|i| spawn_insert(&s, action(&format!("shared-{i}"))))
        .collect();
    wait_metrics(&metrics, "four inserts waiting", |m| {
        sample(m, "db_insert_requests_waiting", &[]) == Some(4.0)
    })
    .await;
    lock.release().await;

    for task in std::iter::once(first).chain(shared) {
        let e = task
            .await
            .unwrap()
            .expect_err("the rows cannot be returned");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("duration_ms"), "{e:?}");
    }
    // Written once each: the first alone, the other four in one shared statement.
    assert_eq!(count(&mut s, "agent_actions").await, 5);
    wait_metrics(&metrics, "no statement run again", |m| {
        requests_per_statement(m) == (2.0, 5.0)
    })
    .await;
}

#[tokio::test]
async fn an_insert_whose_caller_gave_up_while_it_waited_is_not_written() {
    let (mut s, metrics) = one_insert_at_a_time().await;
    let lock = TableLock::take(&s, "SHARE").await;
    let first = spawn_insert(&s, action("first"));
    lock.wait_blocked(&s, 1).await;
    let kept = spawn_insert(&s, action("kept"));
    let abandoned = spawn_insert(&s, action("abandoned"));
    wait_metrics(&metrics, "two inserts waiting", |m| {
        sample(m, "db_insert_requests_waiting", &[]) == Some(2.0)
    })
    .await;
    // The client gives up (as on a client-side timeout): its call is reset.
    abandoned.abort();
    let cancelled = [
        ("grpc_service", "omnibus.db.v1.DatabaseService"),
        ("grpc_method", "Insert"),
        ("grpc_code", "Canceled"),
    ];
    wait_metrics(&metrics, "db-svc seeing the cancellation", |m| {
        sample(m, "grpc_server_handled_total", &cancelled) == Some(1.0)
    })
    .await;
    lock.release().await;

    first.await.unwrap().expect("first");
    let kept = kept.await.unwrap().expect("kept");
    assert_eq!(from_struct(&kept.rows[0])["agent_name"], "kept");
    let mut conn = s.sql().await;
    let agents: Vec<String> =
        sqlx::query_scalar("SELECT agent_name FROM agent_actions ORDER BY agent_name")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(agents, vec!["first", "kept"]);
    assert_eq!(count(&mut s, "agent_actions").await, 2);
}

async fn agents(s: &DbSvc) -> Vec<String> {
    let mut conn = s.sql().await;
    sqlx::query_scalar("SELECT agent_name FROM agent_actions ORDER BY agent_name")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

/// Delete and Upsert replay by request_id as Insert and Update do: the repeat returns the
/// recorded result, marked replayed, and writes nothing, though a fresh run would have.
#[tokio::test]
async fn delete_and_upsert_replay_by_request_id() {
    let mut s = DbSvc::start(&[]).await;
    s.seed_actions(vec![action("a"), action("a"), action("b")])
        .await;

    let delete = pb::DeleteRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({"agent_name": "a"}))),
        request_id: "del-1".into(),
        ..Default::default()
    };
    let first = s.client.delete(delete.clone()).await.unwrap().into_inner();
    assert_eq!((first.affected, first.replayed), (2, false));
    assert_eq!(first.rows.len(), 2);
    // A new matching row: running the delete again would remove it.
    s.seed_actions(vec![action("a")]).await;
    let again = s.client.delete(delete).await.unwrap().into_inner();
    assert_eq!((again.affected, again.replayed), (2, true));
    assert_eq!(rows_json(&again.rows), rows_json(&first.rows));
    assert_eq!(agents(&s).await, vec!["a", "b"], "deleted once");

    // Upsert: the replay is the recorded result; other content under the same id is refused.
    let (id, correlation) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let upsert = |agent: &str| {
        let mut row = action(agent);
        row["id"] = json!(id);
        row["correlation_id"] = json!(correlation);
        pb::UpsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(row)],
            request_id: "up-1".into(),
            ..Default::default()
        }
    };
    let first = s.client.upsert(upsert("up")).await.unwrap().into_inner();
    assert_eq!((first.affected, first.replayed), (1, false));
    assert_eq!(from_struct(&first.rows[0])["agent_name"], "up");
    let again = s.client.upsert(upsert("up")).await.unwrap().into_inner();
    assert_eq!((again.affected, again.replayed), (1, true));
    assert_eq!(rows_json(&again.rows), rows_json(&first.rows));
    let err = s.client.upsert(upsert("changed")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(error_details(&err).0, "REQUEST_ID_REUSED");
    assert_eq!(agents(&s).await, vec!["a", "b", "up"], "upserted once");
    // The same upsert under a new id does write (so the replay above was what kept it out).
    let fresh = s
        .client
        .upsert(pb::UpsertRequest {
            request_id: "up-2".into(),
            count_only: true,
            ..upsert("changed")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((fresh.affected, fresh.replayed), (1, false));
    assert!(fresh.rows.is_empty());
    let replayed = s
        .client
        .upsert(pb::UpsertRequest {
            request_id: "up-2".into(),
            count_only: true,
            ..upsert("changed")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((replayed.affected, replayed.replayed), (1, true));
    assert!(replayed.rows.is_empty());
    assert_eq!(agents(&s).await, vec!["a", "b", "changed"]);
    assert_eq!(count(&mut s, "agent_actions").await, 3);

    // One record per id, with the operation it was first used for.
    let mut conn = s.sql().await;
    let log: Vec<(String, String)> =
        sqlx::query_as("SELECT request_id, operation FROM omnibus_request_log ORDER BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let log: Vec<(&str, &str)> = log.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        log,
        vec![("del-1", "delete"), ("up-1", "upsert"), ("up-2", "upsert")]
    );
}

/// A shared insert that times out because one of its rows waits on another transaction's
/// lock runs again insert by insert, side by side: the others are written at once, only the
/// waiting one times out.
#[tokio::test]
async fn a_timed_out_shared_insert_fails_only_the_insert_that_waits() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut s = DbSvc::start(&[
        "--coalesce-inserts",
        "1",
        "--statement-timeout",
        "4s",
        "--metrics-listen",
        &metrics,
    ])
    .await;
    let with_id = |agent: &str, id: &str| {
        let mut row = action(agent);
        row["id"] = json!(id);
        row
    };
    // Another transaction inserts `held` and stays open: inserts of the same key wait on it.
    let held = uuid::Uuid::new_v4().to_string();
    let mut other = s.db.connect().await;
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query(
        "INSERT INTO agent_actions (id, correlation_id, agent_name, action_type, action_name) \
         VALUES ($1::uuid, gen_random_uuid(), 'other', 'tool_call', 'x')",
    )
    .bind(&held)
    .execute(&mut other)
    .await
    .unwrap();
    // The lane's one statement waits on the held key; the next three queue and share.
    let first = spawn_insert(&s, with_id("first", &held));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            // Of this test's database only: tests in parallel wait on locks of their own.
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'transactionid' AND NOT l.granted \
               AND a.datname = current_database()",
        )
        .fetch_one(&mut other)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first insert never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ok_a = spawn_insert(&s, with_id("ok-a", &uuid::Uuid::new_v4().to_string()));
    let waits = spawn_insert(&s, with_id("waits", &held));
    let ok_b = spawn_insert(&s, with_id("ok-b", &uuid::Uuid::new_v4().to_string()));
    wait_metrics(&metrics, "three inserts waiting", |m| {
        sample(m, "db_insert_requests_waiting", &[]) == Some(3.0)
    })
    .await;

    let timed_out = |r: InsertReply, name: &str| {
        let e = r.expect_err(name);
        assert_eq!(e.code(), Code::DeadlineExceeded, "{name}: {e:?}");
    };
    timed_out(first.await.unwrap(), "first");
    for (name, task) in [("ok-a", ok_a), ("ok-b", ok_b)] {
        let reply = task.await.unwrap().expect(name);
        assert_eq!(from_struct(&reply.rows[0])["agent_name"], name);
    }
    // The reruns run side by side: ok-b (after `waits` in the batch) did not wait for the
    // statement timeout of `waits`, which is still waiting on the lock.
    assert!(
        !waits.is_finished(),
        "ok-b was held up by the waiting insert"
    );
    timed_out(waits.await.unwrap(), "waits");
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    assert_eq!(count(&mut s, "agent_actions").await, 2);
}

/// A replay answers with the very values of the first answer, numbers included: the recorded
/// result is jsonb, which prints the double 1e16 as the integer 10000000000000000, and that
/// must come back as the number it was, not as a bigint's decimal text.
#[tokio::test]
async fn a_replay_returns_numbers_as_numbers_whatever_their_size() {
    let mut s = DbSvc::start_with(
        "CREATE TABLE readings (id bigint PRIMARY KEY, precise double precision, \
             amount numeric, ratio real, doc jsonb)",
        "readings",
    )
    .await;
    let request = pb::InsertRequest {
        table: "readings".into(),
        rows: vec![
            to_struct(
                // A numeric beyond ±(2^53 - 1) is sent as text (a double is refused).
                json!({"id": 1, "precise": 1e16, "amount": "12345678901234567890",
                "ratio": 0.1, "doc": {"big": 1e16, "list": [1.5, 2e20]}}),
            ),
            to_struct(
                json!({"id": "9007199254740993", "precise": 1e300, "amount": "-1e17",
                "ratio": -3, "doc": [9007199254740993u64]}),
            ),
            to_struct(
                json!({"id": 2, "precise": "NaN", "amount": 0.5, "ratio": null,
                "doc": null}),
            ),
        ],
        request_id: "req-numbers".into(),
        ..Default::default()
    };
    let first = s.client.insert(request.clone()).await.unwrap().into_inner();
    assert!(!first.replayed);
    assert_eq!(first.rows.len(), 3);
    let second = s.client.insert(request).await.unwrap().into_inner();
    assert!(second.replayed);
    assert_eq!(second.rows, first.rows);
    assert_eq!(rows_json(&second.rows)[0]["precise"], json!(1e16));
    assert_eq!(count(&mut s, "readings").await, 3);
}

/// A `BEFORE INSERT` trigger that skips rows, created while db-svc runs (its catalog does not
/// show it yet): the shared insert that would insert fewer rows than it was given fails
/// itself (writing nothing), the table is read again, and its inserts run alone, each getting its own answer with
/// every kept row written once; from then on the table's inserts never share.
#[tokio::test]
async fn a_skipping_trigger_created_while_db_svc_runs_rolls_a_shared_insert_back() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let s = DbSvc::start_with_args(
        "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)",
        &[
            "--tables",
            "notes",
            "--coalesce-inserts",
            "1",
            "--metrics-listen",
            &metrics,
        ],
    )
    .await;
    let mut conn = s.sql().await;
    for sql in [
        "CREATE FUNCTION skip_some() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.body LIKE 'skip%' THEN RETURN NULL; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER skip_some BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION skip_some()",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let spawn = |body: String| {
        let mut client = s.client.clone();
        let row = json!({ "body": body });
        let task = tokio::spawn(async move {
            client
                .insert(pb::InsertRequest {
                    table: "notes".into(),
                    rows: vec![to_struct(row)],
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        });
        (body, task)
    };
    let body = |round: u32, i: u32| {
        if i.is_multiple_of(3) {
            format!("skip-{round}-{i}")
        } else {
            format!("keep-{round}-{i}")
        }
    };
    let check = |(body, reply): (String, InsertReply)| {
        let reply = reply.unwrap_or_else(|e| panic!("{body}: {e:?}"));
        if body.starts_with("skip") {
            assert_eq!((reply.affected, reply.rows.len()), (0, 0), "{body}");
        } else {
            assert_eq!(reply.affected, 1, "{body}");
            assert_eq!(from_struct(&reply.rows[0])["body"], json!(body));
        }
    };
    let lock = TableLock::take_on(&s, "notes", "SHARE").await;
    let first = spawn(body(1, 1));
    lock.wait_blocked(&s, 1).await;
    let shared: Vec<_> = (2..11).map(|i| spawn(body(1, i))).collect();
    wait_metrics(&metrics, "nine inserts waiting", |m| {
        sample(m, "db_insert_requests_waiting", &[]) == Some(9.0)
    })
    .await;
    lock.release().await;
    for (body, task) in std::iter::once(first).chain(shared) {
        check((body, task.await.unwrap()));
    }
    // 1 (first) + 1 shared statement of 9, rolled back + 9 alone.
    wait_metrics(&metrics, "the shared statement and the nine alone", |m| {
        requests_per_statement(m) == (11.0, 19.0)
    })
    .await;

    // Read again, the table is known to skip rows: its inserts no longer share.
    let lock = TableLock::take_on(&s, "notes", "SHARE").await;
    let tasks: Vec<_> = (0..6).map(|i| spawn(body(2, i))).collect();
    lock.wait_blocked(&s, 6).await;
    lock.release().await;
    for (body, task) in tasks {
        check((body, task.await.unwrap()));
    }

    let stored: Vec<String> = sqlx::query_scalar("SELECT body FROM notes ORDER BY body")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let mut kept: Vec<String> = (1..11)
        .map(|i| body(1, i))
        .chain((0..6).map(|i| body(2, i)))
        .filter(|b| b.starts_with("keep"))
        .collect();
    kept.sort();
    assert_eq!(stored, kept, "every kept row once, no skipped one");
}

/// Inserts into a table whose rows a `BEFORE INSERT` trigger may skip - on the table or only
/// on one of its partitions - never share a statement (their RETURNING rows could not be
/// matched to requests): concurrent inserts, held back by a lock so that they queue, each
/// get exactly their own outcome.
#[tokio::test]
async fn inserts_into_tables_with_skipping_triggers_never_share() {
    let db = omnibus_tests::TestDatabase::create().await.unwrap();
    let mut conn = db.connect().await;
    for sql in [
        "CREATE FUNCTION skip_some() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF NEW.body LIKE 'skip%' THEN RETURN NULL; END IF; RETURN NEW; END $$",
        "CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)",
        "CREATE TRIGGER skip_some BEFORE INSERT ON notes FOR EACH ROW EXECUTE FUNCTION skip_some()",
        "CREATE TABLE parted (id int NOT NULL, body text NOT NULL) PARTITION BY RANGE (id)",
        "CREATE TABLE parted_low PARTITION OF parted FOR VALUES FROM (0) TO (1000)",
        "CREATE TRIGGER skip_some BEFORE INSERT ON parted_low FOR EACH ROW EXECUTE FUNCTION skip_some()",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let s = DbSvc::start_on(db, &["--tables", "notes,parted", "--coalesce-inserts", "1"]).await;
    for table in ["notes", "parted"] {
        let lock = TableLock::take_on(&s, table, "SHARE").await;
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let body = if i % 3 == 0 {
                    format!("skip-{i}")
                } else {
                    format!("keep-{i}")
                };
                let mut client = s.client.clone();
                let row = json!({"id": i, "body": body});
                let table = table.to_string();
                (
                    body,
                    tokio::spawn(async move {
                        client
                            .insert(pb::InsertRequest {
                                table,
                                rows: vec![to_struct(row)],
                                ..Default::default()
                            })
                            .await
                            .map(|r| r.into_inner())
                    }),
                )
            })
            .collect();
        // All twelve reach PostgreSQL as statements of their own and wait on the lock (with
        // sharing, fewer statements would wait: the rest would queue inside db-svc).
        lock.wait_blocked(&s, 12).await;
        lock.release().await;
        for (body, task) in tasks {
            let reply = task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{table} {body}: {e:?}"));
            if body.starts_with("skip") {
                assert_eq!((reply.affected, reply.rows.len()), (0, 0), "{table} {body}");
            } else {
                assert_eq!(reply.affected, 1, "{table} {body}");
                assert_eq!(from_struct(&reply.rows[0])["body"], json!(body), "{table}");
            }
        }
    }
}
