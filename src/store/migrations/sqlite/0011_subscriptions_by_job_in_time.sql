-- The subscriptions of a job, found through an index in the order jobs were made.
--
-- Job IDs are the upstream's, random: an index keyed by job ID alone puts each new entry on a random
-- page of a B-tree as large as the store's whole past, and with a long past every registration dirtied
-- a page the cache did not hold, which the next checkpoint wrote back (README: Performance, a store
-- with a long past). Keyed by the job's creation time first, the entries of new jobs go to the end of
-- the index, as subscription IDs (UUIDv7) do; a lookup by job reads the job's creation time from `jobs`
-- first. Only `jobs`' own key on job_id stays random.
--
-- Rewrites every subscription once (a store of millions takes a minute or two).
ALTER TABLE subscriptions ADD COLUMN job_created_at INTEGER NOT NULL DEFAULT 0;
DROP INDEX subscriptions_by_job;
UPDATE subscriptions SET job_created_at = (SELECT created_at FROM jobs WHERE jobs.job_id = subscriptions.job_id);
CREATE INDEX subscriptions_by_job ON subscriptions (job_created_at, job_id);

-- jobhook sets job_created_at on every insert; an older binary started on this store (a downgrade) does
-- not, and this fills it in for its rows.
CREATE TRIGGER subscriptions_job_created_at AFTER INSERT ON subscriptions WHEN NEW.job_created_at = 0 BEGIN
    UPDATE subscriptions SET job_created_at = (SELECT created_at FROM jobs WHERE job_id = NEW.job_id)
        WHERE rowid = NEW.rowid;
END;
