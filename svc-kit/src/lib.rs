//! Server plumbing shared by `consumer-svc` and `db-svc`, written once: configuration helpers,
//! tracing set-up, the health reporter, reflection, serving with graceful shutdown, and the
//! operational layer (bearer-token auth, limits, TLS, metrics, trace context, Kafka security
//! pass-through).

pub mod auth;
pub mod config;
pub mod connection_age;
pub mod deadline;
pub mod health;
pub mod kafka;
pub mod layer;
pub mod log_budget;
pub mod metrics;
pub mod panic;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
pub mod write_batching;

pub use auth::Scopes;
pub use health::Health;
pub use server::{ServerArgs, serve};
pub use shutdown::Shutdown;
