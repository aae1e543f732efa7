//! Queries of one shape sharing a statement (`--coalesce-queries`): each request still gets
//! exactly its own rows, in its own order.

use std::collections::BTreeMap;

use omnibus_proto::db::v1 as pb;
use omnibus_tests::db::{DbSvc, TableLock, action, rows_json, to_struct, to_value};
use omnibus_tests::free_port;
use omnibus_tests::ops::{sample, wait_metrics};
use serde_json::{Value as Json, json};
use tokio::task::JoinHandle;

const AGENTS: usize = 10;

/// db-svc with one statement per query shape at a time (so further queries must wait and
/// share), the address of its metrics, and agents `agent-0..9` with 2..=6 rows each.
async fn one_query_at_a_time() -> (DbSvc, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut s = DbSvc::start(&["--coalesce-queries", "1", "--metrics-listen", &metrics]).await;
    let rows = (0..AGENTS)
        .flat_map(|a| {
            (0..2 + a % 5).map(move |n| {
                let mut row = action(&format!("agent-{a}"));
                row["duration_ms"] = json!(n * 10 + a);
                row
            })
        })
        .collect();
    s.seed_actions(rows).await;
    (s, metrics)
}

/// The three slowest actions of `agent`, newest duration first.
fn slowest(agent: &str) -> pb::QueryRequest {
    pb::QueryRequest {
        table: "agent_actions".into(),
        r#where: Some(to_struct(json!({ "agent_name": agent }))),
        columns: vec!["agent_name".into(), "duration_ms".into(), "id".into()],
        order_by: vec![pb::OrderBy {
            column: "duration_ms".into(),
            direction: pb::Direction::Desc as i32,
            ..Default::default()
        }],
        limit: Some(3),
        ..Default::default()
    }
}

fn spawn_query(s: &DbSvc, request: pb::QueryRequest) -> JoinHandle<Vec<Json>> {
    let mut client = s.client.clone();
    tokio::spawn(async move {
        let reply = client.query(request).await.expect("query").into_inner();
        rows_json(&reply.rows)
    })
}

/// What the query returns straight from PostgreSQL (of `agent`, or of all agents).
async fn expected(s: &DbSvc, agent: Option<&str>) -> Vec<Json> {
    let mut conn = s.sql().await;
    let sql = format!(
        "SELECT agent_name, duration_ms, id FROM agent_actions {} \
         ORDER BY duration_ms DESC LIMIT 3",
        if agent.is_some() {
            "WHERE agent_name = $1"
        } else {
            ""
        }
    );
    let query = sqlx::query_as::<_, (String, i32, uuid::Uuid)>(&sql);
    let query = match agent {
        Some(agent) => query.bind(agent),
        None => query,
    };
    let rows = query.fetch_all(&mut conn).await.unwrap();
    rows.into_iter()
        // Numbers cross the API as doubles.
        .map(|(a, d, id)| json!({"agent_name": a, "duration_ms": f64::from(d), "id": id.to_string()}))
        .collect()
}

fn requests_per_statement(m: &BTreeMap<String, f64>) -> (f64, f64) {
    (
        sample(m, "db_query_statement_requests_count", &[]).unwrap_or(0.0),
        sample(m, "db_query_statement_requests_sum", &[]).unwrap_or(0.0),
    )
}

#[tokio::test]
async fn queries_that_arrive_while_one_runs_share_a_statement_and_get_their_own_rows() {
    let (s, metrics) = one_query_at_a_time().await;
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let first = spawn_query(&s, slowest("agent-0"));
    lock.wait_blocked(&s, 1).await;
    // The shape's one statement is stuck: these wait in db-svc, then share one statement.
    // Agent 3 twice, and agents without rows among the others (their requests are answered
    // empty when a later request's rows arrive) and last.
    let mut agents: Vec<String> = (0..AGENTS)
        .map(|a| format!("agent-{a}"))
        .chain(["agent-3".into(), "nobody".into()])
        .collect();
    agents.insert(4, "no-one".into());
    let shared: Vec<_> = agents.iter().map(|a| spawn_query(&s, slowest(a))).collect();
    wait_metrics(&metrics, "thirteen queries waiting", |m| {
        sample(m, "db_query_requests_waiting", &[]) == Some(13.0)
    })
    .await;
    lock.release().await;

    assert_eq!(first.await.unwrap(), expected(&s, Some("agent-0")).await);
    for (agent, task) in agents.iter().zip(shared) {
        let rows = task.await.unwrap();
        assert_eq!(rows, expected(&s, Some(agent)).await, "{agent}");
        let want = if agent.starts_with("no") {
            0
        } else {
            2 + agent[6..].parse::<usize>().unwrap() % 5
        };
        assert_eq!(rows.len(), want.min(3), "{agent}");
    }
    let body = wait_metrics(&metrics, "two statements", |m| {
        requests_per_statement(m) == (2.0, 14.0)
    })
    .await;
    assert!(body.contains("db_query_requests_waiting 0"), "{body}");
}

/// A served table named `k`, with a column `p1`: the shared statement's own alias for the
/// unnested parameters (`k`, columns `p1..`) must not be hidden by the table's name inside the
/// subquery, where `"p1" = k.p1` would compare the column with itself and give every request
/// every row.
#[tokio::test]
async fn a_table_named_like_the_shared_statements_alias_still_gets_its_own_rows() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let s = DbSvc::start_with_args(
        "CREATE TABLE k (id int PRIMARY KEY, p1 text NOT NULL); \
         INSERT INTO k SELECT n, chr(97 + n % 3) FROM generate_series(1, 9) n",
        &[
            "--tables",
            "k",
            "--coalesce-queries",
            "1",
            "--metrics-listen",
            &metrics,
        ],
    )
    .await;
    let by_p1 = |p1: &str| pb::QueryRequest {
        table: "k".into(),
        r#where: Some(to_struct(json!({ "p1": p1 }))),
        order_by: vec![pb::OrderBy {
            column: "id".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let ids =
        |rows: Vec<Json>| -> Vec<f64> { rows.iter().map(|r| r["id"].as_f64().unwrap()).collect() };
    let lock = TableLock::take_on(&s, "k", "ACCESS EXCLUSIVE").await;
    let first = spawn_query(&s, by_p1("a"));
    lock.wait_blocked(&s, 1).await;
    let keys = ["b", "c", "a", "none"];
    let shared: Vec<_> = keys.iter().map(|p1| spawn_query(&s, by_p1(p1))).collect();
    wait_metrics(&metrics, "four queries waiting", |m| {
        sample(m, "db_query_requests_waiting", &[]) == Some(4.0)
    })
    .await;
    lock.release().await;
    assert_eq!(ids(first.await.unwrap()), vec![3.0, 6.0, 9.0]);
    let want: [&[f64]; 4] = [&[1.0, 4.0, 7.0], &[2.0, 5.0, 8.0], &[3.0, 6.0, 9.0], &[]];
    for ((p1, task), want) in keys.iter().zip(shared).zip(want) {
        assert_eq!(ids(task.await.unwrap()), want, "{p1}");
    }
    wait_metrics(&metrics, "two statements", |m| {
        requests_per_statement(m) == (2.0, 5.0)
    })
    .await;
}

#[tokio::test]
async fn different_shapes_and_limits_never_share() {
    let (s, metrics) = one_query_at_a_time().await;
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let first = spawn_query(&s, slowest("agent-1"));
    let other_limit = spawn_query(
        &s,
        pb::QueryRequest {
            limit: Some(1),
            ..slowest("agent-2")
        },
    );
    let other_filter = spawn_query(
        &s,
        pb::QueryRequest {
            r#where: None,
            filter: Some(pb::Filter {
                kind: Some(pb::filter::Kind::Condition(pb::Condition {
                    column: "agent_name".into(),
                    op: pb::Operator::Neq as i32,
                    value: Some(to_value(json!("agent-1"))),
                })),
            }),
            ..slowest("agent-1")
        },
    );
    // Three lanes, each with its own free slot: all three reach PostgreSQL at once.
    lock.wait_blocked(&s, 3).await;
    lock.release().await;
    assert_eq!(first.await.unwrap(), expected(&s, Some("agent-1")).await);
    assert_eq!(
        other_limit.await.unwrap(),
        expected(&s, Some("agent-2")).await[..1].to_vec()
    );
    let others = other_filter.await.unwrap();
    assert_eq!(others.len(), 3);
    assert!(others.iter().all(|r| r["agent_name"] != "agent-1"));
    wait_metrics(&metrics, "three statements of one request", |m| {
        requests_per_statement(m) == (3.0, 3.0)
    })
    .await;
}

#[tokio::test]
async fn many_clients_querying_at_once_each_get_their_own_rows() {
    let (s, _metrics) = one_query_at_a_time().await;
    let mut want = BTreeMap::new();
    for a in 0..AGENTS {
        let agent = format!("agent-{a}");
        want.insert(agent.clone(), expected(&s, Some(&agent)).await);
    }
    let tasks: Vec<JoinHandle<()>> = (0..32)
        .map(|c| {
            let (client, want) = (s.client.clone(), want.clone());
            tokio::spawn(async move {
                for i in 0..25 {
                    let agent = format!("agent-{}", (c * 7 + i) % AGENTS);
                    let reply = client
                        .clone()
                        .query(slowest(&agent))
                        .await
                        .expect("query")
                        .into_inner();
                    assert_eq!(rows_json(&reply.rows), want[&agent], "{agent}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
}

/// Counts the rows of `agent`, or of all agents.
fn spawn_count(s: &DbSvc, agent: Option<&str>) -> JoinHandle<u64> {
    let mut client = s.client.clone();
    let request = pb::CountRequest {
        table: "agent_actions".into(),
        r#where: agent.map(|agent| to_struct(json!({ "agent_name": agent }))),
        ..Default::default()
    };
    tokio::spawn(async move {
        client
            .count(request)
            .await
            .expect("count")
            .into_inner()
            .count
    })
}

#[tokio::test]
async fn counts_of_one_shape_share_a_statement_and_get_their_own_count() {
    let (s, metrics) = one_query_at_a_time().await;
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let first = spawn_count(&s, Some("agent-4"));
    lock.wait_blocked(&s, 1).await;
    let agents: Vec<String> = (0..AGENTS)
        .map(|a| format!("agent-{a}"))
        .chain(["nobody".into()])
        .collect();
    let shared: Vec<_> = agents.iter().map(|a| spawn_count(&s, Some(a))).collect();
    wait_metrics(&metrics, "eleven counts waiting", |m| {
        sample(m, "db_query_requests_waiting", &[]) == Some(11.0)
    })
    .await;
    lock.release().await;

    assert_eq!(first.await.unwrap(), 2 + 4);
    for (a, task) in shared.into_iter().enumerate() {
        let want = if a < AGENTS { 2 + a as u64 % 5 } else { 0 };
        assert_eq!(task.await.unwrap(), want, "{}", agents[a]);
    }
    wait_metrics(&metrics, "two statements", |m| {
        requests_per_statement(m) == (2.0, 12.0)
    })
    .await;
}

#[tokio::test]
async fn identical_queries_without_filter_values_share_one_run() {
    let (s, metrics) = one_query_at_a_time().await;
    let slowest_overall = pb::QueryRequest {
        r#where: None,
        ..slowest("")
    };
    let lock = TableLock::take(&s, "ACCESS EXCLUSIVE").await;
    let first = spawn_query(&s, slowest_overall.clone());
    let first_count = spawn_count(&s, None);
    lock.wait_blocked(&s, 2).await;
    let queries: Vec<_> = (0..5)
        .map(|_| spawn_query(&s, slowest_overall.clone()))
        .collect();
    let counts: Vec<_> = (0..3).map(|_| spawn_count(&s, None)).collect();
    wait_metrics(&metrics, "eight requests waiting", |m| {
        sample(m, "db_query_requests_waiting", &[]) == Some(8.0)
    })
    .await;
    lock.release().await;

    let want = expected(&s, None).await;
    assert_eq!(want.len(), 3);
    assert_eq!(first.await.unwrap(), want);
    for q in queries {
        assert_eq!(q.await.unwrap(), want);
    }
    // 10 agents with 2..=6 rows each.
    assert_eq!(first_count.await.unwrap(), 40);
    for c in counts {
        assert_eq!(c.await.unwrap(), 40);
    }
    // Per lane: the first request alone, then one run for everyone who waited.
    wait_metrics(&metrics, "four statements", |m| {
        requests_per_statement(m) == (4.0, 10.0)
    })
    .await;
}

/// The text of the shared statement db-svc sends for requests made by `spawn` (one per agent):
/// a first request runs alone and waits on a table lock while three more queue in db-svc and
/// then share one statement. `pg_stat_activity` keeps a connection's last statement after it
/// ends, so the text is read there, as the one statement of that form not in `seen` (the
/// texts of earlier shapes, still shown by their connections).
async fn shared_statement_of<T: Send + 'static>(
    s: &DbSvc,
    metrics: &str,
    seen: &[String],
    spawn: impl Fn(&str) -> JoinHandle<T>,
) -> String {
    let lock = TableLock::take(s, "ACCESS EXCLUSIVE").await;
    let first = spawn("agent-0");
    lock.wait_blocked(s, 1).await;
    let rest: Vec<_> = (1..4).map(|a| spawn(&format!("agent-{a}"))).collect();
    wait_metrics(metrics, "three queries waiting", |m| {
        sample(m, "db_query_requests_waiting", &[]) == Some(3.0)
    })
    .await;
    lock.release().await;
    first.await.unwrap();
    for task in rest {
        task.await.unwrap();
    }
    let mut probe = s.sql().await;
    let texts: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT query FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND query LIKE '%WITH ORDINALITY%'",
    )
    .fetch_all(&mut probe)
    .await
    .unwrap();
    let new: Vec<String> = texts.into_iter().filter(|t| !seen.contains(t)).collect();
    assert_eq!(new.len(), 1, "{new:#?}");
    new.into_iter().next().unwrap_or_default()
}

/// A shared statement's rows are ordered by request (`ORDER BY k.i`), so that each request can
/// be answered as soon as a later one's rows begin; PostgreSQL must get that order from the
/// function scan, without a sort above the join (a sort is not stable: it could reorder a
/// request's own rows, and it would hold every row until the statement ends). The statements
/// are the ones db-svc sends for four shapes (read from `pg_stat_activity`), checked with the
/// values bound (a custom plan) and as a prepared statement's generic plan, which PostgreSQL
/// switches to after a few runs.
#[tokio::test]
async fn shared_statements_are_ordered_by_request_without_a_sort() {
    let (s, metrics) = one_query_at_a_time().await;
    let mut conn = s.sql().await;
    sqlx::query("ANALYZE agent_actions")
        .execute(&mut conn)
        .await
        .unwrap();
    let by_agent =
        |agent: &str, columns: &[&str], order: Option<&str>, offset: u64| pb::QueryRequest {
            table: "agent_actions".into(),
            r#where: Some(to_struct(json!({ "agent_name": agent }))),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            order_by: order
                .map(|column| pb::OrderBy {
                    column: column.into(),
                    direction: pb::Direction::Desc as i32,
                    nulls: pb::Nulls::Last as i32,
                })
                .into_iter()
                .collect(),
            offset,
            ..Default::default()
        };
    let columns = ["agent_name", "duration_ms", "id"];
    // Each shape's statement, and the paging values it binds after the array ($2, $3).
    let mut seen: Vec<String> = Vec::new();
    let sql = shared_statement_of(&s, &metrics, &seen, |a| {
        spawn_query(&s, by_agent(a, &columns, None, 0))
    })
    .await;
    seen.push(sql);
    let sql = shared_statement_of(&s, &metrics, &seen, |a| {
        spawn_query(&s, by_agent(a, &columns, Some("duration_ms"), 1))
    })
    .await;
    seen.push(sql);
    let sql = shared_statement_of(&s, &metrics, &seen, |a| {
        spawn_query(
            &s,
            by_agent(
                a,
                &["id", "agent_name", "created_at"],
                Some("created_at"),
                0,
            ),
        )
    })
    .await;
    seen.push(sql);
    let sql = shared_statement_of(&s, &metrics, &seen, |a| spawn_count(&s, Some(a))).await;
    seen.push(sql);
    let paging: [&[i64]; 4] = [&[100], &[100, 1], &[100], &[]];
    let shapes: Vec<(String, &[i64])> = seen.into_iter().zip(paging).collect();
    let agents: Vec<String> = (0..16).map(|a| format!("agent-{a}")).collect();
    let check = |shared: &str, how: &str, plan: &Json| {
        let root = &plan[0]["Plan"];
        assert_eq!(root["Node Type"], "Nested Loop", "{how} {shared}: {plan:#}");
        assert_eq!(
            root["Plans"][0]["Node Type"], "Function Scan",
            "{how} {shared}: {plan:#}"
        );
    };
    for (n, (shared, paging)) in shapes.iter().enumerate() {
        let shared = shared.as_str();
        // One array for the one filter value, then the paging values.
        for p in 1..=1 + paging.len() {
            assert!(shared.contains(&format!("${p}")), "${p}: {shared}");
        }
        assert!(
            !shared.contains(&format!("${}", paging.len() + 2)),
            "{shared}"
        );
        let explain = format!("EXPLAIN (FORMAT JSON) {shared}");
        let mut custom = sqlx::query_as::<_, (Json,)>(&explain).bind(&agents);
        for p in paging.iter() {
            custom = custom.bind(p);
        }
        let (plan,) = custom
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{shared}: {e}"));
        check(shared, "custom plan", &plan);

        let types: Vec<&str> = std::iter::once("text[]")
            .chain(paging.iter().map(|_| "int8"))
            .collect();
        sqlx::raw_sql(&format!(
            "PREPARE shared_{n}({}) AS {shared}",
            types.join(", ")
        ))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{shared}: {e}"));
        let args: Vec<String> = std::iter::once(format!("'{{{}}}'", agents.join(",")))
            .chain(paging.iter().map(|p| p.to_string()))
            .collect();
        sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
            .execute(&mut conn)
            .await
            .unwrap();
        let (plan,): (Json,) = sqlx::query_as(&format!(
            "EXPLAIN (FORMAT JSON) EXECUTE shared_{n}({})",
            args.join(", ")
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{shared}: {e}"));
        check(shared, "generic plan", &plan);
        sqlx::raw_sql("RESET plan_cache_mode")
            .execute(&mut conn)
            .await
            .unwrap();
    }
}
