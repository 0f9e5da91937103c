-- The counts of subscriptions per state (0004), lighter: an UPDATE's change per state is the count of its new
-- rows in that state less the count of its old rows in it (a row whose state did not change adds one
-- and takes one away), so the trigger needs no join of the old rows with the new (with the writer lanes' nested loops only,
-- that join compared every old row with every new one).
CREATE OR REPLACE FUNCTION jobhook_count_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO subscription_counts (state, n)
    SELECT state, SUM(d) FROM (
        SELECT state, -1 AS d FROM old_rows
        UNION ALL
        SELECT state, 1 FROM new_rows
    ) changed GROUP BY state HAVING SUM(d) <> 0;
    RETURN NULL;
END $$;
