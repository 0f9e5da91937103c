//! The API's rarer transactions on PostgreSQL: cancel, redeliver, and the attempt log.

use super::*;

/// An attempt as the log keeps it: series, attempt, webhook ID, start, status, error, duration, and
/// the answer's content type and first 2 KiB.
type AttemptRow = (i64, i64, String, Timestamp, Option<i64>, Option<String>, i64, Option<String>, Option<String>);

impl PgStore {
    pub(super) async fn cancel_now(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Cancel>> {
        let sub_id = sub.id.to_string();
        let mut tx = self.begin().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT job_id, state FROM subscriptions WHERE id = $1 AND tenant_id = $2")
                .bind(&sub_id)
                .bind(sub.tenant_id)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        let Some((job_id, state)) = row else {
            return Ok(None);
        };
        let job_id = JobId::from_key(&job_id).map_err(|e| corrupt("job id", e))?;
        let was: SubscriptionState = state.parse().map_err(|e| corrupt("state", e))?;
        if was.is_final() {
            return Ok(Some(Cancel::Ended(was)));
        }
        // Not while an attempt holds the claim: it may be on the wire, and a subscription that reads
        // `cancelled` must never have been delivered. The claim is read on the clock that set it.
        let changed = sqlx::query(concat!(
                "UPDATE subscriptions SET state = 'cancelled', next_attempt_at = NULL, claimed_until = NULL, claimed_by = NULL, \
                 updated_at = $1 WHERE id = $2 AND state IN ('polling', 'delivering') \
                 AND (claimed_until IS NULL OR claimed_until <= ",
                pg_now_ms!(),
                ")"
            ))
        .bind(now)
        .bind(&sub_id)
        .execute(&mut *tx)
        .await
        .db()?;
        if changed.rows_affected() == 0 {
            // Claimed, or (PostgreSQL: the read above takes no lock) ended since. A live subscription here
            // is held by an attempt (or its claim lapsed a moment ago): the caller asks again shortly.
            let state = state_in(&mut tx, &sub_id).await?;
            return Ok(Some(if state.is_final() { Cancel::Ended(state) } else { Cancel::AttemptInFlight }));
        }
        notify(&mut tx, &self.sent, Notice::Cancel(sub.id, job_id.clone())).await?;
        tx.commit().await.db()?;
        Ok(Some(Cancel::Cancelled { job_id, was }))
    }

    pub(super) async fn redeliver_now(&self, sub: TenantSub, now: Timestamp) -> Result<Option<Redelivery>> {
        let mut tx = self.begin().await?;
        let found = self.redeliver_in(&mut tx, sub, now).await?;
        tx.commit().await.db()?;
        Ok(found)
    }

    /// [`Store::redeliver_batch`]: the batch in one transaction.
    pub(super) async fn redeliver_each(
        &self,
        tenant_id: i64,
        ids: &[SubscriptionId],
        now: Timestamp,
    ) -> Result<Vec<Redelivery>> {
        let mut tx = self.begin().await?;
        let mut found = Vec::with_capacity(ids.len());
        for &id in ids {
            // A subscription gone meanwhile (purged) is left out.
            found.extend(self.redeliver_in(&mut tx, TenantSub { tenant_id, id }, now).await?);
        }
        tx.commit().await.db()?;
        Ok(found)
    }

    /// One redelivery in `tx`, with its notice to the instance that owns it (sent when `tx` commits).
    async fn redeliver_in(&self, tx: &mut PgConnection, sub: TenantSub, now: Timestamp) -> Result<Option<Redelivery>> {
        let sub_id = sub.id.to_string();
        let Some(row) = delivery_in(tx, sub).await? else { return Ok(None) };
        let state = state_in(tx, &sub_id).await?;
        if !matches!(state, SubscriptionState::Delivered | SubscriptionState::Failed)
            || row.result.is_none()
            || row.webhook_id.is_none()
        {
            return Ok(Some(Redelivery::NotEnded(state)));
        }
        // A failed subscription may have been followed by a new registration of the same job and
        // callback; two live deliveries of one job to one callback would be one too many.
        let newer: Option<i64> = sqlx::query_scalar(
            "SELECT CAST(1 AS BIGINT) FROM subscriptions s JOIN subscriptions o ON o.tenant_id = s.tenant_id AND o.job_id = s.job_id \
             AND o.callback_url = s.callback_url AND o.id <> s.id AND o.state IN ('polling', 'delivering', 'delivered') \
             WHERE s.id = $1",
        )
        .bind(&sub_id)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        if newer.is_some() {
            return Ok(Some(Redelivery::Superseded));
        }
        // Conditional, and the series comes back from the row: two redeliveries at once start two series,
        // each task with its own number.
        let series: Option<i64> = sqlx::query_scalar(
            "UPDATE subscriptions SET state = 'delivering', series = series + 1, attempts = 0, failure_reason = NULL, \
             next_attempt_at = $1, updated_at = $1 WHERE id = $2 AND state IN ('delivered', 'failed') RETURNING series",
        )
        .bind(now)
        .bind(&sub_id)
        .fetch_optional(&mut *tx)
        .await
        .db()?;
        let Some(series) = series else {
            return Ok(Some(Redelivery::NotEnded(state)));
        };
        notify(tx, &self.sent, Notice::Deliver(sub.id, row.partition)).await?;
        let mut task = DeliveryTask::try_from(row)?;
        task.series = u32::try_from(series).unwrap_or(u32::MAX);
        task.attempts_made = 0;
        task.due_at = now;
        Ok(Some(Redelivery::Started(task)))
    }

    pub(super) async fn attempts_of(&self, sub: TenantSub) -> Result<Option<Vec<AttemptRecord>>> {
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT CAST(1 AS BIGINT) FROM subscriptions WHERE id = $1 AND tenant_id = $2")
                .bind(sub.id.to_string())
                .bind(sub.tenant_id)
                .fetch_optional(&self.pool)
                .await
                .db()?;
        if exists.is_none() {
            return Ok(None);
        }
        let rows: Vec<AttemptRow> = sqlx::query_as(
            "SELECT series, attempt, webhook_id, started_at, status_code, error, duration_ms, response_content_type, \
             response_body FROM delivery_attempts \
             WHERE subscription_id = $1 ORDER BY id",
        )
        .bind(sub.id.to_string())
        .fetch_all(&self.pool)
        .await
        .db()?;
        Ok(Some(
            rows.into_iter()
                .map(
                    |(series, attempt, webhook_id, started_at, status_code, error, duration_ms, content_type, body)| {
                        AttemptRecord {
                            subscription_id: sub.id,
                            partition: 0,
                            series: u32::try_from(series).unwrap_or(1),
                            attempt: u32::try_from(attempt).unwrap_or(0),
                            webhook_id,
                            started_at,
                            status_code: status_code.and_then(|c| u16::try_from(c).ok()),
                            error,
                            duration_ms: u64::try_from(duration_ms).unwrap_or(0),
                            response_content_type: content_type,
                            response_body: body,
                        }
                    },
                )
                .collect(),
        ))
    }
}
