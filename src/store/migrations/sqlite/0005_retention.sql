-- Retention (housekeeping) and costs that do not grow with history.

-- Ended subscriptions by when they ended (updated_at is set at the transition): the purge reads the
-- oldest first without scanning live ones.
CREATE INDEX subscriptions_ended ON subscriptions (updated_at)
    WHERE state IN ('delivered', 'failed', 'expired', 'cancelled');
-- GET /v1/subscriptions?state=… : newest first within a tenant and state, by index.
CREATE INDEX subscriptions_by_tenant_state ON subscriptions (tenant_id, state, id);

-- How many subscriptions are in each state, kept by triggers in the same transaction as every insert,
-- state change and delete, so GET /metrics reads six rows instead of counting the table, and the counts
-- survive restarts, crashes (they commit or roll back with the change) and purges.
CREATE TABLE subscription_counts (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
);
INSERT INTO subscription_counts (state, n)
    SELECT s.state, (SELECT COUNT(*) FROM subscriptions WHERE state = s.state)
    FROM (SELECT 'polling' AS state UNION ALL SELECT 'delivering' UNION ALL SELECT 'delivered'
          UNION ALL SELECT 'failed' UNION ALL SELECT 'expired' UNION ALL SELECT 'cancelled') s;

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
