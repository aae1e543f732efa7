//! Pass-through of librdkafka client settings (SASL, SSL, anything else) to every Kafka client
//! a service creates.
//!
//! Two sources, merged (later wins): environment variables `KAFKA_SECURITY_PROTOCOL`,
//! `KAFKA_SASL_*` and `KAFKA_SSL_*`, mapped to librdkafka names by dropping `KAFKA_`,
//! lower-casing and turning `_` into `.` (`KAFKA_SASL_MECHANISMS` -> `sasl.mechanisms`,
//! `KAFKA_SSL_CA_LOCATION` -> `ssl.ca.location`); then `--kafka-config key=value` (repeatable;
//! env `KAFKA_CONFIG`, `;`-separated) for any other property. Values are never logged.
//!
//! The services call [`install`] once at start-up and [`apply`] on every `ClientConfig`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use kafka_settings::{KafkaSetting, describe_error, from_env_vars};

use crate::log_budget::LogBudget;

static SETTINGS: OnceLock<Vec<KafkaSetting>> = OnceLock::new();

/// Records the process's Kafka settings: the environment's, then `explicit` (from
/// `--kafka-config`). The first call wins.
pub fn install(explicit: &[KafkaSetting]) {
    let all = kafka_settings::merged(explicit);
    if !all.is_empty() {
        let keys: Vec<&str> = all.iter().map(|s| s.key.as_str()).collect();
        tracing::info!(
            ?keys,
            "Kafka client settings passed through (values hidden)"
        );
    }
    let _ = SETTINGS.set(all);
}

/// The installed settings (the environment's alone if [`install`] was not called).
pub fn settings() -> &'static [KafkaSetting] {
    SETTINGS.get_or_init(|| from_env_vars(std::env::vars()))
}

/// Sets every pass-through property on `config` (an `rdkafka::ClientConfig`).
pub fn apply(config: &mut rdkafka::ClientConfig) -> &mut rdkafka::ClientConfig {
    apply_these(config, settings())
}

/// Sets `these` (e.g. [`settings`]) on `config`, in order: for a client whose own tuning the
/// operator may change, applied after that tuning.
pub fn apply_these<'c>(
    config: &'c mut rdkafka::ClientConfig,
    these: &[KafkaSetting],
) -> &'c mut rdkafka::ClientConfig {
    kafka_settings::apply(config, these)
}

/// The log lines of one Kafka client's errors, within a budget of 5 lines per 10 s.
/// librdkafka repeats an error for as long as its cause lasts (`AllBrokersDown` after every
/// failed reconnect, and again from every poll: 10-20 lines a second through a broker
/// outage), which would bury everything else in the log. The next line logged says how many
/// were left out (`unlogged_before`); `client` says whose they are.
#[derive(Debug)]
pub struct ClientErrorLog {
    budget: LogBudget,
    client: &'static str,
}

impl ClientErrorLog {
    pub const fn new(client: &'static str) -> Self {
        Self {
            budget: LogBudget::new(5, Duration::from_secs(10)),
            client,
        }
    }

    /// What the client's error callback (`ClientContext::error`) reports.
    pub fn error(&self, error: &rdkafka::error::KafkaError, reason: &str) {
        if let Some(unlogged) = self.budget.may_log(Instant::now()) {
            tracing::error!(
                client = self.client,
                unlogged_before = unlogged,
                "librdkafka: {error}: {reason}"
            );
        }
    }

    /// An error a poll returned instead of a message.
    pub fn poll_error(&self, error: &rdkafka::error::KafkaError) {
        if let Some(unlogged) = self.budget.may_log(Instant::now()) {
            tracing::warn!(
                client = self.client,
                unlogged_before = unlogged,
                "poll: {error}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    use super::ClientErrorLog;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// An outage's flood of `AllBrokersDown` (and of poll errors) comes out as 5 lines per
    /// window, naming the client.
    #[test]
    fn a_clients_repeated_errors_are_logged_five_times_per_window() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let log = ClientErrorLog::new("test consumer");
        let down = KafkaError::Global(RDKafkaErrorCode::AllBrokersDown);
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..50 {
                log.error(&down, "1/1 brokers are down");
                log.poll_error(&down);
            }
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines.iter().all(|l| l.contains("client=\"test consumer\"")),
            "{text}"
        );
    }
}
