//! The dispatcher: signed POSTs to callbacks, retried on a schedule until one is accepted.
//!
//! Deliveries come from the outbox (the store) at start-up and from the poller as jobs end. Each waits in
//! a timer wheel until it is due; [`attempt`] makes one signed request and decides what follows; the
//! result and the attempt's log row are committed together. A dead host waits in its own retry schedule,
//! and concurrency is capped per host and overall, so no receiver slows the others (DESIGN promise 6).

pub mod client;
pub mod retry;
pub mod secrets;
pub mod signing;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::{DelayQueue, delay_queue};

use crate::config::DeliveryConfig;
use crate::domain::{FailureReason, SubscriptionId, truncate};
use crate::keys::SigningSecret;
use crate::store::{AttemptRecord, AttemptResult, Claim, DeliveryTask, Millis, Store, now_ms};
use crate::upstream::{describe_transport_error, parse_retry_after};
use client::EgressPolicy;
pub use secrets::SecretsCache;

/// How much of a receiver's answer we read (and then drop): enough to reuse the connection after a
/// normal short answer, little enough that an endless body costs nothing.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// When the store cannot give the signing secrets, the attempt waits this long; when it cannot record
/// an attempt's outcome, the write is retried after this, doubling up to [`MAX_STORE_RETRY`]. (If the
/// process stops meanwhile, the attempt is sent again after the restart, under the same `webhook-id`.)
const STORE_RETRY: Duration = Duration::from_secs(5);
const MAX_STORE_RETRY: Duration = Duration::from_secs(60);

/// An attempt starts only under a claim that outlasts its timeout by this much: the time to record its
/// outcome, which releases the claim. (If recording takes longer, say a database outage, the claim
/// lapses and a cancellation could commit although the request was answered.)
const RECORD_MARGIN: Duration = Duration::from_secs(15);
/// How long a claim taken ahead of an attempt (with its job's result) may wait for a slot and still serve.
const SLOT_MARGIN: Duration = Duration::from_secs(15);

/// What one attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// When the request started (after waiting for a concurrency slot), and how long it took.
    pub started_at: Millis,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
    /// The egress policy refused the callback's address: retrying cannot help.
    pub refused: bool,
}

/// What follows an attempt: a pure function of its outcome, the attempts made and the schedule.
pub fn decide(
    outcome: &AttemptOutcome,
    attempt: u32,
    schedule: &[Duration],
    now: Millis,
    jitter: f64,
) -> AttemptResult {
    if outcome.refused {
        return AttemptResult::Failed(FailureReason::CallbackRefused);
    }
    match outcome.status_code {
        Some(200..=299) => return AttemptResult::Delivered,
        Some(410) => return AttemptResult::Failed(FailureReason::CallbackGone),
        _ => {}
    }
    let retry_after = match outcome.status_code {
        Some(429 | 503) => outcome.retry_after,
        _ => None,
    };
    match retry::next_delay(schedule, attempt, retry_after, jitter) {
        Some(delay) => {
            AttemptResult::RetryAt(now.saturating_add(Millis::try_from(delay.as_millis()).unwrap_or(Millis::MAX)))
        }
        None => AttemptResult::Failed(FailureReason::DeliveryExhausted),
    }
}

/// Everything an attempt needs.
pub struct DeliveryContext {
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    pub policy: EgressPolicy,
    pub config: DeliveryConfig,
    overall: Arc<Semaphore>,
    per_host: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_tenant: Mutex<HashMap<i64, Arc<Semaphore>>>,
    /// Each tenant's signing secrets, shared with the API that rotates them.
    pub secrets: Arc<SecretsCache>,
    /// The partitions this instance delivers (all of them on SQLite).
    pub ownership: Arc<crate::partition::Ownership>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl DeliveryContext {
    pub fn new(
        store: Arc<dyn Store>,
        secrets: Arc<SecretsCache>,
        policy: EgressPolicy,
        lookup: client::Lookup,
        config: DeliveryConfig,
        ownership: Arc<crate::partition::Ownership>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        DeliveryContext {
            metrics,
            http: client::callback_client(&policy, lookup, config.timeout),
            overall: Arc::new(Semaphore::new(config.max_in_flight)),
            per_host: Mutex::new(HashMap::new()),
            per_tenant: Mutex::new(HashMap::new()),
            secrets,
            ownership,
            store,
            policy,
            config,
        }
    }

    /// How long a delivery's claim lasts: the attempt's timeout, time to record its outcome, and time to
    /// wait for a slot, so a first attempt claimed with its job's result rarely needs a claim of its own.
    pub fn claim_for(config: &DeliveryConfig) -> Duration {
        config.timeout + RECORD_MARGIN + SLOT_MARGIN
    }

    /// Waits for a slot of the tenant, then of the host, then overall (always in that order, so two
    /// attempts never wait for each other's slots). Every cap holds: one tenant's slow hosts, however
    /// many names they have, cannot take every slot, nor can one host.
    async fn slots(&self, tenant_id: i64, host: &str) -> Slots {
        let tenant = semaphore(&self.per_tenant, tenant_id, self.config.max_in_flight_per_tenant);
        let host = semaphore(&self.per_host, host.to_owned(), self.config.max_in_flight_per_host);
        // None of the semaphores is ever closed.
        let tenant = tenant.acquire_owned().await.expect("delivery semaphores are never closed");
        let host = host.acquire_owned().await.expect("delivery semaphores are never closed");
        let overall = self.overall.clone().acquire_owned().await.expect("delivery semaphores are never closed");
        Slots { _permits: [tenant, host, overall] }
    }
}

/// The slots an attempt holds while its request runs.
struct Slots {
    _permits: [tokio::sync::OwnedSemaphorePermit; 3],
}

/// The semaphore of one key (a host, a tenant), made on first use.
fn semaphore<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, Arc<Semaphore>>>,
    key: K,
    permits: usize,
) -> Arc<Semaphore> {
    let mut map = map.lock().expect("the semaphore maps are never poisoned: no code panics while holding one");
    if map.len() > 10_000 {
        // Forget keys nobody is calling right now, so the map does not grow without bound.
        map.retain(|_, s| Arc::strong_count(s) > 1);
    }
    map.entry(key).or_insert_with(|| Arc::new(Semaphore::new(permits))).clone()
}

/// What an attempt's request needs to start.
enum Start {
    /// Slots held, claim held: send.
    Go(url::Url, Slots),
    /// No request can be made (the callback URL does not parse, the egress policy refuses it).
    Refused(AttemptOutcome),
    /// Another instance holds the claim; try again then.
    Later(Millis),
    /// The delivery is over (cancelled, delivered elsewhere, replaced by a newer series).
    Over,
}

/// Gets an attempt ready: a slot, then the claim that keeps a cancellation (or another instance) from
/// committing while the request may be on the wire (DESIGN promise 11). A claim taken with the job's
/// result is used as it is while it outlasts the request and the record; otherwise one is taken now.
async fn start(ctx: &DeliveryContext, task: &mut DeliveryTask) -> Start {
    let failed = |error: String| AttemptOutcome {
        started_at: now_ms(),
        duration_ms: 0,
        status_code: None,
        error: Some(error),
        retry_after: None,
        refused: true,
    };
    let url = match url::Url::parse(&task.callback_url) {
        Ok(url) => url,
        Err(e) => {
            return Start::Refused(AttemptOutcome {
                refused: false,
                ..failed(format!("callback URL does not parse: {e}"))
            });
        }
    };
    let slots = ctx.slots(task.tenant_id, url.host_str().unwrap_or_default()).await;
    let needed = Instant::now() + ctx.config.timeout + RECORD_MARGIN;
    if task.claimed_until.is_none_or(|until| until < needed) {
        match ctx.store.claim_delivery(task, DeliveryContext::claim_for(&ctx.config)).await {
            Ok(Claim::Held(until)) => task.claimed_until = Some(until),
            Ok(Claim::Busy(until)) => return Start::Later(until),
            Ok(Claim::Gone) => return Start::Over,
            Err(e) => {
                tracing::error!(error = %e, "could not claim a delivery; the attempt waits");
                return Start::Later(now_ms().saturating_add(STORE_RETRY.as_millis() as Millis));
            }
        }
    }
    if let Err(why) = ctx.policy.check_literal(&url) {
        return Start::Refused(failed(format!("egress policy: {why}")));
    }
    Start::Go(url, slots)
}

/// One signed POST to the callback, with its slots and claim held. Never fails: every outcome is an
/// answer.
async fn send(ctx: &DeliveryContext, task: &DeliveryTask, url: url::Url, secrets: &[SigningSecret]) -> AttemptOutcome {
    let started_at = now_ms();
    let clock = Instant::now();
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = signing::signature_header(secrets, &task.webhook_id, timestamp, &task.body);
    let request = ctx
        .http
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &task.webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(task.body.clone());
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            let error = describe_transport_error(&e);
            // The vetting resolver's refusal comes back inside a connect error.
            let (error, refused) = match error.find("egress policy") {
                Some(at) => (error[at..].to_owned(), true),
                None => (error, false),
            };
            return AttemptOutcome {
                started_at,
                duration_ms: elapsed_ms(clock),
                status_code: None,
                error: Some(error),
                retry_after: None,
                refused,
            };
        }
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let mut read = 0;
    while read < MAX_RESPONSE_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            _ => break,
        }
    }
    let error = match status {
        300..=399 => Some("the receiver redirected; redirects are not followed".to_owned()),
        _ => None,
    };
    AttemptOutcome {
        started_at,
        duration_ms: elapsed_ms(clock),
        status_code: Some(status),
        error,
        retry_after,
        refused: false,
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One delivery attempt: send, decide, record. Returns the delivery's next due time, if any.
#[tracing::instrument(level = "debug", skip_all, fields(subscription_id = %task.subscription_id, job_id = %task.job_id, attempt = task.attempts_made + 1))]
pub async fn attempt(ctx: &DeliveryContext, task: &mut DeliveryTask) -> Option<Millis> {
    let attempt = task.attempts_made + 1;
    let secrets = match ctx.secrets.get(task.tenant_id).await {
        Ok(secrets) => secrets,
        Err(e) => {
            tracing::error!(error = %e, "could not read the signing secrets; the attempt waits");
            return Some(now_ms().saturating_add(STORE_RETRY.as_millis() as Millis));
        }
    };
    let outcome = match start(ctx, task).await {
        Start::Go(url, slots) => {
            let outcome = send(ctx, task, url, &secrets).await;
            drop(slots);
            outcome
        }
        Start::Refused(outcome) => outcome,
        Start::Later(at) => return Some(at),
        Start::Over => return None,
    };
    let now = now_ms();
    if outcome.status_code.is_some() {
        ctx.metrics.delivery_seconds.observe(outcome.duration_ms as f64 / 1000.0);
    }
    if task.attempts_made == 0 {
        ctx.metrics.delivery_lag_seconds.observe(now.saturating_sub(task.due_at).max(0) as f64 / 1000.0);
    }
    let result = decide(&outcome, attempt, &ctx.config.retry_schedule, now, rand::random_range(-1.0..=1.0));
    let record = AttemptRecord {
        subscription_id: task.subscription_id,
        partition: task.partition,
        series: task.series,
        attempt,
        webhook_id: task.webhook_id.clone(),
        started_at: outcome.started_at,
        status_code: outcome.status_code,
        error: outcome.error.as_deref().map(|e| truncate(e, 500)),
        duration_ms: outcome.duration_ms,
    };
    match &result {
        AttemptResult::Delivered => {
            tracing::debug!(status = outcome.status_code, duration_ms = outcome.duration_ms, "delivered")
        }
        AttemptResult::RetryAt(at) => {
            tracing::info!(
                status = outcome.status_code,
                error = outcome.error.as_deref(),
                retry_in_ms = at - now,
                "attempt failed; will retry"
            )
        }
        AttemptResult::Failed(reason) => {
            tracing::warn!(
                status = outcome.status_code,
                error = outcome.error.as_deref(),
                reason = reason.as_str(),
                "delivery failed for good"
            )
        }
    }
    // The receiver has answered: if the store cannot take the record now, keep the answer and retry
    // the write, rather than send the request again (a receiver that said 2xx or 410 would hear it
    // every few seconds for as long as the outage lasts).
    let mut wait = STORE_RETRY;
    let recorded = loop {
        match ctx.store.record_attempt(&record, result, now).await {
            Ok(recorded) => break recorded,
            // Its partition went to another instance, which resends from the store.
            Err(_) if !ctx.ownership.owns(task.partition) => return None,
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?wait, "could not record a delivery attempt; its outcome is kept and the write retried");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_STORE_RETRY);
            }
        }
    };
    match recorded {
        // Cancelled (or redelivered) meanwhile: this series is over.
        false => None,
        true => {
            task.attempts_made = attempt;
            let (outcome, finished) = match result {
                AttemptResult::Delivered => ("delivered", Some("delivered")),
                AttemptResult::RetryAt(_) => ("retry", None),
                AttemptResult::Failed(_) => ("failed", Some("failed")),
            };
            ctx.metrics.attempt(outcome, attempt);
            if let Some(state) = finished {
                ctx.metrics.finished(state, 1);
            }
            match result {
                AttemptResult::RetryAt(at) => Some(at),
                AttemptResult::Delivered | AttemptResult::Failed(_) => None,
            }
        }
    }
}

enum DispatcherMsg {
    Deliver(Vec<DeliveryTask>),
    Cancel(SubscriptionId),
}

/// How the poller and the API hand deliveries to the dispatcher.
#[derive(Clone)]
pub struct DispatcherHandle {
    tx: mpsc::UnboundedSender<DispatcherMsg>,
    claim_for: Duration,
}

impl DispatcherHandle {
    pub fn deliver(&self, tasks: Vec<DeliveryTask>) {
        if !tasks.is_empty() {
            // Fails only once the dispatcher has stopped; the deliveries are in the store and resume at
            // the next start.
            let _ = self.tx.send(DispatcherMsg::Deliver(tasks));
        }
    }

    pub fn cancel(&self, id: SubscriptionId) {
        let _ = self.tx.send(DispatcherMsg::Cancel(id));
    }

    /// How long the deliveries of a job that ends are claimed for their first attempt.
    pub fn claim_for(&self) -> Duration {
        self.claim_for
    }
}

pub struct DispatcherInbox(mpsc::UnboundedReceiver<DispatcherMsg>);

pub fn channel(config: &DeliveryConfig) -> (DispatcherHandle, DispatcherInbox) {
    // Unbounded: every message stands for deliveries already committed to the store.
    let (tx, rx) = mpsc::unbounded_channel();
    (DispatcherHandle { tx, claim_for: DeliveryContext::claim_for(config) }, DispatcherInbox(rx))
}

enum Slot {
    Queued(delay_queue::Key, DeliveryTask),
    /// An attempt of `series` is running. `cancelled`: drop the delivery when it returns. `then`: a newer
    /// series (a redelivery) that arrived meanwhile, to queue when it returns.
    InFlight {
        series: u32,
        cancelled: bool,
        then: Option<DeliveryTask>,
    },
}

/// Queues a delivery unless it is already known (queued or being attempted): the store holds one
/// delivery per subscription.
fn enqueue(queue: &mut DelayQueue<SubscriptionId>, slots: &mut HashMap<SubscriptionId, Slot>, task: DeliveryTask) {
    let id = task.subscription_id;
    match slots.get_mut(&id) {
        None => {
            let key = queue.insert(id, delay_until(task.due_at));
            slots.insert(id, Slot::Queued(key, task));
        }
        // A newer series replaces a queued older one; the same series is already queued.
        Some(Slot::Queued(key, queued)) => {
            if task.series > queued.series {
                queue.reset(key, delay_until(task.due_at));
                *queued = task;
            }
        }
        // The same series again (say, from this instance's API and from a notice) is already being
        // attempted; only a newer one waits its turn.
        Some(Slot::InFlight { series, cancelled, then }) => {
            if !*cancelled && task.series > *series && then.as_ref().is_none_or(|t| task.series > t.series) {
                *then = Some(task);
            }
        }
    }
}

/// Whether this instance delivers `task`: its partition is ours, or it holds the task's claim (a job
/// that ended here just as its partition was given up: its claim keeps the next owner from attempting
/// it meanwhile, so it is sent from here rather than left to wait for the claim to lapse).
fn ours(ctx: &DeliveryContext, task: &DeliveryTask) -> bool {
    ctx.ownership.owns(task.partition) || task.claimed_until.is_some_and(|until| until > Instant::now())
}

fn delay_until(due_at: Millis) -> Duration {
    Duration::from_millis(u64::try_from(due_at - now_ms()).unwrap_or(0))
}

/// The delivery loop: runs deliveries as they fall due until `shutdown`, then waits for in-flight
/// attempts up to `grace`.
pub async fn run(
    ctx: Arc<DeliveryContext>,
    inbox: DispatcherInbox,
    initial: Vec<DeliveryTask>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut rx = inbox.0;
    let mut queue: DelayQueue<SubscriptionId> = DelayQueue::new();
    let mut slots: HashMap<SubscriptionId, Slot> = HashMap::new();
    let mut in_flight: JoinSet<(DeliveryTask, Option<Millis>)> = JoinSet::new();
    let mut task_subs: HashMap<tokio::task::Id, SubscriptionId> = HashMap::new();
    let initial_count = initial.len();
    for task in initial {
        enqueue(&mut queue, &mut slots, task);
    }
    tracing::info!(deliveries = initial_count, "dispatcher started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(msg) = rx.recv() => match msg {
                DispatcherMsg::Deliver(tasks) => {
                    // Another instance delivers the partitions we do not hold.
                    // A delivery whose subscription was cancelled meanwhile is dropped when its claim is
                    // refused (a cancellation never commits while a claim is held).
                    for task in tasks.into_iter().filter(|t| ours(&ctx, t)) {
                        enqueue(&mut queue, &mut slots, task);
                    }
                }
                DispatcherMsg::Cancel(id) => {
                    match slots.get_mut(&id) {
                        Some(Slot::Queued(key, _)) => {
                            queue.remove(key);
                            slots.remove(&id);
                        }
                        Some(Slot::InFlight { cancelled, then, .. }) => {
                            *cancelled = true;
                            *then = None;
                        }
                        None => {}
                    }
                }
            },
            Some(expired) = queue.next() => {
                let id = expired.into_inner();
                match slots.remove(&id) {
                    Some(Slot::Queued(_, mut task)) if ours(&ctx, &task) => {
                        slots.insert(id, Slot::InFlight { series: task.series, cancelled: false, then: None });
                        let ctx = ctx.clone();
                        let handle = in_flight.spawn(async move {
                            let next = attempt(&ctx, &mut task).await;
                            (task, next)
                        });
                        task_subs.insert(handle.id(), id);
                    }
                    // Its partition went to another instance: the delivery is theirs now.
                    Some(Slot::Queued(..)) | None => {}
                    Some(in_flight_slot) => {
                        slots.insert(id, in_flight_slot);
                    }
                }
            },
            Some(done) = in_flight.join_next_with_id() => {
                let (id, result) = match done {
                    Ok((task_id, result)) => (task_subs.remove(&task_id), Ok(result)),
                    Err(e) => (task_subs.remove(&e.id()), Err(e)),
                };
                let Some(id) = id else { continue };
                let (cancelled, then) = match slots.remove(&id) {
                    Some(Slot::InFlight { cancelled, then, .. }) => (cancelled, then),
                    _ => (false, None),
                };
                if let Some(newer) = then {
                    enqueue(&mut queue, &mut slots, newer);
                }
                match result {
                    Ok((mut task, Some(due_at))) if !cancelled && ctx.ownership.owns(task.partition) => {
                        task.due_at = due_at;
                        enqueue(&mut queue, &mut slots, task);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // A bug, not a receiver's fault: the delivery stays in the store and resumes at the
                        // next start; say so loudly.
                        tracing::error!(subscription_id = %id, error = %e, "delivery attempt failed unexpectedly");
                    }
                }
            },
        }
        ctx.metrics.deliveries_waiting.set(i64::try_from(slots.len()).unwrap_or(i64::MAX));
    }
    let waiting = in_flight.len();
    if waiting > 0 {
        tracing::info!(deliveries = waiting, "waiting for in-flight deliveries");
        let _ = tokio::time::timeout(grace, async { while in_flight.join_next().await.is_some() {} }).await;
        in_flight.abort_all();
    }
    tracing::info!("dispatcher stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: Option<u16>, retry_after: Option<u64>) -> AttemptOutcome {
        AttemptOutcome {
            started_at: 0,
            duration_ms: 0,
            status_code: status,
            error: None,
            retry_after: retry_after.map(Duration::from_secs),
            refused: false,
        }
    }

    const SCHEDULE: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(300)];

    #[test]
    fn any_2xx_is_delivered() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(decide(&outcome(Some(code), None), 1, &SCHEDULE, 0, 0.0), AttemptResult::Delivered);
        }
    }

    #[test]
    fn a_refused_address_stops_at_once() {
        let refused = AttemptOutcome { refused: true, ..outcome(None, None) };
        assert_eq!(decide(&refused, 1, &SCHEDULE, 0, 0.0), AttemptResult::Failed(FailureReason::CallbackRefused));
    }

    #[test]
    fn gone_stops_at_once() {
        assert_eq!(
            decide(&outcome(Some(410), None), 1, &SCHEDULE, 0, 0.0),
            AttemptResult::Failed(FailureReason::CallbackGone)
        );
    }

    #[test]
    fn errors_redirects_and_timeouts_retry_on_the_schedule() {
        for status in [Some(500), Some(302), Some(404), None] {
            assert_eq!(decide(&outcome(status, None), 1, &SCHEDULE, 1_000, 0.0), AttemptResult::RetryAt(6_000));
            assert_eq!(decide(&outcome(status, None), 2, &SCHEDULE, 1_000, 0.0), AttemptResult::RetryAt(301_000));
        }
    }

    #[test]
    fn the_last_failure_exhausts_the_delivery() {
        assert_eq!(
            decide(&outcome(Some(500), None), 3, &SCHEDULE, 0, 0.0),
            AttemptResult::Failed(FailureReason::DeliveryExhausted)
        );
    }

    #[test]
    fn retry_after_counts_only_for_429_and_503() {
        assert_eq!(decide(&outcome(Some(429), Some(60)), 1, &SCHEDULE, 0, 0.0), AttemptResult::RetryAt(60_000));
        assert_eq!(decide(&outcome(Some(503), Some(60)), 1, &SCHEDULE, 0, 0.0), AttemptResult::RetryAt(60_000));
        assert_eq!(decide(&outcome(Some(500), Some(60)), 1, &SCHEDULE, 0, 0.0), AttemptResult::RetryAt(5_000));
    }
}
