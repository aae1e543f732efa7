//! The `omnibus.consumer.v1.ConsumerService` gRPC edge: unary reads of the state and the
//! three streams over the hub.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use omnibus_proto::consumer::v1 as pb;
use omnibus_proto::consumer::v1::consumer_service_server::{
    ConsumerService, ConsumerServiceServer,
};
use parking_lot::RwLock;
use svc_kit::Shutdown;
use svc_kit::server::{StreamingMethod, WithMethod};
use tonic::codegen::BoxFuture;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::broker::BrokerStatus;
use crate::convert;
use crate::events::{AgentAction, Event, Micros};
use crate::hub::{Follower, Hub, Next, Update, UpdateKind, Updates};
use crate::ingest::{IngestStatus, now_micros};
use crate::snapshot;
use crate::state::{State, plausible_confidence};
use crate::wire::{ActionsPush, SubscribePush};

const DEFAULT_LIMIT: usize = 100;

#[derive(Clone)]
pub struct ConsumerApi {
    pub(crate) broker: Arc<BrokerStatus>,
    pub(crate) state: Arc<RwLock<State>>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) ingest: Arc<IngestStatus>,
    pub(crate) real_time: bool,
    /// Most updates handed to a stream at once (`--max-push`): the largest
    /// `StreamActions` / `StreamAgentMetrics` push.
    pub(crate) max_push: usize,
    /// The largest response (`--max-send-message-size`), which bounds a snapshot.
    pub(crate) max_response_bytes: usize,
    pub(crate) shutdown: Shutdown,
}

fn invalid(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// Longest `agent`, `action_type` or `correlation_id` filter, in bytes. A stream keeps its
/// filter (and an agent filter, a route in the hub) for as long as it lives, so the bound
/// keeps what a subscriber can pin small; no real name or id comes near it.
pub(crate) const MAX_FILTER_BYTES: usize = 1024;

/// `value` of the filter `field`, refused when longer than [`MAX_FILTER_BYTES`].
fn filter_text(field: &str, value: Option<String>) -> Result<Option<String>, Status> {
    match value {
        Some(v) if v.len() > MAX_FILTER_BYTES => Err(invalid(
            field,
            format!(
                "{} bytes is longer than the {MAX_FILTER_BYTES} a filter may have",
                v.len()
            ),
        )),
        v => Ok(v),
    }
}

impl ConsumerApi {
    /// `Subscribe`: the snapshot or the resumed backlog, then every update the request's
    /// channels and filters accept, with lag notices.
    fn subscribe_stream(
        &self,
        r: pb::SubscribeRequest,
    ) -> Result<BoxStream<SubscribePush>, Status> {
        self.check_streams()?;
        let channels = Channels::from_request(&r.channels)?;
        if let Some(m) = r.min_confidence
            && !(0.0..=1.0).contains(&m)
        {
            return Err(invalid("min_confidence", "must be between 0 and 1"));
        }
        // Performance metrics have no agent: an agent filter would leave a subscription to
        // them alone empty forever.
        if r.agent.is_some() && channels.only(pb::Channel::Performance) {
            return Err(invalid(
                "agent",
                "performance metrics have no agent: with an agent filter, CHANNEL_PERFORMANCE \
                 alone never delivers anything",
            ));
        }
        let filter = Filter {
            min_confidence: r.min_confidence,
            ..Filter::checked(r.agent, r.action_type, r.correlation_id)?
        };
        // Subscribing and taking the snapshot under the state's read lock: ingest publishes
        // while holding the write lock, so the snapshot holds exactly the updates <= last_seq.
        let (sub, snapshot) = {
            let state = self.state.read();
            let sub = self
                .hub
                .subscribe(r.resume_after_sequence, filter.agent.as_deref())
                .map_err(|e| Status::out_of_range(e.to_string()))?;
            let want_snapshot =
                r.include_snapshot && (r.resume_after_sequence.is_none() || sub.missed > 0);
            let snapshot = want_snapshot.then(|| snapshot::Parts {
                // Read with the rest (a status read later could be newer than the snapshot's
                // sequence), and only for subscribers of status updates.
                status: channels
                    .has(pb::Channel::System)
                    .then(|| pb::ConsumerStatus {
                        last_sequence: sub.last_seq,
                        ..self.status_with(&state)
                    }),
                ..self.snapshot_parts(&state, sub.last_seq, &channels, &filter)
            });
            (sub, snapshot)
        };
        let snapshot = snapshot.map(|parts| parts.assemble(self.max_response_bytes));
        let mut initial = Vec::new();
        let mut backlog = Vec::new();
        // Metrics and status published up to this sequence are older than the figures a lag
        // notice was followed by.
        let mut superseded = 0;
        match snapshot {
            Some(snap) => {
                initial.push(SubscribePush::Message(Box::new(pb::SubscribeResponse {
                    sequence: snap.sequence,
                    update: Some(pb::subscribe_response::Update::Snapshot(snap)),
                })));
            }
            None => {
                if sub.missed > 0 {
                    let last_missed = sub.backlog.first().map_or(sub.last_seq, |u| u.seq - 1);
                    let mut notice = VecDeque::from([lag_notice(sub.missed, last_missed)]);
                    superseded =
                        self.refresh_after_lag(&channels, &filter, last_missed, &mut notice);
                    initial.extend(notice);
                }
                backlog = Updates::pieces(sub.backlog, self.max_push);
            }
        }
        let follower = Follower::new(sub.live, self.max_push);
        let api = self.clone();
        let stream = follow(
            initial,
            backlog,
            follower,
            self.shutdown.clone(),
            move |feed, out| match feed {
                Feed::Updates(updates) => {
                    for u in &updates {
                        let refreshed =
                            matches!(u.kind, UpdateKind::AgentMetrics(_) | UpdateKind::Status(_));
                        if refreshed && u.seq <= superseded {
                            continue;
                        }
                        if let Some(m) = subscribe_message(u, &channels, &filter) {
                            out.push_back(m);
                        }
                    }
                }
                Feed::Lagged {
                    missed,
                    last_missed,
                } => {
                    out.push_back(lag_notice(missed, last_missed));
                    // The missed updates may have held an agent's last change or a change of
                    // the connection, which nothing would send again: the current figures
                    // follow the notice (with its sequence), as in StreamAgentMetrics.
                    superseded = api.refresh_after_lag(&channels, &filter, last_missed, out);
                }
            },
        );
        Ok(stream)
    }

    /// After a `Subscribe` lag notice: the current metrics of the followed agents and the
    /// current status, as the subscription's channels ask, numbered `sequence` (the notice's).
    /// Returns the hub's sequence they correspond to (read under the state's read lock, under
    /// which updates are published).
    fn refresh_after_lag(
        &self,
        channels: &Channels,
        filter: &Filter,
        sequence: u64,
        out: &mut VecDeque<SubscribePush>,
    ) -> u64 {
        use pb::subscribe_response::Update as U;
        let (metrics, system) = (
            channels.has(pb::Channel::Metrics),
            channels.has(pb::Channel::System),
        );
        let state = self.state.read();
        let last_seq = self.hub.last_seq();
        let message = |update| {
            SubscribePush::Message(Box::new(pb::SubscribeResponse {
                sequence,
                update: Some(update),
            }))
        };
        if metrics {
            for m in followed_metrics(&state, filter) {
                out.push_back(message(U::AgentMetrics(m)));
            }
        }
        if system {
            out.push_back(message(U::ConsumerStatus(pb::ConsumerStatus {
                last_sequence: last_seq,
                ..self.status_with(&state)
            })));
        }
        last_seq
    }

    /// `StreamActions`: a push per batch of updates holding actions the request's filters
    /// accept, and lag notices.
    fn actions_stream(
        &self,
        r: pb::StreamActionsRequest,
    ) -> Result<BoxStream<ActionsPush>, Status> {
        self.check_streams()?;
        let filter = Filter::checked(r.agent, r.action_type, r.correlation_id)?;
        let sub = self
            .hub
            .subscribe(None, filter.agent.as_deref())
            .map_err(|e| Status::internal(e.to_string()))?;
        let follower = Follower::new(sub.live, self.max_push);
        let keep: Arc<dyn Fn(&AgentAction) -> bool + Send + Sync> =
            Arc::new(move |a| filter.action(a));
        Ok(follow(
            Vec::new(),
            Vec::new(),
            follower,
            self.shutdown.clone(),
            move |feed, out| match feed {
                Feed::Updates(updates) => out.extend(ActionsPush::actions(updates, keep.clone())),
                Feed::Lagged { missed, .. } => out.push_back(ActionsPush::lagged(missed)),
            },
        ))
    }

    /// Parses a window (`1h`, `24h`, `7d`); empty means the whole retention window.
    fn window(&self, field: &str, raw: &str) -> Result<Option<Micros>, Status> {
        if raw.trim().is_empty() {
            return Ok(None);
        }
        let d = svc_kit::server::parse_duration(raw).map_err(|e| invalid(field, e))?;
        let retention = self.state.read().config().retention;
        // Saturating: a window too large for Micros is still longer than the retention.
        let w = Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX);
        if w > retention {
            return Err(invalid(
                field,
                format!(
                    "window {raw} is longer than the retention window ({})",
                    svc_kit::server::format_duration(Duration::from_micros(retention as u64))
                ),
            ));
        }
        if w == 0 {
            return Err(invalid(field, "window must be positive"));
        }
        Ok(Some(w))
    }

    pub(crate) fn status(&self) -> pb::ConsumerStatus {
        self.status_with(&self.state.read())
    }

    /// The status, with the state's figures read from `state` (held by the caller).
    fn status_with(&self, state: &State) -> pb::ConsumerStatus {
        let ingest = &self.ingest;
        let topics = crate::events::EventKind::ALL
            .iter()
            .map(|k| {
                let c = &ingest.counters[k.index()];
                let last = c.last_event.load(std::sync::atomic::Ordering::Relaxed);
                pb::TopicStatus {
                    topic: ingest.topics[k.index()].clone(),
                    kind: convert::kind(*k) as i32,
                    events_consumed: c.consumed.load(std::sync::atomic::Ordering::Relaxed),
                    parse_errors: c.parse_errors.load(std::sync::atomic::Ordering::Relaxed),
                    skipped_expired: c.expired.load(std::sync::atomic::Ordering::Relaxed),
                    last_event_time: (last != i64::MIN).then(|| convert::timestamp(last)),
                }
            })
            .collect::<Vec<_>>();
        let partitions = ingest
            .partitions
            .lock()
            .iter()
            .map(|((k, p), pos)| pb::PartitionStatus {
                topic: ingest.topics[*k].clone(),
                partition: *p,
                next_offset: pos.next,
                high_watermark: pos.high,
                lag: if pos.high >= 0 && pos.next >= 0 {
                    (pos.high - pos.next).max(0)
                } else {
                    0
                },
            })
            .collect();
        pb::ConsumerStatus {
            connected: self.broker.connected(),
            events_processed: ingest.events_processed(),
            last_event_time: ingest.last_event().map(convert::timestamp),
            parse_errors: topics.iter().map(|t| t.parse_errors).sum(),
            topics,
            partitions,
            real_time_events_enabled: self.real_time,
            last_sequence: self.hub.last_seq(),
            retention_seconds: (state.config().retention / 1_000_000) as u64,
            agents: state.agent_count() as u64,
            replaying: Some(ingest.replaying()),
            agent_events_untracked: state.agent_events_untracked(),
        }
    }

    /// What a snapshot for `ch` and `f` holds, read under one read lock of the state
    /// (`sequence` is the hub's position then), with the filters of the live updates; the
    /// events are converted once the lock is released ([`snapshot::Parts::assemble`]).
    fn snapshot_parts(
        &self,
        state: &State,
        sequence: u64,
        ch: &Channels,
        f: &Filter,
    ) -> snapshot::Parts {
        use pb::Channel;
        let now = now_micros();
        let performance = ch.has(Channel::Performance) && f.agent.is_none();
        snapshot::Parts {
            agents: if ch.has(Channel::Metrics) {
                state
                    .agent_metrics(now, None, f.agent.as_deref())
                    .iter()
                    .map(convert::agent_metrics)
                    .collect()
            } else {
                Vec::new()
            },
            actions: kept(ch.has(Channel::Actions), state.actions(), |a| f.action(a)),
            decisions: kept(ch.has(Channel::Routing), state.decisions(), |d| {
                f.decision(d)
            }),
            transformations: kept(
                ch.has(Channel::Transformations),
                state.transformations(),
                |t| f.transformation(t),
            ),
            performance: kept(performance, state.performance(), |m| f.performance(m)),
            stats: performance.then(|| convert::stats(&state.performance_stats(now, None))),
            status: None,
            sequence,
        }
    }

    fn check_streams(&self) -> Result<(), Status> {
        if self.real_time {
            Ok(())
        } else {
            Err(Status::failed_precondition(
                "real-time events are disabled on this server (ENABLE_REAL_TIME_EVENTS=false); use the unary reads",
            ))
        }
    }
}

fn limit(requested: u32) -> usize {
    if requested == 0 {
        DEFAULT_LIMIT
    } else {
        requested as usize
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What a stream's mapper sees.
enum Feed {
    Updates(Updates),
    Lagged { missed: u64, last_missed: u64 },
}

struct FollowState<T, F> {
    queued: VecDeque<T>,
    /// A resumed backlog still to go through `map`, a piece at a time.
    backlog: VecDeque<Updates>,
    follower: Follower,
    shutdown: Shutdown,
    map: F,
    /// The shutdown status has been sent: the stream is over.
    ended: bool,
}

/// How a stream ends when the server shuts down: UNAVAILABLE, which clients and meshes retry
/// (on another replica), rather than OK, which reads as "finished" and stops a follower.
fn shutting_down() -> Status {
    Status::unavailable(
        "consumer-svc is shutting down: reconnect (Subscribe resumes with \
         resume_after_sequence set to the last sequence received)",
    )
}

/// A response stream: `initial` messages first, then live updates mapped by `map`, ending
/// with UNAVAILABLE when the server shuts down.
fn follow<T, F>(
    initial: Vec<T>,
    backlog: Vec<Updates>,
    follower: Follower,
    shutdown: Shutdown,
    map: F,
) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnMut(Feed, &mut VecDeque<T>) + Send + 'static,
{
    let st = FollowState {
        queued: initial.into(),
        backlog: backlog.into(),
        follower,
        shutdown,
        map,
        ended: false,
    };
    Box::pin(futures::stream::unfold(st, |mut st| async move {
        loop {
            if st.ended {
                return None;
            }
            if st.shutdown.is_draining() {
                st.ended = true;
                return Some((Err(shutting_down()), st));
            }
            if let Some(item) = st.queued.pop_front() {
                return Some((Ok(item), st));
            }
            // Converted as it is sent: a thousand resuming subscribers must not each hold a
            // converted copy of the whole ring before they read.
            if let Some(piece) = st.backlog.pop_front() {
                (st.map)(Feed::Updates(piece), &mut st.queued);
                continue;
            }
            let next = tokio::select! {
                biased;
                _ = st.shutdown.draining() => continue,
                next = st.follower.next() => next,
            };
            match next {
                Next::Closed => return None,
                Next::Updates(u) => (st.map)(Feed::Updates(u), &mut st.queued),
                Next::Lagged {
                    missed,
                    last_missed,
                } => (st.map)(
                    Feed::Lagged {
                        missed,
                        last_missed,
                    },
                    &mut st.queued,
                ),
            }
        }
    }))
}

/// Filters of the action, decision and transformation updates.
#[derive(Clone, Default)]
struct Filter {
    agent: Option<String>,
    action_type: Option<String>,
    correlation_id: Option<String>,
    min_confidence: Option<f64>,
}

impl Filter {
    /// A request's text filters, each at most [`MAX_FILTER_BYTES`] (else INVALID_ARGUMENT
    /// naming it); no minimum confidence.
    fn checked(
        agent: Option<String>,
        action_type: Option<String>,
        correlation_id: Option<String>,
    ) -> Result<Self, Status> {
        Ok(Self {
            agent: filter_text("agent", agent)?,
            action_type: filter_text("action_type", action_type)?,
            correlation_id: filter_text("correlation_id", correlation_id)?,
            min_confidence: None,
        })
    }

    fn action(&self, a: &crate::events::AgentAction) -> bool {
        self.agent.as_ref().is_none_or(|x| a.agent_name() == x)
            && self
                .action_type
                .as_ref()
                .is_none_or(|x| a.action_type() == x)
            && self
                .correlation_id
                .as_ref()
                .is_none_or(|x| a.correlation_id() == Some(x.as_str()))
    }
    fn decision(&self, d: &crate::events::RoutingDecision) -> bool {
        self.agent.as_ref().is_none_or(|x| d.selected_agent() == x)
            && self
                .correlation_id
                .as_ref()
                .is_none_or(|x| d.correlation_id() == Some(x.as_str()))
            && self.confidence(d.confidence_score)
    }
    /// Whether a decision's confidence passes `min_confidence`: only a plausible one can (as
    /// in the averages), so a `95` meant as a percentage does not pass 0.99.
    fn confidence(&self, c: Option<f64>) -> bool {
        self.min_confidence
            .is_none_or(|m| plausible_confidence(c).is_some_and(|c| c >= m))
    }
    fn transformation(&self, t: &crate::events::Transformation) -> bool {
        self.agent
            .as_ref()
            .is_none_or(|x| t.source_agent() == x || t.target_agent() == x)
            && self
                .correlation_id
                .as_ref()
                .is_none_or(|x| t.correlation_id() == Some(x.as_str()))
    }
    /// Performance metrics have no agent: none passes an agent filter.
    fn performance(&self, m: &crate::events::PerformanceMetric) -> bool {
        self.agent.is_none()
            && self
                .correlation_id
                .as_ref()
                .is_none_or(|c| m.correlation_id() == Some(c.as_str()))
    }
    fn metrics(&self, m: &pb::AgentMetrics) -> bool {
        self.agent.as_ref().is_none_or(|x| m.agent == *x)
    }
}

/// The events of a buffer a snapshot keeps: none when its channel is off.
fn kept<'a, E: 'a>(
    on: bool,
    events: impl Iterator<Item = &'a Arc<E>>,
    keep: impl Fn(&E) -> bool,
) -> Vec<Arc<E>> {
    if on {
        events.filter(|e| keep(e)).cloned().collect()
    } else {
        Vec::new()
    }
}

/// The channels a subscription asked for: one bit per `pb::Channel` value.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Channels(u64);

impl Channels {
    const ALL: Self = Self(u64::MAX);

    fn bit(c: pb::Channel) -> u64 {
        1u64.checked_shl(c as u32).unwrap_or(0)
    }

    fn from_request(raw: &[i32]) -> Result<Self, Status> {
        if raw.is_empty() {
            return Ok(Self::ALL);
        }
        // Every entry is checked, wherever CHANNEL_ALL stands in the list.
        let mut on = 0;
        let mut all = false;
        for &c in raw {
            match pb::Channel::try_from(c) {
                Ok(pb::Channel::All) => all = true,
                Ok(pb::Channel::Unspecified) | Err(_) => {
                    return Err(invalid("channels", format!("unknown channel {c}")));
                }
                Ok(ch) => on |= Self::bit(ch),
            }
        }
        Ok(if all { Self::ALL } else { Self(on) })
    }

    fn has(&self, c: pb::Channel) -> bool {
        self.0 & Self::bit(c) != 0
    }

    /// Whether `c` is the one channel asked for.
    fn only(&self, c: pb::Channel) -> bool {
        self.0 == Self::bit(c)
    }
}

#[tonic::async_trait]
impl ConsumerService for ConsumerApi {
    async fn get_agent_metrics(
        &self,
        request: Request<pb::GetAgentMetricsRequest>,
    ) -> Result<Response<pb::GetAgentMetricsResponse>, Status> {
        let r = request.into_inner();
        let window = self.window("window", &r.window)?;
        let filter = Filter::checked(r.agent, None, None)?;
        let agents = self
            .state
            .read()
            .agent_metrics(now_micros(), window, filter.agent.as_deref());
        Ok(Response::new(pb::GetAgentMetricsResponse {
            agents: agents.iter().map(convert::agent_metrics).collect(),
        }))
    }

    async fn list_recent_actions(
        &self,
        request: Request<pb::ListRecentActionsRequest>,
    ) -> Result<Response<pb::ListRecentActionsResponse>, Status> {
        let r = request.into_inner();
        let window = self.window("window", &r.window)?;
        let since = window.map_or(Micros::MIN, |w| now_micros() - w);
        let filter = Filter::checked(r.agent, r.action_type, r.correlation_id)?;
        let actions = self
            .state
            .read()
            .actions()
            .filter(|a| a.time >= since && filter.action(a))
            .take(limit(r.limit))
            .map(|a| convert::action(a))
            .collect();
        Ok(Response::new(pb::ListRecentActionsResponse { actions }))
    }

    async fn list_routing_decisions(
        &self,
        request: Request<pb::ListRoutingDecisionsRequest>,
    ) -> Result<Response<pb::ListRoutingDecisionsResponse>, Status> {
        let r = request.into_inner();
        let window = self.window("window", &r.window)?;
        if let Some(m) = r.min_confidence
            && !(0.0..=1.0).contains(&m)
        {
            return Err(invalid("min_confidence", "must be between 0 and 1"));
        }
        let since = window.map_or(Micros::MIN, |w| now_micros() - w);
        let filter = Filter {
            min_confidence: r.min_confidence,
            ..Filter::checked(r.agent, None, None)?
        };
        let decisions = self
            .state
            .read()
            .decisions()
            .filter(|d| d.time >= since && filter.decision(d))
            .take(limit(r.limit))
            .map(|d| convert::decision(d))
            .collect();
        Ok(Response::new(pb::ListRoutingDecisionsResponse {
            decisions,
        }))
    }

    async fn list_transformations(
        &self,
        request: Request<pb::ListTransformationsRequest>,
    ) -> Result<Response<pb::ListTransformationsResponse>, Status> {
        let r = request.into_inner();
        let filter = Filter::checked(r.agent, None, None)?;
        let transformations = self
            .state
            .read()
            .transformations()
            .filter(|t| filter.transformation(t))
            .take(limit(r.limit))
            .map(|t| convert::transformation(t))
            .collect();
        Ok(Response::new(pb::ListTransformationsResponse {
            transformations,
        }))
    }

    async fn list_performance_metrics(
        &self,
        request: Request<pb::ListPerformanceMetricsRequest>,
    ) -> Result<Response<pb::ListPerformanceMetricsResponse>, Status> {
        let r = request.into_inner();
        let state = self.state.read();
        Ok(Response::new(pb::ListPerformanceMetricsResponse {
            metrics: state
                .performance()
                .take(limit(r.limit))
                .map(|m| convert::performance(m))
                .collect(),
            stats: Some(convert::stats(&state.performance_stats(now_micros(), None))),
        }))
    }

    async fn get_performance_stats(
        &self,
        request: Request<pb::GetPerformanceStatsRequest>,
    ) -> Result<Response<pb::GetPerformanceStatsResponse>, Status> {
        let r = request.into_inner();
        let window = self.window("window", &r.window)?;
        let stats = self.state.read().performance_stats(now_micros(), window);
        Ok(Response::new(pb::GetPerformanceStatsResponse {
            stats: Some(convert::stats(&stats)),
        }))
    }

    async fn get_snapshot(
        &self,
        _request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let parts = {
            let state = self.state.read();
            // One sequence for both: the metrics publisher may publish (under a read lock of
            // its own) between two reads of it.
            let sequence = self.hub.last_seq();
            let status = pb::ConsumerStatus {
                last_sequence: sequence,
                ..self.status_with(&state)
            };
            snapshot::Parts {
                status: Some(status),
                ..self.snapshot_parts(&state, sequence, &Channels::ALL, &Filter::default())
            }
        };
        Ok(Response::new(pb::GetSnapshotResponse {
            snapshot: Some(parts.assemble(self.max_response_bytes)),
        }))
    }

    async fn get_consumer_status(
        &self,
        _request: Request<pb::GetConsumerStatusRequest>,
    ) -> Result<Response<pb::GetConsumerStatusResponse>, Status> {
        let status = self.status();
        Ok(Response::new(pb::GetConsumerStatusResponse {
            connected: status.connected,
            events_processed: status.events_processed,
            last_event_time: status.last_event_time,
            status: Some(status),
        }))
    }

    async fn stream_actions(
        &self,
        request: Request<pb::StreamActionsRequest>,
    ) -> Result<Response<BoxStream<pb::StreamActionsResponse>>, Status> {
        // Served by `ConsumerRoutes` from shared encodings; this generated entry point gives
        // the same messages, built field by field.
        let pushes = self.actions_stream(request.into_inner())?;
        Ok(Response::new(Box::pin(
            pushes.map(|push| push.map(|p| p.to_response())),
        )))
    }

    async fn stream_agent_metrics(
        &self,
        request: Request<pb::StreamAgentMetricsRequest>,
    ) -> Result<Response<BoxStream<pb::StreamAgentMetricsResponse>>, Status> {
        self.check_streams()?;
        let r = request.into_inner();
        let filter = Filter::checked(r.agent, None, None)?;
        // Subscribed and read under one read lock, as Subscribe's snapshot: metrics published
        // after the subscription were computed from this state or a newer one, never older.
        let (sub, initial) = {
            let state = self.state.read();
            let sub = self
                .hub
                .subscribe(None, filter.agent.as_deref())
                .map_err(|e| Status::internal(e.to_string()))?;
            let initial = followed_metrics(&state, &filter);
            (sub, initial)
        };
        let follower = Follower::new(sub.live, self.max_push);
        let first = metrics_pushes(initial, 0);
        let (state, hub) = (self.state.clone(), self.hub.clone());
        // Figures published up to this sequence are older than those a lag notice carried.
        let mut superseded = 0;
        let stream = follow(
            first,
            Vec::new(),
            follower,
            self.shutdown.clone(),
            move |feed, out| match feed {
                Feed::Updates(updates) => {
                    let agents = latest_per_agent(updates.iter().filter_map(|u| match &u.kind {
                        UpdateKind::AgentMetrics(m) if u.seq > superseded && filter.metrics(m) => {
                            Some(&**m)
                        }
                        _ => None,
                    }));
                    if !agents.is_empty() {
                        out.extend(metrics_pushes(agents, 0));
                    }
                }
                // The dropped updates may have held the last figures of an agent that will
                // not change again (or of one whose events expired): the lag notice carries
                // every followed agent's current figures, as the first message did.
                Feed::Lagged { missed, .. } => {
                    // Under the read lock, so the figures are those of sequence `superseded`
                    // (updates are published under it too): the chunks still queued for this
                    // stream, published before, must not follow them with older figures.
                    let state = state.read();
                    superseded = hub.last_seq();
                    let agents = followed_metrics(&state, &filter);
                    drop(state);
                    out.extend(metrics_pushes(agents, missed));
                }
            },
        );
        Ok(Response::new(stream))
    }

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<BoxStream<pb::SubscribeResponse>>, Status> {
        // Served by `ConsumerRoutes` with actions from shared encodings; this generated
        // entry point gives the same messages, built field by field.
        let pushes = self.subscribe_stream(request.into_inner())?;
        Ok(Response::new(Box::pin(
            pushes.map(|push| push.map(SubscribePush::into_response)),
        )))
    }
}

/// The current metrics of the agents `filter` follows (all without an agent filter).
fn followed_metrics(state: &State, filter: &Filter) -> Vec<pb::AgentMetrics> {
    state
        .agent_metrics(now_micros(), None, filter.agent.as_deref())
        .iter()
        .map(convert::agent_metrics)
        .collect()
}

/// `agents` as `StreamAgentMetrics` pushes of at most [`crate::wire::MAX_PUSH_BYTES`] each
/// (every agent's figures, at the start or after a lag notice, can be far more than a
/// client accepts in one message), the first carrying `lagged`; one push even when empty.
fn metrics_pushes(
    mut agents: Vec<pb::AgentMetrics>,
    lagged: u64,
) -> Vec<pb::StreamAgentMetricsResponse> {
    let lens = agents.iter().map(|m| prost::Message::encoded_len(m) + 8);
    let starts = crate::wire::push_starts(lens, crate::wire::MAX_PUSH_BYTES);
    let mut groups: Vec<_> = starts
        .iter()
        .rev()
        .map(|&at| agents.split_off(at))
        .collect();
    groups.push(agents);
    groups
        .into_iter()
        .rev()
        .enumerate()
        .map(|(i, agents)| pb::StreamAgentMetricsResponse {
            agents,
            lagged: if i == 0 { lagged } else { 0 },
        })
        .collect()
}

/// Each agent's newest figures, in the order of their last update: a push drained from
/// several publisher ticks carries an agent once.
fn latest_per_agent<'a>(
    metrics: impl Iterator<Item = &'a pb::AgentMetrics>,
) -> Vec<pb::AgentMetrics> {
    let all: Vec<&pb::AgentMetrics> = metrics.collect();
    let mut seen = std::collections::HashSet::new();
    let mut newest_first: Vec<pb::AgentMetrics> = all
        .into_iter()
        .rev()
        .filter(|m| seen.insert(m.agent.as_str()))
        .cloned()
        .collect();
    newest_first.reverse();
    newest_first
}

fn lag_notice(missed: u64, last_missed: u64) -> SubscribePush {
    SubscribePush::Message(Box::new(pb::SubscribeResponse {
        sequence: last_missed,
        update: Some(pb::subscribe_response::Update::Lagged(pb::Lagged {
            missed,
        })),
    }))
}

/// The `Subscribe` message of `u`, if the subscription's channels and filters accept it.
/// Actions are written from their shared encoding (`crate::wire`).
fn subscribe_message(u: &Update, ch: &Channels, f: &Filter) -> Option<SubscribePush> {
    use pb::subscribe_response::Update as U;
    let update = match &u.kind {
        UpdateKind::Event(Event::AgentAction(a)) if ch.has(pb::Channel::Actions) && f.action(a) => {
            return Some(SubscribePush::Action {
                sequence: u.seq,
                action: a.clone(),
            });
        }
        UpdateKind::Event(Event::RoutingDecision(d))
            if ch.has(pb::Channel::Routing) && f.decision(d) =>
        {
            U::RoutingDecision(convert::decision(d))
        }
        UpdateKind::Event(Event::Transformation(t))
            if ch.has(pb::Channel::Transformations) && f.transformation(t) =>
        {
            U::Transformation(convert::transformation(t))
        }
        UpdateKind::Event(Event::PerformanceMetric(m))
            if ch.has(pb::Channel::Performance) && f.performance(m) =>
        {
            U::PerformanceMetric(convert::performance(m))
        }
        UpdateKind::AgentMetrics(m) if ch.has(pb::Channel::Metrics) && f.metrics(m) => {
            U::AgentMetrics((**m).clone())
        }
        UpdateKind::Status(s) if ch.has(pb::Channel::System) => U::ConsumerStatus((**s).clone()),
        _ => return None,
    };
    Some(SubscribePush::Message(Box::new(pb::SubscribeResponse {
        sequence: u.seq,
        update: Some(update),
    })))
}

/// Publishes coalesced agent-metric updates and consumer-status changes until shutdown.
pub async fn publish_live_updates(
    api: Arc<ConsumerApi>,
    dirty: Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected: Option<bool> = None;
    loop {
        tokio::select! {
            _ = api.shutdown.triggered() => return,
            _ = tick.tick() => {}
        }
        let changed: Vec<String> = std::mem::take(&mut *dirty.lock()).into_iter().collect();
        if !changed.is_empty() {
            let now = now_micros();
            // Published under the read lock they were computed under (state, then hub: the
            // order ingest and Subscribe use): ingest cannot apply newer events in between,
            // so a subscriber whose snapshot is newer never receives these older figures.
            let state = api.state.read();
            let metrics: Vec<UpdateKind> = changed
                .iter()
                .map(|a| {
                    // An agent whose events all expired is pushed once with zero counts.
                    let m = match state.agent_metrics(now, None, Some(a)).pop() {
                        Some(m) => convert::agent_metrics(&m),
                        None => pb::AgentMetrics {
                            agent: a.clone(),
                            ..Default::default()
                        },
                    };
                    UpdateKind::AgentMetrics(Arc::new(m))
                })
                .collect();
            api.hub.publish(metrics);
            drop(state);
        }
        let now_connected = api.broker.connected();
        if connected != Some(now_connected) {
            connected = Some(now_connected);
            // Read and published under the state's read lock, as the metrics above: a
            // Subscribe snapshot (taken under it too) is never followed by older counters.
            let state = api.state.read();
            let status = api.status_with(&state);
            api.hub.publish([UpdateKind::Status(Arc::new(status))]);
            drop(state);
        }
    }
}

/// The `ConsumerService` as served over gRPC: the generated server, except that
/// `StreamActions` and `Subscribe` write actions from their shared encodings
/// ([`crate::wire`]; the same messages on the wire).
pub type ConsumerRoutes = WithMethod<
    WithMethod<
        ConsumerServiceServer<ConsumerApi>,
        StreamingMethod<StreamActionsEncoded, pb::StreamActionsRequest>,
    >,
    StreamingMethod<SubscribeEncoded, pb::SubscribeRequest>,
>;

const STREAM_ACTIONS_PATH: &str = "/omnibus.consumer.v1.ConsumerService/StreamActions";
const SUBSCRIBE_PATH: &str = "/omnibus.consumer.v1.ConsumerService/Subscribe";

/// The generated server with the encoded `StreamActions` and `Subscribe` in front of it.
pub fn routes(api: Arc<ConsumerApi>, args: &svc_kit::ServerArgs) -> ConsumerRoutes {
    let generated = svc_kit::grpc_service!(ConsumerServiceServer::from_arc(api.clone()), args);
    let actions = StreamingMethod::new(STREAM_ACTIONS_PATH, StreamActionsEncoded(api.clone()));
    let subscribe = StreamingMethod::new(SUBSCRIBE_PATH, SubscribeEncoded(api));
    WithMethod::new(WithMethod::new(generated, actions, args), subscribe, args)
}

/// A stream answered from shared encodings, by `ConsumerApi::$stream`.
macro_rules! encoded_stream {
    ($name:ident, $request:ty, $push:ty, $stream:ident) => {
        #[derive(Clone)]
        pub struct $name(Arc<ConsumerApi>);

        impl tonic::server::ServerStreamingService<$request> for $name {
            type Response = $push;
            type ResponseStream = BoxStream<$push>;
            type Future = BoxFuture<Response<BoxStream<$push>>, Status>;

            fn call(&mut self, request: Request<$request>) -> Self::Future {
                let api = self.0.clone();
                Box::pin(async move { api.$stream(request.into_inner()).map(Response::new) })
            }
        }
    };
}

encoded_stream!(
    StreamActionsEncoded,
    pb::StreamActionsRequest,
    ActionsPush,
    actions_stream
);
encoded_stream!(
    SubscribeEncoded,
    pb::SubscribeRequest,
    SubscribePush,
    subscribe_stream
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metrics_push_carries_each_agent_once_with_its_newest_figures() {
        let m = |agent: &str, total: u64| pb::AgentMetrics {
            agent: agent.into(),
            total_requests: total,
            ..Default::default()
        };
        let drained = [m("a", 1), m("b", 1), m("a", 2), m("c", 1), m("b", 3)];
        let pushed: Vec<(String, u64)> = latest_per_agent(drained.iter())
            .into_iter()
            .map(|m| (m.agent, m.total_requests))
            .collect();
        assert_eq!(pushed, [("a".into(), 2), ("c".into(), 1), ("b".into(), 3)]);
        assert!(latest_per_agent(std::iter::empty()).is_empty());
    }

    #[test]
    fn metrics_pushes_stay_within_the_byte_bound() {
        let agents: Vec<pb::AgentMetrics> = (0..30_000)
            .map(|i| pb::AgentMetrics {
                agent: format!("agent-{i:05}-{}", "x".repeat(40)),
                total_requests: i,
                ..Default::default()
            })
            .collect();
        let pushes = metrics_pushes(agents.clone(), 7);
        assert!(pushes.len() > 1, "{} pushes", pushes.len());
        for (i, p) in pushes.iter().enumerate() {
            assert!(prost::Message::encoded_len(p) <= crate::wire::MAX_PUSH_BYTES);
            assert_eq!(p.lagged, if i == 0 { 7 } else { 0 });
        }
        let joined: Vec<_> = pushes.into_iter().flat_map(|p| p.agents).collect();
        assert_eq!(joined, agents);
        let empty = metrics_pushes(Vec::new(), 0);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].agents.is_empty());
    }

    #[test]
    fn text_filters_are_bounded() {
        let at = "x".repeat(MAX_FILTER_BYTES);
        assert_eq!(filter_text("agent", Some(at.clone())).unwrap(), Some(at));
        assert_eq!(filter_text("agent", None).unwrap(), None);
        let e = filter_text("agent", Some("é".repeat(MAX_FILTER_BYTES / 2 + 1))).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().starts_with("agent: 1026 bytes"), "{e:?}");
    }

    #[test]
    fn channels_are_read_as_a_set() {
        use pb::Channel as C;
        let all = Channels::from_request(&[]).unwrap();
        assert!(all.has(C::Performance) && all.has(C::System) && !all.only(C::Performance));
        assert_eq!(
            Channels::from_request(&[C::Actions as i32, C::All as i32]).unwrap(),
            all
        );
        let perf = Channels::from_request(&[C::Performance as i32, C::Performance as i32]).unwrap();
        assert!(perf.only(C::Performance) && perf.has(C::Performance) && !perf.has(C::Actions));
        let two = Channels::from_request(&[C::Performance as i32, C::Metrics as i32]).unwrap();
        assert!(!two.only(C::Performance) && two.has(C::Metrics));
        for bad in [0, 99, -1] {
            let e = Channels::from_request(&[bad]).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            // Before or after CHANNEL_ALL, an unknown channel is an error.
            for list in [[C::All as i32, bad], [bad, C::All as i32]] {
                let e = Channels::from_request(&list).unwrap_err();
                assert_eq!(e.code(), tonic::Code::InvalidArgument, "{list:?}");
            }
        }
    }
    use crate::events::{self, EventKind};

    /// A mistyped path would silently leave the method to the generated server.
    #[test]
    fn the_encoded_streams_are_server_streaming_methods_of_the_service() {
        for path in [STREAM_ACTIONS_PATH, SUBSCRIBE_PATH] {
            assert_eq!(
                omnibus_proto::method_streaming(path),
                Some((false, true)),
                "{path}"
            );
        }
        assert_eq!(
            omnibus_proto::method_streaming("/omnibus.consumer.v1.ConsumerService/Nope"),
            None
        );
    }

    fn event(kind: EventKind, json: &str) -> UpdateKind {
        UpdateKind::Event(events::parse(kind, json.as_bytes(), 0).expect("valid event"))
    }

    /// Routing by agent (the hub's audience) loses nothing an agent filter accepts: with only
    /// an agent filter and every channel, a Subscribe stream accepts exactly the updates routed
    /// to the agent.
    #[test]
    fn an_agent_filter_accepts_exactly_the_updates_routed_to_its_agent() {
        let kinds = vec![
            event(
                EventKind::AgentAction,
                r#"{"agent_name":"a","action_type":"tool_call","correlation_id":"c"}"#,
            ),
            event(
                EventKind::AgentAction,
                r#"{"agent_name":"b","action_type":"tool_call"}"#,
            ),
            event(EventKind::RoutingDecision, r#"{"selected_agent":"a"}"#),
            event(EventKind::RoutingDecision, r#"{"selected_agent":"c"}"#),
            event(
                EventKind::Transformation,
                r#"{"source_agent":"a","target_agent":"b"}"#,
            ),
            event(
                EventKind::Transformation,
                r#"{"source_agent":"c","target_agent":"c"}"#,
            ),
            event(
                EventKind::PerformanceMetric,
                r#"{"routing_duration_ms":1,"cache_hit":false,"trigger_match_strategy":"exact","correlation_id":"c"}"#,
            ),
            UpdateKind::AgentMetrics(Arc::new(pb::AgentMetrics {
                agent: "b".into(),
                ..Default::default()
            })),
            UpdateKind::Status(Arc::new(pb::ConsumerStatus::default())),
        ];
        let all = Channels::from_request(&[]).unwrap();
        let mut accepted_somewhere = 0;
        for agent in ["a", "b", "c", "z"] {
            let filter = Filter {
                agent: Some(agent.into()),
                ..Default::default()
            };
            let accepted: Vec<bool> = kinds
                .iter()
                .enumerate()
                .map(|(i, kind)| {
                    let u = Update::new(i as u64 + 1, kind.clone());
                    subscribe_message(&u, &all, &filter).is_some()
                })
                .collect();
            let routed: Vec<bool> = kinds.iter().map(|k| k.audience().includes(agent)).collect();
            assert_eq!(accepted, routed, "agent {agent}");
            accepted_somewhere += accepted.iter().filter(|a| **a).count();
        }
        // a: action, decision, transformation, status; b: action, transformation, metrics,
        // status; c: decision, transformation, status; z: status.
        assert_eq!(accepted_somewhere, 4 + 4 + 3 + 1);
        // Unfiltered, the performance metric is accepted too (it is on the shared channel).
        let u = Update::new(7, kinds[6].clone());
        assert!(subscribe_message(&u, &all, &Filter::default()).is_some());
    }

    /// An API over `state` with streams on and no broker or ingest behind it.
    fn api_over(state: State) -> ConsumerApi {
        ConsumerApi {
            broker: Arc::new(BrokerStatus::default()),
            state: Arc::new(RwLock::new(state)),
            hub: Arc::new(Hub::new(100, 16)),
            ingest: Arc::new(IngestStatus::new(Default::default())),
            real_time: true,
            max_push: 100,
            max_response_bytes: 4 << 20,
            shutdown: Shutdown::new(),
        }
    }

    /// `publish_live_updates` coalesces: however often an agent changes, its figures are
    /// published at most once per tick, and the ticks are at least about the interval apart.
    /// Checked as a count over the whole run, which a busy machine can only lower (late ticks
    /// lengthen the run, never bring two ticks closer than tokio's interval allows, 5 ms less
    /// than the period): with the agent marked changed every millisecond, at most one
    /// publication per interval of the run plus the first (without coalescing: about 1,000).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_metrics_are_published_at_most_once_per_interval() {
        const INTERVAL: Duration = Duration::from_millis(100);
        // Every update published is still in the ring afterwards, to be counted.
        let api = Arc::new(ConsumerApi {
            hub: Arc::new(Hub::new(100_000, 16)),
            ..api_over(State::new(Default::default()))
        });
        let dirty = Arc::new(parking_lot::Mutex::new(std::collections::HashSet::new()));
        let start = std::time::Instant::now();
        let publisher = tokio::spawn(publish_live_updates(api.clone(), dirty.clone(), INTERVAL));
        let mut marks = 0u64;
        while start.elapsed() < INTERVAL * 10 {
            dirty.lock().insert("a".to_string());
            marks += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The last mark is taken by a tick, which publishes it before it next waits.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !dirty.lock().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the last change never taken"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        api.shutdown.trigger();
        publisher.await.expect("the publisher ran to shutdown");
        let run = start.elapsed();

        let all = api.hub.subscribe(Some(0), None).expect("from the start");
        assert_eq!(all.missed, 0, "every update still buffered");
        let published = all
            .backlog
            .iter()
            .filter(|u| matches!(&u.kind, UpdateKind::AgentMetrics(m) if m.agent == "a"))
            .count() as u128;
        let most = run.as_micros() / (INTERVAL - Duration::from_millis(10)).as_micros() + 1;
        assert!(
            (1..=most).contains(&published),
            "{published} publications of agent a in {run:?} ({marks} changes, \
             {INTERVAL:?} interval): at most {most}"
        );
    }

    /// An API whose subscribers' queues hold one batch (the second publish in a row makes
    /// them lag), over a state where agent `a` made one routing decision.
    fn lagging_api() -> ConsumerApi {
        let now = now_micros();
        let mut state = State::new(Default::default());
        let decision = events::parse(
            EventKind::RoutingDecision,
            br#"{"id":"1","selected_agent":"a","routing_time_ms":5}"#,
            now,
        )
        .expect("a valid decision");
        state.apply(&decision, now);
        ConsumerApi {
            hub: Arc::new(Hub::new(100, 1)),
            ..api_over(state)
        }
    }

    /// An agent-metrics update with `total` requests.
    fn metrics_update(agent: &str, total: u64) -> UpdateKind {
        UpdateKind::AgentMetrics(Arc::new(pb::AgentMetrics {
            agent: agent.into(),
            total_requests: total,
            ..Default::default()
        }))
    }

    /// After a `StreamAgentMetrics` lag notice (which carries every agent's current figures),
    /// figures published before it and still queued for the stream are not pushed: they are
    /// older than the notice's.
    #[tokio::test]
    async fn a_metrics_lag_notice_is_not_followed_by_older_figures() {
        use futures::FutureExt;
        let api = lagging_api();
        let mut stream = api
            .stream_agent_metrics(Request::new(pb::StreamAgentMetricsRequest::default()))
            .await
            .expect("streams are on")
            .into_inner();
        let first = stream
            .next()
            .await
            .expect("a first push")
            .expect("no error");
        assert_eq!(first.agents.len(), 1);
        let m = metrics_update;
        // A queue of one batch: the first two are dropped, the third is kept for after the
        // notice, and it was published before the notice's figures were read.
        api.hub.publish([m("a", 5)]);
        api.hub.publish([m("b", 1)]);
        api.hub.publish([m("a", 6)]);
        let notice = stream
            .next()
            .await
            .expect("a lag notice")
            .expect("no error");
        assert_eq!(notice.lagged, 2);
        let current: Vec<_> = notice
            .agents
            .iter()
            .map(|m| (&*m.agent, m.total_requests))
            .collect();
        assert_eq!(current, [("a", 1)], "the state's figures");
        assert!(
            stream.next().now_or_never().is_none(),
            "nothing older follows the notice"
        );
        api.hub.publish([m("a", 7)]);
        let next = stream.next().await.expect("a push").expect("no error");
        assert_eq!(next.agents[0].total_requests, 7);
    }

    /// A `Subscribe` lag notice is followed by the current metrics of the followed agents and
    /// the current status (the missed updates may have held their last change), with the
    /// notice's sequence; queued figures older than those are not sent after them.
    #[tokio::test]
    async fn a_subscribe_lag_notice_is_followed_by_current_metrics_and_status() {
        use futures::FutureExt;
        use pb::subscribe_response::Update as U;
        let api = lagging_api();
        let mut stream = api
            .subscribe_stream(pb::SubscribeRequest {
                channels: vec![pb::Channel::Metrics as i32, pb::Channel::System as i32],
                ..Default::default()
            })
            .expect("a valid request");
        let m = metrics_update;
        api.hub.publish([m("a", 5)]);
        api.hub.publish([m("b", 1)]);
        api.hub.publish([m("a", 6)]);
        let mut next = async || {
            stream
                .next()
                .await
                .expect("a message")
                .expect("no error")
                .into_response()
        };
        let notice = next().await;
        assert_eq!(notice.update, Some(U::Lagged(pb::Lagged { missed: 2 })));
        let metrics = next().await;
        assert_eq!(metrics.sequence, notice.sequence);
        let Some(U::AgentMetrics(a)) = metrics.update else {
            panic!("metrics after the notice: {metrics:?}")
        };
        assert_eq!(
            (a.agent.as_str(), a.total_requests),
            ("a", 1),
            "the state's figures"
        );
        let status = next().await;
        assert_eq!(status.sequence, notice.sequence);
        let Some(U::ConsumerStatus(s)) = status.update else {
            panic!("the status after the metrics: {status:?}")
        };
        assert_eq!(s.last_sequence, 3);
        assert!(
            stream.next().now_or_never().is_none(),
            "the older queued figures are not sent"
        );
        api.hub.publish([m("a", 7)]);
        let newer = stream.next().await.expect("a message").expect("no error");
        let newer = newer.into_response();
        assert_eq!(newer.sequence, 4);
        assert!(matches!(newer.update, Some(U::AgentMetrics(m)) if m.total_requests == 7));
    }

    /// A confidence outside [0, 1] (a `95` meant as a percentage) is not a probability: it is
    /// out of the averages, and it passes no `min_confidence`, in ListRoutingDecisions,
    /// Subscribe's snapshot and its live updates alike.
    #[tokio::test]
    async fn min_confidence_passes_only_plausible_confidences() {
        use pb::subscribe_response::Update as U;
        let now = now_micros();
        let decision = |id: &str, confidence: &str| {
            let payload =
                format!(r#"{{"id":"{id}","selected_agent":"x","confidence_score":{confidence}}}"#);
            events::parse(EventKind::RoutingDecision, payload.as_bytes(), now)
                .expect("a valid decision")
        };
        // One event time: listed newest first means by id, descending.
        let sent = [
            decision("a", "95"),
            decision("b", "1.5"),
            decision("c", "-0.5"),
            decision("d", "1"),
            decision("e", "0.995"),
            decision("f", "0.5"),
            decision("g", "null"),
            decision("h", "0"),
        ];
        let mut state = State::new(Default::default());
        for e in &sent {
            state.apply(e, now);
        }
        let api = api_over(state);
        let cases: [(f64, &[&str]); 3] = [
            (0.99, &["e", "d"]),
            (0.0, &["h", "f", "e", "d"]),
            (1.0, &["d"]),
        ];
        let ids = |ds: Vec<pb::RoutingDecision>| ds.into_iter().map(|d| d.id).collect::<Vec<_>>();
        let mut streams = Vec::new();
        for (min, want) in cases {
            let listed = api
                .list_routing_decisions(Request::new(pb::ListRoutingDecisionsRequest {
                    min_confidence: Some(min),
                    ..Default::default()
                }))
                .await
                .expect("a valid request")
                .into_inner()
                .decisions;
            assert_eq!(ids(listed), want, "ListRoutingDecisions, min {min}");
            let mut stream = api
                .subscribe_stream(pb::SubscribeRequest {
                    channels: vec![pb::Channel::Routing as i32],
                    min_confidence: Some(min),
                    include_snapshot: true,
                    ..Default::default()
                })
                .expect("a valid request");
            let first = stream.next().await.expect("a snapshot").expect("no error");
            let Some(U::Snapshot(snapshot)) = first.into_response().update else {
                panic!("the snapshot first");
            };
            assert_eq!(ids(snapshot.routing_decisions), want, "snapshot, min {min}");
            streams.push((min, want, stream));
        }
        // Live, in the order published (as ingest publishes them), then an end mark.
        let end = decision("z", "1");
        api.hub
            .publish(sent.iter().chain([&end]).cloned().map(UpdateKind::Event));
        for (min, want, mut stream) in streams {
            let mut live = Vec::new();
            while live.last().is_none_or(|id| id != "z") {
                let push = stream
                    .next()
                    .await
                    .expect("live updates")
                    .expect("no error");
                match push.into_response().update {
                    Some(U::RoutingDecision(d)) => live.push(d.id),
                    other => panic!("{other:?}"),
                }
            }
            let mut want: Vec<&str> = want.iter().rev().copied().collect();
            want.push("z");
            assert_eq!(live, want, "live, min {min}");
        }
        // Nor one that is not finite (the parser reads the bare `NaN` and `Infinity` as
        // absent, but the rule does not rest on that).
        let filter = Filter {
            min_confidence: Some(0.0),
            ..Default::default()
        };
        for c in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(!filter.confidence(Some(c)), "{c}");
        }
    }
}
