//! Group commit on PostgreSQL. Each lane is a task that takes every write waiting and runs them in one
//! transaction; registrations go to a lane of their own, and every other write about one job to the
//! same lane (by partition; see [`lock_jobs_first`]). A batch runs kind by kind, each kind in a
//! fixed number of multi-row statements (arrays bound once, `UNNEST` on the server), so a batch of N
//! registrations costs what one costs, plus the rows.

use std::collections::HashSet;

use super::complete::{Completion, complete_all};
use super::register::register_all;
use super::*;
use crate::store::group::{Done, MAX_BATCH, claim_refused};

/// Takes every write waiting, runs them in one transaction, commits once, and only then answers each (a
/// 201 is still durable). Batches form by themselves: while one transaction commits, the next writes
/// queue up.
///
/// Each lane keeps one connection of its own, outside the pool, for as long as it works: no pool
/// acquire per batch, and none of the pool's ping on release (a round trip per transaction). A
/// connection that failed, or did not answer in time, is dropped and a new one opened for the next batch.
pub(super) async fn run(
    url: String,
    mut writes: mpsc::Receiver<Write>,
    stats: Arc<WriterStats>,
    sent: Arc<notice::Sent>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut conn: Option<PgConnection> = None;
    loop {
        if writes.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        stats.transactions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        // A deadline of our own: a connection whose server stopped answering without closing it (a
        // half-open TCP connection, a frozen backend) would otherwise pin this lane until a restart.
        // sqlx has no client-side TCP keepalive, and the server's statement_timeout cannot fire on a
        // server that is not running. Dropping the connection rolls the batch back: nothing was committed.
        let outcome = match tokio::time::timeout(BATCH_DEADLINE, run_on(&url, &mut conn, &batch, &sent)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                conn = None;
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

/// Runs `batch` on the lane's connection, opening one if it has none; a connection that failed with
/// "unavailable" is dropped (the next batch opens a new one).
async fn run_on(url: &str, conn: &mut Option<PgConnection>, batch: &[Write], sent: &notice::Sent) -> Vec<Done> {
    let c = match conn {
        Some(c) => c,
        None => match connect(url).await {
            Ok(c) => conn.insert(c),
            // Not connecting is "unavailable" for every write, whatever the reason.
            Err(e) => return fail_all(batch, &e),
        },
    };
    let (results, broken) = run_batch(c, batch, sent).await;
    if broken {
        *conn = None;
    }
    results
}

/// Runs `batch` in one transaction. Writes rarely fail, so the batch is tried whole; if it fails, the
/// transaction is rolled back and each write runs again in a transaction of its own, so one bad write
/// (or one job whose rows another holds locked) cannot fail the others. Every write gets a result; when
/// the connection is lost, "unavailable" for all (nothing was written), and says so (the connection is
/// then dropped).
async fn run_batch(conn: &mut PgConnection, batch: &[Write], sent: &notice::Sent) -> (Vec<Done>, bool) {
    if batch.len() > 1 {
        match try_batch(conn, batch, sent).await {
            Ok(results) => return (results, false),
            Err(e) if connection_lost(&e) => return (fail_all(batch, &e), true),
            Err(_) => {} // one write's own failure: each alone, below
        }
    }
    let mut results = Vec::with_capacity(batch.len());
    for write in batch {
        results.push(match try_batch(conn, std::slice::from_ref(write), sent).await {
            Ok(mut one) => one.pop().unwrap_or_else(|| write.failed(StoreError::Corrupt("no result".into()))),
            Err(e) if connection_lost(&e) => {
                results.extend(fail_all(&batch[results.len()..], &e));
                return (results, true);
            }
            Err(e) => write.failed(e),
        });
    }
    (results, false)
}

/// Every write of `batch` failed as unavailable, for the cause of `e`.
fn fail_all(batch: &[Write], e: &StoreError) -> Vec<Done> {
    let cause: Cause = match e {
        StoreError::Unavailable(cause) | StoreError::Other(cause) => cause.clone(),
        e => Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(e.to_string())),
    };
    batch.iter().map(|w| w.failed(StoreError::Unavailable(cause.clone()))).collect()
}

/// All of `batch` in one transaction, committed; or the first error, with nothing written. Kinds run in a
/// fixed order (registrations, observations, completions, claims, attempts); no two writes of a batch
/// depend on each other's order but a registration and its job's end, which come out the same either
/// way (the subscription is delivered).
async fn try_batch(conn: &mut PgConnection, batch: &[Write], sent: &notice::Sent) -> Result<Vec<Done>> {
    let mut tx = sqlx::Connection::begin(conn).await.db()?;
    let mut results: Vec<Option<Done>> = batch.iter().map(|_| None).collect();
    lock_jobs_first(&mut tx, batch).await?;

    let (at, regs): (Vec<usize>, Vec<&Registration>) = batch
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match w {
            Write::Register { registration, .. } => Some((i, registration.as_ref())),
            _ => None,
        })
        .unzip();
    if !regs.is_empty() {
        for (i, registered) in at.into_iter().zip(register_all(&mut tx, &regs, sent).await?) {
            results[i] = Some(Done::Register(Ok(registered)));
        }
    }

    let observed: Vec<usize> =
        batch.iter().enumerate().filter(|(_, w)| matches!(w, Write::Observe { .. })).map(|(i, _)| i).collect();
    if !observed.is_empty() {
        observe_all(&mut tx, batch, &observed).await?;
        for i in observed {
            results[i] = Some(Done::Observe(Ok(())));
        }
    }

    let (at, done): (Vec<usize>, Vec<Completion<'_>>) = batch
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match w {
            Write::Complete { end, claim, .. } => Some((
                i,
                Completion { job_id: end.job_id.clone(), status: end.status, body: &end.body, now: end.now, claim },
            )),
            _ => None,
        })
        .unzip();
    if !done.is_empty() {
        for (i, tasks) in at.into_iter().zip(complete_all(&mut tx, &done).await?) {
            results[i] = Some(Done::Complete(Ok(tasks)));
        }
    }

    let claims: Vec<usize> =
        batch.iter().enumerate().filter(|(_, w)| matches!(w, Write::Claim { .. })).map(|(i, _)| i).collect();
    if !claims.is_empty() {
        for (i, claim) in claims.iter().zip(claim_all(&mut tx, batch, &claims).await?) {
            results[*i] = Some(Done::Claim(Ok(claim)));
        }
    }

    let attempts: Vec<usize> =
        batch.iter().enumerate().filter(|(_, w)| matches!(w, Write::Attempt { .. })).map(|(i, _)| i).collect();
    if !attempts.is_empty() {
        for (i, moved) in attempts.iter().zip(record_attempts(&mut tx, batch, &attempts).await?) {
            results[*i] = Some(Done::Attempt(Ok(moved)));
        }
    }

    tx.commit().await.db()?;
    results
        .into_iter()
        .zip(batch)
        .map(|(done, write)| done.ok_or_else(|| corrupt("a write got no result", write.partition())))
        .collect()
}

/// Registrations and the other writes of the same partition run in different lanes, so in transactions
/// that may overlap; both lock the jobs they touch, and each takes all of its job locks in one statement
/// in one order (by ID) before any other lock, so they wait for each other but cannot deadlock. A
/// registration's batch locks its jobs in `register.rs`; here a batch of job ends and observations
/// does, before anything else. (Deliveries lock only their subscriptions, which registrations never
/// lock: a registration inserts new rows and reads the live ones.)
async fn lock_jobs_first(tx: &mut PgConnection, batch: &[Write]) -> Result<()> {
    let mut ids: Vec<String> = batch
        .iter()
        .filter_map(|w| match w {
            Write::Observe { observation, .. } => Some(observation.job_id.to_string()),
            Write::Complete { end, .. } => Some(end.job_id.to_string()),
            _ => None,
        })
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    ids.sort();
    ids.dedup();
    sqlx::query("SELECT 1 FROM jobs WHERE job_id = ANY($1) ORDER BY job_id FOR UPDATE")
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .db()?;
    Ok(())
}

/// What the upstream last said, for each job (the latest of a job's observations in the batch wins, as
/// it would one after the other).
async fn observe_all(tx: &mut PgConnection, batch: &[Write], at: &[usize]) -> Result<()> {
    let mut seen = HashSet::new();
    let (mut jobs, mut statuses, mut errors, mut nows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in at.iter().rev() {
        if let Write::Observe { observation: o, .. } = &batch[*i]
            && seen.insert(o.job_id.clone())
        {
            jobs.push(o.job_id.to_string());
            statuses.push(o.status.map(|s| s.as_str()));
            errors.push(o.last_error.as_deref());
            nows.push(o.now);
        }
    }
    sqlx::query(
        "UPDATE jobs SET status = COALESCE(u.s, jobs.status), last_error = u.e, updated_at = u.n \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int8[]) AS u (j, s, e, n) \
         WHERE jobs.job_id = u.j AND jobs.result IS NULL",
    )
    .bind(&jobs)
    .bind(&statuses)
    .bind(&errors)
    .bind(&nows)
    .execute(&mut *tx)
    .await
    .db()?;
    Ok(())
}

/// See [`Store::claim_delivery`]. Claims are kept on the database's clock.
async fn claim_all(tx: &mut PgConnection, batch: &[Write], at: &[usize]) -> Result<Vec<Claim>> {
    let (mut ids, mut series, mut ms, mut by) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in at {
        if let Write::Claim { id, series: s, claim, .. } = &batch[*i] {
            ids.push(id.to_string());
            series.push(i64::from(*s));
            ms.push(claim.ms);
            by.push(claim.by.to_string());
        }
    }
    let taken: HashSet<String> = collect_column(
        &mut *tx,
        sqlx::query_scalar(concat!(
            "UPDATE subscriptions SET claimed_until = ",
            pg_now_ms!(),
            " + u.m, claimed_by = u.b FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[]) AS u (i, s, m, b) \
             WHERE subscriptions.id = u.i AND subscriptions.state = 'delivering' AND subscriptions.series = u.s \
             AND (subscriptions.claimed_until IS NULL OR subscriptions.claimed_until <= ",
            pg_now_ms!(),
            " OR subscriptions.claimed_by = u.b) RETURNING subscriptions.id"
        ))
        .bind(&ids)
        .bind(&series)
        .bind(&ms)
        .bind(&by),
    )
    .await?;
    let mut claims = Vec::with_capacity(at.len());
    for i in at {
        let Write::Claim { id, series, now, claim, .. } = &batch[*i] else { continue };
        let id = id.to_string();
        if taken.contains(&id) {
            claims.push(Claim::Held(claim.held_until));
            continue;
        }
        let row: Option<(String, i64, Option<Timestamp>)> =
            sqlx::query_as("SELECT state, series, claimed_until FROM subscriptions WHERE id = $1")
                .bind(&id)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        claims.push(claim_refused(row, *series, *now));
    }
    Ok(claims)
}

/// Logs the attempts, moves their deliveries on and releases their claims; for each, whether its
/// subscription was still delivering.
async fn record_attempts(tx: &mut PgConnection, batch: &[Write], at: &[usize]) -> Result<Vec<bool>> {
    let mut log = AttemptColumns::default();
    for i in at {
        if let Write::Attempt { record, result, now, .. } = &batch[*i] {
            log.push(record, *result, *now);
        }
    }
    // The log and the state change in one statement (one round trip): the attempts are inserted by the
    // data-modifying WITH whatever the UPDATE finds.
    let moved: HashSet<(String, i64)> = collect_rows(
        &mut *tx,
        sqlx::query_as(
            "WITH logged AS (INSERT INTO delivery_attempts (subscription_id, series, attempt, webhook_id, started_at, \
             status_code, error, duration_ms, response_content_type, response_body) SELECT * FROM UNNEST($1::text[], \
             $2::int8[], $3::int8[], $4::text[], $5::int8[], $6::int8[], $7::text[], $8::int8[], $9::text[], $10::text[])) \
             UPDATE subscriptions SET state = u.st, attempts = u.a, next_attempt_at = u.na, failure_reason = u.r, \
             updated_at = u.n, claimed_until = NULL, claimed_by = NULL \
             FROM UNNEST($1::text[], $2::int8[], $11::text[], $3::int8[], $12::int8[], $13::text[], $14::int8[]) \
             AS u (i, s, st, a, na, r, n) \
             WHERE subscriptions.id = u.i AND subscriptions.state = 'delivering' AND subscriptions.series = u.s \
             RETURNING subscriptions.id, subscriptions.series",
        )
        .bind(&log.ids)
        .bind(&log.series)
        .bind(&log.attempts)
        .bind(&log.webhook_ids)
        .bind(&log.started_at)
        .bind(&log.status_codes)
        .bind(&log.errors)
        .bind(&log.durations)
        .bind(&log.content_types)
        .bind(&log.bodies)
        .bind(&log.states)
        .bind(&log.next_at)
        .bind(&log.reasons)
        .bind(&log.nows),
    )
    .await?;
    Ok(log.ids.into_iter().zip(log.series).map(|key| moved.contains(&key)).collect())
}

/// Attempts as columns.
#[derive(Default)]
struct AttemptColumns<'a> {
    ids: Vec<String>,
    series: Vec<i64>,
    attempts: Vec<i64>,
    webhook_ids: Vec<&'a str>,
    started_at: Vec<Timestamp>,
    status_codes: Vec<Option<i64>>,
    errors: Vec<Option<&'a str>>,
    durations: Vec<i64>,
    content_types: Vec<Option<&'a str>>,
    bodies: Vec<Option<&'a str>>,
    states: Vec<&'static str>,
    next_at: Vec<Option<Timestamp>>,
    reasons: Vec<Option<&'static str>>,
    nows: Vec<Timestamp>,
}

impl<'a> AttemptColumns<'a> {
    fn push(&mut self, record: &'a AttemptRecord, result: AttemptResult, now: Timestamp) {
        let (state, next_at, reason) = match result {
            AttemptResult::Delivered => ("delivered", None, None),
            AttemptResult::RetryAt(at) => ("delivering", Some(at), None),
            AttemptResult::Failed(reason) => ("failed", None, Some(reason.as_str())),
        };
        self.ids.push(record.subscription_id.to_string());
        self.series.push(i64::from(record.series));
        self.attempts.push(i64::from(record.attempt));
        self.webhook_ids.push(&record.webhook_id);
        self.started_at.push(record.started_at);
        self.status_codes.push(record.status_code.map(i64::from));
        self.errors.push(record.error.as_deref());
        self.durations.push(i64::try_from(record.duration_ms).unwrap_or(i64::MAX));
        self.content_types.push(record.response_content_type.as_deref());
        self.bodies.push(record.response_body.as_deref());
        self.states.push(state);
        self.next_at.push(next_at);
        self.reasons.push(reason);
        self.nows.push(now);
    }
}
