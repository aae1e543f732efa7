//! When the start-up replay is over: the service reports SERVING only then, so that a load
//! balancer never routes a dashboard to a replica whose 24 h view is still being rebuilt.
//!
//! The replay is over once every partition that existed at start-up has been read up to the
//! end its log had when librdkafka first reported it (its high watermark in the first
//! statistics that name it). The target is fixed then, so a steady stream of new events
//! cannot keep a replica from ever becoming ready; and a partition whose log holds nothing
//! below the target (empty, or truncated by retention) is done without a message. Partitions
//! that appear later (new ones, or topics recreated by a restarted broker) are not part of
//! the replay; one that vanishes stops counting. Once over, it stays over: a replica that
//! falls behind later is still serving its (complete, if late) view.

use std::collections::HashMap;

/// Partition key: (topic kind index, partition id).
pub type Key = (usize, i32);

#[derive(Debug, Default)]
pub struct ReplayProgress {
    /// Set by [`ReplayProgress::begin`]: the partitions present at start-up are known.
    begun: bool,
    done: bool,
    targets: HashMap<Key, Target>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Target {
    /// End of the log when first reported (None until then).
    end: Option<i64>,
    /// Log start offset, latest report (-1 unknown).
    start: i64,
}

impl Target {
    /// Whether a partition read up to `next` (the next offset to read) is done.
    fn reached(&self, next: Option<i64>) -> bool {
        match self.end {
            None => false,
            Some(end) => end <= 0 || self.start >= end || next.is_some_and(|n| n >= end),
        }
    }
}

impl ReplayProgress {
    /// The partitions present at start-up (the first metadata answer); later calls do nothing.
    /// True for the call that began it.
    pub fn begin(&mut self, partitions: impl IntoIterator<Item = Key>) -> bool {
        if self.begun {
            return false;
        }
        self.begun = true;
        self.targets = partitions
            .into_iter()
            .map(|k| {
                (
                    k,
                    Target {
                        end: None,
                        start: -1,
                    },
                )
            })
            .collect();
        true
    }

    /// A watermark report (librdkafka statistics): fixes the partition's target on the first.
    pub fn watermarks(&mut self, key: Key, low: i64, high: i64) {
        if let Some(t) = self.targets.get_mut(&key) {
            if t.end.is_none() && high >= 0 {
                t.end = Some(high);
            }
            t.start = t.start.max(low);
        }
    }

    /// The partition vanished (a broker that restarted empty): it no longer counts.
    pub fn forget(&mut self, key: Key) {
        self.targets.remove(&key);
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The partitions not read to their target yet (sorted), for the log.
    pub fn unfinished(&self, next: impl Fn(&Key) -> Option<i64>) -> Vec<Key> {
        let mut left: Vec<Key> = self
            .targets
            .iter()
            .filter(|(key, t)| !t.reached(next(key)))
            .map(|(key, _)| *key)
            .collect();
        left.sort_unstable();
        left
    }

    /// Checks the read positions (`next`: the next offset to read of a partition) against the
    /// targets; returns true exactly once, when the replay becomes over.
    pub fn advance(&mut self, next: impl Fn(&Key) -> Option<i64>) -> bool {
        if self.done || !self.begun {
            return false;
        }
        let over = self.targets.iter().all(|(key, t)| t.reached(next(key)));
        self.done = over;
        over
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positions(entries: &[(Key, i64)]) -> impl Fn(&Key) -> Option<i64> + '_ {
        |key| entries.iter().find(|(k, _)| k == key).map(|(_, n)| *n)
    }

    #[test]
    fn not_over_before_the_partitions_are_known() {
        let mut r = ReplayProgress::default();
        assert!(!r.advance(|_| None));
        assert!(!r.is_done());
    }

    #[test]
    fn nothing_to_replay_is_over_at_once() {
        let mut r = ReplayProgress::default();
        r.begin([]);
        assert!(r.advance(|_| None));
        assert!(r.is_done());
        // Exactly once.
        assert!(!r.advance(|_| None));
        assert!(r.is_done());
    }

    #[test]
    fn waits_for_every_partition_to_reach_its_first_reported_end() {
        let mut r = ReplayProgress::default();
        r.begin([(0, 0), (1, 0)]);
        // No watermark yet: not over, even at offset 0 of an empty-looking log.
        assert!(!r.advance(positions(&[((0, 0), 0), ((1, 0), 0)])));
        r.watermarks((0, 0), 0, 100);
        r.watermarks((1, 0), 0, 50);
        assert!(!r.advance(positions(&[((0, 0), 100), ((1, 0), 49)])));
        // New events arrive: the target stays where it was first reported.
        r.watermarks((1, 0), 0, 80);
        assert_eq!(
            r.unfinished(positions(&[((0, 0), 100), ((1, 0), 49)])),
            vec![(1, 0)]
        );
        assert!(r.advance(positions(&[((0, 0), 100), ((1, 0), 50)])));
    }

    #[test]
    fn empty_or_truncated_logs_need_no_message() {
        let mut r = ReplayProgress::default();
        r.begin([(0, 0), (0, 1)]);
        r.watermarks((0, 0), 0, 0); // empty
        r.watermarks((0, 1), 70, 70); // everything removed by retention
        assert!(r.advance(positions(&[((0, 0), 0), ((0, 1), 0)])));
    }

    #[test]
    fn later_partitions_do_not_count_and_vanished_ones_stop_counting() {
        let mut r = ReplayProgress::default();
        r.begin([(0, 0), (2, 0)]);
        assert!(!r.begin([(3, 0)]), "only the first listing counts");
        r.watermarks((0, 0), 0, 10);
        r.watermarks((3, 0), 0, 10); // not part of the replay
        assert!(!r.advance(positions(&[((0, 0), 10)])));
        r.forget((2, 0));
        assert!(r.advance(positions(&[((0, 0), 10)])));
    }
}
