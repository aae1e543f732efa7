//! The envelope every message on the database topics carries, and the topic names.

use serde::{Deserialize, Serialize};

/// `{event_id, event_type, correlation_id, timestamp, service, payload}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: String,
    pub event_type: String,
    pub correlation_id: String,
    /// RFC 3339 / ISO 8601.
    pub timestamp: String,
    #[serde(default)]
    pub service: String,
    #[serde(default)]
    pub payload: serde_json::Value,
    /// W3C `traceparent` of the sender's span, when it has one: replies carry the same
    /// trace id, so one trace spans client, bus and db-svc.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Envelope {
    /// A new envelope with a fresh `event_id` and the current time.
    pub fn new(
        event_type: &str,
        correlation_id: impl Into<String>,
        service: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            event_id: uuid::Uuid::new_v4().to_string(),
            event_type: event_type.to_string(),
            correlation_id: correlation_id.into(),
            timestamp: now_rfc3339(),
            service: service.into(),
            payload,
            traceparent: None,
        }
    }

    /// The same envelope with a `traceparent`.
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings and a JSON value cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The current time as RFC 3339 with microseconds (like Python's `isoformat()`).
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
}

/// The four database topics. Defaults are the OmniClaude client's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topics {
    pub request: String,
    pub completed: String,
    pub failed: String,
    /// Requests that cannot be answered (no correlation id) go here with the reason.
    pub dead_letter: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            request: "dev.omninode-bridge.database.query-requested.v1".into(),
            completed: "dev.omninode-bridge.database.query-completed.v1".into(),
            failed: "dev.omninode-bridge.database.query-failed.v1".into(),
            dead_letter: "dev.omninode-bridge.database.query-dlq.v1".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_carry_fresh_ids() {
        let a = Envelope::new("X", "c-1", "svc", serde_json::json!({"k": 1}));
        let b = Envelope::new("X", "c-1", "svc", serde_json::json!({"k": 1}));
        assert_ne!(a.event_id, b.event_id);
        let back: Envelope = serde_json::from_slice(&a.to_bytes()).unwrap();
        assert_eq!(back, a);
        assert!(chrono::DateTime::parse_from_rfc3339(&a.timestamp).is_ok());
    }
}
