//! Tenants and keys on PostgreSQL: the configured keys applied at start-up, stored keys.

use sha2::{Digest, Sha256};

use super::*;

impl PgStore {
    pub(super) async fn keys_sync(&self, configured: KeyConfig<'_>, now: Timestamp) -> Result<ConfiguredKeys> {
        let KeyConfig { keys, secret } = configured;
        let mut tx = self.begin().await?;
        let mut sync = ConfiguredKeys::default();
        // Configured keys that left the configuration stop working; those listed again work again,
        // unless `jobhook keys revoke` revoked them: that stays.
        let configured: Vec<(i64, Vec<u8>, Option<String>)> =
            sqlx::query_as("SELECT id, key_hash, revoked_by FROM api_keys WHERE source = 'config'")
                .fetch_all(&mut *tx)
                .await
                .db()?;
        for (id, hash, revoked_by) in configured {
            let query = match ConfiguredKey::of(keys, &hash, revoked_by.as_deref()) {
                ConfiguredKey::RevokedByCommand => {
                    sync.revoked_by_command.push(id);
                    continue;
                }
                ConfiguredKey::Restore => {
                    sqlx::query("UPDATE api_keys SET revoked_at = NULL, revoked_by = NULL WHERE id = $1").bind(id)
                }
                ConfiguredKey::Revoke => sqlx::query(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2), revoked_by = COALESCE(revoked_by, 'config') WHERE id = $1",
                )
                .bind(id)
                .bind(now),
            };
            query.execute(&mut *tx).await.db()?;
        }
        // The configured secret is applied when it changes, not at every start: a rotation through the
        // API since then is kept.
        let fingerprint = secret.map(|s| Sha256::digest(s.bytes()).to_vec());
        let applied: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'configured_signing_secret'")
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        let secret_changed = fingerprint.is_some() && fingerprint != applied;
        if let Some(fingerprint) = fingerprint.as_ref().filter(|_| secret_changed) {
            sqlx::query(
                "INSERT INTO meta (key, value) VALUES ('configured_signing_secret', $1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(fingerprint.as_slice())
            .execute(&mut *tx)
            .await
            .db()?;
        }
        for (i, key) in keys.iter().enumerate() {
            let tenant: Option<i64> = sqlx::query_scalar("SELECT tenant_id FROM api_keys WHERE key_hash = $1")
                .bind(key.0.as_slice())
                .fetch_optional(&mut *tx)
                .await
                .db()?;
            match tenant {
                Some(tenant_id) => {
                    if let Some(secret) = secret.filter(|_| secret_changed) {
                        sqlx::query("UPDATE tenants SET signing_secret = $1 WHERE id = $2")
                            .bind(secret.expose())
                            .bind(tenant_id)
                            .execute(&mut *tx)
                            .await
                            .db()?;
                    }
                }
                None => {
                    let secret = secret.cloned().unwrap_or_else(SigningSecret::generate);
                    let name = format!("configured key {}", i + 1);
                    let tenant = NewTenant { name: &name, key: *key, secret: &secret, source: "config" };
                    insert_tenant_with_key(&mut tx, &tenant, now).await?;
                    sync.created += 1;
                }
            }
        }
        tx.commit().await.db()?;
        Ok(sync)
    }
}

pub(super) async fn insert_tenant_with_key(
    tx: &mut PgConnection,
    tenant: &NewTenant<'_>,
    now: Timestamp,
) -> Result<i64> {
    let NewTenant { name, key, secret, source } = *tenant;
    let tenant_id: i64 =
        sqlx::query_scalar("INSERT INTO tenants (name, signing_secret, created_at) VALUES ($1, $2, $3) RETURNING id")
            .bind(name)
            .bind(secret.expose())
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .db()?;
    sqlx::query("INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(tenant_id)
        .bind(name)
        .bind(key.0.as_slice())
        .bind(source)
        .bind(now)
        .execute(&mut *tx)
        .await
        .db()?;
    Ok(tenant_id)
}
