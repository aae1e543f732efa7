//! Typed events and aggregates -> protobuf messages.

use omnibus_proto::consumer::v1 as pb;

use crate::events::{self, EventKind, Micros};
use crate::state;

pub fn timestamp(micros: Micros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
    }
}

pub fn kind(k: EventKind) -> pb::EventKind {
    match k {
        EventKind::RoutingDecision => pb::EventKind::RoutingDecision,
        EventKind::AgentAction => pb::EventKind::AgentAction,
        EventKind::Transformation => pb::EventKind::Transformation,
        EventKind::PerformanceMetric => pb::EventKind::PerformanceMetric,
    }
}

pub fn agent_metrics(m: &state::AgentMetrics) -> pb::AgentMetrics {
    pb::AgentMetrics {
        agent: m.agent.clone(),
        total_requests: m.total_requests,
        avg_routing_time_ms: m.avg_routing_time_ms,
        avg_confidence: m.avg_confidence,
        success_rate: m.success_rate,
        successes: m.successes,
        errors: m.errors,
        total_actions: m.total_actions,
        last_seen: Some(timestamp(m.last_seen)),
    }
}

pub fn stats(s: &state::PerformanceStats) -> pb::PerformanceStats {
    pb::PerformanceStats {
        total_queries: s.total_queries,
        cache_hits: s.cache_hits,
        cache_hit_rate: s.cache_hit_rate,
        avg_routing_duration_ms: s.avg_routing_duration_ms,
    }
}

/// An event text as an owned string (a copy of the bytes, without `Display`'s formatting
/// machinery and growing: this runs for every update a stream delivers).
fn s(t: &events::Text) -> String {
    t.as_str().to_owned()
}

/// An optional event text as an owned string.
fn opt(t: Option<&events::Text>) -> Option<String> {
    t.map(s)
}

pub fn action(a: &events::AgentAction) -> pb::AgentAction {
    pb::AgentAction {
        id: s(&a.id),
        correlation_id: opt(a.correlation_id.as_ref()),
        agent_name: s(&a.agent_name),
        action_type: s(&a.action_type),
        action_name: opt(a.action_name.as_ref()),
        action_details_json: opt(a.action_details_json.as_ref()),
        debug_mode: a.debug_mode,
        duration_ms: a.duration_ms,
        project_name: opt(a.project_name.as_ref()),
        success: a.success,
        timestamp: Some(timestamp(a.time)),
    }
}

pub fn decision(d: &events::RoutingDecision) -> pb::RoutingDecision {
    pb::RoutingDecision {
        id: s(&d.id),
        correlation_id: opt(d.correlation_id.as_ref()),
        user_request: opt(d.user_request.as_ref()),
        selected_agent: s(&d.selected_agent),
        confidence_score: d.confidence_score,
        routing_strategy: opt(d.routing_strategy.as_ref()),
        alternatives: d
            .alternatives
            .iter()
            .map(|a| pb::RoutingAlternative {
                agent: s(&a.agent),
                confidence: a.confidence,
                reasoning: opt(a.reasoning.as_ref()),
            })
            .collect(),
        reasoning: opt(d.reasoning.as_ref()),
        routing_time_ms: d.routing_time_ms,
        context_json: opt(d.context_json.as_ref()),
        project_path: opt(d.project_path.as_ref()),
        project_name: opt(d.project_name.as_ref()),
        session_id: opt(d.session_id.as_ref()),
        timestamp: Some(timestamp(d.time)),
    }
}

pub fn transformation(t: &events::Transformation) -> pb::Transformation {
    pb::Transformation {
        id: s(&t.id),
        correlation_id: opt(t.correlation_id.as_ref()),
        source_agent: s(&t.source_agent),
        target_agent: s(&t.target_agent),
        transformation_reason: opt(t.transformation_reason.as_ref()),
        confidence_score: t.confidence_score,
        transformation_duration_ms: t.transformation_duration_ms,
        success: t.success,
        timestamp: Some(timestamp(t.time)),
    }
}

pub fn performance(m: &events::PerformanceMetric) -> pb::PerformanceMetric {
    pb::PerformanceMetric {
        id: s(&m.id),
        correlation_id: opt(m.correlation_id.as_ref()),
        query_text: opt(m.query_text.as_ref()),
        routing_duration_ms: m.routing_duration_ms,
        cache_hit: m.cache_hit,
        candidates_evaluated: m.candidates_evaluated,
        trigger_match_strategy: s(&m.trigger_match_strategy),
        confidence_components_json: opt(m.confidence_components_json.as_ref()),
        timestamp: Some(timestamp(m.time)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_before_and_after_the_epoch() {
        let t = timestamp(1_500_000);
        assert_eq!((t.seconds, t.nanos), (1, 500_000_000));
        let t = timestamp(-1);
        assert_eq!((t.seconds, t.nanos), (-1, 999_999_000));
    }
}
