//! In-order offset commits for concurrently processed messages: a partition's offset is
//! committed only up to the first message still in flight, so a crash never skips one.
//!
//! A partition's log can also go back: a broker back without its data or a recreated topic
//! restarts it at 0, a truncation rewinds it. Messages received before that still finish
//! later, under offsets that now name other messages (a new log's 2 is not the old log's 2):
//! every receipt is tagged with the epoch of the log it came from, and a finish counts only
//! in the epoch it was received in.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

/// Tracks, per partition, the offsets in flight and the last offset committed.
#[derive(Debug, Default)]
pub struct CommitTracker {
    partitions: HashMap<(String, i32), Partition>,
    /// The epoch the next tracked log gets: unique over the tracker's life, so that nothing
    /// received before a rewind or a revocation can be taken for something received after.
    next_epoch: u64,
}

/// Which log a message was received from ([`CommitTracker::received`]); a finish must name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epoch(u64);

#[derive(Debug)]
struct Partition {
    /// Received and not finished yet, with the epoch each was received in. Only offsets
    /// below `epoch`'s start can belong to an older epoch (kept across a rewind that left
    /// them in place); the others are the current log's.
    in_flight: BTreeMap<i64, u64>,
    /// The epoch of the current log.
    epoch: u64,
    /// The highest offset received from the current log.
    last_received: i64,
    /// The last offset committed (the next one to read), or where reading started.
    committed: i64,
}

impl CommitTracker {
    /// Records that `offset` was received. Messages of a partition arrive in offset order, so
    /// an offset at or below one already received means the log went back (restarted empty,
    /// recreated, truncated): what is in flight at or above it was another log's and no longer
    /// counts, and commits follow the log from here. Returns the epoch to pass to
    /// [`CommitTracker::finished`].
    pub fn received(&mut self, topic: &str, partition: i32, offset: i64) -> Epoch {
        let next_epoch = &mut self.next_epoch;
        let mut new_epoch = || {
            *next_epoch += 1;
            *next_epoch
        };
        let p = match self.partitions.entry((topic.to_string(), partition)) {
            Entry::Occupied(entry) => {
                let p = entry.into_mut();
                if offset <= p.last_received {
                    // Offsets in flight below `offset` are still this log's (a truncation
                    // keeps them): they go on holding the commit back. The others are gone.
                    p.in_flight.split_off(&offset);
                    p.epoch = new_epoch();
                    p.committed = p.committed.min(offset);
                }
                p
            }
            // Where reading starts counts as committed: only progress past it is.
            Entry::Vacant(entry) => entry.insert(Partition {
                in_flight: BTreeMap::new(),
                epoch: new_epoch(),
                last_received: offset - 1,
                committed: offset,
            }),
        };
        p.in_flight.insert(offset, p.epoch);
        p.last_received = offset;
        Epoch(p.epoch)
    }

    /// Records that `offset`, received in `epoch`, is done; returns the offset to commit (the
    /// next one to read) when it moved forward: the earliest offset still in flight, or the
    /// one after the last received. Nothing for a message of a log that went back or of a
    /// partition forgotten since.
    pub fn finished(
        &mut self,
        topic: &str,
        partition: i32,
        epoch: Epoch,
        offset: i64,
    ) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_string(), partition))?;
        if p.in_flight.get(&offset) != Some(&epoch.0) {
            return None;
        }
        p.in_flight.remove(&offset);
        let commit = p
            .in_flight
            .keys()
            .next()
            .copied()
            .unwrap_or(p.last_received + 1);
        (commit > p.committed).then(|| {
            p.committed = commit;
            commit
        })
    }

    /// Forgets a partition taken away by a rebalance: its new owner commits it from now on,
    /// and a commit from here of a request that finishes late could move the group's offset
    /// back below what the new owner committed (the broker checks the member, not who owns
    /// the partition). If it comes back, tracking starts afresh where reading resumes, in a
    /// new epoch: a late finish of before never counts for it.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_string(), partition));
    }

    /// Messages received and not finished, over all partitions (not those of a log that went
    /// back, nor of a partition forgotten).
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracker that remembers the epoch of what it received last under each offset, as
    /// the worker's tasks do.
    #[derive(Default)]
    struct Tracked {
        tracker: CommitTracker,
        epochs: HashMap<(&'static str, i32, i64), Epoch>,
    }

    impl Tracked {
        fn received(&mut self, topic: &'static str, partition: i32, offset: i64) -> Epoch {
            let epoch = self.tracker.received(topic, partition, offset);
            self.epochs.insert((topic, partition, offset), epoch);
            epoch
        }

        fn finished(&mut self, topic: &'static str, partition: i32, offset: i64) -> Option<i64> {
            let epoch = self
                .epochs
                .get(&(topic, partition, offset))
                .copied()
                .unwrap_or(Epoch(0));
            self.tracker.finished(topic, partition, epoch, offset)
        }
    }

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut t = Tracked::default();
        for o in 10..15 {
            t.received("t", 0, o);
        }
        assert_eq!(t.finished("t", 0, 12), None, "10 and 11 still in flight");
        assert_eq!(t.finished("t", 0, 11), None);
        assert_eq!(t.finished("t", 0, 10), Some(13), "10..=12 done: commit 13");
        assert_eq!(t.finished("t", 0, 14), None);
        assert_eq!(t.finished("t", 0, 13), Some(15));
        assert_eq!(t.tracker.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_stale_offsets_ignored() {
        let mut t = Tracked::default();
        t.received("t", 0, 0);
        t.received("t", 1, 100);
        assert_eq!(t.finished("t", 1, 100), Some(101));
        assert_eq!(t.finished("t", 0, 0), Some(1));
        assert_eq!(t.finished("t", 0, 0), None, "already committed");
        assert_eq!(t.finished("other", 0, 0), None, "never received");
    }

    #[test]
    fn jumps_and_restarted_logs_keep_committing() {
        let mut t = Tracked::default();
        t.received("t", 0, 5);
        assert_eq!(t.finished("t", 0, 5), Some(6));
        // Another replica handled 6..20 while the partition was away.
        t.received("t", 0, 20);
        assert_eq!(t.finished("t", 0, 20), Some(21));
        // The broker restarted empty: offsets begin at 0 again.
        t.received("t", 0, 0);
        assert_eq!(t.finished("t", 0, 0), Some(1));
    }

    #[test]
    fn a_log_restarted_under_requests_in_flight_commits_only_what_the_new_log_read() {
        let mut t = Tracked::default();
        for o in 0..=100 {
            t.received("t", 0, o);
        }
        for o in 0..98 {
            t.finished("t", 0, o);
        }
        // 98..=100 of the old log still run when the broker comes back empty.
        for o in 0..3 {
            t.received("t", 0, o);
        }
        for o in 98..=100 {
            assert_eq!(t.finished("t", 0, o), None, "old log's {o}");
        }
        assert_eq!(t.finished("t", 0, 0), Some(1));
        assert_eq!(t.finished("t", 0, 2), None, "1 still in flight");
        assert_eq!(t.finished("t", 0, 1), Some(3), "not the old log's 101");
        // The old log's 1 and 2 (received before the restart) finishing late change nothing,
        // although the new log used the same offsets.
        let mut t2 = CommitTracker::default();
        let old_0 = t2.received("t", 0, 0);
        assert_eq!(t2.finished("t", 0, old_0, 0), Some(1));
        let old_1 = t2.received("t", 0, 1);
        let old_2 = t2.received("t", 0, 2);
        let new_0 = t2.received("t", 0, 0);
        let new_1 = t2.received("t", 0, 1);
        let new_2 = t2.received("t", 0, 2);
        assert_eq!(t2.finished("t", 0, old_1, 1), None);
        assert_eq!(
            t2.finished("t", 0, new_0, 0),
            Some(1),
            "the new 1 still runs"
        );
        assert_eq!(t2.finished("t", 0, old_2, 2), None);
        assert_eq!(t2.finished("t", 0, new_2, 2), None, "the new 1 still runs");
        assert_eq!(t2.finished("t", 0, new_1, 1), Some(3));
        assert_eq!(t2.in_flight(), 0);
    }

    #[test]
    fn a_truncated_log_keeps_what_is_in_flight_below_the_truncation() {
        let mut t = Tracked::default();
        for o in 10..20 {
            t.received("t", 0, o);
        }
        // Committed 10; 10..20 in flight. The log is truncated at 15, and reading resumes there.
        t.received("t", 0, 15);
        t.received("t", 0, 16);
        assert_eq!(
            t.finished("t", 0, 15),
            None,
            "10..15 of the same log still run"
        );
        for o in (11..15).rev() {
            assert_eq!(t.finished("t", 0, o), None, "{o}: 10 still runs");
        }
        assert_eq!(t.finished("t", 0, 10), Some(16), "16 still runs");
        assert_eq!(t.finished("t", 0, 16), Some(17));
        assert_eq!(t.tracker.in_flight(), 0);
    }

    #[test]
    fn a_revoked_partition_commits_nothing_more_and_starts_afresh_when_back() {
        let mut t = Tracked::default();
        let mut before = Vec::new();
        for o in 10..16 {
            before.push((o, t.received("t", 0, o)));
        }
        t.received("t", 1, 3);
        t.tracker.forget("t", 0);
        // Requests of the revoked partition finish late: no commit (another replica owns it).
        for &(o, epoch) in &before[..2] {
            assert_eq!(t.tracker.finished("t", 0, epoch, o), None);
        }
        assert_eq!(t.finished("t", 1, 3), Some(4), "other partitions go on");
        // Assigned back, at the new owner's committed offset (13: 12..16 are delivered again
        // while the first deliveries of 12..16 still finish).
        for o in 13..16 {
            t.received("t", 0, o);
        }
        for &(o, epoch) in &before[2..] {
            assert_eq!(t.tracker.finished("t", 0, epoch, o), None, "{o} of before");
        }
        assert_eq!(t.finished("t", 0, 13), Some(14), "14 and 15 still run");
        assert_eq!(t.finished("t", 0, 15), None);
        assert_eq!(t.finished("t", 0, 14), Some(16));
        t.received("t", 0, 201);
        assert_eq!(t.finished("t", 0, 201), Some(202));
        assert_eq!(t.tracker.in_flight(), 0);
    }

    #[test]
    fn any_completion_order_commits_everything_once() {
        // Every permutation of 6 offsets ends with offset 6 committed, and the committed
        // offsets only ever increase.
        fn permutations(items: Vec<i64>) -> Vec<Vec<i64>> {
            if items.len() <= 1 {
                return vec![items];
            }
            let mut out = Vec::new();
            for i in 0..items.len() {
                let mut rest = items.clone();
                let head = rest.remove(i);
                for mut p in permutations(rest) {
                    p.insert(0, head);
                    out.push(p);
                }
            }
            out
        }
        for order in permutations((0..6).collect()) {
            let mut t = Tracked::default();
            for o in 0..6 {
                t.received("t", 0, o);
            }
            let mut last = 0;
            for o in &order {
                if let Some(c) = t.finished("t", 0, *o) {
                    assert!(c > last);
                    last = c;
                }
            }
            assert_eq!(last, 6, "order {order:?}");
        }
    }
}
