//! One delivery attempt: a signed POST to the callback, the decision on what follows, and its record.
//!
//! [`attempt`] returns a [`DeliveryOutcome`] for the dispatcher to schedule; [`decide`] is the pure rule
//! from what the request saw ([`AttemptOutcome`]) to what follows. A request that got no answer carries
//! a [`SendError`], and a permanent failure is decided on its variant, never on its wording.

use std::time::{Duration, Instant};

use super::breaker::{Breaker, Gate};
use super::client::{self, EgressRefused};
use super::response::{Captured, capture};
use super::{DeliveryContext, Slots, retry, signing};
use crate::domain::{FailureReason, Timestamp, truncate};
use crate::keys::SigningSecret;
use crate::store::{AttemptRecord, AttemptResult, Claim, DeliveryTask};
use crate::upstream::{describe_transport_error, parse_retry_after};

/// When the store cannot give the signing secrets, the attempt waits this long; when it cannot record
/// an attempt's outcome, the write is retried after this, doubling up to [`MAX_STORE_RETRY`]. (If the
/// process stops meanwhile, the attempt is sent again after the restart, under the same `webhook-id`.)
const STORE_RETRY: Duration = Duration::from_secs(5);
const MAX_STORE_RETRY: Duration = Duration::from_secs(60);

/// Why a request got no (acceptable) answer. Its text goes to the attempt log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The stored callback URL does not parse (a bug or a hand-edited row): retried on the schedule.
    #[error("callback URL does not parse: {0}")]
    BadUrl(url::ParseError),
    /// The egress policy refused the callback's address: retrying cannot help.
    #[error(transparent)]
    Refused(EgressRefused),
    /// No answer: a timeout, a refused connection, a reset (described without the URL).
    #[error("{0}")]
    Transport(String),
    #[error("the receiver redirected; redirects are not followed")]
    Redirected,
}

impl SendError {
    /// Classifies a failed request: an egress refusal, found by walking the cause chain (the vetting
    /// resolver's refusal comes back inside a connect error), or a transport failure.
    pub(crate) fn from_request(e: &reqwest::Error) -> Self {
        match client::find_refusal(e) {
            Some(refused) => SendError::Refused(refused.clone()),
            None => SendError::Transport(describe_transport_error(e)),
        }
    }
}

/// What one attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    /// When the request started (after waiting for a concurrency slot), and how long it took.
    pub started_at: Timestamp,
    pub duration_ms: u64,
    pub status_code: Option<u16>,
    pub error: Option<SendError>,
    pub retry_after: Option<Duration>,
    /// What the receiver answered (its content type and the start of its body), if it answered.
    pub response: Option<Captured>,
}

impl AttemptOutcome {
    /// An attempt that sent no request.
    fn unsent(error: SendError) -> Self {
        AttemptOutcome {
            started_at: Timestamp::now(),
            duration_ms: 0,
            status_code: None,
            error: Some(error),
            retry_after: None,
            response: None,
        }
    }
}

/// What [`attempt`] did, for the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver accepted it.
    Delivered,
    /// It failed for good, for this reason.
    Failed(FailureReason),
    /// The attempt failed; the next one is due then.
    RetryAt(Timestamp),
    /// No attempt was made now (another instance holds the claim, the store could not answer): try then.
    Later(Timestamp),
    /// No attempt was made: the callback host's breaker is open. Ask again then (or when it closes).
    Paused(Timestamp),
    /// Not ours to attempt any more: cancelled, delivered elsewhere, replaced by a newer series, or its
    /// partition went to another instance.
    Over,
}

impl DeliveryOutcome {
    /// When the delivery is due again, if ever (here).
    pub fn next_due(self) -> Option<Timestamp> {
        match self {
            DeliveryOutcome::RetryAt(at) | DeliveryOutcome::Later(at) | DeliveryOutcome::Paused(at) => Some(at),
            DeliveryOutcome::Delivered | DeliveryOutcome::Failed(_) | DeliveryOutcome::Over => None,
        }
    }
}

/// What follows an attempt: a pure function of its outcome, the attempts made and the schedule.
pub fn decide(
    outcome: &AttemptOutcome,
    attempt: u32,
    schedule: &[Duration],
    now: Timestamp,
    jitter: f64,
) -> AttemptResult {
    if let Some(SendError::Refused(_)) = outcome.error {
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
        Some(delay) => AttemptResult::RetryAt(now + delay),
        None => AttemptResult::Failed(FailureReason::DeliveryExhausted),
    }
}

/// What an attempt's request needs to start.
enum Start {
    /// Slots held, claim held: send.
    Go(url::Url, Slots),
    /// No request can be made (the callback URL does not parse, the egress policy refuses it).
    Unsent(SendError),
    /// Another instance holds the claim; try again then.
    Later(Timestamp),
    /// The delivery is over (cancelled, delivered elsewhere, replaced by a newer series).
    Over,
}

/// Gets an attempt ready: a slot, then the claim that keeps a cancellation (or another instance) from
/// committing while the request may be on the wire (DESIGN promise 11). A claim taken with the job's
/// result is used as it is while it outlasts the request and the record; otherwise one is taken now.
async fn start(ctx: &DeliveryContext, task: &mut DeliveryTask) -> Start {
    let url = match url::Url::parse(&task.callback_url) {
        Ok(url) => url,
        Err(e) => return Start::Unsent(SendError::BadUrl(e)),
    };
    let slots = ctx.slots(task.tenant_id, url.host_str().unwrap_or_default()).await;
    let needed = Instant::now() + ctx.config.timeout + super::RECORD_MARGIN;
    if task.claimed_until.is_none_or(|until| until < needed) {
        match ctx.store.claim_delivery(task, DeliveryContext::claim_for(&ctx.config)).await {
            Ok(Claim::Held(until)) => task.claimed_until = Some(until),
            Ok(Claim::Busy(until)) => return Start::Later(until),
            Ok(Claim::Gone) => return Start::Over,
            Err(e) => {
                tracing::error!(error = %crate::Chain(&e), "could not claim a delivery; the attempt waits");
                return Start::Later(Timestamp::now() + STORE_RETRY);
            }
        }
    }
    if let Err(refused) = ctx.policy.check_literal(&url) {
        return Start::Unsent(SendError::Refused(refused));
    }
    Start::Go(url, slots)
}

/// One signed POST to the callback, with its slots and claim held. Never fails: every outcome is an
/// answer.
async fn send(ctx: &DeliveryContext, task: &DeliveryTask, url: url::Url, secrets: &[SigningSecret]) -> AttemptOutcome {
    let started_at = Timestamp::now();
    let clock = Instant::now();
    let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let event = ctx.events.of(&task.job_id, &task.body);
    let body = super::envelope::body_of(task, event);
    let signature = signing::signature_header(secrets, &task.webhook_id, timestamp, &body);
    // The subscription's own headers first: none of them can be one of ours (they are refused at
    // registration), so ours below are never replaced.
    let request =
        task.form.headers.iter().fold(ctx.http.post(url), |request, (name, value)| request.header(name, value));
    let request = request
        .header("content-type", "application/json")
        .header("webhook-id", &task.webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header("jobhook-event-type", event)
        .header("jobhook-subscription-id", task.subscription_id.to_string())
        .body(body);
    let mut response = match request.send().await {
        Ok(response) => response,
        Err(e) => {
            return AttemptOutcome {
                started_at,
                duration_ms: elapsed_ms(clock),
                status_code: None,
                error: Some(SendError::from_request(&e)),
                retry_after: None,
                response: None,
            };
        }
    };
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let captured = capture(&mut response).await;
    AttemptOutcome {
        started_at,
        duration_ms: elapsed_ms(clock),
        status_code: Some(status),
        error: (300..=399).contains(&status).then_some(SendError::Redirected),
        retry_after,
        response: Some(captured),
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Signs and sends one attempt, or says why none was made (`Err`: what follows instead).
async fn request(ctx: &DeliveryContext, task: &mut DeliveryTask) -> Result<AttemptOutcome, DeliveryOutcome> {
    let secrets = match ctx.secrets.get(task.tenant_id).await {
        Ok(secrets) => secrets,
        Err(e) => {
            tracing::error!(error = %crate::Chain(&e), "could not read the signing secrets; the attempt waits");
            return Err(DeliveryOutcome::Later(Timestamp::now() + STORE_RETRY));
        }
    };
    match start(ctx, task).await {
        Start::Go(url, slots) => {
            let outcome = send(ctx, task, url, &secrets).await;
            drop(slots);
            Ok(outcome)
        }
        Start::Unsent(error) => Ok(AttemptOutcome::unsent(error)),
        Start::Later(at) => {
            task.claimed_until = None;
            Err(DeliveryOutcome::Later(at))
        }
        Start::Over => {
            task.claimed_until = None;
            Err(DeliveryOutcome::Over)
        }
    }
}

/// Tells the breaker what an attempt to `host` saw. An attempt that sent no request says nothing about
/// the host.
fn observe(ctx: &DeliveryContext, host: &str, probe: bool, outcome: &AttemptOutcome) {
    let result = match (&outcome.error, outcome.status_code) {
        (Some(SendError::Refused(_) | SendError::BadUrl(_)), _) => {
            if probe {
                ctx.breaker.release(host);
            }
            return;
        }
        (None, Some(200..=299)) => Ok(()),
        (Some(e), _) => Err(truncate(&e.to_string(), 500)),
        (None, Some(code)) => Err(format!("HTTP {code}")),
        (None, None) => Err("no answer".to_owned()),
    };
    ctx.breaker.record(host, probe, result);
}

/// One delivery attempt: ask the host's breaker, send, decide, record.
#[tracing::instrument(level = "debug", skip_all, fields(subscription_id = %task.subscription_id, job_id = %task.job_id, attempt = task.attempts_made + 1))]
pub async fn attempt(ctx: &DeliveryContext, task: &mut DeliveryTask) -> DeliveryOutcome {
    let attempt = task.attempts_made + 1;
    let host = Breaker::host_of(&task.callback_url);
    let probe = match host.as_deref().map(|h| ctx.breaker.gate(h, task.tenant_id)) {
        Some(Gate::Paused(wait)) => return DeliveryOutcome::Paused(Timestamp::now() + wait),
        Some(Gate::Probe) => true,
        Some(Gate::Go) | None => false,
    };
    let outcome = match request(ctx, task).await {
        Ok(outcome) => outcome,
        Err(none) => {
            if let Some(host) = host.as_deref().filter(|_| probe) {
                ctx.breaker.release(host);
            }
            return none;
        }
    };
    if let Some(host) = &host {
        observe(ctx, host, probe, &outcome);
    }
    // A claim serves one attempt: recording it releases the claim in the store, so the next attempt
    // (a retry) must take one of its own, and until then this instance holds none (see `ours`).
    task.claimed_until = None;
    let now = Timestamp::now();
    if outcome.status_code.is_some() {
        ctx.metrics.delivery_seconds.observe(outcome.duration_ms as f64 / 1000.0);
    }
    if task.attempts_made == 0 {
        ctx.metrics.delivery_lag_seconds.observe(now.duration_since(task.due_at).as_secs_f64());
    }
    let result = match decide(&outcome, attempt, &ctx.config.retry_schedule, now, rand::random_range(-1.0..=1.0)) {
        // While its host is down a delivery's retries do not run out: it waits, paused, for the host.
        AttemptResult::Failed(FailureReason::DeliveryExhausted)
            if host.as_deref().is_some_and(|h| ctx.breaker.is_open(h)) =>
        {
            AttemptResult::RetryAt(now + ctx.breaker.probe_interval())
        }
        result => result,
    };
    log_result(&outcome, result, now);
    let record = AttemptRecord {
        subscription_id: task.subscription_id,
        partition: task.partition,
        series: task.series,
        attempt,
        webhook_id: task.webhook_id.clone(),
        started_at: outcome.started_at,
        status_code: outcome.status_code,
        error: outcome.error.as_ref().map(|e| truncate(&e.to_string(), 500)),
        duration_ms: outcome.duration_ms,
        response_content_type: outcome.response.as_ref().and_then(|r| r.content_type.clone()),
        response_body: outcome.response.as_ref().map(|r| r.body.clone()),
    };
    if !record_outcome(ctx, &record, result, now).await {
        // Cancelled (or redelivered) meanwhile, or its partition went elsewhere: this series is over.
        return DeliveryOutcome::Over;
    }
    task.attempts_made = attempt;
    let (counted, outcome) = match result {
        AttemptResult::Delivered => ("delivered", DeliveryOutcome::Delivered),
        AttemptResult::RetryAt(at) => ("retry", DeliveryOutcome::RetryAt(at)),
        AttemptResult::Failed(reason) => ("failed", DeliveryOutcome::Failed(reason)),
    };
    ctx.metrics.attempt(counted, attempt);
    if matches!(outcome, DeliveryOutcome::Delivered | DeliveryOutcome::Failed(_)) {
        ctx.metrics.finished(counted, 1);
    }
    outcome
}

fn log_result(outcome: &AttemptOutcome, result: AttemptResult, now: Timestamp) {
    let status = outcome.status_code;
    let error = outcome.error.as_ref().map(tracing::field::display);
    match result {
        AttemptResult::Delivered => tracing::debug!(status, duration_ms = outcome.duration_ms, "delivered"),
        AttemptResult::RetryAt(at) => {
            tracing::info!(
                status,
                error,
                retry_in_ms = at.duration_since(now).as_millis(),
                "attempt failed; will retry"
            )
        }
        AttemptResult::Failed(reason) => {
            tracing::warn!(status, error, reason = reason.as_str(), "delivery failed for good")
        }
    }
}

/// Commits an attempt's record and result; `false` when the delivery was no longer ours to record.
///
/// The receiver has answered: if the store cannot take the record now, keep the answer and retry the
/// write, rather than send the request again (a receiver that said 2xx or 410 would hear it every few
/// seconds for as long as the outage lasts).
async fn record_outcome(ctx: &DeliveryContext, record: &AttemptRecord, result: AttemptResult, now: Timestamp) -> bool {
    let mut wait = STORE_RETRY;
    loop {
        match ctx.store.record_attempt(record, result, now).await {
            Ok(recorded) => return recorded,
            // Its partition went to another instance, which resends from the store.
            Err(_) if !ctx.ownership.owns(record.partition) => return false,
            Err(e) => {
                tracing::error!(error = %crate::Chain(&e), retry_in = ?wait, "could not record a delivery attempt; its outcome is kept and the write retried");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_STORE_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn outcome(status: Option<u16>, retry_after: Option<u64>) -> AttemptOutcome {
        AttemptOutcome {
            started_at: at(0),
            duration_ms: 0,
            status_code: status,
            error: None,
            retry_after: retry_after.map(Duration::from_secs),
            response: None,
        }
    }

    const SCHEDULE: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(300)];

    #[test]
    fn any_2xx_is_delivered() {
        for code in [200, 201, 202, 204, 299] {
            assert_eq!(decide(&outcome(Some(code), None), 1, &SCHEDULE, at(0), 0.0), AttemptResult::Delivered);
        }
    }

    #[test]
    fn a_refused_address_stops_at_once() {
        let refused = AttemptOutcome {
            error: Some(SendError::Refused(EgressRefused("10.0.0.1, a private address".into()))),
            ..outcome(None, None)
        };
        assert_eq!(decide(&refused, 1, &SCHEDULE, at(0), 0.0), AttemptResult::Failed(FailureReason::CallbackRefused));
    }

    #[test]
    fn gone_stops_at_once_and_the_last_failure_exhausts_the_delivery() {
        let gone = decide(&outcome(Some(410), None), 1, &SCHEDULE, at(0), 0.0);
        assert_eq!(gone, AttemptResult::Failed(FailureReason::CallbackGone));
        let third = decide(&outcome(Some(500), None), 3, &SCHEDULE, at(0), 0.0);
        assert_eq!(third, AttemptResult::Failed(FailureReason::DeliveryExhausted));
    }

    #[test]
    fn errors_redirects_and_timeouts_retry_on_the_schedule() {
        for status in [Some(500), Some(302), Some(404), None] {
            assert_eq!(decide(&outcome(status, None), 1, &SCHEDULE, at(1_000), 0.0), AttemptResult::RetryAt(at(6_000)));
            assert_eq!(
                decide(&outcome(status, None), 2, &SCHEDULE, at(1_000), 0.0),
                AttemptResult::RetryAt(at(301_000))
            );
        }
    }

    #[test]
    fn retry_after_counts_only_for_429_and_503() {
        assert_eq!(decide(&outcome(Some(429), Some(60)), 1, &SCHEDULE, at(0), 0.0), AttemptResult::RetryAt(at(60_000)));
        assert_eq!(decide(&outcome(Some(503), Some(60)), 1, &SCHEDULE, at(0), 0.0), AttemptResult::RetryAt(at(60_000)));
        assert_eq!(decide(&outcome(Some(500), Some(60)), 1, &SCHEDULE, at(0), 0.0), AttemptResult::RetryAt(at(5_000)));
    }
}
