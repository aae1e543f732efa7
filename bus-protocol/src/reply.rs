//! Reply payloads and how a client reads a reply.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{DATABASE_QUERY_COMPLETED, DATABASE_QUERY_FAILED, Envelope};

/// `payload` of a `DATABASE_QUERY_COMPLETED` reply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletedPayload {
    /// Returned rows (queries, and writes that return rows), column name → JSON value.
    #[serde(default)]
    pub rows: Vec<Map<String, Value>>,
    /// `rows.len()`.
    #[serde(default)]
    pub row_count: u64,
    /// Rows written (writes), counted (count) or returned (queries).
    #[serde(default)]
    pub rows_affected: u64,
    #[serde(default)]
    pub execution_time_ms: f64,
    /// The operation that ran (`INSERT`, `QUERY`, ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operation: String,
    /// True when this is the recorded result of an earlier delivery of the same request
    /// (nothing was written again).
    #[serde(default)]
    pub replayed: bool,
    /// Structured form only: the proto3 JSON of the gRPC response message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
}

/// `payload` of a `DATABASE_QUERY_FAILED` reply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailedPayload {
    /// Stable code: `VALIDATION_ERROR`, `NOT_FOUND`, `CONFLICT`, `DATABASE_UNAVAILABLE`, `TIMEOUT`, ...
    pub error_code: String,
    /// Human-readable message (OmniClaude reads `error`).
    pub error: String,
    /// The same message (other clients read `error_message`).
    #[serde(default)]
    pub error_message: String,
    /// The gRPC status code name the same failure gets on the direct path.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub grpc_code: String,
    /// Field violations and other details, when there are any.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub details: Value,
    /// Whether sending the same request again may succeed.
    #[serde(default)]
    pub retryable: bool,
}

impl FailedPayload {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            error_code: code.to_string(),
            error: message.clone(),
            error_message: message,
            ..Self::default()
        }
    }
}

/// A reply as a client sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Completed(CompletedPayload),
    Failed(FailedPayload),
}

impl Reply {
    /// The envelope to publish for this reply (by reference: a publisher that must retry or
    /// replace the message keeps the reply).
    pub fn envelope(&self, correlation_id: &str, service: &str) -> Envelope {
        match self {
            Reply::Completed(p) => Envelope::new(
                DATABASE_QUERY_COMPLETED,
                correlation_id,
                service,
                serde_json::to_value(p).unwrap_or(Value::Null),
            ),
            Reply::Failed(p) => Envelope::new(
                DATABASE_QUERY_FAILED,
                correlation_id,
                service,
                serde_json::to_value(p).unwrap_or(Value::Null),
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("reply is not a valid envelope: {0}")]
    Malformed(String),
}

/// Reads a reply message. As OmniClaude's client does, a reply counts as success when its
/// `event_type` is COMPLETED or it arrived on the completed topic.
pub fn parse_reply(bytes: &[u8], on_completed_topic: bool) -> Result<(String, Reply), ReplyError> {
    let envelope: Envelope =
        serde_json::from_slice(bytes).map_err(|e| ReplyError::Malformed(e.to_string()))?;
    let success = envelope.event_type == DATABASE_QUERY_COMPLETED
        || (on_completed_topic && envelope.event_type != DATABASE_QUERY_FAILED);
    let reply = if success {
        Reply::Completed(
            serde_json::from_value(envelope.payload)
                .map_err(|e| ReplyError::Malformed(e.to_string()))?,
        )
    } else {
        Reply::Failed(
            serde_json::from_value(envelope.payload)
                .map_err(|e| ReplyError::Malformed(e.to_string()))?,
        )
    };
    Ok((envelope.correlation_id, reply))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn completed_replies_have_the_fields_omniclaude_reads() {
        let mut row = Map::new();
        row.insert("id".into(), json!("x"));
        let env = Reply::Completed(CompletedPayload {
            rows: vec![row],
            row_count: 1,
            rows_affected: 1,
            execution_time_ms: 1.5,
            operation: "INSERT".into(),
            ..Default::default()
        })
        .envelope("c-1", "db-svc");
        let v: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert_eq!(v["event_type"], "DATABASE_QUERY_COMPLETED");
        assert_eq!(v["correlation_id"], "c-1");
        assert_eq!(v["payload"]["rows"][0]["id"], "x");
        assert_eq!(v["payload"]["row_count"], 1);
        assert_eq!(v["payload"]["rows_affected"], 1);
        assert_eq!(v["payload"]["execution_time_ms"], 1.5);
        let (cid, back) = parse_reply(&env.to_bytes(), false).unwrap();
        assert_eq!(cid, "c-1");
        assert!(matches!(back, Reply::Completed(p) if p.row_count == 1));
    }

    #[test]
    fn failed_replies_carry_code_error_and_error_message() {
        let env = Reply::Failed(FailedPayload::new("VALIDATION_ERROR", "unknown column x"))
            .envelope("c-2", "db-svc");
        let v: Value = serde_json::from_slice(&env.to_bytes()).unwrap();
        assert_eq!(v["event_type"], "DATABASE_QUERY_FAILED");
        assert_eq!(v["payload"]["error_code"], "VALIDATION_ERROR");
        assert_eq!(v["payload"]["error"], "unknown column x");
        assert_eq!(v["payload"]["error_message"], "unknown column x");
        // Even on the completed topic, an explicit FAILED is a failure.
        let (_, back) = parse_reply(&env.to_bytes(), true).unwrap();
        assert!(matches!(back, Reply::Failed(p) if p.error_code == "VALIDATION_ERROR"));
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert!(parse_reply(b"nope", true).is_err());
    }
}
