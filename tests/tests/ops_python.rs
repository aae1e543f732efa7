//! Any-language proof: the Python client in examples/python (stubs generated from proto/ with
//! grpcio-tools from PyPI, in a cached virtualenv) checks health, inserts and queries through
//! db-svc and reads stream updates from consumer-svc, all with auth on.

use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::Utc;
use omnibus_client::generate::{EventGenerator, Kind};
use omnibus_tests::consumer::{TestProducer, create_topics, start_consumer, unique_prefix};
use omnibus_tests::db::DbSvc;
use omnibus_tests::kafka_brokers;
use omnibus_tests::ops::new_token;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn python_client_checks_health_writes_reads_and_streams() {
    let write = new_token("write");
    let db = DbSvc::start(&["--auth-write-tokens", &write]).await;
    let prefix = unique_prefix();
    let topics = create_topics(&kafka_brokers(), &prefix, 1).await.unwrap();
    let consumer = start_consumer(&kafka_brokers(), &prefix, &["--auth-write-tokens", &write])
        .await
        .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/python/run");
    let gen_dir =
        std::env::temp_dir().join(format!("omnibus-py-{}", uuid::Uuid::new_v4().simple()));
    let mut child = tokio::process::Command::new(script)
        .args([
            "--db",
            &db.svc.addr.to_string(),
            "--consumer",
            &consumer.addr.to_string(),
            "--updates",
            "4",
            "--gen-dir",
            gen_dir.to_str().unwrap(),
        ])
        .env("OMNIBUS_TOKEN", &write)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run examples/python/run");

    // Keep producing actions until the client has read its stream updates and exited (the
    // first run also installs grpcio-tools, hence the generous deadline).
    let producer = TestProducer::new(&kafka_brokers()).unwrap();
    let mut generator = EventGenerator::new(3, 7);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the Python client did not finish"
        );
        let e = generator.next_of(Kind::AgentAction, Utc::now());
        producer
            .send(topics.name(Kind::AgentAction), &e.key, &e.payload)
            .unwrap();
        producer.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .await
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&gen_dir);
    assert!(
        status.success(),
        "{status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "health db-svc: SERVING",
        "health consumer-svc: SERVING",
        "insert: affected=1 replayed=False",
        "insert again: affected=1 replayed=True",
        "query: total=1",
        "update 1: sequence=",
        "snapshot",
        "update 4: sequence=",
        "ok",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The live updates came from the actions produced above.
    let live = stdout
        .lines()
        .filter(|l| l.starts_with("update ") && !l.contains("snapshot"))
        .count();
    assert!(live >= 3, "{stdout}");
}
