-- The subscriptions of a job, found through an index in the order jobs were made.
--
-- Job IDs are the upstream's, random: an index keyed by job ID alone puts each new entry on a random
-- page of a B-tree as large as the store's whole past, and with a long past every registration dirtied
-- a page the cache did not hold, which the next checkpoint wrote back (README: Performance, a store
-- with a long past). Keyed by the job's creation time first, the entries of new jobs go to the end of
-- the index, as subscription IDs (UUIDv7) do, and the purge deletes from its start; a lookup by job
-- reads the job's creation time from `jobs` first. Only `jobs`' own key on job_id stays random.
--
-- The table is rebuilt (SQLite's way to change a constraint; the migrations run with foreign keys off
-- and check them before committing): its foreign key on job_id goes, because enforcing it when a job
-- row is deleted needs an index led by job_id, the very index this removes (without one, each purged
-- job scanned every subscription). jobhook keeps the reference itself: a subscription is inserted in
-- the transaction that inserts or reads its job, and a job row is deleted only when no subscription
-- refers to it (purge.rs). A store of millions is rewritten once (3,000,000 rows: about a minute).
CREATE TABLE subscriptions_rebuilt (
    id              TEXT    PRIMARY KEY,   -- UUIDv7: ordering by id is ordering by creation
    tenant_id       INTEGER NOT NULL REFERENCES tenants (id),
    job_id          TEXT    NOT NULL,      -- jobs.job_id (kept by jobhook; see above)
    partition       INTEGER NOT NULL,      -- the job's
    callback_url    TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    failure_reason  TEXT,
    webhook_id      TEXT,
    series          INTEGER NOT NULL DEFAULT 1,   -- delivery series: 1, then one more per redelivery
    attempts        INTEGER NOT NULL DEFAULT 0,   -- attempts made in the current series
    next_attempt_at INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    claimed_until   INTEGER,
    claimed_by      TEXT,
    callback_headers      TEXT,
    callback_headers_hash TEXT,
    payload         TEXT,
    metadata        TEXT,
    job_created_at  INTEGER NOT NULL DEFAULT 0   -- jobs.created_at of job_id
);
INSERT INTO subscriptions_rebuilt (id, tenant_id, job_id, partition, callback_url, state, failure_reason,
    webhook_id, series, attempts, next_attempt_at, created_at, updated_at, claimed_until, claimed_by,
    callback_headers, callback_headers_hash, payload, metadata, job_created_at)
SELECT s.id, s.tenant_id, s.job_id, s.partition, s.callback_url, s.state, s.failure_reason,
    s.webhook_id, s.series, s.attempts, s.next_attempt_at, s.created_at, s.updated_at, s.claimed_until,
    s.claimed_by, s.callback_headers, s.callback_headers_hash, s.payload, s.metadata,
    COALESCE((SELECT j.created_at FROM jobs j WHERE j.job_id = s.job_id), 0)
FROM subscriptions s ORDER BY s.rowid;
DROP TABLE subscriptions;
ALTER TABLE subscriptions_rebuilt RENAME TO subscriptions;

CREATE INDEX subscriptions_by_tenant ON subscriptions (tenant_id, id);
CREATE INDEX subscriptions_by_tenant_state ON subscriptions (tenant_id, state, id);
CREATE INDEX subscriptions_by_job ON subscriptions (job_created_at, job_id);
CREATE UNIQUE INDEX subscriptions_dedupe ON subscriptions (tenant_id, job_id, callback_url)
    WHERE state IN ('polling', 'delivering');
CREATE INDEX subscriptions_delivering ON subscriptions (state) WHERE state = 'delivering';
CREATE INDEX subscriptions_ended ON subscriptions (updated_at)
    WHERE state IN ('delivered', 'failed', 'expired', 'cancelled');

CREATE TRIGGER subscriptions_counted_insert AFTER INSERT ON subscriptions BEGIN
    UPDATE subscription_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER subscriptions_counted_update AFTER UPDATE OF state ON subscriptions
    WHEN OLD.state <> NEW.state BEGIN
    UPDATE subscription_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE subscription_counts SET n = n + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER subscriptions_counted_delete AFTER DELETE ON subscriptions BEGIN
    UPDATE subscription_counts SET n = n - 1 WHERE state = OLD.state;
END;

-- jobhook sets job_created_at on every insert; an older binary started on this store (a downgrade) does
-- not, and this fills it in for its rows.
CREATE TRIGGER subscriptions_job_created_at AFTER INSERT ON subscriptions WHEN NEW.job_created_at = 0 BEGIN
    UPDATE subscriptions SET job_created_at = (SELECT created_at FROM jobs WHERE job_id = NEW.job_id)
        WHERE rowid = NEW.rowid;
END;
