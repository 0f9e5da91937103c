//! Registrations on PostgreSQL, a batch at a time: however many a batch holds, it costs the same few
//! statements (arrays bound once, `UNNEST` on the server), not a handful per registration.

use std::collections::HashMap;

use super::*;
use crate::domain::{Timestamp, new_webhook_id};

/// What a registration's job looked like, read under its row lock.
#[derive(sqlx::FromRow)]
struct JobRow {
    job_id: String,
    created_at: Timestamp,
    status: Option<String>,
    last_error: Option<String>,
    result: Option<Vec<u8>>,
    finished_at: Option<Timestamp>,
}

/// Runs every registration of the batch inside `tx`; the answers come in the batch's order. An error
/// is the whole batch's (the writer then runs each registration alone).
pub(super) async fn register_all(
    tx: &mut PgConnection,
    regs: &[&Registration],
    sent: &notice::Sent,
) -> Result<Vec<Registered>> {
    // The tenants of the keys, holding the key rows until commit: a revocation waits for the
    // registrations already past this check, so once `keys revoke` returns, none with the key commits.
    let tenants = tenants_of(tx, regs).await?;
    let tenant_of = |r: &&Registration| tenants.get(r.key.0.as_slice()).copied();
    if regs.iter().all(|r| tenant_of(r).is_none()) {
        return Ok(regs.iter().map(|_| Registered::UnknownKey).collect());
    }

    // The jobs: created if new, then locked in one order (by ID), so batches of different instances
    // cannot deadlock, and a job's end or another registration of it waits for this transaction.
    let jobs = lock_jobs(tx, regs.iter().filter(|r| tenant_of(r).is_some())).await?;

    // Live subscriptions with the same tenant, job and callback: a registration of one is that one.
    // Looked up by job alone, through the (job_id, state) index: a join with the unnested keys was
    // planned as a scan of the table. Rows of other tenants or callbacks are keyed apart and never match.
    let job_ids: Vec<String> = regs.iter().filter(|r| tenant_of(r).is_some()).map(|r| r.job_id.to_string()).collect();
    let mut existing = live_subscriptions(tx, &job_ids).await?;

    // Decide each in the batch's order; a repeat within the batch is the earlier one's subscription.
    let mut answers: Vec<Answer> = Vec::with_capacity(regs.len());
    let mut new = NewRows::default();
    for r in regs {
        let Some(tenant_id) = tenant_of(r) else {
            answers.push(Answer::Done(Registered::UnknownKey));
            continue;
        };
        let job = r.job_id.to_string();
        let key = (tenant_id, job.clone(), r.callback_url.as_str().to_owned());
        if let Some(live) = existing.get(&key) {
            answers.push(live.answer(&r.form.headers)?);
            continue;
        }
        let row = jobs.get(&job).ok_or_else(|| corrupt("job not written", &job))?;
        let mut sub = new_subscription(r, row)?;
        let state = if row.result.is_some() { "delivering" } else { "polling" };
        existing.insert(key, Live { id: r.id.to_string(), state: state.into(), digest: r.form.headers.digest() });
        match &row.result {
            None => {
                new.push(r, tenant_id, "polling", None);
                new.notices.push(Notice::Poll(r.job_id.clone()).to_string());
                answers.push(Answer::Polling(sub, row.created_at));
            }
            Some(body) => {
                let webhook_id = new_webhook_id();
                sub.state = SubscriptionState::Delivering;
                sub.webhook_id = Some(webhook_id.clone());
                sub.next_attempt_at = Some(r.now);
                new.push(r, tenant_id, "delivering", Some(webhook_id.clone()));
                new.notices.push(Notice::Deliver(r.id, r.job_id.partition()).to_string());
                let task = DeliveryTask::first(
                    r.id,
                    r.job_id.clone(),
                    tenant_id,
                    webhook_id,
                    r.callback_url.as_str().to_owned(),
                    body.clone().into(),
                    r.now,
                )
                .with_form(r.form.clone());
                let task = DeliveryTask { finished_at: row.finished_at.unwrap_or(r.now), ..task };
                answers.push(Answer::Done(Registered::CreatedDelivering(sub, task)));
            }
        }
    }
    new.insert(tx, sent).await?;

    let oldest = oldest_polling(tx, &answers).await?;
    let shown = shown(tx, &answers).await?;
    answers.into_iter().map(|a| a.finish(&oldest, &shown)).collect()
}

/// A live (or delivered) subscription a registration of the same tenant, job and callback meets.
struct Live {
    id: String,
    state: String,
    /// Of its custom headers ([`CallbackHeaders::digest`]).
    digest: Option<String>,
}

impl Live {
    /// The same headers: this registration is that subscription. Other headers: refused.
    fn answer(&self, headers: &CallbackHeaders) -> Result<Answer> {
        if self.digest == headers.digest() {
            return Ok(Answer::Existing(self.id.clone()));
        }
        Ok(Answer::Done(Registered::HeadersDiffer {
            id: self.id.parse().map_err(|e| corrupt("subscription id", e))?,
            state: self.state.parse().map_err(|e| corrupt("state", e))?,
        }))
    }
}

/// A registration's answer, until the batch's reads are done.
enum Answer {
    Done(Registered),
    /// An earlier subscription (by ID), read at the end.
    Existing(String),
    /// A new polling subscription, and its job's creation time.
    Polling(Subscription, Timestamp),
}

/// The new subscriptions of a batch, as columns, inserted in one statement.
#[derive(Default)]
struct NewRows {
    ids: Vec<String>,
    tenants: Vec<i64>,
    jobs: Vec<String>,
    urls: Vec<String>,
    states: Vec<&'static str>,
    webhook_ids: Vec<Option<String>>,
    next_attempt_at: Vec<Option<Timestamp>>,
    created_at: Vec<Timestamp>,
    partitions: Vec<i64>,
    headers: Vec<Option<String>>,
    digests: Vec<Option<String>>,
    payloads: Vec<&'static str>,
    metadata: Vec<Option<String>>,
    notices: Vec<String>,
}

impl NewRows {
    fn push(&mut self, r: &Registration, tenant_id: i64, state: &'static str, webhook_id: Option<String>) {
        self.ids.push(r.id.to_string());
        self.tenants.push(tenant_id);
        self.jobs.push(r.job_id.to_string());
        self.urls.push(r.callback_url.as_str().to_owned());
        self.states.push(state);
        self.next_attempt_at.push(webhook_id.as_ref().map(|_| r.now));
        self.webhook_ids.push(webhook_id);
        self.created_at.push(r.now);
        self.partitions.push(r.job_id.partition());
        self.headers.push(r.form.headers.to_stored());
        self.digests.push(r.form.headers.digest());
        self.payloads.push(r.form.payload.as_str());
        self.metadata.push(r.form.metadata.clone());
    }

    /// Inserts the new subscriptions and, in the same statement (one round trip), tells the other
    /// instances about them (delivered when the transaction commits; this one remembers what it sent).
    async fn insert(&self, tx: &mut PgConnection, sent: &notice::Sent) -> Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sent.record(&self.notices);
        sqlx::query(
            "WITH inserted AS (INSERT INTO subscriptions (id, tenant_id, job_id, callback_url, state, webhook_id, \
             next_attempt_at, created_at, updated_at, partition, callback_headers, callback_headers_hash, payload, \
             metadata) SELECT i, t, j, c, s, w, n, a, a, p, h, d, f, m \
             FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], \
             $8::int8[], $9::int8[], $10::text[], $11::text[], $12::text[], $13::text[]) \
             AS u (i, t, j, c, s, w, n, a, p, h, d, f, m)) \
             SELECT pg_notify('jobhook', n) FROM UNNEST($14::text[]) AS n",
        )
        .bind(&self.ids)
        .bind(&self.tenants)
        .bind(&self.jobs)
        .bind(&self.urls)
        .bind(&self.states)
        .bind(&self.webhook_ids)
        .bind(&self.next_attempt_at)
        .bind(&self.created_at)
        .bind(&self.partitions)
        .bind(&self.headers)
        .bind(&self.digests)
        .bind(&self.payloads)
        .bind(&self.metadata)
        .bind(&self.notices)
        .execute(&mut *tx)
        .await
        .db()?;
        Ok(())
    }
}

/// The tenants of the batch's keys by key hash, holding the key rows until commit.
async fn tenants_of(tx: &mut PgConnection, regs: &[&Registration]) -> Result<HashMap<Vec<u8>, i64>> {
    let mut hashes: Vec<Vec<u8>> = regs.iter().map(|r| r.key.0.to_vec()).collect();
    hashes.sort();
    hashes.dedup();
    collect_rows(
        &mut *tx,
        sqlx::query_as(
            "SELECT key_hash, tenant_id FROM api_keys WHERE key_hash = ANY($1) AND revoked_at IS NULL \
             ORDER BY key_hash FOR SHARE",
        )
        .bind(&hashes),
    )
    .await
}

/// Creates the jobs that are new, then locks them all in one order (by ID).
async fn lock_jobs<'a>(
    tx: &mut PgConnection,
    regs: impl Iterator<Item = &'a &'a Registration>,
) -> Result<HashMap<String, JobRow>> {
    let mut jobs: Vec<(String, i64, Timestamp)> =
        regs.map(|r| (r.job_id.to_string(), r.job_id.partition(), r.now)).collect();
    jobs.sort();
    jobs.dedup_by(|a, b| a.0 == b.0);
    let (ids, (partitions, nows)): (Vec<String>, (Vec<i64>, Vec<Timestamp>)) =
        jobs.into_iter().map(|(j, p, n)| (j, (p, n))).unzip();
    sqlx::query(
        "INSERT INTO jobs (job_id, partition, created_at, updated_at) \
         SELECT j, p, n, n FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u (j, p, n) \
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&partitions)
    .bind(&nows)
    .execute(&mut *tx)
    .await
    .db()?;
    let job_rows: Vec<JobRow> = sqlx::query_as(
        "SELECT job_id, created_at, status, last_error, result, finished_at FROM jobs WHERE job_id = ANY($1) \
         ORDER BY job_id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await
    .db()?;
    Ok(job_rows.into_iter().map(|row| (row.job_id.clone(), row)).collect())
}

/// The live subscriptions of the jobs, by (tenant, job, callback).
async fn live_subscriptions(tx: &mut PgConnection, job_ids: &[String]) -> Result<HashMap<(i64, String, String), Live>> {
    Ok(sqlx::query_as(
        "SELECT tenant_id, job_id, callback_url, id, state, callback_headers_hash FROM subscriptions \
         WHERE job_id = ANY($1) AND state IN ('polling', 'delivering', 'delivered')",
    )
    .bind(job_ids)
    .fetch_all(&mut *tx)
    .await
    .db()?
    .into_iter()
    .map(|(t, j, c, id, state, digest): (i64, String, String, String, String, Option<String>)| {
        ((t, j, c), Live { id, state, digest })
    })
    .collect())
}

/// The oldest polling subscription of the jobs that had others before this batch.
async fn oldest_polling(tx: &mut PgConnection, answers: &[Answer]) -> Result<HashMap<String, Option<Timestamp>>> {
    let older: Vec<String> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Polling(sub, created) if *created != sub.created_at => Some(sub.job_id.to_string()),
            _ => None,
        })
        .collect();
    if older.is_empty() {
        return Ok(HashMap::new());
    }
    collect_rows(
        &mut *tx,
        sqlx::query_as(
            "SELECT job_id, MIN(created_at) FROM subscriptions WHERE job_id = ANY($1) AND state = 'polling' \
             GROUP BY job_id",
        )
        .bind(&older),
    )
    .await
}

/// The subscriptions registered before, as the API shows them.
async fn shown(tx: &mut PgConnection, answers: &[Answer]) -> Result<HashMap<String, Subscription>> {
    let repeated: Vec<String> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Existing(id) => Some(id.clone()),
            _ => None,
        })
        .collect();
    let mut shown: HashMap<String, Subscription> = HashMap::new();
    if !repeated.is_empty() {
        let rows: Vec<SubscriptionRow> = sqlx::query_as(concat!(
            "SELECT ",
            subscription_columns!(),
            " FROM subscriptions s JOIN jobs j ON j.job_id = s.job_id WHERE s.id = ANY($1)"
        ))
        .bind(&repeated)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        for row in rows {
            shown.insert(row.id.clone(), row.try_into()?);
        }
    }
    Ok(shown)
}

/// A new subscription as the registration writes it: polling, with its job's status and error so far.
fn new_subscription(r: &Registration, row: &JobRow) -> Result<Subscription> {
    let job_status = row.status.as_deref().map(str::parse).transpose().map_err(|e| corrupt("job status", e))?;
    Ok(Subscription {
        id: r.id,
        job_id: r.job_id.clone(),
        callback_url: r.callback_url.as_str().to_owned(),
        state: SubscriptionState::Polling,
        job_status,
        failure_reason: None,
        last_error: row.last_error.clone(),
        last_delivery_error: None,
        webhook_id: None,
        attempts: 0,
        next_attempt_at: None,
        created_at: r.now,
        updated_at: r.now,
        header_names: r.form.headers.names(),
        payload: r.form.payload,
        metadata: r.form.metadata.clone(),
    })
}

impl Answer {
    /// The registration's answer, once the batch's reads are done.
    fn finish(
        self,
        oldest: &HashMap<String, Option<Timestamp>>,
        shown: &HashMap<String, Subscription>,
    ) -> Result<Registered> {
        match self {
            Answer::Done(registered) => Ok(registered),
            Answer::Existing(id) => {
                shown.get(&id).cloned().map(Registered::Existing).ok_or_else(|| corrupt("subscription not found", id))
            }
            Answer::Polling(sub, job_created_at) => {
                // A job created by this registration has no older subscription to expire first.
                let oldest_polling_at = if job_created_at == sub.created_at {
                    sub.created_at
                } else {
                    oldest.get(&sub.job_id.to_string()).copied().flatten().unwrap_or(sub.created_at)
                };
                let pollable = PollableJob { job_id: sub.job_id.clone(), job_created_at, oldest_polling_at };
                Ok(Registered::CreatedPolling(sub, pollable))
            }
        }
    }
}
