//! Connections whose prepared statements predate a schema change.
//!
//! sqlx keeps a prepared statement per connection and SQL text. After `ALTER COLUMN ... TYPE`
//! the SQL db-svc builds for a table does not change, but PostgreSQL refuses every statement
//! prepared before ("cached plan must not change result type", SQLSTATE 0A000), on each
//! connection that prepared it. So when a statement trips on a changed table, every connection
//! opened before that moment is retired the next time it is acquired or released; the retry,
//! and everything after it, runs on connections that prepare their statements afresh.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When the last schema change was noticed, as nanoseconds after [`EPOCH`] (0: never).
static CHANGED_AT: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// A statement tripped on a changed table: connections opened until now are to be retired.
pub fn mark_changed() {
    let nanos = EPOCH.elapsed().as_nanos().max(1);
    CHANGED_AT.fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Whether a connection of age `age` was opened before the last noticed schema change.
pub fn predates_change(age: Duration) -> bool {
    let changed = CHANGED_AT.load(Ordering::Relaxed);
    changed != 0 && opened_before(EPOCH.elapsed(), age, Duration::from_nanos(changed))
}

/// With the clock at `now` (all since the same epoch), whether a connection of age `age` was
/// opened before `changed`.
fn opened_before(now: Duration, age: Duration, changed: Duration) -> bool {
    now.saturating_sub(age) < changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_opened_before_the_change_are_retired() {
        let s = Duration::from_secs;
        // Clock at 100 s, change noticed at 90 s.
        assert!(opened_before(s(100), s(20), s(90)), "opened at 80 s");
        assert!(!opened_before(s(100), s(5), s(90)), "opened at 95 s");
        assert!(!opened_before(s(100), s(0), s(90)), "opened just now");
        // An age beyond the clock (opened before the epoch) is old.
        assert!(opened_before(s(10), s(20), s(5)));
    }
}
