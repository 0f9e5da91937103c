//! The poll schedule, and one poll step.
//!
//! One entry per upstream job (DESIGN promise 4), however many subscribers it has, kept in memory in a
//! timer wheel ([`DelayQueue`]) keyed by due time — not a task per job. A job is either queued or in
//! flight, never both, so two polls of one job can never overlap. A Pending answer reschedules in memory
//! and writes nothing (promise 3); the store is written only at transitions: the first status seen, an
//! error appearing or changing, the job's end, expiry, a definitive upstream refusal.
//!
//! [`step`] is one poll of one job and returns what to do next; [`run`] is the loop around it.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;

use crate::config::PollConfig;
use crate::delivery::DispatcherHandle;
use crate::domain::{FailureReason, JobId, JobStatus};
use crate::metrics::Metrics;
use crate::partition::Ownership;
use crate::recent::Recently;
use crate::store::{Millis, PollableJob, Store, now_ms};
use crate::upstream::{PollAnswer, UpstreamClient};

/// A job pending longer than this is polled less and less often, up to `poll-max-interval`.
pub const SLOWDOWN_AFTER: Duration = Duration::from_secs(60);

/// The longest upstream `Retry-After` we honour; beyond it we would rather ask again.
pub const MAX_UPSTREAM_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How far poll times move at random, so jobs registered together spread out: later only, by up to 10%.
/// Never earlier: the upstream asks for 1–2 s between polls, and ±10% would space them 0.9 s apart.
pub const POLL_JITTER: f64 = 0.1;

/// The spacing before the next poll of a job that answered Pending and has been pending `pending_for`:
/// `poll-interval` for the first minute, then doubling every minute up to `poll-max-interval`.
/// `jitter` is in [0, 1] (a value outside is clamped to it).
pub fn pending_delay(pending_for: Duration, cfg: &PollConfig, jitter: f64) -> Duration {
    let base = if pending_for <= SLOWDOWN_AFTER {
        cfg.interval
    } else {
        let minutes_past = (pending_for - SLOWDOWN_AFTER).as_secs() / 60 + 1;
        let factor = 1u32 << minutes_past.min(16);
        cfg.interval.saturating_mul(factor).min(cfg.max_interval)
    };
    jittered(base, jitter).min(cfg.max_interval)
}

/// The spacing after `consecutive_errors` failed polls (at least 1): exponential from `poll-interval`
/// up to six times `poll-max-interval` (60 s by default), and never sooner than the upstream asked.
/// `jitter` is in [0, 1], as for [`pending_delay`].
pub fn error_delay(consecutive_errors: u32, retry_after: Option<Duration>, cfg: &PollConfig, jitter: f64) -> Duration {
    let cap = cfg.max_interval.saturating_mul(6);
    let exp = consecutive_errors.saturating_sub(1).min(20);
    let backoff = jittered(cfg.interval.saturating_mul(1 << exp).min(cap), jitter);
    match retry_after {
        Some(asked) => backoff.max(asked.min(MAX_UPSTREAM_RETRY_AFTER)),
        None => backoff,
    }
}

fn jittered(d: Duration, jitter: f64) -> Duration {
    d.mul_f64(1.0 + POLL_JITTER * jitter.clamp(0.0, 1.0))
}

fn random_jitter() -> f64 {
    rand::random_range(0.0..=1.0)
}

fn ms(d: Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

/// What the poller remembers of a job between polls.
#[derive(Debug, Clone)]
pub struct JobState {
    pub job: PollableJob,
    pub consecutive_errors: u32,
    /// What the store last heard from us about this job (`None`: not known since start-up).
    recorded: Option<(Option<JobStatus>, Option<String>)>,
    /// The subscriptions may have changed (a cancellation): ask the store before polling.
    pub recheck: bool,
}

impl JobState {
    pub fn new(job: PollableJob) -> Self {
        JobState { job, consecutive_errors: 0, recorded: None, recheck: false }
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
    pub upstream: UpstreamClient,
    pub config: PollConfig,
    pub dispatcher: DispatcherHandle,
    /// The partitions this instance polls (all of them on SQLite).
    pub ownership: Arc<Ownership>,
    /// The cap on polls per second over all jobs (DESIGN promise 7).
    limiter: Option<DefaultDirectRateLimiter>,
    pub metrics: Arc<Metrics>,
}

impl PollContext {
    pub fn new(
        store: Arc<dyn Store>,
        upstream: UpstreamClient,
        config: PollConfig,
        dispatcher: DispatcherHandle,
        ownership: Arc<Ownership>,
        metrics: Arc<Metrics>,
    ) -> Self {
        // A burst of a tenth of a second's worth: smooth enough for the upstream, loose enough that a
        // poll is never late by more than one token's wait.
        let limiter = config.max_rps.map(|rps| {
            let burst = NonZeroU32::new(rps.get() / 10).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_second(rps).allow_burst(burst))
        });
        PollContext { store, upstream, config, dispatcher, ownership, limiter, metrics }
    }
}

/// One poll of one job: ask the upstream, record what changed, say when to poll next.
#[tracing::instrument(level = "debug", skip_all, fields(job_id = %state.job.job_id))]
pub async fn step(ctx: &PollContext, state: &mut JobState) -> (PollOutcome, Next) {
    let job_id = state.job.job_id;
    if state.recheck {
        match ctx.store.pollable_job(job_id).await {
            Ok(Some(job)) => {
                state.job = job;
                state.recheck = false;
            }
            Ok(None) => return (PollOutcome::Abandoned, Next::Done),
            Err(e) => return store_trouble(ctx, state, e),
        }
    }
    if let Some(limiter) = &ctx.limiter {
        limiter.until_ready().await;
        // The wait can be long; the partition may have gone to another instance meanwhile.
        if !ctx.ownership.owns(job_id.partition()) {
            return (PollOutcome::Abandoned, Next::Done);
        }
    }
    let asked = std::time::Instant::now();
    let answer = ctx.upstream.poll(job_id).await;
    ctx.metrics.poll(answer.outcome(), asked.elapsed());
    let now = now_ms();
    let pending_for = Duration::from_millis(u64::try_from(now - state.job.job_created_at).unwrap_or(0));
    match answer {
        PollAnswer::Terminal(status, body) => {
            match ctx.store.complete_job(job_id, status, &body, now, ctx.dispatcher.claim_for()).await {
                Ok(tasks) => {
                    let n = tasks.len();
                    tracing::debug!(status = status.as_str(), deliveries = n, "job finished");
                    ctx.dispatcher.deliver(tasks);
                    (PollOutcome::Finished(status, n), Next::Done)
                }
                Err(e) => {
                    let trouble = store_trouble(ctx, state, e);
                    // The write may have committed with its answer lost (a connection dropped at COMMIT).
                    // Asking the store who still waits would then find nobody and stop, leaving the
                    // deliveries for the next restart or reload; polling and recording again is idempotent
                    // and hands them out.
                    state.recheck = false;
                    trouble
                }
            }
        }
        PollAnswer::Pending => {
            state.consecutive_errors = 0;
            if let Err(e) = observe(ctx, state, Some(JobStatus::Pending), None, now).await {
                return store_trouble(ctx, state, e);
            }
            expire_or(ctx, state, now, PollOutcome::Pending, pending_delay(pending_for, &ctx.config, random_jitter()))
                .await
        }
        PollAnswer::Unauthorized(status) => {
            // As it came: a 403 (a key without the right) is a different fix from a 401 (a wrong key).
            let why = format!("upstream answered {status}: check JOBHOOK_UPSTREAM_API_KEY");
            tracing::error!("{why}");
            fail(ctx, state, FailureReason::UpstreamUnauthorized, &why, now).await
        }
        PollAnswer::Rejected => {
            fail(
                ctx,
                state,
                FailureReason::UpstreamRejectedJob,
                "upstream answered 422: it does not accept this job ID",
                now,
            )
            .await
        }
        PollAnswer::NotFound if pending_for >= ctx.config.not_found_grace => {
            let why = format!(
                "upstream answered 404 for longer than {}",
                humantime::format_duration(ctx.config.not_found_grace)
            );
            fail(ctx, state, FailureReason::UpstreamJobNotFound, &why, now).await
        }
        PollAnswer::NotFound => {
            transient(ctx, state, "upstream answered 404 (a new job may not be visible yet)".into(), None, now).await
        }
        PollAnswer::Transient { error, retry_after, .. } => transient(ctx, state, error, retry_after, now).await,
    }
}

async fn transient(
    ctx: &PollContext,
    state: &mut JobState,
    error: String,
    retry_after: Option<Duration>,
    now: Millis,
) -> (PollOutcome, Next) {
    state.consecutive_errors = state.consecutive_errors.saturating_add(1);
    tracing::debug!(%error, errors = state.consecutive_errors, "poll failed");
    if let Err(e) = observe(ctx, state, None, Some(error.clone()), now).await {
        return store_trouble(ctx, state, e);
    }
    let delay = error_delay(state.consecutive_errors, retry_after, &ctx.config, random_jitter());
    expire_or(ctx, state, now, PollOutcome::Error(error), delay).await
}

/// Writes what the upstream said, only when it differs from what the store already knows.
async fn observe(
    ctx: &PollContext,
    state: &mut JobState,
    status: Option<JobStatus>,
    error: Option<String>,
    now: Millis,
) -> crate::store::Result<()> {
    let status = status.or_else(|| state.recorded.as_ref().and_then(|(s, _)| *s));
    let seen = (status, error);
    if state.recorded.as_ref() == Some(&seen) {
        return Ok(());
    }
    ctx.store.record_observation(state.job.job_id, seen.0, seen.1.as_deref(), now).await?;
    state.recorded = Some(seen);
    Ok(())
}

async fn expire_or(
    ctx: &PollContext,
    state: &mut JobState,
    now: Millis,
    outcome: PollOutcome,
    delay: Duration,
) -> (PollOutcome, Next) {
    let max_wait = ms(ctx.config.max_wait);
    if now < state.job.oldest_polling_at.saturating_add(max_wait) {
        return (outcome, Next::PollIn(delay));
    }
    match ctx.store.expire(state.job.job_id, now - max_wait, now).await {
        Ok((expired, Some(job))) => {
            ctx.metrics.finished("expired", expired);
            tracing::info!("some subscriptions expired; others still wait");
            state.job = job;
            (outcome, Next::PollIn(delay))
        }
        Ok((expired, None)) => {
            ctx.metrics.finished("expired", expired);
            tracing::info!("job still pending after max-wait: subscriptions expired");
            (PollOutcome::Expired, Next::Done)
        }
        Err(e) => store_trouble(ctx, state, e),
    }
}

async fn fail(
    ctx: &PollContext,
    state: &mut JobState,
    reason: FailureReason,
    why: &str,
    now: Millis,
) -> (PollOutcome, Next) {
    match ctx.store.fail_job(state.job.job_id, reason, why, now).await {
        Ok(n) => {
            ctx.metrics.finished("failed", n);
            tracing::warn!(reason = reason.as_str(), subscriptions = n, "{why}");
            (PollOutcome::Failed(reason), Next::Done)
        }
        Err(e) => store_trouble(ctx, state, e),
    }
}

/// The store refused a write: nothing was recorded, so the job is polled again after a back-off and the
/// same outcome is recorded then.
fn store_trouble(ctx: &PollContext, state: &mut JobState, e: crate::store::StoreError) -> (PollOutcome, Next) {
    tracing::error!(error = %e, "could not record a poll outcome; will poll again");
    state.consecutive_errors = state.consecutive_errors.saturating_add(1);
    state.recorded = None;
    state.recheck = true;
    (
        PollOutcome::StoreUnavailable,
        Next::PollIn(error_delay(state.consecutive_errors, None, &ctx.config, random_jitter())),
    )
}

enum PollerMsg {
    /// A job has a (new) polling subscription.
    Ensure(PollableJob),
    /// A job taken over from another instance (or resumed at start): polled within the first interval,
    /// at a random moment, so a partition's jobs do not all go at once.
    Adopt(PollableJob),
    /// A subscription of this job was cancelled: check before the next poll whether anyone still waits.
    Recheck(JobId),
}

/// How the API tells the poller about new and cancelled subscriptions.
#[derive(Clone)]
pub struct PollerHandle {
    tx: mpsc::UnboundedSender<PollerMsg>,
}

impl PollerHandle {
    pub fn ensure(&self, job: PollableJob) {
        // A send fails only once the poller has stopped (shutdown); the job resumes from the store at the
        // next start.
        let _ = self.tx.send(PollerMsg::Ensure(job));
    }

    pub fn adopt(&self, job: PollableJob) {
        let _ = self.tx.send(PollerMsg::Adopt(job));
    }

    pub fn recheck(&self, job_id: JobId) {
        let _ = self.tx.send(PollerMsg::Recheck(job_id));
    }
}

/// The receiving end, handed to [`run`].
pub struct PollerInbox(mpsc::UnboundedReceiver<PollerMsg>);

pub fn channel() -> (PollerHandle, PollerInbox) {
    // Unbounded: a message is sent only after a committed registration or cancellation, so the channel
    // holds at most one entry per request the API has already accepted.
    let (tx, rx) = mpsc::unbounded_channel();
    (PollerHandle { tx }, PollerInbox(rx))
}

enum Slot {
    Queued { state: JobState },
    InFlight { recheck: bool },
}

// Jobs whose polling ended in the last few seconds ([`Recently`]).
//
// A message can be older than the job's end: on PostgreSQL a registration's own notice, or a partition
// load, reads the job as pollable while its final poll is under way, and the poller takes the message
// after the job has left the schedule. Scheduling it as it stands would poll a finished job once more.
// A message about a job that ended moments ago is therefore scheduled with a recheck: its first step
// asks the store whether any subscription still waits, and polls only if one does. That read comes
// after the message, so a subscription that really waits is never dropped.

/// A job to schedule from a message: checked against the store first if it ended moments ago.
fn scheduled(job: PollableJob, ended: &mut Recently<JobId>) -> Slot {
    let mut state = JobState::new(job);
    state.recheck = ended.take(&job.job_id);
    Slot::Queued { state }
}

/// The poll loop: schedules `initial` (spread over the first interval), then polls whatever is due,
/// at most `max_in_flight` at once, until `shutdown`; then waits for in-flight polls up to `grace`.
pub async fn run(
    ctx: Arc<PollContext>,
    inbox: PollerInbox,
    initial: Vec<PollableJob>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut rx = inbox.0;
    let mut queue: DelayQueue<JobId> = DelayQueue::new();
    let mut slots: HashMap<JobId, Slot> = HashMap::new();
    let mut in_flight: JoinSet<(JobState, Next)> = JoinSet::new();
    let mut task_jobs: HashMap<tokio::task::Id, JobId> = HashMap::new();
    let mut ended = Recently::new();
    let spread = ms(ctx.config.interval).max(1) as u64;
    for job in initial {
        queue.insert(job.job_id, Duration::from_millis(rand::random_range(0..spread)));
        slots.insert(job.job_id, Slot::Queued { state: JobState::new(job) });
    }
    tracing::info!(jobs = slots.len(), "poller started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = rx.recv() => match msg {
                // Another instance polls the partitions we do not hold.
                PollerMsg::Ensure(job) | PollerMsg::Adopt(job) if !ctx.ownership.owns(job.job_id.partition()) => {}
                PollerMsg::Adopt(job) => match slots.get_mut(&job.job_id) {
                    None => {
                        queue.insert(job.job_id, Duration::from_millis(rand::random_range(0..spread)));
                        slots.insert(job.job_id, scheduled(job, &mut ended));
                    }
                    Some(Slot::Queued { .. }) => {}
                    // The load may have seen a subscription the running step missed.
                    Some(Slot::InFlight { recheck }) => *recheck = true,
                },
                PollerMsg::Ensure(job) => match slots.get_mut(&job.job_id) {
                    None => {
                        queue.insert(job.job_id, Duration::ZERO);
                        slots.insert(job.job_id, scheduled(job, &mut ended));
                    }
                    Some(Slot::Queued { .. }) => {}
                    // The running poll may decide nobody waits any more; make it look again.
                    Some(Slot::InFlight { recheck }) => *recheck = true,
                },
                PollerMsg::Recheck(job_id) => match slots.get_mut(&job_id) {
                    Some(Slot::Queued { state }) => state.recheck = true,
                    Some(Slot::InFlight { recheck }) => *recheck = true,
                    None => {}
                },
            },
            Some(expired) = queue.next(), if in_flight.len() < ctx.config.max_in_flight => {
                let job_id = expired.into_inner();
                let under_way = ctx.ownership.poll_started(job_id.partition());
                match (slots.remove(&job_id), under_way) {
                    (Some(Slot::Queued { state }), Some(under_way)) => {
                        slots.insert(job_id, Slot::InFlight { recheck: false });
                        let ctx = ctx.clone();
                        let handle = in_flight.spawn(async move {
                            // Counted until the step ends: a partition we give up is released only then.
                            let _under_way = under_way;
                            let mut state = state;
                            let (_, next) = step(&ctx, &mut state).await;
                            (state, next)
                        });
                        task_jobs.insert(handle.id(), job_id);
                    }
                    // Its partition went to another instance: the job is theirs now.
                    (Some(Slot::Queued { .. }) | None, _) => {}
                    (Some(in_flight_slot), _) => {
                        slots.insert(job_id, in_flight_slot);
                    }
                }
            },
            Some(done) = in_flight.join_next_with_id() => {
                let (job_id, result) = match done {
                    Ok((id, result)) => (task_jobs.remove(&id), Ok(result)),
                    Err(e) => (task_jobs.remove(&e.id()), Err(e)),
                };
                let Some(job_id) = job_id else { continue };
                let recheck = matches!(slots.get(&job_id), Some(Slot::InFlight { recheck: true }));
                match result {
                    Ok((mut state, next)) => {
                        let delay = match next {
                            _ if !ctx.ownership.owns(job_id.partition()) => None,
                            Next::PollIn(delay) => Some(delay),
                            // A registration arrived while we decided nobody waits: look again now.
                            Next::Done if recheck => Some(Duration::ZERO),
                            Next::Done => None,
                        };
                        match delay {
                            Some(delay) => {
                                state.recheck |= recheck;
                                queue.insert(job_id, delay);
                                slots.insert(job_id, Slot::Queued { state });
                            }
                            None => {
                                slots.remove(&job_id);
                                ended.record(job_id);
                            }
                        }
                    }
                    Err(e) => {
                        // A panic in a step is a bug; the job must not be forgotten for it.
                        tracing::error!(%job_id, error = %e, "poll step failed unexpectedly; retrying later");
                        // Requeued with a recheck: the next step asks the store who still waits.
                        let now = now_ms();
                        let mut state = JobState::new(PollableJob { job_id, job_created_at: now, oldest_polling_at: now });
                        state.recheck = true;
                        queue.insert(job_id, ctx.config.max_interval);
                        slots.insert(job_id, Slot::Queued { state });
                    }
                }
            },
        }
        ctx.metrics.jobs_polling.set(i64::try_from(slots.len()).unwrap_or(i64::MAX));
    }
    ctx.metrics.jobs_polling.set(0);
    let waiting = in_flight.len();
    if waiting > 0 {
        tracing::info!(polls = waiting, "waiting for in-flight polls");
        let _ = tokio::time::timeout(grace, async { while in_flight.join_next().await.is_some() {} }).await;
        in_flight.abort_all();
    }
    tracing::info!("poller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PollConfig {
        PollConfig {
            interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(10),
            max_wait: Duration::from_secs(86_400),
            not_found_grace: Duration::from_secs(60),
            max_in_flight: 8,
            max_rps: None,
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_young_pending_job_is_polled_every_interval() {
        assert_eq!(pending_delay(secs(0), &cfg(), 0.0), secs(1));
        assert_eq!(pending_delay(secs(59), &cfg(), 0.0), secs(1));
    }

    #[test]
    fn a_long_pending_job_is_polled_less_often_up_to_the_maximum() {
        assert_eq!(pending_delay(secs(61), &cfg(), 0.0), secs(2));
        assert_eq!(pending_delay(secs(121), &cfg(), 0.0), secs(4));
        assert_eq!(pending_delay(secs(181), &cfg(), 0.0), secs(8));
        assert_eq!(pending_delay(secs(241), &cfg(), 0.0), secs(10));
        assert_eq!(pending_delay(secs(86_000), &cfg(), 1.0), secs(10));
    }

    #[test]
    fn poll_jitter_only_adds_up_to_a_tenth() {
        assert_eq!(pending_delay(secs(0), &cfg(), 1.0), Duration::from_millis(1100));
        assert_eq!(pending_delay(secs(0), &cfg(), 0.0), secs(1));
    }

    /// The upstream asks for 1–2 s between polls: whatever the jitter, no spacing the poller chooses
    /// with the default settings is shorter than a second.
    #[test]
    fn with_the_default_interval_polls_of_one_job_are_never_closer_than_a_second() {
        // cfg() holds the default interval and maximum (see config's the_defaults_are_the_documented_ones).
        let defaults = cfg();
        for step in 0..=20 {
            let jitter = -1.0 + f64::from(step) / 10.0;
            for pending_for in [secs(0), secs(30), secs(59), secs(61), secs(3600)] {
                let delay = pending_delay(pending_for, &defaults, jitter);
                assert!(delay >= secs(1), "pending {pending_for:?}, jitter {jitter}: {delay:?}");
            }
            for errors in 1..=10 {
                let delay = error_delay(errors, None, &defaults, jitter);
                assert!(delay >= secs(1), "{errors} errors, jitter {jitter}: {delay:?}");
            }
        }
        let drawn = (0..1000).map(|_| random_jitter());
        assert!(drawn.clone().all(|j| (0.0..=1.0).contains(&j)), "jitter is drawn from [0, 1]");
    }

    #[test]
    fn errors_back_off_exponentially_up_to_a_minute() {
        let delays: Vec<_> = (1..=9).map(|n| error_delay(n, None, &cfg(), 0.0)).collect();
        assert_eq!(delays, vec![secs(1), secs(2), secs(4), secs(8), secs(16), secs(32), secs(60), secs(60), secs(60)]);
    }

    #[test]
    fn an_upstream_retry_after_is_waited_at_least() {
        assert_eq!(error_delay(1, Some(secs(30)), &cfg(), 0.0), secs(30));
        assert_eq!(error_delay(7, Some(secs(5)), &cfg(), 0.0), secs(60));
        assert_eq!(error_delay(1, Some(secs(999_999)), &cfg(), 0.0), MAX_UPSTREAM_RETRY_AFTER);
    }

    /// On PostgreSQL a registration's own notice, or a partition load, can reach the poller after the
    /// job it shows as pollable has finished. Run the real poll loop on a real SQLite store against
    /// the mock upstream: such a late message must not poll the finished job again, yet a message about
    /// a job that ended moments ago and has a new waiting subscription must still poll it.
    #[tokio::test]
    async fn a_late_message_about_a_finished_job_does_not_poll_it_again() {
        use crate::domain::SubscriptionId;
        use crate::keys::{ApiKey, SigningSecret};
        use crate::mock_upstream::{Answer, MockArgs, MockUpstream, Outcome};
        use crate::store::Registered;
        use std::time::Instant;

        async fn until(what: &str, check: impl Fn() -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !check() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("sqlite://{}", dir.path().join("jobhook.db").display())).await.unwrap();
        let key = ApiKey::generate();
        store.create_key("test", key.hash(), &SigningSecret::generate(), now_ms()).await.unwrap();
        let upstream = MockUpstream::start(&MockArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key: None,
            pending_polls: 1,
            outcome: Outcome::Succeed,
            error_rate: 0.0,
        })
        .await
        .unwrap();
        let config = crate::config::UpstreamConfig {
            base_url: upstream.url().parse().unwrap(),
            api_key: None,
            timeout: Duration::from_secs(5),
            proxy: None,
        };
        let poll = PollConfig { interval: Duration::from_millis(50), ..cfg() };
        let delivery = crate::config::DeliveryConfig {
            retry_schedule: vec![Duration::from_secs(1)],
            timeout: Duration::from_secs(5),
            max_in_flight: 8,
            max_in_flight_per_host: 8,
            max_in_flight_per_tenant: 8,
        };
        let (dispatcher, _deliveries) = crate::delivery::channel(&delivery);
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(PollContext::new(
            store.clone(),
            UpstreamClient::new(&config),
            poll,
            dispatcher,
            Arc::new(Ownership::all()),
            metrics.clone(),
        ));
        let (handle, inbox) = channel();
        let shutdown = CancellationToken::new();
        let poller = tokio::spawn(run(ctx, inbox, Vec::new(), shutdown.clone(), Duration::from_secs(1)));
        let callback = "http://127.0.0.1:9/hook".parse().unwrap();
        let register = async |job_id: JobId| match store
            .register(key.hash(), SubscriptionId::new(), job_id, &callback, now_ms())
            .await
            .unwrap()
        {
            Registered::CreatedPolling(_, job) => job,
            _ => panic!("a job without a result is polled"),
        };
        let polls = |job: PollableJob| upstream.polls(job.job_id).count;
        let idle = || metrics.jobs_polling.get() == 0;

        let job = register(uuid::Uuid::new_v4().to_string().parse().unwrap()).await;
        handle.ensure(job);
        until("the job's Pending and final polls", || polls(job) == 2 && idle()).await;
        // The late message. Another job run through the loop afterwards shows it has been handled
        // (messages are taken in order, and a scheduled job would be polled at once).
        handle.ensure(job);
        handle.adopt(job);
        let other = register(uuid::Uuid::new_v4().to_string().parse().unwrap()).await;
        handle.ensure(other);
        until("the other job to finish", || polls(other) == 2 && idle()).await;
        assert_eq!(polls(job), 2, "a finished job was polled again");

        // A job that failed upstream (422) ends its subscription without a result; a new subscription
        // to it waits, and its message, though it comes moments after the end, is polled.
        let rejected: JobId = uuid::Uuid::new_v4().to_string().parse().unwrap();
        upstream.script(rejected, vec![Answer::Status(422), Answer::Succeed]);
        handle.ensure(register(rejected).await);
        until("the 422", || upstream.polls(rejected).count == 1 && idle()).await;
        handle.ensure(register(rejected).await);
        until("the new subscription's poll", || upstream.polls(rejected).count == 2 && idle()).await;
        assert!(store.pollable_job(rejected).await.unwrap().is_none(), "the job finished");
        shutdown.cancel();
        poller.await.unwrap();
    }
}
