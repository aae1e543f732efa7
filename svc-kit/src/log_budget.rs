//! A budget of log lines for events that a caller or a producer can repeat at will (rejected
//! calls, unparsable events, replies the broker refuses): at most so many lines per window,
//! and the lines left out are counted, so that the next line logged can say how many.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `lines` log lines per `window`. A window starts with the first line after the
/// previous one ended; a clock reading older than its start does not end it.
#[derive(Debug)]
pub struct LogBudget {
    lines: u32,
    window: Duration,
    /// The current window's start, lines logged in it, and lines left out since the last one
    /// logged.
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl LogBudget {
    pub const fn new(lines: u32, window: Duration) -> Self {
        Self {
            lines,
            window,
            state: Mutex::new(None),
        }
    }

    /// Whether a line may be logged at `now`: if so, how many were left out before it.
    pub fn may_log(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (start, logged, left_out) = state.get_or_insert((now, 0, 0));
        if now.saturating_duration_since(*start) >= self.window {
            (*start, *logged) = (now, 0);
        }
        if *logged < self.lines {
            *logged += 1;
            Some(std::mem::take(left_out))
        } else {
            *left_out += 1;
            None
        }
    }
}
