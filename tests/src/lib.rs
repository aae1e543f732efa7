//! End-to-end test harness: starts the real service binaries as child processes on free ports,
//! against the real broker (`KAFKA_BROKERS`) and PostgreSQL (`DATABASE_URL`) that
//! `scripts/dev-services up` provides, with isolated topics and databases per test.

pub mod bus;
pub mod cli;
pub mod consumer;
pub mod db;
pub mod ops;
pub mod proxy;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Settings every child process would otherwise inherit from the test environment.
const SCRUBBED_ENV: &[&str] = &[
    "KAFKA_BROKERS",
    "KAFKA_BOOTSTRAP_SERVERS",
    "DATABASE_URL",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DATABASE",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "CONSUMER_SVC_LISTEN",
    "DB_SVC_LISTEN",
];

/// The broker the tests use (from `scripts/dev-services`).
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// An admin URL for the PostgreSQL server the tests use (any database on it).
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `host:port` of the PostgreSQL server the tests use (from [`admin_database_url`]): an
/// address that answers, but not with gRPC.
pub fn postgres_addr() -> String {
    use std::str::FromStr;
    let options = sqlx::postgres::PgConnectOptions::from_str(&admin_database_url())
        .expect("DATABASE_URL is a PostgreSQL URL");
    format!("{}:{}", options.get_host(), options.get_port())
}

/// The workspace's target directory, where `cargo build --bins` put the service binaries.
fn target_dir() -> PathBuf {
    // current_exe = target/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target profile directory")
}

/// Path of a workspace binary built next to the test executable.
pub fn bin_path(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (`cargo build --workspace --bins`, done by scripts/test)",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

fn log_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-logs");
    std::fs::create_dir_all(&dir).expect("create target/test-logs");
    dir
}

/// A service binary running as a child process; killed when dropped.
pub struct ServiceProcess {
    pub name: String,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    child: Child,
}

/// What to start.
pub struct ServiceSpec {
    bin: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ServiceSpec {
    pub fn new(bin: &str) -> Self {
        Self {
            bin: bin.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the binary on a free port (`--listen`), logging to `target/test-logs/`.
    pub fn spawn(self) -> Result<ServiceProcess> {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log_path = log_dir().join(format!(
            "{}-{}-{}.log",
            self.bin,
            port,
            uuid::Uuid::new_v4().simple()
        ));
        let log = std::fs::File::create(&log_path)?;
        let mut cmd = Command::new(bin_path(&self.bin));
        for key in SCRUBBED_ENV {
            cmd.env_remove(key);
        }
        cmd.arg("--listen")
            .arg(addr.to_string())
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().with_context(|| format!("spawn {}", self.bin))?;
        Ok(ServiceProcess {
            name: self.bin,
            addr,
            log_path,
            child,
        })
    }
}

impl ServiceProcess {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The child's process id (for `/proc/<pid>/...`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// A gRPC channel to the service (connects lazily).
    pub fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.endpoint())
            .expect("valid endpoint")
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy()
    }

    /// The health status of `service` ("" = whole server), or an error if it does not answer.
    pub async fn health(&self, service: &str) -> Result<ServingStatus> {
        let mut client = HealthClient::new(self.channel());
        let reply = tokio::time::timeout(
            Duration::from_secs(3),
            client.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .context("health check timed out")??;
        Ok(reply.into_inner().status())
    }

    /// Waits until `service` reports `want`, failing early if the process exits.
    pub async fn wait_health(
        &mut self,
        service: &str,
        want: ServingStatus,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before reporting {want:?}; log:\n{}",
                    self.name,
                    self.logs()
                );
            }
            match self.health(service).await {
                Ok(status) if status == want => return Ok(()),
                Ok(status) => last = format!("{status:?}"),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not report {want:?} within {timeout:?} (last: {last}); log:\n{}",
                    self.name,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the whole server reports SERVING.
    pub async fn wait_serving(&mut self) -> Result<()> {
        self.wait_health("", ServingStatus::Serving, Duration::from_secs(60))
            .await
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) -> Result<()> {
        self.signal("TERM")
    }

    /// Freezes the process (SIGSTOP): it sees nothing of the world until [`Self::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal("STOP")
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) -> Result<()> {
        self.signal("CONT")
    }

    fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{name} {} failed", self.child.id());
        }
        Ok(())
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a binary to completion (for start-up errors), returning its exit status and output.
pub fn run_to_exit(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Result<(ExitStatus, String)> {
    let mut cmd = Command::new(bin_path(bin));
    for key in SCRUBBED_ENV {
        cmd.env_remove(key);
    }
    let out = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status, text))
}

/// A database of its own for one test, dropped afterwards.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> Result<Self> {
        let admin_url = admin_database_url();
        let name = format!(
            "omnibus_t_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut admin = url::Url::parse(&admin_url)?;
        let mut conn = sqlx_connect(&admin_url).await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .await?;
        admin.set_path(&name);
        Ok(Self {
            name,
            url: admin.to_string(),
            admin_url,
        })
    }

    /// A direct connection to this database (for checks behind the service's back).
    pub async fn connect(&self) -> sqlx::PgConnection {
        sqlx_connect(&self.url)
            .await
            .expect("connect to the test database")
    }
}

async fn sqlx_connect(url: &str) -> Result<sqlx::PgConnection> {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to PostgreSQL at {url} (run scripts/dev-services up)"))
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside any async context guarantee: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx_connect(&admin_url).await.ok()?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// Topic names of one test, all under a unique prefix.
pub struct TestTopics {
    pub prefix: String,
}

impl TestTopics {
    /// Creates `names` (with `partitions` each) under a fresh prefix; returns the full names
    /// through [`TestTopics::name`].
    pub async fn create(names: &[&str], partitions: i32) -> Result<Self> {
        Self::create_on(&kafka_brokers(), &Self::fresh_prefix(), names, partitions).await
    }

    /// A topic-name prefix no other test uses.
    pub fn fresh_prefix() -> String {
        format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..10])
    }

    /// Creates `names` under `prefix` on `brokers` (e.g. a private broker, again after it
    /// restarted empty).
    pub async fn create_on(
        brokers: &str,
        prefix: &str,
        names: &[&str],
        partitions: i32,
    ) -> Result<Self> {
        Self::create_or_keep_on(brokers, prefix, names, partitions, false).await
    }

    /// [`TestTopics::create_on`], keeping a topic that exists already (after a broker came
    /// back empty, a service's producer may have had its reply topics auto-created first).
    pub async fn ensure_on(
        brokers: &str,
        prefix: &str,
        names: &[&str],
        partitions: i32,
    ) -> Result<Self> {
        Self::create_or_keep_on(brokers, prefix, names, partitions, true).await
    }

    async fn create_or_keep_on(
        brokers: &str,
        prefix: &str,
        names: &[&str],
        partitions: i32,
        keep_existing: bool,
    ) -> Result<Self> {
        let prefix = prefix.to_string();
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        let full: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
        let topics: Vec<NewTopic<'_>> = full
            .iter()
            .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
            .collect();
        let results = admin
            .create_topics(
                &topics,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?;
        for result in results {
            match result {
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) if keep_existing => {
                }
                Err((topic, code)) => bail!("create topic {topic}: {code}"),
                Ok(_) => {}
            }
        }
        Ok(Self { prefix })
    }

    pub fn name(&self, base: &str) -> String {
        format!("{}{}", self.prefix, base)
    }
}

/// Output of one grpcurl run.
#[derive(Debug)]
pub struct GrpcurlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs grpcurl (installed by `scripts/dev-services grpcurl-bin`; scripts/test exports its
/// path as `OMNIBUS_GRPCURL`) with `args`, without a proto file (reflection only).
pub async fn grpcurl(args: &[&str]) -> Result<GrpcurlOutput> {
    let bin = std::env::var("OMNIBUS_GRPCURL").context(
        "OMNIBUS_GRPCURL is not set: run through scripts/test, or export \
         OMNIBUS_GRPCURL=$(scripts/dev-services grpcurl-bin)",
    )?;
    let out = tokio::process::Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("run grpcurl")?;
    Ok(GrpcurlOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
