//! `omnibus db ...` end to end: the real binary against a real db-svc and PostgreSQL (and the
//! real broker for `--via bus`).

use omnibus_tests::bus::{BusTopics, start_db_svc};
use omnibus_tests::cli::{CliOutput, omnibus, omnibus_stdout_closed};
use omnibus_tests::db::DbSvc;
use omnibus_tests::ops::{TestCert, new_token};
use omnibus_tests::{TestDatabase, free_port};
use serde_json::{Value, json};

const CORR: &str = "5f0c6f1e-8a4b-4d7e-9c2a-1b3d5e7f9a0b";

async fn db(addr: &str, args: &[&str]) -> CliOutput {
    let mut all = vec!["--db-addr", addr, "db"];
    all.extend_from_slice(args);
    let out = omnibus(&all).await.expect("run omnibus");
    assert!(
        out.ok(),
        "omnibus {all:?} failed ({:?}):\n{}{}",
        out.code,
        out.stdout,
        out.stderr
    );
    out
}

#[tokio::test]
async fn query_insert_update_delete_count_raw_and_the_catalog() {
    let svc = DbSvc::start(&[]).await;
    let addr = svc.svc.addr.to_string();

    // insert from COLUMN=VALUE pairs, typed by the column (duration_ms a number, the jsonb
    // parsed); the table output on request, the summary under it.
    let correlation = format!("correlation_id={CORR}");
    let insert = [
        "insert",
        "agent_actions",
        "agent_name=coder",
        "action_type=tool_call",
        "action_name=read_file",
        &correlation,
        "duration_ms=12",
        r#"action_details={"path":"src/main.rs"}"#,
        "--request-id",
        "cli-insert-1",
    ];
    let out = db(&addr, &[&insert[..], &["--output", "table"]].concat()).await;
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].contains("agent_name") && lines[0].contains("duration_ms"),
        "{}",
        out.stdout
    );
    assert!(lines[1].starts_with("───"), "{}", out.stdout);
    let col = lines[0].find("agent_name").unwrap();
    assert_eq!(
        lines[2].find("coder"),
        Some(col),
        "aligned:\n{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("inserted 1 row over gRPC, request id cli-insert-1"),
        "{}",
        out.stdout
    );
    // The same command again: replayed, not written twice.
    let again = db(&addr, &insert).await;
    assert!(again.stderr.contains("replayed"), "{}", again.stderr);
    // Another row under that id is refused, and says why.
    let mut other = insert.to_vec();
    other.retain(|a| !a.starts_with("action_details="));
    let refused = omnibus(&[&["--db-addr", addr.as_str(), "db"][..], &other[..]].concat())
        .await
        .unwrap();
    assert_eq!(refused.code, Some(1), "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("request_id cli-insert-1 was already used for a different insert"),
        "{}",
        refused.stderr
    );

    // Several rows as JSON, piped output = JSON lines, summary on stderr.
    let rows = [
        json!({"agent_name": "tester", "action_type": "success", "action_name": "run_tests", "correlation_id": CORR, "duration_ms": 340}),
        json!({"agent_name": "tester", "action_type": "error", "action_name": "run_tests", "correlation_id": CORR, "duration_ms": 150}),
        json!({"agent_name": "reviewer", "action_type": "tool_call", "action_name": "read_file", "correlation_id": CORR}),
    ];
    let mut args = vec!["insert".to_string(), "agent_actions".to_string()];
    for r in &rows {
        args.push("--row".into());
        args.push(r.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = db(&addr, &args).await;
    let inserted = out.json_lines();
    assert_eq!(inserted.len(), 3);
    assert!(
        inserted
            .iter()
            .all(|r| r["id"].is_string() && r["created_at"].is_string())
    );
    assert!(out.stderr.contains("inserted 3 rows"), "{}", out.stderr);

    // query: filters as people write them, ordering, limit/offset, projection, total.
    let names = |out: &CliOutput| -> Vec<(String, Value)> {
        out.json_lines()
            .iter()
            .map(|r| {
                (
                    r["agent_name"].as_str().unwrap().to_string(),
                    r["duration_ms"].clone(),
                )
            })
            .collect()
    };
    let out = db(
        &addr,
        &[
            "query",
            "agent_actions",
            "--where",
            "duration_ms>100",
            "--order",
            "duration_ms:desc",
        ],
    )
    .await;
    assert_eq!(
        names(&out),
        vec![("tester".into(), json!(340)), ("tester".into(), json!(150))]
    );
    let out = db(
        &addr,
        &[
            "query",
            "agent_actions",
            "--where",
            "agent_name in (coder,reviewer)",
            "--order",
            "agent_name",
        ],
    )
    .await;
    assert_eq!(
        names(&out),
        vec![
            ("coder".into(), json!(12)),
            ("reviewer".into(), Value::Null)
        ]
    );
    let out = db(
        &addr,
        &["query", "agent_actions", "--where", "duration_ms is null"],
    )
    .await;
    assert_eq!(names(&out), vec![("reviewer".into(), Value::Null)]);
    let out = db(
        &addr,
        &[
            "query",
            "agent_actions",
            "--where",
            "agent_name~*TEST%",
            "--where",
            "action_type!=error",
        ],
    )
    .await;
    assert_eq!(names(&out), vec![("tester".into(), json!(340))]);
    let out = db(
        &addr,
        &[
            "query",
            "agent_actions",
            "--columns",
            "agent_name,duration_ms",
            "--order",
            "duration_ms:asc:nulls_last",
            "--limit",
            "2",
            "--offset",
            "1",
            "--total",
        ],
    )
    .await;
    let got = out.json_lines();
    assert_eq!(
        got,
        vec![
            json!({"agent_name": "tester", "duration_ms": 150}),
            json!({"agent_name": "tester", "duration_ms": 340})
        ]
    );
    assert!(out.stderr.contains("(2 rows of 4)"), "{}", out.stderr);
    let out = db(
        &addr,
        &[
            "query",
            "agent_actions",
            "--where",
            r#"action_details@>{"path":"src/main.rs"}"#,
        ],
    )
    .await;
    assert_eq!(names(&out), vec![("coder".into(), json!(12))]);
    // Every row, streamed.
    let out = db(&addr, &["query", "agent_actions", "--all"]).await;
    assert_eq!(out.json_lines().len(), 4);

    // count, update (with the guard), delete.
    let out = db(
        &addr,
        &["count", "agent_actions", "--where", "agent_name=tester"],
    )
    .await;
    assert_eq!(out.json_lines(), vec![json!({"count": 2})]);
    let out = db(
        &addr,
        &[
            "update",
            "agent_actions",
            "--where",
            "agent_name=tester",
            "--set",
            "duration_ms=7",
            "--max-affected",
            "2",
        ],
    )
    .await;
    let updated = out.json_lines();
    assert_eq!(updated.len(), 2);
    assert!(updated.iter().all(|r| r["duration_ms"] == json!(7)));
    let refused = omnibus(&[
        "--db-addr",
        &addr,
        "db",
        "update",
        "agent_actions",
        "--where",
        "agent_name=tester",
        "--set",
        "duration_ms=8",
        "--max-affected",
        "1",
    ])
    .await
    .unwrap();
    assert_eq!(refused.code, Some(1));
    assert!(
        refused.stderr.starts_with("omnibus: db-svc: "),
        "{}",
        refused.stderr
    );
    let out = db(
        &addr,
        &[
            "delete",
            "agent_actions",
            "--where",
            "agent_name=reviewer",
            "--count-only",
        ],
    )
    .await;
    // No rows: the count is the result, one JSON line a script can read.
    let lines = out.json_lines();
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    assert_eq!(lines[0]["affected"], 1, "{}", out.stdout);
    assert_eq!(lines[0]["replayed"], false, "{}", out.stdout);
    assert!(lines[0]["request_id"].is_string(), "{}", out.stdout);
    assert!(out.stderr.contains("deleted 1 row"), "{}", out.stderr);

    // upsert on the primary key: the second run updates the same row.
    let id = "0b8f6f0e-3c1d-4e2a-8b7c-9d0e1f2a3b4c";
    for duration in ["1", "2"] {
        let out = db(
            &addr,
            &[
                "upsert",
                "agent_actions",
                &format!("id={id}"),
                &format!("correlation_id={CORR}"),
                "agent_name=upserter",
                "action_type=tool_call",
                "action_name=write_file",
                &format!("duration_ms={duration}"),
            ],
        )
        .await;
        assert!(out.stderr.contains("upserted 1 row"), "{}", out.stderr);
    }
    let out = db(
        &addr,
        &["query", "agent_actions", "--where", "agent_name=upserter"],
    )
    .await;
    let rows = out.json_lines();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0]["id"].as_str(), &rows[0]["duration_ms"]),
        (Some(id), &json!(2))
    );
    let out = db(
        &addr,
        &[
            "upsert",
            "agent_actions",
            &format!("id={id}"),
            &format!("correlation_id={CORR}"),
            "agent_name=upserter",
            "action_type=tool_call",
            "action_name=write_file",
            "duration_ms=3",
            "--ignore-duplicates",
        ],
    )
    .await;
    assert!(out.stderr.contains("upserted 0 rows"), "{}", out.stderr);
    db(
        &addr,
        &["delete", "agent_actions", "--where", "agent_name=upserter"],
    )
    .await;

    // raw SQL with a parameter, as a table.
    let out = db(
        &addr,
        &[
            "raw", "SELECT agent_name, count(*) AS n FROM agent_actions WHERE created_at > $1 GROUP BY agent_name ORDER BY agent_name",
            "2020-01-01T00:00:00Z", "--output", "table",
        ],
    )
    .await;
    let table: Vec<&str> = out.stdout.lines().collect();
    assert!(
        table[0].contains("agent_name") && table[0].contains(" n"),
        "{}",
        out.stdout
    );
    assert!(
        table[2].contains("coder") && table[2].trim_end().ends_with('1'),
        "{}",
        out.stdout
    );
    assert!(
        table[3].contains("tester") && table[3].trim_end().ends_with('2'),
        "{}",
        out.stdout
    );
    assert_eq!(table[4], "(2 rows)");

    // the catalog
    let out = db(&addr, &["tables"]).await;
    assert!(
        out.json_lines()
            .contains(&json!({"table": "agent_actions"}))
    );
    let out = db(&addr, &["describe", "agent_actions"]).await;
    let desc = &out.json_lines()[0];
    assert_eq!(desc["primary_key"], json!(["id"]));
    assert!(
        desc["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "duration_ms" && c["json_type"] == "integer")
    );
    // Default values are written too: a NOT NULL column says so.
    let column = |name: &str| {
        desc["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(column("agent_name")["nullable"], json!(false));
    assert_eq!(column("duration_ms")["nullable"], json!(true));
    let out = db(&addr, &["describe", "agent_actions", "--output", "table"]).await;
    assert!(
        out.stdout
            .lines()
            .any(|l| l.contains("gen_random_uuid()") && l.contains("PK")),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn errors_are_one_clear_sentence() {
    let svc = DbSvc::start(&[]).await;
    let addr = svc.svc.addr.to_string();
    let out = omnibus(&[
        "--db-addr",
        &addr,
        "db",
        "query",
        "agent_actions",
        "--where",
        "agent_nmae=x",
    ])
    .await
    .unwrap();
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr.trim(),
        "omnibus: db-svc: invalid request: filter.condition.column: unknown column 'agent_nmae' in table agent_actions"
    );
    let out = omnibus(&[
        "--db-addr",
        &addr,
        "db",
        "delete",
        "agent_actions",
        "--where",
        "agent_name",
    ])
    .await
    .unwrap();
    assert_eq!(out.code, Some(2), "a usage error");
    assert!(out.stderr.contains("column OP value"), "{}", out.stderr);

    let nobody = format!("127.0.0.1:{}", free_port());
    let out = omnibus(&["--db-addr", &nobody, "db", "tables"])
        .await
        .unwrap();
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr.trim(),
        format!("omnibus: db-svc at {nobody} is not reachable - is it running?")
    );
    assert!(out.stdout.is_empty());
}

/// `health` and `status` answer with their exit status: a closed stdout (the JSON line
/// cannot be written) must not turn a failed check into success.
#[tokio::test]
async fn a_failed_check_fails_even_when_stdout_is_closed() {
    let nobody = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["--db-addr", &nobody, "health", "db"],
        vec!["--consumer-addr", &nobody, "--db-addr", &nobody, "status"],
    ] {
        let code = omnibus_stdout_closed(&args).await.unwrap();
        assert_eq!(code, Some(1), "{args:?}");
        // With stdout open the same check fails the same way (the JSON says why).
        let out = omnibus(&args).await.unwrap();
        assert_eq!(out.code, Some(1), "{args:?}: {}{}", out.stdout, out.stderr);
    }
}

#[tokio::test]
async fn writes_travel_over_the_bus_with_via_bus() {
    let db_ = TestDatabase::create().await.unwrap();
    let topics = BusTopics::create().await.unwrap();
    let group = format!("db-svc-{}", uuid::Uuid::new_v4().simple());
    let svc = start_db_svc(&db_, &topics, &group, &[]).await.unwrap();
    let addr = svc.addr.to_string();
    let t = &topics.topics;
    let brokers = omnibus_tests::kafka_brokers();
    let bus_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["--db-addr", &addr, "--brokers", &brokers, "db"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(
            [
                "--via",
                "bus",
                "--request-topic",
                &t.request,
                "--completed-topic",
                &t.completed,
                "--failed-topic",
                &t.failed,
                // The worker's first consumer-group join takes a few seconds on tansu.
                "--bus-timeout",
                "40s",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        v
    };
    let args = bus_args(&[
        "insert",
        "agent_actions",
        "agent_name=bus-coder",
        "action_type=tool_call",
        "action_name=read_file",
        &format!("correlation_id={CORR}"),
        "duration_ms=5",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = omnibus(&args).await.unwrap();
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("inserted 1 row over the event bus"),
        "{}",
        out.stderr
    );
    assert_eq!(out.json_lines()[0]["agent_name"], "bus-coder");

    // A FAILED reply is the same one sentence as the direct path's error.
    let args = bus_args(&[
        "update",
        "agent_actions",
        "--where",
        "agent_name=bus-coder",
        "--set",
        "nope=1",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = omnibus(&args).await.unwrap();
    assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.starts_with("omnibus: db-svc: VALIDATION_ERROR:") && out.stderr.contains("nope"),
        "{}",
        out.stderr
    );

    // Written exactly once, visible through the direct read path.
    let out = db(
        &addr,
        &["count", "agent_actions", "--where", "agent_name=bus-coder"],
    )
    .await;
    assert_eq!(out.json_lines(), vec![json!({"count": 1})]);
    drop(svc);
}

#[tokio::test]
async fn a_db_svc_with_tls_and_tokens_is_reached_with_ca_cert_and_token() {
    let cert = TestCert::generate().unwrap();
    let write = new_token("write");
    let (_db, svc) = cert.spawn_db_svc(&["--auth-write-tokens", &write]).await;
    let addr = format!("https://localhost:{}", svc.addr.port());
    let ca = cert.cert_path.to_str().unwrap();
    let secured = |extra: &[&str]| {
        let mut args = vec!["--ca-cert", ca, "--db-addr", addr.as_str()];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        omnibus(&refs).await.expect("run omnibus")
    };

    // Health needs no token; over TLS it is polled until db-svc is SERVING.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = run(secured(&["health", "db"])).await;
        if out.ok() {
            assert_eq!(out.json_lines()[0]["status"], "SERVING", "{}", out.stdout);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never SERVING: {out:?}\n{}",
            svc.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let token = ["--token", write.as_str()];
    let insert = [
        "db",
        "insert",
        "agent_actions",
        "agent_name=secured",
        "action_type=tool_call",
        "action_name=read_file",
    ];
    let corr = format!("correlation_id={CORR}");
    let mut args = secured(&token);
    args.extend(insert.iter().map(|s| s.to_string()));
    args.push(corr.clone());
    let out = run(args).await;
    assert!(out.ok(), "{out:?}");
    assert!(!out.stderr.contains(&write) && !out.stdout.contains(&write));
    let mut args = secured(&token);
    args.extend(
        [
            "db",
            "count",
            "agent_actions",
            "--where",
            "agent_name=secured",
        ]
        .map(String::from),
    );
    let out = run(args).await;
    assert!(out.ok(), "{out:?}");
    assert_eq!(out.json_lines()[0]["count"], json!(1), "{}", out.stdout);
    // host:port without a scheme: the CA alone turns TLS on.
    let bare = format!("localhost:{}", svc.addr.port());
    let out = omnibus(&[
        "--ca-cert",
        ca,
        "--db-addr",
        &bare,
        "--token",
        &write,
        "db",
        "tables",
    ])
    .await
    .unwrap();
    assert!(out.ok(), "{out:?}");
    assert!(out.stdout.contains("agent_actions"), "{}", out.stdout);

    // Without the token: the service's refusal, not a connection error.
    let out = run(secured(&["db", "tables"])).await;
    assert!(!out.ok(), "{out:?}");
    assert!(
        out.stderr.to_lowercase().contains("token"),
        "{}",
        out.stderr
    );
    // Without the CA the certificate is not trusted: a TLS error, named.
    let out = omnibus(&["--db-addr", &addr, "--token", &write, "db", "tables"])
        .await
        .unwrap();
    assert!(!out.ok(), "{out:?}");
    assert!(
        out.stderr.to_lowercase().contains("certificate"),
        "{}",
        out.stderr
    );
    // A CA with a plaintext address is refused before connecting.
    let plain = format!("http://localhost:{}", svc.addr.port());
    let out = omnibus(&["--ca-cert", ca, "--db-addr", &plain, "db", "tables"])
        .await
        .unwrap();
    assert!(out.stderr.contains("use https://"), "{}", out.stderr);
}

/// Wrong addresses and bad settings are one clear sentence and exit 1, never a hang, a
/// Debug dump or a secret: a port that accepts TCP but never answers HTTP/2 (the broker)
/// ends after `--timeout`; one that answers something else (PostgreSQL) is named as not
/// gRPC, by `db` and by `health`; a rejected Kafka setting is named without its value; a
/// malformed JSON value for a jsonb column is refused, not stored as a string.
#[tokio::test]
async fn wrong_addresses_and_bad_values_are_clear_errors() {
    let brokers = omnibus_tests::kafka_brokers();
    let silent = brokers.split(',').next().unwrap().to_string();
    let started = std::time::Instant::now();
    let out = omnibus(&["--timeout", "2s", "--db-addr", &silent, "db", "tables"])
        .await
        .unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("did not answer within --timeout"),
        "{out:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    // `health` has one deadline for connecting and asking: `--timeout` wherever it is
    // written (3 s by default), never the 30 s of the other calls.
    for args in [
        vec!["health", silent.as_str(), "--timeout", "1.5s"],
        vec!["--timeout", "1.5s", "health", silent.as_str()],
        vec!["health", silent.as_str()],
    ] {
        let out = omnibus(&args).await.unwrap();
        assert_eq!(out.code, Some(1), "{out:?}");
        let within = if args.len() == 2 {
            "within 3s"
        } else {
            "within 1.5s"
        };
        assert!(out.stderr.contains(within), "{args:?}: {out:?}");
    }

    // PostgreSQL's port: not gRPC. Depending on timing the client sees a transport error or a
    // connection closed without an answer; both say which address to check.
    let postgres = omnibus_tests::postgres_addr();
    let postgres = postgres.as_str();
    let out = omnibus(&["--db-addr", postgres, "db", "tables"])
        .await
        .unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!("db-svc at {postgres}"))
            && out.stderr.contains("is that the right address?"),
        "{out:?}"
    );
    let out = omnibus(&["health", postgres]).await.unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("is that the right address?"), "{out:?}");
    assert!(!out.stderr.contains("source:"), "no Debug dump: {out:?}");
    // Piped, health is a JSON line too, naming the failure.
    let line = &out.json_lines()[0];
    assert_eq!(line["address"], postgres, "{line}");
    assert!(line["status"].is_null(), "{line}");
    assert!(
        line["error"]
            .as_str()
            .unwrap()
            .contains("is that the right address?"),
        "{line}"
    );

    let out = omnibus(&[
        "--brokers",
        &brokers,
        "--kafka-config",
        "sasl.pasword=hunter2",
        "generate",
        "--count",
        "1",
    ])
    .await
    .unwrap();
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("sasl.pasword"), "{out:?}");
    assert!(
        !out.stderr.contains("hunter2"),
        "the value is never shown: {out:?}"
    );

    // A mistyped topic prefix is refused, and the check does not create the topics: the
    // second attempt is refused too.
    let prefix = format!("typo{}.", uuid::Uuid::new_v4().simple());
    for attempt in 1..=2 {
        let out = omnibus(&[
            "--brokers",
            &brokers,
            "generate",
            "--topic-prefix",
            &prefix,
            "--count",
            "1",
        ])
        .await
        .unwrap();
        assert_eq!(out.code, Some(1), "attempt {attempt}: {out:?}");
        assert!(
            out.stderr.contains("does not exist"),
            "attempt {attempt}: {out:?}"
        );
    }

    let svc = DbSvc::start(&[]).await;
    let addr = svc.svc.addr.to_string();
    let out = omnibus(&[
        "--db-addr",
        &addr,
        "db",
        "insert",
        "agent_actions",
        "agent_name=coder",
        "action_type=tool_call",
        "action_name=read_file",
        &format!("correlation_id={CORR}"),
        "action_details={bad",
    ])
    .await
    .unwrap();
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("not valid JSON"), "{out:?}");
    let out = db(&addr, &["count", "agent_actions", "--json"]).await;
    assert_eq!(
        out.json_lines(),
        vec![json!({"count": 0})],
        "nothing was written"
    );
}

/// `--row` integers beyond 64 bits (which serde_json reads as doubles) and numeric values a
/// double cannot carry reach numeric columns exactly, as do safe integers in a bigint one.
#[tokio::test]
async fn row_numbers_reach_numeric_columns_unrounded() {
    let svc = DbSvc::start_with(
        "CREATE TABLE ledger (id bigint PRIMARY KEY, amount numeric, exact numeric(30, 2))",
        "ledger",
    )
    .await;
    let addr = svc.svc.addr.to_string();
    db(
        &addr,
        &[
            "insert",
            "ledger",
            "--row",
            r#"{"id": 9007199254740993, "amount": 123456789012345678901, "exact": 12345678901234567.89}"#,
            "--row",
            r#"{"id": -9007199254740993, "amount": -9876543210987654321098765432, "exact": 0.5}"#,
            "--count-only",
        ],
    )
    .await;
    let mut conn = svc.db.connect().await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT id::text, amount::text, exact::text FROM ledger ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let want = [
        ("-9007199254740993", "-9876543210987654321098765432", "0.50"),
        (
            "9007199254740993",
            "123456789012345678901",
            "12345678901234567.89",
        ),
    ]
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()));
    assert_eq!(rows, want);
}

/// A duration no deadline can carry is a usage error (exit 2), not a panic mid-write.
#[tokio::test]
async fn an_absurd_bus_timeout_is_a_usage_error() {
    let out = omnibus(&[
        "db",
        "insert",
        "agent_actions",
        "agent_name=x",
        "--via",
        "bus",
        "--bus-timeout",
        "5000000d",
    ])
    .await
    .unwrap();
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("--bus-timeout"), "{out:?}");
    assert!(out.stderr.contains("at most 365d"), "{out:?}");
}

/// `db raw` gives a write a request id, as the other write commands do, and names it: the
/// same write retried with it is replayed, not written twice.
#[tokio::test]
async fn raw_writes_get_a_request_id_that_makes_a_retry_harmless() {
    let svc = DbSvc::start(&["--raw-sql-writes", "true"]).await;
    let addr = svc.svc.addr.to_string();
    let insert = "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name) \
                  VALUES (gen_random_uuid(), 'raw-writer', 'tool_call', 'x')";
    let out = db(&addr, &["raw", insert, "--output", "table"]).await;
    let summary = out.stdout.lines().last().unwrap_or_default().to_string();
    let id = summary
        .split_once("request id ")
        .map(|(_, id)| id.trim().to_string())
        .unwrap_or_else(|| panic!("no request id in {summary:?}"));
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{summary}");
    let again = db(
        &addr,
        &["raw", insert, "--request-id", &id, "--output", "table"],
    )
    .await;
    assert!(again.stdout.contains("replayed"), "{}", again.stdout);
    assert_eq!(svc.count_all("agent_actions").await, 1, "written once");
    // A read names no request id.
    let read = db(
        &addr,
        &[
            "raw",
            "SELECT count(*) AS n FROM agent_actions",
            "--output",
            "table",
        ],
    )
    .await;
    assert!(!read.stdout.contains("request id"), "{}", read.stdout);
}
