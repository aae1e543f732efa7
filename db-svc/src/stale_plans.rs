//! Connections whose prepared statements predate a schema change.
//!
//! sqlx keeps a prepared statement per connection and SQL text. After `ALTER COLUMN ... TYPE`
//! the SQL db-svc builds for a table does not change, but PostgreSQL refuses every statement
//! prepared before ("cached plan must not change result type", SQLSTATE 0A000), on each
//! connection that prepared it. So when a statement trips on a changed table, every connection
//! opened before that moment is retired the next time it is acquired or released; the retry,
//! and everything after it, runs on connections that prepare their statements afresh.

use std::time::Duration;

use crate::marks::Mark;

/// When the last schema change was noticed.
static CHANGED: Mark = Mark::new();

/// A statement tripped on a changed table: connections opened until now are to be retired.
pub fn mark_changed() {
    CHANGED.set();
}

/// Whether a connection of age `age` was opened before the last noticed schema change.
pub fn predates_change(age: Duration) -> bool {
    CHANGED.began_before(age)
}
