-- The duplicate guard covers live subscriptions only. It held delivered ones too, so with a long past
-- it was the largest index keyed at random (tenant, the upstream's random job ID, the callback URL):
-- every registration inserted into a B-tree of millions of entries whose pages the cache cannot hold,
-- and every delivery moved an entry in it. A registration of a job already delivered to the same
-- callback still answers with that subscription: the writer looks it up by job (`subscriptions_by_job`)
-- in the same transaction, and SQLite's single writer runs registrations one at a time, so two cannot
-- both miss it. SQLite only (like 0002): PostgreSQL's guard is unchanged.
DROP INDEX subscriptions_dedupe;
CREATE UNIQUE INDEX subscriptions_dedupe ON subscriptions (tenant_id, job_id, callback_url)
    WHERE state IN ('polling', 'delivering');
