//! db-svc vs direct sqlx, measured in the same run (`scripts/bench-db`).
//!
//! db-svc runs in-process (`db_svc::run_until`) on a free port against a fresh database; each
//! benchmark client has its own gRPC connection. The baseline issues the same SQL statements
//! with sqlx from a pool of the same size (32, db-svc's default), decoding rows into typed tuples. Workloads:
//! single-row Insert (rows returned), 100-row Insert (count only), Query by the indexed
//! agent_name with limit 100, Count by agent_name; at 1, 16 and 64 concurrent clients.
//!
//! Environment: DATABASE_URL (an admin URL of the PostgreSQL server; default
//! postgres://postgres@127.0.0.1:5432/postgres), BENCH_SECONDS (measured per side and row,
//! default 4, in alternating slices so background load hits both sides alike), and for
//! profiling one cell: BENCH_ONLY (query, count, insert1, insert100, floor; comma-separated) and
//! BENCH_CLIENTS (e.g. 16); BENCH_SIDE=svc or direct measures one side only;
//! BENCH_COALESCE_INSERTS sets db-svc's `--coalesce-inserts` (0 = every insert alone);
//! BENCH_METRICS_LISTEN (e.g. 127.0.0.1:9901) serves db-svc's Prometheus metrics during the run;
//! BENCH_PLAIN_CHANNELS=1 connects with plain tonic endpoints instead of the Rust client's;
//! BENCH_SVC_ARGS adds db-svc flags (whitespace-separated), for A/B runs of a setting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use db_svc::config::Config;
use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use svc_kit::Shutdown;
use tonic::transport::Channel;

// db-svc runs in this process: the allocator of its binary (the sqlx baseline gets it too).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POOL: u32 = 32;
const AGENTS: usize = 50;
const ROWS_PER_AGENT: usize = 200;
const CLIENT_COUNTS: [usize; 3] = [1, 16, 64];
/// Alternating slices per side and measurement.
const ROUNDS: u32 = 4;

const ACTION_COLUMNS: &str = "\"id\", \"correlation_id\", \"agent_name\", \"action_type\", \
    \"action_name\", \"action_details\", \"debug_mode\", \"duration_ms\", \"created_at\"";

type ActionRow = (
    uuid::Uuid,
    uuid::Uuid,
    String,
    String,
    String,
    Option<sqlx::types::Json<serde_json::Value>>,
    Option<bool>,
    Option<i32>,
    Option<chrono::NaiveDateTime>,
);

/// The same row for the db-svc side, read from the response with the typed-row decoder
/// (`omnibus_proto::rows`), as a Rust caller of `DbClient::query_rows` gets it.
#[derive(serde::Deserialize)]
#[allow(dead_code)] // decoded to be compared like for like with ActionRow, not read
struct ActionRecord {
    id: uuid::Uuid,
    correlation_id: uuid::Uuid,
    agent_name: String,
    action_type: String,
    action_name: String,
    action_details: Option<serde_json::Value>,
    debug_mode: Option<bool>,
    duration_ms: Option<i32>,
    // As a Rust caller would read db-svc's timestamps (`omnibus_proto::timestamp`).
    #[serde(default, with = "omnibus_proto::timestamp::option")]
    created_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Clone, Copy, Debug)]
enum Workload {
    Insert1,
    Insert100,
    Query,
    Count,
}

impl Workload {
    fn key(self) -> &'static str {
        match self {
            Workload::Insert1 => "insert1",
            Workload::Insert100 => "insert100",
            Workload::Query => "query",
            Workload::Count => "count",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Workload::Insert1 => "Insert, 1 row",
            Workload::Insert100 => "Insert, 100 rows",
            Workload::Query => "Query by agent_name, limit 100",
            Workload::Count => "Count by agent_name",
        }
    }
}

/// Latencies of the operations that started inside the measured window, sorted, and the CPU
/// time used meanwhile.
#[derive(Default)]
struct Stats {
    latencies_us: Vec<u64>,
    cpu: Cpu,
}

/// CPU seconds: this process (benchmark clients, plus db-svc when it is the side measured) and
/// the whole machine (adds PostgreSQL, and anything else running).
#[derive(Clone, Copy, Default)]
struct Cpu {
    process: f64,
    machine: f64,
}

impl Cpu {
    fn now() -> Cpu {
        let ticks = 100.0; // USER_HZ on Linux
        let process = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the parenthesised command name; utime and stime are 14 and 15.
                let rest = s.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks)
            })
            .unwrap_or(0.0);
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?;
                let f: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: busy = all but idle, iowait.
                let busy: f64 = f.iter().take(8).sum::<f64>() - f.get(3)? - f.get(4)?;
                Some(busy / ticks)
            })
            .unwrap_or(0.0);
        Cpu { process, machine }
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            process: self.process - start.process,
            machine: self.machine - start.machine,
        }
    }

    fn add(&mut self, other: Cpu) {
        self.process += other.process;
        self.machine += other.machine;
    }
}

impl Stats {
    /// Microseconds of CPU per operation: (this process, whole machine).
    fn cpu_us_per_op(&self) -> (f64, f64) {
        let n = self.latencies_us.len().max(1) as f64;
        (self.cpu.process * 1e6 / n, self.cpu.machine * 1e6 / n)
    }

    /// Operations per second over the measured window.
    fn throughput(&self, window: Duration) -> f64 {
        self.latencies_us.len() as f64 / window.as_secs_f64()
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

fn action_struct(agent: &str) -> prost_types::Struct {
    use prost_types::value::Kind;
    let s = |v: String| prost_types::Value {
        kind: Some(Kind::StringValue(v)),
    };
    prost_types::Struct {
        fields: [
            ("correlation_id", s(uuid::Uuid::new_v4().to_string())),
            ("agent_name", s(agent.to_string())),
            ("action_type", s("tool_call".into())),
            ("action_name", s("read_file".into())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    }
}

/// The statement db-svc plans for an n-row insert of `action_struct` rows (checked at start).
fn insert_sql(n: usize, returning: bool) -> String {
    let mut sql = String::from(
        "INSERT INTO \"agent_actions\" (\"correlation_id\", \"agent_name\", \"action_type\", \
         \"action_name\", \"created_at\") VALUES ",
    );
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        let b = i * 4;
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, now())",
            b + 1,
            b + 2,
            b + 3,
            b + 4
        ));
    }
    if returning {
        sql.push_str(" RETURNING ");
        sql.push_str(ACTION_COLUMNS);
    }
    sql
}

fn query_sql() -> String {
    format!("SELECT {ACTION_COLUMNS} FROM \"agent_actions\" WHERE \"agent_name\" = $1 LIMIT $2")
}

const COUNT_SQL: &str = "SELECT count(*) FROM \"agent_actions\" WHERE \"agent_name\" = $1";

async fn svc_op(channel: Channel, w: Workload, i: u64) {
    let mut client = DatabaseServiceClient::new(channel.clone());
    match w {
        Workload::Insert1 => {
            let r = client
                .insert(pb::InsertRequest {
                    table: "agent_actions".into(),
                    rows: vec![action_struct("bench-insert")],
                    ..Default::default()
                })
                .await
                .expect("insert");
            assert_eq!(r.into_inner().rows.len(), 1);
        }
        Workload::Insert100 => {
            let r = client
                .insert(pb::InsertRequest {
                    table: "agent_actions".into(),
                    rows: (0..100).map(|_| action_struct("bench-bulk")).collect(),
                    count_only: true,
                    ..Default::default()
                })
                .await
                .expect("insert 100");
            assert_eq!(r.into_inner().affected, 100);
        }
        Workload::Query => {
            use prost_types::value::Kind;
            let agent = format!("agent-{}", i as usize % AGENTS);
            let r = omnibus_proto::rows::query_rows(
                channel,
                pb::QueryRequest {
                    table: "agent_actions".into(),
                    r#where: Some(prost_types::Struct {
                        fields: [(
                            "agent_name".to_string(),
                            prost_types::Value {
                                kind: Some(Kind::StringValue(agent)),
                            },
                        )]
                        .into_iter()
                        .collect(),
                    }),
                    limit: Some(100),
                    ..Default::default()
                },
            )
            .await
            .expect("query");
            let rows: Vec<ActionRecord> = r.into_inner().decode_rows().expect("typed rows");
            assert_eq!(rows.len(), 100);
        }
        Workload::Count => {
            use prost_types::value::Kind;
            let agent = format!("agent-{}", i as usize % AGENTS);
            let r = client
                .count(pb::CountRequest {
                    table: "agent_actions".into(),
                    r#where: Some(prost_types::Struct {
                        fields: [(
                            "agent_name".to_string(),
                            prost_types::Value {
                                kind: Some(Kind::StringValue(agent)),
                            },
                        )]
                        .into_iter()
                        .collect(),
                    }),
                    ..Default::default()
                })
                .await
                .expect("count");
            assert_eq!(r.into_inner().count, ROWS_PER_AGENT as u64);
        }
    }
}

async fn direct_op(pool: &PgPool, w: Workload, i: u64, sqls: &Sqls) {
    match w {
        Workload::Insert1 => {
            let rows: Vec<ActionRow> = sqlx::query_as(&sqls.insert1)
                .bind(uuid::Uuid::new_v4())
                .bind("bench-insert")
                .bind("tool_call")
                .bind("read_file")
                .fetch_all(pool)
                .await
                .expect("direct insert");
            assert_eq!(rows.len(), 1);
        }
        Workload::Insert100 => {
            let mut q = sqlx::query(&sqls.insert100);
            for _ in 0..100 {
                q = q
                    .bind(uuid::Uuid::new_v4())
                    .bind("bench-bulk")
                    .bind("tool_call")
                    .bind("read_file");
            }
            let done = q.execute(pool).await.expect("direct insert 100");
            assert_eq!(done.rows_affected(), 100);
        }
        Workload::Query => {
            let rows: Vec<ActionRow> = sqlx::query_as(&sqls.query)
                .bind(format!("agent-{}", i as usize % AGENTS))
                .bind(100i64)
                .fetch_all(pool)
                .await
                .expect("direct query");
            assert_eq!(rows.len(), 100);
        }
        Workload::Count => {
            let n: i64 = sqlx::query_scalar(COUNT_SQL)
                .bind(format!("agent-{}", i as usize % AGENTS))
                .fetch_one(pool)
                .await
                .expect("direct count");
            assert_eq!(n, ROWS_PER_AGENT as i64);
        }
    }
}

struct Sqls {
    insert1: String,
    insert100: String,
    query: String,
}

/// Runs `clients` workers and merges their latencies.
async fn measure<F, Fut>(clients: usize, make: F) -> Stats
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Vec<u64>> + Send + 'static,
{
    let mut tasks = Vec::new();
    for c in 0..clients {
        tasks.push(tokio::spawn(make(c)));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("worker"));
    }
    latencies.sort_unstable();
    Stats {
        latencies_us: latencies,
        cpu: Cpu::default(),
    }
}

/// The CPU counters at `at` (the start of a measured window), read by a task that sleeps
/// until then.
fn cpu_at(at: Instant) -> tokio::task::JoinHandle<Cpu> {
    tokio::spawn(async move {
        tokio::time::sleep_until(at.into()).await;
        Cpu::now()
    })
}

/// Loops `op` until `end`, recording latencies after `measure_from`.
async fn worker_loop<Op, OpFut>(measure_from: Instant, end: Instant, mut op: Op) -> Vec<u64>
where
    Op: FnMut(u64) -> OpFut,
    OpFut: std::future::Future<Output = ()>,
{
    let mut out = Vec::with_capacity(4096);
    let mut i = 0u64;
    loop {
        let t = Instant::now();
        if t >= end {
            return out;
        }
        op(i).await;
        i += 1;
        if t >= measure_from {
            out.push(t.elapsed().as_micros() as u64);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    let duration = Duration::from_secs_f64(seconds);
    let warmup = Duration::from_millis(200);
    let admin_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());

    // A database of its own.
    let name = format!(
        "omnibus_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await?;
    let mut url = url::Url::parse(&admin_url)?;
    url.set_path(&name);
    let url = url.to_string();

    let result = run(&url, duration, warmup).await;

    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    result
}

async fn run(url: &str, duration: Duration, warmup: Duration) -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let pool_size = POOL.to_string();
    let mut args = vec![
        "db-svc",
        "--database-url",
        url,
        "--listen",
        &listen,
        "--db-max-connections",
        &pool_size,
        "--shutdown-grace",
        "1s",
    ];
    // db-svc's defaults unless BENCH_COALESCE_INSERTS / BENCH_COALESCE_QUERIES set them
    // (0 = every insert / query alone).
    let coalesce = std::env::var("BENCH_COALESCE_INSERTS").ok();
    let coalesce_queries = std::env::var("BENCH_COALESCE_QUERIES").ok();
    if let Some(n) = &coalesce {
        args.extend(["--coalesce-inserts", n.as_str()]);
    }
    if let Some(n) = &coalesce_queries {
        args.extend(["--coalesce-queries", n.as_str()]);
    }
    // Any other db-svc flags, for A/B runs of a setting (e.g. "--db-ping-after-idle 0s").
    let extra = std::env::var("BENCH_SVC_ARGS").unwrap_or_default();
    args.extend(extra.split_whitespace());
    // db-svc's Prometheus endpoint, to watch it during a run (e.g. the shared statements' sizes).
    let metrics_listen = std::env::var("BENCH_METRICS_LISTEN").ok();
    if let Some(addr) = &metrics_listen {
        args.extend(["--metrics-listen", addr.as_str()]);
    }
    eprintln!(
        "db-svc --coalesce-inserts {} --coalesce-queries {} {extra}",
        coalesce.as_deref().unwrap_or("(default)"),
        coalesce_queries.as_deref().unwrap_or("(default)")
    );
    let settings = svc_kit::config::parse_args_ignoring_env::<Config>(args)?
        .validate()
        .map_err(anyhow::Error::msg)?;
    let shutdown = Shutdown::new();
    let server = tokio::spawn(db_svc::run_until(settings, shutdown.clone()));

    // Wait for SERVING (migrations applied).
    let endpoint = format!("http://{listen}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = async {
            let channel = Channel::from_shared(endpoint.clone())?.connect().await?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let reply = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await?;
            anyhow::Ok(reply.into_inner().status)
        }
        .await;
        if matches!(status, Ok(s) if s == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "db-svc did not become SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pool = PgPoolOptions::new()
        .max_connections(POOL)
        .connect(url)
        .await?;
    // Seed the rows the queries and counts read.
    sqlx::query(&format!(
        "INSERT INTO agent_actions (correlation_id, agent_name, action_type, action_name, \
         action_details, duration_ms) \
         SELECT gen_random_uuid(), 'agent-' || (g % {AGENTS}), 'tool_call', 'read_file', \
         jsonb_build_object('n', g), g % 1000 FROM generate_series(1, {}) g",
        AGENTS * ROWS_PER_AGENT
    ))
    .execute(&pool)
    .await?;
    sqlx::query("ANALYZE agent_actions").execute(&pool).await?;

    let sqls = Arc::new(Sqls {
        insert1: insert_sql(1, true),
        insert100: insert_sql(100, false),
        query: query_sql(),
    });
    check_same_sql(&pool, &sqls).await?;

    // One gRPC connection per client, set up as the Rust client's (`omnibus_client`, which
    // `DbClient` uses: 1 MiB HTTP/2 frames, so a 100-row response is one DATA frame), or as a
    // plain tonic endpoint with the protocol's 16 KiB frames (BENCH_PLAIN_CHANNELS=1).
    let plain = std::env::var("BENCH_PLAIN_CHANNELS").is_ok_and(|v| v == "1");
    let mut channels = Vec::new();
    for _ in 0..*CLIENT_COUNTS.iter().max().unwrap_or(&1) {
        let endpoint = if plain {
            Channel::from_shared(endpoint.clone())?
        } else {
            omnibus_client::connect::ConnectOptions::default()
                .endpoint(&endpoint, Duration::from_secs(5))?
        };
        channels.push(endpoint.connect().await?);
    }

    println!(
        "db-svc vs direct sqlx (pool {POOL}), {:.1} s measured per side and row, in {ROUNDS} \
         alternating slices each after {} ms warm-up\n",
        duration.as_secs_f64(),
        warmup.as_millis()
    );
    println!(
        "| workload | clients | db-svc ops/s | p50 ms | p99 ms | sqlx ops/s | p50 ms | p99 ms | throughput ratio | added p50 ms | CPU µs/op db-svc side: process / machine | sqlx side: process / machine |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let seq = Arc::new(AtomicU64::new(0));
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    // Profiling aid: measure one side only ("svc" or "direct").
    let side = std::env::var("BENCH_SIDE").unwrap_or_default();
    let only_clients: Option<usize> = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok());
    for w in [
        Workload::Query,
        Workload::Count,
        Workload::Insert1,
        Workload::Insert100,
    ] {
        if !only.is_empty() && !only.split(',').any(|k| k.trim() == w.key()) {
            continue;
        }
        for clients in CLIENT_COUNTS {
            if only_clients.is_some_and(|c| c != clients) {
                continue;
            }
            // Alternate short slices of both sides, so background load on this shared
            // machine hits both alike.
            let slice = duration / ROUNDS;
            let mut direct = Stats::default();
            let mut svc = Stats::default();
            for _ in 0..ROUNDS {
                let start = Instant::now();
                let (measure_from, end) = (start + warmup, start + warmup + slice);
                let cpu_start = cpu_at(measure_from);
                let d = measure(if side == "svc" { 0 } else { clients }, |_| {
                    let (pool, sqls, seq) = (pool.clone(), sqls.clone(), seq.clone());
                    async move {
                        worker_loop(measure_from, end, |_| {
                            let (pool, sqls) = (pool.clone(), sqls.clone());
                            let i = seq.fetch_add(1, Ordering::Relaxed);
                            async move { direct_op(&pool, w, i, &sqls).await }
                        })
                        .await
                    }
                })
                .await;
                direct
                    .cpu
                    .add(Cpu::now().since(cpu_start.await.unwrap_or_default()));
                direct.latencies_us.extend(d.latencies_us);
                let start = Instant::now();
                let (measure_from, end) = (start + warmup, start + warmup + slice);
                let cpu_start = cpu_at(measure_from);
                let v = measure(if side == "direct" { 0 } else { clients }, |c| {
                    let channel = channels[c].clone();
                    let seq = seq.clone();
                    async move {
                        worker_loop(measure_from, end, |_| {
                            let channel = channel.clone();
                            let i = seq.fetch_add(1, Ordering::Relaxed);
                            async move { svc_op(channel, w, i).await }
                        })
                        .await
                    }
                })
                .await;
                svc.cpu
                    .add(Cpu::now().since(cpu_start.await.unwrap_or_default()));
                svc.latencies_us.extend(v.latencies_us);
            }
            direct.latencies_us.sort_unstable();
            svc.latencies_us.sort_unstable();
            let svc_tp = svc.throughput(duration);
            let direct_tp = direct.throughput(duration);
            let (svc_proc, svc_machine) = svc.cpu_us_per_op();
            let (direct_proc, direct_machine) = direct.cpu_us_per_op();
            println!(
                "| {} | {clients} | {svc_tp:.0} | {:.2} | {:.2} | {direct_tp:.0} | {:.2} | {:.2} | {:.2} | {:+.2} | {svc_proc:.0} / {svc_machine:.0} | {direct_proc:.0} / {direct_machine:.0} |",
                w.label(),
                svc.percentile_ms(0.5),
                svc.percentile_ms(0.99),
                direct.percentile_ms(0.5),
                direct.percentile_ms(0.99),
                svc_tp / direct_tp,
                svc.percentile_ms(0.5) - direct.percentile_ms(0.5),
            );
        }
    }

    if only.is_empty() || only.split(',').any(|k| k.trim() == "floor") {
        grpc_floor(&channels, duration, warmup, only_clients).await;
    }

    shutdown.trigger();
    let _ = server.await;
    pool.close().await;
    Ok(())
}

/// The cost of the gRPC hop alone: `grpc.health.v1.Health/Check` through the same server,
/// layers and connections, no database. What db-svc adds beyond it is its own work.
async fn grpc_floor(
    channels: &[Channel],
    duration: Duration,
    warmup: Duration,
    only_clients: Option<usize>,
) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    println!(
        "\ngRPC floor: `grpc.health.v1.Health/Check` on the same server and connections (no database)\n"
    );
    println!("| clients | calls/s | p50 ms | p99 ms | CPU µs/call: process / machine |");
    println!("|---:|---:|---:|---:|---:|");
    for clients in CLIENT_COUNTS {
        if only_clients.is_some_and(|c| c != clients) {
            continue;
        }
        let start = Instant::now();
        let (measure_from, end) = (start + warmup, start + warmup + duration);
        let cpu_start = cpu_at(measure_from);
        let mut stats = measure(clients, |c| {
            let client = HealthClient::new(channels[c].clone());
            async move {
                worker_loop(measure_from, end, |_| {
                    let mut client = client.clone();
                    async move {
                        client
                            .check(HealthCheckRequest {
                                service: String::new(),
                            })
                            .await
                            .expect("health check");
                    }
                })
                .await
            }
        })
        .await;
        stats.cpu = Cpu::now().since(cpu_start.await.unwrap_or_default());
        let (process, machine) = stats.cpu_us_per_op();
        println!(
            "| {clients} | {:.0} | {:.2} | {:.2} | {process:.0} / {machine:.0} |",
            stats.throughput(duration),
            stats.percentile_ms(0.5),
            stats.percentile_ms(0.99),
        );
    }
}

/// The baseline must run the statements db-svc runs: compare with db-svc's own planner.
async fn check_same_sql(pool: &PgPool, sqls: &Sqls) -> anyhow::Result<()> {
    use db_svc::ops::{Criteria, InsertSpec, QuerySpec, plan_insert, plan_query};
    let catalog = db_svc::catalog::Catalog::new(vec!["agent_actions".into()]);
    catalog.refresh(pool).await?;
    let table = catalog
        .cached("agent_actions")
        .ok_or_else(|| anyhow::anyhow!("agent_actions missing"))?;
    let row = |agent: &str| {
        serde_json::json!({"correlation_id": uuid::Uuid::nil().to_string(), "agent_name": agent,
            "action_type": "tool_call", "action_name": "read_file"})
        .as_object()
        .cloned()
        .unwrap_or_default()
    };
    let one = plan_insert(
        &table,
        &InsertSpec {
            table: "agent_actions".into(),
            rows: vec![row("x")],
            count_only: false,
        },
    )?;
    anyhow::ensure!(one.sql == sqls.insert1, "insert1 differs: {}", one.sql);
    let bulk = plan_insert(
        &table,
        &InsertSpec {
            table: "agent_actions".into(),
            rows: (0..100).map(|_| row("x")).collect(),
            count_only: true,
        },
    )?;
    anyhow::ensure!(bulk.sql == sqls.insert100, "insert100 differs");
    let query = plan_query(
        &table,
        &QuerySpec {
            table: "agent_actions".into(),
            criteria: Criteria {
                equals: row("x")
                    .into_iter()
                    .filter(|(k, _)| k == "agent_name")
                    .collect(),
                filter: None,
            },
            ..Default::default()
        },
        Some(100),
    )?;
    anyhow::ensure!(query.sql == sqls.query, "query differs: {}", query.sql);
    Ok(())
}
