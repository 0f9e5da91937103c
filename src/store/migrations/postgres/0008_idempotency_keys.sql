-- The answers of POST /v1/jobs kept under the caller's Idempotency-Key, per tenant, for 24 h: a retry
-- with the same key gets the first answer instead of a second upstream job. `fingerprint` is the
-- SHA-256 of the request (canonical JSON), so the same key with another request is refused. `status`
-- and `body` are null while the first request is in flight. An expired row is never answered from (a
-- claim of its key replaces it), and each claim deletes up to 16 expired rows, oldest first, through
-- the index on created_at: the table drains faster than it fills and holds about one day of keys.
CREATE TABLE idempotency_keys (
    tenant_id BIGINT NOT NULL,
    key TEXT NOT NULL,
    fingerprint BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    status INTEGER,
    body BYTEA,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
