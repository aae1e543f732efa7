//! `omnibus`: the command-line tool for both services.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic_health::pb::health_check_response::ServingStatus;

#[derive(Parser)]
#[command(
    name = "omnibus",
    version,
    about = "Talk to omnibus: consumer-svc and db-svc."
)]
struct Cli {
    /// consumer-svc gRPC address.
    #[arg(
        long,
        global = true,
        env = "OMNIBUS_CONSUMER_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    consumer_addr: String,

    /// db-svc gRPC address.
    #[arg(
        long,
        global = true,
        env = "OMNIBUS_DB_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    db_addr: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a service's gRPC health; exits 0 only when it is SERVING (usable as a container
    /// health check).
    ///
    /// Example: omnibus health db
    Health {
        /// Which service: `consumer`, `db`, or a host:port.
        target: String,
        /// Health service name to ask about ("" = the whole server).
        #[arg(long, default_value = "")]
        service: String,
        /// How long to wait for an answer.
        #[arg(long, default_value = "3", value_parser = parse_secs)]
        timeout: Duration,
    },
}

fn parse_secs(raw: &str) -> Result<Duration, String> {
    raw.trim_end_matches('s')
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("'{raw}' is not a number of seconds"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Health {
            target,
            service,
            timeout,
        } => {
            let addr = match target.as_str() {
                "consumer" => cli.consumer_addr.clone(),
                "db" => cli.db_addr.clone(),
                other => other.to_string(),
            };
            match omnibus_client::health::check(&addr, &service, timeout).await {
                Ok(ServingStatus::Serving) => {
                    println!("{addr}: SERVING");
                    ExitCode::SUCCESS
                }
                Ok(other) => {
                    println!("{addr}: {}", other.as_str_name());
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("omnibus: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
