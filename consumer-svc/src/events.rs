//! JSON -> typed events (pure, no I/O).
//!
//! Producers send flat JSON objects in snake_case or camelCase, some drop null fields and
//! others send explicit nulls. A null is "absent"; a real `0`, `false` or `""` is a value
//! (the original's `||` defaults are deliberately not reproduced). Strings are borrowed from
//! the message payload while parsing and copied once into the owned event: all the text of
//! one event goes into a single shared buffer (`Text` fields are spans of it), so an event
//! costs two allocations (its text and itself) rather than one per field.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::value::RawValue;

pub use crate::timestamp::parse_iso8601;

/// Event time in microseconds since the Unix epoch (UTC).
pub type Micros = i64;

/// Where one string field of an event lies in the event's text buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

/// All the text of one event in one buffer; the event's string fields are spans of it and
/// read through accessor methods. (Per-field handles sharing the buffer cost an atomic
/// increment and decrement per field and event, measurable at a million events per second.)
#[derive(Clone, PartialEq)]
struct Texts(Box<str>);

impl Texts {
    fn get(&self, span: Span) -> &str {
        // Spans are made by `TextBuf` on character boundaries; `get` never panics anyway.
        self.0
            .get(span.start as usize..span.end as usize)
            .unwrap_or_default()
    }

    fn opt(&self, span: Option<Span>) -> Option<&str> {
        span.map(|s| self.get(s))
    }
}

impl fmt::Debug for Texts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// A filled [`TextBuf`] with the spans of its required and optional fields.
type Packed<const R: usize, const O: usize> = (TextBuf, [Span; R], [Option<Span>; O]);

/// Collects the text fields of one event into one buffer while parsing.
struct TextBuf {
    buf: String,
}

impl TextBuf {
    /// A buffer holding the `required` and `optional` fields, in that order, with room for
    /// `extra` more bytes pushed afterwards: sized exactly once, so `finish` does not
    /// reallocate. Returns the fields' spans in the order given.
    fn pack<const R: usize, const O: usize>(
        extra: usize,
        required: [&str; R],
        optional: [Option<&str>; O],
    ) -> Result<Packed<R, O>, ParseError> {
        let len = required.iter().map(|s| s.len()).sum::<usize>()
            + optional.iter().flatten().map(|s| s.len()).sum::<usize>()
            + extra;
        let mut t = Self {
            buf: String::with_capacity(len),
        };
        let mut required_spans = [Span::default(); R];
        for (span, field) in required_spans.iter_mut().zip(required) {
            *span = t.push(field)?;
        }
        let mut optional_spans = [None; O];
        for (span, field) in optional_spans.iter_mut().zip(optional) {
            *span = t.opt(field)?;
        }
        Ok((t, required_spans, optional_spans))
    }

    fn push(&mut self, s: &str) -> Result<Span, ParseError> {
        let start = self.buf.len();
        self.buf.push_str(s);
        let too_large = |_| ParseError::TooLarge;
        Ok(Span {
            start: u32::try_from(start).map_err(too_large)?,
            end: u32::try_from(self.buf.len()).map_err(too_large)?,
        })
    }

    fn opt(&mut self, s: Option<&str>) -> Result<Option<Span>, ParseError> {
        s.map(|s| self.push(s)).transpose()
    }

    fn finish(self) -> Texts {
        // Sized exactly up front: no shrinking copy here (tests run with debug assertions).
        debug_assert_eq!(
            self.buf.len(),
            self.buf.capacity(),
            "`pack` was not told about every field pushed"
        );
        Texts(self.buf.into_boxed_str())
    }
}

/// Accessors for the string fields of an event type: `name(&self) -> &str` for the required
/// ones, `-> Option<&str>` for the optional ones.
macro_rules! text_accessors {
    ($ty:ident { $($req:ident),* $(,)? } { $($opt:ident),* $(,)? }) => {
        impl $ty {
            $(
                pub fn $req(&self) -> &str {
                    self.text.get(self.$req)
                }
            )*
            $(
                pub fn $opt(&self) -> Option<&str> {
                    self.text.opt(self.$opt)
                }
            )*
        }
    };
}

/// What a topic carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    RoutingDecision,
    AgentAction,
    Transformation,
    PerformanceMetric,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::RoutingDecision,
        EventKind::AgentAction,
        EventKind::Transformation,
        EventKind::PerformanceMetric,
    ];

    /// The seed guide's default topic name.
    pub fn default_topic(self) -> &'static str {
        match self {
            EventKind::RoutingDecision => "agent-routing-decisions",
            EventKind::AgentAction => "agent-actions",
            EventKind::Transformation => "agent-transformation-events",
            EventKind::PerformanceMetric => "router-performance-metrics",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, not an object, or a field of the wrong type.
    /// (serde quotes a whole offending string in its message: cut, see [`MAX_ERROR_TEXT`].)
    #[error("invalid event JSON: {}", Bounded(.0))]
    Json(#[from] serde_json::Error),
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// The text as sent, cut to [`MAX_ERROR_TEXT`] bytes.
    #[error("invalid timestamp `{0}`")]
    Timestamp(String),
    #[error("invalid UTF-8 in the event: {0}")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("event text larger than 4 GiB")]
    TooLarge,
}

/// The most bytes of a value's text that an error message quotes (then `…`): a bad value may
/// be as large as the message (a megabyte), and such errors are logged.
pub const MAX_ERROR_TEXT: usize = 256;

/// `T` displayed up to [`MAX_ERROR_TEXT`] bytes (cut on a character boundary), then `…`.
struct Bounded<T>(T);

impl<T: fmt::Display> fmt::Display for Bounded<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// Passes on the first `left` bytes, then fails to stop the formatting early.
        struct Cut<'a, 'b> {
            out: &'a mut fmt::Formatter<'b>,
            left: usize,
            cut: bool,
        }
        impl fmt::Write for Cut<'_, '_> {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                if s.len() <= self.left {
                    self.left -= s.len();
                    return self.out.write_str(s);
                }
                self.out.write_str(cut_text(s, self.left))?;
                self.cut = true;
                Err(fmt::Error)
            }
        }
        let mut cut = Cut {
            out: f,
            left: MAX_ERROR_TEXT,
            cut: false,
        };
        match fmt::write(&mut cut, format_args!("{}", self.0)) {
            Err(_) if cut.cut => cut.out.write_str("…"),
            done => done,
        }
    }
}

/// The longest start of `s` of at most `max` bytes that ends on a character boundary.
fn cut_text(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// One of a routing decision's alternatives, borrowed from the decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Alternative<'a> {
    pub agent: &'a str,
    pub confidence: Option<f64>,
    pub reasoning: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq)]
struct AlternativeSpans {
    agent: Span,
    confidence: Option<f64>,
    reasoning: Option<Span>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RoutingDecision {
    text: Texts,
    id: Span,
    correlation_id: Option<Span>,
    user_request: Option<Span>,
    selected_agent: Span,
    pub confidence_score: Option<f64>,
    routing_strategy: Option<Span>,
    alternatives: Vec<AlternativeSpans>,
    reasoning: Option<Span>,
    pub routing_time_ms: Option<f64>,
    context_json: Option<Span>,
    project_path: Option<Span>,
    project_name: Option<Span>,
    session_id: Option<Span>,
    pub time: Micros,
    /// `alternatives` entries left out as unusable (see [`AlternativeEntry`]), for the log.
    pub dropped_alternatives: u32,
}

text_accessors!(RoutingDecision { id, selected_agent } {
    correlation_id, user_request, routing_strategy, reasoning, context_json, project_path,
    project_name, session_id,
});

impl RoutingDecision {
    pub fn alternatives(&self) -> impl ExactSizeIterator<Item = Alternative<'_>> {
        self.alternatives.iter().map(|a| Alternative {
            agent: self.text.get(a.agent),
            confidence: a.confidence,
            reasoning: self.text.opt(a.reasoning),
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct AgentAction {
    text: Texts,
    id: Span,
    correlation_id: Option<Span>,
    agent_name: Span,
    action_type: Span,
    action_name: Option<Span>,
    action_details_json: Option<Span>,
    pub debug_mode: Option<bool>,
    pub duration_ms: Option<f64>,
    project_name: Option<Span>,
    pub success: Option<bool>,
    pub time: Micros,
    /// Its `StreamActions` encoding, made by the first push that carries it (`crate::wire`).
    pub(crate) wire: crate::wire::Memo,
}

text_accessors!(AgentAction { id, agent_name, action_type } {
    correlation_id, action_name, action_details_json, project_name,
});

#[derive(Clone, Debug, PartialEq)]
pub struct Transformation {
    text: Texts,
    id: Span,
    correlation_id: Option<Span>,
    source_agent: Span,
    target_agent: Span,
    transformation_reason: Option<Span>,
    pub confidence_score: Option<f64>,
    pub transformation_duration_ms: Option<f64>,
    pub success: bool,
    pub time: Micros,
}

text_accessors!(Transformation { id, source_agent, target_agent } {
    correlation_id, transformation_reason,
});

#[derive(Clone, Debug, PartialEq)]
pub struct PerformanceMetric {
    text: Texts,
    id: Span,
    correlation_id: Option<Span>,
    query_text: Option<Span>,
    pub routing_duration_ms: Option<f64>,
    pub cache_hit: bool,
    pub candidates_evaluated: Option<u64>,
    trigger_match_strategy: Span,
    confidence_components_json: Option<Span>,
    pub time: Micros,
}

text_accessors!(PerformanceMetric { id, trigger_match_strategy } {
    correlation_id, query_text, confidence_components_json,
});

/// A parsed event, shared between the state's buffers and the stream hub.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    RoutingDecision(Arc<RoutingDecision>),
    AgentAction(Arc<AgentAction>),
    Transformation(Arc<Transformation>),
    PerformanceMetric(Arc<PerformanceMetric>),
}

impl Event {
    pub fn time(&self) -> Micros {
        match self {
            Event::RoutingDecision(e) => e.time,
            Event::AgentAction(e) => e.time,
            Event::Transformation(e) => e.time,
            Event::PerformanceMetric(e) => e.time,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::RoutingDecision(_) => EventKind::RoutingDecision,
            Event::AgentAction(_) => EventKind::AgentAction,
            Event::Transformation(_) => EventKind::Transformation,
            Event::PerformanceMetric(_) => EventKind::PerformanceMetric,
        }
    }

    /// The memory the event pins (see [`HeapSize`]).
    pub fn heap_size(&self) -> usize {
        match self {
            Event::RoutingDecision(e) => e.heap_size(),
            Event::AgentAction(e) => e.heap_size(),
            Event::Transformation(e) => e.heap_size(),
            Event::PerformanceMetric(e) => e.heap_size(),
        }
    }
}

/// The two reference counts before the value in an `Arc`'s allocation.
pub const ARC_HEADER: usize = 2 * std::mem::size_of::<usize>();

/// Most bytes the `pb::AgentAction` encoding of an action adds to its text: a key and a length
/// of at most 5 bytes for each of its 7 strings, 2 bytes for each of its 2 optional bools,
/// 9 for the optional double and 19 for the timestamp (74, rounded up). Tested in `state`.
pub const WIRE_OVERHEAD: usize = 80;

/// The bytes of memory one shared (`Arc`) event pins, for the byte budgets of the recent
/// buffers, the resume ring and the subscriber queues: its allocation (the reference counts and
/// the struct), its text buffer (every string field), and the spans of a routing decision's
/// alternatives. An action is also accounted its `StreamActions` encoding
/// ([`crate::wire::Memo`]: its text plus at most [`WIRE_OVERHEAD`]) whether a push has made it
/// yet or not, so an action counts about twice its text. The size of an event never changes
/// while it is held (what a buffer frees must be what it took). Not counted: the allocator's
/// rounding up to its size classes, and the holder's own slot (8 bytes in a buffer).
pub trait HeapSize {
    fn heap_size(&self) -> usize;
}

impl HeapSize for RoutingDecision {
    fn heap_size(&self) -> usize {
        ARC_HEADER
            + std::mem::size_of::<Self>()
            + self.text.0.len()
            + self.alternatives.capacity() * std::mem::size_of::<AlternativeSpans>()
    }
}

impl HeapSize for AgentAction {
    fn heap_size(&self) -> usize {
        ARC_HEADER + std::mem::size_of::<Self>() + 2 * self.text.0.len() + WIRE_OVERHEAD
    }
}

impl HeapSize for Transformation {
    fn heap_size(&self) -> usize {
        ARC_HEADER + std::mem::size_of::<Self>() + self.text.0.len()
    }
}

impl HeapSize for PerformanceMetric {
    fn heap_size(&self) -> usize {
        ARC_HEADER + std::mem::size_of::<Self>() + self.text.0.len()
    }
}

/// Parses one message payload of a topic carrying `kind`. `arrival` gives the event time of an
/// event that has none (see [`Arrival`]) and the clamp for event times in the future.
pub fn parse(
    kind: EventKind,
    payload: &[u8],
    arrival: impl Into<Arrival>,
) -> Result<Event, ParseError> {
    let arrival = arrival.into();
    Ok(match kind {
        EventKind::RoutingDecision => {
            Event::RoutingDecision(Arc::new(parse_routing(payload, arrival)?))
        }
        EventKind::AgentAction => Event::AgentAction(Arc::new(parse_action(payload, arrival)?)),
        EventKind::Transformation => {
            Event::Transformation(Arc::new(parse_transformation(payload, arrival)?))
        }
        EventKind::PerformanceMetric => {
            Event::PerformanceMetric(Arc::new(parse_performance(payload, arrival)?))
        }
    })
}

type Str<'a> = Option<Cow<'a, str>>;

fn raw_json(v: Option<&RawValue>) -> Option<&str> {
    v.map(RawValue::get)
}

/// The payload as text: validated once here, so the JSON parser need not check every string.
fn payload_str(payload: &[u8]) -> Result<&str, ParseError> {
    Ok(std::str::from_utf8(payload)?)
}

/// A `T` (one of the `Raw*` structs) read from a JSON object only. serde's derive also reads a
/// struct from a sequence of its fields in declaration order, and serde_json offers one for a
/// JSON array: with every field defaulted, `[]` on the performance topic would be a query and
/// `[null,null,null,"x"]` a routing decision for agent `x`. Asking for a map makes any other
/// JSON value an "invalid type" error, as for other malformed events; `T` then reads the
/// object's members as its derive does (borrowing, aliases, duplicate-field detection).
struct Object<T>(T);

impl<T> std::ops::Deref for Object<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// Parses `payload`, a JSON object (see [`Object`]), as `T`. An event that sends a field under
/// two of its spellings (`agent_name` and `agentName`, `confidence_score` and `confidence`), at
/// the top or inside an entry of an array such as `alternatives`, fails serde's derive with
/// "duplicate field"; only then is it parsed again from a copy holding each field once, under
/// its snake_case name, with its first non-null value (and Python's bare `NaN` / `Infinity` as
/// null). `deduped` keeps that copy alive for the borrowed fields of `T`.
fn parse_raw<'a, T: serde::Deserialize<'a>>(
    payload: &'a str,
    spellings: &Spellings,
    deduped: &'a mut Option<String>,
) -> Result<T, ParseError> {
    match serde_json::from_str::<Object<T>>(payload) {
        Ok(Object(raw)) => Ok(raw),
        Err(e) => {
            // Python's json.dumps writes a float NaN or infinity as a bare `NaN` / `Infinity`,
            // which is not JSON: such a number is read as absent (null), as aggregation would
            // skip it anyway, rather than losing the whole event. (Either problem may be the
            // one serde meets first, so both are fixed in one copy.)
            let fixed = non_finite_as_null(payload);
            if fixed.is_none() && !is_duplicate_field(&e) {
                return Err(e.into());
            }
            let text = fixed.as_deref().unwrap_or(payload);
            let Some(once) = dedupe_spellings(text, spellings).or(fixed) else {
                return Err(e.into());
            };
            let Object(raw) = serde_json::from_str(deduped.insert(once))?;
            Ok(raw)
        }
    }
}

/// `payload` with every bare `NaN`, `Infinity` and `-Infinity` outside strings replaced by
/// `null`; `None` when it has none.
fn non_finite_as_null(payload: &str) -> Option<String> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(payload.len());
    let (mut in_string, mut escaped, mut replaced) = (false, false, false);
    let mut rest = payload;
    while let Some(c) = rest.chars().next() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| rest.starts_with(**t)) {
            out.push_str("null");
            rest = &rest[token.len()..];
            replaced = true;
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    replaced.then_some(out)
}

/// serde's derive reports a repeated field (a name and its alias) with this message.
fn is_duplicate_field(e: &serde_json::Error) -> bool {
    e.is_data() && e.to_string().starts_with("duplicate field")
}

/// The names an object's fields go by.
struct Spellings {
    /// Names other than a field's camelCase form, to the field's name.
    aliases: &'static [(&'static str, &'static str)],
    /// Fields holding arrays of objects with spellings of their own.
    arrays: &'static [(&'static str, &'static Spellings)],
}

/// `name` in snake_case (`routingTimeMs` -> `routing_time_ms`), then through `aliases`.
fn canonical_name(name: &str, aliases: &[(&str, &str)]) -> String {
    let mut snake = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    match aliases.iter().find(|(alias, _)| *alias == snake) {
        Some((_, name)) => (*name).to_string(),
        None => snake,
    }
}

/// The members of a JSON object in document order (a map would lose which came first), their
/// values left as text.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members<'de>, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// The JSON object `payload` with each field once, under its canonical name, keeping the
/// first non-null value (null means absent), and the same inside the entries of `spellings`'
/// arrays; `None` when `payload` is not an object.
fn dedupe_spellings(payload: &str, spellings: &Spellings) -> Option<String> {
    let Members(members) = serde_json::from_str(payload).ok()?;
    let mut once: Vec<(String, &RawValue)> = Vec::with_capacity(members.len());
    // Where each name went in `once`: a hostile payload of many members stays linear.
    let mut at: foldhash::HashMap<String, usize> = Default::default();
    for (name, value) in members {
        let name = canonical_name(&name, spellings.aliases);
        match at.get(&name) {
            Some(&i) if once[i].1.get() == "null" => once[i].1 = value,
            Some(_) => {}
            None => {
                at.insert(name.clone(), once.len());
                once.push((name, value));
            }
        }
    }
    let mut out = String::with_capacity(payload.len());
    out.push('{');
    for (i, (name, value)) in once.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(name).ok()?);
        out.push(':');
        let entries = spellings.arrays.iter().find(|(n, _)| n == name);
        let array = entries.and_then(|(_, inner)| {
            // Entries that are not objects stay as they are (the parse then drops them).
            let items: Vec<&RawValue> = serde_json::from_str(value.get()).ok()?;
            let items: Vec<String> = items
                .iter()
                .map(|item| {
                    dedupe_spellings(item.get(), inner).unwrap_or_else(|| item.get().to_string())
                })
                .collect();
            Some(format!("[{}]", items.join(",")))
        });
        match array {
            Some(array) => out.push_str(&array),
            None => out.push_str(value.get()),
        }
    }
    out.push('}');
    Some(out)
}

const ROUTING: Spellings = Spellings {
    aliases: &[("confidence", "confidence_score")],
    arrays: &[("alternatives", &ALTERNATIVE)],
};
const ALTERNATIVE: Spellings = Spellings {
    aliases: &[("agent_name", "agent"), ("confidence_score", "confidence")],
    arrays: &[],
};
const ACTION: Spellings = Spellings {
    aliases: &[],
    arrays: &[],
};
const TRANSFORMATION: Spellings = Spellings {
    aliases: &[("confidence", "confidence_score")],
    arrays: &[],
};
const PERFORMANCE: Spellings = Spellings {
    aliases: &[("latency_ms", "routing_duration_ms")],
    arrays: &[],
};

/// A required string field.
fn required<'s>(field: &'s Str<'_>, name: &'static str) -> Result<&'s str, ParseError> {
    field.as_deref().ok_or(ParseError::MissingField(name))
}

/// The event's id, or, when it has none, one derived from the message (its topic's kind,
/// its place in the log, its record timestamp and its bytes): every replica, and every replay
/// after a restart, gives the same message the same id, as a random one would not.
fn id_or_derived<'a>(
    id: Str<'a>,
    kind: EventKind,
    payload: &[u8],
    arrival: Arrival,
) -> Cow<'a, str> {
    id.unwrap_or_else(|| Cow::Owned(derived_id(kind, payload, arrival).to_string()))
}

/// A version 8 (custom) UUID from a SHA-256 of the message.
fn derived_id(kind: EventKind, payload: &[u8], arrival: Arrival) -> uuid::Uuid {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update([kind as u8]);
    let (partition, offset) = arrival.position.unwrap_or((-1, -1));
    hash.update(partition.to_le_bytes());
    hash.update(offset.to_le_bytes());
    hash.update(arrival.record_time.unwrap_or(-1).to_le_bytes());
    hash.update(payload);
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// When and where a message arrived: the receive time, the Kafka record's own timestamp (set
/// by its producer or the broker), and its partition and offset. The record time is the event
/// time of an event that carries none, and the latest time an event can have (see
/// [`event_time`]), so a replica replaying the window later gives the event the time it had
/// the first time, not the replay's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub now: Micros,
    pub record_time: Option<Micros>,
    pub position: Option<(i32, i64)>,
}

/// A message without a record timestamp, received at the given time.
impl From<Micros> for Arrival {
    fn from(now: Micros) -> Self {
        Arrival {
            now,
            record_time: None,
            position: None,
        }
    }
}

/// `timestamp`, else `createdAt`, else the record's timestamp, else the receive time; never
/// later than the record's timestamp, when the message was sent (to the end of its
/// millisecond: record timestamps are whole milliseconds). That bound is the same on every
/// replay. A message without a record timestamp, or with one in the future (its producer's
/// clock ahead of ours), is bounded by the receive time instead, which a later replay does
/// not share.
///
/// An empty or unreadable `timestamp` gives way to a readable `createdAt` (an unreadable one
/// with none is an error); `""` in either says no more than an absent field. A record time of
/// 0 or less is taken as none: a producer stamping its records 0 would otherwise date every
/// event 1970, and every one would be skipped as expired.
fn event_time(
    timestamp: Option<TimeValue>,
    created_at: Option<TimeValue>,
    arrival: Arrival,
) -> Result<Micros, ParseError> {
    let record_time = arrival.record_time.filter(|&r| r > 0);
    let t = match (TimeValue::stated(timestamp), TimeValue::stated(created_at)) {
        (Some(Ok(t)), _) | (_, Some(Ok(t))) => t,
        (Some(Err(text)), _) | (None, Some(Err(text))) => return Err(ParseError::Timestamp(text)),
        (None, None) => record_time.unwrap_or(arrival.now),
    };
    let sent = record_time
        .filter(|&r| r <= arrival.now)
        .map(|r| r.saturating_add(999));
    Ok(t.min(sent.unwrap_or(arrival.now)))
}

/// One entry of `alternatives`: an alternative, or `None` for an entry that is of no use (not
/// an object, `null`, a field of the wrong type, no `agent`). Such an entry is left out rather
/// than losing the whole decision: only `selected_agent` is required. (The producers send
/// objects; a bare string is not taken for an agent name either, as no producer sends one.)
struct AlternativeEntry<'a>(Option<RawAlternative<'a>>);

impl<'de: 'a, 'a> Deserialize<'de> for AlternativeEntry<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Read as raw text first, so a bad entry fails on its own, not the whole decision.
        let raw = <&'de RawValue>::deserialize(d)?;
        match serde_json::from_str::<Object<RawAlternative<'a>>>(raw.get()) {
            Ok(Object(alt)) => Ok(AlternativeEntry(alt.agent.is_some().then_some(alt))),
            // Passed up so that `parse_raw` repairs the spellings and parses again.
            Err(e) if is_duplicate_field(&e) => Err(de::Error::custom(e)),
            Err(_) => Ok(AlternativeEntry(None)),
        }
    }
}

#[derive(Deserialize)]
struct RawAlternative<'a> {
    #[serde(borrow, default, alias = "agentName", alias = "agent_name")]
    agent: Str<'a>,
    #[serde(default, alias = "confidence_score", alias = "confidenceScore")]
    confidence: Option<f64>,
    #[serde(borrow, default)]
    reasoning: Str<'a>,
}

#[derive(Deserialize)]
struct RawRouting<'a> {
    #[serde(borrow, default)]
    id: Str<'a>,
    #[serde(borrow, default, alias = "correlationId")]
    correlation_id: Str<'a>,
    #[serde(borrow, default, alias = "userRequest")]
    user_request: Str<'a>,
    #[serde(borrow, default, alias = "selectedAgent")]
    selected_agent: Str<'a>,
    #[serde(default, alias = "confidenceScore", alias = "confidence")]
    confidence_score: Option<f64>,
    #[serde(borrow, default, alias = "routingStrategy")]
    routing_strategy: Str<'a>,
    #[serde(borrow, default)]
    alternatives: Option<Vec<AlternativeEntry<'a>>>,
    #[serde(borrow, default)]
    reasoning: Str<'a>,
    #[serde(default, alias = "routingTimeMs")]
    routing_time_ms: Option<f64>,
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
    #[serde(borrow, default, alias = "projectPath")]
    project_path: Str<'a>,
    #[serde(borrow, default, alias = "projectName")]
    project_name: Str<'a>,
    #[serde(borrow, default, alias = "sessionId")]
    session_id: Str<'a>,
    #[serde(default)]
    timestamp: Option<TimeValue>,
    #[serde(default, alias = "createdAt")]
    created_at: Option<TimeValue>,
}

pub fn parse_routing(
    payload: &[u8],
    arrival: impl Into<Arrival>,
) -> Result<RoutingDecision, ParseError> {
    let arrival = arrival.into();
    let payload = payload_str(payload)?;
    let mut deduped = None;
    let raw: RawRouting = parse_raw(payload, &ROUTING, &mut deduped)?;
    let time = event_time(raw.timestamp, raw.created_at, arrival)?;
    let selected_agent = required(&raw.selected_agent, "selected_agent")?;
    let entries = raw.alternatives.as_deref().unwrap_or_default();
    let alts = || entries.iter().filter_map(|e| e.0.as_ref());
    let kept = alts().count();
    let dropped_alternatives = u32::try_from(entries.len() - kept).unwrap_or(u32::MAX);
    let id = id_or_derived(
        raw.id,
        EventKind::RoutingDecision,
        payload.as_bytes(),
        arrival,
    );
    let context = raw_json(raw.context);
    let alternatives_len = alts()
        .flat_map(|a| [a.agent.as_deref(), a.reasoning.as_deref()])
        .flatten()
        .map(str::len)
        .sum();
    let (
        mut t,
        [selected_agent, id],
        [
            correlation_id,
            user_request,
            routing_strategy,
            reasoning,
            context_json,
            project_path,
            project_name,
            session_id,
        ],
    ) = TextBuf::pack(
        alternatives_len,
        [selected_agent, &id],
        [
            raw.correlation_id.as_deref(),
            raw.user_request.as_deref(),
            raw.routing_strategy.as_deref(),
            raw.reasoning.as_deref(),
            context,
            raw.project_path.as_deref(),
            raw.project_name.as_deref(),
            raw.session_id.as_deref(),
        ],
    )?;
    let mut alternatives = Vec::with_capacity(kept);
    for alt in alts() {
        let agent = t.push(alt.agent.as_deref().unwrap_or_default())?;
        alternatives.push(AlternativeSpans {
            agent,
            confidence: alt.confidence,
            reasoning: t.opt(alt.reasoning.as_deref())?,
        });
    }
    Ok(RoutingDecision {
        text: t.finish(),
        time,
        id,
        correlation_id,
        user_request,
        selected_agent,
        confidence_score: raw.confidence_score,
        routing_strategy,
        alternatives,
        reasoning,
        routing_time_ms: raw.routing_time_ms,
        context_json,
        project_path,
        project_name,
        session_id,
        dropped_alternatives,
    })
}

#[derive(Deserialize)]
struct RawAction<'a> {
    #[serde(borrow, default)]
    id: Str<'a>,
    #[serde(borrow, default, alias = "correlationId")]
    correlation_id: Str<'a>,
    #[serde(borrow, default, alias = "agentName")]
    agent_name: Str<'a>,
    #[serde(borrow, default, alias = "actionType")]
    action_type: Str<'a>,
    #[serde(borrow, default, alias = "actionName")]
    action_name: Str<'a>,
    #[serde(borrow, default, alias = "actionDetails")]
    action_details: Option<&'a RawValue>,
    #[serde(default, alias = "debugMode")]
    debug_mode: Option<bool>,
    #[serde(default, alias = "durationMs")]
    duration_ms: Option<f64>,
    #[serde(borrow, default, alias = "projectName")]
    project_name: Str<'a>,
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    timestamp: Option<TimeValue>,
    #[serde(default, alias = "createdAt")]
    created_at: Option<TimeValue>,
}

pub fn parse_action(
    payload: &[u8],
    arrival: impl Into<Arrival>,
) -> Result<AgentAction, ParseError> {
    let arrival = arrival.into();
    let payload = payload_str(payload)?;
    let mut deduped = None;
    let raw: RawAction = parse_raw(payload, &ACTION, &mut deduped)?;
    let time = event_time(raw.timestamp, raw.created_at, arrival)?;
    let agent_name = required(&raw.agent_name, "agent_name")?;
    let action_type = required(&raw.action_type, "action_type")?;
    let id = id_or_derived(raw.id, EventKind::AgentAction, payload.as_bytes(), arrival);
    let details = raw_json(raw.action_details);
    let (
        t,
        [agent_name, action_type, id],
        [
            correlation_id,
            action_name,
            action_details_json,
            project_name,
        ],
    ) = TextBuf::pack(
        0,
        [agent_name, action_type, &id],
        [
            raw.correlation_id.as_deref(),
            raw.action_name.as_deref(),
            details,
            raw.project_name.as_deref(),
        ],
    )?;
    Ok(AgentAction {
        text: t.finish(),
        time,
        agent_name,
        action_type,
        id,
        correlation_id,
        action_name,
        action_details_json,
        debug_mode: raw.debug_mode,
        duration_ms: raw.duration_ms,
        project_name,
        success: raw.success,
        wire: Default::default(),
    })
}

#[derive(Deserialize)]
struct RawTransformation<'a> {
    #[serde(borrow, default)]
    id: Str<'a>,
    #[serde(borrow, default, alias = "correlationId")]
    correlation_id: Str<'a>,
    #[serde(borrow, default, alias = "sourceAgent")]
    source_agent: Str<'a>,
    #[serde(borrow, default, alias = "targetAgent")]
    target_agent: Str<'a>,
    #[serde(borrow, default, alias = "transformationReason")]
    transformation_reason: Str<'a>,
    #[serde(default, alias = "confidenceScore", alias = "confidence")]
    confidence_score: Option<f64>,
    #[serde(default, alias = "transformationDurationMs")]
    transformation_duration_ms: Option<f64>,
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    timestamp: Option<TimeValue>,
    #[serde(default, alias = "createdAt")]
    created_at: Option<TimeValue>,
}

pub fn parse_transformation(
    payload: &[u8],
    arrival: impl Into<Arrival>,
) -> Result<Transformation, ParseError> {
    let arrival = arrival.into();
    let payload = payload_str(payload)?;
    let mut deduped = None;
    let raw: RawTransformation = parse_raw(payload, &TRANSFORMATION, &mut deduped)?;
    let time = event_time(raw.timestamp, raw.created_at, arrival)?;
    let source_agent = required(&raw.source_agent, "source_agent")?;
    let target_agent = required(&raw.target_agent, "target_agent")?;
    let id = id_or_derived(
        raw.id,
        EventKind::Transformation,
        payload.as_bytes(),
        arrival,
    );
    let (t, [source_agent, target_agent, id], [correlation_id, transformation_reason]) =
        TextBuf::pack(
            0,
            [source_agent, target_agent, &id],
            [
                raw.correlation_id.as_deref(),
                raw.transformation_reason.as_deref(),
            ],
        )?;
    Ok(Transformation {
        text: t.finish(),
        time,
        source_agent,
        target_agent,
        id,
        correlation_id,
        transformation_reason,
        confidence_score: raw.confidence_score,
        transformation_duration_ms: raw.transformation_duration_ms,
        success: raw.success.unwrap_or(true),
    })
}

#[derive(Deserialize)]
struct RawPerformance<'a> {
    #[serde(borrow, default)]
    id: Str<'a>,
    #[serde(borrow, default, alias = "correlationId")]
    correlation_id: Str<'a>,
    #[serde(borrow, default, alias = "queryText")]
    query_text: Str<'a>,
    #[serde(
        default,
        alias = "routingDurationMs",
        alias = "latency_ms",
        alias = "latencyMs"
    )]
    routing_duration_ms: Option<f64>,
    #[serde(default, alias = "cacheHit")]
    cache_hit: Option<bool>,
    #[serde(default, alias = "candidatesEvaluated")]
    candidates_evaluated: Option<u64>,
    #[serde(borrow, default, alias = "triggerMatchStrategy")]
    trigger_match_strategy: Str<'a>,
    #[serde(borrow, default, alias = "confidenceComponents")]
    confidence_components: Option<&'a RawValue>,
    #[serde(default)]
    timestamp: Option<TimeValue>,
    #[serde(default, alias = "createdAt")]
    created_at: Option<TimeValue>,
}

pub fn parse_performance(
    payload: &[u8],
    arrival: impl Into<Arrival>,
) -> Result<PerformanceMetric, ParseError> {
    let arrival = arrival.into();
    let payload = payload_str(payload)?;
    let mut deduped = None;
    let raw: RawPerformance = parse_raw(payload, &PERFORMANCE, &mut deduped)?;
    let time = event_time(raw.timestamp, raw.created_at, arrival)?;
    let id = id_or_derived(
        raw.id,
        EventKind::PerformanceMetric,
        payload.as_bytes(),
        arrival,
    );
    let strategy = raw.trigger_match_strategy.as_deref().unwrap_or("unknown");
    let components = raw_json(raw.confidence_components);
    let (t, [id, trigger_match_strategy], [correlation_id, query_text, confidence_components_json]) =
        TextBuf::pack(
            0,
            [&id, strategy],
            [
                raw.correlation_id.as_deref(),
                raw.query_text.as_deref(),
                components,
            ],
        )?;
    Ok(PerformanceMetric {
        text: t.finish(),
        time,
        id,
        correlation_id,
        query_text,
        routing_duration_ms: raw.routing_duration_ms,
        cache_hit: raw.cache_hit.unwrap_or(false),
        candidates_evaluated: raw.candidates_evaluated,
        trigger_match_strategy,
        confidence_components_json,
    })
}

/// A timestamp as sent: ISO 8601 text (with or without offset; no offset means UTC) or an
/// epoch number in seconds, milliseconds, microseconds or nanoseconds (told by magnitude).
#[derive(Debug)]
enum TimeValue {
    /// Text that is not a time, cut to [`MAX_ERROR_TEXT`] bytes (it is kept for the error).
    Unreadable(String),
    Micros(Micros),
}

impl TimeValue {
    /// The time a field gives, the text of one that gives none, or `None` when it is absent
    /// or `""`.
    fn stated(v: Option<TimeValue>) -> Option<Result<Micros, String>> {
        match v? {
            TimeValue::Micros(m) => Some(Ok(m)),
            TimeValue::Unreadable(s) if s.is_empty() => None,
            TimeValue::Unreadable(s) => Some(Err(s)),
        }
    }
}

fn number_to_micros(n: f64) -> Micros {
    // The unit by magnitude: each bound is year 5138 in the unit below it, so no date of this
    // era is ambiguous. Epoch seconds, milliseconds, microseconds, nanoseconds.
    let a = n.abs();
    if a < 1e11 {
        (n * 1e6) as Micros
    } else if a < 1e14 {
        (n * 1e3) as Micros
    } else if a < 1e17 {
        n as Micros
    } else {
        (n / 1e3) as Micros
    }
}

impl<'de> Deserialize<'de> for TimeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TimeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an ISO 8601 timestamp or an epoch number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeValue, E> {
                // Parsed right away so the borrowed text needs no copy when valid.
                Ok(match parse_iso8601(v) {
                    Some(m) => TimeValue::Micros(m),
                    None => {
                        let cut = cut_text(v, MAX_ERROR_TEXT);
                        let more = if cut.len() < v.len() { "…" } else { "" };
                        TimeValue::Unreadable(format!("{cut}{more}"))
                    }
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<TimeValue, E> {
                Ok(TimeValue::Micros(number_to_micros(v as f64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TimeValue, E> {
                Ok(TimeValue::Micros(number_to_micros(v as f64)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<TimeValue, E> {
                Ok(TimeValue::Micros(number_to_micros(v)))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Micros = 1_764_000_000_000_000; // 2025-11-24T16:00:00Z

    fn ts(s: &str) -> Micros {
        parse_iso8601(s).unwrap()
    }

    #[test]
    fn routing_snake_case_full() {
        let p = br#"{"id":"r1","correlation_id":"c1","user_request":"fix it","selected_agent":"agent-a",
            "confidence_score":0.9,"routing_strategy":"enhanced","alternatives":[{"agent":"b","confidence":0.5,"reasoning":"meh"}],
            "reasoning":"best","routing_time_ms":12,"context":{"k":[1,2]},"project_path":"/p","project_name":"proj",
            "session_id":"s1","timestamp":"2025-11-20T09:15:00.000000+00:00"}"#;
        let e = parse_routing(p, NOW).unwrap();
        assert_eq!(e.id(), "r1");
        assert_eq!(e.correlation_id(), Some("c1"));
        assert_eq!(e.selected_agent(), "agent-a");
        assert_eq!(e.confidence_score, Some(0.9));
        assert_eq!(e.routing_time_ms, Some(12.0));
        assert_eq!(e.context_json(), Some(r#"{"k":[1,2]}"#));
        assert_eq!(e.alternatives().len(), 1);
        assert_eq!(
            e.alternatives().next().and_then(|a| a.confidence),
            Some(0.5)
        );
        assert_eq!(e.session_id(), Some("s1"));
        assert_eq!(e.time, ts("2025-11-20T09:15:00Z"));
    }

    #[test]
    fn routing_camel_case_and_aliases() {
        let p = br#"{"correlationId":"c","selectedAgent":"x","confidence":0.25,"routingTimeMs":3.5,
            "routingStrategy":"s","projectName":"p","sessionId":"z","userRequest":"u","timestamp":"2025-11-20T09:15:00Z"}"#;
        let e = parse_routing(p, NOW).unwrap();
        assert_eq!(e.selected_agent(), "x");
        assert_eq!(e.correlation_id(), Some("c"));
        assert_eq!(e.confidence_score, Some(0.25));
        assert_eq!(e.routing_time_ms, Some(3.5));
        assert_eq!(e.routing_strategy(), Some("s"));
        assert_eq!(e.user_request(), Some("u"));
        assert!(!e.id().is_empty(), "a missing id gets a derived UUID");
    }

    #[test]
    fn an_event_without_a_time_takes_the_record_time_clamped_to_now() {
        let arrival = |record_time| Arrival {
            now: NOW,
            record_time,
            position: None,
        };
        let untimed = br#"{"agent_name":"a","action_type":"x"}"#;
        let a = parse_action(untimed, arrival(Some(NOW - 7_000_000))).unwrap();
        assert_eq!(a.time, NOW - 7_000_000);
        assert_eq!(parse_action(untimed, arrival(None)).unwrap().time, NOW);
        // A record time in the future is clamped like an event time.
        assert_eq!(
            parse_action(untimed, arrival(Some(NOW + 1))).unwrap().time,
            NOW
        );
        // The event's own time wins.
        let timed = br#"{"agent_name":"a","action_type":"x","timestamp":"2025-11-20T09:15:00Z"}"#;
        let own = parse_action(timed, arrival(Some(NOW - 7_000_000)))
            .unwrap()
            .time;
        assert_eq!(own, parse_action(timed, NOW).unwrap().time);
        assert_ne!(own, NOW - 7_000_000);
    }

    /// An event stamped later than its record was sent is clamped to the record's time (to
    /// the end of its millisecond), which is the same when a restarted replica replays it
    /// long after, when the event's time is no longer in the future.
    #[test]
    fn an_event_time_after_its_record_is_clamped_alike_live_and_on_replay() {
        let sent = NOW - 2_000_000;
        let ahead = br#"{"agent_name":"a","action_type":"x","timestamp":"2999-01-01T00:00:00Z"}"#;
        let at = |now| Arrival {
            now,
            record_time: Some(sent),
            position: Some((0, 7)),
        };
        let live = parse_action(ahead, at(NOW)).unwrap().time;
        let replayed = parse_action(ahead, at(NOW + 3_600_000_000)).unwrap().time;
        assert_eq!(live, sent + 999);
        assert_eq!(replayed, live);
        // Microseconds within the record's millisecond are kept.
        let within = format!(
            r#"{{"agent_name":"a","action_type":"x","timestamp":{}}}"#,
            (sent + 500) as f64 / 1e6
        );
        let t = parse_action(within.as_bytes(), at(NOW)).unwrap().time;
        assert!((sent..=sent + 999).contains(&t), "{t}");
        // A record stamped in the future (the producer's clock ahead): the receive time.
        let early = Arrival {
            now: NOW,
            record_time: Some(NOW + 5_000_000),
            position: None,
        };
        assert_eq!(parse_action(ahead, early).unwrap().time, NOW);
    }

    /// An event without an id gets one derived from the message: the same on every replica
    /// and every replay, different for another message.
    #[test]
    fn a_missing_id_is_derived_from_the_message() {
        let untimed = br#"{"agent_name":"a","action_type":"x"}"#;
        let at = |offset, now| Arrival {
            now,
            record_time: Some(NOW - 1_000_000),
            position: Some((2, offset)),
        };
        let id = |payload: &[u8], arrival| parse_action(payload, arrival).unwrap().id().to_string();
        let first = id(untimed, at(40, NOW));
        let parsed = uuid::Uuid::parse_str(&first).unwrap();
        assert_eq!(parsed.get_version(), Some(uuid::Version::Custom));
        assert_eq!(id(untimed, at(40, NOW + 86_400_000_000)), first);
        // The same bytes at another offset (sent twice) are two events.
        assert_ne!(id(untimed, at(41, NOW)), first);
        assert_ne!(
            id(br#"{"agent_name":"b","action_type":"x"}"#, at(40, NOW)),
            first
        );
        // Another topic's message at the same place.
        let routing = parse_routing(br#"{"selected_agent":"a"}"#, at(40, NOW)).unwrap();
        assert_ne!(routing.id(), first);
        // An id of its own is kept.
        assert_eq!(
            id(
                br#"{"id":"own","agent_name":"a","action_type":"x"}"#,
                at(40, NOW)
            ),
            "own"
        );
    }

    #[test]
    fn a_field_sent_under_two_spellings_keeps_its_first_non_null_value() {
        let e = parse_routing(
            br#"{"selected_agent":"x","selectedAgent":"y","confidence_score":null,"confidence":0.9,
                "confidenceScore":0.1,"alternatives":[{"agent":"z","confidence":0.4}]}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(e.selected_agent(), "x");
        assert_eq!(e.confidence_score, Some(0.9));
        assert_eq!(e.alternatives().count(), 1);
        let a = parse_action(
            br#"{"agentName":"a","agent_name":"b","action_type":"t","actionType":"u"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!((a.agent_name(), a.action_type()), ("a", "t"));
        let t = parse_transformation(
            br#"{"source_agent":"a","target_agent":"b","confidence":0.5,"confidence_score":0.7}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(t.confidence_score, Some(0.5));
        let m = parse_performance(
            br#"{"latencyMs":7,"routing_duration_ms":8,"cache_hit":true,"cacheHit":false}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(m.routing_duration_ms, Some(7.0));
        assert!(m.cache_hit);
        // A required field still has to be there under some spelling, with a value.
        assert!(matches!(
            parse_action(
                br#"{"agent_name":null,"agentName":null,"action_type":"t"}"#,
                NOW
            ),
            Err(ParseError::MissingField("agent_name"))
        ));
        // Other errors are not retried: a wrong type stays an error.
        assert!(
            parse_routing(
                br#"{"selected_agent":"x","selectedAgent":"y","confidence":"high"}"#,
                NOW
            )
            .is_err()
        );
    }

    #[test]
    fn an_alternative_sent_under_two_spellings_keeps_its_first_non_null_value() {
        // Alone (no duplicate at the top) and together with one at the top.
        for top in [
            r#""selected_agent":"x""#,
            r#""selected_agent":"x","selectedAgent":"y""#,
        ] {
            let json = format!(
                r#"{{{top},"alternatives":[{{"agent":"a","agentName":"b","confidence_score":null,
                    "confidence":0.4,"confidenceScore":0.3,"reasoning":"r\"q"}},"not an object"],
                    "routingTimeMs":5}}"#
            );
            // The second entry is not an object: left out, as without duplicates.
            let without = json.replace(r#","not an object""#, "");
            for (json, dropped) in [(json, 1), (without, 0)] {
                let e = parse_routing(json.as_bytes(), NOW).expect(&json);
                assert_eq!(e.selected_agent(), "x");
                assert_eq!(e.routing_time_ms, Some(5.0));
                assert_eq!(e.dropped_alternatives, dropped, "{json}");
                let alts: Vec<_> = e.alternatives().collect();
                assert_eq!(alts.len(), 1);
                assert_eq!(alts[0].agent, "a");
                assert_eq!(alts[0].confidence, Some(0.4));
                assert_eq!(alts[0].reasoning, Some("r\"q"));
            }
        }
    }

    /// Only `selected_agent` is required: an alternative of no use (no agent, null, not an
    /// object, a wrong type) is left out and counted, and the decision kept (it was lost).
    #[test]
    fn unusable_alternatives_are_left_out_and_the_decision_kept() {
        for (alternatives, dropped) in [
            (r#"[{"confidence":0.4,"reasoning":"x"}]"#, 1),
            (r#"["b","c"]"#, 2),
            ("[null]", 1),
            (r#"[{"agent":null,"agentName":null}]"#, 1),
            (r#"[{"agent":5}]"#, 1),
            (r#"[{"agent":"b","confidence":"high"}]"#, 1),
            (r#"[7,true,[],{}]"#, 4),
        ] {
            for top in [
                r#""selected_agent":"a""#,
                r#""selected_agent":"a","selectedAgent":"z""#,
            ] {
                let json = format!(r#"{{{top},"alternatives":{alternatives}}}"#);
                let e = parse_routing(json.as_bytes(), NOW).expect(&json);
                assert_eq!(e.selected_agent(), "a", "{json}");
                assert_eq!(e.alternatives().len(), 0, "{json}");
                assert_eq!(e.dropped_alternatives, dropped, "{json}");
            }
        }
        // The usable ones are kept, in order, with their spellings repaired.
        let e = parse_routing(
            br#"{"selected_agent":"a","alternatives":[{"agent":"b","confidence":0.5},"c",null,
                {"reasoning":"r"},{"agentName":"d","agent_name":"e","confidence_score":0.25},
                {"agent":"f","confidence":NaN}]}"#,
            NOW,
        )
        .unwrap();
        let alts: Vec<_> = e.alternatives().map(|a| (a.agent, a.confidence)).collect();
        assert_eq!(alts, [("b", Some(0.5)), ("d", Some(0.25)), ("f", None)]);
        assert_eq!(e.dropped_alternatives, 3);
        let all_good = br#"{"selected_agent":"a","alternatives":[{"agent":"b"}]}"#;
        assert_eq!(
            parse_routing(all_good, NOW).unwrap().dropped_alternatives,
            0
        );
        // `alternatives` itself of the wrong type is a wrong type, as for any other field.
        assert!(matches!(
            parse_routing(br#"{"selected_agent":"a","alternatives":"b"}"#, NOW),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn zero_false_and_empty_are_values_null_is_absent() {
        let p = br#"{"selected_agent":"","confidence_score":0,"routing_time_ms":0,"reasoning":"","context":null,"project_name":null}"#;
        let e = parse_routing(p, NOW).unwrap();
        assert_eq!(e.selected_agent(), "");
        assert_eq!(e.confidence_score, Some(0.0));
        assert_eq!(e.routing_time_ms, Some(0.0));
        assert_eq!(e.reasoning(), Some(""));
        assert_eq!(e.context_json(), None);
        assert_eq!(e.project_name(), None);
        assert_eq!(e.time, NOW, "no timestamp: receive time");

        let a = parse_action(
            br#"{"agent_name":"a","action_type":"tool_call","success":false,"debug_mode":false,"duration_ms":0,"action_details":null}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(a.success, Some(false));
        assert_eq!(a.debug_mode, Some(false));
        assert_eq!(a.duration_ms, Some(0.0));
        assert_eq!(a.action_details_json(), None);

        let t = parse_transformation(
            br#"{"source_agent":"a","target_agent":"b","success":false,"confidence_score":0}"#,
            NOW,
        )
        .unwrap();
        assert!(!t.success);
        assert_eq!(t.confidence_score, Some(0.0));
        let t = parse_transformation(
            br#"{"sourceAgent":"a","targetAgent":"b","success":null}"#,
            NOW,
        )
        .unwrap();
        assert!(t.success, "success defaults to true");

        let m = parse_performance(
            br#"{"routing_duration_ms":0,"cache_hit":false,"trigger_match_strategy":"","candidates_evaluated":0}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(m.routing_duration_ms, Some(0.0));
        assert_eq!(m.trigger_match_strategy(), "");
        assert_eq!(m.candidates_evaluated, Some(0));
    }

    #[test]
    fn python_nan_and_infinity_are_absent_values_not_lost_events() {
        let e = parse_routing(
            br#"{"selected_agent":"a","confidence_score":NaN,"routing_time_ms":Infinity,"reasoning":"NaN \" Infinity","alternatives":[{"agent":"b","confidence":-Infinity}]}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(e.selected_agent(), "a");
        assert_eq!(e.confidence_score, None);
        assert_eq!(e.routing_time_ms, None);
        assert_eq!(
            e.reasoning(),
            Some("NaN \" Infinity"),
            "strings are left alone"
        );
        let a = parse_action(
            br#"{"agentName":"a","actionType":"x","agent_name":"a2","duration_ms":NaN,"action_details":{"score":NaN}}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(
            a.agent_name(),
            "a",
            "two spellings, first kept, after the fix-up"
        );
        assert_eq!(a.duration_ms, None);
        assert_eq!(a.action_details_json(), Some(r#"{"score":null}"#));
        assert_eq!(non_finite_as_null(r#"{"a":"NaN"}"#), None);
        // Anything else that is not JSON is still an error.
        assert!(matches!(
            parse_action(br#"{"agent_name":"a","action_type":"x","n":nan}"#, NOW),
            Err(ParseError::Json(_))
        ));
    }

    #[test]
    fn action_camel_case() {
        let p = br#"{"id":"a1","correlationId":"c","agentName":"agent-x","actionType":"error","actionName":"Read",
            "actionDetails":{"file":"x"},"debugMode":true,"durationMs":7,"projectName":"p","timestamp":"2025-11-20T09:15:00.5+01:00"}"#;
        let a = parse_action(p, NOW).unwrap();
        assert_eq!(a.agent_name(), "agent-x");
        assert_eq!(a.action_type(), "error");
        assert_eq!(a.action_name(), Some("Read"));
        assert_eq!(a.action_details_json(), Some(r#"{"file":"x"}"#));
        assert_eq!(a.debug_mode, Some(true));
        assert_eq!(a.duration_ms, Some(7.0));
        assert_eq!(a.time, ts("2025-11-20T08:15:00.5Z"));
    }

    #[test]
    fn performance_defaults_and_aliases() {
        let m = parse_performance(
            br#"{"latency_ms":42.5,"queryText":"q","confidenceComponents":{"a":1}}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(m.routing_duration_ms, Some(42.5));
        assert!(!m.cache_hit);
        assert_eq!(m.trigger_match_strategy(), "unknown");
        assert_eq!(m.query_text(), Some("q"));
        assert_eq!(m.confidence_components_json(), Some(r#"{"a":1}"#));
        let m = parse_performance(
            br#"{"routingDurationMs":1,"cacheHit":true,"triggerMatchStrategy":"exact"}"#,
            NOW,
        )
        .unwrap();
        assert!(m.cache_hit);
        assert_eq!(m.trigger_match_strategy(), "exact");
    }

    #[test]
    fn many_members_under_two_spellings_parse() {
        // A duplicated field sends the parse through the spelling repair, which indexes the
        // names it has kept (so a hostile payload of many members stays linear; no timing is
        // asserted here, these machines are shared). Every other member survives it once.
        let mut json = String::from(r#"{"agent_name":"a","agentName":"a","action_type":"x""#);
        for i in 0..200_000 {
            json.push_str(&format!(r#","m{i}":{i}"#));
        }
        json.push('}');
        let a = parse_action(json.as_bytes(), NOW).unwrap();
        assert_eq!((a.agent_name(), a.action_type()), ("a", "x"));
        let once = dedupe_spellings(&json, &ACTION).unwrap();
        let Members(members) = serde_json::from_str(&once).unwrap();
        assert_eq!(members.len(), 200_002);
        assert_eq!(members[0].0, "agent_name");
        let (name, value) = &members[200_001];
        assert_eq!((name.as_ref(), value.get()), ("m199999", "199999"));
    }

    #[test]
    fn timestamps() {
        // Naive isoformat is UTC; createdAt is the fallback; numbers are epoch ms or s.
        let a = parse_action(
            br#"{"agent_name":"a","action_type":"x","timestamp":"2025-11-20T09:15:00.123456"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(a.time, ts("2025-11-20T09:15:00.123456Z"));
        let a = parse_action(
            br#"{"agent_name":"a","action_type":"x","createdAt":"2025-11-20T09:15:00Z"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(a.time, ts("2025-11-20T09:15:00Z"));
        let a = parse_action(
            br#"{"agent_name":"a","action_type":"x","timestamp":1763630100000}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(a.time, 1_763_630_100_000_000);
        let a = parse_action(
            br#"{"agent_name":"a","action_type":"x","timestamp":1763630100}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(a.time, 1_763_630_100_000_000);
        // Microseconds and nanoseconds too (they were read as milliseconds, far in the
        // future, and clamped to now).
        for raw in [
            "1763630100123456",
            "1763630100123456000",
            "1763630100.123456",
        ] {
            let json = format!(r#"{{"agent_name":"a","action_type":"x","timestamp":{raw}}}"#);
            let a = parse_action(json.as_bytes(), NOW).unwrap();
            assert!(
                (a.time - 1_763_630_100_123_456).abs() <= 1,
                "{raw}: {}",
                a.time
            );
        }
        // ISO 8601 offsets without a colon (strftime's `%z`) or minutes, after a `T` too.
        for t in [
            "2025-11-20T09:15:00+0000",
            "2025-11-20T09:15:00+00",
            "2025-11-20T10:15:00+0100",
            "2025-11-20 04:15:00-05",
        ] {
            let json = format!(r#"{{"agent_name":"a","action_type":"x","createdAt":"{t}"}}"#);
            let a = parse_action(json.as_bytes(), NOW).unwrap();
            assert_eq!(a.time, ts("2025-11-20T09:15:00Z"), "{t}");
        }
        // The future is clamped to the receive time.
        let a = parse_action(
            br#"{"agent_name":"a","action_type":"x","timestamp":"2999-01-01T00:00:00Z"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(a.time, NOW);
        // Escaped strings still parse (borrowing falls back to a copy).
        let a = parse_action(br#"{"agent_name":"a\"b","action_type":"x"}"#, NOW).unwrap();
        assert_eq!(a.agent_name(), "a\"b");
    }

    /// `timestamp`, else `createdAt`: an empty or unreadable `timestamp` gives way to a
    /// readable `createdAt` (it was an error, or `""` was).
    #[test]
    fn an_empty_or_unreadable_timestamp_gives_way_to_created_at() {
        let at = ts("2025-11-20T09:15:00Z");
        for json in [
            r#"{"agent_name":"a","action_type":"success","timestamp":"","createdAt":"2025-11-20T09:15:00Z"}"#,
            r#"{"agent_name":"a","action_type":"success","timestamp":"yesterday","created_at":"2025-11-20T09:15:00Z"}"#,
            r#"{"agent_name":"a","action_type":"success","timestamp":null,"createdAt":1763630100}"#,
        ] {
            assert_eq!(
                parse_action(json.as_bytes(), NOW).unwrap().time,
                at,
                "{json}"
            );
        }
        let e = parse_routing(
            br#"{"selected_agent":"a","timestamp":"","createdAt":"2025-11-20T09:15:00Z"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(e.time, at);
        // A readable `timestamp` still wins over `createdAt`, even an unreadable one.
        let own = br#"{"agent_name":"a","action_type":"x","timestamp":"2025-11-20T09:15:00Z","createdAt":"soon"}"#;
        assert_eq!(parse_action(own, NOW).unwrap().time, at);
        // `""` alone says nothing: the record's time, else the receive time.
        let empty = br#"{"agent_name":"a","action_type":"x","timestamp":"","createdAt":""}"#;
        assert_eq!(parse_action(empty, NOW).unwrap().time, NOW);
        // Unreadable with nothing readable after it: an error, naming the first.
        for json in [
            r#"{"agent_name":"a","action_type":"x","timestamp":"yesterday","createdAt":"soon"}"#,
            r#"{"agent_name":"a","action_type":"x","timestamp":"yesterday","createdAt":""}"#,
            r#"{"agent_name":"a","action_type":"x","createdAt":"yesterday"}"#,
        ] {
            match parse_action(json.as_bytes(), NOW) {
                Err(ParseError::Timestamp(t)) => assert_eq!(t, "yesterday", "{json}"),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    /// A record time of 0 or less (a producer stamping 0, or -1 for none) is no time: it
    /// neither dates an untimed event nor bounds a timed one (both were 1970, so expired).
    #[test]
    fn a_record_time_of_zero_or_less_is_ignored() {
        let timed = br#"{"agent_name":"a","action_type":"x","timestamp":"2025-11-20T09:15:00Z"}"#;
        let untimed = br#"{"agent_name":"a","action_type":"x"}"#;
        for record_time in [0, -1, -1_000_000] {
            let arrival = Arrival {
                now: NOW,
                record_time: Some(record_time),
                position: Some((0, 3)),
            };
            let t = parse_action(timed, arrival).unwrap().time;
            assert_eq!(t, ts("2025-11-20T09:15:00Z"), "{record_time}");
            assert_eq!(parse_action(untimed, arrival).unwrap().time, NOW);
        }
        // A positive one still bounds the event time.
        let early = Arrival {
            now: NOW,
            record_time: Some(1_000_000),
            position: None,
        };
        assert_eq!(parse_action(timed, early).unwrap().time, 1_000_999);
    }

    /// A megabyte-long bad value makes an error message of a few hundred bytes, not a
    /// megabyte (serde quotes the whole string; the timestamp error held all of it).
    #[test]
    fn error_messages_quote_a_bounded_part_of_the_value() {
        let huge = "é".repeat(500_000);
        let wrong_type = format!(r#"{{"selected_agent":"a","confidence_score":"{huge}"}}"#);
        let bad_time = format!(r#"{{"agent_name":"a","action_type":"x","timestamp":"{huge}"}}"#);
        for e in [
            parse_routing(wrong_type.as_bytes(), NOW).unwrap_err(),
            parse_action(bad_time.as_bytes(), NOW).unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(text.len() <= MAX_ERROR_TEXT + 40, "{} bytes", text.len());
            assert!(text.contains("éé"), "{text}");
            if let ParseError::Timestamp(t) = &e {
                assert!(t.len() <= MAX_ERROR_TEXT + "…".len(), "{} bytes", t.len());
                assert!(t.ends_with('…'));
            }
        }
        // Short messages are whole.
        let e = parse_routing(br#"{"selected_agent":"a","confidence_score":"high"}"#, NOW);
        let text = e.unwrap_err().to_string();
        assert!(text.ends_with("expected f64 at line 1 column 47"), "{text}");
        assert!(!text.contains('…'));
        // Cut on a character boundary, exactly at the limit when it is one.
        assert_eq!(
            Bounded("a".repeat(300)).to_string(),
            format!("{}…", "a".repeat(256))
        );
        assert_eq!(Bounded("a".repeat(256)).to_string(), "a".repeat(256));
        let odd = format!("a{}", "é".repeat(200));
        assert_eq!(Bounded(&odd).to_string(), format!("a{}…", "é".repeat(127)));
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(matches!(
            parse_action(b"not json", NOW),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_action(b"[1,2]", NOW),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(parse_action(b"", NOW), Err(ParseError::Json(_))));
        assert!(matches!(
            parse_action(br#"{"agent_name":"a"}"#, NOW),
            Err(ParseError::MissingField("action_type"))
        ));
        assert!(matches!(
            parse_action(br#"{"agent_name":null,"action_type":"x"}"#, NOW),
            Err(ParseError::MissingField("agent_name"))
        ));
        assert!(matches!(
            parse_routing(br#"{"confidence_score":0.5}"#, NOW),
            Err(ParseError::MissingField("selected_agent"))
        ));
        assert!(matches!(
            parse_routing(br#"{"selected_agent":"a","confidence_score":"high"}"#, NOW),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_transformation(br#"{"source_agent":"a"}"#, NOW),
            Err(ParseError::MissingField("target_agent"))
        ));
        assert!(matches!(
            parse_performance(br#"{"cache_hit":"yes"}"#, NOW),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_action(
                br#"{"agent_name":"a","action_type":"x","timestamp":"yesterday"}"#,
                NOW
            ),
            Err(ParseError::Timestamp(_))
        ));
        assert!(matches!(
            parse_action(
                br#"{"agent_name":"a","action_type":"x","timestamp":true}"#,
                NOW
            ),
            Err(ParseError::Json(_))
        ));
    }

    /// serde's derive also reads a struct from a JSON array of its fields in order, and every
    /// field here is optional: `[]` was a performance metric, `[null,null,null,"x"]` a routing
    /// decision for agent `x`. Only an object is an event, on every topic.
    #[test]
    fn a_payload_that_is_not_an_object_is_an_error() {
        let arrays: [(EventKind, &[u8]); 8] = [
            (EventKind::PerformanceMetric, b"[]"),
            (EventKind::PerformanceMetric, br#"["id","c","q",12.5,true]"#),
            (EventKind::RoutingDecision, br#"[null,null,null,"x"]"#),
            (EventKind::RoutingDecision, b" \n[null, null, null, \"x\"] "),
            (EventKind::AgentAction, br#"["i","c","a","success"]"#),
            (EventKind::Transformation, br#"["i","c","a","b"]"#),
            // With a duplicate or a bare NaN, which sends the parse through its repairs.
            (
                EventKind::AgentAction,
                br#"["i","c","a","success",null,null,null,NaN]"#,
            ),
            (EventKind::Transformation, br#"["i","c","a","b",null,NaN]"#),
        ];
        for (kind, payload) in arrays {
            let text = String::from_utf8_lossy(payload);
            match parse(kind, payload, NOW) {
                Err(ParseError::Json(e)) => {
                    assert!(e.to_string().contains("object"), "{kind:?} {text}: {e}")
                }
                other => panic!("{kind:?} {text}: {other:?}"),
            }
        }
        // Nor is any other JSON value.
        for kind in EventKind::ALL {
            for payload in ["null", "1", r#""x""#, "true"] {
                assert!(
                    matches!(
                        parse(kind, payload.as_bytes(), NOW),
                        Err(ParseError::Json(_))
                    ),
                    "{kind:?} {payload}"
                );
            }
        }
        // An alternative is an object too: `["z"]` is not an alternative for agent `z` (it is
        // left out, the decision kept).
        for alternatives in [r#"[["z"]]"#, r#"[["z",0.5]]"#, r#"[{"agent":"y"},["z"]]"#] {
            for top in [
                r#""selected_agent":"x""#,
                r#""selected_agent":"x","selectedAgent":"y""#,
            ] {
                let json = format!(r#"{{{top},"alternatives":{alternatives}}}"#);
                let e = parse_routing(json.as_bytes(), NOW).expect(&json);
                assert!(e.alternatives().all(|a| a.agent == "y"), "{json}");
                assert_eq!(e.dropped_alternatives, 1, "{json}");
            }
        }
        // Objects still parse, with whitespace around them, and nested arrays inside them.
        let e = parse(
            EventKind::RoutingDecision,
            b" {\"selected_agent\":\"x\",\"context\":[1,[2]],\"alternatives\":[{\"agent\":\"z\"}]}\n",
            NOW,
        )
        .unwrap();
        assert_eq!(e.kind(), EventKind::RoutingDecision);
    }

    #[test]
    fn dispatch_by_kind() {
        let e = parse(EventKind::PerformanceMetric, br#"{}"#, NOW).unwrap();
        assert_eq!(e.kind(), EventKind::PerformanceMetric);
        assert_eq!(e.time(), NOW);
        assert!(parse(EventKind::AgentAction, br#"{}"#, NOW).is_err());
    }
}
