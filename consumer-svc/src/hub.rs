//! Sequenced fan-out of updates to stream subscribers.
//!
//! Every update gets the next sequence number and goes (a) into a ring of the most recent
//! updates, for subscribers that resume after a reconnect, and (b) onto a tokio broadcast
//! channel in batches (one per ingest batch, so 1,000 subscribers wake once per batch, not once
//! per event). The broadcast channel is the bounded per-subscriber queue: a subscriber that falls
//! more than `queue` batches behind loses the oldest ones and is told how many updates it
//! missed; the sender never waits, so a slow subscriber never blocks ingest or anyone else.

use std::collections::VecDeque;
use std::sync::Arc;

use omnibus_proto::consumer::v1 as pb;
use parking_lot::Mutex;
use tokio::sync::broadcast;

use crate::events::Event;

/// The payload of one update.
#[derive(Clone, Debug)]
pub enum UpdateKind {
    Event(Event),
    AgentMetrics(Arc<pb::AgentMetrics>),
    Status(Arc<pb::ConsumerStatus>),
}

/// Cheap to clone: the payloads are shared (`Arc`).
#[derive(Clone, Debug)]
pub struct Update {
    pub seq: u64,
    pub kind: UpdateKind,
}

/// Updates published together, in sequence order.
pub type Batch = Arc<[Update]>;

pub struct Hub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Batch>,
    ring_cap: usize,
}

struct Inner {
    ring: VecDeque<Update>,
    last_seq: u64,
}

/// A new subscription: the buffered updates to replay, then the live receiver.
pub struct Subscription {
    /// Updates after the resume point still in the ring, oldest first.
    pub backlog: Vec<Update>,
    /// Updates after the resume point that are no longer buffered.
    pub missed: u64,
    /// The newest sequence number at subscription time.
    pub last_seq: u64,
    pub rx: broadcast::Receiver<Batch>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    #[error(
        "sequence {requested} has not been published yet (the newest is {newest}); the service may have restarted"
    )]
    FromTheFuture { requested: u64, newest: u64 },
}

impl Hub {
    /// `ring` recent updates are kept for resuming; each subscriber may fall `queue` batches
    /// behind before it loses updates.
    pub fn new(ring: usize, queue: usize) -> Self {
        let (tx, _) = broadcast::channel(queue.max(1));
        Self {
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(ring.min(1 << 16)),
                last_seq: 0,
            }),
            tx,
            ring_cap: ring,
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.lock().last_seq
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Sequences and publishes `kinds`; returns the last sequence number used.
    pub fn publish(&self, kinds: impl IntoIterator<Item = UpdateKind>) -> u64 {
        let mut inner = self.inner.lock();
        let kinds = kinds.into_iter();
        // Nobody to send to (checked under the lock, which subscribe() takes too): no batch.
        let listening = self.tx.receiver_count() > 0;
        let mut batch = Vec::with_capacity(if listening { kinds.size_hint().0 } else { 0 });
        for kind in kinds {
            inner.last_seq += 1;
            let update = Update {
                seq: inner.last_seq,
                kind,
            };
            if self.ring_cap > 0 {
                if inner.ring.len() == self.ring_cap {
                    inner.ring.pop_front();
                }
                inner.ring.push_back(update.clone());
            }
            if listening {
                batch.push(update);
            }
        }
        if !batch.is_empty() {
            // Sent under the lock so subscribe() sees ring and channel consistently. An error
            // only means nobody is listening.
            let _ = self.tx.send(Batch::from(batch));
        }
        inner.last_seq
    }

    /// Subscribes; with `resume_after`, the buffered updates after it come first.
    pub fn subscribe(&self, resume_after: Option<u64>) -> Result<Subscription, ResumeError> {
        let inner = self.inner.lock();
        let rx = self.tx.subscribe();
        let last_seq = inner.last_seq;
        let (backlog, missed) = match resume_after {
            None => (Vec::new(), 0),
            Some(after) if after > last_seq => {
                return Err(ResumeError::FromTheFuture {
                    requested: after,
                    newest: last_seq,
                });
            }
            Some(after) => {
                let oldest = inner.ring.front().map_or(last_seq + 1, |u| u.seq);
                let missed = oldest.saturating_sub(after + 1);
                let backlog = inner
                    .ring
                    .iter()
                    .skip_while(|u| u.seq <= after)
                    .cloned()
                    .collect();
                (backlog, missed)
            }
        };
        Ok(Subscription {
            backlog,
            missed,
            last_seq,
            rx,
        })
    }
}

/// Updates handed to one subscriber: the tails of published batches, shared with every other
/// subscriber (no per-update copy or reference count per subscriber).
#[derive(Debug, Default)]
pub struct Updates {
    /// Each batch with the index of its first update not delivered before.
    parts: Vec<(Batch, usize)>,
    len: usize,
}

fn tail(part: &(Batch, usize)) -> &[Update] {
    part.0.get(part.1..).unwrap_or_default()
}

impl Updates {
    /// In sequence order.
    pub fn iter(&self) -> impl Iterator<Item = &Update> {
        self.into_iter()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, batch: Batch, from: usize) {
        let n = batch.len().saturating_sub(from);
        if n > 0 {
            self.len += n;
            self.parts.push((batch, from));
        }
    }
}

impl<'a> IntoIterator for &'a Updates {
    type Item = &'a Update;
    type IntoIter = std::iter::FlatMap<
        std::slice::Iter<'a, (Batch, usize)>,
        &'a [Update],
        fn(&'a (Batch, usize)) -> &'a [Update],
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.parts.iter().flat_map(tail)
    }
}

/// What a subscriber's receive loop gets next.
#[derive(Debug)]
pub enum Next {
    /// Updates in order (possibly several batches, drained without waiting).
    Updates(Updates),
    /// `missed` updates were dropped; the stream goes on after them.
    Lagged {
        missed: u64,
        last_missed: u64,
    },
    Closed,
}

/// Follows a subscription, converting broadcast lag into a count of missed updates.
pub struct Follower {
    rx: broadcast::Receiver<Batch>,
    /// Sequence of the last update handed out (or replayed from the backlog).
    delivered: u64,
    /// A batch received after a gap, delivered after the lag notice.
    stash: Option<Batch>,
    /// Most updates handed out per call, so one push stays a reasonable size.
    max_items: usize,
}

impl Follower {
    /// `delivered` is the last sequence the subscriber already has (the subscription's
    /// `last_seq`, or the end of its backlog).
    pub fn new(rx: broadcast::Receiver<Batch>, delivered: u64, max_items: usize) -> Self {
        Self {
            rx,
            delivered,
            stash: None,
            max_items: max_items.max(1),
        }
    }

    /// Appends `batch` to `out`, unless updates are missing before it: then it is kept for
    /// the next call and the gap is reported.
    fn handle(&mut self, batch: Batch, out: &mut Updates) -> Option<Next> {
        let first = batch.first()?.seq;
        if first > self.delivered + 1 {
            if !out.is_empty() {
                self.stash = Some(batch);
                return Some(Next::Updates(std::mem::take(out)));
            }
            let missed = first - self.delivered - 1;
            svc_kit::metrics::counter!("consumer_stream_lagged_updates_total").increment(missed);
            self.delivered = first - 1;
            self.stash = Some(batch);
            return Some(Next::Lagged {
                missed,
                last_missed: first - 1,
            });
        }
        // Sequences within a batch are consecutive: skip those already delivered.
        let from = usize::try_from(self.delivered + 1 - first).unwrap_or(usize::MAX);
        if let Some(last) = batch.last()
            && last.seq > self.delivered
        {
            self.delivered = last.seq;
            out.push(batch, from);
        }
        None
    }

    /// Waits for the next updates and then drains whatever else is queued, without waiting.
    pub async fn next(&mut self) -> Next {
        let mut out = Updates::default();
        if let Some(batch) = self.stash.take()
            && let Some(next) = self.handle(batch, &mut out)
        {
            return next;
        }
        loop {
            if out.len() >= self.max_items {
                return Next::Updates(out);
            }
            let received = if out.is_empty() {
                self.rx.recv().await
            } else {
                match self.rx.try_recv() {
                    Ok(b) => Ok(b),
                    Err(broadcast::error::TryRecvError::Empty) => return Next::Updates(out),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(broadcast::error::TryRecvError::Closed) => {
                        Err(broadcast::error::RecvError::Closed)
                    }
                }
            };
            match received {
                Ok(batch) => {
                    if let Some(next) = self.handle(batch, &mut out) {
                        return next;
                    }
                }
                // The next batch received shows the gap; handle() reports it.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return if out.is_empty() {
                        Next::Closed
                    } else {
                        Next::Updates(out)
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::UpdateKind;

    fn status(n: u64) -> UpdateKind {
        UpdateKind::Status(Arc::new(pb::ConsumerStatus {
            events_processed: n,
            ..Default::default()
        }))
    }

    fn seqs(next: Next) -> Vec<u64> {
        match next {
            Next::Updates(u) => u.iter().map(|u| u.seq).collect(),
            other => panic!("expected updates, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn delivers_in_order_and_drains_queued_batches() {
        let hub = Hub::new(100, 16);
        let sub = hub.subscribe(None).unwrap();
        let mut f = Follower::new(sub.rx, sub.last_seq, 1000);
        hub.publish([status(1), status(2)]);
        hub.publish([status(3)]);
        assert_eq!(seqs(f.next().await), vec![1, 2, 3]);
        hub.publish([status(4)]);
        assert_eq!(seqs(f.next().await), vec![4]);
    }

    #[tokio::test]
    async fn a_slow_subscriber_gets_a_lag_notice_and_never_blocks_the_publisher() {
        let hub = Hub::new(100, 4);
        let sub = hub.subscribe(None).unwrap();
        let mut f = Follower::new(sub.rx, sub.last_seq, 1000);
        for i in 0..10 {
            hub.publish([status(i)]); // never waits
        }
        match f.next().await {
            Next::Lagged {
                missed,
                last_missed,
            } => {
                assert_eq!(missed, 6);
                assert_eq!(last_missed, 6);
            }
            other => panic!("expected a lag notice, got {other:?}"),
        }
        assert_eq!(seqs(f.next().await), vec![7, 8, 9, 10]);
    }

    #[tokio::test]
    async fn resume_replays_buffered_updates_or_reports_the_gap() {
        let hub = Hub::new(5, 16);
        for i in 0..8 {
            hub.publish([status(i)]);
        }
        // Ring holds 4..=8.
        let sub = hub.subscribe(Some(5)).unwrap();
        assert_eq!(sub.missed, 0);
        assert_eq!(
            sub.backlog.iter().map(|u| u.seq).collect::<Vec<_>>(),
            vec![6, 7, 8]
        );
        let sub = hub.subscribe(Some(1)).unwrap();
        assert_eq!(sub.missed, 2, "2 and 3 are gone");
        assert_eq!(sub.backlog.first().map(|u| u.seq), Some(4));
        let sub = hub.subscribe(Some(8)).unwrap();
        assert!(sub.backlog.is_empty());
        assert_eq!(sub.missed, 0);
        assert!(matches!(
            hub.subscribe(Some(9)),
            Err(ResumeError::FromTheFuture { .. })
        ));
        // Live updates continue right after the backlog.
        let mut f = Follower::new(sub.rx, 8, 100);
        hub.publish([status(9)]);
        assert_eq!(seqs(f.next().await), vec![9]);
    }
}
