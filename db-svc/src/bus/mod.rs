//! The event-bus worker: db-svc answers `DATABASE_QUERY_REQUESTED` with
//! `DATABASE_QUERY_COMPLETED` / `DATABASE_QUERY_FAILED`.
//!
//! Delivery is at least once from the bus and exactly once in effect: the correlation id is
//! the idempotency key of every write, so a redelivered request replays its recorded result.
//! A message's offset is committed only after its reply (or dead letter) was acknowledged by
//! the broker, and offsets are committed in order even though requests run concurrently.
//! While PostgreSQL is unavailable a request waits and is retried with backoff; past its own
//! deadline it is answered TIMEOUT instead of being executed late. Replicas share the request
//! topic through one consumer group.

pub mod commit;
pub mod handler;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bus_protocol::{BusRequest, Envelope, Reply, Topics, codes, now_rfc3339, parse_request};
use clap::{ArgAction, Args};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use svc_kit::Shutdown;
use svc_kit::log_budget::LogBudget;
use svc_kit::panic::catch_panic;
use svc_kit::server::parse_duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::Instrument;

pub use handler::Handler;

use crate::bus::commit::{CommitTracker, Epoch};
use crate::bus::handler::{Attempt, failed};

/// Event-bus settings of db-svc.
#[derive(Clone, Debug, Args)]
pub struct BusArgs {
    /// Serve db operations over the event bus (needs KAFKA_BROKERS).
    #[arg(long = "bus", env = "DB_BUS_ENABLED", default_value_t = true, action = ArgAction::Set)]
    pub enabled: bool,

    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Alternative name for --kafka-brokers.
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", hide_short_help = true)]
    pub kafka_bootstrap_servers: Option<String>,

    /// Topic the requests arrive on.
    #[arg(
        long,
        env = "DB_BUS_REQUEST_TOPIC",
        default_value = "dev.omninode-bridge.database.query-requested.v1"
    )]
    pub request_topic: String,

    /// Topic of DATABASE_QUERY_COMPLETED replies.
    #[arg(
        long,
        env = "DB_BUS_COMPLETED_TOPIC",
        default_value = "dev.omninode-bridge.database.query-completed.v1"
    )]
    pub completed_topic: String,

    /// Topic of DATABASE_QUERY_FAILED replies.
    #[arg(
        long,
        env = "DB_BUS_FAILED_TOPIC",
        default_value = "dev.omninode-bridge.database.query-failed.v1"
    )]
    pub failed_topic: String,

    /// Topic for requests that cannot be answered (no correlation id), with the reason.
    #[arg(
        long,
        env = "DB_BUS_DEAD_LETTER_TOPIC",
        default_value = "dev.omninode-bridge.database.query-dlq.v1"
    )]
    pub dead_letter_topic: String,

    /// Consumer group shared by all db-svc replicas.
    #[arg(long, env = "DB_BUS_GROUP_ID", default_value = "omnibus-db-svc")]
    pub bus_group_id: String,

    /// Requests processed at once (per replica).
    #[arg(long, env = "DB_BUS_CONCURRENCY", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub bus_concurrency: u32,

    /// Whether SQL-form requests (OmniClaude) may write. Structured INSERT, UPDATE, DELETE
    /// and UPSERT are always allowed; a structured EXECUTE_RAW write follows
    /// `--raw-sql-writes`, as over gRPC.
    #[arg(long, env = "DB_BUS_SQL_WRITES", default_value_t = true, action = ArgAction::Set)]
    pub bus_sql_writes: bool,

    /// Consumer-group session timeout (a group's first join takes about half of it).
    #[arg(long, env = "DB_BUS_SESSION_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub bus_session_timeout: Duration,

    /// How long a request without a deadline of its own may wait before it is answered
    /// TIMEOUT instead of being executed, counted from its envelope `timestamp` (from its
    /// receipt when it has none, or one in the future). OmniClaude's requests carry no
    /// deadline, and its client gives up after 5 s and writes to PostgreSQL directly: a
    /// write executed later would be applied twice. 0 waits indefinitely.
    #[arg(long, env = "DB_BUS_DEFAULT_TIMEOUT", value_parser = parse_duration, default_value = "5s")]
    pub bus_default_timeout: Duration,

    /// `service` field of the replies.
    #[arg(long, env = "DB_BUS_SERVICE_NAME", default_value = "omnibus-db-svc")]
    pub bus_service_name: String,

    /// How often at most the bus consumer is replaced while brokers keep going down (each
    /// replacement rejoins the group); a consumer whose replacement must wait leaves its
    /// group meanwhile.
    #[arg(long, env = "DB_BUS_REPLACE_INTERVAL", value_parser = parse_duration, default_value = "5s")]
    pub bus_replace_interval: Duration,
}

/// Validated bus settings.
#[derive(Clone, Debug)]
pub struct BusSettings {
    pub brokers: String,
    pub topics: Topics,
    pub group_id: String,
    pub concurrency: usize,
    pub sql_writes: bool,
    pub session_timeout: Duration,
    pub service: String,
    /// The deadline of requests without one, from their timestamp (None: no deadline).
    pub default_timeout: Option<Duration>,
    /// The consumer is replaced at most this often while brokers keep going down.
    pub replace_interval: Duration,
}

impl BusArgs {
    /// `Ok(None)` when the bus is switched off or no broker is configured (then a warning is
    /// logged at start-up: the gRPC path works without a broker).
    pub fn validate(self) -> Result<Option<BusSettings>, String> {
        if !self.enabled {
            return Ok(None);
        }
        let Some(brokers) = svc_kit::config::kafka_brokers(
            self.kafka_brokers.as_deref(),
            self.kafka_bootstrap_servers.as_deref(),
        )?
        else {
            return Ok(None);
        };
        let ms = self.bus_session_timeout.as_millis();
        if !(1000..=3_600_000).contains(&ms) {
            return Err("DB_BUS_SESSION_TIMEOUT must be between 1s and 1h".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600))
            .contains(&self.bus_replace_interval)
        {
            return Err("DB_BUS_REPLACE_INTERVAL must be between 1s and 1h".into());
        }
        Ok(Some(BusSettings {
            brokers,
            topics: Topics {
                request: self.request_topic,
                completed: self.completed_topic,
                failed: self.failed_topic,
                dead_letter: self.dead_letter_topic,
            },
            group_id: self.bus_group_id,
            concurrency: self.bus_concurrency as usize,
            sql_writes: self.bus_sql_writes,
            session_timeout: self.bus_session_timeout,
            service: self.bus_service_name,
            default_timeout: (!self.bus_default_timeout.is_zero())
                .then_some(self.bus_default_timeout),
            replace_interval: self.bus_replace_interval,
        }))
    }
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// Room kept in a reply for its envelope (ids, timestamps, counts, keys).
const ENVELOPE_ROOM: usize = 16 * 1024;

/// [`crate::executor::Limits::response_limit`] of SQL-form writes on the bus: their rows must
/// fit a reply ([`sql_write_reply_bytes`]), else they are refused before they commit
/// (`DbError::WriteRowsTooLarge`, answered `WRITE_REPLY_TOO_LARGE`), as is the structured
/// form's.
pub const SQL_WRITE_REPLY_LIMIT: &str = "a bus reply carries of them (half the producer's \
     message.max.bytes, less room for the envelope)";

/// The same for structured-form writes ([`structured_write_reply_bytes`]).
pub const STRUCTURED_WRITE_REPLY_LIMIT: &str = "a bus reply carries of them (a quarter of the \
     producer's message.max.bytes, less room for the envelope: the reply carries them twice, \
     in rows and in response)";

/// The bytes of rows (as the executor counts them: their protobuf size) an SQL-form write may
/// return: half of what the reply producer's `message.max.bytes` leaves after the envelope.
/// Half, because the reply carries them as JSON text, which can be larger (numbers written
/// out, escaped quotes); rows that still grow past the bus's limit get REPLY_TOO_LARGE.
pub fn sql_write_reply_bytes(settings: &BusSettings) -> usize {
    reply_row_bytes(producer_message_max_bytes(settings).as_deref(), 1)
}

/// The same for a structured-form write (INSERT, UPDATE, DELETE, UPSERT, an EXECUTE_RAW
/// that writes): half of that again, since its reply carries the rows twice, in `rows` and
/// in `response` (the gRPC response as JSON).
pub fn structured_write_reply_bytes(settings: &BusSettings) -> usize {
    reply_row_bytes(producer_message_max_bytes(settings).as_deref(), 2)
}

/// [`crate::executor::Limits::response_limit`] of bus reads ([`read_guard_bytes`]).
pub const READ_REPLY_LIMIT: &str = "a bus reply could carry of them (four times the \
     producer's message.max.bytes)";

/// The bytes of rows (as the executor counts them: their protobuf size) a read on the bus
/// may build before it is refused, as INVALID_ARGUMENT: four times the reply producer's
/// `message.max.bytes`. A reply carries rows as JSON text, which can be smaller than their
/// protobuf form (about 2.7 times, for rows of small numbers) but not by that much, so a read
/// refused here could not have fit; one under it that still does not fit gets
/// REPLY_TOO_LARGE. It bounds what a read holds before its reply is made, which otherwise
/// (10,000 rows of large jsonb, several JSON copies) could run the process out of memory.
pub fn read_guard_bytes(settings: &BusSettings) -> usize {
    message_max_bytes(producer_message_max_bytes(settings).as_deref()).saturating_mul(4)
}

/// `message.max.bytes` as set (librdkafka's default when unset or unreadable).
fn message_max_bytes(set: Option<&str>) -> usize {
    set.and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
}

/// The reply producer's `message.max.bytes`, as the operator set it (if they did).
fn producer_message_max_bytes(settings: &BusSettings) -> Option<String> {
    let producer = producer_config(settings, svc_kit::kafka::settings());
    producer.get("message.max.bytes").map(str::to_string)
}

/// The row bytes a reply carrying its rows `copies` times has room for, under a producer
/// `message.max.bytes` of `message_max_bytes` (librdkafka's default when unset or unreadable).
fn reply_row_bytes(message_max_bytes: Option<&str>, copies: usize) -> usize {
    let max = self::message_max_bytes(message_max_bytes);
    let room = (max / 4).min(ENVELOPE_ROOM);
    (max - room) / 2 / copies.max(1)
}

/// Everything a request task needs.
struct Worker {
    settings: BusSettings,
    /// `OMNIBUS_FAILPOINT` (tests only).
    failpoint: Option<Failpoint>,
    handler: Handler,
    producer: FutureProducer,
    shutdown: Shutdown,
    /// Replies the bus refuses for good ([`give_up`]).
    give_up_log: LogBudget,
}

/// Faults the end-to-end tests inject through `OMNIBUS_FAILPOINT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failpoint {
    /// `bus-after-execute`: abort the process after executing a request, before its reply.
    AbortAfterExecute,
    /// `bus-panic`: panic while executing a request whose correlation id starts with
    /// [`PANIC_IN_EXECUTE`], or before sending the reply to one starting with
    /// [`PANIC_BEFORE_REPLY`].
    Panic,
}

const PANIC_IN_EXECUTE: &str = "failpoint-panic-execute";
const PANIC_BEFORE_REPLY: &str = "failpoint-panic-reply";

impl Failpoint {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "bus-after-execute" => Some(Self::AbortAfterExecute),
            "bus-panic" => Some(Self::Panic),
            _ => None,
        }
    }
}

/// What a processed message produces.
enum Outgoing {
    Reply {
        correlation_id: String,
        reply: Reply,
        /// `traceparent` of the reply: the request's trace id, a new span.
        traceparent: Option<String>,
    },
    DeadLetter {
        reason: String,
        body: serde_json::Value,
    },
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time given to answer a request past its deadline from the request log.
const REPLAY_BUDGET: Duration = Duration::from_secs(5);
/// Time given to read the request log after an attempt ended in TIMEOUT (one indexed row).
const APPLIED_CHECK: Duration = Duration::from_secs(2);
/// How long a dead letter is retried before the request it reports is committed without it.
const DEAD_LETTER_PATIENCE: Duration = Duration::from_secs(60);
/// The most often a refused reply is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Bounds of the time a write must leave its reply before the deadline ([`reply_margin`]).
const MIN_REPLY_MARGIN: Duration = Duration::from_millis(500);
const MAX_REPLY_MARGIN: Duration = Duration::from_secs(5);

/// Runs the worker until shutdown, then lets in-flight requests finish for at most `drain`
/// (the server's `--shutdown-grace`). Returns an error only when the Kafka clients cannot be
/// created (bad settings); broker outages are waited out.
pub async fn run(
    settings: BusSettings,
    handler: Handler,
    shutdown: Shutdown,
    drain: Duration,
) -> Result<(), String> {
    let mut consumer = subscribe(&settings)?;
    let mut replaced: Option<std::time::Instant> = None;
    let producer: FutureProducer = producer_config(&settings, svc_kit::kafka::settings())
        .create()
        .map_err(|e| format!("bus producer: {}", svc_kit::kafka::describe_error(&e)))?;
    tracing::info!(
        topic = %settings.topics.request,
        group = %settings.group_id,
        concurrency = settings.concurrency,
        "event-bus worker started"
    );

    let failpoint = std::env::var("OMNIBUS_FAILPOINT")
        .ok()
        .and_then(|f| Failpoint::parse(&f));
    let worker = Arc::new(Worker {
        settings,
        failpoint,
        handler,
        producer,
        shutdown: shutdown.clone(),
        give_up_log: LogBudget::new(1, LOG_EVERY),
    });
    let permits = Arc::new(Semaphore::new(worker.settings.concurrency));
    // Finished messages, tagged with the consumer generation and the log epoch
    // ([`CommitTracker::received`]) they were received in.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, Epoch, (String, i32, i64))>();
    let mut tracker = CommitTracker::default();
    // A replaced consumer starts a new generation with a fresh tracker: offsets the old one
    // received belong to a log that may be gone (a broker back empty restarts at 0), and
    // committing them through the new member could move the group past requests never read.
    // Requests of the old generation still finish and reply; a redelivery of one is answered
    // from the request log.
    let mut generation = 0u64;
    let mut tasks = JoinSet::new();

    loop {
        tokio::select! {
            _ = shutdown.triggered() => break,
            Some((g, epoch, (topic, partition, offset))) = done_rx.recv() => {
                if g == generation {
                    let mode = CommitMode::Async;
                    commit_if_advanced(&consumer, &mut tracker, &topic, partition, epoch, offset, mode);
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            permit = permits.clone().acquire_owned() => {
                let Ok(permit) = permit else { break };
                // Hold the permit while waiting for a message; keep committing meanwhile.
                let message = loop {
                    // A consumer whose brokers all went down is replaced, at most every
                    // `replace_interval`: an outage reported sooner (librdkafka reports it
                    // once) stays pending until then, and nothing is committed through that
                    // consumer meanwhile (`commit_if_advanced`).
                    let now = std::time::Instant::now();
                    let interval = worker.settings.replace_interval;
                    if take_replacement(&consumer.context().brokers_down, replaced, now, interval) {
                        replaced = Some(now);
                        let fresh = fresh_consumer(&worker.settings).await;
                        if replace_consumer(&mut consumer, fresh, interval) {
                            generation += 1;
                            tracker = CommitTracker::default();
                        }
                    }
                    // When that is due: the brokers may be back by then, and no error comes.
                    let due = consumer
                        .context()
                        .outage_pending()
                        .then(|| replaced.map_or(now, |t| t + interval));
                    // Until then the consumer leaves its group (locally: no broker answers),
                    // so that it cannot join a broker that comes back before its successor
                    // does: the two would join together, and a broker may keep the one that
                    // then leaves as the group's leader, leaving the successor without an
                    // assignment for good (tansu does: `scripts/stress-broker-restarts db`
                    // saw requests unanswered for 60 s until this).
                    if due.is_some_and(|due| due > now) && consumer.context().park() {
                        consumer.unsubscribe();
                        tracing::info!(
                            "all brokers down again; the bus consumer left its group until it \
                             is replaced"
                        );
                    }
                    tokio::select! {
                        _ = shutdown.triggered() => break None,
                        Some((g, epoch, (topic, partition, offset))) = done_rx.recv() => {
                            if g == generation {
                                let mode = CommitMode::Async;
                                commit_if_advanced(
                                    &consumer, &mut tracker, &topic, partition, epoch, offset, mode,
                                );
                            }
                        }
                        Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                        m = consumer.recv() => match m {
                            Ok(m) => break Some(m.detach()),
                            Err(e) => {
                                consumer.context().error_log.poll_error(&e);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        },
                        _ = tokio::time::sleep_until(due.unwrap_or(now).into()), if due.is_some() => {}
                    }
                };
                let Some(message) = message else { break };
                let origin = (message.topic().to_string(), message.partition(), message.offset());
                consumer.context().forget_revoked(&mut tracker);
                let epoch = tracker.received(&origin.0, origin.1, origin.2);
                let (worker, done_tx) = (worker.clone(), done_tx.clone());
                let received_in = generation;
                tasks.spawn(async move {
                    let processed = catch_panic(process(&worker, message.key(), message.payload(), traceparent_header(&message), &origin)).await;
                    drop(permit);
                    // A panic outside the execution (parsing, encoding or sending the reply)
                    // has no reply to give: the request is committed unanswered (its caller
                    // times out and falls back) rather than held in flight, which would stop
                    // every later commit of the partition, or redelivered into the same panic.
                    let delivered = processed.unwrap_or_else(|panic| {
                        tracing::error!(
                            topic = %origin.0, partition = origin.1, offset = origin.2,
                            %panic,
                            "bus request panicked outside its execution; left unanswered and committed"
                        );
                        true
                    });
                    if delivered {
                        let _ = done_tx.send((received_in, epoch, origin));
                    }
                });
            }
        }
    }

    // Shutdown: let in-flight requests finish (bounded), then commit what they completed.
    let drained =
        tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            "bus requests still running after {drain:?} (--shutdown-grace); they will be redelivered"
        );
        tasks.abort_all();
    }
    while let Ok((g, epoch, (topic, partition, offset))) = done_rx.try_recv() {
        if g == generation {
            commit_if_advanced(
                &consumer,
                &mut tracker,
                &topic,
                partition,
                epoch,
                offset,
                CommitMode::Sync,
            );
        }
    }
    tracing::info!("event-bus worker stopped");
    Ok(())
}

/// Flags librdkafka's "all brokers down" for the worker loop, and collects the partitions a
/// rebalance takes away, which the loop stops committing ([`CommitTracker::forget`]). One per
/// consumer: a replaced one's reports (while it closes) do not count for its successor.
pub struct BusContext {
    /// Every broker went down after this consumer had been assigned partitions: it may come
    /// back to a log that is gone at positions it holds, so it is to be replaced. Set until
    /// then (librdkafka reports an outage once, when the last broker goes down).
    brokers_down: AtomicBool,
    /// Whether this consumer has been assigned partitions. Before that it holds no positions
    /// and an outage needs no replacement: a fresh consumer in a cluster that is still down
    /// reports one too, and replacing it every `replace_interval` would only churn clients.
    assigned: AtomicBool,
    revoked: parking_lot::Mutex<Vec<(String, i32)>>,
    error_log: svc_kit::kafka::ClientErrorLog,
    /// Whether the consumer left its group to wait for its replacement.
    parked: AtomicBool,
    commit_log: LogBudget,
}

impl Default for BusContext {
    fn default() -> Self {
        Self {
            brokers_down: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
            revoked: parking_lot::Mutex::default(),
            error_log: svc_kit::kafka::ClientErrorLog::new("db-svc bus consumer"),
            parked: AtomicBool::new(false),
            commit_log: LogBudget::new(1, LOG_EVERY),
        }
    }
}

impl BusContext {
    /// An outage was reported and the consumer has not been replaced yet.
    fn outage_pending(&self) -> bool {
        self.brokers_down.load(Ordering::Relaxed)
    }

    /// Marks the consumer as out of its group until it is replaced; true the first time.
    fn park(&self) -> bool {
        !self.parked.swap(true, Ordering::Relaxed)
    }

    /// Makes `tracker` forget the partitions revoked since the last call. Called before each
    /// tracker update: librdkafka runs the rebalance callback inside `recv`, before it hands
    /// out any message of the new assignment.
    fn forget_revoked(&self, tracker: &mut CommitTracker) {
        for (topic, partition) in self.revoked.lock().drain(..) {
            tracker.forget(&topic, partition);
        }
    }
}

impl ClientContext for BusContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let KafkaError::Global(RDKafkaErrorCode::AllBrokersDown) = error
            && self.assigned.load(Ordering::Relaxed)
        {
            self.brokers_down.store(true, Ordering::Relaxed);
        }
        self.error_log.error(&error, reason);
    }
}

impl ConsumerContext for BusContext {
    /// Commits are asynchronous: their failures arrive here. One that fails leaves its
    /// requests to be delivered again after a restart or rebalance (harmless for writes,
    /// which their request ids deduplicate, but work done twice), so it is counted and logged.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let Err(e) = result else { return };
        svc_kit::metrics::counter!("db_bus_commit_failures_total").increment(1);
        if let Some(unlogged) = self.commit_log.may_log(std::time::Instant::now()) {
            let partitions: Vec<String> = offsets
                .elements()
                .iter()
                .map(|p| format!("{}[{}]", p.topic(), p.partition()))
                .collect();
            tracing::warn!(
                partitions = %partitions.join(","), unlogged_before = unlogged,
                "a bus offset commit failed ({e}); those requests may be delivered again \
                 (a rebalance in progress is the usual cause and needs nothing)"
            );
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned.store(true, Ordering::Relaxed);
        }
    }

    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.revoked.lock().extend(
                partitions
                    .elements()
                    .iter()
                    .map(|p| (p.topic().to_string(), p.partition())),
            );
        }
    }
}

type BusConsumer = StreamConsumer<BusContext>;

/// The reply producer's settings: its tuning, then the operator's pass-through settings
/// (which may change it), then what the replies rely on.
fn producer_config(
    settings: &BusSettings,
    operator: &[svc_kit::kafka::KafkaSetting],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("client.id", "db-svc-bus")
        // 1 ms of batching: little latency, far fewer produce requests under load.
        .set("linger.ms", "1")
        // The platform's own codec: its Python clients (aiokafka, kafka-python) read gzip
        // with the standard library, while lz4, snappy or zstd need optional packages whose
        // absence kills their reply consumer.
        .set("compression.type", "gzip");
    svc_kit::kafka::apply_these(&mut config, operator)
        .set("bootstrap.servers", &settings.brokers)
        .set("acks", "all");
    config
}

/// The request consumer's settings: its tuning, then the operator's pass-through settings
/// (which may change it), then what the worker's commits and its flags rely on.
fn consumer_config(
    settings: &BusSettings,
    operator: &[svc_kit::kafka::KafkaSetting],
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("client.id", "db-svc-bus")
        // Request/reply latency: a short fetch wait bounds how long an idle fetch can sit on a
        // broker that does not wake long polls; librdkafka still batches under load.
        .set("fetch.wait.max.ms", "2")
        .set("fetch.min.bytes", "1")
        // A request topic that does not exist yet when db-svc starts (nothing has produced to
        // it), or that is recreated, is found at the next metadata refresh: librdkafka's
        // default waits 5 minutes.
        .set("topic.metadata.refresh.interval.ms", "5000");
    svc_kit::kafka::apply_these(&mut config, operator)
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            settings.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout.as_millis() / 4)
                .max(100)
                .to_string(),
        );
    // librdkafka refuses a session timeout longer than `max.poll.interval.ms` (5 min by
    // default): a --bus-session-timeout up to its 1 h maximum raises that, too.
    let session_ms = settings.session_timeout.as_millis();
    let poll_ms = config
        .get("max.poll.interval.ms")
        .and_then(|v| v.trim().parse::<u128>().ok())
        .unwrap_or(DEFAULT_MAX_POLL_INTERVAL_MS);
    if session_ms > poll_ms {
        config.set("max.poll.interval.ms", session_ms.to_string());
    }
    config
}

/// librdkafka's `max.poll.interval.ms` when unset.
const DEFAULT_MAX_POLL_INTERVAL_MS: u128 = 300_000;

/// A consumer in the worker's group, subscribed to the request topic.
fn subscribe(settings: &BusSettings) -> Result<BusConsumer, String> {
    let consumer: BusConsumer = consumer_config(settings, svc_kit::kafka::settings())
        .create_with_context(BusContext::default())
        .map_err(|e| format!("bus consumer: {}", svc_kit::kafka::describe_error(&e)))?;
    consumer
        .subscribe(&[&settings.topics.request])
        .map_err(|e| format!("subscribe to {}: {e}", settings.topics.request))?;
    Ok(consumer)
}

/// How long creating a replacement consumer may take before the worker gives up on it.
const FRESH_CONSUMER_TIMEOUT: Duration = Duration::from_secs(10);

/// A new consumer ([`subscribe`]), created on a blocking thread within
/// FRESH_CONSUMER_TIMEOUT: librdkafka's client creation and subscription wait on its own
/// threads, and a wait that does not end must not freeze the worker (a CI run once saw the
/// worker go silent right after an outage, with no replacement logged).
async fn fresh_consumer(settings: &BusSettings) -> Result<BusConsumer, String> {
    tracing::info!("all brokers down; creating a fresh bus consumer");
    let settings = settings.clone();
    let created = tokio::task::spawn_blocking(move || subscribe(&settings));
    match tokio::time::timeout(FRESH_CONSUMER_TIMEOUT, created).await {
        Ok(Ok(created)) => created,
        Ok(Err(e)) => Err(format!("creating it failed: {e}")),
        Err(_) => Err(format!(
            "creating it took longer than {FRESH_CONSUMER_TIMEOUT:?}"
        )),
    }
}

/// Whether to replace the consumer now: an outage was reported (`brokers_down`) and the last
/// replacement, if any, was at least `interval` ago. The report is taken only then: one
/// that comes sooner waits for its turn instead of being lost (librdkafka reports an outage
/// once, so a broker that flaps would otherwise leave the consumer at its old positions).
fn take_replacement(
    brokers_down: &AtomicBool,
    replaced: Option<std::time::Instant>,
    now: std::time::Instant,
    interval: Duration,
) -> bool {
    replaced.is_none_or(|t| now.saturating_duration_since(t) >= interval)
        && brokers_down.swap(false, Ordering::Relaxed)
}

/// Swaps in a fresh consumer while every broker is unreachable. A broker that comes back
/// having lost its data (tansu `memory://`, a wiped cluster) has no group, no committed offsets
/// and logs that restart at 0: the old client would keep fetching at its old positions and
/// never see the new requests below them (and librdkafka 2.12 can crash on topics recreated
/// with new ids). The fresh client joins the group again and starts from the committed
/// offsets, or from the beginning when there are none; against a broker that kept its data
/// it simply resumes, and anything redelivered is answered from the request log.
///
/// True when it was replaced. When the fresh one cannot be created, the old one is kept (the
/// worker goes on rather than dying with its requests in flight) and the outage stays
/// pending: the replacement is tried again after `interval`.
fn replace_consumer(
    consumer: &mut BusConsumer,
    fresh: Result<BusConsumer, String>,
    interval: Duration,
) -> bool {
    match fresh {
        Ok(fresh) => {
            let old = std::mem::replace(consumer, fresh);
            tracing::warn!(
                "all brokers down; replaced the bus consumer (it rejoins the group when they return)"
            );
            // Closing a group member may wait for the unreachable coordinator: not on this task.
            tokio::task::spawn_blocking(move || drop(old));
            true
        }
        Err(e) => {
            tracing::error!(
                "all brokers down, and a fresh bus consumer cannot be created ({e}); keeping \
                 the current one and trying again in {interval:?}"
            );
            consumer
                .context()
                .brokers_down
                .store(true, Ordering::Relaxed);
            false
        }
    }
}

/// Records `offset` as finished and commits how far the partition got, if that moved - never
/// for a partition a rebalance took away (it is forgotten first), and nothing through a
/// consumer whose brokers all went down: it is about to be replaced, and its positions may be
/// those of a log that is gone (its successor starts from what was committed before).
fn commit_if_advanced(
    consumer: &BusConsumer,
    tracker: &mut CommitTracker,
    topic: &str,
    partition: i32,
    epoch: Epoch,
    offset: i64,
    mode: CommitMode,
) {
    if consumer.context().outage_pending() {
        return;
    }
    consumer.context().forget_revoked(tracker);
    if let Some(next) = tracker.finished(topic, partition, epoch, offset) {
        commit(consumer, topic, partition, next, mode);
    }
}

fn commit(consumer: &BusConsumer, topic: &str, partition: i32, next: i64, mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(next))
        .is_ok()
        && let Err(e) = consumer.commit(&tpl, mode)
    {
        // A partition taken away by a rebalance cannot be committed: its new owner will
        // redeliver, and idempotency makes that harmless.
        tracing::debug!(topic, partition, next, "commit failed: {e}");
    }
}

/// The `traceparent` Kafka header of a message, if it has a valid UTF-8 one.
fn traceparent_header(message: &rdkafka::message::OwnedMessage) -> Option<&str> {
    use rdkafka::message::Headers;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == "traceparent")
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Handles one message; true once its reply (or dead letter) was delivered, i.e. when its
/// offset may be committed. False only at shutdown.
async fn process(
    worker: &Worker,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    header_traceparent: Option<&str>,
    origin: &(String, i32, i64),
) -> bool {
    let started = std::time::Instant::now();
    let received = chrono::Utc::now();
    let outgoing = match parse_request(payload.unwrap_or_default(), key) {
        Ok(mut request) => {
            request.deadline = request.deadline_from_receipt(received);
            if request.deadline.is_none() {
                request.deadline =
                    default_deadline(request.timestamp, received, worker.settings.default_timeout);
            }
            let margin = if Handler::may_write(&request) {
                reply_margin(request.deadline, request.timestamp, received)
            } else {
                Duration::ZERO
            };
            // The request's trace (envelope field, else Kafka header) or a new one.
            let trace_id = request
                .traceparent
                .as_deref()
                .or(header_traceparent)
                .and_then(svc_kit::trace::TraceParent::parse)
                .map(|t| t.trace_id)
                .unwrap_or_else(svc_kit::trace::new_trace_id);
            let span = tracing::info_span!(
                "bus_request",
                correlation_id = %request.correlation_id,
                trace_id = %trace_id
            );
            // A panic while executing (a bug) is contained to its request: it is answered
            // INTERNAL_ERROR and its offset committed like any other, instead of the task dying
            // with the offset in flight, which would hold back every later commit of the
            // partition and leave the caller waiting for its timeout.
            let executed = catch_panic(async {
                if worker.failpoint == Some(Failpoint::Panic)
                    && request.correlation_id.starts_with(PANIC_IN_EXECUTE)
                {
                    panic!("fail point bus-panic");
                }
                execute(worker, &request, margin).await
            })
            .instrument(span.clone())
            .await;
            let reply = match executed {
                Ok(Some(reply)) => reply,
                Ok(None) => return false,
                Err(panic) => span.in_scope(|| {
                    tracing::error!(%panic, "bus request panicked; answered INTERNAL_ERROR");
                    panicked()
                }),
            };
            span.in_scope(|| {
                tracing::debug!(
                    completed = matches!(reply, Reply::Completed(_)),
                    "bus request answered"
                )
            });
            if worker.failpoint == Some(Failpoint::AbortAfterExecute) {
                // Fail point for the redelivery test: die between the write and the reply/commit.
                tracing::error!(correlation_id = %request.correlation_id, "fail point bus-after-execute: aborting");
                std::process::abort();
            }
            Outgoing::Reply {
                correlation_id: request.correlation_id,
                reply,
                traceparent: Some(svc_kit::trace::child_traceparent(&trace_id)),
            }
        }
        Err(rejection) => match rejection.correlation_id {
            Some(correlation_id) => {
                tracing::info!(%correlation_id, reason = %rejection.message, "bus request rejected");
                Outgoing::Reply {
                    correlation_id,
                    reply: rejected(rejection.code, rejection.message),
                    traceparent: header_traceparent.map(str::to_string),
                }
            }
            None => {
                tracing::warn!(topic = %origin.0, partition = origin.1, offset = origin.2, reason = %rejection.message, "bus request without correlation id: dead-lettered");
                Outgoing::DeadLetter {
                    reason: rejection.message.clone(),
                    body: serde_json::json!({
                        "reason": rejection.message,
                        "error_code": rejection.code,
                        "source_topic": origin.0,
                        "source_partition": origin.1,
                        "source_offset": origin.2,
                        "key": key.map(|k| String::from_utf8_lossy(k).into_owned()),
                        "payload": payload.map(|p| String::from_utf8_lossy(p).into_owned()),
                        "timestamp": now_rfc3339(),
                    }),
                }
            }
        },
    };
    let outcome = match &outgoing {
        Outgoing::Reply {
            reply: Reply::Completed(_),
            ..
        } => "completed",
        Outgoing::Reply { .. } => "failed",
        Outgoing::DeadLetter { .. } => "dead_letter",
    };
    if worker.failpoint == Some(Failpoint::Panic)
        && let Outgoing::Reply { correlation_id, .. } = &outgoing
        && correlation_id.starts_with(PANIC_BEFORE_REPLY)
    {
        panic!("fail point bus-panic before the reply");
    }
    let delivered = deliver(worker, outgoing).await;
    if delivered {
        // From receipt to the broker's ack of the reply: the worker's share of a round trip.
        svc_kit::metrics::counter!("db_bus_requests_total", "outcome" => outcome).increment(1);
        svc_kit::metrics::histogram!("db_bus_request_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
    }
    delivered
}

/// The deadline of a request that carries none: `timeout` after it was sent (its timestamp,
/// or `now` for one without a timestamp or with one in the future, a clock ahead of ours).
fn default_deadline(
    sent: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
    timeout: Option<Duration>,
) -> Option<bus_protocol::Deadline> {
    let timeout = chrono::Duration::from_std(timeout?).ok()?;
    let start = sent.map_or(now, |t| t.min(now));
    start.checked_add_signed(timeout)
}

/// Executes with retries while the database is unavailable. None = shutdown interrupted it
/// (the request stays uncommitted and will be redelivered).
///
/// A write already committed under its id (a redelivery after its reply, a crash between
/// commit and reply, a concurrent duplicate) is replayed from the request log, which writes
/// nothing, whatever its deadline: TIMEOUT says "nothing was done", which would be false.
/// That is checked when the deadline passed before an attempt, and when one ends in TIMEOUT
/// (the deadline passed while it waited for a connection, on the request-log row of a
/// duplicate that then committed, or in a slow replay). While the log cannot be read, the
/// request waits like any other.
///
/// A write must also be done `margin` before its deadline ([`reply_margin`]): one with less
/// time left is not started (its reply would reach the caller after it gave up and, for
/// OmniClaude, wrote directly), and an attempt's statements end that much earlier. A read
/// past its deadline is answered TIMEOUT at once: it cannot have written anything, so there
/// is no request log to read (which would wait while the database is down).
async fn execute(worker: &Worker, request: &BusRequest, margin: Duration) -> Option<Reply> {
    let mut backoff = Duration::from_millis(100);
    let mut warned = false;
    // The request log holds this write's result: replay it, with REPLAY_BUDGET.
    let mut replay = false;
    loop {
        let remaining = match request.deadline {
            _ if replay => Some(REPLAY_BUDGET),
            Some(deadline) => match attempt_budget(deadline, chrono::Utc::now(), margin) {
                Some(left) => Some(left),
                None if !Handler::may_write(request) => {
                    return Some(deadline_passed(deadline, margin));
                }
                None => match worker.handler.already_applied(request).await {
                    Ok(true) => {
                        replay = true;
                        Some(REPLAY_BUDGET)
                    }
                    Ok(false) => return Some(deadline_passed(deadline, margin)),
                    Err(e) => {
                        let why = e.to_string();
                        if !wait_for_database(worker, backoff, &mut warned, request, &why).await {
                            return None;
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            },
            None => None,
        };
        let why = match worker.handler.attempt(request, remaining).await {
            Attempt::Done(Reply::Failed(timeout))
                if timeout.error_code == codes::TIMEOUT && Handler::may_write(request) =>
            {
                if replay {
                    "the replay from the request log timed out".to_string()
                } else {
                    let check = worker.handler.already_applied(request);
                    match tokio::time::timeout(APPLIED_CHECK, check).await {
                        Ok(Ok(false)) => return Some(Reply::Failed(timeout)),
                        Ok(Ok(true)) => {
                            replay = true;
                            continue;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "the request log could not be read in time".to_string(),
                    }
                }
            }
            Attempt::Done(reply) => return Some(reply),
            Attempt::Retry(why) => why,
        };
        let pause = remaining.map_or(backoff, |left| backoff.min(left));
        if !wait_for_database(worker, pause, &mut warned, request, &why).await {
            return None;
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The time an attempt may take: what is left before `deadline` less `margin`; None when
/// nothing is.
fn attempt_budget(
    deadline: bus_protocol::Deadline,
    now: chrono::DateTime<chrono::Utc>,
    margin: Duration,
) -> Option<Duration> {
    let left = (deadline - now).to_std().ok()?;
    left.checked_sub(margin).filter(|left| !left.is_zero())
}

/// The time a write's reply is given to reach its caller before the deadline: a tenth of the
/// request's whole timeout (from when it was sent, or received if later or unknown, to its
/// deadline), at least MIN_REPLY_MARGIN and at most MAX_REPLY_MARGIN, but never more than
/// half the timeout (a caller that allows 400 ms must still be able to write). Zero without a
/// deadline.
fn reply_margin(
    deadline: Option<bus_protocol::Deadline>,
    sent: Option<chrono::DateTime<chrono::Utc>>,
    received: chrono::DateTime<chrono::Utc>,
) -> Duration {
    let Some(deadline) = deadline else {
        return Duration::ZERO;
    };
    let start = sent.map_or(received, |t| t.min(received));
    let timeout = (deadline - start).to_std().unwrap_or_default();
    (timeout / 10)
        .clamp(MIN_REPLY_MARGIN, MAX_REPLY_MARGIN)
        .min(timeout / 2)
}

/// The reply to a request whose deadline passed (or, for a write, came within `margin`)
/// before it could be executed.
fn deadline_passed(deadline: bus_protocol::Deadline, margin: Duration) -> Reply {
    let message = if margin.is_zero() {
        format!(
            "the request's deadline ({deadline}) passed before it could be executed; nothing was done"
        )
    } else {
        format!(
            "the request's deadline ({deadline}) was less than {} ms away before it could be \
             executed, too close for a write and its reply; nothing was done",
            margin.as_millis()
        )
    };
    Reply::Failed(failed(codes::TIMEOUT, message))
}

/// The reply to a request whose execution panicked.
fn panicked() -> Reply {
    Reply::Failed(failed(
        codes::INTERNAL_ERROR,
        "db-svc failed while executing this request (an internal error, logged on the server); \
         whether a write took effect is unknown: resend it with the same request id, and a \
         write that was applied is replayed, not repeated",
    ))
}

/// The reply to a request that could not be parsed (but has a correlation id).
fn rejected(code: &str, message: String) -> Reply {
    Reply::Failed(failed(code, message))
}

/// Waits `pause` while the database is unavailable, warning once per request; false when
/// shutdown interrupted the wait.
async fn wait_for_database(
    worker: &Worker,
    pause: Duration,
    warned: &mut bool,
    request: &BusRequest,
    why: &str,
) -> bool {
    if !*warned {
        tracing::warn!(correlation_id = %request.correlation_id, "database unavailable ({why}); the request waits and is retried");
        *warned = true;
    }
    tokio::select! {
        _ = worker.shutdown.triggered() => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

/// Publishes the reply or dead letter, retrying until the broker acknowledges it. A message
/// the producer or broker refuses as too large is permanent, not transient: it is replaced
/// once by a small one (a FAILED reply `REPLY_TOO_LARGE`, or the dead letter without the
/// request's payload), or the partition would stall on it forever. When even that is too
/// large (what is left is the request's own correlation id or key, echoed), the request is
/// left unanswered and its offset committed: no reply can carry it.
///
/// Other refusals that no retry can change (the topic does not exist or may not be written,
/// the broker refuses the record: [`Refusal::Permanent`]) leave a FAILED reply or a dead letter
/// unanswered and committed too, logged (at most every LOG_EVERY) and counted: retried, they
/// would hold a processing slot and every later commit of the partition forever, and again
/// after a restart. Nothing was applied for those, so a caller that falls back writes once.
/// A COMPLETED reply is retried instead, however it is refused: its request may have written,
/// and a caller left without it falls back and writes again (OmniClaude has no request id).
/// While a completed-reply topic refuses everything the partition stalls, visibly in the log,
/// at most `--bus-concurrency` writes ahead; and a topic missing only for a while (recreated
/// after an empty broker restart, which librdkafka reports at once for a topic it knew) is
/// answered once it is back.
/// A dead letter (diagnostics of a request nobody waits for) is given up after
/// DEAD_LETTER_PATIENCE of failures of any kind: a dead-letter topic that refuses it in a
/// way librdkafka retries until `message.timeout.ms` (a compacted one refusing a record without
/// a key, on brokers that report it as a corrupt message) must not stall the requests either.
async fn deliver(worker: &Worker, outgoing: Outgoing) -> bool {
    let mut message = encode_outgoing(worker, &outgoing);
    let mut replaced = false;
    let mut backoff = Duration::from_millis(100);
    let started = std::time::Instant::now();
    let dead_letter = matches!(outgoing, Outgoing::DeadLetter { .. });
    let completed = matches!(
        outgoing,
        Outgoing::Reply {
            reply: Reply::Completed(_),
            ..
        }
    );
    loop {
        let (topic, key, bytes) = &message;
        let mut record = FutureRecord::to(topic).payload(bytes);
        if !key.is_empty() {
            record = record.key(key);
        }
        let e = match worker.producer.send(record, Duration::from_secs(10)).await {
            Ok(_) => return true,
            Err((e, _)) => e,
        };
        match refusal(&e) {
            Refusal::TooLarge if !replaced => {
                tracing::warn!(topic = %topic, bytes = bytes.len(), "the reply is too large for the bus ({e}); sending a small one instead");
                message = encode_outgoing(worker, &too_large(&outgoing, bytes.len()));
                replaced = true;
                continue;
            }
            Refusal::TooLarge => {
                tracing::error!(
                    topic = %topic,
                    bytes = bytes.len(),
                    key_bytes = key.len(),
                    "even the small stand-in is too large for the bus ({e}): the request's \
                     correlation id or key alone is; it is left unanswered and committed"
                );
                svc_kit::metrics::counter!("db_bus_unanswerable_total").increment(1);
                return true;
            }
            Refusal::Permanent if !completed => {
                give_up(worker, topic, &e, "the bus refuses it");
                return true;
            }
            Refusal::Transient if dead_letter && started.elapsed() >= DEAD_LETTER_PATIENCE => {
                give_up(
                    worker,
                    topic,
                    &e,
                    "a dead letter, still refused after retries",
                );
                return true;
            }
            // Retried below.
            Refusal::Permanent => {
                if let Some(unlogged) = worker.give_up_log.may_log(std::time::Instant::now()) {
                    tracing::error!(
                        topic = %topic, unlogged_before = unlogged,
                        "the bus refuses a completed reply ({e}); its request may have written, \
                         so it is retried until the topic takes it (the partition waits)"
                    );
                }
            }
            Refusal::Transient => {
                tracing::warn!(topic = %topic, "cannot publish the reply ({e}); retrying");
            }
        }
        tokio::select! {
            _ = worker.shutdown.triggered() => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Leaves a request unanswered (its offset is committed): logged at most every LOG_EVERY
/// (with how many went unlogged; a missing reply topic refuses every reply), always counted.
fn give_up(worker: &Worker, topic: &str, e: &KafkaError, why: &str) {
    svc_kit::metrics::counter!("db_bus_unanswerable_total").increment(1);
    if let Some(unlogged) = worker.give_up_log.may_log(std::time::Instant::now()) {
        tracing::error!(
            topic,
            unlogged,
            "cannot publish the reply or dead letter ({e}): {why}; the request is left \
             unanswered and committed (db_bus_unanswerable_total counts them)"
        );
    }
}

/// What a failed publish means for the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// Larger than the producer or broker accepts: a smaller message may go through.
    TooLarge,
    /// The same message will be refused again however long it is retried.
    Permanent,
    /// The broker is unreachable, busy or electing a leader: retried.
    Transient,
}

fn refusal(e: &KafkaError) -> Refusal {
    use rdkafka::types::RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge) => {
            Refusal::TooLarge
        }
        // librdkafka reports a topic or partition missing from the cluster only after
        // waiting `topic.metadata.propagation.max.ms` for it (30 s) on a fresh topic.
        Some(
            C::UnknownTopic
            | C::UnknownPartition
            | C::UnknownTopicOrPartition
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidRecord
            | C::InvalidRequiredAcks
            | C::UnsupportedForMessageFormat
            | C::PolicyViolation
            | C::BadMessage,
        ) => Refusal::Permanent,
        _ => Refusal::Transient,
    }
}

/// The topic, key and bytes of `outgoing`.
fn encode_outgoing(worker: &Worker, outgoing: &Outgoing) -> (String, String, Vec<u8>) {
    let topics = &worker.settings.topics;
    match outgoing {
        Outgoing::Reply {
            correlation_id,
            reply,
            traceparent,
        } => {
            let topic = match reply {
                Reply::Completed(_) => &topics.completed,
                Reply::Failed(_) => &topics.failed,
            };
            let envelope: Envelope = reply
                .envelope(correlation_id, &worker.settings.service)
                .with_traceparent(traceparent.clone());
            (topic.clone(), correlation_id.clone(), envelope.to_bytes())
        }
        Outgoing::DeadLetter { reason, body } => {
            tracing::debug!(%reason, "dead letter");
            (
                topics.dead_letter.clone(),
                String::new(),
                serde_json::to_vec(body).unwrap_or_default(),
            )
        }
    }
}

/// Whether `reply` reports on what may have been a write, now committed: a COMPLETED reply
/// to anything but a query or count (an EXECUTE_RAW counts, whatever its statement was).
fn reports_a_write(reply: &Reply) -> bool {
    match reply {
        Reply::Completed(done) => !matches!(done.operation.as_str(), "QUERY" | "COUNT"),
        Reply::Failed(_) => false,
    }
}

/// The small stand-in for an outgoing message of `bytes` bytes that the bus refused.
fn too_large(outgoing: &Outgoing, bytes: usize) -> Outgoing {
    match outgoing {
        Outgoing::Reply {
            correlation_id,
            reply,
            traceparent,
        } => Outgoing::Reply {
            correlation_id: correlation_id.clone(),
            reply: Reply::Failed(failed(
                codes::REPLY_TOO_LARGE,
                if reports_a_write(reply) {
                    // Rare: a write's rows are refused before it commits when they come to
                    // more than a reply carries, counted as protobuf; as JSON they can be
                    // larger still (or it is the recorded result of a write made over gRPC).
                    format!(
                        "the reply ({bytes} bytes) is larger than the bus accepts, but what \
                         the request wrote was committed: do not send it again as a new write; \
                         the same request id over gRPC (the correlation id when the request \
                         named none) returns its recorded result; ask for the count alone \
                         (count_only, or no RETURNING) next time"
                    )
                } else {
                    format!(
                        "the reply ({bytes} bytes) is larger than the bus accepts; ask for \
                         fewer rows (limit), or read them over gRPC (StreamQuery)"
                    )
                },
            )),
            traceparent: traceparent.clone(),
        },
        Outgoing::DeadLetter { reason, body } => {
            let mut body = body.clone();
            body["payload"] = serde_json::Value::String(format!("omitted: {bytes} bytes"));
            Outgoing::DeadLetter {
                reason: reason.clone(),
                body,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_protocol::FailedPayload;
    use chrono::{TimeZone, Utc};

    #[test]
    fn a_failed_commit_is_logged_and_a_successful_one_is_not() {
        let context = BusContext::default();
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset("requests", 0, Offset::Offset(7))
            .expect("a valid offset");
        context.commit_callback(Ok(()), &offsets);
        let now = std::time::Instant::now();
        // Nothing logged yet: the budget still has its line.
        assert_eq!(context.commit_log.may_log(now), Some(0));
        let context = BusContext::default();
        context.commit_callback(
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress,
            )),
            &offsets,
        );
        // The failure took the window's line.
        assert_eq!(context.commit_log.may_log(now), None);
    }

    /// A replacement interval for the tests (the default is shorter).
    const INTERVAL: Duration = Duration::from_secs(30);

    /// Bus settings for brokers at `brokers`, the group `db-svc`, one request at a time.
    fn settings_for(brokers: &str) -> BusSettings {
        BusSettings {
            brokers: brokers.into(),
            topics: Topics::default(),
            group_id: "db-svc".into(),
            concurrency: 1,
            sql_writes: false,
            session_timeout: Duration::from_secs(10),
            replace_interval: INTERVAL,
            service: "db-svc".into(),
            default_timeout: None,
        }
    }

    #[test]
    fn operators_change_the_tuning_but_not_what_the_worker_relies_on() {
        let setting = |key: &str, value: &str| svc_kit::kafka::KafkaSetting {
            key: key.into(),
            value: value.into(),
        };
        let settings = BusSettings {
            concurrency: 8,
            ..settings_for("b:9092")
        };
        let operator = [
            setting("fetch.wait.max.ms", "50"),
            setting("linger.ms", "5"),
            setting("client.id", "mine"),
            setting("sasl.username", "u"),
            setting("group.id", "theirs"),
            setting("enable.auto.commit", "true"),
            setting("auto.offset.reset", "latest"),
            setting("acks", "1"),
            setting("bootstrap.servers", "elsewhere:9092"),
        ];
        let c = consumer_config(&settings, &operator);
        for (key, value) in [
            ("fetch.wait.max.ms", "50"),
            ("client.id", "mine"),
            ("sasl.username", "u"),
            ("group.id", "db-svc"),
            ("enable.auto.commit", "false"),
            ("auto.offset.reset", "earliest"),
            ("bootstrap.servers", "b:9092"),
            ("session.timeout.ms", "10000"),
        ] {
            assert_eq!(c.get(key), Some(value), "consumer {key}");
        }
        let p = producer_config(&settings, &operator);
        for (key, value) in [
            ("linger.ms", "5"),
            ("client.id", "mine"),
            ("sasl.username", "u"),
            ("acks", "all"),
            ("bootstrap.servers", "b:9092"),
        ] {
            assert_eq!(p.get(key), Some(value), "producer {key}");
        }
        // Without operator settings, the tuning.
        assert_eq!(
            consumer_config(&settings, &[]).get("fetch.wait.max.ms"),
            Some("2")
        );
        assert_eq!(
            consumer_config(&settings, &[]).get("topic.metadata.refresh.interval.ms"),
            Some("5000")
        );
        assert_eq!(producer_config(&settings, &[]).get("linger.ms"), Some("1"));
        // A session longer than librdkafka's poll interval raises that, which librdkafka
        // requires; a shorter one leaves it alone.
        assert_eq!(
            consumer_config(&settings, &[]).get("max.poll.interval.ms"),
            None
        );
        let long = BusSettings {
            session_timeout: Duration::from_secs(1800),
            ..settings_for("b:9092")
        };
        let c = consumer_config(&long, &[]);
        assert_eq!(c.get("max.poll.interval.ms"), Some("1800000"));
        assert!(c.create::<rdkafka::consumer::BaseConsumer>().is_ok());
        let c = consumer_config(&long, &[setting("max.poll.interval.ms", "3600000")]);
        assert_eq!(c.get("max.poll.interval.ms"), Some("3600000"));
        assert_eq!(
            producer_config(&settings, &[]).get("compression.type"),
            Some("gzip"),
            "replies stock Python clients can read"
        );
    }

    #[test]
    fn an_outage_refused_by_the_rate_limit_replaces_the_consumer_once_it_allows() {
        let start = std::time::Instant::now();
        let down = AtomicBool::new(true);
        assert!(
            take_replacement(&down, None, start, INTERVAL),
            "the first outage"
        );
        // The broker flaps: down again 10 s after that replacement (reported once).
        down.store(true, Ordering::Relaxed);
        let replaced = Some(start);
        assert!(!take_replacement(
            &down,
            replaced,
            start + Duration::from_secs(10),
            INTERVAL
        ));
        assert!(!take_replacement(
            &down,
            replaced,
            start + Duration::from_secs(29),
            INTERVAL
        ));
        // Past the interval, without another report: the outage is still to be acted on.
        assert!(take_replacement(
            &down,
            replaced,
            start + INTERVAL,
            INTERVAL
        ));
        assert!(
            !take_replacement(&down, replaced, start + INTERVAL, INTERVAL),
            "once per report"
        );
        // No outage reported: never.
        assert!(!take_replacement(
            &down,
            None,
            start + Duration::from_secs(100),
            INTERVAL
        ));
    }

    #[test]
    fn only_a_consumer_that_held_partitions_is_replaced_after_an_outage() {
        let down = || KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        // A fresh consumer in a cluster still down: no positions, nothing to replace.
        let fresh = BusContext::default();
        fresh.error(down(), "1/1 brokers are down");
        assert!(!fresh.outage_pending());
        let assigned = BusContext::default();
        assigned.assigned.store(true, Ordering::Relaxed);
        assigned.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "x",
        );
        assert!(!assigned.outage_pending(), "one broker is not all of them");
        assigned.error(down(), "1/1 brokers are down");
        assert!(assigned.outage_pending());
    }

    #[test]
    fn worker_built_failures_mean_what_the_same_code_means_from_the_executor() {
        use crate::bus::handler::failed_from_status;
        use crate::error::DbError;
        let failed = |reply: Reply| match reply {
            Reply::Failed(f) => f,
            Reply::Completed(c) => panic!("{c:?}"),
        };
        let same = |worker: FailedPayload, executor: FailedPayload| {
            assert_eq!(worker.error_code, executor.error_code);
            assert_eq!(
                (worker.grpc_code.as_str(), worker.retryable),
                (executor.grpc_code.as_str(), executor.retryable),
                "{}",
                worker.error_code
            );
            assert!(!worker.grpc_code.is_empty(), "{}", worker.error_code);
        };
        let past = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
        same(
            failed(deadline_passed(past, Duration::ZERO)),
            failed_from_status(&DbError::Timeout("x".into()).into()),
        );
        let rejection = bus_protocol::parse_request(b"{not json", Some(b"cid")).unwrap_err();
        same(
            failed(rejected(rejection.code, rejection.message)),
            failed_from_status(&DbError::field("x", "bad").into()),
        );
        same(
            failed(panicked()),
            failed_from_status(&tonic::Status::internal("x")),
        );
        // No direct-path counterpart: always the same, and not worth resending as is.
        let outgoing = Outgoing::Reply {
            correlation_id: "c".into(),
            reply: Reply::Completed(Default::default()),
            traceparent: None,
        };
        let Outgoing::Reply { reply, .. } = too_large(&outgoing, 2_000_000) else {
            unreachable!()
        };
        let f = failed(reply);
        assert_eq!(f.error_code, codes::REPLY_TOO_LARGE);
        assert!(!f.retryable);
    }

    #[test]
    fn refusals_no_retry_can_change_are_permanent() {
        use rdkafka::types::RDKafkaErrorCode as C;
        let produce = |code| refusal(&KafkaError::MessageProduction(code));
        for code in [
            C::UnknownTopic,
            C::UnknownPartition,
            C::UnknownTopicOrPartition,
            C::TopicAuthorizationFailed,
            C::ClusterAuthorizationFailed,
            C::InvalidRecord,
            C::InvalidTopic,
            C::PolicyViolation,
        ] {
            assert_eq!(produce(code), Refusal::Permanent, "{code:?}");
        }
        for code in [
            C::MessageSizeTooLarge,
            C::InvalidMessageSize,
            C::MessageBatchTooLarge,
        ] {
            assert_eq!(produce(code), Refusal::TooLarge, "{code:?}");
        }
        // What a broker outage, a leader election or a full queue looks like: waited out.
        for code in [
            C::MessageTimedOut,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::NotEnoughReplicas,
            C::QueueFull,
            C::RequestTimedOut,
            C::InvalidMessage,
        ] {
            assert_eq!(produce(code), Refusal::Transient, "{code:?}");
        }
        assert_eq!(refusal(&KafkaError::Canceled), Refusal::Transient);
    }

    #[test]
    fn a_refusal_repeated_for_every_reply_is_logged_once_per_interval() {
        let throttle = LogBudget::new(1, LOG_EVERY);
        let start = std::time::Instant::now();
        assert_eq!(throttle.may_log(start), Some(0));
        for i in 1..=5 {
            assert_eq!(throttle.may_log(start + Duration::from_secs(i)), None);
        }
        assert_eq!(
            throttle.may_log(start + LOG_EVERY),
            Some(5),
            "with the count held back"
        );
        assert_eq!(throttle.may_log(start + LOG_EVERY), None);
    }

    #[tokio::test]
    async fn a_consumer_that_cannot_be_replaced_is_kept_and_replaced_later() {
        let settings = BusSettings {
            group_id: "db-svc-test".into(),
            ..settings_for("127.0.0.1:1")
        };
        let mut consumer = subscribe(&settings).unwrap();
        consumer.context().assigned.store(true, Ordering::Relaxed);
        let (down, now) = (&consumer.context().brokers_down, std::time::Instant::now());
        down.store(true, Ordering::Relaxed);
        assert!(take_replacement(down, None, now, INTERVAL));
        let kept: *const BusContext = consumer.context().as_ref();
        assert!(!replace_consumer(
            &mut consumer,
            Err("no client".into()),
            INTERVAL
        ));
        assert!(
            std::ptr::eq(kept, consumer.context().as_ref()),
            "the old one kept"
        );
        // Still pending: tried again once the interval has passed, not before.
        let down = &consumer.context().brokers_down;
        assert!(!take_replacement(
            down,
            Some(now),
            now + Duration::from_secs(1),
            INTERVAL
        ));
        assert!(take_replacement(down, Some(now), now + INTERVAL, INTERVAL));
        assert!(replace_consumer(
            &mut consumer,
            subscribe(&settings),
            INTERVAL
        ));
        assert!(!std::ptr::eq(kept, consumer.context().as_ref()), "replaced");
    }

    #[test]
    fn a_write_needs_its_reply_margin_left_to_start() {
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let ms = chrono::Duration::milliseconds;
        // OmniClaude's 5 s: half a second; a 20 s timeout: 2 s; bounded both ways.
        assert_eq!(
            reply_margin(Some(now + ms(5000)), Some(now), now),
            MIN_REPLY_MARGIN
        );
        assert_eq!(
            reply_margin(Some(now + ms(20_000)), Some(now - ms(3000)), now),
            Duration::from_millis(2300)
        );
        assert_eq!(
            reply_margin(Some(now + ms(3_600_000)), Some(now), now),
            MAX_REPLY_MARGIN
        );
        assert_eq!(
            reply_margin(Some(now + ms(20_000)), None, now),
            Duration::from_secs(2),
            "from its receipt"
        );
        assert_eq!(reply_margin(None, Some(now), now), Duration::ZERO);
        // A short timeout keeps half of itself for the write.
        assert_eq!(
            reply_margin(Some(now + ms(400)), Some(now), now),
            Duration::from_millis(200)
        );
        assert_eq!(
            reply_margin(Some(now + ms(800)), Some(now), now),
            Duration::from_millis(400)
        );
        // The budget of an attempt is what is left less the margin; nothing is too late.
        let deadline = now + ms(1500);
        assert_eq!(
            attempt_budget(deadline, now, MIN_REPLY_MARGIN),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            attempt_budget(deadline, now + ms(1000), MIN_REPLY_MARGIN),
            None
        );
        assert_eq!(
            attempt_budget(deadline, now + ms(1200), MIN_REPLY_MARGIN),
            None
        );
        // A read (no margin) runs until the deadline itself.
        assert_eq!(
            attempt_budget(deadline, now + ms(1200), Duration::ZERO),
            Some(Duration::from_millis(300))
        );
        assert_eq!(
            attempt_budget(deadline, now + ms(2000), Duration::ZERO),
            None
        );
    }

    #[test]
    fn sql_writes_return_what_a_reply_can_carry() {
        // librdkafka's default: about half a megabyte of rows.
        assert_eq!(reply_row_bytes(None, 1), (1_000_000 - ENVELOPE_ROOM) / 2);
        assert_eq!(
            reply_row_bytes(Some("4000000"), 1),
            (4_000_000 - ENVELOPE_ROOM) / 2
        );
        // A tiny limit keeps three quarters of itself; an unreadable one is the default.
        assert_eq!(reply_row_bytes(Some("1000"), 1), 375);
        assert_eq!(reply_row_bytes(Some("lots"), 1), reply_row_bytes(None, 1));
    }

    #[test]
    fn structured_writes_return_half_as_much_their_reply_carrying_the_rows_twice() {
        assert_eq!(reply_row_bytes(None, 2), (1_000_000 - ENVELOPE_ROOM) / 4);
        assert_eq!(reply_row_bytes(Some("1000"), 2), 187);
        let settings = BusSettings {
            sql_writes: true,
            ..settings_for("b:9092")
        };
        assert_eq!(
            structured_write_reply_bytes(&settings),
            sql_write_reply_bytes(&settings) / 2
        );
    }

    #[test]
    fn a_write_reply_too_large_for_the_bus_says_the_write_was_done() {
        let stand_in = |operation: &str| {
            let outgoing = Outgoing::Reply {
                correlation_id: "c".into(),
                reply: Reply::Completed(bus_protocol::CompletedPayload {
                    operation: operation.into(),
                    ..Default::default()
                }),
                traceparent: None,
            };
            match too_large(&outgoing, 2_000_000) {
                Outgoing::Reply {
                    reply: Reply::Failed(f),
                    ..
                } => f,
                _ => unreachable!(),
            }
        };
        for operation in ["INSERT", "UPDATE", "DELETE", "UPSERT", "EXECUTE_RAW"] {
            let f = stand_in(operation);
            assert_eq!(f.error_code, codes::REPLY_TOO_LARGE);
            assert!(
                f.error.contains("committed") && f.error.contains("do not send it again"),
                "{operation}: {}",
                f.error
            );
        }
        for operation in ["QUERY", "COUNT"] {
            let f = stand_in(operation);
            assert_eq!(f.error_code, codes::REPLY_TOO_LARGE);
            assert!(
                !f.error.contains("committed") && f.error.contains("fewer rows"),
                "{operation}: {}",
                f.error
            );
        }
    }

    #[test]
    fn a_request_without_a_deadline_gets_one_from_when_it_was_sent() {
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let five = Some(Duration::from_secs(5));
        let sent = now - chrono::Duration::seconds(3);
        assert_eq!(
            default_deadline(Some(sent), now, five),
            Some(sent + chrono::Duration::seconds(5))
        );
        // Sent long ago: already past.
        let old = now - chrono::Duration::minutes(1);
        assert!(default_deadline(Some(old), now, five).is_some_and(|d| d < now));
        // No timestamp, or one from a clock ahead of ours: counted from receipt.
        let receipt = Some(now + chrono::Duration::seconds(5));
        assert_eq!(default_deadline(None, now, five), receipt);
        assert_eq!(
            default_deadline(Some(now + chrono::Duration::hours(1)), now, five),
            receipt
        );
        // 0 (None): no deadline; a huge timeout is no deadline rather than a panic.
        assert_eq!(default_deadline(Some(sent), now, None), None);
        assert_eq!(
            default_deadline(Some(sent), now, Some(Duration::from_secs(u64::MAX))),
            None
        );
    }
}
