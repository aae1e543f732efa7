use db_svc::config::Config;

// Every row crosses as a map of small strings and values: a fast small-object allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let config: Config = svc_kit::config::parse_or_exit();
    let settings = config
        .validate()
        .unwrap_or_else(|e| svc_kit::config::fail(e));
    svc_kit::telemetry::init(&settings.log);
    if let Err(e) = db_svc::run(settings).await {
        tracing::error!("db-svc failed: {e:#}");
        std::process::exit(svc_kit::server::exit_code(&*e));
    }
}
