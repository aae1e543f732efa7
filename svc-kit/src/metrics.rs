//! Prometheus metrics on a separate HTTP port (`--metrics-listen`), beside `/livez` and
//! `/readyz`.
//!
//! Metrics are recorded through the `metrics` facade (re-exported here: services write
//! `svc_kit::metrics::counter!("name", "label" => value).increment(1)` without a dependency of
//! their own) into a Prometheus recorder installed once per process. Without
//! `--metrics-listen` no recorder is installed and recording costs nothing.
//!
//! | path | answers |
//! |---|---|
//! | `/metrics` | Prometheus text format |
//! | `/livez` | 200 while the process runs |
//! | `/readyz` | 200 when health is SERVING, else 503 |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use crate::{Health, Shutdown};

/// How long a metrics client has to send its request headers (hyper's default without a
/// timer is forever: an idle or half-sent connection would hold a descriptor for good).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause after a failed accept (out of descriptors fails them all at once).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Histogram buckets (seconds) for every `*_seconds` metric: 0.5 ms to 60 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (idempotent). Call it early in start-up when
/// metrics are wanted, so counters recorded before the server starts are kept.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the metrics recorder");
                    None
                }
            }
        })
        .as_ref()
}

/// Whether metrics are being recorded.
pub fn enabled() -> bool {
    HANDLE.get().is_some_and(Option::is_some)
}

fn describe() {
    describe_counter!(
        "grpc_server_started_total",
        "RPCs started on the server, by grpc_service and grpc_method."
    );
    describe_counter!(
        "grpc_server_handled_total",
        "RPCs completed on the server, by grpc_service, grpc_method and grpc_code."
    );
    describe_histogram!(
        "grpc_server_handling_seconds",
        metrics::Unit::Seconds,
        "Time from request headers to the final status (streams: until the stream ends)."
    );
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

fn route(path: &str, handle: &PrometheusHandle, health: &Health) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        "/livez" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if health.is_serving() => text(StatusCode::OK, "text/plain", "SERVING\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "NOT_SERVING\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Binds `addr` and serves `/metrics`, `/livez`, `/readyz` over HTTP/1.1 until `shutdown`.
/// The endpoint keeps answering through the shutdown's delay and drain (`/livez` 200,
/// `/readyz` 503, a last scrape); the caller aborts the returned task once the server stops.
pub async fn bind(
    addr: SocketAddr,
    health: Health,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    let Some(handle) = install() else {
        return Err(std::io::Error::other("metrics recorder unavailable"));
    };
    tracing::info!(%local, "metrics endpoint listening (/metrics, /livez, /readyz)");
    Ok(tokio::spawn(async move {
        // Histograms are drained into their buckets by upkeep.
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            let stream = tokio::select! {
                _ = upkeep.tick() => { handle.run_upkeep(); continue; }
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors (EMFILE) fails every accept at once: pause rather
                        // than spin a core until some close.
                        tracing::debug!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let health = health.clone();
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let response = route(request.uri().path(), handle, &health);
                    async move { Ok::<_, Infallible>(response) }
                });
            tokio::spawn(async move {
                // A client that never finishes its request headers is dropped.
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "metrics endpoint: connection error");
                }
            });
        }
    }))
}

/// Runs `sample` every `every` until `shutdown`, when metrics are on (else does nothing): for
/// gauges and counters read from a service's own state (queue depths, positions, pools).
pub fn spawn_sampler(
    every: Duration,
    shutdown: Shutdown,
    mut sample: impl FnMut() + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    if !enabled() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.triggered() => break,
                _ = tick.tick() => sample(),
            }
        }
    }))
}
