//! Idempotency keys on PostgreSQL: one upsert claims a key atomically (two instances racing for one key
//! meet at its primary key; the loser reads the winner's row).

use super::*;
use crate::store::idempotency::found;

impl PgStore {
    pub(super) async fn idempotency_claim(&self, claim: &IdempotencyClaim) -> Result<Claimed> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE (tenant_id, key) IN \
             (SELECT tenant_id, key FROM idempotency_keys WHERE created_at < $1 ORDER BY created_at LIMIT $2)",
        )
        .bind(claim.expired_before)
        .bind(PURGE_PER_CLAIM)
        .execute(&self.pool)
        .await
        .db()?;
        // A row of this key that expired is taken over in the same statement.
        let claimed: Option<i32> = sqlx::query_scalar(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (tenant_id, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
             created_at = excluded.created_at, status = NULL, body = NULL \
             WHERE idempotency_keys.created_at < $5 RETURNING 1",
        )
        .bind(claim.tenant_id)
        .bind(&claim.key)
        .bind(&claim.fingerprint)
        .bind(claim.now)
        .bind(claim.expired_before)
        .fetch_optional(&self.pool)
        .await
        .db()?;
        if claimed.is_some() {
            return Ok(Claimed::New);
        }
        let (fingerprint, created_at, status, body): (Vec<u8>, Timestamp, Option<i32>, Option<Vec<u8>>) =
            sqlx::query_as(
                "SELECT fingerprint, created_at, status, body FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
            )
            .bind(claim.tenant_id)
            .bind(&claim.key)
            .fetch_one(&self.pool)
            .await
            .db()?;
        Ok(found(claim, &fingerprint, created_at, status.map(i64::from), body))
    }

    pub(super) async fn idempotency_finish(&self, tenant_id: i64, key: &str, answer: &StoredAnswer) -> Result<()> {
        sqlx::query("UPDATE idempotency_keys SET status = $1, body = $2 WHERE tenant_id = $3 AND key = $4")
            .bind(i32::from(answer.status))
            .bind(&answer.body)
            .bind(tenant_id)
            .bind(key)
            .execute(&self.pool)
            .await
            .db()?;
        Ok(())
    }
}
