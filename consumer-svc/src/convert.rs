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

pub fn action(a: &events::AgentAction) -> pb::AgentAction {
    pb::AgentAction {
        id: a.id().to_owned(),
        correlation_id: a.correlation_id().map(str::to_owned),
        agent_name: a.agent_name().to_owned(),
        action_type: a.action_type().to_owned(),
        action_name: a.action_name().map(str::to_owned),
        action_details_json: a.action_details_json().map(str::to_owned),
        debug_mode: a.debug_mode,
        duration_ms: a.duration_ms,
        project_name: a.project_name().map(str::to_owned),
        success: a.success,
        timestamp: Some(timestamp(a.time)),
    }
}

pub fn decision(d: &events::RoutingDecision) -> pb::RoutingDecision {
    pb::RoutingDecision {
        id: d.id().to_owned(),
        correlation_id: d.correlation_id().map(str::to_owned),
        user_request: d.user_request().map(str::to_owned),
        selected_agent: d.selected_agent().to_owned(),
        confidence_score: d.confidence_score,
        routing_strategy: d.routing_strategy().map(str::to_owned),
        alternatives: d
            .alternatives()
            .map(|a| pb::RoutingAlternative {
                agent: a.agent.to_owned(),
                confidence: a.confidence,
                reasoning: a.reasoning.map(str::to_owned),
            })
            .collect(),
        reasoning: d.reasoning().map(str::to_owned),
        routing_time_ms: d.routing_time_ms,
        context_json: d.context_json().map(str::to_owned),
        project_path: d.project_path().map(str::to_owned),
        project_name: d.project_name().map(str::to_owned),
        session_id: d.session_id().map(str::to_owned),
        timestamp: Some(timestamp(d.time)),
    }
}

pub fn transformation(t: &events::Transformation) -> pb::Transformation {
    pb::Transformation {
        id: t.id().to_owned(),
        correlation_id: t.correlation_id().map(str::to_owned),
        source_agent: t.source_agent().to_owned(),
        target_agent: t.target_agent().to_owned(),
        transformation_reason: t.transformation_reason().map(str::to_owned),
        confidence_score: t.confidence_score,
        transformation_duration_ms: t.transformation_duration_ms,
        success: t.success,
        timestamp: Some(timestamp(t.time)),
    }
}

pub fn performance(m: &events::PerformanceMetric) -> pb::PerformanceMetric {
    pb::PerformanceMetric {
        id: m.id().to_owned(),
        correlation_id: m.correlation_id().map(str::to_owned),
        query_text: m.query_text().map(str::to_owned),
        routing_duration_ms: m.routing_duration_ms,
        cache_hit: m.cache_hit,
        candidates_evaluated: m.candidates_evaluated,
        trigger_match_strategy: m.trigger_match_strategy().to_owned(),
        confidence_components_json: m.confidence_components_json().map(str::to_owned),
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
