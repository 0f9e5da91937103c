-- Retention (housekeeping) and costs that do not grow with history.

-- Ended subscriptions by when they ended (updated_at is set at the transition): the purge reads the
-- oldest first without scanning live ones.
CREATE INDEX subscriptions_ended ON subscriptions (updated_at)
    WHERE state IN ('delivered', 'failed', 'expired', 'cancelled');
-- GET /v1/subscriptions?state=… : newest first within a tenant and state, by index.
CREATE INDEX subscriptions_by_tenant_state ON subscriptions (tenant_id, state, id);

-- How many subscriptions are in each state, kept in the same transaction as every insert, state change
-- and delete, so GET /metrics reads a few rows instead of counting the table, and the counts survive
-- crashes and purges. The changes are appended, one row per state and statement (statement-level
-- triggers over the transition tables), never applied to shared counter rows: concurrent transactions
-- never wait for one another's counts, so counting adds no lock and no deadlock to the writes. Reading
-- the counts folds the appended rows into one per state (see PgStore::count_by_state).
CREATE TABLE subscription_counts (
    state TEXT   NOT NULL,
    n     BIGINT NOT NULL
);
INSERT INTO subscription_counts (state, n) SELECT state, COUNT(*) FROM subscriptions GROUP BY state;

CREATE FUNCTION jobhook_count_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subscription_counts (state, n) SELECT state, COUNT(*) FROM new_rows GROUP BY state;
    RETURN NULL;
END $$;
CREATE FUNCTION jobhook_count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subscription_counts (state, n) SELECT state, -COUNT(*) FROM old_rows GROUP BY state;
    RETURN NULL;
END $$;
CREATE FUNCTION jobhook_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subscription_counts (state, n)
    SELECT state, SUM(d) FROM (
        SELECT o.state, -1 AS d FROM old_rows o JOIN new_rows w ON w.id = o.id WHERE o.state <> w.state
        UNION ALL
        SELECT w.state, 1 FROM old_rows o JOIN new_rows w ON w.id = o.id WHERE o.state <> w.state
    ) changed GROUP BY state;
    RETURN NULL;
END $$;
CREATE TRIGGER subscriptions_counted_insert AFTER INSERT ON subscriptions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION jobhook_count_inserted();
CREATE TRIGGER subscriptions_counted_delete AFTER DELETE ON subscriptions
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION jobhook_count_deleted();
CREATE TRIGGER subscriptions_counted_update AFTER UPDATE ON subscriptions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION jobhook_count_updated();
