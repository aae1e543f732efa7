use consumer_svc::config::Config;

#[tokio::main]
async fn main() {
    let config: Config = svc_kit::config::parse_or_exit();
    let config = config
        .validate()
        .unwrap_or_else(|e| svc_kit::config::fail(e));
    svc_kit::telemetry::init(&config.log);
    if let Err(e) = consumer_svc::run(config).await {
        tracing::error!("consumer-svc failed: {e:#}");
        std::process::exit(1);
    }
}
