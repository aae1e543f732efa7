//! The tower layer in front of every gRPC service of a server. Per request, in order:
//!
//! 1. a `tracing` span with the caller's W3C `traceparent` trace id ([`crate::trace`]);
//! 2. metrics: `grpc_server_started_total`, and once the final status is known (trailers,
//!    trailers-only headers, or the caller going away) `grpc_server_handled_total` and
//!    `grpc_server_handling_seconds` by `grpc_service`, `grpc_method`, `grpc_code`;
//! 3. bearer-token authentication ([`crate::auth`]): UNAUTHENTICATED / PERMISSION_DENIED,
//!    logged with the method and peer, never the token;
//! 4. the request size limit: a request message whose length prefix exceeds
//!    `--max-recv-message-size` fails with RESOURCE_EXHAUSTED before it is buffered;
//! 5. the call's deadline and its connection's call slots ([`crate::deadline`]): a call waits
//!    for one of `--concurrency-per-connection` slots, then runs until its response starts,
//!    both within the shorter of its `grpc-timeout` and `--request-timeout` from its arrival,
//!    else DEADLINE_EXCEEDED; the handler finds the [`Deadline`] in the request's extensions;
//! 6. panic containment: a handler (or response stream) that panics answers its caller
//!    INTERNAL, and the panic is logged, instead of resetting the stream with no status (which
//!    clients report as CANCELLED or UNKNOWN). The server and every other call carry on.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::auth::{self, Decision, Scopes, Tokens};
use crate::deadline::{self, Deadline};
use crate::log_budget::LogBudget;
use crate::panic::{catch_panic, panic_message};

/// Authentication settings: tokens and which RPCs are writes.
#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub tokens: Tokens,
    pub scopes: Scopes,
}

#[derive(Debug)]
struct Shared {
    auth: Option<AuthConfig>,
    max_recv_message_size: usize,
    /// `--request-timeout` (none: only the caller's deadline).
    request_timeout: Option<Duration>,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct GrpcLayer {
    shared: Arc<Shared>,
}

impl GrpcLayer {
    /// `auth: None` lets every request through; metrics are recorded when a recorder is
    /// installed ([`crate::metrics::install`]).
    pub fn new(
        auth: Option<AuthConfig>,
        max_recv_message_size: usize,
        request_timeout: Option<Duration>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                auth,
                max_recv_message_size,
                request_timeout,
            }),
        }
    }
}

impl<S> Layer<S> for GrpcLayer {
    type Service = GrpcService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// `/package.Service/Method` -> (`package.Service`, `Method`).
///
/// Only methods the servers serve keep their names: any other path is `unknown`/`unknown`, so
/// that a client calling made-up paths cannot add a metrics series (labels) per call.
pub fn split_path(path: &str) -> (String, String) {
    let trimmed = path.trim_start_matches('/');
    match trimmed.split_once('/') {
        Some((service, method)) if is_served(path, service, method) => {
            (service.to_string(), method.to_string())
        }
        _ => ("unknown".to_string(), "unknown".to_string()),
    }
}

/// The omnibus services' methods, health and reflection.
fn is_served(path: &str, service: &str, method: &str) -> bool {
    match service {
        "grpc.health.v1.Health" => matches!(method, "Check" | "Watch"),
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            method == "ServerReflectionInfo"
        }
        _ => omnibus_proto::method_streaming(path).is_some(),
    }
}

/// The name Prometheus exporters of other gRPC implementations use for a code.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

fn status_code_in(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// One RPC being measured; records exactly once (on the final status, or on drop).
struct Observation {
    service: String,
    method: String,
    start: Instant,
    done: bool,
}

impl Observation {
    fn start(service: &str, method: &str) -> Self {
        if crate::metrics::enabled() {
            metrics::counter!("grpc_server_started_total",
                "grpc_service" => service.to_string(), "grpc_method" => method.to_string())
            .increment(1);
        }
        Self {
            service: service.to_string(),
            method: method.to_string(),
            start: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if self.done {
            return;
        }
        self.done = true;
        if !crate::metrics::enabled() {
            return;
        }
        let labels = [
            ("grpc_service", self.service.clone()),
            ("grpc_method", self.method.clone()),
            ("grpc_code", code_name(code).to_string()),
        ];
        metrics::counter!("grpc_server_handled_total", &labels).increment(1);
        metrics::histogram!("grpc_server_handling_seconds", &labels)
            .record(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        // The caller went away (or the server timeout fired) before a status was sent.
        self.finish(Code::Cancelled);
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for GrpcService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let arrival = Instant::now();
        let path = request.uri().path().to_string();
        let (service, method) = split_path(&path);
        let span = crate::trace::request_span(request.headers(), &service, &method);
        let mut observation = Observation::start(&service, &method);

        if let Some(auth) = &self.shared.auth {
            let decision = auth::check(
                &auth.tokens,
                &auth.scopes,
                &path,
                request
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes()),
            );
            let rejection = match decision {
                Decision::Exempt | Decision::Allowed(_) => None,
                Decision::Unauthenticated(reason) => {
                    Some(Status::unauthenticated(reason.to_string()))
                }
                Decision::PermissionDenied { has, needs } => {
                    Some(Status::permission_denied(format!(
                        "this RPC needs a token with the {} scope; the token has {}",
                        needs.as_str(),
                        has.as_str()
                    )))
                }
            };
            if let Some(status) = rejection {
                if let Some(unlogged) = REJECTIONS.may_log(Instant::now()) {
                    let peer = deadline::peer(request.extensions());
                    span.in_scope(|| {
                        tracing::warn!(
                            method = %clipped(&path),
                            peer = ?peer,
                            code = code_name(status.code()),
                            reason = status.message(),
                            unlogged_before = unlogged,
                            "request rejected"
                        )
                    });
                }
                observation.finish(status.code());
                return Box::pin(async move { Ok(status.into_http::<Body>()) });
            }
        }

        let request_timeout = self.shared.request_timeout;
        let deadline = Deadline::of_call(
            arrival,
            request
                .headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok()),
            request_timeout,
        );
        if let Some(deadline) = deadline {
            request.extensions_mut().insert(deadline);
        }
        let slots = deadline::slots(request.extensions());
        let limit = self.shared.max_recv_message_size;
        let request = request.map(|body| Body::new(LimitedBody::new(body, limit)));
        // The clone that was driven to readiness handles this call; keep a fresh one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let mut observation = observation;
                let passed = |observation: &mut Observation, waiting: bool| {
                    let status = deadline_passed(waiting, request_timeout);
                    observation.finish(status.code());
                    Ok(status.into_http::<Body>())
                };
                // Held until the response starts, as tonic's own limit did.
                let _slot = match slots {
                    None => None,
                    Some(slots) => match within(deadline, slots.acquire_owned()).await {
                        Some(permit) => permit.ok(),
                        None => return passed(&mut observation, true),
                    },
                };
                // `call` itself inside the guarded future: its synchronous part may panic too.
                let call = catch_panic(async move { inner.call(request).await });
                let response = match within(deadline, call).await {
                    None => return passed(&mut observation, false),
                    Some(Ok(response)) => response?,
                    Some(Err(what)) => {
                        let status = panicked(&what, &path);
                        observation.finish(status.code());
                        return Ok(status.into_http::<Body>());
                    }
                };
                let header_code = status_code_in(response.headers());
                // Trailers-only (an error before any message): the status is final now, and
                // hyper may drop the empty body without polling it.
                if let Some(code) = header_code {
                    observation.finish(code);
                }
                Ok(response.map(|body| {
                    Body::new(ObservedBody {
                        inner: body,
                        header_code,
                        observation,
                        path,
                        panicked: false,
                    })
                }))
            }
            .instrument(span),
        )
    }
}

/// Rejected calls logged per second at most (the metrics count them all): callers without a
/// token must not be able to fill the log.
const REJECTIONS_LOGGED_PER_SECOND: u32 = 10;

static REJECTIONS: LogBudget = LogBudget::new(REJECTIONS_LOGGED_PER_SECOND, Duration::from_secs(1));

/// A caller-chosen path, cut for the log (a path may be kilobytes long).
fn clipped(path: &str) -> &str {
    &path[..path.floor_char_boundary(200)]
}

/// `work`'s output, or none if `deadline` passes first.
async fn within<F: Future>(deadline: Option<Deadline>, work: F) -> Option<F::Output> {
    match deadline {
        Some(Deadline(at)) => tokio::time::timeout_at(at.into(), work).await.ok(),
        None => Some(work.await),
    }
}

/// The answer of a call whose deadline passed before its response started.
fn deadline_passed(waiting_for_a_slot: bool, request_timeout: Option<Duration>) -> Status {
    let limit = request_timeout.map_or_else(String::new, |t| {
        format!(", or the server's --request-timeout of {t:?}")
    });
    let while_ = if waiting_for_a_slot {
        " while the call waited for one of its connection's slots (--concurrency-per-connection)"
    } else {
        " before the call's response started"
    };
    Status::deadline_exceeded(format!(
        "deadline exceeded{while_}: the caller's grpc-timeout{limit}, counted from the call's arrival"
    ))
}

pin_project_lite::pin_project! {
    /// A response body that finishes the [`Observation`] with the status from the trailers
    /// (or from trailers-only headers).
    struct ObservedBody {
        #[pin]
        inner: Body,
        header_code: Option<Code>,
        observation: Observation,
        path: String,
        // The inner body panicked: its state is unknown, it is never polled again.
        panicked: bool,
    }
}

/// The status a caller gets when its handler panicked. The panic's text goes to the log
/// only: it may name internals, and the caller can do nothing with it.
fn panicked(what: &str, path: &str) -> Status {
    tracing::error!(method = %path, panic = %what, "a handler panicked; the call fails with INTERNAL");
    Status::internal(
        "the server failed while handling this call (an internal error, logged on the server)",
    )
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.panicked {
            return Poll::Ready(None);
        }
        let mut inner = this.inner;
        let frame =
            match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll_frame(cx))) {
                Ok(poll) => ready!(poll),
                Err(panic) => {
                    *this.panicked = true;
                    let status = panicked(&panic_message(&*panic), this.path);
                    this.observation.finish(status.code());
                    // Headers may be out already: the status goes in the trailers.
                    let mut trailers = http::HeaderMap::new();
                    // Cannot fail: a fixed code and an ASCII message.
                    let _ = status.add_header(&mut trailers);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            };
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = status_code_in(trailers).unwrap_or(Code::Unknown);
                    this.observation.finish(code);
                }
            }
            Some(Err(status)) => this.observation.finish(status.code()),
            None => {
                let code = this.header_code.unwrap_or(Code::Unknown);
                this.observation.finish(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.panicked || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that reads the 5-byte gRPC message prefixes as they stream by and fails
    /// with RESOURCE_EXHAUSTED as soon as one announces a message over the limit.
    struct LimitedBody {
        #[pin]
        inner: Body,
        limit: usize,
        // Bytes of the current message still to pass before the next prefix.
        remaining: usize,
        prefix: [u8; 5],
        prefix_len: usize,
        failed: bool,
    }
}

impl LimitedBody {
    fn new(inner: Body, limit: usize) -> Self {
        Self {
            inner,
            limit,
            remaining: 0,
            prefix: [0; 5],
            prefix_len: 0,
            failed: false,
        }
    }
}

/// Walks `data` through the framing state; returns the first oversized length.
fn scan_frames(
    mut data: &[u8],
    remaining: &mut usize,
    prefix: &mut [u8; 5],
    prefix_len: &mut usize,
    limit: usize,
) -> Option<usize> {
    while !data.is_empty() {
        if *remaining > 0 {
            let skip = (*remaining).min(data.len());
            *remaining -= skip;
            data = &data[skip..];
            continue;
        }
        let take = (5 - *prefix_len).min(data.len());
        prefix[*prefix_len..*prefix_len + take].copy_from_slice(&data[..take]);
        *prefix_len += take;
        data = &data[take..];
        if *prefix_len == 5 {
            *prefix_len = 0;
            let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
            if len > limit {
                return Some(len);
            }
            *remaining = len;
        }
    }
    None
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
            && let Some(len) = scan_frames(
                data.chunk(),
                this.remaining,
                this.prefix,
                this.prefix_len,
                *this.limit,
            )
        {
            *this.failed = true;
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "request message of {len} bytes exceeds the server's limit of {} bytes",
                this.limit
            )))));
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend(std::iter::repeat_n(7u8, len as usize));
        out
    }

    fn scan_in_chunks(data: &[u8], chunk: usize, limit: usize) -> Option<usize> {
        let (mut remaining, mut prefix, mut prefix_len) = (0, [0u8; 5], 0);
        data.chunks(chunk)
            .find_map(|c| scan_frames(c, &mut remaining, &mut prefix, &mut prefix_len, limit))
    }

    #[test]
    fn finds_oversized_messages_across_chunk_boundaries() {
        let mut stream = frame(10);
        stream.extend(frame(0));
        stream.extend(frame(100));
        stream.extend(frame(3));
        for chunk in [1, 2, 3, 5, 7, 64, 1000] {
            assert_eq!(scan_in_chunks(&stream, chunk, 100), None, "chunk {chunk}");
            assert_eq!(
                scan_in_chunks(&stream, chunk, 99),
                Some(100),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn paths_and_codes() {
        assert_eq!(
            split_path("/omnibus.db.v1.DatabaseService/Insert"),
            ("omnibus.db.v1.DatabaseService".into(), "Insert".into())
        );
        assert_eq!(split_path("/"), ("unknown".into(), "unknown".into()));
        assert_eq!(
            split_path("/grpc.health.v1.Health/Check"),
            ("grpc.health.v1.Health".into(), "Check".into())
        );
        // Made-up paths share one label set, whatever they are.
        for made_up in [
            "/xq1z.Service/Method",
            "/omnibus.db.v1.DatabaseService/NoSuchMethod",
            "/grpc.health.v1.Health/Nope",
            "/a/b/c",
        ] {
            assert_eq!(
                split_path(made_up),
                ("unknown".into(), "unknown".into()),
                "{made_up}"
            );
        }
        assert_eq!(code_name(Code::ResourceExhausted), "ResourceExhausted");
    }

    #[test]
    fn rejections_are_logged_at_most_ten_a_second_and_the_rest_are_counted() {
        let budget = LogBudget::new(REJECTIONS_LOGGED_PER_SECOND, Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..REJECTIONS_LOGGED_PER_SECOND {
            assert_eq!(budget.may_log(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(budget.may_log(t0 + Duration::from_millis(999)), None);
        }
        // The next second: logged again, with the count of those refused.
        assert_eq!(budget.may_log(t0 + Duration::from_secs(1)), Some(5));
        assert_eq!(budget.may_log(t0 + Duration::from_secs(1)), Some(0));
    }

    #[test]
    fn paths_are_clipped_for_the_log_on_a_character_boundary() {
        assert_eq!(clipped("/a.B/C"), "/a.B/C");
        let long = format!("/{}", "é".repeat(300));
        let cut = clipped(&long);
        assert!(cut.len() <= 200 && long.starts_with(cut), "{}", cut.len());
    }

    /// A call's deadline runs from its arrival, through its wait for a connection slot:
    /// a call that cannot get one in time answers DEADLINE_EXCEEDED, and one that gets
    /// one finds the deadline in its extensions.
    #[tokio::test]
    async fn deadlines_count_from_arrival_and_cover_the_wait_for_a_slot() {
        use crate::deadline::SlotsInfo;
        use tonic::transport::server::TcpConnectInfo;

        let (release, released) = tokio::sync::watch::channel(false);
        let handler = tower::service_fn(move |request: http::Request<Body>| {
            let mut released = released.clone();
            async move {
                let deadline = request.extensions().get::<Deadline>().copied();
                if request.uri().path().ends_with("/Query") {
                    // Holds its slot until released.
                    let _ = released.wait_for(|r| *r).await;
                }
                let mut response = http::Response::new(Body::empty());
                response.extensions_mut().insert(deadline);
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let mut svc = GrpcLayer::new(None, 1 << 20, Some(Duration::from_secs(60))).layer(handler);
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let call = |path: &str, timeout: Option<&str>| {
            let mut request = http::Request::builder().uri(path);
            if let Some(t) = timeout {
                request = request.header("grpc-timeout", t);
            }
            let mut request = request.body(Body::empty()).unwrap();
            request.extensions_mut().insert(SlotsInfo {
                inner: TcpConnectInfo {
                    local_addr: None,
                    remote_addr: None,
                },
                slots: Some(slots.clone()),
            });
            request
        };
        // The one slot, taken.
        let busy = tokio::spawn(svc.call(call("/omnibus.db.v1.DatabaseService/Query", None)));
        tokio::task::yield_now().await;
        while slots.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let started = Instant::now();
        let waited = svc
            .call(call("/omnibus.db.v1.DatabaseService/Count", Some("300m")))
            .await
            .unwrap();
        assert_eq!(
            status_code_in(waited.headers()),
            Some(Code::DeadlineExceeded)
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        release.send(true).unwrap();
        let first = busy.await.unwrap().unwrap();
        assert_eq!(
            status_code_in(first.headers()),
            None,
            "answered by its handler"
        );
        // The server's limit applies without a caller's deadline ...
        let at = first
            .extensions()
            .get::<Option<Deadline>>()
            .copied()
            .flatten();
        let left = at.expect("a deadline").time_left();
        assert!(left > Duration::from_secs(50) && left <= Duration::from_secs(60));
        // ... and a shorter caller's deadline wins.
        let second = svc
            .call(call("/omnibus.db.v1.DatabaseService/Count", Some("5S")))
            .await
            .unwrap();
        let at = second
            .extensions()
            .get::<Option<Deadline>>()
            .copied()
            .flatten();
        assert!(at.expect("a deadline").time_left() <= Duration::from_secs(5));
    }

    /// A handler that outlives the call's deadline: DEADLINE_EXCEEDED (tonic's timeout
    /// answered CANCELLED, the code of a caller that went away).
    #[tokio::test]
    async fn a_handler_past_the_deadline_answers_deadline_exceeded() {
        let handler = tower::service_fn(|_: http::Request<Body>| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let mut svc =
            GrpcLayer::new(None, 1 << 20, Some(Duration::from_millis(200))).layer(handler);
        let request = http::Request::builder()
            .uri("/omnibus.db.v1.DatabaseService/Query")
            .body(Body::empty())
            .unwrap();
        let response = svc.call(request).await.unwrap();
        assert_eq!(
            status_code_in(response.headers()),
            Some(Code::DeadlineExceeded)
        );
        let status = Status::from_header_map(response.headers()).unwrap();
        assert!(status.message().contains("--request-timeout"), "{status:?}");
    }

    /// A handler that panics: the caller gets INTERNAL in trailers-only headers.
    #[tokio::test]
    async fn a_panicking_handler_answers_internal() {
        let handler = tower::service_fn(|_: http::Request<Body>| async {
            if true {
                panic!("handler bug");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let mut svc = GrpcLayer::new(None, 1 << 20, None).layer(handler);
        let request = http::Request::builder()
            .uri("/omnibus.db.v1.DatabaseService/Query")
            .body(Body::empty())
            .unwrap();
        let response = svc.call(request).await.unwrap();
        assert_eq!(status_code_in(response.headers()), Some(Code::Internal));
        let status = Status::from_header_map(response.headers()).unwrap();
        assert!(
            !status.message().contains("handler bug"),
            "the panic text stays in the log: {status:?}"
        );
    }

    /// A response stream that panics after a message: the message is delivered, then the
    /// stream ends with INTERNAL in its trailers, and the body is never polled again.
    #[tokio::test]
    async fn a_stream_that_panics_ends_with_internal_trailers() {
        use http_body_util::BodyExt;

        struct PanicsAfterOne(bool);
        impl HttpBody for PanicsAfterOne {
            type Data = Bytes;
            type Error = Status;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
                // The first poll yields a message, the second panics.
                assert!(!self.0, "the handler's stream fails");
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0")))))
            }
        }
        let handler = tower::service_fn(|_: http::Request<Body>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(PanicsAfterOne(false))))
        });
        let mut svc = GrpcLayer::new(None, 1 << 20, None).layer(handler);
        let request = http::Request::builder()
            .uri("/omnibus.consumer.v1.ConsumerService/StreamActions")
            .body(Body::empty())
            .unwrap();
        let mut body = svc.call(request).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(|d| d.len()), Some(5));
        let second = body.frame().await.unwrap().unwrap();
        let trailers = second.trailers_ref().expect("trailers after the panic");
        assert_eq!(status_code_in(trailers), Some(Code::Internal));
        assert!(body.frame().await.is_none(), "the stream has ended");
    }
}
