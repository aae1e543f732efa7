//! Typed Rust clients for omnibus and the helpers behind the `omnibus` command-line tool.

pub mod bus;
pub mod connect;
pub mod db;
pub mod generate;
pub mod health;

use std::time::Duration;

pub use kafka_settings::{self, KafkaSetting};
pub use omnibus_proto as proto;

/// A librdkafka client configuration for `brokers` with `settings` (TLS, SASL, ...) applied.
pub fn kafka_client(brokers: &str, settings: &[KafkaSetting]) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    kafka_settings::apply(config.set("bootstrap.servers", brokers), settings);
    config
}

/// The longest deadline a call carries: 99,999,999 hours (about 11,400 years). gRPC's
/// `grpc-timeout` header holds at most 8 digits of its largest unit, and tonic panics when
/// asked to send a longer one; a longer timeout (up to `Duration::MAX`) means no deadline in
/// practice, so it is shortened to this rather than refused.
pub const MAX_DEADLINE: Duration = Duration::from_secs(99_999_999 * 3600);
