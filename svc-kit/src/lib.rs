//! Server plumbing shared by `consumer-svc` and `db-svc`, written once: configuration helpers,
//! tracing set-up, the health reporter, reflection, and serving with graceful shutdown.

pub mod config;
pub mod health;
pub mod server;
pub mod shutdown;
pub mod telemetry;

pub use health::Health;
pub use server::{ServerArgs, serve};
pub use shutdown::Shutdown;
