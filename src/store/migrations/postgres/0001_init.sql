-- jobhook's state on PostgreSQL: the same tables as migrations/sqlite/0001_init.sql (read them side by
-- side), with PostgreSQL's types, plus the leases that share the work between instances.
-- Times are Unix milliseconds (UTC). IDs compare bytewise (COLLATE "C"), as in SQLite.

CREATE TABLE tenants (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT   NOT NULL,
    signing_secret  TEXT   NOT NULL,
    previous_secret TEXT,
    previous_until  BIGINT,
    created_at      BIGINT NOT NULL
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BYTEA NOT NULL
);

CREATE TABLE api_keys (
    id         BIGSERIAL PRIMARY KEY,
    tenant_id  BIGINT NOT NULL REFERENCES tenants (id),
    name       TEXT   NOT NULL,
    key_hash   BYTEA  NOT NULL UNIQUE,
    source     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);

CREATE TABLE jobs (
    job_id      TEXT COLLATE "C" PRIMARY KEY,
    partition   BIGINT NOT NULL,
    status      TEXT,
    result      BYTEA,
    last_error  TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX jobs_by_partition ON jobs (partition);

CREATE TABLE subscriptions (
    id              TEXT COLLATE "C" PRIMARY KEY,
    tenant_id       BIGINT NOT NULL REFERENCES tenants (id),
    job_id          TEXT COLLATE "C" NOT NULL REFERENCES jobs (job_id),
    partition       BIGINT NOT NULL,
    callback_url    TEXT   NOT NULL,
    state           TEXT   NOT NULL,
    failure_reason  TEXT,
    webhook_id      TEXT,
    series          BIGINT NOT NULL DEFAULT 1,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE UNIQUE INDEX subscriptions_dedupe ON subscriptions (tenant_id, job_id, callback_url)
    WHERE state IN ('polling', 'delivering', 'delivered');
CREATE INDEX subscriptions_by_tenant ON subscriptions (tenant_id, id);
CREATE INDEX subscriptions_by_job ON subscriptions (job_id, state);
CREATE INDEX subscriptions_delivering ON subscriptions (partition) WHERE state = 'delivering';

CREATE TABLE delivery_attempts (
    id              BIGSERIAL PRIMARY KEY,
    subscription_id TEXT COLLATE "C" NOT NULL REFERENCES subscriptions (id),
    series          BIGINT NOT NULL,
    attempt         BIGINT NOT NULL,
    webhook_id      TEXT   NOT NULL,
    started_at      BIGINT NOT NULL,
    status_code     BIGINT,
    error           TEXT,
    duration_ms     BIGINT NOT NULL
);
CREATE INDEX delivery_attempts_by_subscription ON delivery_attempts (subscription_id, id);

-- Scale-out: the jobs are split into 64 partitions; an instance polls and delivers only the partitions
-- it holds a lease on. A lease lapses at expires_at unless its owner renews it.
CREATE TABLE leases (
    partition  BIGINT PRIMARY KEY,
    owner      TEXT,
    expires_at BIGINT NOT NULL DEFAULT 0
);
INSERT INTO leases (partition) SELECT generate_series(0, 63);

-- Instances announce themselves, so each can take its share: 64 / (live instances).
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL
);
