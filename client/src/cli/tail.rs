//! `omnibus tail`: live events from consumer-svc, filtered, one line each.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use omnibus_proto::consumer::v1 as pb;
use pb::subscribe_response::Update;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::filter::{self, Condition, Op};
use super::output::{self, Format};
use super::stream::{self, Item};
use super::{Cli, Fail, Result, Svc, connect};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Agent actions.
    Actions,
    /// Routing decisions.
    Routing,
    /// Agent transformations.
    Transformations,
    /// Router performance metrics.
    Performance,
    /// Per-agent metric updates (coalesced).
    Metrics,
    /// Everything, including consumer status changes.
    All,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// What to follow.
    #[arg(value_enum, default_value = "all")]
    pub kind: Kind,
    /// A condition on the event's fields (repeatable; all must hold), as in `omnibus db query`.
    #[arg(long = "where", short = 'w', value_name = "COND", value_parser = parse_where)]
    pub conditions: Vec<Condition>,
    /// Stop after this many events.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
}

fn parse_where(raw: &str) -> std::result::Result<Condition, String> {
    filter::parse_condition(raw).map_err(|e| e.to_string())
}

/// The messages `kind` follows (proto full names).
fn followed(kind: Kind) -> &'static [&'static str] {
    const ACTION: &str = "omnibus.consumer.v1.AgentAction";
    const ROUTING: &str = "omnibus.consumer.v1.RoutingDecision";
    const TRANSFORMATION: &str = "omnibus.consumer.v1.Transformation";
    const PERFORMANCE: &str = "omnibus.consumer.v1.PerformanceMetric";
    const METRICS: &str = "omnibus.consumer.v1.AgentMetrics";
    const STATUS: &str = "omnibus.consumer.v1.ConsumerStatus";
    match kind {
        Kind::Actions => &[ACTION],
        Kind::Routing => &[ROUTING],
        Kind::Transformations => &[TRANSFORMATION],
        Kind::Performance => &[PERFORMANCE],
        Kind::Metrics => &[METRICS],
        Kind::All => &[
            ACTION,
            ROUTING,
            TRANSFORMATION,
            PERFORMANCE,
            METRICS,
            STATUS,
        ],
    }
}

/// Refuses a condition that no followed event could satisfy - a field none of them has, or
/// an order comparison of a numeric field with something that is not a number - since tail
/// would then wait for ever, showing nothing.
pub fn check_conditions(kind: Kind, conditions: &[Condition]) -> std::result::Result<(), String> {
    use prost_reflect::Kind as K;
    let messages: Vec<_> = followed(kind)
        .iter()
        .filter_map(|name| omnibus_proto::json::message_descriptor(name).ok())
        .collect();
    let what = kind
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string());
    for c in conditions {
        if c.column == "agent" {
            continue; // whichever agent field an event has
        }
        let fields: Vec<_> = messages
            .iter()
            .filter_map(|m| m.get_field_by_name(&c.column))
            .collect();
        if fields.is_empty() {
            let mut names: Vec<String> = messages
                .iter()
                .flat_map(|m| m.fields().map(|f| f.name().to_string()))
                .collect();
            names.sort();
            names.dedup();
            return Err(format!(
                "no '{what}' event has a field '{}'; they have: agent, {}",
                c.column,
                names.join(", ")
            ));
        }
        let numeric = fields.iter().all(|f| {
            !f.is_list()
                && matches!(
                    f.kind(),
                    K::Double
                        | K::Float
                        | K::Int32
                        | K::Int64
                        | K::Uint32
                        | K::Uint64
                        | K::Sint32
                        | K::Sint64
                        | K::Fixed32
                        | K::Fixed64
                        | K::Sfixed32
                        | K::Sfixed64
                )
        });
        let ordered = matches!(c.op, Op::Gt | Op::Gte | Op::Lt | Op::Lte);
        if numeric
            && ordered
            && let Some(v) = c.values.first()
            && v.text.trim().parse::<f64>().is_err()
        {
            return Err(format!(
                "'{}' is a number, so '{}' can never compare with it",
                c.column, v.text
            ));
        }
    }
    Ok(())
}

/// The Subscribe request for `kind`, with the conditions consumer-svc can apply itself pushed
/// down (the rest, and these again, are checked here).
pub fn request(
    kind: Kind,
    conditions: &[Condition],
    include_snapshot: bool,
) -> pb::SubscribeRequest {
    let channels = match kind {
        Kind::Actions => vec![pb::Channel::Actions],
        Kind::Routing => vec![pb::Channel::Routing],
        Kind::Transformations => vec![pb::Channel::Transformations],
        Kind::Performance => vec![pb::Channel::Performance],
        Kind::Metrics => vec![pb::Channel::Metrics],
        Kind::All => Vec::new(),
    };
    let mut r = pb::SubscribeRequest {
        channels: channels.into_iter().map(|c| c as i32).collect(),
        include_snapshot,
        ..Default::default()
    };
    for c in conditions {
        let value = || c.values.first().map(|v| v.text.clone());
        if c.op != Op::Eq {
            continue;
        }
        match c.column.as_str() {
            "agent" => r.agent = value(),
            "action_type" => r.action_type = value(),
            "correlation_id" => r.correlation_id = value(),
            _ => {}
        }
    }
    r
}

/// An update's kind name and fields (proto names), for filtering and printing.
pub fn event_of(update: &Update) -> Option<(&'static str, Map<String, Value>)> {
    use stream::event_json;
    Some(match update {
        Update::Action(a) => ("action", event_json("omnibus.consumer.v1.AgentAction", a)),
        Update::RoutingDecision(d) => (
            "routing",
            event_json("omnibus.consumer.v1.RoutingDecision", d),
        ),
        Update::Transformation(t) => (
            "transformation",
            event_json("omnibus.consumer.v1.Transformation", t),
        ),
        Update::PerformanceMetric(m) => (
            "performance",
            event_json("omnibus.consumer.v1.PerformanceMetric", m),
        ),
        Update::AgentMetrics(m) => ("metrics", event_json("omnibus.consumer.v1.AgentMetrics", m)),
        Update::ConsumerStatus(s) => (
            "status",
            event_json("omnibus.consumer.v1.ConsumerStatus", s),
        ),
        Update::Snapshot(_) | Update::Lagged(_) => return None,
    })
}

fn s<'a>(e: &'a Map<String, Value>, k: &str) -> &'a str {
    e.get(k).and_then(Value::as_str).unwrap_or("")
}

fn ms(e: &Map<String, Value>, k: &str) -> String {
    e.get(k)
        .and_then(Value::as_f64)
        .map(|v| format!("{v:.0}ms"))
        .unwrap_or_default()
}

fn num(e: &Map<String, Value>, k: &str) -> String {
    match e.get(k) {
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// `HH:MM:SS.mmm` of an RFC 3339 timestamp (UTC).
fn clock(e: &Map<String, Value>, k: &str) -> String {
    let t = s(e, k);
    t.get(11..23).unwrap_or(t).to_string()
}

/// One human line for an event.
pub fn human_line(kind: &str, e: &Map<String, Value>) -> String {
    // Shown, not obeyed: event text comes from any producer.
    output::printable(&event_line(kind, e)).into_owned()
}

fn event_line(kind: &str, e: &Map<String, Value>) -> String {
    match kind {
        "action" => format!(
            "{}  action       {:<14} {:<10} {:<14} {:>7}  {}",
            clock(e, "timestamp"),
            s(e, "agent_name"),
            s(e, "action_type"),
            s(e, "action_name"),
            ms(e, "duration_ms"),
            s(e, "correlation_id")
        ),
        "routing" => format!(
            "{}  routing      {:<14} conf {:<6} {:>7}  {:<24} {}",
            clock(e, "timestamp"),
            s(e, "selected_agent"),
            num(e, "confidence_score"),
            ms(e, "routing_time_ms"),
            s(e, "routing_strategy"),
            s(e, "user_request")
        ),
        "transformation" => format!(
            "{}  transform    {} -> {}  {}  {}{}",
            clock(e, "timestamp"),
            s(e, "source_agent"),
            s(e, "target_agent"),
            ms(e, "transformation_duration_ms"),
            s(e, "transformation_reason"),
            if e.get("success") == Some(&Value::Bool(false)) {
                "  FAILED"
            } else {
                ""
            }
        ),
        "performance" => format!(
            "{}  performance  {:>7}  cache {:<4} candidates {:<3} {}",
            clock(e, "timestamp"),
            ms(e, "routing_duration_ms"),
            if e.get("cache_hit") == Some(&Value::Bool(true)) {
                "hit"
            } else {
                "miss"
            },
            num(e, "candidates_evaluated"),
            s(e, "trigger_match_strategy")
        ),
        "metrics" => format!(
            "{}  metrics      {:<14} requests {} actions {} ok {} errors {} success {}",
            clock(e, "last_seen"),
            s(e, "agent"),
            num(e, "total_requests"),
            num(e, "total_actions"),
            num(e, "successes"),
            num(e, "errors"),
            e.get("success_rate")
                .and_then(Value::as_f64)
                .map(|r| format!("{:.1}%", r * 100.0))
                .unwrap_or_else(|| "-".into())
        ),
        _ => format!(
            "status: connected={} events={} parse_errors={}",
            e.get("connected").unwrap_or(&Value::Null),
            num(e, "events_processed"),
            num(e, "parse_errors")
        ),
    }
}

pub async fn run(cli: &Cli, args: &TailArgs, format: Format) -> Result<ExitCode> {
    check_conditions(args.kind, &args.conditions).map_err(Fail)?;
    // Fail fast with one sentence when consumer-svc is not there at all.
    connect(Svc::Consumer, &cli.consumer_addr).await?;
    if args.count == Some(0) {
        // Nothing to show (the address was checked).
        return Ok(ExitCode::SUCCESS);
    }
    let (tx, mut rx) = mpsc::channel(1024);
    let req = request(args.kind, &args.conditions, false);
    tokio::spawn(stream::follow(cli.consumer_addr.clone(), req, tx));
    // One handler for the whole run: a Ctrl-C between two events must not be lost.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Fail(format!("cannot handle Ctrl-C: {e}")))?;
    let mut out = std::io::stdout().lock();
    let mut shown = 0u64;
    let mut shown_ids = RecentIds::new(100_000);
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            _ = interrupt.recv() => break,
        };
        let Some(item) = item else { break };
        match item {
            Item::Update(msg) => {
                let Some(update) = &msg.update else { continue };
                let Some((kind, event)) = event_of(update) else {
                    continue;
                };
                if !filter::matches(&args.conditions, &event) {
                    continue;
                }
                // A restarted consumer-svc replays its window under new sequence numbers.
                if let Some(id) = event.get("id").and_then(Value::as_str)
                    && !shown_ids.first_time(id)
                {
                    continue;
                }
                let line = match format {
                    // Written by hand so the envelope fields come first (serde_json sorts keys).
                    Format::Json => format!(
                        r#"{{"sequence":{},"kind":"{kind}","event":{}}}"#,
                        msg.sequence,
                        Value::Object(event)
                    ),
                    Format::Table => human_line(kind, &event),
                };
                match writeln!(out, "{line}").and_then(|_| out.flush()) {
                    Ok(()) => {}
                    // The reader went away (`| head`): done.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                        return Ok(ExitCode::SUCCESS);
                    }
                    // A full disk or an I/O error is a failure, not an end.
                    Err(e) => return Err(e.into()),
                }
                shown += 1;
                if args.count.is_some_and(|n| shown >= n) {
                    break;
                }
            }
            Item::Notice(n) => {
                let _ = writeln!(std::io::stderr(), "omnibus tail: {n}");
            }
            Item::Connected(_) => {}
            Item::Fatal(e) => return Err(e),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The ids of the last `cap` events shown, to drop repeats.
pub struct RecentIds {
    seen: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl RecentIds {
    pub fn new(cap: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// True the first time `id` is offered (within the last `cap` ids).
    pub fn first_time(&mut self, id: &str) -> bool {
        if self.seen.contains(id) {
            return false;
        }
        if self.order.len() == self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(id.to_string());
        self.order.push_back(id.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_ids_are_dropped_within_the_window() {
        let mut r = RecentIds::new(2);
        assert!(r.first_time("a"));
        assert!(r.first_time("b"));
        assert!(!r.first_time("a"));
        assert!(r.first_time("c"));
        assert!(r.first_time("a"), "a left the window");
        assert!(!r.first_time("c"));
    }

    #[test]
    fn conditions_no_followed_event_could_satisfy_are_refused() {
        let conds = |list: &[&str]| -> Vec<Condition> {
            list.iter()
                .map(|e| filter::parse_condition(e).unwrap())
                .collect()
        };
        for (kind, ok) in [
            (
                Kind::Actions,
                &["agent=a", "agent_name=a", "duration_ms>5", "success=true"][..],
            ),
            (
                Kind::Routing,
                &["selected_agent=a", "confidence_score>=0.5"],
            ),
            (
                Kind::All,
                &["agent_name=a", "selected_agent=b", "events_processed>1"],
            ),
            (Kind::Metrics, &["total_requests>3", "agent=x"]),
        ] {
            assert_eq!(
                check_conditions(kind, &conds(ok)),
                Ok(()),
                "{kind:?} {ok:?}"
            );
        }
        let e = check_conditions(Kind::Actions, &conds(&["agentname=a"])).unwrap_err();
        assert!(
            e.starts_with("no 'actions' event has a field 'agentname'"),
            "{e}"
        );
        assert!(e.contains("agent_name"), "{e}");
        assert!(check_conditions(Kind::Routing, &conds(&["agent_name=a"])).is_err());
        let e = check_conditions(Kind::Actions, &conds(&["duration_ms>abc"])).unwrap_err();
        assert_eq!(
            e,
            "'duration_ms' is a number, so 'abc' can never compare with it"
        );
        // Quoted or not, a number compares (as the matcher reads it).
        assert_eq!(
            check_conditions(Kind::Actions, &conds(&["duration_ms>'5'"])),
            Ok(())
        );
        // Equality with text is left alone (it simply never holds for a number).
        assert_eq!(
            check_conditions(Kind::Actions, &conds(&["duration_ms=x"])),
            Ok(())
        );
    }

    #[test]
    fn equality_on_known_fields_is_pushed_down() {
        let conds: Vec<_> = [
            "agent=coder",
            "action_type=error",
            "duration_ms>5",
            "correlation_id!=x",
        ]
        .iter()
        .map(|e| filter::parse_condition(e).unwrap())
        .collect();
        let r = request(Kind::Actions, &conds, false);
        assert_eq!(r.channels, vec![pb::Channel::Actions as i32]);
        assert_eq!(r.agent.as_deref(), Some("coder"));
        assert_eq!(r.action_type.as_deref(), Some("error"));
        assert_eq!(r.correlation_id, None, "only equality is pushed down");
        assert!(request(Kind::All, &[], true).channels.is_empty());
        assert!(request(Kind::All, &[], true).include_snapshot);
    }

    #[test]
    fn lines_show_the_essentials() {
        let a = pb::AgentAction {
            agent_name: "coder".into(),
            action_type: "tool_call".into(),
            action_name: Some("Read".into()),
            duration_ms: Some(12.0),
            timestamp: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            ..Default::default()
        };
        let (kind, e) = event_of(&Update::Action(a)).unwrap();
        let line = human_line(kind, &e);
        assert!(line.starts_with("22:13:20.005  action"), "{line}");
        for part in ["coder", "tool_call", "Read", "12ms"] {
            assert!(line.contains(part), "{line}");
        }
    }

    /// One event, one line, whatever its text holds: a producer's escape sequences are shown.
    #[test]
    fn event_text_cannot_break_lines_or_drive_the_terminal() {
        let d = pb::RoutingDecision {
            selected_agent: "a\x1b]0;owned\x07".into(),
            user_request: Some("fix\nthis\r\x1b[2J".into()),
            ..Default::default()
        };
        let (kind, e) = event_of(&Update::RoutingDecision(d)).unwrap();
        let line = human_line(kind, &e);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains("fix⏎this␍␛[2J"), "{line}");
    }
}
