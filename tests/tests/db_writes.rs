//! Idempotent writes by request_id, and many clients writing at once.

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{DbSvc, action, error_details, rows_json, to_struct};
use serde_json::json;
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
    let first = s
        .client
        .insert(insert_with_id("req-1", "a"))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.replayed);
    // The retry carries different content (a new correlation id): it must not write.
    let second = s
        .client
        .insert(insert_with_id("req-1", "a"))
        .await
        .unwrap()
        .into_inner();
    assert!(second.replayed);
    assert_eq!(rows_json(&second.rows), rows_json(&first.rows));
    assert_eq!(second.affected, 1);
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
    let err = s
        .client
        .insert(pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![to_struct(action("c")), to_struct(action("c"))],
            request_id: "req-4".into(),
            ..Default::default()
        })
        .await;
    assert!(err.is_ok());
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
    assert_eq!(ids, vec!["req-1", "req-2", "req-4", "req-5"]);
}

#[tokio::test]
async fn concurrent_requests_with_one_id_write_once() {
    let s = DbSvc::start(&[]).await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let mut client = s.client.clone();
        tasks.push(tokio::spawn(async move {
            client
                .insert(insert_with_id("same-id", &format!("racer-{i}")))
                .await
                .map(|r| r.into_inner())
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
