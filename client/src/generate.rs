//! A load generator of realistic agent events for the four topics consumer-svc reads.
//!
//! Events come in "requests" like the real producers emit them: a routing decision, two to
//! four agent actions under the same correlation id (tool calls, decisions, then a success or
//! an error), a router performance metric, and sometimes a transformation. The JSON looks like
//! the Python producers' (snake_case, ISO 8601 `timestamp` with `+00:00`, Kafka key = the
//! correlation id). [`run`] produces them at a target rate or as fast as possible, with a
//! progress line on stderr; the core ([`EventGenerator`]) is pure and usable on its own.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kafka_settings::KafkaSetting;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use serde_json::{Value, json};

/// The four event kinds, in consumer-svc's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    RoutingDecision,
    AgentAction,
    Transformation,
    PerformanceMetric,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::RoutingDecision,
        Kind::AgentAction,
        Kind::Transformation,
        Kind::PerformanceMetric,
    ];

    /// The seed guide's default topic name.
    pub fn default_topic(self) -> &'static str {
        match self {
            Kind::RoutingDecision => "agent-routing-decisions",
            Kind::AgentAction => "agent-actions",
            Kind::Transformation => "agent-transformation-events",
            Kind::PerformanceMetric => "router-performance-metrics",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Topic names, indexed by [`Kind::index`].
#[derive(Clone, Debug)]
pub struct Topics(pub [String; 4]);

impl Topics {
    /// The default names with `prefix` (e.g. `dev.`, or a test's unique prefix) in front.
    pub fn with_prefix(prefix: &str) -> Self {
        Self(Kind::ALL.map(|k| format!("{prefix}{}", k.default_topic())))
    }
    pub fn name(&self, kind: Kind) -> &str {
        &self.0[kind.index()]
    }
}

/// One event ready to produce.
#[derive(Clone, Debug)]
pub struct GeneratedEvent {
    pub kind: Kind,
    /// Kafka key: the correlation id.
    pub key: String,
    pub payload: Vec<u8>,
}

/// Generates realistic events; deterministic for a given seed (apart from timestamps).
pub struct EventGenerator {
    rng: StdRng,
    agents: Vec<String>,
    pending: Vec<(Kind, String, Value)>,
    requests: u64,
}

const STRATEGIES: &[&str] = &[
    "enhanced_fuzzy_matching",
    "explicit",
    "fallback",
    "capability",
];
const TOOLS: &[&str] = &["Read", "Write", "Edit", "Bash", "Grep", "Glob", "WebFetch"];
const MATCH: &[&str] = &["exact", "fuzzy", "keyword", "semantic"];
const PROJECTS: &[&str] = &["omniclaude", "omnidash", "omniarchon", "omninode_bridge"];

/// ISO 8601 as Python's `isoformat()` writes it for an aware UTC datetime.
pub fn isoformat(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

impl EventGenerator {
    /// `agents` distinct agent names (`agent-00000`, ...).
    pub fn new(agents: usize, seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            agents: (0..agents.max(1))
                .map(|i| format!("agent-{i:05}"))
                .collect(),
            pending: Vec::new(),
            requests: 0,
        }
    }

    fn agent(&mut self) -> String {
        let i = self.rng.random_range(0..self.agents.len());
        self.agents[i].clone()
    }

    fn uuid(&mut self) -> String {
        uuid::Builder::from_random_bytes(self.rng.random())
            .into_uuid()
            .to_string()
    }

    /// The events of one request, in the order producers send them (reversed on the stack).
    fn plan_request(&mut self, ts: &str) {
        self.requests += 1;
        let correlation = self.uuid();
        let agent = self.agent();
        let confidence: f64 = 0.5 + self.rng.random::<f64>() * 0.5;
        let routing_ms = self.rng.random_range(2..120);
        let alt = self.agent();
        let mut events = vec![(
            Kind::RoutingDecision,
            json!({
                "id": self.uuid(),
                "correlation_id": correlation,
                "user_request": format!("request #{} for {agent}", self.requests),
                "selected_agent": agent,
                "confidence_score": (confidence * 1000.0).round() / 1000.0,
                "routing_strategy": STRATEGIES[self.rng.random_range(0..STRATEGIES.len())],
                "alternatives": [{"agent": alt, "confidence": 0.4, "reasoning": "lower trigger match"}],
                "reasoning": "highest capability and trigger match",
                "routing_time_ms": routing_ms,
                "context": {"domain": "code", "files": self.rng.random_range(0..20)},
                "project_path": "/workspace/project",
                "project_name": PROJECTS[self.rng.random_range(0..PROJECTS.len())],
                "session_id": format!("session-{}", self.requests / 10),
                "timestamp": ts,
            }),
        )];
        let tool_calls = self.rng.random_range(1..=3);
        for _ in 0..tool_calls {
            events.push((
                Kind::AgentAction,
                json!({
                    "id": self.uuid(),
                    "correlation_id": correlation,
                    "agent_name": agent,
                    "action_type": "tool_call",
                    "action_name": TOOLS[self.rng.random_range(0..TOOLS.len())],
                    "action_details": {"file_path": "/workspace/project/src/main.rs", "lines": self.rng.random_range(1..400)},
                    "debug_mode": false,
                    "duration_ms": self.rng.random_range(1..900),
                    "project_name": "omniclaude",
                    "timestamp": ts,
                }),
            ));
        }
        let ok = self.rng.random_bool(0.9);
        events.push((
            Kind::AgentAction,
            json!({
                "id": self.uuid(),
                "correlation_id": correlation,
                "agent_name": agent,
                "action_type": if ok { "success" } else { "error" },
                "action_name": "task_complete",
                "action_details": if ok { json!({"result": "done"}) } else { json!({"error": "tool failed"}) },
                "debug_mode": false,
                "duration_ms": self.rng.random_range(100..5000),
                "success": ok,
                "timestamp": ts,
            }),
        ));
        events.push((
            Kind::PerformanceMetric,
            json!({
                "id": self.uuid(),
                "correlation_id": correlation,
                "query_text": format!("request #{}", self.requests),
                "routing_duration_ms": routing_ms,
                "cache_hit": self.rng.random_bool(0.3),
                "candidates_evaluated": self.rng.random_range(1..12),
                "trigger_match_strategy": MATCH[self.rng.random_range(0..MATCH.len())],
                "confidence_components": {"trigger": 0.8, "context": 0.6, "capability": 0.7},
                "timestamp": ts,
            }),
        ));
        if self.rng.random_bool(0.1) {
            let target = self.agent();
            events.push((
                Kind::Transformation,
                json!({
                    "id": self.uuid(),
                    "correlation_id": correlation,
                    "source_agent": agent,
                    "target_agent": target,
                    "transformation_reason": "specialised capability",
                    "confidence_score": 0.85,
                    "transformation_duration_ms": self.rng.random_range(5..80),
                    "success": true,
                    "timestamp": ts,
                }),
            ));
        }
        events.reverse();
        self.pending = events
            .into_iter()
            .map(|(k, v)| (k, correlation.clone(), v))
            .collect();
    }

    /// The next event, stamped `now`.
    pub fn next_event(&mut self, now: DateTime<Utc>) -> GeneratedEvent {
        if self.pending.is_empty() {
            self.plan_request(&isoformat(now));
        }
        let (kind, key, value) = self.pending.pop().expect("a planned request has events");
        GeneratedEvent {
            kind,
            key,
            payload: serde_json::to_vec(&value).expect("JSON values serialize"),
        }
    }

    /// The next event of `kind` only (other kinds of the same request are discarded).
    pub fn next_of(&mut self, kind: Kind, now: DateTime<Utc>) -> GeneratedEvent {
        loop {
            let e = self.next_event(now);
            if e.kind == kind {
                return e;
            }
        }
    }
}

/// How much to produce.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub brokers: String,
    pub topics: Topics,
    /// Events per second over all topics; `None` = as fast as possible.
    pub rate: Option<f64>,
    /// Stop after this many events (`None` = until `duration`).
    pub total: Option<u64>,
    /// Stop after this long (`None` = until `total`).
    pub duration: Option<Duration>,
    /// Distinct agent names.
    pub agents: usize,
    pub seed: u64,
    /// Print a progress line to stderr about once a second.
    pub progress: bool,
    /// Only these kinds (empty = the realistic mix of all four).
    pub only: Vec<Kind>,
    /// Event times spread uniformly over this much of the past (`None` = now): a day's worth
    /// of history produced in minutes.
    pub time_spread: Option<Duration>,
    /// librdkafka properties for the producer (TLS, SASL, ...).
    pub kafka_settings: Vec<KafkaSetting>,
}

#[derive(Clone, Debug, Default)]
pub struct RunReport {
    /// Events produced, per kind.
    pub per_kind: [u64; 4],
    pub elapsed: Duration,
}

impl RunReport {
    pub fn total(&self) -> u64 {
        self.per_kind.iter().sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    // Never the error's own text: a rejected setting's value may be a password.
    #[error("Kafka: {}", kafka_settings::describe_error(.0))]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0} events were not acknowledged by the broker")]
    Unacknowledged(i32),
    #[error("{0} events could not be delivered (e.g. the topic refused them); see the log")]
    Undelivered(u64),
}

/// Counts messages whose delivery failed: a producer otherwise drops them silently once
/// `message.timeout.ms` passes or the broker refuses them.
#[derive(Default)]
pub struct DeliveryCounter {
    failed: std::sync::atomic::AtomicU64,
}

impl DeliveryCounter {
    /// Messages that were not delivered so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl rdkafka::ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            let before = self
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if before == 0 {
                tracing::warn!("an event was not delivered: {e}");
            }
        }
    }
}

/// The generator's producer: failed deliveries are counted ([`DeliveryCounter`]).
pub type EventProducer = ThreadedProducer<DeliveryCounter>;

/// Waits up to `timeout` until everything produced is acknowledged, and fails when some of it
/// was not, or could not be delivered.
pub fn settle(producer: &EventProducer, timeout: Duration) -> Result<(), GenerateError> {
    producer.flush(timeout)?;
    let left = producer.in_flight_count();
    if left > 0 {
        return Err(GenerateError::Unacknowledged(left));
    }
    match producer.context().failed() {
        0 => Ok(()),
        failed => Err(GenerateError::Undelivered(failed)),
    }
}

/// A producer tuned for throughput (batching, lz4 off for tansu compatibility), with
/// `settings` (TLS, SASL, ...) applied last, so they may also override the tuning
/// (`linger.ms`, ...).
pub fn producer(brokers: &str, settings: &[KafkaSetting]) -> Result<EventProducer, GenerateError> {
    Ok(producer_config(brokers, settings).create_with_context(DeliveryCounter::default())?)
}

fn producer_config(brokers: &str, settings: &[KafkaSetting]) -> rdkafka::ClientConfig {
    let mut config = crate::kafka_client(brokers, &[]);
    config
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.timeout.ms", "60000")
        // A mistyped topic prefix is an error, not a set of new topics on a broker that
        // creates topics on request (librdkafka's producers ask for that by default, and even
        // the existence check below would create them).
        .set("allow.auto.create.topics", "false");
    kafka_settings::apply(&mut config, settings);
    config
}

/// Produces events as configured; blocking (call from a thread or `spawn_blocking`).
pub fn run(cfg: &RunConfig) -> Result<RunReport, GenerateError> {
    let producer = producer(&cfg.brokers, &cfg.kafka_settings)?;
    let mut generator = EventGenerator::new(cfg.agents, cfg.seed);
    let mut report = RunReport::default();
    let start = Instant::now();
    let mut last_progress = start;
    let mut sent: u64 = 0;
    loop {
        if cfg.total.is_some_and(|t| sent >= t)
            || cfg.duration.is_some_and(|d| start.elapsed() >= d)
        {
            break;
        }
        if let Some(rate) = cfg.rate {
            // Paced against the start time, so short stalls are caught up.
            // Checked: a rate slow enough to overflow the clock has no next event.
            let Some(due) = Duration::try_from_secs_f64(sent as f64 / rate)
                .ok()
                .and_then(|d| start.checked_add(d))
            else {
                break;
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let mut now = Utc::now();
        if let Some(spread) = cfg.time_spread {
            let back = rand::random_range(0..spread.as_micros().max(1) as i64);
            now -= chrono::Duration::microseconds(back);
        }
        let event = if cfg.only.is_empty() {
            generator.next_event(now)
        } else {
            let kind = cfg.only[(sent as usize) % cfg.only.len()];
            generator.next_of(kind, now)
        };
        let topic = cfg.topics.name(event.kind);
        let mut record = BaseRecord::to(topic)
            .key(&event.key)
            .payload(&event.payload);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        report.per_kind[event.kind.index()] += 1;
        sent += 1;
        if cfg.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "[generate] {sent} events in {secs:.1}s ({:.0}/s){}",
                sent as f64 / secs,
                cfg.total
                    .map(|t| format!(", {:.0}%", 100.0 * sent as f64 / t as f64))
                    .unwrap_or_default()
            );
        }
    }
    settle(&producer, Duration::from_secs(60))?;
    report.elapsed = start.elapsed();
    if cfg.progress {
        eprintln!(
            "[generate] done: {} events in {:.1}s ({:.0}/s)",
            report.total(),
            report.elapsed.as_secs_f64(),
            report.total() as f64 / report.elapsed.as_secs_f64()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_settings_override_the_producer_tuning() {
        let setting = |key: &str, value: &str| KafkaSetting {
            key: key.into(),
            value: value.into(),
        };
        let tuned = producer_config("127.0.0.1:9092", &[]);
        assert_eq!(tuned.get("linger.ms"), Some("5"));
        let config = producer_config(
            "127.0.0.1:9092",
            &[setting("linger.ms", "20"), setting("client.id", "load")],
        );
        assert_eq!(config.get("linger.ms"), Some("20"));
        assert_eq!(config.get("client.id"), Some("load"));
        assert_eq!(config.get("batch.num.messages"), Some("10000"));
    }

    #[test]
    fn requests_have_the_realistic_shape() {
        let mut g = EventGenerator::new(10, 1);
        let now = Utc::now();
        let mut counts = [0u32; 4];
        for _ in 0..2000 {
            let e = g.next_event(now);
            counts[e.kind.index()] += 1;
            let v: Value = serde_json::from_slice(&e.payload).unwrap();
            assert_eq!(v["correlation_id"], Value::String(e.key.clone()));
            assert!(v["timestamp"].as_str().unwrap().ends_with("+00:00"));
            match e.kind {
                Kind::RoutingDecision => assert!(v["selected_agent"].is_string()),
                Kind::AgentAction => {
                    assert!(v["agent_name"].is_string() && v["action_type"].is_string())
                }
                Kind::Transformation => assert!(v["target_agent"].is_string()),
                Kind::PerformanceMetric => assert!(v["routing_duration_ms"].is_number()),
            }
        }
        // Every kind appears; actions dominate; transformations are rare.
        assert!(counts.iter().all(|c| *c > 0), "{counts:?}");
        assert!(counts[Kind::AgentAction.index()] > counts[Kind::RoutingDecision.index()]);
        assert!(counts[Kind::Transformation.index()] < counts[Kind::PerformanceMetric.index()]);
        assert_eq!(
            Topics::with_prefix("dev.").name(Kind::AgentAction),
            "dev.agent-actions"
        );
        let e = g.next_of(Kind::Transformation, now);
        assert_eq!(e.kind, Kind::Transformation);
    }
}
