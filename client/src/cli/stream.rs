//! Following consumer-svc's `Subscribe` stream across dropped connections, without gaps: every
//! reconnection asks to resume after the last sequence number received, so buffered updates
//! are replayed once and nothing is shown twice. `tail` and `top` both read from here.

use std::time::Duration;

use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::consumer_service_client::ConsumerServiceClient;
use prost_reflect::{DynamicMessage, SerializeOptions};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::{Fail, Svc, call_error, connect};

/// What the follower reports.
#[derive(Debug)]
pub enum Item {
    /// An update from the stream.
    Update(Box<pb::SubscribeResponse>),
    /// Connection news for the user (lost, resumed, restarted, missed updates).
    Notice(String),
    /// Connected (true) or lost (false).
    Connected(bool),
    /// Following cannot go on (e.g. streams are disabled on the server).
    Fatal(Fail),
}

/// The position a follower resumes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// The last sequence number received (None before the first message).
    pub last: Option<u64>,
    /// The sequence of a lag notice just received: the current metrics and status that
    /// follow it carry the same one.
    lag_notice: Option<u64>,
}

impl Position {
    /// Records a `Subscribe` message; false for a duplicate (at or before the position),
    /// except the refreshed metrics and status that follow a lag notice with its sequence.
    pub fn accept(&mut self, msg: &pb::SubscribeResponse) -> bool {
        use pb::subscribe_response::Update as U;
        if matches!(msg.update, Some(U::Lagged(_))) {
            let new = self.advance(msg.sequence);
            self.lag_notice = new.then_some(msg.sequence);
            return new;
        }
        let refresh = matches!(msg.update, Some(U::AgentMetrics(_) | U::ConsumerStatus(_)));
        if refresh && self.lag_notice == Some(msg.sequence) {
            return true;
        }
        self.lag_notice = None;
        self.advance(msg.sequence)
    }

    /// Records a message; returns false when it is at or before the position (a duplicate).
    pub fn advance(&mut self, sequence: u64) -> bool {
        match self.last {
            Some(last) if sequence <= last => false,
            _ => {
                self.last = Some(sequence);
                true
            }
        }
    }
}

/// Follows `Subscribe` on `addr` until the receiver is dropped. The first connection has
/// already been checked by the caller (so "not reachable" is an error at start, a retry later).
fn is_permanent(code: tonic::Code) -> bool {
    use tonic::Code as C;
    matches!(
        code,
        C::FailedPrecondition
            | C::Unauthenticated
            | C::PermissionDenied
            | C::Unimplemented
            | C::InvalidArgument
    )
}

/// "Not gRPC" answers (a transport error, or a connection closed without an answer) before the
/// stream ever opened after which the address is taken to be no gRPC server (one alone could
/// be a reset connection).
const NOT_GRPC_ANSWERS: u32 = 3;

pub async fn follow(addr: String, base: pb::SubscribeRequest, tx: mpsc::Sender<Item>) {
    let mut not_grpc_answers = 0;
    let mut position = Position::default();
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    let mut lost_reported = false;
    loop {
        if tx.is_closed() {
            return;
        }
        let channel = match connect(Svc::Consumer, &addr).await {
            Ok(c) => c,
            Err(e) => {
                if !lost_reported {
                    let _ = tx.send(Item::Notice(format!("{e} (retrying)"))).await;
                    lost_reported = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let mut request = base.clone();
        request.resume_after_sequence = position.last;
        // The snapshot is the starting state; a resume replays updates instead.
        request.include_snapshot = base.include_snapshot && first;
        let reply = ConsumerServiceClient::new(channel).subscribe(request).await;
        if first
            && matches!(&reply, Err(status) if super::not_grpc(status) || super::closed_without_answer(status))
        {
            not_grpc_answers += 1;
        }
        let mut stream = match reply {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                // The resume point is newer than anything the server has: it restarted.
                let _ = tx
                    .send(Item::Notice(
                        "consumer-svc restarted; following from its current position".into(),
                    ))
                    .await;
                position = Position::default();
                continue;
            }
            // Errors that no retry can fix: a bad or missing token, an address that is not
            // consumer-svc (or no gRPC server at all, when it never answered one), streams
            // switched off, a bad filter.
            Err(status) if is_permanent(status.code()) || not_grpc_answers >= NOT_GRPC_ANSWERS => {
                let _ = tx
                    .send(Item::Fatal(call_error(Svc::Consumer, &addr, &status)))
                    .await;
                return;
            }
            Err(status) => {
                if !lost_reported {
                    let e = call_error(Svc::Consumer, &addr, &status);
                    let _ = tx.send(Item::Notice(format!("{e} (retrying)"))).await;
                    lost_reported = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if !first {
            let from = position
                .last
                .map_or("the start".to_string(), |s| format!("sequence {s}"));
            let _ = tx
                .send(Item::Notice(format!("reconnected; resumed after {from}")))
                .await;
        }
        let _ = tx.send(Item::Connected(true)).await;
        first = false;
        backoff = Duration::from_millis(100);
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    if let Some(pb::subscribe_response::Update::Lagged(l)) = &msg.update {
                        let _ = tx
                            .send(Item::Notice(format!(
                                "missed {} updates (too far behind, or no longer buffered)",
                                l.missed
                            )))
                            .await;
                    }
                    if (position.accept(&msg) || is_snapshot(&msg))
                        && tx.send(Item::Update(Box::new(msg))).await.is_err()
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => break,
            }
        }
        let _ = tx.send(Item::Connected(false)).await;
        let _ = tx
            .send(Item::Notice(
                "connection to consumer-svc lost; reconnecting".into(),
            ))
            .await;
        lost_reported = true;
    }
}

fn is_snapshot(msg: &pb::SubscribeResponse) -> bool {
    matches!(
        msg.update,
        Some(pb::subscribe_response::Update::Snapshot(_))
    )
}

/// A message as JSON with proto field names, default values included and 64-bit integers as
/// numbers (what people filter and read; `--json` output of the streams).
pub fn event_json<T: prost::Message>(full_name: &str, message: &T) -> Map<String, Value> {
    let Ok(descriptor) = omnibus_proto::json::message_descriptor(full_name) else {
        return Map::new();
    };
    let mut dynamic = DynamicMessage::new(descriptor);
    if dynamic.transcode_from(message).is_err() {
        return Map::new();
    }
    let options = SerializeOptions::new()
        .use_proto_field_name(true)
        .skip_default_fields(false)
        .stringify_64_bit_integers(false);
    match dynamic.serialize_with_options(serde_json::value::Serializer, &options) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refresh_after_a_lag_notice_is_kept_duplicates_are_not() {
        use pb::subscribe_response::Update as U;
        let msg = |sequence, update| pb::SubscribeResponse {
            sequence,
            update: Some(update),
        };
        let metrics = || U::AgentMetrics(pb::AgentMetrics::default());
        let mut p = Position::default();
        assert!(p.accept(&msg(5, metrics())));
        assert!(!p.accept(&msg(5, metrics())), "a duplicate");
        assert!(p.accept(&msg(9, U::Lagged(pb::Lagged { missed: 3 }))));
        assert!(p.accept(&msg(9, metrics())), "the refresh after the notice");
        assert!(p.accept(&msg(9, U::ConsumerStatus(Default::default()))));
        assert!(p.accept(&msg(10, metrics())));
        assert!(
            !p.accept(&msg(9, metrics())),
            "no longer right after the notice"
        );
        assert_eq!(p.last, Some(10));
    }

    #[test]
    fn positions_drop_duplicates_after_a_resume() {
        let mut p = Position::default();
        assert!(p.advance(5));
        assert!(p.advance(7), "gaps are updates filtered out");
        assert!(!p.advance(7));
        assert!(!p.advance(3));
        assert_eq!(p.last, Some(7));
    }

    #[test]
    fn events_render_with_defaults_and_numbers() {
        let m = pb::PerformanceMetric {
            id: "x".into(),
            cache_hit: false,
            candidates_evaluated: Some(5),
            ..Default::default()
        };
        let j = event_json("omnibus.consumer.v1.PerformanceMetric", &m);
        assert_eq!(j["cache_hit"], Value::Bool(false));
        assert_eq!(j["candidates_evaluated"], serde_json::json!(5));
        assert!(
            !j.contains_key("routing_duration_ms"),
            "unset optionals stay absent"
        );
    }
}
