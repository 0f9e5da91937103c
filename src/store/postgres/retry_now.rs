//! "Retry now" on PostgreSQL: a waiting delivery's next attempt made due at once, in a file of its own so
//! it stays apart from the batched writes.

use super::*;

impl PgStore {
    /// See [`Store::retry_now`]. The instance that owns the delivery's partition may be another one: it
    /// hears a `deliver` notice, sent in the same transaction, and moves its queued attempt earlier.
    pub(super) async fn retry_delivery_now(&self, sub: TenantSub, now: Timestamp) -> Result<Option<RetryNow>> {
        let sub_id = sub.id.to_string();
        let mut tx = self.begin().await?;
        let Some(row) = delivery_in(&mut tx, sub).await? else { return Ok(None) };
        // Guarded by the series read above: a redelivery that started a newer series meanwhile is left
        // alone. Claims are not touched: an attempt on the wire keeps its claim.
        let changed = sqlx::query(
            "UPDATE subscriptions SET next_attempt_at = $1 WHERE id = $2 AND state = 'delivering' AND series = $3",
        )
        .bind(now)
        .bind(&sub_id)
        .bind(row.series)
        .execute(&mut *tx)
        .await
        .db()?;
        if changed.rows_affected() == 0 {
            return Ok(Some(RetryNow::NotDelivering(state_in(&mut tx, &sub_id).await?)));
        }
        notify(&mut tx, &self.sent, Notice::Deliver(sub.id, row.partition)).await?;
        tx.commit().await.db()?;
        let mut task = DeliveryTask::try_from(row)?;
        task.due_at = now;
        Ok(Some(RetryNow::Due(task)))
    }
}
