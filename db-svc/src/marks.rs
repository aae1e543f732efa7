//! Process-wide marks of the moment something was last noticed (a schema change, a broken
//! connection), and whether a thing that began some time ago began before that moment: sqlx
//! tells a pooled connection's age and idle time, not the instants they began.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The last moment marked, as nanoseconds after [`EPOCH`] (0: never).
#[derive(Default)]
pub struct Mark(AtomicU64);

impl Mark {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Marks now (a later mark never moves back).
    pub fn set(&self) {
        let nanos = EPOCH.elapsed().as_nanos().max(1);
        self.0
            .fetch_max(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Whether something that began `ago` before now began before the last mark.
    pub fn began_before(&self, ago: Duration) -> bool {
        let marked = self.0.load(Ordering::Relaxed);
        marked != 0 && began_before(EPOCH.elapsed(), ago, Duration::from_nanos(marked))
    }
}

/// With the clock at `now` (all since the same epoch), whether something that began `ago`
/// before `now` began before `marked`.
fn began_before(now: Duration, ago: Duration, marked: Duration) -> bool {
    now.saturating_sub(ago) < marked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_began_before_the_mark_is_before_it() {
        let s = Duration::from_secs;
        // Clock at 100 s, marked at 90 s.
        assert!(began_before(s(100), s(20), s(90)), "began at 80 s");
        assert!(!began_before(s(100), s(5), s(90)), "began at 95 s");
        assert!(!began_before(s(100), s(0), s(90)), "began just now");
        // Further back than the clock (before the epoch) is before.
        assert!(began_before(s(10), s(20), s(5)));
    }

    #[test]
    fn nothing_is_before_a_mark_never_set() {
        let mark = Mark::new();
        assert!(!mark.began_before(Duration::from_secs(1_000_000)));
        mark.set();
        assert!(mark.began_before(Duration::from_secs(1_000_000)));
        assert!(!mark.began_before(Duration::ZERO));
    }
}
