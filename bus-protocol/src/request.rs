//! Parsing a request envelope into a [`BusRequest`], or a [`Rejection`] that still carries the
//! correlation id whenever one can be found, so that the sender gets a FAILED reply instead of
//! silence.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::{DATABASE_QUERY_REQUESTED, codes};

/// The statement kinds of the OmniClaude form's `operation_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlOperation {
    Query,
    Insert,
    Update,
    Delete,
    Upsert,
}

impl SqlOperation {
    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw.trim().to_ascii_uppercase().as_str() {
            "QUERY" | "SELECT" => Self::Query,
            "INSERT" => Self::Insert,
            "UPDATE" => Self::Update,
            "DELETE" => Self::Delete,
            "UPSERT" => Self::Upsert,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Query => "QUERY",
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Upsert => "UPSERT",
        }
    }

    pub fn is_write(self) -> bool {
        self != Self::Query
    }
}

/// The OmniClaude `DatabaseEventClient` payload.
#[derive(Clone, Debug, PartialEq)]
pub struct SqlRequest {
    pub operation_type: SqlOperation,
    pub entity_type: Option<String>,
    /// SQL with `$1..$n` placeholders; the parameters are bound, never spliced.
    pub query: String,
    pub params: Vec<Value>,
    pub filters: Option<Map<String, Value>>,
    pub limit: Option<u64>,
    pub offset: Option<u64>,
}

/// The structured form's operations, one per db-svc RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructuredOperation {
    Query,
    Insert,
    Update,
    Delete,
    Upsert,
    Count,
    ExecuteRaw,
}

impl StructuredOperation {
    pub fn parse(raw: &str) -> Option<Self> {
        let norm: String = raw
            .chars()
            .filter(|c| *c != '_' && *c != '-')
            .collect::<String>()
            .to_ascii_uppercase();
        Some(match norm.as_str() {
            "QUERY" => Self::Query,
            "INSERT" => Self::Insert,
            "UPDATE" => Self::Update,
            "DELETE" => Self::Delete,
            "UPSERT" => Self::Upsert,
            "COUNT" => Self::Count,
            "EXECUTERAW" | "RAW" => Self::ExecuteRaw,
            _ => return None,
        })
    }

    /// The full proto name of the gRPC request message whose JSON the form carries.
    pub fn request_message(self) -> &'static str {
        match self {
            Self::Query => "omnibus.db.v1.QueryRequest",
            Self::Insert => "omnibus.db.v1.InsertRequest",
            Self::Update => "omnibus.db.v1.UpdateRequest",
            Self::Delete => "omnibus.db.v1.DeleteRequest",
            Self::Upsert => "omnibus.db.v1.UpsertRequest",
            Self::Count => "omnibus.db.v1.CountRequest",
            Self::ExecuteRaw => "omnibus.db.v1.ExecuteRawRequest",
        }
    }

    /// The full proto name of the matching gRPC response message.
    pub fn response_message(self) -> &'static str {
        match self {
            Self::Query => "omnibus.db.v1.QueryResponse",
            Self::Insert => "omnibus.db.v1.InsertResponse",
            Self::Update => "omnibus.db.v1.UpdateResponse",
            Self::Delete => "omnibus.db.v1.DeleteResponse",
            Self::Upsert => "omnibus.db.v1.UpsertResponse",
            Self::Count => "omnibus.db.v1.CountResponse",
            Self::ExecuteRaw => "omnibus.db.v1.ExecuteRawResponse",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Query => "QUERY",
            Self::Insert => "INSERT",
            Self::Update => "UPDATE",
            Self::Delete => "DELETE",
            Self::Upsert => "UPSERT",
            Self::Count => "COUNT",
            Self::ExecuteRaw => "EXECUTE_RAW",
        }
    }
}

/// `{operation, request}`: the request is the proto3 JSON of the gRPC request message.
#[derive(Clone, Debug, PartialEq)]
pub struct StructuredRequest {
    pub operation: StructuredOperation,
    pub request: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RequestBody {
    Sql(SqlRequest),
    Structured(StructuredRequest),
}

/// When the sender stops waiting: past it, the request is answered TIMEOUT, not executed.
pub type Deadline = DateTime<Utc>;

/// A parsed, well-formed request.
#[derive(Clone, Debug, PartialEq)]
pub struct BusRequest {
    pub event_id: String,
    pub correlation_id: String,
    pub service: String,
    pub timestamp: Option<DateTime<Utc>>,
    pub deadline: Option<Deadline>,
    /// `payload.timeout_ms`, when the deadline came from it (`timestamp` + it): a receiver
    /// whose clock is behind the sender's counts it from receipt instead
    /// ([`BusRequest::deadline_from_receipt`]).
    pub timeout: Option<chrono::Duration>,
    /// W3C `traceparent`, if the sender put one in the envelope.
    pub traceparent: Option<String>,
    pub body: RequestBody,
}

/// Why a message could not be turned into a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    /// The correlation id, when one could be found: then the sender gets a FAILED reply;
    /// otherwise the message goes to the dead-letter topic.
    pub correlation_id: Option<String>,
    pub code: &'static str,
    pub message: String,
}

fn reject(correlation_id: &Option<String>, message: impl Into<String>) -> Rejection {
    Rejection {
        correlation_id: correlation_id.clone(),
        code: codes::VALIDATION_ERROR,
        message: message.into(),
    }
}

fn non_empty_str(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn get<'a>(obj: &'a Map<String, Value>, snake: &str, camel: &str) -> Option<&'a Value> {
    obj.get(snake)
        .or_else(|| obj.get(camel))
        .filter(|v| !v.is_null())
}

fn parse_time(field: &str, v: &Value, cid: &Option<String>) -> Result<DateTime<Utc>, Rejection> {
    let raw = v
        .as_str()
        .ok_or_else(|| reject(cid, format!("{field} must be an RFC 3339 string")))?;
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        // Python's isoformat() without an offset: read it as UTC.
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
        })
        .map_err(|_| {
            reject(
                cid,
                format!("{field} is not an RFC 3339 timestamp: '{raw}'"),
            )
        })
}

fn opt_u64(
    obj: &Map<String, Value>,
    field: &str,
    cid: &Option<String>,
) -> Result<Option<u64>, Rejection> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            reject(
                cid,
                format!("payload.{field} must be a non-negative integer"),
            )
        }),
    }
}

/// Parses a request message. `key` is the Kafka message key, used as the correlation id when
/// the envelope has none (our publisher keys requests by correlation id; OmniClaude sends none).
pub fn parse_request(bytes: &[u8], key: Option<&[u8]>) -> Result<BusRequest, Rejection> {
    let key_cid = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_string);
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| reject(&key_cid, format!("the message is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(reject(
            &key_cid,
            "the message must be a JSON object (an envelope)",
        ));
    };
    let payload_obj = get(&obj, "payload", "payload").and_then(Value::as_object);
    let cid = non_empty_str(get(&obj, "correlation_id", "correlationId"))
        .or_else(|| {
            payload_obj.and_then(|p| non_empty_str(get(p, "correlation_id", "correlationId")))
        })
        .or(key_cid);

    match non_empty_str(get(&obj, "event_type", "eventType")) {
        Some(t) if t == DATABASE_QUERY_REQUESTED => {}
        Some(t) => {
            return Err(reject(
                &cid,
                format!("event_type must be {DATABASE_QUERY_REQUESTED}, got '{t}'"),
            ));
        }
        None => return Err(reject(&cid, "event_type is missing")),
    }
    let Some(correlation_id) = cid.clone() else {
        return Err(reject(&None, "correlation_id is missing"));
    };
    let payload = payload_obj.ok_or_else(|| reject(&cid, "payload must be a JSON object"))?;

    let timestamp = get(&obj, "timestamp", "timestamp")
        .map(|v| parse_time("timestamp", v, &cid))
        .transpose()?;
    let mut timeout = None;
    let deadline =
        match get(payload, "deadline", "deadline").or_else(|| get(&obj, "deadline", "deadline")) {
            Some(v) => Some(parse_time("deadline", v, &cid)?),
            None => match get(payload, "timeout_ms", "timeoutMs") {
                Some(v) => {
                    let ms = v.as_u64().ok_or_else(|| {
                        reject(&cid, "payload.timeout_ms must be a non-negative integer")
                    })?;
                    let start = timestamp.ok_or_else(|| {
                        reject(&cid, "payload.timeout_ms needs the envelope timestamp")
                    })?;
                    // checked: a huge timeout is an error to report, never a panic (the
                    // request would be redelivered and panic again).
                    timeout = i64::try_from(ms)
                        .ok()
                        .and_then(chrono::Duration::try_milliseconds);
                    let deadline = timeout
                        .and_then(|d| start.checked_add_signed(d))
                        .ok_or_else(|| reject(&cid, "payload.timeout_ms is out of range"))?;
                    Some(deadline)
                }
                None => None,
            },
        };

    let body = if let Some(op) = get(payload, "operation_type", "operationType") {
        let raw = op
            .as_str()
            .ok_or_else(|| reject(&cid, "payload.operation_type must be a string"))?;
        let operation_type = SqlOperation::parse(raw).ok_or_else(|| {
            reject(&cid, format!("payload.operation_type '{raw}' is not one of QUERY, INSERT, UPDATE, DELETE, UPSERT"))
        })?;
        let query = non_empty_str(get(payload, "query", "query"))
            .ok_or_else(|| reject(&cid, "payload.query (SQL text) is missing"))?;
        let params = match get(payload, "params", "params") {
            None => Vec::new(),
            Some(Value::Array(items)) => items.clone(),
            Some(_) => return Err(reject(&cid, "payload.params must be an array")),
        };
        let filters = match get(payload, "filters", "filters") {
            None => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => return Err(reject(&cid, "payload.filters must be an object or null")),
        };
        RequestBody::Sql(SqlRequest {
            operation_type,
            entity_type: non_empty_str(get(payload, "entity_type", "entityType")),
            query,
            params,
            filters,
            limit: opt_u64(payload, "limit", &cid)?,
            offset: opt_u64(payload, "offset", &cid)?,
        })
    } else if let Some(op) = get(payload, "operation", "operation") {
        let raw = op
            .as_str()
            .ok_or_else(|| reject(&cid, "payload.operation must be a string"))?;
        let operation = StructuredOperation::parse(raw).ok_or_else(|| {
            reject(
                &cid,
                format!("payload.operation '{raw}' is not one of QUERY, INSERT, UPDATE, DELETE, UPSERT, COUNT, EXECUTE_RAW"),
            )
        })?;
        let request = match get(payload, "request", "request") {
            Some(v @ Value::Object(_)) => v.clone(),
            Some(_) => return Err(reject(&cid, "payload.request must be a JSON object")),
            None => {
                return Err(reject(
                    &cid,
                    "payload.request (the gRPC request as JSON) is missing",
                ));
            }
        };
        RequestBody::Structured(StructuredRequest { operation, request })
    } else {
        return Err(reject(
            &cid,
            "payload needs either operation_type (SQL form) or operation (structured form)",
        ));
    };

    Ok(BusRequest {
        event_id: non_empty_str(get(&obj, "event_id", "eventId")).unwrap_or_default(),
        correlation_id,
        service: non_empty_str(get(&obj, "service", "service")).unwrap_or_default(),
        timestamp,
        deadline,
        timeout,
        traceparent: non_empty_str(get(&obj, "traceparent", "traceparent")),
        body,
    })
}

impl BusRequest {
    /// The deadline as the receiver counts it, the request having arrived at `received`: a
    /// `timeout_ms` runs from the envelope's timestamp, but never from later than receipt (a
    /// sender's clock ahead of the receiver's would otherwise stretch it, and the request
    /// could run after its sender gave up, and maybe wrote elsewhere). An absolute deadline
    /// is the sender's own.
    pub fn deadline_from_receipt(&self, received: DateTime<Utc>) -> Option<Deadline> {
        match (self.timeout, self.timestamp) {
            (Some(timeout), Some(sent)) if sent > received => {
                received.checked_add_signed(timeout).or(self.deadline)
            }
            _ => self.deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Exactly what OmniClaude's DatabaseEventClient sends (see the reference, section 4).
    fn omniclaude() -> Value {
        json!({
            "event_id": "8d1f7c1e-5d4b-4b8e-9a55-7c1f0b1f2a10",
            "event_type": "DATABASE_QUERY_REQUESTED",
            "correlation_id": "2f0c8a47-3f38-4c1e-a1d7-6f0b7b3a9c11",
            "timestamp": "2025-11-20T09:15:00.000000+00:00",
            "service": "omniclaude",
            "payload": {
                "operation_type": "INSERT",
                "entity_type": "agent_actions",
                "query": "INSERT INTO agent_actions (agent_name) VALUES ($1)",
                "params": ["a"],
                "filters": null,
                "limit": null,
                "offset": null
            }
        })
    }

    fn parse(v: &Value) -> Result<BusRequest, Rejection> {
        parse_request(&serde_json::to_vec(v).unwrap(), None)
    }

    #[test]
    fn parses_the_omniclaude_form() {
        let r = parse(&omniclaude()).unwrap();
        assert_eq!(r.correlation_id, "2f0c8a47-3f38-4c1e-a1d7-6f0b7b3a9c11");
        assert_eq!(r.service, "omniclaude");
        assert_eq!(
            r.timestamp.unwrap().to_rfc3339(),
            "2025-11-20T09:15:00+00:00"
        );
        assert_eq!(r.deadline, None);
        let RequestBody::Sql(sql) = r.body else {
            panic!("sql form")
        };
        assert_eq!(sql.operation_type, SqlOperation::Insert);
        assert_eq!(sql.entity_type.as_deref(), Some("agent_actions"));
        assert_eq!(sql.params, vec![json!("a")]);
        assert_eq!((sql.limit, sql.offset, sql.filters), (None, None, None));
    }

    /// A `timeout_ms` runs from the timestamp, or from receipt when the timestamp is later (a
    /// sender's clock ahead): the sender stops waiting `timeout_ms` after it sent the request.
    #[test]
    fn a_timeout_never_counts_from_after_receipt() {
        let envelope = |timestamp: &str, payload: Value| {
            parse(&json!({
                "event_type": "DATABASE_QUERY_REQUESTED", "correlation_id": "c",
                "timestamp": timestamp, "payload": payload,
            }))
            .unwrap()
        };
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let received = at("2025-11-20T09:15:00Z");
        let relative = json!({"operation": "count", "timeout_ms": 5000,
                              "request": {"table": "agent_actions"}});
        let ahead = envelope("2025-11-20T09:16:00Z", relative.clone());
        assert_eq!(ahead.deadline, Some(at("2025-11-20T09:16:05Z")), "as sent");
        assert_eq!(
            ahead.deadline_from_receipt(received),
            Some(at("2025-11-20T09:15:05Z"))
        );
        let behind = envelope("2025-11-20T09:14:58Z", relative);
        assert_eq!(
            behind.deadline_from_receipt(received),
            Some(at("2025-11-20T09:15:03Z"))
        );
        // An absolute deadline is the sender's own, whatever its clock.
        let absolute = envelope(
            "2025-11-20T09:16:00Z",
            json!({"operation": "count", "deadline": "2025-11-20T09:16:05Z",
                   "request": {"table": "agent_actions"}}),
        );
        assert_eq!(
            absolute.deadline_from_receipt(received),
            Some(at("2025-11-20T09:16:05Z"))
        );
    }

    #[test]
    fn parses_the_structured_form_with_a_deadline() {
        let v = json!({
            "event_id": "e", "event_type": "DATABASE_QUERY_REQUESTED", "correlation_id": "c",
            "timestamp": "2025-11-20T09:15:00Z", "service": "omnibus",
            "payload": {"operation": "insert", "timeout_ms": 1500,
                        "request": {"table": "agent_actions", "rows": [{"agent_name": "a"}]}}
        });
        let r = parse(&v).unwrap();
        assert_eq!(
            r.deadline.unwrap().to_rfc3339(),
            "2025-11-20T09:15:01.500+00:00"
        );
        let RequestBody::Structured(s) = r.body else {
            panic!("structured form")
        };
        assert_eq!(s.operation, StructuredOperation::Insert);
        assert_eq!(s.operation.request_message(), "omnibus.db.v1.InsertRequest");
        assert_eq!(s.request["table"], "agent_actions");
        assert_eq!(
            StructuredOperation::parse("execute_raw"),
            Some(StructuredOperation::ExecuteRaw)
        );
    }

    #[test]
    fn a_timeout_past_the_calendar_is_rejected_not_a_panic() {
        let v = json!({
            "event_id": "e", "event_type": "DATABASE_QUERY_REQUESTED", "correlation_id": "c",
            "timestamp": "2025-11-20T09:15:00Z", "service": "omnibus",
            "payload": {"operation": "count", "timeout_ms": 10_000_000_000_000_000u64,
                        "request": {"table": "agent_actions"}}
        });
        let r = parse(&v).unwrap_err();
        assert_eq!(r.correlation_id.as_deref(), Some("c"));
        assert_eq!(r.code, codes::VALIDATION_ERROR);
        assert!(
            r.message.contains("timeout_ms is out of range"),
            "{}",
            r.message
        );
    }

    #[test]
    fn rejections_keep_the_correlation_id_when_there_is_one() {
        let mut v = omniclaude();
        v["payload"]["operation_type"] = json!("MERGE");
        let r = parse(&v).unwrap_err();
        assert_eq!(
            r.correlation_id.as_deref(),
            Some("2f0c8a47-3f38-4c1e-a1d7-6f0b7b3a9c11")
        );
        assert_eq!(r.code, codes::VALIDATION_ERROR);
        assert!(r.message.contains("MERGE"), "{}", r.message);

        let mut v = omniclaude();
        v["payload"]["params"] = json!("not-a-list");
        assert!(parse(&v).unwrap_err().message.contains("params"));

        let mut v = omniclaude();
        v["event_type"] = json!("SOMETHING_ELSE");
        assert!(parse(&v).unwrap_err().correlation_id.is_some());

        let mut v = omniclaude();
        v["payload"] = json!({"limit": 3});
        assert!(parse(&v).unwrap_err().message.contains("operation"));
    }

    #[test]
    fn no_correlation_id_means_dead_letter() {
        let mut v = omniclaude();
        v.as_object_mut().unwrap().remove("correlation_id");
        assert_eq!(parse(&v).unwrap_err().correlation_id, None);
        let r = parse_request(b"{not json", None).unwrap_err();
        assert_eq!(r.correlation_id, None);
        // ...unless the Kafka key carries it.
        let r = parse_request(b"{not json", Some(b"cid-from-key")).unwrap_err();
        assert_eq!(r.correlation_id.as_deref(), Some("cid-from-key"));
        let r = parse_request(b"[1,2]", Some(b"k")).unwrap_err();
        assert_eq!(r.correlation_id.as_deref(), Some("k"));
    }

    #[test]
    fn camel_case_envelopes_and_naive_python_timestamps_are_accepted() {
        let v = json!({
            "eventId": "e", "eventType": "DATABASE_QUERY_REQUESTED", "correlationId": "c",
            "timestamp": "2025-11-20T09:15:00.123456", "service": "x",
            "payload": {"operationType": "QUERY", "query": "SELECT 1", "limit": 5}
        });
        let r = parse(&v).unwrap();
        assert_eq!(r.correlation_id, "c");
        assert_eq!(r.timestamp.unwrap().timestamp_subsec_micros(), 123456);
        let RequestBody::Sql(sql) = r.body else {
            panic!()
        };
        assert_eq!(sql.limit, Some(5));
    }

    #[test]
    fn bad_numbers_and_times_are_rejected() {
        let mut v = omniclaude();
        v["payload"]["limit"] = json!(-1);
        assert!(parse(&v).unwrap_err().message.contains("limit"));
        let mut v = omniclaude();
        v["timestamp"] = json!("yesterday");
        assert!(parse(&v).unwrap_err().message.contains("timestamp"));
        let mut v = omniclaude();
        v["payload"]["deadline"] = json!(12);
        assert!(parse(&v).unwrap_err().message.contains("deadline"));
    }
}
