//! In-order offset commits for concurrently processed messages: a partition's offset is
//! committed only up to the first message still in flight, so a crash never skips one.

use std::collections::{BTreeSet, HashMap};

/// Tracks, per partition, the offsets in flight and the last offset committed.
#[derive(Debug, Default)]
pub struct CommitTracker {
    partitions: HashMap<(String, i32), Partition>,
}

#[derive(Debug)]
struct Partition {
    /// Received and not finished yet.
    in_flight: BTreeSet<i64>,
    /// The highest offset received.
    last_received: i64,
    /// The last offset committed (the next one to read), or where reading started.
    committed: i64,
}

impl CommitTracker {
    /// Records that `offset` was received (messages of a partition arrive in offset order).
    pub fn received(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self
            .partitions
            .entry((topic.to_string(), partition))
            // Where reading starts counts as committed: only progress past it is committed.
            .or_insert(Partition {
                in_flight: BTreeSet::new(),
                last_received: offset - 1,
                committed: offset,
            });
        if p.in_flight.is_empty() && offset < p.committed {
            // The log restarted below what we committed (a broker that lost its data, a
            // recreated topic): start over from here.
            p.committed = offset;
            p.last_received = offset - 1;
        }
        p.in_flight.insert(offset);
        p.last_received = p.last_received.max(offset);
    }

    /// Records that `offset` is done; returns the offset to commit (the next one to read) when
    /// it moved forward: the earliest offset still in flight, or the one after the last received.
    pub fn finished(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let p = self.partitions.get_mut(&(topic.to_string(), partition))?;
        if !p.in_flight.remove(&offset) {
            return None;
        }
        let commit = p.in_flight.first().copied().unwrap_or(p.last_received + 1);
        (commit > p.committed).then(|| {
            p.committed = commit;
            commit
        })
    }

    /// Forgets a partition taken away by a rebalance: its new owner commits it from now on,
    /// and a commit from here of a request that finishes late could move the group's offset
    /// back below what the new owner committed (the broker checks the member, not who owns
    /// the partition). If it comes back, tracking starts afresh where reading resumes.
    pub fn forget(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_string(), partition));
    }

    /// Messages received and not finished, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut t = CommitTracker::default();
        for o in 10..15 {
            t.received("t", 0, o);
        }
        assert_eq!(t.finished("t", 0, 12), None, "10 and 11 still in flight");
        assert_eq!(t.finished("t", 0, 11), None);
        assert_eq!(t.finished("t", 0, 10), Some(13), "10..=12 done: commit 13");
        assert_eq!(t.finished("t", 0, 14), None);
        assert_eq!(t.finished("t", 0, 13), Some(15));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_stale_offsets_ignored() {
        let mut t = CommitTracker::default();
        t.received("t", 0, 0);
        t.received("t", 1, 100);
        assert_eq!(t.finished("t", 1, 100), Some(101));
        assert_eq!(t.finished("t", 0, 0), Some(1));
        assert_eq!(t.finished("t", 0, 0), None, "already committed");
        assert_eq!(t.finished("other", 0, 0), None, "never received");
    }

    #[test]
    fn jumps_and_restarted_logs_keep_committing() {
        let mut t = CommitTracker::default();
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
    fn a_revoked_partition_commits_nothing_more_and_starts_afresh_when_back() {
        let mut t = CommitTracker::default();
        for o in 10..16 {
            t.received("t", 0, o);
        }
        t.received("t", 1, 3);
        t.forget("t", 0);
        // Requests of the revoked partition finish late: no commit (another replica owns it).
        for o in 10..16 {
            assert_eq!(t.finished("t", 0, o), None);
        }
        assert_eq!(t.finished("t", 1, 3), Some(4), "other partitions go on");
        // Assigned back, at the new owner's committed offset.
        t.received("t", 0, 201);
        assert_eq!(t.finished("t", 0, 201), Some(202));
        assert_eq!(t.in_flight(), 0);
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
            let mut t = CommitTracker::default();
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
