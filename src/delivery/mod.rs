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
use crate::recent::Recently;
use crate::store::{AttemptRecord, AttemptResult, DeliveryTask, Millis, Store, now_ms};
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
    /// Each tenant's signing secrets, shared with the API that rotates them.
    pub secrets: Arc<SecretsCache>,
    /// The partitions this instance delivers (all of them on SQLite).
    pub ownership: Arc<crate::cluster::Ownership>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl DeliveryContext {
    pub fn new(
        store: Arc<dyn Store>,
        secrets: Arc<SecretsCache>,
        policy: EgressPolicy,
        lookup: client::Lookup,
        config: DeliveryConfig,
        ownership: Arc<crate::cluster::Ownership>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        DeliveryContext {
            metrics,
            http: client::callback_client(&policy, lookup, config.timeout),
            overall: Arc::new(Semaphore::new(config.max_in_flight)),
            per_host: Mutex::new(HashMap::new()),
            secrets,
            ownership,
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
pub async fn send(ctx: &DeliveryContext, task: &DeliveryTask, secrets: &[SigningSecret]) -> AttemptOutcome {
    let mut started_at = now_ms();
    let mut clock = Instant::now();
    let failed = |error: String, started_at: Millis, clock: Instant| AttemptOutcome {
        started_at,
        duration_ms: elapsed_ms(clock),
        status_code: None,
        refused: error.starts_with("egress policy"),
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
            let error = match error.find("egress policy") {
                Some(at) => error[at..].to_owned(),
                None => error,
            };
            return failed(error, started_at, clock);
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
    let outcome = send(ctx, task, &secrets).await;
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
    // A cancellation can overtake the delivery it ends: the job's result commits, the cancel commits
    // and sends its message, and only then does the poller hand over the delivery. A cancelled
    // subscription cannot be redelivered, so a delivery for one cancelled moments ago is dropped.
    let mut cancelled: Recently<SubscriptionId> = Recently::new();
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
                    for task in tasks.into_iter().filter(|t| ctx.ownership.owns(t.partition)) {
                        if cancelled.contains(&task.subscription_id) {
                            tracing::debug!(subscription_id = %task.subscription_id, "cancelled; its delivery is dropped");
                            continue;
                        }
                        enqueue(&mut queue, &mut slots, task);
                    }
                }
                DispatcherMsg::Cancel(id) => {
                    cancelled.record(id);
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
                    Some(Slot::Queued(_, mut task)) if ctx.ownership.owns(task.partition) => {
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

    /// A cancellation that overtakes its delivery (the result commits, the cancel commits and sends its
    /// message, then the poller hands over the delivery) must not reach the receiver. The real dispatch
    /// loop on a real SQLite store, with a receiver on loopback.
    #[tokio::test]
    async fn a_delivery_that_arrives_after_its_cancellation_is_not_sent() {
        use crate::keys::ApiKey;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("sqlite://{}", dir.path().join("jobhook.db").display())).await.unwrap();
        let key = ApiKey::generate();
        store.create_key("test", key.hash(), &SigningSecret::generate(), now_ms()).await.unwrap();
        let tenant = store.tenant_by_key(key.hash()).await.unwrap().unwrap();
        let hits: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let receiver = {
            let hits = hits.clone();
            axum::Router::new().route(
                "/{which}",
                axum::routing::post(move |axum::extract::Path(which): axum::extract::Path<usize>| {
                    let hits = hits.clone();
                    async move {
                        hits[which].fetch_add(1, Ordering::SeqCst);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, receiver).await });

        let policy = EgressPolicy { allow_private: true, ..Default::default() };
        let config = DeliveryConfig {
            retry_schedule: vec![Duration::from_secs(1)],
            timeout: Duration::from_secs(5),
            max_in_flight: 8,
            max_in_flight_per_host: 8,
        };
        let ctx = Arc::new(DeliveryContext::new(
            store.clone(),
            Arc::new(SecretsCache::new(store.clone())),
            policy,
            client::system_lookup(),
            config,
            Arc::new(crate::cluster::Ownership::all()),
            Arc::new(crate::metrics::Metrics::new()),
        ));
        let (handle, inbox) = channel();
        let shutdown = CancellationToken::new();
        let dispatcher = tokio::spawn(run(ctx, inbox, Vec::new(), shutdown.clone(), Duration::from_secs(1)));
        let task = |which: usize, due_at: Millis| {
            let job_id: crate::domain::JobId = uuid::Uuid::new_v4().to_string().parse().unwrap();
            let mut task = DeliveryTask::first(
                SubscriptionId::new(),
                job_id,
                tenant.id,
                crate::domain::new_webhook_id(),
                format!("http://{addr}/{which}"),
                bytes::Bytes::from_static(b"{}"),
                due_at,
            );
            task.due_at = due_at;
            task
        };
        let cancelled = task(0, now_ms());
        handle.cancel(cancelled.subscription_id);
        handle.deliver(vec![cancelled]);
        // Due later than the cancelled one: had that been sent, it would have arrived first.
        handle.deliver(vec![task(1, now_ms() + 200)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hits[1].load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for the live delivery");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(hits[0].load(Ordering::SeqCst), 0, "a cancelled subscription was called back");
        shutdown.cancel();
        dispatcher.await.unwrap();
    }
}
