//! Partition leases and instance heartbeats on PostgreSQL (see cluster.rs for how they are used). Lease
//! times are the database's clock, read by the caller through `Store::clock`.

use super::*;

impl PgStore {
    /// Runs a lease UPDATE that returns the partitions it touched; they come back as a mask.
    async fn leased(
        &self,
        update: sqlx::query::QueryScalar<'_, Postgres, i64, sqlx::postgres::PgArguments>,
    ) -> Result<u64> {
        Ok(mask_of(&update.fetch_all(&self.pool).await.db()?))
    }

    pub(super) async fn heartbeat_now(&self, instance: &str, now: Timestamp, live_after: Timestamp) -> Result<i64> {
        sqlx::query(
            "INSERT INTO instances (id, heartbeat_at) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(instance)
        .bind(now)
        .execute(&self.pool)
        .await
        .db()?;
        // Instances silent for ten times the liveness window are gone for good.
        sqlx::query("DELETE FROM instances WHERE heartbeat_at < $1")
            .bind(live_after - now.duration_since(live_after) * 10)
            .execute(&self.pool)
            .await
            .db()?;
        sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE heartbeat_at > $1")
            .bind(live_after)
            .fetch_one(&self.pool)
            .await
            .db()
    }

    pub(super) async fn renew_now(&self, instance: &str, until: Timestamp) -> Result<u64> {
        let renew = sqlx::query_scalar("UPDATE leases SET expires_at = $1 WHERE owner = $2 RETURNING partition");
        self.leased(renew.bind(until).bind(instance)).await
    }

    pub(super) async fn claim_now(&self, instance: &str, n: i64, now: Timestamp, until: Timestamp) -> Result<u64> {
        // SKIP LOCKED: two instances claiming at once take different partitions, neither waits.
        let claim = sqlx::query_scalar(
            "UPDATE leases SET owner = $1, expires_at = $3 WHERE partition IN \
             (SELECT partition FROM leases WHERE owner IS NULL OR expires_at < $2 ORDER BY random() LIMIT $4 \
              FOR UPDATE SKIP LOCKED) \
             RETURNING partition",
        );
        self.leased(claim.bind(instance).bind(now).bind(until).bind(n)).await
    }

    pub(super) async fn release_now(&self, instance: &str, partitions: u64) -> Result<()> {
        sqlx::query("UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = $1 AND (($2 >> CAST(partition AS INTEGER)) & 1) = 1",)
        .bind(instance)
        .bind(partitions as i64)
        .execute(&self.pool)
        .await
        .db()?;
        Ok(())
    }

    pub(super) async fn leave_now(&self, instance: &str) -> Result<()> {
        // Our workers have stopped: the claims they took for deliveries they did not get to (or that
        // will be retried) are let go, so the next owner need not wait for them to lapse.
        sqlx::query("UPDATE subscriptions SET claimed_until = NULL, claimed_by = NULL WHERE state = 'delivering' AND claimed_by = $1",)
        .bind(&*self.instance)
        .execute(&self.pool)
        .await
        .db()?;
        self.release_now(instance, u64::MAX).await?;
        sqlx::query("DELETE FROM instances WHERE id = $1").bind(instance).execute(&self.pool).await.db()?;
        Ok(())
    }
}
