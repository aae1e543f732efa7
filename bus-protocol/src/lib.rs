//! The database request/reply protocol on the event bus, as plain types and pure functions.
//!
//! A request is an envelope `{event_id, event_type: "DATABASE_QUERY_REQUESTED", correlation_id,
//! timestamp, service, payload}` whose payload takes one of two forms:
//!
//! - the OmniClaude `DatabaseEventClient` form: `operation_type` (QUERY, INSERT, UPDATE, DELETE,
//!   UPSERT), `entity_type`, `query` (SQL with `$n` placeholders), `params`, `filters`,
//!   `limit`, `offset`;
//! - the structured form: `operation` (e.g. `"INSERT"`) and `request`, the proto3 JSON of the
//!   matching `omnibus.db.v1` gRPC request message.
//!
//! Replies are envelopes of the same shape with `event_type` `DATABASE_QUERY_COMPLETED` or
//! `DATABASE_QUERY_FAILED`, keyed and matched by the correlation id. db-svc (the server side)
//! and the client's publisher both use this crate, so the two cannot disagree.

mod envelope;
mod reply;
mod request;

pub use envelope::{Envelope, Topics, now_rfc3339};
pub use reply::{CompletedPayload, FailedPayload, Reply, ReplyError, parse_reply};
pub use request::{
    BusRequest, Deadline, Rejection, RequestBody, SqlOperation, SqlRequest, StructuredOperation,
    StructuredRequest, parse_request,
};

/// `event_type` of a request.
pub const DATABASE_QUERY_REQUESTED: &str = "DATABASE_QUERY_REQUESTED";
/// `event_type` of a successful reply.
pub const DATABASE_QUERY_COMPLETED: &str = "DATABASE_QUERY_COMPLETED";
/// `event_type` of a failed reply.
pub const DATABASE_QUERY_FAILED: &str = "DATABASE_QUERY_FAILED";

/// Protocol-level error codes (db-svc adds the database ones: `NOT_FOUND`, `CONFLICT`,
/// `DATABASE_UNAVAILABLE`, ...; see the README's bus protocol section).
pub mod codes {
    /// The request is malformed, names something unknown, or its SQL is not allowed.
    pub const VALIDATION_ERROR: &str = "VALIDATION_ERROR";
    /// The request's deadline passed before it could be executed; nothing was written.
    pub const TIMEOUT: &str = "TIMEOUT";
    /// The SQL statement's kind does not match `operation_type`.
    pub const OPERATION_MISMATCH: &str = "OPERATION_MISMATCH";
    /// Writes over the bus (SQL form) are switched off by the operator.
    pub const WRITE_NOT_ALLOWED: &str = "WRITE_NOT_ALLOWED";
    /// A bug or an unexpected condition in db-svc.
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
    /// The reply was larger than the bus accepts (its rows were not sent; nothing was undone:
    /// for a write, what it wrote was committed).
    pub const REPLY_TOO_LARGE: &str = "REPLY_TOO_LARGE";
    /// A write was refused and rolled back before it committed, because the rows it returns
    /// would not fit a bus reply: nothing was written, and nothing was recorded under its
    /// request id. Ask for the count only (`count_only`; for SQL, no or a shorter
    /// `RETURNING`), write fewer rows per request, or send it over gRPC, which carries larger
    /// messages (with the same request id too: it writes once and returns the rows).
    pub const WRITE_REPLY_TOO_LARGE: &str = "WRITE_REPLY_TOO_LARGE";
}
