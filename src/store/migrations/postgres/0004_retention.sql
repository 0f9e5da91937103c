-- Retention (housekeeping) and costs that do not grow with history.

-- Ended subscriptions by when they ended (updated_at is set at the transition): the purge reads the
-- oldest first without scanning live ones.
CREATE INDEX subscriptions_ended ON subscriptions (updated_at)
    WHERE state IN ('delivered', 'failed', 'expired', 'cancelled');
-- GET /v1/subscriptions?state=… : newest first within a tenant and state, by index.
CREATE INDEX subscriptions_by_tenant_state ON subscriptions (tenant_id, state, id);

-- How many subscriptions are in each state, kept by triggers in the same transaction as every insert,
-- state change and delete, so GET /metrics reads a few rows instead of counting the table. Each state has
-- a row per shard (partition % 8, as the writer lanes are chosen): concurrent transactions of different
-- lanes update different rows and never wait for each other's counts.
CREATE TABLE subscription_counts (
    state TEXT   NOT NULL,
    shard INT    NOT NULL,
    n     BIGINT NOT NULL,
    PRIMARY KEY (state, shard)
);
INSERT INTO subscription_counts (state, shard, n)
    SELECT s.state, sh.shard, 0
    FROM (VALUES ('polling'), ('delivering'), ('delivered'), ('failed'), ('expired'), ('cancelled')) AS s (state),
         generate_series(0, 7) AS sh (shard);
UPDATE subscription_counts c SET n = x.n
    FROM (SELECT state, CAST(partition % 8 AS INT) AS shard, COUNT(*) AS n FROM subscriptions GROUP BY 1, 2) x
    WHERE c.state = x.state AND c.shard = x.shard;

CREATE FUNCTION jobhook_count_subscriptions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        UPDATE subscription_counts SET n = n - 1 WHERE state = OLD.state AND shard = OLD.partition % 8;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        UPDATE subscription_counts SET n = n + 1 WHERE state = NEW.state AND shard = NEW.partition % 8;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER subscriptions_counted_insert AFTER INSERT ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION jobhook_count_subscriptions();
CREATE TRIGGER subscriptions_counted_update AFTER UPDATE OF state ON subscriptions
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION jobhook_count_subscriptions();
CREATE TRIGGER subscriptions_counted_delete AFTER DELETE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION jobhook_count_subscriptions();
