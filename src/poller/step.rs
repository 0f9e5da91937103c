//! One poll of one job: ask the upstream, record what changed, say when to poll next.
//!
//! A Pending answer writes nothing (DESIGN promise 3); the store is written only at transitions: the
//! first status seen, an error appearing or changing, the job's end, expiry, a definitive refusal.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::backoff::{error_delay, pending_delay, random_jitter};
use crate::config::PollConfig;
use crate::delivery::DispatcherHandle;
use crate::domain::{FailureReason, JobId, JobStatus, Timestamp};
use crate::metrics::Metrics;
use crate::partition::Ownership;
use crate::store::{JobEnd, Observation, PollableJob, Store};
use crate::upstream::{PollAnswer, UpstreamClient};

/// What the poller remembers of a job between polls. Kept small (40 bytes): a million pending jobs
/// hold one each. The job's ID is the schedule's key, not repeated here.
#[derive(Debug, Clone)]
pub struct JobState {
    /// When the job was first registered: the start of its 404 grace and of its interval growth.
    job_created_at: Timestamp,
    /// The creation time of its oldest polling subscription: the next one to expire.
    oldest_polling_at: Timestamp,
    pub consecutive_errors: u32,
    /// What the store last heard from us about this job (`None`: not known since start-up).
    recorded: Option<Recorded>,
    /// The subscriptions may have changed (a cancellation): ask the store before polling.
    pub recheck: bool,
}

/// What the store last heard from us: the status, and the error as a hash (its text is written to the
/// store, not kept here: a million jobs in an upstream outage would otherwise hold a million copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recorded {
    status: Option<JobStatus>,
    error: Option<NonZeroU64>,
}

impl Recorded {
    fn new(status: Option<JobStatus>, error: Option<&str>) -> Self {
        let error = error.map(|text| {
            let mut hasher = std::hash::DefaultHasher::new();
            text.hash(&mut hasher);
            NonZeroU64::new(hasher.finish()).unwrap_or(NonZeroU64::MIN)
        });
        Recorded { status, error }
    }
}

impl JobState {
    pub fn new(job: &PollableJob) -> Self {
        JobState {
            job_created_at: job.job_created_at,
            oldest_polling_at: job.oldest_polling_at,
            consecutive_errors: 0,
            recorded: None,
            recheck: false,
        }
    }

    /// The job as the store now has it (its oldest waiting subscription may have changed).
    fn refresh(&mut self, job: &PollableJob) {
        self.job_created_at = job.job_created_at;
        self.oldest_polling_at = job.oldest_polling_at;
    }
}

/// What one step did, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    Pending,
    /// The job ended; this many deliveries were created.
    Finished(JobStatus, usize),
    /// The subscriptions of the job ended for this reason.
    Failed(FailureReason),
    /// Every polling subscription of the job expired.
    Expired,
    /// No subscription waits on the job any more.
    Abandoned,
    Error(String),
    /// The store could not record the outcome; the job is polled again later.
    StoreUnavailable,
}

/// What to do with the job after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    PollIn(Duration),
    Done,
}

/// Everything a poll step needs.
pub struct PollContext {
    pub store: Arc<dyn Store>,
    /// The job APIs by profile name, each with its own client, pacing and rate cap.
    upstreams: HashMap<String, Upstream>,
    /// The global settings: `max_wait`, `max_in_flight`, and the pacing of a job whose profile is gone.
    pub config: PollConfig,
    pub dispatcher: DispatcherHandle,
    /// The partitions this instance polls (all of them on SQLite).
    pub ownership: Arc<Ownership>,
    pub metrics: Arc<Metrics>,
}

/// One profile as the poller uses it.
struct Upstream {
    client: UpstreamClient,
    /// The cap on this upstream's polls per second over all its jobs (DESIGN promise 7): one bucket per
    /// profile, so a busy upstream cannot spend another's allowance.
    limiter: Option<DefaultDirectRateLimiter>,
}

impl PollContext {
    pub fn new(
        store: Arc<dyn Store>,
        upstreams: Vec<UpstreamClient>,
        config: PollConfig,
        dispatcher: DispatcherHandle,
        ownership: Arc<Ownership>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let upstreams = upstreams
            .into_iter()
            .map(|client| {
                // A burst of a tenth of a second's worth: smooth enough for the upstream, loose enough
                // that a poll is never late by more than one token's wait.
                let limiter = client.profile().poll.max_rps.map(|rps| {
                    let burst = NonZeroU32::new(rps.get() / 10).unwrap_or(NonZeroU32::MIN);
                    RateLimiter::direct(Quota::per_second(rps).allow_burst(burst))
                });
                (client.profile().name.clone(), Upstream { client, limiter })
            })
            .collect();
        PollContext { store, upstreams, config, dispatcher, ownership, metrics }
    }

    /// The pacing of `job`'s profile (the global one if that profile is no longer configured).
    fn pacing(&self, job: &JobId) -> &PollConfig {
        self.upstreams.get(job.upstream()).map_or(&self.config, |u| &u.client.profile().poll)
    }
}

/// One poll of one job: ask the upstream, record what changed, say when to poll next.
#[tracing::instrument(level = "debug", skip_all, fields(%job_id))]
pub async fn step(ctx: &PollContext, job_id: &JobId, state: &mut JobState) -> (PollOutcome, Next) {
    if state.recheck {
        match ctx.store.pollable_job(job_id.clone()).await {
            Ok(Some(job)) => {
                state.refresh(&job);
                state.recheck = false;
            }
            Ok(None) => return (PollOutcome::Abandoned, Next::Done),
            Err(e) => return store_trouble(ctx, job_id, state, e),
        }
    }
    let Some(upstream) = ctx.upstreams.get(job_id.upstream()) else {
        // Stored jobs of a profile taken out of the config wait (visibly) until it is back or they expire.
        let error = format!("no upstream profile named {:?} is configured", job_id.upstream());
        return transient(ctx, job_id, state, error, None, Timestamp::now()).await;
    };
    if let Some(limiter) = &upstream.limiter {
        limiter.until_ready().await;
        // The wait can be long; the partition may have gone to another instance meanwhile.
        if !ctx.ownership.owns(job_id.partition()) {
            return (PollOutcome::Abandoned, Next::Done);
        }
    }
    let asked = std::time::Instant::now();
    let answer = upstream.client.poll(job_id).await;
    let pacing = &upstream.client.profile().poll;
    ctx.metrics.poll(answer.outcome(), asked.elapsed());
    let now = Timestamp::now();
    let pending_for = now.duration_since(state.job_created_at);
    match answer {
        PollAnswer::Terminal(status, body) => finished(ctx, job_id, state, status, &body, now).await,
        PollAnswer::Pending => {
            state.consecutive_errors = 0;
            if let Err(e) = observe(ctx, job_id, state, Some(JobStatus::Pending), None, now).await {
                return store_trouble(ctx, job_id, state, e);
            }
            expire_or(
                ctx,
                job_id,
                state,
                now,
                PollOutcome::Pending,
                pending_delay(pending_for, pacing, random_jitter()),
            )
            .await
        }
        PollAnswer::Unauthorized(status) => {
            // As it came: a 403 (a key without the right) is a different fix from a 401 (a wrong key).
            let why = if job_id.upstream() == crate::domain::DEFAULT_UPSTREAM {
                format!("upstream answered {status}: check JOBHOOK_UPSTREAM_API_KEY")
            } else {
                format!("upstream answered {status}: check the auth value of upstream {:?}", job_id.upstream())
            };
            tracing::error!("{why}");
            fail(ctx, job_id, state, FailureReason::UpstreamUnauthorized, &why, now).await
        }
        PollAnswer::Rejected => {
            fail(
                ctx,
                job_id,
                state,
                FailureReason::UpstreamRejectedJob,
                "upstream answered 422: it does not accept this job ID",
                now,
            )
            .await
        }
        PollAnswer::NotFound if pending_for >= pacing.not_found_grace => {
            let why =
                format!("upstream answered 404 for longer than {}", humantime::format_duration(pacing.not_found_grace));
            fail(ctx, job_id, state, FailureReason::UpstreamJobNotFound, &why, now).await
        }
        PollAnswer::NotFound => {
            transient(ctx, job_id, state, "upstream answered 404 (a new job may not be visible yet)".into(), None, now)
                .await
        }
        PollAnswer::Transient { error, retry_after, .. } => {
            transient(ctx, job_id, state, error, retry_after, now).await
        }
    }
}

/// The job ended: its result and one delivery per subscriber, in one transaction (DESIGN promise 2),
/// handed to the dispatcher.
async fn finished(
    ctx: &PollContext,
    job_id: &JobId,
    state: &mut JobState,
    status: JobStatus,
    body: &bytes::Bytes,
    now: Timestamp,
) -> (PollOutcome, Next) {
    let end = JobEnd { job_id: job_id.clone(), status, body: body.clone(), now };
    match ctx.store.complete_job(end, ctx.dispatcher.claim_for()).await {
        Ok(tasks) => {
            let n = tasks.len();
            tracing::debug!(status = status.as_str(), deliveries = n, "job finished");
            ctx.dispatcher.deliver(tasks);
            (PollOutcome::Finished(status, n), Next::Done)
        }
        Err(e) => {
            let trouble = store_trouble(ctx, job_id, state, e);
            // The write may have committed with its answer lost (a connection dropped at COMMIT).
            // Asking the store who still waits would then find nobody and stop, leaving the
            // deliveries for the next restart or reload; polling and recording again is idempotent
            // and hands them out.
            state.recheck = false;
            trouble
        }
    }
}

async fn transient(
    ctx: &PollContext,
    job_id: &JobId,
    state: &mut JobState,
    error: String,
    retry_after: Option<Duration>,
    now: Timestamp,
) -> (PollOutcome, Next) {
    state.consecutive_errors = state.consecutive_errors.saturating_add(1);
    tracing::debug!(%error, errors = state.consecutive_errors, "poll failed");
    if let Err(e) = observe(ctx, job_id, state, None, Some(error.clone()), now).await {
        return store_trouble(ctx, job_id, state, e);
    }
    let delay = error_delay(state.consecutive_errors, retry_after, ctx.pacing(job_id), random_jitter());
    expire_or(ctx, job_id, state, now, PollOutcome::Error(error), delay).await
}

/// Writes what the upstream said, only when it differs from what the store already knows.
async fn observe(
    ctx: &PollContext,
    job_id: &JobId,
    state: &mut JobState,
    status: Option<JobStatus>,
    error: Option<String>,
    now: Timestamp,
) -> crate::store::Result<()> {
    let status = status.or_else(|| state.recorded.and_then(|r| r.status));
    let seen = Recorded::new(status, error.as_deref());
    if state.recorded == Some(seen) {
        return Ok(());
    }
    let observation = Observation { job_id: job_id.clone(), status, last_error: error, now };
    ctx.store.record_observation(observation).await?;
    state.recorded = Some(seen);
    Ok(())
}

async fn expire_or(
    ctx: &PollContext,
    job_id: &JobId,
    state: &mut JobState,
    now: Timestamp,
    outcome: PollOutcome,
    delay: Duration,
) -> (PollOutcome, Next) {
    let max_wait = ctx.config.max_wait;
    if now < state.oldest_polling_at + max_wait {
        return (outcome, Next::PollIn(delay));
    }
    match ctx.store.expire(job_id.clone(), now - max_wait, now).await {
        Ok((expired, Some(job))) => {
            ctx.metrics.finished("expired", expired);
            tracing::info!("some subscriptions expired; others still wait");
            state.refresh(&job);
            (outcome, Next::PollIn(delay))
        }
        Ok((expired, None)) => {
            ctx.metrics.finished("expired", expired);
            tracing::info!("job still pending after max-wait: subscriptions expired");
            (PollOutcome::Expired, Next::Done)
        }
        Err(e) => store_trouble(ctx, job_id, state, e),
    }
}

async fn fail(
    ctx: &PollContext,
    job_id: &JobId,
    state: &mut JobState,
    reason: FailureReason,
    why: &str,
    now: Timestamp,
) -> (PollOutcome, Next) {
    match ctx.store.fail_job(job_id.clone(), reason, why, now).await {
        Ok(n) => {
            ctx.metrics.finished("failed", n);
            tracing::warn!(reason = reason.as_str(), subscriptions = n, "{why}");
            (PollOutcome::Failed(reason), Next::Done)
        }
        Err(e) => store_trouble(ctx, job_id, state, e),
    }
}

/// The store refused a write: nothing was recorded, so the job is polled again after a back-off and the
/// same outcome is recorded then.
fn store_trouble(
    ctx: &PollContext,
    job_id: &JobId,
    state: &mut JobState,
    e: crate::store::StoreError,
) -> (PollOutcome, Next) {
    tracing::error!(error = %crate::Chain(&e), "could not record a poll outcome; will poll again");
    state.consecutive_errors = state.consecutive_errors.saturating_add(1);
    state.recorded = None;
    state.recheck = true;
    (
        PollOutcome::StoreUnavailable,
        Next::PollIn(error_delay(state.consecutive_errors, None, ctx.pacing(job_id), random_jitter())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A million pending jobs hold one state each, in the schedule's slab: its size is the memory budget.
    #[test]
    fn a_jobs_state_stays_within_40_bytes() {
        assert!(std::mem::size_of::<JobState>() <= 40, "{} bytes", std::mem::size_of::<JobState>());
    }

    #[test]
    fn a_changed_error_is_a_change_to_record() {
        let pending = Some(JobStatus::Pending);
        assert_eq!(Recorded::new(pending, Some("timeout")), Recorded::new(pending, Some("timeout")));
        assert_ne!(Recorded::new(pending, Some("timeout")), Recorded::new(pending, Some("HTTP 502")));
        assert_ne!(Recorded::new(pending, Some("timeout")), Recorded::new(pending, None));
    }
}
