-- The fingerprint (SHA-256 of the canonical request) of each recorded write: a request id
-- reused for a different write is refused instead of replaying the first one's result.
-- NULL for rows recorded before this column existed (those match on operation and table).
ALTER TABLE omnibus_request_log ADD COLUMN IF NOT EXISTS fingerprint bytea;
