//! The retention purge on SQLite: one short IMMEDIATE transaction per batch (the group-commit writer's
//! batches queue behind it for a few milliseconds), then the freed pages handed back.

use super::*;

/// Ended states, as the partial index `subscriptions_ended` names them (the planner uses the index only
/// for this exact condition).
const ENDED: &str = "state IN ('delivered', 'failed', 'expired', 'cancelled')";

/// Pages one `incremental_vacuum` step frees: a few MB at a time, so a writer waits little behind it.
const VACUUM_STEP_PAGES: i64 = 2_000;

impl SqliteStore {
    pub(super) async fn purge_batch(&self, ended_before: Millis, limit: u32) -> Result<Purged> {
        let mut tx = self.begin().await?;
        let select = format!(
            "SELECT id, job_id FROM subscriptions WHERE {ENDED} AND updated_at < ?1 ORDER BY updated_at LIMIT ?2"
        );
        let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(select))
            .bind(ended_before)
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await
            .db()?;
        if rows.is_empty() {
            return Ok(Purged::default());
        }
        let ids = serde_json::to_string(&rows.iter().map(|(id, _)| id).collect::<Vec<_>>())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let jobs = serde_json::to_string(&rows.iter().map(|(_, job)| job).collect::<Vec<_>>())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let attempts =
            sqlx::query("DELETE FROM delivery_attempts WHERE subscription_id IN (SELECT value FROM json_each(?))")
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .db()?
                .rows_affected();
        let subscriptions = sqlx::query("DELETE FROM subscriptions WHERE id IN (SELECT value FROM json_each(?))")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .db()?
            .rows_affected();
        let jobs = sqlx::query(
            "DELETE FROM jobs WHERE job_id IN (SELECT value FROM json_each(?)) \
             AND NOT EXISTS (SELECT 1 FROM subscriptions s WHERE s.job_id = jobs.job_id)",
        )
        .bind(&jobs)
        .execute(&mut *tx)
        .await
        .db()?
        .rows_affected();
        tx.commit().await.db()?;
        Ok(Purged { subscriptions, attempts, jobs })
    }

    pub(super) async fn count_purgeable(&self, ended_before: Millis) -> Result<Purged> {
        let sql = format!(
            "SELECT (SELECT COUNT(*) FROM subscriptions WHERE {ENDED} AND updated_at < ?1), \
             (SELECT COUNT(*) FROM delivery_attempts a JOIN subscriptions s ON s.id = a.subscription_id \
              WHERE s.{ENDED} AND s.updated_at < ?1), \
             (SELECT COUNT(DISTINCT s.job_id) FROM subscriptions s WHERE s.{ENDED} AND s.updated_at < ?1 \
              AND NOT EXISTS (SELECT 1 FROM subscriptions o WHERE o.job_id = s.job_id \
                              AND NOT (o.{ENDED} AND o.updated_at < ?1)))"
        );
        let (subscriptions, attempts, jobs): (i64, i64, i64) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(ended_before).fetch_one(&self.reader).await.db()?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(Purged { subscriptions: n(subscriptions), attempts: n(attempts), jobs: n(jobs) })
    }

    /// Frees the pages a purge left empty, a step at a time (a store made before auto_vacuum was set has
    /// none to free: SQLite reuses them instead).
    pub(super) async fn vacuum_freed_pages(&self) -> Result<()> {
        for _ in 0..10_000 {
            let free: i64 = sqlx::query_scalar("PRAGMA freelist_count").fetch_one(&self.writer).await.db()?;
            let incremental: i64 = sqlx::query_scalar("PRAGMA auto_vacuum").fetch_one(&self.writer).await.db()?;
            // 2 = INCREMENTAL.
            if free == 0 || incremental != 2 {
                break;
            }
            sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})")))
                .execute(&self.writer)
                .await
                .db()?;
            tokio::task::yield_now().await;
        }
        Ok(())
    }
}
