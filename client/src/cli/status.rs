//! `omnibus status` (both services on one screen) and `omnibus health` (a container check).

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use omnibus_proto::consumer::v1 as cpb;
use omnibus_proto::consumer::v1::consumer_service_client::ConsumerServiceClient;
use omnibus_proto::db::v1 as dpb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use serde_json::{Value, json};
use tonic_health::pb::health_check_response::ServingStatus;

use super::output::{self, Format};
use super::stream::event_json;
use super::{Cli, HealthArgs, Result, Svc, call_error, connect};

const CONSUMER_SERVICE: &str = "omnibus.consumer.v1.ConsumerService";
const DB_SERVICE: &str = "omnibus.db.v1.DatabaseService";

/// One service's health, as text: SERVING, NOT_SERVING, or why it did not answer.
async fn health_of(svc: Svc, addr: &str, service: &str, timeout: Duration) -> (bool, String) {
    match omnibus_client::health::check_with(addr, service, timeout, super::connect_options()).await
    {
        Ok(ServingStatus::Serving) => (true, "SERVING".into()),
        Ok(other) => (false, other.as_str_name().to_string()),
        Err(omnibus_client::health::HealthError::Unreachable { .. }) => {
            (false, super::unreachable(svc, addr).0)
        }
        Err(e) => (false, e.to_string()),
    }
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|| "-".into())
}

/// The consumer status as the lines of the screen.
pub fn render_consumer(s: &cpb::ConsumerStatus) -> String {
    let lag: i64 = s.partitions.iter().map(|p| p.lag.max(0)).sum();
    let mut out = output::pairs(&[
        (
            "broker",
            if s.connected {
                "connected".into()
            } else {
                "NOT connected".into()
            },
        ),
        (
            "replay",
            match s.replaying {
                Some(true) => "in progress (NOT_SERVING until it is over)".into(),
                Some(false) => "over".into(),
                None => "not reported (an older consumer-svc)".into(),
            },
        ),
        ("events", s.events_processed.to_string()),
        ("last event", ts(&s.last_event_time)),
        ("parse errors", s.parse_errors.to_string()),
        (
            "lag",
            format!("{lag} messages over {} partitions", s.partitions.len()),
        ),
        (
            "agents",
            match s.agent_events_untracked {
                0 => s.agents.to_string(),
                n => format!(
                    "{} ({n} events of agents past --max-agents or with names over 256 bytes not tracked)",
                    s.agents
                ),
            },
        ),
        ("sequence", s.last_sequence.to_string()),
        (
            "streams",
            if s.real_time_events_enabled {
                "enabled".into()
            } else {
                "disabled (ENABLE_REAL_TIME_EVENTS=false)".into()
            },
        ),
        (
            "retention",
            format!("{}h", s.retention_seconds as f64 / 3600.0),
        ),
    ]);
    out.push('\n');
    let rows: Vec<serde_json::Map<String, Value>> = s
        .topics
        .iter()
        .map(|t| {
            let lag: i64 = s
                .partitions
                .iter()
                .filter(|p| p.topic == t.topic)
                .map(|p| p.lag.max(0))
                .sum();
            let mut m = serde_json::Map::new();
            m.insert("topic".into(), t.topic.clone().into());
            m.insert("events".into(), t.events_consumed.into());
            m.insert("parse errors".into(), t.parse_errors.into());
            m.insert("expired".into(), t.skipped_expired.into());
            m.insert("lag".into(), lag.into());
            m.insert("last event".into(), ts(&t.last_event_time).into());
            m
        })
        .collect();
    let cols: Vec<String> = [
        "topic",
        "events",
        "parse errors",
        "expired",
        "lag",
        "last event",
    ]
    .map(String::from)
    .to_vec();
    let _ = write!(out, "{}", output::table(&rows, &cols, true));
    out
}

pub async fn run(cli: &Cli, format: Format) -> Result<ExitCode> {
    let (c_ok, c_health) = health_of(
        Svc::Consumer,
        &cli.consumer_addr,
        CONSUMER_SERVICE,
        cli.health_timeout(),
    )
    .await;
    let (d_ok, d_health) = health_of(Svc::Db, &cli.db_addr, DB_SERVICE, cli.health_timeout()).await;
    let consumer_status = match connect(Svc::Consumer, &cli.consumer_addr).await {
        Ok(ch) => ConsumerServiceClient::new(ch)
            .get_consumer_status(cpb::GetConsumerStatusRequest {})
            .await
            .map_err(|s| call_error(Svc::Consumer, &cli.consumer_addr, &s))
            .and_then(|r| {
                r.into_inner()
                    .status
                    .ok_or_else(|| super::Fail("consumer-svc sent no status".into()))
            }),
        Err(e) => Err(e),
    };
    let tables = match connect(Svc::Db, &cli.db_addr).await {
        Ok(ch) => DatabaseServiceClient::new(ch)
            .list_tables(dpb::ListTablesRequest {})
            .await
            .map(|r| r.into_inner().tables)
            .map_err(|s| call_error(Svc::Db, &cli.db_addr, &s)),
        Err(e) => Err(e),
    };
    let mut screen = String::new();
    match format {
        Format::Json => {
            let consumer = json!({
                "addr": cli.consumer_addr,
                "health": c_health,
                "status": consumer_status.as_ref().map(|s| Value::Object(event_json("omnibus.consumer.v1.ConsumerStatus", s))).unwrap_or(Value::Null),
                "error": consumer_status.as_ref().err().map(|e| e.0.clone()),
            });
            let db = json!({
                "addr": cli.db_addr,
                "health": d_health,
                "tables": tables.as_ref().ok(),
                "error": tables.as_ref().err().map(|e| e.0.clone()),
            });
            let _ = writeln!(screen, "{}", json!({ "consumer": consumer, "db": db }));
        }
        Format::Table => {
            let _ = writeln!(screen, "consumer-svc  {}  {}", cli.consumer_addr, c_health);
            match &consumer_status {
                Ok(s) => {
                    let _ = writeln!(screen, "{}", indent(&render_consumer(s)));
                }
                Err(e) if c_ok => {
                    let _ = writeln!(screen, "  {e}");
                }
                Err(_) => {}
            }
            let _ = writeln!(screen);
            let _ = writeln!(screen, "db-svc        {}  {}", cli.db_addr, d_health);
            match &tables {
                Ok(t) => {
                    let _ = writeln!(screen, "  {} tables: {}", t.len(), t.join(", "));
                }
                Err(e) if d_ok => {
                    let _ = writeln!(screen, "  {e}");
                }
                Err(_) => {}
            }
        }
    }
    // A closed stdout (`omnibus status | head -0`) must not hide a failure: the exit status
    // is the answer, so the write's error is dropped rather than returned.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(screen.as_bytes()).and_then(|()| out.flush());
    }
    // Healthy is not enough: health needs no token, so the reads must have worked too.
    Ok(
        if c_ok && d_ok && consumer_status.is_ok() && tables.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub async fn health(cli: &Cli, args: &HealthArgs) -> Result<ExitCode> {
    let addr = match args.target.as_str() {
        "consumer" => cli.consumer_addr.clone(),
        "db" => cli.db_addr.clone(),
        other => other.to_string(),
    };
    let answer = omnibus_client::health::check_with(
        &addr,
        &args.service,
        cli.health_timeout(),
        super::connect_options(),
    )
    .await;
    let serving = matches!(answer, Ok(ServingStatus::Serving));
    let status = answer.as_ref().ok().map(|s| s.as_str_name());
    let error = answer.as_ref().err().map(ToString::to_string);
    let line = match (cli.format(), status) {
        (Format::Json, _) => Some(
            json!({
                "address": addr,
                "service": args.service,
                "status": status,
                "error": error,
            })
            .to_string(),
        ),
        (Format::Table, Some(status)) => Some(format!("{addr}: {status}")),
        (Format::Table, None) => None,
    };
    if let Some(line) = line {
        // As in `status`: a closed stdout leaves the exit status to tell.
        let _ = writeln!(std::io::stdout(), "{line}");
    }
    if let Some(e) = error {
        // A closed stderr leaves only the exit code to tell.
        let _ = writeln!(std::io::stderr(), "omnibus: {e}");
    }
    Ok(if serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_status_screen_sums_lag_per_topic() {
        let s = cpb::ConsumerStatus {
            connected: true,
            events_processed: 42,
            topics: vec![cpb::TopicStatus {
                topic: "agent-actions".into(),
                events_consumed: 40,
                ..Default::default()
            }],
            partitions: vec![
                cpb::PartitionStatus {
                    topic: "agent-actions".into(),
                    partition: 0,
                    lag: 3,
                    ..Default::default()
                },
                cpb::PartitionStatus {
                    topic: "agent-actions".into(),
                    partition: 1,
                    lag: 4,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let text = render_consumer(&s);
        assert!(text.contains("7 messages over 2 partitions"), "{text}");
        let line = text.lines().find(|l| l.contains("agent-actions")).unwrap();
        assert!(line.contains("40") && line.contains(" 7 "), "{line}");
    }

    #[test]
    fn the_replay_line_says_whether_the_view_is_complete() {
        let mut s = cpb::ConsumerStatus {
            replaying: Some(true),
            ..Default::default()
        };
        assert!(render_consumer(&s).contains("replay  in progress"));
        s.replaying = Some(false);
        assert!(render_consumer(&s).contains("replay  over"));
        s.replaying = None;
        assert!(render_consumer(&s).contains("replay  not reported"));
    }
}
