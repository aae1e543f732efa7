//! Lanes of shared statements: the bookkeeping behind insert and query coalescing.
//!
//! Requests that could share one statement (same table and shape) form a lane. At most
//! `max_in_flight` statements of a lane run at once; a request that finds them all busy joins
//! the lane's waiting batch, and when a running statement finishes, that batch goes to
//! PostgreSQL as the next statement. Nothing waits for a timer: a request that finds a free
//! slot runs at once, so a lone client sees no added latency, while under load one statement
//! (one round trip, one plan) serves many requests.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;

/// How many requests of a failed shared statement run alone at the same time (each needs a
/// pooled connection; the rest wait their turn).
const RERUN_CONCURRENCY: usize = 8;

/// Runs the requests of a failed shared statement, each alone, [`RERUN_CONCURRENCY`] at a
/// time: one slow request (most likely the one that failed the batch) does not hold up the
/// others.
pub async fn rerun_alone(reruns: impl IntoIterator<Item = impl Future<Output = ()>>) {
    use futures::StreamExt as _;
    futures::stream::iter(reruns)
        .buffer_unordered(RERUN_CONCURRENCY)
        .collect::<()>()
        .await;
}

/// How many requests, and how much of their weight (an insert's bind parameters, a query's
/// rows), one shared statement may carry.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Statements per lane running at once before requests start waiting (at least 1).
    pub max_in_flight: usize,
    /// Weight per shared statement.
    pub max_weight: usize,
    /// Requests per shared statement.
    pub max_requests: usize,
    /// Heavier requests run alone (their statement cost is already spread over much work).
    pub max_request_weight: usize,
}

impl BatchLimits {
    /// Inserts: the weight is bind parameters (PostgreSQL allows 65,535 per statement). Every
    /// distinct size of a shared insert is one more prepared statement, so large inserts,
    /// already cheap per row, run alone.
    pub fn inserts(max_in_flight: usize) -> Self {
        Self {
            max_in_flight: max_in_flight.max(1),
            max_weight: 4_096,
            max_requests: 256,
            max_request_weight: 256,
        }
    }

    /// Queries: the weight is the rows asked for (the limit), so one shared statement's
    /// result stays a few MiB at most; a query asking for more rows runs alone.
    pub fn queries(max_in_flight: usize) -> Self {
        Self {
            max_in_flight: max_in_flight.max(1),
            max_weight: 10_000,
            max_requests: 64,
            max_request_weight: 1_000,
        }
    }
}

struct Batch<W> {
    items: Vec<W>,
    weight: usize,
}

struct Lane<W> {
    running: usize,
    waiting: VecDeque<Batch<W>>,
}

/// The pure bookkeeping of the lanes: who runs now, who waits in which batch, and which batch
/// takes over a slot when a statement finishes.
pub struct Lanes<K, W> {
    limits: BatchLimits,
    lanes: HashMap<K, Lane<W>>,
}

impl<K: Hash + Eq + Clone, W> Lanes<K, W> {
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            lanes: HashMap::new(),
        }
    }

    /// Takes a running slot of `key`'s lane if one is free (the caller runs its request now).
    pub fn try_start(&mut self, key: &K) -> bool {
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            running: 0,
            waiting: VecDeque::new(),
        });
        if lane.running < self.limits.max_in_flight {
            lane.running += 1;
            true
        } else {
            false
        }
    }

    /// Adds a request that found no free slot to the last waiting batch, or to a new one when
    /// that batch is full. A batch always takes its first request, however heavy.
    pub fn wait(&mut self, key: &K, item: W, weight: usize) {
        let limits = self.limits;
        let lane = self.lanes.entry(key.clone()).or_insert_with(|| Lane {
            running: 0,
            waiting: VecDeque::new(),
        });
        match lane.waiting.back_mut() {
            Some(batch)
                if batch.items.len() < limits.max_requests
                    && batch.weight + weight <= limits.max_weight =>
            {
                batch.items.push(item);
                batch.weight += weight;
            }
            _ => lane.waiting.push_back(Batch {
                items: vec![item],
                weight,
            }),
        }
    }

    /// A statement of `key`'s lane finished: the next waiting batch takes over its slot, or the
    /// slot is freed (and an idle lane forgotten).
    pub fn finish(&mut self, key: &K) -> Option<Vec<W>> {
        let lane = self.lanes.get_mut(key)?;
        if let Some(batch) = lane.waiting.pop_front() {
            return Some(batch.items);
        }
        lane.running = lane.running.saturating_sub(1);
        if lane.running == 0 {
            self.lanes.remove(key);
        }
        None
    }

    /// Requests waiting for a slot, over all lanes.
    pub fn waiting(&self) -> usize {
        self.lanes
            .values()
            .flat_map(|l| &l.waiting)
            .map(|b| b.items.len())
            .sum()
    }
}

/// A kind of shared statement: its lanes, and how a waiting batch runs.
pub trait Coalescer: Send + Sync + Sized + 'static {
    type Key: Hash + Eq + Clone + Send + Sync + 'static;
    type Waiter: Send + 'static;

    fn lanes(&self) -> &Mutex<Lanes<Self::Key, Self::Waiter>>;

    /// Runs a batch that took over a slot of `key`'s lane; every waiter gets its answer.
    fn run_batch(
        &self,
        key: &Self::Key,
        batch: Vec<Self::Waiter>,
    ) -> impl Future<Output = ()> + Send;

    /// Answers a batch that will never run because db-svc is stopping (UNAVAILABLE: nothing
    /// of it was run, another replica can take it). A batch that was running when it ended
    /// without answering - it panicked - is not abandoned: its callers see their reply
    /// channel closed, and answer for a failure inside db-svc.
    fn abandon(&self, batch: Vec<Self::Waiter>);

    /// How many requests wait, over all lanes (for a gauge).
    fn report_waiting(&self, waiting: usize);
}

/// Admits a request to `key`'s lane, in one step under the lane lock: either a free slot,
/// returned with `item` for the caller to run now, or `to_waiter(item)` joins the waiting
/// batch (and its reply channel, captured by the caller, will carry the answer).
pub fn admit<C: Coalescer, T>(
    coalescer: &Arc<C>,
    key: C::Key,
    item: T,
    weight: usize,
    to_waiter: impl FnOnce(T) -> C::Waiter,
) -> Option<(Slot<C>, T)> {
    let mut lanes = coalescer.lanes().lock();
    if lanes.try_start(&key) {
        drop(lanes);
        let slot = Slot {
            coalescer: coalescer.clone(),
            key,
        };
        return Some((slot, item));
    }
    lanes.wait(&key, to_waiter(item), weight);
    coalescer.report_waiting(lanes.waiting());
    None
}

/// A running slot of a lane. Dropping it (the statement ended, or its caller went away) passes
/// the slot to the next waiting batch, on a task of its own.
pub struct Slot<C: Coalescer> {
    coalescer: Arc<C>,
    key: C::Key,
}

impl<C: Coalescer> Drop for Slot<C> {
    fn drop(&mut self) {
        let next = {
            let mut lanes = self.coalescer.lanes().lock();
            let next = lanes.finish(&self.key);
            self.coalescer.report_waiting(lanes.waiting());
            next
        };
        let Some(batch) = next else { return };
        let unstarted = Unstarted {
            slot: Slot {
                coalescer: self.coalescer.clone(),
                key: self.key.clone(),
            },
            batch: Some(batch),
        };
        match tokio::runtime::Handle::try_current() {
            // The slot moves into the task and passes on when the batch is done.
            Ok(runtime) => drop(runtime.spawn(unstarted.run())),
            // Outside a runtime: db-svc is shutting down.
            Err(_) => drop(unstarted),
        }
    }
}

/// A batch that took over a slot, on its way to the task that runs it. Dropped before that
/// task started it - db-svc is stopping, and its runtime drops new tasks unpolled - it
/// answers its callers with [`Coalescer::abandon`], and its slot passes on to the lane's next
/// waiting batch, which goes the same way.
struct Unstarted<C: Coalescer> {
    slot: Slot<C>,
    batch: Option<Vec<C::Waiter>>,
}

impl<C: Coalescer> Unstarted<C> {
    async fn run(mut self) {
        let batch = self.batch.take().unwrap_or_default();
        let run = self.slot.coalescer.run_batch(&self.slot.key, batch);
        // A panic leaves the callers it had not answered with a closed reply channel, which
        // they answer for as a failure inside db-svc.
        if let Err(panic) = svc_kit::panic::catch_panic(run).await {
            tracing::error!(%panic, "a shared statement panicked; its unanswered callers get INTERNAL");
        }
    }
}

impl<C: Coalescer> Drop for Unstarted<C> {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.slot.coalescer.abandon(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes<W>(max_in_flight: usize) -> Lanes<&'static str, W> {
        Lanes::new(BatchLimits {
            max_in_flight,
            max_weight: 10,
            max_requests: 3,
            max_request_weight: 10,
        })
    }

    #[test]
    fn requests_run_at_once_until_the_lane_is_busy() {
        let mut l = lanes::<u32>(2);
        assert!(l.try_start(&"t"));
        assert!(l.try_start(&"t"));
        assert!(!l.try_start(&"t"), "two running: the third waits");
        assert!(l.try_start(&"other"), "lanes are independent");
    }

    #[test]
    fn waiting_requests_share_batches_in_arrival_order() {
        let mut l = lanes(1);
        assert!(l.try_start(&"t"));
        for (i, weight) in [(1, 4), (2, 4), (3, 4), (4, 1), (5, 1), (6, 50)] {
            assert!(!l.try_start(&"t"));
            l.wait(&"t", i, weight);
        }
        assert_eq!(l.waiting(), 6);
        // 1+2 fill 8 of 10 weight; 3 would exceed them. 3,4,5 reach 3 requests. 6 is too
        // big for any batch but still gets one of its own.
        assert_eq!(l.finish(&"t"), Some(vec![1, 2]));
        assert_eq!(l.finish(&"t"), Some(vec![3, 4, 5]));
        assert_eq!(l.finish(&"t"), Some(vec![6]));
        assert_eq!(l.waiting(), 0);
        assert_eq!(l.finish(&"t"), None, "nothing waits: the slot is freed");
        assert!(l.try_start(&"t"), "and taken again at once");
    }

    type Reply = tokio::sync::oneshot::Sender<Result<u32, &'static str>>;

    /// Answers each request with its number, panics on a batch holding 13, and abandons with
    /// "stopping".
    struct Echo {
        lanes: Mutex<Lanes<&'static str, (u32, Reply)>>,
    }

    impl Coalescer for Echo {
        type Key = &'static str;
        type Waiter = (u32, Reply);

        fn lanes(&self) -> &Mutex<Lanes<&'static str, (u32, Reply)>> {
            &self.lanes
        }

        async fn run_batch(&self, _: &&'static str, batch: Vec<(u32, Reply)>) {
            if batch.iter().any(|(n, _)| *n == 13) {
                panic!("unlucky");
            }
            for (n, reply) in batch {
                let _ = reply.send(Ok(n));
            }
        }

        fn abandon(&self, batch: Vec<(u32, Reply)>) {
            for (_, reply) in batch {
                let _ = reply.send(Err("stopping"));
            }
        }

        fn report_waiting(&self, _: usize) {}
    }

    fn echo() -> Arc<Echo> {
        Arc::new(Echo {
            lanes: Mutex::new(lanes(1)),
        })
    }

    /// Admits request `n`: the slot when it is free, else the receiver of its answer.
    fn enter(
        c: &Arc<Echo>,
        n: u32,
    ) -> Result<Slot<Echo>, tokio::sync::oneshot::Receiver<Result<u32, &'static str>>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        match admit(c, "t", n, 1, |n| (n, reply)) {
            Some((slot, _)) => Ok(slot),
            None => Err(answer),
        }
    }

    /// A regression guard for the contract the callers rely on: a batch that panics leaves
    /// the callers it had not answered a closed reply channel, and its slot passes on.
    #[tokio::test]
    async fn a_batch_that_panics_leaves_its_callers_a_closed_channel_and_frees_its_slot() {
        let c = echo();
        let Ok(slot) = enter(&c, 1) else {
            panic!("a free slot")
        };
        let (Err(unlucky), Err(other)) = (enter(&c, 13), enter(&c, 2)) else {
            panic!("the slot is taken")
        };
        drop(slot);
        // The batch [13, 2] panicked: neither was answered; nothing else was brought down.
        assert!(unlucky.await.is_err());
        assert!(other.await.is_err());
        // Its slot passed on: the lane is free again.
        let Ok(_slot) = enter(&c, 3) else {
            panic!("the panicked batch's slot was freed")
        };
        let Err(after) = enter(&c, 4) else {
            panic!("the slot is taken")
        };
        drop(_slot);
        assert_eq!(after.await, Ok(Ok(4)));
    }

    #[test]
    fn every_batch_that_cannot_run_because_db_svc_stops_is_abandoned_with_an_answer() {
        // No runtime here, as when db-svc's runtime has shut down.
        let c = echo();
        let Ok(slot) = enter(&c, 1) else {
            panic!("a free slot")
        };
        // Two waiting batches: [2, 3, 4] (3 requests at most) and [5].
        let mut waiting: Vec<_> = (2..=5).filter_map(|n| enter(&c, n).err()).collect();
        assert_eq!(waiting.len(), 4);
        drop(slot);
        for w in &mut waiting {
            assert_eq!(w.try_recv(), Ok(Err("stopping")));
        }
        assert!(
            c.lanes.lock().lanes.is_empty(),
            "the lane is free, not stuck"
        );
        // And in a runtime that stops before the batch's task ever ran.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut unrun = {
            let _in_runtime = runtime.enter();
            let Ok(slot) = enter(&c, 6) else {
                panic!("a free slot")
            };
            let Err(waiting) = enter(&c, 7) else {
                panic!("the slot is taken")
            };
            // Spawns the batch's task, which this runtime never polls.
            drop(slot);
            waiting
        };
        drop(runtime);
        assert_eq!(unrun.try_recv(), Ok(Err("stopping")));
        assert!(
            c.lanes.lock().lanes.is_empty(),
            "the lane is free, not stuck"
        );
    }

    #[test]
    fn a_finished_slot_goes_to_the_waiting_batch_not_to_a_newcomer() {
        let mut l = lanes(1);
        assert!(l.try_start(&"t"));
        l.wait(&"t", 1, 1);
        assert_eq!(l.finish(&"t"), Some(vec![1]), "the batch runs in the slot");
        assert!(!l.try_start(&"t"), "the slot is still taken by that batch");
        l.wait(&"t", 2, 1);
        assert_eq!(l.finish(&"t"), Some(vec![2]));
        assert_eq!(l.finish(&"t"), None);
        assert!(l.lanes.is_empty(), "an idle lane is forgotten");
    }
}
