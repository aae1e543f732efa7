//! The event parsers as they were before `flat_json`: serde-derived structs read by
//! serde_json. Kept as the reference the tests hold the scanner-based parsers to (same events
//! from the same payloads, errors on the same payloads).

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_json::value::RawValue;

use super::{
    AgentAction, AlternativeSpans, Micros, ParseError, PerformanceMetric, RawAlternative,
    RoutingDecision, Str, TextBuf, TimeValue, Transformation, event_time, id_or_new,
    number_to_micros, parse_iso8601, payload_str, required,
};

fn raw_json(v: Option<&RawValue>) -> Option<&str> {
    v.map(RawValue::get)
}

/// The reference's errors: serde_json's, or the shared checks'.
fn json(e: serde_json::Error) -> ParseError {
    ParseError::Alternatives(e)
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
    alternatives: Option<Vec<RawAlternative<'a>>>,
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

pub fn parse_routing(payload: &[u8], now: Micros) -> Result<RoutingDecision, ParseError> {
    let payload = payload_str(payload)?;
    let raw: RawRouting = serde_json::from_str(payload).map_err(json)?;
    let time = event_time(raw.timestamp, raw.created_at, now)?;
    let selected_agent = required(&raw.selected_agent, "selected_agent")?;
    let alts = raw.alternatives.as_deref().unwrap_or_default();
    if alts.iter().any(|a| a.agent.is_none()) {
        return Err(ParseError::MissingField("alternatives[].agent"));
    }
    let id = id_or_new(raw.id);
    let context = raw_json(raw.context);
    let alternatives_len = alts
        .iter()
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
    let mut alternatives = Vec::with_capacity(alts.len());
    for alt in alts {
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

pub fn parse_action(payload: &[u8], now: Micros) -> Result<AgentAction, ParseError> {
    let payload = payload_str(payload)?;
    let raw: RawAction = serde_json::from_str(payload).map_err(json)?;
    let time = event_time(raw.timestamp, raw.created_at, now)?;
    let agent_name = required(&raw.agent_name, "agent_name")?;
    let action_type = required(&raw.action_type, "action_type")?;
    let id = id_or_new(raw.id);
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

pub fn parse_transformation(payload: &[u8], now: Micros) -> Result<Transformation, ParseError> {
    let payload = payload_str(payload)?;
    let raw: RawTransformation = serde_json::from_str(payload).map_err(json)?;
    let time = event_time(raw.timestamp, raw.created_at, now)?;
    let source_agent = required(&raw.source_agent, "source_agent")?;
    let target_agent = required(&raw.target_agent, "target_agent")?;
    let id = id_or_new(raw.id);
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

pub fn parse_performance(payload: &[u8], now: Micros) -> Result<PerformanceMetric, ParseError> {
    let payload = payload_str(payload)?;
    let raw: RawPerformance = serde_json::from_str(payload).map_err(json)?;
    let time = event_time(raw.timestamp, raw.created_at, now)?;
    let id = id_or_new(raw.id);
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

impl<'de> Deserialize<'de> for TimeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TimeValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an ISO 8601 timestamp or epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeValue, E> {
                // Parsed right away so the borrowed text needs no copy when valid.
                Ok(match parse_iso8601(v) {
                    Some(m) => TimeValue::Micros(m),
                    None => TimeValue::Text(v.to_owned()),
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
