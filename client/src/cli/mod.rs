//! The `omnibus` command line: argument definitions (clap), connection and error helpers, and
//! one module per subcommand.

pub mod db;
pub mod filter;
pub mod generate;
pub mod output;
pub mod status;
pub mod stream;
pub mod tail;
pub mod top;

use std::sync::OnceLock;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use omnibus_client::connect::{AuthChannel, Bearer, ConnectOptions};
use tonic::transport::Channel;

use output::Format;

const ABOUT: &str = "Talk to omnibus: watch live agent activity from consumer-svc, query and change \
the platform database through db-svc, and generate realistic load.";

const AFTER_HELP: &str = "\
Examples:
  omnibus status                                   both services at a glance
  omnibus top                                      live dashboard (q quits)
  omnibus tail actions --where agent=agent-00003   follow one agent's actions
  omnibus db tables                                what db-svc serves
  omnibus db query agent_actions --where 'duration_ms>100' --order created_at:desc --limit 5
  omnibus db insert agent_actions agent_name=coder action_type=tool_call action_name=read_file \\
      correlation_id=$(uuidgen)
  omnibus generate --rate 50 --duration 1m        realistic events on all four topics

Output is an aligned table on a terminal and JSON lines when piped (or with --json).";

/// `omnibus`: the command-line tool for consumer-svc and db-svc.
#[derive(Parser, Debug)]
#[command(name = "omnibus", version, about = ABOUT, after_help = AFTER_HELP)]
pub struct Cli {
    /// consumer-svc gRPC address (host:port).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "OMNIBUS_CONSUMER_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub consumer_addr: String,

    /// db-svc gRPC address (host:port).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "OMNIBUS_DB_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub db_addr: String,

    /// Kafka bootstrap servers (for `generate` and `db --via bus`); without the flag or
    /// KAFKA_BROKERS, KAFKA_BOOTSTRAP_SERVERS (as the services read them), else the dev broker.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "KAFKA_BROKERS",
        default_value_t = default_brokers(std::env::var("KAFKA_BOOTSTRAP_SERVERS").ok())
    )]
    pub brokers: String,

    /// Extra librdkafka property `key=value` for `generate` and `db --via bus` (repeatable; a
    /// `;` separates settings, in the flag too), after those of `KAFKA_SECURITY_PROTOCOL`,
    /// `KAFKA_SASL_*` and `KAFKA_SSL_*` (as the services read them; a value holding a `;` goes
    /// there); values are never printed.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "KAFKA_CONFIG",
        value_parser = kafka_settings::SettingParser,
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub kafka_config: Vec<kafka_settings::KafkaSetting>,

    /// Bearer token for services with authentication on (never printed).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "OMNIBUS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<Secret>,

    /// PEM CA certificate to verify the services' TLS certificates with; turns TLS on (as does
    /// an https:// address).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "OMNIBUS_CA_CERT"
    )]
    pub ca_cert: Option<std::path::PathBuf>,

    /// The name the services' certificates carry, when it differs from the address's host.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "OMNIBUS_TLS_DOMAIN"
    )]
    pub tls_domain: Option<String>,

    /// Deadline of each call until the service answers (for streams: until the stream opens),
    /// so a wrong or hung address is an error, not a wait [default: 30s; 3s for `health` and
    /// the health checks of `status`].
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "OMNIBUS_TIMEOUT",
        value_parser = parse_duration
    )]
    pub timeout: Option<std::time::Duration>,

    /// Print JSON lines (the default when stdout is not a terminal).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        conflicts_with = "output"
    )]
    pub json: bool,

    /// Output format: table or json (default: table on a terminal, json when piped).
    #[arg(long, global = true, help_heading = "Global options", value_enum)]
    pub output: Option<OutputArg>,

    #[command(subcommand)]
    pub command: Command,
}

/// A value that must not reach output or logs (`{:?}` prints `***`).
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    Table,
    Json,
}

impl Cli {
    /// The Kafka client settings: the environment's, then `--kafka-config`'s.
    pub fn kafka_settings(&self) -> Vec<kafka_settings::KafkaSetting> {
        kafka_settings::merged(&self.kafka_config)
    }

    pub fn format(&self) -> Format {
        if self.json {
            return Format::Json;
        }
        output::resolve(self.output.map(|o| match o {
            OutputArg::Table => Format::Table,
            OutputArg::Json => Format::Json,
        }))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Query and change the database through db-svc (tables, rows, raw SQL).
    #[command(subcommand)]
    Db(db::DbCommand),

    /// Follow live events from consumer-svc, with the same --where filters as `db query`.
    ///
    /// Resumes after a dropped connection exactly where it left off (Subscribe with the last
    /// sequence number), so nothing is missed or shown twice; if consumer-svc restarted or the
    /// gap is longer than its buffer, a line on stderr says so.
    #[command(after_help = "\
Examples:
  omnibus tail                                     everything
  omnibus tail actions --where action_type=error
  omnibus tail all --where agent=agent-00003       actions, decisions, metrics of one agent
  omnibus tail routing --where 'confidence_score<0.6'
  omnibus tail actions --json | jq .event.agent_name

Fields are the proto field names of each event (omnibus.consumer.v1); `agent` matches any of
agent_name, selected_agent, source_agent, target_agent. A condition on a field an event does
not have does not hold.")]
    Tail(tail::TailArgs),

    /// A full-screen live dashboard: per-agent metrics, throughput and recent actions (q quits).
    Top(top::TopArgs),

    /// Both services' health, the consumer's status and lag, on one screen.
    Status,

    /// Produce realistic agent events (all four topics) to the broker, with a progress bar.
    #[command(after_help = "\
Examples:
  omnibus generate --count 10000                   as fast as possible
  omnibus generate --rate 50 --duration 2m         50 events/s for two minutes
  omnibus generate --rate 20                       until Ctrl-C")]
    Generate(generate::GenerateArgs),

    /// Check a service's gRPC health; exits 0 only when it is SERVING (usable as a container
    /// health check).
    ///
    /// Example: omnibus health db
    Health(HealthArgs),
}

#[derive(Args, Debug)]
pub struct HealthArgs {
    /// Which service: `consumer`, `db`, or a host:port.
    pub target: String,
    /// Health service name to ask about ("" = the whole server).
    #[arg(long, default_value = "")]
    pub service: String,
}

impl Cli {
    /// The deadline of a call (`--timeout`, 30 s by default).
    pub fn call_timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(30))
    }

    /// The deadline of a health check (`--timeout`, 3 s by default: a probe answers at once
    /// or not at all).
    pub fn health_timeout(&self) -> Duration {
        self.timeout.unwrap_or(Duration::from_secs(3))
    }
}

/// A failure, as the one sentence the user sees.
#[derive(Debug)]
pub struct Fail(pub String);

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub type Result<T> = std::result::Result<T, Fail>;

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Self {
        // A closed pipe (`omnibus db query ... | head`) is not an error worth a message.
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Fail(String::new())
        } else {
            Fail(format!("output failed: {e}"))
        }
    }
}

/// Which service, for messages.
#[derive(Clone, Copy, Debug)]
pub enum Svc {
    Consumer,
    Db,
}

impl Svc {
    pub fn name(self) -> &'static str {
        match self {
            Svc::Consumer => "consumer-svc",
            Svc::Db => "db-svc",
        }
    }
}

/// The sentence for "cannot connect".
pub fn unreachable(svc: Svc, addr: &str) -> Fail {
    Fail(format!(
        "{} at {addr} is not reachable - is it running?",
        svc.name()
    ))
}

/// The sentence for a failed call.
/// What tonic answers when the peer accepted the connection but does not speak gRPC over
/// HTTP/2 (a database port, a web server).
pub fn not_grpc(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unknown && status.message().trim() == "transport error"
}

/// What tonic answers when the peer hung up before any gRPC answer (a non-gRPC peer that
/// closes after reading the HTTP/2 preface; which of this and [`not_grpc`] comes depends on
/// timing).
pub fn closed_without_answer(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled && status.message().trim() == "operation was canceled"
}

pub fn call_error(svc: Svc, addr: &str, status: &tonic::Status) -> Fail {
    use tonic::Code;
    let msg = status.message().trim();
    // A status tonic made from a transport failure keeps that failure as its source; one the
    // service sent has none. (db-svc's own UNAVAILABLE, "database unavailable: no database
    // connection ...", is about PostgreSQL, and a write's may name its request id.)
    let from_transport = std::error::Error::source(status).is_some();
    match status.code() {
        Code::Unavailable
            if (from_transport
                && (msg.contains("transport")
                    || msg.contains("connect")
                    || msg.contains("tcp")))
                || msg.is_empty() =>
        {
            unreachable(svc, addr)
        }
        // tonic's own deadline (--timeout) says "Timeout expired".
        Code::DeadlineExceeded | Code::Cancelled
            if msg.is_empty() || msg.eq_ignore_ascii_case("timeout expired") =>
        {
            Fail(format!(
                "{} at {addr} did not answer within --timeout - is that the right address?",
                svc.name()
            ))
        }
        // Something accepted the connection but does not speak gRPC over HTTP/2.
        _ if not_grpc(status) => Fail(format!(
            "{} at {addr} does not speak gRPC - is that the right address?",
            svc.name()
        )),
        // The same, when the peer hung up first (which of the two comes depends on timing).
        _ if closed_without_answer(status) => Fail(format!(
            "{} at {addr} closed the connection without a gRPC answer - is that the right address?",
            svc.name()
        )),
        Code::Unimplemented => Fail(format!(
            "{} at {addr} does not implement this call - is that the right address?",
            svc.name()
        )),
        _ if msg.is_empty() => Fail(format!("{} answered {:?}", svc.name(), status.code())),
        _ => Fail(format!("{}: {msg}", svc.name())),
    }
}

/// TLS and token settings of this run (set once by [`run`]; default in unit tests).
static CONNECT: OnceLock<ConnectOptions> = OnceLock::new();

pub fn connect_options() -> &'static ConnectOptions {
    CONNECT.get_or_init(ConnectOptions::default)
}

fn connect_options_of(cli: &Cli) -> Result<ConnectOptions> {
    let ca_pem = match &cli.ca_cert {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            Fail(format!(
                "cannot read the CA certificate {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    let bearer = match &cli.token {
        Some(Secret(token)) => Bearer::new(token).map_err(|e| Fail(e.to_string()))?,
        None => Bearer::none(),
    };
    Ok(ConnectOptions {
        ca_pem,
        tls_domain: cli.tls_domain.clone(),
        bearer,
        request_timeout: Some(cli.call_timeout()),
    })
}

/// Connects to `addr` now (so an unreachable service is one clear error, not a late one), with
/// TLS and the token when they are configured.
pub async fn connect(svc: Svc, addr: &str) -> Result<AuthChannel> {
    Ok(connect_options().authenticate(connect_channel(svc, addr).await?))
}

/// [`connect`] without the token (for clients that add it themselves).
pub async fn connect_channel(svc: Svc, addr: &str) -> Result<Channel> {
    let options = connect_options();
    let endpoint = options
        .endpoint(addr, Duration::from_secs(3))
        .map_err(|e| Fail(format!("{}: {e}", svc.name())))?;
    let channel = endpoint.connect().await.map_err(|e| {
        if addr.starts_with("https://") || options.ca_pem.is_some() {
            // TLS failures (an untrusted certificate, a wrong name) are worth spelling out.
            Fail(format!("{}: {}", unreachable(svc, addr).0, error_chain(&e)))
        } else {
            unreachable(svc, addr)
        }
    })?;
    Ok(channel)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The longest duration a flag takes. Longer is a typo rather than a wish (a timeout past it
/// is no timeout in practice), and beyond 99,999,999 hours a deadline cannot be sent at all
/// (tonic panics encoding it).
const MAX_DURATION_DAYS: u64 = 365;

/// `500ms`, `3s`, `2m`, `1h`, `1d`, or a bare number of seconds; more than zero and at most
/// [`MAX_DURATION_DAYS`].
pub fn parse_duration(raw: &str) -> std::result::Result<Duration, String> {
    let s = raw.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| format!("'{raw}' is not a duration (e.g. 500ms, 30s, 2m, 1h)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" | "sec" | "secs" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "'{raw}' is not a duration (e.g. 500ms, 30s, 2m, 1h)"
            ));
        }
    };
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("'{raw}' must be longer than zero"));
    }
    // Compared as seconds before converting: `Duration` itself cannot hold every f64.
    if secs > (MAX_DURATION_DAYS * 86_400) as f64 {
        return Err(format!(
            "'{raw}' is too long a duration (at most {MAX_DURATION_DAYS}d)"
        ));
    }
    match Duration::try_from_secs_f64(secs) {
        // Below a nanosecond: zero once converted.
        Ok(d) if d.is_zero() => Err(format!("'{raw}' must be longer than zero")),
        Ok(d) => Ok(d),
        Err(_) => Err(format!(
            "'{raw}' is not a duration (e.g. 500ms, 30s, 2m, 1h)"
        )),
    }
}

/// Runs the parsed command; the exit code.
pub async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    let format = cli.format();
    let _ = CONNECT.set(connect_options_of(&cli)?);
    match &cli.command {
        Command::Db(cmd) => db::run(&cli, cmd, format).await,
        Command::Tail(args) => tail::run(&cli, args, format).await,
        Command::Top(args) => top::run(&cli, args).await,
        Command::Status => status::run(&cli, format).await,
        Command::Generate(args) => generate::run(&cli, args).await,
        Command::Health(args) => status::health(&cli, args).await,
    }
}

/// The brokers when neither `--brokers` nor KAFKA_BROKERS is given: KAFKA_BOOTSTRAP_SERVERS
/// (`bootstrap`), which the services also accept, else the development broker.
fn default_brokers(bootstrap: Option<String>) -> String {
    bootstrap
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "127.0.0.1:19092".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("omnibus").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let cli = parse(&["--token", "tok-0123456789abcdef", "db", "tables"]).unwrap();
        assert_eq!(
            cli.token.as_ref().map(|t| t.0.as_str()),
            Some("tok-0123456789abcdef")
        );
        assert!(!format!("{cli:?}").contains("tok-0123456789abcdef"));
    }

    #[test]
    fn brokers_fall_back_to_kafka_bootstrap_servers_then_the_dev_broker() {
        assert_eq!(
            default_brokers(Some("k1:9092,k2:9092".into())),
            "k1:9092,k2:9092"
        );
        assert_eq!(default_brokers(Some("  ".into())), "127.0.0.1:19092");
        assert_eq!(default_brokers(None), "127.0.0.1:19092");
        let cli = parse(&["--brokers", "b:9092", "status"]).unwrap();
        assert_eq!(cli.brokers, "b:9092");
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["db", "tables", "--db-addr", "10.0.0.1:1", "--json"]).unwrap();
        assert_eq!(cli.db_addr, "10.0.0.1:1");
        assert_eq!(cli.format(), Format::Json);
        let cli = parse(&["--output", "table", "status"]).unwrap();
        assert_eq!(cli.format(), Format::Table);
        assert!(parse(&["--json", "--output", "table", "status"]).is_err());
    }

    #[test]
    fn db_query_takes_human_filters() {
        let cli = parse(&[
            "db",
            "query",
            "agent_actions",
            "--where",
            "agent_name=foo",
            "--where",
            "duration_ms>100",
            "--order",
            "created_at:desc",
            "--limit",
            "5",
            "--offset",
            "10",
        ])
        .unwrap();
        let Command::Db(db::DbCommand::Query(q)) = cli.command else {
            panic!("not a query")
        };
        assert_eq!(q.table, "agent_actions");
        assert_eq!(q.filters.conditions.len(), 2);
        assert_eq!(q.filters.conditions[1].op, filter::Op::Gt);
        assert_eq!(q.order.len(), 1);
        assert_eq!((q.limit, q.offset), (Some(5), Some(10)));
        // A bad condition is a usage error naming the syntax.
        let err = parse(&["db", "query", "t", "--where", "agent_name"]).unwrap_err();
        assert!(err.to_string().contains("column OP value"), "{err}");
        let err = parse(&["db", "query", "t", "--order", "x:sideways"]).unwrap_err();
        assert!(err.to_string().contains("ordering"), "{err}");
    }

    #[test]
    fn writes_take_assignments_and_the_transport() {
        let cli = parse(&[
            "db",
            "insert",
            "agent_actions",
            "agent_name=coder",
            "duration_ms=12",
            "--via",
            "bus",
        ])
        .unwrap();
        let Command::Db(db::DbCommand::Insert(i)) = cli.command else {
            panic!("not an insert")
        };
        assert_eq!(i.values.len(), 2);
        assert_eq!(i.write.via, Some(db::ViaArg::Bus));
        let cli = parse(&[
            "db",
            "update",
            "agent_actions",
            "--where",
            "agent_name=coder",
            "--set",
            "duration_ms=15",
            "--max-affected",
            "10",
        ])
        .unwrap();
        let Command::Db(db::DbCommand::Update(u)) = cli.command else {
            panic!("not an update")
        };
        assert_eq!((u.set.len(), u.max_affected), (1, Some(10)));
        assert!(
            parse(&["db", "update", "t", "--where", "a=1"]).is_err(),
            "--set is required"
        );
        assert!(
            parse(&["db", "delete", "t"]).is_err(),
            "--where is required"
        );
    }

    #[test]
    fn tail_kinds_and_generate_amounts() {
        let cli = parse(&["tail", "routing", "--where", "confidence_score<0.6"]).unwrap();
        let Command::Tail(t) = cli.command else {
            panic!()
        };
        assert_eq!(t.kind, tail::Kind::Routing);
        let cli = parse(&["tail"]).unwrap();
        let Command::Tail(t) = cli.command else {
            panic!()
        };
        assert_eq!(t.kind, tail::Kind::All);
        assert!(parse(&["tail", "sideways"]).is_err());

        let cli = parse(&["generate", "--rate", "50", "--duration", "2m"]).unwrap();
        let Command::Generate(g) = cli.command else {
            panic!()
        };
        assert_eq!(
            (g.rate, g.duration),
            (Some(50.0), Some(Duration::from_secs(120)))
        );
        assert!(parse(&["generate", "--count", "10", "--duration", "1m"]).is_err());
        assert!(parse(&["generate", "--rate", "0"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
        assert_eq!(
            parse_duration("365d").unwrap(),
            Duration::from_secs(365 * 86400)
        );
        // Longer is a typo, and past 99,999,999 hours tonic panics encoding the deadline.
        for absurd in ["366d", "5000000d", "99999999999999999999999h"] {
            let e = parse_duration(absurd).unwrap_err();
            assert!(e.contains("at most 365d"), "{absurd}: {e}");
        }
        // Rounded to nothing is zero.
        assert!(parse_duration("0.0000000001").is_err());
    }

    /// Every flag that takes a duration refuses an absurd one as a usage error, before
    /// anything is sent.
    #[test]
    fn absurd_durations_are_usage_errors() {
        for args in [
            &["db", "insert", "t", "a=1", "--bus-timeout", "5000000d"][..],
            &["--timeout", "5000000d", "db", "tables"],
            &["top", "--refresh", "5000000d"],
            &["generate", "--duration", "5000000d"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            assert!(e.to_string().contains("at most 365d"), "{args:?}: {e}");
        }
    }

    #[test]
    fn errors_are_one_sentence() {
        // What tonic makes of a refused connection: the transport error is its source.
        let mut refused = tonic::Status::unavailable("error trying to connect: tcp connect error");
        refused.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let e = call_error(Svc::Db, "127.0.0.1:50052", &refused);
        assert_eq!(
            e.0,
            "db-svc at 127.0.0.1:50052 is not reachable - is it running?"
        );
        // db-svc answering that PostgreSQL is down, or that a write's outcome is unknown, is
        // not db-svc being unreachable; the request id stays in the sentence.
        for sent in [
            "database unavailable: no database connection became available in time",
            "database unavailable: connection reset (request_id r-1: retry with it to get the \
             recorded result without writing twice)",
        ] {
            let e = call_error(Svc::Db, "a:1", &tonic::Status::unavailable(sent));
            assert_eq!(e.0, format!("db-svc: {sent}"));
        }
        let e = call_error(
            Svc::Db,
            "a:1",
            &tonic::Status::invalid_argument("invalid request: where.x: unknown column 'x'"),
        );
        assert_eq!(e.0, "db-svc: invalid request: where.x: unknown column 'x'");
    }
}
