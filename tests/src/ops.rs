//! Helpers for the operations tests (`tests/tests/ops_*.rs`): tokens, an authenticating
//! channel, a tiny HTTP/1.1 GET for the metrics endpoint, Prometheus text parsing, and
//! self-signed TLS material.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A fresh random token (long enough for db-svc's minimum).
pub fn new_token(label: &str) -> String {
    format!("{label}-{}", uuid::Uuid::new_v4().simple())
}

/// Adds `authorization: Bearer <token>` to every call (the client library's interceptor).
pub use omnibus_client::connect::Bearer;

/// An HTTP response from [`http_get`].
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

/// `GET path` over HTTP/1.1 (connection: close) to `addr`, with a 5 s limit.
pub async fn http_get(addr: &str, path: &str) -> Result<HttpReply> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .context("HTTP GET timed out")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of HTTP headers")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok(HttpReply { status, body })
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("bad chunk")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).context("short chunk")?);
        body = rest.get(size + 2..).context("short chunk")?;
    }
}

/// Polls `GET path` until it answers `status`, up to `timeout`.
pub async fn wait_http_status(
    addr: &str,
    path: &str,
    status: u16,
    timeout: Duration,
) -> Result<HttpReply> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = http_get(addr, path).await;
        match last {
            Ok(reply) if reply.status == status => return Ok(reply),
            _ if Instant::now() >= deadline => {
                bail!("GET {path} did not answer {status} within {timeout:?}: {last:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Scrapes `addr` until `check` holds for the samples (the samplers run every second).
pub async fn wait_metrics(
    addr: &str,
    what: &str,
    check: impl Fn(&std::collections::BTreeMap<String, f64>) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = http_get(addr, "/metrics").await.unwrap();
        if check(&parse_prometheus(&reply.body)) {
            return reply.body;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}:\n{}",
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The samples of a Prometheus text exposition: `name{labels}` -> value, labels sorted.
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let key = match series.split_once('{') {
            Some((name, labels)) => {
                let mut labels: Vec<&str> = labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .collect();
                labels.sort();
                format!("{name}{{{}}}", labels.join(","))
            }
            None => series.to_string(),
        };
        out.insert(key, value);
    }
    out
}

/// A sample's value, by name and labels (`("grpc_code", "OK")`, any order).
pub fn sample(samples: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    labels.sort();
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{}}}", labels.join(","))
    };
    samples.get(&key).copied()
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files in a fresh
/// directory under `target/test-logs/`.
pub struct TestCert {
    pub dir: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    /// PKCS #8.
    pub key_der: Vec<u8>,
}

impl TestCert {
    pub fn generate() -> Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/test-logs")
            .join(format!("tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let cert_pem = cert.cert.pem();
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        std::fs::write(&cert_path, &cert_pem)?;
        std::fs::write(&key_path, cert.key_pair.serialize_pem())?;
        Ok(Self {
            dir,
            cert_path,
            key_path,
            cert_pem,
            cert_der: cert.cert.der().to_vec(),
            key_der: cert.key_pair.serialize_der(),
        })
    }
}

impl TestCert {
    /// db-svc on a fresh database, serving gRPC over TLS with this certificate, plus `args`.
    /// Not waited for: the harness's readiness probe speaks plaintext; poll over TLS instead.
    pub async fn spawn_db_svc(
        &self,
        args: &[&str],
    ) -> (crate::TestDatabase, crate::ServiceProcess) {
        let db = crate::TestDatabase::create()
            .await
            .expect("create test database");
        let svc = crate::ServiceSpec::new("db-svc")
            .env("DATABASE_URL", &db.url)
            .args([
                "--tls-cert",
                self.cert_path.to_str().expect("UTF-8 path"),
                "--tls-key",
                self.key_path.to_str().expect("UTF-8 path"),
                "--shutdown-grace",
                "2s",
            ])
            .args(args.iter().copied())
            .spawn()
            .expect("spawn db-svc");
        (db, svc)
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
