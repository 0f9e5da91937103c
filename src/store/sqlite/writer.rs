//! The group-committed writes on SQLite, run on one thread of their own with rusqlite.
//!
//! sqlx drives each SQLite connection from a worker thread and crosses to it for every statement; with
//! a dozen statements a job, those hand-offs were most of jobhook's CPU (profiled with perf). Here a
//! whole batch runs on this thread, with cached prepared statements, in one transaction: one hand-off
//! per batch. The tests run the whole suite on this store and on PostgreSQL's.

use rusqlite::{Connection, TransactionBehavior, params};

use super::checkpoint::{self, Checkpointer};
use super::ops::optional_row;
use tokio::sync::mpsc;

use super::*;
use crate::domain::{Timestamp, new_webhook_id};
use crate::store::group::{Done, claim_refused};

/// What the writer thread runs: a group-committed write, or a write of another kind in a transaction of
/// its own (see [`SqliteStore::exec`]).
pub(super) enum Job {
    Group(Write),
    /// `bulk`: it dirties many pages at once (a purge step), see [`Checkpointer::bulk`].
    Alone {
        run: Box<dyn FnOnce(&mut Connection) + Send>,
        bulk: bool,
    },
}

/// Serves batches on `conn`, the store's only connection that writes transactions, until the queue
/// closes; tells `checkpointer` after each round of commits.
pub(super) fn spawn(
    mut conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    stats: Arc<WriterStats>,
    checkpointer: Checkpointer,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("jobhook-sqlite-writer".into()).spawn(move || {
        let mut received = Vec::with_capacity(MAX_BATCH);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut alone = Vec::new();
        let mut checkpoint_pages = checkpoint::WRITER_CHECKPOINT_PAGES;
        while jobs.blocking_recv_many(&mut received, MAX_BATCH) > 0 {
            for job in received.drain(..) {
                match job {
                    Job::Group(write) => batch.push(write),
                    Job::Alone { run, bulk } => {
                        if bulk {
                            checkpointer.bulk();
                        }
                        alone.push(run);
                    }
                }
            }
            let pages = checkpointer.writer_pages();
            if pages != checkpoint_pages && conn.pragma_update(None, "wal_autocheckpoint", pages).is_ok() {
                checkpoint_pages = pages;
            }
            if !batch.is_empty() {
                batch.sort_by(|a, b| a.lock_order().cmp(&b.lock_order()));
                stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let started = std::time::Instant::now();
                let results = run_batch(&mut conn, &batch);
                stats.batch(started);
                for (write, result) in batch.drain(..).zip(results) {
                    write.answer(result);
                }
            }
            for run in alone.drain(..) {
                stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                run(&mut conn);
            }
            checkpointer.committed();
        }
    })?;
    Ok(())
}

/// The whole batch in one transaction; if a write fails, each write again in a transaction of its own.
fn run_batch(conn: &mut Connection, batch: &[Write]) -> Vec<Done> {
    if batch.len() > 1 {
        match try_batch(conn, batch) {
            Ok(results) => return results,
            // The database is away (disk full, read-only): every write would fail alike.
            Err(StoreError::Unavailable(e)) => {
                return batch.iter().map(|w| w.failed(StoreError::Unavailable(e.clone()))).collect();
            }
            Err(_) => {} // one write's own failure: each alone, below
        }
    }
    batch
        .iter()
        .map(|write| match try_batch(conn, std::slice::from_ref(write)) {
            Ok(mut one) => one.pop().unwrap_or_else(|| write.failed(StoreError::Corrupt("no result".into()))),
            Err(e) => write.failed(e),
        })
        .collect()
}

fn try_batch(conn: &mut Connection, batch: &[Write]) -> Result<Vec<Done>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).sq()?;
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        results.push(run(&tx, write).checked()?);
    }
    tx.commit().sq()?;
    Ok(results)
}

fn run(tx: &rusqlite::Transaction<'_>, write: &Write) -> Done {
    match write {
        Write::Register { registration, .. } => Done::Register(register(tx, registration)),
        Write::Complete { end, claim, .. } => Done::Complete(complete_job(tx, end, claim)),
        Write::Claim { id, series, now, claim, .. } => Done::Claim(claim_delivery(tx, *id, *series, *now, claim)),
        Write::Attempt { record, result, now, .. } => Done::Attempt(record_attempt(tx, record, *result, *now)),
        Write::Observe { observation: o, .. } => {
            Done::Observe(observe(tx, &o.job_id, o.status, o.last_error.as_deref(), o.now))
        }
    }
}

fn register(tx: &rusqlite::Transaction<'_>, registration: &Registration) -> Result<Registered> {
    let Registration { key, id, job_id, callback_url, form, now } = registration;
    let (id, now) = (*id, *now);
    let headers = &form.headers;
    // The key is checked in the registering transaction: a revoked key is refused at once, and the API
    // needs no read of its own first (see api::auth::RegisteringKey).
    let Some(tenant_id) = tenant_of(tx, key)? else { return Ok(Registered::UnknownKey) };
    let job = job_id.to_string();
    let (job_created_at, job_status, last_error, result, finished_at) = job_row(tx, job_id, now)?;
    if let Some(found) = existing(tx, tenant_id, (job_created_at, &job), callback_url, headers)? {
        return Ok(found);
    }
    let job_status = job_status.as_deref().map(str::parse).transpose().map_err(|e| corrupt("job status", e))?;
    let (state, webhook_id) = match result {
        None => (SubscriptionState::Polling, None),
        Some(_) => (SubscriptionState::Delivering, Some(new_webhook_id())),
    };
    let next_attempt_at = webhook_id.as_ref().map(|_| now);
    tx.prepare_cached(
        "INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, webhook_id, next_attempt_at, \
         created_at, updated_at, partition, callback_headers, callback_headers_hash, payload, metadata, job_created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )
    .sq()?
    .execute(params![
        id.to_string(),
        tenant_id,
        job,
        callback_url.as_str(),
        state.as_str(),
        webhook_id,
        next_attempt_at,
        now,
        job_id.partition(),
        headers.to_stored(),
        headers.digest(),
        form.payload.as_str(),
        form.metadata,
        job_created_at
    ])
    .sq()?;
    let sub = Subscription {
        id,
        job_id: job_id.clone(),
        callback_url: callback_url.as_str().to_owned(),
        state,
        job_status,
        failure_reason: None,
        last_error,
        last_delivery_error: None,
        webhook_id: webhook_id.clone(),
        attempts: 0,
        next_attempt_at,
        created_at: now,
        updated_at: now,
        header_names: headers.names(),
        payload: form.payload,
        metadata: form.metadata.clone(),
    };
    let (Some(body), Some(webhook_id)) = (result, webhook_id) else {
        // A job created by this registration has no older subscription to expire first.
        let oldest_polling_at =
            if job_created_at == now { now } else { oldest_polling(tx, (job_created_at, &job))?.unwrap_or(now) };
        return Ok(Registered::CreatedPolling(
            sub,
            PollableJob { job_id: job_id.clone(), job_created_at, oldest_polling_at },
        ));
    };
    let mut task =
        DeliveryTask::first(id, job_id.clone(), tenant_id, webhook_id, sub.callback_url.clone(), body.into(), now)
            .with_form(form.clone());
    task.finished_at = finished_at.unwrap_or(now);
    Ok(Registered::CreatedDelivering(sub, task))
}

/// A subscriber of a job that ends: ID, tenant, callback, stored headers, payload form and metadata.
type Subscriber = (String, i64, String, Option<String>, Option<String>, Option<String>);

/// A job as a registration reads it: created, status, last error, result, finished.
type JobRow = (Timestamp, Option<String>, Option<String>, Option<Vec<u8>>, Option<Timestamp>);

/// The job a registration is for, created if new.
fn job_row(tx: &rusqlite::Transaction<'_>, job_id: &JobId, now: Timestamp) -> Result<JobRow> {
    let job = job_id.to_string();
    tx.prepare_cached(
        "INSERT INTO jobs (job_id, partition, created_at, updated_at) VALUES (?1, ?2, ?3, ?3) ON CONFLICT (job_id) DO NOTHING",
    )
    .sq()?
    .execute(params![job, job_id.partition(), now])
    .sq()?;
    tx.prepare_cached("SELECT created_at, status, last_error, result, finished_at FROM jobs WHERE job_id = ?")
        .sq()?
        .query_row(params![job], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .sq()
}

/// The tenant of a usable key.
fn tenant_of(tx: &rusqlite::Transaction<'_>, key: &KeyHash) -> Result<Option<i64>> {
    let sql = "SELECT tenant_id FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL";
    optional_row(tx, sql, params![key.0.as_slice()], |r| r.get(0))
}

/// When the job's oldest polling subscription was registered.
fn oldest_polling(tx: &rusqlite::Transaction<'_>, (created, job): (Timestamp, &str)) -> Result<Option<Timestamp>> {
    tx.prepare_cached(
        "SELECT MIN(created_at) FROM subscriptions WHERE job_created_at = ? AND job_id = ? AND state = 'polling'",
    )
    .sq()?
    .query_row(params![created, job], |r| r.get(0))
    .sq()
}

/// The live (or delivered) subscription of the same tenant, job and callback, if there is one: this
/// registration is that one when the headers are the same, and refused when they differ.
fn existing(
    tx: &rusqlite::Transaction<'_>,
    tenant_id: i64,
    (job_created_at, job): (Timestamp, &str),
    callback_url: &CallbackUrl,
    headers: &CallbackHeaders,
) -> Result<Option<Registered>> {
    let found: Option<(String, String, Option<String>)> = optional_row(
        tx,
        "SELECT id, state, callback_headers_hash FROM subscriptions WHERE tenant_id = ? AND job_created_at = ? \
         AND job_id = ? AND callback_url = ? AND state IN ('polling', 'delivering', 'delivered')",
        params![tenant_id, job_created_at, job, callback_url.as_str()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let Some((id, state, digest)) = found else { return Ok(None) };
    if digest != headers.digest() {
        return Ok(Some(Registered::HeadersDiffer {
            id: id.parse().map_err(|e| corrupt("subscription id", e))?,
            state: state.parse().map_err(|e| corrupt("state", e))?,
        }));
    }
    Ok(Some(Registered::Existing(subscription(tx, &id)?)))
}

/// A subscription as the API shows it, read inside the writer's transaction.
fn subscription(tx: &rusqlite::Transaction<'_>, id: &str) -> Result<Subscription> {
    let row = tx
        .prepare_cached(concat!(
            "SELECT ",
            subscription_columns!(),
            " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = ?"
        ))
        .sq()?
        .query_row(params![id], SubscriptionRow::from_sqlite)
        .sq()?;
    row.try_into()
}

fn complete_job(tx: &rusqlite::Transaction<'_>, end: &JobEnd, claim: &ClaimFor) -> Result<Vec<DeliveryTask>> {
    let &JobEnd { ref job_id, status, ref body, now } = end;
    let job = job_id.to_string();
    let first = tx
        .prepare_cached(
            "UPDATE jobs SET status = ?1, result = ?2, last_error = NULL, finished_at = ?3, updated_at = ?3 \
             WHERE job_id = ?4 AND result IS NULL",
        )
        .sq()?
        .execute(params![status.as_str(), body.as_ref(), now, job])
        .sq()?
        == 1;
    if !first {
        // Already recorded: hand out the deliveries it created again (the dispatcher drops repeats).
        let sql = concat!(
            delivery_select!(),
            " WHERE ",
            of_job!("s", "?1"),
            " AND s.state = 'delivering' AND s.series = 1 AND s.attempts = 0"
        );
        let mut statement = tx.prepare_cached(sql).sq()?;
        let rows = statement
            .query_map(params![job], DeliveryRow::from_sqlite)
            .sq()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .sq()?;
        return rows.into_iter().map(DeliveryTask::try_from).collect();
    }
    let subscribers: Vec<Subscriber> = tx
        .prepare_cached(concat!(
            "SELECT id, tenant_id, callback_url, callback_headers, payload, metadata FROM subscriptions s WHERE ",
            of_job!("s", "?1"),
            " AND state = 'polling'"
        ))
        .sq()?
        .query_map(params![job], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
        .sq()?
        .collect::<rusqlite::Result<_>>()
        .sq()?;
    let mut tasks = Vec::with_capacity(subscribers.len());
    for (id, tenant_id, callback_url, headers, payload, metadata) in subscribers {
        let form = DeliveryForm::from_stored(headers.as_deref(), payload.as_deref(), metadata)?;
        let webhook_id = new_webhook_id();
        // The rows were read in this IMMEDIATE transaction, which holds SQLite's write lock: nothing can
        // have moved them since, so the update needs no `AND state = 'polling'` (unlike PostgreSQL's).
        // Claimed for our first attempt in the same write (see `Store::claim_delivery`).
        tx.prepare_cached(
            "UPDATE subscriptions SET state = 'delivering', webhook_id = ?1, attempts = 0, next_attempt_at = ?2, \
             updated_at = ?2, claimed_until = ?2 + ?4, claimed_by = ?5 WHERE id = ?3",
        )
        .sq()?
        .execute(params![webhook_id, now, id, claim.ms, &*claim.by])
        .sq()?;
        let id = id.parse().map_err(|e| corrupt("subscription id", e))?;
        let mut task = DeliveryTask::first(id, job_id.clone(), tenant_id, webhook_id, callback_url, body.clone(), now)
            .with_form(form);
        task.claimed_until = Some(claim.held_until);
        tasks.push(task);
    }
    Ok(tasks)
}

fn claim_delivery(
    tx: &rusqlite::Transaction<'_>,
    id: SubscriptionId,
    series: u32,
    now: Timestamp,
    claim: &ClaimFor,
) -> Result<Claim> {
    let id = id.to_string();
    let taken = tx
        .prepare_cached(
            "UPDATE subscriptions SET claimed_until = ?1 + ?2, claimed_by = ?3 WHERE id = ?4 AND state = 'delivering' \
             AND series = ?5 AND (claimed_until IS NULL OR claimed_until <= ?1 OR claimed_by = ?3)",
        )
        .sq()?
        .execute(params![now, claim.ms, &*claim.by, id, i64::from(series)])
        .sq()?
        == 1;
    if taken {
        return Ok(Claim::Held(claim.held_until));
    }
    let sql = "SELECT state, series, claimed_until FROM subscriptions WHERE id = ?";
    let row = optional_row(tx, sql, params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(claim_refused(row, series, now))
}

fn record_attempt(
    tx: &rusqlite::Transaction<'_>,
    record: &AttemptRecord,
    result: AttemptResult,
    now: Timestamp,
) -> Result<bool> {
    let id = record.subscription_id.to_string();
    tx.prepare_cached(
        "INSERT INTO delivery_attempts (subscription_id, series, attempt, webhook_id, started_at, status_code, error, \
         duration_ms, response_content_type, response_body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .sq()?
    .execute(params![
        id,
        i64::from(record.series),
        i64::from(record.attempt),
        record.webhook_id,
        record.started_at,
        record.status_code.map(i64::from),
        record.error,
        i64::try_from(record.duration_ms).unwrap_or(i64::MAX),
        record.response_content_type,
        record.response_body
    ])
    .sq()?;
    let (state, next_at, reason) = match result {
        AttemptResult::Delivered => ("delivered", None, None),
        AttemptResult::RetryAt(at) => ("delivering", Some(at), None),
        AttemptResult::Failed(reason) => ("failed", None, Some(reason.as_str())),
    };
    let moved = tx
        .prepare_cached(
            "UPDATE subscriptions SET state = ?, attempts = ?, next_attempt_at = ?, failure_reason = ?, updated_at = ?, \
             claimed_until = NULL, claimed_by = NULL WHERE id = ? AND state = 'delivering' AND series = ?",
        )
        .sq()?
        .execute(params![state, i64::from(record.attempt), next_at, reason, now, id, i64::from(record.series)])
        .sq()?;
    Ok(moved == 1)
}

fn observe(
    tx: &rusqlite::Transaction<'_>,
    job_id: &JobId,
    status: Option<JobStatus>,
    last_error: Option<&str>,
    now: Timestamp,
) -> Result<()> {
    tx.prepare_cached(
        "UPDATE jobs SET status = COALESCE(?, status), last_error = ?, updated_at = ? WHERE job_id = ? AND result IS NULL",
    )
        .sq()?
        .execute(params![status.map(|s| s.as_str()), last_error, now, job_id.to_string()])
        .sq()?;
    Ok(())
}
