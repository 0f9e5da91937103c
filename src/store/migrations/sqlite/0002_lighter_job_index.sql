-- The subscriptions of a job are found by job_id alone (a job has one or a few). With state in the key,
-- every state change (polling → delivering → delivered) moved the row in this index: two more random
-- B-tree writes per job, on the hot path of every job's end and delivery (about 8% of the SQLite
-- writer's time per write, measured with jobhook-bench). SQLite only: on PostgreSQL rebuilding the
-- index would lock the table for the whole build during a rolling upgrade, for a gain measured only on
-- SQLite's single writer.
DROP INDEX subscriptions_by_job;
CREATE INDEX subscriptions_by_job ON subscriptions (job_id);
