//! examples/grpcurl.md stays true: every grpcurl command of its discovery, consumer-svc and
//! db-svc sections runs against real services (streams for a bounded time), and together they
//! call every RPC of both services.

use std::collections::BTreeSet;
use std::time::Duration;

use omnibus_client::generate::Kind;
use omnibus_tests::consumer::{
    TestProducer, create_topics, start_consumer, unique_prefix, wait_status,
};
use omnibus_tests::db::DbSvc;
use omnibus_tests::kafka_brokers;

/// The grpcurl commands of the sections that run against a local setup, with continuation
/// lines and multi-line JSON joined.
fn commands(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut section = "";
    let mut in_block = false;
    let mut current: Option<String> = None;
    for line in doc.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            section = title;
            continue;
        }
        if line.starts_with("```") {
            in_block = !in_block;
            out.extend(current.take());
            continue;
        }
        let runnable = section.starts_with("Discovery")
            || section.starts_with("consumer-svc")
            || section.starts_with("db-svc");
        if !in_block || !runnable {
            continue;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with("grpcurl ") {
            out.extend(current.take());
            current = Some(line.to_string());
        } else if trimmed.is_empty() || trimmed.starts_with('#') {
            out.extend(current.take());
        } else if let Some(cmd) = current.as_mut() {
            cmd.push('\n');
            cmd.push_str(line);
        }
    }
    out
}

fn is_stream(cmd: &str) -> bool {
    [
        "/Watch",
        "/StreamActions",
        "/StreamAgentMetrics",
        "/Subscribe",
    ]
    .iter()
    .any(|m| cmd.contains(m))
}

/// What a consumer-svc session's output must contain once the test's events are in: the
/// agent or metric they name, or the status. Open streams without a snapshot may see nothing
/// new in their two seconds, so only what they must show is checked.
fn consumer_content(method: &str, cmd: &str) -> Option<&'static str> {
    let method = method.strip_prefix("omnibus.consumer.v1.ConsumerService/")?;
    match method {
        "GetAgentMetrics"
        | "ListRecentActions"
        | "ListRoutingDecisions"
        | "ListTransformations"
        | "GetSnapshot" => Some("\"coder\""),
        "Subscribe" if cmd.contains("\"include_snapshot\": true") => Some("\"coder\""),
        "ListPerformanceMetrics" => Some("\"perf-grpcurl\""),
        "GetPerformanceStats" => Some("\"totalQueries\""),
        "GetConsumerStatus" => Some("\"connected\": true"),
        _ => None,
    }
}

#[tokio::test]
async fn every_grpcurl_session_in_the_examples_runs() {
    let Ok(grpcurl) = std::env::var("OMNIBUS_GRPCURL") else {
        panic!("OMNIBUS_GRPCURL is not set: run through scripts/test");
    };
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/grpcurl.md"
    ))
    .unwrap();
    let commands = commands(&doc);
    assert!(commands.len() >= 25, "{commands:#?}");

    let db = DbSvc::start(&[]).await;
    let prefix = unique_prefix();
    let topics = create_topics(&kafka_brokers(), &prefix, 1).await.unwrap();
    let consumer = start_consumer(&kafka_brokers(), &prefix, &[])
        .await
        .unwrap();
    // One event per topic, matching the examples' filters, so that the reads show content.
    let now = omnibus_client::generate::isoformat(chrono::Utc::now());
    let producer = TestProducer::new(&kafka_brokers()).unwrap();
    for (kind, json) in [
        (
            Kind::AgentAction,
            format!(
                r#"{{"id":"a1","agent_name":"coder","action_type":"tool_call","action_name":"Read","correlation_id":"c1","timestamp":"{now}"}}"#
            ),
        ),
        (
            Kind::RoutingDecision,
            format!(
                r#"{{"id":"r1","selected_agent":"coder","confidence_score":0.9,"routing_time_ms":12,"correlation_id":"c1","timestamp":"{now}"}}"#
            ),
        ),
        (
            Kind::Transformation,
            format!(
                r#"{{"id":"t1","source_agent":"coder","target_agent":"tester","correlation_id":"c1","timestamp":"{now}"}}"#
            ),
        ),
        (
            Kind::PerformanceMetric,
            format!(
                r#"{{"id":"perf-grpcurl","routing_duration_ms":12,"cache_hit":true,"timestamp":"{now}"}}"#
            ),
        ),
    ] {
        producer
            .send(topics.name(kind), "c1", json.as_bytes())
            .unwrap();
    }
    producer.flush().unwrap();
    wait_status(&consumer, Duration::from_secs(30), "4 events", |s| {
        s.events_processed >= 4
    })
    .await
    .unwrap();

    let mut called = BTreeSet::new();
    for cmd in &commands {
        // Streams are open-ended: give them two seconds.
        let bounded = if is_stream(cmd) {
            cmd.replacen("grpcurl ", "grpcurl -max-time 2 ", 1)
        } else {
            cmd.clone()
        };
        let script = format!("grpcurl() {{ \"$OMNIBUS_GRPCURL\" \"$@\"; }}\n{bounded}\n");
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new("bash")
                .arg("-c")
                .arg(&script)
                .env("OMNIBUS_GRPCURL", &grpcurl)
                .env("C", consumer.addr.to_string())
                .env("D", db.svc.addr.to_string())
                .output(),
        )
        .await
        .expect("grpcurl finished")
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ok = out.status.success() || (is_stream(cmd) && stderr.contains("DeadlineExceeded"));
        assert!(
            ok,
            "{cmd}\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        let method = cmd
            .split_whitespace()
            .find(|w| w.starts_with("omnibus.") && w.contains('/'));
        if let Some(method) = method {
            if let Some(want) = consumer_content(method, cmd) {
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(stdout.contains(want), "{cmd}\nwant {want:?} in: {stdout}");
            }
            called.insert(method.to_string());
        }
    }

    // Every RPC of both services has a session.
    let mut missing = Vec::new();
    for (service, methods) in [
        (
            "omnibus.consumer.v1.ConsumerService",
            &[
                "GetAgentMetrics",
                "ListRecentActions",
                "ListRoutingDecisions",
                "ListTransformations",
                "ListPerformanceMetrics",
                "GetPerformanceStats",
                "GetSnapshot",
                "GetConsumerStatus",
                "StreamActions",
                "StreamAgentMetrics",
                "Subscribe",
            ][..],
        ),
        (
            "omnibus.db.v1.DatabaseService",
            &[
                "Query",
                "StreamQuery",
                "Insert",
                "Update",
                "Delete",
                "Upsert",
                "Count",
                "ExecuteRaw",
                "ListTables",
                "DescribeTable",
            ][..],
        ),
    ] {
        for method in methods {
            let full = format!("{service}/{method}");
            if !called.contains(&full) {
                missing.push(full);
            }
        }
    }
    assert!(missing.is_empty(), "no grpcurl session for {missing:?}");
}
