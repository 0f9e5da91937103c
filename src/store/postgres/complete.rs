//! Job results on PostgreSQL, a batch at a time: each job's result and the deliveries it creates in the
//! batch's transaction (the outbox), in a fixed number of statements however many jobs end together.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::domain::{Timestamp, new_webhook_id};

/// One job's end, as the writer hands it over.
pub(super) struct Completion<'a> {
    pub job_id: JobId,
    pub status: JobStatus,
    pub body: &'a Bytes,
    pub now: Timestamp,
    pub claim: &'a ClaimFor,
}

/// Records every completion of the batch inside `tx`; the answers (the deliveries each created, claimed
/// for this instance) come in the batch's order.
pub(super) async fn complete_all(tx: &mut PgConnection, done: &[Completion<'_>]) -> Result<Vec<Vec<DeliveryTask>>> {
    // Each job once (the first of its completions in the batch; a repeat is handed the deliveries it
    // created, as a retry would be); the batch already holds the jobs' locks.
    let mut seen = HashSet::new();
    let firsts: Vec<&Completion<'_>> = done.iter().filter(|c| seen.insert(c.job_id.clone())).collect();
    let recorded = record_results(tx, &firsts).await?;
    let ids: Vec<String> = firsts.iter().map(|c| c.job_id.to_string()).filter(|id| recorded.contains(id)).collect();

    // Every polling subscription of those jobs becomes a delivery due now, claimed for this instance's
    // first attempt in the same write (see `Store::claim_delivery`).
    let subscribers: Vec<Subscriber> = if ids.is_empty() {
        Vec::new()
    } else {
        sqlx::query_as(
            "SELECT id, job_id, tenant_id, callback_url, callback_headers, payload, metadata \
             FROM subscriptions WHERE job_id = ANY($1) AND state = 'polling' ORDER BY id FOR UPDATE",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .db()?
    };
    let by_job: HashMap<String, &Completion<'_>> = firsts.iter().map(|c| (c.job_id.to_string(), *c)).collect();
    let mut moved = Moved::default();
    for s in subscribers {
        let c = by_job.get(&s.job_id).ok_or_else(|| corrupt("subscriber of another job", &s.job_id))?;
        let form = DeliveryForm::from_stored(s.callback_headers.as_deref(), s.payload.as_deref(), s.metadata)?;
        moved.ids.push(s.id);
        moved.webhook_ids.push(new_webhook_id());
        moved.nows.push(c.now);
        moved.claim_ms.push(c.claim.ms);
        moved.claimed_by.push(c.claim.by.to_string());
        moved.rest.push((s.job_id, s.tenant_id, s.callback_url, form));
    }
    let moved_ids = moved.write(tx).await?;
    let mut tasks: HashMap<JobId, Vec<DeliveryTask>> = HashMap::new();
    let rows = moved.ids.into_iter().zip(moved.webhook_ids).zip(moved.rest);
    for ((id, webhook_id), (job, tenant_id, callback_url, form)) in rows {
        // Not moved: cancelled since (not ours to deliver).
        if !moved_ids.contains(&id) {
            continue;
        }
        let c = by_job[&job];
        let id = id.parse().map_err(|e| corrupt("subscription id", e))?;
        let mut task =
            DeliveryTask::first(id, c.job_id.clone(), tenant_id, webhook_id, callback_url, c.body.clone(), c.now)
                .with_form(form);
        task.claimed_until = Some(c.claim.held_until);
        tasks.entry(c.job_id.clone()).or_default().push(task);
    }

    // In the batch's order; a job recorded before (a retry after a commit whose answer was lost, or a
    // repeat in this batch) hands out the deliveries it created again.
    let mut answered = HashSet::new();
    let mut answers = Vec::with_capacity(done.len());
    for c in done {
        let job = c.job_id.to_string();
        if recorded.contains(&job) && answered.insert(c.job_id.clone()) {
            answers.push(tasks.remove(&c.job_id).unwrap_or_default());
        } else {
            answers.push(already_completed(tx, &job).await?);
        }
    }
    Ok(answers)
}

/// Records each result unless one is recorded already; the jobs it recorded. The batch holds the jobs'
/// locks already, taken in one order before anything else (`writer::lock_jobs_first`), so batches
/// cannot deadlock.
async fn record_results(tx: &mut PgConnection, firsts: &[&Completion<'_>]) -> Result<HashSet<String>> {
    let ids: Vec<String> = firsts.iter().map(|c| c.job_id.to_string()).collect();
    let statuses: Vec<&str> = firsts.iter().map(|c| c.status.as_str()).collect();
    let bodies: Vec<&[u8]> = firsts.iter().map(|c| c.body.as_ref()).collect();
    let nows: Vec<Timestamp> = firsts.iter().map(|c| c.now).collect();
    collect_column(
        &mut *tx,
        sqlx::query_scalar(
            "UPDATE jobs SET status = u.s, result = u.r, last_error = NULL, finished_at = u.n, updated_at = u.n \
             FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::int8[]) AS u (j, s, r, n) \
             WHERE jobs.job_id = u.j AND jobs.result IS NULL RETURNING jobs.job_id",
        )
        .bind(&ids)
        .bind(&statuses)
        .bind(&bodies)
        .bind(&nows),
    )
    .await
}

/// The subscriptions a batch moves to delivering, as columns.
#[derive(Default)]
struct Moved {
    ids: Vec<String>,
    webhook_ids: Vec<String>,
    nows: Vec<Timestamp>,
    claim_ms: Vec<i64>,
    claimed_by: Vec<String>,
    /// Job, tenant, callback and form of each, for its task.
    rest: Vec<(String, i64, String, DeliveryForm)>,
}

/// A polling subscription of a job that ends.
#[derive(sqlx::FromRow)]
struct Subscriber {
    id: String,
    job_id: String,
    tenant_id: i64,
    callback_url: String,
    callback_headers: Option<String>,
    payload: Option<String>,
    metadata: Option<String>,
}

/// The deliveries a completed job created, for a completion that is recorded a second time.
async fn already_completed(tx: &mut PgConnection, job: &str) -> Result<Vec<DeliveryTask>> {
    let sql = concat!(
        delivery_select!(),
        " WHERE s.job_id = $1 AND s.state = 'delivering' AND s.series = 1 AND s.attempts = 0"
    );
    let rows: Vec<DeliveryRow> = sqlx::query_as(sql).bind(job).fetch_all(&mut *tx).await.db()?;
    rows.into_iter().map(DeliveryTask::try_from).collect()
}

impl Moved {
    /// Moves the subscriptions still polling; the IDs it moved.
    async fn write(&self, tx: &mut PgConnection) -> Result<HashSet<String>> {
        if self.ids.is_empty() {
            return Ok(HashSet::new());
        }
        collect_column(
            &mut *tx,
            sqlx::query_scalar(concat!(
                "UPDATE subscriptions SET state = 'delivering', webhook_id = u.w, attempts = 0, next_attempt_at = u.n, \
                 updated_at = u.n, claimed_until = ",
                pg_now_ms!(),
                " + u.m, claimed_by = u.b \
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[]) AS u (i, w, n, m, b) \
                 WHERE subscriptions.id = u.i AND subscriptions.state = 'polling' RETURNING subscriptions.id"
            ))
            .bind(&self.ids)
            .bind(&self.webhook_ids)
            .bind(&self.nows)
            .bind(&self.claim_ms)
            .bind(&self.claimed_by),
        )
        .await
    }
}
