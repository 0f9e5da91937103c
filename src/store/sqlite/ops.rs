//! The SQLite statements that are not group-committed: keys, the API's reads and rarer writes, expiry,
//! and the lease bookkeeping (which runs only on PostgreSQL in practice, kept so both stores answer the
//! whole trait). Writes take the writer thread's transaction; reads a read-only connection.

use rusqlite::{Connection, OptionalExtension, Params, Row, Transaction, params};
use sha2::{Digest, Sha256};

use super::*;

/// The pollable jobs a statement selects.
pub(super) fn pollable(c: &Connection, sql: &str, p: impl Params) -> Result<Vec<PollableJob>> {
    let mut statement = c.prepare_cached(sql).sq()?;
    let rows = statement.query_map(p, PollableRow::from_sqlite).sq()?.collect::<rusqlite::Result<Vec<_>>>().sq()?;
    rows.into_iter().map(PollableJob::try_from).collect()
}

/// The deliveries a statement selects.
pub(super) fn deliveries(c: &Connection, sql: &str, p: impl Params) -> Result<Vec<DeliveryTask>> {
    let mut statement = c.prepare_cached(sql).sq()?;
    let rows = statement.query_map(p, DeliveryRow::from_sqlite).sq()?.collect::<rusqlite::Result<Vec<_>>>().sq()?;
    rows.into_iter().map(DeliveryTask::try_from).collect()
}

pub(super) fn sync_configured_keys(
    tx: &Transaction<'_>,
    configured: KeyConfig<'_>,
    now: Timestamp,
) -> Result<ConfiguredKeys> {
    let KeyConfig { keys, secret } = configured;
    let mut sync = ConfiguredKeys::default();
    // Configured keys that left the configuration stop working; those listed again work again, unless
    // `jobhook keys revoke` revoked them: that stays.
    let configured: Vec<(i64, Vec<u8>, Option<String>)> = tx
        .prepare_cached("SELECT id, key_hash, revoked_by FROM api_keys WHERE source = 'config'")
        .sq()?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .sq()?
        .collect::<rusqlite::Result<_>>()
        .sq()?;
    for (id, hash, revoked_by) in configured {
        match ConfiguredKey::of(keys, &hash, revoked_by.as_deref()) {
            ConfiguredKey::RevokedByCommand => sync.revoked_by_command.push(id),
            ConfiguredKey::Restore => {
                tx.execute("UPDATE api_keys SET revoked_at = NULL, revoked_by = NULL WHERE id = ?1", [id]).sq()?;
            }
            ConfiguredKey::Revoke => {
                tx.execute(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?1), revoked_by = COALESCE(revoked_by, 'config') \
                     WHERE id = ?2",
                    params![now, id],
                )
                .sq()?;
            }
        }
    }
    // The configured secret is applied when it changes, not at every start: a rotation through the API
    // since then is kept.
    let fingerprint = secret.map(|s| Sha256::digest(s.bytes()).to_vec());
    let applied: Option<Vec<u8>> =
        optional_row(tx, "SELECT value FROM meta WHERE key = 'configured_signing_secret'", [], |r| r.get(0))?;
    let secret_changed = fingerprint.is_some() && fingerprint != applied;
    if let Some(fingerprint) = fingerprint.as_ref().filter(|_| secret_changed) {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('configured_signing_secret', ?1) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [fingerprint],
        )
        .sq()?;
    }
    for (i, key) in keys.iter().enumerate() {
        let tenant: Option<i64> =
            optional_row(tx, "SELECT tenant_id FROM api_keys WHERE key_hash = ?1", [key.0.as_slice()], |r| r.get(0))?;
        match tenant {
            Some(tenant_id) => {
                if let Some(secret) = secret.filter(|_| secret_changed) {
                    tx.execute(
                        "UPDATE tenants SET signing_secret = ?1 WHERE id = ?2",
                        params![secret.expose(), tenant_id],
                    )
                    .sq()?;
                }
            }
            None => {
                let secret = secret.cloned().unwrap_or_else(SigningSecret::generate);
                let name = format!("configured key {}", i + 1);
                let tenant = NewTenant { name: &name, key: *key, secret: &secret, source: "config" };
                insert_tenant_with_key(tx, &tenant, now)?;
                sync.created += 1;
            }
        }
    }
    Ok(sync)
}

pub(super) fn insert_tenant_with_key(tx: &Transaction<'_>, tenant: &NewTenant<'_>, now: Timestamp) -> Result<i64> {
    let NewTenant { name, key, secret, source } = *tenant;
    let tenant_id: i64 = tx
        .query_row(
            "INSERT INTO tenants (name, signing_secret, created_at) VALUES (?1, ?2, ?3) RETURNING id",
            params![name, secret.expose(), now],
            |r| r.get(0),
        )
        .sq()?;
    tx.execute(
        "INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![tenant_id, name, key.0.as_slice(), source, now],
    )
    .sq()?;
    Ok(tenant_id)
}

pub(super) fn add_key(
    tx: &Transaction<'_>,
    tenant_id: i64,
    name: &str,
    key: KeyHash,
    now: Timestamp,
) -> Result<Option<i64>> {
    let tenant: Option<i64> = optional_row(tx, "SELECT id FROM tenants WHERE id = ?1", [tenant_id], |r| r.get(0))?;
    if tenant.is_none() {
        return Ok(None);
    }
    let id = tx
        .query_row(
            "INSERT INTO api_keys (tenant_id, name, key_hash, source, created_at) VALUES (?1, ?2, ?3, 'stored', ?4) \
             RETURNING id",
            params![tenant_id, name, key.0.as_slice(), now],
            |r| r.get(0),
        )
        .sq()?;
    Ok(Some(id))
}

pub(super) fn tenant_by_key(c: &Connection, key: KeyHash) -> Result<Option<Tenant>> {
    let row: Option<(i64, String)> = optional_row(
        c,
        "SELECT t.id, t.signing_secret FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
         WHERE k.key_hash = ?1 AND k.revoked_at IS NULL",
        [key.0.as_slice()],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    row.map(|(id, secret)| Ok(Tenant { id, secret: Arc::new(parse_secret(&secret)?) })).transpose()
}

pub(super) fn list_keys(c: &Connection) -> Result<Vec<KeyInfo>> {
    let mut statement = c
        .prepare_cached("SELECT id, tenant_id, name, source, created_at, revoked_at FROM api_keys ORDER BY id")
        .sq()?;
    let rows = statement
        .query_map([], |r| {
            Ok(KeyInfo {
                id: r.get(0)?,
                tenant_id: r.get(1)?,
                name: r.get(2)?,
                source: r.get(3)?,
                created_at: r.get(4)?,
                revoked_at: r.get(5)?,
            })
        })
        .sq()?;
    rows.collect::<rusqlite::Result<_>>().sq()
}

pub(super) fn signing_secrets(c: &Connection, tenant_id: i64, now: Timestamp) -> Result<Vec<SigningSecret>> {
    let sql = "SELECT signing_secret, previous_secret, previous_until FROM tenants WHERE id = ?1";
    let row: Option<(String, Option<String>, Option<Timestamp>)> =
        optional_row(c, sql, [tenant_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    signing_secrets_of(tenant_id, row, now)
}

pub(super) fn subscription(c: &Connection, sub: TenantSub) -> Result<Option<Subscription>> {
    let sql = concat!(
        "SELECT ",
        subscription_columns!(),
        " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = ?1 AND s.tenant_id = ?2"
    );
    let row = optional_row(c, sql, params![sub.id.to_string(), sub.tenant_id], SubscriptionRow::from_sqlite)?;
    row.map(Subscription::try_from).transpose()
}

pub(in crate::store) fn list_statement(filter: &ListFilter) -> String {
    list_query(filter, of_job!("s", "{p}"))
}

pub(super) fn list_subscriptions(c: &Connection, tenant_id: i64, filter: &ListFilter) -> Result<Vec<Subscription>> {
    let sql = list_statement(filter);
    let (values, limit) = list_binds(filter);
    let binds: Vec<rusqlite::types::Value> = std::iter::once(rusqlite::types::Value::Integer(tenant_id))
        .chain(values.into_iter().map(rusqlite::types::Value::Text))
        .chain(std::iter::once(rusqlite::types::Value::Integer(limit)))
        .collect();
    let mut statement = c.prepare_cached(&sql).sq()?;
    let rows = statement
        .query_map(rusqlite::params_from_iter(binds), SubscriptionRow::from_sqlite)
        .sq()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .sq()?;
    rows.into_iter().map(Subscription::try_from).collect()
}

pub(super) fn cancel(tx: &Transaction<'_>, sub: TenantSub, now: Timestamp) -> Result<Option<Cancel>> {
    let sub_id = sub.id.to_string();
    let sql = "SELECT job_id, state FROM subscriptions WHERE id = ?1 AND tenant_id = ?2";
    let row: Option<(String, String)> =
        optional_row(tx, sql, params![sub_id, sub.tenant_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let Some((job_id, state)) = row else { return Ok(None) };
    let job_id = JobId::from_key(&job_id).map_err(|e| corrupt("job id", e))?;
    let was: SubscriptionState = state.parse().map_err(|e| corrupt("state", e))?;
    if was.is_final() {
        return Ok(Some(Cancel::Ended(was)));
    }
    // Not while an attempt holds the claim: it may be on the wire, and a subscription that reads
    // `cancelled` must never have been delivered.
    let changed = tx
        .execute(
            "UPDATE subscriptions SET state = 'cancelled', next_attempt_at = NULL, claimed_until = NULL, \
             claimed_by = NULL, updated_at = ?1 WHERE id = ?2 AND state IN ('polling', 'delivering') \
             AND (claimed_until IS NULL OR claimed_until <= ?1)",
            params![now, sub_id],
        )
        .sq()?;
    if changed == 0 {
        // Held by an attempt (or its claim lapsed a moment ago): the caller asks again shortly.
        let state = state_of(tx, &sub_id)?;
        return Ok(Some(if state.is_final() { Cancel::Ended(state) } else { Cancel::AttemptInFlight }));
    }
    Ok(Some(Cancel::Cancelled { job_id, was }))
}

pub(super) fn attempts(c: &Connection, sub: TenantSub) -> Result<Option<Vec<AttemptRecord>>> {
    let sql = "SELECT 1 FROM subscriptions WHERE id = ?1 AND tenant_id = ?2";
    let exists: Option<i64> = optional_row(c, sql, params![sub.id.to_string(), sub.tenant_id], |r| r.get(0))?;
    if exists.is_none() {
        return Ok(None);
    }
    let mut statement = c
        .prepare_cached(
            "SELECT series, attempt, webhook_id, started_at, status_code, error, duration_ms, response_content_type, \
             response_body FROM delivery_attempts \
             WHERE subscription_id = ?1 ORDER BY id",
        )
        .sq()?;
    let rows = statement
        .query_map([sub.id.to_string()], |r| {
            Ok(AttemptRecord {
                subscription_id: sub.id,
                partition: 0,
                series: u32::try_from(r.get::<_, i64>(0)?).unwrap_or(1),
                attempt: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                webhook_id: r.get(2)?,
                started_at: r.get(3)?,
                status_code: r.get::<_, Option<i64>>(4)?.and_then(|c| u16::try_from(c).ok()),
                error: r.get(5)?,
                duration_ms: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                response_content_type: r.get(7)?,
                response_body: r.get(8)?,
            })
        })
        .sq()?;
    Ok(Some(rows.collect::<rusqlite::Result<_>>().sq()?))
}

pub(super) fn redeliver(tx: &Transaction<'_>, sub: TenantSub, now: Timestamp) -> Result<Option<Redelivery>> {
    let sub_id = sub.id.to_string();
    let Some(row) = delivery_of(tx, sub)? else { return Ok(None) };
    let state = state_of(tx, &sub_id)?;
    if !matches!(state, SubscriptionState::Delivered | SubscriptionState::Failed)
        || row.result.is_none()
        || row.webhook_id.is_none()
    {
        return Ok(Some(Redelivery::NotEnded(state)));
    }
    // A failed subscription may have been followed by a new registration of the same job and callback;
    // two live deliveries of one job to one callback would be one too many.
    let newer: Option<i64> = optional_row(
        tx,
        "SELECT 1 FROM subscriptions s JOIN subscriptions o ON o.tenant_id = s.tenant_id \
         AND o.job_created_at = s.job_created_at AND o.job_id = s.job_id \
         AND o.callback_url = s.callback_url AND o.id <> s.id AND o.state IN ('polling', 'delivering', 'delivered') \
         WHERE s.id = ?1",
        [&sub_id],
        |r| r.get(0),
    )?;
    if newer.is_some() {
        return Ok(Some(Redelivery::Superseded));
    }
    let series: Option<i64> = optional_row(
        tx,
        "UPDATE subscriptions SET state = 'delivering', series = series + 1, attempts = 0, failure_reason = NULL, \
         next_attempt_at = ?1, updated_at = ?1 WHERE id = ?2 AND state IN ('delivered', 'failed') RETURNING series",
        params![now, sub_id],
        |r| r.get(0),
    )?;
    let Some(series) = series else {
        return Ok(Some(Redelivery::NotEnded(state)));
    };
    let mut task = DeliveryTask::try_from(row)?;
    task.series = u32::try_from(series).unwrap_or(u32::MAX);
    task.attempts_made = 0;
    task.due_at = now;
    Ok(Some(Redelivery::Started(task)))
}

pub(super) fn retry_now(tx: &Transaction<'_>, sub: TenantSub, now: Timestamp) -> Result<Option<RetryNow>> {
    let sub_id = sub.id.to_string();
    let Some(row) = delivery_of(tx, sub)? else { return Ok(None) };
    // Guarded by the series read above: a redelivery that started a newer series meanwhile is left alone.
    let changed = tx
        .execute(
            "UPDATE subscriptions SET next_attempt_at = ?1 WHERE id = ?2 AND state = 'delivering' AND series = ?3",
            params![now, sub_id, row.series],
        )
        .sq()?;
    if changed == 0 {
        return Ok(Some(RetryNow::NotDelivering(state_of(tx, &sub_id)?)));
    }
    let mut task = DeliveryTask::try_from(row)?;
    task.due_at = now;
    Ok(Some(RetryNow::Due(task)))
}

/// The delivery of the tenant's subscription, whatever its state.
fn delivery_of(tx: &Transaction<'_>, sub: TenantSub) -> Result<Option<DeliveryRow>> {
    let sql = concat!(delivery_select!(), " WHERE s.id = ?1 AND s.tenant_id = ?2");
    optional_row(tx, sql, params![sub.id.to_string(), sub.tenant_id], DeliveryRow::from_sqlite)
}

/// The one row `sql` finds, or `None` when it finds none (rusqlite's `query_row` calls that an error).
pub(super) fn optional_row<T>(
    c: &Connection,
    sql: &str,
    p: impl Params,
    row: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>> {
    c.prepare_cached(sql).sq()?.query_row(p, row).optional().sq()
}

/// The state of a subscription known to exist.
fn state_of(tx: &Transaction<'_>, sub_id: &str) -> Result<SubscriptionState> {
    let state: String = tx.query_row("SELECT state FROM subscriptions WHERE id = ?1", [sub_id], |r| r.get(0)).sq()?;
    state.parse().map_err(|e| corrupt("state", e))
}

pub(super) fn fail_job(
    tx: &Transaction<'_>,
    job_id: JobId,
    reason: FailureReason,
    last_error: &str,
    now: Timestamp,
) -> Result<u64> {
    let job = job_id.to_string();
    tx.execute("UPDATE jobs SET last_error = ?1, updated_at = ?2 WHERE job_id = ?3", params![last_error, now, job])
        .sq()?;
    let failed = tx
        .execute(
            concat!(
                "UPDATE subscriptions SET state = 'failed', failure_reason = ?1, updated_at = ?2 WHERE ",
                of_job!("subscriptions", "?3"),
                " AND state = 'polling'"
            ),
            params![reason.as_str(), now, job],
        )
        .sq()?;
    Ok(failed as u64)
}

pub(super) fn expire(
    tx: &Transaction<'_>,
    job_id: JobId,
    cutoff: Timestamp,
    now: Timestamp,
) -> Result<(u64, Option<PollableJob>)> {
    let job = job_id.to_string();
    let expired = tx
        .execute(
            concat!(
                "UPDATE subscriptions SET state = 'expired', updated_at = ?1 WHERE ",
                of_job!("subscriptions", "?2"),
                " AND state = 'polling' AND created_at <= ?3"
            ),
            params![now, job, cutoff],
        )
        .sq()?;
    let left = pollable(tx, concat!(pollable_select!(sqlite), " WHERE j.job_id = ?1 GROUP BY j.job_id"), [job])?.pop();
    Ok((expired as u64, left))
}

pub(super) fn heartbeat(tx: &Transaction<'_>, instance: &str, now: Timestamp, live_after: Timestamp) -> Result<i64> {
    tx.execute(
        "INSERT INTO instances (id, heartbeat_at) VALUES (?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        params![instance, now],
    )
    .sq()?;
    // Instances silent for ten times the liveness window are gone for good.
    tx.execute("DELETE FROM instances WHERE heartbeat_at < ?1", [live_after - now.duration_since(live_after) * 10])
        .sq()?;
    tx.query_row("SELECT COUNT(*) FROM instances WHERE heartbeat_at > ?1", [live_after], |r| r.get(0)).sq()
}

/// The partitions a `… RETURNING partition` statement returns, as a mask.
pub(super) fn partitions(tx: &Transaction<'_>, sql: &str, p: impl Params) -> Result<u64> {
    let mut statement = tx.prepare_cached(sql).sq()?;
    let held: Vec<i64> = statement.query_map(p, |r| r.get(0)).sq()?.collect::<rusqlite::Result<_>>().sq()?;
    Ok(mask_of(&held))
}

pub(super) fn release_leases(tx: &Transaction<'_>, instance: &str, partitions: u64) -> Result<()> {
    tx.execute(
        "UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = ?1 AND ((?2 >> CAST(partition AS INTEGER)) & 1) = 1",
        params![instance, partitions as i64],
    )
    .sq()?;
    Ok(())
}

/// Gives back every lease of `instance` and the delivery claims this store's workers (`me`) still hold.
pub(super) fn leave(tx: &Transaction<'_>, instance: &str, me: &str) -> Result<()> {
    tx.execute(
        "UPDATE subscriptions SET claimed_until = NULL, claimed_by = NULL WHERE state = 'delivering' AND claimed_by = ?1",
        [me],
    )
    .sq()?;
    release_leases(tx, instance, u64::MAX)?;
    tx.execute("DELETE FROM instances WHERE id = ?1", [instance]).sq()?;
    Ok(())
}

/// The subscriptions a bulk redelivery matches (see [`crate::store::bulk::matching_query`]).
pub(in crate::store) fn bulk_statement(filter: &BulkFilter) -> String {
    crate::store::bulk::matching_query(filter, "o.job_created_at = s.job_created_at AND o.job_id = s.job_id")
}

pub(super) fn matching_ended(c: &Connection, tenant_id: i64, filter: &BulkFilter) -> Result<Vec<SubscriptionId>> {
    use rusqlite::types::Value;
    let mut binds = vec![
        Value::Integer(tenant_id),
        Value::Text(filter.state.as_str().into()),
        Value::Integer(filter.since.as_millis()),
        Value::Integer(filter.until.as_millis()),
    ];
    binds.extend(crate::store::bulk::host_binds(filter).into_iter().map(Value::Text));
    binds.push(Value::Integer(i64::from(filter.limit) + 1));
    let mut statement = c.prepare_cached(&bulk_statement(filter)).sq()?;
    let ids = statement
        .query_map(rusqlite::params_from_iter(binds), |r| r.get::<_, String>(0))
        .sq()?
        .collect::<rusqlite::Result<Vec<_>>>()
        .sq()?;
    crate::store::bulk::parse_ids(ids)
}
