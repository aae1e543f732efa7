//! All consumer-svc settings: flags with environment fallbacks.

use std::net::SocketAddr;

use clap::Parser;
use svc_kit::{ServerArgs, telemetry::LogArgs};

/// consumer-svc: consumes agent events from Kafka and serves live aggregations over gRPC.
#[derive(Clone, Debug, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "CONSUMER_SVC_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Alternative name for --kafka-brokers (the guide accepts either variable).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", hide_short_help = true)]
    pub kafka_bootstrap_servers: Option<String>,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// Settings after validation.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// Validated bootstrap list, joined with commas for librdkafka.
    pub brokers: String,
    pub server: ServerArgs,
    pub log: LogArgs,
}

impl Config {
    /// Checks the settings clap cannot check alone; the error names the setting.
    pub fn validate(self) -> Result<Settings, String> {
        let (name, raw) = match (&self.kafka_brokers, &self.kafka_bootstrap_servers) {
            (Some(b), _) => ("KAFKA_BROKERS", b.clone()),
            (None, Some(b)) => ("KAFKA_BOOTSTRAP_SERVERS", b.clone()),
            (None, None) => {
                return Err(
                    "missing setting KAFKA_BROKERS (or KAFKA_BOOTSTRAP_SERVERS / --kafka-brokers): \
                     the Kafka bootstrap servers, e.g. 127.0.0.1:9092"
                        .into(),
                );
            }
        };
        let brokers = svc_kit::config::parse_host_ports(name, &raw)?.join(",");
        Ok(Settings {
            listen: self.listen,
            brokers,
            server: self.server,
            log: self.log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        svc_kit::config::parse_args_ignoring_env(
            std::iter::once("consumer-svc").chain(args.iter().copied()),
        )
        .unwrap()
    }

    #[test]
    fn brokers_are_required_and_checked() {
        let err = parse(&[]).validate().unwrap_err();
        assert!(err.contains("KAFKA_BROKERS"), "{err}");
        let err = parse(&["--kafka-brokers", "nohostport"])
            .validate()
            .unwrap_err();
        assert!(err.contains("KAFKA_BROKERS"), "{err}");
        let ok = parse(&["--kafka-bootstrap-servers", "a:1,b:2"])
            .validate()
            .unwrap();
        assert_eq!(ok.brokers, "a:1,b:2");
    }

    #[test]
    fn kafka_brokers_wins_over_bootstrap_servers() {
        let s = parse(&["--kafka-brokers", "a:1", "--kafka-bootstrap-servers", "b:2"])
            .validate()
            .unwrap();
        assert_eq!(s.brokers, "a:1");
    }
}
