//! Snapshots of the state (`GetSnapshot`, the first message of a `Subscribe`), bounded by the
//! largest response the server sends.
//!
//! The buffers are bounded by bytes each (`--max-buffer-bytes`), and together they can hold
//! more than one response may carry (`--max-send-message-size`): large events (a routing
//! decision's `context`, an action's `action_details`) fill them long before their counts do.
//! Sent whole, such a snapshot would fail with OUT_OF_RANGE for as long as those events stay
//! buffered, and every dashboard starting from one (`omnibus top`) with it. So a snapshot
//! keeps each list's newest events, taking the lists in turn, until the next one would not
//! fit, and says so (`truncated`).
//!
//! The parts are gathered under the state's read lock as shared references (the events are
//! immutable) and converted to protobuf after it is released, so a snapshot of large buffers
//! does not hold ingest up while it copies them.

use std::sync::Arc;

use omnibus_proto::consumer::v1 as pb;
use prost::Message;
use prost::encoding::encoded_len_varint;

use crate::convert;
use crate::events::{AgentAction, PerformanceMetric, RoutingDecision, Transformation};

/// What wraps a snapshot in a response, at most: the `GetSnapshotResponse` or
/// `SubscribeResponse` field's tag and length, and a `SubscribeResponse`'s sequence.
const ENVELOPE_BYTES: usize = 32;

/// A snapshot's contents, newest first, as read under the state's lock.
#[derive(Default)]
pub struct Parts {
    pub agents: Vec<pb::AgentMetrics>,
    pub actions: Vec<Arc<AgentAction>>,
    pub decisions: Vec<Arc<RoutingDecision>>,
    pub transformations: Vec<Arc<Transformation>>,
    pub performance: Vec<Arc<PerformanceMetric>>,
    pub stats: Option<pb::PerformanceStats>,
    pub status: Option<pb::ConsumerStatus>,
    pub sequence: u64,
}

impl Parts {
    /// The snapshot, in a response of at most `max_response_bytes`: the agents, the stats
    /// and the status whole, and of each event list the newest events that fit, the lists
    /// taking an event in turn (an event that does not fit ends its list).
    pub fn assemble(self, max_response_bytes: usize) -> pb::Snapshot {
        let mut snapshot = pb::Snapshot {
            agents: self.agents,
            performance_stats: self.stats,
            status: self.status,
            sequence: self.sequence,
            ..Default::default()
        };
        let mut room = Room {
            left: max_response_bytes
                .saturating_sub(ENVELOPE_BYTES)
                .saturating_sub(snapshot.encoded_len()),
            cut: false,
        };
        // Whether each list may still take events: one that does not fit ends its list.
        let mut open = [true; 4];
        loop {
            let mut took = false;
            took |= room.take(
                &mut open[0],
                &self.actions,
                convert::action,
                &mut snapshot.actions,
            );
            took |= room.take(
                &mut open[1],
                &self.decisions,
                convert::decision,
                &mut snapshot.routing_decisions,
            );
            took |= room.take(
                &mut open[2],
                &self.transformations,
                convert::transformation,
                &mut snapshot.transformations,
            );
            took |= room.take(
                &mut open[3],
                &self.performance,
                convert::performance,
                &mut snapshot.performance_metrics,
            );
            if !took {
                break;
            }
        }
        snapshot.truncated = room.cut;
        snapshot
    }
}

/// Bytes still free in the response, and whether an event was left out.
struct Room {
    left: usize,
    cut: bool,
}

impl Room {
    /// Takes the event of `events` after those already in `out`, converted, if its list is
    /// `open` and it fits; whether one was taken. One that does not fit closes the list.
    fn take<E, P: Message>(
        &mut self,
        open: &mut bool,
        events: &[Arc<E>],
        convert: fn(&E) -> P,
        out: &mut Vec<P>,
    ) -> bool {
        if !*open {
            return false;
        }
        let Some(event) = events.get(out.len()) else {
            *open = false;
            return false;
        };
        let message = convert(event);
        let len = message.encoded_len();
        // The repeated field's one-byte tag (fields 2 to 5), the length, the message.
        let cost = 1 + encoded_len_varint(len as u64) + len;
        if cost > self.left {
            *open = false;
            self.cut = true;
            return false;
        }
        self.left -= cost;
        out.push(message);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{self, Event, EventKind};

    fn parsed(kind: EventKind, json: String) -> Event {
        events::parse(kind, json.as_bytes(), 1_000_000).expect("a valid event")
    }

    /// `n` of each kind, newest first, each carrying `pad` bytes of text.
    fn parts(n: usize, pad: usize) -> Parts {
        let text = "x".repeat(pad);
        let mut parts = Parts {
            sequence: 9,
            agents: vec![pb::AgentMetrics {
                agent: "a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        for i in 0..n {
            match parsed(
                EventKind::AgentAction,
                format!(
                    r#"{{"id":"a{i}","agent_name":"a","action_type":"t","action_name":"{text}"}}"#
                ),
            ) {
                Event::AgentAction(a) => parts.actions.push(a),
                other => panic!("{other:?}"),
            }
            match parsed(
                EventKind::RoutingDecision,
                format!(r#"{{"id":"d{i}","selected_agent":"a","user_request":"{text}"}}"#),
            ) {
                Event::RoutingDecision(d) => parts.decisions.push(d),
                other => panic!("{other:?}"),
            }
        }
        parts
    }

    fn response_len(snapshot: &pb::Snapshot) -> usize {
        pb::SubscribeResponse {
            sequence: u64::MAX,
            update: Some(pb::subscribe_response::Update::Snapshot(snapshot.clone())),
        }
        .encoded_len()
    }

    #[test]
    fn a_snapshot_that_fits_is_whole() {
        let snapshot = parts(50, 100).assemble(usize::MAX);
        assert!(!snapshot.truncated);
        assert_eq!(snapshot.actions.len(), 50);
        assert_eq!(snapshot.routing_decisions.len(), 50);
        assert_eq!(snapshot.agents.len(), 1);
        assert_eq!(snapshot.sequence, 9);
        // Its own size (and the envelope's reserve) is enough.
        let len = response_len(&snapshot);
        let again = parts(50, 100).assemble(len + ENVELOPE_BYTES);
        assert!(!again.truncated, "{len}");
    }

    #[test]
    fn a_snapshot_too_large_keeps_the_newest_of_each_list_within_the_limit() {
        for limit in [2_000, 10_000, 50_000, 123_457] {
            let snapshot = parts(100, 1_000).assemble(limit);
            assert!(snapshot.truncated, "{limit}");
            assert!(
                response_len(&snapshot) <= limit,
                "{limit}: {}",
                response_len(&snapshot)
            );
            // The newest of each list, in order, without gaps; the lists shared the room.
            let ids: Vec<&str> = snapshot.actions.iter().map(|a| a.id.as_str()).collect();
            let want: Vec<String> = (0..ids.len()).map(|i| format!("a{i}")).collect();
            assert_eq!(ids, want, "{limit}");
            let decisions = snapshot.routing_decisions.len();
            assert!(
                ids.len().abs_diff(decisions) <= 1,
                "{limit}: {} / {decisions}",
                ids.len()
            );
            assert_eq!(snapshot.agents.len(), 1, "the agents are whole");
        }
        // Room for nothing but the agents: empty lists, still a valid snapshot.
        let snapshot = parts(10, 1_000).assemble(100);
        assert!(snapshot.truncated && snapshot.actions.is_empty());
    }
}
