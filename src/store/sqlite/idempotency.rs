//! Idempotency keys on SQLite: claimed and answered on the writer thread, each in a short
//! transaction of its own (a handful per created job; they need no group commit).

use rusqlite::params;

use super::*;
use crate::store::idempotency::found;

/// Claims `claim.key` (see [`Store::claim_idempotency_key`]), deleting a few expired keys on the way.
pub(super) fn claim(tx: &rusqlite::Transaction<'_>, claim: &IdempotencyClaim) -> Result<Claimed> {
    tx.prepare_cached(
        "DELETE FROM idempotency_keys WHERE rowid IN \
         (SELECT rowid FROM idempotency_keys WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
    )
    .sq()?
    .execute(params![claim.expired_before, PURGE_PER_CLAIM])
    .sq()?;
    // An expired answer of this very key is gone even if it was not among the oldest.
    tx.prepare_cached("DELETE FROM idempotency_keys WHERE tenant_id = ?1 AND key = ?2 AND created_at < ?3")
        .sq()?
        .execute(params![claim.tenant_id, claim.key, claim.expired_before])
        .sq()?;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, created_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (tenant_id, key) DO NOTHING",
        )
        .sq()?
        .execute(params![claim.tenant_id, claim.key, claim.fingerprint, claim.now])
        .sq()?;
    if inserted == 1 {
        return Ok(Claimed::New);
    }
    let (fingerprint, created_at, status, body): (Vec<u8>, Timestamp, Option<i64>, Option<Vec<u8>>) = tx
        .prepare_cached(
            "SELECT fingerprint, created_at, status, body FROM idempotency_keys WHERE tenant_id = ?1 AND key = ?2",
        )
        .sq()?
        .query_row(params![claim.tenant_id, claim.key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .sq()?;
    Ok(found(claim, &fingerprint, created_at, status, body))
}

/// Stores the answer of the request holding `key`.
pub(super) fn finish(tx: &rusqlite::Transaction<'_>, tenant_id: i64, key: &str, answer: &StoredAnswer) -> Result<()> {
    tx.prepare_cached("UPDATE idempotency_keys SET status = ?1, body = ?2 WHERE tenant_id = ?3 AND key = ?4")
        .sq()?
        .execute(params![i64::from(answer.status), answer.body, tenant_id, key])
        .sq()?;
    Ok(())
}
