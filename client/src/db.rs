//! The db-svc client: direct gRPC, or bus-first writes that fall back to direct gRPC.
//!
//! Every write carries a request id (generated when the caller gives none). A bus write that
//! gets no reply in time is retried on the direct path **with the same request id**, so
//! db-svc's idempotency record makes the write happen once whichever path wins - including
//! when the bus request is processed later.

use std::sync::Arc;
use std::time::Duration;

use omnibus_proto::db::v1 as pb;
use omnibus_proto::db::v1::database_service_client::DatabaseServiceClient;
use omnibus_proto::rows::{QueryRowsResponse, query_rows};
use tonic::transport::Channel;

use crate::connect::{AuthChannel, Bearer, ConnectError, ConnectOptions};

use crate::bus::{BusError, BusPublisher, BusRequestMessage};

/// How writes travel (`USE_EVENT_BUS_FOR_WRITES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Over the bus first, direct gRPC on timeout or bus failure.
    BusFirst,
    /// Direct gRPC only.
    DirectOnly,
}

impl WriteMode {
    /// From `USE_EVENT_BUS_FOR_WRITES` (`true`/`1`/`yes` → bus-first; anything else, or unset,
    /// → direct only), as in the original guide.
    pub fn from_env() -> Self {
        Self::from_flag(std::env::var("USE_EVENT_BUS_FOR_WRITES").ok().as_deref())
    }

    pub fn from_flag(value: Option<&str>) -> Self {
        match value.map(|v| v.trim().to_ascii_lowercase()) {
            Some(v) if matches!(v.as_str(), "true" | "1" | "yes" | "on") => WriteMode::BusFirst,
            _ => WriteMode::DirectOnly,
        }
    }
}

/// Which path produced a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Bus,
    Direct,
    /// Direct, after the bus failed for the given reason.
    Fallback(String),
}

/// A response and the path it came by.
#[derive(Clone, Debug)]
pub struct Routed<T> {
    pub response: T,
    pub via: Via,
    /// The request id the write used (empty for reads).
    pub request_id: String,
}

/// Connects to `addr` (`host:port` or a URI) lazily, in plaintext unless it is `https://`
/// (see [`ConnectOptions`] for a private CA).
pub fn channel(addr: &str) -> Result<Channel, ConnectError> {
    Ok(ConnectOptions::default()
        .endpoint(addr, Duration::from_secs(3))?
        .connect_lazy())
}

/// A db-svc client.
#[derive(Clone)]
pub struct DbClient {
    channel: Channel,
    /// The channel with the caller's token on every call.
    auth: AuthChannel,
    bus: Option<Arc<BusPublisher>>,
    mode: WriteMode,
}

impl DbClient {
    /// Direct gRPC only.
    pub fn direct(channel: Channel) -> Self {
        Self {
            auth: AuthChannel::new(channel.clone(), Bearer::none()),
            channel,
            bus: None,
            mode: WriteMode::DirectOnly,
        }
    }

    /// Bus-first writes with direct fallback (when `mode` is BusFirst).
    pub fn with_bus(channel: Channel, bus: Arc<BusPublisher>, mode: WriteMode) -> Self {
        Self {
            bus: Some(bus),
            mode,
            ..Self::direct(channel)
        }
    }

    /// Sends `bearer`'s token with every gRPC call (db-svc with authentication on).
    pub fn with_bearer(self, bearer: Bearer) -> Self {
        Self {
            auth: AuthChannel::new(self.channel.clone(), bearer),
            ..self
        }
    }

    /// The generated gRPC client, for calls this wrapper does not cover.
    pub fn grpc(&self) -> DatabaseServiceClient<AuthChannel> {
        DatabaseServiceClient::new(self.auth.clone())
    }

    pub async fn insert(
        &self,
        req: pb::InsertRequest,
    ) -> Result<Routed<pb::InsertResponse>, tonic::Status> {
        self.write(req, |mut c, r| async move { c.insert(r).await })
            .await
    }

    pub async fn update(
        &self,
        req: pb::UpdateRequest,
    ) -> Result<Routed<pb::UpdateResponse>, tonic::Status> {
        self.write(req, |mut c, r| async move { c.update(r).await })
            .await
    }

    pub async fn delete(
        &self,
        req: pb::DeleteRequest,
    ) -> Result<Routed<pb::DeleteResponse>, tonic::Status> {
        self.write(req, |mut c, r| async move { c.delete(r).await })
            .await
    }

    pub async fn upsert(
        &self,
        req: pb::UpsertRequest,
    ) -> Result<Routed<pb::UpsertResponse>, tonic::Status> {
        self.write(req, |mut c, r| async move { c.upsert(r).await })
            .await
    }

    /// Reads go direct: they are fast and synchronous (the guide's "keep direct reads").
    pub async fn query(&self, req: pb::QueryRequest) -> Result<pb::QueryResponse, tonic::Status> {
        Ok(self.grpc().query(req).await?.into_inner())
    }

    /// A query whose rows are read into the caller's own types, skipping the generic
    /// `Struct` form: `client.query_rows(req).await?.decode_rows::<MyRow>()` with any
    /// `serde::Deserialize` row type (see `omnibus_proto::rows` for the mapping).
    pub async fn query_rows(
        &self,
        req: pb::QueryRequest,
    ) -> Result<QueryRowsResponse, tonic::Status> {
        Ok(query_rows(self.auth.clone(), req).await?.into_inner())
    }

    pub async fn count(&self, req: pb::CountRequest) -> Result<pb::CountResponse, tonic::Status> {
        Ok(self.grpc().count(req).await?.into_inner())
    }

    /// A query over the bus (for callers that want the bus path for reads too).
    pub async fn query_via_bus(
        &self,
        req: pb::QueryRequest,
        timeout: Option<Duration>,
    ) -> Result<pb::QueryResponse, BusError> {
        let bus = self
            .bus
            .as_ref()
            .ok_or_else(|| BusError::Unavailable("no bus configured".into()))?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        bus.call(&req, &correlation_id, timeout).await
    }

    async fn write<R, F, Fut>(
        &self,
        mut req: R,
        direct: F,
    ) -> Result<Routed<R::Response>, tonic::Status>
    where
        R: BusRequestMessage,
        F: FnOnce(DatabaseServiceClient<AuthChannel>, tonic::Request<R>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R::Response>, tonic::Status>>,
    {
        // Trimmed, as db-svc reads request ids: the id sent, reported back and named in errors
        // is the one db-svc records.
        let request_id = match req.request_id_mut() {
            Some(id) if id.trim().is_empty() => {
                *id = uuid::Uuid::new_v4().to_string();
                id.clone()
            }
            Some(id) => {
                *id = id.trim().to_string();
                id.clone()
            }
            None => String::new(),
        };
        let mut via = Via::Direct;
        let mut fallback_timeout = None;
        if let (WriteMode::BusFirst, Some(bus)) = (self.mode, &self.bus) {
            // A correlation id of its own per call: two calls that share a request id (or a
            // late reply to an earlier attempt) must not take each other's replies. The
            // request id inside the request is what makes the write idempotent.
            let correlation_id = uuid::Uuid::new_v4().to_string();
            match bus.call(&req, &correlation_id, None).await {
                Ok(response) => {
                    return Ok(Routed {
                        response,
                        via: Via::Bus,
                        request_id,
                    });
                }
                Err(e) if e.should_fall_back() => {
                    tracing::warn!(%request_id, "bus write failed ({e}); falling back to direct gRPC");
                    via = Via::Fallback(e.to_string());
                    // The fallback gets the bus timeout as its deadline (db-svc turns it into
                    // the statement timeout), so a write never waits without bound.
                    fallback_timeout = Some(bus.config().timeout);
                }
                Err(e) => return Err(with_request_id(bus_error_to_status(e), &request_id)),
            }
        }
        let mut request = tonic::Request::new(req);
        if let Some(timeout) = fallback_timeout {
            // Bounded: tonic panics encoding a deadline past what `grpc-timeout` holds.
            request.set_timeout(timeout.min(crate::MAX_DEADLINE));
        }
        let response = direct(self.grpc(), request)
            .await
            .map_err(|e| with_request_id(e, &request_id))?
            .into_inner();
        Ok(Routed {
            response,
            via,
            request_id,
        })
    }
}

/// `status` with the write's request id in its message when the write's outcome is unknown
/// (no answer, or an internal failure): retrying with that id (`request_id`, the CLI's
/// `--request-id`) returns the recorded result instead of writing twice.
pub fn with_request_id(status: tonic::Status, request_id: &str) -> tonic::Status {
    use tonic::Code::*;
    let unknown_outcome = matches!(
        status.code(),
        DeadlineExceeded | Unavailable | Cancelled | Unknown | Internal
    );
    if request_id.is_empty() || !unknown_outcome {
        return status;
    }
    let message = format!(
        "{} (request_id {request_id}: retry with it to get the recorded result without writing twice)",
        status.message()
    );
    tonic::Status::with_details_and_metadata(
        status.code(),
        message,
        status.details().to_vec().into(),
        status.metadata().clone(),
    )
}

/// The status the same failure has on the direct path.
pub fn bus_error_to_status(e: BusError) -> tonic::Status {
    match e {
        BusError::Failed(failed) => {
            let code = grpc_code_from_name(&failed.grpc_code).unwrap_or(
                match failed.error_code.as_str() {
                    "VALIDATION_ERROR" => tonic::Code::InvalidArgument,
                    "NOT_FOUND" => tonic::Code::NotFound,
                    "CONFLICT" => tonic::Code::AlreadyExists,
                    "DATABASE_UNAVAILABLE" => tonic::Code::Unavailable,
                    "TIMEOUT" => tonic::Code::DeadlineExceeded,
                    _ => tonic::Code::Internal,
                },
            );
            tonic::Status::new(code, format!("{}: {}", failed.error_code, failed.error))
        }
        BusError::Timeout { .. } => tonic::Status::deadline_exceeded(e.to_string()),
        BusError::Unavailable(_) => tonic::Status::unavailable(e.to_string()),
        BusError::Protocol(_) => tonic::Status::internal(e.to_string()),
        BusError::Unencodable(_) => tonic::Status::invalid_argument(e.to_string()),
    }
}

fn grpc_code_from_name(name: &str) -> Option<tonic::Code> {
    use tonic::Code::*;
    Some(match name {
        "INVALID_ARGUMENT" => InvalidArgument,
        "NOT_FOUND" => NotFound,
        "ALREADY_EXISTS" => AlreadyExists,
        "FAILED_PRECONDITION" => FailedPrecondition,
        "PERMISSION_DENIED" => PermissionDenied,
        "UNAVAILABLE" => Unavailable,
        "DEADLINE_EXCEEDED" => DeadlineExceeded,
        "ABORTED" => Aborted,
        "RESOURCE_EXHAUSTED" => ResourceExhausted,
        "UNAUTHENTICATED" => Unauthenticated,
        "INTERNAL" => Internal,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_protocol::FailedPayload;

    #[test]
    fn failed_replies_become_the_direct_paths_status() {
        let mut failed = FailedPayload::new("CONFLICT", "unique constraint x");
        failed.grpc_code = "ALREADY_EXISTS".into();
        let status = bus_error_to_status(BusError::Failed(Box::new(failed)));
        assert_eq!(status.code(), tonic::Code::AlreadyExists);
        assert!(status.message().contains("unique constraint x"));
        let status = bus_error_to_status(BusError::Failed(Box::new(FailedPayload::new(
            "VALIDATION_ERROR",
            "bad",
        ))));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    /// The longest deadline is one tonic can send (a longer one panics there).
    #[test]
    fn the_longest_deadline_is_one_grpc_carries() {
        let mut request = tonic::Request::new(());
        request.set_timeout(Duration::MAX.min(crate::MAX_DEADLINE));
        assert_eq!(request.metadata().get("grpc-timeout").unwrap(), "99999999H");
    }

    #[test]
    fn use_event_bus_for_writes_chooses_the_mode() {
        assert_eq!(WriteMode::from_flag(Some("true")), WriteMode::BusFirst);
        assert_eq!(WriteMode::from_flag(Some(" YES ")), WriteMode::BusFirst);
        assert_eq!(WriteMode::from_flag(Some("false")), WriteMode::DirectOnly);
        assert_eq!(WriteMode::from_flag(None), WriteMode::DirectOnly);
    }

    #[test]
    fn an_unknown_outcome_names_the_request_id_to_retry_with() {
        for code in [tonic::Code::DeadlineExceeded, tonic::Code::Unavailable] {
            let status = with_request_id(tonic::Status::new(code, "no answer"), "req-1");
            assert_eq!(status.code(), code);
            assert!(
                status.message().starts_with("no answer (request_id req-1"),
                "{status:?}"
            );
        }
        // A definite answer (nothing was written) or no id: the status as it was.
        let status = with_request_id(tonic::Status::invalid_argument("bad"), "req-1");
        assert_eq!(status.message(), "bad");
        let status = with_request_id(tonic::Status::unavailable("down"), "");
        assert_eq!(status.message(), "down");
    }
}
