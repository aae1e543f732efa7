//! `omnibus tail`, `omnibus generate` and `omnibus status` end to end against a real
//! consumer-svc, db-svc and broker.

use std::collections::HashMap;
use std::time::Duration;

use omnibus_client::generate::{Kind, isoformat};
use omnibus_tests::cli::{Following, omnibus};
use omnibus_tests::consumer::{
    TestProducer, create_topics, start_consumer, unique_prefix, wait_status,
};
use omnibus_tests::db::DbSvc;
use omnibus_tests::proxy::Proxy;
use omnibus_tests::{free_port, kafka_brokers};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn action(agent: &str, name: &str, duration: u64) -> (String, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "id": id,
        "correlation_id": uuid::Uuid::new_v4().to_string(),
        "agent_name": agent,
        "action_type": "tool_call",
        "action_name": name,
        "duration_ms": duration,
        "timestamp": isoformat(chrono::Utc::now()),
    });
    (id, serde_json::to_vec(&body).unwrap())
}

/// Sends warm-up actions (agent-a, `warmup`, 10 ms) until `tail` shows one: its subscription
/// is live from then on. Returns how many were sent.
async fn warm_up(tail: &mut Following, producer: &TestProducer, topic: &str) -> usize {
    let mut warm = 0;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = action("agent-a", "warmup", 10);
        producer.send(topic, "k", &body).unwrap();
        producer.flush().unwrap();
        warm += 1;
        if tail
            .wait_stdout(Duration::from_millis(500), "warm-up", |l| !l.is_empty())
            .await
            .is_ok()
        {
            return warm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tail never showed an event"
        );
    }
}

fn parsed(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test]
async fn tail_filters_and_resumes_after_a_dropped_connection_without_gaps() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let proxy = Proxy::start(consumer.addr).await.unwrap();
    let producer = TestProducer::new(&brokers).unwrap();
    let actions = topics.name(Kind::AgentAction).to_string();

    let proxy_addr = proxy.addr.to_string();
    let mut tail = Following::spawn(&[
        "--consumer-addr",
        &proxy_addr,
        "tail",
        "actions",
        "--where",
        "agent=agent-a",
        "--where",
        "duration_ms>=10",
    ])
    .unwrap();
    // The subscription is live once a warm-up event shows; from then on nothing may be missed.
    let warm = warm_up(&mut tail, &producer, &actions).await;
    // Warm-ups may keep arriving for a moment; the batches are counted by their names.
    let batched = |l: &[String]| {
        l.iter()
            .filter(|l| {
                l.contains(r#""action_name":"first""#) || l.contains(r#""action_name":"second""#)
            })
            .count()
    };

    let mut want = Vec::new();
    let batch = |want: &mut Vec<String>, n: usize, tag: &str| {
        for i in 0..n {
            let (id, body) = action("agent-a", tag, 10 + i as u64);
            producer.send(&actions, &id, &body).unwrap();
            want.push(id);
            // Filtered out: another agent, and too short.
            let (_, body) = action("agent-b", tag, 50);
            producer.send(&actions, "b", &body).unwrap();
            let (_, body) = action("agent-a", "short", 3);
            producer.send(&actions, "s", &body).unwrap();
        }
        producer.flush().unwrap();
    };
    batch(&mut want, 20, "first");
    let n_first = want.len();
    tail.wait_stdout(WAIT, "the first batch", |l| batched(l) >= n_first)
        .await
        .unwrap();

    // Cut the connection, produce while tail is away, then let it back in.
    proxy.down();
    batch(&mut want, 20, "second");
    let total_events = (warm + 60 * 2) as u64;
    wait_status(&consumer, WAIT, "the second batch consumed", |s| {
        s.events_processed >= total_events
    })
    .await
    .unwrap();
    proxy.up();
    let lines = tail
        .wait_stdout(WAIT, "the second batch", |l| batched(l) >= want.len())
        .await
        .unwrap();

    let events = parsed(&lines);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut last_seq = 0;
    let mut warmups = 0;
    for e in &events {
        assert_eq!(e["kind"], "action");
        if e["event"]["action_name"] == "warmup" {
            warmups += 1;
        }
        let ev = &e["event"];
        assert_eq!(ev["agent_name"], "agent-a", "{e}");
        assert!(ev["duration_ms"].as_f64().unwrap() >= 10.0, "{e}");
        let seq = e["sequence"].as_u64().unwrap();
        assert!(seq > last_seq, "sequences increase: {seq} after {last_seq}");
        last_seq = seq;
        *seen
            .entry(ev["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for id in &want {
        assert_eq!(seen.get(id), Some(&1), "event {id} shown exactly once");
    }
    assert_eq!(events.len(), warmups + want.len(), "nothing else shown");
    assert!(warmups <= warm);
    let stderr = tail.stderr.snapshot().join("\n");
    assert!(stderr.contains("resumed after sequence"), "{stderr}");
}

#[tokio::test]
async fn generate_feeds_all_four_topics_and_status_shows_both_services() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let _topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let db = DbSvc::start(&[]).await;
    let (c_addr, d_addr) = (consumer.addr.to_string(), db.svc.addr.to_string());

    // `tail -n` ends by itself after that many events.
    let mut tail = Following::spawn(&[
        "--consumer-addr",
        &c_addr,
        "tail",
        "routing",
        "-n",
        "3",
        "--output",
        "table",
    ])
    .unwrap();

    let generate = |count: &'static str, seed: &'static str| {
        let (brokers, prefix) = (brokers.clone(), prefix.clone());
        async move {
            let out = omnibus(&[
                "--brokers",
                &brokers,
                "generate",
                "--count",
                count,
                "--topic-prefix",
                &prefix,
                "--agents",
                "4",
                "--seed",
                seed,
            ])
            .await
            .unwrap();
            assert!(out.ok(), "{}{}", out.stdout, out.stderr);
            assert!(
                out.stderr.contains(&format!("generated {count} events")),
                "{}",
                out.stderr
            );
            // Piped: the summary is also a JSON line on stdout.
            let summary = &out.json_lines()[0];
            assert_eq!(summary["events"].to_string(), count, "{summary}");
            let kinds: u64 = [
                "routing_decisions",
                "actions",
                "transformations",
                "performance_metrics",
            ]
            .iter()
            .map(|k| summary[k].as_u64().unwrap())
            .sum();
            assert_eq!(kinds.to_string(), count, "{summary}");
        }
    };
    // Small batches until the tail (live events only) shows one: then it is subscribed.
    let mut generated = 0;
    while tail.stdout.snapshot().is_empty() {
        assert!(generated < 2000, "tail showed nothing");
        generate("20", "3").await;
        generated += 20;
        let _ = tail
            .wait_stdout(Duration::from_millis(500), "a first event", |l| {
                !l.is_empty()
            })
            .await;
    }
    generate("300", "7").await;
    generated += 300;
    let status = wait_status(&consumer, WAIT, "every event", |s| {
        s.events_processed >= generated
    })
    .await
    .unwrap();
    assert_eq!(status.events_processed, generated);
    assert!(
        status.topics.iter().all(|t| t.events_consumed > 0),
        "{status:?}"
    );

    let exit = tail.wait_exit(WAIT).await.unwrap();
    assert!(exit.success());
    let lines = tail.stdout.snapshot();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("routing") && l.contains("agent-0000") && l.contains("conf")),
        "{lines:?}"
    );

    // status: JSON when piped, a screen with --output table.
    let out = omnibus(&["--consumer-addr", &c_addr, "--db-addr", &d_addr, "status"])
        .await
        .unwrap();
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);
    let s = &out.json_lines()[0];
    assert_eq!(s["consumer"]["health"], "SERVING");
    assert_eq!(
        s["consumer"]["status"]["events_processed"],
        json!(generated)
    );
    assert_eq!(s["consumer"]["status"]["connected"], json!(true));
    assert_eq!(s["db"]["health"], "SERVING");
    assert!(
        s["db"]["tables"]
            .as_array()
            .unwrap()
            .contains(&json!("agent_actions"))
    );
    let out = omnibus(&[
        "--consumer-addr",
        &c_addr,
        "--db-addr",
        &d_addr,
        "status",
        "--output",
        "table",
    ])
    .await
    .unwrap();
    assert!(
        out.stdout
            .contains(&format!("consumer-svc  {c_addr}  SERVING")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("{prefix}agent-actions")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("lag  0 messages"), "{}", out.stdout);
    assert!(
        out.stdout
            .contains(&format!("db-svc        {d_addr}  SERVING")),
        "{}",
        out.stdout
    );

    // One service away: still one screen, and a failing exit status.
    let nobody = format!("127.0.0.1:{}", free_port());
    let out = omnibus(&[
        "--consumer-addr",
        &c_addr,
        "--db-addr",
        &nobody,
        "status",
        "--output",
        "table",
    ])
    .await
    .unwrap();
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout.contains(&format!(
            "db-svc at {nobody} is not reachable - is it running?"
        )),
        "{}",
        out.stdout
    );
    // tail against nothing: one sentence.
    let out = omnibus(&["--consumer-addr", &nobody, "tail"])
        .await
        .unwrap();
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr.trim(),
        format!("omnibus: consumer-svc at {nobody} is not reachable - is it running?")
    );
    // tail against something that is not a gRPC server (PostgreSQL's port): after a few tries
    // (one such answer could be a reset connection), one sentence and exit 1, not retries
    // forever.
    let pg = omnibus_tests::postgres_addr();
    let pg = pg.as_str();
    let out = omnibus(&["--consumer-addr", pg, "tail"]).await.unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    let last = out.stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("omnibus: consumer-svc at {pg} "))
            && last.ends_with("- is that the right address?"),
        "{out:?}"
    );
}

/// `omnibus generate` fails when events it produced were not delivered (the broker went away
/// for longer than `message.timeout.ms`), instead of reporting them as generated.
#[tokio::test]
async fn generate_fails_when_events_are_not_delivered() {
    let mut broker = omnibus_tests::consumer::PrivateBroker::start()
        .await
        .unwrap();
    let prefix = unique_prefix();
    let topics = create_topics(&broker.addr(), &prefix, 1).await.unwrap();
    let addr = broker.addr();
    let run = tokio::spawn(async move {
        omnibus(&[
            "--brokers",
            &addr,
            "--kafka-config",
            "message.timeout.ms=2000",
            "generate",
            "--rate",
            "200",
            "--duration",
            "6s",
            "--topic-prefix",
            &prefix,
            "--quiet",
        ])
        .await
        .unwrap()
    });
    // Once it is producing (not before it has even reached the broker), the broker goes.
    omnibus_tests::consumer::wait_produced(
        &broker.addr(),
        topics.name(Kind::AgentAction),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    broker.stop();
    let out = run.await.unwrap();
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("could not be delivered") || out.stderr.contains("not acknowledged"),
        "{}",
        out.stderr
    );
}

/// A `--where` that no followed event could satisfy exits 1 at once with one sentence (it
/// used to wait for ever, showing nothing), before any connection is tried.
#[tokio::test]
async fn tail_refuses_a_condition_no_event_could_satisfy() {
    let nobody = format!("127.0.0.1:{}", free_port());
    for (cond, says) in [
        ("agentname=a", "no 'actions' event has a field 'agentname'"),
        (
            "duration_ms>abc",
            "'duration_ms' is a number, so 'abc' can never compare with it",
        ),
    ] {
        let out = omnibus(&[
            "--consumer-addr",
            &nobody,
            "tail",
            "actions",
            "--where",
            cond,
        ])
        .await
        .unwrap();
        assert_eq!(out.code, Some(1), "{cond}: {out:?}");
        assert!(out.stderr.contains(says), "{cond}: {out:?}");
        assert!(
            !out.stderr.contains("not reachable"),
            "checked first: {out:?}"
        );
    }
}

/// `tail -n 0` shows nothing and exits 0 at once, even while events are buffered.
#[tokio::test]
async fn tail_with_a_count_of_zero_shows_nothing() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let p = TestProducer::new(&brokers).unwrap();
    let now = isoformat(chrono::Utc::now());
    p.send(
        topics.name(Kind::AgentAction),
        "k",
        format!(r#"{{"agent_name":"a","action_type":"tool_call","timestamp":"{now}"}}"#).as_bytes(),
    )
    .unwrap();
    p.flush().unwrap();
    wait_status(&consumer, Duration::from_secs(30), "one action", |s| {
        s.events_processed == 1
    })
    .await
    .unwrap();
    let addr = consumer.addr.to_string();
    let started = std::time::Instant::now();
    let out = omnibus(&["--consumer-addr", &addr, "tail", "actions", "-n", "0"])
        .await
        .unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(out.stdout, "", "{out:?}");
    // At once: not following the stream (which would only end at the harness's 60 s limit).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A consumer-svc that stops answering without closing its connection (its host vanished;
/// here the process is frozen) is noticed by HTTP/2 pings: `tail` says the connection was
/// lost and reconnects once the service answers again, instead of waiting forever.
#[tokio::test]
async fn tail_notices_a_server_that_stops_answering_without_closing() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let producer = TestProducer::new(&brokers).unwrap();
    let actions = topics.name(Kind::AgentAction).to_string();
    let addr = consumer.addr.to_string();
    let mut tail = Following::spawn(&["--consumer-addr", &addr, "tail", "actions"]).unwrap();
    warm_up(&mut tail, &producer, &actions).await;
    consumer.pause().unwrap();
    // Pings every 20 s, 10 s to answer: lost within about half a minute.
    let lost = std::time::Instant::now() + Duration::from_secs(90);
    while !tail
        .stderr
        .snapshot()
        .iter()
        .any(|l| l.contains("connection to consumer-svc lost"))
    {
        if std::time::Instant::now() > lost {
            consumer.resume().unwrap();
            panic!("tail never noticed: {:?}", tail.stderr.snapshot());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.resume().unwrap();
    let (_, body) = action("agent-a", "after", 10);
    producer.send(&actions, "k", &body).unwrap();
    producer.flush().unwrap();
    tail.wait_stdout(Duration::from_secs(60), "an event after the freeze", |l| {
        l.iter().any(|l| l.contains(r#""action_name":"after""#))
    })
    .await
    .unwrap();
}

/// Whether process `pid` catches SIGINT (bit 2 of `SigCgt` in `/proc/<pid>/status`).
fn catches_sigint(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|mask| mask & (1 << (2 - 1)) != 0)
}

/// A first Ctrl-C stops `generate` and flushes what was queued, which waits for a broker that
/// is gone (up to 30 s); a second one quits at once, with the exit code of an interrupt.
#[tokio::test]
async fn a_second_interrupt_quits_generate_at_once() {
    let mut broker = omnibus_tests::consumer::PrivateBroker::start()
        .await
        .unwrap();
    let prefix = unique_prefix();
    let topics = create_topics(&broker.addr(), &prefix, 1).await.unwrap();
    let addr = broker.addr();
    let mut generate = Following::spawn(&[
        "--brokers",
        &addr,
        "generate",
        "--rate",
        "200",
        "--topic-prefix",
        &prefix,
        "--quiet",
    ])
    .unwrap();
    // Ready: its handler catches SIGINT (before it, a SIGINT would kill it, and the test
    // would see that rather than what Ctrl-C does), and it is producing.
    let pid = generate.pid().expect("generate is running");
    let deadline = std::time::Instant::now() + WAIT;
    while !catches_sigint(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "generate never caught SIGINT: {:?}",
            generate.stderr.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    omnibus_tests::consumer::wait_produced(
        &addr,
        topics.name(Kind::AgentAction),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    // The broker goes: what generate sends from now on (200 events a second, paced against
    // its start, so a stall is caught up) is never acknowledged, so the flush has something
    // to wait for.
    broker.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The first interrupt stops producing and flushes, which waits for the broker.
    generate.signal("INT").unwrap();
    let waited = generate.wait_exit(Duration::from_secs(1)).await;
    assert!(
        waited.is_err(),
        "exited on the first interrupt ({waited:?}) instead of flushing: {:?}",
        generate.stderr.snapshot()
    );
    // The second one quits at once (long before the 30 s flush limit).
    generate.signal("INT").unwrap();
    let status = generate.wait_exit(Duration::from_secs(10)).await.unwrap();
    assert_eq!(status.code(), Some(130), "{:?}", generate.stderr.snapshot());
    // Its last words, read from the pipe after the exit.
    let deadline = std::time::Instant::now() + WAIT;
    while !generate
        .stderr
        .snapshot()
        .iter()
        .any(|l| l.contains("interrupted again"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            generate.stderr.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
