//! examples/grpcurl.md stays true: every grpcurl command of its discovery, consumer-svc and
//! db-svc sections runs against real services (streams for a bounded time), and together they
//! call every RPC of both services.

use std::collections::BTreeSet;
use std::time::Duration;

use omnibus_tests::consumer::{create_topics, start_consumer, unique_prefix};
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
    create_topics(&kafka_brokers(), &prefix, 1).await.unwrap();
    let consumer = start_consumer(&kafka_brokers(), &prefix, &[])
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
        if let Some(method) = cmd
            .split_whitespace()
            .find(|w| w.starts_with("omnibus.") && w.contains('/'))
        {
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
