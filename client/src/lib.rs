//! Typed Rust clients for omnibus and the helpers behind the `omnibus` command-line tool.

pub mod bus;
pub mod connect;
pub mod db;
pub mod generate;
pub mod health;

pub use kafka_settings::{self, KafkaSetting};
pub use omnibus_proto as proto;

/// A librdkafka client configuration for `brokers` with `settings` (TLS, SASL, ...) applied.
pub fn kafka_client(brokers: &str, settings: &[KafkaSetting]) -> rdkafka::ClientConfig {
    let mut config = rdkafka::ClientConfig::new();
    kafka_settings::apply(config.set("bootstrap.servers", brokers), settings);
    config
}
