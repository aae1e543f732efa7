//! Helpers for the event-bus tests: per-test request/reply topics, db-svc started with its bus
//! worker on them, a raw producer (OmniClaude-style), and a tap that reads every reply.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bus_protocol::Topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;

use crate::{ServiceProcess, ServiceSpec, TestDatabase, TestTopics, kafka_brokers};

/// Partitions of each test topic (so concurrency and replicas are exercised).
pub const PARTITIONS: i32 = 3;

/// The four database topics of one test.
pub struct BusTopics {
    pub topics: Topics,
    /// The broker they are on.
    pub brokers: String,
    names: TestTopics,
}

const BUS_TOPICS: [&str; 4] = ["db.requested", "db.completed", "db.failed", "db.dlq"];

impl BusTopics {
    pub async fn create() -> Result<Self> {
        Self::create_on(&kafka_brokers()).await
    }

    /// The same topics on the broker at `brokers` (e.g. a private one).
    pub async fn create_on(brokers: &str) -> Result<Self> {
        let prefix = TestTopics::fresh_prefix();
        let names = TestTopics::create_on(brokers, &prefix, &BUS_TOPICS, PARTITIONS).await?;
        Ok(Self::with_names(brokers.to_string(), names))
    }

    /// Creates the same topic names again (after a broker restarted empty), keeping those that
    /// exist already (db-svc's producer may have had a reply topic auto-created first).
    pub async fn recreate(&self) -> Result<()> {
        self.recreate_with(PARTITIONS).await
    }

    /// [`BusTopics::recreate`] with `partitions` partitions per topic this time.
    pub async fn recreate_with(&self, partitions: i32) -> Result<()> {
        TestTopics::ensure_on(&self.brokers, &self.names.prefix, &BUS_TOPICS, partitions).await?;
        Ok(())
    }

    fn with_names(brokers: String, names: TestTopics) -> Self {
        let topics = Topics {
            request: names.name("db.requested"),
            completed: names.name("db.completed"),
            failed: names.name("db.failed"),
            dead_letter: names.name("db.dlq"),
        };
        Self {
            topics,
            brokers,
            names,
        }
    }

    /// db-svc flags that put its bus worker on these topics, in consumer group `group`.
    pub fn db_svc_args(&self, group: &str) -> Vec<String> {
        let t = &self.topics;
        [
            "--kafka-brokers",
            &self.brokers,
            "--request-topic",
            &t.request,
            "--completed-topic",
            &t.completed,
            "--failed-topic",
            &t.failed,
            "--dead-letter-topic",
            &t.dead_letter,
            "--bus-group-id",
            group,
            "--bus-session-timeout",
            "6s",
            "--shutdown-grace",
            "3s",
            // Not OmniClaude's 5 s: a request produced while a new worker still joins its
            // group (or, in the broker-restart test, while the group forms again) must not
            // time out on a loaded machine; the default's own test sends an old timestamp.
            "--bus-default-timeout",
            "10m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A publisher configuration for these topics.
    pub fn client_config(&self, timeout: Duration) -> omnibus_client::bus::BusConfig {
        let mut c = omnibus_client::bus::BusConfig::new(self.brokers.clone());
        c.topics = self.topics.clone();
        c.timeout = timeout;
        c
    }
}

/// Starts db-svc (bus worker on) against `db` and waits for SERVING.
pub async fn start_db_svc(
    db: &TestDatabase,
    topics: &BusTopics,
    group: &str,
    extra: &[&str],
) -> Result<ServiceProcess> {
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(topics.db_svc_args(group))
        .args(extra.iter().copied())
        .spawn()?;
    svc.wait_serving().await?;
    Ok(svc)
}

/// [`start_db_svc`] with `--shutdown-grace 1s` instead of the topics' 3 s, for the drain
/// tests: their bound (1 s of grace and at most 2 s for busy database connections) is then far
/// from both a loaded machine's slack and a drain that does not stop at the grace.
pub async fn start_db_svc_with_short_grace(
    db: &TestDatabase,
    topics: &BusTopics,
    group: &str,
) -> Result<ServiceProcess> {
    let mut args = topics.db_svc_args(group);
    let at = args
        .iter()
        .position(|a| a == "--shutdown-grace")
        .context("the test topics' db-svc sets --shutdown-grace")?;
    args[at + 1] = "1s".into();
    let mut svc = ServiceSpec::new("db-svc")
        .env("DATABASE_URL", &db.url)
        .args(args)
        .spawn()?;
    svc.wait_serving().await?;
    Ok(svc)
}

/// Waits for a db-svc of [`start_db_svc_with_short_grace`], sent SIGTERM at `started` with a
/// bus request still running, to exit: successfully, within its bound (with slack for a
/// loaded machine; a drain that waits for its requests would exceed it), cut short by the
/// grace given and not by some other bound.
pub async fn expect_drain_cut_by_grace(svc: &mut ServiceProcess, started: Instant) {
    let status = svc.wait_exit(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "{status:?}: {}", svc.logs());
    assert!(
        started.elapsed() < Duration::from_millis(8500),
        "exited after {:?}: {}",
        started.elapsed(),
        svc.logs()
    );
    assert!(
        svc.logs()
            .contains("bus requests still running after 1s (--shutdown-grace)"),
        "{}",
        svc.logs()
    );
}

/// A database, fresh bus topics on the shared broker and db-svc serving them in a group of
/// its own: the setup most bus tests start from.
pub async fn start_bus_worker() -> Result<(TestDatabase, BusTopics, ServiceProcess)> {
    let db = TestDatabase::create().await?;
    let topics = BusTopics::create().await?;
    let svc = start_db_svc(&db, &topics, &fresh_group(), &[]).await?;
    Ok((db, topics, svc))
}

/// Produces `payload` to `topic` as a Python client would: gzip, acks=all, optional key.
pub async fn produce(
    topic: &str,
    key: Option<&str>,
    payload: &[u8],
    compression: &str,
) -> Result<()> {
    produce_on(&kafka_brokers(), topic, key, payload, compression).await
}

/// [`produce`] to the broker at `brokers`.
pub async fn produce_on(
    brokers: &str,
    topic: &str,
    key: Option<&str>,
    payload: &[u8],
    compression: &str,
) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("compression.type", compression)
        .create()?;
    let mut record = FutureRecord::to(topic).payload(payload);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))?;
    Ok(())
}

/// A message read back from a topic.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub key: Option<String>,
    pub json: Value,
}

impl Received {
    /// Asserts a COMPLETED reply (on topic `completed`) of a write of `affected` rows, answered
    /// from the request log when `replayed`.
    pub fn assert_write_completed(&self, completed: &str, affected: u64, replayed: bool) {
        assert_eq!(self.topic, completed, "{self:?}");
        let payload = &self.json["payload"];
        assert_eq!(payload["rows_affected"], affected, "{self:?}");
        assert_eq!(
            payload["replayed"].as_bool().unwrap_or(false),
            replayed,
            "{self:?}"
        );
    }
}

/// Reads every message of some topics from the beginning (direct assignment, no group).
pub struct Tap {
    consumer: BaseConsumer,
    pub seen: Vec<Received>,
}

impl Tap {
    pub fn new(topics: &[&str]) -> Result<Self> {
        Self::new_on(&kafka_brokers(), topics)
    }

    /// A tap on the broker at `brokers`.
    pub fn new_on(brokers: &str, topics: &[&str]) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("tap-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        // Every partition the broker has, not only the PARTITIONS the test made: after a
        // broker restart db-svc's producer may have had a reply topic auto-created first,
        // with the broker's default count (tansu: 4), and a reply on partition 3 would go
        // unseen.
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            let partitions = metadata
                .topics()
                .first()
                .map_or(0, |t| t.partitions().len() as i32)
                .max(PARTITIONS);
            for p in 0..partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(Self {
            consumer,
            seen: Vec::new(),
        })
    }

    /// Polls for up to `wait`, collecting messages.
    pub fn poll_for(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(50)) {
                let json = m
                    .payload()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or(Value::Null);
                self.seen.push(Received {
                    topic: m.topic().to_string(),
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    json,
                });
            }
        }
    }

    /// Polls until `pred` holds for the collected messages, or fails after `timeout`.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !pred(&self.seen) {
            if Instant::now() >= deadline {
                bail!(
                    "timed out waiting for {what}; seen {} messages: {:#?}",
                    self.seen.len(),
                    self.seen
                );
            }
            self.poll_for(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Replies seen per correlation id.
    pub fn replies_by_correlation(&self) -> HashMap<String, Vec<&Received>> {
        let mut out: HashMap<String, Vec<&Received>> = HashMap::new();
        for r in &self.seen {
            if let Some(cid) = r.json["correlation_id"].as_str() {
                out.entry(cid.to_string()).or_default().push(r);
            }
        }
        out
    }

    /// The reply for `correlation_id`, waiting up to `timeout`.
    pub fn reply_for(&mut self, correlation_id: &str, timeout: Duration) -> Result<Received> {
        self.wait_until(timeout, &format!("a reply to {correlation_id}"), |seen| {
            seen.iter()
                .any(|r| r.json["correlation_id"] == correlation_id)
        })?;
        self.seen
            .iter()
            .find(|r| r.json["correlation_id"] == correlation_id)
            .cloned()
            .context("reply vanished")
    }
}

/// The OmniClaude request envelope (reference §4), exactly as its client builds it.
pub fn omniclaude_envelope(
    correlation_id: &str,
    operation_type: &str,
    entity: Option<&str>,
    query: &str,
    params: Value,
) -> Value {
    serde_json::json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "event_type": "DATABASE_QUERY_REQUESTED",
        "correlation_id": correlation_id,
        "timestamp": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
        "service": "omniclaude",
        "payload": {
            "operation_type": operation_type,
            "entity_type": entity,
            "query": query,
            "params": params,
            "filters": null,
            "limit": null,
            "offset": null,
        }
    })
}

/// A consumer-group name of its own for one test's db-svc.
pub fn fresh_group() -> String {
    format!("db-svc-{}", uuid::Uuid::new_v4().simple())
}

/// The count a `SELECT count(*) ...` gives on `db`.
pub async fn count_rows(db: &TestDatabase, sql: &str) -> i64 {
    let mut conn = db.connect().await;
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(&mut conn)
        .await
        .expect("count")
}

/// The sum of `group`'s committed offsets over `topic`'s partitions, once it reaches `want`
/// (or whatever it is after `within`).
pub fn committed_total(group: &str, topic: &str, want: i64, within: Duration) -> i64 {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", group)
        .create()
        .expect("a reader of committed offsets");
    let metadata = reader
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("the topic's metadata");
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let deadline = Instant::now() + within;
    loop {
        let offsets = reader
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .expect("committed offsets");
        let sum: i64 = offsets
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .sum();
        if sum >= want || Instant::now() > deadline {
            return sum;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
