//! `omnibus generate`: realistic events for the four topics, with a progress bar. The events
//! come from the load generator core (`omnibus_client::generate::EventGenerator`); this module
//! adds the pacing, the progress bar and Ctrl-C.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use omnibus_client::generate::{EventGenerator, GenerateError, Kind, Topics, producer, settle};
use rdkafka::producer::{BaseRecord, Producer};

use super::output::Format;
use super::{Cli, Fail, Result, parse_duration};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Events per second over all topics (default: as fast as possible).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Stop after this long (30s, 2m, 1h).
    #[arg(long, value_parser = parse_duration, conflicts_with = "count")]
    pub duration: Option<Duration>,
    /// Stop after this many events. Without --count or --duration: until Ctrl-C.
    #[arg(long)]
    pub count: Option<u64>,
    /// Distinct agent names (agent-00000, agent-00001, ...), at least 1.
    #[arg(long, default_value_t = 8,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub agents: usize,
    /// Random seed (the same seed gives the same events, apart from timestamps).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prefix of the topic names, as consumer-svc's KAFKA_TOPIC_PREFIX.
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
    /// No progress bar, only the final line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// The slowest rate accepted: one event every 1,000 s (slower pacing would overflow the clock
/// arithmetic long before it mattered).
const MIN_RATE: f64 = 0.001;

fn parse_rate(raw: &str) -> std::result::Result<f64, String> {
    raw.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= MIN_RATE)
        .ok_or_else(|| {
            format!("'{raw}' is not a number of events per second of at least {MIN_RATE}")
        })
}

/// How many events a run will produce, when that is known in advance.
pub fn planned(args: &GenerateArgs) -> Option<u64> {
    match (args.count, args.rate, args.duration) {
        (Some(n), _, _) => Some(n),
        (None, Some(rate), Some(d)) => Some((rate * d.as_secs_f64()).round() as u64),
        _ => None,
    }
}

pub async fn run(cli: &Cli, args: &GenerateArgs) -> Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            // The first signal stops producing and flushes what was queued (which waits for
            // the broker, up to 30 s when it is gone); a second one quits at once.
            for first in [true, false] {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
                if first {
                    stop.store(true, Ordering::SeqCst);
                } else {
                    let _ = writeln!(
                        std::io::stderr(),
                        "omnibus: interrupted again; quitting without waiting for the broker"
                    );
                    std::process::exit(130);
                }
            }
        });
    }
    let brokers = cli.brokers.clone();
    let kafka_settings = cli.kafka_settings();
    let topics = Topics::with_prefix(&args.topic_prefix);
    let total = planned(args);
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        match total {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec}, eta {eta}) {msg}",
                )
                .map_err(|e| Fail(e.to_string()))?,
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {pos} events ({per_sec}) {msg}")
                    .map_err(|e| Fail(e.to_string()))?,
            ),
        }
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    let (rate, count, duration, agents) = (args.rate, args.count, args.duration, args.agents);
    let seed = args.seed.unwrap_or_else(rand::random);
    let bar2 = bar.clone();
    let stop2 = stop.clone();
    let result = tokio::task::spawn_blocking(move || {
        produce(
            &brokers,
            &kafka_settings,
            &topics,
            rate,
            count,
            duration,
            agents,
            seed,
            &bar2,
            &stop2,
        )
    })
    .await
    .map_err(|e| Fail(format!("the generator stopped: {e}")))?;
    bar.finish_and_clear();
    let (per_kind, elapsed) = result?;
    let n: u64 = per_kind.iter().sum();
    if cli.format() == Format::Json {
        let summary = serde_json::json!({
            "events": n,
            "seconds": elapsed.as_secs_f64(),
            "routing_decisions": per_kind[Kind::RoutingDecision.index()],
            "actions": per_kind[Kind::AgentAction.index()],
            "transformations": per_kind[Kind::Transformation.index()],
            "performance_metrics": per_kind[Kind::PerformanceMetric.index()],
        });
        writeln!(std::io::stdout(), "{summary}")?;
    }
    let _ = writeln!(
        std::io::stderr(),
        "generated {n} events in {:.1}s ({:.0}/s): {} routing decisions, {} actions, {} transformations, {} performance metrics",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64().max(1e-9),
        per_kind[Kind::RoutingDecision.index()],
        per_kind[Kind::AgentAction.index()],
        per_kind[Kind::Transformation.index()],
        per_kind[Kind::PerformanceMetric.index()],
    );
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn produce(
    brokers: &str,
    kafka_settings: &[kafka_settings::KafkaSetting],
    topics: &Topics,
    rate: Option<f64>,
    count: Option<u64>,
    duration: Option<Duration>,
    agents: usize,
    seed: u64,
    bar: &ProgressBar,
    stop: &AtomicBool,
) -> Result<([u64; 4], Duration)> {
    let unreachable = || {
        Fail(format!(
            "the Kafka broker at {brokers} is not reachable - is it running?"
        ))
    };
    let producer = producer(brokers, kafka_settings).map_err(|e| Fail(e.to_string()))?;
    // Ask for the topics first: a missing topic or broker is one clear error, not a silent queue.
    for kind in Kind::ALL {
        let topic = topics.name(kind);
        let md = producer
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .map_err(|_| unreachable())?;
        let exists = md
            .topics()
            .iter()
            .any(|t| t.name() == topic && !t.partitions().is_empty());
        if !exists {
            return Err(Fail(format!(
                "topic {topic} does not exist on {brokers} (scripts/dev-services up creates the default topics)"
            )));
        }
    }
    let mut generator = EventGenerator::new(agents, seed);
    let mut per_kind = [0u64; 4];
    let start = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed)
        && count.is_none_or(|c| sent < c)
        && duration.is_none_or(|d| start.elapsed() < d)
    {
        if let Some(rate) = rate {
            // Paced against the start, so short stalls are caught up.
            let due = start + Duration::from_secs_f64(sent as f64 / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep((due - now).min(Duration::from_millis(200)));
                continue;
            }
        }
        let event = generator.next_event(chrono::Utc::now());
        let mut record = BaseRecord::to(topics.name(event.kind))
            .key(&event.key)
            .payload(&event.payload);
        let mut queued = true;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                // A full queue (a broker gone quiet) must not hold off Ctrl-C.
                Err(_) if stop.load(Ordering::Relaxed) => {
                    queued = false;
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(Fail(format!("Kafka refused an event: {e}"))),
            }
        }
        if !queued {
            break;
        }
        per_kind[event.kind.index()] += 1;
        sent += 1;
        bar.inc(1);
    }
    bar.set_message("flushing");
    settle(&producer, Duration::from_secs(30)).map_err(|e| match e {
        GenerateError::Kafka(_) => unreachable(),
        e => Fail(format!("{e} (of {sent}, to the broker at {brokers})")),
    })?;
    Ok((per_kind, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn rates_are_positive_and_not_absurdly_slow() {
        assert_eq!(parse_rate("5000"), Ok(5000.0));
        assert_eq!(parse_rate("0.001"), Ok(0.001));
        for bad in ["0", "-1", "1e-20", "NaN", "inf", "fast"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_planned_total_drives_the_bar() {
        let parse = |args: &[&str]| {
            let cli = super::super::Cli::try_parse_from(
                ["omnibus", "generate"].iter().chain(args.iter()).copied(),
            )
            .unwrap();
            match cli.command {
                super::super::Command::Generate(g) => g,
                _ => unreachable!(),
            }
        };
        assert_eq!(planned(&parse(&["--count", "100"])), Some(100));
        assert_eq!(
            planned(&parse(&["--rate", "50", "--duration", "2m"])),
            Some(6000)
        );
        assert_eq!(planned(&parse(&["--rate", "50"])), None);
        assert_eq!(planned(&parse(&["--duration", "10s"])), None);
    }

    #[test]
    fn at_least_one_agent() {
        let parse = |agents: &str| {
            super::super::Cli::try_parse_from(["omnibus", "generate", "--agents", agents])
        };
        assert!(parse("1").is_ok());
        let err = parse("0").unwrap_err().to_string();
        assert!(err.contains("--agents"), "{err}");
        assert!(parse("-3").is_err());
    }
}
