//! consumer-svc benchmarks (run with `scripts/bench-consumer`): ingest rate as a ratio to a bare
//! rdkafka consumer in the same run, fan-out latency to 1,000 `StreamActions` subscribers next to
//! the latency of a bare rdkafka consumer under the same load (a first phase of the same run),
//! and resident memory after 10,000,000 events over 10,000 agents.
//!
//! Everything runs against a private tansu broker (memory storage) on a free port, started and
//! stopped here, and the release `consumer-svc` binary as a child process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use omnibus_client::KafkaSetting;
use omnibus_client::generate::{self, Kind, RunConfig, Topics};
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::consumer_service_client::ConsumerServiceClient;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio_stream::StreamExt;

/// How the benchmark's topics and load generator are set up, the same for every phase.
#[derive(Debug)]
struct Setup {
    /// Partitions per topic of the ingest and memory benchmarks (`--partitions`, default 3).
    partitions: i32,
    /// Partitions per topic of the fan-out benchmark (`--fanout-partitions`, default 1):
    /// tansu's memory storage lists every batch a partition holds on each fetch, so at 5,000
    /// events/s its CPU, and the latency of every consumer, grow with the partition count.
    fanout_partitions: i32,
    /// The load generator's `linger.ms` (`--linger-ms`; unset: the generator's own, 5).
    linger_ms: Option<u32>,
    /// `fetch.wait.max.ms` of consumer-svc (`--kafka-config`) and of the bare consumers
    /// (`--fetch-wait-ms`; unset: consumer-svc's default, 20). tansu answers a fetch only
    /// when this wait has passed, so it bounds every consumer's latency.
    fetch_wait_ms: Option<u32>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            partitions: 3,
            fanout_partitions: 1,
            linger_ms: None,
            fetch_wait_ms: None,
        }
    }
}

static SETUP: std::sync::OnceLock<Setup> = std::sync::OnceLock::new();

fn setup() -> &'static Setup {
    SETUP.get_or_init(Setup::default)
}

#[derive(Debug)]
struct Args {
    ingest_events: u64,
    subscribers: usize,
    fanout_rate: f64,
    fanout_secs: u64,
    /// Each subscriber filters on one of the generator's agents (subscriber i: agent i % 50).
    filter_agent: bool,
    /// Subscribers decode whole pushes (every field of every action), as a dashboard would,
    /// instead of only each action's timestamp.
    decode_all: bool,
    /// Every how-many-th subscriber records latencies (reads each action's timestamp); the
    /// others count the actions they receive (`--decode-all`: every subscriber decodes and
    /// records).
    sample_every: usize,
    /// Subscribers use `Subscribe` (channel actions) instead of `StreamActions`.
    subscribe: bool,
    /// The subscribers' HTTP/2 SETTINGS_MAX_FRAME_SIZE (`--max-frame-size`; unset: 16 KiB,
    /// the protocol's default): the largest DATA frame the service sends them.
    max_frame_size: Option<u32>,
    memory_events: u64,
    memory_agents: usize,
    memory_chunk: u64,
    setup: Setup,
    only: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        ingest_events: 1_000_000,
        subscribers: 1000,
        fanout_rate: 5000.0,
        fanout_secs: 20,
        filter_agent: false,
        decode_all: false,
        sample_every: 10,
        subscribe: false,
        max_frame_size: None,
        memory_events: 10_000_000,
        memory_agents: 10_000,
        memory_chunk: 1_000_000,
        setup: Setup::default(),
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().context(format!("{flag} needs a value"));
        match flag.as_str() {
            "--ingest-events" => a.ingest_events = value()?.parse()?,
            "--subscribers" => a.subscribers = value()?.parse()?,
            "--fanout-rate" => a.fanout_rate = value()?.parse()?,
            "--fanout-secs" => a.fanout_secs = value()?.parse()?,
            "--filter-agent" => a.filter_agent = true,
            "--decode-all" => a.decode_all = true,
            "--sample-every" => a.sample_every = value()?.parse::<usize>()?.max(1),
            "--subscribe" => a.subscribe = true,
            "--max-frame-size" => a.max_frame_size = Some(value()?.parse()?),
            "--memory-events" => a.memory_events = value()?.parse()?,
            "--memory-agents" => a.memory_agents = value()?.parse()?,
            "--memory-chunk" => a.memory_chunk = value()?.parse()?,
            "--partitions" => a.setup.partitions = value()?.parse::<i32>()?.max(1),
            "--fanout-partitions" => a.setup.fanout_partitions = value()?.parse::<i32>()?.max(1),
            "--linger-ms" => a.setup.linger_ms = Some(value()?.parse()?),
            "--fetch-wait-ms" => a.setup.fetch_wait_ms = Some(value()?.parse()?),
            "--only" => a.only = value()?.split(',').map(str::to_string).collect(),
            "--bench" => {} // passed by `cargo bench`
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private tansu (memory storage), restartable, killed on drop.
struct Broker {
    bin: String,
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    fn start() -> Result<Self> {
        let out = Command::new(root().join("scripts/dev-services"))
            .arg("tansu-bin")
            .output()?;
        let bin = String::from_utf8(out.stdout)?.trim().to_string();
        let mut b = Self {
            bin,
            port: free_port(),
            child: None,
        };
        b.restart()?;
        Ok(b)
    }
    fn restart(&mut self) -> Result<()> {
        self.stop();
        let url = format!("tcp://{}", self.addr());
        self.child = Some(
            Command::new(&self.bin)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", "memory://tansu/"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(&self.bin)
                .args(["topic", "list", "--broker", &url])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("tansu did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The release consumer-svc, killed on drop.
struct Service {
    child: Child,
    port: u16,
    /// Run under BENCH_SVC_WRAPPER: stopped with SIGINT so a profiler writes its data.
    wrapped: bool,
}

impl Service {
    fn start(brokers: &str, prefix: &str, extra: &[&str]) -> Result<Self> {
        // scripts/bench-consumer sets BENCH_SVC_BIN to a copy of the release (LTO) build
        // (`cargo bench` relinks target/release/consumer-svc with the bench profile); set by
        // hand it runs another build (e.g. an older commit's, for A/B runs). Without it, the
        // binary in CARGO_TARGET_DIR (honoured, like cargo does) or target/.
        let bin = match std::env::var_os("BENCH_SVC_BIN") {
            Some(bin) => PathBuf::from(bin),
            None => std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target"))
                .join("release/consumer-svc"),
        };
        if !bin.exists() {
            bail!(
                "{} missing: cargo build --release -p consumer-svc",
                bin.display()
            );
        }
        let port = free_port();
        // BENCH_SVC_WRAPPER runs the service under a profiler, e.g.
        // `perf record -e cpu-clock -g -o /tmp/svc.perf --` (RSS and CPU are then the wrapper's).
        let wrapper: Vec<String> = std::env::var("BENCH_SVC_WRAPPER")
            .map(|w| w.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .args(["--kafka-brokers", brokers, "--topic-prefix", prefix])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .args(setup().fetch_wait_ms.iter().flat_map(|ms| {
                [
                    "--kafka-config".to_string(),
                    format!("fetch.wait.max.ms={ms}"),
                ]
            }))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Self {
            child,
            port,
            wrapped: !wrapper.is_empty(),
        })
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    /// How the process ended, if it did (a crash shows as a signal).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
    async fn client(&self) -> Result<ConsumerServiceClient<tonic::transport::Channel>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ep =
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port))?;
            match ep.connect().await {
                Ok(ch) => return Ok(ConsumerServiceClient::new(ch)),
                Err(e) if Instant::now() > deadline => bail!("consumer-svc unreachable: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.wrapped {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn status(
    c: &mut ConsumerServiceClient<tonic::transport::Channel>,
) -> Result<pb::ConsumerStatus> {
    c.get_consumer_status(pb::GetConsumerStatusRequest {})
        .await?
        .into_inner()
        .status
        .context("no status")
}

async fn wait_status(
    c: &mut ConsumerServiceClient<tonic::transport::Channel>,
    timeout: Duration,
    pred: impl Fn(&pb::ConsumerStatus) -> bool,
) -> Result<pb::ConsumerStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = status(c).await
            && pred(&s)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!(
                "condition not reached within {timeout:?}: {:?}",
                status(c).await.ok().map(|s| s.events_processed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A benchmark's four topics and their partition count.
#[derive(Clone, Debug)]
struct BenchTopics {
    names: Topics,
    partitions: i32,
}

async fn create_topics(brokers: &str, prefix: &str, partitions: i32) -> Result<BenchTopics> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topics = Topics::with_prefix(prefix);
    let new: Vec<_> = topics
        .0
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await? {
        if let Err((t, e)) = r {
            bail!("create {t}: {e}");
        }
    }
    Ok(BenchTopics {
        names: topics,
        partitions,
    })
}

fn produce(cfg: RunConfig) -> Result<generate::RunReport> {
    Ok(generate::run(&cfg)?)
}

fn gen_config(brokers: &str, topics: &Topics) -> RunConfig {
    RunConfig {
        brokers: brokers.into(),
        topics: topics.clone(),
        rate: None,
        total: None,
        duration: None,
        agents: 50,
        seed: 1,
        progress: true,
        only: Vec::new(),
        time_spread: None,
        kafka_settings: setup()
            .linger_ms
            .map(|ms| KafkaSetting {
                key: "linger.ms".into(),
                value: ms.to_string(),
            })
            .into_iter()
            .collect(),
    }
}

/// (resident, peak resident) in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The first `n` threads of `thread_times` as "name cpu/waiting", comma-separated.
fn busiest(threads: &[(String, f64, f64)], n: usize) -> String {
    threads
        .iter()
        .take(n)
        .map(|(name, run, wait)| format!("{name} {run:.2}/{wait:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Per thread of `pid`: (name, seconds on a CPU, seconds runnable but waiting for a CPU), from
/// /proc/<pid>/task/*/schedstat; the threads that used the most CPU first.
fn thread_times(pid: u32) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        let mut f = stat
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or(0.0) / 1e9);
        let (run, wait) = (f.next().unwrap_or(0.0), f.next().unwrap_or(0.0));
        out.push((name.trim().to_string(), run, wait));
    }
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// CPU seconds used so far by `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The baselines' consumer: consumer-svc's fetch settings (see its `ingest.rs`), no group.
fn bare_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("group.id", "bench-bare-unused")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set(
            "fetch.wait.max.ms",
            setup().fetch_wait_ms.unwrap_or(20).to_string(),
        )
        .set("queued.min.messages", "200000")
        .set("queued.max.messages.kbytes", "32768")
        .set("fetch.queue.backoff.ms", "10")
        .set("max.partition.fetch.bytes", "8388608")
        .set("fetch.max.bytes", "67108864");
    c
}

/// The raw limit: a bare rdkafka consumer with the same settings reading every message.
/// Returns (time to the first message, time to all), both from the consumer's creation.
fn bare_consumer(brokers: &str, topics: &BenchTopics, expect: u64) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let consumer: BaseConsumer = bare_config(brokers).create()?;
    let mut tpl = TopicPartitionList::new();
    for t in &topics.names.0 {
        for p in 0..topics.partitions {
            // Offset 0, as consumer-svc starts a log it reads from the beginning: the symbolic
            // earliest offset costs librdkafka a ListOffsets round and ~0.5 s before the first
            // message on tansu, which would flatter consumer-svc's ratio.
            tpl.add_partition_offset(t, p, Offset::Offset(0))?;
        }
    }
    consumer.assign(&tpl)?;
    let (mut n, mut bytes) = (0u64, 0usize);
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while n < expect {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            // Touch the payload, as any consumer must.
            bytes = bytes.wrapping_add(m.payload().map_or(0, |p| p.len()));
            n += 1;
            first.get_or_insert_with(|| start.elapsed());
        }
        if Instant::now() > deadline {
            bail!("bare consumer: {n} of {expect}");
        }
    }
    std::hint::black_box(bytes);
    Ok((first.unwrap_or_default(), start.elapsed()))
}

/// The fan-out baseline: a bare rdkafka consumer with consumer-svc's fetch settings, reading
/// the four topics from their end (as consumer-svc does) while the load runs, records the
/// produce-to-consume latency of the actions (the event's `timestamp` to the moment the message
/// is polled) until `stop`. What the generator, the broker and the Kafka client alone cost,
/// measured in the same run.
fn bare_latency(
    brokers: &str,
    topics: &BenchTopics,
    ready: std::sync::mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Histogram<u64>> {
    let consumer: BaseConsumer = bare_config(brokers).create()?;
    let mut tpl = TopicPartitionList::new();
    for t in &topics.names.0 {
        for p in 0..topics.partitions {
            tpl.add_partition_offset(t, p, Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
    let actions = topics.names.name(Kind::AgentAction);
    // The end offsets are resolved on the first polls; the topic is empty before the load.
    let _ = consumer.poll(Duration::from_millis(500));
    let _ = ready.send(());
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    while !stop.is_cancelled() {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        if m.topic() != actions {
            continue;
        }
        let now = chrono::Utc::now().timestamp_micros();
        let ts = m
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
            .and_then(|v| {
                v.get("timestamp")
                    .and_then(|t| t.as_str())
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            });
        if let Some(ts) = ts {
            let _ = h.record((now - ts.timestamp_micros()).max(1) as u64);
        }
    }
    Ok(h)
}

async fn bench_ingest(broker: &Broker, events: u64) -> Result<String> {
    let brokers = broker.addr();
    let prefix = format!("ingest{}.", std::process::id());
    let topics = create_topics(&brokers, &prefix, setup().partitions).await?;
    eprintln!("[ingest] pre-loading {events} mixed events");
    let mut cfg = gen_config(&brokers, &topics.names);
    cfg.total = Some(events);
    let report = tokio::task::spawn_blocking(move || produce(cfg)).await??;
    let total = report.total();
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for round in 1..=2 {
        let broker_cpu0 = broker.pid().map_or(0.0, cpu_seconds);
        let (b_first, b) = {
            let (brokers, topics) = (brokers.clone(), topics.clone());
            tokio::task::spawn_blocking(move || bare_consumer(&brokers, &topics, total)).await??
        };
        let broker_cpu1 = broker.pid().map_or(0.0, cpu_seconds);
        let start = Instant::now();
        let svc = Service::start(&brokers, &prefix, &[])?;
        let mut c = svc.client().await?;
        let serving = start.elapsed();
        wait_status(&mut c, Duration::from_secs(600), |s| s.events_processed > 0).await?;
        let first = start.elapsed();
        wait_status(&mut c, Duration::from_secs(600), |s| {
            s.events_processed >= total
        })
        .await?;
        let t = start.elapsed();
        let broker_cpu2 = broker.pid().map_or(0.0, cpu_seconds);
        let svc_cpu = cpu_seconds(svc.pid());
        let (rss, peak) = memory_mib(svc.pid());
        let bare_rate = total as f64 / b.as_secs_f64();
        let svc_rate = total as f64 / t.as_secs_f64();
        ratios.push(svc_rate / bare_rate);
        eprintln!("[ingest] round {round}: bare {bare_rate:.0}/s, consumer-svc {svc_rate:.0}/s");
        let threads = thread_times(svc.pid());
        eprintln!(
            "[ingest] consumer-svc threads (CPU s / waiting for a CPU s): {}",
            busiest(&threads, 5)
        );
        rows.push(format!(
            "| {round} | {:.2} s ({bare_rate:.0} ev/s), first after {:.2} s | {:.2} s ({svc_rate:.0} ev/s) | {:.2} s / {:.2} s | **{:.2}** | {:.1} / {:.1} / {svc_cpu:.1} s | {rss:.0} / {peak:.0} MiB |",
            b.as_secs_f64(),
            b_first.as_secs_f64(),
            t.as_secs_f64(),
            serving.as_secs_f64(),
            first.as_secs_f64(),
            svc_rate / bare_rate,
            broker_cpu1 - broker_cpu0,
            broker_cpu2 - broker_cpu1,
        ));
    }
    let per_kind = Kind::ALL.map(|k| report.per_kind[k.index()]);
    Ok(format!(
        "### Ingest: {total} pre-loaded events (routing {}, actions {}, transformations {}, performance {}), {} partitions per topic\n\n\
         | round | bare rdkafka consumer | consumer-svc (process start to all aggregated) | of which: gRPC up / first event aggregated | ratio | CPU: broker (bare run / svc run) / consumer-svc | consumer-svc RSS / peak |\n|---|---|---|---|---|---|---|\n{}\n\n\
         Mean ratio: **{:.2}** (target >= 0.8).\n",
        per_kind[0],
        per_kind[1],
        per_kind[2],
        per_kind[3],
        topics.partitions,
        rows.join("\n"),
        ratios.iter().sum::<f64>() / ratios.len() as f64
    ))
}

/// Agents of the load generator in the fan-out run (`gen_config`).
const FANOUT_AGENTS: usize = 50;

fn agent_name(i: usize) -> String {
    format!("agent-{i:05}")
}

/// How much of each message a fan-out subscriber decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reading {
    /// Whole messages (the generated client), as a dashboard would (`--decode-all`).
    All,
    /// Each action's timestamp and the lag count; prost skips the other fields without
    /// copying them.
    Timestamps,
    /// Only how many actions arrived and the lag count: the subscribers that do not sample
    /// latency (`--sample-every`). Each action is skipped by its length, unread.
    Count,
}

/// What a subscriber took from one message.
#[derive(Debug, Default)]
struct Received {
    /// The actions' timestamps (empty with [`Reading::Count`]).
    timestamps: Vec<prost_types::Timestamp>,
    actions: u64,
    lagged: u64,
}

/// A `StreamActions` push reduced to its actions' timestamps (`AgentAction.timestamp`,
/// field 11) and the lag count.
#[derive(Clone, PartialEq, prost::Message)]
struct PushTimes {
    #[prost(message, repeated, tag = "1")]
    actions: Vec<ActionTime>,
    #[prost(uint64, tag = "2")]
    lagged: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ActionTime {
    #[prost(message, optional, tag = "11")]
    timestamp: Option<prost_types::Timestamp>,
}

/// A `Subscribe` message reduced to its action's timestamp and a lag notice's count (fields
/// 3 and 9).
#[derive(Clone, PartialEq, prost::Message)]
struct SubscribeTime {
    #[prost(message, optional, tag = "3")]
    action: Option<ActionTime>,
    #[prost(message, optional, tag = "9")]
    lagged: Option<pb::Lagged>,
}

/// A message decoded for its action count and lag count only. `ACTION` is the tag of the
/// action field (repeated in a push, once in a `Subscribe` message); `LAGGED` that of the lag
/// count, a `uint64` or, with `LAG_IS_MESSAGE`, a `Lagged` message. Decode-only: the actions
/// are counted, not kept, so encoding writes only the lag count.
#[derive(Debug, Default)]
struct Counted<const ACTION: u32, const LAGGED: u32, const LAG_IS_MESSAGE: bool> {
    actions: u64,
    lagged: u64,
}

/// `StreamActionsResponse`: `actions` = 1, `lagged` = 2 (a `uint64`).
type PushCount = Counted<1, 2, false>;
/// `SubscribeResponse`: `action` = 3, `lagged` = 9 (a `Lagged` message).
type SubscribeCount = Counted<3, 9, true>;

impl<const ACTION: u32, const LAGGED: u32, const LAG_IS_MESSAGE: bool> prost::Message
    for Counted<ACTION, LAGGED, LAG_IS_MESSAGE>
{
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        if self.lagged != 0 {
            if LAG_IS_MESSAGE {
                let lagged = pb::Lagged {
                    missed: self.lagged,
                };
                prost::encoding::message::encode(LAGGED, &lagged, buf);
            } else {
                prost::encoding::uint64::encode(LAGGED, &self.lagged, buf);
            }
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == ACTION {
            self.actions += 1;
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        } else if tag == LAGGED && LAG_IS_MESSAGE {
            let mut lagged = pb::Lagged::default();
            prost::encoding::message::merge(wire_type, &mut lagged, buf, ctx)?;
            self.lagged += lagged.missed;
            Ok(())
        } else if tag == LAGGED {
            prost::encoding::uint64::merge(wire_type, &mut self.lagged, buf, ctx)
        } else {
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        match self.lagged {
            0 => 0,
            missed if LAG_IS_MESSAGE => {
                prost::encoding::message::encoded_len(LAGGED, &pb::Lagged { missed })
            }
            missed => prost::encoding::uint64::encoded_len(LAGGED, &missed),
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// Checks the counting readers against generated messages (so a wrong tag shows up as an
/// error, not as a miscount of deliveries).
fn check_counted() -> Result<()> {
    use prost::Message as _;
    let action = pb::AgentAction {
        agent_name: "agent-00001".into(),
        timestamp: Some(prost_types::Timestamp {
            seconds: 1,
            nanos: 2,
        }),
        ..Default::default()
    };
    let push = pb::StreamActionsResponse {
        actions: vec![action.clone(); 3],
        lagged: 5,
    };
    let counted = PushCount::decode(push.encode_to_vec().as_slice())?;
    anyhow::ensure!(
        (counted.actions, counted.lagged) == (3, 5),
        "PushCount read {counted:?}"
    );
    anyhow::ensure!(
        counted.encode_to_vec()
            == pb::StreamActionsResponse {
                actions: vec![],
                lagged: 5
            }
            .encode_to_vec(),
        "PushCount encodes the lag count as the generated message does"
    );
    use pb::subscribe_response::Update;
    for (update, expected) in [
        (Update::Action(action), (1, 0)),
        (Update::Lagged(pb::Lagged { missed: 7 }), (0, 7)),
    ] {
        let message = pb::SubscribeResponse {
            sequence: 9,
            update: Some(update),
        };
        let counted = SubscribeCount::decode(message.encode_to_vec().as_slice())?;
        anyhow::ensure!(
            (counted.actions, counted.lagged) == expected,
            "SubscribeCount read {counted:?}, expected {expected:?}"
        );
    }
    Ok(())
}

type ReceivedStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Received, tonic::Status>> + Send>>;

/// `stream`'s messages as what the subscriber takes from them.
fn received<M: Into<Received>>(
    stream: impl tokio_stream::Stream<Item = Result<M, tonic::Status>> + Send + 'static,
) -> ReceivedStream {
    Box::pin(stream.map(|m| m.map(Into::into)))
}

impl Received {
    fn timestamps(timestamps: Vec<Option<prost_types::Timestamp>>, lagged: u64) -> Self {
        Self {
            actions: timestamps.len() as u64,
            timestamps: timestamps.into_iter().flatten().collect(),
            lagged,
        }
    }
}

impl From<pb::StreamActionsResponse> for Received {
    fn from(p: pb::StreamActionsResponse) -> Self {
        Self::timestamps(
            p.actions.into_iter().map(|a| a.timestamp).collect(),
            p.lagged,
        )
    }
}

impl From<PushTimes> for Received {
    fn from(p: PushTimes) -> Self {
        Self::timestamps(
            p.actions.into_iter().map(|a| a.timestamp).collect(),
            p.lagged,
        )
    }
}

impl From<pb::SubscribeResponse> for Received {
    fn from(m: pb::SubscribeResponse) -> Self {
        use pb::subscribe_response::Update;
        match m.update {
            Some(Update::Action(a)) => Self::timestamps(vec![a.timestamp], 0),
            Some(Update::Lagged(l)) => Self::timestamps(Vec::new(), l.missed),
            _ => Self::default(),
        }
    }
}

impl From<SubscribeTime> for Received {
    fn from(m: SubscribeTime) -> Self {
        Self::timestamps(
            m.action.map(|a| a.timestamp).into_iter().collect(),
            m.lagged.map_or(0, |l| l.missed),
        )
    }
}

impl<const ACTION: u32, const LAGGED: u32, const LAG_IS_MESSAGE: bool>
    From<Counted<ACTION, LAGGED, LAG_IS_MESSAGE>> for Received
{
    fn from(c: Counted<ACTION, LAGGED, LAG_IS_MESSAGE>) -> Self {
        Self {
            timestamps: Vec::new(),
            actions: c.actions,
            lagged: c.lagged,
        }
    }
}

/// Opens a `StreamActions` stream read as `reading` says.
async fn read_pushes(
    channel: tonic::transport::Channel,
    request: pb::StreamActionsRequest,
    reading: Reading,
) -> Result<ReceivedStream, tonic::Status> {
    const PATH: &str = "/omnibus.consumer.v1.ConsumerService/StreamActions";
    read_stream::<_, pb::StreamActionsResponse, PushTimes, PushCount>(
        channel, PATH, request, reading,
    )
    .await
}

/// Opens a `Subscribe` stream of the actions (the same filter as `request`), read as
/// `reading` says.
async fn read_subscribe(
    channel: tonic::transport::Channel,
    request: pb::StreamActionsRequest,
    reading: Reading,
) -> Result<ReceivedStream, tonic::Status> {
    const PATH: &str = "/omnibus.consumer.v1.ConsumerService/Subscribe";
    let request = pb::SubscribeRequest {
        channels: vec![pb::Channel::Actions as i32],
        agent: request.agent,
        ..Default::default()
    };
    read_stream::<_, pb::SubscribeResponse, SubscribeTime, SubscribeCount>(
        channel, PATH, request, reading,
    )
    .await
}

/// Opens the server stream at `path` and reads its messages as `All` (whole messages),
/// `Times` (only the timestamps) or `Count` (only the counts), as `reading` says.
async fn read_stream<Req, All, Times, Count>(
    channel: tonic::transport::Channel,
    path: &'static str,
    request: Req,
    reading: Reading,
) -> Result<ReceivedStream, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    All: prost::Message + Default + Into<Received> + Send + 'static,
    Times: prost::Message + Default + Into<Received> + Send + 'static,
    Count: prost::Message + Default + Into<Received> + Send + 'static,
{
    Ok(match reading {
        Reading::All => received(open_stream::<_, All>(channel, path, request).await?),
        Reading::Timestamps => received(open_stream::<_, Times>(channel, path, request).await?),
        Reading::Count => received(open_stream::<_, Count>(channel, path, request).await?),
    })
}

/// Opens the server stream at `path`, decoding each message as `M` (typically a message that
/// declares only the fields the benchmark reads).
async fn open_stream<Req, M>(
    channel: tonic::transport::Channel,
    path: &'static str,
    request: Req,
) -> Result<tonic::Streaming<M>, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    M: prost::Message + Default + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    let codec = tonic_prost::ProstCodec::<Req, M>::default();
    Ok(grpc
        .server_streaming(tonic::Request::new(request), path, codec)
        .await?
        .into_inner())
}

async fn bench_fanout(broker: &Broker, args: &Args) -> Result<String> {
    let &Args {
        subscribers,
        fanout_rate: rate,
        fanout_secs: secs,
        filter_agent,
        decode_all,
        sample_every,
        subscribe,
        ..
    } = args;
    check_counted()?;
    let brokers = broker.addr();
    let partitions = setup().fanout_partitions;
    // Phase 1, the baseline: the same load on fresh topics, read by a bare rdkafka consumer
    // alone (consumer-svc not running), so it measures what the generator, the broker and the
    // Kafka client cost without perturbing phase 2 (a second consumer slows the broker down).
    let bare = {
        let topics = create_topics(
            &brokers,
            &format!("fanout-bare{}.", std::process::id()),
            partitions,
        )
        .await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = {
            let (brokers, topics, stop) = (brokers.clone(), topics.clone(), stop.clone());
            tokio::task::spawn_blocking(move || bare_latency(&brokers, &topics, ready_tx, stop))
        };
        let _ = tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(10)))
            .await;
        eprintln!("[fanout] baseline: a bare consumer alone, producing {rate}/s for {secs}s");
        let mut cfg = gen_config(&brokers, &topics.names);
        cfg.agents = FANOUT_AGENTS;
        cfg.rate = Some(rate);
        cfg.duration = Some(Duration::from_secs(secs));
        tokio::task::spawn_blocking(move || produce(cfg)).await??;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        reader.await??
    };
    // Phase 2: consumer-svc and the subscribers.
    let prefix = format!("fanout{}.", std::process::id());
    let topics = create_topics(&brokers, &prefix, partitions).await?;
    let svc = Service::start(&brokers, &prefix, &[])?;
    let mut c = svc.client().await?;
    wait_status(&mut c, Duration::from_secs(30), |s| {
        s.partitions.len() == 4 * topics.partitions as usize
    })
    .await?;

    // 50 streams per HTTP/2 connection (servers commonly cap concurrent streams per connection).
    let per_conn = 50;
    let mut channels = Vec::new();
    for _ in 0..subscribers.div_ceil(per_conn) {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", svc.port))?
            .max_frame_size(args.max_frame_size);
        channels.push(ep.connect().await?);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for i in 0..subscribers {
        let channel = channels[i / per_conn].clone();
        let stop = stop.clone();
        let opened = opened.clone();
        let request = pb::StreamActionsRequest {
            agent: filter_agent.then(|| agent_name(i % FANOUT_AGENTS)),
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram");
            let (mut n, mut lagged, mut messages) = (0u64, 0u64, 0u64);
            let reading = if decode_all {
                Reading::All
            } else if i % sample_every == 0 {
                Reading::Timestamps
            } else {
                Reading::Count
            };
            let opened_stream = if subscribe {
                read_subscribe(channel, request, reading).await
            } else {
                read_pushes(channel, request, reading).await
            };
            let Ok(mut stream) = opened_stream else {
                return (h, n, lagged, messages);
            };
            opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = stream.next() => m,
                };
                let Some(Ok(msg)) = msg else { break };
                lagged += msg.lagged;
                n += msg.actions;
                messages += 1;
                if !msg.timestamps.is_empty() {
                    let now = chrono::Utc::now().timestamp_micros();
                    for ts in msg.timestamps {
                        let t = ts.seconds * 1_000_000 + i64::from(ts.nanos) / 1000;
                        let _ = h.record((now - t).max(1) as u64);
                    }
                }
            }
            (h, n, lagged, messages)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while opened.load(std::sync::atomic::Ordering::Relaxed) < subscribers {
        if Instant::now() > deadline {
            bail!(
                "only {} subscribers opened",
                opened.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("[fanout] {subscribers} subscribers open; producing {rate}/s for {secs}s");
    let cpu0 = cpu_seconds(svc.pid());
    let own_cpu0 = cpu_seconds(std::process::id());
    let broker_cpu0 = broker.pid().map_or(0.0, cpu_seconds);
    let t0 = Instant::now();
    let mut cfg = gen_config(&brokers, &topics.names);
    cfg.agents = FANOUT_AGENTS;
    cfg.rate = Some(rate);
    cfg.duration = Some(Duration::from_secs(secs));
    let report = tokio::task::spawn_blocking(move || produce(cfg)).await??;
    let produce_secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(svc.pid()) - cpu0) / produce_secs;
    // The benchmark process: load generator and all subscribers.
    let own_cpu = (cpu_seconds(std::process::id()) - own_cpu0) / produce_secs;
    let broker_cpu = (broker.pid().map_or(0.0, cpu_seconds) - broker_cpu0) / produce_secs;
    eprintln!("[fanout] broker CPU {:.0}% of one core", broker_cpu * 100.0);
    let actions = report.per_kind[Kind::AgentAction.index()];
    // Let deliveries drain, bounded.
    wait_status(&mut c, Duration::from_secs(30), |s| {
        s.events_processed >= report.total()
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, peak) = memory_mib(svc.pid());
    for (who, pid) in [
        ("consumer-svc", svc.pid()),
        ("benchmark", std::process::id()),
    ] {
        let threads = thread_times(pid);
        let (run, wait) = threads
            .iter()
            .fold((0.0, 0.0), |(r, w), t| (r + t.1, w + t.2));
        eprintln!(
            "[fanout] {who} threads: CPU {run:.1} s, waiting for a CPU {wait:.1} s in total; busiest: {}",
            busiest(&threads, 4)
        );
    }
    // Expected deliveries: every action to every subscriber, or with --filter-agent the
    // actions of each subscriber's agent (counted by the service itself).
    let expected = if filter_agent {
        let per_agent: HashMap<String, u64> = c
            .get_agent_metrics(pb::GetAgentMetricsRequest::default())
            .await?
            .into_inner()
            .agents
            .into_iter()
            .map(|m| (m.agent, m.total_actions))
            .collect();
        (0..subscribers)
            .map(|i| {
                per_agent
                    .get(&agent_name(i % FANOUT_AGENTS))
                    .copied()
                    .unwrap_or(0)
            })
            .sum::<u64>()
    } else {
        actions * subscribers as u64
    };
    stop.cancel();
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let (mut delivered, mut lagged, mut messages) = (0u64, 0u64, 0u64);
    for t in tasks {
        let (h, n, l, m) = t.await?;
        all.add(h)?;
        delivered += n;
        lagged += l;
        messages += m;
    }
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let bare_ms = |q: f64| bare.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "[fanout] baseline (bare rdkafka consumer, same run): p50 {:.1} ms p99 {:.1} ms over {} actions",
        bare_ms(0.5),
        bare_ms(0.99),
        bare.len()
    );
    eprintln!(
        "[fanout] p50 {:.1} ms p99 {:.1} ms, cpu {:.0}%, delivered {delivered} of {expected}",
        ms(0.5),
        ms(0.99),
        cpu * 100.0
    );
    let mut filter_note = if filter_agent {
        format!(", each filtering on one of {FANOUT_AGENTS} agents (`agent` in the request)")
    } else {
        String::new()
    };
    let stream = if subscribe {
        "Subscribe"
    } else {
        "StreamActions"
    };
    let sampled = if decode_all {
        subscribers
    } else {
        subscribers.div_ceil(sample_every)
    };
    filter_note.push_str(&if decode_all {
        ", each decoding whole messages and recording every action's latency".to_string()
    } else if sampled == subscribers {
        ", each reading every action's timestamp".to_string()
    } else {
        format!(
            "; latency sampled by {sampled} of them (one in {sample_every} reads each action's \
             timestamp), the others count the actions they receive"
        )
    });
    filter_note.push_str(&format!(
        "; {partitions} partition(s) per topic, generator `linger.ms` {}, consumers' \
         `fetch.wait.max.ms` {}, subscribers' HTTP/2 max frame size {}",
        setup()
            .linger_ms
            .map_or("5 (default)".into(), |ms| ms.to_string()),
        setup()
            .fetch_wait_ms
            .map_or("20 (default)".into(), |ms| ms.to_string()),
        args.max_frame_size
            .map_or("16384 (default)".into(), |n| n.to_string())
    ));
    Ok(format!(
        "### Fan-out: {subscribers} `{stream}` subscribers{filter_note}, {:.0} events/s produced for {secs} s ({} events, {actions} actions)\n\n\
         | metric | value |\n|---|---|\n\
         | produce-to-delivery p50 | **{:.1} ms** |\n| p90 | {:.1} ms |\n| p99 | **{:.1} ms** (target < 50 ms) |\n| max | {:.1} ms |\n\
         | baseline: the same load read by a bare rdkafka consumer of the four topics alone, same run (produce-to-poll) | p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} actions) |\n\
         | deliveries | {delivered} of {} expected ({:.2}%), lag notices: {lagged} updates missed |\n\
         | messages | {messages} ({:.1} per subscriber per second, {:.1} actions each) |\n\
         | consumer-svc CPU | {:.0}% of one core |\n| consumer-svc RSS / peak | {rss:.0} / {peak:.0} MiB |\n\
         | benchmark process CPU (generator + subscribers) | {:.0}% of one core, {:.0} deliveries/s received |\n",
        report.total() as f64 / produce_secs,
        report.total(),
        ms(0.5),
        ms(0.9),
        ms(0.99),
        all.max() as f64 / 1000.0,
        bare_ms(0.5),
        bare_ms(0.9),
        bare_ms(0.99),
        bare.max() as f64 / 1000.0,
        bare.len(),
        expected,
        100.0 * delivered as f64 / expected.max(1) as f64,
        messages as f64 / subscribers.max(1) as f64 / produce_secs,
        delivered as f64 / messages.max(1) as f64,
        cpu * 100.0,
        own_cpu * 100.0,
        delivered as f64 / produce_secs,
    ))
}

async fn bench_memory(
    broker: &mut Broker,
    events: u64,
    agents: usize,
    chunk: u64,
) -> Result<String> {
    let prefix = format!("memory{}.", std::process::id());
    let mut topics = create_topics(&broker.addr(), &prefix, setup().partitions).await?;
    let mut svc = Service::start(&broker.addr(), &prefix, &[])?;
    let mut c = svc.client().await?;
    wait_status(&mut c, Duration::from_secs(30), |s| {
        s.partitions.len() == 4 * topics.partitions as usize
    })
    .await?;
    let start = Instant::now();
    // Resident size after each chunk, by events aggregated so far.
    let mut samples: Vec<(u64, f64)> = Vec::new();
    let mut seed = 7;
    let mut done = 0u64;
    while done < events {
        let more_after = done + chunk < events;
        let step = memory_chunk(
            broker,
            &svc,
            &mut c,
            &mut topics,
            &prefix,
            (chunk.min(events - done), agents, seed),
            &mut done,
            more_after,
        )
        .await;
        seed += 1;
        match step {
            Ok(rss) => samples.push((done, rss)),
            Err(e) => {
                let how = svc
                    .exited()
                    .map_or("still running".to_string(), |s| format!("exited: {s}"));
                let last = samples.last().map_or(0.0, |s| s.1);
                bail!(
                    "memory run stopped after {done} events (consumer-svc RSS {last:.0} MiB at the last sample; consumer-svc {how}): {e:#}"
                );
            }
        }
    }
    let s = status(&mut c).await?;
    let (rss, peak) = memory_mib(svc.pid());
    let curve = samples
        .iter()
        .map(|(n, r)| format!("{:.0}M: {r:.0}", *n as f64 / 1e6))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(format!(
        "### Memory: {} events over {} agents (event times spread over 23 h), in {:.0} s\n\n\
         | metric | value |\n|---|---|\n| consumer-svc RSS after all events | **{rss:.0} MiB** (target < 200 MB) |\n| peak RSS | {peak:.0} MiB |\n\
         | agents held | {} |\n| RSS (MiB) after each million | {curve} |\n",
        s.events_processed,
        agents,
        start.elapsed().as_secs_f64(),
        s.agents
    ))
}

/// Produces one chunk of `(events, agents, seed)`, waits until it is aggregated and returns the
/// service's resident size then; with `empty_after`, empties the broker for the next chunk.
#[allow(clippy::too_many_arguments)]
async fn memory_chunk(
    broker: &mut Broker,
    svc: &Service,
    c: &mut ConsumerServiceClient<tonic::transport::Channel>,
    topics: &mut BenchTopics,
    prefix: &str,
    (n, agents, seed): (u64, usize, u64),
    done: &mut u64,
    empty_after: bool,
) -> Result<f64> {
    let mut cfg = gen_config(&broker.addr(), &topics.names);
    cfg.total = Some(n);
    cfg.agents = agents;
    cfg.seed = seed;
    cfg.progress = false;
    // A day of history: event times spread over the last 24 h (the worst case for buckets).
    cfg.time_spread = Some(Duration::from_secs(23 * 3600));
    let report = tokio::task::spawn_blocking(move || produce(cfg)).await??;
    let target = *done + report.total();
    wait_status(c, Duration::from_secs(600), |s| {
        s.events_processed >= target
    })
    .await?;
    *done = target;
    let (rss, _) = memory_mib(svc.pid());
    eprintln!(
        "[memory] {target} events aggregated, consumer-svc RSS {rss:.0} MiB (broker RSS {:.0} MiB)",
        broker.pid().map_or(0.0, |p| memory_mib(p).0)
    );
    if empty_after {
        // Empty the broker (memory storage) so it does not hold 10 M events: restart it,
        // wait until the service saw the topics vanish, recreate them.
        broker.restart()?;
        wait_status(c, Duration::from_secs(60), |s| s.partitions.is_empty())
            .await
            .context("waiting for the service to see the emptied broker")?;
        *topics = create_topics(&broker.addr(), prefix, topics.partitions).await?;
        wait_status(c, Duration::from_secs(60), |s| {
            s.partitions.len() == 4 * topics.partitions as usize && s.connected
        })
        .await
        .context("waiting for the service to read the recreated topics")?;
    }
    Ok(rss)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = parse_args()?;
    let setup = std::mem::take(&mut args.setup);
    eprintln!("[bench] {setup:?}");
    SETUP.set(setup).ok().context("setup set twice")?;
    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let mut broker = Broker::start()?;
    let mut out = Vec::new();
    out.push(format!(
        "Run: {} UTC, {} cores, private tansu (memory://), release build.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    if want("ingest") {
        out.push(bench_ingest(&broker, args.ingest_events).await?);
        broker.restart()?; // free the pre-loaded events
    }
    if want("fanout") {
        out.push(bench_fanout(&broker, &args).await?);
        broker.restart()?;
    }
    if want("memory") {
        out.push(
            bench_memory(
                &mut broker,
                args.memory_events,
                args.memory_agents,
                args.memory_chunk,
            )
            .await?,
        );
    }
    println!("{}", out.join("\n"));
    Ok(())
}
