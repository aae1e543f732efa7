//! Which pooled connections to check with a round trip before use.
//!
//! sqlx's default pings every connection it hands out: a round trip before every statement
//! (or shared batch). As HikariCP does, db-svc pings only a connection that sat idle for
//! `--db-ping-after-idle` (one a proxy or the server may have closed meanwhile); one in steady
//! use proved itself moments ago. The cost: after a server restart or `pg_terminate_backend`,
//! a connection in steady use fails its next statement. When that happens
//! ([`mark_lost`]), every connection that was idle since before the loss is pinged before its
//! next use, so the read retried after it (see `Executor`) and the requests after it get a
//! working connection instead of the next broken one.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// When a connection was last found broken, as nanoseconds after [`EPOCH`] (0: never).
static LOST_AT: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// A statement found its connection broken or ended by the server.
pub fn mark_lost() {
    let nanos = EPOCH.elapsed().as_nanos().max(1);
    LOST_AT.fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Whether a connection idle for `idle_for` is to be pinged before it is handed out.
pub fn needs_ping(idle_for: Duration, ping_after_idle: Duration) -> bool {
    if idle_for >= ping_after_idle {
        return true;
    }
    let lost = LOST_AT.load(Ordering::Relaxed);
    lost != 0 && idle_since_before(EPOCH.elapsed(), idle_for, Duration::from_nanos(lost))
}

/// With the clock at `now` (all since the same epoch), whether a connection idle for
/// `idle_for` went idle before `lost`.
fn idle_since_before(now: Duration, idle_for: Duration, lost: Duration) -> bool {
    now.saturating_sub(idle_for) < lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_idle_since_before_a_loss_are_checked() {
        let s = Duration::from_secs;
        // Clock at 100 s, a connection found broken at 90 s.
        assert!(idle_since_before(s(100), s(20), s(90)), "idle since 80 s");
        assert!(!idle_since_before(s(100), s(5), s(90)), "idle since 95 s");
        assert!(!idle_since_before(s(100), s(0), s(90)), "released just now");
    }

    #[test]
    fn a_connection_idle_long_enough_is_always_checked() {
        let ms = Duration::from_millis;
        assert!(needs_ping(ms(1000), ms(1000)));
        assert!(needs_ping(ms(5), Duration::ZERO), "0: every acquire");
    }
}
