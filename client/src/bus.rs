//! The event-bus publisher: sends `DATABASE_QUERY_REQUESTED` envelopes (structured form) and
//! waits for the matching `DATABASE_QUERY_COMPLETED` / `DATABASE_QUERY_FAILED` reply.
//!
//! One producer and one reply consumer are shared by every concurrent request; replies are
//! matched by correlation id. The reply consumer is assigned every partition of both reply
//! topics at their current end offsets *before* the publisher is returned, so no reply to a
//! request sent afterwards can be missed (and no consumer-group join delays start-up).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus_protocol::{
    DATABASE_QUERY_REQUESTED, Envelope, FailedPayload, Reply, StructuredOperation, Topics,
    parse_reply,
};
use kafka_settings::KafkaSetting;
use omnibus_proto::db::v1 as pb;
use parking_lot::Mutex;
use prost_reflect::{DeserializeOptions, DynamicMessage};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::kafka_client;
use tokio::sync::oneshot;

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    pub topics: Topics,
    /// How long a request waits for its reply (per-call override possible).
    pub timeout: Duration,
    /// `service` field of the envelopes sent.
    pub service: String,
    /// librdkafka properties for both clients (TLS, SASL, ...), applied in order, e.g.
    /// `kafka_settings::merged(&[])` for the environment's `KAFKA_SECURITY_PROTOCOL`,
    /// `KAFKA_SASL_*` and `KAFKA_SSL_*`.
    pub kafka_settings: Vec<KafkaSetting>,
}

impl BusConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            topics: Topics::default(),
            timeout: Duration::from_secs(5),
            service: "omnibus-client".into(),
            kafka_settings: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// No reply within the timeout (the request may still be processed later).
    #[error("no reply for correlation id {correlation_id} within {after:?}")]
    Timeout {
        correlation_id: String,
        after: Duration,
    },
    /// The broker could not be reached or refused the request.
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    /// db-svc answered DATABASE_QUERY_FAILED.
    #[error("{}: {}", .0.error_code, .0.error)]
    Failed(Box<FailedPayload>),
    /// A reply that does not fit the protocol.
    #[error("bad reply: {0}")]
    Protocol(String),
    /// The request has no JSON form (a NaN or infinite number, say); nothing was sent.
    #[error("the request cannot be sent over the bus: {0}")]
    Unencodable(String),
}

impl BusError {
    /// Whether the direct path should be tried instead: the bus gave no answer, or db-svc
    /// answered TIMEOUT (it did nothing: the deadline, judged by db-svc's clock, passed before
    /// or during execution, so a clock ahead of the client's can cause it). The retry carries
    /// the same request id, so it cannot write twice.
    ///
    /// Two answers about the size of a write's rows fall back too, as gRPC carries larger
    /// messages than a bus reply:
    ///
    /// - WRITE_REPLY_TOO_LARGE: db-svc refused the write and rolled it back before it
    ///   committed, because the rows it returns would not fit a reply; nothing was written
    ///   and nothing recorded under its request id, so the gRPC call with the same id writes
    ///   it once and returns its rows (`replayed: false`);
    /// - REPLY_TOO_LARGE (now rare for a write): db-svc did the operation but its reply did
    ///   not fit on the bus. The retry's same request id makes db-svc return the recorded
    ///   result over gRPC instead of writing again.
    ///
    /// Any other FAILED reply (VALIDATION_ERROR included, whatever its field) is an answer,
    /// not a reason to try again elsewhere. Only writes ([`crate::db::DbClient`]) fall back.
    pub fn should_fall_back(&self) -> bool {
        use bus_protocol::codes::{REPLY_TOO_LARGE, TIMEOUT, WRITE_REPLY_TOO_LARGE};
        match self {
            // Nothing was sent: db-svc itself answers such a request over gRPC, with the
            // field at fault named, as for any caller.
            BusError::Timeout { .. } | BusError::Unavailable(_) | BusError::Unencodable(_) => true,
            BusError::Failed(f) => matches!(
                f.error_code.as_str(),
                TIMEOUT | WRITE_REPLY_TOO_LARGE | REPLY_TOO_LARGE
            ),
            BusError::Protocol(_) => false,
        }
    }
}

/// A db-svc request message that can travel over the bus in the structured form.
pub trait BusRequestMessage: prost::Message + Default + Clone + Send + 'static {
    const OPERATION: StructuredOperation;
    type Response: prost::Message + Default + Send + 'static;
    /// The idempotency key, for writes.
    fn request_id_mut(&mut self) -> Option<&mut String>;
    /// The idempotency key as it is, for writes.
    fn request_id(&self) -> Option<&str>;
}

macro_rules! bus_message {
    ($req:ty, $resp:ty, $op:ident, write) => {
        impl BusRequestMessage for $req {
            const OPERATION: StructuredOperation = StructuredOperation::$op;
            type Response = $resp;
            fn request_id_mut(&mut self) -> Option<&mut String> {
                Some(&mut self.request_id)
            }
            fn request_id(&self) -> Option<&str> {
                Some(&self.request_id)
            }
        }
    };
    ($req:ty, $resp:ty, $op:ident, read) => {
        impl BusRequestMessage for $req {
            const OPERATION: StructuredOperation = StructuredOperation::$op;
            type Response = $resp;
            fn request_id_mut(&mut self) -> Option<&mut String> {
                None
            }
            fn request_id(&self) -> Option<&str> {
                None
            }
        }
    };
}

bus_message!(pb::InsertRequest, pb::InsertResponse, Insert, write);
bus_message!(pb::UpdateRequest, pb::UpdateResponse, Update, write);
bus_message!(pb::DeleteRequest, pb::DeleteResponse, Delete, write);
bus_message!(pb::UpsertRequest, pb::UpsertResponse, Upsert, write);
bus_message!(
    pb::ExecuteRawRequest,
    pb::ExecuteRawResponse,
    ExecuteRaw,
    write
);
bus_message!(pb::QueryRequest, pb::QueryResponse, Query, read);
bus_message!(pb::CountRequest, pb::CountResponse, Count, read);

/// Calls waiting for a reply, by correlation id. Several calls may wait on one id (two writes
/// with the same request id at once): db-svc answers each request, so each reply goes to the
/// longest-waiting of them, and each call removes only its own entry.
#[derive(Default)]
struct Waiting {
    by_id: HashMap<String, Vec<(u64, oneshot::Sender<Reply>)>>,
    next_token: u64,
}

impl Waiting {
    fn add(&mut self, correlation_id: &str, tx: oneshot::Sender<Reply>) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        self.by_id
            .entry(correlation_id.to_string())
            .or_default()
            .push((token, tx));
        token
    }

    fn remove(&mut self, correlation_id: &str, token: u64) {
        if let Some(waiters) = self.by_id.get_mut(correlation_id) {
            waiters.retain(|(t, _)| *t != token);
            if waiters.is_empty() {
                self.by_id.remove(correlation_id);
            }
        }
    }

    /// The sender of the longest-waiting call for `correlation_id`, taken off the list.
    fn take_first(&mut self, correlation_id: &str) -> Option<oneshot::Sender<Reply>> {
        let waiters = self.by_id.get_mut(correlation_id)?;
        let (_, tx) = (!waiters.is_empty()).then(|| waiters.remove(0))?;
        if waiters.is_empty() {
            self.by_id.remove(correlation_id);
        }
        Some(tx)
    }
}

type Pending = Arc<Mutex<Waiting>>;

/// Sends requests over the bus and waits for their replies. Cheap to share (`Arc`).
pub struct BusPublisher {
    config: BusConfig,
    producer: FutureProducer,
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
    reply_positions: tokio::task::JoinHandle<()>,
}

impl Drop for BusPublisher {
    fn drop(&mut self) {
        self.reader.abort();
        self.reply_positions.abort();
    }
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the reply topics' partitions are listed again. db-svc sends a reply to the
/// partition its correlation id hashes to, so a partition added later (by an operator, or by
/// a broker that restarted empty and created the topic again with more) would otherwise
/// never be read, and every request answered there would time out and fall back to gRPC.
const PARTITION_REFRESH: Duration = Duration::from_secs(5);

/// The partitions of `topic`, from a metadata request (a topic that does not exist has none).
fn topic_partitions(
    consumer: &StreamConsumer,
    topic: &str,
    timeout: Duration,
) -> rdkafka::error::KafkaResult<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

/// The partitions of `topics` that `assigned` lacks, to be read from their beginning: they
/// appeared after the publisher connected, so every reply in them is newer than it.
fn added_partitions(
    topics: &[(String, Vec<i32>)],
    assigned: &TopicPartitionList,
) -> TopicPartitionList {
    let mut added = TopicPartitionList::new();
    for (topic, partitions) in topics {
        for &partition in partitions {
            if assigned.find_partition(topic, partition).is_none() {
                // Cannot fail for a partition number the broker gave (never negative).
                let _ = added.add_partition_offset(topic, partition, Offset::Beginning);
            }
        }
    }
    added
}

/// How far before an outage the reply partitions are read again once the broker is back
/// (covers producer clocks behind ours).
const OUTAGE_SLACK: Duration = Duration::from_secs(60);

/// When every broker went down (ms since the epoch), until the reply partitions were
/// repositioned after it. A broker that restarts with empty storage (tansu `memory://`)
/// starts each log at offset 0 again: a partition whose new log grows to the consumer's old
/// position before it fetches again raises no out-of-range error, and the replies below that
/// position would never be read (their calls timing out and falling back to gRPC).
type Outage = Arc<Mutex<Option<i64>>>;

/// The seeks that reposition the reply partitions at the first record written at or after
/// the time asked (`answers`, from `offsets_for_times`). A partition with no such record
/// (`End`) holds only older ones and stays where it is; so does one without an answer.
fn repositioned(answers: &TopicPartitionList) -> TopicPartitionList {
    let mut seeks = TopicPartitionList::new();
    for e in answers.elements() {
        if let Offset::Offset(offset) = e.offset() {
            // Cannot fail: the offset came from the broker.
            let _ = seeks.add_partition_offset(e.topic(), e.partition(), Offset::Offset(offset));
        }
    }
    seeks
}

/// Keeps the reply consumer reading every reply: every [`PARTITION_REFRESH`] it assigns the
/// reply topics' partitions added since connecting, and after an outage (every second until
/// done) it moves every partition back to the records written since shortly before it.
async fn keep_reading_replies(consumer: Arc<StreamConsumer>, topics: [String; 2], outage: Outage) {
    let mut next_listing = tokio::time::Instant::now() + PARTITION_REFRESH;
    loop {
        let since = *outage.lock();
        tokio::time::sleep(if since.is_some() {
            Duration::from_secs(1)
        } else {
            PARTITION_REFRESH
        })
        .await;
        if let Some(since) = since {
            let probe = consumer.clone();
            let at = since - OUTAGE_SLACK.as_millis() as i64;
            let moved = tokio::task::spawn_blocking(move || {
                let answers = probe.offsets_for_timestamp(at, METADATA_TIMEOUT)?;
                probe.seek_partitions(repositioned(&answers), METADATA_TIMEOUT)
            })
            .await;
            // A broker still down is asked again a second later.
            if let Ok(Ok(_)) = moved {
                let mut pending = outage.lock();
                if *pending == Some(since) {
                    *pending = None;
                }
                tracing::info!("reply partitions read again from before the broker outage");
            }
        }
        if tokio::time::Instant::now() < next_listing {
            continue;
        }
        next_listing = tokio::time::Instant::now() + PARTITION_REFRESH;
        let probe = consumer.clone();
        let topics = topics.clone();
        let listed = tokio::task::spawn_blocking(move || {
            topics
                .iter()
                .map(|t| Ok((t.clone(), topic_partitions(&probe, t, METADATA_TIMEOUT)?)))
                .collect::<rdkafka::error::KafkaResult<Vec<_>>>()
        })
        .await;
        // A broker that does not answer now is asked again at the next listing.
        let Ok(Ok(listed)) = listed else { continue };
        let assigned = match consumer.assignment() {
            Ok(a) => a,
            Err(_) => continue,
        };
        let added = added_partitions(&listed, &assigned);
        if added.count() == 0 {
            continue;
        }
        match consumer.incremental_assign(&added) {
            Ok(()) => tracing::info!(
                partitions = added.count(),
                "reading reply partitions added since the publisher connected"
            ),
            Err(e) => tracing::warn!("could not read the reply topics' new partitions: {e}"),
        }
    }
}

/// The reply consumer's settings (`group` is the publisher's own consumer group).
fn reply_consumer_config(config: &BusConfig, group: &str) -> rdkafka::ClientConfig {
    let mut c = kafka_client(&config.brokers, &config.kafka_settings);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Positions are set at connect; this is for a position the log no longer has (a
        // broker restarted empty): read the new log from its start, not from its end, which
        // would skip the replies written since. Replies are matched by correlation id, so
        // older ones are ignored.
        .set("auto.offset.reset", "earliest")
        // Replies are small and latency matters more than batching.
        .set("fetch.wait.max.ms", "2")
        .set("fetch.min.bytes", "1");
    c
}

impl BusPublisher {
    /// Creates the producer and the reply consumer, assigned to the reply topics' current end.
    pub async fn connect(config: BusConfig) -> Result<Self, BusError> {
        let unavailable = |e: rdkafka::error::KafkaError| {
            BusError::Unavailable(kafka_settings::describe_error(&e))
        };
        let producer: FutureProducer = kafka_client(&config.brokers, &config.kafka_settings)
            .set("acks", "all")
            .set("enable.idempotence", "false")
            // 1 ms of batching: little latency, far fewer produce requests under load.
            .set("linger.ms", "1")
            // As the platform's own clients send (their consumers need no codec package).
            .set("compression.type", "gzip")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(unavailable)?;
        let group = format!(
            "omnibus-client-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let consumer: StreamConsumer = reply_consumer_config(&config, &group)
            .create()
            .map_err(unavailable)?;
        let consumer = Arc::new(consumer);

        let topics = [
            config.topics.completed.clone(),
            config.topics.failed.clone(),
        ];
        let watched = topics.clone();
        let probe = consumer.clone();
        // Finding the reply topics' ends shares one budget, the bus timeout (at most
        // METADATA_TIMEOUT): a caller with a short timeout learns quickly that the bus is down.
        let deadline = Instant::now() + config.timeout.min(METADATA_TIMEOUT);
        let left = move || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(BusError::Unavailable(
                    "the broker did not answer within the bus timeout".into(),
                ))
            } else {
                Ok(left)
            }
        };
        let assignment =
            tokio::task::spawn_blocking(move || -> Result<TopicPartitionList, BusError> {
                let mut tpl = TopicPartitionList::new();
                for topic in &topics {
                    let partitions = topic_partitions(&probe, topic, left()?)
                        .map_err(|e| BusError::Unavailable(format!("metadata for {topic}: {e}")))?;
                    if partitions.is_empty() {
                        return Err(BusError::Unavailable(format!(
                            "reply topic {topic} does not exist"
                        )));
                    }
                    for partition in partitions {
                        let (_, high) =
                            probe
                                .fetch_watermarks(topic, partition, left()?)
                                .map_err(|e| {
                                    BusError::Unavailable(format!(
                                        "offsets of {topic}/{partition}: {e}"
                                    ))
                                })?;
                        tpl.add_partition_offset(topic, partition, Offset::Offset(high))
                            .map_err(|e| BusError::Unavailable(e.to_string()))?;
                    }
                }
                Ok(tpl)
            })
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))??;
        consumer.assign(&assignment).map_err(unavailable)?;

        let pending: Pending = Arc::default();
        let outage = Outage::default();
        let reply_positions = tokio::spawn(keep_reading_replies(
            consumer.clone(),
            watched,
            outage.clone(),
        ));
        let reader = tokio::spawn(read_replies(
            consumer,
            config.topics.completed.clone(),
            pending.clone(),
            outage,
        ));
        Ok(Self {
            config,
            producer,
            pending,
            reader,
            reply_positions,
        })
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    /// Sends `request` (structured form) with `correlation_id` and waits for the reply.
    ///
    /// The correlation id must be unique per call: replies are matched by it alone. A write
    /// without a `request_id` is sent with a fresh one, so each call is a write of its own
    /// (db-svc would otherwise key it by the correlation id). To retry a write safely (over
    /// the bus or gRPC), give it a `request_id` and send the same one again, as
    /// [`crate::db::DbClient`] does.
    pub async fn call<R: BusRequestMessage>(
        &self,
        request: &R,
        correlation_id: &str,
        timeout: Option<Duration>,
    ) -> Result<R::Response, BusError> {
        let op = R::OPERATION;
        let with_id = with_request_id(request);
        let request = with_id.as_ref().unwrap_or(request);
        let json = omnibus_proto::json::to_json(op.request_message(), request, true)
            .map_err(|e| BusError::Unencodable(e.to_string()))?;
        let payload = serde_json::json!({ "operation": op.as_str(), "request": json });
        let reply = self.request(payload, correlation_id, timeout).await?;
        structured_response(op, reply)
    }

    /// Sends a raw request payload and waits for the reply (a fresh trace).
    pub async fn request(
        &self,
        payload: serde_json::Value,
        correlation_id: &str,
        timeout: Option<Duration>,
    ) -> Result<Reply, BusError> {
        self.request_traced(payload, correlation_id, timeout, None)
            .await
    }

    /// Like [`BusPublisher::request`], continuing the caller's W3C trace: `traceparent` goes
    /// into the envelope and a Kafka header, and db-svc's reply carries the same trace id.
    /// Without one, a new trace is started.
    pub async fn request_traced(
        &self,
        mut payload: serde_json::Value,
        correlation_id: &str,
        timeout: Option<Duration>,
        traceparent: Option<&str>,
    ) -> Result<Reply, BusError> {
        // Trimmed, as db-svc reads correlation ids: a waiter keyed by " abc" would never see
        // the reply addressed to "abc".
        let correlation_id = correlation_id.trim();
        let timeout = timeout.unwrap_or(self.config.timeout);
        // The deadline travels with the request: db-svc answers TIMEOUT instead of writing late.
        if let Some(obj) = payload.as_object_mut() {
            obj.entry("timeout_ms")
                .or_insert(serde_json::json!(timeout_ms(timeout)));
        }
        let traceparent = traceparent.map(str::to_string).unwrap_or_else(|| {
            format!(
                "00-{:032x}-{:016x}-01",
                rand::random::<u128>().max(1),
                rand::random::<u64>().max(1)
            )
        });
        let envelope = Envelope::new(
            DATABASE_QUERY_REQUESTED,
            correlation_id,
            self.config.service.clone(),
            payload,
        )
        .with_traceparent(Some(traceparent.clone()));
        let (tx, rx) = oneshot::channel();
        let token = self.pending.lock().add(correlation_id, tx);
        let _guard = PendingGuard {
            pending: &self.pending,
            correlation_id,
            token,
        };

        let bytes = envelope.to_bytes();
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "traceparent",
            value: Some(traceparent.as_str()),
        });
        let record = FutureRecord::to(&self.config.topics.request)
            .key(correlation_id)
            .headers(headers)
            .payload(&bytes);
        let outcome = tokio::time::timeout(timeout, async {
            self.producer
                .send(record, timeout)
                .await
                .map_err(|(e, _)| BusError::Unavailable(e.to_string()))?;
            rx.await
                .map_err(|_| BusError::Unavailable("reply reader stopped".into()))
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(_) => Err(BusError::Timeout {
                correlation_id: correlation_id.to_string(),
                after: timeout,
            }),
        }
    }
}

/// A copy of `request` with a fresh request id, when it is a write without one.
fn with_request_id<R: BusRequestMessage>(request: &R) -> Option<R> {
    if request.request_id()?.trim().is_empty() {
        let mut request = request.clone();
        if let Some(id) = request.request_id_mut() {
            *id = uuid::Uuid::new_v4().to_string();
        }
        return Some(request);
    }
    None
}

/// The response a structured `op` request's reply carries. A reply for another operation
/// (the correlation id was reused by a different call) is a protocol error, not an answer.
fn structured_response<T: prost::Message + Default>(
    op: StructuredOperation,
    reply: Reply,
) -> Result<T, BusError> {
    match reply {
        Reply::Completed(done) => {
            // Empty: a db-svc that does not name it; ours always does.
            if !done.operation.is_empty() && done.operation != op.as_str() {
                return Err(BusError::Protocol(format!(
                    "the reply is for a {} request, not {} (correlation ids must be unique \
                     per request)",
                    done.operation,
                    op.as_str()
                )));
            }
            let response = done.response.ok_or_else(|| {
                BusError::Protocol("a structured request's reply has no `response`".into())
            })?;
            decode_response(op.response_message(), &response)
        }
        Reply::Failed(failed) => Err(BusError::Failed(Box::new(failed))),
    }
}

/// The `timeout_ms` a request carries for the bus timeout `timeout`: at most
/// [`crate::MAX_DEADLINE`] (the milliseconds of `Duration::MAX` do not fit a u64, and db-svc
/// refuses a deadline past its calendar), which is no deadline in practice either.
fn timeout_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.min(crate::MAX_DEADLINE).as_millis()).unwrap_or(u64::MAX)
}

/// The gRPC response message carried (as proto3 JSON) by a structured reply.
///
/// Fields (and enum values) this client does not know are skipped, as a protobuf client skips
/// them on the direct path: a reply from a newer db-svc reports a write that happened, and
/// refusing it would report that write as failed (without a fallback, as a bad reply proves
/// nothing about whether it was done). Requests are still parsed strictly by db-svc.
fn decode_response<T: prost::Message + Default>(
    full_name: &str,
    response: &serde_json::Value,
) -> Result<T, BusError> {
    let protocol = |e: &dyn std::fmt::Display| BusError::Protocol(format!("{full_name}: {e}"));
    let descriptor =
        omnibus_proto::json::message_descriptor(full_name).map_err(|e| protocol(&e))?;
    let options = DeserializeOptions::new().deny_unknown_fields(false);
    DynamicMessage::deserialize_with_options(descriptor, response, &options)
        .map_err(|e| protocol(&e))?
        .transcode_to::<T>()
        .map_err(|e| protocol(&e))
}

/// Removes a pending entry however the call ends (reply, timeout, error, cancellation).
struct PendingGuard<'a> {
    pending: &'a Pending,
    correlation_id: &'a str,
    token: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(self.correlation_id, self.token);
    }
}

async fn read_replies(
    consumer: Arc<StreamConsumer>,
    completed_topic: String,
    pending: Pending,
    outage: Outage,
) {
    loop {
        let message = match consumer.recv().await {
            Ok(m) => m,
            Err(e) => {
                if let KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown) = e {
                    outage
                        .lock()
                        .get_or_insert_with(|| chrono::Utc::now().timestamp_millis());
                }
                tracing::warn!("reply consumer: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Some(bytes) = message.payload() else {
            continue;
        };
        match parse_reply(bytes, message.topic() == completed_topic) {
            Ok((correlation_id, reply)) => {
                // A waiter whose call just ended (timed out, its guard not yet run) no longer
                // listens: the reply goes to the next one waiting on the id, if any.
                let mut reply = reply;
                loop {
                    let Some(tx) = pending.lock().take_first(&correlation_id) else {
                        break;
                    };
                    match tx.send(reply) {
                        Ok(()) => break,
                        Err(returned) => reply = returned,
                    }
                }
            }
            Err(e) => tracing::debug!("ignoring a reply that does not parse: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_an_outage_only_partitions_with_newer_records_are_moved() {
        let mut answers = TopicPartitionList::new();
        answers
            .add_partition_offset("done", 0, Offset::Offset(0))
            .unwrap();
        answers
            .add_partition_offset("done", 1, Offset::Offset(17))
            .unwrap();
        answers
            .add_partition_offset("done", 2, Offset::End)
            .unwrap();
        answers
            .add_partition_offset("failed", 0, Offset::Invalid)
            .unwrap();
        let seeks: Vec<_> = repositioned(&answers)
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
            .collect();
        assert_eq!(
            seeks,
            vec![
                ("done".into(), 0, Offset::Offset(0)),
                ("done".into(), 1, Offset::Offset(17)),
            ]
        );
    }

    #[test]
    fn partitions_added_since_connecting_are_read_from_their_beginning() {
        let mut assigned = TopicPartitionList::new();
        for p in 0..3 {
            assigned
                .add_partition_offset("done", p, Offset::Offset(40))
                .unwrap();
        }
        let listed = vec![
            ("done".to_string(), vec![0, 1, 2, 3, 4]),
            ("failed".to_string(), vec![0]),
        ];
        let added = added_partitions(&listed, &assigned);
        let added: Vec<_> = added
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
            .collect();
        assert_eq!(
            added,
            vec![
                ("done".into(), 3, Offset::Beginning),
                ("done".into(), 4, Offset::Beginning),
                ("failed".into(), 0, Offset::Beginning),
            ]
        );
        assert_eq!(added_partitions(&listed[..1], &assigned).count(), 2);
    }

    /// Two calls waiting on one correlation id each get a reply, in order, and a call that
    /// ends removes only its own entry.
    #[test]
    fn calls_sharing_a_correlation_id_each_get_a_reply() {
        let reply = |code: &str| Reply::Failed(FailedPayload::new(code, "x"));
        let mut w = Waiting::default();
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        let (tx3, mut rx3) = oneshot::channel();
        let _t1 = w.add("c", tx1);
        let t2 = w.add("c", tx2);
        let _t3 = w.add("c", tx3);
        w.remove("c", t2); // the second call timed out
        let _ = w.take_first("c").unwrap().send(reply("FIRST"));
        let _ = w.take_first("c").unwrap().send(reply("SECOND"));
        assert!(w.take_first("c").is_none());
        assert!(w.by_id.is_empty(), "no entry left behind");
        let code = |r: Reply| match r {
            Reply::Failed(f) => f.error_code,
            Reply::Completed(_) => String::new(),
        };
        assert_eq!(code(rx1.try_recv().unwrap()), "FIRST");
        assert!(rx2.try_recv().is_err());
        assert_eq!(code(rx3.try_recv().unwrap()), "SECOND");
    }

    /// A bus timeout too long for any deadline (`Duration::MAX`) is sent as the longest one
    /// gRPC carries, which db-svc accepts, not as a wrapped or out-of-range number.
    #[test]
    fn the_deadline_sent_is_at_most_what_grpc_carries() {
        let longest = 99_999_999u64 * 3600 * 1000;
        assert_eq!(timeout_ms(Duration::MAX), longest);
        assert_eq!(
            timeout_ms(Duration::from_secs(u64::MAX / 1000 + 1)),
            longest
        );
        assert_eq!(timeout_ms(Duration::from_millis(1500)), 1500);
    }

    /// A reply from a newer db-svc, whose response message has a field this client does not
    /// know, still decodes: the write happened, and an error would report it as failed.
    #[test]
    fn replies_with_fields_this_client_does_not_know_decode() {
        let response = serde_json::json!({
            "rows": [{"agent_name": "coder"}],
            "affected": 1,
            "replayed": true,
            "a_field_from_a_newer_db_svc": {"nested": [1, 2]},
            "anotherNewField": "x",
        });
        let decoded: pb::InsertResponse =
            decode_response(StructuredOperation::Insert.response_message(), &response).unwrap();
        assert_eq!(decoded.affected, 1);
        assert!(decoded.replayed);
        assert_eq!(decoded.rows.len(), 1);
        // Known fields are still checked: a value of the wrong type is a bad reply.
        let wrong = serde_json::json!({"affected": "many"});
        assert!(matches!(
            decode_response::<pb::InsertResponse>(
                StructuredOperation::Insert.response_message(),
                &wrong
            ),
            Err(BusError::Protocol(_))
        ));
    }

    /// A write sent without a request id gets a fresh one per call (a retry of it is a new
    /// write unless the caller names the id); one that has an id, and a read, go as they are.
    #[test]
    fn a_write_without_a_request_id_gets_a_fresh_one() {
        let insert = pb::InsertRequest::default();
        let a = with_request_id(&insert).expect("an id is added");
        let b = with_request_id(&insert).expect("an id is added");
        assert!(!a.request_id.is_empty());
        assert_ne!(a.request_id, b.request_id);
        let blank = pb::UpdateRequest {
            request_id: "  ".into(),
            ..Default::default()
        };
        assert!(
            !with_request_id(&blank)
                .unwrap()
                .request_id
                .trim()
                .is_empty()
        );
        let named = pb::InsertRequest {
            request_id: "mine".into(),
            ..Default::default()
        };
        assert!(with_request_id(&named).is_none(), "kept as it is");
        assert!(with_request_id(&pb::QueryRequest::default()).is_none());
    }

    /// A reply for another operation than the one sent is not taken as its answer.
    #[test]
    fn a_reply_for_another_operation_is_a_protocol_error() {
        let completed = |operation: &str| {
            Reply::Completed(bus_protocol::CompletedPayload {
                operation: operation.into(),
                response: Some(serde_json::json!({"affected": 1})),
                ..Default::default()
            })
        };
        let insert =
            |reply| structured_response::<pb::InsertResponse>(StructuredOperation::Insert, reply);
        assert_eq!(insert(completed("INSERT")).unwrap().affected, 1);
        assert_eq!(insert(completed("")).unwrap().affected, 1, "not named");
        match insert(completed("DELETE")) {
            Err(BusError::Protocol(why)) => assert!(why.contains("DELETE"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            insert(Reply::Failed(FailedPayload::new("CONFLICT", "x"))),
            Err(BusError::Failed(_))
        ));
    }

    /// Only answers that prove nothing was done send a write to the direct path.
    /// After a broker restarted empty, the saved positions are past the new logs' ends: the
    /// consumer then reads the new logs from their start, where the replies since are.
    #[test]
    fn the_reply_consumer_reads_a_log_it_lost_its_place_in_from_the_start() {
        let c = reply_consumer_config(&BusConfig::new("b:9092"), "g");
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("group.id"), Some("g"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn falls_back_when_the_bus_gave_no_usable_answer() {
        let failed = |code: &str| BusError::Failed(Box::new(FailedPayload::new(code, "x")));
        assert!(
            BusError::Timeout {
                correlation_id: "c".into(),
                after: Duration::from_secs(1),
            }
            .should_fall_back()
        );
        assert!(BusError::Unavailable("down".into()).should_fall_back());
        assert!(failed(bus_protocol::codes::TIMEOUT).should_fall_back());
        assert!(!failed("CONFLICT").should_fall_back());
        assert!(!failed(bus_protocol::codes::VALIDATION_ERROR).should_fall_back());
        assert!(!BusError::Protocol("bad".into()).should_fall_back());
        assert!(BusError::Unencodable("NaN".into()).should_fall_back());
        // Done, but the reply did not fit on the bus: gRPC returns the recorded result.
        assert!(failed(bus_protocol::codes::REPLY_TOO_LARGE).should_fall_back());
    }

    /// A write refused because its rows would not fit a reply (nothing written) goes over
    /// gRPC; a validation error does not, even one on the same field with the same message.
    #[test]
    fn falls_back_on_a_write_refused_for_its_rows_not_on_a_validation_error() {
        let message = "invalid request: count_only: the rows the write returns come to more \
                       than the 1 bytes a bus reply carries of them; nothing was written";
        let refused = |code: &str| {
            let mut f = FailedPayload::new(code, message);
            f.grpc_code = "INVALID_ARGUMENT".into();
            f.details = serde_json::json!({
                "field_violations": [{"field": "count_only", "description": "…"}]
            });
            BusError::Failed(Box::new(f))
        };
        assert!(refused(bus_protocol::codes::WRITE_REPLY_TOO_LARGE).should_fall_back());
        assert!(!refused(bus_protocol::codes::VALIDATION_ERROR).should_fall_back());
        assert_eq!(
            bus_protocol::codes::WRITE_REPLY_TOO_LARGE,
            "WRITE_REPLY_TOO_LARGE",
            "the code db-svc sends"
        );
    }
}
