//! Bus writes vs direct gRPC writes, measured in the same run (`scripts/bench-bus`).
//!
//! Starts the release db-svc binary (bus worker on) against a fresh database and fresh topics,
//! then measures single-row inserts of `agent_actions`:
//! - direct gRPC `Insert` (the baseline) and bus `INSERT` (structured form, through the client
//!   publisher: produce → db-svc → reply → match), at 1 and 64 requests in flight;
//! - throughput, p50/p99 latency (the bus's is the full round trip), and the bus/direct ratio.
//!
//! Environment: BENCH_SECONDS (per measurement, default 5), KAFKA_BROKERS, DATABASE_URL (from
//! scripts/dev-services).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use omnibus_client::bus::BusPublisher;
use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use omnibus_tests::TestDatabase;
use omnibus_tests::bus::{BusTopics, start_db_svc};
use parking_lot::Mutex;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Bus,
}

struct Measured {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn row() -> prost_types::Struct {
    use prost_types::value::Kind;
    let s = |v: &str| prost_types::Value {
        kind: Some(Kind::StringValue(v.to_string())),
    };
    prost_types::Struct {
        fields: [
            (
                "correlation_id".to_string(),
                s(&uuid::Uuid::new_v4().to_string()),
            ),
            ("agent_name".to_string(), s("bench-agent")),
            ("action_type".to_string(), s("tool_call")),
            ("action_name".to_string(), s("read_file")),
        ]
        .into_iter()
        .collect(),
    }
}

async fn measure(
    path: Path,
    in_flight: usize,
    seconds: f64,
    grpc: DatabaseServiceClient<tonic::transport::Channel>,
    bus: Arc<BusPublisher>,
) -> Measured {
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new(3).expect("histogram")));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (hist, errors, mut grpc, bus) =
            (hist.clone(), errors.clone(), grpc.clone(), bus.clone());
        workers.spawn(async move {
            while Instant::now() < deadline {
                let req = pb::InsertRequest {
                    table: "agent_actions".into(),
                    rows: vec![row()],
                    count_only: true,
                    request_id: uuid::Uuid::new_v4().to_string(),
                };
                let t = Instant::now();
                let ok = match path {
                    Path::Direct => grpc.insert(req).await.is_ok(),
                    Path::Bus => bus.call(&req, &req.request_id.clone(), None).await.is_ok(),
                };
                let us = t.elapsed().as_micros() as u64;
                if ok {
                    hist.lock().record(us.max(1)).ok();
                } else {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let h = hist.lock();
    Measured {
        throughput: h.len() as f64 / elapsed,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let db = TestDatabase::create().await?;
    let topics = BusTopics::create().await?;
    let group = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let svc = start_db_svc(&db, &topics, &group, &["--bus-concurrency", "128"]).await?;
    let grpc = DatabaseServiceClient::new(svc.channel());
    let bus = Arc::new(BusPublisher::connect(topics.client_config(Duration::from_secs(30))).await?);

    // Warm-up: the worker's group join, connection pools, the catalog.
    let warm_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < warm_until {
        let req = pb::InsertRequest {
            table: "agent_actions".into(),
            rows: vec![row()],
            count_only: true,
            ..Default::default()
        };
        bus.call(&req, &uuid::Uuid::new_v4().to_string(), None)
            .await?;
        grpc.clone().insert(req).await?;
    }

    println!("| in flight | path | inserts/s | p50 ms | p99 ms | errors |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut summary = Vec::new();
    for in_flight in [1usize, 64] {
        let direct = measure(Path::Direct, in_flight, seconds, grpc.clone(), bus.clone()).await;
        let via_bus = measure(Path::Bus, in_flight, seconds, grpc.clone(), bus.clone()).await;
        for (name, m) in [
            ("direct gRPC Insert", &direct),
            ("bus INSERT (round trip)", &via_bus),
        ] {
            println!(
                "| {in_flight} | {name} | {:.0} | {:.2} | {:.2} | {} |",
                m.throughput, m.p50_ms, m.p99_ms, m.errors
            );
        }
        summary.push((
            in_flight,
            via_bus.throughput / direct.throughput,
            via_bus.p50_ms,
            via_bus.p50_ms - direct.p50_ms,
        ));
    }
    println!();
    for (in_flight, ratio, p50, added) in summary {
        println!(
            "{in_flight} in flight: bus/direct throughput = {ratio:.2}, bus p50 round trip = {p50:.2} ms (+{added:.2} ms over direct)"
        );
    }
    drop(svc);
    Ok(())
}
