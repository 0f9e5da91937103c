//! The retention purge on PostgreSQL: one short transaction per batch, one instance at a time; and the
//! state counts the triggers keep.
//!
//! A batch first takes a transaction-scoped advisory lock (another instance purging: skip), then the
//! rows it deletes with `SKIP LOCKED`, so it never waits for a registration or a delivery. (The counting
//! triggers append rows rather than update shared ones, so deleting takes no lock that a writer holds.)

use super::*;

/// The advisory lock key of the purge ("jhpu"), paired with the schema (see `try_xact_lock`).
const PURGE_LOCK: i32 = 0x6a68_7075;
/// The advisory lock key of folding the counts ("jhcn"), paired with the schema.
const COUNT_LOCK: i32 = 0x6a68_636e;

/// Runs a DELETE whose `$1` is an array of keys; returns how many rows it deleted.
async fn delete_any(tx: &mut PgConnection, sql: &'static str, keys: &[String]) -> Result<u64> {
    Ok(sqlx::query(sql).bind(keys).execute(tx).await.db()?.rows_affected())
}

impl PgStore {
    pub(super) async fn purge_batch(&self, ended_before: Timestamp, limit: u32) -> Result<Option<Purged>> {
        let mut tx = self.begin().await?;
        let ours = try_xact_lock(&mut tx, PURGE_LOCK).await?;
        if !ours {
            return Ok(None);
        }
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT id, job_id FROM subscriptions WHERE state IN ('delivered', 'failed', 'expired', 'cancelled') \
             AND updated_at < $1 ORDER BY updated_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(ended_before)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .db()?;
        if rows.is_empty() {
            return Ok(Some(Purged::default()));
        }
        let (ids, jobs): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
        let attempts =
            delete_any(&mut tx, "DELETE FROM delivery_attempts WHERE subscription_id = ANY($1)", &ids).await?;
        let subscriptions = delete_any(&mut tx, "DELETE FROM subscriptions WHERE id = ANY($1)", &ids).await?;
        // A job another transaction holds (a registration of it right now) is left for a later run.
        let jobs = delete_any(
            &mut tx,
            "DELETE FROM jobs WHERE job_id IN (SELECT job_id FROM jobs j WHERE j.job_id = ANY($1) \
             AND NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.job_id = j.job_id) FOR UPDATE SKIP LOCKED)",
            &jobs,
        )
        .await?;
        tx.commit().await.db()?;
        Ok(Some(Purged { subscriptions, attempts, jobs }))
    }

    /// Subscriptions by state, from the rows the counting triggers append (migration 0004). The rows
    /// appended since the last reading are first folded into one per state, by one instance at a time
    /// (the others read as they are), so the reading stays a few rows however long the service runs.
    pub(super) async fn state_counts(&self) -> Result<Vec<(String, i64)>> {
        let mut tx = self.begin().await?;
        let ours = try_xact_lock(&mut tx, COUNT_LOCK).await?;
        if ours {
            sqlx::query(
                "WITH folded AS (DELETE FROM subscription_counts RETURNING state, n) \
                 INSERT INTO subscription_counts (state, n) SELECT state, SUM(n) FROM folded GROUP BY state",
            )
            .execute(&mut *tx)
            .await
            .db()?;
        }
        let counts = sqlx::query_as("SELECT state, CAST(SUM(n) AS BIGINT) FROM subscription_counts GROUP BY state")
            .fetch_all(&mut *tx)
            .await
            .db()?;
        tx.commit().await.db()?;
        Ok(counts)
    }

    pub(super) async fn count_purgeable(&self, ended_before: Timestamp) -> Result<Purged> {
        let (subscriptions, attempts, jobs): (i64, i64, i64) = sqlx::query_as(
            "WITH ended AS (SELECT id, job_id FROM subscriptions WHERE state IN ('delivered', 'failed', 'expired', 'cancelled') \
                            AND updated_at < $1) \
             SELECT (SELECT COUNT(*) FROM ended), \
                    (SELECT COUNT(*) FROM delivery_attempts a JOIN ended e ON e.id = a.subscription_id), \
                    (SELECT COUNT(DISTINCT e.job_id) FROM ended e WHERE NOT EXISTS ( \
                        SELECT 1 FROM subscriptions o WHERE o.job_id = e.job_id AND o.id NOT IN (SELECT id FROM ended)))",
        )
        .bind(ended_before)
        .fetch_one(&self.pool)
        .await
        .db()?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Purged { subscriptions: n(subscriptions), attempts: n(attempts), jobs: n(jobs) })
    }
}

/// Takes the transaction-scoped advisory lock `key` of this store's schema if no other transaction holds
/// it. Advisory locks belong to the whole database: keyed by `key` alone, deployments (or test runs) in
/// other schemas of one database took turns with ours and skipped their purges.
async fn try_xact_lock(tx: &mut PgConnection, key: i32) -> Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))")
        .bind(key)
        .fetch_one(tx)
        .await
        .db()
}
