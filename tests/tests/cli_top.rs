//! `omnibus top` driven in a real terminal (tmux): the screen shows live agents, throughput and
//! recent actions fed by consumer-svc, and `q` quits cleanly.

use std::time::Duration;

use omnibus_tests::bin_path;
use omnibus_tests::cli::{Tmux, omnibus};
use omnibus_tests::consumer::{create_topics, start_consumer, unique_prefix, wait_status};
use omnibus_tests::kafka_brokers;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn top_shows_live_agents_and_quits_on_q() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let _topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let addr = consumer.addr.to_string();

    // Some history first (top starts from the snapshot), then live events while it runs.
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
                "3",
                "--seed",
                seed,
            ])
            .await
            .unwrap();
            assert!(out.ok(), "{}", out.stderr);
        }
    };
    generate("100", "1").await;
    wait_status(&consumer, WAIT, "history consumed", |s| {
        s.events_processed >= 100
    })
    .await
    .unwrap();

    let cmd = format!(
        "{} --consumer-addr {addr} top; echo \"top exited with $?\"; sleep 60",
        bin_path("omnibus").display()
    );
    let tmux = Tmux::start(&cmd, 140, 40).unwrap();
    let screen = tmux
        .wait_screen(WAIT, "the dashboard with history", |s| {
            s.contains("omnibus top") && s.contains("agent-00000") && s.contains("recent actions")
        })
        .await
        .unwrap();
    assert!(screen.contains(" live "), "{screen}");
    assert!(screen.contains("100 events consumed"), "{screen}");
    assert!(
        screen.contains("success%") && screen.contains("avg route"),
        "{screen}"
    );

    generate("200", "2").await;
    let screen = tmux
        .wait_screen(WAIT, "the live events counted", |s| {
            s.contains("300 events consumed") && s.contains("actions,")
        })
        .await
        .unwrap();
    // The throughput line counts the live events by kind (the history came in the snapshot).
    let line = screen
        .lines()
        .find(|l| l.contains("throughput"))
        .unwrap_or_else(|| panic!("no throughput line:\n{screen}"));
    let counted: u64 = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert!(counted > 0 && counted <= 200, "{line}");
    assert!(
        [
            "task_complete",
            "Read",
            "Write",
            "Edit",
            "Bash",
            "Grep",
            "Glob",
            "WebFetch"
        ]
        .iter()
        .any(|a| screen.contains(a)),
        "recent actions listed:\n{screen}"
    );

    tmux.send_keys("q").unwrap();
    let screen = tmux
        .wait_screen(WAIT, "top exiting", |s| s.contains("top exited with"))
        .await
        .unwrap();
    assert!(screen.contains("top exited with 0"), "{screen}");
    assert!(
        !screen.contains("omnibus top - consumer-svc"),
        "the screen is restored:\n{screen}"
    );
}

/// A stream error no reconnect can fix (streams switched off) closes the dashboard and `top`
/// fails with the reason, as `tail` does, instead of showing "reconnecting" forever.
#[tokio::test]
async fn top_fails_when_the_stream_cannot_be_opened() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let _topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer = start_consumer(&brokers, &prefix, &["--enable-real-time-events", "false"])
        .await
        .unwrap();
    let cmd = format!(
        "{} --consumer-addr {} top; echo \"top exited with $?\"; sleep 60",
        bin_path("omnibus").display(),
        consumer.addr
    );
    let tmux = Tmux::start(&cmd, 140, 40).unwrap();
    let screen = tmux
        .wait_screen(WAIT, "top exiting", |s| s.contains("top exited with"))
        .await
        .unwrap();
    assert!(screen.contains("top exited with 1"), "{screen}");
    assert!(
        screen.to_lowercase().contains("disabled"),
        "the reason is shown:\n{screen}"
    );
}

/// SIGTERM (a `kill`, as SIGHUP from a closed window) ends the dashboard like `q`: the
/// terminal is restored, not left in raw mode on the alternate screen.
#[tokio::test]
async fn top_restores_the_terminal_on_sigterm() {
    let brokers = kafka_brokers();
    let prefix = unique_prefix();
    let _topics = create_topics(&brokers, &prefix, 1).await.unwrap();
    let consumer = start_consumer(&brokers, &prefix, &[]).await.unwrap();
    let addr = consumer.addr.to_string();
    let cmd = format!(
        "{} --consumer-addr {addr} top; echo \"top exited with $?\"; sleep 60",
        bin_path("omnibus").display()
    );
    let tmux = Tmux::start(&cmd, 140, 40).unwrap();
    tmux.wait_screen(WAIT, "the dashboard", |s| s.contains("omnibus top"))
        .await
        .unwrap();
    let killed = std::process::Command::new("pkill")
        .args(["-TERM", "-f", &format!("consumer-addr {addr} top$")])
        .status()
        .unwrap();
    assert!(killed.success(), "no omnibus top process found");
    let screen = tmux
        .wait_screen(WAIT, "top exiting", |s| s.contains("top exited with"))
        .await
        .unwrap();
    assert!(
        !screen.contains("omnibus top - consumer-svc"),
        "the screen is restored:\n{screen}"
    );
    // Raw mode off: the shell's echo works again (typed text shows on the screen).
    tmux.send_keys("echo restored-$((40+2))").unwrap();
    tmux.send_keys("Enter").unwrap();
    tmux.wait_screen(WAIT, "the shell line echoed", |s| s.contains("restored-"))
        .await
        .unwrap();
}
