//! Helpers for the consumer-svc end-to-end tests: starting the service on a test's topics,
//! producing events, polling its status, and a private tansu broker that a test may stop and
//! restart (never the shared one).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use omnibus_client::generate::{EventGenerator, Kind, Topics};
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::consumer_service_client::ConsumerServiceClient;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use tonic::transport::Channel;

use crate::{ServiceProcess, ServiceSpec, free_port};

/// The four topic base names.
pub const TOPIC_BASES: [&str; 4] = [
    "agent-routing-decisions",
    "agent-actions",
    "agent-transformation-events",
    "router-performance-metrics",
];

/// Waits until partition 0 of `topic` on `brokers` holds a message (its high watermark is
/// past 0): something was produced and acknowledged there.
pub async fn wait_produced(brokers: &str, topic: &str, timeout: Duration) -> Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "group.id",
            format!("wait-produced-{}", uuid::Uuid::new_v4()),
        )
        .create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let end = Instant::now() + timeout;
        loop {
            if let Ok((_, high)) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(2))
                && high > 0
            {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("nothing was produced to {topic} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await?
}

/// Creates the four topics under `prefix` on `brokers`.
pub async fn create_topics(brokers: &str, prefix: &str, partitions: i32) -> Result<Topics> {
    create_topics_with(
        ClientConfig::new().set("bootstrap.servers", brokers),
        prefix,
        partitions,
    )
    .await
}

/// [`create_topics`] with a client configured by the caller (brokers, TLS).
pub async fn create_topics_with(
    config: &ClientConfig,
    prefix: &str,
    partitions: i32,
) -> Result<Topics> {
    let admin: AdminClient<DefaultClientContext> = config.create()?;
    let topics = Topics::with_prefix(prefix);
    let new: Vec<NewTopic<'_>> = topics
        .0
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        if let Err((topic, code)) = r {
            bail!("create topic {topic}: {code}");
        }
    }
    Ok(topics)
}

/// A unique topic prefix for one test.
pub fn unique_prefix() -> String {
    format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// A producer that the test flushes explicitly.
pub struct TestProducer {
    producer: ThreadedProducer<DefaultProducerContext>,
}

impl TestProducer {
    pub fn new(brokers: &str) -> Result<Self> {
        Self::with_config(ClientConfig::new().set("bootstrap.servers", brokers))
    }

    /// A producer on a client configured by the caller (brokers, TLS).
    pub fn with_config(config: &ClientConfig) -> Result<Self> {
        let producer = config
            .clone()
            .set("linger.ms", "1")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self { producer })
    }

    pub fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        self.send_at(topic, key, payload, None)
    }

    /// With an explicit Kafka message timestamp (ms), for replay tests.
    pub fn send_at(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        timestamp_ms: Option<i64>,
    ) -> Result<()> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        if let Some(ts) = timestamp_ms {
            record = record.timestamp(ts);
        }
        self.producer
            .send(record)
            .map_err(|(e, _)| anyhow::anyhow!("produce to {topic}: {e}"))
    }

    /// Waits until everything sent is acknowledged.
    pub fn flush(&self) -> Result<()> {
        self.producer.flush(Duration::from_secs(30))?;
        if self.producer.in_flight_count() > 0 {
            bail!(
                "{} messages unacknowledged",
                self.producer.in_flight_count()
            );
        }
        Ok(())
    }
}

/// A transactional producer of agent-action events (its own `transactional.id`), for the
/// tests of commit markers and of transactions still open.
pub struct TxnActions {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    generator: EventGenerator,
}

impl TxnActions {
    const TIMEOUT: Duration = Duration::from_secs(30);

    pub fn new(brokers: &str, topic: &str, transactional_id: &str) -> Result<Self> {
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("transactional.id", transactional_id)
            .set("linger.ms", "1")
            .create()?;
        producer.init_transactions(Self::TIMEOUT)?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            generator: EventGenerator::new(5, 3),
        })
    }

    pub fn begin(&self) -> Result<()> {
        Ok(self.producer.begin_transaction()?)
    }

    /// Sends `n` action events in the open transaction and waits until the broker has them.
    pub fn send(&mut self, n: usize) -> Result<()> {
        let mut sent = 0;
        while sent < n {
            let e = self.generator.next_event(chrono::Utc::now());
            if e.kind != Kind::AgentAction {
                continue;
            }
            self.producer
                .send(BaseRecord::to(&self.topic).key(&e.key).payload(&e.payload))
                .map_err(|(e, _)| anyhow::anyhow!("produce to {}: {e}", self.topic))?;
            sent += 1;
        }
        Ok(self.producer.flush(Self::TIMEOUT)?)
    }

    pub fn commit(&self) -> Result<()> {
        Ok(self.producer.commit_transaction(Self::TIMEOUT)?)
    }
}

/// Starts consumer-svc on `brokers` reading the topics under `prefix`, and waits until it is
/// SERVING (its start-up replay over).
pub async fn start_consumer(brokers: &str, prefix: &str, extra: &[&str]) -> Result<ServiceProcess> {
    let mut svc = spawn_consumer(brokers, prefix, extra)?;
    svc.wait_serving().await?;
    Ok(svc)
}

/// Spawns consumer-svc as [`start_consumer`] does, without waiting for anything.
pub fn spawn_consumer(brokers: &str, prefix: &str, extra: &[&str]) -> Result<ServiceProcess> {
    let mut spec = ServiceSpec::new("consumer-svc").args([
        "--kafka-brokers",
        brokers,
        "--topic-prefix",
        prefix,
    ]);
    // Defaults a test may replace (consumer-svc refuses a flag given twice).
    if !extra.contains(&"--agent-metrics-interval") {
        spec = spec.args(["--agent-metrics-interval", "100ms"]);
    }
    if !extra.contains(&"--shutdown-grace") {
        spec = spec.args(["--shutdown-grace", "5s"]);
    }
    spec.args(extra.iter().copied()).spawn()
}

pub fn client(svc: &ServiceProcess) -> ConsumerServiceClient<Channel> {
    ConsumerServiceClient::new(svc.channel())
}

pub async fn status(svc: &ServiceProcess) -> Result<pb::ConsumerStatus> {
    let reply = client(svc)
        .get_consumer_status(pb::GetConsumerStatusRequest {})
        .await?
        .into_inner();
    reply.status.context("status missing")
}

/// Polls the status until `pred` holds, up to `timeout`.
pub async fn wait_status(
    svc: &ServiceProcess,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&pb::ConsumerStatus) -> bool,
) -> Result<pb::ConsumerStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = status(svc).await;
        if let Ok(s) = &last
            && pred(s)
        {
            return Ok(s.clone());
        }
        if Instant::now() >= deadline {
            bail!(
                "consumer-svc: {what} not reached within {timeout:?}; last status: {last:?}\nlog:\n{}",
                svc.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks that `pred` keeps holding for `period` (e.g. nothing is counted twice later).
pub async fn assert_stays(
    svc: &ServiceProcess,
    period: Duration,
    what: &str,
    pred: impl Fn(&pb::ConsumerStatus) -> bool,
) -> Result<()> {
    let end = Instant::now() + period;
    while Instant::now() < end {
        let s = status(svc).await?;
        if !pred(&s) {
            bail!(
                "consumer-svc: {what} stopped holding: {s:?}\nlog:\n{}",
                svc.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Per-topic counter of `kind` in `s`.
pub fn topic_status(s: &pb::ConsumerStatus, kind: Kind) -> &pb::TopicStatus {
    &s.topics[kind.index()]
}

/// A tansu broker of the test's own (memory storage) on a free port: stop and restart it at
/// will. Killed on drop.
pub struct PrivateBroker {
    pub port: u16,
    bin: String,
    child: Option<Child>,
    /// The address clients are told to connect to, when not the broker's own.
    advertised: Option<String>,
}

fn tansu_bin() -> Result<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join("scripts/dev-services"))
        .arg("tansu-bin")
        .output()
        .context("run scripts/dev-services tansu-bin")?;
    if !out.status.success() {
        bail!(
            "scripts/dev-services tansu-bin failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

impl PrivateBroker {
    pub async fn start() -> Result<Self> {
        Self::start_advertising(None).await
    }

    /// A broker that tells its clients to connect to `advertised` (e.g. a TLS front for it).
    pub async fn start_advertising(advertised: Option<String>) -> Result<Self> {
        let mut b = Self {
            port: free_port(),
            bin: tansu_bin()?,
            child: None,
            advertised,
        };
        b.restart().await?;
        Ok(b)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn answers(&self) -> bool {
        Command::new(&self.bin)
            .args([
                "topic",
                "list",
                "--broker",
                &format!("tcp://{}", self.addr()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts (again) with empty storage and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        let url = format!("tcp://{}", self.addr());
        let advertised = match &self.advertised {
            Some(a) => format!("tcp://{a}"),
            None => url.clone(),
        };
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-logs");
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("tansu-{}.log", self.port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start tansu")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            if Instant::now() >= deadline {
                bail!("private tansu on {} did not answer", self.addr());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
