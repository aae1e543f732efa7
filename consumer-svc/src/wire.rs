//! `StreamActions` pushes and `Subscribe` action messages written from action encodings
//! shared by every subscriber.
//!
//! Without this, each of N subscribers converts every action it receives into a
//! `pb::AgentAction` (a string copy per field) and encodes it: N conversions and encodings
//! per action, which with 1,000 unfiltered subscribers is most of the service's work. Here
//! an action is encoded once, by the first push that carries it, and kept with the action
//! ([`Memo`]); every push copies those bytes into its message. The bytes are exactly what
//! prost writes for `convert::action(a)`, and a push is exactly the encoding of the
//! equivalent `pb::StreamActionsResponse` (tested below), so clients see the same messages.

use std::sync::{Arc, OnceLock};

use bytes::{Buf, BufMut};
use omnibus_proto::consumer::v1 as pb;
use prost::Message;
use prost::encoding::{
    DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len, uint64,
};

use crate::convert;
use crate::events::{AgentAction, Event};
use crate::hub::{Update, UpdateKind, Updates};

/// `repeated AgentAction actions = 1` and `uint64 lagged = 2` of `StreamActionsResponse`.
const ACTIONS_FIELD: u32 = 1;
const LAGGED_FIELD: u32 = 2;

/// Writes `message` (an encoded message) as field `tag`.
fn put_message(tag: u32, message: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(message.len() as u64, buf);
    buf.put_slice(message);
}

/// The encoded length of `message` as field `tag`.
fn message_len(tag: u32, message: &[u8]) -> usize {
    key_len(tag) + encoded_len_varint(message.len() as u64) + message.len()
}

/// Writes a proto3 `uint64` field (nothing when it is 0, as prost does).
fn put_uint64(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        uint64::encode(tag, &value, buf);
    }
}

/// The encoded length of a proto3 `uint64` field.
fn uint64_len(tag: u32, value: u64) -> usize {
    if value != 0 {
        uint64::encoded_len(tag, &value)
    } else {
        0
    }
}

/// An encoding computed on first use and shared by every clone of the `Arc` holding it.
/// It is a cache, not part of the value: it compares equal to any other memo, and a clone
/// of the value starts without it.
#[derive(Default)]
pub struct Memo(OnceLock<Box<[u8]>>);

impl Memo {
    fn get_or_encode(&self, encode: impl FnOnce() -> Vec<u8>) -> &[u8] {
        self.0.get_or_init(|| encode().into_boxed_slice())
    }
}

impl Clone for Memo {
    fn clone(&self) -> Self {
        Memo::default()
    }
}

impl PartialEq for Memo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

/// The `pb::AgentAction` encoding of `a`, computed once per action.
pub fn action_bytes(a: &AgentAction) -> &[u8] {
    a.wire.get_or_encode(|| convert::action(a).encode_to_vec())
}

/// One `StreamActions` push: the actions of `updates` that `keep` accepts (in order), or a
/// lag notice. Encodes like `pb::StreamActionsResponse`; only ever encoded (decoding one
/// skips every field).
pub struct ActionsPush {
    updates: Updates,
    keep: Arc<dyn Fn(&AgentAction) -> bool + Send + Sync>,
    lagged: u64,
    /// The encoded length of the kept actions, found while building the push (`encoded_len`
    /// is asked before every encoding).
    actions_len: usize,
}

/// Largest push, in encoded bytes, unless one action alone is larger. gRPC clients refuse
/// messages over 4 MiB by default (tonic, grpc-go, grpc-java): a subscriber that is behind,
/// taking `--max-push` large actions at once, must not be sent one it cannot read.
pub const MAX_PUSH_BYTES: usize = 1 << 20;

/// Items of encoded lengths `lens`, in order, grouped greedily into pushes of at most `max`
/// bytes (an item longer than that alone): where each push after the first starts. Items of
/// length 0 (left out of the push) stay with the push before them.
pub fn push_starts(lens: impl IntoIterator<Item = usize>, max: usize) -> Vec<usize> {
    let (mut starts, mut len) = (Vec::new(), 0);
    for (position, n) in lens.into_iter().enumerate() {
        if n == 0 {
            continue;
        }
        if len > 0 && len + n > max {
            starts.push(position);
            len = 0;
        }
        len += n;
    }
    starts
}

/// The action `u` carries, when `keep` accepts it.
fn kept<'u>(u: &'u Update, keep: &dyn Fn(&AgentAction) -> bool) -> Option<&'u AgentAction> {
    match &u.kind {
        UpdateKind::Event(Event::AgentAction(a)) if keep(a) => Some(&**a),
        _ => None,
    }
}

impl ActionsPush {
    /// The pushes of `updates`: their actions that `keep` accepts, in order, in as few
    /// pushes of at most [`MAX_PUSH_BYTES`] as they fit in (none when `keep` accepts none).
    pub fn actions(
        updates: Updates,
        keep: Arc<dyn Fn(&AgentAction) -> bool + Send + Sync>,
    ) -> Vec<Self> {
        Self::split_at(updates, keep, MAX_PUSH_BYTES)
    }

    fn split_at(
        updates: Updates,
        keep: Arc<dyn Fn(&AgentAction) -> bool + Send + Sync>,
        max_bytes: usize,
    ) -> Vec<Self> {
        let Some(push) = Self::one(updates, keep.clone()) else {
            return Vec::new();
        };
        if push.actions_len <= max_bytes {
            return vec![push];
        }
        let lens = push
            .updates
            .iter()
            .map(|u| kept(u, &*keep).map_or(0, |a| message_len(ACTIONS_FIELD, action_bytes(a))));
        let starts = push_starts(lens, max_bytes);
        let mut rest = push.updates;
        let mut pieces: Vec<Updates> = starts.iter().rev().map(|&at| rest.split_off(at)).collect();
        pieces.push(rest);
        pieces
            .into_iter()
            .rev()
            .filter_map(|piece| Self::one(piece, keep.clone()))
            .collect()
    }

    /// The push of `updates`, or `None` when `keep` accepts none of their actions.
    fn one(
        updates: Updates,
        keep: Arc<dyn Fn(&AgentAction) -> bool + Send + Sync>,
    ) -> Option<Self> {
        let mut push = Self {
            updates,
            keep,
            lagged: 0,
            actions_len: 0,
        };
        push.actions_len = push
            .iter()
            .map(|a| message_len(ACTIONS_FIELD, action_bytes(a)))
            .sum();
        (push.actions_len > 0).then_some(push)
    }

    /// A lag notice: `missed` updates were dropped for this subscriber.
    pub fn lagged(missed: u64) -> Self {
        Self {
            updates: Updates::default(),
            keep: Arc::new(|_| false),
            lagged: missed,
            actions_len: 0,
        }
    }

    /// The same push as the generated message.
    pub fn to_response(&self) -> pb::StreamActionsResponse {
        pb::StreamActionsResponse {
            actions: self.iter().map(convert::action).collect(),
            lagged: self.lagged,
        }
    }

    fn iter(&self) -> impl Iterator<Item = &AgentAction> {
        self.updates.iter().filter_map(|u| kept(u, &*self.keep))
    }
}

impl std::fmt::Debug for ActionsPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionsPush")
            .field("actions", &self.iter().count())
            .field("lagged", &self.lagged)
            .finish()
    }
}

impl Default for ActionsPush {
    fn default() -> Self {
        Self::lagged(0)
    }
}

impl Message for ActionsPush {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for a in self.iter() {
            put_message(ACTIONS_FIELD, action_bytes(a), buf);
        }
        put_uint64(LAGGED_FIELD, self.lagged, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.actions_len + uint64_len(LAGGED_FIELD, self.lagged)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// `uint64 sequence = 1` and `AgentAction action = 3` of `SubscribeResponse`.
const SEQUENCE_FIELD: u32 = 1;
const SUBSCRIBE_ACTION_FIELD: u32 = 3;

/// One `Subscribe` message: an action written from its shared encoding, or any other
/// message as built. Encodes like the equivalent `pb::SubscribeResponse`.
#[derive(Debug)]
pub enum SubscribePush {
    Action {
        sequence: u64,
        action: Arc<AgentAction>,
    },
    Message(Box<pb::SubscribeResponse>),
}

impl SubscribePush {
    /// The same message as the generated type.
    pub fn into_response(self) -> pb::SubscribeResponse {
        match self {
            SubscribePush::Action { sequence, action } => pb::SubscribeResponse {
                sequence,
                update: Some(pb::subscribe_response::Update::Action(convert::action(
                    &action,
                ))),
            },
            SubscribePush::Message(m) => *m,
        }
    }
}

impl Default for SubscribePush {
    fn default() -> Self {
        SubscribePush::Message(Box::default())
    }
}

impl Message for SubscribePush {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            SubscribePush::Action { sequence, action } => {
                put_uint64(SEQUENCE_FIELD, *sequence, buf);
                put_message(SUBSCRIBE_ACTION_FIELD, action_bytes(action), buf);
            }
            SubscribePush::Message(m) => m.encode_raw(buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match self {
            SubscribePush::Action { sequence, action } => {
                uint64_len(SEQUENCE_FIELD, *sequence)
                    + message_len(SUBSCRIBE_ACTION_FIELD, action_bytes(action))
            }
            SubscribePush::Message(m) => m.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{self, EventKind};
    use crate::hub::Hub;

    fn action(json: &str) -> UpdateKind {
        match events::parse(
            EventKind::AgentAction,
            json.as_bytes(),
            2_000_000_000_000_000,
        ) {
            Ok(e) => UpdateKind::Event(e),
            Err(e) => panic!("{json}: {e}"),
        }
    }

    /// Published updates as a subscriber receives them.
    fn received(kinds: Vec<UpdateKind>) -> Updates {
        received_in(vec![kinds])
    }

    /// What a subscriber receives of `batches`, published one after another.
    fn received_in(batches: Vec<Vec<UpdateKind>>) -> Updates {
        let hub = Hub::new(64, 64);
        let sub = hub.subscribe(None, None).expect("subscribe");
        let mut follower = crate::hub::Follower::new(sub.live, 1000);
        for kinds in batches {
            hub.publish(kinds);
        }
        match futures::FutureExt::now_or_never(follower.next()) {
            Some(crate::hub::Next::Updates(u)) => u,
            other => panic!("expected updates, got {other:?}"),
        }
    }

    #[test]
    fn pushes_are_filled_greedily_in_order() {
        assert!(push_starts([], 10).is_empty());
        assert_eq!(push_starts([4, 4, 4, 4], 10), [2]);
        // One item longer than the bound goes alone; left-out items (0) stay where they are.
        assert_eq!(push_starts([3, 0, 20, 0, 0, 3, 3], 10), [2, 5]);
        assert_eq!(push_starts([0, 0, 11, 11], 10), [3]);
    }

    /// Pushes larger than the byte bound are split: every kept action once, in order, each
    /// push within the bound unless one action alone exceeds it, across batch boundaries.
    #[test]
    fn large_pushes_are_split_by_bytes_in_order() {
        let act = |i: usize, agent: &str, size: usize| {
            action(&format!(
                r#"{{"id":"{i}","agent_name":"{agent}","action_type":"t","action_name":"{}"}}"#,
                "n".repeat(size)
            ))
        };
        let batches = vec![
            (0..5).map(|i| act(i, "x", 300)).collect(),
            vec![act(5, "y", 300), act(6, "x", 2000), act(7, "x", 10)],
            (8..12)
                .map(|i| act(i, if i == 9 { "y" } else { "x" }, 300))
                .collect(),
        ];
        let keep: Arc<dyn Fn(&AgentAction) -> bool + Send + Sync> =
            Arc::new(|a| a.agent_name() == "x");
        let whole = ActionsPush::split_at(received_in(batches.clone()), keep.clone(), usize::MAX);
        assert_eq!(whole.len(), 1);
        let all = whole[0].to_response().actions;
        assert_eq!(all.len(), 10);
        let max = 1000;
        let pushes = ActionsPush::split_at(received_in(batches), keep, max);
        assert!(pushes.len() >= 4, "{} pushes", pushes.len());
        let len = |a: &pb::AgentAction| message_len(ACTIONS_FIELD, &a.encode_to_vec());
        for (i, p) in pushes.iter().enumerate() {
            let bytes = p.encode_to_vec();
            assert_eq!(bytes, p.to_response().encode_to_vec());
            let actions = p.to_response().actions;
            assert!(
                bytes.len() <= max || actions.len() == 1,
                "{} bytes",
                bytes.len()
            );
            if actions.iter().any(|a| a.id == "6") {
                assert_eq!(actions.len(), 1, "the 2 KB action goes alone");
            }
            // As full as it could be: the next push's first action did not fit.
            if let Some(next) = pushes.get(i + 1) {
                let first = len(&next.to_response().actions[0]);
                assert!(
                    bytes.len() + first > max,
                    "push {i} could have taken one more"
                );
            }
        }
        let joined: Vec<_> = pushes
            .iter()
            .flat_map(|p| p.to_response().actions)
            .collect();
        assert_eq!(joined, all);
    }

    #[test]
    fn a_push_encodes_like_the_generated_response() {
        let kinds = vec![
            action(
                r#"{"id":"a1","agent_name":"x","action_type":"tool_call","correlation_id":"c",
                   "action_name":"","action_details":{"k":[1,"ü"]},"debug_mode":false,
                   "duration_ms":0,"project_name":"p","success":true,
                   "timestamp":"2026-12-01T10:00:00.123456Z"}"#,
            ),
            action(r#"{"agent_name":"y","action_type":"error"}"#),
            action(r#"{"agent_name":"x","action_type":"success","duration_ms":-1.5}"#),
        ];
        let keep: Arc<dyn Fn(&AgentAction) -> bool + Send + Sync> =
            Arc::new(|a| a.agent_name() == "x");
        let mut pushes = ActionsPush::actions(received(kinds), keep.clone());
        assert_eq!(pushes.len(), 1, "small actions go in one push");
        let push = pushes.remove(0);
        let expected = push.to_response();
        assert_eq!(expected.actions.len(), 2);
        assert_eq!(expected.lagged, 0);
        assert_eq!(push.encoded_len(), expected.encoded_len());
        let bytes = push.encode_to_vec();
        assert_eq!(bytes, expected.encode_to_vec());
        // Encoding again reuses the memo and gives the same bytes.
        assert_eq!(push.encode_to_vec(), bytes);
        let decoded = pb::StreamActionsResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, expected);
    }

    #[test]
    fn a_subscribe_action_encodes_like_the_generated_response() {
        let UpdateKind::Event(Event::AgentAction(a)) = action(
            r#"{"id":"1","agent_name":"x","action_type":"error","action_details":{"e":"ü"}}"#,
        ) else {
            unreachable!()
        };
        for sequence in [0, 1, 300, u64::MAX] {
            let push = SubscribePush::Action {
                sequence,
                action: a.clone(),
            };
            let bytes = push.encode_to_vec();
            assert_eq!(bytes.len(), push.encoded_len());
            let expected = push.into_response();
            assert_eq!(bytes, expected.encode_to_vec(), "sequence {sequence}");
        }
        let other = pb::SubscribeResponse {
            sequence: 7,
            update: Some(pb::subscribe_response::Update::Lagged(pb::Lagged {
                missed: 3,
            })),
        };
        let push = SubscribePush::Message(Box::new(other.clone()));
        assert_eq!(push.encode_to_vec(), other.encode_to_vec());
        assert_eq!(push.into_response(), other);
    }

    #[test]
    fn a_lag_notice_encodes_like_the_generated_response() {
        let push = ActionsPush::lagged(300);
        let expected = pb::StreamActionsResponse {
            actions: Vec::new(),
            lagged: 300,
        };
        assert_eq!(push.encode_to_vec(), expected.encode_to_vec());
        assert_eq!(push.encoded_len(), expected.encoded_len());
    }

    #[test]
    fn no_push_when_the_filter_keeps_no_action() {
        let kinds = vec![action(r#"{"agent_name":"y","action_type":"error"}"#)];
        assert!(
            ActionsPush::actions(received(kinds), Arc::new(|a| a.agent_name() == "x")).is_empty()
        );
    }

    #[test]
    fn the_memo_is_not_part_of_the_value() {
        let UpdateKind::Event(Event::AgentAction(a)) =
            action(r#"{"id":"1","agent_name":"x","action_type":"error"}"#)
        else {
            unreachable!()
        };
        let fresh = (*a).clone();
        let encoded = action_bytes(&a).to_vec();
        assert_eq!(*a, fresh);
        assert_eq!(action_bytes(&fresh), encoded.as_slice());
    }
}
