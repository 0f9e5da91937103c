-- The duplicate guard covers live subscriptions only, keyed by job first (as SQLite's since its 0006).
-- Keyed (tenant, job, callback) and holding delivered subscriptions too, it was the largest index keyed
-- at random, every delivery moved an entry in it, and on a table without statistics yet (a new store's
-- first minute, before autovacuum has analyzed it) the planner read all of it for each registration's
-- and each completion's lookup by job (a bitmap AND of the whole partial index with the job index:
-- 16,000,000 index entries read in one 20,000-job run). Keyed by job first, the guard is itself an index
-- on the job for those lookups. A registration of a job already delivered to the same callback still
-- answers with that subscription: the writer looks it up by job (`subscriptions_by_job`) while it holds
-- the job's row lock, so two registrations of one job cannot both miss each other.
-- Rebuilding the index scans the table once and holds writes to it meanwhile (the live rows it keeps are
-- few); run it at a quiet time on a large store.
DROP INDEX subscriptions_dedupe;
CREATE UNIQUE INDEX subscriptions_dedupe ON subscriptions (job_id, tenant_id, callback_url)
    WHERE state IN ('polling', 'delivering');
