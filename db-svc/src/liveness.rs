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

use std::time::Duration;

use crate::marks::Mark;

/// When a connection was last found broken.
static LOST: Mark = Mark::new();

/// A statement found its connection broken or ended by the server.
pub fn mark_lost() {
    LOST.set();
}

/// Whether a connection idle for `idle_for` is to be pinged before it is handed out.
pub fn needs_ping(idle_for: Duration, ping_after_idle: Duration) -> bool {
    idle_for >= ping_after_idle || LOST.began_before(idle_for)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_idle_long_enough_is_always_checked() {
        let ms = Duration::from_millis;
        assert!(needs_ping(ms(1000), ms(1000)));
        assert!(needs_ping(ms(5), Duration::ZERO), "0: every acquire");
    }
}
