//! Group commit on PostgreSQL: each lane is a task that takes every write waiting and runs them in one
//! transaction; all writes about one job go to the same lane.

use super::*;
use crate::domain::new_webhook_id;
use crate::store::group::{Done, MAX_BATCH, claim_refused};

/// Group commit: takes every write waiting, runs them in one transaction — each inside a savepoint, so
/// one that fails rolls back alone — commits once, and only then answers each (a 201 is still durable).
/// Batches form by themselves: while one transaction commits, the next writes queue up.
pub(super) async fn run(pool: PgPool, mut writes: mpsc::Receiver<Write>, stats: Arc<WriterStats>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if writes.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Every batch takes its row locks in the same order (by job), so batches of different
        // instances cannot deadlock on PostgreSQL.
        batch.sort_by_key(Write::lock_order);
        stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        // A deadline of our own: a connection whose server stopped answering without closing it (a
        // half-open TCP connection, a frozen backend) would otherwise pin this lane until a restart.
        // sqlx has no client-side TCP keepalive, and the server's statement_timeout cannot fire on a
        // server that is not running. Dropping the batch rolls it back: nothing was committed.
        let outcome = match tokio::time::timeout(BATCH_DEADLINE, run_batch(&pool, &batch)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(deadline = ?BATCH_DEADLINE, "a write batch got no answer from the database in time; its connection is dropped");
                batch.iter().map(|w| w.failed(StoreError::trouble(Trouble::BatchDeadline(BATCH_DEADLINE)))).collect()
            }
        };
        stats.batch(started);
        for (write, result) in batch.drain(..).zip(outcome) {
            write.answer(result);
        }
    }
}

impl Write {
    async fn run_in(&self, tx: &mut Transaction<'static, Postgres>) -> Done {
        match self {
            Write::Register { key, id, job_id, callback_url, now, .. } => {
                Done::Register(register_in(tx, key, *id, *job_id, callback_url, *now).await)
            }
            Write::Complete { job_id, status, body, now, claim, .. } => {
                Done::Complete(complete_job_in(tx, *job_id, *status, body, *now, claim).await)
            }
            Write::Claim { id, series, now, claim, .. } => Done::Claim(claim_in(tx, *id, *series, *now, claim).await),
            Write::Attempt { record, result, now, .. } => {
                Done::Attempt(record_attempt_in(tx, record, *result, *now).await)
            }
            Write::Observe { job_id, status, last_error, now, .. } => {
                Done::Observe(record_observation_in(tx, *job_id, *status, last_error.as_deref(), *now).await)
            }
        }
    }
}

/// Runs `batch` in one transaction. Writes rarely fail, so the batch is tried whole; if any write fails,
/// the transaction is rolled back and each write runs again in a transaction of its own, so one bad
/// write cannot fail the others. Every write gets a result; when a commit fails, "unavailable" (nothing
/// was written).
async fn run_batch(pool: &PgPool, batch: &[Write]) -> Vec<Done> {
    if batch.len() > 1 {
        match try_batch(pool, batch).await {
            Ok(results) => return results,
            // The database is away: every write would fail alike, so answer them all now.
            Err(StoreError::Unavailable(e)) => {
                return batch.iter().map(|w| w.failed(StoreError::Unavailable(e.clone()))).collect();
            }
            Err(_) => {} // one write's own failure: each alone, below
        }
    }
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        results.push(match try_batch(pool, std::slice::from_ref(write)).await {
            Ok(mut one) => one.pop().unwrap_or_else(|| write.failed(StoreError::Corrupt("no result".into()))),
            Err(e) => write.failed(e),
        });
    }
    results
}

/// All of `batch` in one transaction, committed; or the first error, with nothing written.
async fn try_batch(pool: &PgPool, batch: &[Write]) -> Result<Vec<Done>> {
    let mut tx = pool.begin().await.db()?;
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        // On an error, dropping the transaction rolls it back.
        results.push(write.run_in(&mut tx).await.checked()?);
    }
    tx.commit().await.db()?;
    Ok(results)
}

// --- the writes that are group-committed (see `writer`) ---

/// The tenant of a usable API key, by the key's hash, checked inside the registering transaction and
/// holding the key row until commit: a revocation waits for the registrations
/// already past this check, so once `keys revoke` returns, no registration with the key can commit.
const KEY_TENANT: &str = "SELECT tenant_id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL FOR SHARE";

async fn register_in(
    tx: &mut Transaction<'static, Postgres>,
    key: &KeyHash,
    id: SubscriptionId,
    job_id: JobId,
    callback_url: &CallbackUrl,
    now: Millis,
) -> Result<Registered> {
    let tenant_id: Option<i64> =
        sqlx::query_scalar(KEY_TENANT).bind(key.0.as_slice()).fetch_optional(&mut **tx).await.db()?;
    let Some(tenant_id) = tenant_id else { return Ok(Registered::UnknownKey) };
    let job = job_id.to_string();
    // A write first, so this transaction holds the write lock before it reads: the job's result
    // cannot appear between our read and our insert.
    sqlx::query("INSERT INTO jobs (job_id, partition, created_at, updated_at) VALUES ($1, $2, $3, $3) ON CONFLICT (job_id) DO NOTHING",)
    .bind(&job)
    .bind(job_id.partition())
    .bind(now)
    .execute(&mut **tx)
    .await
    .db()?;
    // Lock the job's row (PostgreSQL; on SQLite the one writer connection already serialises us): a
    // concurrent registration of the same job, or the job's end, waits for this transaction. The same
    // statement reads what the new subscription needs to know of its job.
    let (job_created_at, job_status, last_error, result): (i64, Option<String>, Option<String>, Option<Vec<u8>>) =
        sqlx::query_as("UPDATE jobs SET updated_at = updated_at WHERE job_id = $1 RETURNING created_at, status, last_error, result",)
        .bind(&job)
        .fetch_one(&mut **tx)
        .await
        .db()?;
    let existing: Option<String> = sqlx::query_scalar(
        "SELECT id FROM subscriptions WHERE tenant_id = $1 AND job_id = $2 AND callback_url = $3 AND state IN ('polling', 'delivering', 'delivered')",
    )
    .bind(tenant_id)
    .bind(&job)
    .bind(callback_url.as_str())
    .fetch_optional(&mut **tx)
    .await
    .db()?;
    if let Some(existing) = existing {
        let sub = subscription_in(tx, &existing).await?;
        return Ok(Registered::Existing(sub));
    }
    let sub_id = id.to_string();
    // The new subscription as the API shows it, without reading it back.
    let new_subscription = |state, webhook_id, next_attempt_at| -> Result<Subscription> {
        Ok(Subscription {
            id,
            job_id,
            callback_url: callback_url.as_str().to_owned(),
            state,
            job_status: job_status.as_deref().map(str::parse).transpose().map_err(|e| corrupt("job status", e))?,
            failure_reason: None,
            last_error: last_error.clone(),
            last_delivery_error: None,
            webhook_id,
            attempts: 0,
            next_attempt_at,
            created_at: now,
            updated_at: now,
        })
    };
    match result {
        None => {
            sqlx::query(
                "INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, created_at, updated_at, partition) \
                 VALUES ($1, $2, $3, $4, 'polling', $5, $5, $6)",
            )
            .bind(&sub_id)
            .bind(tenant_id)
            .bind(&job)
            .bind(callback_url.as_str())
            .bind(now)
            .bind(job_id.partition())
            .execute(&mut **tx)
            .await
            .db()?;
            let sub = new_subscription(SubscriptionState::Polling, None, None)?;
            // A job created by this registration has no older subscription to expire first.
            let pollable = if job_created_at == now {
                PollableJob { job_id, job_created_at, oldest_polling_at: now }
            } else {
                pollable_in(tx, &job).await?.ok_or_else(|| corrupt("new subscription not polling", &sub_id))?
            };
            notify(tx, Notice::Poll(job_id)).await?;
            Ok(Registered::CreatedPolling(sub, pollable))
        }
        Some(body) => {
            let webhook_id = new_webhook_id();
            sqlx::query(
                "INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, webhook_id, next_attempt_at, created_at, updated_at, partition) \
                 VALUES ($1, $2, $3, $4, 'delivering', $5, $6, $6, $6, $7)",
            )
            .bind(&sub_id)
            .bind(tenant_id)
            .bind(&job)
            .bind(callback_url.as_str())
            .bind(&webhook_id)
            .bind(now)
            .bind(job_id.partition())
            .execute(&mut **tx)
            .await
            .db()?;
            let sub = new_subscription(SubscriptionState::Delivering, Some(webhook_id.clone()), Some(now))?;
            notify(tx, Notice::Deliver(id, job_id.partition())).await?;
            let task = DeliveryTask::first(
                id,
                job_id,
                tenant_id,
                webhook_id,
                callback_url.as_str().to_owned(),
                body.into(),
                now,
            );
            Ok(Registered::CreatedDelivering(sub, task))
        }
    }
}

async fn complete_job_in(
    tx: &mut Transaction<'static, Postgres>,
    job_id: JobId,
    status: JobStatus,
    body: &Bytes,
    now: Millis,
    claim: &ClaimFor,
) -> Result<Vec<DeliveryTask>> {
    let job = job_id.to_string();
    let first = sqlx::query(
        "UPDATE jobs SET status = $1, result = $2, last_error = NULL, finished_at = $3, updated_at = $3 \
         WHERE job_id = $4 AND result IS NULL",
    )
    .bind(status.as_str())
    .bind(body.as_ref())
    .bind(now)
    .bind(&job)
    .execute(&mut **tx)
    .await
    .db()?
    .rows_affected()
        == 1;
    if !first {
        // Already recorded (a retry after a commit whose answer was lost): hand out its deliveries again.
        return already_completed(tx, &job).await;
    }
    let subscribers: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT id, tenant_id, callback_url FROM subscriptions WHERE job_id = $1 AND state = 'polling'")
            .bind(&job)
            .fetch_all(&mut **tx)
            .await
            .db()?;
    let mut tasks = Vec::with_capacity(subscribers.len());
    for (id, tenant_id, callback_url) in subscribers {
        let webhook_id = new_webhook_id();
        // Claimed for this instance's first attempt in the same write (see `Store::claim_delivery`).
        let moved = sqlx::query(concat!(
                "UPDATE subscriptions SET state = 'delivering', webhook_id = $1, attempts = 0, next_attempt_at = $2, updated_at = $2, \
                 claimed_until = ",
                pg_now_ms!(),
                " + $4, claimed_by = $5 WHERE id = $3 AND state = 'polling'"
            ))
        .bind(&webhook_id)
        .bind(now)
        .bind(&id)
        .bind(claim.ms)
        .bind(&*claim.by)
        .execute(&mut **tx)
        .await
        .db()?;
        if moved.rows_affected() == 0 {
            // Cancelled between our read and this update (PostgreSQL): not ours to deliver.
            continue;
        }
        let id = id.parse().map_err(|e| corrupt("subscription id", e))?;
        let mut task = DeliveryTask::first(id, job_id, tenant_id, webhook_id, callback_url, body.clone(), now);
        task.claimed_until = Some(claim.held_until);
        tasks.push(task);
    }
    Ok(tasks)
}

/// See [`Store::claim_delivery`].
async fn claim_in(
    tx: &mut Transaction<'static, Postgres>,
    id: SubscriptionId,
    series: u32,
    now: Millis,
    claim: &ClaimFor,
) -> Result<Claim> {
    let id = id.to_string();
    let taken = sqlx::query(concat!(
        "UPDATE subscriptions SET claimed_until = ",
        pg_now_ms!(),
        " + $2, claimed_by = $3 WHERE id = $4 AND state = 'delivering' AND series = $5 AND $1 = $1 \
             AND (claimed_until IS NULL OR claimed_until <= ",
        pg_now_ms!(),
        " OR claimed_by = $3)"
    ))
    .bind(now)
    .bind(claim.ms)
    .bind(&*claim.by)
    .bind(&id)
    .bind(i64::from(series))
    .execute(&mut **tx)
    .await
    .db()?
    .rows_affected()
        == 1;
    if taken {
        return Ok(Claim::Held(claim.held_until));
    }
    let row: Option<(String, i64, Option<i64>)> =
        sqlx::query_as("SELECT state, series, claimed_until FROM subscriptions WHERE id = $1")
            .bind(&id)
            .fetch_optional(&mut **tx)
            .await
            .db()?;
    Ok(claim_refused(row, series, now))
}

/// The deliveries a completed job created, for a completion that is recorded a second time.
async fn already_completed(tx: &mut Transaction<'static, Postgres>, job: &str) -> Result<Vec<DeliveryTask>> {
    let sql = concat!(
        delivery_select!(),
        " WHERE s.job_id = $1 AND s.state = 'delivering' AND s.series = 1 AND s.attempts = 0"
    );
    let rows: Vec<DeliveryRow> = sqlx::query_as(sql).bind(job).fetch_all(&mut **tx).await.db()?;
    rows.into_iter().map(DeliveryTask::try_from).collect()
}

async fn record_attempt_in(
    tx: &mut Transaction<'static, Postgres>,
    record: &AttemptRecord,
    result: AttemptResult,
    now: Millis,
) -> Result<bool> {
    let id = record.subscription_id.to_string();
    sqlx::query(
        "INSERT INTO delivery_attempts (subscription_id, series, attempt, webhook_id, started_at, status_code, error, duration_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(i64::from(record.series))
    .bind(i64::from(record.attempt))
    .bind(&record.webhook_id)
    .bind(record.started_at)
    .bind(record.status_code.map(i64::from))
    .bind(record.error.as_deref())
    .bind(i64::try_from(record.duration_ms).unwrap_or(i64::MAX))
    .execute(&mut **tx)
    .await
    .db()?;
    let (state, next_at, reason) = match result {
        AttemptResult::Delivered => ("delivered", None, None),
        AttemptResult::RetryAt(at) => ("delivering", Some(at), None),
        AttemptResult::Failed(reason) => ("failed", None, Some(reason.as_str())),
    };
    let moved = sqlx::query("UPDATE subscriptions SET state = $1, attempts = $2, next_attempt_at = $3, failure_reason = $4, updated_at = $5, \
         claimed_until = NULL, claimed_by = NULL WHERE id = $6 AND state = 'delivering' AND series = $7",)
    .bind(state)
    .bind(i64::from(record.attempt))
    .bind(next_at)
    .bind(reason)
    .bind(now)
    .bind(&id)
    .bind(i64::from(record.series))
    .execute(&mut **tx)
    .await
    .db()?;
    Ok(moved.rows_affected() == 1)
}

async fn record_observation_in(
    tx: &mut Transaction<'static, Postgres>,
    job_id: JobId,
    status: Option<JobStatus>,
    last_error: Option<&str>,
    now: Millis,
) -> Result<()> {
    sqlx::query("UPDATE jobs SET status = COALESCE($1, status), last_error = $2, updated_at = $3 WHERE job_id = $4 AND result IS NULL",)
        .bind(status.map(|s| s.as_str()))
        .bind(last_error)
        .bind(now)
        .bind(job_id.to_string())
        .execute(&mut **tx)
        .await
        .db()?;
    Ok(())
}
