//! Sequenced fan-out of updates to stream subscribers.
//!
//! Every update gets the next sequence number and goes (a) into a ring of the most recent
//! updates, for subscribers that resume after a reconnect, and (b) to the subscribers, in
//! batches (one per ingest batch, so a subscriber wakes once per batch, not once per event),
//! over tokio broadcast channels:
//!
//! - subscribers without an agent filter share one channel that carries every update;
//! - subscribers with an agent filter read from that agent's *route*: a channel carrying only
//!   the updates that concern the agent (its actions, routing decisions, transformations from
//!   or to it, its metrics) and the consumer-status changes. A batch that holds nothing for an
//!   agent wakes none of its subscribers, and none of them scans the other agents' updates.
//!   Routes exist while someone follows them.
//!
//! A channel is the bounded per-subscriber queue: a subscriber that falls more than `queue`
//! batches, or more than `queue_bytes` of updates, behind loses the oldest ones and is told
//! how many updates (of its channel) it missed; the sender never waits, so a slow subscriber
//! never blocks ingest or anyone else. A batch carries at most [`MAX_BATCH`] updates and at
//! most a quarter of `queue_bytes` (up to [`MAX_CHUNK_BYTES`]; one larger update goes alone):
//! an ingest batch of more is sent in pieces.
//!
//! The byte bound: each update's size ([`Update::bytes`], the memory it pins) is computed once,
//! when it is published. The channel's slots hold *weak* references to the batches; the strong
//! ones are in the channel's `Window`, kept by the publisher (under the hub's lock), which
//! lets go of a batch once every subscriber has read it (no slot refers to it any more), or,
//! oldest first, once the unread batches pass `queue_bytes` (the newest always stays). A
//! subscriber that then reaches a batch let go finds it gone, skips it, and the next batch
//! shows the gap: the same lag notice as when the channel overwrote a slot. So a channel keeps
//! alive at most `queue_bytes` (or one batch) of updates, and the events they share, however
//! far behind its slowest subscriber is, and a subscriber that keeps up never loses anything.
//! What this costs a subscriber: upgrading the weak reference, once per batch (not per update).
//! Updates on a channel are numbered consecutively (on the shared channel the number is the
//! sequence itself), which is how a gap is detected.
//!
//! The resume ring is bounded the same way: at most `ring` updates and `ring_bytes` of them
//! (the newest always stays); a resume point before the oldest one kept gets the gap.

use std::collections::VecDeque;
use std::mem::size_of;
use std::sync::{Arc, Weak};

use omnibus_proto::consumer::v1 as pb;
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::broadcast;

use crate::events::{ARC_HEADER, Event};
use crate::state::BufferUsage;

/// The payload of one update.
#[derive(Clone, Debug)]
pub enum UpdateKind {
    Event(Event),
    AgentMetrics(Arc<pb::AgentMetrics>),
    Status(Arc<pb::ConsumerStatus>),
}

/// The agents whose filtered subscribers get an update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience<'a> {
    /// Only subscribers without an agent filter (performance metrics have no agent).
    Unfiltered,
    One(&'a str),
    /// A transformation: its source and its target agent.
    Two(&'a str, &'a str),
    /// Every subscriber (consumer status).
    Everyone,
}

impl Audience<'_> {
    /// Whether a subscriber filtering on `agent` gets the update.
    pub fn includes(&self, agent: &str) -> bool {
        match *self {
            Audience::Unfiltered => false,
            Audience::One(a) => a == agent,
            Audience::Two(a, b) => a == agent || b == agent,
            Audience::Everyone => true,
        }
    }
}

impl UpdateKind {
    /// Who may want this update. The streams' agent filters never accept an update outside
    /// its audience (tested in `api`).
    pub fn audience(&self) -> Audience<'_> {
        match self {
            UpdateKind::Event(Event::AgentAction(a)) => Audience::One(a.agent_name()),
            UpdateKind::Event(Event::RoutingDecision(d)) => Audience::One(d.selected_agent()),
            UpdateKind::Event(Event::Transformation(t)) if t.source_agent() == t.target_agent() => {
                Audience::One(t.source_agent())
            }
            UpdateKind::Event(Event::Transformation(t)) => {
                Audience::Two(t.source_agent(), t.target_agent())
            }
            UpdateKind::Event(Event::PerformanceMetric(_)) => Audience::Unfiltered,
            UpdateKind::AgentMetrics(m) => Audience::One(&m.agent),
            UpdateKind::Status(_) => Audience::Everyone,
        }
    }

    /// The memory the payload pins: an event's [`crate::events::HeapSize`]; for agent metrics
    /// and status the message and its strings (a status's estimated by its encoded length).
    pub fn heap_size(&self) -> usize {
        match self {
            UpdateKind::Event(e) => e.heap_size(),
            UpdateKind::AgentMetrics(m) => {
                ARC_HEADER + size_of::<pb::AgentMetrics>() + m.agent.capacity()
            }
            UpdateKind::Status(s) => {
                ARC_HEADER
                    + size_of::<pb::ConsumerStatus>()
                    + s.topics.capacity() * size_of::<pb::TopicStatus>()
                    + s.partitions.capacity() * size_of::<pb::PartitionStatus>()
                    + s.encoded_len()
            }
        }
    }
}

/// Cheap to clone: the payloads are shared (`Arc`).
#[derive(Clone, Debug)]
pub struct Update {
    pub seq: u64,
    pub kind: UpdateKind,
    /// The memory the update pins (itself and [`UpdateKind::heap_size`]), computed once when
    /// it is made, for the byte budgets of the ring and of the queues.
    pub bytes: usize,
}

impl Update {
    pub fn new(seq: u64, kind: UpdateKind) -> Self {
        let bytes = size_of::<Update>() + kind.heap_size();
        Self { seq, kind, bytes }
    }
}

/// Updates published together, in sequence order.
pub type Batch = Arc<[Update]>;

/// What a channel carries: one batch, weakly (its [`Window`] holds it), and the channel number
/// of its first update (the following ones are numbered consecutively).
#[derive(Clone, Debug)]
struct Chunk {
    updates: Weak<[Update]>,
    first: u64,
}

/// A chunk received while its batch was still held.
#[derive(Debug)]
struct Held {
    updates: Batch,
    first: u64,
}

/// The hub's bounds (see the module notes).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Updates kept for resuming (`--resume-buffer`).
    pub ring: usize,
    /// Their byte budget (`--resume-buffer-bytes`).
    pub ring_bytes: usize,
    /// Batches a subscriber may fall behind (`--subscriber-queue`; 0 counts as 1).
    pub queue: usize,
    /// Bytes of updates a subscriber may fall behind (`--subscriber-queue-bytes`).
    pub queue_bytes: usize,
}

impl Limits {
    /// `ring` updates and `queue` batches, without byte budgets.
    pub fn counts(ring: usize, queue: usize) -> Self {
        Self {
            ring,
            ring_bytes: usize::MAX,
            queue,
            queue_bytes: usize::MAX,
        }
    }
}

pub struct Hub {
    inner: Mutex<Inner>,
    /// The channel of the subscribers without an agent filter.
    tx: broadcast::Sender<Chunk>,
    limits: Limits,
    /// Most bytes of updates in one batch (unless one update alone is larger).
    chunk_bytes: usize,
}

struct Inner {
    ring: VecDeque<Update>,
    /// The [`Update::bytes`] of the ring's updates.
    ring_bytes: usize,
    /// Updates the ring let go because of its byte budget since start-up.
    ring_evicted_for_bytes: u64,
    /// The batches of the shared channel not yet read by all its subscribers.
    window: Window,
    /// The sequence before this run's first (its start time, or 0).
    base: u64,
    last_seq: u64,
    /// Agent-filtered subscribers' channels, by agent.
    routes: foldhash::HashMap<Box<str>, Route>,
    /// Routes nobody follows any more are dropped when the map reaches this size (and when a
    /// publish finds nobody listening), so the map stays within twice the followed agents.
    sweep_at: usize,
}

impl Inner {
    /// Drops the ring's oldest update, and its bytes from the total; false if it was empty.
    fn pop_oldest(&mut self) -> bool {
        let Some(old) = self.ring.pop_front() else {
            return false;
        };
        self.ring_bytes -= old.bytes;
        true
    }
}

struct Route {
    tx: broadcast::Sender<Chunk>,
    /// Updates sent on this route so far (the channel number of the last one).
    sent: u64,
    /// This publish's updates for the route.
    pending: Vec<Update>,
    /// The route's batches not yet read by all its subscribers.
    window: Window,
}

const MIN_SWEEP: usize = 64;

/// Most updates in one channel message. Ingest batches are up to 2,000 events while a backlog
/// is replayed; sent whole, a queue of 1,024 of them could keep two million events (~1 GB)
/// alive for one stalled subscriber.
pub const MAX_BATCH: usize = 256;

/// Most bytes of updates in one channel message (unless one update alone is larger), and less
/// when `queue_bytes` is small: a quarter of it, so that what a queue lets go for bytes is
/// never much more than it must.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// `updates` as channel batches of at most [`MAX_BATCH`] updates and `max_bytes` (or one
/// update), in order, each with its bytes.
fn batches(updates: Vec<Update>, max_bytes: usize) -> Vec<(Batch, usize)> {
    let total: usize = updates.iter().map(|u| u.bytes).sum();
    if updates.len() <= MAX_BATCH && total <= max_bytes {
        return vec![(Batch::from(updates), total)];
    }
    let mut out = Vec::new();
    let (mut piece, mut bytes) = (Vec::with_capacity(MAX_BATCH.min(updates.len())), 0);
    for u in updates {
        if !piece.is_empty() && (piece.len() == MAX_BATCH || bytes + u.bytes > max_bytes) {
            out.push((Batch::from(std::mem::take(&mut piece)), bytes));
            bytes = 0;
        }
        bytes += u.bytes;
        piece.push(u);
    }
    if !piece.is_empty() {
        out.push((Batch::from(piece), bytes));
    }
    out
}

/// The strong references to a channel's batches (its slots hold weak ones): what the channel
/// keeps alive. A batch goes once no slot refers to it (every subscriber has read it, or the
/// channel overwrote it), or, oldest first, when there are more than `queue` of them or more
/// than `queue_bytes` (the newest stays).
#[derive(Debug, Default)]
struct Window {
    batches: VecDeque<(Batch, usize)>,
    bytes: usize,
}

impl Window {
    /// Lets go of the oldest batches every subscriber has read (a load per batch, no write).
    /// A weak reference to a batch is made only when it is sent, so once none is left (the
    /// slots' and those being received) none can appear.
    fn trim_read(&mut self) {
        while let Some((batch, bytes)) = self.batches.front()
            && Arc::weak_count(batch) == 0
        {
            self.bytes -= *bytes;
            self.batches.pop_front();
        }
    }

    /// Holds `batch`, just sent, within `limits`.
    fn push(&mut self, batch: Batch, bytes: usize, limits: &Limits) {
        self.bytes += bytes;
        self.batches.push_back((batch, bytes));
        while self.batches.len() > limits.queue
            || (self.bytes > limits.queue_bytes && self.batches.len() > 1)
        {
            if let Some((_, bytes)) = self.batches.pop_front() {
                self.bytes -= bytes;
            }
        }
    }

    fn clear(&mut self) {
        self.batches.clear();
        self.bytes = 0;
    }
}

/// Sends `batch` on `tx` and, if anyone receives it, holds it in `window`; returns whether
/// anyone does.
fn send(
    tx: &broadcast::Sender<Chunk>,
    window: &mut Window,
    limits: &Limits,
    (batch, bytes): (Batch, usize),
    first: u64,
) -> bool {
    let chunk = Chunk {
        updates: Arc::downgrade(&batch),
        first,
    };
    let sent = tx.send(chunk).is_ok();
    if sent {
        window.push(batch, bytes, limits);
    }
    sent
}

/// The live part of a subscription, for a [`Follower`].
pub struct Live {
    rx: broadcast::Receiver<Chunk>,
    /// The channel number of the last update before the subscription.
    delivered: u64,
}

/// A new subscription: the buffered updates to replay, then the live receiver.
pub struct Subscription {
    /// Updates after the resume point still in the ring, oldest first (not filtered).
    pub backlog: Vec<Update>,
    /// Updates after the resume point that are no longer buffered.
    pub missed: u64,
    /// The newest sequence number at subscription time.
    pub last_seq: u64,
    pub live: Live,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    #[error(
        "sequence {requested} has not been published yet (the newest is {newest}); the service may have restarted"
    )]
    FromTheFuture { requested: u64, newest: u64 },
    #[error(
        "sequence {requested} is from an earlier run of consumer-svc (this run's sequences start at {first}); start over, with a snapshot"
    )]
    EarlierRun { requested: u64, first: u64 },
}

impl Hub {
    /// `ring` recent updates are kept for resuming; each subscriber may fall `queue` batches
    /// behind before it loses updates (no byte budgets). Sequences start at 1.
    pub fn new(ring: usize, queue: usize) -> Self {
        Self::numbered_after(ring, queue, 0)
    }

    /// [`Hub::new`] whose first sequence is `base + 1`.
    pub fn numbered_after(ring: usize, queue: usize, base: u64) -> Self {
        Self::with_limits(Limits::counts(ring, queue), base)
    }

    /// A hub within `limits` whose first sequence is `base + 1`. The service passes its start
    /// time in microseconds, so sequences never go backwards across restarts: a resume point
    /// from an earlier run is below `base` and is refused, instead of landing inside this
    /// run's numbers and silently skipping its first updates.
    pub fn with_limits(limits: Limits, base: u64) -> Self {
        let limits = Limits {
            queue: limits.queue.max(1),
            ..limits
        };
        let (tx, _) = broadcast::channel(limits.queue);
        Self {
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(limits.ring.min(1 << 16)),
                ring_bytes: 0,
                ring_evicted_for_bytes: 0,
                window: Window::default(),
                base,
                last_seq: base,
                routes: foldhash::HashMap::default(),
                sweep_at: MIN_SWEEP,
            }),
            tx,
            limits,
            chunk_bytes: (limits.queue_bytes / 4).clamp(1, MAX_CHUNK_BYTES),
        }
    }

    /// What the resume ring holds.
    pub fn ring_usage(&self) -> BufferUsage {
        let inner = self.inner.lock();
        BufferUsage {
            items: inner.ring.len(),
            bytes: inner.ring_bytes,
            evicted_for_bytes: inner.ring_evicted_for_bytes,
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.inner.lock().last_seq
    }

    /// Open subscriptions, filtered or not.
    pub fn subscribers(&self) -> usize {
        let inner = self.inner.lock();
        self.tx.receiver_count()
            + inner
                .routes
                .values()
                .map(|r| r.tx.receiver_count())
                .sum::<usize>()
    }

    /// Agents with a route (followed, or not swept yet).
    pub fn routes(&self) -> usize {
        self.inner.lock().routes.len()
    }

    /// Sequences and publishes `kinds`; returns the last sequence number used.
    pub fn publish(&self, kinds: impl IntoIterator<Item = UpdateKind>) -> u64 {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let kinds = kinds.into_iter();
        // Nobody to send to (checked under the lock, which subscribe() takes too): no batch.
        let listening = self.tx.receiver_count() > 0;
        let routing = !inner.routes.is_empty();
        let mut batch = Vec::with_capacity(if listening { kinds.size_hint().0 } else { 0 });
        let limits = &self.limits;
        for kind in kinds {
            inner.last_seq += 1;
            let update = Update::new(inner.last_seq, kind);
            if routing {
                route(&mut inner.routes, &update);
            }
            if limits.ring > 0 {
                if inner.ring.len() == limits.ring {
                    inner.pop_oldest();
                }
                inner.ring_bytes += update.bytes;
                inner.ring.push_back(update.clone());
                while inner.ring_bytes > limits.ring_bytes
                    && inner.ring.len() > 1
                    && inner.pop_oldest()
                {
                    inner.ring_evicted_for_bytes += 1;
                }
            }
            if listening {
                batch.push(update);
            }
        }
        // Sent under the lock so subscribe() sees ring and channels consistently.
        if !listening {
            inner.window.clear();
        } else if !batch.is_empty() {
            inner.window.trim_read();
            for piece in batches(batch, self.chunk_bytes) {
                let first = piece.0[0].seq;
                // Not sent only when nobody is listening any more.
                send(&self.tx, &mut inner.window, limits, piece, first);
            }
        }
        if routing {
            inner.routes.retain(|_, r| {
                r.window.trim_read();
                if r.pending.is_empty() {
                    return true;
                }
                batches(std::mem::take(&mut r.pending), self.chunk_bytes)
                    .into_iter()
                    .all(|piece| {
                        let first = r.sent + 1;
                        r.sent += piece.0.len() as u64;
                        // Not sent: nobody follows the agent any more, and the route goes.
                        send(&r.tx, &mut r.window, limits, piece, first)
                    })
            });
        }
        inner.last_seq
    }

    /// Subscribes; with `resume_after`, the buffered updates after it come first. With
    /// `agent`, the live updates are only those of the agent's route (see the module notes).
    pub fn subscribe(
        &self,
        resume_after: Option<u64>,
        agent: Option<&str>,
    ) -> Result<Subscription, ResumeError> {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let last_seq = inner.last_seq;
        // 0: from the start of this run (all that is still buffered).
        let resume_after = resume_after.map(|after| if after == 0 { inner.base } else { after });
        let (backlog, missed) = match resume_after {
            None => (Vec::new(), 0),
            Some(after) if after < inner.base => {
                return Err(ResumeError::EarlierRun {
                    requested: after,
                    first: inner.base + 1,
                });
            }
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
        let live = match agent {
            None => Live {
                rx: self.tx.subscribe(),
                delivered: last_seq,
            },
            Some(agent) => {
                if inner.routes.len() >= inner.sweep_at {
                    inner.routes.retain(|_, r| r.tx.receiver_count() > 0);
                    inner.sweep_at = (inner.routes.len() * 2).max(MIN_SWEEP);
                }
                let route = inner.routes.entry(agent.into()).or_insert_with(|| Route {
                    tx: broadcast::channel(self.limits.queue).0,
                    sent: 0,
                    pending: Vec::new(),
                    window: Window::default(),
                });
                Live {
                    rx: route.tx.subscribe(),
                    delivered: route.sent,
                }
            }
        };
        Ok(Subscription {
            backlog,
            missed,
            last_seq,
            live,
        })
    }
}

/// Adds `update` to the pending updates of the routes of its audience.
fn route(routes: &mut foldhash::HashMap<Box<str>, Route>, update: &Update) {
    let mut to = |agent: &str| {
        if let Some(r) = routes.get_mut(agent) {
            r.pending.push(update.clone());
        }
    };
    match update.kind.audience() {
        Audience::Unfiltered => {}
        Audience::One(a) => to(a),
        Audience::Two(a, b) => {
            to(a);
            to(b);
        }
        Audience::Everyone => {
            for r in routes.values_mut() {
                r.pending.push(update.clone());
            }
        }
    }
}

/// Updates handed to one subscriber: the tails of published batches, shared with every other
/// subscriber (no per-update copy or reference count per subscriber).
#[derive(Debug, Default)]
pub struct Updates {
    /// Each batch with the range of its updates handed out here (from its first update not
    /// delivered before).
    parts: Vec<(Batch, std::ops::Range<usize>)>,
    len: usize,
}

fn tail(part: &(Batch, std::ops::Range<usize>)) -> &[Update] {
    part.0.get(part.1.clone()).unwrap_or_default()
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

    /// A backlog handed out `size` updates at a time (each piece shares the updates, it does
    /// not copy them), so a resuming subscriber converts it as it sends rather than up front.
    pub fn pieces(backlog: Vec<Update>, size: usize) -> Vec<Updates> {
        backlog
            .chunks(size.max(1))
            .map(|piece| {
                let mut updates = Updates::default();
                updates.push(Arc::from(piece), 0);
                updates
            })
            .collect()
    }

    fn push(&mut self, batch: Batch, from: usize) {
        let to = batch.len();
        let n = to.saturating_sub(from);
        if n > 0 {
            self.len += n;
            self.parts.push((batch, from..to));
        }
    }

    /// Splits off the updates from position `at` (in sequence order) on; `self` keeps the
    /// ones before it. Shares the batches, as the rest of `Updates` does.
    pub fn split_off(&mut self, at: usize) -> Updates {
        let mut rest = Updates::default();
        // Parts before `i` stay whole; part `i`, if any, holds or starts at position `at`.
        let (mut i, mut seen) = (0, 0);
        while let Some((_, range)) = self.parts.get(i) {
            if seen + range.len() > at {
                break;
            }
            seen += range.len();
            i += 1;
        }
        if let Some((batch, range)) = self.parts.get_mut(i) {
            let cut = range.start + (at - seen);
            if cut > range.start {
                rest.parts.push((batch.clone(), cut..range.end));
                range.end = cut;
                i += 1;
            }
        }
        rest.parts.extend(self.parts.drain(i..));
        rest.len = rest.parts.iter().map(|(_, r)| r.len()).sum();
        self.len -= rest.len;
        rest
    }
}

impl<'a> IntoIterator for &'a Updates {
    type Item = &'a Update;
    type IntoIter = std::iter::FlatMap<
        std::slice::Iter<'a, (Batch, std::ops::Range<usize>)>,
        &'a [Update],
        fn(&'a (Batch, std::ops::Range<usize>)) -> &'a [Update],
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
    /// `missed` updates of the channel were dropped; the stream goes on after them
    /// (`last_missed` is the sequence number just before the next update).
    Lagged {
        missed: u64,
        last_missed: u64,
    },
    Closed,
}

/// Follows a subscription, converting broadcast lag into a count of missed updates.
pub struct Follower {
    rx: broadcast::Receiver<Chunk>,
    /// Channel number of the last update handed out (or from before the subscription).
    delivered: u64,
    /// A chunk received after a gap, delivered after the lag notice.
    stash: Option<Held>,
    /// Most updates handed out per call, so one push stays a reasonable size.
    max_items: usize,
}

impl Follower {
    /// Follows `live` from the subscription on (its backlog is the caller's).
    pub fn new(live: Live, max_items: usize) -> Self {
        Self {
            rx: live.rx,
            delivered: live.delivered,
            stash: None,
            max_items: max_items.max(1),
        }
    }

    /// Appends `chunk` to `out`, unless updates are missing before it: then it is kept for
    /// the next call and the gap is reported.
    fn handle(&mut self, chunk: Held, out: &mut Updates) -> Option<Next> {
        let head = chunk.updates.first()?.seq;
        let first = chunk.first;
        if first > self.delivered + 1 {
            if !out.is_empty() {
                self.stash = Some(chunk);
                return Some(Next::Updates(std::mem::take(out)));
            }
            let missed = first - self.delivered - 1;
            svc_kit::metrics::counter!("consumer_stream_lagged_updates_total").increment(missed);
            self.delivered = first - 1;
            self.stash = Some(chunk);
            return Some(Next::Lagged {
                missed,
                last_missed: head - 1,
            });
        }
        // Numbers within a chunk are consecutive: skip those already delivered.
        let from = usize::try_from(self.delivered + 1 - first).unwrap_or(usize::MAX);
        let last = first + chunk.updates.len() as u64 - 1;
        if last > self.delivered {
            self.delivered = last;
            out.push(chunk.updates, from);
        }
        None
    }

    /// Waits for the next updates and then drains whatever else is queued, without waiting.
    pub async fn next(&mut self) -> Next {
        let mut out = Updates::default();
        if let Some(chunk) = self.stash.take()
            && let Some(next) = self.handle(chunk, &mut out)
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
                Ok(chunk) => {
                    // Gone: let go for bytes while this subscriber was behind. The next chunk
                    // still held shows the gap (the newest one sent always is).
                    let Some(updates) = chunk.updates.upgrade() else {
                        continue;
                    };
                    let held = Held {
                        updates,
                        first: chunk.first,
                    };
                    if let Some(next) = self.handle(held, &mut out) {
                        return next;
                    }
                }
                // The next chunk received shows the gap; handle() reports it.
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
    use crate::events::{self, EventKind};
    use futures::FutureExt;

    fn status(n: u64) -> UpdateKind {
        UpdateKind::Status(Arc::new(pb::ConsumerStatus {
            events_processed: n,
            ..Default::default()
        }))
    }

    fn event(kind: EventKind, json: &str) -> UpdateKind {
        UpdateKind::Event(events::parse(kind, json.as_bytes(), 0).expect("valid event"))
    }

    fn action(agent: &str) -> UpdateKind {
        event(
            EventKind::AgentAction,
            &format!(r#"{{"agent_name":"{agent}","action_type":"tool_call"}}"#),
        )
    }

    fn decision(agent: &str) -> UpdateKind {
        event(
            EventKind::RoutingDecision,
            &format!(r#"{{"selected_agent":"{agent}"}}"#),
        )
    }

    fn transformation(from: &str, to: &str) -> UpdateKind {
        event(
            EventKind::Transformation,
            &format!(r#"{{"source_agent":"{from}","target_agent":"{to}"}}"#),
        )
    }

    fn performance() -> UpdateKind {
        event(
            EventKind::PerformanceMetric,
            r#"{"routing_duration_ms":1,"cache_hit":false,"trigger_match_strategy":"exact"}"#,
        )
    }

    fn metrics(agent: &str) -> UpdateKind {
        UpdateKind::AgentMetrics(Arc::new(pb::AgentMetrics {
            agent: agent.into(),
            ..Default::default()
        }))
    }

    fn seqs(next: Next) -> Vec<u64> {
        match next {
            Next::Updates(u) => u.iter().map(|u| u.seq).collect(),
            other => panic!("expected updates, got {other:?}"),
        }
    }

    /// The follower has nothing to hand out (it would wait).
    fn idle(f: &mut Follower) -> bool {
        f.next().now_or_never().is_none()
    }

    #[tokio::test]
    async fn delivers_in_order_and_drains_queued_batches() {
        let hub = Hub::new(100, 16);
        let sub = hub.subscribe(None, None).unwrap();
        let mut f = Follower::new(sub.live, 1000);
        hub.publish([status(1), status(2)]);
        hub.publish([status(3)]);
        assert_eq!(seqs(f.next().await), vec![1, 2, 3]);
        hub.publish([status(4)]);
        assert_eq!(seqs(f.next().await), vec![4]);
    }

    #[tokio::test]
    async fn updates_split_anywhere_keep_their_order() {
        let hub = Hub::new(100, 16);
        let sub = hub.subscribe(None, None).unwrap();
        let mut f = Follower::new(sub.live, 1000);
        hub.publish([status(1), status(2), status(3)]);
        hub.publish([status(4)]);
        hub.publish([status(5), status(6)]);
        let Next::Updates(all) = f.next().await else {
            panic!("expected updates")
        };
        let seqs_of = |u: &Updates| u.iter().map(|u| u.seq).collect::<Vec<_>>();
        for at in 0..=7 {
            let mut head = Updates::default();
            for part in &all.parts {
                head.parts.push(part.clone());
            }
            head.len = all.len();
            let rest = head.split_off(at);
            let cut = at.min(6);
            assert_eq!(
                seqs_of(&head),
                (1..=cut as u64).collect::<Vec<_>>(),
                "at {at}"
            );
            assert_eq!(
                seqs_of(&rest),
                ((cut as u64 + 1)..=6).collect::<Vec<_>>(),
                "at {at}"
            );
            assert_eq!((head.len(), rest.len()), (cut, 6 - cut), "at {at}");
        }
    }

    /// A resumed backlog is handed to the stream in pieces of `size`, in order, sharing the
    /// ring's updates.
    #[test]
    fn a_resumed_backlog_goes_out_in_pieces_in_order() {
        let hub = Hub::new(100, 16);
        for i in 1..=5 {
            hub.publish([status(i)]);
        }
        let sub = hub.subscribe(Some(0), None).unwrap();
        let pieces = Updates::pieces(sub.backlog, 2);
        let got: Vec<Vec<u64>> = pieces
            .iter()
            .map(|p| p.iter().map(|u| u.seq).collect())
            .collect();
        assert_eq!(got, [vec![1, 2], vec![3, 4], vec![5]]);
        assert_eq!(
            pieces.iter().map(Updates::len).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        assert!(Updates::pieces(Vec::new(), 2).is_empty());
    }

    /// `max_items` (`--max-push`) bounds what one call takes from a backlog: it stops before
    /// the next batch once it has that many updates, and the rest follows in later calls.
    #[tokio::test]
    async fn a_backlog_is_handed_out_in_pieces_of_at_most_max_items_plus_a_batch() {
        let hub = Hub::new(100, 16);
        let sub = hub.subscribe(None, None).unwrap();
        let mut f = Follower::new(sub.live, 3);
        hub.publish([status(1), status(2)]);
        hub.publish([status(3), status(4)]);
        hub.publish([status(5)]);
        hub.publish([status(6)]);
        assert_eq!(seqs(f.next().await), vec![1, 2, 3, 4]);
        assert_eq!(seqs(f.next().await), vec![5, 6]);
        let mut one = Follower::new(hub.subscribe(None, None).unwrap().live, 1);
        hub.publish([status(7), status(8)]);
        hub.publish([status(9)]);
        assert_eq!(seqs(one.next().await), vec![7, 8]);
        assert_eq!(seqs(one.next().await), vec![9]);
    }

    #[tokio::test]
    async fn a_slow_subscriber_gets_a_lag_notice_and_never_blocks_the_publisher() {
        let hub = Hub::new(100, 4);
        let sub = hub.subscribe(None, None).unwrap();
        let mut f = Follower::new(sub.live, 1000);
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

    /// A large publish goes out in batches of at most `MAX_BATCH`, so a stalled subscriber's
    /// queue holds at most `queue * MAX_BATCH` updates (shared or routed).
    #[tokio::test]
    async fn a_queue_holds_a_bounded_number_of_updates_however_large_the_publish() {
        let hub = Hub::new(0, 2);
        let mut all = Follower::new(hub.subscribe(None, None).unwrap().live, 10_000);
        let mut a = Follower::new(hub.subscribe(None, Some("a")).unwrap().live, 10_000);
        let n = 5 * MAX_BATCH as u64;
        let last = hub.publish((0..n).map(|_| action("a")));
        assert_eq!(last, n);
        let kept = 2 * MAX_BATCH as u64;
        for f in [&mut all, &mut a] {
            match f.next().await {
                Next::Lagged {
                    missed,
                    last_missed,
                } => {
                    assert_eq!(missed, n - kept);
                    assert_eq!(last_missed, n - kept);
                }
                other => panic!("expected a lag notice, got {other:?}"),
            }
            assert_eq!(seqs(f.next().await), (n - kept + 1..=n).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn resume_replays_buffered_updates_or_reports_the_gap() {
        let hub = Hub::new(5, 16);
        for i in 0..8 {
            hub.publish([status(i)]);
        }
        // Ring holds 4..=8.
        let sub = hub.subscribe(Some(5), None).unwrap();
        assert_eq!(sub.missed, 0);
        assert_eq!(
            sub.backlog.iter().map(|u| u.seq).collect::<Vec<_>>(),
            vec![6, 7, 8]
        );
        let sub = hub.subscribe(Some(1), None).unwrap();
        assert_eq!(sub.missed, 2, "2 and 3 are gone");
        assert_eq!(sub.backlog.first().map(|u| u.seq), Some(4));
        let sub = hub.subscribe(Some(8), None).unwrap();
        assert!(sub.backlog.is_empty());
        assert_eq!(sub.missed, 0);
        assert!(matches!(
            hub.subscribe(Some(9), None),
            Err(ResumeError::FromTheFuture { .. })
        ));
        assert!(matches!(
            hub.subscribe(Some(9), Some("a")),
            Err(ResumeError::FromTheFuture { .. })
        ));
        // Live updates continue right after the backlog.
        let mut f = Follower::new(sub.live, 100);
        hub.publish([status(9)]);
        assert_eq!(seqs(f.next().await), vec![9]);
    }

    #[test]
    fn the_audience_of_each_kind_of_update() {
        assert_eq!(action("a").audience(), Audience::One("a"));
        assert_eq!(decision("b").audience(), Audience::One("b"));
        assert_eq!(transformation("a", "b").audience(), Audience::Two("a", "b"));
        assert_eq!(transformation("a", "a").audience(), Audience::One("a"));
        assert_eq!(metrics("c").audience(), Audience::One("c"));
        assert_eq!(performance().audience(), Audience::Unfiltered);
        assert_eq!(status(1).audience(), Audience::Everyone);
        assert!(Audience::Two("a", "b").includes("b"));
        assert!(!Audience::One("a").includes("b"));
        assert!(!Audience::Unfiltered.includes("a"));
        assert!(Audience::Everyone.includes("a"));
    }

    #[tokio::test]
    async fn an_agent_subscriber_gets_only_its_agents_updates_and_is_not_woken_for_others() {
        let hub = Hub::new(100, 16);
        let mut all = Follower::new(hub.subscribe(None, None).unwrap().live, 1000);
        let mut a = Follower::new(hub.subscribe(None, Some("a")).unwrap().live, 1000);
        let mut b = Follower::new(hub.subscribe(None, Some("b")).unwrap().live, 1000);
        assert_eq!(hub.subscribers(), 3);
        assert_eq!(hub.routes(), 2);

        // 1..=4: nothing for "a".
        hub.publish([action("b"), decision("c"), performance(), metrics("b")]);
        assert!(
            idle(&mut a),
            "a batch without agent a does not wake its subscriber"
        );
        assert_eq!(seqs(b.next().await), vec![1, 4]);
        // 5..=11
        hub.publish([
            action("a"),
            action("b"),
            transformation("b", "a"),
            decision("a"),
            metrics("a"),
            status(1),
            performance(),
        ]);
        assert_eq!(seqs(a.next().await), vec![5, 7, 8, 9, 10]);
        assert_eq!(seqs(b.next().await), vec![6, 7, 10]);
        assert_eq!(seqs(all.next().await), (1..=11).collect::<Vec<_>>());
        assert!(idle(&mut a) && idle(&mut b) && idle(&mut all));
    }

    #[tokio::test]
    async fn a_slow_agent_subscriber_is_told_how_many_of_its_updates_it_missed() {
        let hub = Hub::new(100, 4);
        let mut slow = Follower::new(hub.subscribe(None, Some("a")).unwrap().live, 1000);
        let mut fast = Follower::new(hub.subscribe(None, Some("a")).unwrap().live, 1000);
        let mut seen = Vec::new();
        for _ in 0..10 {
            // Never waits. Sequences: "a" gets 1, 3, 5, ... (two updates of "a" per batch,
            // with an update of "b" between them).
            hub.publish([action("a"), action("b"), action("a")]);
            seen.extend(seqs(fast.next().await));
        }
        assert_eq!(
            seen,
            (0..10)
                .flat_map(|i| [3 * i + 1, 3 * i + 3])
                .collect::<Vec<_>>()
        );
        // 10 batches of 2 for "a", 4 still queued: 6 batches = 12 of its updates missed.
        match slow.next().await {
            Next::Lagged {
                missed,
                last_missed,
            } => {
                assert_eq!(missed, 12);
                assert_eq!(
                    last_missed, 18,
                    "the next update is the 7th batch's first, 19"
                );
            }
            other => panic!("expected a lag notice, got {other:?}"),
        }
        assert_eq!(
            seqs(slow.next().await),
            vec![19, 21, 22, 24, 25, 27, 28, 30]
        );
    }

    #[tokio::test]
    async fn an_agent_subscription_resumes_from_the_ring_and_continues_live() {
        let hub = Hub::new(100, 16);
        hub.publish([action("a"), action("b")]);
        let sub = hub.subscribe(Some(0), Some("a")).unwrap();
        // The backlog is not filtered (the stream filters it); live updates are routed.
        assert_eq!(
            sub.backlog.iter().map(|u| u.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(sub.last_seq, 2);
        let mut f = Follower::new(sub.live, 100);
        hub.publish([action("b"), action("a")]);
        assert_eq!(seqs(f.next().await), vec![4]);
    }

    /// Sequences of a run numbered after its start time: resuming from an earlier run (a
    /// smaller number) is refused, 0 still means this run's start, and the rest is unchanged.
    #[test]
    fn resume_points_from_an_earlier_run_are_refused() {
        let base = 1_764_594_000_000_000;
        let hub = Hub::numbered_after(100, 16, base);
        hub.publish([action("a"), action("b")]);
        assert_eq!(hub.last_seq(), base + 2);
        assert!(matches!(
            hub.subscribe(Some(5000), None),
            Err(ResumeError::EarlierRun { requested: 5000, first }) if first == base + 1
        ));
        let all = hub.subscribe(Some(0), None).unwrap();
        assert_eq!(
            all.backlog.iter().map(|u| u.seq).collect::<Vec<_>>(),
            vec![base + 1, base + 2]
        );
        assert_eq!(all.missed, 0);
        let rest = hub.subscribe(Some(base + 1), None).unwrap();
        assert_eq!(rest.backlog.len(), 1);
        assert!(matches!(
            hub.subscribe(Some(base + 3), None),
            Err(ResumeError::FromTheFuture { .. })
        ));
    }

    #[tokio::test]
    async fn routes_go_when_nobody_follows_them() {
        let hub = Hub::new(10, 4);
        let kept = hub.subscribe(None, Some("kept")).unwrap();
        for i in 0..1000 {
            drop(hub.subscribe(None, Some(&format!("agent-{i}"))).unwrap());
            assert!(hub.routes() <= 2 * MIN_SWEEP, "{} routes", hub.routes());
        }
        assert_eq!(hub.subscribers(), 1);
        // A publish drops the routes it finds unfollowed; the followed one stays and works.
        let gone = hub.subscribe(None, Some("gone")).unwrap();
        drop(gone);
        hub.publish([action("gone"), action("kept")]);
        let mut f = Follower::new(kept.live, 100);
        assert_eq!(seqs(f.next().await), vec![2]);
        let routes = hub.inner.lock().routes.keys().cloned().collect::<Vec<_>>();
        assert!(!routes.iter().any(|r| &**r == "gone"), "{routes:?}");
        assert!(routes.iter().any(|r| &**r == "kept"));
    }

    /// An action of agent `agent` with `size` bytes of details.
    fn big_action(agent: &str, size: usize) -> UpdateKind {
        event(
            EventKind::AgentAction,
            &format!(
                r#"{{"agent_name":"{agent}","action_type":"tool_call","action_details":{{"blob":"{}"}}}}"#,
                "x".repeat(size)
            ),
        )
    }

    /// The bytes an update of `kind` counts.
    fn bytes_of(kind: &UpdateKind) -> usize {
        Update::new(0, kind.clone()).bytes
    }

    fn lagged(next: Next) -> (u64, u64) {
        match next {
            Next::Lagged {
                missed,
                last_missed,
            } => (missed, last_missed),
            other => panic!("expected a lag notice, got {other:?}"),
        }
    }

    #[test]
    fn an_update_counts_what_it_pins_once() {
        let kind = big_action("a", 10_000);
        let UpdateKind::Event(e) = &kind else {
            unreachable!()
        };
        let u = Update::new(1, kind.clone());
        assert_eq!(u.bytes, size_of::<Update>() + e.heap_size());
        assert!(
            u.bytes > 2 * 10_000,
            "an action counts its encoding too: {}",
            u.bytes
        );
        // Clones carry it.
        assert_eq!(u.clone().bytes, u.bytes);
        assert!(bytes_of(&status(1)) > size_of::<pb::ConsumerStatus>());
        assert!(bytes_of(&metrics("agent")) > size_of::<pb::AgentMetrics>());
    }

    /// The ring lets go of its oldest updates past its byte budget, as past its count; a
    /// resume point before what it holds gets the gap, the newest update always stays.
    #[test]
    fn resume_across_updates_let_go_for_bytes_reports_the_gap() {
        let one = bytes_of(&big_action("a", 1000));
        let hub = Hub::with_limits(
            Limits {
                ring: 100,
                ring_bytes: 3 * one + one / 2,
                ..Limits::counts(100, 16)
            },
            0,
        );
        for _ in 0..8 {
            hub.publish([big_action("a", 1000)]);
        }
        assert_eq!(
            hub.ring_usage(),
            BufferUsage {
                items: 3,
                bytes: 3 * one,
                evicted_for_bytes: 5
            }
        );
        let sub = hub.subscribe(Some(5), None).unwrap();
        assert_eq!(sub.missed, 0);
        assert_eq!(
            sub.backlog.iter().map(|u| u.seq).collect::<Vec<_>>(),
            [6, 7, 8]
        );
        let sub = hub.subscribe(Some(2), Some("a")).unwrap();
        assert_eq!(sub.missed, 3, "3, 4 and 5 are gone");
        assert_eq!(sub.backlog.first().map(|u| u.seq), Some(6));
        // One update over the budget alone: it stays, alone.
        let last = hub.publish([big_action("a", 10_000)]);
        assert_eq!(hub.ring_usage().items, 1);
        let sub = hub.subscribe(Some(last - 1), None).unwrap();
        assert_eq!((sub.missed, sub.backlog.len()), (0, 1));
        let sub = hub.subscribe(Some(last - 3), None).unwrap();
        assert_eq!((sub.missed, sub.backlog.len()), (2, 1));
        // Under the byte budget, the count binds, as before.
        let hub = Hub::with_limits(
            Limits {
                ring: 5,
                ring_bytes: 100 * one,
                ..Limits::counts(5, 16)
            },
            0,
        );
        for _ in 0..20 {
            hub.publish([big_action("a", 1000)]);
        }
        assert_eq!(
            hub.ring_usage(),
            BufferUsage {
                items: 5,
                bytes: 5 * one,
                evicted_for_bytes: 0
            }
        );
        assert_eq!(hub.subscribe(Some(10), None).unwrap().missed, 5);
    }

    /// A stalled subscriber's queue keeps at most `queue_bytes` of updates alive: past that
    /// the oldest are let go (their events freed at once) and it gets the lag notice, then the
    /// rest in order; a subscriber that keeps up loses nothing, and the publisher never waits.
    #[tokio::test]
    async fn a_subscriber_behind_by_more_than_the_queue_bytes_gets_a_lag_notice() {
        let one = bytes_of(&big_action("a", 1000));
        let hub = Hub::with_limits(
            Limits {
                ring: 0,
                ring_bytes: usize::MAX,
                queue: 1024,
                queue_bytes: 4 * one + one / 2,
            },
            0,
        );
        let mut slow = Follower::new(hub.subscribe(None, None).unwrap().live, 1000);
        let mut fast = Follower::new(hub.subscribe(None, None).unwrap().live, 1000);
        let mut slow_a = Follower::new(hub.subscribe(None, Some("a")).unwrap().live, 1000);
        let mut fast_a = Follower::new(hub.subscribe(None, Some("a")).unwrap().live, 1000);
        let mut first = None;
        let (mut seen, mut seen_a) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            // "a" gets every other update: 1, 3, 5, ...
            let kinds = [big_action("a", 1000), big_action("b", 1000)];
            if first.is_none()
                && let UpdateKind::Event(Event::AgentAction(a)) = &kinds[0]
            {
                first = Some(a.clone());
            }
            hub.publish(kinds);
            seen.extend(seqs(fast.next().await));
            seen_a.extend(seqs(fast_a.next().await));
        }
        assert_eq!(seen, (1..=20).collect::<Vec<_>>());
        assert_eq!(seen_a, (1..=20).step_by(2).collect::<Vec<_>>());
        // Nobody holds the first event any more but this test: the stalled subscribers do
        // not keep it alive.
        let first = first.expect("published");
        assert_eq!(Arc::strong_count(&first), 1);

        // Unfiltered: 20 updates in batches of one (a batch is at most a quarter of the
        // budget), 4 kept.
        assert_eq!(lagged(slow.next().await), (16, 16));
        assert_eq!(seqs(slow.next().await), [17, 18, 19, 20]);
        // Agent "a": its 10 updates, 4 kept (its queue counts only its own bytes).
        assert_eq!(lagged(slow_a.next().await), (6, 12));
        assert_eq!(seqs(slow_a.next().await), [13, 15, 17, 19]);
        assert!(idle(&mut slow) && idle(&mut fast) && idle(&mut slow_a) && idle(&mut fast_a));
        // Caught up, the queues keep nothing alive after the next publish.
        hub.publish([status(1)]);
        for f in [&mut slow, &mut fast, &mut slow_a, &mut fast_a] {
            assert_eq!(seqs(f.next().await), [21]);
        }
        hub.publish([status(2)]);
        let inner = hub.inner.lock();
        assert_eq!(inner.window.batches.len(), 1, "only the batch just sent");
        assert!(inner.routes.values().all(|r| r.window.batches.len() <= 1));
    }

    /// A publish is sent in batches of at most a quarter of the queue's bytes (one update
    /// over that goes alone), in order.
    #[tokio::test]
    async fn a_publish_is_split_into_batches_by_bytes() {
        let one = bytes_of(&big_action("a", 1000));
        let hub = Hub::with_limits(
            Limits {
                queue_bytes: 10 * one + 3,
                ..Limits::counts(0, 1024)
            },
            0,
        );
        let mut f = Follower::new(hub.subscribe(None, None).unwrap().live, 1);
        // 2.5 `one` a batch: 1 and 2, the large 3 alone, 4 and 5, 6 and 7 (9.5 `one` in all,
        // within the queue's bytes).
        let mut kinds: Vec<UpdateKind> = (0..6).map(|_| big_action("a", 1000)).collect();
        kinds.insert(2, big_action("a", 4000));
        hub.publish(kinds);
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(seqs(f.next().await));
        }
        assert_eq!(got, [vec![1, 2], vec![3], vec![4, 5], vec![6, 7]]);
        assert!(idle(&mut f));
        // Without a byte budget, batches of at most MAX_CHUNK_BYTES.
        let pieces = batches(
            (0..4)
                .map(|i| Update::new(i, big_action("a", MAX_CHUNK_BYTES / 5)))
                .collect(),
            MAX_CHUNK_BYTES,
        );
        assert_eq!(pieces.iter().map(|p| p.0.len()).collect::<Vec<_>>(), [2, 2]);
        assert!(pieces.iter().all(|p| p.1 <= MAX_CHUNK_BYTES));
    }
}
