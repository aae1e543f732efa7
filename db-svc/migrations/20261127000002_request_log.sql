-- db-svc's own idempotency record: one row per write request that carried a request_id,
-- written in the same transaction as the write, holding the result to replay.
CREATE TABLE IF NOT EXISTS omnibus_request_log (
    request_id text PRIMARY KEY,
    operation text NOT NULL,
    table_name text NOT NULL,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_omnibus_request_log_created_at ON omnibus_request_log (created_at);
