//! All consumer-svc settings: flags with environment fallbacks.

use std::net::SocketAddr;

use std::time::Duration;

use clap::Parser;
use svc_kit::server::{parse_bytes, parse_duration};
use svc_kit::{ServerArgs, telemetry::LogArgs};

use crate::events::EventKind;
use crate::ingest::ReplaySeek;

/// Largest `--subscriber-queue`: the broadcast ring allocates its slots up front.
pub const MAX_SUBSCRIBER_QUEUE: usize = 65_536;

/// consumer-svc: consumes agent events from Kafka and serves live aggregations over gRPC.
#[derive(Clone, Debug, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "CONSUMER_SVC_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Alternative name for --kafka-brokers (the guide accepts either variable).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", hide_short_help = true)]
    pub kafka_bootstrap_servers: Option<String>,

    /// Prefix put before every topic name, e.g. `dev.` (environments sharing one cluster).
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Topic of routing decisions (without the prefix).
    #[arg(
        long,
        env = "TOPIC_ROUTING_DECISIONS",
        default_value = "agent-routing-decisions"
    )]
    pub topic_routing_decisions: String,

    /// Topic of agent actions (without the prefix).
    #[arg(long, env = "TOPIC_AGENT_ACTIONS", default_value = "agent-actions")]
    pub topic_agent_actions: String,

    /// Topic of agent transformations (without the prefix).
    #[arg(
        long,
        env = "TOPIC_TRANSFORMATIONS",
        default_value = "agent-transformation-events"
    )]
    pub topic_transformations: String,

    /// Topic of router performance metrics (without the prefix).
    #[arg(
        long,
        env = "TOPIC_PERFORMANCE_METRICS",
        default_value = "router-performance-metrics"
    )]
    pub topic_performance_metrics: String,

    /// How long events are kept, by event time (also how far back a start replays). Expiry
    /// runs in whole hours: the cutoff is now minus this, rounded down to the hour, so an event
    /// stays at least this long and less than an hour longer. Windows of reads may not exceed it.
    #[arg(long, env = "RETENTION", value_parser = parse_duration, default_value = "24h")]
    pub retention: Duration,

    /// How partitions are replayed on start: `timestamp` (read from the first offset; a log
    /// that starts before the window jumps to the broker's offset for the cutoff, verified) or
    /// `earliest` (read all, skip events older than the window).
    #[arg(long, env = "REPLAY_SEEK", value_enum, default_value_t = ReplaySeek::Timestamp)]
    pub replay_seek: ReplaySeek,

    /// The replica is NOT_SERVING until its start-up replay is over; after this long it reports
    /// SERVING anyway, with a warning (a partition that cannot be read to its end, e.g. one
    /// whose topic the broker keeps answering with an error, must not keep it out for good).
    #[arg(long, env = "REPLAY_TIMEOUT", value_parser = parse_duration, default_value = "10m")]
    pub replay_timeout: Duration,

    /// Recent actions kept.
    #[arg(long, env = "MAX_ACTIONS", default_value_t = 1000)]
    pub max_actions: usize,

    /// Recent routing decisions kept.
    #[arg(long, env = "MAX_ROUTING_DECISIONS", default_value_t = 1000)]
    pub max_routing_decisions: usize,

    /// Recent transformations kept.
    #[arg(long, env = "MAX_TRANSFORMATIONS", default_value_t = 100)]
    pub max_transformations: usize,

    /// Recent performance metrics kept.
    #[arg(long, env = "MAX_PERFORMANCE_METRICS", default_value_t = 200)]
    pub max_performance_metrics: usize,

    /// Byte budget of each recent buffer (actions, routing decisions, transformations,
    /// performance metrics), e.g. 64MiB: past it the oldest events go, as past the counts above
    /// (the newest stays however large). An event counts its text plus ~200 bytes; an action
    /// twice its text (its stream encoding, kept once made).
    #[arg(long, env = "MAX_BUFFER_BYTES", value_parser = parse_bytes, default_value = "64MiB")]
    pub max_buffer_bytes: usize,

    /// Agents whose metrics are kept at once (more than 0); routing decisions and actions of
    /// further agents still count and stay in the recent buffers, but get no agent metrics
    /// until a slot frees (status: agent_events_untracked).
    #[arg(long, env = "MAX_AGENTS", default_value_t = crate::state::DEFAULT_MAX_AGENTS)]
    pub max_agents: usize,

    /// Serve the streaming RPCs (StreamActions, StreamAgentMetrics, Subscribe).
    #[arg(long, env = "ENABLE_REAL_TIME_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_real_time_events: bool,

    /// Minimum interval between two metric pushes of one agent (coalescing).
    #[arg(long, env = "AGENT_METRICS_INTERVAL", value_parser = parse_duration, default_value = "1s")]
    pub agent_metrics_interval: Duration,

    /// Per-subscriber queue, in batches (one ingest batch's updates, at most 256 each); a
    /// subscriber further behind gets a lag notice. Rounded up to a power of two (the
    /// broadcast ring's size), at most 65536.
    #[arg(long, env = "SUBSCRIBER_QUEUE", default_value_t = 1024)]
    pub subscriber_queue: usize,

    /// Per-queue byte budget, e.g. 16MiB: a subscriber that falls further behind (in updates
    /// not yet read, counted as for --max-buffer-bytes) gets a lag notice. One queue is shared
    /// by the subscribers without an agent filter, one per agent followed.
    #[arg(long, env = "SUBSCRIBER_QUEUE_BYTES", value_parser = parse_bytes, default_value = "16MiB")]
    pub subscriber_queue_bytes: usize,

    /// Recent stream updates kept for subscribers resuming after a reconnect.
    #[arg(long, env = "RESUME_BUFFER", default_value_t = 10_000)]
    pub resume_buffer: usize,

    /// Byte budget of the resume buffer, e.g. 64MiB (the newest update stays however large);
    /// resuming from before its oldest update reports the gap.
    #[arg(long, env = "RESUME_BUFFER_BYTES", value_parser = parse_bytes, default_value = "64MiB")]
    pub resume_buffer_bytes: usize,

    /// Most updates a stream takes at once from its queue: the largest push of a subscriber
    /// that is behind (plus up to one batch). Smaller bounds each stream's encode buffers,
    /// which grow to its largest push (memory), at some CPU cost per delivery.
    #[arg(long, env = "MAX_PUSH", default_value_t = 1000)]
    pub max_push: usize,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Settings after validation.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Validated bootstrap list, joined with commas for librdkafka.
    pub brokers: String,
    pub server: ServerArgs,
    pub log: LogArgs,
    /// Full topic names, indexed by `EventKind::index()`.
    pub topics: [String; 4],
    pub retention: Duration,
    pub replay_seek: ReplaySeek,
    pub replay_timeout: Duration,
    pub max_actions: usize,
    pub max_routing_decisions: usize,
    pub max_transformations: usize,
    pub max_performance_metrics: usize,
    pub max_buffer_bytes: usize,
    pub max_agents: usize,
    pub real_time_events: bool,
    pub agent_metrics_interval: Duration,
    pub subscriber_queue: usize,
    pub subscriber_queue_bytes: usize,
    pub resume_buffer: usize,
    pub resume_buffer_bytes: usize,
    pub max_push: usize,
}

impl Config {
    /// Checks the settings clap cannot check alone; the error names the setting.
    pub fn validate(self) -> Result<Settings, String> {
        let brokers = svc_kit::config::kafka_brokers(
            self.kafka_brokers.as_deref(),
            self.kafka_bootstrap_servers.as_deref(),
        )?
        .ok_or(
            "missing setting KAFKA_BROKERS (or KAFKA_BOOTSTRAP_SERVERS / --kafka-brokers): \
             the Kafka bootstrap servers, e.g. 127.0.0.1:9092",
        )?;
        let mut topics: [String; 4] = Default::default();
        for (kind, (flag, base)) in EventKind::ALL.into_iter().zip([
            ("--topic-routing-decisions", &self.topic_routing_decisions),
            ("--topic-agent-actions", &self.topic_agent_actions),
            ("--topic-transformations", &self.topic_transformations),
            (
                "--topic-performance-metrics",
                &self.topic_performance_metrics,
            ),
        ]) {
            let full = format!("{}{}", self.topic_prefix, base.trim());
            if base.trim().is_empty() || !valid_topic(&full) {
                return Err(format!(
                    "{flag}: '{full}' is not a valid Kafka topic name (letters, digits, '.', '_', '-'; at most 249)"
                ));
            }
            topics[kind.index()] = full;
        }
        for i in 0..4 {
            if topics[i + 1..].contains(&topics[i]) {
                return Err(format!(
                    "topic '{}' is configured for two event kinds",
                    topics[i]
                ));
            }
        }
        if self.retention < Duration::from_secs(3600) {
            return Err("--retention must be at least 1h (it is kept to the hour)".into());
        }
        // Event times are i64 microseconds; a century is far past any window worth keeping
        // in memory, and far below where the arithmetic would wrap.
        if self.retention > Duration::from_secs(100 * 365 * 86_400) {
            return Err("--retention must be at most 100 years (36500d)".into());
        }
        if self.replay_timeout.is_zero() {
            return Err(
                "--replay-timeout must be more than 0 (0 would report SERVING before the \
                 start-up replay)"
                    .into(),
            );
        }
        if self.agent_metrics_interval < Duration::from_millis(10) {
            return Err("--agent-metrics-interval must be at least 10ms".into());
        }
        if !(1..=MAX_SUBSCRIBER_QUEUE).contains(&self.subscriber_queue) {
            return Err(format!(
                "--subscriber-queue must be between 1 and {MAX_SUBSCRIBER_QUEUE}"
            ));
        }
        if self.max_push == 0 {
            return Err("--max-push must be at least 1".into());
        }
        if self.max_agents == 0 {
            return Err("--max-agents must be at least 1".into());
        }
        Ok(Settings {
            listen: self.listen,
            brokers,
            server: self.server,
            log: self.log,
            topics,
            retention: self.retention,
            replay_seek: self.replay_seek,
            replay_timeout: self.replay_timeout,
            max_actions: self.max_actions,
            max_routing_decisions: self.max_routing_decisions,
            max_transformations: self.max_transformations,
            max_performance_metrics: self.max_performance_metrics,
            max_buffer_bytes: self.max_buffer_bytes,
            max_agents: self.max_agents,
            real_time_events: self.enable_real_time_events,
            agent_metrics_interval: self.agent_metrics_interval,
            // What the broadcast channel really holds: it rounds its capacity up so.
            subscriber_queue: self.subscriber_queue.next_power_of_two(),
            subscriber_queue_bytes: self.subscriber_queue_bytes,
            resume_buffer: self.resume_buffer,
            resume_buffer_bytes: self.resume_buffer_bytes,
            max_push: self.max_push,
        })
    }
}

fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        svc_kit::config::parse_args_ignoring_env(
            std::iter::once("consumer-svc").chain(args.iter().copied()),
        )
        .unwrap()
    }

    #[test]
    fn brokers_are_required_and_checked() {
        let err = parse(&[]).validate().unwrap_err();
        assert!(err.contains("KAFKA_BROKERS"), "{err}");
        let err = parse(&["--kafka-brokers", "nohostport"])
            .validate()
            .unwrap_err();
        assert!(err.contains("KAFKA_BROKERS"), "{err}");
        let ok = parse(&["--kafka-bootstrap-servers", "a:1,b:2"])
            .validate()
            .unwrap();
        assert_eq!(ok.brokers, "a:1,b:2");
    }

    #[test]
    fn stream_limits_default_and_must_be_positive() {
        let s = parse(&["--kafka-brokers", "a:1"]).validate().unwrap();
        assert_eq!((s.subscriber_queue, s.max_push), (1024, 1000));
        let s = parse(&["--kafka-brokers", "a:1", "--max-push", "256"])
            .validate()
            .unwrap();
        assert_eq!(s.max_push, 256);
        assert_eq!(s.max_agents, crate::state::DEFAULT_MAX_AGENTS);
        for flag in ["--max-push", "--subscriber-queue", "--max-agents"] {
            let err = parse(&["--kafka-brokers", "a:1", flag, "0"])
                .validate()
                .unwrap_err();
            assert!(err.contains(flag), "{err}");
        }
        // The queue is what the broadcast ring really holds: a power of two, bounded.
        let s = parse(&["--kafka-brokers", "a:1", "--subscriber-queue", "1025"])
            .validate()
            .unwrap();
        assert_eq!(s.subscriber_queue, 2048);
        let err = parse(&["--kafka-brokers", "a:1", "--subscriber-queue", "65537"])
            .validate()
            .unwrap_err();
        assert!(err.contains("between 1 and 65536"), "{err}");
    }

    #[test]
    fn byte_budgets_default_and_take_sizes() {
        let s = parse(&["--kafka-brokers", "a:1"]).validate().unwrap();
        assert_eq!(
            (
                s.max_buffer_bytes,
                s.resume_buffer_bytes,
                s.subscriber_queue_bytes
            ),
            (64 << 20, 64 << 20, 16 << 20)
        );
        assert_eq!(s.max_buffer_bytes, crate::state::DEFAULT_MAX_BUFFER_BYTES);
        let s = parse(&[
            "--kafka-brokers",
            "a:1",
            "--max-buffer-bytes",
            "2MiB",
            "--resume-buffer-bytes",
            "512KiB",
            "--subscriber-queue-bytes",
            "1000",
        ])
        .validate()
        .unwrap();
        assert_eq!(
            (
                s.max_buffer_bytes,
                s.resume_buffer_bytes,
                s.subscriber_queue_bytes
            ),
            (2 << 20, 512 << 10, 1000)
        );
        for flag in [
            "--max-buffer-bytes",
            "--resume-buffer-bytes",
            "--subscriber-queue-bytes",
        ] {
            assert!(
                svc_kit::config::parse_args_ignoring_env::<Config>(
                    ["consumer-svc", "--kafka-brokers", "a:1", flag, "0"].into_iter()
                )
                .is_err(),
                "{flag} 0"
            );
        }
    }

    #[test]
    fn retention_and_replay_timeout_are_bounded() {
        for (flag, value, says) in [
            ("--retention", "30m", "at least 1h"),
            ("--retention", "300000000d", "at most 100 years"),
            ("--replay-timeout", "0", "more than 0"),
        ] {
            let err = parse(&["--kafka-brokers", "a:1", flag, value])
                .validate()
                .unwrap_err();
            assert!(err.contains(says), "{flag} {value}: {err}");
        }
        assert!(
            parse(&["--kafka-brokers", "a:1", "--retention", "7d"])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn kafka_brokers_wins_over_bootstrap_servers() {
        let s = parse(&["--kafka-brokers", "a:1", "--kafka-bootstrap-servers", "b:2"])
            .validate()
            .unwrap();
        assert_eq!(s.brokers, "a:1");
    }

    #[test]
    fn topics_default_to_the_guide_with_an_optional_prefix() {
        let s = parse(&["--kafka-brokers", "a:1"]).validate().unwrap();
        assert_eq!(
            s.topics,
            [
                "agent-routing-decisions",
                "agent-actions",
                "agent-transformation-events",
                "router-performance-metrics"
            ]
        );
        let s = parse(&["--kafka-brokers", "a:1", "--topic-prefix", "dev."])
            .validate()
            .unwrap();
        assert_eq!(s.topics[1], "dev.agent-actions");
        assert!(s.real_time_events);
        let err = parse(&[
            "--kafka-brokers",
            "a:1",
            "--topic-agent-actions",
            "bad name",
        ])
        .validate()
        .unwrap_err();
        assert!(err.contains("--topic-agent-actions"), "{err}");
        let err = parse(&[
            "--kafka-brokers",
            "a:1",
            "--topic-agent-actions",
            "agent-routing-decisions",
        ])
        .validate()
        .unwrap_err();
        assert!(err.contains("two event kinds"), "{err}");
        let s = parse(&[
            "--kafka-brokers",
            "a:1",
            "--enable-real-time-events",
            "false",
        ])
        .validate()
        .unwrap();
        assert!(!s.real_time_events);
    }
}
