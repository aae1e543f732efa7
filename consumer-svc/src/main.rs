use consumer_svc::config::Config;

// Ingest allocates and frees a few small blocks per event (its text, its Arc, the events
// leaving the bounded buffers): jemalloc took ~25% off consumer-svc's ingest CPU against
// glibc malloc, with the same memory (BENCHMARKS.md); mimalloc gained nothing here.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let config: Config = svc_kit::config::parse_or_exit();
    let config = config
        .validate()
        .unwrap_or_else(|e| svc_kit::config::fail(e));
    svc_kit::telemetry::init(&config.log);
    if let Err(e) = consumer_svc::run(config).await {
        tracing::error!("consumer-svc failed: {e:#}");
        std::process::exit(svc_kit::server::exit_code(&*e));
    }
}
