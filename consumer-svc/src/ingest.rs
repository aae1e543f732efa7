//! Kafka ingest: every partition of the four topics assigned directly (no consumer group),
//! the retention window replayed on start, events parsed and applied in batches.
//!
//! Runs on a dedicated thread with a `BaseConsumer`: one `poll` wait, then up to
//! `BATCH` more messages without waiting, all parsed from the borrowed payloads and applied
//! under a single state lock, then published to the hub as one batch.
//!
//! Start position of a partition (replay): every partition is read from its first offset at
//! once, and the first message decides. When it is older than the cutoff time, the log holds
//! events from before the window, and the partition jumps forward to the offset the broker
//! names for the cutoff time (`offsets_for_times`, asked only then, for every such partition
//! of a batch at once). That position is verified by reading the message just before it first:
//! if that message is not older than the cutoff, the broker's answer was too late (tansu
//! answers this wrongly) and the partition resumes where it was instead. Events older than
//! the cutoff are skipped by event time in every case, so reading from too early is only
//! slower, never wrong; and a log that starts inside the window (the common case after a
//! broker restart, and the benchmark's) costs no lookup at all.
//!
//! Broker restarts with empty storage: a topic that disappears has its partitions dropped and,
//! when it is created again, read from the beginning; a partition whose log restarted below our
//! position is reset to the earliest offset by librdkafka (`auto.offset.reset`, on the broker's
//! out-of-range answer). After an outage that replaced the client, a partition goes on from
//! its position when the message just before it is found again (fetched by a short-lived
//! client); only then is the log known to be the one we read, since tansu answers a fetch past
//! the end with nothing, and its ListOffsets "latest" answer can lag the log by a batch (it is
//! asked only when that message is not found, and a log ending before our position is then
//! read from the beginning). Aggregates already held are kept. High watermarks (lag) come
//! from librdkafka's statistics, i.e. from fetch responses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use svc_kit::Shutdown;
use svc_kit::log_budget::LogBudget;

use crate::events::{self, EventKind, Micros};
use crate::hub::{Hub, UpdateKind};
use crate::replay_progress::{Key, ReplayProgress};
use crate::state::{Applied, State};

/// Messages applied per state lock at most.
const BATCH: usize = 2000;
const DISCOVER_INTERVAL: Duration = Duration::from_secs(2);
const PRUNE_INTERVAL: Duration = Duration::from_secs(1);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a fresh client looks for the messages before its positions (see
/// `Ingest::logs_still_holding`).
const PROBE_WAIT: Duration = Duration::from_secs(3);
/// "From the beginning" as offset 0 rather than the symbolic earliest offset: tansu answers the
/// earliest-offset lookup wrongly after records with old timestamps (past the start of the log).
/// A log that really starts later (retention) answers out-of-range, and librdkafka then resets
/// to the earliest offset (`auto.offset.reset`).
const FIRST: Offset = Offset::Offset(0);
/// Metadata answers with an unsettled topic after which the start-up replay is planned
/// without it (one answer every `DISCOVER_INTERVAL`).
const UNSETTLED_ANSWERS_FOR_REPLAY: u32 = 5;
/// Parse errors logged per topic per minute at most (all are counted).
const ERROR_LOGS_PER_MINUTE: u32 = 10;
/// How often the positions are checked for offsets librdkafka passed without delivering them
/// (see `Ingest::note_skipped_offsets`) while messages keep coming; an empty poll checks too.
const SKIPPED_CHECK_INTERVAL: Duration = Duration::from_millis(250);
/// How long after a partition was assigned or moved librdkafka's application positions are
/// not trusted: its fetcher may not have taken the change yet, and may still report the
/// position the partition had before (see `Ingest::note_skipped_offsets`).
const REPOSITION_SETTLE: Duration = Duration::from_millis(200);

/// How partitions are positioned on start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplaySeek {
    /// From the first offset; a log that starts before the window jumps forward to
    /// `offsets_for_times` for the cutoff, verified.
    Timestamp,
    /// Always the earliest offset, skipping events older than the cutoff.
    Earliest,
}

#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub brokers: String,
    /// Full topic name per kind, indexed by `EventKind::index()`.
    pub topics: [String; 4],
    pub replay_seek: ReplaySeek,
    /// Slack subtracted from the cutoff when seeking by timestamp (producer clocks differ).
    pub seek_slack: Duration,
    /// Whether updates are published to the hub (streams on).
    pub publish: bool,
}

/// Counters of one topic.
#[derive(Debug, Default)]
pub struct TopicCounters {
    pub consumed: AtomicU64,
    pub parse_errors: AtomicU64,
    pub expired: AtomicU64,
    /// Microseconds; `i64::MIN` when none yet.
    pub last_event: AtomicI64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionPosition {
    /// Next offset to read (-1 unknown).
    pub next: i64,
    /// High watermark (-1 unknown).
    pub high: i64,
}

/// Progress shared with the API.
#[derive(Debug)]
pub struct IngestStatus {
    pub topics: [String; 4],
    pub counters: [TopicCounters; 4],
    pub partitions: Mutex<BTreeMap<(usize, i32), PartitionPosition>>,
    /// Locked after `partitions` when both are held.
    replay: Mutex<ReplayProgress>,
    replayed: AtomicBool,
    /// Woken once, when the start-up replay is over.
    pub replay_over: tokio::sync::Notify,
    /// Woken once, when the broker first listed what the replay must read:
    /// `--replay-timeout` counts from then, not from a start while the broker was unreachable.
    pub replay_started: tokio::sync::Notify,
}

impl IngestStatus {
    pub fn new(topics: [String; 4]) -> Self {
        let counters = std::array::from_fn(|_| TopicCounters {
            last_event: AtomicI64::new(i64::MIN),
            ..Default::default()
        });
        Self {
            topics,
            counters,
            partitions: Mutex::new(BTreeMap::new()),
            replay: Mutex::new(ReplayProgress::default()),
            replayed: AtomicBool::new(false),
            replay_over: tokio::sync::Notify::new(),
            replay_started: tokio::sync::Notify::new(),
        }
    }

    /// Whether the start-up replay of the retention window is still running (see
    /// [`crate::replay_progress`]); the service is NOT_SERVING meanwhile.
    pub fn replaying(&self) -> bool {
        !self.replayed.load(Ordering::Acquire)
    }

    /// Ends the replay wait: `--replay-timeout` elapsed first (logged with what was left).
    pub fn give_up_replay(&self) {
        if !self.replaying() {
            return;
        }
        let behind: Vec<String> = {
            let positions = self.partitions.lock();
            let replay = self.replay.lock();
            replay
                .unfinished(|key| positions.get(key).map(|p| p.next))
                .into_iter()
                .map(|(k, p)| format!("{}[{p}]", self.topics[k]))
                .collect()
        };
        if self.end_replay() {
            tracing::warn!(
                ?behind,
                "start-up replay not over within --replay-timeout; reporting SERVING anyway"
            );
        }
    }

    /// Marks the replay over and wakes the readiness probe; true for the one call that did.
    fn end_replay(&self) -> bool {
        let first = !self.replayed.swap(true, Ordering::AcqRel);
        if first {
            self.replay_over.notify_one();
        }
        first
    }

    /// Checks the replay against `positions` (the locked partition map).
    fn advance_replay(&self, positions: &BTreeMap<(usize, i32), PartitionPosition>) {
        if !self.replaying() {
            return;
        }
        let over = self
            .replay
            .lock()
            .advance(|key| positions.get(key).map(|p| p.next));
        if over && self.end_replay() {
            tracing::info!(
                events = self.events_processed(),
                "start-up replay over: the retention window is rebuilt"
            );
        }
    }

    pub fn events_processed(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.consumed.load(Ordering::Relaxed))
            .sum()
    }

    pub fn last_event(&self) -> Option<Micros> {
        self.counters
            .iter()
            .map(|c| c.last_event.load(Ordering::Relaxed))
            .max()
            .filter(|t| *t != i64::MIN)
    }
}

/// Shared pieces the ingest thread writes.
pub struct Sinks {
    pub state: Arc<RwLock<State>>,
    pub hub: Arc<Hub>,
    pub status: Arc<IngestStatus>,
    /// Agents whose metrics changed since the metrics publisher last looked.
    pub dirty_agents: Arc<Mutex<HashSet<String>>>,
}

pub fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

struct Partition {
    /// The first message is still to come and decides whether to seek forward by timestamp.
    probe: bool,
    /// After a timestamp seek: what the first message read must show.
    verify: Option<Verify>,
    next: i64,
    /// The last message read, to recognise the log again after the broker was away.
    last: Option<Fingerprint>,
    /// Whether the client has it, and if not, what assigns it again.
    on_client: OnClient,
}

/// Whether a partition is assigned on the Kafka client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnClient {
    Yes,
    /// An assignment failed: the next discover assigns it again at `next` (never from the
    /// start).
    Retry,
    /// Read before the client was replaced: assigned on the fresh one once its topic answers
    /// settled and its log proves intact (see [`Ingest::resume_unverified`]).
    Unverified,
}

/// A message recognised by its offset and a digest of its timestamp, key and payload: a log
/// recreated while the broker was away holds other messages at the same offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    offset: i64,
    digest: u64,
}

impl Fingerprint {
    fn of(m: &impl Message) -> Self {
        use std::hash::{BuildHasher, Hash, Hasher};
        // Fixed seeds: the digest is compared within this process only.
        let mut h = foldhash::quality::FixedState::with_seed(0x006f_6d6e_6962_7573).build_hasher();
        m.timestamp().to_millis().hash(&mut h);
        m.key().hash(&mut h);
        m.payload().hash(&mut h);
        Fingerprint {
            offset: m.offset(),
            digest: h.finish(),
        }
    }
}

/// A timestamp seek to check: the first message read must be at `offset` and older than
/// `before_ms`; otherwise reading resumes at `resume`, where it was before the seek.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Verify {
    offset: i64,
    before_ms: i64,
    resume: i64,
}

impl Partition {
    /// The next offset as the status shows it: -1 (unknown) while a partition read from the
    /// start has read nothing, since its log may start anywhere (retention), and a position
    /// of 0 would count the whole log as lag.
    fn shown_next(&self) -> i64 {
        if self.last.is_none() && self.next == 0 {
            -1
        } else {
            self.next
        }
    }

    /// Assigned again at `offset` (after a seek to verify, or back where it was), keeping the
    /// last message read.
    fn moved_to(offset: i64, verify: Option<Verify>, last: Option<Fingerprint>) -> Self {
        Partition {
            probe: false,
            verify,
            next: offset,
            last,
            on_client: OnClient::Yes,
        }
    }

    /// Read from the first offset; `probe`: seek forward if the log starts before the cutoff.
    fn from_start(probe: bool) -> Self {
        Partition {
            probe,
            verify: None,
            next: 0,
            last: None,
            on_client: OnClient::Yes,
        }
    }
}

/// Receives librdkafka's statistics: the high watermarks it saw in fetch responses. (Asking
/// the broker with ListOffsets is not reliable on tansu: its "latest" answer can lag the log.)
pub struct IngestContext {
    topics: [String; 4],
    status: Arc<IngestStatus>,
    /// Set when librdkafka reports every broker down (see `Ingest::replace_client`).
    brokers_down: Arc<AtomicBool>,
    error_log: svc_kit::kafka::ClientErrorLog,
}

impl ClientContext for IngestContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if let rdkafka::error::KafkaError::Global(
            rdkafka::types::RDKafkaErrorCode::AllBrokersDown,
        ) = error
        {
            self.brokers_down.store(true, Ordering::Relaxed);
        }
        self.error_log.error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        let mut positions = self.status.partitions.lock();
        for (name, topic) in &statistics.topics {
            let Some(k) = kind_of(&self.topics, name) else {
                continue;
            };
            for (id, p) in &topic.partitions {
                if *id < 0 || p.hi_offset < 0 {
                    continue;
                }
                if let Some(pos) = positions.get_mut(&(k, *id)) {
                    pos.high = p.hi_offset;
                }
                if self.status.replaying() {
                    // The replay reads up to what is readable: under read_committed
                    // (librdkafka's default) the last stable offset, so a transaction still
                    // open at start-up does not hold it. librdkafka reports that end as
                    // `ls_offset` (the high watermark when the broker gives none).
                    let readable = if p.ls_offset >= 0 {
                        p.ls_offset
                    } else {
                        p.hi_offset
                    };
                    self.status
                        .replay
                        .lock()
                        .watermarks((k, *id), p.lo_offset, readable);
                }
            }
        }
        self.status.advance_replay(&positions);
    }
}

impl ConsumerContext for IngestContext {}

pub struct Ingest {
    cfg: IngestConfig,
    sinks: Sinks,
    consumer: BaseConsumer<IngestContext>,
    assigned: foldhash::HashMap<(usize, i32), Partition>,
    /// Topics seen missing after having been read: read from the beginning when they return.
    recreated: HashSet<usize>,
    /// The broker stopped answering: the client was replaced and every partition must be
    /// assigned again on the fresh client once metadata comes back.
    client_replaced: bool,
    /// Shared with the client context: every broker is down.
    brokers_down: Arc<AtomicBool>,
    /// Per topic: parse errors logged, at most [`ERROR_LOGS_PER_MINUTE`] per minute, so that a
    /// flood of bad input cannot flood the log (all are counted).
    error_logs: [LogBudget; 4],
    /// Metadata answers so far in which some topic was unsettled (see `Listed`).
    unsettled_answers: u32,
    /// When a partition was last assigned or moved: librdkafka's application positions may
    /// still be the old ones for a while (see [`Ingest::note_skipped_offsets`]).
    repositioned: Option<Instant>,
}

/// The ingest consumer's settings: its tuning, then the operator's pass-through settings
/// (`--kafka-config`, `KAFKA_*`), which may change the tuning (e.g. `fetch.wait.max.ms`), then
/// the settings the ingest loop relies on, which they cannot change.
fn consumer_config(brokers: &str, operator: &[svc_kit::kafka::KafkaSetting]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "consumer-svc")
        // Throughput: big fetches and a deep pre-fetch queue; latency: short broker waits.
        // The pre-fetch queue is capped at 32 MiB: it is resident memory while a backlog is
        // replayed (256 MiB let the resident size swing past 250 MiB during the memory
        // benchmark, 64 MiB to 195 MiB), and 32 MiB (~70,000 typical events) with a short
        // fetch.queue.backoff.ms keeps ingest as fast (measured, see BENCHMARKS.md).
        .set("fetch.wait.max.ms", "20")
        .set("queued.min.messages", "200000")
        .set("queued.max.messages.kbytes", "32768")
        // When the pre-fetch queue is full librdkafka postpones the next fetch by this much
        // (default 1 s): a consumer that parses slower than the broker serves sat idle for
        // up to a second each time the queue filled while a backlog was replayed.
        .set("fetch.queue.backoff.ms", "10")
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "67108864")
        .set("reconnect.backoff.max.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "5000")
        .set("log_level", "3");
    svc_kit::kafka::apply_these(&mut c, operator);
    c.set("bootstrap.servers", brokers)
        // Needed by librdkafka's API but never joined: partitions are assigned directly.
        .set("group.id", "consumer-svc-unused")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        // High watermarks (lag, the end of the start-up replay) come from the statistics.
        .set("statistics.interval.ms", "1000");
    c
}

/// A Kafka client for ingest, reporting to `sinks` and `brokers_down`.
fn new_client(
    cfg: &IngestConfig,
    sinks: &Sinks,
    brokers_down: &Arc<AtomicBool>,
) -> Result<BaseConsumer<IngestContext>, rdkafka::error::KafkaError> {
    let context = IngestContext {
        topics: cfg.topics.clone(),
        status: sinks.status.clone(),
        brokers_down: brokers_down.clone(),
        error_log: svc_kit::kafka::ClientErrorLog::new("consumer-svc ingest"),
    };
    consumer_config(&cfg.brokers, svc_kit::kafka::settings()).create_with_context(context)
}

impl Ingest {
    pub fn new(cfg: IngestConfig, sinks: Sinks) -> Result<Self, rdkafka::error::KafkaError> {
        let brokers_down = Arc::new(AtomicBool::new(false));
        let consumer = new_client(&cfg, &sinks, &brokers_down)?;
        Ok(Self {
            cfg,
            sinks,
            consumer,
            assigned: foldhash::HashMap::default(),
            recreated: HashSet::new(),
            client_replaced: false,
            brokers_down,
            error_logs: std::array::from_fn(|_| {
                LogBudget::new(ERROR_LOGS_PER_MINUTE, Duration::from_secs(60))
            }),
            unsettled_answers: 0,
            repositioned: None,
        })
    }

    /// Consumes until `shutdown`. Blocking: run it on its own thread.
    ///
    /// Each batch is parsed first (no lock held) and then applied under one state lock. (A
    /// two-thread pipeline, parsing on this thread and applying on another, was measured
    /// slower on the 2-core benchmark machine: the threads competed with the broker and
    /// librdkafka for the cores; see BENCHMARKS.md.)
    pub fn run(mut self, shutdown: Shutdown) {
        let mut last_discover: Option<Instant> = None;
        let mut last_prune = Instant::now();
        let mut skip_check = SkipCheck::new(Instant::now());
        while !shutdown.is_triggered() {
            if self.brokers_down.swap(false, Ordering::Relaxed) && !self.client_replaced {
                self.replace_client(&"all brokers down");
            }
            if last_discover.is_none_or(|t| t.elapsed() >= DISCOVER_INTERVAL) {
                self.discover();
                last_discover = Some(Instant::now());
            }
            if last_prune.elapsed() >= PRUNE_INTERVAL {
                let expired = self.sinks.state.write().prune(now_micros());
                // Metric streams get the agents whose figures shrank (or that are gone).
                if self.cfg.publish && !expired.is_empty() {
                    self.sinks.dirty_agents.lock().extend(expired);
                }
                last_prune = Instant::now();
            }
            let wait = if self.assigned.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(100)
            };
            // Borrowed from the consumer's buffers: no copy of the payloads.
            let mut msgs = Vec::with_capacity(BATCH);
            let mut timeout = wait;
            while msgs.len() < BATCH {
                match self.consumer.poll(timeout) {
                    Some(Ok(m)) => msgs.push(m),
                    Some(Err(e)) => {
                        tracing::debug!("Kafka poll: {e}");
                        break;
                    }
                    None => break,
                }
                timeout = Duration::ZERO;
            }
            if msgs.is_empty() {
                skip_check.done(Instant::now());
                self.note_skipped_offsets();
                continue;
            }
            let (parsed, moves) = parse_batch(
                &self.cfg,
                &mut self.assigned,
                &self.error_logs,
                &msgs,
                || seek_target_ms(&self.sinks.state, self.cfg.seek_slack),
            );
            drop(msgs);
            apply_parsed(&self.cfg, &self.sinks, parsed);
            if let Some(target_ms) = moves.target_ms
                && !moves.seek.is_empty()
            {
                self.seek_to_cutoff(&moves.seek, target_ms);
            }
            for (key, offset) in moves.resume {
                self.reassign_at(key, offset, None);
            }
            // Not only when idle: a partition whose log ends with a marker would otherwise
            // never look read while any other partition keeps delivering.
            if skip_check.due(Instant::now()) {
                self.note_skipped_offsets();
            }
        }
        tracing::info!("ingest stopped");
    }

    /// Moves the shown positions past offsets librdkafka consumed without delivering them:
    /// transaction markers (the commit or abort record a transactional producer ends each
    /// transaction with) and the events of aborted transactions. Without this a log ending
    /// with a marker would never look fully read: its lag would stay at 1 and the start-up
    /// replay would wait for `--replay-timeout`. Called after a poll returned nothing, and
    /// every `SKIPPED_CHECK_INTERVAL` after a batch was applied while messages keep coming
    /// (else a quiet partition's final marker would go unnoticed for as long as any other
    /// partition delivers a message every 100 ms): either way every message polled so far has
    /// been applied, so librdkafka's application position of a partition is past what was
    /// read only by offsets it consumed without delivering them. Skipped for
    /// `REPOSITION_SETTLE` after a partition was assigned or moved, while librdkafka may
    /// still report the position it had before, and never for a partition whose timestamp
    /// seek is still to be verified (one that landed on a marker is undone instead). Cheap:
    /// one read of the client's positions and one lock of the status.
    fn note_skipped_offsets(&mut self) {
        if self.assigned.is_empty() || !settled(self.repositioned, Instant::now()) {
            return;
        }
        self.repositioned = None;
        let Ok(app) = self.consumer.position() else {
            return;
        };
        let mut positions = self.sinks.status.partitions.lock();
        let mut moved = false;
        let mut unverifiable = Vec::new();
        for e in app.elements() {
            let (Offset::Offset(at), Some(k)) = (e.offset(), kind_of(&self.cfg.topics, e.topic()))
            else {
                continue;
            };
            let key = (k, e.partition());
            match self.assigned.get(&key).map(|p| after_skip(p.verify, at)) {
                None | Some(AfterSkip::Wait) => continue,
                Some(AfterSkip::Undo(v)) => {
                    unverifiable.push((key, v));
                    continue;
                }
                Some(AfterSkip::Follow) => {}
            }
            if let Some(pos) = positions.get_mut(&key)
                && skipped_to(pos, at)
            {
                pos.next = at;
                moved = true;
            }
        }
        if moved {
            self.sinks.status.advance_replay(&positions);
        }
        drop(positions);
        for ((k, p), v) in unverifiable {
            tracing::info!(
                topic = %self.cfg.topics[k],
                partition = p,
                offset = v.offset,
                resume = v.resume,
                "the timestamp seek landed on a transaction marker and cannot be verified; reading on from where it was"
            );
            self.reassign_at((k, p), v.resume, None);
        }
    }

    /// One ListOffsets round for all of `parts` at `at`: a timestamp, or (as Kafka's
    /// ListOffsets reads -2 and -1) `Offset::Beginning` / `Offset::End` for the first and
    /// latest offsets.
    fn list_offsets(
        &self,
        parts: &[(usize, i32)],
        at: Offset,
    ) -> rdkafka::error::KafkaResult<TopicPartitionList> {
        let mut query = TopicPartitionList::new();
        for &(k, p) in parts {
            // Only fails for a negative offset other than the symbolic ones: not these.
            let _ = query.add_partition_offset(&self.cfg.topics[k], p, at);
        }
        self.consumer.offsets_for_times(query, KAFKA_TIMEOUT)
    }

    /// The broker's latest offset of each of `parts`, asked in one ListOffsets round (not one
    /// blocking call per partition); partitions without an answer are left out.
    fn latest_offsets(&self, parts: &[(usize, i32)]) -> HashMap<(usize, i32), i64> {
        if parts.is_empty() {
            return HashMap::new();
        }
        let Ok(answer) = self.list_offsets(parts, Offset::End) else {
            return HashMap::new();
        };
        parts
            .iter()
            .filter_map(|&(k, p)| Some(((k, p), offset_in(&answer, &self.cfg.topics[k], p)?)))
            .collect()
    }

    /// Finds new partitions, topics that vanished, and partitions whose data was lost.
    fn discover(&mut self) {
        let metadata = match self.consumer.fetch_metadata(None, KAFKA_TIMEOUT) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("metadata: {e}");
                if !self.client_replaced {
                    self.replace_client(&e);
                }
                return;
            }
        };
        let listing: [Listed; 4] = std::array::from_fn(|k| {
            let topic = metadata
                .topics()
                .iter()
                .find(|t| t.name() == self.cfg.topics[k]);
            Listed::of(topic.map(|t| {
                (
                    t.error().map(RDKafkaErrorCode::from),
                    t.partitions().iter().map(|p| p.id()).collect(),
                )
            }))
        });
        for (k, l) in listing.iter().enumerate() {
            if let Listed::Unsettled(code) = l {
                let why = code.map_or_else(
                    || "listed without partitions".to_string(),
                    |c| c.to_string(),
                );
                tracing::warn!(
                    topic = %self.cfg.topics[k],
                    "metadata: {why}; the topic's partitions are kept as they are until it answers"
                );
            }
        }
        // A fresh client has nothing assigned: every partition read so far waits to be
        // verified and assigned again at its position (see `resume_unverified`).
        if std::mem::take(&mut self.client_replaced) {
            self.assigned.retain(|_, part| part.next >= 0);
            for part in self.assigned.values_mut() {
                part.on_client = OnClient::Unverified;
            }
        }
        if !self.resume_unverified(&listing) {
            return;
        }
        // Partitions whose assignment failed: again, at their positions.
        let retry: Vec<(Key, i64)> = self
            .assigned
            .iter()
            .filter(|(_, part)| part.on_client == OnClient::Retry)
            .map(|(key, part)| (*key, part.next))
            .collect();
        for (key, next) in retry {
            if !listing[key.0].vanished(key.1) {
                self.reassign_at(key, next, None);
            }
        }
        // The first complete answer lists what the start-up replay must read; a topic that
        // stays unsettled over several answers is left out of it.
        let unsettled = listing.iter().any(|l| matches!(l, Listed::Unsettled(_)));
        self.unsettled_answers += u32::from(unsettled);
        if !unsettled || self.unsettled_answers >= UNSETTLED_ANSWERS_FOR_REPLAY {
            let began = self.sinks.status.replay.lock().begin(
                listing
                    .iter()
                    .enumerate()
                    .flat_map(|(k, l)| l.partitions().iter().map(move |p| (k, *p))),
            );
            if began {
                self.sinks.status.replay_started.notify_one();
            }
        }
        let (gone, new) = partition_changes(&listing, self.assigned.keys().copied());
        // Vanished topics (a broker that restarted empty): forget their partitions.
        if !gone.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for key in &gone {
                // Ones the client does not have cannot be unassigned (librdkafka refuses).
                if self
                    .assigned
                    .get(key)
                    .is_some_and(|part| part.on_client == OnClient::Yes)
                {
                    tpl.add_partition(&self.cfg.topics[key.0], key.1);
                }
                self.forget_log(*key);
            }
            tracing::warn!(
                partitions = gone.len(),
                "topic partitions disappeared; will re-read them from the beginning when they return"
            );
            if tpl.count() > 0
                && let Err(e) = self.consumer.incremental_unassign(&tpl)
            {
                tracing::warn!("unassign: {e}");
            }
        }
        if !new.is_empty() {
            self.assign(&new);
        }
        // Partitions that were assigned but not read yet still show up in the status.
        let mut positions = self.sinks.status.partitions.lock();
        for (key, part) in &self.assigned {
            positions.entry(*key).or_insert(PartitionPosition {
                next: part.shown_next(),
                high: -1,
            });
        }
        self.sinks.status.advance_replay(&positions);
    }

    /// Drops a partition whose log is gone (its topic vanished, or the log was recreated): its
    /// topic is read from the beginning when the partition is assigned again, its old position
    /// is no longer shown, and it no longer counts for the start-up replay.
    fn forget_log(&mut self, key: Key) {
        self.assigned.remove(&key);
        self.recreated.insert(key.0);
        self.sinks.status.partitions.lock().remove(&key);
        self.sinks.status.replay.lock().forget(key);
    }

    /// Assigns the unverified partitions whose topics answer settled: each resumes at its
    /// position when its log still holds the last message read, and is read again from the
    /// start when the log was recreated (it holds another message there, or ends before the
    /// position). Partitions of unsettled topics wait for a later answer: assigned blind, a
    /// recreated log would sit unread until it passed the old position and then be read
    /// from there, its first events never counted. False when the assignment failed (tried
    /// again at the next discover).
    fn resume_unverified(&mut self, listing: &[Listed; 4]) -> bool {
        let ready: Vec<(Key, i64, Option<Fingerprint>)> = self
            .assigned
            .iter()
            .filter(|((k, p), part)| {
                part.on_client == OnClient::Unverified
                    && matches!(listing[*k], Listed::Partitions(_))
                    && !listing[*k].vanished(*p)
            })
            .map(|(key, part)| (*key, part.next, part.last))
            .collect();
        if ready.is_empty() {
            return true;
        }
        let (intact, recreated) = self.logs_still_holding(&ready);
        // Only without an answer from the probe is the broker's "latest" offset asked (tansu's
        // can lag the log), for all such partitions in one request.
        let unproven: Vec<Key> = ready
            .iter()
            .map(|(key, _, _)| *key)
            .filter(|key| !intact.contains(key) && !recreated.contains(key))
            .collect();
        let latest = self.latest_offsets(&unproven);
        let mut live = TopicPartitionList::new();
        let mut intact_keys = Vec::new();
        for (key, next, _) in &ready {
            let topic = self.cfg.topics[key.0].clone();
            let ends_before = matches!(latest.get(key), Some(&high) if high < *next);
            if recreated.contains(key) || ends_before {
                tracing::warn!(
                    %topic,
                    partition = key.1,
                    next = *next,
                    "the log no longer holds what was read: recreated while the broker was away; will re-read it from the beginning"
                );
                self.forget_log(*key);
            } else {
                let _ = live.add_partition_offset(&topic, key.1, Offset::Offset(*next));
                intact_keys.push(*key);
            }
        }
        self.repositioned = Some(Instant::now());
        if let Err(e) = self.consumer.incremental_assign(&live) {
            // The partitions stay unverified with their positions: nothing is re-read from
            // the start, and nothing is left unread. Nothing else is assigned meanwhile, or
            // the retry would ask for partitions the client already has.
            tracing::warn!("assign on the fresh client: {e}; retrying");
            return false;
        }
        for key in intact_keys {
            if let Some(part) = self.assigned.get_mut(&key) {
                part.on_client = OnClient::Yes;
            }
        }
        true
    }

    /// Which of `positions` (partition, next offset to read, last message read) still hold
    /// that message (`.0`), and which hold another one at its offset (`.1`: the log was
    /// recreated), found by fetching it with a short-lived client. This is the exact test:
    /// tansu's ListOffsets "latest" answer can lag the log by a batch, it answers a fetch past
    /// the end with nothing rather than out-of-range, and a log recreated while the broker was
    /// away may already have grown past the old position. Without a fingerprint (nothing read
    /// in this run) any message at or after the one before the position counts as intact.
    /// Partitions not answered within `PROBE_WAIT` are in neither set (the caller then asks
    /// for the watermarks).
    fn logs_still_holding(
        &self,
        positions: &[(Key, i64, Option<Fingerprint>)],
    ) -> (HashSet<Key>, HashSet<Key>) {
        let mut found = HashSet::new();
        let mut recreated = HashSet::new();
        let mut tpl = TopicPartitionList::new();
        for ((k, p), next, last) in positions {
            let at = last.map_or(next - 1, |f| f.offset);
            if *next == 0 {
                found.insert((*k, *p)); // nothing read: nothing to lose or repeat
            } else if let Err(e) =
                tpl.add_partition_offset(&self.cfg.topics[*k], *p, Offset::Offset(at))
            {
                tracing::debug!("probe offset: {e}");
            }
        }
        if tpl.count() == 0 {
            return (found, recreated);
        }
        let mut config = consumer_config(&self.cfg.brokers, svc_kit::kafka::settings());
        config
            .set("client.id", "consumer-svc-position-probe")
            // A position before the log start (retention) is an error here, not a reset.
            .set("auto.offset.reset", "error")
            .set("statistics.interval.ms", "0");
        let probe: BaseConsumer = match config.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("position probe: {}", svc_kit::kafka::describe_error(&e));
                return (found, recreated);
            }
        };
        if let Err(e) = probe.assign(&tpl) {
            tracing::warn!("position probe: {e}");
            return (found, recreated);
        }
        let deadline = Instant::now() + PROBE_WAIT;
        let wanted = positions.len();
        while found.len() + recreated.len() < wanted && Instant::now() < deadline {
            match probe.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let Some(k) = kind_of(&self.cfg.topics, m.topic()) else {
                        continue;
                    };
                    let key = (k, m.partition());
                    if found.contains(&key) || recreated.contains(&key) {
                        continue;
                    }
                    let Some((_, next, last)) = positions.iter().find(|(p, _, _)| *p == key) else {
                        continue;
                    };
                    match last {
                        Some(f) if m.offset() == f.offset && Fingerprint::of(&m) == *f => {
                            found.insert(key);
                        }
                        // Another message where ours was, or ours gone from before it.
                        Some(_) => {
                            recreated.insert(key);
                        }
                        None if m.offset() >= next - 1 => {
                            found.insert(key);
                        }
                        None => {}
                    }
                }
                Some(Err(e)) => tracing::debug!("position probe: {e}"),
                None => {}
            }
        }
        (found, recreated)
    }

    /// Swaps in a fresh librdkafka client while the broker is unreachable. A broker that comes
    /// back empty (tansu `memory://`) recreates topics with new topic ids: a client created
    /// after the outage never saw the old ids, and starts with no fetch state of logs that are
    /// gone. (The SIGSEGV such a client could hit in librdkafka 2.12, on a Fetch leader hint
    /// with a zero topic id, is patched: vendor/README.md.)
    fn replace_client(&mut self, cause: &dyn std::fmt::Display) {
        match new_client(&self.cfg, &self.sinks, &self.brokers_down) {
            Ok(fresh) => {
                tracing::warn!(
                    "broker unreachable ({cause}); replaced the Kafka client, positions kept"
                );
                self.consumer = fresh;
                self.client_replaced = true;
            }
            Err(e) => tracing::warn!(
                "cannot create a fresh Kafka client: {}",
                svc_kit::kafka::describe_error(&e)
            ),
        }
    }

    /// Assigns `new` partitions from their first offset; those of the timestamp strategy
    /// probe their first message (see the module documentation).
    fn assign(&mut self, new: &[(usize, i32)]) {
        let mut tpl = TopicPartitionList::new();
        for &(k, p) in new {
            let topic = &self.cfg.topics[k];
            let probe =
                !self.recreated.contains(&k) && self.cfg.replay_seek == ReplaySeek::Timestamp;
            tracing::info!(%topic, partition = p, "assigning partition from its first offset");
            if let Err(e) = tpl.add_partition_offset(topic, p, FIRST) {
                tracing::warn!("partition offset: {e}");
                continue;
            }
            self.assigned.insert((k, p), Partition::from_start(probe));
        }
        self.repositioned = Some(Instant::now());
        if let Err(e) = self.consumer.incremental_assign(&tpl) {
            tracing::warn!("assign: {e}");
            for key in new {
                self.assigned.remove(key);
            }
        }
    }

    /// Moves `parts`, whose logs start before the window, forward to the broker's offset for
    /// `target_ms` when that is ahead of what has been read; the move is verified on the
    /// first message read there.
    fn seek_to_cutoff(&mut self, parts: &[(usize, i32)], target_ms: i64) {
        for ((k, p), offset) in self.replay_starts(parts, target_ms) {
            let Some(part) = self.assigned.get(&(k, p)) else {
                continue;
            };
            let Some(verify) = cutoff_seek(part, offset, target_ms) else {
                continue; // already read that far
            };
            tracing::info!(
                topic = %self.cfg.topics[k],
                partition = p,
                from = part.next,
                to = offset,
                "log starts before the window; seeking to the cutoff time"
            );
            self.reassign_at((k, p), offset, Some(verify));
        }
    }

    /// Where the window starts in each of `parts` (to be verified): the first and last
    /// offsets of every partition and the offsets for `target_ms`, as three list-offsets
    /// requests sent at once (one round trip, instead of two per partition with
    /// `fetch_watermarks`). Partitions without a usable answer are left out.
    fn replay_starts(&self, parts: &[(usize, i32)], target_ms: i64) -> Vec<((usize, i32), i64)> {
        let mut out = Vec::new();
        let list = |at: Offset| self.list_offsets(parts, at);
        let (low, high, at_cutoff) = std::thread::scope(|s| {
            let low = s.spawn(|| list(Offset::Beginning));
            let high = s.spawn(|| list(Offset::End));
            let at_cutoff = list(Offset::Offset(target_ms));
            (low.join(), high.join(), at_cutoff)
        });
        let (Ok(Ok(low)), Ok(Ok(high)), answers) = (low, high, at_cutoff) else {
            tracing::info!(
                partitions = parts.len(),
                "watermarks unavailable; reading on from the earliest offset"
            );
            return out;
        };
        let answers = match answers {
            Ok(list) => list,
            Err(e) => {
                tracing::info!(
                    partitions = parts.len(),
                    "offsets_for_times failed ({e}); reading on from the earliest offset"
                );
                return out;
            }
        };
        for &(k, p) in parts {
            let topic = &self.cfg.topics[k];
            let (Some(l), Some(h)) = (offset_in(&low, topic, p), offset_in(&high, topic, p)) else {
                continue;
            };
            let answer = answers.find_partition(topic, p).map(|e| e.offset());
            if let Some(offset) = replay_start(topic, p, answer, (l, h)) {
                out.push(((k, p), offset));
            }
        }
        out
    }

    /// Reads `key` from `offset` on (dropping what was fetched from the old position).
    fn reassign_at(&mut self, key: (usize, i32), offset: i64, verify: Option<Verify>) {
        let topic = self.cfg.topics[key.0].clone();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, key.1);
        self.repositioned = Some(Instant::now());
        if let Err(e) = self.consumer.incremental_unassign(&tpl) {
            tracing::warn!("unassign: {e}");
        }
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&topic, key.1, Offset::Offset(offset))
            .is_ok()
        {
            match self.consumer.incremental_assign(&tpl) {
                Ok(()) => {
                    let last = self.assigned.get(&key).and_then(|p| p.last);
                    self.assigned
                        .insert(key, Partition::moved_to(offset, verify, last));
                }
                Err(e) => {
                    // Kept with its position: the next discover assigns it there again
                    // (forgetting it would read it again from the start).
                    tracing::warn!("assign: {e}; retrying at the next discover");
                    if let Some(part) = self.assigned.get_mut(&key) {
                        part.next = offset;
                        part.verify = None;
                        part.on_client = OnClient::Retry;
                    }
                }
            }
        }
    }
}

/// The kind index of the topic named `name` among `topics` (indexed by `EventKind::index()`).
fn kind_of(topics: &[String; 4], name: &str) -> Option<usize> {
    topics.iter().position(|t| t == name)
}

/// What one metadata answer says about a topic.
#[derive(Clone, Debug, PartialEq)]
enum Listed {
    /// Listed, with these partitions.
    Partitions(Vec<i32>),
    /// Not there: absent from the answer, or named with "unknown topic".
    Missing,
    /// Named with another error (e.g. no leader during an election), or listed without any
    /// partition (no topic has none; a broker still creating it): nothing can be concluded,
    /// so its partitions are neither dropped nor added. `None`: no error code.
    Unsettled(Option<RDKafkaErrorCode>),
}

impl Listed {
    /// From the topic's entry in the answer, if any: its error and its partitions.
    fn of(entry: Option<(Option<RDKafkaErrorCode>, Vec<i32>)>) -> Self {
        match entry {
            None => Listed::Missing,
            Some((None, partitions)) if partitions.is_empty() => Listed::Unsettled(None),
            Some((None, partitions)) => Listed::Partitions(partitions),
            Some((
                Some(
                    RDKafkaErrorCode::UnknownTopicOrPartition
                    | RDKafkaErrorCode::UnknownTopic
                    | RDKafkaErrorCode::UnknownTopicId,
                ),
                _,
            )) => Listed::Missing,
            Some((Some(code), _)) => Listed::Unsettled(Some(code)),
        }
    }

    fn partitions(&self) -> &[i32] {
        match self {
            Listed::Partitions(ps) => ps,
            _ => &[],
        }
    }

    /// Whether `partition` is known to be gone.
    fn vanished(&self, partition: i32) -> bool {
        match self {
            Listed::Partitions(ps) => !ps.contains(&partition),
            Listed::Missing => true,
            Listed::Unsettled(_) => false,
        }
    }
}

/// Partitions to drop (known to be gone) and to add (listed, not assigned), sorted.
fn partition_changes(
    listing: &[Listed; 4],
    assigned: impl Iterator<Item = Key>,
) -> (Vec<Key>, Vec<Key>) {
    let assigned: HashSet<Key> = assigned.collect();
    let mut gone: Vec<_> = assigned
        .iter()
        .filter(|(k, p)| listing[*k].vanished(*p))
        .copied()
        .collect();
    let mut new: Vec<_> = listing
        .iter()
        .enumerate()
        .flat_map(|(k, l)| l.partitions().iter().map(move |p| (k, *p)))
        .filter(|key| !assigned.contains(key))
        .collect();
    gone.sort_unstable();
    new.sort_unstable();
    (gone, new)
}

/// Where the window starts in a partition, given the broker's `offsets_for_times` answer and
/// the partition's watermarks: one message before the answer, to be verified (see the module
/// documentation); `None` when the answer is unusable or names the start of the log.
fn replay_start(
    topic: &str,
    partition: i32,
    answer: Option<Offset>,
    (low, high): (i64, i64),
) -> Option<i64> {
    let resolved = match answer {
        Some(Offset::Offset(o)) if (low..=high).contains(&o) => o,
        Some(Offset::End) => high,
        other => {
            tracing::info!(
                topic,
                partition,
                ?other,
                low,
                high,
                "unusable offsets_for_times answer; reading on from the earliest offset"
            );
            return None;
        }
    };
    (resolved > low).then_some(resolved - 1)
}

/// The seek of `part` to `offset`, the broker's start of the window for `target_ms`, to be
/// verified on the first message read there (older than `target_ms`, or reading resumes where
/// it was); `None` when `part` has read that far already.
fn cutoff_seek(part: &Partition, offset: i64, target_ms: i64) -> Option<Verify> {
    (offset > part.next).then_some(Verify {
        offset,
        before_ms: target_ms,
        resume: part.next,
    })
}

/// The Kafka timestamp (ms) before which a message is older than the window, minus `slack`
/// (producer clocks differ).
fn seek_target_ms(state: &RwLock<State>, slack: Duration) -> i64 {
    let cutoff = state.read().cutoff_at(now_micros()) / 1000;
    cutoff - slack.as_millis() as i64
}

/// What a batch asks of the partitions after it is applied.
#[derive(Default)]
struct Moves {
    /// Logs that start before the window: look up the cutoff offset, seek forward.
    seek: Vec<(usize, i32)>,
    /// The target the first messages were compared with; computed only when one was probed.
    target_ms: Option<i64>,
    /// Failed seek verifications: resume reading at the offset.
    resume: Vec<((usize, i32), i64)>,
}

/// The offset a ListOffsets answer gives `topic`/`p`, if it gives one without an error.
fn offset_in(list: &TopicPartitionList, topic: &str, p: i32) -> Option<i64> {
    list.find_partition(topic, p)
        .filter(|e| e.error().is_ok())
        .and_then(|e| match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        })
}

/// When the next check for skipped offsets is due while messages keep coming (an empty poll
/// checks anyway, and counts as one).
#[derive(Debug)]
struct SkipCheck {
    last: Instant,
}

impl SkipCheck {
    fn new(now: Instant) -> Self {
        Self { last: now }
    }

    /// A check was made at `now`.
    fn done(&mut self, now: Instant) {
        self.last = now;
    }

    /// Whether a check is due at `now`, after a batch; if so it counts as made.
    fn due(&mut self, now: Instant) -> bool {
        let due = now.saturating_duration_since(self.last) >= SKIPPED_CHECK_INTERVAL;
        if due {
            self.done(now);
        }
        due
    }
}

/// Whether librdkafka's application positions can be trusted at `now`, the last assignment or
/// move having been made at `repositioned` (if any).
fn settled(repositioned: Option<Instant>, now: Instant) -> bool {
    repositioned.is_none_or(|t| now.saturating_duration_since(t) >= REPOSITION_SETTLE)
}

/// What librdkafka's application position `at`, past offsets it did not deliver, means for a
/// partition whose timestamp seek is `verify` (if any).
#[derive(Debug, PartialEq)]
enum AfterSkip {
    /// No seek to verify: the shown position may follow.
    Follow,
    /// The seek's verifying message is still to come: nothing moves.
    Wait,
    /// The offset to verify was passed without a message there (the seek landed on a
    /// transaction marker): the seek cannot be checked, so it is undone as a failed check is,
    /// reading on from where it was; never trusted.
    Undo(Verify),
}

fn after_skip(verify: Option<Verify>, at: i64) -> AfterSkip {
    match verify {
        None => AfterSkip::Follow,
        Some(v) if at > v.offset => AfterSkip::Undo(v),
        Some(_) => AfterSkip::Wait,
    }
}

/// Whether librdkafka's application position `at` moves the shown position `pos` forward:
/// only ahead of what was read, and never past the end the broker reported (a position
/// beyond it would be one left over from a longer, earlier log).
fn skipped_to(pos: &PartitionPosition, at: i64) -> bool {
    at > pos.next && pos.high >= 0 && at <= pos.high
}

/// One polled batch, parsed: what applying it needs.
struct Parsed {
    /// Receive time of the batch (event-time clamp and expiry).
    now: Micros,
    /// Parsed events with their topic index, in the order received.
    events: Vec<(usize, events::Event)>,
    /// Next offset of each partition the batch touched.
    positions: Vec<((usize, i32), i64)>,
    /// Messages that failed to parse, per topic.
    errors: [u64; 4],
}

/// Whether a partition's first record, stamped `record_ms`, shows the log holding events from
/// before the window (`target`): then it is worth jumping ahead. A record time of 0 or less is
/// no time (as for event times, `events::event_time`): a producer stamping its records 0 would
/// otherwise make the jump skip, by the broker's record times, events that a replica reading
/// live keeps by their payload times.
fn predates_window(record_ms: Option<i64>, target: i64) -> bool {
    record_ms.is_some_and(|t| t > 0 && t < target)
}

/// Parses one batch of borrowed messages; returns it with what the partitions need next.
fn parse_batch<M: Message>(
    cfg: &IngestConfig,
    assigned: &mut foldhash::HashMap<(usize, i32), Partition>,
    error_logs: &[LogBudget; 4],
    msgs: &[M],
    target_ms: impl Fn() -> i64,
) -> (Parsed, Moves) {
    let now = now_micros();
    let mut moves = Moves::default();
    let mut errors = [0u64; 4];
    let mut parsed = Vec::with_capacity(msgs.len());
    let mut positions: Vec<((usize, i32), i64)> = Vec::new();
    // The last message read of each partition touched (its index in `msgs`).
    let mut lasts: Vec<((usize, i32), usize)> = Vec::new();
    // Messages come in runs of one partition: remember the last one's topic and index.
    let mut last_topic: Option<(&str, usize)> = None;
    for (i, m) in msgs.iter().enumerate() {
        let topic = m.topic();
        let k = match last_topic {
            Some((t, k)) if t == topic => k,
            _ => {
                let Some(k) = kind_of(&cfg.topics, topic) else {
                    continue;
                };
                last_topic = Some((topic, k));
                k
            }
        };
        let key = (k, m.partition());
        if moves.resume.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let Some(part) = assigned.get_mut(&key) else {
            continue; // a stale message of a partition just dropped
        };
        if std::mem::take(&mut part.probe) {
            let target = *moves.target_ms.get_or_insert_with(&target_ms);
            if predates_window(m.timestamp().to_millis(), target) {
                moves.seek.push(key);
            }
        }
        if let Some(v) = part.verify.take() {
            let ts = m.timestamp().to_millis();
            if m.offset() != v.offset || ts.is_some_and(|t| t >= v.before_ms) {
                tracing::warn!(
                    topic,
                    partition = m.partition(),
                    expected = v.offset,
                    got = m.offset(),
                    ?ts,
                    before_ms = v.before_ms,
                    resume = v.resume,
                    "the broker's offset for the cutoff time was not verified; reading this partition on from where it was"
                );
                moves.resume.push((key, v.resume));
                continue;
            }
        }
        part.next = m.offset() + 1;
        match positions.last_mut() {
            Some((last, next)) if *last == key => *next = part.next,
            _ => match positions.iter_mut().find(|(p, _)| *p == key) {
                Some((_, next)) => *next = part.next,
                None => positions.push((key, part.next)),
            },
        }
        match lasts.last_mut() {
            Some((last, at)) if *last == key => *at = i,
            _ => match lasts.iter_mut().find(|(p, _)| *p == key) {
                Some((_, at)) => *at = i,
                None => lasts.push((key, i)),
            },
        }
        let kind = EventKind::ALL[k];
        let arrival = events::Arrival {
            now,
            record_time: m.timestamp().to_millis().map(|ms| ms.saturating_mul(1000)),
            position: Some((m.partition(), m.offset())),
        };
        match events::parse(kind, m.payload().unwrap_or_default(), arrival) {
            Ok(event) => {
                if let events::Event::RoutingDecision(d) = &event
                    && d.dropped_alternatives > 0
                    && error_logs[k].may_log(Instant::now()).is_some()
                {
                    tracing::warn!(
                        topic,
                        partition = m.partition(),
                        offset = m.offset(),
                        dropped = d.dropped_alternatives,
                        "kept a routing decision without its unusable alternatives (not an \
                         object, no agent or a field of the wrong type)"
                    );
                }
                parsed.push((k, event))
            }
            Err(e) => {
                errors[k] += 1;
                if error_logs[k].may_log(Instant::now()).is_some() {
                    tracing::warn!(
                        topic,
                        partition = m.partition(),
                        offset = m.offset(),
                        "skipping an invalid event: {e}"
                    );
                }
            }
        }
    }
    // One digest per partition and batch, not per message.
    for (key, i) in lasts {
        if let Some(part) = assigned.get_mut(&key) {
            part.last = Some(Fingerprint::of(&msgs[i]));
        }
    }
    (
        Parsed {
            now,
            events: parsed,
            positions,
            errors,
        },
        moves,
    )
}

/// Whether a count went from `before` to `after` past 1, 10, 100, ...: a warning on each
/// such step is logged a bounded number of times whatever the rate.
fn crossed_power_of_ten(before: u64, after: u64) -> bool {
    after > before && (before == 0 || after.ilog10() > before.ilog10())
}

/// Applies one parsed batch under a single state lock and publishes it.
fn apply_parsed(cfg: &IngestConfig, sinks: &Sinks, batch: Parsed) {
    let Parsed {
        now,
        events,
        positions: touched,
        errors,
    } = batch;
    let mut consumed = [0u64; 4];
    let mut expired = [0u64; 4];
    let mut newest = [i64::MIN; 4];
    let mut applied = Vec::with_capacity(if cfg.publish { events.len() } else { 0 });
    // Held until the batch is published: a snapshot taken under the read lock then holds
    // exactly the updates up to the hub's last sequence.
    let mut state = sinks.state.write();
    let untracked_before = state.agent_events_untracked();
    for (k, event) in events {
        match state.apply(&event, now) {
            Applied::Aggregated(agent) => {
                // Only a tracked agent (within --max-agents) has metrics to push.
                let tracked = agent.is_some();
                consumed[k] += 1;
                newest[k] = newest[k].max(event.time());
                if cfg.publish {
                    applied.push((event, tracked));
                }
            }
            Applied::Expired => expired[k] += 1,
        }
    }
    let untracked = state.agent_events_untracked();
    if crossed_power_of_ten(untracked_before, untracked) {
        tracing::warn!(
            untracked,
            max_agents = state.config().max_agents,
            "events of agents beyond --max-agents, or with names over 256 bytes, get no agent \
             metrics (logged at 1, 10, 100, ... such events)"
        );
    }
    {
        // Positions now; high watermarks come from librdkafka's statistics (what we have read
        // is a lower bound meanwhile). discover() lists every assigned partition and removes
        // those that vanished; a position never brings one back.
        let mut positions = sinks.status.partitions.lock();
        for (key, next) in touched {
            if let Some(pos) = positions.get_mut(&key) {
                pos.next = next;
                pos.high = pos.high.max(next);
            }
        }
        sinks.status.advance_replay(&positions);
    }
    for k in 0..4 {
        let c = &sinks.status.counters[k];
        if consumed[k] > 0 {
            c.consumed.fetch_add(consumed[k], Ordering::Relaxed);
            c.last_event.fetch_max(newest[k], Ordering::Relaxed);
        }
        if errors[k] > 0 {
            c.parse_errors.fetch_add(errors[k], Ordering::Relaxed);
        }
        if expired[k] > 0 {
            c.expired.fetch_add(expired[k], Ordering::Relaxed);
        }
    }
    if cfg.publish && !applied.is_empty() {
        {
            let mut set = sinks.dirty_agents.lock();
            let mut last: Option<&str> = None;
            for (e, _) in applied.iter().filter(|(_, tracked)| *tracked) {
                let agent = match e {
                    events::Event::RoutingDecision(d) => d.selected_agent(),
                    events::Event::AgentAction(a) => a.agent_name(),
                    _ => continue,
                };
                if last != Some(agent) && !set.contains(agent) {
                    set.insert(agent.to_owned());
                }
                last = Some(agent);
            }
        }
        sinks
            .hub
            .publish(applied.into_iter().map(|(e, _)| UpdateKind::Event(e)));
    }
    drop(state);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_change_the_tuning_but_not_what_ingest_relies_on() {
        let setting = |key: &str, value: &str| svc_kit::kafka::KafkaSetting {
            key: key.into(),
            value: value.into(),
        };
        let defaults = consumer_config("b:9092", &[]);
        assert_eq!(defaults.get("fetch.wait.max.ms"), Some("20"));
        let operator = [
            setting("fetch.wait.max.ms", "5"),
            setting("security.protocol", "SSL"),
            setting("enable.auto.commit", "true"),
            setting("group.id", "theirs"),
            setting("auto.offset.reset", "latest"),
            setting("bootstrap.servers", "elsewhere:9092"),
        ];
        let c = consumer_config("b:9092", &operator);
        assert_eq!(c.get("fetch.wait.max.ms"), Some("5"));
        assert_eq!(c.get("security.protocol"), Some("SSL"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("group.id"), Some("consumer-svc-unused"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("bootstrap.servers"), Some("b:9092"));
    }

    #[test]
    fn warnings_step_by_powers_of_ten() {
        let steps: Vec<(u64, u64)> = vec![
            (0, 1),
            (1, 9),
            (9, 10),
            (10, 99),
            (99, 250),
            (250, 251),
            (5, 5),
            (0, 0),
        ];
        let logged: Vec<bool> = steps
            .iter()
            .map(|&(b, a)| crossed_power_of_ten(b, a))
            .collect();
        assert_eq!(
            logged,
            [true, false, true, false, true, false, false, false]
        );
    }

    #[test]
    fn a_seek_whose_offset_was_skipped_is_undone() {
        let v = Verify {
            offset: 40,
            before_ms: 0,
            resume: 7,
        };
        assert_eq!(after_skip(None, 41), AfterSkip::Follow);
        assert_eq!(after_skip(Some(v), 40), AfterSkip::Wait, "not passed yet");
        assert_eq!(
            after_skip(Some(v), -1001),
            AfterSkip::Wait,
            "no position yet"
        );
        // The marker at 40 was passed without a message: back to 7, not on from 41.
        match after_skip(Some(v), 41) {
            AfterSkip::Undo(u) => assert_eq!((u.offset, u.resume), (40, 7)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn skipped_offsets_move_a_position_only_forward_and_within_the_log() {
        let at = |next, high| PartitionPosition { next, high };
        // A commit marker at offset 40 ends the log (high watermark 41).
        assert!(skipped_to(&at(40, 41), 41));
        // Nothing read yet, a log of aborted events and their marker only.
        assert!(skipped_to(&at(-1, 12), 12));
        assert!(!skipped_to(&at(41, 41), 41), "already there");
        assert!(!skipped_to(&at(41, 50), 30), "behind what was read");
        assert!(!skipped_to(&at(0, 5), 900), "left over from a longer log");
        assert!(!skipped_to(&at(0, -1), 3), "end not reported yet");
    }

    /// A partition whose log ends with a transaction marker looks read only once its position
    /// is checked; that check came only after an empty poll, which never comes while any
    /// other partition delivers a message every 100 ms. It is also due after a batch now.
    #[test]
    fn skipped_offsets_are_checked_while_messages_keep_coming() {
        let start = Instant::now();
        let ms = |n| start + Duration::from_millis(n);
        let mut check = SkipCheck::new(start);
        // A batch every 20 ms, never an empty poll.
        let due: Vec<u64> = (1..=40)
            .map(|i| i * 20)
            .filter(|&t| check.due(ms(t)))
            .collect();
        assert_eq!(due, [260, 520, 780], "at most every SKIPPED_CHECK_INTERVAL");
        // An empty poll checks, and the next check after a batch waits a full interval again.
        check.done(ms(900));
        assert!(!check.due(ms(1100)));
        assert!(check.due(ms(1150)));
        // A clock reading older than the last check is not due (no underflow).
        assert!(!check.due(start));
    }

    #[test]
    fn positions_are_not_trusted_right_after_a_partition_moved() {
        let start = Instant::now();
        assert!(settled(None, start), "nothing moved");
        assert!(!settled(Some(start), start));
        assert!(!settled(Some(start), start + REPOSITION_SETTLE / 2));
        assert!(settled(Some(start), start + REPOSITION_SETTLE));
        // Moved "after" now (a check made before the move's time was read): not settled.
        assert!(!settled(Some(start + REPOSITION_SETTLE), start));
        // The settle time is shorter than the interval: a partition moved by a batch is
        // checked at the next due check, not one later.
        assert!(REPOSITION_SETTLE <= SKIPPED_CHECK_INTERVAL);
    }

    #[test]
    fn a_partition_that_has_read_nothing_shows_no_position() {
        let mut part = Partition::from_start(false);
        assert_eq!(part.shown_next(), -1);
        // Moved by a seek or a skip before any message: that position is known.
        part.next = 5_000_000;
        assert_eq!(part.shown_next(), 5_000_000);
        // A message read at offset 0.
        part.next = 1;
        part.last = Some(Fingerprint {
            offset: 0,
            digest: 7,
        });
        assert_eq!(part.shown_next(), 1);
    }

    #[test]
    fn the_replay_wait_can_be_given_up() {
        let status = IngestStatus::new(std::array::from_fn(|k| format!("t{k}")));
        status.replay.lock().begin([(0, 0)]);
        status
            .partitions
            .lock()
            .insert((0, 0), PartitionPosition { next: 3, high: 9 });
        status.advance_replay(&status.partitions.lock());
        assert!(status.replaying(), "no watermark yet");
        status.give_up_replay();
        assert!(!status.replaying());
        // The waiter is woken even though it was not waiting yet (a stored permit).
        assert!(
            futures::FutureExt::now_or_never(status.replay_over.notified()).is_some(),
            "no wake-up stored"
        );
    }

    #[test]
    fn only_a_missing_topic_loses_its_partitions() {
        use RDKafkaErrorCode as E;
        let listing = [
            // Listed with partitions 0 and 2 (1 is gone, 2 is new).
            Listed::of(Some((None, vec![0, 2]))),
            // Absent from the answer: deleted (a broker that restarted empty).
            Listed::of(None),
            // Named "unknown": deleted too.
            Listed::of(Some((Some(E::UnknownTopicOrPartition), vec![]))),
            // No leader during an election: nothing is concluded, nothing re-read later.
            Listed::of(Some((Some(E::LeaderNotAvailable), vec![]))),
        ];
        assert_eq!(listing[1], Listed::Missing);
        assert_eq!(listing[2], Listed::Missing);
        assert_eq!(listing[3], Listed::Unsettled(Some(E::LeaderNotAvailable)));
        // Listed without partitions: unsettled too, not emptied.
        assert_eq!(Listed::of(Some((None, vec![]))), Listed::Unsettled(None));
        let assigned = [(0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (3, 1)];
        let (gone, new) = partition_changes(&listing, assigned.into_iter());
        assert_eq!(gone, vec![(0, 1), (1, 0), (2, 0)]);
        assert_eq!(new, vec![(0, 2)]);
        // Nothing assigned yet: every listed partition is new, an unsettled topic adds none.
        let (gone, new) = partition_changes(&listing, std::iter::empty());
        assert!(gone.is_empty());
        assert_eq!(new, vec![(0, 0), (0, 2)]);
    }

    #[test]
    fn only_a_real_record_time_before_the_window_makes_a_partition_jump() {
        let target = 1_700_000_000_000;
        assert!(predates_window(Some(target - 1), target));
        assert!(!predates_window(Some(target), target));
        assert!(!predates_window(None, target));
        for no_time in [0, -1, -5] {
            assert!(!predates_window(Some(no_time), target), "{no_time}");
        }
    }

    #[test]
    fn parse_errors_are_logged_at_most_ten_times_a_minute() {
        let start = Instant::now();
        let log = LogBudget::new(ERROR_LOGS_PER_MINUTE, Duration::from_secs(60));
        let allow = |at| log.may_log(at).is_some();
        let logged = (0..25).filter(|_| allow(start)).count();
        assert_eq!(logged, ERROR_LOGS_PER_MINUTE as usize);
        assert!(!allow(start + Duration::from_secs(59)));
        // A new minute, a new budget.
        let next = start + Duration::from_secs(60);
        assert_eq!((0..25).filter(|_| allow(next)).count(), 10);
        // A clock reading older than the window start does not reset it.
        assert!(!allow(start));
    }

    /// The timestamp seek's decisions, on one partition of 300 old records then 200 recent ones,
    /// with the broker's `offsets_for_times` answer stubbed: an answer placed after recent
    /// events (offset 450, or the end of the log) fails the verification, and the partition
    /// reads on from where it was: every recent event is read, once. A right answer (300) is
    /// followed: the old records between are never read. (tansu always answers the start of
    /// the log, so the end-to-end tests cannot place the cutoff wrongly.)
    #[test]
    fn a_cutoff_answer_placed_after_recent_events_loses_none_of_them() {
        use rdkafka::message::{OwnedMessage, Timestamp};
        const OLD: i64 = 300;
        const END: i64 = 500;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let hour = 3_600_000;
        // A 2 h window; the old records 4 h old, the recent ones 30 s apart up to now.
        let target_ms = now_ms - 2 * hour;
        let record_ms = |o: i64| {
            if o < OLD {
                now_ms - 4 * hour + o * 1000
            } else {
                now_ms - 30_000 * (END - o)
            }
        };
        let cfg = IngestConfig {
            brokers: String::new(),
            topics: EventKind::ALL.map(|k| k.default_topic().to_string()),
            replay_seek: ReplaySeek::Timestamp,
            seek_slack: Duration::ZERO,
            publish: false,
        };
        let k = EventKind::AgentAction.index();
        let key = (k, 0);
        let topic = cfg.topics[k].clone();
        let error_logs = std::array::from_fn(|_| LogBudget::new(10, Duration::from_secs(60)));
        // The events carry no time of their own: each takes its record's, which names it.
        let offset_of: HashMap<i64, i64> = (0..END).map(|o| (record_ms(o) * 1000, o)).collect();
        // One fetch of `offsets`: the offsets of the events parsed, and what the batch asks.
        let fetch = |assigned: &mut foldhash::HashMap<(usize, i32), Partition>,
                     offsets: std::ops::Range<i64>| {
            let msgs: Vec<OwnedMessage> = offsets
                .map(|o| {
                    let payload =
                        format!(r#"{{"id":"e{o}","agent_name":"a","action_type":"tool_call"}}"#);
                    OwnedMessage::new(
                        Some(payload.into_bytes()),
                        Some(b"k".to_vec()),
                        topic.clone(),
                        Timestamp::CreateTime(record_ms(o)),
                        0,
                        o,
                        None,
                    )
                })
                .collect();
            let (parsed, moves) = parse_batch(&cfg, assigned, &error_logs, &msgs, || target_ms);
            let read: Vec<i64> = parsed
                .events
                .iter()
                .map(|(_, e)| offset_of[&e.time()])
                .collect();
            (read, moves)
        };
        for (answer, followed) in [
            (Offset::Offset(450), false),
            (Offset::End, false),
            (Offset::Offset(OLD), true),
        ] {
            let mut assigned = foldhash::HashMap::default();
            assigned.insert(key, Partition::from_start(true));
            // The first fetch, from offset 0: an old record, so the cutoff is looked up.
            let (mut read, moves) = fetch(&mut assigned, 0..50);
            assert_eq!(moves.seek, [key], "{answer:?}");
            assert_eq!(moves.target_ms, Some(target_ms));
            let start = replay_start(&topic, 0, Some(answer), (0, END)).expect("a usable answer");
            let verify = cutoff_seek(&assigned[&key], start, target_ms).expect("ahead of 50");
            let last = assigned[&key].last;
            assigned.insert(key, Partition::moved_to(start, Some(verify), last));
            let (there, moves) = fetch(&mut assigned, start..END);
            if followed {
                assert!(moves.resume.is_empty(), "{answer:?}: verified");
                read.extend(there);
            } else {
                assert_eq!(
                    moves.resume,
                    [(key, 50)],
                    "{answer:?}: back to where it was"
                );
                assert!(
                    there.is_empty(),
                    "{answer:?}: nothing read there is applied"
                );
                let last = assigned[&key].last;
                assigned.insert(key, Partition::moved_to(50, None, last));
                let (rest, moves) = fetch(&mut assigned, 50..END);
                assert!(moves.seek.is_empty() && moves.resume.is_empty());
                read.extend(rest);
            }
            let want: Vec<i64> = if followed {
                (0..50).chain(OLD - 1..END).collect()
            } else {
                (0..END).collect()
            };
            assert_eq!(
                read, want,
                "{answer:?}: each offset read once, every recent one"
            );
        }
    }

    #[test]
    fn the_window_starts_one_message_before_the_brokers_answer() {
        let at = |answer| replay_start("t", 0, answer, (10, 100));
        assert_eq!(at(Some(Offset::Offset(50))), Some(49));
        assert_eq!(at(Some(Offset::Offset(100))), Some(99));
        assert_eq!(at(Some(Offset::End)), Some(99), "nothing in the window yet");
        // The start of the log, or an answer outside it: read on from where we are.
        assert_eq!(at(Some(Offset::Offset(10))), None);
        assert_eq!(at(Some(Offset::Offset(5))), None);
        assert_eq!(at(Some(Offset::Offset(101))), None);
        assert_eq!(at(Some(Offset::Beginning)), None);
        assert_eq!(at(None), None);
    }
}
