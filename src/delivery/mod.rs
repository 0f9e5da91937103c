//! The dispatcher: signed POSTs to callbacks, retried on a schedule until one is accepted.
//!
//! Deliveries come from the outbox (the store) at start-up and from the poller as jobs end. Each waits in
//! a timer wheel until it is due; [`attempt`] makes one signed request and decides what follows; the
//! result and the attempt's log row are committed together. A dead host waits in its own retry schedule,
//! and concurrency is capped per host and overall, so no receiver slows the others (DESIGN promise 6).

pub mod client;
pub mod retry;
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
use crate::store::{AttemptRecord, AttemptResult, DeliveryTask, Millis, Store, now_ms};
use crate::upstream::{describe_transport_error, parse_retry_after};
use client::EgressPolicy;

/// How much of a receiver's answer we read (and then drop): enough to reuse the connection after a
/// normal short answer, little enough that an endless body costs nothing.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024;

/// When the store cannot record an attempt, the delivery is tried again after this (and may reach the
/// receiver twice, under the same `webhook-id`).
const STORE_RETRY: Duration = Duration::from_secs(5);

/// What one attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// When the request started (after waiting for a concurrency slot), and how long it took.
    pub started_at: Millis,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub retry_after: Option<Duration>,
}

/// What follows an attempt: a pure function of its outcome, the attempts made and the schedule.
pub fn decide(
    outcome: &AttemptOutcome,
    attempt: u32,
    schedule: &[Duration],
    now: Millis,
    jitter: f64,
) -> AttemptResult {
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
}

impl DeliveryContext {
    pub fn new(store: Arc<dyn Store>, policy: EgressPolicy, config: DeliveryConfig) -> Self {
        DeliveryContext {
            http: client::callback_client(policy, config.timeout),
            overall: Arc::new(Semaphore::new(config.max_in_flight)),
            per_host: Mutex::new(HashMap::new()),
            store,
            policy,
            config,
        }
    }

    fn host_semaphore(&self, host: &str) -> Arc<Semaphore> {
        let mut hosts = self.per_host.lock().expect("the host map is never poisoned: no code panics while holding it");
        if hosts.len() > 10_000 {
            // Forget hosts nobody is calling right now, so the map does not grow without bound.
            hosts.retain(|_, s| Arc::strong_count(s) > 1);
        }
        hosts
            .entry(host.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.max_in_flight_per_host)))
            .clone()
    }
}

/// One signed POST to the callback. Never fails: every outcome is an answer.
pub async fn send(ctx: &DeliveryContext, task: &DeliveryTask) -> AttemptOutcome {
    let mut started_at = now_ms();
    let mut clock = Instant::now();
    let failed = |error: String, started_at: Millis, clock: Instant| AttemptOutcome {
        started_at,
        duration_ms: elapsed_ms(clock),
        status_code: None,
        error: Some(error),
        retry_after: None,
    };
    let url = match url::Url::parse(&task.callback_url) {
        Ok(url) => url,
        Err(e) => {
            return failed(format!("callback URL does not parse: {e}"), started_at, clock);
        }
    };
    if let Err(why) = ctx.policy.check_literal(&url) {
        return failed(format!("egress policy: {why}"), started_at, clock);
    }
    let host = url.host_str().unwrap_or_default().to_owned();
    let host_slot = ctx.host_semaphore(&host);
    // Neither semaphore is ever closed.
    let Ok(_host_permit) = host_slot.acquire_owned().await else {
        return failed("shutting down".into(), started_at, clock);
    };
    let Ok(_permit) = ctx.overall.clone().acquire_owned().await else {
        return failed("shutting down".into(), started_at, clock);
    };
    // The attempt starts once it has its slots.
    started_at = now_ms();
    clock = Instant::now();

    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = signing::signature_header([task.secret.as_ref()], &task.webhook_id, timestamp, &task.body);
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
        Err(e) => return failed(describe_transport_error(&e), started_at, clock),
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
    AttemptOutcome { started_at, duration_ms: elapsed_ms(clock), status_code: Some(status), error, retry_after }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One delivery attempt: send, decide, record. Returns the delivery's next due time, if any.
#[tracing::instrument(skip_all, fields(subscription_id = %task.subscription_id, attempt = task.attempts_made + 1))]
pub async fn attempt(ctx: &DeliveryContext, task: &mut DeliveryTask) -> Option<Millis> {
    let attempt = task.attempts_made + 1;
    let outcome = send(ctx, task).await;
    let now = now_ms();
    let result = decide(&outcome, attempt, &ctx.config.retry_schedule, now, rand::random_range(-1.0..=1.0));
    let record = AttemptRecord {
        subscription_id: task.subscription_id,
        attempt,
        webhook_id: task.webhook_id.clone(),
        started_at: outcome.started_at,
        status_code: outcome.status_code,
        error: outcome.error.as_deref().map(|e| truncate(e, 500)),
        duration_ms: outcome.duration_ms,
    };
    match &result {
        AttemptResult::Delivered => {
            tracing::info!(status = outcome.status_code, duration_ms = outcome.duration_ms, "delivered")
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
    match ctx.store.record_attempt(&record, result, now).await {
        Ok(_) => {
            task.attempts_made = attempt;
            match result {
                AttemptResult::RetryAt(at) => Some(at),
                AttemptResult::Delivered | AttemptResult::Failed(_) => None,
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "could not record a delivery attempt; the delivery will be repeated");
            Some(now.saturating_add(STORE_RETRY.as_millis() as Millis))
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
}

pub struct DispatcherInbox(mpsc::UnboundedReceiver<DispatcherMsg>);

pub fn channel() -> (DispatcherHandle, DispatcherInbox) {
    // Unbounded: every message stands for deliveries already committed to the store.
    let (tx, rx) = mpsc::unbounded_channel();
    (DispatcherHandle { tx }, DispatcherInbox(rx))
}

enum Slot {
    Queued(delay_queue::Key, DeliveryTask),
    InFlight { cancelled: bool },
}

/// Queues a delivery unless it is already known (queued or being attempted): the store holds one
/// delivery per subscription.
fn enqueue(queue: &mut DelayQueue<SubscriptionId>, slots: &mut HashMap<SubscriptionId, Slot>, task: DeliveryTask) {
    if let std::collections::hash_map::Entry::Vacant(slot) = slots.entry(task.subscription_id) {
        let key = queue.insert(task.subscription_id, delay_until(task.due_at));
        slot.insert(Slot::Queued(key, task));
    }
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
                    for task in tasks {
                        enqueue(&mut queue, &mut slots, task);
                    }
                }
                DispatcherMsg::Cancel(id) => match slots.get_mut(&id) {
                    Some(Slot::Queued(key, _)) => {
                        queue.remove(key);
                        slots.remove(&id);
                    }
                    Some(Slot::InFlight { cancelled }) => *cancelled = true,
                    None => {}
                },
            },
            Some(expired) = queue.next() => {
                let id = expired.into_inner();
                if let Some(Slot::Queued(_, mut task)) = slots.insert(id, Slot::InFlight { cancelled: false }) {
                    let ctx = ctx.clone();
                    let handle = in_flight.spawn(async move {
                        let next = attempt(&ctx, &mut task).await;
                        (task, next)
                    });
                    task_subs.insert(handle.id(), id);
                }
            },
            Some(done) = in_flight.join_next_with_id() => {
                let (id, result) = match done {
                    Ok((task_id, result)) => (task_subs.remove(&task_id), Ok(result)),
                    Err(e) => (task_subs.remove(&e.id()), Err(e)),
                };
                let Some(id) = id else { continue };
                let cancelled = matches!(slots.remove(&id), Some(Slot::InFlight { cancelled: true }));
                match result {
                    Ok((mut task, Some(due_at))) if !cancelled => {
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
