//! `scripts/demo` end to end: with stdout not a terminal it brings everything up and follows
//! live events as JSON lines; Ctrl-C (SIGINT to its process group, as a terminal sends it)
//! stops everything it started.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use omnibus_tests::cli::Lines;
use omnibus_tests::consumer::{create_topics, unique_prefix};
use omnibus_tests::{bin_path, free_port, kafka_brokers};
use tokio::io::{AsyncBufReadExt, BufReader};

fn group_alive(pgid: u32) -> bool {
    // kill -0 on the group: succeeds while any member lives.
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn listening(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_ok()
}

#[tokio::test]
async fn demo_follows_live_events_and_ctrl_c_stops_everything() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let _topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer_addr = format!("127.0.0.1:{}", free_port());
    let db_addr = format!("127.0.0.1:{}", free_port());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = bin_path("omnibus").parent().unwrap().to_path_buf();

    let mut child = tokio::process::Command::from({
        let mut c = Command::new(root.join("scripts/demo"));
        c.process_group(0);
        c
    })
    .env("KAFKA_BROKERS", &brokers)
    .env("KAFKA_TOPIC_PREFIX", &prefix)
    // No DATABASE_URL of the test's own: the demo's `dev-services up` would record it as the
    // shared one (.dev/env), and it is dropped when the test ends.
    .env("OMNIBUS_CONSUMER_ADDR", &consumer_addr)
    .env("OMNIBUS_DB_ADDR", &db_addr)
    .env("OMNIBUS_BIN_DIR", &bin_dir)
    .env("OMNIBUS_DEMO_RATE", "100")
    // The shared broker's default request topics belong to whoever else runs db-svc.
    .env("DB_BUS_ENABLED", "false")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    let pgid = child.id().unwrap();
    let stdout = Lines::default();
    let stderr = Lines::default();
    for (pipe, lines) in [
        (
            Box::new(child.stdout.take().unwrap()) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
            stdout.clone(),
        ),
        (Box::new(child.stderr.take().unwrap()) as _, stderr.clone()),
    ] {
        tokio::spawn(async move {
            let mut r = BufReader::new(pipe).lines();
            while let Ok(Some(l)) = r.next_line().await {
                lines.push(l);
            }
        });
    }

    // Live events of several kinds arrive as JSON lines.
    let deadline = Instant::now() + Duration::from_secs(90);
    let kinds = loop {
        let lines = stdout.snapshot();
        let kinds: std::collections::BTreeSet<String> = lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["kind"].as_str().map(String::from))
            .collect();
        if lines.len() >= 50 && kinds.len() >= 3 {
            break kinds;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "demo exited ({status}) early; stderr:\n{}",
                stderr.snapshot().join("\n")
            );
        }
        assert!(
            Instant::now() < deadline,
            "no live events from the demo; stdout: {lines:?}\nstderr:\n{}",
            stderr.snapshot().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        kinds.contains("action") && kinds.contains("routing"),
        "{kinds:?}"
    );
    assert!(listening(&consumer_addr) && listening(&db_addr));

    // Ctrl-C, as a terminal delivers it: SIGINT to the whole foreground process group.
    let sent = Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the demo ends after Ctrl-C")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while group_alive(pgid) {
        assert!(
            Instant::now() < deadline,
            "processes of the demo still running after Ctrl-C"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!listening(&consumer_addr), "consumer-svc still listening");
    assert!(!listening(&db_addr), "db-svc still listening");
    // The last line may still be on its way through the pipe reader.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let err = stderr.snapshot().join("\n");
        if err.contains("stopped everything it started") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no goodbye from the demo:\n{err}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
