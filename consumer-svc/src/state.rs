//! The aggregated view (pure, no I/O): per-agent metrics in time buckets, newest-first bounded
//! buffers, performance statistics, and retention pruning by event time.
//!
//! Two design choices make a restarted replica equal to one that never stopped:
//! - Sums are kept in fixed point (integers), so they do not depend on the order events
//!   arrive in (partitions interleave differently on replay).
//! - Buffers are ordered by (event time, id), not arrival, and hold the N newest events (or
//!   fewer, the newest that fit the buffer's byte budget).
//!
//! Metrics live in sparse time buckets: per minute for the last hour (so `1h`-style windows
//! are exact to the minute) and per hour before that (so 10,000 agents active all day stay
//! small: at most ~61 minute + 25 hour buckets each). Minute buckets are merged into hour
//! buckets as they age; sums are integers, so merging changes no result. The retention cutoff
//! is aligned down to the hour and applied identically to buckets, buffers and to events
//! arriving late, so "expired" means the same thing everywhere (events are kept for the
//! retention plus less than an hour).

use std::collections::VecDeque;
use std::sync::Arc;

use crate::events::{
    AgentAction, Event, HeapSize, Micros, PerformanceMetric, RoutingDecision, Transformation,
};

/// Fixed-point scale of sums of milliseconds and confidences.
const SCALE: f64 = 1e6;
const MINUTE: Micros = 60_000_000;
const HOUR: Micros = 60 * MINUTE;

fn align(t: Micros, unit: Micros) -> Micros {
    t.div_euclid(unit) * unit
}

/// Start of the minute-resolution region at `now`: the last full hour and the current minute.
fn fine_start(now: Micros) -> Micros {
    align(now, MINUTE) - HOUR
}

/// `x` in fixed point. Only bounded, non-negative values are averaged
/// ([`plausible_confidence`], [`duration_ms`]): a confidence is at most 1e6 here, a duration at
/// most 8.64e13 (a day), which is why durations are summed in more than 64 bits ([`Sum96`]).
fn fixed(x: f64) -> u64 {
    (x * SCALE).round() as u64
}

/// The mean of `n` fixed-point values summing to `sum`. Divided as integers first: the
/// quotient (at most a day in fixed point) converts to an f64 exactly, so the mean is as
/// precise as an f64 however large the sum (n days average to exactly a day).
fn mean(sum: u128, n: u64) -> Option<f64> {
    let n = u128::from(n);
    (n > 0).then(|| ((sum / n) as f64 + (sum % n) as f64 / n as f64) / SCALE)
}

/// A bucket's sum of fixed-point durations. An i64 held only ~106,752 durations of a day (an
/// accepted value) and then saturated; 96 bits hold 2^32 of them (what a bucket counts) 200,000
/// times over, so the saturation left is only a last guard. Three u32 rather than a u128: 4-byte
/// aligned, 12 bytes, so it grows [`AgentBucket`] by 8 bytes and [`PerfBucket`] not at all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sum96([u32; 3]);

impl Sum96 {
    const MAX: u128 = (1 << 96) - 1;

    fn get(self) -> u128 {
        let [lo, mid, hi] = self.0.map(u128::from);
        lo | mid << 32 | hi << 64
    }

    fn add(&mut self, x: u128) {
        let s = self.get().saturating_add(x).min(Self::MAX);
        self.0 = [s as u32, (s >> 32) as u32, (s >> 64) as u32];
    }
}

/// The longest duration an average takes in: a day. A longer one (or a negative one) is a
/// producer's bug, and a single `1e300` would otherwise pin its sums for the whole window
/// (and make them depend on the order events arrive in).
const MAX_DURATION_MS: f64 = 86_400_000.0;

/// A confidence the averages take in: a probability (a `95` meant as a percentage, or NaN,
/// stays in the event as sent, but out of the average).
pub(crate) fn plausible_confidence(c: Option<f64>) -> Option<f64> {
    c.filter(|c| (0.0..=1.0).contains(c))
}

/// A duration the averages take in (see [`MAX_DURATION_MS`]).
fn duration_ms(ms: Option<f64>) -> Option<f64> {
    ms.filter(|ms| (0.0..=MAX_DURATION_MS).contains(ms))
}

#[derive(Clone, Debug)]
pub struct StateConfig {
    /// How long events are kept, by event time (rounded up to the hour).
    pub retention: Micros,
    pub max_actions: usize,
    pub max_decisions: usize,
    pub max_transformations: usize,
    pub max_performance: usize,
    /// Byte budget of each of the four buffers (see [`HeapSize`] for what an event counts).
    pub max_buffer_bytes: usize,
    /// Agents whose metrics are kept at once (see [`State::agent_events_untracked`]).
    pub max_agents: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            retention: 24 * HOUR,
            max_actions: 1000,
            max_decisions: 1000,
            max_transformations: 100,
            max_performance: 200,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            max_agents: DEFAULT_MAX_AGENTS,
        }
    }
}

/// Default of `--max-buffer-bytes`, per buffer: far above what the count caps hold of events of
/// a few kilobytes (1,000 actions of 2 KB of text are accounted ~4 MB), so it only binds when
/// producers send large events, and the four buffers stay within 256 MiB (plus one event each:
/// the newest stays however large) whatever they send.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 64 << 20;

/// Default of `--max-agents`: an agent costs up to ~5.5 KB (a 56-byte bucket per minute of the
/// last hour and per hour of the window, at the 24 h default, in queues of 64 and 32 slots), so
/// the agents' metrics stay within ~280 MB whatever the producers send.
pub const DEFAULT_MAX_AGENTS: usize = 50_000;

/// Longest agent name whose metrics are kept: a name is a key held as long as the agent has
/// events in the window, so a producer bug writing payloads into it must not fill the memory.
pub const MAX_AGENT_NAME_BYTES: usize = 256;

/// Counters of one agent in one minute or hour (56 bytes: u32 counts, fixed-point sums of
/// durations in 96 bits and of confidences in a u64, which holds 2^32 of them 4,000 times over).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AgentBucket {
    start: Micros,
    requests: u32,
    routing_time_n: u32,
    confidence_n: u32,
    successes: u32,
    errors: u32,
    actions: u32,
    routing_time_sum: Sum96,
    confidence_sum: u64,
}

/// Counters of performance metrics in one minute or hour (32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PerfBucket {
    start: Micros,
    queries: u32,
    cache_hits: u32,
    duration_n: u32,
    duration_sum: Sum96,
}

/// A window's sums of [`AgentBucket`]s: the counts widened to u64, so that 24 busy hours
/// (over 2^32 events of one agent) do not stop at what one bucket can count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct AgentTotals {
    requests: u64,
    routing_time_n: u64,
    confidence_n: u64,
    successes: u64,
    errors: u64,
    actions: u64,
    routing_time_sum: u128,
    confidence_sum: u64,
}

/// A window's sums of [`PerfBucket`]s, widened like [`AgentTotals`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PerfTotals {
    queries: u64,
    cache_hits: u64,
    duration_n: u64,
    duration_sum: u128,
}

/// A bucket's u32 counts saturate at 2^32 - 1: one agent's (or the performance topic's)
/// events in one hour, 1.19 M a second sustained for the hour, beyond what ingest reaches.
trait Bucket: Copy + Default {
    type Total: Default;
    fn start(&self) -> Micros;
    fn starting(start: Micros) -> Self;
    fn merge(&mut self, other: &Self);
    fn add_to(&self, total: &mut Self::Total);
}

impl Bucket for AgentBucket {
    type Total = AgentTotals;
    fn start(&self) -> Micros {
        self.start
    }
    fn starting(start: Micros) -> Self {
        Self {
            start,
            ..Default::default()
        }
    }
    fn merge(&mut self, o: &Self) {
        self.requests = self.requests.saturating_add(o.requests);
        self.routing_time_n = self.routing_time_n.saturating_add(o.routing_time_n);
        self.confidence_n = self.confidence_n.saturating_add(o.confidence_n);
        self.successes = self.successes.saturating_add(o.successes);
        self.errors = self.errors.saturating_add(o.errors);
        self.actions = self.actions.saturating_add(o.actions);
        self.routing_time_sum.add(o.routing_time_sum.get());
        self.confidence_sum = self.confidence_sum.saturating_add(o.confidence_sum);
    }
    fn add_to(&self, t: &mut AgentTotals) {
        t.requests += u64::from(self.requests);
        t.routing_time_n += u64::from(self.routing_time_n);
        t.confidence_n += u64::from(self.confidence_n);
        t.successes += u64::from(self.successes);
        t.errors += u64::from(self.errors);
        t.actions += u64::from(self.actions);
        // A u128 takes 2^32 buckets' 96-bit sums.
        t.routing_time_sum += self.routing_time_sum.get();
        t.confidence_sum = t.confidence_sum.saturating_add(self.confidence_sum);
    }
}

impl Bucket for PerfBucket {
    type Total = PerfTotals;
    fn start(&self) -> Micros {
        self.start
    }
    fn starting(start: Micros) -> Self {
        Self {
            start,
            ..Default::default()
        }
    }
    fn merge(&mut self, o: &Self) {
        self.queries = self.queries.saturating_add(o.queries);
        self.cache_hits = self.cache_hits.saturating_add(o.cache_hits);
        self.duration_n = self.duration_n.saturating_add(o.duration_n);
        self.duration_sum.add(o.duration_sum.get());
    }
    fn add_to(&self, t: &mut PerfTotals) {
        t.queries += u64::from(self.queries);
        t.cache_hits += u64::from(self.cache_hits);
        t.duration_n += u64::from(self.duration_n);
        t.duration_sum += self.duration_sum.get();
    }
}

/// Minute buckets (recent) and hour buckets (older), each sorted by start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Series<B> {
    fine: VecDeque<B>,
    coarse: VecDeque<B>,
}

fn bucket_mut<B: Bucket>(buckets: &mut VecDeque<B>, start: Micros) -> &mut B {
    let pos = match buckets.back() {
        Some(b) if b.start() == start => buckets.len() - 1,
        None => {
            buckets.push_back(B::starting(start));
            0
        }
        Some(b) if b.start() < start => {
            buckets.push_back(B::starting(start));
            buckets.len() - 1
        }
        Some(_) => {
            let pos = buckets.partition_point(|b| b.start() < start);
            if buckets.get(pos).is_none_or(|b| b.start() != start) {
                buckets.insert(pos, B::starting(start));
            }
            pos
        }
    };
    &mut buckets[pos]
}

impl<B: Bucket> Series<B> {
    fn bucket(&mut self, time: Micros, now: Micros) -> &mut B {
        if time >= fine_start(now) {
            bucket_mut(&mut self.fine, align(time, MINUTE))
        } else {
            bucket_mut(&mut self.coarse, align(time, HOUR))
        }
    }

    /// Merges minute buckets that left the last hour into hour buckets and drops buckets
    /// before `cutoff` (hour-aligned); returns whether any was dropped (the window's sums
    /// changed).
    fn maintain(&mut self, now: Micros, cutoff: Micros) -> bool {
        let fine_from = fine_start(now);
        while let Some(b) = self.fine.front().copied().filter(|b| b.start() < fine_from) {
            self.fine.pop_front();
            bucket_mut(&mut self.coarse, align(b.start(), HOUR)).merge(&b);
        }
        let mut dropped = false;
        while self.coarse.front().is_some_and(|b| b.start() < cutoff) {
            self.coarse.pop_front();
            dropped = true;
        }
        while self.fine.front().is_some_and(|b| b.start() < cutoff) {
            self.fine.pop_front();
            dropped = true;
        }
        // Keep the slack of a busy hour from staying allocated forever.
        for q in [&mut self.fine, &mut self.coarse] {
            if q.capacity() > 2 * q.len() + 16 {
                q.shrink_to(q.len() + 8);
            }
        }
        dropped
    }

    /// The sum of the buckets starting at or after `from`, if any.
    fn sum_from(&self, from: Micros) -> Option<B::Total> {
        let mut sum = B::Total::default();
        let mut any = false;
        for q in [&self.coarse, &self.fine] {
            for b in q.iter().rev().take_while(|b| b.start() >= from) {
                b.add_to(&mut sum);
                any = true;
            }
        }
        any.then_some(sum)
    }

    fn is_empty(&self) -> bool {
        self.fine.is_empty() && self.coarse.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Agent {
    series: Series<AgentBucket>,
    last_seen: Micros,
}

/// Metrics of one agent over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentMetrics {
    pub agent: String,
    pub total_requests: u64,
    pub avg_routing_time_ms: Option<f64>,
    pub avg_confidence: Option<f64>,
    pub success_rate: Option<f64>,
    pub successes: u64,
    pub errors: u64,
    pub total_actions: u64,
    pub last_seen: Micros,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PerformanceStats {
    pub total_queries: u64,
    pub cache_hits: u64,
    pub cache_hit_rate: Option<f64>,
    pub avg_routing_duration_ms: Option<f64>,
}

/// What applying one event did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied<'a> {
    /// Aggregated; the agents whose metrics changed.
    Aggregated(Option<&'a str>),
    /// Older than the retention window: ignored.
    Expired,
}

/// A buffer of the newest items by (event time, id), oldest at the front: at most `cap` of
/// them, and at most `max_bytes` of them by [`HeapSize`], except that the newest item is kept
/// even when it alone is larger (so a buffer holds at most `max_bytes` or one item). Either
/// way the oldest go first.
///
/// What it holds does not depend on the order items arrive in: the longest run of the newest
/// items that fits both limits. An item that arrives older than one already let go for bytes
/// is refused (kept, it would leave a hole in that run; `floor` remembers the newest let go).
#[derive(Debug)]
struct Recent<T> {
    items: VecDeque<Arc<T>>,
    cap: usize,
    max_bytes: usize,
    /// The [`HeapSize`] of the items held.
    bytes: usize,
    /// The key of the newest item let go for bytes (its id copied: one id per buffer).
    floor: Option<(Micros, String)>,
    /// Items let go for bytes since start-up (not counting refused ones).
    evicted_for_bytes: u64,
}

/// What a recent buffer holds, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferUsage {
    pub items: usize,
    pub bytes: usize,
    /// Items let go because of the byte budget (not the count) since start-up.
    pub evicted_for_bytes: u64,
}

trait Timed: HeapSize {
    fn key(&self) -> (Micros, &str);
}
impl Timed for AgentAction {
    fn key(&self) -> (Micros, &str) {
        (self.time, self.id())
    }
}
impl Timed for RoutingDecision {
    fn key(&self) -> (Micros, &str) {
        (self.time, self.id())
    }
}
impl Timed for Transformation {
    fn key(&self) -> (Micros, &str) {
        (self.time, self.id())
    }
}
impl Timed for PerformanceMetric {
    fn key(&self) -> (Micros, &str) {
        (self.time, self.id())
    }
}

impl<T: Timed> Recent<T> {
    fn new(cap: usize, max_bytes: usize) -> Self {
        Self {
            items: VecDeque::with_capacity(cap.min(4096) + 1),
            cap,
            max_bytes,
            bytes: 0,
            floor: None,
            evicted_for_bytes: 0,
        }
    }

    /// Keeps `item` if it is among the newest that fit, unless its (time, id) is already held:
    /// a redelivery (a producer's retry) is listed once, the copy that came first.
    fn insert(&mut self, item: &Arc<T>) {
        if self.cap == 0 {
            return;
        }
        let key = item.key();
        if self.items.len() >= self.cap && self.items.front().is_some_and(|f| f.key() >= key) {
            return; // older than everything kept, or the oldest kept again
        }
        if self
            .floor
            .as_ref()
            .is_some_and(|(time, id)| key <= (*time, id.as_str()))
        {
            return; // not newer than an item let go for bytes
        }
        // Usually the newest: append; otherwise find the place by binary search.
        let pos = if self.items.back().is_none_or(|b| b.key() <= key) {
            self.items.len()
        } else {
            self.items.partition_point(|x| x.key() <= key)
        };
        // Sorted: an equal key would be just before the place.
        if pos > 0 && self.items[pos - 1].key() == key {
            return;
        }
        self.items.insert(pos, item.clone());
        self.bytes += item.heap_size();
        if self.items.len() > self.cap {
            self.pop_oldest();
        }
        while self.bytes > self.max_bytes && self.items.len() > 1 {
            let Some(oldest) = self.pop_oldest() else {
                break;
            };
            self.evicted_for_bytes += 1;
            let (time, id) = oldest.key();
            // The allocation is reused: no allocation per eviction once it fits the ids.
            let floor = self.floor.get_or_insert_with(|| (time, String::new()));
            floor.0 = time;
            floor.1.clear();
            floor.1.push_str(id);
        }
    }

    fn prune(&mut self, cutoff: Micros) {
        while self.items.front().is_some_and(|f| f.key().0 < cutoff) {
            self.pop_oldest();
        }
    }

    /// Removes the oldest item, and its bytes from the total.
    fn pop_oldest(&mut self) -> Option<Arc<T>> {
        let oldest = self.items.pop_front()?;
        self.bytes -= oldest.heap_size();
        Some(oldest)
    }

    /// Newest first.
    fn newest(&self) -> impl Iterator<Item = &Arc<T>> {
        self.items.iter().rev()
    }

    fn usage(&self) -> BufferUsage {
        BufferUsage {
            items: self.items.len(),
            bytes: self.bytes,
            evicted_for_bytes: self.evicted_for_bytes,
        }
    }
}

/// The whole in-memory view.
#[derive(Debug)]
pub struct State {
    cfg: StateConfig,
    agents: foldhash::HashMap<String, Agent>,
    actions: Recent<AgentAction>,
    decisions: Recent<RoutingDecision>,
    transformations: Recent<Transformation>,
    performance: Recent<PerformanceMetric>,
    perf: Series<PerfBucket>,
    /// Aligned cutoff of the last prune: nothing older is kept or accepted.
    cutoff: Micros,
    /// Events whose agent's metrics were not kept (see [`State::agent_events_untracked`]).
    untracked: u64,
}

impl State {
    pub fn new(cfg: StateConfig) -> Self {
        Self {
            actions: Recent::new(cfg.max_actions, cfg.max_buffer_bytes),
            decisions: Recent::new(cfg.max_decisions, cfg.max_buffer_bytes),
            transformations: Recent::new(cfg.max_transformations, cfg.max_buffer_bytes),
            performance: Recent::new(cfg.max_performance, cfg.max_buffer_bytes),
            agents: foldhash::HashMap::default(),
            perf: Series::default(),
            cutoff: Micros::MIN,
            untracked: 0,
            cfg,
        }
    }

    /// Routing decisions and actions, since start-up, whose agent's metrics were not kept: a
    /// new agent while `max_agents` others have events in the window, or a name longer than
    /// [`MAX_AGENT_NAME_BYTES`]. The events themselves are still counted and kept in the
    /// recent buffers; only the per-agent metrics miss them. A slot frees when an agent's
    /// last event leaves the window.
    pub fn agent_events_untracked(&self) -> u64 {
        self.untracked
    }

    pub fn config(&self) -> &StateConfig {
        &self.cfg
    }

    /// The retention cutoff at `now` (hour-aligned): events older than this are expired.
    pub fn cutoff_at(&self, now: Micros) -> Micros {
        align(now.saturating_sub(self.cfg.retention), HOUR)
    }

    /// Whether an event at `time` would be expired at `now`.
    pub fn is_expired(&self, time: Micros, now: Micros) -> bool {
        time < self.cutoff.max(self.cutoff_at(now))
    }

    /// The bucket of `agent` for `time`; `None` (counted) when the agent is not tracked.
    fn agent_bucket(&mut self, agent: &str, time: Micros, now: Micros) -> Option<&mut AgentBucket> {
        // Look up first: no allocation for a known agent.
        if !self.agents.contains_key(agent) {
            if agent.len() > MAX_AGENT_NAME_BYTES || self.agents.len() >= self.cfg.max_agents {
                self.untracked += 1;
                return None;
            }
            self.agents.insert(agent.to_owned(), Agent::default());
        }
        let a = self.agents.get_mut(agent).expect("inserted above");
        a.last_seen = a.last_seen.max(time);
        Some(a.series.bucket(time, now))
    }

    /// Aggregates one event, unless it is older than the retention window at `now`.
    pub fn apply<'e>(&mut self, event: &'e Event, now: Micros) -> Applied<'e> {
        if self.is_expired(event.time(), now) {
            return Applied::Expired;
        }
        match event {
            Event::RoutingDecision(d) => {
                let bucket = self.agent_bucket(d.selected_agent(), d.time, now);
                let tracked = bucket.is_some();
                if let Some(b) = bucket {
                    b.requests = b.requests.saturating_add(1);
                    if let Some(ms) = duration_ms(d.routing_time_ms) {
                        b.routing_time_sum.add(fixed(ms).into());
                        b.routing_time_n = b.routing_time_n.saturating_add(1);
                    }
                    if let Some(c) = plausible_confidence(d.confidence_score) {
                        b.confidence_sum = b.confidence_sum.saturating_add(fixed(c));
                        b.confidence_n = b.confidence_n.saturating_add(1);
                    }
                }
                self.decisions.insert(d);
                Applied::Aggregated(tracked.then(|| d.selected_agent()))
            }
            Event::AgentAction(a) => {
                let bucket = self.agent_bucket(a.agent_name(), a.time, now);
                let tracked = bucket.is_some();
                if let Some(b) = bucket {
                    b.actions = b.actions.saturating_add(1);
                    match a.action_type() {
                        "success" => b.successes = b.successes.saturating_add(1),
                        "error" => b.errors = b.errors.saturating_add(1),
                        _ => {}
                    }
                }
                self.actions.insert(a);
                Applied::Aggregated(tracked.then(|| a.agent_name()))
            }
            Event::Transformation(t) => {
                self.transformations.insert(t);
                Applied::Aggregated(None)
            }
            Event::PerformanceMetric(m) => {
                let b = self.perf.bucket(m.time, now);
                b.queries = b.queries.saturating_add(1);
                if m.cache_hit {
                    b.cache_hits = b.cache_hits.saturating_add(1);
                }
                if let Some(ms) = duration_ms(m.routing_duration_ms) {
                    b.duration_sum.add(fixed(ms).into());
                    b.duration_n = b.duration_n.saturating_add(1);
                }
                self.performance.insert(m);
                Applied::Aggregated(None)
            }
        }
    }

    /// Drops everything older than the retention window at `now`; agents left without events
    /// are removed. Returns the agents whose metrics changed (events expired), removed ones
    /// included, so that metric streams can be told.
    pub fn prune(&mut self, now: Micros) -> Vec<String> {
        let cutoff = self.cutoff_at(now).max(self.cutoff);
        let mut changed = Vec::new();
        self.agents.retain(|name, a| {
            if a.series.maintain(now, cutoff) {
                changed.push(name.to_string());
            }
            !a.series.is_empty()
        });
        self.perf.maintain(now, cutoff);
        if cutoff > self.cutoff {
            self.cutoff = cutoff;
            self.actions.prune(cutoff);
            self.decisions.prune(cutoff);
            self.transformations.prune(cutoff);
            self.performance.prune(cutoff);
        }
        changed
    }

    /// Start of the window `window` long ending at `now`: aligned to the minute within the
    /// last hour, to the hour before; never before the retention cutoff.
    fn window_start(&self, now: Micros, window: Option<Micros>) -> Micros {
        let retention_start = self.cutoff.max(self.cutoff_at(now));
        match window {
            Some(w) => {
                let raw = now.saturating_sub(w);
                let from = if raw >= fine_start(now) {
                    align(raw, MINUTE)
                } else {
                    align(raw, HOUR)
                };
                from.max(retention_start)
            }
            None => retention_start,
        }
    }

    fn metrics_of(&self, name: &str, agent: &Agent, from: Micros) -> Option<AgentMetrics> {
        let sum = agent.series.sum_from(from)?;
        let decided = sum.successes + sum.errors;
        Some(AgentMetrics {
            agent: name.to_owned(),
            total_requests: sum.requests,
            avg_routing_time_ms: mean(sum.routing_time_sum, sum.routing_time_n),
            avg_confidence: mean(sum.confidence_sum.into(), sum.confidence_n),
            success_rate: (decided > 0).then(|| sum.successes as f64 / decided as f64),
            successes: sum.successes,
            errors: sum.errors,
            total_actions: sum.actions,
            last_seen: agent.last_seen,
        })
    }

    /// Metrics of every agent with events in the window (or of `agent` only), sorted by name.
    pub fn agent_metrics(
        &self,
        now: Micros,
        window: Option<Micros>,
        agent: Option<&str>,
    ) -> Vec<AgentMetrics> {
        let from = self.window_start(now, window);
        let mut out: Vec<AgentMetrics> = match agent {
            Some(name) => self
                .agents
                .get(name)
                .and_then(|a| self.metrics_of(name, a, from))
                .into_iter()
                .collect(),
            None => self
                .agents
                .iter()
                .filter_map(|(name, a)| self.metrics_of(name, a, from))
                .collect(),
        };
        out.sort_by(|a, b| a.agent.cmp(&b.agent));
        out
    }

    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    pub fn performance_stats(&self, now: Micros, window: Option<Micros>) -> PerformanceStats {
        let from = self.window_start(now, window);
        let sum = self.perf.sum_from(from).unwrap_or_default();
        let (q, hits, sum, n) = (
            sum.queries,
            sum.cache_hits,
            sum.duration_sum,
            sum.duration_n,
        );
        PerformanceStats {
            total_queries: q,
            cache_hits: hits,
            cache_hit_rate: (q > 0).then(|| hits as f64 / q as f64),
            avg_routing_duration_ms: mean(sum, n),
        }
    }

    /// Recent actions, newest first.
    pub fn actions(&self) -> impl Iterator<Item = &Arc<AgentAction>> {
        self.actions.newest()
    }
    pub fn decisions(&self) -> impl Iterator<Item = &Arc<RoutingDecision>> {
        self.decisions.newest()
    }
    pub fn transformations(&self) -> impl Iterator<Item = &Arc<Transformation>> {
        self.transformations.newest()
    }
    pub fn performance(&self) -> impl Iterator<Item = &Arc<PerformanceMetric>> {
        self.performance.newest()
    }

    /// What each recent buffer holds, by name (for the metrics).
    pub fn buffer_usage(&self) -> [(&'static str, BufferUsage); 4] {
        [
            ("actions", self.actions.usage()),
            ("routing_decisions", self.decisions.usage()),
            ("transformations", self.transformations.usage()),
            ("performance_metrics", self.performance.usage()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{self, EventKind};

    const H: Micros = 3600 * 1_000_000;
    const NOW: Micros = 1_764_000_000_000_000;

    #[test]
    fn window_sums_count_past_what_one_bucket_holds() {
        // Two busy hours, each near a bucket's limit: their sum needs more than 32 bits, and
        // their durations (a day each) more than 64 in a bucket.
        let full = u32::MAX - 1;
        let day = fixed(MAX_DURATION_MS);
        let hour = |start| {
            let mut duration_sum = Sum96::default();
            duration_sum.add(u128::from(full) * u128::from(day));
            PerfBucket {
                start,
                queries: full,
                cache_hits: full / 2,
                duration_n: full,
                duration_sum,
            }
        };
        let series = Series::<PerfBucket> {
            fine: VecDeque::new(),
            coarse: VecDeque::from([hour(NOW - 2 * H), hour(NOW - H)]),
        };
        let sum = series.sum_from(NOW - 2 * H).unwrap();
        assert_eq!(sum.queries, 2 * u64::from(full));
        assert_eq!(sum.cache_hits, u64::from(full / 2) * 2);
        assert_eq!(sum.duration_n, 2 * u64::from(full));
        assert_eq!(
            mean(sum.duration_sum, sum.duration_n),
            Some(MAX_DURATION_MS),
            "a day each"
        );
        assert_eq!(series.sum_from(NOW - H).unwrap().queries, u64::from(full));
        // The last guard: a bucket's sum stops at 2^96 - 1 rather than wrapping.
        let mut s = Sum96::default();
        s.add(Sum96::MAX - 1);
        assert_eq!(s.get(), Sum96::MAX - 1);
        s.add(day.into());
        assert_eq!(s.get(), Sum96::MAX);
    }

    /// What an agent's memory is made of (see [`DEFAULT_MAX_AGENTS`]).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn buckets_stay_small() {
        assert_eq!(size_of::<AgentBucket>(), 56);
        assert_eq!(size_of::<PerfBucket>(), 32);
    }

    /// A small deterministic PRNG (xorshift) so the tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// An event time as producers write it (RFC 3339, microseconds).
    fn iso(time: Micros) -> String {
        chrono::DateTime::from_timestamp_micros(time)
            .expect("in range")
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    }

    fn json(v: serde_json::Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    /// An action built through the parser, as ingest builds it.
    fn action(id: &str, agent: &str, action_type: &str, time: Micros) -> Event {
        let payload = json(serde_json::json!({
            "id": id,
            "agent_name": agent,
            "action_type": action_type,
            "timestamp": iso(time),
        }));
        let a = events::parse_action(&payload, time).expect("a valid action");
        Event::AgentAction(Arc::new(a))
    }

    fn random_events(n: usize, seed: u64, span: Micros) -> Vec<Event> {
        let mut r = Rng(seed);
        let agents = ["alpha", "beta", "gamma", "delta", "epsilon"];
        let types = ["tool_call", "decision", "success", "error"];
        (0..n)
            .map(|i| {
                let time = NOW - (r.below(span as u64) as Micros);
                let agent = agents[r.below(agents.len() as u64) as usize].to_string();
                let id = format!("e{i}");
                // Built through the parser, as ingest builds them.
                let ts = iso(time);
                let event = match r.below(4) {
                    0 => {
                        let confidence = (r.below(5) > 0).then(|| r.unit());
                        let routing_time = (r.below(5) > 0).then(|| r.unit() * 100.0);
                        events::parse_routing(
                            &json(serde_json::json!({
                                "id": id,
                                "correlation_id": format!("c{}", i / 3),
                                "selected_agent": agent,
                                "confidence_score": confidence,
                                "alternatives": [{"agent": "x", "confidence": 0.1}],
                                "routing_time_ms": routing_time,
                                "timestamp": ts,
                            })),
                            NOW,
                        )
                        .map(|e| Event::RoutingDecision(Arc::new(e)))
                    }
                    1 => Ok(action(&id, &agent, types[r.below(4) as usize], time)),
                    2 => events::parse_transformation(
                        &json(serde_json::json!({
                            "id": id,
                            "source_agent": agent,
                            "target_agent": "beta",
                            "success": true,
                            "timestamp": ts,
                        })),
                        NOW,
                    )
                    .map(|e| Event::Transformation(Arc::new(e))),
                    _ => {
                        let duration = (r.below(4) > 0).then(|| r.unit() * 50.0);
                        let cache_hit = r.below(3) == 0;
                        events::parse_performance(
                            &json(serde_json::json!({
                                "id": id,
                                "routing_duration_ms": duration,
                                "cache_hit": cache_hit,
                                "trigger_match_strategy": "unknown",
                                "timestamp": ts,
                            })),
                            NOW,
                        )
                        .map(|e| Event::PerformanceMetric(Arc::new(e)))
                    }
                };
                let event = event.expect("a valid event");
                assert_eq!(event.time(), time);
                event
            })
            .collect()
    }

    /// The reference: computed directly from the event list, in floating point.
    fn reference_metrics(events: &[Event], from: Micros) -> Vec<AgentMetrics> {
        let mut names: Vec<String> = Vec::new();
        for e in events {
            match e {
                Event::RoutingDecision(d) if d.time >= from => {
                    names.push(d.selected_agent().to_string())
                }
                Event::AgentAction(a) if a.time >= from => names.push(a.agent_name().to_string()),
                _ => {}
            }
        }
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let ds: Vec<_> = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::RoutingDecision(d)
                            if d.selected_agent() == name && d.time >= from =>
                        {
                            Some(d)
                        }
                        _ => None,
                    })
                    .collect();
                let acts: Vec<_> = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::AgentAction(a) if a.agent_name() == name && a.time >= from => {
                            Some(a)
                        }
                        _ => None,
                    })
                    .collect();
                let mean =
                    |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
                let successes = acts.iter().filter(|a| a.action_type() == "success").count() as u64;
                let errors = acts.iter().filter(|a| a.action_type() == "error").count() as u64;
                let last_seen = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::RoutingDecision(d) if d.selected_agent() == name => Some(d.time),
                        Event::AgentAction(a) if a.agent_name() == name => Some(a.time),
                        _ => None,
                    })
                    .max()
                    .unwrap();
                AgentMetrics {
                    agent: name.clone(),
                    total_requests: ds.len() as u64,
                    avg_routing_time_ms: mean(
                        ds.iter().filter_map(|d| d.routing_time_ms).collect(),
                    ),
                    avg_confidence: mean(ds.iter().filter_map(|d| d.confidence_score).collect()),
                    success_rate: (successes + errors > 0)
                        .then(|| successes as f64 / (successes + errors) as f64),
                    successes,
                    errors,
                    total_actions: acts.len() as u64,
                    last_seen,
                }
            })
            .collect()
    }

    fn close(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (Some(x), Some(y)) => (x - y).abs() < 1e-6,
            (None, None) => true,
            _ => false,
        }
    }

    fn assert_metrics_eq(got: &[AgentMetrics], want: &[AgentMetrics]) {
        assert_eq!(got.len(), want.len(), "agents: {got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.agent, w.agent);
            assert_eq!(g.total_requests, w.total_requests, "{}", g.agent);
            assert_eq!(g.successes, w.successes);
            assert_eq!(g.errors, w.errors);
            assert_eq!(g.total_actions, w.total_actions);
            assert_eq!(g.last_seen, w.last_seen);
            assert!(
                close(g.avg_routing_time_ms, w.avg_routing_time_ms),
                "{g:?} vs {w:?}"
            );
            assert!(close(g.avg_confidence, w.avg_confidence), "{g:?} vs {w:?}");
            assert!(close(g.success_rate, w.success_rate), "{g:?} vs {w:?}");
        }
    }

    fn state_with(events: &[Event], cfg: StateConfig) -> State {
        let mut s = State::new(cfg);
        for e in events {
            assert!(matches!(s.apply(e, NOW), Applied::Aggregated(_)));
        }
        s
    }

    /// Absurd values pin a sum at its limit rather than wrapping it to a negative average.
    #[test]
    fn implausible_values_stay_out_of_the_averages() {
        let decision = |id: &str, ms: f64, confidence: f64| {
            let payload = json(serde_json::json!({
                "id": id,
                "selected_agent": "huge",
                "confidence_score": confidence,
                "routing_time_ms": ms,
                "timestamp": iso(NOW - H),
            }));
            Event::RoutingDecision(Arc::new(
                events::parse_routing(&payload, NOW).expect("a valid decision"),
            ))
        };
        let events = [
            decision("d1", 1e13, 1e13),
            decision("d2", -1e300, 95.0),
            decision("d3", 1e300, -0.5),
            decision("d4", 5.0, 0.5),
            decision("d5", 86_400_000.0, 1.0),
            decision("d6", -1.0, 0.0),
        ];
        let s = state_with(&events, StateConfig::default());
        let m = &s.agent_metrics(NOW, None, Some("huge"))[0];
        // Every decision counts; only plausible values are averaged, in any order.
        assert_eq!(m.total_requests, 6);
        assert_eq!(m.avg_routing_time_ms, Some((5.0 + 86_400_000.0) / 2.0));
        assert_eq!(m.avg_confidence, Some((0.5 + 1.0 + 0.0) / 3.0));
        let mut reversed = events.clone();
        reversed.reverse();
        let r =
            &state_with(&reversed, StateConfig::default()).agent_metrics(NOW, None, Some("huge"))
                [0];
        assert_eq!(
            (r.avg_routing_time_ms, r.avg_confidence),
            (m.avg_routing_time_ms, m.avg_confidence)
        );
        // The events themselves keep what was sent.
        let listed: Vec<Option<f64>> = s.decisions().map(|d| d.confidence_score).collect();
        assert!(listed.contains(&Some(95.0)), "{listed:?}");
    }

    #[test]
    fn aggregates_equal_a_reference_computation() {
        let events = random_events(5000, 7, 20 * H);
        let s = state_with(&events, StateConfig::default());
        assert_metrics_eq(
            &s.agent_metrics(NOW, None, None),
            &reference_metrics(&events, NOW - 24 * H),
        );
        // A 1 h window: the window start is aligned down to the minute bucket.
        let from = (NOW - H).div_euclid(MINUTE) * MINUTE;
        assert_metrics_eq(
            &s.agent_metrics(NOW, Some(H), None),
            &reference_metrics(&events, from),
        );
        let one = s.agent_metrics(NOW, None, Some("gamma"));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].agent, "gamma");

        // Performance stats against the reference.
        let perf: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::PerformanceMetric(m) => Some(m),
                _ => None,
            })
            .collect();
        let stats = s.performance_stats(NOW, None);
        assert_eq!(stats.total_queries, perf.len() as u64);
        assert_eq!(
            stats.cache_hits,
            perf.iter().filter(|m| m.cache_hit).count() as u64
        );
        let d: Vec<f64> = perf.iter().filter_map(|m| m.routing_duration_ms).collect();
        assert!(close(
            stats.avg_routing_duration_ms,
            Some(d.iter().sum::<f64>() / d.len() as f64)
        ));

        // Buffers: the N newest by event time, newest first.
        let mut actions: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::AgentAction(a) => Some((a.time, a.id().to_owned())),
                _ => None,
            })
            .collect();
        actions.sort();
        actions.reverse();
        actions.truncate(1000);
        let got: Vec<_> = s.actions().map(|a| (a.time, a.id().to_owned())).collect();
        assert_eq!(got, actions);
        assert_eq!(s.transformations().count(), 100);
        assert_eq!(s.performance().count(), 200);
    }

    #[test]
    fn result_does_not_depend_on_arrival_order() {
        let events = random_events(3000, 11, 10 * H);
        let a = state_with(&events, StateConfig::default());
        let mut shuffled = events.clone();
        let mut r = Rng(99);
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, r.below(i as u64 + 1) as usize);
        }
        let b = state_with(&shuffled, StateConfig::default());
        assert_eq!(
            a.agent_metrics(NOW, None, None),
            b.agent_metrics(NOW, None, None)
        );
        assert_eq!(
            a.performance_stats(NOW, None),
            b.performance_stats(NOW, None)
        );
        let ids = |s: &State| s.actions().map(|x| x.id().to_owned()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
        let ids = |s: &State| s.decisions().map(|x| x.id().to_owned()).collect::<Vec<_>>();
        assert_eq!(ids(&a), ids(&b));
    }

    /// Past `max_agents`, a new agent's events count and stay in the buffers but get no
    /// metrics; so does an overlong name. A slot frees when an agent leaves the window.
    #[test]
    fn agents_beyond_the_limit_are_counted_not_tracked() {
        let cfg = StateConfig {
            retention: 2 * H,
            max_agents: 2,
            ..Default::default()
        };
        let mut s = State::new(cfg);
        let long = "x".repeat(MAX_AGENT_NAME_BYTES + 1);
        let events = [
            action("1", "alpha", "success", NOW - 3 * H / 2),
            action("2", "beta", "success", NOW - 60_000_000),
            action("3", "gamma", "error", NOW - 50_000_000),
            action("4", "alpha", "error", NOW - 40_000_000),
            action("5", &long, "success", NOW - 30_000_000),
        ];
        let applied: Vec<Applied> = events.iter().map(|e| s.apply(e, NOW)).collect();
        assert_eq!(
            applied[2],
            Applied::Aggregated(None),
            "gamma: over the limit"
        );
        assert_eq!(
            applied[3],
            Applied::Aggregated(Some("alpha")),
            "known agents go on"
        );
        assert_eq!(applied[4], Applied::Aggregated(None), "name too long");
        assert_eq!(s.agent_events_untracked(), 2);
        let names: Vec<String> = s
            .agent_metrics(NOW, None, None)
            .into_iter()
            .map(|m| m.agent)
            .collect();
        assert_eq!(names, ["alpha", "beta"]);
        assert_eq!(s.actions().count(), 5, "every action is kept in the buffer");

        // An hour on, alpha's first action has left the window, but alpha and beta still
        // have events in it: gamma still gets no slot...
        s.prune(NOW + H);
        assert_eq!(s.agent_count(), 2);
        assert_eq!(
            s.apply(&action("6", "gamma", "success", NOW + H), NOW + H),
            Applied::Aggregated(None)
        );
        // ...until every event of alpha and beta has expired: then gamma gets a slot.
        s.prune(NOW + 3 * H);
        assert_eq!(s.agent_count(), 0);
        assert_eq!(
            s.apply(&action("7", "gamma", "success", NOW + 3 * H), NOW + 3 * H),
            Applied::Aggregated(Some("gamma"))
        );
        assert_eq!(s.agent_events_untracked(), 3);
    }

    #[test]
    fn retention_prunes_by_event_time_and_rejects_expired_events() {
        let cfg = StateConfig {
            retention: 2 * H,
            ..Default::default()
        };
        let events = random_events(2000, 5, 4 * H);
        let mut s = State::new(cfg.clone());
        let mut expired = 0;
        for e in &events {
            if s.apply(e, NOW) == Applied::Expired {
                expired += 1;
            }
        }
        let cutoff = s.cutoff_at(NOW);
        let kept: Vec<Event> = events
            .iter()
            .filter(|e| e.time() >= cutoff)
            .cloned()
            .collect();
        assert_eq!(expired, events.len() - kept.len());
        assert!(expired > 0);
        assert_metrics_eq(
            &s.agent_metrics(NOW, None, None),
            &reference_metrics(&kept, cutoff),
        );

        // An hour later, everything older than the new cutoff is gone, everywhere, and prune
        // names exactly the agents whose metrics changed (removed ones included).
        let later = NOW + H;
        let before = s.agent_metrics(NOW, None, None);
        let mut changed = s.prune(later);
        changed.sort();
        let after = s.agent_metrics(later, None, None);
        let differ: Vec<String> = before
            .iter()
            .filter(|b| !after.contains(b))
            .map(|b| b.agent.clone())
            .collect();
        assert!(!differ.is_empty());
        assert_eq!(changed, differ);
        let cutoff = s.cutoff_at(later);
        let kept: Vec<Event> = events
            .iter()
            .filter(|e| e.time() >= cutoff)
            .cloned()
            .collect();
        assert_metrics_eq(
            &s.agent_metrics(later, None, None),
            &reference_metrics(&kept, cutoff),
        );
        assert!(s.actions().all(|a| a.time >= cutoff));
        assert!(s.decisions().all(|a| a.time >= cutoff));
        assert!(s.performance().all(|a| a.time >= cutoff));
        // A fresh state fed the same events at `later` is identical: restart equivalence.
        let mut fresh = State::new(cfg);
        for e in &events {
            fresh.apply(e, later);
        }
        assert_eq!(
            fresh.agent_metrics(later, None, None),
            s.agent_metrics(later, None, None)
        );
        for w in [H / 2, H, 90 * 60 * 1_000_000, 2 * H] {
            assert_eq!(
                fresh.agent_metrics(later, Some(w), None),
                s.agent_metrics(later, Some(w), None),
                "window {w}"
            );
        }
        assert_eq!(
            fresh.performance_stats(later, None),
            s.performance_stats(later, None)
        );

        // Much later: all agents dropped, and named.
        let left = s.agent_count();
        assert_eq!(s.prune(NOW + 10 * H).len(), left);
        assert_eq!(s.agent_count(), 0);
        assert_eq!(s.actions().count(), 0);
        assert_eq!(s.performance_stats(NOW + 10 * H, None).total_queries, 0);
    }

    #[test]
    fn an_agent_busy_all_day_holds_few_buckets() {
        let mut s = State::new(StateConfig::default());
        let mut t = NOW - 24 * H;
        let mut i = 0;
        // One action per minute for 24 h, pruned every simulated minute as the service does.
        while t <= NOW {
            let e = action(&i.to_string(), "busy", "success", t);
            s.apply(&e, t);
            s.prune(t);
            t += MINUTE;
            i += 1;
        }
        let a = &s.agents["busy"];
        assert!(a.series.fine.len() <= 62, "{}", a.series.fine.len());
        assert!(a.series.coarse.len() <= 25, "{}", a.series.coarse.len());
        // Everything since the hour-aligned cutoff is kept; the last hour to the minute.
        let cutoff = s.cutoff_at(NOW);
        let kept = (NOW - cutoff).div_euclid(MINUTE) as u64 + 1;
        assert_eq!(s.agent_metrics(NOW, None, None)[0].total_actions, kept);
        let last_hour = &s.agent_metrics(NOW, Some(H), None)[0];
        assert_eq!(last_hour.total_actions, 61);
    }

    /// A day (the longest duration averaged) is 8.64e13 in fixed point: ~106,752 of them
    /// filled an i64 sum, in one bucket or across the buckets of a window, and pinned the
    /// average far below a day.
    #[test]
    fn averages_of_the_longest_durations_stay_exact_at_any_count() {
        const DAY_MS: f64 = 86_400_000.0;
        let decision = |i: usize, agent: &str, time: Micros| {
            let payload = format!(
                r#"{{"id":"d{i}","selected_agent":"{agent}","routing_time_ms":{DAY_MS},"confidence_score":1}}"#
            );
            let d = events::parse_routing(payload.as_bytes(), time).expect("a valid decision");
            Event::RoutingDecision(Arc::new(d))
        };
        let metric = |i: usize, time: Micros| {
            let payload = format!(r#"{{"id":"m{i}","routing_duration_ms":{DAY_MS}}}"#);
            let m = events::parse_performance(payload.as_bytes(), time).expect("a valid metric");
            Event::PerformanceMetric(Arc::new(m))
        };
        let mut s = State::new(StateConfig {
            max_decisions: 10,
            max_performance: 10,
            ..Default::default()
        });
        // "one": 110,000 in one hour bucket. "two": 55,000 in each of two hour buckets (each
        // fits alone; their window sum did not). Performance metrics the same way.
        let placed = [
            ("one", NOW - 5 * H + MINUTE, 110_000),
            ("two", NOW - 3 * H + MINUTE, 55_000),
            ("two", NOW - 2 * H + MINUTE, 55_000),
        ];
        let mut i = 0;
        for (agent, time, n) in placed {
            for _ in 0..n {
                i += 1;
                for e in [decision(i, agent, time), metric(i, time)] {
                    assert!(matches!(s.apply(&e, NOW), Applied::Aggregated(_)));
                }
            }
        }
        for agent in ["two", "one"] {
            let m = &s.agent_metrics(NOW, None, Some(agent))[0];
            assert_eq!(m.avg_routing_time_ms, Some(DAY_MS), "{agent}");
            assert_eq!(m.avg_confidence, Some(1.0), "{agent}");
        }
        for window in [Some(4 * H), None] {
            let stats = s.performance_stats(NOW, window);
            assert_eq!(stats.avg_routing_duration_ms, Some(DAY_MS), "{window:?}");
        }
        assert_eq!(s.performance_stats(NOW, Some(4 * H)).total_queries, 110_000);
    }

    /// A redelivered event (a producer's retry: the same id and event time) is listed once,
    /// wherever it falls in the buffer, and the buffer still holds the N newest events
    /// whatever the order; the metrics count every delivery.
    #[test]
    fn a_redelivered_event_is_listed_once() {
        let cfg = StateConfig {
            max_actions: 4,
            max_decisions: 4,
            ..Default::default()
        };
        let decision = |id: &str, time: Micros| {
            let payload = format!(r#"{{"id":"{id}","selected_agent":"alpha"}}"#);
            let d = events::parse_routing(payload.as_bytes(), time).expect("a valid decision");
            Event::RoutingDecision(Arc::new(d))
        };
        // Each delivery parsed anew, as ingest does: equal events, not the same Arc.
        let deliveries = |ids: &[(&str, Micros)]| -> Vec<Event> {
            ids.iter()
                .flat_map(|&(id, t)| [action(id, "alpha", "success", t), decision(id, t)])
                .collect()
        };
        let (t1, t2, t3) = (NOW - 3 * MINUTE, NOW - 2 * MINUTE, NOW - MINUTE);
        let sent = deliveries(&[
            ("x", t1),
            ("y", t3),
            ("x", t1), // before the newest: found by the search
            ("y", t3), // the newest again: the append path
            ("z", t2),
            ("w", t1), // the same time, another id: an event of its own
            ("x", t1), // in a full buffer
        ]);
        let listed = |s: &State| {
            let actions: Vec<(Micros, String)> =
                s.actions().map(|a| (a.time, a.id().to_owned())).collect();
            let decisions: Vec<(Micros, String)> =
                s.decisions().map(|d| (d.time, d.id().to_owned())).collect();
            assert_eq!(actions, decisions);
            actions
        };
        let s = state_with(&sent, cfg.clone());
        let want = [(t3, "y"), (t2, "z"), (t1, "x"), (t1, "w")].map(|(t, id)| (t, id.to_owned()));
        assert_eq!(listed(&s), want);
        let mut reversed = sent.clone();
        reversed.reverse();
        assert_eq!(listed(&state_with(&reversed, cfg)), want);
        let m = &s.agent_metrics(NOW, None, None)[0];
        assert_eq!((m.total_actions, m.total_requests), (7, 7));
        // Once the buffer has let it go, a late copy is older than everything kept.
        let mut s = State::new(StateConfig {
            max_actions: 1,
            ..Default::default()
        });
        for e in deliveries(&[("x", t1), ("y", t2), ("x", t1)]) {
            s.apply(&e, NOW);
        }
        assert_eq!(s.actions().map(|a| a.id()).collect::<Vec<_>>(), ["y"]);
    }

    #[test]
    fn no_nan_and_no_confidence_as_success_rate() {
        let mut s = State::new(StateConfig::default());
        // An agent seen only through non-success/error actions: no averages, no success rate.
        let e = action("1", "solo", "tool_call", NOW);
        s.apply(&e, NOW);
        let m = &s.agent_metrics(NOW, None, None)[0];
        assert_eq!(m.total_requests, 0);
        assert_eq!(m.total_actions, 1);
        assert_eq!(m.success_rate, None);
        assert_eq!(m.avg_confidence, None);
        assert_eq!(m.avg_routing_time_ms, None);
        assert_eq!(s.performance_stats(NOW, None).cache_hit_rate, None);
        let _ = EventKind::ALL;
    }

    /// An action whose `action_details` holds `size` bytes of text, built through the parser.
    fn large_action(id: &str, time: Micros, size: usize) -> Event {
        let payload = json(serde_json::json!({
            "id": id,
            "agent_name": "alpha",
            "action_type": "tool_call",
            "action_details": {"blob": "x".repeat(size)},
            "timestamp": iso(time),
        }));
        let a = events::parse_action(&payload, time).expect("a valid action");
        Event::AgentAction(Arc::new(a))
    }

    fn ids(s: &State) -> Vec<String> {
        s.actions().map(|a| a.id().to_owned()).collect()
    }

    fn action_bytes(e: &Event) -> usize {
        match e {
            Event::AgentAction(a) => a.heap_size(),
            _ => unreachable!(),
        }
    }

    /// An action is accounted its text twice (the text and its stream encoding, which adds
    /// at most `WIRE_OVERHEAD`), whether the encoding is made yet or not, so its size does not
    /// change while a buffer holds it.
    #[test]
    fn an_action_counts_its_text_and_its_wire_encoding() {
        let e = large_action("a", NOW, 10_000);
        let Event::AgentAction(a) = &e else {
            unreachable!()
        };
        let before = a.heap_size();
        let encoded = crate::wire::action_bytes(a).len();
        assert_eq!(a.heap_size(), before, "making the encoding changes nothing");
        let fixed = events::ARC_HEADER + std::mem::size_of::<AgentAction>();
        let text = (before - fixed - events::WIRE_OVERHEAD) / 2;
        assert!(text > 10_000, "{text}");
        assert!(encoded >= text && encoded <= text + events::WIRE_OVERHEAD);
        // The longest fields: every optional one, long ids, a far timestamp.
        let payload = json(serde_json::json!({
            "id": "i".repeat(300), "correlation_id": "c".repeat(300),
            "agent_name": "a".repeat(300), "action_type": "t".repeat(300),
            "action_name": "n".repeat(300), "action_details": {"k": "v".repeat(300)},
            "project_name": "p".repeat(300), "debug_mode": true, "duration_ms": 1.5e300,
            "success": false, "timestamp": "9999-12-31T23:59:59.999999Z",
        }));
        let a = events::parse_action(&payload, NOW).expect("a valid action");
        let text = (a.heap_size() - fixed - events::WIRE_OVERHEAD) / 2;
        let encoded = crate::wire::action_bytes(&a).len();
        assert!(
            encoded <= text + events::WIRE_OVERHEAD,
            "{encoded} > {text} + overhead"
        );
    }

    /// Past the byte budget the oldest events go, as past the count: the buffer holds the
    /// newest that fit, in order, and never more than the budget.
    #[test]
    fn buffers_hold_the_newest_events_that_fit_their_byte_budget() {
        let events: Vec<Event> = (0..20)
            .map(|i| {
                // a16 and before in the hour before NOW - H, a17 and after in the next.
                let time = NOW - H + (i - 17) * MINUTE + MINUTE / 2;
                large_action(&format!("a{i:02}"), time, 1000)
            })
            .collect();
        let one = action_bytes(&events[0]);
        let mut s = state_with(
            &events,
            StateConfig {
                max_buffer_bytes: 5 * one + one / 2,
                ..Default::default()
            },
        );
        assert_eq!(ids(&s), ["a19", "a18", "a17", "a16", "a15"]);
        let [(name, usage), ..] = s.buffer_usage();
        assert_eq!(name, "actions");
        assert_eq!(
            usage,
            BufferUsage {
                items: 5,
                bytes: 5 * one,
                evicted_for_bytes: 15
            }
        );
        // Pruning gives the bytes back.
        s.prune(NOW + 23 * H);
        assert_eq!(ids(&s), ["a19", "a18", "a17"]);
        assert_eq!(s.buffer_usage()[0].1.bytes, 3 * one);

        // The count cap still applies below the byte budget.
        let s = state_with(
            &events,
            StateConfig {
                max_actions: 3,
                max_buffer_bytes: 100 * one,
                ..Default::default()
            },
        );
        assert_eq!(ids(&s), ["a19", "a18", "a17"]);
        assert_eq!(s.buffer_usage()[0].1.evicted_for_bytes, 0);
        // Small events: the default budget leaves the counts alone.
        let small = random_events(5000, 3, 10 * H);
        let s = state_with(&small, StateConfig::default());
        assert_eq!(s.actions().count(), 1000);
        assert!(
            s.buffer_usage()
                .iter()
                .all(|(_, u)| u.evicted_for_bytes == 0)
        );
    }

    /// The newest event stays even when it alone is over the budget; it goes when a newer one
    /// comes, and an older one arriving after it is not kept.
    #[test]
    fn the_newest_event_stays_even_over_the_budget() {
        let small = |i: i64| large_action(&format!("s{i}"), NOW - 10 * MINUTE + i * MINUTE, 100);
        let huge = large_action("huge", NOW - 5 * MINUTE, 50_000);
        let budget = 4 * action_bytes(&small(0));
        let mut s = State::new(StateConfig {
            max_buffer_bytes: budget,
            ..Default::default()
        });
        for e in [small(0), small(1), small(2), huge.clone()] {
            s.apply(&e, NOW);
        }
        assert_eq!(ids(&s), ["huge"]);
        assert!(s.buffer_usage()[0].1.bytes > budget);
        s.apply(&small(3), NOW); // older than the huge one
        s.apply(&small(1), NOW); // let go before
        assert_eq!(ids(&s), ["huge"]);
        s.apply(&small(6), NOW);
        s.apply(&small(7), NOW);
        assert_eq!(ids(&s), ["s7", "s6"]);
        assert!(s.buffer_usage()[0].1.bytes <= budget);
    }

    /// With byte budgets too, the buffers hold the same events whatever the arrival order:
    /// the longest run of the newest (by time, id) that fits the count and the bytes (at
    /// least the newest), each redelivered event once.
    #[test]
    fn byte_budgets_do_not_depend_on_arrival_order() {
        let mut r = Rng(7);
        let mut sent: Vec<(String, Micros, usize)> = (0..300)
            .map(|i| {
                let time = NOW - H + r.below(60) as Micros * MINUTE;
                let size = [10, 200, 3000, 20_000][r.below(4) as usize];
                (format!("a{i}"), time, size)
            })
            .collect();
        // Redeliveries (equal events parsed anew).
        sent.extend([3, 50, 299].map(|i| sent[i].clone()));
        let events: Vec<Event> = sent
            .iter()
            .map(|(id, time, size)| large_action(id, *time, *size))
            .collect();
        // About 25 of them.
        let budget = 300_000;
        let cfg = StateConfig {
            max_actions: 60,
            max_buffer_bytes: budget,
            ..Default::default()
        };
        // The reference: sorted newest first, deduplicated, cut at the count and the bytes.
        let mut all: Vec<(Micros, String, usize)> = events
            .iter()
            .map(|e| match e {
                Event::AgentAction(a) => (a.time, a.id().to_owned(), a.heap_size()),
                _ => unreachable!(),
            })
            .collect();
        all.sort();
        all.dedup_by(|a, b| (a.0, &a.1) == (b.0, &b.1));
        all.reverse();
        let (mut want, mut bytes) = (Vec::new(), 0);
        for (_, id, size) in all {
            if want.len() == 60 || (!want.is_empty() && bytes + size > budget) {
                break;
            }
            bytes += size;
            want.push(id);
        }
        assert!(want.len() < 60, "the bytes bind: {}", want.len());
        let mut shuffled = events.clone();
        for seed in 0..5 {
            let mut r = Rng(seed);
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, r.below(i as u64 + 1) as usize);
            }
            let s = state_with(&shuffled, cfg.clone());
            assert_eq!(ids(&s), want, "seed {seed}");
            assert_eq!(s.buffer_usage()[0].1.bytes, bytes);
        }
        let mut reversed = events;
        reversed.reverse();
        assert_eq!(ids(&state_with(&reversed, cfg)), want);
    }
}
