-- The seven platform tables served by db-svc, with the newest known column sets
-- (shared/reference/ecosystem-facts.md section 3). IF NOT EXISTS: db-svc can be pointed at a
-- database where the platform already created them.

CREATE TABLE IF NOT EXISTS agent_routing_decisions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    correlation_id uuid NOT NULL,
    session_id text,
    user_request text,
    user_request_hash text,
    context_snapshot jsonb,
    selected_agent text NOT NULL,
    confidence_score numeric(5,4) NOT NULL,
    routing_strategy text,
    trigger_confidence numeric(5,4),
    context_confidence numeric(5,4),
    capability_confidence numeric(5,4),
    historical_confidence numeric(5,4),
    alternatives jsonb,
    reasoning text,
    routing_time_ms integer,
    cache_hit boolean DEFAULT false,
    selection_validated boolean DEFAULT false,
    actual_success boolean,
    execution_succeeded boolean,
    actual_quality_score numeric(5,4),
    created_at timestamp DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_agent_routing_decisions_selected_agent ON agent_routing_decisions (selected_agent);
CREATE INDEX IF NOT EXISTS idx_agent_routing_decisions_created_at ON agent_routing_decisions (created_at);
CREATE INDEX IF NOT EXISTS idx_agent_routing_decisions_correlation_id ON agent_routing_decisions (correlation_id);

CREATE TABLE IF NOT EXISTS agent_actions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    correlation_id uuid NOT NULL,
    agent_name text NOT NULL,
    action_type text NOT NULL,
    action_name text NOT NULL,
    action_details jsonb DEFAULT '{}'::jsonb,
    debug_mode boolean DEFAULT true,
    duration_ms integer,
    created_at timestamp DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_agent_actions_agent_name ON agent_actions (agent_name);
CREATE INDEX IF NOT EXISTS idx_agent_actions_created_at ON agent_actions (created_at);
CREATE INDEX IF NOT EXISTS idx_agent_actions_correlation_id ON agent_actions (correlation_id);

CREATE TABLE IF NOT EXISTS agent_transformation_events (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    source_agent text NOT NULL,
    target_agent text NOT NULL,
    transformation_reason text,
    confidence_score numeric(5,4),
    transformation_duration_ms integer,
    success boolean DEFAULT true,
    created_at timestamp DEFAULT now(),
    project_path text,
    project_name text,
    claude_session_id text
);
CREATE INDEX IF NOT EXISTS idx_agent_transformation_events_source_agent ON agent_transformation_events (source_agent);
CREATE INDEX IF NOT EXISTS idx_agent_transformation_events_target_agent ON agent_transformation_events (target_agent);
CREATE INDEX IF NOT EXISTS idx_agent_transformation_events_created_at ON agent_transformation_events (created_at);

CREATE TABLE IF NOT EXISTS agent_manifest_injections (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    correlation_id uuid NOT NULL,
    routing_decision_id uuid,
    agent_name text NOT NULL,
    manifest_version text NOT NULL,
    generation_source text NOT NULL,
    is_fallback boolean DEFAULT false,
    patterns_count integer DEFAULT 0,
    infrastructure_services integer DEFAULT 0,
    debug_intelligence_successes integer DEFAULT 0,
    debug_intelligence_failures integer DEFAULT 0,
    query_times jsonb NOT NULL,
    total_query_time_ms integer NOT NULL,
    full_manifest_snapshot jsonb NOT NULL,
    agent_execution_success boolean,
    agent_execution_time_ms integer,
    agent_quality_score numeric(5,4),
    created_at timestamp DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_agent_manifest_injections_agent_name ON agent_manifest_injections (agent_name);
CREATE INDEX IF NOT EXISTS idx_agent_manifest_injections_created_at ON agent_manifest_injections (created_at);
CREATE INDEX IF NOT EXISTS idx_agent_manifest_injections_correlation_id ON agent_manifest_injections (correlation_id);

-- Never defined upstream; designed here: one row per error an agent or service reports.
CREATE TABLE IF NOT EXISTS error_events (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    correlation_id uuid,
    session_id text,
    agent_name text,
    service_name text,
    error_type text NOT NULL,
    error_message text NOT NULL,
    error_details jsonb DEFAULT '{}'::jsonb,
    stack_trace text,
    severity text NOT NULL DEFAULT 'error'
        CONSTRAINT error_events_severity_check
        CHECK (severity IN ('debug', 'info', 'warning', 'error', 'critical')),
    resolved boolean DEFAULT false,
    created_at timestamp DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_error_events_created_at ON error_events (created_at);
CREATE INDEX IF NOT EXISTS idx_error_events_correlation_id ON error_events (correlation_id);
CREATE INDEX IF NOT EXISTS idx_error_events_agent_name ON error_events (agent_name);
CREATE INDEX IF NOT EXISTS idx_error_events_error_type ON error_events (error_type);

CREATE TABLE IF NOT EXISTS pattern_lineage_nodes (
    id uuid PRIMARY KEY,
    pattern_id varchar(255) NOT NULL,
    pattern_name varchar(255) NOT NULL,
    pattern_type varchar(100) NOT NULL,
    pattern_version varchar(50) NOT NULL,
    lineage_id uuid NOT NULL,
    generation integer NOT NULL,
    pattern_data jsonb NOT NULL,
    metadata jsonb,
    correlation_id uuid NOT NULL,
    created_at timestamptz DEFAULT now(),
    language varchar(50),
    CONSTRAINT pattern_lineage_nodes_pattern_version_key UNIQUE (pattern_id, pattern_version)
);
CREATE INDEX IF NOT EXISTS idx_pattern_lineage_nodes_lineage_id ON pattern_lineage_nodes (lineage_id);
CREATE INDEX IF NOT EXISTS idx_pattern_lineage_nodes_correlation_id ON pattern_lineage_nodes (correlation_id);
CREATE INDEX IF NOT EXISTS idx_pattern_lineage_nodes_created_at ON pattern_lineage_nodes (created_at);

CREATE TABLE IF NOT EXISTS pattern_lineage_edges (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    source_node_id uuid NOT NULL
        CONSTRAINT pattern_lineage_edges_source_node_id_fkey REFERENCES pattern_lineage_nodes (id),
    target_node_id uuid NOT NULL
        CONSTRAINT pattern_lineage_edges_target_node_id_fkey REFERENCES pattern_lineage_nodes (id),
    edge_type text NOT NULL,
    edge_weight numeric(10,6),
    transformation_type text,
    metadata jsonb,
    correlation_id uuid,
    created_at timestamp DEFAULT now(),
    created_by text
);
CREATE INDEX IF NOT EXISTS idx_pattern_lineage_edges_source_node_id ON pattern_lineage_edges (source_node_id);
CREATE INDEX IF NOT EXISTS idx_pattern_lineage_edges_target_node_id ON pattern_lineage_edges (target_node_id);
