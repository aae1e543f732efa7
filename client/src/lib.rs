//! Typed Rust clients for omnibus and the helpers behind the `omnibus` command-line tool.

pub mod bus;
pub mod connect;
pub mod db;
pub mod generate;
pub mod health;

pub use omnibus_proto as proto;
