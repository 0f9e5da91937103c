-- jobhook's state. Times are Unix milliseconds (UTC).

-- A tenant is whoever holds one of its API keys; it signs with its own secret.
CREATE TABLE tenants (
    id             INTEGER PRIMARY KEY,
    name           TEXT    NOT NULL,
    signing_secret TEXT    NOT NULL,   -- whsec_…
    -- After a rotation the old secret keeps signing (beside the new one) until previous_until.
    previous_secret TEXT,
    previous_until  INTEGER,
    created_at     INTEGER NOT NULL
);

-- Server-wide values made once: the key that makes list cursors tamper-proof.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- Keys are stored as SHA-256 hashes only. source: 'config' (from JOBHOOK_API_KEYS) or 'stored'.
CREATE TABLE api_keys (
    id         INTEGER PRIMARY KEY,
    tenant_id  INTEGER NOT NULL REFERENCES tenants (id),
    name       TEXT    NOT NULL,
    key_hash   BLOB    NOT NULL UNIQUE,
    source     TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);

-- One row per upstream job, shared by all its subscribers. result holds the final upstream body,
-- byte for byte, once the job is Succeed or Failed.
CREATE TABLE jobs (
    job_id      TEXT    PRIMARY KEY,
    partition   INTEGER NOT NULL,      -- which lease covers the job (PostgreSQL scale-out)
    status      TEXT,                  -- last status seen upstream
    result      BLOB,
    last_error  TEXT,                  -- last upstream error, cleared by a good answer
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    finished_at INTEGER
);

-- A subscription is also its own delivery outbox: state 'delivering' with next_attempt_at set is a
-- delivery waiting for its next attempt; webhook_id is fixed when the delivery is created.
CREATE TABLE subscriptions (
    id              TEXT    PRIMARY KEY,   -- UUIDv7: ordering by id is ordering by creation
    tenant_id       INTEGER NOT NULL REFERENCES tenants (id),
    job_id          TEXT    NOT NULL REFERENCES jobs (job_id),
    partition       INTEGER NOT NULL,   -- the job's
    callback_url    TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    failure_reason  TEXT,
    webhook_id      TEXT,
    series          INTEGER NOT NULL DEFAULT 1,   -- delivery series: 1, then one more per redelivery
    attempts        INTEGER NOT NULL DEFAULT 0,   -- attempts made in the current series
    next_attempt_at INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

-- The same (job, callback) from one tenant is one subscription while it is live or delivered; after it
-- failed, expired or was cancelled, registering again starts a new one.
CREATE UNIQUE INDEX subscriptions_dedupe ON subscriptions (tenant_id, job_id, callback_url)
    WHERE state IN ('polling', 'delivering', 'delivered');
CREATE INDEX subscriptions_by_tenant ON subscriptions (tenant_id, id);
CREATE INDEX subscriptions_by_job ON subscriptions (job_id, state);
CREATE INDEX subscriptions_delivering ON subscriptions (state) WHERE state = 'delivering';

-- Every delivery attempt, for GET /v1/subscriptions/{id}/deliveries.
CREATE TABLE delivery_attempts (
    id              INTEGER PRIMARY KEY,
    subscription_id TEXT    NOT NULL REFERENCES subscriptions (id),
    series          INTEGER NOT NULL,
    attempt         INTEGER NOT NULL,
    webhook_id      TEXT    NOT NULL,
    started_at      INTEGER NOT NULL,
    status_code     INTEGER,
    error           TEXT,
    duration_ms     INTEGER NOT NULL
);
CREATE INDEX delivery_attempts_by_subscription ON delivery_attempts (subscription_id, id);
