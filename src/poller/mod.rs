//! The poll schedule, and one poll step.
//!
//! One entry per upstream job (DESIGN promise 4), however many subscribers it has, kept in memory in the
//! shared [`Schedule`] — not a task per job. A job is either queued or in flight, never both, so two
//! polls of one job can never overlap. A Pending answer reschedules in memory
//! and writes nothing (promise 3); the store is written only at transitions: the first status seen, an
//! error appearing or changing, the job's end, expiry, a definitive upstream refusal.
//!
//! [`step`] is one poll of one job and returns what to do next; [`backoff`] says how long a job waits;
//! [`run`] is the loop around them.

pub mod backoff;
mod step;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::domain::{JobId, Timestamp};
use crate::recent::Recently;
use crate::schedule::{Entry, Event, Schedule};
use crate::store::PollableJob;
pub use backoff::{MAX_UPSTREAM_RETRY_AFTER, POLL_JITTER, SLOWDOWN_AFTER, error_delay, pending_delay};
pub use step::{JobState, Next, PollContext, PollOutcome, step};

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

/// The poller's schedule: a job's state while queued; while its step runs, whether to look again
/// (a message arrived meanwhile) before deciding nobody waits.
type Polls = Schedule<JobId, JobState, bool, Next>;

// Jobs whose polling ended in the last few seconds ([`Recently`]).
//
// A message can be older than the job's end: on PostgreSQL a registration's own notice, or a partition
// load, reads the job as pollable while its final poll is under way, and the poller takes the message
// after the job has left the schedule. Scheduling it as it stands would poll a finished job once more.
// A message about a job that ended moments ago is therefore scheduled with a recheck: its first step
// asks the store whether any subscription still waits, and polls only if one does. That read comes
// after the message, so a subscription that really waits is never dropped.

/// A job to schedule from a message: checked against the store first if it ended moments ago.
fn scheduled(job: PollableJob, ended: &mut Recently<JobId>) -> JobState {
    let recheck = ended.take(&job.job_id);
    let mut state = JobState::new(&job);
    state.recheck = recheck;
    state
}

/// A moment within the first poll interval, so jobs loaded together do not all go at once.
fn spread(ctx: &PollContext) -> Duration {
    let interval = u64::try_from(ctx.config.interval.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::random_range(0..interval))
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
    let mut polls = Polls::new(ctx.config.max_in_flight);
    let mut ended = Recently::new();
    for job in initial {
        polls.insert(job.job_id.clone(), JobState::new(&job), spread(&ctx));
    }
    tracing::info!(jobs = polls.len(), "poller started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = rx.recv() => on_message(&ctx, &mut polls, &mut ended, msg),
            event = polls.next() => match event {
                Event::Due(job_id, state) => start(&ctx, &mut polls, job_id, state),
                Event::Done(job_id, recheck, result) => on_done(&ctx, &mut polls, &mut ended, job_id, recheck, result),
            },
        }
        ctx.metrics.jobs_polling.set(i64::try_from(polls.len()).unwrap_or(i64::MAX));
    }
    ctx.metrics.jobs_polling.set(0);
    let waited = polls.drain(grace).await;
    tracing::info!(in_flight = waited, "poller stopped");
}

fn on_message(ctx: &PollContext, polls: &mut Polls, ended: &mut Recently<JobId>, msg: PollerMsg) {
    let (job, due_in) = match msg {
        PollerMsg::Recheck(job_id) => {
            match polls.get_mut(&job_id) {
                Some(Entry::Queued(state)) => state.recheck = true,
                Some(Entry::Running(recheck)) => *recheck = true,
                None => {}
            }
            return;
        }
        // Another instance polls the partitions we do not hold.
        PollerMsg::Ensure(job) | PollerMsg::Adopt(job) if !ctx.ownership.owns(job.job_id.partition()) => return,
        PollerMsg::Adopt(job) => (job, spread(ctx)),
        PollerMsg::Ensure(job) => (job, Duration::ZERO),
    };
    match polls.get_mut(&job.job_id) {
        None => {
            polls.insert(job.job_id.clone(), scheduled(job, ended), due_in);
        }
        Some(Entry::Queued(_)) => {}
        // The running poll may decide nobody waits any more (or the load may have seen a subscription
        // the running step missed): make it look again.
        Some(Entry::Running(recheck)) => *recheck = true,
    }
}

fn start(ctx: &Arc<PollContext>, polls: &mut Polls, job_id: JobId, mut state: JobState) {
    // Its partition went to another instance: the job is theirs now.
    let Some(under_way) = ctx.ownership.poll_started(job_id.partition()) else { return };
    let ctx = ctx.clone();
    let id = job_id.clone();
    polls.start(job_id, false, async move {
        // Counted until the step ends: a partition we give up is released only then.
        let _under_way = under_way;
        let (_, next) = step(&ctx, &id, &mut state).await;
        (state, next)
    });
}

fn on_done(
    ctx: &PollContext,
    polls: &mut Polls,
    ended: &mut Recently<JobId>,
    job_id: JobId,
    recheck: bool,
    result: Result<(JobState, Next), tokio::task::JoinError>,
) {
    let (mut state, next) = match result {
        Ok(done) => done,
        Err(e) => {
            // A panic in a step is a bug; the job must not be forgotten for it. Requeued with a
            // recheck: the next step asks the store who still waits.
            tracing::error!(%job_id, error = %e, "poll step failed unexpectedly; retrying later");
            let now = Timestamp::now();
            let mut state =
                JobState::new(&PollableJob { job_id: job_id.clone(), job_created_at: now, oldest_polling_at: now });
            state.recheck = true;
            polls.insert(job_id, state, ctx.config.max_interval);
            return;
        }
    };
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
            polls.insert(job_id, state, delay);
        }
        None => ended.record(job_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PollConfig;
    use crate::metrics::Metrics;
    use crate::partition::Ownership;
    use crate::poller::backoff::tests::cfg;
    use crate::upstream::UpstreamClient;

    /// On PostgreSQL a registration's own notice, or a partition load, can reach the poller after the
    /// job it shows as pollable has finished. Run the real poll loop on a real SQLite store against
    /// the mock upstream: such a late message must not poll the finished job again, yet a message about
    /// a job that ended moments ago and has a new waiting subscription must still poll it.
    #[tokio::test]
    async fn a_late_message_about_a_finished_job_does_not_poll_it_again() {
        use crate::domain::SubscriptionId;
        use crate::keys::{ApiKey, SigningSecret};
        use crate::mock_upstream::{Answer, MockArgs, MockUpstream, Outcome};
        use crate::store::{Registered, Registration};
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
        store.create_key("test", key.hash(), &SigningSecret::generate(), Timestamp::now()).await.unwrap();
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
        let profile = crate::config::upstreams::UpstreamProfile::aetherforge_with(&config.base_url, None, &poll);
        let delivery = crate::config::DeliveryConfig {
            retry_schedule: vec![Duration::from_secs(1)],
            timeout: Duration::from_secs(5),
            max_in_flight: 8,
            max_in_flight_per_host: 8,
            max_in_flight_per_tenant: 8,
            breaker: crate::config::BreakerConfig {
                after: 0,
                min_span: Duration::ZERO,
                probe_interval: Duration::from_secs(1),
            },
        };
        let (dispatcher, _deliveries) = crate::delivery::channel(&delivery);
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(PollContext::new(
            store.clone(),
            vec![UpstreamClient::new(crate::upstream::http_client(&config), profile)],
            poll,
            dispatcher,
            Arc::new(Ownership::all()),
            metrics.clone(),
        ));
        let (handle, inbox) = channel();
        let shutdown = CancellationToken::new();
        let poller = tokio::spawn(run(ctx, inbox, Vec::new(), shutdown.clone(), Duration::from_secs(1)));
        let callback: crate::domain::CallbackUrl = "http://127.0.0.1:9/hook".parse().unwrap();
        let register = async |job_id: JobId| match store
            .register(Registration {
                key: key.hash(),
                id: SubscriptionId::new(),
                job_id,
                callback_url: callback.clone(),
                form: Default::default(),
                now: Timestamp::now(),
            })
            .await
            .unwrap()
        {
            Registered::CreatedPolling(_, job) => job,
            _ => panic!("a job without a result is polled"),
        };
        let polls = |job: &PollableJob| upstream.polls(job.job_id.clone()).count;
        let idle = || metrics.jobs_polling.get() == 0;

        let job = register(uuid::Uuid::new_v4().to_string().parse().unwrap()).await;
        handle.ensure(job.clone());
        until("the job's Pending and final polls", || polls(&job) == 2 && idle()).await;
        // The late message. Another job run through the loop afterwards shows it has been handled
        // (messages are taken in order, and a scheduled job would be polled at once).
        handle.ensure(job.clone());
        handle.adopt(job.clone());
        let other = register(uuid::Uuid::new_v4().to_string().parse().unwrap()).await;
        handle.ensure(other.clone());
        until("the other job to finish", || polls(&other) == 2 && idle()).await;
        assert_eq!(polls(&job), 2, "a finished job was polled again");

        // A job that failed upstream (422) ends its subscription without a result; a new subscription
        // to it waits, and its message, though it comes moments after the end, is polled.
        let rejected: JobId = uuid::Uuid::new_v4().to_string().parse().unwrap();
        upstream.script(rejected.clone(), vec![Answer::Status(422), Answer::Succeed]);
        handle.ensure(register(rejected.clone()).await);
        until("the 422", || upstream.polls(rejected.clone()).count == 1 && idle()).await;
        handle.ensure(register(rejected.clone()).await);
        until("the new subscription's poll", || upstream.polls(rejected.clone()).count == 2 && idle()).await;
        assert!(store.pollable_job(rejected).await.unwrap().is_none(), "the job finished");
        shutdown.cancel();
        poller.await.unwrap();
    }
}
