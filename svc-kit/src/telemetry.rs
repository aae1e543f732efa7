//! `tracing` set-up: human-readable logs by default, JSON lines with `--log-format json`.
//! Levels come from `RUST_LOG` (default `info`). With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans
//! (one per gRPC request, parented on the caller's `traceparent`) are also exported over OTLP/gRPC.

use std::io::IsTerminal;
use std::sync::OnceLock;

use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log output format. Levels are set with RUST_LOG (default: info).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector to export spans to, e.g. http://otel-collector:4317 (empty = off).
    // It may carry credentials: `--help` does not show its value.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        default_value = "",
        hide_env_values = true
    )]
    pub otlp_endpoint: String,

    /// `service.name` of the exported spans (default: the program's name).
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub otel_service_name: Option<String>,
}

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported over OTLP.
pub fn otel_enabled() -> bool {
    PROVIDER.get().is_some()
}

/// Exports the spans still buffered (called when the server stops).
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

fn otel_provider(args: &LogArgs) -> Option<SdkTracerProvider> {
    let endpoint = args.otlp_endpoint.trim();
    if endpoint.is_empty() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            // The library's message may quote the endpoint whole, credentials included.
            eprintln!(
                "OTLP exporter for {} not started: {}",
                crate::config::redact_url(endpoint),
                crate::config::redact_url_in(&e.to_string(), endpoint)
            );
            return None;
        }
    };
    let name = args.otel_service_name.clone().unwrap_or_else(|| {
        std::env::args()
            .next()
            .and_then(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "omnibus".into())
    });
    Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(name)
                    .build(),
            )
            .build(),
    )
}

/// Installs the global subscriber (call it inside the Tokio runtime: the OTLP exporter needs
/// one). Logs go to stderr, leaving stdout to programs.
pub fn init(args: &LogArgs) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let text = (args.log_format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colours only on a terminal: log files and collectors get plain text.
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(true)
    });
    let json = (args.log_format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(true)
            .json()
            .flatten_event(true)
            .with_current_span(true)
    });
    let otel = otel_provider(args).map(|provider| {
        let tracer = provider.tracer("omnibus");
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let _ = PROVIDER.set(provider);
        tracing_opentelemetry::layer().with_tracer(tracer)
    });
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init();
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = result;
    if otel_enabled() {
        // The endpoint may carry credentials (`https://user:token@collector:4317`).
        let endpoint = crate::config::redact_url(args.otlp_endpoint.trim());
        tracing::info!(%endpoint, "exporting spans over OTLP/gRPC");
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_otlp::WithExportConfig;

    /// Collectors behind TLS (every hosted one) need the exporter's own TLS features; without
    /// them building it for an `https://` endpoint fails and spans are silently not exported.
    #[tokio::test]
    async fn an_https_collector_endpoint_builds_an_exporter() {
        let built = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint("https://collector.invalid:4317")
            .build();
        assert!(built.is_ok(), "{:?}", built.err());
    }
}
